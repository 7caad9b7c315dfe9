//! `UNet2DConditionModel` against diffusers goldens (tests/fixtures/models/{sd15,sd2,sdxl}) at
//! several timesteps, offload-mode invariance, and the errors for bad configs and checkpoints.

mod common;

use common::{check, fixture, golden, names_and_shapes, store_with};
use ferry_pager::device::sim::{SimConfig, SimDevice};
use ferry_pager::host::{HostStore, LoadOptions};
use ferry_pager::Device;
use ferry_sched::Mode;
use ferry_sd::error::Error;
use ferry_sd::exec::{ExecConfig, Executor};
use ferry_sd::models::unet::{AddedCond, UNet2DConditionModel, UNetConfig};
use ferry_sd::tensor::Tensor;
use std::sync::Arc;

const FIXTURES: [&str; 3] = ["sd15", "sd2", "sdxl"];

/// The goldens of one fixture.
struct Goldens(String);

impl Goldens {
    fn load(model: &str) -> Goldens {
        Goldens(model.to_string())
    }

    fn get(&self, name: &str) -> Tensor {
        golden(&self.0, name)
    }
}

fn config_json(model: &str) -> String {
    std::fs::read_to_string(fixture(&format!("{model}/unet/config.json"))).unwrap()
}

fn unet(model: &str) -> UNet2DConditionModel {
    UNet2DConditionModel::from_config_file(fixture(&format!("{model}/unet/config.json"))).unwrap()
}

fn store(model: &str) -> (Arc<SimDevice>, HostStore) {
    store_with(
        model,
        "unet",
        "diffusion_pytorch_model.safetensors",
        LoadOptions::default(),
    )
}

/// The golden inputs of one fixture.
struct Inputs {
    g: Goldens,
    sample: Tensor,
    context: Tensor,
    timesteps: Vec<f32>,
    added: Option<(Tensor, Tensor)>,
}

impl Inputs {
    fn load(model: &str) -> Inputs {
        let g = Goldens::load(model);
        let sample = g.get("unet.sample");
        let context = g.get("unet.encoder_hidden_states");
        let timesteps = g.get("unet.timesteps").into_data();
        let added = (model == "sdxl").then(|| (g.get("unet.text_embeds"), g.get("unet.time_ids")));
        Inputs {
            g,
            sample,
            context,
            timesteps,
            added,
        }
    }

    fn added(&self) -> Option<AddedCond<'_>> {
        self.added.as_ref().map(|(t, i)| AddedCond {
            text_embeds: t,
            time_ids: i,
        })
    }

    fn run(&self, u: &UNet2DConditionModel, ex: &Executor, step: usize) -> Tensor {
        u.forward(
            ex,
            &self.sample,
            &[self.timesteps[step]],
            &self.context,
            self.added(),
        )
        .unwrap()
    }
}

#[test]
fn outputs_match_diffusers_at_every_timestep() {
    for model in FIXTURES {
        let u = unet(model);
        assert_eq!(u.needs_added_cond(), model == "sdxl");
        let (dev, store) = store(model);
        u.check_weights(
            names_and_shapes(&store, "unet")
                .iter()
                .map(|(n, s)| (n.as_str(), s.as_slice())),
        )
        .unwrap();
        let ex = Executor::new(dev.clone(), &store, &[u.groups()], ExecConfig::default()).unwrap();
        let inp = Inputs::load(model);
        assert_eq!(inp.timesteps, [1.0, 500.0, 999.0, 321.5]);
        let mut errs = Vec::new();
        for step in 0..inp.timesteps.len() {
            let out = inp.run(&u, &ex, step);
            let want = inp.g.get(&format!("unet.out.{step}"));
            errs.push(check(
                &format!("{model} t={}", inp.timesteps[step]),
                &out,
                &want,
            ));
        }
        eprintln!("{model}: rel errors {errs:?}");
        assert!(ex.races().is_empty(), "{:?}", ex.races());
    }
}

