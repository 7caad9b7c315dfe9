//! Disk-tier throughput (file → pinned staging ring → device) against a plain sequential read of
//! the same file, cold (pages dropped with `posix_fadvise(DONTNEED)`) and warm.
//!
//! `cargo bench -p ferry-pager --bench disk_tier`. `FERRY_DISK_MB` sets the file size (default
//! 256), `FERRY_DISK_DIR` where it is written (default the temp dir; it is deleted afterwards).
//! The device is the first CUDA GPU when one opens, else the simulated device (whose copies are
//! host memcpys, so the tier then pays two extra copies per byte that a GPU's DMA engine does
//! not). Not a Criterion bench: the page cache is shared state, so each case is run a few times
//! and the median and best are printed.

use ferry_pager::device::cuda::CudaDevice;
use ferry_pager::device::sim::{SimConfig, SimDevice};
use ferry_pager::disk::{DiskConfig, DiskFile, DiskRead, DiskTier};
use ferry_pager::{Device, Result};
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

const REPS: usize = 3;
/// Bytes before the first tensor, so that tensor offsets are unaligned as in safetensors files.
const PREFIX: u64 = 8 + 4093;

/// Writes conv-like tensor sizes (320 channels, F16: 2×640 B vectors and a 1.8 MB weight per
/// layer) up to about `mb` MB; returns each tensor's (offset, len).
fn write_file(path: &Path, mb: u64) -> std::io::Result<Vec<(u64, u64)>> {
    let c = 320u64;
    let sizes = [c * 2, c * 2, c * c * 9 * 2];
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    f.write_all(&vec![7u8; PREFIX as usize])?;
    let mut off = PREFIX;
    let mut tensors = Vec::new();
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut block = vec![0u8; (c * c * 9 * 2) as usize];
    while off < mb * 1_000_000 {
        for &s in &sizes {
            for b in block[..s as usize].chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let n = b.len();
                b.copy_from_slice(&x.to_le_bytes()[..n]);
            }
            f.write_all(&block[..s as usize])?;
            tensors.push((off, s));
            off += s;
        }
    }
    f.flush()?;
    f.get_ref().sync_all()?;
    Ok(tensors)
}

fn stats(mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    (v[v.len() / 2], v[0])
}

fn gbps(bytes: u64, t: Duration) -> f64 {
    bytes as f64 / t.as_secs_f64() / 1e9
}

/// A plain sequential read of the whole file in 4 MiB requests.
fn plain(path: &Path, direct: bool, cold: bool) -> Result<Duration> {
    let f = DiskFile::open(path, direct)?;
    if cold {
        f.drop_cache()?;
    }
    let mut buf = f.buffer(4 << 20)?;
    let t = Instant::now();
    let mut sum = 0u64;
    f.read_range(0, f.len(), &mut buf, |b, _| {
        sum = sum.wrapping_add(b.first().copied().unwrap_or(0) as u64);
        Ok(())
    })?;
    std::hint::black_box(sum);
    Ok(t.elapsed())
}

/// Every tensor through the disk tier to the device, until the last copy has completed.
fn tier(
    dev: &Arc<dyn Device>,
    path: &Path,
    tensors: &[(u64, u64)],
    cfg: &DiskConfig,
    cold: bool,
) -> Result<(Duration, String)> {
    let t = DiskTier::open(dev.clone(), path, cfg.clone())?;
    if cold {
        t.file().drop_cache()?;
    }
    let total: u64 = tensors.iter().map(|&(_, l)| l.div_ceil(256) * 256).sum();
    let buf = dev.alloc_device(total)?;
    let stream = dev.create_stream()?;
    let mut at = 0;
    let reads: Vec<DiskRead> = tensors
        .iter()
        .map(|&(o, l)| {
            let r = DiskRead {
                file_offset: o,
                len: l,
                dst: buf.offset(at),
            };
            at += l.div_ceil(256) * 256;
            r
        })
        .collect();
    let start = Instant::now();
    let r = t
        .load(stream, &reads)
        .and_then(|()| dev.sync_stream(stream));
    let el = start.elapsed();
    let mode = match t.file().fallback_reason() {
        None => t.file().mode().to_string(),
        Some(w) => format!("{} ({w})", t.file().mode()),
    };
    drop(t);
    let _ = dev.destroy_stream(stream);
    dev.free_device(buf)?;
    r?;
    Ok((el, mode))
}

