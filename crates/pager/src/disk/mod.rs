//! The disk tier: weights that stay in their file and are streamed to the device through a small
//! ring of pinned staging chunks.
//!
//! A [`DiskTier`] owns a file opened with `O_DIRECT` (or buffered reads where the filesystem
//! refuses it — [`DiskFile::fallback_reason`] says why), `chunks` pinned staging chunks of
//! `chunk_bytes` each, and `readers` threads fed through a `crossbeam-channel`. [`DiskTier::load`]
//! groups the requested file ranges into spans of at most one chunk, has the readers `pread`
//! each span (in aligned requests of at most `request_bytes`, through a per-reader aligned
//! buffer) into the next free chunk, then enqueues `copy_h2d` from the chunk and records the
//! chunk's *fence* event on the copy stream. A chunk is written again only after the host has
//! waited for its fence, so a copy never reads bytes of a later span.
//!
//! safetensors offsets are not aligned: a span's reads cover the aligned superset (alignment from
//! `statx(STATX_DIOALIGN)`, else the device's logical block size, else 4096) and only the wanted
//! bytes go into the chunk.
//!
//! On the simulated device ([`DiskTier::open_sim`]) reads take virtual time from a [`SimDisk`];
//! the host waits (in virtual time) for a span's reads before enqueuing its copies, and a
//! chunk-reuse checker records any write into a chunk that a copy may still be reading.

pub mod io;
mod sim;

pub use sim::{SimDisk, SimDiskConfig};

use crate::device::sim::SimDevice;
use crate::device::{Device, DevicePtr, EventId, HostMemKind, HostPtr, StreamId};
use crate::error::{Error, Result};
use crossbeam_channel::{Receiver, Sender};
use io::AlignedBuf;
use std::fmt;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;
use std::time::Instant;

/// Default number of staging chunks.
pub const DEFAULT_CHUNKS: usize = 4;
/// Default size of one staging chunk.
pub const DEFAULT_CHUNK_BYTES: u64 = 32 << 20;
/// Default size of one `pread` request.
pub const DEFAULT_REQUEST_BYTES: u64 = 4 << 20;
/// Default number of reader threads.
pub const DEFAULT_READERS: usize = 2;
/// High bits of [`DiskTier::host_handle`] values: no device hands out host handles this high.
const DISK_HANDLE_BASE: u64 = 0xFFFF_0000_0000_0000;
static NEXT_HANDLE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
/// Largest gap between two requested ranges that is read through rather than split into two spans.
const MAX_GAP: u64 = 1 << 20;

/// How a [`DiskTier`] reads and stages.
#[derive(Clone, Debug, PartialEq)]
pub struct DiskConfig {
    /// Pinned staging chunks in the ring (at least 1; 2 or more overlap reads with copies).
    pub chunks: usize,
    /// Bytes per staging chunk.
    pub chunk_bytes: u64,
    /// Largest single `pread`.
    pub request_bytes: u64,
    /// Reader threads.
    pub readers: usize,
    /// Try `O_DIRECT` (bypassing the page cache); buffered reads are used where it is refused.
    pub direct: bool,
    /// Host memory the tier may use (staging ring plus read buffers); `None` = no limit.
    pub host_budget: Option<u64>,
    /// Wait for each chunk's fence before reusing it. Only tests turn this off, to show that
    /// the chunk-reuse checker catches the race.
    #[doc(hidden)]
    pub fence_reuse: bool,
}

impl Default for DiskConfig {
    fn default() -> Self {
        DiskConfig {
            chunks: DEFAULT_CHUNKS,
            chunk_bytes: DEFAULT_CHUNK_BYTES,
            request_bytes: DEFAULT_REQUEST_BYTES,
            readers: DEFAULT_READERS,
            direct: true,
            host_budget: None,
            fence_reuse: true,
        }
    }
}

impl DiskConfig {
    /// Bytes of the staging ring (pinned).
    pub fn ring_bytes(&self) -> u64 {
        self.chunks as u64 * self.chunk_bytes
    }

