//! A device whose every call succeeds at once and does nothing: for measuring the host-side cost
//! of the pager and the scheduler alone (benchmarks), never for correctness.

use super::{Device, DeviceKind, DevicePtr, EventId, HostMemKind, HostPtr, MemInfo, StreamId};
use crate::error::Result;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

/// A device whose calls do nothing.
#[derive(Debug, Default)]
pub struct NullDevice {
    next: AtomicU64,
    events: AtomicU32,
}

impl Device for NullDevice {
    fn kind(&self) -> DeviceKind {
        DeviceKind::Sim
    }
    fn name(&self) -> String {
        "null".into()
    }
    fn mem_info(&self) -> Result<MemInfo> {
        Ok(MemInfo {
            free: 1 << 40,
            total: 1 << 40,
        })
    }
    fn alloc_device(&self, _bytes: u64) -> Result<DevicePtr> {
        Ok(DevicePtr(1 << 40))
    }
    fn free_device(&self, _ptr: DevicePtr) -> Result<()> {
        Ok(())
    }
    fn alloc_host(&self, _bytes: u64, _kind: HostMemKind) -> Result<HostPtr> {
        Ok(HostPtr(self.next.fetch_add(1, Ordering::Relaxed)))
    }
    fn free_host(&self, _ptr: HostPtr) -> Result<()> {
        Ok(())
    }
    fn host_write(&self, _dst: HostPtr, _offset: u64, _src: &[u8]) -> Result<()> {
        Ok(())
    }
    fn host_read(&self, _src: HostPtr, _offset: u64, _dst: &mut [u8]) -> Result<()> {
        Ok(())
    }
    fn create_stream(&self) -> Result<StreamId> {
        Ok(StreamId(self.next.fetch_add(1, Ordering::Relaxed) as u32))
    }
    fn create_event(&self) -> Result<EventId> {
        Ok(EventId(self.events.fetch_add(1, Ordering::Relaxed)))
    }
    fn record_event(&self, _event: EventId, _stream: StreamId) -> Result<()> {
        Ok(())
    }
    fn wait_event(&self, _stream: StreamId, _event: EventId) -> Result<()> {
        Ok(())
    }
    fn event_done(&self, _event: EventId) -> Result<bool> {
        Ok(true)
    }
    fn sync_event(&self, _event: EventId) -> Result<()> {
        Ok(())
    }
    fn event_elapsed(&self, _start: EventId, _end: EventId) -> Result<Duration> {
        Ok(Duration::ZERO)
    }
    fn sync_stream(&self, _stream: StreamId) -> Result<()> {
        Ok(())
    }
    fn copy_h2d(&self, _s: StreamId, _d: DevicePtr, _h: HostPtr, _o: u64, _l: u64) -> Result<()> {
        Ok(())
    }
    fn copy_h2d_pageable(&self, _s: StreamId, _d: DevicePtr, _src: &[u8]) -> Result<()> {
        Ok(())
    }
    fn copy_d2h(&self, _s: StreamId, _h: HostPtr, _o: u64, _d: DevicePtr, _l: u64) -> Result<()> {
        Ok(())
    }
    fn busy(&self, _stream: StreamId, _duration: Duration) -> Result<()> {
        Ok(())
    }
}
