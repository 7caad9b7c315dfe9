//! Host→device transfer measurements on any [`Device`]: pinned and pageable copy bandwidth, and
//! how well a copy on one stream overlaps a kernel on another. Shared by the transfer benches;
//! every figure is device event time (virtual time on the simulator, GPU time on CUDA).
//!
//! ```
//! use ferry_pager::device::sim::{SimConfig, SimDevice};
//! use ferry_sched::transfer::TransferRig;
//!
//! let rig = TransferRig::new(SimDevice::new(SimConfig::default()), 1 << 20)?;
//! let table = rig.bandwidth()?;
//! assert!(table.reference_gbps > 20.0);
//! # Ok::<(), ferry_sched::Error>(())
//! ```

use crate::{Error, Result};
use ferry_pager::{Device, DeviceKind, DevicePtr, EventId, HostMemKind, HostPtr, StreamId};
use std::sync::Arc;
use std::time::Duration;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
/// Smallest copy of the bandwidth table; each next size is 4× larger.
const SMALLEST: u64 = 4 * KIB;
/// Most bytes and most copies one batched measurement issues.
const BATCH_BYTES: u64 = 64 * MIB;
const BATCH_COPIES: u64 = 256;
/// Host pattern written in chunks of this size.
const FILL_CHUNK: usize = 64 << 20;
/// Lead-in kernel of [`TransferRig::concurrent`], long enough for both streams to be queued.
const GATE: Duration = Duration::from_micros(200);

/// `b` bytes as "N MiB" (from 1 MiB) or "N KiB".
pub fn size_label(b: u64) -> String {
    if b >= MIB {
        format!("{} MiB", b / MIB)
    } else {
        format!("{} KiB", b / KIB)
    }
}

/// `bytes` moved in `t`, in bytes per nanosecond = GB/s.
pub fn gbps(bytes: u64, t: Duration) -> f64 {
    bytes as f64 / t.as_nanos().max(1) as f64
}

/// The median (upper median for an even count) of `v`; `None` when `v` is empty.
pub fn median(mut v: Vec<Duration>) -> Option<Duration> {
    v.sort();
    v.get(v.len() / 2).copied()
}

/// How much of the shorter of a copy and a kernel was hidden behind the longer one when both ran
/// at once: 1 = fully hidden, 0 = serialised (can go below 0 when running together is slower).
pub fn overlap_fraction(copy_alone: Duration, kernel_alone: Duration, together: Duration) -> f64 {
    let (lo, hi) = if copy_alone < kernel_alone {
        (copy_alone, kernel_alone)
    } else {
        (kernel_alone, copy_alone)
    };
    1.0 - together.saturating_sub(hi).as_nanos() as f64 / lo.as_nanos().max(1) as f64
}

/// Copy sizes of the bandwidth table: 4 KiB, 16 KiB, … (×4) up to `max_bytes`.
pub fn table_sizes(max_bytes: u64) -> Vec<u64> {
    std::iter::successors(Some(SMALLEST), |&s| s.checked_mul(4))
        .take_while(|&s| s <= max_bytes)
        .collect()
}

/// A device with a compute and a copy stream, timing events, a pinned (upload) host buffer, a
/// pageable host buffer and a device buffer, all `max_bytes` long; the buffers are freed on drop.
#[derive(Debug)]
pub struct TransferRig {
    dev: Arc<dyn Device>,
    compute: StreamId,
    copy: StreamId,
    ev: [EventId; 3],
    host: HostPtr,
    pageable: Vec<u8>,
    dst: DevicePtr,
    max: u64,
    reps: usize,
}

/// One row of the bandwidth table: `copies` back-to-back copies of `bytes` each.
#[derive(Clone, Debug, PartialEq)]
pub struct BandwidthRow {
    /// Bytes per copy.
    pub bytes: u64,
    /// Copies per measurement.
    pub copies: u64,
    /// Median time of the pinned copies.
    pub pinned: Duration,
    /// Median time of the pageable copies.
    pub pageable: Duration,
    /// Pinned bandwidth, GB/s.
    pub pinned_gbps: f64,
    /// Pageable bandwidth, GB/s.
    pub pageable_gbps: f64,
}

