//! Fault injection through the whole pipeline on the tiny SD 1.5 fixture: every device call that
//! loading and one 2-step generation make (allocations, streams, events, syncs, copies, kernel
//! launches) is made to fail in turn. Each failure must be an `Err` whose chain names the injected
//! fault, never a panic or wrong output; nothing may stay allocated on the device once the
//! pipeline is dropped; and the same device (and the same pipeline, for a failed generation)
//! must then produce the clean run's output bit for bit.
//!
//! The soak test generates repeatedly on one pipeline with flat device memory, events and streams
//! (`FERRY_SOAK=1`: many more steps). By default a sample of each kind's calls is failed (the
//! first, the last and a few between) and recovery is re-checked after every other one;
//! `FERRY_FAULTS_FULL=1` fails every call and re-checks after each (a few minutes).

mod common;

use common::fixture;
use ferry_pager::device::sim::{FaultOp, FaultPlan, SimConfig, SimDevice, SimResources};
use ferry_sched::Mode;
use ferry_sd::pipeline::{GenerateParams, Generated, LoadConfig, Pipeline};
use std::sync::Arc;

const RESERVE: u64 = 1 << 20;

fn params(steps: usize) -> GenerateParams {
    GenerateParams {
        prompt: "a lighthouse at dusk".into(),
        negative_prompt: Some("blurry".into()),
        steps,
        scheduler: Some("euler".into()),
        seed: 7,
        ..GenerateParams::default()
    }
}

/// A budget at the minimum of a streaming mode, so that UNet layers go through the staging ring.
fn config() -> LoadConfig {
    let probe = Pipeline::load(&fixture("sd15"), LoadConfig::default()).unwrap();
    let mode = Mode::Group { depth: 2 };
    let budget = probe.minimum_budget(mode, RESERVE).unwrap();
    LoadConfig {
        mode: Some(mode),
        budget: Some(budget),
        reserve: RESERVE,
        ..LoadConfig::default()
    }
}

/// A device with room for the streaming budget and for everything resident (the budget, not
/// the capacity, bounds what a pipeline allocates; checked in the soak test).
fn device() -> Arc<SimDevice> {
    SimDevice::new(SimConfig {
        capacity: 1 << 30,
        ..SimConfig::default()
    })
}

/// The error and all its sources, one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn same(a: &Generated, b: &Generated) -> bool {
    let bits =
        |t: &ferry_sd::tensor::Tensor| t.data().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    bits(&a.latents) == bits(&b.latents) && bits(&a.images) == bits(&b.images)
}

/// Which of `n` calls to fail: all of them with `full`, else the first, the last and a few
/// spread between (a full run takes minutes).
fn indices(n: u64, full: bool) -> Vec<u64> {
    if full || n <= 6 {
        return (0..n).collect();
    }
    let mut v = vec![0, 1, n / 3, n / 2, 2 * n / 3, n - 1];
    v.dedup();
    v
}

fn empty() -> SimResources {
    SimResources::default()
}

