//! Ferry's lowest layer: the device abstraction (CUDA and a deterministic simulated GPU), the pinned
//! host tier that holds every weight once, the device arena that holds a budget, and the residency
//! bookkeeping (weight groups, pin counts, eviction policies) that the scheduler drives.

pub mod device;
pub mod error;

pub use device::{
    Device, DeviceKind, DevicePtr, DeviceRange, EventId, HostMemKind, HostPtr, MemInfo, StreamId,
};
pub use error::{Error, Result};
pub mod arena;
pub mod disk;
pub mod host;
pub mod residency;
pub mod weights;
pub use arena::{Arena, Extent, ExtentAllocator};
pub use disk::{
    DiskConfig, DiskFile, DiskRead, DiskReadTiming, DiskStats, DiskTier, ReadMode, SimDiskConfig,
};
pub use host::{HostStore, HostTensor, LoadOptions, RawTensor, TensorId};
pub use residency::{GroupId, GroupView, Pager, PagerStats, Policy};
pub use weights::{DType, TensorInfo, WeightsFile};
