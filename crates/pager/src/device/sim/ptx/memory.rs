//! Global memory as the interpreter sees it: a trait the simulated device can implement, and a
//! simple allocation-based implementation for tests and tools.

use std::collections::BTreeMap;

/// Device global memory: byte reads and writes at 64-bit addresses, refused outside live
/// allocations.
pub trait GlobalMemory {
    /// Reads `buf.len()` bytes at `addr`; the error says why (e.g. no live allocation).
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), String>;
    /// Writes `data` at `addr`; the error says why.
    fn write(&mut self, addr: u64, data: &[u8]) -> Result<(), String>;
}

/// Global memory made of separate allocations with unmapped gaps between them.
#[derive(Debug, Default, Clone)]
pub struct VecMemory {
    allocs: BTreeMap<u64, Vec<u8>>,
    next: u64,
}

/// Where [`VecMemory`] places its first allocation.
const BASE: u64 = 0x0000_0001_0000_0000;

impl VecMemory {
    /// Empty memory.
    pub fn new() -> Self {
        Self {
            allocs: BTreeMap::new(),
            next: BASE,
        }
    }

    /// Allocates `size` zeroed bytes (256-byte aligned, with a gap after); returns the address.
    pub fn alloc(&mut self, size: usize) -> u64 {
        self.alloc_bytes(&vec![0; size])
    }

    /// Allocates a copy of `data`; returns the address.
    pub fn alloc_bytes(&mut self, data: &[u8]) -> u64 {
        let addr = self.next.max(BASE);
        self.allocs.insert(addr, data.to_vec());
        self.next = (addr + data.len() as u64 + 512).div_ceil(256) * 256;
        addr
    }

    /// Allocates the little-endian bytes of `data`.
    pub fn alloc_f32(&mut self, data: &[f32]) -> u64 {
        let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.alloc_bytes(&bytes)
    }

    /// Allocates the little-endian bytes of `data`.
    pub fn alloc_u16(&mut self, data: &[u16]) -> u64 {
        let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.alloc_bytes(&bytes)
    }

    /// Frees the allocation at `addr`; false if there was none.
    pub fn free(&mut self, addr: u64) -> bool {
        self.allocs.remove(&addr).is_some()
    }

    /// The bytes of the allocation starting at `addr`.
    pub fn bytes(&self, addr: u64) -> Option<&[u8]> {
        self.allocs.get(&addr).map(Vec::as_slice)
    }

    /// The allocation at `addr` read as f32 values.
    pub fn f32s(&self, addr: u64) -> Vec<f32> {
        self.bytes(addr)
            .unwrap_or(&[])
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }

    /// The allocation at `addr` read as u16 values.
    pub fn u16s(&self, addr: u64) -> Vec<u16> {
        self.bytes(addr)
            .unwrap_or(&[])
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect()
    }

    fn locate(&self, addr: u64, len: usize) -> Result<(u64, usize), String> {
        let (&start, buf) = self
            .allocs
            .range(..=addr)
            .next_back()
            .ok_or_else(|| format!("address {addr:#x} is in no allocation"))?;
        let off = (addr - start) as usize;
        if off.checked_add(len).is_none_or(|end| end > buf.len()) {
            return Err(format!(
                "access of {len} bytes at {addr:#x} is outside allocation {start:#x}+{}",
                buf.len()
            ));
        }
        Ok((start, off))
    }
}

impl GlobalMemory for VecMemory {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), String> {
        let (start, off) = self.locate(addr, buf.len())?;
        let src = &self.allocs[&start][off..off + buf.len()];
        buf.copy_from_slice(src);
        Ok(())
    }

    fn write(&mut self, addr: u64, data: &[u8]) -> Result<(), String> {
        let (start, off) = self.locate(addr, data.len())?;
        if let Some(b) = self.allocs.get_mut(&start) {
            b[off..off + data.len()].copy_from_slice(data);
        }
        Ok(())
    }
}
