// Matrix multiply and convolution as (implicit) GEMM.
//
//   ferry_linear_<t>(x, w, bias, y, M, N, K)       y[M,N] = x[M,K] · w[N,K]ᵀ + bias[N]
//   ferry_conv2d_<t>(x, w, bias, y, geometry...)   NCHW conv, any kernel size / stride / padding
//
// f16 and bf16: tensor cores (mma.sync m16n8k16, f32 accumulation). Block tile 64x64x32, 4 warps
// in 2x2, each warp 32x32 (2x4 mma tiles); operands staged in padded shared memory (row stride
// 40 halves: the 32-bit fragment loads are bank-conflict free). f32: a SIMT kernel (64x64x16
// tile, 256 threads, 4x4 outputs each) with the same operand loaders, exact to f32 rounding.
// Every size is allowed: out-of-range rows / columns / k are zero-filled on load and masked on
// store. Grid: (ceil(M/64), ceil(N/64)) (M tiles on x, which allows 2^31-1 blocks; y only
// 65535); block 128 threads (f16/bf16) or 256 (f32).
//
// Convolution is implicit GEMM: M = n*ho*wo output pixels, N = out channels, K = c*kh*kw, with
// the A operand gathered from the NCHW input on the fly (zero padding by masking; no im2col
// buffer) and the weight [o, c, kh, kw] read as a row-major [o, c*kh*kw] matrix.

#include "ferry_common.cuh"

#define BM 64
#define BN 64
#define BK 32
#define SK (BK + 8)

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

// A row-major matrix [rows, K] with leading dimension ld: row r, column k.
template <typename T> struct RowMajor {
    const T* p;
    long long ld;
    int rows, K;
    static constexpr bool K_CONTIGUOUS = true;

    __device__ float at(int r, int k) const
    {
        return (r < rows && k < K) ? ld_elem(r, k) : 0.0f;
    }
    __device__ float ld_elem(int r, int k) const { return ::ld(p + r * ld + k); }

    // Stage rows r0..r0+64, columns k0..k0+32 into s[64][SK] (16-bit T), 128 threads.
    __device__ void stage(T* s, int r0, int k0) const
    {
        bool vec = ((ld & 7) == 0) && ((reinterpret_cast<unsigned long long>(p) & 15) == 0);
#pragma unroll
        for (int i = 0; i < 2; i++) {
            int chunk = threadIdx.x + i * 128;
            int r = chunk >> 2, kc = (chunk & 3) * 8;
            int gr = r0 + r, gk = k0 + kc;
            T* dst = s + r * SK + kc;
            if (vec && gr < rows && gk + 8 <= K) {
                *reinterpret_cast<uint4*>(dst) =
                    *reinterpret_cast<const uint4*>(p + gr * ld + gk);
            } else {
#pragma unroll
                for (int j = 0; j < 8; j++)
                    dst[j] = (gr < rows && gk + j < K) ? p[gr * ld + gk + j] : from_f32<T>(0.0f);
            }
        }
    }
};

// The implicit-GEMM A operand of a convolution: row m = output pixel (image, oy, ox), column
// k = (c, ky, kx); zero outside the image (padding) and outside the matrix.
template <typename T> struct ConvInput {
    const T* x;
    int c, h, w, kh, kw, sh, sw, pt, pl, ho, wo;
    int rows, K; // rows = n*ho*wo, K = c*kh*kw
    static constexpr bool K_CONTIGUOUS = false;

    struct Pixel {
        const T* base; // image start
        int iy0, ix0;
        bool valid;
    };
    __device__ Pixel pixel(int m) const
    {
        Pixel px;
        px.valid = m < rows;
        int mm = px.valid ? m : 0;
        int hw = ho * wo;
        int img = mm / hw, rem = mm % hw;
        px.base = x + (long long)img * c * h * w;
        px.iy0 = (rem / wo) * sh - pt;
        px.ix0 = (rem % wo) * sw - pl;
        return px;
    }
    __device__ float gather(const Pixel& px, int k) const
    {
        if (!px.valid || k >= K) return 0.0f;
        int khw = kh * kw;
        int ci = k / khw, r = k % khw;
        int iy = px.iy0 + r / kw, ix = px.ix0 + r % kw;
        if (iy < 0 || iy >= h || ix < 0 || ix >= w) return 0.0f;
        return ::ld(px.base + ((long long)ci * h + iy) * w + ix);
    }
    __device__ float at(int m, int k) const { return gather(pixel(m), k); }

    // Stage pixels r0..r0+64, k0..k0+32: each thread owns one pixel and 16 k (consecutive
    // threads read consecutive pixels: coalesced along a row of the image).
    __device__ void stage(T* s, int r0, int k0) const
    {
        int r = threadIdx.x & 63, kb = (threadIdx.x >> 6) * 16;
        Pixel px = pixel(r0 + r);
#pragma unroll 4
        for (int j = 0; j < 16; j++) s[r * SK + kb + j] = from_f32<T>(gather(px, k0 + kb + j));
    }
};

