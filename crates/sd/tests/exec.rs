//! The executor hands every layer exactly the bytes in the checkpoint, in every offload mode and at
//! every budget, with the race checker clean.

mod common;

use common::fixture;
use ferry_pager::device::sim::{SimConfig, SimDevice};
use ferry_pager::host::{HostStore, LoadOptions};
use ferry_pager::Device;
use ferry_sched::Mode;
use ferry_sd::exec::{ComponentGroups, ExecConfig, Executor};
use ferry_sd::tensor::{DType, Tensor};
use std::sync::Arc;

fn groups() -> Vec<ComponentGroups> {
    vec![ComponentGroups {
        component: "text_encoder".into(),
        groups: vec![
            "embeddings".into(),
            "encoder.layers.0".into(),
            "encoder.layers.1".into(),
            "final_layer_norm".into(),
        ],
    }]
}

fn source(store: &HostStore, name: &str) -> Tensor {
    let id = store.id(name).unwrap();
    let t = store.tensor(id).unwrap();
    Tensor::from_bytes(&store.read(id).unwrap(), DType::F16, t.shape).unwrap()
}

#[test]
fn every_mode_and_budget_sees_the_checkpoint_bytes() {
    let dev = SimDevice::new(SimConfig::default());
    let store = HostStore::new(dev.clone() as Arc<dyn Device>);
    store
        .load_file(
            fixture("sd15/text_encoder/model.safetensors"),
            &LoadOptions {
                prefix: "text_encoder.".into(),
                ..LoadOptions::default()
            },
        )
        .unwrap();
    let keys = [
        ("embeddings", "token_embedding.weight"),
        ("encoder.layers.1", "mlp.fc1.weight"),
        ("final_layer_norm", "bias"),
    ];
    let reserve = 4096;
    for mode in [
        Mode::None,
        Mode::Model,
        Mode::Sequential,
        Mode::Group { depth: 1 },
        Mode::Auto,
    ] {
        let min = Executor::minimum_budget(&store, &groups(), mode, reserve).unwrap();
        for budget in [min, min * 2] {
            let cfg = ExecConfig {
                mode,
                budget: Some(budget),
                reserve,
                ..ExecConfig::default()
            };
            let exec = Executor::new(dev.clone(), &store, &groups(), cfg).unwrap();
            for pass in 0..2 {
                for (g, k) in keys {
                    let w = exec.group("text_encoder", g).unwrap();
                    let want = source(&store, &format!("text_encoder.{g}.{k}"));
                    assert!(
                        w.get(k).unwrap() == &want,
                        "{mode} budget {budget} pass {pass}: {g}.{k} differs"
                    );
                }
            }
            assert!(exec.races().is_empty(), "{:?}", exec.races());
        }
        let too_small = ExecConfig {
            mode,
            budget: Some(min - 1),
            reserve,
            ..ExecConfig::default()
        };
        let err = Executor::new(dev.clone(), &store, &groups(), too_small).unwrap_err();
        assert!(err.to_string().contains(&min.to_string()), "{err}");
    }
}

#[test]
fn missing_weights_and_unknown_keys_are_named() {
    let dev = SimDevice::new(SimConfig::default());
    let store = HostStore::new(dev.clone() as Arc<dyn Device>);
    store
        .load_file(
            fixture("sd15/text_encoder/model.safetensors"),
            &LoadOptions {
                prefix: "text_encoder.".into(),
                ..LoadOptions::default()
            },
        )
        .unwrap();
    let exec = Executor::new(dev.clone(), &store, &groups(), ExecConfig::default()).unwrap();
    let w = exec.group("text_encoder", "encoder.layers.0").unwrap();
    let err = w.get("no_such.weight").unwrap_err().to_string();
    assert!(
        err.contains("text_encoder.encoder.layers.0.no_such.weight"),
        "{err}"
    );
    let err = w
        .get_shaped("mlp.fc1.weight", &[8, 32])
        .unwrap_err()
        .to_string();
    assert!(err.contains("[32, 8]") && err.contains("[8, 32]"), "{err}");
    drop(w);
    let partial = vec![ComponentGroups {
        component: "text_encoder".into(),
        groups: vec!["embeddings".into()],
    }];
    let err = Executor::new(dev, &store, &partial, ExecConfig::default()).unwrap_err();
    assert!(err.to_string().contains("encoder.layers"), "{err}");
}
