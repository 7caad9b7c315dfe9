// Layout kernels: batched transpose (NCHW <-> tokens), row gather (token embedding, CLIP
// pooling), nearest resize to any size. Pure data movement: elements are copied as raw bits
// (u32 for f32, u16 for f16/bf16), so every storage type is exact. Entry points exist for f32,
// f16 and bf16 (suffix _f32/_f16/_bf16); the Rust wrappers launch 256 threads per block.

#include "ferry_common.cuh"

typedef unsigned int u32;
typedef unsigned short u16;

// Instantiates `ferry_<name>_<suffix>(PARAMS)` calling `<name>_impl<U>(ARGS)` on the raw bits.
#define RAW_TYPES(name, PARAMS, ARGS_F32, ARGS_16)                                               \
    extern "C" __global__ void __launch_bounds__(256) ferry_##name##_f32 PARAMS(float)           \
    { name##_impl<u32> ARGS_F32; }                                                               \
    extern "C" __global__ void __launch_bounds__(256) ferry_##name##_f16 PARAMS(f16)             \
    { name##_impl<u16> ARGS_16; }                                                                \
    extern "C" __global__ void __launch_bounds__(256) ferry_##name##_bf16 PARAMS(bf16)           \
    { name##_impl<u16> ARGS_16; }

// Batched transpose: x [batch, rows, cols] -> y [batch, cols, rows]. 32x32 tiles through shared
// memory so both the loads and the stores are coalesced; a block of 32x8 threads loops over
// tiles (any grid). The tile row stride is 33 words (f32) or 34 halves (17 words, 16-bit):
// reading a tile column then hits 32 different banks.
template <typename U>
__device__ void transpose_impl(const U* x, U* y, unsigned long long batch, u32 rows, u32 cols)
{
    const u32 stride = sizeof(U) == 4 ? 33 : 34;
    __shared__ U tile[32 * 34];
    const u32 tx = threadIdx.x & 31, ty = threadIdx.x >> 5; // 32 x 8
    const unsigned long long tr = (rows + 31) / 32, tc = (cols + 31) / 32;
    const unsigned long long tiles = batch * tr * tc;
    for (unsigned long long t = blockIdx.x; t < tiles; t += gridDim.x) {
        const unsigned long long b = t / (tr * tc), rem = t % (tr * tc);
        const u32 r0 = (u32)(rem / tc) * 32, c0 = (u32)(rem % tc) * 32;
        const unsigned long long plane = b * rows * cols;
        __syncthreads(); // the previous tile's reads are done
        for (u32 j = ty; j < 32; j += 8) {
            u32 r = r0 + j, c = c0 + tx;
            if (r < rows && c < cols)
                tile[j * stride + tx] = x[plane + (unsigned long long)r * cols + c];
        }
        __syncthreads();
        for (u32 j = ty; j < 32; j += 8) {
            u32 c = c0 + j, r = r0 + tx;
            if (r < rows && c < cols)
                y[plane + (unsigned long long)c * rows + r] = tile[tx * stride + j];
        }
    }
}
#define TRANSPOSE_P(T) (const T* x, T* y, unsigned long long batch, u32 rows, u32 cols)
RAW_TYPES(transpose, TRANSPOSE_P, ((const u32*)x, (u32*)y, batch, rows, cols),
          ((const u16*)x, (u16*)y, batch, rows, cols))

// Row gather: y [count, dim], y[i, :] = table[ids[i], :] for table [vocab, dim]. An id out of
// range (the caller validates ids on the host) writes `poison` (NaN) instead of reading past the
// table.
template <typename U>
__device__ void gather_impl(const U* table, const u32* ids, U* y, unsigned long long count,
                            u32 dim, u32 vocab, U poison)
{
    FERRY_FOR(i, count * dim)
    {
        unsigned long long r = i / dim;
        u32 c = (u32)(i % dim), id = ids[r];
        y[i] = id < vocab ? table[(unsigned long long)id * dim + c] : poison;
    }
}
#define GATHER_P(T)                                                                              \
    (const T* table, const u32* ids, T* y, unsigned long long count, u32 dim, u32 vocab)
#define GATHER_ARGS(U, nan) ((const U*)table, ids, (U*)y, count, dim, vocab, (U)nan)
extern "C" __global__ void __launch_bounds__(256) ferry_gather_f32 GATHER_P(float)
{ gather_impl<u32> GATHER_ARGS(u32, 0x7fc00000u); }
extern "C" __global__ void __launch_bounds__(256) ferry_gather_f16 GATHER_P(f16)
{ gather_impl<u16> GATHER_ARGS(u16, 0x7e00u); }
extern "C" __global__ void __launch_bounds__(256) ferry_gather_bf16 GATHER_P(bf16)
{ gather_impl<u16> GATHER_ARGS(u16, 0x7fc0u); }

// PyTorch F.interpolate(mode="nearest") to any size: x [planes, ih, iw] -> y [planes, oh, ow],
// output row oy reads input row min(floor(oy * scale_h), ih - 1) with scale_h = ih / oh in f32
// (passed from the host, computed there exactly as the CPU op does); columns likewise.
template <typename U>
__device__ void resize_nearest_impl(const U* x, U* y, unsigned long long planes, u32 ih, u32 iw,
                                    u32 oh, u32 ow, float scale_h, float scale_w)
{
    const unsigned long long ohw = (unsigned long long)oh * ow;
    FERRY_FOR(i, planes * ohw)
    {
        unsigned long long p = i / ohw, r = i % ohw;
        u32 oy = (u32)(r / ow), ox = (u32)(r % ow);
        u32 sy = min((u32)floorf(__fmul_rn((float)oy, scale_h)), ih - 1);
        u32 sx = min((u32)floorf(__fmul_rn((float)ox, scale_w)), iw - 1);
        y[i] = x[(p * ih + sy) * iw + sx];
    }
}
#define RESIZE_P(T)                                                                              \
    (const T* x, T* y, unsigned long long planes, u32 ih, u32 iw, u32 oh, u32 ow, float scale_h,  \
     float scale_w)
RAW_TYPES(resize_nearest, RESIZE_P,
          ((const u32*)x, (u32*)y, planes, ih, iw, oh, ow, scale_h, scale_w),
          ((const u16*)x, (u16*)y, planes, ih, iw, oh, ow, scale_h, scale_w))
