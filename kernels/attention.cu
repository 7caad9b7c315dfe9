// Scaled-dot-product attention without an N x N score buffer (online softmax, FlashAttention-2
// style), in diffusers' layout before the head split: q [b, nq, heads*d], k [b, nk, heads*d],
// v [b, nk, heads*d], out [b, nq, heads*d], each with its own row stride (*_ld elements, at least
// heads*d, so q, k and v may be column slices of one fused QKV projection); head h uses columns
// h*d..(h+1)*d of a row. nk may differ from nq (cross-attention). No dropout.
//
//   ferry_attention_<t>_d<D> (t = f16, bf16; D = 40, 64, 80, 160): tensor cores. Block = 4 warps
//     = 64 query rows of one (batch, head); grid (ceil(nq/64), heads, b). Each warp keeps its 16
//     query rows as mma A fragments in registers (d zero-padded to a multiple of 16), streams
//     64-key tiles of K (row-major) and V (transposed) through shared memory, computes S = Q Kᵀ
//     and O += P V with mma.sync m16n8k16 (f32 accumulation), and rescales O by the running max.
//     P is re-packed from the S accumulators straight into A fragments (no shared memory).
//   ferry_attention_simt_<t> (t = f32, f16, bf16; any d <= 512, e.g. the VAE's single 512-wide
//     head): one warp per query row, 4 rows per block; grid (ceil(nq/4), heads, b). Scores of 32
//     keys at a time, each a warp-wide dot product; f32 arithmetic throughout.
// `scale` is the softmax temperature (1/sqrt(d) for SD). With `causal` (CLIP's text encoder),
// query i attends to keys 0..=i only (nq == nk); key tiles entirely above the diagonal are skipped.

#include "ferry_common.cuh"

#define LOG2E 1.4426950408889634f

__device__ __forceinline__ void mma16816(float* c, const unsigned* a, const unsigned* b, f16)
{
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ void mma16816(float* c, const unsigned* a, const unsigned* b, bf16)
{
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ unsigned pack2(float lo, float hi, f16)
{
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&v);
}
__device__ __forceinline__ unsigned pack2(float lo, float hi, bf16)
{
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&v);
}
__device__ __forceinline__ float2 unpack2(unsigned u, f16)
{
    return __half22float2(*reinterpret_cast<__half2*>(&u));
}
__device__ __forceinline__ float2 unpack2(unsigned u, bf16)
{
    return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&u));
}

// Two consecutive elements (an even column) as one 32-bit word; zero when masked.
template <typename T> __device__ __forceinline__ unsigned ld_pair(const T* p, bool ok)
{
    return ok ? *reinterpret_cast<const unsigned*>(p) : 0u;
}

#define KV_TILE 64

