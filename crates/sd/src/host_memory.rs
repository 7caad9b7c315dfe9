//! The default host budget: every weight in RAM when the weights fit comfortably in the memory
//! the machine has available, otherwise as much as fits, with the rest streamed from disk
//! (`docs/disk-tier.md`), so that a model larger than RAM never makes the machine swap.

/// Memory left to the rest of the process (activations, f32 copies of the layer in use, the
/// text encoders' and VAE's working set) and to the system: the larger of 2 GiB and an eighth
/// of the available memory.
pub fn margin(available: u64) -> u64 {
    (2u64 << 30).max(available / 8)
}

/// The host budget to use when the user gave none: `None` (every weight in RAM) when
/// `weight_bytes` fit in `available` less the [`margin`], else what is left after the margin
/// (at least 1 byte, so a machine with no memory to spare streams everything and the disk
/// tier's own minimum decides whether that can work).
pub fn default_host_budget(weight_bytes: u64, available: u64) -> Option<u64> {
    let usable = available.saturating_sub(margin(available));
    (weight_bytes > usable).then_some(usable.max(1))
}

/// `MemAvailable` of `/proc/meminfo` in bytes (Linux); `None` where it cannot be read.
pub fn available() -> Option<u64> {
    parse_mem_available(&std::fs::read_to_string("/proc/meminfo").ok()?)
}

/// The `MemAvailable:` line of a `/proc/meminfo` text, in bytes.
pub fn parse_mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?;
    let mut parts = line.split_whitespace();
    let value: u64 = parts.next()?.parse().ok()?;
    match parts.next() {
        Some("kB") => value.checked_mul(1024),
        None => Some(value),
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn weights_that_fit_stay_in_ram_and_larger_ones_get_what_is_left() {
        // 16 GiB available: margin 2 GiB, 14 GiB usable.
        assert_eq!(default_host_budget(13 * GIB, 16 * GIB), None);
        assert_eq!(default_host_budget(14 * GIB, 16 * GIB), None);
        assert_eq!(default_host_budget(14 * GIB + 1, 16 * GIB), Some(14 * GIB));
        // 64 GiB available: the margin is an eighth.
        assert_eq!(default_host_budget(60 * GIB, 64 * GIB), Some(56 * GIB));
        // Nothing to spare: stream everything.
        assert_eq!(default_host_budget(GIB, GIB), Some(1));
        assert_eq!(margin(0), 2 * GIB);
    }

    #[test]
    fn mem_available_is_read_from_meminfo() {
        let text = "MemTotal:       24563788 kB\nMemFree:         1000 kB\n\
                    MemAvailable:   20123456 kB\nBuffers: 1 kB\n";
        assert_eq!(parse_mem_available(text), Some(20_123_456 * 1024));
        assert_eq!(parse_mem_available("MemTotal: 5 kB\n"), None);
        assert_eq!(parse_mem_available("MemAvailable: x kB\n"), None);
        assert_eq!(parse_mem_available("MemAvailable: 5 MB\n"), None);
        // This machine's, where there is one.
        if let Some(a) = available() {
            assert!(a > 0);
        }
    }
}