/// Pinned and pageable H2D bandwidth across copy sizes, against a reference large copy.
#[derive(Clone, Debug, PartialEq)]
pub struct Bandwidth {
    /// Bytes of the reference copy (the rig's largest size).
    pub reference_bytes: u64,
    /// Reference copies timed; the best one counts.
    pub reference_tries: usize,
    /// Reference bandwidth: the best single pinned copy of `reference_bytes`, GB/s.
    pub reference_gbps: f64,
    /// Fixed cost per copy: a smallest-size copy's time minus its bytes at the reference
    /// bandwidth (zero when the table has no smallest-size row).
    pub per_copy_fixed: Duration,
    /// One row per size of [`table_sizes`].
    pub rows: Vec<BandwidthRow>,
}

impl Bandwidth {
    /// The reference bandwidth in bytes per second.
    pub fn reference_bytes_per_s(&self) -> f64 {
        self.reference_gbps * 1e9
    }
}

/// One copy/compute overlap measurement.
#[derive(Clone, Debug, PartialEq)]
pub struct OverlapRow {
    /// Bytes of the copy.
    pub copy_bytes: u64,
    /// Kernel length as a multiple of the copy's time alone.
    pub kernel_factor: f64,
    /// The copy alone.
    pub copy_alone: Duration,
    /// The kernel alone.
    pub kernel_alone: Duration,
    /// Both started together, until both are done.
    pub together: Duration,
    /// [`overlap_fraction`] of the three times.
    pub overlap: f64,
}

impl TransferRig {
    /// Creates the streams, events and `max_bytes` buffers on `dev`, and fills the host buffers
    /// with a non-zero pattern. Measurements take the median of 1 run on the simulator (virtual
    /// time is deterministic) and of 5 elsewhere.
    pub fn new(dev: Arc<dyn Device>, max_bytes: u64) -> Result<TransferRig> {
        if max_bytes == 0 {
            return Err(Error::InvalidArgument(
                "transfer rig: expected a buffer size of at least 1 byte, got 0".into(),
            ));
        }
        let len = usize::try_from(max_bytes).map_err(|_| {
            Error::InvalidArgument(format!(
                "transfer rig: buffer size {max_bytes} bytes does not fit this host's address space"
            ))
        })?;
        let mut streams = Vec::with_capacity(2);
        let mut events = Vec::with_capacity(3);
        let mut host = None;
        let made = (|| -> Result<DevicePtr> {
            streams.push(dev.create_stream()?);
            streams.push(dev.create_stream()?);
            for _ in 0..3 {
                events.push(dev.create_event()?);
            }
            host = Some(dev.alloc_host(max_bytes, HostMemKind::Upload)?);
            Ok(dev.alloc_device(max_bytes)?)
        })();
        let (dst, host) = match (made, host) {
            (Ok(d), Some(h)) => (d, h),
            (r, h) => {
                if let Some(h) = h {
                    let _ = dev.free_host(h);
                }
                for e in events {
                    let _ = dev.destroy_event(e);
                }
                for s in streams {
                    let _ = dev.destroy_stream(s);
                }
                return Err(r.err().unwrap_or_else(|| {
                    Error::InvalidArgument("transfer rig: no host buffer".into())
                }));
            }
        };
        let (compute, copy) = (streams[0], streams[1]);
        let ev = [events[0], events[1], events[2]];
        // Non-zero source bytes: zeros could take a faster path somewhere.
        let pattern: Vec<u8> = (0..len).map(|i| (i * 131 % 251) as u8 + 1).collect();
        let reps = if dev.kind() == DeviceKind::Sim { 1 } else { 5 };
        // From here on, drop frees both buffers, the events and the streams.
        let rig = TransferRig {
            dev,
            compute,
            copy,
            ev,
            host,
            pageable: pattern,
            dst,
            max: max_bytes,
            reps,
        };
        for (i, chunk) in rig.pageable.chunks(FILL_CHUNK).enumerate() {
            rig.dev
                .host_write(rig.host, (i * FILL_CHUNK) as u64, chunk)?;
        }
        Ok(rig)
    }