// y[m, n] (+ bias[n]) stored as a row-major matrix.
template <typename T> struct StoreRowMajor {
    T* y;
    long long ld;
    __device__ void put(int m, int n, float v) const { st(y + m * ld + n, v); }
};

// y[m, n] stored at NCHW position (image, channel n, pixel) for m = image*hw + pixel.
template <typename T> struct StoreNchw {
    T* y;
    int hw, channels;
    __device__ void put(int m, int n, float v) const
    {
        int img = m / hw, px = m % hw;
        st(y + ((long long)img * channels + n) * hw + px, v);
    }
};

// Tensor-core GEMM over 16-bit T: out(m, n) = sum_k A(m, k) B(n, k) + bias[n].
template <typename T, typename LA, typename LB, typename S>
__device__ void gemm_tc(const LA& A, const LB& B, const T* bias, const S& out, int M, int N, int K)
{
    __shared__ __align__(16) T As[BM * SK];
    __shared__ __align__(16) T Bs[BN * SK];
    int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int wm = (warp >> 1) * 32, wn = (warp & 1) * 32;
    int g = lane >> 2, t = lane & 3;
    float acc[2][4][4];
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int q = 0; q < 4; q++) acc[i][j][q] = 0.0f;

    for (int k0 = 0; k0 < K; k0 += BK) {
        A.stage(As, m0, k0);
        B.stage(Bs, n0, k0);
        __syncthreads();
#pragma unroll
        for (int ks = 0; ks < BK; ks += 16) {
            unsigned a[2][4], b[4][2];
#pragma unroll
            for (int i = 0; i < 2; i++) {
                const T* r = As + (wm + i * 16 + g) * SK + ks + 2 * t;
                a[i][0] = *reinterpret_cast<const unsigned*>(r);
                a[i][1] = *reinterpret_cast<const unsigned*>(r + 8 * SK);
                a[i][2] = *reinterpret_cast<const unsigned*>(r + 8);
                a[i][3] = *reinterpret_cast<const unsigned*>(r + 8 * SK + 8);
            }
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const T* r = Bs + (wn + j * 8 + g) * SK + ks + 2 * t;
                b[j][0] = *reinterpret_cast<const unsigned*>(r);
                b[j][1] = *reinterpret_cast<const unsigned*>(r + 8);
            }
#pragma unroll
            for (int i = 0; i < 2; i++)
#pragma unroll
                for (int j = 0; j < 4; j++) mma16816(acc[i][j], a[i], b[j], T());
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int q = 0; q < 4; q++) {
                int m = m0 + wm + i * 16 + g + (q >= 2 ? 8 : 0);
                int n = n0 + wn + j * 8 + 2 * t + (q & 1);
                if (m < M && n < N) out.put(m, n, acc[i][j][q] + (bias ? ld(bias + n) : 0.0f));
            }
}

