//! A simulated disk: the virtual-time cost of reads, for a [`super::DiskTier`] driven by the
//! simulated device, so that disk streaming is deterministic in tests.
//!
//! Reads are host-side operations: the bytes still come from the real file, but when they are
//! available is decided here, on the thread that issues them, from the configured bandwidth,
//! latency and queue depth — never from how fast the reader threads actually ran.

use std::time::Duration;

/// The simulated disk's cost model.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SimDiskConfig {
    /// Sustained read bandwidth, bytes per second (shared by all requests in flight).
    pub bandwidth: f64,
    /// Time from issuing a request until its data starts flowing.
    pub latency: Duration,
    /// Requests the disk works on at once; latency of up to this many requests overlaps.
    pub queue_depth: usize,
}

impl Default for SimDiskConfig {
    /// An NVMe-like drive read with `O_DIRECT`: 2.2 GB/s, 80 µs, queue depth 4.
    fn default() -> Self {
        SimDiskConfig {
            bandwidth: 2.2e9,
            latency: Duration::from_micros(80),
            queue_depth: 4,
        }
    }
}

/// Virtual-time state of a simulated disk.
#[derive(Clone, Debug)]
pub struct SimDisk {
    cfg: SimDiskConfig,
    /// When each queue slot is next free, ns.
    slots: Vec<u64>,
    /// When the shared transfer path is next free, ns.
    transfer_free: u64,
}

impl SimDisk {
    /// An idle disk.
    pub fn new(cfg: SimDiskConfig) -> SimDisk {
        SimDisk {
            cfg,
            slots: vec![0; cfg.queue_depth.max(1)],
            transfer_free: 0,
        }
    }

    /// The cost model.
    pub fn config(&self) -> &SimDiskConfig {
        &self.cfg
    }

    /// Issues a read of `bytes` at virtual time `now_ns`; returns its (start, end) in ns.
    pub fn read(&mut self, now_ns: u64, bytes: u64) -> (u64, u64) {
        let (slot, free) = self
            .slots
            .iter()
            .copied()
            .enumerate()
            .min_by_key(|&(i, t)| (t, i))
            .unwrap_or((0, 0));
        let start = now_ns.max(free);
        let lat = self.cfg.latency.as_nanos().min(u64::MAX as u128) as u64;
        let flow = (bytes as f64 / self.cfg.bandwidth.max(1.0) * 1e9).ceil() as u64;
        let end = (start + lat).max(self.transfer_free) + flow.max(1);
        self.transfer_free = end;
        if let Some(s) = self.slots.get_mut(slot) {
            *s = end;
        }
        (start, end)
    }
}
