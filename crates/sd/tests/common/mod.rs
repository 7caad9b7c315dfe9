//! What the model tests share: fixture paths, golden tensors from the real diffusers /
//! transformers runs, weights loaded onto the simulated device, and the tolerance check.
#![allow(dead_code)] // each test crate uses a subset

use ferry_pager::device::sim::{SimConfig, SimDevice};
use ferry_pager::host::{HostStore, LoadOptions, TensorId};
use ferry_pager::Device;
use ferry_sd::tensor::{DType, Tensor};
use safetensors::{Dtype, SafeTensors};
use std::path::PathBuf;
use std::sync::Arc;

/// The brief's tolerance: max |ours - reference| <= TOL * max |reference|.
pub const TOL: f32 = 1e-4;

/// A path under `tests/fixtures/models`; `FERRY_FIXTURES` overrides the folder (the GPU suite
/// runs prebuilt test binaries in a copy of the tree at another path).
pub fn fixture(rel: &str) -> PathBuf {
    match std::env::var_os("FERRY_FIXTURES") {
        Some(dir) => PathBuf::from(dir).join(rel),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/models")
            .join(rel),
    }
}

fn with_golden<T>(
    model: &str,
    name: &str,
    f: impl FnOnce(safetensors::tensor::TensorView<'_>) -> T,
) -> T {
    let bytes = std::fs::read(fixture(&format!("{model}/goldens.safetensors"))).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let v = st
        .tensor(name)
        .unwrap_or_else(|e| panic!("golden {model} {name}: {e}"));
    f(v)
}

/// The f32 golden `name` of fixture `model`.
pub fn golden(model: &str, name: &str) -> Tensor {
    with_golden(model, name, |v| {
        assert_eq!(v.dtype(), Dtype::F32, "{model} {name}");
        Tensor::from_bytes(v.data(), DType::F32, v.shape().to_vec()).unwrap()
    })
}

/// The i64 token-id golden `name` (`[batch, seq]`) of fixture `model`, as rows of u32.
pub fn golden_ids(model: &str, name: &str) -> Vec<Vec<u32>> {
    with_golden(model, name, |v| {
        assert_eq!(v.dtype(), Dtype::I64, "{model} {name}");
        let seq = v.shape()[1];
        let flat: Vec<u32> = v
            .data()
            .chunks_exact(8)
            .map(|c| u32::try_from(i64::from_le_bytes(c.try_into().unwrap())).unwrap())
            .collect();
        flat.chunks(seq).map(<[u32]>::to_vec).collect()
    })
}

/// A simulated device and a store holding `model/component/file` as `"{component}."` + key.
pub fn store_with(
    model: &str,
    component: &str,
    file: &str,
    opts: LoadOptions,
) -> (Arc<SimDevice>, HostStore) {
    let dev = SimDevice::new(SimConfig::default());
    let store = HostStore::new(dev.clone() as Arc<dyn Device>);
    store
        .load_file(
            fixture(&format!("{model}/{component}/{file}")),
            &LoadOptions {
                prefix: format!("{component}."),
                ..opts
            },
        )
        .unwrap();
    (dev, store)
}

/// `(name without "{component}.", shape)` of every registered tensor.
pub fn names_and_shapes(store: &HostStore, component: &str) -> Vec<(String, Vec<usize>)> {
    let skip = component.len() + 1;
    (0..store.len())
        .map(|i| {
            let t = store.tensor(TensorId(i as u32)).unwrap();
            (t.name[skip..].to_string(), t.shape)
        })
        .collect()
}

/// Panics, naming `what`, when `t` holds a NaN or an infinity.
#[track_caller]
pub fn assert_finite(what: &str, t: &Tensor) {
    if let Some((i, v)) = t.first_non_finite() {
        let bad = t.data().iter().filter(|v| !v.is_finite()).count();
        panic!(
            "{what}: {bad} of {} elements are not finite (the first, element {i}, is {v})",
            t.numel()
        );
    }
}

/// Asserts `ours` is within [`TOL`] of `reference` (relative to max |reference|); returns the
/// relative error. A NaN or infinity on either side fails.
#[track_caller]
pub fn check(what: &str, ours: &Tensor, reference: &Tensor) -> f32 {
    assert_eq!(ours.shape(), reference.shape(), "{what}: shape");
    assert_finite(&format!("{what} (reference)"), reference);
    assert_finite(what, ours);
    assert!(reference.max_abs() > 0.0, "{what}: zero reference");
    let rel = ours.max_abs_diff(reference).unwrap() / reference.max_abs();
    assert!(
        rel <= TOL,
        "{what}: max abs error {rel:e} x max|ref| > {TOL:e}"
    );
    rel
}

/// max |a - b| relative to max |b|; NaN when either holds a NaN or an infinity, so that neither
/// `rel_err(..) <= tol` nor `rel_err(..) > tol` holds for a non-finite output.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.shape(), b.shape());
    if a.first_non_finite().is_some() || b.first_non_finite().is_some() {
        return f32::NAN;
    }
    a.max_abs_diff(b).unwrap() / b.max_abs().max(1e-12)
}