/// A per-item timestep vector gives each item what a shared timestep gives it, and batch 1 gives
/// the same as the matching row of batch 2.
#[test]
fn per_item_timesteps_and_batch_rows_agree() {
    let model = "sdxl";
    let u = unet(model);
    let (dev, store) = store(model);
    let ex = Executor::new(dev, &store, &[u.groups()], ExecConfig::default()).unwrap();
    let inp = Inputs::load(model);
    let (t0, t1) = (inp.timesteps[1], inp.timesteps[3]);
    let (te, ti) = inp.added.as_ref().unwrap();
    let both = u
        .forward(&ex, &inp.sample, &[t0, t1], &inp.context, inp.added())
        .unwrap();
    for (row, t) in [(0, t0), (1, t1)] {
        let one = u
            .forward(
                &ex,
                &inp.sample.narrow(0, row, 1).unwrap(),
                &[t],
                &inp.context.narrow(0, row, 1).unwrap(),
                Some(AddedCond {
                    text_embeds: &te.narrow(0, row, 1).unwrap(),
                    time_ids: &ti.narrow(0, row, 1).unwrap(),
                }),
            )
            .unwrap();
        let want = both.narrow(0, row, 1).unwrap();
        let rel = one.max_abs_diff(&want).unwrap() / want.max_abs();
        assert!(rel <= 1e-5, "row {row}: {rel:e}");
    }
    // Row 1 at t1 must equal the golden computed at t1 for both rows.
    let golden = inp.g.get("unet.out.3").narrow(0, 1, 1).unwrap();
    check(
        "sdxl row 1 t=321.5",
        &both.narrow(0, 1, 1).unwrap(),
        &golden,
    );
}

#[test]
fn offload_modes_and_budgets_are_bit_identical() {
    for model in ["sd15", "sdxl"] {
        let u = unet(model);
        let (dev, store) = store(model);
        let inp = Inputs::load(model);
        let groups = [u.groups()];
        let reference = {
            let ex = Executor::new(dev.clone(), &store, &groups, ExecConfig::default()).unwrap();
            inp.run(&u, &ex, 2)
        };
        check(model, &reference, &inp.g.get("unet.out.2"));
        let reserve = 4096;
        for mode in [
            Mode::None,
            Mode::Model,
            Mode::Sequential,
            Mode::Group { depth: 2 },
            Mode::Auto,
        ] {
            let min = Executor::minimum_budget(&store, &groups, mode, reserve).unwrap();
            let budgets: &[Option<u64>] = match mode {
                Mode::Sequential | Mode::Auto => &[Some(min), Some(min * 3 / 2), None],
                _ => &[Some(min)],
            };
            for &budget in budgets {
                let cfg = ExecConfig {
                    mode,
                    budget,
                    reserve,
                    ..ExecConfig::default()
                };
                let ex = Executor::new(dev.clone(), &store, &groups, cfg).unwrap();
                // Two passes: the second runs from whatever the first left resident.
                for pass in 0..2 {
                    let out = inp.run(&u, &ex, 2);
                    assert!(
                        out == reference,
                        "{model} {mode} budget {budget:?} pass {pass}: output differs"
                    );
                }
                assert!(ex.races().is_empty(), "{:?}", ex.races());
            }
        }
    }
}

#[test]
fn groups_cover_the_checkpoint_in_forward_order() {
    let u = unet("sdxl");
    let g = u.group_prefixes();
    assert_eq!(g[..3], ["time_embedding", "add_embedding", "conv_in"]);
    assert_eq!(g[g.len() - 2..], ["conv_norm_out", "conv_out"]);
    // SDXL's last down block has 2 transformer blocks per attention, each its own group.
    let p = "down_blocks.2.attentions.0";
    let at = g.iter().position(|x| x == &format!("{p}.norm")).unwrap();
    assert_eq!(
        g[at..at + 5],
        [
            format!("{p}.norm"),
            format!("{p}.proj_in"),
            format!("{p}.transformer_blocks.0"),
            format!("{p}.transformer_blocks.1"),
            format!("{p}.proj_out"),
        ]
    );
    assert_eq!(
        g.iter().position(|x| x == "mid_block.resnets.1").unwrap(),
        g.iter()
            .position(|x| x == "mid_block.attentions.0.proj_out")
            .unwrap()
            + 1
    );
    // Every key of the file belongs to exactly the groups listed (Executor::new checks).
    let (dev, store) = store("sdxl");
    Executor::new(dev, &store, &[u.groups()], ExecConfig::default()).unwrap();
}