fn main() -> Result<()> {
    let mb: u64 = std::env::var("FERRY_DISK_MB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(256);
    let dir = std::env::var("FERRY_DISK_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| std::env::temp_dir());
    let tmp = tempfile::tempdir_in(&dir).map_err(|e| ferry_pager::Error::Io {
        path: dir.clone(),
        source: e,
    })?;
    let path = tmp.path().join("weights.bin");
    let tensors = write_file(&path, mb).map_err(|e| ferry_pager::Error::Io {
        path: path.clone(),
        source: e,
    })?;
    let bytes: u64 = tensors.iter().map(|&(_, l)| l).sum();
    let file_len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    let null = std::env::var("FERRY_DISK_NULL").is_ok_and(|v| v == "1");
    let dev: Arc<dyn Device> = match CudaDevice::new(0) {
        Ok(d) => d,
        // FERRY_DISK_NULL=1: a device whose copies do nothing, to time the reading alone.
        Err(_) if null => Arc::new(ferry_pager::device::null::NullDevice::default()),
        Err(_) => SimDevice::new(SimConfig {
            capacity: bytes * 2 + (64 << 20),
            host_capacity: 4 << 30,
            ..SimConfig::default()
        }),
    };
    println!(
        "disk tier bench: {:.0} MB file ({} tensors, offsets unaligned) in {}, device {}",
        file_len as f64 / 1e6,
        tensors.len(),
        dir.display(),
        dev.name()
    );
    let cfg = DiskConfig::default();
    println!(
        "tier config: {} chunks x {} MiB, {} MiB requests, {} readers",
        cfg.chunks,
        cfg.chunk_bytes >> 20,
        cfg.request_bytes >> 20,
        cfg.readers
    );
    let rep = |f: &mut dyn FnMut() -> Result<Duration>| -> Result<(Duration, Duration)> {
        let mut v = Vec::new();
        for _ in 0..REPS {
            v.push(f()?);
        }
        Ok(stats(v))
    };
    for cold in [true, false] {
        let label = if cold { "cold" } else { "warm" };
        if !cold {
            // Warm the page cache for the buffered cases.
            plain(&path, false, false)?;
        }
        let (pd, pd_best) = rep(&mut || plain(&path, true, cold))?;
        let (pb, pb_best) = rep(&mut || plain(&path, false, cold))?;
        let mut mode = String::new();
        let (td, td_best) = rep(&mut || {
            let (t, m) = tier(&dev, &path, &tensors, &cfg, cold)?;
            mode = m;
            Ok(t)
        })?;
        let buffered = DiskConfig {
            direct: false,
            ..cfg.clone()
        };
        let (tb, tb_best) = rep(&mut || tier(&dev, &path, &tensors, &buffered, cold).map(|x| x.0))?;
        println!("{label}:");
        println!(
            "  plain O_DIRECT sequential read   {:>6.2} GB/s (best {:.2})",
            gbps(file_len, pd),
            gbps(file_len, pd_best)
        );
        println!(
            "  plain buffered sequential read   {:>6.2} GB/s (best {:.2})",
            gbps(file_len, pb),
            gbps(file_len, pb_best)
        );
        println!(
            "  disk tier, {:<21} {:>6.2} GB/s (best {:.2}) = {:.0} % of plain O_DIRECT",
            mode,
            gbps(bytes, td),
            gbps(bytes, td_best),
            100.0 * gbps(bytes, td) / gbps(file_len, pd)
        );
        println!(
            "  disk tier, buffered              {:>6.2} GB/s (best {:.2}) = {:.0} % of plain buffered",
            gbps(bytes, tb),
            gbps(bytes, tb_best),
            100.0 * gbps(bytes, tb) / gbps(file_len, pb)
        );
    }
    Ok(())
}
