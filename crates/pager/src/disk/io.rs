//! The one place with `unsafe` in the disk tier: opening a file with `O_DIRECT`, `pread` into an
//! aligned buffer, `posix_fadvise`, `statx` and the block-size lookup, all through `libc`.
//!
//! Everything here is a thin wrapper that turns a libc return code into a `std::io::Error`; the
//! policy (fallbacks, error messages naming the file and offset) lives in the parent module.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::ptr::NonNull;

/// Fallback alignment for `O_DIRECT` when neither `statx` nor sysfs tell us.
pub const DEFAULT_ALIGN: u64 = 4096;

/// A heap buffer whose start is aligned to a power of two (what `O_DIRECT` reads need).
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: the buffer is uniquely owned heap memory, like a `Vec<u8>`.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes (at least 1) aligned to `align` (a power of two).
    pub fn new(len: usize, align: usize) -> io::Result<AlignedBuf> {
        let layout = Layout::from_size_align(len.max(1), align.max(1))
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        // SAFETY: `layout` has a non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::OutOfMemory,
                format!("cannot allocate a {len}-byte aligned read buffer"),
            )
        })?;
        Ok(AlignedBuf { ptr, layout })
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.layout.size()
    }

    /// Whether it is empty (never: buffers hold at least one byte).
    pub fn is_empty(&self) -> bool {
        self.layout.size() == 0
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` points to `layout.size()` initialised (zeroed) bytes that we own.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.layout.size()) }
    }

    /// The bytes, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` makes the access unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with exactly this layout.
        unsafe { dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

fn cpath(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// Opens `path` read-only, with `O_DIRECT` when `direct`.
pub fn open(path: &Path, direct: bool) -> io::Result<File> {
    let c = cpath(path)?;
    let mut flags = libc::O_RDONLY | libc::O_CLOEXEC;
    if direct {
        flags |= libc::O_DIRECT;
    }
    // SAFETY: `c` is a valid NUL-terminated string; `open` does not keep the pointer.
    let fd = unsafe { libc::open(c.as_ptr(), flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a freshly opened descriptor that nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// One `pread` of up to `buf.len()` bytes at `offset`; returns the bytes read (0 at end of file).
pub fn pread(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let off = libc::off_t::try_from(offset)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
    loop {
        // SAFETY: `buf` is a valid writable region of `buf.len()` bytes for the whole call.
        let n = unsafe {
            libc::pread(
                file.as_raw_fd(),
                buf.as_mut_ptr().cast::<libc::c_void>(),
                buf.len(),
                off,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Drops the file's pages from the page cache (`POSIX_FADV_DONTNEED`), for cold-read benchmarks.
pub fn drop_cache(file: &File) -> io::Result<()> {
    // SAFETY: plain syscall on a valid descriptor; no memory is passed.
    let r = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    Ok(())
}

/// Hints sequential access (`POSIX_FADV_SEQUENTIAL`) for buffered reads; errors are ignored.
pub fn advise_sequential(file: &File) {
    // SAFETY: plain syscall on a valid descriptor; no memory is passed.
    let _ = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL) };
}

/// The `O_DIRECT` (offset, memory) alignment that `statx(STATX_DIOALIGN)` reports, if the kernel
/// and the filesystem report one (Linux ≥ 6.1).
pub fn statx_dio_align(file: &File) -> Option<(u64, u64)> {
    let empty = c"";
    // SAFETY: `statx` is plain old data; zero is a valid value for every field.
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: `empty` is a valid C string; with AT_EMPTY_PATH the descriptor itself is queried;
    // `st` is a valid out-pointer for the duration of the call.
    let r = unsafe {
        libc::statx(
            file.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut st,
        )
    };
    if r != 0 || st.stx_mask & libc::STATX_DIOALIGN == 0 || st.stx_dio_offset_align == 0 {
        return None;
    }
    Some((
        st.stx_dio_offset_align as u64,
        st.stx_dio_mem_align.max(1) as u64,
    ))
}

/// The logical block size of the block device holding the file, from sysfs.
pub fn logical_block_size(file: &File) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let dev = file.metadata().ok()?.dev();
    // glibc's gnu_dev_major / gnu_dev_minor encoding.
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    let base = format!("/sys/dev/block/{major}:{minor}");
    // A partition has no queue/ of its own; its parent directory (the disk) does.
    for p in [
        format!("{base}/queue/logical_block_size"),
        format!("{base}/../queue/logical_block_size"),
    ] {
        if let Ok(s) = std::fs::read_to_string(&p) {
            if let Ok(v) = s.trim().parse::<u64>() {
                if v.is_power_of_two() {
                    return Some(v);
                }
            }
        }
    }
    None
}