template <typename T, int D>
__device__ void flash_attention(const T* q, const T* k, const T* v, T* o, int nq, int nk,
                                long long q_ld, long long k_ld, long long v_ld, long long o_ld,
                                float scale, unsigned int causal)
{
    constexpr int DP = (D + 15) / 16 * 16; // d padded for the k16 steps of Q Kᵀ
    constexpr int KS = DP + 8;             // K tile row stride (halves)
    constexpr int VS = KV_TILE + 8;        // Vᵀ tile row stride (halves)
    constexpr int DT = D / 8;              // n8 tiles of the output
    __shared__ __align__(16) T Ks[KV_TILE * KS];
    __shared__ __align__(16) T Vt[D * VS];

    int b = blockIdx.z, h = blockIdx.y;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int g = lane >> 2, t = lane & 3;
    int r0 = blockIdx.x * 64 + warp * 16 + g, r1 = r0 + 8;
    const T* qb = q + (long long)b * nq * q_ld + h * D;
    const T* kb = k + (long long)b * nk * k_ld + h * D;
    const T* vb = v + (long long)b * nk * v_ld + h * D;
    T* ob = o + (long long)b * nq * o_ld + h * D;

    unsigned qa[DP / 16][4];
#pragma unroll
    for (int kk = 0; kk < DP / 16; kk++) {
        int c0 = kk * 16 + 2 * t, c1 = c0 + 8;
        qa[kk][0] = ld_pair(qb + r0 * q_ld + c0, r0 < nq && c0 < D);
        qa[kk][1] = ld_pair(qb + r1 * q_ld + c0, r1 < nq && c0 < D);
        qa[kk][2] = ld_pair(qb + r0 * q_ld + c1, r0 < nq && c1 < D);
        qa[kk][3] = ld_pair(qb + r1 * q_ld + c1, r1 < nq && c1 < D);
    }
    float acc[DT][4];
#pragma unroll
    for (int i = 0; i < DT; i++) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;
    float m0 = FERRY_NEG_INF, m1 = FERRY_NEG_INF, l0 = 0.0f, l1 = 0.0f;
    const float sl = scale * LOG2E;

    // Causal: no row of this block sees keys past its last row (uniform per block).
    int nk_end = causal ? min(nk, (int)blockIdx.x * 64 + 64) : nk;
    for (int kv0 = 0; kv0 < nk_end; kv0 += KV_TILE) {
        int valid = min(KV_TILE, nk - kv0);
        __syncthreads(); // the previous tile is no longer read
        for (int e = threadIdx.x; e < KV_TILE * DP / 2; e += blockDim.x) {
            int key = e / (DP / 2), c = (e % (DP / 2)) * 2;
            unsigned w = ld_pair(kb + (long long)(kv0 + key) * k_ld + c, key < valid && c < D);
            *reinterpret_cast<unsigned*>(Ks + key * KS + c) = w;
        }
        for (int e = threadIdx.x; e < KV_TILE * D / 2; e += blockDim.x) {
            int key = e / (D / 2), c = (e % (D / 2)) * 2;
            unsigned w = ld_pair(vb + (long long)(kv0 + key) * v_ld + c, key < valid);
            Vt[c * VS + key] = reinterpret_cast<T*>(&w)[0];
            Vt[(c + 1) * VS + key] = reinterpret_cast<T*>(&w)[1];
        }
        __syncthreads();

        float s[KV_TILE / 8][4];
#pragma unroll
        for (int nt = 0; nt < KV_TILE / 8; nt++) {
            s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < DP / 16; kk++) {
                const T* kr = Ks + (nt * 8 + g) * KS + kk * 16 + 2 * t;
                unsigned bf[2] = {*reinterpret_cast<const unsigned*>(kr),
                                  *reinterpret_cast<const unsigned*>(kr + 8)};
                mma16816(s[nt], qa[kk], bf, T());
            }
        }
        float mx0 = FERRY_NEG_INF, mx1 = FERRY_NEG_INF;
#pragma unroll
        for (int nt = 0; nt < KV_TILE / 8; nt++)
#pragma unroll
            for (int q2 = 0; q2 < 4; q2++) {
                int key = nt * 8 + 2 * t + (q2 & 1);
                bool ok = key < valid && (!causal || kv0 + key <= (q2 < 2 ? r0 : r1));
                float x = ok ? s[nt][q2] * sl : FERRY_NEG_INF;
                s[nt][q2] = x;
                if (q2 < 2) mx0 = fmaxf(mx0, x);
                else mx1 = fmaxf(mx1, x);
            }
#pragma unroll
        for (int off = 1; off < 4; off <<= 1) {
            mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, off));
            mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, off));
        }
        float n0 = fmaxf(m0, mx0), n1 = fmaxf(m1, mx1);
        // A row with no finite score yet subtracts 0, not -inf (-inf - -inf is NaN): its
        // probabilities and rescale factor are then exp2(-inf) = 0.
        float u0 = n0 == FERRY_NEG_INF ? 0.0f : n0, u1 = n1 == FERRY_NEG_INF ? 0.0f : n1;
        float a0 = exp2f(m0 - u0), a1 = exp2f(m1 - u1);
        m0 = n0;
        m1 = n1;
        float ps0 = 0.0f, ps1 = 0.0f;
#pragma unroll
        for (int nt = 0; nt < KV_TILE / 8; nt++) {
            s[nt][0] = exp2f(s[nt][0] - u0);
            s[nt][1] = exp2f(s[nt][1] - u0);
            s[nt][2] = exp2f(s[nt][2] - u1);
            s[nt][3] = exp2f(s[nt][3] - u1);
            ps0 += s[nt][0] + s[nt][1];
            ps1 += s[nt][2] + s[nt][3];
        }
        l0 = l0 * a0 + ps0;
        l1 = l1 * a1 + ps1;
#pragma unroll
        for (int i = 0; i < DT; i++) {
            acc[i][0] *= a0;
            acc[i][1] *= a0;
            acc[i][2] *= a1;
            acc[i][3] *= a1;
        }
#pragma unroll
        for (int kc = 0; kc < KV_TILE / 16; kc++) {
            unsigned pa[4] = {pack2(s[2 * kc][0], s[2 * kc][1], T()),
                              pack2(s[2 * kc][2], s[2 * kc][3], T()),
                              pack2(s[2 * kc + 1][0], s[2 * kc + 1][1], T()),
                              pack2(s[2 * kc + 1][2], s[2 * kc + 1][3], T())};
#pragma unroll
            for (int dt = 0; dt < DT; dt++) {
                const T* vr = Vt + (dt * 8 + g) * VS + kc * 16 + 2 * t;
                unsigned bf[2] = {*reinterpret_cast<const unsigned*>(vr),
                                  *reinterpret_cast<const unsigned*>(vr + 8)};
                mma16816(acc[dt], pa, bf, T());
            }
        }
    }
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
        l0 += __shfl_xor_sync(0xffffffffu, l0, off);
        l1 += __shfl_xor_sync(0xffffffffu, l1, off);
    }
    // A row whose scores are all -inf (fully masked) has l = 0: it gets zeros, not 0/0.
    float i0 = l0 > 0.0f ? 1.0f / l0 : 0.0f, i1 = l1 > 0.0f ? 1.0f / l1 : 0.0f;
