//! CLIP text encoders against transformers' goldens (tests/fixtures/models/*/goldens.safetensors),
//! bit-identical across offload modes and budgets, and clear errors for bad checkpoints.

mod common;

use common::{check, fixture, golden, golden_ids};
use ferry_pager::device::sim::{SimConfig, SimDevice};
use ferry_pager::{Device, HostStore, RawTensor, WeightsFile};
use ferry_sched::Mode;
use ferry_sd::exec::{ExecConfig, Executor};
use ferry_sd::models::clip::{register_weights, ClipOptions, ClipOutput, ClipTextModel};
use ferry_sd::tensor::Tensor;
use safetensors::{Dtype, SafeTensors};
use std::sync::Arc;

/// The goldens of one fixture.
struct Goldens(String);

impl Goldens {
    fn open(model: &str) -> Goldens {
        Goldens(model.to_string())
    }

    fn f32(&self, name: &str) -> Tensor {
        golden(&self.0, name)
    }

    fn ids(&self, name: &str) -> Vec<Vec<u32>> {
        golden_ids(&self.0, name)
    }
}

/// A simulated device and a store holding `model/component`'s weights as `"{component}."`.
fn store_for(model: &str, component: &str) -> (Arc<SimDevice>, HostStore) {
    let dev = SimDevice::new(SimConfig::default());
    let store = HostStore::new(dev.clone() as Arc<dyn Device>);
    let file =
        WeightsFile::open(fixture(&format!("{model}/{component}/model.safetensors"))).unwrap();
    register_weights(&store, &file, component).unwrap();
    (dev, store)
}

fn config_text(model: &str, component: &str) -> String {
    std::fs::read_to_string(fixture(&format!("{model}/{component}/config.json"))).unwrap()
}

fn model_for(model: &str, component: &str) -> ClipTextModel {
    ClipTextModel::from_config_json(&config_text(model, component), component).unwrap()
}

fn penultimate() -> ClipOptions {
    ClipOptions {
        hidden_states: vec![-2],
        normed_hidden_states: false,
    }
}

fn run(
    dev: &Arc<SimDevice>,
    store: &HostStore,
    model: &ClipTextModel,
    ids: &[Vec<u32>],
    cfg: ExecConfig,
) -> ClipOutput {
    let exec = Executor::new(dev.clone(), store, &[model.groups()], cfg).unwrap();
    let out = model.forward(&exec, ids, &penultimate()).unwrap();
    assert!(exec.races().is_empty(), "{:?}", exec.races());
    out
}

#[track_caller]
fn assert_close(got: &Tensor, want: &Tensor, what: &str) {
    check(what, got, want);
}

/// Every golden of one text encoder: last hidden state, penultimate, pooled or text_embeds.
fn check_goldens(model: &str, component: &str, projection: bool) {
    let g = Goldens::open(model);
    let (dev, store) = store_for(model, component);
    let clip = model_for(model, component);
    assert_eq!(clip.has_projection(), projection);
    let ids = g.ids(&format!("{component}.input_ids"));
    assert_eq!(ids.len(), 2);
    let out = run(&dev, &store, &clip, &ids, ExecConfig::default());
    let what = format!("{model}/{component}");
    assert_close(
        &out.last_hidden_state,
        &g.f32(&format!("{component}.last_hidden_state")),
        &format!("{what} last_hidden_state"),
    );
    assert_close(
        &out.hidden_states[0],
        &g.f32(&format!("{component}.penultimate")),
        &format!("{what} penultimate"),
    );
    if projection {
        let embeds = out.text_embeds.as_ref().expect("text_embeds");
        assert_close(
            embeds,
            &g.f32(&format!("{component}.text_embeds")),
            &format!("{what} text_embeds"),
        );
    } else {
        assert!(out.text_embeds.is_none());
        assert_close(
            &out.pooled,
            &g.f32(&format!("{component}.pooler_output")),
            &format!("{what} pooler_output"),
        );
    }
}

#[test]
fn sd15_text_encoder_matches_transformers() {
    check_goldens("sd15", "text_encoder", false);
}

#[test]
fn sd2_gelu_text_encoder_matches_transformers() {
    check_goldens("sd2", "text_encoder", false);
}

#[test]
fn sdxl_text_encoders_match_transformers() {
    check_goldens("sdxl", "text_encoder", false);
    check_goldens("sdxl", "text_encoder_2", true);
}

