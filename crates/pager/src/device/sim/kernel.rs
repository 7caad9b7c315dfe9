//! Simulated kernels: what a kernel declares it reads and writes ([`KernelSpec`]) and the view of
//! device memory its body gets ([`SimMemory`]).

use crate::device::{DevicePtr, DeviceRange};
use crate::error::{Error, Result};
use std::collections::BTreeMap;
use std::time::Duration;

/// What a simulated kernel reads, writes and costs.
#[derive(Clone, Debug, Default)]
pub struct KernelSpec {
    /// Name shown in race reports and traces.
    pub name: String,
    /// Modelled duration.
    pub duration: Duration,
    /// Device ranges the kernel reads.
    pub reads: Vec<DeviceRange>,
    /// Device ranges the kernel writes.
    pub writes: Vec<DeviceRange>,
}

impl KernelSpec {
    /// A kernel called `name` that runs for `duration`.
    pub fn new(name: impl Into<String>, duration: Duration) -> Self {
        KernelSpec {
            name: name.into(),
            duration,
            reads: Vec::new(),
            writes: Vec::new(),
        }
    }
    /// Declares a range the kernel reads.
    pub fn reads(mut self, r: DeviceRange) -> Self {
        self.reads.push(r);
        self
    }
    /// Declares a range the kernel writes.
    pub fn writes(mut self, r: DeviceRange) -> Self {
        self.writes.push(r);
        self
    }
}

/// Device memory as a simulated kernel sees it: reads see memory at the kernel's start time, writes
/// land at its end time. Accesses must stay inside the ranges the kernel declared.
pub struct SimMemory<'a> {
    pub(super) allocs: &'a BTreeMap<u64, Vec<u8>>,
    pub(super) spec: &'a KernelSpec,
    pub(super) writes: Vec<(DeviceRange, Vec<u8>)>,
}

impl SimMemory<'_> {
    /// The bytes of `r`, which must lie inside a declared read (or write) range.
    pub fn read(&self, r: DeviceRange) -> Result<Vec<u8>> {
        Ok(self.bytes(r)?.to_vec())
    }

    /// The bytes of `r` in place (no copy), under the same rule as [`SimMemory::read`].
    pub fn bytes(&self, r: DeviceRange) -> Result<&[u8]> {
        let declared = self.spec.reads.iter().chain(&self.spec.writes);
        if !declared.clone().any(|d| contains(d, &r)) {
            return Err(Error::OutOfBounds(format!(
                "kernel '{}' reads {r}, which it did not declare",
                self.spec.name
            )));
        }
        slice(self.allocs, r)
    }

    /// The f32 values of `r` (little-endian), which must lie inside a declared range.
    pub fn read_f32(&self, r: DeviceRange) -> Result<Vec<f32>> {
        let bytes = self.read(r)?;
        Ok(bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }

    /// Writes `data` at `r.ptr`; `r.len` must equal `data.len()` and lie inside a declared write.
    pub fn write(&mut self, r: DeviceRange, data: &[u8]) -> Result<()> {
        if r.len != data.len() as u64 {
            return Err(Error::InvalidArgument(format!(
                "kernel '{}' writes {} bytes into a range of {} bytes",
                self.spec.name,
                data.len(),
                r.len
            )));
        }
        if !self.spec.writes.iter().any(|d| contains(d, &r)) {
            return Err(Error::OutOfBounds(format!(
                "kernel '{}' writes {r}, which it did not declare",
                self.spec.name
            )));
        }
        slice(self.allocs, r)?;
        self.writes.push((r, data.to_vec()));
        Ok(())
    }

    /// Writes f32 values (little-endian) starting at `ptr`.
    pub fn write_f32(&mut self, ptr: DevicePtr, data: &[f32]) -> Result<()> {
        let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.write(DeviceRange::new(ptr, bytes.len() as u64), &bytes)
    }
}

/// Whether `inner` lies inside `outer`.
pub(super) fn contains(outer: &DeviceRange, inner: &DeviceRange) -> bool {
    outer.ptr.0 <= inner.ptr.0 && inner.end() <= outer.end()
}

pub(super) fn locate(
    allocs: &BTreeMap<u64, Vec<u8>>,
    r: DeviceRange,
) -> Result<(u64, usize, usize)> {
    let (base, mem) = allocs
        .range(..=r.ptr.0)
        .next_back()
        .ok_or_else(|| Error::OutOfBounds(format!("{r} is not in any device allocation")))?;
    let off = r.ptr.0 - base;
    if off + r.len > mem.len() as u64 {
        return Err(Error::OutOfBounds(format!(
            "{r} runs past the device allocation at 0x{base:x} of {} bytes",
            mem.len()
        )));
    }
    Ok((*base, off as usize, (off + r.len) as usize))
}

pub(super) fn slice(allocs: &BTreeMap<u64, Vec<u8>>, r: DeviceRange) -> Result<&[u8]> {
    let (base, a, b) = locate(allocs, r)?;
    Ok(&allocs[&base][a..b])
}
