//! A minimal Stable Diffusion executor (CLIP text encoders, UNet, VAE) whose layers take their
//! weights from Ferry's scheduler just in time, with f32 CPU reference ops and CUDA kernels.

pub mod allocator;
pub mod backend;
pub mod cli;
pub mod cuda;
pub mod error;
pub mod exec;
pub mod footprint;
pub mod gpu_exec;
pub mod host_memory;
pub mod image;
pub mod json;
pub mod loader;
pub mod models;
pub mod npy;
pub mod ops;
pub mod output;
pub mod pipeline;
pub mod ptx_runner;
pub mod rng;
pub mod schedulers;
pub mod tensor;
pub mod tokenizer;
pub mod weights;