    /// Host bytes the tier uses in all: the ring plus one aligned read buffer per reader.
    pub fn host_bytes(&self) -> u64 {
        self.ring_bytes() + self.readers as u64 * (self.request_bytes + 2 * io::DEFAULT_ALIGN)
    }
}

/// How a [`DiskFile`] is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadMode {
    /// `O_DIRECT`, bypassing the page cache.
    Direct,
    /// Ordinary buffered reads (the filesystem refused `O_DIRECT`, or it was not asked for).
    Buffered,
}

impl fmt::Display for ReadMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadMode::Direct => write!(f, "O_DIRECT"),
            ReadMode::Buffered => write!(f, "buffered"),
        }
    }
}

/// A file opened for streaming reads, remembering what it was at open so that truncation or
/// replacement during a run is reported instead of read.
#[derive(Debug)]
pub struct DiskFile {
    path: PathBuf,
    file: File,
    mode: ReadMode,
    fallback: Option<String>,
    align: u64,
    mem_align: u64,
    len: u64,
    ino: u64,
    dev: u64,
    mtime: (i64, i64),
}

fn io_err(path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl DiskFile {
    /// Opens `path`; with `direct`, tries `O_DIRECT` (checked with one aligned read) and falls
    /// back to buffered reads where the filesystem refuses it.
    pub fn open(path: impl AsRef<Path>, direct: bool) -> Result<DiskFile> {
        Self::open_with(path.as_ref(), direct, io::open)
    }

    /// [`DiskFile::open`] on a filesystem that refuses `O_DIRECT` (for tests of the fallback).
    #[doc(hidden)]
    pub fn open_refusing_direct(path: impl AsRef<Path>) -> Result<DiskFile> {
        Self::open_with(path.as_ref(), true, |p, direct| {
            if direct {
                Err(std::io::Error::from_raw_os_error(libc::EINVAL))
            } else {
                io::open(p, false)
            }
        })
    }

    fn open_with(
        path: &Path,
        direct: bool,
        open: impl Fn(&Path, bool) -> std::io::Result<File>,
    ) -> Result<DiskFile> {
        let buffered = || -> Result<File> {
            let f = open(path, false).map_err(|e| io_err(path, e))?;
            io::advise_sequential(&f);
            Ok(f)
        };
        let (file, mode, fallback) = if direct {
            match open(path, true) {
                Ok(f) => (f, ReadMode::Direct, None),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => (
                    buffered()?,
                    ReadMode::Buffered,
                    Some(format!("the filesystem refused O_DIRECT at open ({e})")),
                ),
                Err(e) => return Err(io_err(path, e)),
            }
        } else {
            (
                buffered()?,
                ReadMode::Buffered,
                Some("O_DIRECT not asked for".to_string()),
            )
        };
        let meta = file.metadata().map_err(|e| io_err(path, e))?;
        let (align, mem_align) = match mode {
            ReadMode::Direct => io::statx_dio_align(&file)
                .or_else(|| io::logical_block_size(&file).map(|b| (b, b)))
                .unwrap_or((io::DEFAULT_ALIGN, io::DEFAULT_ALIGN)),
            ReadMode::Buffered => (1, 1),
        };
        let mut df = DiskFile {
            path: path.to_path_buf(),
            file,
            mode,
            fallback,
            align: align.max(1),
            mem_align: mem_align.max(1),
            len: meta.len(),
            ino: meta.ino(),
            dev: meta.dev(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
        };
        if df.mode == ReadMode::Direct && df.len > 0 {
            // Some filesystems accept the flag at open and refuse the reads.
            let mut buf = df.buffer(df.align)?;
            let n = (df.align as usize).min(buf.len());
            if let Err(e) = io::pread(&df.file, &mut buf.as_mut_slice()[..n], 0) {
                if e.raw_os_error() != Some(libc::EINVAL) {
                    return Err(Error::DiskRead {
                        path: df.path.clone(),
                        offset: 0,
                        len: n as u64,
                        source: e,
                    });
                }
                df.file = buffered()?;
                df.mode = ReadMode::Buffered;
                df.fallback = Some(format!("the filesystem refused an O_DIRECT read ({e})"));
                df.align = 1;
                df.mem_align = 1;
            }
        }
        Ok(df)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// Its length when opened.
    pub fn len(&self) -> u64 {
        self.len
    }
    /// Whether it was empty when opened.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// `O_DIRECT` or buffered.
    pub fn mode(&self) -> ReadMode {
        self.mode
    }
    /// Why reads are buffered, when they are.
    pub fn fallback_reason(&self) -> Option<&str> {
        self.fallback.as_deref()
    }
    /// Offset and length alignment of reads (1 for buffered reads).
    pub fn alignment(&self) -> u64 {
        self.align
    }

    /// A read buffer of at least `bytes` (rounded up to the alignment) suitably aligned for
    /// [`DiskFile::read_range`].
    pub fn buffer(&self, bytes: u64) -> Result<AlignedBuf> {
        let a = self.align.max(self.mem_align).max(64);
        let len = bytes.max(1).div_ceil(self.align) * self.align;
        AlignedBuf::new(len as usize, a as usize).map_err(|e| io_err(&self.path, e))
    }

    /// Drops the file's cached pages (`posix_fadvise(DONTNEED)`), for cold reads.
    pub fn drop_cache(&self) -> Result<()> {
        io::drop_cache(&self.file).map_err(|e| io_err(&self.path, e))
    }

    /// An error if the file at the path is no longer the one opened (replaced, modified,
    /// truncated or grown).
    pub fn check_unchanged(&self) -> Result<()> {
        let changed = |message: String| Error::BadFile {
            path: self.path.clone(),
            message,
        };
        let now = self.file.metadata().map_err(|e| io_err(&self.path, e))?;
        if now.len() != self.len {
            return Err(changed(format!(
                "file changed size during the run: {} bytes at open, {} now (truncated or rewritten)",
                self.len,
                now.len()
            )));
        }
        if (now.mtime(), now.mtime_nsec()) != self.mtime {
            return Err(changed("file was modified during the run".into()));
        }
        match std::fs::metadata(&self.path) {
            Ok(m) if m.ino() == self.ino && m.dev() == self.dev => Ok(()),
            Ok(_) => Err(changed(
                "file was replaced during the run (the path names another file now)".into(),
            )),
            Err(e) => Err(changed(format!(
                "file was removed or renamed during the run ({e})"
            ))),
        }
    }

    /// Reads `[offset, offset + len)` through `buf` in aligned requests of at most `buf.len()`
    /// bytes, handing each piece of the wanted bytes to `out` with its distance from `offset`.
    pub fn read_range(
        &self,
        offset: u64,
        len: u64,
        buf: &mut AlignedBuf,
        mut out: impl FnMut(&[u8], u64) -> Result<()>,
    ) -> Result<()> {
        let end = offset.checked_add(len).filter(|&e| e <= self.len).ok_or_else(|| {
            Error::BadFile {
                path: self.path.clone(),
                message: format!(
                    "read of {len} bytes at offset {offset} runs past the end of the file ({} bytes)",
                    self.len
                ),
            }
        })?;
        let a = self.align;
        let cap = (buf.len() as u64 / a) * a;
        if cap == 0 {
            return Err(Error::InvalidArgument(format!(
                "read buffer of {} bytes is smaller than the alignment {a}",
                buf.len()
            )));
        }
        let mut pos = offset;
        while pos < end {
            let a_start = pos / a * a;
            let a_end = (end.div_ceil(a) * a).min(a_start + cap);
            let want_end = end.min(a_end);
            let n = (a_end - a_start) as usize;
            let dst = &mut buf.as_mut_slice()[..n];
            let mut got = 0usize;
            while (a_start + got as u64) < want_end {
                let r = io::pread(&self.file, &mut dst[got..], a_start + got as u64).map_err(
                    |source| Error::DiskRead {
                        path: self.path.clone(),
                        offset: a_start + got as u64,
                        len: (n - got) as u64,
                        source,
                    },
                )?;
                if r == 0 {
                    return Err(Error::BadFile {
                        path: self.path.clone(),
                        message: format!(
                            "file truncated during the run: read at offset {} returned nothing \
                             ({} bytes at open)",
                            a_start + got as u64,
                            self.len
                        ),
                    });
                }
                got += r;
            }
            let lo = (pos - a_start) as usize;
            let hi = (want_end - a_start) as usize;
            out(&dst[lo..hi], pos - offset)?;
            pos = want_end;
        }
        Ok(())
    }
}

/// One file range to bring to the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskRead {
    /// Offset in the file (any alignment).
    pub file_offset: u64,
    /// Bytes.
    pub len: u64,
    /// Where the bytes go on the device.
    pub dst: DevicePtr,
}

/// What a [`DiskTier`] has done so far.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DiskStats {
    /// [`DiskTier::load`] calls.
    pub loads: u64,
    /// Bytes asked for.
    pub requested_bytes: u64,
    /// Bytes read from the file (spans, including small gaps read through; not the alignment
    /// padding of `O_DIRECT` requests).
    pub read_bytes: u64,
    /// Spans read, one per use of a staging chunk.
    pub spans: u64,
    /// Host→device copies enqueued.
    pub copies: u64,
    /// Times the host waited for a chunk's fence before reusing it.
    pub fence_waits: u64,
    /// Virtual time the simulated disk was busy reading (simulated device only).
    pub sim_read_time: Duration,
}

/// One staged span's read from the file, on the tier's clock ([`DiskTier::clock`]): what a
/// trace shows as a disk read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskReadTiming {
    /// When the first read of the span was issued.
    pub start: Duration,
    /// When its last read completed.
    pub end: Duration,
    /// Bytes read.
    pub bytes: u64,
}