#[test]
fn every_offload_mode_and_budget_is_bit_identical() {
    let (model, component) = ("sdxl", "text_encoder_2");
    let g = Goldens::open(model);
    let (dev, store) = store_for(model, component);
    let clip = model_for(model, component);
    let ids = g.ids(&format!("{component}.input_ids"));
    let reference = run(&dev, &store, &clip, &ids, ExecConfig::default());
    let reserve = 4096;
    for mode in [
        Mode::None,
        Mode::Model,
        Mode::Sequential,
        Mode::Group { depth: 2 },
        Mode::Auto,
    ] {
        let min = Executor::minimum_budget(&store, &[clip.groups()], mode, reserve).unwrap();
        let all = store.weight_bytes() * 2 + reserve;
        for budget in [Some(min), Some(min + (all - min) / 2), None] {
            let cfg = ExecConfig {
                mode,
                budget,
                reserve,
                ..ExecConfig::default()
            };
            let out = run(&dev, &store, &clip, &ids, cfg);
            let what = format!("{mode} budget {budget:?}");
            assert!(
                out.last_hidden_state == reference.last_hidden_state,
                "{what}: last_hidden_state differs"
            );
            assert!(
                out.hidden_states == reference.hidden_states,
                "{what}: penultimate differs"
            );
            assert!(
                out.text_embeds == reference.text_embeds,
                "{what}: text_embeds differ"
            );
        }
    }
}

