//! CLIP text encoders on the CUDA backend in recording mode (no GPU): `forward_on` with a fake
//! weight view for every weight, every launch checked against its PTX signature and kept inside
//! the workspace and the weights, output shapes, and the activation arena's peak (printed: the
//! reserve a real GPU run needs).

mod common;

use common::{buf_args, fake_views, fixture, golden_ids};
use ferry_pager::device::cuda::check_launch_args;
use ferry_pager::{DevicePtr, DeviceRange, WeightsFile};
use ferry_sd::backend::{Backend, CudaBackend, ARENA_ALIGN};
use ferry_sd::models::clip::{weight_name, ClipOptions, ClipTextConfig, ClipTextModel};
use ferry_sd::tensor::DType;
use ferry_sd::weights::ResidentViews;
use std::cell::RefCell;

const WS: u64 = 0x7_0000_0000;
const WEIGHTS: u64 = 0x10_0000_0000;
const WS_BYTES: u64 = 1 << 30;

/// Every weight the model reads, as `(group, key, shape)`, derived from the config.
fn weight_list(cfg: &ClipTextConfig, projection: bool) -> Vec<(String, String, Vec<usize>)> {
    let (h, m) = (cfg.hidden_size, cfg.intermediate_size);
    let mut out = Vec::new();
    let mut add =
        |g: &str, k: &str, s: &[usize]| out.push((g.to_string(), k.to_string(), s.to_vec()));
    add("embeddings", "token_embedding.weight", &[cfg.vocab_size, h]);
    add(
        "embeddings",
        "position_embedding.weight",
        &[cfg.max_position_embeddings, h],
    );
    for i in 0..cfg.num_hidden_layers {
        let g = format!("encoder.layers.{i}");
        for ln in ["layer_norm1", "layer_norm2"] {
            add(&g, &format!("{ln}.weight"), &[h]);
            add(&g, &format!("{ln}.bias"), &[h]);
        }
        for p in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            add(&g, &format!("self_attn.{p}.weight"), &[h, h]);
            add(&g, &format!("self_attn.{p}.bias"), &[h]);
        }
        add(&g, "mlp.fc1.weight", &[m, h]);
        add(&g, "mlp.fc1.bias", &[m]);
        add(&g, "mlp.fc2.weight", &[h, m]);
        add(&g, "mlp.fc2.bias", &[h]);
    }
    add("final_layer_norm", "weight", &[h]);
    add("final_layer_norm", "bias", &[h]);
    if projection {
        add("text_projection", "weight", &[cfg.projection_dim, h]);
    }
    out
}

/// Resident views for `model`'s weights at fake, non-overlapping, aligned device addresses
/// from [`WEIGHTS`] on; returns the views and the range they span.
fn views(be: &CudaBackend<'_>, model: &ClipTextModel) -> (ResidentViews, DeviceRange) {
    let list = weight_list(model.config(), model.has_projection());
    let mut prefixes: Vec<String> = list.iter().map(|(g, _, _)| g.clone()).collect();
    prefixes.sort();
    prefixes.dedup();
    let weights = list.into_iter().map(|(g, k, s)| (format!("{g}.{k}"), s));
    fake_views(model.component(), &prefixes, weights, be.dtype(), WEIGHTS)
}

/// What one recorded pass measured.
struct Pass {
    peak: u64,
    launches: usize,
}

/// Runs `model` on a recording backend in `dtype` with the penultimate hidden state requested
/// (what SDXL keeps), checks the launches and output shapes, and that only the outputs (and
/// the last layer's output under them) remain on the arena.
fn record(model: &ClipTextModel, ids: &[Vec<u32>], dtype: DType) -> Pass {
    let log = RefCell::new(Vec::new());
    let ws = DeviceRange::new(DevicePtr(WS), WS_BYTES);
    let be = CudaBackend::recording(&log, ws, dtype).unwrap();
    let (src, weights) = views(&be, model);
    let opts = ClipOptions {
        hidden_states: vec![-2],
        normed_hidden_states: false,
    };
    let out = model.forward_on(&be, &src, ids, &opts).unwrap();
    let cfg = model.config();
    let (b, n, h) = (ids.len(), ids[0].len(), cfg.hidden_size);
    assert_eq!(be.shape(&out.last_hidden_state), [b, n, h]);
    assert_eq!(out.hidden_states.len(), 1);
    assert_eq!(be.shape(&out.hidden_states[0]), [b, n, h]);
    assert_eq!(be.shape(&out.pooled), [b, h]);
    match &out.text_embeds {
        Some(t) => assert_eq!(be.shape(t), [b, cfg.projection_dim]),
        None => assert!(!model.has_projection()),
    }

    // Left on the stack: hidden_states[-2], the last layer's output, last, pooled, embeds.
    let size = |dims: &[usize]| {
        (dims.iter().product::<usize>() as u64 * dtype.size() as u64).next_multiple_of(ARENA_ALIGN)
    };
    let state = size(&[b, n, h]);
    let embeds = out.text_embeds.as_ref().map_or(0, |t| size(be.shape(t)));
    assert_eq!(
        be.arena().used(),
        3 * state + size(&[b, h]) + embeds,
        "a layer left temporaries on the arena"
    );

    let peak = be.arena().peak();
    let log = log.into_inner();
    let funcs: Vec<&str> = log.iter().map(|l| l.func).collect();
    let attn = funcs
        .iter()
        .filter(|f| f.contains("attention") || f.contains("flash"));
    assert_eq!(attn.count(), cfg.num_hidden_layers, "{funcs:?}");
    for l in &log {
        check_launch_args(l.ptx, l.func, &l.args).unwrap_or_else(|e| panic!("{}: {e}", l.func));
        for r in buf_args(l) {
            let inside = |o: &DeviceRange| r.ptr.0 >= o.ptr.0 && r.end() <= o.end();
            assert!(
                inside(&ws) || inside(&weights),
                "{}: buffer {r} outside the workspace and the weights",
                l.func
            );
        }
    }
    Pass {
        peak,
        launches: log.len(),
    }
}