/// A write into a staging chunk while a copy from it could still be running (found by the
/// chunk-reuse checker on the simulated device).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReuseRace {
    /// The chunk.
    pub chunk: usize,
    /// Virtual time at which the new read started writing into it.
    pub write_at: Duration,
    /// Virtual time until which an earlier copy reads it.
    pub busy_until: Duration,
}

impl fmt::Display for ReuseRace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "staging chunk {} rewritten at {:?} while a copy reads it until {:?}",
            self.chunk, self.write_at, self.busy_until
        )
    }
}

struct Job {
    batch: usize,
    chunk: HostPtr,
    chunk_off: u64,
    file_off: u64,
    len: u64,
}

struct Done {
    batch: usize,
    result: Result<()>,
}

/// A contiguous file range staged in one chunk, and the copies out of it.
struct Span {
    start: u64,
    end: u64,
    pieces: Vec<DiskRead>,
}

struct SimClock {
    dev: Arc<SimDevice>,
    disk: SimDisk,
}

struct State {
    next_chunk: usize,
    fence_recorded: Vec<bool>,
    /// Virtual end of the last copy out of each chunk (simulated device only).
    busy_until: Vec<u64>,
    stats: DiskStats,
    races: Vec<ReuseRace>,
    /// Every span read so far, in order (for traces).
    timings: Vec<DiskReadTiming>,
    sim: Option<SimClock>,
}

