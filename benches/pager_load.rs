//! Load time of a ~200 MB safetensors file into the host tier: copied into pinned memory
//! (`HostStore::load_weights`) versus registered in place (`HostStore::register_file_in_place`),
//! and what each costs afterwards when streaming the weights to the device.
//!
//! On the simulated device the load is real host time (copy: allocate + memcpy; in place: fault
//! the mapping's pages in, as pinning does) and the streaming cost is virtual device time. On a
//! CUDA GPU (when `CudaDevice::new(0)` opens one) it times `cuMemHostAlloc` + memcpy against
//! `cuMemHostRegister(READ_ONLY)` and measures H2D bandwidth from both sources with events.
//!
//! `cargo bench -p ferry-pager --bench pager_load` (FERRY_LOAD_MB sets the size, default 200).
//! Not a Criterion bench: one load is tens of milliseconds and the page cache is shared state, so
//! it reports the median and minimum of a few repetitions instead.

use ferry_pager::device::cuda::CudaDevice;
use ferry_pager::device::sim::{SimConfig, SimDevice};
use ferry_pager::{
    Device, DevicePtr, HostStore, LoadOptions, Pager, Policy, Result, TensorId, WeightsFile,
};
use std::io::{BufWriter, Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

const REPS: usize = 5;

/// Conv-layer-like F16 tensors of `c` channels (bias `[c]`, norm `[c]`, weight `[c, c, 3, 3]`
/// per layer) totalling about `mb` MB; returns the tensor names per layer. With `c = 320` (SD's
/// first UNet stage) the 640-byte vectors leave the weights at unaligned file offsets.
fn write_model(path: &Path, mb: usize, c: usize) -> std::io::Result<Vec<Vec<String>>> {
    let layer_bytes = (c * c * 9 + 2 * c) * 2;
    let n = (mb * 1_000_000).div_ceil(layer_bytes).max(1);
    let mut header = serde_json::Map::new();
    let mut layers = Vec::new();
    let mut off = 0usize;
    for l in 0..n {
        let mut names = Vec::new();
        for (suffix, shape) in [
            ("bias", vec![c]),
            ("norm", vec![c]),
            ("weight", vec![c, c, 3, 3]),
        ] {
            let name = format!("l{l:03}.{suffix}");
            let len = shape.iter().product::<usize>() * 2;
            header.insert(
                name.clone(),
                serde_json::json!({"dtype": "F16", "shape": shape, "data_offsets": [off, off + len]}),
            );
            off += len;
            names.push(name);
        }
        layers.push(names);
    }
    let header = serde_json::Value::Object(header).to_string();
    let mut w = BufWriter::new(std::fs::File::create(path)?);
    w.write_all(&(header.len() as u64).to_le_bytes())?;
    w.write_all(header.as_bytes())?;
    // Pseudo-random bytes, so nothing downstream can shortcut zeros.
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut block = vec![0u8; 1 << 20];
    let mut left = off;
    while left > 0 {
        for c in block.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes());
        }
        let k = left.min(block.len());
        w.write_all(&block[..k])?;
        left -= k;
    }
    w.flush()?;
    Ok(layers)
}

