//! Output files that never lose work: every file `txt2img` writes (images, latents, traces) is
//! written to a temporary file in the target's directory, flushed to disk, then renamed over the
//! target. An existing file at the target is replaced only by a complete new one; on any error it
//! is left as it was and the temporary file is removed.

use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

/// A file that could not be written (or a target that cannot be written to).
#[derive(Debug, thiserror::Error)]
#[error("cannot write {}", path.display())]
pub struct WriteError {
    /// The target path (not the temporary file).
    pub path: PathBuf,
    /// What failed.
    #[source]
    pub source: io::Error,
}

impl WriteError {
    fn new(path: &Path, source: io::Error) -> Self {
        WriteError {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// The directory a file at `path` lives in (`.` for a bare file name).
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// A temporary file next to `path`, named after it (`.NAME.XXXXXX.tmp`), with the permissions a
/// newly created file would get (or the existing target's).
fn temp_next_to(path: &Path) -> io::Result<tempfile::NamedTempFile> {
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidInput, "the path does not name a file")
    })?;
    let dir = parent_dir(path);
    let mut prefix = std::ffi::OsString::from(".");
    prefix.push(name);
    prefix.push(".");
    let mut b = tempfile::Builder::new();
    b.prefix(&prefix).suffix(".tmp");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        // Like File::create: 0o666 less the umask, unless the target exists (keep its mode).
        let mode = match std::fs::metadata(path) {
            Ok(m) if m.is_file() => m.permissions().mode() & 0o7777,
            _ => 0o666,
        };
        b.permissions(std::fs::Permissions::from_mode(mode));
    }
    b.tempfile_in(dir)
}

/// Writes `path` atomically: `write` fills a buffered temporary file in the same directory, which
/// is synced and renamed over `path`. If `write` (or anything after it) fails, `path` keeps its
/// previous contents, if any, and the temporary file is removed.
pub fn write_atomic<F>(path: &Path, write: F) -> Result<(), WriteError>
where
    F: FnOnce(&mut dyn Write) -> io::Result<()>,
{
    let fail = |e: io::Error| WriteError::new(path, e);
    if path.is_dir() {
        return Err(fail(io::Error::other("is a directory")));
    }
    // Dropping `tmp` on any early return deletes the temporary file.
    let mut tmp = temp_next_to(path).map_err(fail)?;
    {
        let mut w = BufWriter::new(tmp.as_file_mut());
        write(&mut w).map_err(fail)?;
        w.flush().map_err(fail)?;
    }
    tmp.as_file().sync_all().map_err(fail)?;
    // On failure the PersistError hands the temporary file back; dropping it deletes it.
    tmp.persist(path).map_err(|e| fail(e.error))?;
    // Make the rename itself durable (best effort: not every platform can sync a directory).
    if let Ok(d) = std::fs::File::open(parent_dir(path)) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Writes `bytes` to `path` atomically (see [`write_atomic`]).
pub fn write_bytes(path: &Path, bytes: &[u8]) -> Result<(), WriteError> {
    write_atomic(path, |w| w.write_all(bytes))
}

/// Checks, before any work is done, that a file can later be written at `path`: the path names a
/// file (not a directory) whose directory exists and accepts new files (a temporary file is
/// created there and removed).
pub fn check_writable(path: &Path) -> Result<(), WriteError> {
    if path.is_dir() {
        return Err(WriteError::new(path, io::Error::other("is a directory")));
    }
    let dir = parent_dir(path);
    if !dir.is_dir() {
        let e = match std::fs::metadata(dir) {
            Err(e) => io::Error::new(
                e.kind(),
                format!("directory {} does not exist ({e})", dir.display()),
            ),
            Ok(_) => io::Error::other(format!("{} is not a directory", dir.display())),
        };
        return Err(WriteError::new(path, e));
    }
    temp_next_to(path).map(drop).map_err(|e| {
        WriteError::new(
            path,
            io::Error::new(
                e.kind(),
                format!("cannot create files in {} ({e})", dir.display()),
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn writes_and_replaces_whole_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.bin");
        write_bytes(&p, b"first").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"first");
        write_bytes(&p, b"second, longer").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"second, longer");
        assert_eq!(entries(dir.path()), ["a.bin"], "no temporary file left");
    }

    #[cfg(unix)]
    #[test]
    fn new_files_are_not_private_and_existing_modes_are_kept() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.bin");
        write_bytes(&p, b"x").unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        // What File::create gives under the current umask.
        let q = dir.path().join("b.bin");
        std::fs::File::create(&q).unwrap();
        let want = std::fs::metadata(&q).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, want);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        write_bytes(&p, b"y").unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
    }

    #[test]
    fn a_failing_write_keeps_the_old_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("keep.png");
        std::fs::write(&p, b"precious earlier image").unwrap();
        let e = write_atomic(&p, |w| {
            w.write_all(&[0u8; 100_000])?;
            Err(io::Error::other("injected failure"))
        })
        .unwrap_err();
        assert_eq!(e.path, p);
        assert!(e.source.to_string().contains("injected failure"));
        assert_eq!(std::fs::read(&p).unwrap(), b"precious earlier image");
        assert_eq!(entries(dir.path()), ["keep.png"]);
    }

    #[test]
    fn a_directory_target_or_a_missing_directory_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        std::fs::write(sub.join("inside"), b"kept").unwrap();
        assert!(write_bytes(&sub, b"x").is_err());
        assert!(check_writable(&sub).is_err());
        assert_eq!(std::fs::read(sub.join("inside")).unwrap(), b"kept");
        assert_eq!(entries(dir.path()), ["sub"]);
        let missing = dir.path().join("no/such/dir/x.png");
        let e = check_writable(&missing).unwrap_err();
        assert!(e.source.to_string().contains("does not exist"), "{e:?}");
        assert!(write_bytes(&missing, b"x").is_err());
        check_writable(&dir.path().join("fine.png")).unwrap();
        assert_eq!(entries(dir.path()), ["sub"], "the probe leaves nothing");
    }
}
