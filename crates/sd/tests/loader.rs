//! Checkpoint loaders: the single-file (original LDM / sgm layout) fixtures, verified loadable by
//! diffusers' `from_single_file`, must give exactly the diffusers folder's tensors and configs;
//! folders of older layouts and defective inputs are handled.

use ferry_pager::device::sim::{SimConfig, SimDevice};
use ferry_pager::{DType, Device, HostStore};
use ferry_sd::loader::{
    default_attention_head_dim, Component, LoadError, ModelFamily, ModelSource, OpenOptions,
    SourceFormat,
};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(rel)
}

const MODELS: [(&str, ModelFamily); 3] = [
    ("sd15", ModelFamily::Sd1),
    ("sd2", ModelFamily::Sd2),
    ("sdxl", ModelFamily::Sdxl),
];

fn weight_components(src: &ModelSource) -> Vec<String> {
    src.components()
        .into_iter()
        .filter(|c| c.starts_with("text_encoder") || *c == "unet" || *c == "vae")
        .map(str::to_string)
        .collect()
}

/// name -> (shape, f32 values)
fn contents(c: &Component) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    c.tensors
        .iter()
        .map(|t| (t.name.clone(), (t.shape.clone(), t.read_f32().unwrap())))
        .collect()
}

fn assert_same_tensors(what: &str, a: &Component, b: &Component) {
    let (ca, cb) = (contents(a), contents(b));
    let ka: Vec<&String> = ca.keys().collect();
    let kb: Vec<&String> = cb.keys().collect();
    let only_a: Vec<_> = ka.iter().filter(|k| !cb.contains_key(**k)).collect();
    let only_b: Vec<_> = kb.iter().filter(|k| !ca.contains_key(**k)).collect();
    assert!(
        only_a.is_empty() && only_b.is_empty(),
        "{what}: only in first {only_a:?}; only in second {only_b:?}"
    );
    for (k, (sa, va)) in &ca {
        let (sb, vb) = &cb[k];
        assert_eq!(sa, sb, "{what}: shape of {k}");
        let same = va.iter().zip(vb).all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(same, "{what}: values of {k} differ");
    }
}

#[test]
fn single_file_gives_the_folder_tensors() {
    for (name, family) in MODELS {
        let folder = ModelSource::open(fixture(name)).unwrap();
        let single = ModelSource::open(fixture(&format!("{name}.single.safetensors"))).unwrap();
        assert_eq!(folder.format(), SourceFormat::Diffusers);
        assert_eq!(single.format(), SourceFormat::SingleFile);
        assert_eq!(single.family(), family, "{name}");
        assert_eq!(folder.family(), family, "{name}");
        assert_eq!(folder.components(), single.components(), "{name}");
        let comps = weight_components(&folder);
        assert!(comps.len() >= 3, "{name}: {comps:?}");
        for c in &comps {
            let f = folder.component(c).unwrap();
            let s = single.component(c).unwrap();
            assert!(!f.tensors.is_empty());
            assert_same_tensors(&format!("{name}/{c}"), &f, &s);
        }
    }
}

#[test]
fn folder_names_are_the_files_names_modulo_text_model_prefix() {
    // The loader renames only what it must: every stored tensor appears once.
    let src = ModelSource::open(fixture("sdxl")).unwrap();
    for c in ["text_encoder", "text_encoder_2", "unet", "vae"] {
        let comp = src.component(c).unwrap();
        let file = &comp.tensors[0].file;
        assert_eq!(comp.tensors.len(), file.tensors().len(), "{c}");
        for t in &comp.tensors {
            let stored = t
                .stored
                .name
                .strip_prefix("text_model.")
                .unwrap_or(&t.stored.name);
            assert_eq!(t.name, stored);
            assert!(t.stored_bytes().is_some());
        }
    }
    let te2 = src.component("text_encoder_2").unwrap();
    let proj = te2.tensor("text_projection.weight").unwrap();
    assert_eq!(proj.shape, vec![12, 16]);
}

fn cfg(c: &Component) -> Value {
    c.config().unwrap()
}