#[test]
fn every_injected_fault_in_load_and_generate_is_an_error_without_leaks() {
    let cfg = config();
    let dev = device();
    let model = fixture("sd15");
    let p = params(2);

    // Clean: count the calls of loading, then of one generation.
    dev.set_fault_plan(FaultPlan::none());
    let pipe = Pipeline::load_on_sim(&model, cfg, dev.clone()).unwrap();
    let clean = pipe.generate(&p, |_, _| {}).unwrap();
    // Count on a second generation: the first one also fills the scheduler's event pool.
    dev.set_fault_plan(FaultPlan::none());
    let second = pipe.generate(&p, |_, _| {}).unwrap();
    assert!(same(&second, &clean));
    let gen_counts = dev.fault_counts();
    assert!(gen_counts.get(FaultOp::Copy) > 0 && gen_counts.get(FaultOp::Launch) > 0);

    // Faults during generation: the same pipeline must recover and give the clean output.
    let (mut gen_faults, mut unreached) = (0, 0);
    let full = std::env::var_os("FERRY_FAULTS_FULL").is_some();
    for op in FaultOp::ALL {
        for k in indices(gen_counts.get(op), full) {
            dev.set_fault_plan(FaultPlan::nth(op, k));
            let r = pipe.generate(&p, |_, _| {});
            let injected = dev.fault_counts().injected;
            dev.set_fault_plan(FaultPlan::none());
            if injected == 0 {
                // A run after a recovery may need fewer calls of a kind (e.g. events).
                unreached += 1;
                continue;
            }
            match r {
                Err(e) => assert!(
                    chain(&e).contains("injected fault"),
                    "generate: {op} #{k}: unclear error: {}",
                    chain(&e)
                ),
                Ok(out) => panic!(
                    "generate: {op} #{k} was swallowed (output {} the clean one)",
                    if same(&out, &clean) {
                        "equals"
                    } else {
                        "differs from"
                    }
                ),
            }
            if full || gen_faults % 2 == 0 {
                let again = pipe.generate(&p, |_, _| {}).unwrap();
                assert!(
                    same(&again, &clean),
                    "generate after {op} #{k}: output differs"
                );
            }
            gen_faults += 1;
        }
    }
    assert!(
        unreached * 10 <= gen_faults,
        "{unreached} faults not reached"
    );
    assert!(pipe.races().is_empty(), "{:?}", pipe.races());
    drop(pipe);
    assert_eq!(
        dev.resources(),
        empty(),
        "leaked after the generation faults"
    );

    // Faults during loading, streaming and with everything resident (the residents' copies):
    // an error, nothing left behind, and the device loads again.
    let resident = LoadConfig {
        reserve: RESERVE,
        ..LoadConfig::default()
    };
    let mut load_faults = 0;
    for cfg in [cfg, resident] {
        dev.set_fault_plan(FaultPlan::none());
        let loaded = Pipeline::load_on_sim(&model, cfg, dev.clone()).unwrap();
        let load_counts = dev.fault_counts();
        drop(loaded);
        for op in FaultOp::ALL {
            for k in indices(load_counts.get(op), full) {
                dev.set_fault_plan(FaultPlan::nth(op, k));
                let r = Pipeline::load_on_sim(&model, cfg, dev.clone());
                let injected = dev.fault_counts().injected;
                dev.set_fault_plan(FaultPlan::none());
                assert_eq!(injected, 1, "load: {op} #{k} not reached");
                match r {
                    Err(e) => assert!(
                        chain(&e).contains("injected fault"),
                        "load: {op} #{k}: unclear error: {}",
                        chain(&e)
                    ),
                    Ok(_) => panic!("load: {op} #{k} was swallowed"),
                }
                assert_eq!(dev.resources(), empty(), "load: {op} #{k}: leaked");
                load_faults += 1;
                if full || load_faults % 5 == 1 {
                    let pipe = Pipeline::load_on_sim(&model, cfg, dev.clone()).unwrap();
                    let out = pipe.generate(&p, |_, _| {}).unwrap();
                    assert!(same(&out, &clean), "load after {op} #{k}: output differs");
                    drop(pipe);
                    assert_eq!(dev.resources(), empty());
                }
            }
        }
    }
    eprintln!(
        "{gen_faults} generation faults ({unreached} not reached), {load_faults} load faults"
    );
    assert!(dev.races().is_empty(), "{:?}", dev.races());
}

#[test]
fn soak_generations_keep_device_memory_events_and_streams_flat() {
    let cfg = config();
    let dev = device();
    let rounds = if std::env::var_os("FERRY_SOAK").is_some() {
        25
    } else {
        3
    };
    let p = params(4);
    let pipe = Pipeline::load_on_sim(&fixture("sd15"), cfg, dev.clone()).unwrap();
    let first = pipe.generate(&p, |_, _| {}).unwrap();
    let after_first = dev.resources();
    for i in 0..rounds {
        let out = pipe.generate(&p, |_, _| {}).unwrap();
        assert!(same(&out, &first), "round {i}: output differs");
        assert_eq!(dev.resources(), after_first, "round {i}: resources grew");
        assert!(dev.device_bytes_peak() <= cfg.budget.unwrap_or(0));
    }
    assert!(pipe.races().is_empty());
    drop(pipe);
    assert_eq!(dev.resources(), empty());
}
