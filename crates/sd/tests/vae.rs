//! `AutoencoderKL` against diffusers goldens (tests/fixtures/models/{sd15,sd2,sdxl}), offload-mode
//! invariance, and the errors for bad configs and checkpoints.

mod common;

use common::{check, fixture, golden, names_and_shapes, store_with};
use ferry_pager::device::sim::SimDevice;
use ferry_pager::host::{HostStore, LoadOptions};
use ferry_pager::weights::DType as WDType;
use ferry_sched::Mode;
use ferry_sd::error::Error;
use ferry_sd::exec::{ExecConfig, Executor};
use ferry_sd::models::vae::{postprocess, preprocess, Vae, VaeConfig};
use ferry_sd::tensor::Tensor;
use std::sync::Arc;

const FIXTURES: [&str; 3] = ["sd15", "sd2", "sdxl"];

fn vae(model: &str) -> Vae {
    Vae::from_config_file(fixture(&format!("{model}/vae/config.json"))).unwrap()
}

fn store_opts(model: &str, opts: LoadOptions) -> (Arc<SimDevice>, HostStore) {
    store_with(model, "vae", "diffusion_pytorch_model.safetensors", opts)
}

fn store(model: &str) -> (Arc<SimDevice>, HostStore) {
    store_opts(model, LoadOptions::default())
}

fn exec(dev: &Arc<SimDevice>, store: &HostStore, v: &Vae) -> Executor {
    Executor::new(dev.clone(), store, &[v.groups()], ExecConfig::default()).unwrap()
}

#[test]
fn decode_and_encode_match_diffusers() {
    for model in FIXTURES {
        let v = vae(model);
        let (dev, store) = store(model);
        v.check_weights(
            names_and_shapes(&store, "vae")
                .iter()
                .map(|(n, s)| (n.as_str(), s.as_slice())),
        )
        .unwrap();
        let ex = exec(&dev, &store, &v);
        let out = v.decode(&ex, &golden(model, "vae.decode.latents")).unwrap();
        let e1 = check(
            &format!("{model} decode"),
            &out,
            &golden(model, "vae.decode.sample"),
        );
        let (mean, std) = v.encode(&ex, &golden(model, "vae.encode.image")).unwrap();
        let e2 = check(
            &format!("{model} encode mean"),
            &mean,
            &golden(model, "vae.encode.mean"),
        );
        let e3 = check(
            &format!("{model} encode std"),
            &std,
            &golden(model, "vae.encode.std"),
        );
        eprintln!("{model}: decode {e1:.2e}, mean {e2:.2e}, std {e3:.2e} (x max|ref|)");
        assert!(ex.races().is_empty(), "{:?}", ex.races());
    }
}

/// The pipeline's last step: `pipe.euler.image` = postprocess(decode(latents / scaling)), NHWC.
#[test]
fn pipeline_image_from_final_latents() {
    for model in FIXTURES {
        let v = vae(model);
        assert_eq!(v.force_upcast(), model == "sdxl");
        let (dev, store) = store(model);
        let ex = exec(&dev, &store, &v);
        let z = v.unscale_latents(&golden(model, "pipe.euler.latents"));
        let img = postprocess(&v.decode(&ex, &z).unwrap())
            .permute(&[0, 2, 3, 1])
            .unwrap();
        check(
            &format!("{model} pipe.euler.image"),
            &img,
            &golden(model, "pipe.euler.image"),
        );
        assert!(img.data().iter().all(|x| (0.0..=1.0).contains(x)));
    }
}

/// Batch 2 gives each item what batch 1 gives it; the scaling helpers round-trip.
#[test]
fn batch_of_two_and_scaling_helpers() {
    let model = "sd2";
    let v = vae(model);
    let (dev, store) = store(model);
    let ex = exec(&dev, &store, &v);
    let a = golden(model, "vae.decode.latents");
    let b = golden(model, "pipe.ddim.latents");
    let one_a = v.decode(&ex, &a).unwrap();
    let one_b = v.decode(&ex, &b).unwrap();
    let two = v
        .decode(&ex, &Tensor::concat(&[&a, &b], 0).unwrap())
        .unwrap();
    assert_eq!(two.shape(), &[2, 3, 32, 64]);
    check("batch item 0", &two.narrow(0, 0, 1).unwrap(), &one_a);
    check("batch item 1", &two.narrow(0, 1, 1).unwrap(), &one_b);
    check(
        "batch item 0 vs golden",
        &two.narrow(0, 0, 1).unwrap(),
        &golden(model, "vae.decode.sample"),
    );

    let img = golden(model, "vae.encode.image");
    let (m2, s2) = v
        .encode(&ex, &Tensor::concat(&[&img, &img], 0).unwrap())
        .unwrap();
    let (m1, _) = v.encode(&ex, &img).unwrap();
    assert_eq!(m2.shape(), &[2, 4, 4, 8]);
    check("encode batch item 1", &m2.narrow(0, 1, 1).unwrap(), &m1);
    check(
        "encode batch std",
        &s2.narrow(0, 1, 1).unwrap(),
        &golden(model, "vae.encode.std"),
    );

    let scaled = v.scale_latents(&m1);
    let back = v.unscale_latents(&scaled);
    assert!(back.max_abs_diff(&m1).unwrap() <= 1e-6 * m1.max_abs());
    assert!((scaled.data()[0] - m1.data()[0] * 0.18215).abs() <= 1e-6);
    let pre = preprocess(&postprocess(&img));
    assert!(pre.max_abs_diff(&img).unwrap() <= 1e-6);
    assert_eq!(v.scale_factor(), 8);
}