/// Streams file ranges to the device through a ring of pinned staging chunks (module docs).
pub struct DiskTier {
    dev: Arc<dyn Device>,
    handle: HostPtr,
    file: Arc<DiskFile>,
    cfg: DiskConfig,
    chunks: Vec<HostPtr>,
    fences: Vec<EventId>,
    jobs: Option<Sender<Job>>,
    done: Receiver<Done>,
    threads: Vec<JoinHandle<()>>,
    state: Mutex<State>,
    /// Zero of [`DiskTier::clock`] on a real file.
    epoch: Instant,
}

impl fmt::Debug for DiskTier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DiskTier")
            .field("file", &self.file.path)
            .field("mode", &self.file.mode)
            .field("cfg", &self.cfg)
            .finish()
    }
}

impl DiskTier {
    /// Opens `path` for streaming to `dev`: allocates the staging ring and starts the readers.
    pub fn open(dev: Arc<dyn Device>, path: impl AsRef<Path>, cfg: DiskConfig) -> Result<Self> {
        let file = DiskFile::open(path, cfg.direct)?;
        Self::build(dev, file, cfg, None)
    }

    /// Like [`DiskTier::open`] with a file already opened.
    pub fn with_file(dev: Arc<dyn Device>, file: DiskFile, cfg: DiskConfig) -> Result<Self> {
        Self::build(dev, file, cfg, None)
    }