#[test]
fn derived_configs_match_the_folder_where_shapes_tell() {
    let unet_fields = [
        "block_out_channels",
        "layers_per_block",
        "cross_attention_dim",
        "use_linear_projection",
        "addition_embed_type",
        "addition_time_embed_dim",
        "projection_class_embeddings_input_dim",
        "in_channels",
        "out_channels",
        "down_block_types",
        "up_block_types",
        "mid_block_type",
        "upcast_attention",
        "class_embed_type",
        "time_embedding_type",
        "flip_sin_to_cos",
        "freq_shift",
    ];
    let vae_fields = [
        "block_out_channels",
        "latent_channels",
        "scaling_factor",
        "layers_per_block",
        "in_channels",
        "out_channels",
        "force_upcast",
        "use_quant_conv",
        "use_post_quant_conv",
        "mid_block_add_attention",
    ];
    let text_fields = [
        "hidden_size",
        "num_hidden_layers",
        "intermediate_size",
        "hidden_act",
        "projection_dim",
        "vocab_size",
        "max_position_embeddings",
        "layer_norm_eps",
        "bos_token_id",
        "eos_token_id",
        "dtype",
    ];
    for (name, _) in MODELS {
        let folder = ModelSource::open(fixture(name)).unwrap();
        let single = ModelSource::open(fixture(&format!("{name}.single.safetensors"))).unwrap();
        for c in folder.components() {
            let (f, s) = (folder.component(c).unwrap(), single.component(c).unwrap());
            let (fc, sc) = (cfg(&f), cfg(&s));
            let fields: &[&str] = match c {
                "unet" => &unet_fields,
                "vae" => &vae_fields,
                c if c.starts_with("text_encoder") => &text_fields,
                c if c.starts_with("tokenizer") => &["pad_token", "bos_token", "eos_token"],
                _ => &[
                    "_class_name",
                    "beta_start",
                    "beta_end",
                    "beta_schedule",
                    "prediction_type",
                    "steps_offset",
                    "timestep_spacing",
                    "num_train_timesteps",
                    "set_alpha_to_one",
                    "clip_sample",
                ],
            };
            for field in fields {
                assert_eq!(fc.get(*field), sc.get(*field), "{name}/{c}: {field}");
            }
            // transformer_layers_per_block: an int means the same depth at every level.
            if c == "unet" {
                let levels = fc["block_out_channels"].as_array().unwrap().len();
                let norm = |v: &Value| match v {
                    Value::Number(_) => Value::Array(vec![v.clone(); levels]),
                    _ => v.clone(),
                };
                assert_eq!(
                    norm(&fc["transformer_layers_per_block"]),
                    norm(&sc["transformer_layers_per_block"]),
                    "{name}: transformer_layers_per_block"
                );
            }
            assert_eq!(f.class_name, s.class_name, "{name}/{c}");
        }
    }
}

#[test]
fn head_counts_follow_real_models_when_shapes_cannot_tell() {
    assert_eq!(
        default_attention_head_dim(ModelFamily::Sd1, &[320, 640, 1280, 1280]),
        json!(8)
    );
    assert_eq!(
        default_attention_head_dim(ModelFamily::Sd2, &[320, 640, 1280, 1280]),
        json!([5, 10, 20, 20])
    );
    assert_eq!(
        default_attention_head_dim(ModelFamily::Sdxl, &[320, 640, 1280]),
        json!([5, 10, 20])
    );
    // The tiny fixtures' widths are not real: the loader says it guessed.
    let single = ModelSource::open(fixture("sdxl.single.safetensors")).unwrap();
    let w = single.warnings().join("\n");
    assert!(w.contains("head"), "{w}");
    assert!(w.contains("norm_num_groups"), "{w}");
}

#[test]
fn config_folder_supplies_what_shapes_cannot_tell() {
    for (name, _) in MODELS {
        let folder = ModelSource::open(fixture(name)).unwrap();
        let opts = OpenOptions {
            config_from: Some(fixture(name)),
            ..Default::default()
        };
        let single =
            ModelSource::open_with(fixture(&format!("{name}.single.safetensors")), &opts).unwrap();
        assert_eq!(single.model_index_json(), folder.model_index_json());
        for c in folder.components() {
            let (f, s) = (folder.component(c).unwrap(), single.component(c).unwrap());
            assert_eq!(f.config_json, s.config_json, "{name}/{c}");
            assert_eq!(f.class_name, s.class_name);
            if c.starts_with("tokenizer") {
                assert_eq!(f.dir, s.dir);
            }
        }
        let unet = single.component("unet").unwrap();
        let want = cfg(&folder.component("unet").unwrap())["attention_head_dim"].clone();
        assert_eq!(cfg(&unet)["attention_head_dim"], want);
    }
    // A config folder of another model is refused, naming the field.
    let opts = OpenOptions {
        config_from: Some(fixture("sd15")),
        ..Default::default()
    };
    let e = ModelSource::open_with(fixture("sdxl.single.safetensors"), &opts).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("sdxl.single.safetensors"), "{msg}");
    assert!(
        msg.contains("block_out_channels") || msg.contains("hidden_size"),
        "{msg}"
    );
}