    /// The device measured.
    pub fn device(&self) -> &Arc<dyn Device> {
        &self.dev
    }

    /// The stream kernels run on.
    pub fn compute_stream(&self) -> StreamId {
        self.compute
    }

    /// The stream copies run on.
    pub fn copy_stream(&self) -> StreamId {
        self.copy
    }

    /// Largest copy size (the buffers' size).
    pub fn max_bytes(&self) -> u64 {
        self.max
    }

    /// Runs per measurement that [`median_of`](Self::median_of) takes the median of.
    pub fn reps(&self) -> usize {
        self.reps
    }

    fn check_size(&self, size: u64) -> Result<()> {
        if size == 0 || size > self.max {
            return Err(Error::InvalidArgument(format!(
                "transfer rig: expected a copy size of 1 to {} bytes, got {size}",
                self.max
            )));
        }
        Ok(())
    }

    /// Event time on `stream` of the work `f` enqueues there.
    pub fn time(&self, stream: StreamId, f: impl FnOnce() -> Result<()>) -> Result<Duration> {
        let [a, b, _] = self.ev;
        self.dev.record_event(a, stream)?;
        f()?;
        self.dev.record_event(b, stream)?;
        self.dev.sync_event(b)?;
        Ok(self.dev.event_elapsed(a, b)?)
    }

    /// `count` back-to-back pinned copies of `size` bytes on the copy stream.
    pub fn pinned(&self, size: u64, count: u64) -> Result<Duration> {
        self.check_size(size)?;
        self.time(self.copy, || {
            for _ in 0..count {
                self.dev.copy_h2d(self.copy, self.dst, self.host, 0, size)?;
            }
            Ok(())
        })
    }

    /// `count` pageable copies of `size` bytes on the copy stream (each returns once done, as
    /// on CUDA).
    pub fn pageable(&self, size: u64, count: u64) -> Result<Duration> {
        self.check_size(size)?;
        // check_size bounds `size` by the buffer's length, which is a usize.
        let src = &self.pageable[..size as usize];
        self.time(self.copy, || {
            for _ in 0..count {
                self.dev.copy_h2d_pageable(self.copy, self.dst, src)?;
            }
            Ok(())
        })
    }

    /// A `busy` kernel of `duration` alone on the compute stream.
    pub fn kernel(&self, duration: Duration) -> Result<Duration> {
        self.time(self.compute, || {
            Ok(self.dev.busy(self.compute, duration)?)
        })
    }

    /// From a common start until both a `kernel`-long busy kernel (compute stream) and a pinned
    /// copy of `size` bytes (copy stream) are done.
    pub fn concurrent(&self, size: u64, kernel: Duration) -> Result<Duration> {
        self.check_size(size)?;
        let dev = &self.dev;
        let [start, k_end, c_end] = self.ev;
        // A short gate so both streams have their work queued before the start point runs.
        dev.busy(self.compute, GATE)?;
        dev.record_event(start, self.compute)?;
        dev.wait_event(self.copy, start)?;
        dev.busy(self.compute, kernel)?;
        dev.record_event(k_end, self.compute)?;
        dev.copy_h2d(self.copy, self.dst, self.host, 0, size)?;
        dev.record_event(c_end, self.copy)?;
        dev.sync_event(k_end)?;
        dev.sync_event(c_end)?;
        Ok(dev
            .event_elapsed(start, k_end)?
            .max(dev.event_elapsed(start, c_end)?))
    }