/// The tiny fixture's encoder: the derived weight list must be exactly the checkpoint's.
fn fixture_model(model: &str, component: &str) -> ClipTextModel {
    let text =
        std::fs::read_to_string(fixture(&format!("{model}/{component}/config.json"))).unwrap();
    let clip = ClipTextModel::from_config_json(&text, component).unwrap();
    let file =
        WeightsFile::open(fixture(&format!("{model}/{component}/model.safetensors"))).unwrap();
    let mut stored: Vec<(String, Vec<usize>)> = file
        .tensors()
        .iter()
        .filter_map(|t| weight_name(&t.name).map(|n| (n.to_string(), t.shape.clone())))
        .collect();
    let mut derived: Vec<(String, Vec<usize>)> = weight_list(clip.config(), clip.has_projection())
        .into_iter()
        .map(|(g, k, s)| (format!("{g}.{k}"), s))
        .collect();
    stored.sort();
    derived.sort();
    assert_eq!(derived, stored, "{model}/{component}: weights");
    clip
}

#[test]
fn tiny_encoders_record_on_cuda() {
    for (model, component) in [
        ("sd15", "text_encoder"),
        ("sdxl", "text_encoder"),
        ("sdxl", "text_encoder_2"),
    ] {
        let clip = fixture_model(model, component);
        let ids = golden_ids(model, &format!("{component}.input_ids"));
        for dtype in [DType::F32, DType::F16] {
            let p = record(&clip, &ids, dtype);
            println!(
                "{model}/{component} {dtype:?} ids {}x{}: {} launches, arena peak {} bytes",
                ids.len(),
                ids[0].len(),
                p.launches,
                p.peak
            );
        }
    }
}

/// CLIP-L (SD 1.5's encoder, SDXL's first) at full size, batch 2 (CFG) × 77.
fn clip_l(layers: usize) -> ClipTextModel {
    let cfg = ClipTextConfig {
        hidden_size: 768,
        intermediate_size: 3072,
        num_attention_heads: 12,
        num_hidden_layers: layers,
        projection_dim: 768,
        ..ClipTextConfig::default()
    };
    ClipTextModel::new(cfg, "text_encoder", false).unwrap()
}

fn prompt_ids() -> Vec<Vec<u32>> {
    // bos, a few tokens, eos, eos padding (SD 1.x) and "!" padding (SDXL's second tokenizer).
    let row = |pad: u32| {
        let mut r = vec![49406, 320, 1125, 539, 320, 2368, 49407];
        r.resize(77, pad);
        r
    };
    vec![row(49407), row(0)]
}

#[test]
fn full_size_clip_l_records_and_its_peak_does_not_grow_with_depth() {
    let ids = prompt_ids();
    for dtype in [DType::F16, DType::F32] {
        let full = record(&clip_l(12), &ids, dtype);
        println!(
            "CLIP-L (768, 12 layers, 12 heads) {dtype:?} batch 2x77: {} launches, \
             activation peak {} bytes ({:.2} MiB)",
            full.launches,
            full.peak,
            full.peak as f64 / (1 << 20) as f64
        );
        // Each layer releases its temporaries: three layers need the same reserve as twelve.
        assert_eq!(record(&clip_l(3), &ids, dtype).peak, full.peak, "{dtype:?}");
    }
}

#[test]
fn full_size_openclip_big_g_records() {
    // SDXL's second encoder: CLIPTextModelWithProjection, 1280 wide, 32 layers, 20 heads.
    let cfg = ClipTextConfig {
        hidden_size: 1280,
        intermediate_size: 5120,
        num_attention_heads: 20,
        num_hidden_layers: 32,
        projection_dim: 1280,
        hidden_act: "gelu".into(),
        ..ClipTextConfig::default()
    };
    let clip = ClipTextModel::new(cfg, "text_encoder_2", true).unwrap();
    let p = record(&clip, &prompt_ids(), DType::F16);
    println!(
        "OpenCLIP-bigG (1280, 32 layers, 20 heads) F16 batch 2x77: {} launches, activation \
         peak {} bytes ({:.2} MiB)",
        p.launches,
        p.peak,
        p.peak as f64 / (1 << 20) as f64
    );
}
