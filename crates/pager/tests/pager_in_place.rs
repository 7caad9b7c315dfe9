//! Registering a weights file in place (no copy into pinned memory): a pager run from it reads the
//! same device bytes as one from the copy path, the registration is read-only, it is unregistered
//! on drop, and what it cannot do (convert dtypes, run on a device without the capability) is a
//! clear error that leaves nothing behind.
//!
//! Not tested: truncating the file while it is registered. The mapping then faults (SIGBUS) on
//! the first access past the new end, which kills the process; like every mmap user, the store
//! documents that the file must not change while it is registered.

mod pager_support;

use ferry_pager::device::sim::SimDevice;
use ferry_pager::host::{HostStore, LoadOptions, TensorId};
use ferry_pager::residency::{Pager, Policy};
use ferry_pager::weights::WeightsFile;
use ferry_pager::{DType, Device, Error};
use pager_support::{bytes, fixture, read_on, sim, write_safetensors, Counting};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Layer-like tensors whose sizes are mostly not multiples of 256, so their offsets in the file
/// are unaligned: (name, shape) per tensor, F16, `n` layers of weight + bias + norm.
fn write_model(path: &Path, n: usize) -> Vec<Vec<String>> {
    let mut ts = Vec::new();
    let mut layers = Vec::new();
    for l in 0..n {
        let (o, i) = (24 + l, 17);
        let names = [
            format!("l{l}.bias"),
            format!("l{l}.norm"),
            format!("l{l}.weight"),
        ];
        let shapes = [vec![o], vec![7], vec![o, i]];
        for (k, (name, shape)) in names.iter().zip(&shapes).enumerate() {
            let len = shape.iter().product::<usize>() * 2;
            ts.push((
                name.clone(),
                "F16",
                shape.clone(),
                bytes((l * 3 + k) as u64, len),
            ));
        }
        layers.push(names.to_vec());
    }
    // One big aligned-size tensor too (640 x 128 F16 = 160 KiB).
    ts.push((
        "z.big".into(),
        "F16",
        vec![640, 128],
        bytes(999, 640 * 128 * 2),
    ));
    layers.push(vec!["z.big".into()]);
    let refs: Vec<_> = ts
        .iter()
        .map(|(n, d, s, v)| (n.as_str(), *d, s.clone(), v.clone()))
        .collect();
    write_safetensors(path, &refs);
    layers
}

/// Cycles through every layer `rounds` times under a budget that forces eviction; returns what a
/// kernel read for each use (in use order), after checking the simulator saw no race.
fn run_pager(
    dev: &Arc<SimDevice>,
    store: Arc<HostStore>,
    layers: &[Vec<String>],
    budget: u64,
    rounds: usize,
) -> (Vec<Vec<Vec<u8>>>, ferry_pager::PagerStats) {
    let pager = Pager::new(dev.clone(), store.clone(), budget, Policy::Lru).unwrap();
    let groups: Vec<_> = layers
        .iter()
        .enumerate()
        .map(|(i, names)| {
            let ids: Vec<TensorId> = names.iter().map(|n| store.id(n).unwrap()).collect();
            pager.define_group(&format!("g{i}"), &ids).unwrap()
        })
        .collect();
    let compute = dev.create_stream().unwrap();
    let copy = dev.create_stream().unwrap();
    let mut slots = Vec::new();
    for _ in 0..rounds {
        for &g in &groups {
            let view = pager.acquire(g, compute, copy).unwrap();
            for r in view.ranges() {
                assert_eq!(r.ptr.0 % 256, 0, "tensor at {r} is not 256-aligned");
            }
            slots.push(read_on(dev, compute, view.ranges()));
            pager.release(g, compute).unwrap();
        }
    }
    dev.sync_stream(compute).unwrap();
    dev.sync_stream(copy).unwrap();
    assert!(dev.races().is_empty(), "races: {:#?}", dev.races());
    let seen = slots
        .into_iter()
        .map(|s| std::mem::take(&mut *s.lock().unwrap()))
        .collect();
    (seen, pager.stats())
}