#[test]
fn single_file_drops_what_diffusers_drops_and_transposes_the_projection() {
    let single = ModelSource::open(fixture("sdxl.single.safetensors")).unwrap();
    let te2 = single.component("text_encoder_2").unwrap();
    let proj = te2.tensor("text_projection.weight").unwrap();
    assert_eq!(proj.shape, vec![12, 16]);
    assert!(proj.stored_bytes().is_none(), "a transpose needs a copy");
    let q = te2
        .tensor("encoder.layers.1.self_attn.q_proj.weight")
        .unwrap();
    assert_eq!(
        q.stored.name,
        "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight"
    );
    assert_eq!(q.shape, vec![16, 16]);
    let v = te2
        .tensor("encoder.layers.1.self_attn.v_proj.bias")
        .unwrap();
    assert_eq!(v.stored_bytes().unwrap().len(), 16 * 2);

    let sd2 = ModelSource::open(fixture("sd2.single.safetensors")).unwrap();
    let te = sd2.component("text_encoder").unwrap();
    assert!(te.tensor("text_projection.weight").is_none());
    assert!(te
        .tensors
        .iter()
        .all(|t| !t.stored.name.contains("logit_scale")));
    // No unexpected leftovers (betas, alphas_cumprod and logit_scale are expected).
    assert!(
        !sd2.warnings().iter().any(|w| w.contains("not used")),
        "{:?}",
        sd2.warnings()
    );
    let vae = sd2.component("vae").unwrap();
    let q = vae
        .tensor("decoder.mid_block.attentions.0.to_q.weight")
        .unwrap();
    assert_eq!(q.shape, vec![16, 16]);
    assert_eq!(q.stored.shape, vec![16, 16, 1, 1]);
}

#[test]
fn register_into_host_store_by_diffusers_name() {
    let dev = SimDevice::new(SimConfig::default());
    let store = HostStore::new(dev.clone() as Arc<dyn Device>);
    let single = ModelSource::open(fixture("sdxl.single.safetensors")).unwrap();
    let te2 = single.component("text_encoder_2").unwrap();
    let ids = te2
        .register_into(&store, "text_encoder_2.", Some(DType::F32))
        .unwrap();
    assert_eq!(ids.len(), te2.tensors.len());
    for (t, id) in te2.tensors.iter().zip(&ids) {
        let h = store.tensor(*id).unwrap();
        assert_eq!(h.name, format!("text_encoder_2.{}", t.name));
        assert_eq!(h.dtype, DType::F32);
        assert_eq!(h.shape, t.shape);
        assert_eq!(store.read(*id).unwrap(), t.read_as(DType::F32).unwrap());
    }
    // Without conversion the stored bytes are registered as they are.
    let vae = single.component("vae").unwrap();
    let ids = vae.register_into(&store, "vae.", None).unwrap();
    let t = &vae.tensors[3];
    assert_eq!(store.read(ids[3]).unwrap(), t.stored_bytes().unwrap());
    assert_eq!(store.tensor(ids[3]).unwrap().dtype, DType::F16);
}

// ---- defective inputs -------------------------------------------------------------------------

fn expect_err(r: Result<ModelSource, LoadError>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn missing_path_is_a_clear_error() {
    let p = fixture("no_such_model");
    // The operating system's error is kept (kind and all), not flattened into the message.
    match ModelSource::open(&p) {
        Err(LoadError::Io { path, source, .. }) => {
            assert_eq!(path, p);
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        Err(other) => panic!("not an I/O error: {other:?}"),
        Ok(_) => panic!("a missing path opened"),
    }
    let msg = expect_err(ModelSource::open(&p));
    assert!(msg.contains("no_such_model"), "{msg}");
    assert!(
        msg.contains("diffusers folder or a .safetensors file"),
        "{msg}"
    );
}

#[test]
fn folder_without_model_index_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("unet")).unwrap();
    let msg = expect_err(ModelSource::open(dir.path()));
    assert!(msg.contains("model_index.json is missing"), "{msg}");
    assert!(msg.contains(&dir.path().display().to_string()), "{msg}");
}

