//! Prefetching transfer scheduler.
