//! The pinned host tier: packing, overhead bound, selection/prefix/conversion on load, and no leaks.

mod pager_support;

use ferry_pager::host::{HostStore, LoadOptions, RawTensor, HOST_ALIGN};
use ferry_pager::weights::{DType, WeightsFile};
use ferry_pager::{Device, Error};
use pager_support::{bytes, fixture, sim, write_safetensors, Counting};
use std::sync::Arc;

#[test]
fn packs_a_file_into_few_chunks_within_five_percent() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.safetensors");
    // Layer-like sizes: big weights with small odd-sized biases in between.
    let mut ts = Vec::new();
    for l in 0..20 {
        ts.push((format!("l{l:02}.bias"), "F16", vec![77], bytes(l, 154)));
        ts.push((
            format!("l{l:02}.weight"),
            "F16",
            vec![77, 64],
            bytes(100 + l, 77 * 128),
        ));
    }
    let refs: Vec<_> = ts
        .iter()
        .map(|(n, d, s, b)| (n.as_str(), *d, s.clone(), b.clone()))
        .collect();
    write_safetensors(&p, &refs);
    let dev = Counting::new(sim(1 << 30));
    let store = HostStore::with_max_chunk(dev.clone(), 64 << 10);
    let ids = store.load_file(&p, &LoadOptions::default()).unwrap();
    assert_eq!(ids.len(), 40);
    let weights = store.weight_bytes();
    assert_eq!(weights, 20 * (154 + 77 * 128));
    assert!(store.pinned_bytes() as f64 <= 1.05 * weights as f64);
    assert!(store.pinned_bytes() >= weights);
    // 64 KiB chunks for ~200 KiB: a handful of allocations, not one per tensor.
    assert_eq!(store.chunk_count() as u64, Counting::get(&dev.host_allocs));
    assert!(
        (3..=5).contains(&store.chunk_count()),
        "{}",
        store.chunk_count()
    );
    assert_eq!(dev.inner.host_bytes_allocated(), store.pinned_bytes());
    for (id, (name, _, shape, data)) in ids.iter().zip(&ts) {
        let t = store.tensor(*id).unwrap();
        assert_eq!(&t.name, name);
        assert_eq!(&t.shape, shape);
        assert_eq!(t.offset % HOST_ALIGN, 0);
        assert_eq!(&store.read(*id).unwrap(), data, "{name}");
    }
}

#[test]
fn selection_prefix_and_conversion_on_load() {
    let dev = sim(1 << 30);
    let store = HostStore::new(dev.clone());
    let opts = LoadOptions {
        names: Some(vec!["w_f32".into(), "ids_i64".into(), "w_bf16".into()]),
        prefix: "enc.".into(),
        convert_to: Some(DType::F16),
    };
    let ids = store
        .load_file(fixture("dtypes.safetensors"), &opts)
        .unwrap();
    assert_eq!(ids.len(), 3);
    let f = WeightsFile::open(fixture("dtypes.safetensors")).unwrap();
    let w = store.tensor(store.id("enc.w_f32").unwrap()).unwrap();
    assert_eq!((w.dtype, w.len), (DType::F16, 146));
    // Converted on load with PyTorch's rounding (golden from the fixture).
    assert_eq!(
        store.read(store.id("enc.w_f32").unwrap()).unwrap(),
        f.bytes("w_f32.as_f16").unwrap()
    );
    assert_eq!(
        store.read(store.id("enc.w_bf16").unwrap()).unwrap(),
        f.bytes("w_bf16.as_f16").unwrap()
    );
    // Integers stay as they are.
    let ids_t = store.tensor(store.id("enc.ids_i64").unwrap()).unwrap();
    assert_eq!(ids_t.dtype, DType::I64);
    assert_eq!(
        store.read(store.id("enc.ids_i64").unwrap()).unwrap(),
        f.bytes("ids_i64").unwrap()
    );
    assert!(store.id("w_f32").is_none());
    assert!(store.id("enc.w_f16").is_none());
}

