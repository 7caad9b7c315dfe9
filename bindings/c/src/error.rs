//! Status codes, the thread-local last-error message, and the guard every entry point runs in.

use std::cell::RefCell;
use std::ffi::{c_char, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// The result of every `ferry_` call that can fail; the message is in `ferry_last_error()`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FerryStatus {
    /// Success.
    Ok = 0,
    /// A required pointer argument was null.
    NullPointer = 1,
    /// A string argument was not valid UTF-8.
    InvalidUtf8 = 2,
    /// A handle that was freed, never created, or of another type.
    InvalidHandle = 3,
    /// An argument or call that does not fit the state (unknown name, call out of order, ...).
    InvalidArgument = 4,
    /// The caller's output buffer is too small; the needed size was written.
    BufferTooSmall = 5,
    /// No CUDA driver or no such GPU.
    NoDevice = 6,
    /// The budget cannot hold what the mode needs.
    BudgetTooSmall = 7,
    /// A device or host allocation did not fit.
    OutOfMemory = 8,
    /// A device call failed (CUDA error, simulated fault, race, bounds).
    Device = 9,
    /// A file could not be read, parsed or written.
    Io = 10,
    /// The operation is not available on this device.
    Unsupported = 11,
    /// Ferry panicked internally; the call had no defined effect. Please report it.
    Panic = 12,
}

/// An error on its way to the caller.
#[derive(Debug)]
pub struct FfiError {
    pub status: FerryStatus,
    pub message: String,
}

pub type FfiResult<T> = Result<T, FfiError>;

impl FfiError {
    pub fn new(status: FerryStatus, message: impl Into<String>) -> FfiError {
        FfiError {
            status,
            message: message.into(),
        }
    }
}

pub fn invalid(message: impl Into<String>) -> FfiError {
    FfiError::new(FerryStatus::InvalidArgument, message)
}

/// The error's message with its causes joined by `: `.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let next = c.to_string();
        if !s.ends_with(&next) {
            s.push_str(": ");
            s.push_str(&next);
        }
        cur = c.source();
    }
    s
}

fn pager_status(e: &ferry_pager::Error) -> FerryStatus {
    use ferry_pager::Error as E;
    match e {
        E::NoDriver | E::NoDevice(_) => FerryStatus::NoDevice,
        E::OutOfMemory { .. } => FerryStatus::OutOfMemory,
        E::InvalidHandle(_) | E::InvalidArgument(_) => FerryStatus::InvalidArgument,
        E::BadFile { .. } | E::Io { .. } => FerryStatus::Io,
        E::Deferred(inner) => pager_status(inner),
        _ => FerryStatus::Device,
    }
}

impl From<ferry_pager::Error> for FfiError {
    fn from(e: ferry_pager::Error) -> FfiError {
        FfiError::new(pager_status(&e), chain(&e))
    }
}

impl From<ferry_sched::Error> for FfiError {
    fn from(e: ferry_sched::Error) -> FfiError {
        let status = match &e {
            ferry_sched::Error::Device(d) => pager_status(d),
            ferry_sched::Error::BudgetTooSmall { .. } => FerryStatus::BudgetTooSmall,
            ferry_sched::Error::InvalidArgument(_) => FerryStatus::InvalidArgument,
        };
        FfiError::new(status, chain(&e))
    }
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(message: &str) {
    // Interior NULs cannot cross a C string; they are replaced.
    let text = CString::new(message.replace('\0', "\\0")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = text);
}

/// The last error message set on this thread (a pointer into thread-local storage).
pub fn last_error_ptr() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// Runs one entry point: a failure or a panic becomes a status and the thread's last error.
pub fn guard(f: impl FnOnce() -> FfiResult<()>) -> FerryStatus {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => FerryStatus::Ok,
        Ok(Err(e)) => {
            set_last_error(&e.message);
            e.status
        }
        Err(payload) => {
            let why = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied())
                .unwrap_or("unknown panic");
            set_last_error(&format!("internal error (panic): {why}"));
            FerryStatus::Panic
        }
    }
}

/// A borrowed C string argument as UTF-8.
///
/// # Safety
/// `p` is null or points to a NUL-terminated string that lives for `'a`.
pub unsafe fn str_arg<'a>(p: *const c_char, what: &str) -> FfiResult<&'a str> {
    if p.is_null() {
        return Err(FfiError::new(
            FerryStatus::NullPointer,
            format!("{what} is a null pointer"),
        ));
    }
    // SAFETY: non-null and NUL-terminated by the caller's contract.
    let c = unsafe { CStr::from_ptr(p) };
    c.to_str().map_err(|e| {
        FfiError::new(
            FerryStatus::InvalidUtf8,
            format!("{what} is not valid UTF-8 ({e})"),
        )
    })
}

