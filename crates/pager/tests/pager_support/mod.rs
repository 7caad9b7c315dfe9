//! Helpers shared by the allocator tests: safetensors writers (good and deliberately bad), a
//! simulated device, a device wrapper that counts calls, and a kernel that reads device bytes.
#![allow(dead_code)]

use ferry_pager::device::sim::{KernelSpec, SimConfig, SimDevice};
use ferry_pager::{
    Device, DeviceKind, DevicePtr, DeviceRange, EventId, HostMemKind, HostPtr, MemInfo, Result,
    StreamId,
};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The committed fixture written by PyTorch / safetensors (see `fixtures/make_dtype_fixture.py`).
pub fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// Writes a file: 8-byte little-endian `declared_len`, then `header`, then `data`.
pub fn write_raw(path: &Path, declared_len: u64, header: &[u8], data: &[u8]) {
    let mut buf = declared_len.to_le_bytes().to_vec();
    buf.extend_from_slice(header);
    buf.extend_from_slice(data);
    std::fs::write(path, buf).unwrap();
}

/// Writes a well-formed file with a hand-written header JSON.
pub fn write_with_header(path: &Path, header: &str, data: &[u8]) {
    write_raw(path, header.len() as u64, header.as_bytes(), data);
}

/// Writes a valid safetensors file of `(name, dtype, shape, bytes)` with the real writer.
pub fn write_safetensors(path: &Path, tensors: &[(&str, &str, Vec<usize>, Vec<u8>)]) {
    use safetensors::tensor::TensorView;
    use safetensors::Dtype;
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            let dt = match *d {
                "F32" => Dtype::F32,
                "F16" => Dtype::F16,
                "BF16" => Dtype::BF16,
                "I64" => Dtype::I64,
                "I32" => Dtype::I32,
                other => panic!("test helper: unknown dtype {other}"),
            };
            (n.to_string(), TensorView::new(dt, s.clone(), b).unwrap())
        })
        .collect();
    let bytes = safetensors::serialize(views, None).unwrap();
    std::fs::write(path, bytes).unwrap();
}

/// Deterministic pseudo-random bytes.
pub fn bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A simulated device with `capacity` bytes, PCIe-like costs.
pub fn sim(capacity: u64) -> Arc<SimDevice> {
    SimDevice::new(SimConfig {
        capacity,
        ..SimConfig::default()
    })
}

/// Launches a kernel on `stream` that reads `ranges` and returns what it saw (filled once the
/// device has run it: after a sync).
pub fn read_on(
    dev: &SimDevice,
    stream: StreamId,
    ranges: Vec<DeviceRange>,
) -> Arc<Mutex<Vec<Vec<u8>>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let out = seen.clone();
    let mut spec = KernelSpec::new("reader", Duration::from_micros(10));
    for &r in &ranges {
        spec = spec.reads(r);
    }
    dev.launch(stream, spec, move |mem| {
        let mut v = Vec::new();
        for r in ranges {
            v.push(mem.read(r)?);
        }
        *out.lock().unwrap() = v;
        Ok(())
    })
    .unwrap();
    seen
}

/// Counts the calls that allocate device resources, passing everything to the inner device.
#[derive(Debug)]
pub struct Counting {
    pub inner: Arc<SimDevice>,
    pub device_allocs: AtomicU64,
    pub host_allocs: AtomicU64,
    pub host_frees: AtomicU64,
    pub events_created: AtomicU64,
    pub copies: AtomicU64,
    pub registrations: AtomicU64,
    pub unregistrations: AtomicU64,
    /// When set, behaves like a device that cannot register host memory in place.
    pub refuse_register: AtomicBool,
}

impl Counting {
    pub fn new(inner: Arc<SimDevice>) -> Arc<Counting> {
        Arc::new(Counting {
            inner,
            device_allocs: AtomicU64::new(0),
            host_allocs: AtomicU64::new(0),
            host_frees: AtomicU64::new(0),
            events_created: AtomicU64::new(0),
            copies: AtomicU64::new(0),
            registrations: AtomicU64::new(0),
            unregistrations: AtomicU64::new(0),
            refuse_register: AtomicBool::new(false),
        })
    }
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::SeqCst)
    }
}