/// Median and minimum of `f` over [`REPS`] runs.
fn time(mut f: impl FnMut() -> Duration) -> (Duration, Duration) {
    let mut v: Vec<Duration> = (0..REPS).map(|_| f()).collect();
    v.sort();
    (v[REPS / 2], v[0])
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn gbps(bytes: u64, d: Duration) -> String {
    format!("{:.1} GB/s", bytes as f64 / d.as_secs_f64() / 1e9)
}

/// Loads `path` into a fresh store on `dev` (a fresh mapping each time, so page-table faults
/// count); returns the time of the load call alone, and of dropping the store.
fn load_once(dev: Arc<dyn Device>, path: &Path, in_place: bool) -> Result<(Duration, Duration)> {
    let file = WeightsFile::open(path)?;
    let store = HostStore::new(dev);
    let t = Instant::now();
    if in_place {
        store.register_file_in_place(&file, &LoadOptions::default())?;
    } else {
        store.load_weights(&file, &LoadOptions::default())?;
    }
    let load = t.elapsed();
    let t = Instant::now();
    drop(store);
    Ok((load, t.elapsed()))
}

fn report_loads(dev: &Arc<dyn Device>, path: &Path, bytes: u64) -> Result<()> {
    for (label, in_place) in [("copy into pinned", false), ("register in place", true)] {
        let mut err = None;
        let mut frees = Vec::new();
        let (med, min) = time(|| match load_once(dev.clone(), path, in_place) {
            Ok((load, free)) => {
                frees.push(free);
                load
            }
            Err(e) => {
                err.get_or_insert(e);
                Duration::ZERO
            }
        });
        if let Some(e) = err {
            println!("  load, {label}: failed: {e}");
            continue;
        }
        frees.sort();
        println!(
            "  load, {label}: median {} (min {}, {}), free/unregister median {}",
            ms(med),
            ms(min),
            gbps(bytes, med),
            ms(frees[frees.len() / 2])
        );
    }
    Ok(())
}

/// Streams every layer once through a pager on a fresh simulated device; returns (copies,
/// virtual device time from the first copy's start to the last one's end).
fn sim_stream(path: &Path, layers: &[Vec<String>], in_place: bool) -> Result<(u64, Duration)> {
    let dev = SimDevice::new(SimConfig::default());
    let file = WeightsFile::open(path)?;
    let store = Arc::new(HostStore::new(dev.clone()));
    if in_place {
        store.register_file_in_place(&file, &LoadOptions::default())?;
    } else {
        store.load_weights(&file, &LoadOptions::default())?;
    }
    // Room for two layers: every acquire is a miss that evicts the other.
    let biggest = layers.iter().map(|l| l.len()).max().unwrap_or(1) as u64;
    let layer_bytes = store.weight_bytes() / layers.len().max(1) as u64;
    let pager = Pager::new(
        dev.clone(),
        store.clone(),
        2 * (layer_bytes + 256 * biggest),
        Policy::Lru,
    )?;
    let mut groups = Vec::new();
    for (i, names) in layers.iter().enumerate() {
        let ids: Vec<TensorId> = names.iter().filter_map(|n| store.id(n)).collect();
        groups.push(pager.define_group(&format!("g{i}"), &ids)?);
    }
    let (compute, copy) = (dev.create_stream()?, dev.create_stream()?);
    dev.take_timeline();
    for &g in &groups {
        pager.acquire(g, compute, copy)?;
        pager.release(g, compute)?;
    }
    dev.sync_stream(copy)?;
    let tl = dev.take_timeline();
    let copies: Vec<_> = tl.iter().filter(|o| o.bytes > 0).collect();
    let start = copies.iter().map(|o| o.start).min().unwrap_or_default();
    let end = copies.iter().map(|o| o.end).max().unwrap_or_default();
    Ok((pager.stats().copies, end - start))
}

/// H2D bandwidth on a GPU from `src` (offset `off`) into `dst`, `len` bytes, 4 timed copies.
fn h2d(
    dev: &CudaDevice,
    dst: DevicePtr,
    src: ferry_pager::HostPtr,
    off: u64,
    len: u64,
) -> Result<Duration> {
    let s = dev.create_stream()?;
    let (e0, e1) = (dev.create_event()?, dev.create_event()?);
    dev.copy_h2d(s, dst, src, off, len)?; // warm-up
    dev.record_event(e0, s)?;
    for _ in 0..4 {
        dev.copy_h2d(s, dst, src, off, len)?;
    }
    dev.record_event(e1, s)?;
    dev.sync_event(e1)?;
    Ok(dev.event_elapsed(e0, e1)? / 4)
}

fn cuda(path: &Path, bytes: u64) -> Result<()> {
    let dev = match CudaDevice::new(0) {
        Ok(d) => d,
        Err(e) => {
            println!("cuda: skipped ({e})");
            return Ok(());
        }
    };
    println!(
        "cuda: {} (read-only registration {})",
        dev.name(),
        if dev.supports_read_only_register() {
            "supported"
        } else {
            "NOT supported"
        }
    );
    let as_dyn: Arc<dyn Device> = dev.clone();
    report_loads(&as_dyn, path, bytes)?;
    // H2D bandwidth of the whole data area from each source.
    let file = WeightsFile::open(path)?;
    let d = dev.alloc_device(bytes)?;
    let copied = HostStore::new(as_dyn.clone());
    let ids = copied.load_weights(&file, &LoadOptions::default())?;
    let first = copied.tensor(ids[0])?;
    let len = copied.pinned_bytes();
    let t = h2d(&dev, d, first.host, 0, len)?;
    println!(
        "  H2D from pinned copy (write-combined): {} ({})",
        ms(t),
        gbps(len, t)
    );
    if dev.supports_read_only_register() {
        let placed = HostStore::new(as_dyn.clone());
        let ids = placed.register_file_in_place(&file, &LoadOptions::default())?;
        let first = placed.tensor(ids[0])?;
        let t = h2d(&dev, d, first.host, first.offset, bytes)?;
        println!(
            "  H2D from registered file (page cache):  {} ({})",
            ms(t),
            gbps(bytes, t)
        );
    }
    dev.free_device(d)?;
    Ok(())
}

fn main() -> Result<()> {
    // `cargo bench` passes `--bench`; nothing to parse.
    let mb: usize = std::env::var("FERRY_LOAD_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let dir = tempfile::tempdir().map_err(|source| ferry_pager::Error::Io {
        path: std::env::temp_dir(),
        source,
    })?;
    let path = dir.path().join("load.safetensors");
    let io = |source| ferry_pager::Error::Io {
        path: path.clone(),
        source,
    };
    let layers = write_model(&path, mb, 320).map_err(io)?;
    // Warm the page cache: both paths then read cached pages.
    let mut sink = Vec::new();
    std::fs::File::open(&path)
        .and_then(|mut f| f.read_to_end(&mut sink))
        .map_err(io)?;
    drop(sink);
    let bytes = WeightsFile::open(&path)?.data_bytes();
    println!(
        "file: {:.1} MB of F16 weights, {} layers x 3 tensors (bias [320], norm [320], \
         weight [320, 320, 3, 3]), page cache warm",
        bytes as f64 / 1e6,
        layers.len()
    );

    let t = time(|| {
        let t = Instant::now();
        let _ = WeightsFile::open(&path);
        t.elapsed()
    });
    println!("open + validate header: median {}", ms(t.0));

    let sim: Arc<dyn Device> = SimDevice::new(SimConfig {
        host_capacity: 4 * bytes + (1 << 30),
        ..SimConfig::default()
    });
    println!("sim: {}", sim.name());
    report_loads(&sim, &path, bytes)?;
    for (label, in_place) in [("copy into pinned", false), ("register in place", true)] {
        let (copies, t) = sim_stream(&path, &layers, in_place)?;
        println!(
            "  stream all layers once, {label}: {copies} copies, {} virtual ({})",
            ms(t),
            gbps(bytes, t)
        );
    }
    // The same with 1280 channels: every tensor's size is a multiple of 256 bytes, so in place
    // keeps one copy per layer.
    let aligned = dir.path().join("aligned.safetensors");
    let aligned_layers = write_model(&aligned, mb, 1280).map_err(io)?;
    for (label, in_place) in [("copy into pinned", false), ("register in place", true)] {
        let (copies, t) = sim_stream(&aligned, &aligned_layers, in_place)?;
        println!(
            "  stream all layers once, 1280 channels, {label}: {copies} copies, {} virtual",
            ms(t)
        );
    }
    cuda(&path, bytes)
}