#[test]
fn conversion_through_staging_handles_tensors_bigger_than_the_buffer() {
    let dev = sim(1 << 30);
    let store = HostStore::new(dev.clone());
    // 3 M f32 values: 12 MB in, 6 MB out, more than one 4 MiB staging block.
    let n = 3 << 20;
    let vals: Vec<f32> = (0..n).map(|i| (i % 4099) as f32 * 0.25 - 300.0).collect();
    let raw: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("big.safetensors");
    write_safetensors(&p, &[("big", "F32", vec![n], raw.clone())]);
    let opts = LoadOptions {
        convert_to: Some(DType::F16),
        ..LoadOptions::default()
    };
    let id = store.load_file(&p, &opts).unwrap()[0];
    let got = store.read(id).unwrap();
    let want: Vec<u8> = vals
        .iter()
        .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
        .collect();
    assert_eq!(got.len(), want.len());
    assert!(got == want, "converted bytes differ");
}

#[test]
fn raw_registration_and_argument_errors() {
    let dev = sim(1 << 30);
    let store = HostStore::new(dev.clone());
    let a = bytes(1, 12);
    let id = store.register_bytes("a", DType::F32, &[3], &a).unwrap();
    assert_eq!(store.read(id).unwrap(), a);
    let e = store.register_bytes("a", DType::F32, &[3], &a).unwrap_err();
    assert!(e.to_string().contains("already registered"), "{e}");
    let e = store.register_bytes("b", DType::F16, &[7], &a).unwrap_err();
    assert!(e.to_string().contains("needs 14 bytes, got 12"), "{e}");
    let e = store
        .register_batch(&[
            RawTensor {
                name: "c",
                dtype: DType::F32,
                shape: &[3],
                data: &a,
            },
            RawTensor {
                name: "c",
                dtype: DType::F32,
                shape: &[3],
                data: &a,
            },
        ])
        .unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)));
    // Failed registrations leave nothing behind.
    assert_eq!(store.len(), 1);
    assert_eq!(dev.host_bytes_allocated(), store.pinned_bytes());
    let missing = LoadOptions {
        names: Some(vec!["nope".into()]),
        ..LoadOptions::default()
    };
    let e = store
        .load_file(fixture("dtypes.safetensors"), &missing)
        .unwrap_err();
    assert!(e.to_string().contains("no tensor named 'nope'"), "{e}");
}

#[test]
fn host_limit_failure_frees_partial_chunks() {
    // 3 chunks needed but room for 2: the store must free the two it got.
    let dev = ferry_pager::device::sim::SimDevice::new(ferry_pager::device::sim::SimConfig {
        host_capacity: 2048,
        ..Default::default()
    });
    let store = HostStore::with_max_chunk(dev.clone(), 1024);
    let d = bytes(3, 1000);
    let ts: Vec<RawTensor<'_>> = ["x", "y", "z"]
        .iter()
        .map(|n| RawTensor {
            name: n,
            dtype: DType::F32,
            shape: &[250],
            data: &d,
        })
        .collect();
    assert!(store.register_batch(&ts).is_err());
    assert_eq!(dev.host_bytes_allocated(), 0);
    assert_eq!(dev.live_allocations().1, 0);
    assert!(store.is_empty());
}

#[test]
fn drop_frees_every_pinned_allocation() {
    let dev = Counting::new(sim(1 << 30));
    {
        let store = Arc::new(HostStore::with_max_chunk(dev.clone(), 4096));
        for i in 0..10 {
            let b = bytes(i, 1000 + i as usize * 4);
            let shape = [b.len() / 4];
            store
                .register_bytes(&format!("t{i}"), DType::F32, &shape, &b)
                .unwrap();
        }
        store
            .load_file(fixture("dtypes.safetensors"), &LoadOptions::default())
            .unwrap();
        assert!(dev.inner.host_bytes_allocated() > 0);
        let _clone = store.clone();
    }
    assert_eq!(
        Counting::get(&dev.host_allocs),
        Counting::get(&dev.host_frees)
    );
    assert_eq!(dev.inner.host_bytes_allocated(), 0);
    assert_eq!(dev.inner.live_allocations(), (0, 0));
    assert!(dev.mem_info().is_ok());
}
