// Element-wise kernels: activations, residual add, per-channel bias, GEGLU gate, nearest
// upsample x2, channel concat, casts, row softmax, timestep embedding. Every entry point exists
// for f32, f16 and bf16 storage (suffix _f32/_f16/_bf16); arithmetic is f32. Launch any grid
// (grid-stride loops); 256 threads per block is what the Rust wrappers use.

#include "ferry_common.cuh"

__device__ __forceinline__ float act_silu(float x) { return x / (1.0f + expf(-x)); }
__device__ __forceinline__ float act_gelu(float x) { return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f)); }
__device__ __forceinline__ float act_gelu_tanh(float x)
{
    const float k = 0.79788456080286536f; // sqrt(2/pi)
    return 0.5f * x * (1.0f + tanhf(k * (x + 0.044715f * x * x * x)));
}
__device__ __forceinline__ float act_quick_gelu(float x) { return x / (1.0f + expf(-1.702f * x)); }

#define UNARY(name, fn)                                                                          \
    template <typename T> __device__ void name##_impl(const T* x, T* y, unsigned long long n)     \
    {                                                                                            \
        FERRY_FOR(i, n) st(y + i, fn(ld(x + i)));                                                \
    }                                                                                            \
    extern "C" __global__ void ferry_##name##_f32(const float* x, float* y, unsigned long long n) \
    { name##_impl(x, y, n); }                                                                    \
    extern "C" __global__ void ferry_##name##_f16(const f16* x, f16* y, unsigned long long n)     \
    { name##_impl(x, y, n); }                                                                    \
    extern "C" __global__ void ferry_##name##_bf16(const bf16* x, bf16* y, unsigned long long n)  \
    { name##_impl(x, y, n); }

UNARY(silu, act_silu)
UNARY(gelu, act_gelu)
UNARY(gelu_tanh, act_gelu_tanh)
UNARY(quick_gelu, act_quick_gelu)

// Instantiates `ferry_<name>_<suffix>(PARAMS)` calling `<name>_impl<T>(ARGS)` for each type.
#define ALL_TYPES(name, PARAMS, ARGS)                                                            \
    extern "C" __global__ void ferry_##name##_f32 PARAMS(float)                                  \
    { name##_impl<float> ARGS; }                                                                 \
    extern "C" __global__ void ferry_##name##_f16 PARAMS(f16)                                    \
    { name##_impl<f16> ARGS; }                                                                   \
    extern "C" __global__ void ferry_##name##_bf16 PARAMS(bf16)                                  \
    { name##_impl<bf16> ARGS; }

// y = a + b (residual connections). y may alias a or b.
template <typename T> __device__ void add_impl(const T* a, const T* b, T* y, unsigned long long n)
{
    FERRY_FOR(i, n) st(y + i, ld(a + i) + ld(b + i));
}
#define ADD_P(T) (const T* a, const T* b, T* y, unsigned long long n)
ALL_TYPES(add, ADD_P, (a, b, y, n))

// y = x * s.
template <typename T> __device__ void scale_impl(const T* x, T* y, float s, unsigned long long n)
{
    FERRY_FOR(i, n) st(y + i, ld(x + i) * s);
}
#define SCALE_P(T) (const T* x, T* y, float s, unsigned long long n)
ALL_TYPES(scale, SCALE_P, (x, y, s, n))

// y[i] = x[i] + bias[(i / spatial) % bias_len]: a [c] bias or an [n, c] per-sample bias (a ResNet
// block's time embedding) added to every spatial position of x [n, c, spatial].
template <typename T>
__device__ void add_channel_impl(const T* x, const T* bias, T* y, unsigned long long n,
                                 unsigned long long spatial, unsigned long long bias_len)
{
    FERRY_FOR(i, n) st(y + i, ld(x + i) + ld(bias + (i / spatial) % bias_len));
}
#define ADDC_P(T)                                                                                \
    (const T* x, const T* bias, T* y, unsigned long long n, unsigned long long spatial,          \
     unsigned long long bias_len)
ALL_TYPES(add_channel, ADDC_P, (x, bias, y, n, spatial, bias_len))

// GEGLU gate: h [rows, 2f] -> y [rows, f], y = h[:, :f] * gelu(h[:, f:]).
template <typename T>
__device__ void geglu_impl(const T* h, T* y, unsigned long long rows, unsigned int f)
{
    FERRY_FOR(i, rows * f)
    {
        unsigned long long r = i / f, j = i % f;
        const T* row = h + r * 2ull * f;
        st(y + i, ld(row + j) * act_gelu(ld(row + f + j)));
    }
}
#define GEGLU_P(T) (const T* h, T* y, unsigned long long rows, unsigned int f)
ALL_TYPES(geglu, GEGLU_P, (h, y, rows, f))

// Nearest upsample x2: x [planes, h, w] -> y [planes, 2h, 2w].
template <typename T>
__device__ void upsample2x_impl(const T* x, T* y, unsigned long long planes, unsigned int h,
                                unsigned int w)
{
    unsigned long long w2 = 2ull * w, hw4 = 4ull * h * w;
    FERRY_FOR(i, planes * hw4)
    {
        unsigned long long p = i / hw4, r = i % hw4;
        unsigned long long oy = r / w2, ox = r % w2;
        y[i] = x[p * h * w + (oy >> 1) * w + (ox >> 1)];
    }
}
#define UPS_P(T) (const T* x, T* y, unsigned long long planes, unsigned int h, unsigned int w)
ALL_TYPES(upsample2x, UPS_P, (x, y, planes, h, w))

// Concat along dim 1 of two tensors a [n, ca, s], b [n, cb, s] -> y [n, ca + cb, s], given
// a_len = ca*s and b_len = cb*s elements per sample.
template <typename T>
__device__ void cat2_impl(const T* a, const T* b, T* y, unsigned long long n,
                          unsigned long long a_len, unsigned long long b_len)
{
    unsigned long long row = a_len + b_len;
    FERRY_FOR(i, n * row)
    {
        unsigned long long s = i / row, r = i % row;
        y[i] = r < a_len ? a[s * a_len + r] : b[s * b_len + (r - a_len)];
    }
}
#define CAT_P(T)                                                                                 \
    (const T* a, const T* b, T* y, unsigned long long n, unsigned long long a_len,               \
     unsigned long long b_len)
ALL_TYPES(cat2, CAT_P, (a, b, y, n, a_len, b_len))

// Casts (round to nearest even).
#define CAST(name, S, D)                                                                         \
    extern "C" __global__ void ferry_cast_##name(const S* x, D* y, unsigned long long n)         \
    {                                                                                            \
        FERRY_FOR(i, n) st(y + i, ld(x + i));                                                    \
    }
CAST(f32_f16, float, f16)
CAST(f16_f32, f16, float)
CAST(f32_bf16, float, bf16)
CAST(bf16_f32, bf16, float)
CAST(f16_bf16, f16, bf16)
CAST(bf16_f16, bf16, f16)

// Softmax over the last dim: x [rows, len] -> y. One block per row (any block size that is a
// multiple of 32); two passes over the row for max and sum, f32 accumulation.
template <typename T>
__device__ void softmax_impl(const T* x, T* y, unsigned long long rows, unsigned int len)
{
    __shared__ float scratch[32];
    for (unsigned long long r = blockIdx.x; r < rows; r += gridDim.x) {
        const T* xr = x + r * len;
        T* yr = y + r * len;
        float m = FERRY_NEG_INF;
        for (unsigned int j = threadIdx.x; j < len; j += blockDim.x) m = fmaxf(m, ld(xr + j));
        m = warp_max(m);
        __syncthreads();
        if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = m;
        __syncthreads();
        m = (threadIdx.x & 31) < (blockDim.x >> 5) ? scratch[threadIdx.x & 31] : FERRY_NEG_INF;
        m = warp_max(m);
        float s = 0.0f;
        for (unsigned int j = threadIdx.x; j < len; j += blockDim.x) s += expf(ld(xr + j) - m);
        s = block_sum(s, scratch);
        float inv = 1.0f / s;
        for (unsigned int j = threadIdx.x; j < len; j += blockDim.x)
            st(yr + j, expf(ld(xr + j) - m) * inv);
    }
}
#define SOFTMAX_P(T) (const T* x, T* y, unsigned long long rows, unsigned int len)
ALL_TYPES(softmax, SOFTMAX_P, (x, y, rows, len))

// diffusers get_timestep_embedding(t, dim, flip_sin_to_cos, downscale_freq_shift, scale=1,
// max_period=10000): t [count] (f32) -> y [count, dim]. The exponent and argument are formed in
// f32 like PyTorch; exp/sin/cos run in f64 (at t ~ 1000 an ulp of the argument is ~6e-5).
template <typename T>
__device__ void timestep_embedding_impl(const float* t, T* y, unsigned int count,
                                        unsigned int dim, unsigned int flip, float shift)
{
    unsigned int half = dim / 2;
    float denom = (float)half - shift;
    const float neg_log = -9.21034049987792969f; // -(ln 10000) rounded to f32
    FERRY_FOR(i, (unsigned long long)count * dim)
    {
        unsigned int r = (unsigned int)(i / dim), c = (unsigned int)(i % dim);
        float v = 0.0f; // odd dim: the last column is zero padding
        if (c < 2 * half) {
            bool first = c < half;
            unsigned int k = first ? c : c - half;
            float freq = (float)exp((double)(__fdiv_rn(__fmul_rn(neg_log, (float)k), denom)));
            double arg = (double)__fmul_rn(t[r], freq);
            bool use_cos = flip ? first : !first;
            v = (float)(use_cos ? cos(arg) : sin(arg));
        }
        st(y + i, v);
    }
}
#define TEMB_P(T)                                                                                \
    (const float* t, T* y, unsigned int count, unsigned int dim, unsigned int flip, float shift)
ALL_TYPES(timestep_embedding, TEMB_P, (t, y, count, dim, flip, shift))