#[test]
fn transformers4_names_with_text_model_prefix_give_the_same_result() {
    // Rewrite sd15's encoder as transformers 4 saved it: `text_model.` prefix and the
    // `position_ids` buffer (int64).
    let src = std::fs::read(fixture("sd15/text_encoder/model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&src).unwrap();
    let position_ids: Vec<u8> = (0..77i64).flat_map(|i| i.to_le_bytes()).collect();
    let mut views = vec![(
        "text_model.embeddings.position_ids".to_string(),
        safetensors::tensor::TensorView::new(Dtype::I64, vec![1, 77], &position_ids).unwrap(),
    )];
    for (name, view) in st.tensors() {
        views.push((format!("text_model.{name}"), view));
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    safetensors::serialize_to_file(views, None, &path).unwrap();

    let dev = SimDevice::new(SimConfig::default());
    let store = HostStore::new(dev.clone() as Arc<dyn Device>);
    register_weights(&store, &WeightsFile::open(&path).unwrap(), "text_encoder").unwrap();
    assert!(store.id("text_encoder.embeddings.position_ids").is_none());
    let clip = model_for("sd15", "text_encoder");
    let ids = Goldens::open("sd15").ids("text_encoder.input_ids");
    let old = run(&dev, &store, &clip, &ids, ExecConfig::default());
    let (dev5, store5) = store_for("sd15", "text_encoder");
    let new = run(&dev5, &store5, &clip, &ids, ExecConfig::default());
    assert!(old.last_hidden_state == new.last_hidden_state);
    assert!(old.pooled == new.pooled);
}

#[test]
fn hidden_states_follow_transformers_indexing() {
    let g = Goldens::open("sd2");
    let (dev, store) = store_for("sd2", "text_encoder");
    let clip = model_for("sd2", "text_encoder");
    let ids = g.ids("text_encoder.input_ids");
    let exec = Executor::new(dev, &store, &[clip.groups()], ExecConfig::default()).unwrap();
    // hidden_states has layers + 1 = 3 entries: 1 and -2 are the same one.
    let opts = ClipOptions {
        hidden_states: vec![0, 1, -2, -1],
        normed_hidden_states: false,
    };
    let out = clip.forward(&exec, &ids, &opts).unwrap();
    assert!(out.hidden_states[1] == out.hidden_states[2]);
    assert_close(
        &out.hidden_states[1],
        &g.f32("text_encoder.penultimate"),
        "hidden_states[1]",
    );
    // hidden_states[0]: token + position embeddings, straight from the checkpoint.
    let f16 = |name: &str| -> Vec<f32> {
        let id = store.id(&format!("text_encoder.{name}")).unwrap();
        store
            .read(id)
            .unwrap()
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect()
    };
    let (tok, pos) = (
        f16("embeddings.token_embedding.weight"),
        f16("embeddings.position_embedding.weight"),
    );
    let h = 8;
    for (b, row) in ids.iter().enumerate() {
        for (p, &id) in row.iter().enumerate() {
            for c in 0..h {
                let want = tok[id as usize * h + c] + pos[p * h + c];
                let got = out.hidden_states[0].data()[(b * 77 + p) * h + c];
                assert_eq!(got.to_bits(), want.to_bits(), "embeddings [{b}, {p}, {c}]");
            }
        }
    }
    // Normed: the last hidden state through final_layer_norm is last_hidden_state.
    let normed = ClipOptions {
        hidden_states: vec![-1],
        normed_hidden_states: true,
    };
    let out2 = clip.forward(&exec, &ids, &normed).unwrap();
    assert!(out2.hidden_states[0] == out.last_hidden_state);
    // Unequal and finite (a NaN would make any two tensors unequal).
    assert!(out.hidden_states[3].first_non_finite().is_none());
    assert!(out.hidden_states[3] != out.last_hidden_state);
    // Out of range.
    let bad = ClipOptions {
        hidden_states: vec![-4],
        normed_hidden_states: false,
    };
    let err = clip.forward(&exec, &ids, &bad).unwrap_err().to_string();
    assert!(
        err.contains("-4") && err.contains("3 hidden states"),
        "{err}"
    );
}

#[test]
fn pooling_uses_first_eos_or_legacy_argmax() {
    let (dev, store) = store_for("sd2", "text_encoder");
    // No bos and no eos: a large id (40000) at position 1, pad 0 after it.
    let mut row = vec![0u32; 77];
    row[0] = 320;
    row[1] = 40000;
    row[2] = 1125;
    let mut with_eos = row.clone();
    with_eos[3] = 49407;
    with_eos[4] = 49407;
    let ids = vec![row, with_eos];
    let pooled_at = |out: &ClipOutput, b: usize, p: usize| {
        let h = 8;
        let start = (b * 77 + p) * h;
        assert_eq!(
            out.pooled.data()[b * h..(b + 1) * h],
            out.last_hidden_state.data()[start..start + h],
            "batch {b}: expected pooling at position {p}"
        );
    };
    let text = config_text("sd2", "text_encoder");
    for (eos, positions) in [(49407, [0, 3]), (2, [1, 3])] {
        let mut cfg: serde_json::Value = serde_json::from_str(&text).unwrap();
        cfg["eos_token_id"] = eos.into();
        let clip = ClipTextModel::from_config_json(&cfg.to_string(), "text_encoder").unwrap();
        let out = run(&dev, &store, &clip, &ids, ExecConfig::default());
        for (b, p) in positions.into_iter().enumerate() {
            pooled_at(&out, b, p);
        }
    }
}

/// Registers sd15's encoder with `edit` applied to the (name, dtype, shape, bytes) list.
fn edited_store(
    edit: impl FnOnce(&mut Vec<(String, ferry_pager::DType, Vec<usize>, Vec<u8>)>),
) -> (Arc<SimDevice>, HostStore) {
    let file = WeightsFile::open(fixture("sd15/text_encoder/model.safetensors")).unwrap();
    let mut tensors: Vec<_> = file
        .tensors()
        .iter()
        .map(|t| {
            (
                format!("text_encoder.{}", t.name),
                t.dtype,
                t.shape.clone(),
                file.bytes_of(t).to_vec(),
            )
        })
        .collect();
    edit(&mut tensors);
    let dev = SimDevice::new(SimConfig::default());
    let store = HostStore::new(dev.clone() as Arc<dyn Device>);
    let raws: Vec<RawTensor<'_>> = tensors
        .iter()
        .map(|(name, dtype, shape, data)| RawTensor {
            name,
            dtype: *dtype,
            shape,
            data,
        })
        .collect();
    store.register_batch(&raws).unwrap();
    (dev, store)
}

fn forward_err(dev: Arc<SimDevice>, store: &HostStore, clip: &ClipTextModel) -> String {
    let ids = Goldens::open("sd15").ids("text_encoder.input_ids");
    let exec = match Executor::new(dev, store, &[clip.groups()], ExecConfig::default()) {
        Ok(e) => e,
        Err(e) => return e.to_string(),
    };
    clip.forward(&exec, &ids, &penultimate())
        .unwrap_err()
        .to_string()
}

#[test]
fn bad_checkpoints_and_configs_are_named() {
    let clip = model_for("sd15", "text_encoder");
    // Missing weight.
    let missing = "text_encoder.encoder.layers.1.self_attn.k_proj.bias";
    let (dev, store) = edited_store(|t| t.retain(|(n, ..)| n != missing));
    let err = forward_err(dev, &store, &clip);
    assert!(err.contains(missing) && err.contains("missing"), "{err}");

    // A weight whose shape disagrees with the config.
    let mut cfg: serde_json::Value =
        serde_json::from_str(&config_text("sd15", "text_encoder")).unwrap();
    cfg["intermediate_size"] = 16.into();
    let narrow = ClipTextModel::from_config_json(&cfg.to_string(), "text_encoder").unwrap();
    let (dev, store) = store_for("sd15", "text_encoder");
    let err = forward_err(dev, &store, &narrow);
    assert!(
        err.contains("text_encoder.encoder.layers.0.mlp.fc1.weight")
            && err.contains("[32, 8]")
            && err.contains("[16, 8]"),
        "{err}"
    );

    // A weight no module uses.
    let (dev, store) = edited_store(|t| {
        t.push((
            "text_encoder.encoder.extra.weight".into(),
            ferry_pager::DType::F16,
            vec![2],
            vec![0; 4],
        ))
    });
    let err = forward_err(dev, &store, &clip);
    assert!(
        err.contains("text_encoder.encoder.extra.weight") && err.contains("unknown key"),
        "{err}"
    );

    // A projection model whose checkpoint lacks text_projection.
    let (dev, store) = store_for("sd15", "text_encoder");
    let proj = ClipTextModel::new(clip.config().clone(), "text_encoder", true).unwrap();
    let err = forward_err(dev, &store, &proj);
    assert!(err.contains("text_encoder.text_projection"), "{err}");

    // Unknown activation, heads not dividing the width, malformed config.
    cfg["intermediate_size"] = 32.into();
    cfg["hidden_act"] = "mish".into();
    let err = ClipTextModel::from_config_json(&cfg.to_string(), "text_encoder")
        .unwrap_err()
        .to_string();
    assert!(err.contains("hidden_act") && err.contains("mish"), "{err}");
    cfg["hidden_act"] = "gelu_new".into();
    cfg["num_attention_heads"] = 3.into();
    let err = ClipTextModel::from_config_json(&cfg.to_string(), "text_encoder")
        .unwrap_err()
        .to_string();
    assert!(err.contains("num_attention_heads (3)"), "{err}");
    cfg["num_attention_heads"] = "two".into();
    let err = ClipTextModel::from_config_json(&cfg.to_string(), "text_encoder")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("'num_attention_heads'") && err.contains("\"two\""),
        "{err}"
    );
}

#[test]
fn bad_input_ids_are_rejected() {
    let (dev, store) = store_for("sd15", "text_encoder");
    let clip = model_for("sd15", "text_encoder");
    let exec = Executor::new(dev, &store, &[clip.groups()], ExecConfig::default()).unwrap();
    let opts = ClipOptions::default();
    let cases: [(Vec<Vec<u32>>, &str); 4] = [
        (vec![vec![49406; 78]], "exceeds max_position_embeddings 77"),
        (vec![vec![49406, 49408]], "token id 49408"),
        (vec![vec![49406, 1], vec![49406]], "row 1 has 1"),
        (vec![], "at least one non-empty row"),
    ];
    for (ids, want) in cases {
        let err = clip.forward(&exec, &ids, &opts).unwrap_err().to_string();
        assert!(err.contains(want), "{err}");
    }
    // A short sequence works (positions 0..n).
    let out = clip
        .forward(&exec, &[vec![49406u32, 320, 49407]], &opts)
        .unwrap();
    assert_eq!(out.last_hidden_state.shape(), &[1, 3, 8]);
}

#[test]
fn rows_are_independent_and_attention_is_causal() {
    let g = Goldens::open("sdxl");
    let (dev, store) = store_for("sdxl", "text_encoder_2");
    let clip = model_for("sdxl", "text_encoder_2");
    let ids = g.ids("text_encoder_2.input_ids");
    let exec = Executor::new(dev, &store, &[clip.groups()], ExecConfig::default()).unwrap();
    let opts = ClipOptions::default();
    let both = clip.forward(&exec, &ids, &opts).unwrap();
    // Row 1 alone gives batch row 1.
    let one = clip.forward(&exec, &ids[1..], &opts).unwrap();
    let h = 16;
    let row1 = Tensor::new([1, 77, h], both.last_hidden_state.data()[77 * h..].to_vec()).unwrap();
    assert_close(&one.last_hidden_state, &row1, "row 1 alone");
    // The first 12 tokens alone give the first 12 positions: nothing attends forward.
    let prefix: Vec<Vec<u32>> = ids.iter().map(|r| r[..12].to_vec()).collect();
    let short = clip.forward(&exec, &prefix, &opts).unwrap();
    let mut want = Vec::new();
    for b in 0..2 {
        want.extend_from_slice(&both.last_hidden_state.data()[b * 77 * h..(b * 77 + 12) * h]);
    }
    assert_close(
        &short.last_hidden_state,
        &Tensor::new([2, 12, h], want).unwrap(),
        "12-token prefix",
    );
}