/// Like [`str_arg`], but null gives `None`.
///
/// # Safety
/// As for [`str_arg`].
pub unsafe fn opt_str_arg<'a>(p: *const c_char, what: &str) -> FfiResult<Option<&'a str>> {
    if p.is_null() {
        Ok(None)
    } else {
        // SAFETY: forwarded from the caller.
        unsafe { str_arg(p, what) }.map(Some)
    }
}

/// Writes `value` through an out-pointer.
///
/// # Safety
/// `p` is null or valid for a write of `T`.
pub unsafe fn write_out<T>(p: *mut T, value: T, what: &str) -> FfiResult<()> {
    if p.is_null() {
        return Err(FfiError::new(
            FerryStatus::NullPointer,
            format!("{what} is a null pointer"),
        ));
    }
    // SAFETY: non-null and writable by the caller's contract; `T` is `Copy`-like plain data.
    unsafe { p.write(value) };
    Ok(())
}

/// Checks an out-pointer before any work is done.
pub fn check_out<T>(p: *mut T, what: &str) -> FfiResult<()> {
    if p.is_null() {
        Err(FfiError::new(
            FerryStatus::NullPointer,
            format!("{what} is a null pointer"),
        ))
    } else {
        Ok(())
    }
}

/// A borrowed array argument; null is allowed only when `len` is 0.
///
/// # Safety
/// `p` is null or valid for reads of `len` elements that live for `'a`.
pub unsafe fn slice_arg<'a, T>(p: *const T, len: usize, what: &str) -> FfiResult<&'a [T]> {
    if len == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(FfiError::new(
            FerryStatus::NullPointer,
            format!("{what} is a null pointer ({len} elements given)"),
        ));
    }
    // SAFETY: non-null and valid for `len` reads by the caller's contract.
    Ok(unsafe { std::slice::from_raw_parts(p, len) })
}

/// Copies `text` into a caller buffer of `cap` bytes, NUL-terminated, and writes its length
/// (without the NUL) to `len`. `buf == NULL && cap == 0` asks for the length only.
///
/// # Safety
/// `buf` is null or valid for `cap` writes; `len` is null or valid for a write.
pub unsafe fn write_text(
    text: &str,
    buf: *mut c_char,
    cap: usize,
    len: *mut usize,
) -> FfiResult<()> {
    // SAFETY: forwarded from the caller.
    unsafe { write_out(len, text.len(), "len") }?;
    if cap == 0 && buf.is_null() {
        return Ok(());
    }
    if buf.is_null() {
        return Err(FfiError::new(
            FerryStatus::NullPointer,
            format!("buf is a null pointer (capacity {cap})"),
        ));
    }
    let n = text.len().min(cap.saturating_sub(1));
    // SAFETY: `buf` is valid for `cap` writes and `n + 1 <= cap` (cap > 0 here unless n = 0,
    // and cap = 0 with a non-null buf writes nothing).
    unsafe {
        if cap > 0 {
            std::ptr::copy_nonoverlapping(text.as_ptr(), buf.cast::<u8>(), n);
            buf.add(n).write(0);
        }
    }
    if n < text.len() {
        return Err(FfiError::new(
            FerryStatus::BufferTooSmall,
            format!(
                "the text is {} bytes (plus a NUL), the buffer holds {cap}",
                text.len()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn last() -> String {
        // SAFETY: the pointer is the thread-local NUL-terminated message.
        unsafe { CStr::from_ptr(last_error_ptr()) }
            .to_string_lossy()
            .into_owned()
    }

    #[test]
    fn a_panic_becomes_a_status_and_a_message() {
        let s = guard(|| panic!("boom in the middle"));
        assert_eq!(s, FerryStatus::Panic);
        assert!(last().contains("boom in the middle"), "{}", last());
        assert_eq!(guard(|| Ok(())), FerryStatus::Ok);
        let s = guard(|| Err(invalid("with a\0nul")));
        assert_eq!(s, FerryStatus::InvalidArgument);
        assert_eq!(last(), "with a\\0nul");
    }

    #[test]
    fn the_last_error_is_per_thread() {
        guard(|| Err(invalid("main thread")));
        std::thread::spawn(|| {
            assert_eq!(last(), "");
            guard(|| Err(invalid("other thread")));
            assert_eq!(last(), "other thread");
        })
        .join()
        .unwrap();
        assert_eq!(last(), "main thread");
    }
}
