//! Exporting device bytes to a host-side consumer (the Python binding's zero-copy tensor views).
//!
//! The simulated device memory is host memory: each device allocation is one heap buffer that is
//! never resized or moved while it lives. [`SimDevice::export_range`] hands out the host address
//! of a device range so that a host engine can read it in place, without a device→host copy.

use super::kernel::locate;
use super::SimDevice;
use crate::device::DeviceRange;
use crate::error::Result;

impl SimDevice {
    /// Applies every effect issued so far (waits for all streams), then returns the host address
    /// of the bytes of `range`, which must lie inside one live device allocation.
    ///
    /// The address stays valid until that allocation is freed. The bytes there change only while
    /// the device applies deferred effects, i.e. inside later calls on this device (syncs, frees,
    /// host-time advances): a reader must finish reading, or re-export, before making such a
    /// call, and must never write through the address (the simulator and its race checker do
    /// not see host writes).
    pub fn export_range(&self, range: DeviceRange) -> Result<*const u8> {
        let mut st = self.lock();
        st.sync_all()?;
        let (base, start, _) = locate(&st.device, range)?;
        let mem = &st.device[&base];
        // `start <= mem.len()` by `locate`; the pointer is derived from the allocation's buffer.
        Ok(mem[start..].as_ptr())
    }
}