/// Every offload mode at the minimum budget and fully resident gives the same bits.
#[test]
fn offload_modes_are_bit_identical() {
    let model = "sdxl";
    let v = vae(model);
    let (dev, store) = store(model);
    let z = golden(model, "vae.decode.latents");
    let img = golden(model, "vae.encode.image");
    let reference = {
        let ex = exec(&dev, &store, &v);
        (v.decode(&ex, &z).unwrap(), v.encode(&ex, &img).unwrap().0)
    };
    let reserve = 4096;
    let groups = [v.groups()];
    for mode in [
        Mode::None,
        Mode::Model,
        Mode::Sequential,
        Mode::Group { depth: 2 },
        Mode::Auto,
    ] {
        let min = Executor::minimum_budget(&store, &groups, mode, reserve).unwrap();
        for budget in [Some(min), None] {
            let cfg = ExecConfig {
                mode,
                budget,
                reserve,
                ..ExecConfig::default()
            };
            let ex = Executor::new(dev.clone(), &store, &groups, cfg).unwrap();
            let d = v.decode(&ex, &z).unwrap();
            assert!(d == reference.0, "{mode} budget {budget:?}: decode differs");
            // Encode only in the tightest setting: it pages the most.
            if budget.is_some() {
                let (m, _) = v.encode(&ex, &img).unwrap();
                assert!(m == reference.1, "{mode} budget {budget:?}: encode differs");
            }
            assert!(ex.races().is_empty(), "{mode}: {:?}", ex.races());
        }
    }
}

#[test]
fn config_defaults_and_errors() {
    let c = VaeConfig::from_json(r#"{"unknown_key": 1, "sample_size": [32, 64]}"#).unwrap();
    assert_eq!(
        c,
        VaeConfig {
            sample_size: serde_json::json!([32, 64]),
            ..VaeConfig::default()
        }
    );
    assert!(c.force_upcast && c.use_quant_conv && c.shift_factor.is_none());
    let v = Vae::new(c).unwrap();
    // One level: no downsampler, no upsampler; 1 + 1 resnets in the decoder.
    let g = v.groups().groups;
    assert!(!g.iter().any(|p| p.contains("samplers")), "{g:?}");
    assert!(g.contains(&"decoder.up_blocks.0.resnets.1".to_string()));
    assert!(!g.contains(&"decoder.up_blocks.0.resnets.2".to_string()));

    let base = std::fs::read_to_string(fixture("sd15/vae/config.json")).unwrap();
    let edit = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut j: serde_json::Value = serde_json::from_str(&base).unwrap();
        f(&mut j);
        VaeConfig::from_json(&j.to_string()).and_then(Vae::new)
    };
    let err = |r: Result<Vae, Error>| r.unwrap_err().to_string();
    let e = err(edit(&|j| {
        j["down_block_types"][1] = "AttnDownEncoderBlock2D".into()
    }));
    assert!(
        e.contains("down_block_types[1]") && e.contains("AttnDownEncoderBlock2D"),
        "{e}"
    );
    let e = err(edit(&|j| j["up_block_types"][3] = "UpBlock2D".into()));
    assert!(
        e.contains("up_block_types[3]") && e.contains("UpBlock2D"),
        "{e}"
    );
    let e = err(edit(&|j| {
        j["up_block_types"].as_array_mut().unwrap().pop();
    }));
    assert!(e.contains("up_block_types") && e.contains("found 3"), "{e}");
    let e = err(edit(&|j| j["act_fn"] = "gelu".into()));
    assert!(e.contains("act_fn") && e.contains("gelu"), "{e}");
    let e = err(edit(&|j| j["norm_num_groups"] = 3.into()));
    assert!(e.contains("norm_num_groups") && e.contains('3'), "{e}");
    // A config file that cannot be read is an I/O error with its path, not a config error.
    let missing = fixture("sd15/vae/no-such-config.json");
    match VaeConfig::from_file(&missing) {
        Err(Error::Io { path, source }) => {
            assert_eq!(path, missing);
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("{other:?}"),
    }
    let r = edit(&|j| j["block_out_channels"] = "wide".into());
    assert!(matches!(r, Err(Error::Json { .. })), "{:?}", r.err());
    let e = err(r);
    assert!(
        e.contains("VAE config.json does not parse") && e.contains("line"),
        "{e}"
    );

    // No mid-block attention: its group is gone, and the checkpoint's attention weights are
    // then unknown keys.
    let v = edit(&|j| j["mid_block_add_attention"] = false.into()).unwrap();
    assert!(!v.groups().groups.iter().any(|p| p.contains("attentions")));
    let (dev, store) = store("sd15");
    let e = v
        .check_weights(
            names_and_shapes(&store, "vae")
                .iter()
                .map(|(n, s)| (n.as_str(), s.as_slice())),
        )
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("mid_block.attentions.0") && e.contains("unknown key"),
        "{e}"
    );
    drop(dev);
}