#[test]
fn missing_component_weights_name_the_folder() {
    let dir = tempfile::tempdir().unwrap();
    copy_file(
        &fixture("sd15/model_index.json"),
        &dir.path().join("model_index.json"),
    );
    std::fs::create_dir(dir.path().join("unet")).unwrap();
    copy_file(
        &fixture("sd15/unet/config.json"),
        &dir.path().join("unet/config.json"),
    );
    std::fs::write(dir.path().join("unet/diffusion_pytorch_model.bin"), b"x").unwrap();
    let src = ModelSource::open(dir.path()).unwrap();
    let e = src.component("unet").unwrap_err().to_string();
    assert!(e.contains("diffusion_pytorch_model.safetensors"), "{e}");
    assert!(e.contains("only .safetensors"), "{e}");
    let e = src.component("vae").unwrap_err().to_string();
    assert!(e.contains("vae") && e.contains("missing"), "{e}");
    let e = src.component("nonsense").unwrap_err().to_string();
    assert!(e.contains("no component 'nonsense'"), "{e}");
}

#[test]
fn single_file_of_unknown_layout_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("mystery.safetensors");
    write_st(
        &p,
        &[("transformer.blocks.0.weight", "F32", vec![2], vec![0u8; 8])],
    );
    let msg = expect_err(ModelSource::open(&p));
    assert!(msg.contains("mystery.safetensors"), "{msg}");
    assert!(msg.contains("unknown checkpoint layout"), "{msg}");
    assert!(msg.contains("transformer"), "{msg}");
}

#[test]
fn truncated_single_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(fixture("sd15.single.safetensors")).unwrap();
    let p = dir.path().join("cut.safetensors");
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let msg = expect_err(ModelSource::open(&p));
    assert!(msg.contains("cut.safetensors"), "{msg}");
    assert!(msg.contains("outside the data area"), "{msg}");
    std::fs::write(&p, &bytes[..5]).unwrap();
    let msg = expect_err(ModelSource::open(&p));
    assert!(msg.contains("truncated"), "{msg}");
}

// ---- older and other folder layouts -----------------------------------------------------------

fn copy_file(from: &Path, to: &Path) {
    std::fs::copy(from, to).unwrap();
}

/// Writes a safetensors file (tensors laid out in the given order).
fn write_st(path: &Path, tensors: &[(&str, &str, Vec<usize>, Vec<u8>)]) {
    let mut header = serde_json::Map::new();
    let mut off = 0usize;
    for (name, dtype, shape, data) in tensors {
        header.insert(
            name.to_string(),
            json!({"dtype": dtype, "shape": shape, "data_offsets": [off, off + data.len()]}),
        );
        off += data.len();
    }
    let mut h = serde_json::to_vec(&Value::Object(header)).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    for (_, _, _, data) in tensors {
        out.extend_from_slice(data);
    }
    std::fs::write(path, out).unwrap();
}

/// The tensors of a fixture component file as (stored name, dtype, shape, bytes).
fn stored(rel: &str) -> Vec<(String, DType, Vec<usize>, Vec<u8>)> {
    let f = ferry_pager::WeightsFile::open(fixture(rel)).unwrap();
    f.tensors()
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                t.dtype,
                t.shape.clone(),
                f.bytes_of(t).to_vec(),
            )
        })
        .collect()
}

fn write_renamed(
    path: &Path,
    src: &[(String, DType, Vec<usize>, Vec<u8>)],
    rename: impl Fn(&str) -> String,
    to: DType,
    extra: Vec<(String, &str, Vec<usize>, Vec<u8>)>,
) {
    let mut owned: Vec<(String, &str, Vec<usize>, Vec<u8>)> = src
        .iter()
        .map(|(n, d, s, b)| {
            let bytes = ferry_pager::weights::convert(b, *d, to).unwrap();
            (rename(n), to.name(), s.clone(), bytes)
        })
        .collect();
    owned.extend(extra);
    let refs: Vec<(&str, &str, Vec<usize>, Vec<u8>)> = owned
        .iter()
        .map(|(n, d, s, b)| (n.as_str(), *d, s.clone(), b.clone()))
        .collect();
    write_st(path, &refs);
}