impl Device for Counting {
    fn kind(&self) -> DeviceKind {
        self.inner.kind()
    }
    fn name(&self) -> String {
        self.inner.name()
    }
    fn mem_info(&self) -> Result<MemInfo> {
        self.inner.mem_info()
    }
    fn alloc_device(&self, bytes: u64) -> Result<DevicePtr> {
        self.device_allocs.fetch_add(1, Ordering::SeqCst);
        self.inner.alloc_device(bytes)
    }
    fn free_device(&self, ptr: DevicePtr) -> Result<()> {
        self.inner.free_device(ptr)
    }
    fn alloc_host(&self, bytes: u64, kind: HostMemKind) -> Result<HostPtr> {
        self.host_allocs.fetch_add(1, Ordering::SeqCst);
        self.inner.alloc_host(bytes, kind)
    }
    fn free_host(&self, ptr: HostPtr) -> Result<()> {
        self.host_frees.fetch_add(1, Ordering::SeqCst);
        self.inner.free_host(ptr)
    }
    fn host_write(&self, dst: HostPtr, offset: u64, src: &[u8]) -> Result<()> {
        self.inner.host_write(dst, offset, src)
    }
    fn host_read(&self, src: HostPtr, offset: u64, dst: &mut [u8]) -> Result<()> {
        self.inner.host_read(src, offset, dst)
    }
    fn can_register_host_files(&self) -> bool {
        !self.refuse_register.load(Ordering::SeqCst)
    }
    fn register_host_file(&self, map: Arc<memmap2::Mmap>) -> Result<HostPtr> {
        if self.refuse_register.load(Ordering::SeqCst) {
            return Err(ferry_pager::Error::InvalidArgument(
                "test device cannot register host memory in place".into(),
            ));
        }
        self.registrations.fetch_add(1, Ordering::SeqCst);
        self.inner.register_host_file(map)
    }
    fn unregister_host(&self, ptr: HostPtr) -> Result<()> {
        self.unregistrations.fetch_add(1, Ordering::SeqCst);
        self.inner.unregister_host(ptr)
    }
    fn create_stream(&self) -> Result<StreamId> {
        self.inner.create_stream()
    }
    fn create_event(&self) -> Result<EventId> {
        self.events_created.fetch_add(1, Ordering::SeqCst);
        self.inner.create_event()
    }
    fn record_event(&self, event: EventId, stream: StreamId) -> Result<()> {
        self.inner.record_event(event, stream)
    }
    fn wait_event(&self, stream: StreamId, event: EventId) -> Result<()> {
        self.inner.wait_event(stream, event)
    }
    fn event_done(&self, event: EventId) -> Result<bool> {
        self.inner.event_done(event)
    }
    fn sync_event(&self, event: EventId) -> Result<()> {
        self.inner.sync_event(event)
    }
    fn event_elapsed(&self, start: EventId, end: EventId) -> Result<Duration> {
        self.inner.event_elapsed(start, end)
    }
    fn sync_stream(&self, stream: StreamId) -> Result<()> {
        self.inner.sync_stream(stream)
    }
    fn copy_h2d(
        &self,
        stream: StreamId,
        dst: DevicePtr,
        src: HostPtr,
        src_offset: u64,
        len: u64,
    ) -> Result<()> {
        self.copies.fetch_add(1, Ordering::SeqCst);
        self.inner.copy_h2d(stream, dst, src, src_offset, len)
    }
    fn copy_h2d_pageable(&self, stream: StreamId, dst: DevicePtr, src: &[u8]) -> Result<()> {
        self.inner.copy_h2d_pageable(stream, dst, src)
    }
    fn copy_d2h(
        &self,
        stream: StreamId,
        dst: HostPtr,
        dst_offset: u64,
        src: DevicePtr,
        len: u64,
    ) -> Result<()> {
        self.inner.copy_d2h(stream, dst, dst_offset, src, len)
    }
    fn busy(&self, stream: StreamId, duration: Duration) -> Result<()> {
        self.inner.busy(stream, duration)
    }
}