#[test]
fn pager_run_from_a_registered_file_reads_the_same_bytes_as_the_copy_path() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.safetensors");
    let layers = write_model(&p, 6);
    let file = WeightsFile::open(&p).unwrap();
    let unaligned = file
        .tensors()
        .iter()
        .map(|t| file.data_start() + t.offset as u64)
        .filter(|at| at.next_multiple_of(256) != *at)
        .count();
    assert!(unaligned > 10, "the file should have unaligned tensors");

    let copy_dev = sim(1 << 30);
    let copied = Arc::new(HostStore::new(copy_dev.clone()));
    copied.load_weights(&file, &LoadOptions::default()).unwrap();
    let in_dev = sim(1 << 30);
    let in_place = Arc::new(HostStore::new(in_dev.clone()));
    in_place
        .register_file_in_place(&file, &LoadOptions::default())
        .unwrap();
    assert_eq!(in_dev.host_bytes_allocated(), 0, "in place copies nothing");
    assert_eq!(in_place.pinned_bytes(), 0);
    assert_eq!(in_place.weight_bytes(), copied.weight_bytes());

    // Room for the big group plus one small one: every round evicts and reloads.
    let budget = 166_000;
    let (a, sa) = run_pager(&copy_dev, copied, &layers, budget, 3);
    let (b, sb) = run_pager(&in_dev, in_place, &layers, budget, 3);
    assert!(sa.misses > layers.len() as u64, "{sa:?}");
    assert_eq!(sa.misses, sb.misses, "same layout sizes, same decisions");
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(x == y, "use #{i}: in-place bytes differ from the copy path");
    }
    // And both equal the file.
    let want: Vec<Vec<u8>> = layers[0]
        .iter()
        .map(|n| file.bytes(n).unwrap().to_vec())
        .collect();
    assert_eq!(b[0], want);
    // Unaligned tensors cannot share a copy: in place issues more (smaller) copies.
    assert_eq!(sa.copies, sa.misses, "one copy per group load");
    assert!(sb.copies > sa.copies, "{sb:?} vs {sa:?}");
}

#[test]
fn pytorch_fixture_registered_in_place_reads_back_its_bytes() {
    let file = WeightsFile::open(fixture("dtypes.safetensors")).unwrap();
    let dev = sim(1 << 30);
    let store = Arc::new(HostStore::new(dev.clone()));
    let ids = store
        .register_file_in_place(&file, &LoadOptions::default())
        .unwrap();
    assert_eq!(ids.len(), file.tensors().len());
    for (id, info) in ids.iter().zip(file.tensors()) {
        let t = store.tensor(*id).unwrap();
        assert_eq!(t.offset, file.data_start() + info.offset as u64);
        assert_eq!(t.dtype, info.dtype);
        assert_eq!(store.read(*id).unwrap(), file.bytes_of(info));
    }
    // One group of every tensor, acquired through the pager: device bytes equal the file's.
    let pager = Pager::new(dev.clone(), store.clone(), 1 << 20, Policy::Lru).unwrap();
    let g = pager.define_group("all", &ids).unwrap();
    let s = dev.create_stream().unwrap();
    let view = pager.acquire(g, s, s).unwrap();
    let seen = read_on(&dev, s, view.ranges());
    pager.release(g, s).unwrap();
    dev.sync_stream(s).unwrap();
    let want: Vec<Vec<u8>> = file
        .tensors()
        .iter()
        .map(|t| file.bytes_of(t).to_vec())
        .collect();
    assert!(*seen.lock().unwrap() == want);
    assert!(dev.races().is_empty(), "{:?}", dev.races());
}

