//! Fault injection on the simulated device under the host store and the pager: every device call
//! of a short run (pinned allocations while loading, the arena, copies, events, waits, kernel
//! launches) is made to fail in turn. Each failure must come back as an `Err` naming the injected
//! fault, with no panic and no wrong bytes; once the store and pager are dropped nothing may be
//! left on the device; and the same device must then reproduce the clean run.

use ferry_pager::device::sim::{FaultOp, FaultPlan, KernelSpec, SimConfig, SimDevice};
use ferry_pager::host::{HostStore, LoadOptions, RawTensor};
use ferry_pager::weights::DType;
use ferry_pager::{Device, Pager, Policy, StreamId};
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn fixture() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/dtypes.safetensors")
}

/// Loads the fixture twice (as stored, and converted to F32) and registers generated tensors.
fn load(dev: &Arc<SimDevice>) -> ferry_pager::Result<HostStore> {
    let store = HostStore::with_max_chunk(dev.clone() as Arc<dyn Device>, 4096);
    store.load_file(fixture(), &LoadOptions::default())?;
    store.load_file(
        fixture(),
        &LoadOptions {
            prefix: "f32.".into(),
            convert_to: Some(DType::F32),
            ..LoadOptions::default()
        },
    )?;
    let data: Vec<Vec<u8>> = (0..6u8)
        .map(|i| {
            (0..1000 + 300 * i as usize)
                .map(|j| (j as u8) ^ i)
                .collect()
        })
        .collect();
    let names: Vec<String> = (0..6).map(|i| format!("g{i}")).collect();
    let shapes: Vec<[usize; 1]> = data.iter().map(|d| [d.len() / 4]).collect();
    let raws: Vec<RawTensor<'_>> = (0..6)
        .map(|i| RawTensor {
            name: &names[i],
            dtype: DType::I32,
            shape: &shapes[i],
            data: &data[i],
        })
        .collect();
    store.register_batch(&raws)?;
    Ok(store)
}

/// Two passes over six groups with an arena that holds about two: every acquire is read by a
/// kernel. Returns what the kernels saw.
fn run(dev: &Arc<SimDevice>, streams: (StreamId, StreamId)) -> ferry_pager::Result<Vec<Vec<u8>>> {
    let (compute, copy) = streams;
    let store = Arc::new(load(dev)?);
    let pager = Pager::new(
        dev.clone() as Arc<dyn Device>,
        store.clone(),
        4096,
        Policy::Lru,
    )?;
    let mut groups = Vec::new();
    for i in 0..6 {
        let id = store.id(&format!("g{i}")).ok_or_else(|| {
            ferry_pager::Error::InvalidArgument(format!("g{i} is not registered"))
        })?;
        groups.push(pager.define_group(&format!("group{i}"), &[id])?);
    }
    let seen = Arc::new(Mutex::new(Vec::new()));
    for _ in 0..2 {
        for &g in &groups {
            let view = pager.acquire(g, compute, copy)?;
            let r = view.extent();
            let range = view.range(0).unwrap_or(r);
            let out = seen.clone();
            let launched = dev.launch(
                compute,
                KernelSpec::new("read", Duration::from_micros(5)).reads(range),
                move |mem| {
                    let bytes = mem.read(range)?;
                    if let Ok(mut s) = out.lock() {
                        s.push(bytes);
                    }
                    Ok(())
                },
            );
            let released = pager.release(g, compute);
            launched?;
            released?;
        }
    }
    dev.sync_stream(compute)?;
    dev.sync_stream(copy)?;
    drop(pager);
    let v = seen.lock().map(|s| s.clone()).unwrap_or_default();
    Ok(v)
}

