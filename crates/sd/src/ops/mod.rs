//! f32 CPU reference ops for the SD executor: exact and clear first, and the oracle the CUDA
//! kernels are checked against.
//!
//! All ops take and return [`Tensor`](crate::tensor::Tensor)s in PyTorch layouts (NCHW images,
//! `[batch, seq, dim]` sequences, `[out, in]` linear weights) and return
//! [`OpError`](crate::tensor::OpError) on shape mismatches instead of panicking.
//!
//! Determinism: every op gives bit-identical results run to run and for any thread count. Threads
//! only ever split independent outputs (rows of a GEMM, rows of a softmax, norm groups); every
//! reduction runs in a fixed sequential order. Results can differ between CPUs with different SIMD
//! features (the GEMM picks an AVX-512, AVX2+FMA or scalar kernel at run time).
//!
//! Threads: [`set_threads`] (before the first op) sets how many the ops, GEMM included, use;
//! the default is all cores.

pub mod activation;
pub mod attention;
pub mod conv;
pub mod elementwise;
pub mod embedding;
mod exp;
pub mod geglu;
pub mod gemm;
pub mod linear;
pub mod matmul;
pub mod norm;
pub(crate) mod parallel;
pub mod resize;
pub mod softmax;
pub mod upsample;

pub use activation::{gelu, gelu_tanh, quick_gelu, sigmoid, silu, Activation};
pub use attention::scaled_dot_product_attention;
pub use conv::{conv2d, Conv2dParams};
pub use elementwise::{add, add_assign, add_channel_bias, cat_channels, mean_dim, mul, scale};
pub use embedding::timestep_embedding;
pub use geglu::{geglu, geglu_gate};
pub use gemm::{gemm, MatMut, MatRef};
pub use linear::linear;
pub use matmul::matmul;
pub use norm::{group_norm, layer_norm};
pub use parallel::{num_threads, set_threads, ThreadsAlreadySet};
pub use resize::resize_nearest;
pub use softmax::{softmax_last_dim, softmax_rows_inplace};
pub use upsample::upsample_nearest2x;

/// A test tensor of pseudo-random values `u * scale + offset`, `u` uniform in `[0, 1)` from a
/// linear congruential generator seeded with `seed` (the same values on every platform).
#[cfg(test)]
pub(crate) fn lcg_tensor(
    shape: &[usize],
    seed: u32,
    scale: f32,
    offset: f32,
) -> crate::tensor::Tensor {
    let n: usize = shape.iter().product();
    let mut s = seed;
    let data = (0..n)
        .map(|_| {
            s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (s >> 8) as f32 / (1u32 << 24) as f32 * scale + offset
        })
        .collect();
    crate::tensor::Tensor::new(shape, data).expect("shape matches the data")
}