#[test]
fn a_registered_file_is_read_only() {
    let file = WeightsFile::open(fixture("dtypes.safetensors")).unwrap();
    let dev = sim(1 << 30);
    let store = HostStore::new(dev.clone());
    let ids = store
        .register_file_in_place(&file, &LoadOptions::default())
        .unwrap();
    let t = store.tensor(ids[0]).unwrap();
    let before = store.read(ids[0]).unwrap();
    let e = dev.host_write(t.host, t.offset, &[1, 2]).unwrap_err();
    assert!(e.to_string().contains("read-only"), "{e}");
    let d = dev.alloc_device(4096).unwrap();
    let s = dev.create_stream().unwrap();
    let e = dev.copy_d2h(s, t.host, 0, d, 16).unwrap_err();
    assert!(e.to_string().contains("read-only"), "{e}");
    let e = dev.free_host(t.host).unwrap_err();
    assert!(e.to_string().contains("unregister_host"), "{e}");
    // A pinned allocation is not a registration either.
    let pinned = dev
        .alloc_host(64, ferry_pager::HostMemKind::Readable)
        .unwrap();
    assert!(matches!(
        dev.unregister_host(pinned),
        Err(Error::InvalidArgument(_))
    ));
    dev.free_host(pinned).unwrap();
    assert_eq!(store.read(ids[0]).unwrap(), before, "nothing was written");
    assert_eq!(file.bytes_of(&file.tensors()[0]), &before[..]);
    dev.free_device(d).unwrap();
}

#[test]
fn dropping_the_store_unregisters_and_a_file_is_registered_once() {
    let file = WeightsFile::open(fixture("dtypes.safetensors")).unwrap();
    let file_len = std::fs::metadata(fixture("dtypes.safetensors"))
        .unwrap()
        .len();
    let dev = Counting::new(sim(1 << 30));
    {
        let store = HostStore::new(dev.clone());
        let first = LoadOptions {
            names: Some(vec![file.tensors()[0].name.clone()]),
            ..LoadOptions::default()
        };
        store.register_file_in_place(&file, &first).unwrap();
        // The same file again under another prefix: one registration serves both.
        let again = LoadOptions {
            prefix: "b.".into(),
            ..LoadOptions::default()
        };
        store.register_file_in_place(&file, &again).unwrap();
        assert_eq!(store.len(), 1 + file.tensors().len());
        assert_eq!(store.registration_count(), 1);
        assert_eq!(store.registered_bytes(), file_len);
        assert_eq!(dev.inner.host_bytes_registered(), file_len);
        assert_eq!(dev.inner.live_registrations(), 1);
        assert_eq!(Counting::get(&dev.registrations), 1);
        assert_eq!(Counting::get(&dev.host_allocs), 0, "no pinned allocation");
        // Mixed with a copied file in the same store.
        store
            .load_file(fixture("dtypes.safetensors"), &opts_prefix("c."))
            .unwrap();
        assert!(dev.inner.host_bytes_allocated() > 0);
    }
    assert_eq!(Counting::get(&dev.unregistrations), 1);
    assert_eq!(dev.inner.host_bytes_registered(), 0);
    assert_eq!(dev.inner.host_bytes_allocated(), 0);
    assert_eq!(dev.inner.live_allocations().1, 0);
    // The file itself is still usable (the device let go of its reference only).
    assert_eq!(Arc::strong_count(file.mmap()), 1);
    assert!(!file.bytes_of(&file.tensors()[0]).is_empty());
}

fn opts_prefix(p: &str) -> LoadOptions {
    LoadOptions {
        prefix: p.into(),
        ..LoadOptions::default()
    }
}

