//! The models, built from their diffusers / transformers `config.json`, with module and weight
//! names that follow the checkpoint keys.

pub mod attention;
pub mod clip;
pub mod resnet;
pub mod unet;
pub mod vae;