fn index_with(components: &[(&str, &str, &str)]) -> String {
    let mut m = serde_json::Map::new();
    m.insert("_class_name".into(), json!("StableDiffusionPipeline"));
    m.insert("safety_checker".into(), json!([null, null]));
    for (n, lib, class) in components {
        m.insert(n.to_string(), json!([lib, class]));
    }
    serde_json::to_string(&Value::Object(m)).unwrap()
}

#[test]
fn old_folder_layouts_map_to_current_names() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::write(
        root.join("model_index.json"),
        index_with(&[
            ("vae", "diffusers", "AutoencoderKL"),
            ("text_encoder", "transformers", "CLIPTextModel"),
        ]),
    )
    .unwrap();
    // VAE as diffusers < 0.14 wrote it: query/key/value/proj_attn, f32, proj_attn as a 1×1 conv.
    std::fs::create_dir(root.join("vae")).unwrap();
    copy_file(
        &fixture("sd15/vae/config.json"),
        &root.join("vae/config.json"),
    );
    let vae = stored("sd15/vae/diffusion_pytorch_model.safetensors");
    let old = |n: &str| {
        n.replace(".to_q.", ".query.")
            .replace(".to_k.", ".key.")
            .replace(".to_v.", ".value.")
            .replace(".to_out.0.", ".proj_attn.")
    };
    let vae_conv: Vec<_> = vae
        .iter()
        .map(|(n, d, s, b)| {
            let mut s = s.clone();
            if n.ends_with("to_out.0.weight") {
                s.extend([1, 1]);
            }
            (n.clone(), *d, s, b.clone())
        })
        .collect();
    write_renamed(
        &root.join("vae/diffusion_pytorch_model.safetensors"),
        &vae_conv,
        old,
        DType::F32,
        vec![],
    );
    // Text encoder as transformers 4 wrote it: `text_model.` prefix, a position_ids buffer,
    // `torch_dtype` in the config, bf16 weights.
    std::fs::create_dir(root.join("text_encoder")).unwrap();
    let mut tcfg: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("sd15/text_encoder/config.json")).unwrap(),
    )
    .unwrap();
    let obj = tcfg.as_object_mut().unwrap();
    obj.remove("dtype");
    obj.insert("torch_dtype".into(), json!("bfloat16"));
    obj.insert("transformers_version".into(), json!("4.30.0"));
    std::fs::write(root.join("text_encoder/config.json"), tcfg.to_string()).unwrap();
    let te = stored("sd15/text_encoder/model.safetensors");
    let pos_ids: Vec<u8> = (0..77i64).flat_map(|i| i.to_le_bytes()).collect();
    write_renamed(
        &root.join("text_encoder/model.safetensors"),
        &te,
        |n| format!("text_model.{n}"),
        DType::BF16,
        vec![(
            "text_model.embeddings.position_ids".into(),
            "I64",
            vec![1, 77],
            pos_ids,
        )],
    );

    let old_src = ModelSource::open(root).unwrap();
    let new_src = ModelSource::open(fixture("sd15")).unwrap();
    assert_eq!(old_src.components(), vec!["text_encoder", "vae"]);
    // VAE: f32 copies of the fp16 values, so the comparison is exact.
    let (o, n) = (
        old_src.component("vae").unwrap(),
        new_src.component("vae").unwrap(),
    );
    assert!(o.tensors.iter().all(|t| t.dtype == DType::F32));
    assert_same_tensors("old vae", &o, &n);
    // Text encoder: bf16 is lossy, so compare with the fixture's values rounded to bf16.
    let (o, n) = (
        old_src.component("text_encoder").unwrap(),
        new_src.component("text_encoder").unwrap(),
    );
    assert!(o.tensor("embeddings.position_ids").is_none());
    assert_eq!(o.tensors.len(), n.tensors.len());
    for t in &n.tensors {
        let ot = o
            .tensor(&t.name)
            .unwrap_or_else(|| panic!("missing {}", t.name));
        assert_eq!(ot.dtype, DType::BF16);
        assert_eq!(ot.shape, t.shape);
        assert_eq!(
            ot.read_as(DType::BF16).unwrap(),
            t.read_as(DType::BF16).unwrap()
        );
    }
    let c = o.config().unwrap();
    assert_eq!(c["dtype"], json!("bfloat16"));
    assert_eq!(c["torch_dtype"], json!("bfloat16"));
}