    /// Like [`DiskTier::open`] on the simulated device, with reads timed by a simulated disk
    /// (the bytes still come from the file).
    pub fn open_sim(
        dev: Arc<SimDevice>,
        path: impl AsRef<Path>,
        cfg: DiskConfig,
        disk: SimDiskConfig,
    ) -> Result<Self> {
        let clock = SimClock {
            dev: dev.clone(),
            disk: SimDisk::new(disk),
        };
        let file = DiskFile::open(path, cfg.direct)?;
        Self::build(dev, file, cfg, Some(clock))
    }

    fn build(
        dev: Arc<dyn Device>,
        file: DiskFile,
        cfg: DiskConfig,
        sim: Option<SimClock>,
    ) -> Result<Self> {
        if cfg.chunks == 0 || cfg.chunk_bytes == 0 || cfg.readers == 0 || cfg.request_bytes == 0 {
            return Err(Error::InvalidArgument(format!(
                "disk tier needs at least one chunk, one reader and non-zero sizes (chunks {}, \
                 chunk bytes {}, readers {}, request bytes {})",
                cfg.chunks, cfg.chunk_bytes, cfg.readers, cfg.request_bytes
            )));
        }
        if let Some(budget) = cfg.host_budget {
            if cfg.host_bytes() > budget {
                return Err(Error::InvalidArgument(format!(
                    "host budget of {budget} bytes is smaller than the disk tier's staging ring \
                     ({} chunks x {} bytes + {} reader buffers = {} bytes)",
                    cfg.chunks,
                    cfg.chunk_bytes,
                    cfg.readers,
                    cfg.host_bytes()
                )));
            }
        }
        let file = Arc::new(file);
        let mut chunks = Vec::with_capacity(cfg.chunks);
        let mut fences = Vec::with_capacity(cfg.chunks);
        let setup = (|| -> Result<()> {
            for _ in 0..cfg.chunks {
                chunks.push(dev.alloc_host(cfg.chunk_bytes, HostMemKind::Upload)?);
            }
            for _ in 0..cfg.chunks {
                fences.push(dev.create_sync_event()?);
            }
            Ok(())
        })();
        // Reader buffers are allocated up front so that an allocation failure leaks nothing.
        let bufs = setup.and_then(|()| {
            (0..cfg.readers)
                .map(|_| file.buffer(cfg.request_bytes))
                .collect::<Result<Vec<_>>>()
        });
        let bufs = match bufs {
            Ok(b) => b,
            Err(e) => {
                for &c in &chunks {
                    let _ = dev.free_host(c);
                }
                for &ev in &fences {
                    let _ = dev.destroy_event(ev);
                }
                return Err(e);
            }
        };
        let (jobs_tx, jobs_rx) = crossbeam_channel::unbounded::<Job>();
        let (done_tx, done_rx) = crossbeam_channel::unbounded::<Done>();
        let mut threads = Vec::with_capacity(cfg.readers);
        for (i, mut buf) in bufs.into_iter().enumerate() {
            let (rx, tx, rdev, rfile) =
                (jobs_rx.clone(), done_tx.clone(), dev.clone(), file.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("ferry-disk-{i}"))
                .spawn(move || {
                    for job in rx.iter() {
                        // A panicking reader still answers, so `load` never waits forever.
                        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            rfile.read_range(job.file_off, job.len, &mut buf, |b, at| {
                                rdev.host_write(job.chunk, job.chunk_off + at, b)
                            })
                        }))
                        .unwrap_or_else(|_| {
                            Err(Error::InvalidArgument(format!(
                                "disk reader panicked reading {} bytes at offset {} of {}",
                                job.len,
                                job.file_off,
                                rfile.path.display()
                            )))
                        });
                        if tx
                            .send(Done {
                                batch: job.batch,
                                result,
                            })
                            .is_err()
                        {
                            break;
                        }
                    }
                });
            match spawned {
                Ok(h) => threads.push(h),
                Err(e) => {
                    drop(jobs_tx);
                    for h in threads {
                        let _ = h.join();
                    }
                    for &c in &chunks {
                        let _ = dev.free_host(c);
                    }
                    for &ev in &fences {
                        let _ = dev.destroy_event(ev);
                    }
                    return Err(io_err(&file.path, e));
                }
            }
        }
        // Only the readers keep these ends: a dead reader pool then shows as a closed channel.
        drop(done_tx);
        drop(jobs_rx);
        let n = cfg.chunks;
        Ok(DiskTier {
            dev,
            handle: HostPtr(
                DISK_HANDLE_BASE | NEXT_HANDLE.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            ),
            file,
            cfg,
            chunks,
            fences,
            jobs: Some(jobs_tx),
            done: done_rx,
            threads,
            state: Mutex::new(State {
                next_chunk: 0,
                fence_recorded: vec![false; n],
                busy_until: vec![0; n],
                stats: DiskStats::default(),
                races: Vec::new(),
                timings: Vec::new(),
                sim,
            }),
            epoch: Instant::now(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A handle that stands for this tier's file where a host location is expected (e.g. a
    /// scheduler's tensor sources): (handle, file offset). It is not a host allocation; the
    /// scheduler routes copies from it through [`DiskTier::load`].
    pub fn host_handle(&self) -> HostPtr {
        self.handle
    }

    /// The file being streamed.
    pub fn file(&self) -> &DiskFile {
        &self.file
    }
    /// The configuration.
    pub fn config(&self) -> &DiskConfig {
        &self.cfg
    }
    /// What has been done so far.
    pub fn stats(&self) -> DiskStats {
        self.lock().stats.clone()
    }

    /// The clock [`DiskReadTiming`]s are measured on: the simulated device's virtual time for a
    /// simulated disk, else host time since the tier was opened.
    pub fn clock(&self) -> Duration {
        Self::clock_of(&self.lock(), self.epoch)
    }

    fn clock_of(st: &State, epoch: Instant) -> Duration {
        match st.sim.as_ref() {
            Some(sim) => sim.dev.now(),
            None => epoch.elapsed(),
        }
    }

    /// Every span read so far, in issue order.
    pub fn read_timings(&self) -> Vec<DiskReadTiming> {
        self.lock().timings.clone()
    }
    /// Chunk-reuse races found so far (simulated device only; empty unless fencing is off).
    pub fn reuse_races(&self) -> Vec<ReuseRace> {
        self.lock().races.clone()
    }
    /// The staging chunks' fence events, one per chunk (for tests that check fencing).
    pub fn fences(&self) -> &[EventId] {
        &self.fences
    }

    /// Groups sorted reads into spans of at most one chunk, splitting reads larger than a chunk.
    fn spans(&self, reads: &[DiskRead]) -> Vec<Span> {
        let cap = self.cfg.chunk_bytes;
        let mut sorted: Vec<DiskRead> = reads.iter().copied().filter(|r| r.len > 0).collect();
        sorted.sort_by_key(|r| (r.file_offset, r.dst));
        let mut spans: Vec<Span> = Vec::new();
        for r in sorted {
            let mut done = 0;
            while done < r.len {
                let off = r.file_offset + done;
                let fits = spans.last().is_some_and(|s| {
                    off >= s.start && off <= s.end + MAX_GAP && off < s.start + cap
                });
                if !fits {
                    spans.push(Span {
                        start: off,
                        end: off,
                        pieces: Vec::new(),
                    });
                }
                let Some(s) = spans.last_mut() else { break };
                let take = (r.len - done).min(s.start + cap - off);
                s.pieces.push(DiskRead {
                    file_offset: off,
                    len: take,
                    dst: r.dst.offset(done),
                });
                s.end = s.end.max(off + take);
                done += take;
            }
        }
        spans
    }

    /// Brings every `reads` range from the file to its device destination, with copies on
    /// `stream`. Returns once every copy is enqueued (not completed): work on `stream` after
    /// this call sees the bytes. On error, every read already started has finished before this
    /// returns, and the destinations hold unspecified bytes.
    pub fn load(&self, stream: StreamId, reads: &[DiskRead]) -> Result<()> {
        for r in reads {
            if r.file_offset
                .checked_add(r.len)
                .is_none_or(|e| e > self.file.len)
            {
                return Err(Error::BadFile {
                    path: self.file.path.clone(),
                    message: format!(
                        "read of {} bytes at offset {} runs past the end of the file ({} bytes)",
                        r.len, r.file_offset, self.file.len
                    ),
                });
            }
        }
        self.file.check_unchanged()?;
        let spans = self.spans(reads);
        let mut st = self.lock();
        st.stats.loads += 1;
        st.stats.requested_bytes += reads.iter().map(|r| r.len).sum::<u64>();
        let jobs = self
            .jobs
            .as_ref()
            .ok_or_else(|| Error::InvalidArgument("disk tier is shut down".into()))?;
        let n = self.chunks.len();
        let first_chunk = st.next_chunk;
        let mut outstanding = vec![0usize; spans.len()];
        let mut read_end = vec![0u64; spans.len()];
        let mut read_start = vec![Duration::ZERO; spans.len()];
        let mut failed: Option<Error> = None;
        let (mut dispatched, mut completed) = (0usize, 0usize);
        while completed < spans.len() && failed.is_none() {
            while failed.is_none() && dispatched < spans.len() && dispatched - completed < n {
                let c = (first_chunk + dispatched) % n;
                if let Err(e) = self
                    .dispatch(&mut st, jobs, c, dispatched, &spans[dispatched])
                    .map(|(count, start, end)| {
                        outstanding[dispatched] = count;
                        read_start[dispatched] = start;
                        read_end[dispatched] = end;
                    })
                {
                    failed = Some(e);
                    break;
                }
                dispatched += 1;
            }
            if failed.is_some() {
                break;
            }
            while outstanding[completed] > 0 {
                match self.done.recv() {
                    Ok(d) => {
                        outstanding[d.batch] = outstanding[d.batch].saturating_sub(1);
                        if let Err(e) = d.result {
                            failed.get_or_insert(e);
                        }
                    }
                    Err(_) => {
                        failed.get_or_insert(Error::InvalidArgument(
                            "disk reader threads stopped".into(),
                        ));
                        break;
                    }
                }
            }
            if failed.is_some() {
                break;
            }
            let end = match st.sim {
                Some(_) => Duration::from_nanos(read_end[completed]),
                None => Self::clock_of(&st, self.epoch),
            };
            st.timings.push(DiskReadTiming {
                start: read_start[completed],
                end,
                bytes: spans[completed].end - spans[completed].start,
            });
            let c = (first_chunk + completed) % n;
            if let Err(e) =
                self.copy_out(&mut st, stream, c, &spans[completed], read_end[completed])
            {
                failed = Some(e);
                break;
            }
            completed += 1;
        }
        // Every job in flight must finish before its chunk can be touched again or freed.
        let mut left: usize = outstanding.iter().sum();
        while left > 0 {
            match self.done.recv() {
                Ok(d) => {
                    outstanding[d.batch] = outstanding[d.batch].saturating_sub(1);
                    left -= 1;
                }
                Err(_) => break,
            }
        }
        st.next_chunk = (first_chunk + dispatched) % n;
        match failed {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Waits for chunk `c`'s fence and sends span `b`'s reads; returns (jobs sent, start on the
    /// tier's clock, virtual end).
    fn dispatch(
        &self,
        st: &mut State,
        jobs: &Sender<Job>,
        c: usize,
        b: usize,
        span: &Span,
    ) -> Result<(usize, Duration, u64)> {
        if st.fence_recorded[c] && self.cfg.fence_reuse {
            self.dev.sync_event(self.fences[c])?;
            st.stats.fence_waits += 1;
        }
        let issued = Self::clock_of(st, self.epoch);
        let mut count = 0;
        let mut end_ns = 0u64;
        let mut first_start = None;
        let req = self.cfg.request_bytes.max(1);
        let mut pos = span.start;
        while pos < span.end {
            let len = req.min(span.end - pos);
            if let Some(sim) = st.sim.as_mut() {
                let now = sim.dev.now().as_nanos().min(u64::MAX as u128) as u64;
                let (s, e) = sim.disk.read(now, len);
                first_start.get_or_insert(s);
                end_ns = end_ns.max(e);
                st.stats.sim_read_time += Duration::from_nanos(e - s);
            }
            let job = Job {
                batch: b,
                chunk: self.chunks[c],
                chunk_off: pos - span.start,
                file_off: pos,
                len,
            };
            if jobs.send(job).is_err() {
                return Err(Error::InvalidArgument("disk reader threads stopped".into()));
            }
            count += 1;
            pos += len;
        }
        if let Some(s) = first_start {
            if s < st.busy_until[c] {
                let race = ReuseRace {
                    chunk: c,
                    write_at: Duration::from_nanos(s),
                    busy_until: Duration::from_nanos(st.busy_until[c]),
                };
                st.races.push(race);
            }
        }
        st.stats.spans += 1;
        st.stats.read_bytes += span.end - span.start;
        let start = first_start.map_or(issued, Duration::from_nanos);
        Ok((count, start, end_ns))
    }

    /// Enqueues the copies out of chunk `c` once its reads are done, and records its fence.
    fn copy_out(
        &self,
        st: &mut State,
        stream: StreamId,
        c: usize,
        span: &Span,
        read_end: u64,
    ) -> Result<()> {
        if let Some(sim) = st.sim.as_ref() {
            // The host learns that the reads are done when the simulated disk finishes them.
            let now = sim.dev.now();
            let end = Duration::from_nanos(read_end);
            if end > now {
                sim.dev.advance_host(end - now);
            }
        }
        for p in &span.pieces {
            self.dev.copy_h2d(
                stream,
                p.dst,
                self.chunks[c],
                p.file_offset - span.start,
                p.len,
            )?;
            st.stats.copies += 1;
        }
        self.dev.record_event(self.fences[c], stream)?;
        st.fence_recorded[c] = true;
        if let Some(sim) = st.sim.as_ref() {
            if let Ok(Some(t)) = sim.dev.event_time(self.fences[c]) {
                st.busy_until[c] = t.as_nanos().min(u64::MAX as u128) as u64;
            }
        }
        Ok(())
    }
}

impl Drop for DiskTier {
    fn drop(&mut self) {
        // Closing the job channel stops the readers once their queue is empty.
        self.jobs = None;
        for h in self.threads.drain(..) {
            let _ = h.join();
        }
        for &c in &self.chunks {
            // Waits for copies still reading the chunk.
            let _ = self.dev.free_host(c);
        }
        for &ev in &self.fences {
            let _ = self.dev.destroy_event(ev);
        }
    }
}
