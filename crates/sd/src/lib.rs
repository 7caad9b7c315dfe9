//! A minimal Stable Diffusion executor (CLIP text encoders, UNet, VAE) whose layers take their
//! weights from Ferry's scheduler just in time, with f32 CPU reference ops and CUDA kernels.

pub mod ops;
pub mod rng;
pub mod schedulers;
pub mod tensor;
pub mod tokenizer;