#[test]
fn variants_and_shards() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::write(
        root.join("model_index.json"),
        index_with(&[("unet", "diffusers", "UNet2DConditionModel")]),
    )
    .unwrap();
    let unet = root.join("unet");
    std::fs::create_dir(&unet).unwrap();
    copy_file(&fixture("sd15/unet/config.json"), &unet.join("config.json"));
    // Only an fp16 variant present: it is used without asking.
    copy_file(
        &fixture("sd15/unet/diffusion_pytorch_model.safetensors"),
        &unet.join("diffusion_pytorch_model.fp16.safetensors"),
    );
    let reference = ModelSource::open(fixture("sd15"))
        .unwrap()
        .component("unet")
        .unwrap();
    let got = ModelSource::open(root).unwrap().component("unet").unwrap();
    assert_same_tensors("fp16 only", &got, &reference);

    // Plain f32 file beside it: preferred by default, the variant when asked.
    let tensors = stored("sd15/unet/diffusion_pytorch_model.safetensors");
    write_renamed(
        &unet.join("diffusion_pytorch_model.safetensors"),
        &tensors,
        str::to_string,
        DType::F32,
        vec![],
    );
    let plain = ModelSource::open(root).unwrap().component("unet").unwrap();
    assert!(plain.tensors.iter().all(|t| t.dtype == DType::F32));
    assert_same_tensors("f32", &plain, &reference);
    let opts = OpenOptions {
        variant: Some("fp16".into()),
        ..Default::default()
    };
    let v = ModelSource::open_with(root, &opts)
        .unwrap()
        .component("unet")
        .unwrap();
    assert!(v.tensors.iter().all(|t| t.dtype == DType::F16));
    let opts = OpenOptions {
        variant: Some("bf16".into()),
        ..Default::default()
    };
    let fallback = ModelSource::open_with(root, &opts)
        .unwrap()
        .component("unet")
        .unwrap();
    assert!(fallback.tensors.iter().all(|t| t.dtype == DType::F32));

    // Sharded: two shards and an index take precedence only when no single file exists.
    std::fs::remove_file(unet.join("diffusion_pytorch_model.safetensors")).unwrap();
    std::fs::remove_file(unet.join("diffusion_pytorch_model.fp16.safetensors")).unwrap();
    let (a, b) = tensors.split_at(tensors.len() / 2);
    let names = [
        "diffusion_pytorch_model-00001-of-00002.safetensors",
        "diffusion_pytorch_model-00002-of-00002.safetensors",
    ];
    let mut map = serde_json::Map::new();
    for (part, file) in [a, b].iter().zip(names) {
        write_renamed(&unet.join(file), part, str::to_string, DType::F16, vec![]);
        for t in part.iter() {
            map.insert(t.0.clone(), json!(file));
        }
    }
    std::fs::write(
        unet.join("diffusion_pytorch_model.safetensors.index.json"),
        json!({"metadata": {}, "weight_map": map}).to_string(),
    )
    .unwrap();
    let sharded = ModelSource::open(root).unwrap().component("unet").unwrap();
    assert_same_tensors("sharded", &sharded, &reference);
}

#[test]
fn fixture_single_files_leave_nothing_unexpected_unused() {
    for (name, _) in MODELS {
        let s = ModelSource::open(fixture(&format!("{name}.single.safetensors"))).unwrap();
        for w in s.warnings() {
            assert!(!w.contains("not used"), "{name}: {w}");
        }
    }
}

// ---- full-size layouts ------------------------------------------------------------------------

/// Name -> shape lists of real SD 1.5 / SD 2.1 / SDXL-base checkpoints, recorded by
/// `scripts/fixtures/real_shapes.py` from real-config models and diffusers' own conversion.
fn real_shapes(name: &str) -> Value {
    use std::io::Read;
    let gz = std::fs::read(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/real_shapes")
            .join(format!("{name}.json.gz")),
    )
    .unwrap();
    let mut text = String::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_string(&mut text)
        .unwrap();
    serde_json::from_str(&text).unwrap()
}

fn shape_of(v: &Value) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_u64().unwrap() as usize)
        .collect()
}