#[test]
fn every_injected_fault_is_an_error_without_leaks() {
    let dev = SimDevice::new(SimConfig::default());
    let streams = (dev.create_stream().unwrap(), dev.create_stream().unwrap());
    let base = dev.resources().held();
    dev.set_fault_plan(FaultPlan::none());
    let clean = run(&dev, streams).unwrap();
    assert_eq!(clean.len(), 12);
    let counts = dev.fault_counts();
    assert_eq!(dev.resources().held(), base);
    let mut tried = 0;
    for op in FaultOp::ALL {
        for k in 0..counts.get(op) {
            dev.set_fault_plan(FaultPlan::nth(op, k));
            let r = run(&dev, streams);
            let injected = dev.fault_counts().injected;
            dev.set_fault_plan(FaultPlan::none());
            assert_eq!(injected, 1, "{op} #{k} not reached");
            match r {
                Err(e) => assert!(
                    e.to_string().contains("injected fault"),
                    "{op} #{k}: unclear error: {e}"
                ),
                Ok(_) => panic!("{op} #{k} was swallowed"),
            }
            // Pending copies and kernels finish; nothing stays allocated.
            dev.sync_stream(streams.0).unwrap();
            dev.sync_stream(streams.1).unwrap();
            assert_eq!(dev.resources().held(), base, "{op} #{k}: leaked");
            assert_eq!(run(&dev, streams).unwrap(), clean, "after {op} #{k}");
            tried += 1;
        }
    }
    assert!(tried > 30, "only {tried} faults");
    assert!(dev.races().is_empty(), "{:?}", dev.races());
}

#[test]
fn destroyed_handles_are_refused_and_not_counted() {
    let dev = SimDevice::new(SimConfig::default());
    let s = dev.create_stream().unwrap();
    let e = dev.create_event().unwrap();
    assert_eq!((dev.resources().streams, dev.resources().events), (1, 1));
    dev.destroy_event(e).unwrap();
    dev.destroy_stream(s).unwrap();
    assert_eq!((dev.resources().streams, dev.resources().events), (0, 0));
    assert!(matches!(
        dev.record_event(e, s),
        Err(ferry_pager::Error::InvalidHandle(_))
    ));
    assert!(dev.destroy_event(e).is_err());
}

#[test]
fn a_kernel_error_keeps_its_source_and_is_reported_once() {
    let dev = SimDevice::new(SimConfig::default());
    let s = dev.create_stream().unwrap();
    dev.launch(s, KernelSpec::new("bad", Duration::from_micros(1)), |_| {
        Err(ferry_pager::Error::OutOfBounds("inner".into()))
    })
    .unwrap();
    let e = dev.sync_stream(s).unwrap_err();
    let ferry_pager::Error::Deferred(k) = &e else {
        panic!("expected a deferred error, got {e:?}");
    };
    let ferry_pager::Error::Kernel { name, source } = &**k else {
        panic!("expected a kernel error, got {k:?}");
    };
    assert_eq!(name, "bad");
    assert!(matches!(**source, ferry_pager::Error::OutOfBounds(_)));
    assert!(std::error::Error::source(&e).is_some());
    dev.sync_stream(s).unwrap();
}

#[test]
fn a_failed_in_place_registration_leaves_nothing_registered() {
    let dev = SimDevice::new(SimConfig::default());
    dev.set_fault_plan(FaultPlan::nth(FaultOp::AllocHost, 0));
    let store = HostStore::new(dev.clone() as Arc<dyn Device>);
    let e = store
        .load_file_in_place(fixture(), &LoadOptions::default())
        .unwrap_err();
    assert!(
        matches!(
            e,
            ferry_pager::Error::Injected {
                op: "alloc_host",
                index: 0
            }
        ),
        "{e}"
    );
    assert_eq!((store.len(), store.registration_count()), (0, 0));
    // The same store registers the file once the device works.
    let ids = store
        .load_file_in_place(fixture(), &LoadOptions::default())
        .unwrap();
    assert!(!ids.is_empty());
    assert_eq!(dev.resources().registrations, 1);
    drop(store);
    assert_eq!(dev.resources(), Default::default());
}