#[test]
fn unregistering_waits_for_copies_reading_the_file() {
    let file = WeightsFile::open(fixture("dtypes.safetensors")).unwrap();
    let dev = sim(1 << 30);
    let store = HostStore::new(dev.clone());
    let ids = store
        .register_file_in_place(&file, &LoadOptions::default())
        .unwrap();
    let t = store.tensor(ids[0]).unwrap();
    let d = dev.alloc_device(t.len).unwrap();
    let s = dev.create_stream().unwrap();
    dev.busy(s, std::time::Duration::from_millis(5)).unwrap();
    dev.copy_h2d(s, d, t.host, t.offset, t.len).unwrap();
    let before = dev.now();
    drop(store);
    assert!(
        dev.now() >= dev.stream_tail(s).unwrap() && dev.now() > before,
        "drop must wait for the pending copy"
    );
    assert_eq!(
        dev.peek(ferry_pager::DeviceRange::new(d, t.len)).unwrap(),
        file.bytes_of(&file.tensors()[0])
    );
    assert_eq!(dev.host_bytes_registered(), 0);
}

#[test]
fn conversion_is_refused_and_leaves_nothing_behind() {
    let file = WeightsFile::open(fixture("dtypes.safetensors")).unwrap();
    let f32_tensor = file
        .tensors()
        .iter()
        .find(|t| t.dtype == DType::F32)
        .expect("fixture has an F32 tensor");
    let dev = sim(1 << 30);
    let store = HostStore::new(dev.clone());
    let opts = LoadOptions {
        convert_to: Some(DType::F16),
        ..LoadOptions::default()
    };
    let e = store.register_file_in_place(&file, &opts).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
    assert!(
        msg.contains("is F32 but F16 was asked") || msg.contains("is BF16 but F16 was asked"),
        "{msg}"
    );
    assert!(store.is_empty());
    assert_eq!(dev.live_registrations(), 0);
    // Asking for the dtype a tensor already has is not a conversion.
    let same = LoadOptions {
        names: Some(vec![f32_tensor.name.clone()]),
        convert_to: Some(DType::F32),
        ..LoadOptions::default()
    };
    assert_eq!(store.register_file_in_place(&file, &same).unwrap().len(), 1);
}

#[test]
fn a_device_without_the_capability_is_a_clear_error() {
    let file = WeightsFile::open(fixture("dtypes.safetensors")).unwrap();
    let dev = Counting::new(sim(1 << 30));
    dev.refuse_register.store(true, Ordering::SeqCst);
    assert!(!dev.can_register_host_files());
    let store = HostStore::new(dev.clone());
    let e = store
        .register_file_in_place(&file, &LoadOptions::default())
        .unwrap_err();
    assert!(e.to_string().contains("cannot register"), "{e}");
    assert!(store.is_empty());
    assert_eq!(store.registration_count(), 0);
    // The copy path still works on it.
    store
        .load_weights(&file, &LoadOptions::default())
        .expect("copy path");
    assert_eq!(store.len(), file.tensors().len());
    // Names already taken are refused before anything is registered.
    dev.refuse_register.store(false, Ordering::SeqCst);
    let e = store
        .register_file_in_place(&file, &LoadOptions::default())
        .unwrap_err();
    assert!(e.to_string().contains("already registered"), "{e}");
    assert_eq!(dev.inner.live_registrations(), 0);
}

#[test]
fn the_simulated_host_limit_counts_registrations() {
    let file = WeightsFile::open(fixture("dtypes.safetensors")).unwrap();
    let len = file.mmap().len() as u64;
    let dev = SimDevice::new(ferry_pager::device::sim::SimConfig {
        host_capacity: len + 100,
        ..Default::default()
    });
    let id = dev.register_host_file(file.mmap().clone()).unwrap();
    let e = dev
        .alloc_host(200, ferry_pager::HostMemKind::Upload)
        .unwrap_err();
    assert!(e.to_string().contains("simulated host limit"), "{e}");
    dev.unregister_host(id).unwrap();
    assert!(matches!(
        dev.unregister_host(id),
        Err(Error::InvalidHandle(_))
    ));
    let h = dev
        .alloc_host(200, ferry_pager::HostMemKind::Upload)
        .unwrap();
    dev.free_host(h).unwrap();
}
