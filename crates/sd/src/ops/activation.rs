//! Point-wise activations. Each is evaluated in f64 and rounded once to f32, so the reference is
//! accurate to about half an ulp.

use super::parallel::map_inplace;
use crate::tensor::Tensor;

/// A point-wise activation, for ops that fuse one (see [`Activation::apply`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `x * sigmoid(x)`.
    Silu,
    /// Exact GELU, `0.5 x (1 + erf(x / sqrt 2))` (`F.gelu`).
    Gelu,
    /// Tanh-approximated GELU (`F.gelu(approximate="tanh")`, CLIP's `gelu_new`).
    GeluTanh,
    /// `x * sigmoid(1.702 x)` (OpenAI CLIP's `quick_gelu`).
    QuickGelu,
    /// `1 / (1 + exp(-x))`.
    Sigmoid,
}

impl Activation {
    /// The activation of one value.
    pub fn apply(self, x: f32) -> f32 {
        let v = x as f64;
        let y = match self {
            Activation::Silu => v * sigmoid64(v),
            Activation::Gelu => 0.5 * v * (1.0 + libm::erf(v * std::f64::consts::FRAC_1_SQRT_2)),
            Activation::GeluTanh => {
                let k = (2.0 / std::f64::consts::PI).sqrt();
                0.5 * v * (1.0 + (k * (v + 0.044715 * v * v * v)).tanh())
            }
            Activation::QuickGelu => v * sigmoid64(1.702 * v),
            Activation::Sigmoid => sigmoid64(v),
        };
        y as f32
    }

    /// Applies the activation to every element in place.
    pub fn apply_inplace(self, data: &mut [f32]) {
        map_inplace(data, |x| self.apply(x));
    }

    /// A new tensor with the activation applied.
    pub fn forward(self, x: &Tensor) -> Tensor {
        let mut out = x.clone();
        self.apply_inplace(out.data_mut());
        out
    }
}

fn sigmoid64(v: f64) -> f64 {
    1.0 / (1.0 + (-v).exp())
}

pub(crate) fn silu_f32(x: f32) -> f32 {
    Activation::Silu.apply(x)
}

/// Exact (erf) GELU, `F.gelu(x)`.
pub fn gelu(x: &Tensor) -> Tensor {
    Activation::Gelu.forward(x)
}

/// Tanh-approximated GELU, `F.gelu(x, approximate="tanh")`.
pub fn gelu_tanh(x: &Tensor) -> Tensor {
    Activation::GeluTanh.forward(x)
}

/// `x * sigmoid(1.702 x)`, CLIP's quick GELU.
pub fn quick_gelu(x: &Tensor) -> Tensor {
    Activation::QuickGelu.forward(x)
}

/// SiLU (swish), `x * sigmoid(x)`.
pub fn silu(x: &Tensor) -> Tensor {
    Activation::Silu.forward(x)
}

/// Logistic sigmoid.
pub fn sigmoid(x: &Tensor) -> Tensor {
    Activation::Sigmoid.forward(x)
}