#pragma unroll
    for (int dt = 0; dt < DT; dt++) {
        int c = dt * 8 + 2 * t;
        if (r0 < nq)
            *reinterpret_cast<unsigned*>(ob + r0 * o_ld + c) =
                pack2(acc[dt][0] * i0, acc[dt][1] * i0, T());
        if (r1 < nq)
            *reinterpret_cast<unsigned*>(ob + r1 * o_ld + c) =
                pack2(acc[dt][2] * i1, acc[dt][3] * i1, T());
    }
}

#define FLASH(sfx, T, D)                                                                         \
    extern "C" __global__ void __launch_bounds__(128) ferry_attention_##sfx##_d##D(              \
        const T* q, const T* k, const T* v, T* o, int nq, int nk, long long q_ld,                \
        long long k_ld, long long v_ld, long long o_ld, float scale, unsigned int causal)         \
    {                                                                                            \
        flash_attention<T, D>(q, k, v, o, nq, nk, q_ld, k_ld, v_ld, o_ld, scale, causal);        \
    }
FLASH(f16, f16, 40)
FLASH(f16, f16, 64)
FLASH(f16, f16, 80)
FLASH(f16, f16, 160)
FLASH(bf16, bf16, 40)
FLASH(bf16, bf16, 64)
FLASH(bf16, bf16, 80)
FLASH(bf16, bf16, 160)

#define SIMT_MAX_D 512
#define SIMT_NI (SIMT_MAX_D / 32)

template <typename T>
__device__ void simt_attention(const T* q, const T* k, const T* v, T* o, int nq, int nk, int d,
                               long long q_ld, long long k_ld, long long v_ld, long long o_ld,
                               float scale, unsigned int causal)
{
    int b = blockIdx.z, h = blockIdx.y;
    int lane = threadIdx.x & 31;
    int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= nq) return; // whole warp leaves together
    const T* qr = q + ((long long)b * nq + row) * q_ld + (long long)h * d;
    const T* kb = k + (long long)b * nk * k_ld + (long long)h * d;
    const T* vb = v + (long long)b * nk * v_ld + (long long)h * d;
    float qv[SIMT_NI], acc[SIMT_NI];
#pragma unroll
    for (int i = 0; i < SIMT_NI; i++) {
        int c = lane + 32 * i;
        qv[i] = c < d ? ld(qr + c) * scale : 0.0f;
        acc[i] = 0.0f;
    }
    float m = FERRY_NEG_INF, l = 0.0f;
    int nk_end = causal ? min(nk, row + 1) : nk; // uniform per warp
    for (int kv0 = 0; kv0 < nk_end; kv0 += 32) {
        int valid = min(32, nk_end - kv0);
        float mine = FERRY_NEG_INF; // lane j: score of key kv0 + j
        for (int j = 0; j < valid; j++) {
            const T* kr = kb + (long long)(kv0 + j) * k_ld;
            float part = 0.0f;
#pragma unroll
            for (int i = 0; i < SIMT_NI; i++) {
                int c = lane + 32 * i;
                if (c < d) part = fmaf(qv[i], ld(kr + c), part);
            }
            part = warp_sum(part);
            if (lane == j) mine = part;
        }
        float mn = fmaxf(m, warp_max(mine));
        float u = mn == FERRY_NEG_INF ? 0.0f : mn; // as in flash_attention: no -inf - -inf
        float alpha = expf(m - u);
        float p = lane < valid ? expf(mine - u) : 0.0f;
        l = l * alpha + warp_sum(p);
        m = mn;
#pragma unroll
        for (int i = 0; i < SIMT_NI; i++) acc[i] *= alpha;
        for (int j = 0; j < valid; j++) {
            float pj = __shfl_sync(0xffffffffu, p, j);
            const T* vr = vb + (long long)(kv0 + j) * v_ld;
#pragma unroll
            for (int i = 0; i < SIMT_NI; i++) {
                int c = lane + 32 * i;
                if (c < d) acc[i] = fmaf(pj, ld(vr + c), acc[i]);
            }
        }
    }
    T* orow = o + ((long long)b * nq + row) * o_ld + (long long)h * d;
    float inv = l > 0.0f ? 1.0f / l : 0.0f; // fully masked row: zeros
#pragma unroll
    for (int i = 0; i < SIMT_NI; i++) {
        int c = lane + 32 * i;
        if (c < d) st(orow + c, acc[i] * inv);
    }
}

#define SIMT(sfx, T)                                                                             \
    extern "C" __global__ void __launch_bounds__(128) ferry_attention_simt_##sfx(                \
        const T* q, const T* k, const T* v, T* o, int nq, int nk, int d, long long q_ld,         \
        long long k_ld, long long v_ld, long long o_ld, float scale, unsigned int causal)         \
    {                                                                                            \
        simt_attention<T>(q, k, v, o, nq, nk, d, q_ld, k_ld, v_ld, o_ld, scale, causal);         \
    }
SIMT(f32, float)
SIMT(f16, f16)
SIMT(bf16, bf16)