// SIMT f32 GEMM with the same loaders: 64x64 tile, k step 16, 256 threads x (4x4) outputs.
template <typename LA, typename LB, typename S>
__device__ void gemm_simt(const LA& A, const LB& B, const float* bias, const S& out, int M, int N,
                          int K)
{
    __shared__ __align__(16) float As[16][BM + 4];
    __shared__ __align__(16) float Bs[16][BN + 4];
    int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
    int ty = threadIdx.x >> 4, tx = threadIdx.x & 15;
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) acc[i][j] = 0.0f;
    for (int k0 = 0; k0 < K; k0 += 16) {
#pragma unroll
        for (int i = 0; i < 4; i++) {
            int e = threadIdx.x + i * 256;
            int r, k;
            if (LA::K_CONTIGUOUS) { r = e >> 4; k = e & 15; } else { r = e & 63; k = e >> 6; }
            As[k][r] = A.at(m0 + r, k0 + k);
            Bs[e & 15][e >> 4] = B.at(n0 + (e >> 4), k0 + (e & 15));
        }
        __syncthreads();
#pragma unroll
        for (int k = 0; k < 16; k++) {
            float a[4], b[4];
#pragma unroll
            for (int i = 0; i < 4; i++) a[i] = As[k][ty * 4 + i];
#pragma unroll
            for (int j = 0; j < 4; j++) b[j] = Bs[k][tx * 4 + j];
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 4; j++) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) {
            int m = m0 + ty * 4 + i, n = n0 + tx * 4 + j;
            if (m < M && n < N) out.put(m, n, acc[i][j] + (bias ? bias[n] : 0.0f));
        }
}

template <typename T>
__device__ void linear_impl(const T* x, const T* w, const T* bias, T* y, int M, int N, int K)
{
    RowMajor<T> A{x, K, M, K};
    RowMajor<T> B{w, K, N, K};
    StoreRowMajor<T> out{y, N};
    if constexpr (sizeof(T) == 4) gemm_simt(A, B, bias, out, M, N, K);
    else gemm_tc<T>(A, B, bias, out, M, N, K);
}

// x [n, c, h, w], w [o, c, kh, kw], bias [o] or null, y [n, o, ho, wo]; padding top/left given,
// bottom/right implied by ho/wo (positions past the input read zeros).
template <typename T>
__device__ void conv2d_impl(const T* x, const T* w, const T* bias, T* y, int n, int c, int h,
                            int wd, int o, int kh, int kw, int sh, int sw, int pt, int pl, int ho,
                            int wo)
{
    int M = n * ho * wo, K = c * kh * kw;
    ConvInput<T> A{x, c, h, wd, kh, kw, sh, sw, pt, pl, ho, wo, M, K};
    RowMajor<T> B{w, K, o, K};
    StoreNchw<T> out{y, ho * wo, o};
    if constexpr (sizeof(T) == 4) gemm_simt(A, B, bias, out, M, o, K);
    else gemm_tc<T>(A, B, bias, out, M, o, K);
}

// ---------------------------------------------------------------------------------------------
// ferry_linear_big_<t> (f16, bf16): the same y = x·wᵀ + bias for large problems with K % 8 == 0
// and 16-byte aligned x and w. Block tile 128x128x32, 8 warps in 2x4, each warp 64x32 (4x4 mma
// tiles); a two-stage cp.async pipeline (the next k tile streams into shared memory while the
// current one is multiplied; rows / k past the end are zero-filled by cp.async's src-size 0) and
// ldmatrix.x4 fragment loads. Grid (ceil(M/128), ceil(N/128)), 256 threads.

#define LBM 128
#define LBN 128

__device__ __forceinline__ unsigned smem_u32(const void* p)
{
    return (unsigned)__cvta_generic_to_shared(p);
}

// 16 bytes global -> shared, asynchronously; zero-fills the 16 bytes when !ok (reads nothing).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool ok)
{
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)),
                 "l"(gmem), "r"(ok ? 16 : 0)
                 : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(unsigned* r, const void* p)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(p))
                 : "memory");
}

