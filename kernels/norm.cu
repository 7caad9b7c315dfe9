// Normalisation kernels (f32, f16, bf16 storage; f32 statistics, two passes: mean, then the mean
// of squared deviations, like the CPU reference).
//   ferry_group_norm_<t>: one block per (sample, group); optional affine and fused SiLU.
//   ferry_layer_norm_<t>: one block per row of the last dim.
// Weight and bias are in the storage type; pass 0 for an absent one.

#include "ferry_common.cuh"

template <typename T>
__device__ void normalize_span(const T* x, unsigned long long len, float eps, float* mean_out,
                               float* rstd_out, float* scratch)
{
    float s = 0.0f;
    for (unsigned long long j = threadIdx.x; j < len; j += blockDim.x) s += ld(x + j);
    float mean = block_sum(s, scratch) / (float)len;
    float q = 0.0f;
    for (unsigned long long j = threadIdx.x; j < len; j += blockDim.x) {
        float d = ld(x + j) - mean;
        q += d * d;
    }
    float var = block_sum(q, scratch) / (float)len;
    *mean_out = mean;
    *rstd_out = rsqrtf(var + eps);
}

// x [n, c, spatial] -> y; grid.x covers n * groups (grid-stride).
template <typename T>
__device__ void group_norm_impl(const T* x, T* y, const T* w, const T* b, unsigned int n,
                                unsigned int c, unsigned int groups, unsigned long long spatial,
                                float eps, unsigned int silu)
{
    __shared__ float scratch[32];
    unsigned int cpg = c / groups;
    unsigned long long len = (unsigned long long)cpg * spatial;
    for (unsigned long long ng = blockIdx.x; ng < (unsigned long long)n * groups; ng += gridDim.x) {
        unsigned int g = (unsigned int)(ng % groups);
        const T* xs = x + ng * len;
        T* ys = y + ng * len;
        float mean, rstd;
        normalize_span(xs, len, eps, &mean, &rstd, scratch);
        for (unsigned long long j = threadIdx.x; j < len; j += blockDim.x) {
            unsigned int ch = g * cpg + (unsigned int)(j / spatial);
            float v = (ld(xs + j) - mean) * rstd;
            if (w) v *= ld(w + ch);
            if (b) v += ld(b + ch);
            if (silu) v = v / (1.0f + expf(-v));
            st(ys + j, v);
        }
    }
}

// x [rows, d] -> y; grid.x covers rows (grid-stride).
template <typename T>
__device__ void layer_norm_impl(const T* x, T* y, const T* w, const T* b, unsigned long long rows,
                                unsigned int d, float eps)
{
    __shared__ float scratch[32];
    for (unsigned long long r = blockIdx.x; r < rows; r += gridDim.x) {
        const T* xr = x + r * d;
        T* yr = y + r * d;
        float mean, rstd;
        normalize_span(xr, d, eps, &mean, &rstd, scratch);
        for (unsigned int j = threadIdx.x; j < d; j += blockDim.x) {
            float v = (ld(xr + j) - mean) * rstd;
            if (w) v *= ld(w + j);
            if (b) v += ld(b + j);
            st(yr + j, v);
        }
    }
}

#define NORMS(sfx, T)                                                                            \
    extern "C" __global__ void ferry_group_norm_##sfx(                                           \
        const T* x, T* y, const T* w, const T* b, unsigned int n, unsigned int c,                \
        unsigned int groups, unsigned long long spatial, float eps, unsigned int silu)           \
    {                                                                                            \
        group_norm_impl<T>(x, y, w, b, n, c, groups, spatial, eps, silu);                        \
    }                                                                                            \
    extern "C" __global__ void ferry_layer_norm_##sfx(const T* x, T* y, const T* w, const T* b,  \
                                                      unsigned long long rows, unsigned int d,   \
                                                      float eps)                                 \
    {                                                                                            \
        layer_norm_impl<T>(x, y, w, b, rows, d, eps);                                            \
    }
NORMS(f32, float)
NORMS(f16, f16)
NORMS(bf16, bf16)
