//! The models, built from their diffusers / transformers `config.json`, with module and weight
//! names that follow the checkpoint keys.

pub mod attention;
pub mod clip;
pub mod resnet;
pub mod unet;
pub mod vae;

use crate::error::{Error, Result};
use std::collections::{HashMap, HashSet};

/// Checks a checkpoint's weights for one component against the names and shapes its config
/// implies: an unknown key, a wrong shape or a missing weight is an error naming the tensor.
/// `model` names the model in messages ("UNet", "VAE").
pub fn check_weight_shapes<'a>(
    component: &str,
    model: &str,
    expected: &[resnet::WeightShape],
    tensors: impl IntoIterator<Item = (&'a str, &'a [usize])>,
) -> Result<()> {
    let want: HashMap<&str, &Vec<usize>> = expected.iter().map(|(k, s)| (k.as_str(), s)).collect();
    let mut seen = HashSet::new();
    for (name, shape) in tensors {
        let full = format!("{component}.{name}");
        match want.get(name) {
            None => {
                return Err(Error::Config(format!(
                    "weight '{full}' belongs to no module this {model} config has (unknown key)"
                )))
            }
            Some(s) if s.as_slice() != shape => {
                return Err(Error::WeightShape {
                    name: full,
                    expected: s.to_vec(),
                    found: shape.to_vec(),
                })
            }
            Some(_) => {
                seen.insert(name);
            }
        }
    }
    match expected.iter().find(|(k, _)| !seen.contains(k.as_str())) {
        Some((name, _)) => Err(Error::MissingWeight(format!("{component}.{name}"))),
        None => Ok(()),
    }
}