template <typename T>
__device__ void linear_big(const T* x, const T* w, const T* bias, T* y, int M, int N, int K)
{
    __shared__ __align__(16) T As[2][LBM * SK];
    __shared__ __align__(16) T Bs[2][LBN * SK];
    int m0 = blockIdx.x * LBM, n0 = blockIdx.y * LBN;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int wm = (warp >> 2) * 64, wn = (warp & 3) * 32;
    int g = lane >> 2, t = lane & 3;
    float acc[4][4][4];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int q = 0; q < 4; q++) acc[i][j][q] = 0.0f;

    // Stage the k tile at k0 into buffer `buf`: 128 rows x 4 chunks of 8 per operand, 2 each.
    auto stage = [&](int buf, int k0) {
#pragma unroll
        for (int i = 0; i < 2; i++) {
            int chunk = threadIdx.x + i * 256;
            int r = chunk >> 2, kc = (chunk & 3) * 8;
            bool kin = k0 + kc < K; // K % 8 == 0: a chunk is all in or all out
            int gm = m0 + r, gn = n0 + r;
            bool oka = kin && gm < M, okb = kin && gn < N;
            cp_async16(&As[buf][r * SK + kc], oka ? x + (long long)gm * K + k0 + kc : x, oka);
            cp_async16(&Bs[buf][r * SK + kc], okb ? w + (long long)gn * K + k0 + kc : w, okb);
        }
        asm volatile("cp.async.commit_group;\n" ::: "memory");
    };

    int kt_count = (K + BK - 1) / BK;
    // K == 0: no k tile, so no copy may be left in flight at exit; y is the bias alone.
    if (kt_count > 0) stage(0, 0);
    for (int kt = 0; kt < kt_count; kt++) {
        int cur = kt & 1;
        if (kt + 1 < kt_count) {
            stage(cur ^ 1, (kt + 1) * BK);
            asm volatile("cp.async.wait_group 1;\n" ::: "memory");
        } else {
            asm volatile("cp.async.wait_group 0;\n" ::: "memory");
        }
        __syncthreads();
#pragma unroll
        for (int ks = 0; ks < BK; ks += 16) {
            unsigned a[4][4], b[4][2];
#pragma unroll
            for (int i = 0; i < 4; i++)
                ldmatrix_x4(a[i], &As[cur][(wm + i * 16 + (lane & 15)) * SK + ks + (lane >> 4) * 8]);
#pragma unroll
            for (int p = 0; p < 2; p++) {
                unsigned r[4];
                int n = wn + p * 16 + (lane & 7) + ((lane >> 4) << 3);
                ldmatrix_x4(r, &Bs[cur][n * SK + ks + ((lane >> 3) & 1) * 8]);
                b[2 * p][0] = r[0];
                b[2 * p][1] = r[1];
                b[2 * p + 1][0] = r[2];
                b[2 * p + 1][1] = r[3];
            }
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 4; j++) mma16816(acc[i][j], a[i], b[j], T());
        }
        __syncthreads(); // buffer `cur` is refilled by the next iteration's stage()
    }
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int q = 0; q < 4; q++) {
                int m = m0 + wm + i * 16 + g + (q >= 2 ? 8 : 0);
                int n = n0 + wn + j * 8 + 2 * t + (q & 1);
                if (m < M && n < N)
                    st(y + (long long)m * N + n, acc[i][j][q] + (bias ? ld(bias + n) : 0.0f));
            }
}

extern "C" __global__ void __launch_bounds__(256)
    ferry_linear_big_f16(const f16* x, const f16* w, const f16* bias, f16* y, int M, int N, int K)
{
    linear_big<f16>(x, w, bias, y, M, N, K);
}
extern "C" __global__ void __launch_bounds__(256)
    ferry_linear_big_bf16(const bf16* x, const bf16* w, const bf16* bias, bf16* y, int M, int N,
                          int K)
{
    linear_big<bf16>(x, w, bias, y, M, N, K);
}

#define GEMMS(sfx, T, THREADS)                                                                   \
    extern "C" __global__ void __launch_bounds__(THREADS) ferry_linear_##sfx(                    \
        const T* x, const T* w, const T* bias, T* y, int M, int N, int K)                        \
    {                                                                                            \
        linear_impl<T>(x, w, bias, y, M, N, K);                                                  \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(THREADS) ferry_conv2d_##sfx(                    \
        const T* x, const T* w, const T* bias, T* y, int n, int c, int h, int wd, int o, int kh, \
        int kw, int sh, int sw, int pt, int pl, int ho, int wo)                                  \
    {                                                                                            \
        conv2d_impl<T>(x, w, bias, y, n, c, h, wd, o, kh, kw, sh, sw, pt, pl, ho, wo);           \
    }
GEMMS(f32, float, 256)
GEMMS(f16, f16, 128)
GEMMS(bf16, bf16, 128)