/// NCHW decoded [-1, 1] → NHWC in [0, 1], as diffusers' `output_type="np"`. Panics on a NaN or an
/// infinity (the clamp would turn an infinity into a plausible 0 or 1).
#[track_caller]
pub fn to_np(images: &Tensor) -> Tensor {
    assert_finite("decoded images", images);
    let s = images.shape();
    let (n, c, h, w) = (s[0], s[1], s[2], s[3]);
    let mut out = vec![0.0; n * c * h * w];
    for b in 0..n {
        for ch in 0..c {
            for y in 0..h {
                for x in 0..w {
                    let v = images.data()[((b * c + ch) * h + y) * w + x];
                    out[((b * h + y) * w + x) * c + ch] = (v / 2.0 + 0.5).clamp(0.0, 1.0);
                }
            }
        }
    }
    Tensor::new(vec![n, h, w, c], out).unwrap()
}

/// Resident CUDA weight views at fake, 256-byte-aligned device addresses from `base` on, one per
/// `(name, shape)`, each in the group with the longest prefix that starts its name (as the
/// executor assigns them), for recording-mode runs. Returns the views and the range they span.
pub fn fake_views(
    component: &str,
    prefixes: &[String],
    weights: impl IntoIterator<Item = (String, Vec<usize>)>,
    dtype: DType,
    base: u64,
) -> (ferry_sd::weights::ResidentViews, ferry_pager::DeviceRange) {
    use ferry_pager::{DevicePtr, DeviceRange};
    let mut groups: Vec<Vec<(String, ferry_sd::backend::CudaTensor)>> =
        vec![Vec::new(); prefixes.len()];
    let mut off = 0u64;
    for (name, shape) in weights {
        let (gi, prefix) = prefixes
            .iter()
            .enumerate()
            .filter(|(_, p)| name.starts_with(&format!("{p}.")))
            .max_by_key(|(_, p)| p.len())
            .unwrap_or_else(|| panic!("weight {name} is in no group"));
        let bytes = shape.iter().product::<usize>() as u64 * dtype.size() as u64;
        let range = DeviceRange::new(DevicePtr(base + off), bytes);
        off += bytes.div_ceil(ferry_sd::backend::ARENA_ALIGN) * ferry_sd::backend::ARENA_ALIGN;
        let key = name[prefix.len() + 1..].to_string();
        groups[gi].push((
            key,
            ferry_sd::backend::CudaTensor::weight(range, dtype, shape).unwrap(),
        ));
    }
    let mut v = ferry_sd::weights::ResidentViews::new();
    for (p, g) in prefixes.iter().zip(groups) {
        v.insert(component, p, g);
    }
    (v, DeviceRange::new(DevicePtr(base), off))
}

/// The device buffers a recorded launch passes.
pub fn buf_args(l: &ferry_sd::cuda::Launch) -> Vec<ferry_pager::DeviceRange> {
    l.args
        .iter()
        .filter_map(|a| match a {
            ferry_pager::device::cuda::KernelArg::Buf { ptr, bytes } => {
                Some(ferry_pager::DeviceRange::new(*ptr, *bytes))
            }
            _ => None,
        })
        .collect()
}
