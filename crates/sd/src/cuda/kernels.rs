//! The embedded PTX modules and the kernel names the wrappers launch.

use crate::ops::Activation;
use crate::tensor::DType;

/// A PTX module: its cache name and text.
pub(super) struct Module {
    pub(super) name: &'static str,
    pub(super) ptx: &'static str,
}

pub(super) const ELEMENTWISE: Module = Module {
    name: "ferry_sd_elementwise",
    ptx: include_str!("../../../../kernels/ptx/elementwise.ptx"),
};
pub(super) const NORM: Module = Module {
    name: "ferry_sd_norm",
    ptx: include_str!("../../../../kernels/ptx/norm.ptx"),
};
pub(super) const GEMM: Module = Module {
    name: "ferry_sd_gemm",
    ptx: include_str!("../../../../kernels/ptx/gemm.ptx"),
};
pub(super) const ATTENTION: Module = Module {
    name: "ferry_sd_attention",
    ptx: include_str!("../../../../kernels/ptx/attention.ptx"),
};
pub(super) const LAYOUT: Module = Module {
    name: "ferry_sd_layout",
    ptx: include_str!("../../../../kernels/ptx/layout.ptx"),
};

const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// The name for `t` out of `[f32, f16, bf16]` names.
pub(super) fn by_dtype(t: DType, names: [&'static str; 3]) -> &'static str {
    match t {
        DType::F32 => names[0],
        DType::F16 => names[1],
        DType::BF16 => names[2],
    }
}

const ACTIVATIONS: [Activation; 4] = [
    Activation::Silu,
    Activation::Gelu,
    Activation::GeluTanh,
    Activation::QuickGelu,
];

pub(super) fn activation(act: Activation, t: DType) -> Option<&'static str> {
    Some(by_dtype(
        t,
        match act {
            Activation::Silu => ["ferry_silu_f32", "ferry_silu_f16", "ferry_silu_bf16"],
            Activation::Gelu => ["ferry_gelu_f32", "ferry_gelu_f16", "ferry_gelu_bf16"],
            Activation::GeluTanh => [
                "ferry_gelu_tanh_f32",
                "ferry_gelu_tanh_f16",
                "ferry_gelu_tanh_bf16",
            ],
            Activation::QuickGelu => [
                "ferry_quick_gelu_f32",
                "ferry_quick_gelu_f16",
                "ferry_quick_gelu_bf16",
            ],
            Activation::Sigmoid => return None,
        },
    ))
}

pub(super) fn cast(from: DType, to: DType) -> Option<&'static str> {
    Some(match (from, to) {
        (DType::F32, DType::F16) => "ferry_cast_f32_f16",
        (DType::F16, DType::F32) => "ferry_cast_f16_f32",
        (DType::F32, DType::BF16) => "ferry_cast_f32_bf16",
        (DType::BF16, DType::F32) => "ferry_cast_bf16_f32",
        (DType::F16, DType::BF16) => "ferry_cast_f16_bf16",
        (DType::BF16, DType::F16) => "ferry_cast_bf16_f16",
        _ => return None,
    })
}

/// The 128-tile pipelined linear kernel for `t`, if there is one (16-bit types only).
pub(super) fn linear_big(t: DType) -> Option<&'static str> {
    match t {
        DType::F16 => Some("ferry_linear_big_f16"),
        DType::BF16 => Some("ferry_linear_big_bf16"),
        DType::F32 => None,
    }
}

/// The tensor-core attention kernel for `t` and head size `d`, if there is one.
pub(super) fn flash(t: DType, d: usize) -> Option<&'static str> {
    Some(match (t, d) {
        (DType::F16, 40) => "ferry_attention_f16_d40",
        (DType::F16, 64) => "ferry_attention_f16_d64",
        (DType::F16, 80) => "ferry_attention_f16_d80",
        (DType::F16, 160) => "ferry_attention_f16_d160",
        (DType::BF16, 40) => "ferry_attention_bf16_d40",
        (DType::BF16, 64) => "ferry_attention_bf16_d64",
        (DType::BF16, 80) => "ferry_attention_bf16_d80",
        (DType::BF16, 160) => "ferry_attention_bf16_d160",
        _ => return None,
    })
}