    /// The median of [`reps`](Self::reps) runs of `f`.
    pub fn median_of(&self, mut f: impl FnMut() -> Result<Duration>) -> Result<Duration> {
        let runs = (0..self.reps).map(|_| f()).collect::<Result<Vec<_>>>()?;
        median(runs).ok_or_else(|| {
            Error::InvalidArgument("transfer rig: expected at least one run, got none".into())
        })
    }

    /// Copies per measurement at `size`: enough to amortise the events, at most 64 MiB (or the
    /// largest size) or 256 copies.
    pub fn batch(&self, size: u64) -> u64 {
        (self.max.min(BATCH_BYTES) / size.max(1)).clamp(1, BATCH_COPIES)
    }

    /// The bandwidth table: after a warm-up, the reference (best of at least 3 single pinned
    /// copies of the largest size), then pinned and pageable batches at every [`table_sizes`]
    /// size, and the per-copy fixed cost from the smallest size.
    pub fn bandwidth(&self) -> Result<Bandwidth> {
        // Warm-up: first touch of pinned pages and driver paths.
        self.pinned(self.max, 1)?;
        self.pageable(self.max.min(16 * MIB), 1)?;
        let tries = self.reps.max(3);
        let mut best = Duration::MAX;
        for _ in 0..tries {
            best = best.min(self.pinned(self.max, 1)?);
        }
        let reference_gbps = gbps(self.max, best);
        let mut rows = Vec::new();
        let mut per_copy_fixed = Duration::ZERO;
        for size in table_sizes(self.max) {
            let n = self.batch(size);
            let p = self.median_of(|| self.pinned(size, n))?;
            let q = self.median_of(|| self.pageable(size, n))?;
            if size == SMALLEST {
                // Per-copy time minus the bytes at the reference bandwidth.
                let per = p.as_nanos() as f64 / n as f64 - size as f64 / reference_gbps;
                per_copy_fixed = Duration::from_nanos(per.max(0.0) as u64);
            }
            rows.push(BandwidthRow {
                bytes: size,
                copies: n,
                pinned: p,
                pageable: q,
                pinned_gbps: gbps(size * n, p),
                pageable_gbps: gbps(size * n, q),
            });
        }
        Ok(Bandwidth {
            reference_bytes: self.max,
            reference_tries: tries,
            reference_gbps,
            per_copy_fixed,
            rows,
        })
    }

    /// Copy/compute overlap of one pinned copy of `size` bytes with busy kernels of each of
    /// `factors` × the copy's time alone.
    pub fn overlap(&self, size: u64, factors: &[f64]) -> Result<Vec<OverlapRow>> {
        let copy_alone = self.median_of(|| self.pinned(size, 1))?;
        let mut rows = Vec::with_capacity(factors.len());
        for &factor in factors {
            if !(factor.is_finite() && factor >= 0.0) {
                return Err(Error::InvalidArgument(format!(
                    "transfer rig: expected a finite, non-negative kernel factor, got {factor}"
                )));
            }
            let kernel = Duration::from_nanos((copy_alone.as_nanos() as f64 * factor) as u64);
            let kernel_alone = self.median_of(|| self.kernel(kernel))?;
            let together = self.median_of(|| self.concurrent(size, kernel))?;
            rows.push(OverlapRow {
                copy_bytes: size,
                kernel_factor: factor,
                copy_alone,
                kernel_alone,
                together,
                overlap: overlap_fraction(copy_alone, kernel_alone, together),
            });
        }
        Ok(rows)
    }
}

impl Drop for TransferRig {
    fn drop(&mut self) {
        // Nothing to report to from drop; the device keeps its own accounting.
        let _ = self.dev.free_device(self.dst);
        let _ = self.dev.free_host(self.host);
        for e in self.ev {
            let _ = self.dev.destroy_event(e);
        }
        let _ = self.dev.destroy_stream(self.copy);
        let _ = self.dev.destroy_stream(self.compute);
    }
}