fn expect_config_error(json: &str, needle: &str) {
    let err = UNetConfig::from_json(json)
        .and_then(UNet2DConditionModel::new)
        .unwrap_err();
    assert!(
        matches!(err, Error::Config(_) | Error::Json { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains(needle), "{needle:?} not in: {err}");
}

#[test]
fn bad_configs_name_the_field() {
    let base = config_json("sd15");
    let with = |from: &str, to: &str| {
        assert!(base.contains(from), "{from}");
        base.replace(from, to)
    };
    expect_config_error(
        &with("\"DownBlock2D\"", "\"SimpleCrossAttnDownBlock2D\""),
        "down_block_types[1]",
    );
    expect_config_error(
        &with("\"CrossAttnUpBlock2D\"", "\"AttnUpBlock2D\""),
        "up_block_types[1]",
    );
    expect_config_error(
        &with(
            "\"UNetMidBlock2DCrossAttn\"",
            "\"UNetMidBlock2DSimpleCrossAttn\"",
        ),
        "mid_block_type",
    );
    expect_config_error(
        &with(
            "\"attention_head_dim\": 2",
            "\"attention_head_dim\": [2, 2, 2]",
        ),
        "attention_head_dim",
    );
    expect_config_error(
        &with("\"attention_head_dim\": 2", "\"attention_head_dim\": 3"),
        "attention_head_dim",
    );
    expect_config_error(
        &with(
            "\"addition_embed_type\": null",
            "\"addition_embed_type\": \"text\"",
        ),
        "addition_embed_type",
    );
    expect_config_error(
        &with(
            "\"resnet_time_scale_shift\": \"default\"",
            "\"resnet_time_scale_shift\": \"scale_shift\"",
        ),
        "resnet_time_scale_shift",
    );
    expect_config_error(
        &with(
            "\"only_cross_attention\": false",
            "\"only_cross_attention\": true",
        ),
        "only_cross_attention",
    );
    expect_config_error(
        &with(
            "\"transformer_layers_per_block\": 1",
            "\"transformer_layers_per_block\": [[1, 1, 1], 1]",
        ),
        "transformer_layers_per_block[0]",
    );
    expect_config_error(
        &with("\"act_fn\": \"silu\"", "\"act_fn\": \"gelu\""),
        "act_fn",
    );
    expect_config_error("{\"block_out_channels\": 5}", "config.json does not parse");
    // SDXL without its added-embedding sizes.
    let xl = config_json("sdxl");
    expect_config_error(
        &xl.replace(
            "\"projection_class_embeddings_input_dim\": 60",
            "\"projection_class_embeddings_input_dim\": null",
        ),
        "projection_class_embeddings_input_dim",
    );
}

#[test]
fn explicit_head_counts_and_defaults() {
    // num_attention_heads (when given) is the head count; attention_head_dim is then unused.
    let base = config_json("sd2");
    let json = base.replace(
        "\"num_attention_heads\": null",
        "\"num_attention_heads\": [2, 4]",
    );
    let json = json.replace(
        "\"attention_head_dim\": [\n    2,\n    4\n  ]",
        "\"attention_head_dim\": 64",
    );
    // Both edits took: the run below must follow the head counts, not a head dim of 64.
    assert!(
        json.contains("\"num_attention_heads\": [2, 4]")
            && json.contains("\"attention_head_dim\": 64")
            && !json.contains("\"num_attention_heads\": null"),
        "{json}"
    );
    let u = UNet2DConditionModel::new(UNetConfig::from_json(&json).unwrap()).unwrap();
    let (dev, store) = store("sd2");
    let ex = Executor::new(dev, &store, &[u.groups()], ExecConfig::default()).unwrap();
    let inp = Inputs::load("sd2");
    check(
        "sd2 via num_attention_heads",
        &inp.run(&u, &ex, 1),
        &inp.g.get("unet.out.1"),
    );
    // An empty config gets diffusers' defaults: SD 1.x's shape.
    let d = UNetConfig::from_json("{}").unwrap();
    assert_eq!(d.block_out_channels, [320, 640, 1280, 1280]);
    let u = UNet2DConditionModel::new(d).unwrap();
    assert!(!u.needs_added_cond());
    assert_eq!(u.size_multiple(), 8);
}

#[test]
fn bad_checkpoints_and_inputs_are_named() {
    let model = "sd15";
    let u = unet(model);
    let (_, full) = store(model);
    let names = names_and_shapes(&full, "unet");
    let list = |skip: &str| -> Vec<(String, Vec<usize>)> {
        names.iter().filter(|(n, _)| n != skip).cloned().collect()
    };
    let check_list = |v: &[(String, Vec<usize>)]| {
        u.check_weights(v.iter().map(|(n, s)| (n.as_str(), s.as_slice())))
    };
    // Missing weight.
    let gone = "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k.weight";
    let err = check_list(&list(gone)).unwrap_err();
    assert!(matches!(err, Error::MissingWeight(_)), "{err:?}");
    assert!(err.to_string().contains(&format!("unet.{gone}")), "{err}");
    // Wrong shape.
    let mut v = list("");
    let bad = "up_blocks.1.resnets.2.conv1.weight";
    let e = v.iter_mut().find(|(n, _)| n == bad).unwrap();
    let want = format!("{:?}", e.1);
    e.1[1] += 1;
    let found = format!("{:?}", e.1);
    let err = check_list(&v).unwrap_err().to_string();
    assert!(
        err.contains(bad) && err.contains(&want) && err.contains(&found),
        "{err}"
    );
    // Unknown key.
    let mut v = list("");
    v.push(("mid_block.attentions.0.extra.weight".into(), vec![1]));
    let err = check_list(&v).unwrap_err().to_string();
    assert!(err.contains("mid_block.attentions.0.extra.weight"), "{err}");

    // The same errors at run time, from the weights the executor pages in.
    let dev = SimDevice::new(SimConfig::default());
    let partial = HostStore::new(dev.clone() as Arc<dyn Device>);
    let file = fixture(&format!("{model}/unet/diffusion_pytorch_model.safetensors"));
    let keep: Vec<String> = names
        .iter()
        .map(|(n, _)| n.clone())
        .filter(|n| n != gone)
        .collect();
    partial
        .load_file(
            &file,
            &LoadOptions {
                names: Some(keep),
                prefix: "unet.".into(),
                ..LoadOptions::default()
            },
        )
        .unwrap();
    let ex = Executor::new(dev, &partial, &[u.groups()], ExecConfig::default()).unwrap();
    let inp = Inputs::load(model);
    let err = u
        .forward(&ex, &inp.sample, &[1.0], &inp.context, None)
        .unwrap_err();
    assert!(matches!(err, Error::MissingWeight(_)), "{err:?}");
    assert!(err.to_string().contains(gone), "{err}");

    // A weight shape that disagrees with the config (sd2's checkpoint under sd15's config: the
    // first transformer has linear projections, not 1×1 convolutions).
    let (dev, store2) = store("sd2");
    let ex = Executor::new(dev, &store2, &[u.groups()], ExecConfig::default()).unwrap();
    let err = u
        .forward(&ex, &inp.sample, &[1.0], &inp.context, None)
        .unwrap_err();
    assert!(matches!(err, Error::WeightShape { .. }), "{err:?}");
    assert!(
        err.to_string()
            .contains("down_blocks.0.attentions.0.proj_in.weight"),
        "{err}"
    );

    // Bad inputs.
    let (dev, st) = store(model);
    let ex = Executor::new(dev, &st, &[u.groups()], ExecConfig::default()).unwrap();
    let empty = Tensor::zeros([2, 4, 0, 8]).unwrap();
    let err = u
        .forward(&ex, &empty, &[1.0], &inp.context, None)
        .unwrap_err();
    assert!(err.to_string().contains("0×8"), "{err}");
    let wrong = Tensor::zeros([2, 3, 4, 8]).unwrap();
    let err = u
        .forward(&ex, &wrong, &[1.0], &inp.context, None)
        .unwrap_err();
    assert!(err.to_string().contains("[b, 4, h, w]"), "{err}");
    let err = u
        .forward(&ex, &inp.sample, &[1.0, 2.0, 3.0], &inp.context, None)
        .unwrap_err();
    assert!(err.to_string().contains("timesteps"), "{err}");
    let xl = unet("sdxl");
    let (dev, st) = store("sdxl");
    let ex = Executor::new(dev, &st, &[xl.groups()], ExecConfig::default()).unwrap();
    let xin = Inputs::load("sdxl");
    let err = xl
        .forward(&ex, &xin.sample, &[1.0], &xin.context, None)
        .unwrap_err();
    assert!(err.to_string().contains("text_embeds"), "{err}");
}

/// Full-size SD 1.5, SD 2.1 and SDXL-base configs build the same modules as diffusers: weight
/// counts and parameter totals as diffusers 0.42.1 reports them for `UNet2DConditionModel(**cfg)`
/// (built on the meta device; `len(state_dict())`, `sum(numel)`).
#[test]
fn full_size_configs_have_diffusers_parameter_counts() {
    let sd15 = r#"{"block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768,
        "attention_head_dim": 8, "layers_per_block": 2, "norm_num_groups": 32}"#;
    let sd21 = r#"{"block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 1024,
        "attention_head_dim": [5, 10, 20, 20], "use_linear_projection": true,
        "upcast_attention": true, "sample_size": 96}"#;
    let sdxl = r#"{"addition_embed_type": "text_time", "addition_time_embed_dim": 256,
        "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
        "cross_attention_dim": 2048,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "projection_class_embeddings_input_dim": 2816, "transformer_layers_per_block": [1, 2, 10],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "use_linear_projection": true, "sample_size": 128}"#;
    for (name, json, tensors, params) in [
        ("sd15", sd15, 686, 859_520_964u64),
        ("sd21", sd21, 686, 865_910_724),
        ("sdxl", sdxl, 1680, 2_567_463_684),
    ] {
        let u = UNet2DConditionModel::new(UNetConfig::from_json(json).unwrap()).unwrap();
        let shapes = u.weight_shapes();
        let total: u64 = shapes
            .iter()
            .map(|(_, s)| s.iter().product::<usize>() as u64)
            .sum();
        assert_eq!((shapes.len(), total), (tensors, params), "{name}");
    }
}