/// Kernel names (f32, f16, bf16) of one wrapper.
pub(super) const ADD: [&str; 3] = ["ferry_add_f32", "ferry_add_f16", "ferry_add_bf16"];
/// Kernel names (f32, f16, bf16) of one wrapper.
pub(super) const SCALE: [&str; 3] = ["ferry_scale_f32", "ferry_scale_f16", "ferry_scale_bf16"];
/// Kernel names (f32, f16, bf16) of one wrapper.
pub(super) const ADD_CHANNEL: [&str; 3] = [
    "ferry_add_channel_f32",
    "ferry_add_channel_f16",
    "ferry_add_channel_bf16",
];
/// Kernel names (f32, f16, bf16) of one wrapper.
pub(super) const GEGLU: [&str; 3] = ["ferry_geglu_f32", "ferry_geglu_f16", "ferry_geglu_bf16"];
/// Kernel names (f32, f16, bf16) of one wrapper.
pub(super) const UPSAMPLE2X: [&str; 3] = [
    "ferry_upsample2x_f32",
    "ferry_upsample2x_f16",
    "ferry_upsample2x_bf16",
];
/// Kernel names (f32, f16, bf16) of one wrapper.
pub(super) const CAT2: [&str; 3] = ["ferry_cat2_f32", "ferry_cat2_f16", "ferry_cat2_bf16"];
/// Kernel names (f32, f16, bf16) of one wrapper.
pub(super) const SOFTMAX: [&str; 3] = [
    "ferry_softmax_f32",
    "ferry_softmax_f16",
    "ferry_softmax_bf16",
];
/// Kernel names (f32, f16, bf16) of one wrapper.
pub(super) const TIMESTEP_EMBEDDING: [&str; 3] = [
    "ferry_timestep_embedding_f32",
    "ferry_timestep_embedding_f16",
    "ferry_timestep_embedding_bf16",
];
/// Kernel names (f32, f16, bf16) of one wrapper.
pub(super) const GROUP_NORM: [&str; 3] = [
    "ferry_group_norm_f32",
    "ferry_group_norm_f16",
    "ferry_group_norm_bf16",
];
/// Kernel names (f32, f16, bf16) of one wrapper.
pub(super) const LAYER_NORM: [&str; 3] = [
    "ferry_layer_norm_f32",
    "ferry_layer_norm_f16",
    "ferry_layer_norm_bf16",
];
/// Kernel names (f32, f16, bf16) of one wrapper.
pub(super) const LINEAR: [&str; 3] = ["ferry_linear_f32", "ferry_linear_f16", "ferry_linear_bf16"];
/// Kernel names (f32, f16, bf16) of one wrapper.
pub(super) const CONV2D: [&str; 3] = ["ferry_conv2d_f32", "ferry_conv2d_f16", "ferry_conv2d_bf16"];
/// Kernel names (f32, f16, bf16) of one wrapper.
pub(super) const ATTENTION_SIMT: [&str; 3] = [
    "ferry_attention_simt_f32",
    "ferry_attention_simt_f16",
    "ferry_attention_simt_bf16",
];

/// Kernel names (f32, f16, bf16) of one wrapper.
pub(super) const TRANSPOSE: [&str; 3] = [
    "ferry_transpose_f32",
    "ferry_transpose_f16",
    "ferry_transpose_bf16",
];
/// Kernel names (f32, f16, bf16) of one wrapper.
pub(super) const GATHER: [&str; 3] = ["ferry_gather_f32", "ferry_gather_f16", "ferry_gather_bf16"];
/// Kernel names (f32, f16, bf16) of one wrapper.
pub(super) const RESIZE_NEAREST: [&str; 3] = [
    "ferry_resize_nearest_f32",
    "ferry_resize_nearest_f16",
    "ferry_resize_nearest_bf16",
];

/// The per-dtype names above, by module (every wrapper in `mod.rs` uses one of these).
const BY_DTYPE: &[(&Module, [&str; 3])] = &[
    (&ELEMENTWISE, ADD),
    (&ELEMENTWISE, SCALE),
    (&ELEMENTWISE, ADD_CHANNEL),
    (&ELEMENTWISE, GEGLU),
    (&ELEMENTWISE, UPSAMPLE2X),
    (&ELEMENTWISE, CAT2),
    (&ELEMENTWISE, SOFTMAX),
    (&ELEMENTWISE, TIMESTEP_EMBEDDING),
    (&NORM, GROUP_NORM),
    (&NORM, LAYER_NORM),
    (&GEMM, LINEAR),
    (&GEMM, CONV2D),
    (&ATTENTION, ATTENTION_SIMT),
    (&LAYOUT, TRANSPOSE),
    (&LAYOUT, GATHER),
    (&LAYOUT, RESIZE_NEAREST),
];

/// Every `(module PTX, kernel name)` the wrappers can launch.
pub fn all_kernels() -> Vec<(&'static str, &'static str)> {
    let mut out = Vec::new();
    for (m, names) in BY_DTYPE {
        out.extend(names.iter().map(|n| (m.ptx, *n)));
    }
    for t in DTYPES {
        for act in ACTIVATIONS {
            out.extend(activation(act, t).map(|n| (ELEMENTWISE.ptx, n)));
        }
        for to in DTYPES {
            out.extend(cast(t, to).map(|n| (ELEMENTWISE.ptx, n)));
        }
        out.extend(linear_big(t).map(|n| (GEMM.ptx, n)));
        for d in super::FLASH_HEAD_DIMS {
            out.extend(flash(t, d).map(|n| (ATTENTION.ptx, n)));
        }
    }
    out
}