#[test]
fn missing_wrong_shaped_and_unknown_weights_are_named() {
    let model = "sd15";
    let v = vae(model);
    let all = {
        let (_, s) = store(model);
        names_and_shapes(&s, "vae")
    };
    let missing = "decoder.up_blocks.1.resnets.2.conv2.weight";

    // Missing: the executor builds, decode names the weight; check_weights names it too.
    let names: Vec<String> = all
        .iter()
        .map(|(n, _)| n.clone())
        .filter(|n| n != missing)
        .collect();
    let (dev, st) = store_opts(
        model,
        LoadOptions {
            names: Some(names),
            ..LoadOptions::default()
        },
    );
    let e = v
        .check_weights(
            names_and_shapes(&st, "vae")
                .iter()
                .map(|(n, s)| (n.as_str(), s.as_slice())),
        )
        .unwrap_err();
    assert!(matches!(e, Error::MissingWeight(_)), "{e}");
    assert!(e.to_string().contains(&format!("vae.{missing}")), "{e}");
    let ex = exec(&dev, &st, &v);
    let e = v
        .decode(&ex, &golden(model, "vae.decode.latents"))
        .unwrap_err()
        .to_string();
    assert!(e.contains(&format!("vae.{missing}")), "{e}");

    // Wrong shape: a conv weight with its in/out swapped (same element count).
    let bad = "decoder.up_blocks.3.resnets.0.conv1.weight"; // [8, 16, 3, 3]
    let names: Vec<String> = all
        .iter()
        .map(|(n, _)| n.clone())
        .filter(|n| n != bad)
        .collect();
    let (dev, st) = store_opts(
        model,
        LoadOptions {
            names: Some(names),
            ..LoadOptions::default()
        },
    );
    st.register_bytes(
        &format!("vae.{bad}"),
        WDType::F32,
        &[16, 8, 3, 3],
        &vec![0u8; 16 * 8 * 9 * 4],
    )
    .unwrap();
    let e = v
        .check_weights(
            names_and_shapes(&st, "vae")
                .iter()
                .map(|(n, s)| (n.as_str(), s.as_slice())),
        )
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(bad) && e.contains("[8, 16, 3, 3]") && e.contains("[16, 8, 3, 3]"),
        "{e}"
    );
    let ex = exec(&dev, &st, &v);
    let e = v
        .decode(&ex, &golden(model, "vae.decode.latents"))
        .unwrap_err();
    assert!(matches!(e, Error::WeightShape { .. }), "{e}");
    assert!(e.to_string().contains(&format!("vae.{bad}")), "{e}");

    // Unknown keys: outside every group the executor rejects it; inside the catch-all
    // `decoder` group check_weights does.
    let (dev, st) = store(model);
    st.register_bytes("vae.decoder.extra.weight", WDType::F32, &[1], &[0u8; 4])
        .unwrap();
    let e = v
        .check_weights(
            names_and_shapes(&st, "vae")
                .iter()
                .map(|(n, s)| (n.as_str(), s.as_slice())),
        )
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("vae.decoder.extra.weight") && e.contains("unknown"),
        "{e}"
    );
    st.register_bytes("vae.bogus.weight", WDType::F32, &[1], &[0u8; 4])
        .unwrap();
    let e = Executor::new(dev, &st, &[v.groups()], ExecConfig::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("vae.bogus.weight"), "{e}");
}

#[test]
fn bad_inputs_are_rejected() {
    let model = "sd15";
    let v = vae(model);
    let (dev, store) = store(model);
    let ex = exec(&dev, &store, &v);
    let e = v
        .decode(&ex, &Tensor::zeros([1, 3, 4, 4]).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("[n, 4, h, w]") && e.contains("[1, 3, 4, 4]"),
        "{e}"
    );
    let e = v
        .encode(&ex, &Tensor::zeros([3, 32, 32]).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("[n, 3, h, w]") && e.contains("[3, 32, 32]"),
        "{e}"
    );
}