/// A sparse f16 safetensors file with these tensors (all zero; only the header is written).
fn write_sparse(path: &Path, tensors: &serde_json::Map<String, Value>) {
    let mut header = serde_json::Map::new();
    let mut off = 0usize;
    for (name, shape) in tensors {
        let n: usize = shape_of(shape).iter().product::<usize>() * 2;
        header.insert(
            name.clone(),
            json!({"dtype": "F16", "shape": shape, "data_offsets": [off, off + n]}),
        );
        off += n;
    }
    let mut h = serde_json::to_vec(&Value::Object(header)).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut f = std::fs::File::create(path).unwrap();
    use std::io::Write;
    f.write_all(&(h.len() as u64).to_le_bytes()).unwrap();
    f.write_all(&h).unwrap();
    f.set_len((8 + h.len() + off) as u64).unwrap();
}

#[test]
fn full_size_single_files_map_like_diffusers_and_derive_real_configs() {
    let dir = tempfile::tempdir().unwrap();
    for (name, family) in MODELS {
        let real = real_shapes(name);
        let path = dir.path().join(format!("{name}.safetensors"));
        write_sparse(&path, real["ldm"].as_object().unwrap());
        let src = ModelSource::open(&path).unwrap();
        assert_eq!(src.family(), family);
        assert!(src.warnings().is_empty(), "{name}: {:?}", src.warnings());
        for (comp, want) in real["diffusers"].as_object().unwrap() {
            let c = src.component(comp).unwrap();
            let got: BTreeMap<&str, Vec<usize>> = c
                .tensors
                .iter()
                .map(|t| (t.name.as_str(), t.shape.clone()))
                .collect();
            let want: BTreeMap<&str, Vec<usize>> = want
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.as_str(), shape_of(v)))
                .collect();
            let missing: Vec<_> = want.keys().filter(|k| !got.contains_key(*k)).collect();
            let extra: Vec<_> = got.keys().filter(|k| !want.contains_key(*k)).collect();
            assert!(
                missing.is_empty() && extra.is_empty(),
                "{name}/{comp}: missing {missing:?}, extra {extra:?}"
            );
            assert_eq!(got, want, "{name}/{comp}: shapes");

            let ours = c.config().unwrap();
            for (field, value) in real["configs"][comp].as_object().unwrap() {
                let relevant = match comp.as_str() {
                    "unet" => [
                        "block_out_channels",
                        "layers_per_block",
                        "attention_head_dim",
                        "cross_attention_dim",
                        "use_linear_projection",
                        "addition_embed_type",
                        "addition_time_embed_dim",
                        "projection_class_embeddings_input_dim",
                        "down_block_types",
                        "up_block_types",
                        "mid_block_type",
                        "norm_num_groups",
                        "upcast_attention",
                        "sample_size",
                        "in_channels",
                        "out_channels",
                        "class_embed_type",
                    ]
                    .contains(&field.as_str()),
                    "vae" => [
                        "block_out_channels",
                        "latent_channels",
                        "scaling_factor",
                        "layers_per_block",
                        "norm_num_groups",
                        "force_upcast",
                        "in_channels",
                        "out_channels",
                    ]
                    .contains(&field.as_str()),
                    // SD 2's CLIPTextModel has no projection: its projection_dim is unused.
                    _ => !(name == "sd2" && field == "projection_dim"),
                };
                if relevant {
                    assert_eq!(ours.get(field), Some(value), "{name}/{comp}: {field}");
                }
            }
            if comp == "unet" {
                let levels = ours["block_out_channels"].as_array().unwrap().len();
                let norm = |v: &Value| match v {
                    Value::Number(_) => Value::Array(vec![v.clone(); levels]),
                    _ => v.clone(),
                };
                assert_eq!(
                    norm(&ours["transformer_layers_per_block"]),
                    norm(&real["configs"]["unet"]["transformer_layers_per_block"]),
                    "{name}: transformer_layers_per_block"
                );
            }
        }
    }
}

#[test]
fn pickled_checkpoints_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("model.ckpt");
    std::fs::write(&p, b"PK\x03\x04").unwrap();
    let msg = expect_err(ModelSource::open(&p));
    assert!(
        msg.contains("model.ckpt") && msg.contains(".safetensors"),
        "{msg}"
    );
}
