//! The host tier: exactly one pinned copy of every registered weight, packed into a few large
//! pinned allocations ("chunks") obtained from [`Device::alloc_host`] with [`HostMemKind::Upload`].
//!
//! Tensors are packed in registration (file) order at [`HOST_ALIGN`]-byte offsets, so tensors of one
//! layer — adjacent in a safetensors file — are usually adjacent in a chunk and a group can be
//! copied to the device in one transfer with the same layout. Each chunk is sized exactly to what it
//! holds; the only overhead is alignment padding (< `HOST_ALIGN` bytes per tensor). Dtype
//! conversion on load goes through a bounded staging buffer of [`STAGING_BYTES`].
//!
//! A file already in the wanted dtypes can instead be registered in place
//! ([`HostStore::register_file_in_place`]): the device page-locks the mapping itself, read-only,
//! and each tensor's host location is (that registration, its offset in the file) — zero copies,
//! but offsets keep the file's (unaligned) layout.

use crate::device::{Device, HostMemKind, HostPtr};
use crate::error::{Error, Result};
use crate::weights::{byte_len, convert_into, DType, TensorInfo, WeightsFile};
use memmap2::Mmap;
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Alignment of tensors inside a chunk; equal to the device arena's, so layouts can be mirrored.
pub const HOST_ALIGN: u64 = crate::arena::ALIGN;

/// Default upper bound on one chunk (a tensor larger than this gets a chunk of its own).
pub const DEFAULT_MAX_CHUNK: u64 = 1 << 30;

/// Size of the buffer that dtype conversion on load goes through.
pub const STAGING_BYTES: usize = 4 << 20;

/// Identifies a tensor registered in a [`HostStore`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TensorId(pub u32);

/// A registered tensor and where its pinned copy lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostTensor {
    /// Registered name (with any prefix applied).
    pub name: String,
    /// Element type as stored in pinned memory (after any conversion).
    pub dtype: DType,
    /// Dimensions.
    pub shape: Vec<usize>,
    /// Bytes.
    pub len: u64,
    /// The chunk (or in-place registered file) holding it.
    pub host: HostPtr,
    /// Offset in the chunk (a multiple of [`HOST_ALIGN`]), or for a tensor registered in place
    /// its offset in the file (any alignment).
    pub offset: u64,
}

/// Which tensors of a file to register, and how.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Only these names (as stored in the file); all tensors if `None`.
    pub names: Option<Vec<String>>,
    /// Prepended to each name when registering (e.g. `"unet."`).
    pub prefix: String,
    /// Convert float tensors to this dtype on load; integer tensors are kept as they are.
    pub convert_to: Option<DType>,
}

/// A tensor given as bytes (for generated weights).
#[derive(Clone, Copy, Debug)]
pub struct RawTensor<'a> {
    /// Name to register.
    pub name: &'a str,
    /// Element type of `data`.
    pub dtype: DType,
    /// Dimensions.
    pub shape: &'a [usize],
    /// Little-endian element bytes.
    pub data: &'a [u8],
}

#[derive(Debug)]
struct Chunk {
    ptr: HostPtr,
    size: u64,
}

/// A file registered in place with [`Device::register_host_file`].
#[derive(Debug)]
struct Registration {
    ptr: HostPtr,
    /// The mapping, to recognise the same file registered again.
    map: Arc<Mmap>,
}

#[derive(Debug, Default)]
struct Inner {
    chunks: Vec<Chunk>,
    registrations: Vec<Registration>,
    tensors: Vec<HostTensor>,
    by_name: HashMap<String, TensorId>,
    weight_bytes: u64,
}

/// The pinned host copy of every registered weight. Frees its memory on drop.
#[derive(Debug)]
pub struct HostStore {
    dev: Arc<dyn Device>,
    max_chunk: u64,
    /// Most pinned bytes the store may hold ([`u64::MAX`]: no limit).
    budget: std::sync::atomic::AtomicU64,
    inner: RwLock<Inner>,
}

/// Where a pending tensor's bytes come from.
enum Source<'a> {
    Bytes(&'a [u8]),
    Convert(&'a [u8], DType),
}

struct Pending<'a> {
    name: String,
    dtype: DType,
    shape: Vec<usize>,
    len: u64,
    src: Source<'a>,
}

impl HostStore {
    /// An empty store on `dev` with chunks of at most [`DEFAULT_MAX_CHUNK`] bytes.
    pub fn new(dev: Arc<dyn Device>) -> HostStore {
        Self::with_max_chunk(dev, DEFAULT_MAX_CHUNK)
    }

    /// An empty store whose chunks hold at most `max_chunk` bytes (unless one tensor is larger).
    pub fn with_max_chunk(dev: Arc<dyn Device>, max_chunk: u64) -> HostStore {
        HostStore {
            dev,
            max_chunk: max_chunk.max(HOST_ALIGN),
            budget: std::sync::atomic::AtomicU64::new(u64::MAX),
            inner: RwLock::new(Inner::default()),
        }
    }

    /// Limits the pinned bytes (copies and in-place registrations together) to `budget`;
    /// `None` removes the limit. A registration that would exceed it is refused whole. Bytes
    /// already registered stay.
    pub fn set_host_budget(&self, budget: Option<u64>) {
        self.budget.store(
            budget.unwrap_or(u64::MAX),
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// The limit set with [`HostStore::set_host_budget`].
    pub fn host_budget(&self) -> Option<u64> {
        match self.budget.load(std::sync::atomic::Ordering::Relaxed) {
            u64::MAX => None,
            b => Some(b),
        }
    }

    fn check_budget(&self, inner: &Inner, adding: u64, what: &str) -> Result<()> {
        let Some(budget) = self.host_budget() else {
            return Ok(());
        };
        let used = inner.chunks.iter().map(|c| c.size).sum::<u64>()
            + inner
                .registrations
                .iter()
                .map(|r| r.map.len() as u64)
                .sum::<u64>();
        if used.saturating_add(adding) > budget {
            return Err(Error::InvalidArgument(format!(
                "host budget of {budget} bytes exceeded: {what} of {adding} bytes with {used}                  bytes already pinned; leave the rest on disk (the disk tier)"
            )));
        }
        Ok(())
    }

    /// The device whose pinned memory holds the weights.
    pub fn device(&self) -> &Arc<dyn Device> {
        &self.dev
    }

    fn read_inner(&self) -> RwLockReadGuard<'_, Inner> {
        // Registration leaves `Inner` consistent at every await-free step; a poisoned lock is safe.
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_inner(&self) -> RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Opens a safetensors file and registers its tensors (see [`HostStore::load_weights`]).
    pub fn load_file(&self, path: impl AsRef<Path>, opts: &LoadOptions) -> Result<Vec<TensorId>> {
        let file = WeightsFile::open(path)?;
        self.load_weights(&file, opts)
    }

    /// The tensors of `file` that `opts` selects, in file order.
    fn select<'f>(file: &'f WeightsFile, opts: &LoadOptions) -> Result<Vec<&'f TensorInfo>> {
        Ok(match &opts.names {
            None => file.tensors().iter().collect(),
            Some(names) => {
                let mut v = Vec::with_capacity(names.len());
                for n in names {
                    v.push(file.info(n).ok_or_else(|| Error::BadFile {
                        path: file.path().to_path_buf(),
                        message: format!("no tensor named '{n}' to load"),
                    })?);
                }
                // Keep file order so that layers stay contiguous in pinned memory.
                v.sort_by_key(|t| t.offset);
                v.dedup_by_key(|t| t.offset);
                v
            }
        })
    }

    /// Registers tensors of an open file, in file order; returns their ids in that order.
    pub fn load_weights(&self, file: &WeightsFile, opts: &LoadOptions) -> Result<Vec<TensorId>> {
        let selected = Self::select(file, opts)?;
        let mut pending = Vec::with_capacity(selected.len());
        for t in selected {
            let bytes = file.bytes_of(t);
            let (dtype, src) = match opts.convert_to {
                Some(to) if t.dtype.is_float() && to.is_float() && to != t.dtype => {
                    (to, Source::Convert(bytes, t.dtype))
                }
                _ => (t.dtype, Source::Bytes(bytes)),
            };
            let len = byte_len(dtype, &t.shape).ok_or_else(|| Error::BadFile {
                path: file.path().to_path_buf(),
                message: format!("tensor '{}': shape {:?} overflows", t.name, t.shape),
            })? as u64;
            pending.push(Pending {
                name: format!("{}{}", opts.prefix, t.name),
                dtype,
                shape: t.shape.clone(),
                len,
                src,
            });
        }
        self.register(pending)
    }

    /// Opens a safetensors file and registers its tensors in place (see
    /// [`HostStore::register_file_in_place`]).
    pub fn load_file_in_place(
        &self,
        path: impl AsRef<Path>,
        opts: &LoadOptions,
    ) -> Result<Vec<TensorId>> {
        let file = WeightsFile::open(path)?;
        self.register_file_in_place(&file, opts)
    }

    /// Registers tensors of an open file without copying them: the device page-locks the whole
    /// mapping read-only ([`Device::register_host_file`]; once per file per store) and each
    /// tensor's host location is that registration at the tensor's offset in the file. Returns
    /// the ids in file order. The registration lasts until the store is dropped.
    ///
    /// Refused when `opts.convert_to` would convert a selected tensor (the bytes are used as
    /// stored), and on devices that cannot register in place; [`HostStore::load_weights`]
    /// copies instead. The file must not be modified or truncated while the store lives.
    pub fn register_file_in_place(
        &self,
        file: &WeightsFile,
        opts: &LoadOptions,
    ) -> Result<Vec<TensorId>> {
        let selected = Self::select(file, opts)?;
        if let Some(to) = opts.convert_to {
            let converted = selected
                .iter()
                .find(|t| t.dtype.is_float() && to.is_float() && to != t.dtype);
            if let Some(t) = converted {
                return Err(Error::InvalidArgument(format!(
                    "{}: tensor '{}' is {} but {to} was asked; registering in place uses the \
                     file's bytes as they are (load_weights copies and converts)",
                    file.path().display(),
                    t.name,
                    t.dtype
                )));
            }
        }
        let mut inner = self.write_inner();
        let mut seen = std::collections::HashSet::new();
        let names: Vec<String> = selected
            .iter()
            .map(|t| format!("{}{}", opts.prefix, t.name))
            .collect();
        for n in &names {
            if inner.by_name.contains_key(n) || !seen.insert(n.as_str()) {
                return Err(Error::InvalidArgument(format!(
                    "tensor '{n}' is already registered"
                )));
            }
        }
        if selected.is_empty() {
            return Ok(Vec::new());
        }
        let map = file.mmap();
        let known = inner
            .registrations
            .iter()
            .find(|r| Arc::ptr_eq(&r.map, map))
            .map(|r| r.ptr);
        let ptr = match known {
            Some(p) => p,
            None => {
                self.check_budget(&inner, map.len() as u64, "registering a file in place")?;
                let ptr = self.dev.register_host_file(map.clone())?;
                inner.registrations.push(Registration {
                    ptr,
                    map: map.clone(),
                });
                ptr
            }
        };
        let first = inner.tensors.len();
        let mut ids = Vec::with_capacity(selected.len());
        for (i, (t, name)) in selected.into_iter().zip(names).enumerate() {
            let id = TensorId((first + i) as u32);
            inner.weight_bytes += t.len as u64;
            inner.by_name.insert(name.clone(), id);
            inner.tensors.push(HostTensor {
                name,
                dtype: t.dtype,
                shape: t.shape.clone(),
                len: t.len as u64,
                host: ptr,
                offset: file.data_start() + t.offset as u64,
            });
            ids.push(id);
        }
        Ok(ids)
    }

    /// Registers tensors of `file` that stay on disk: each tensor's host location is
    /// (`disk.host_handle()`, its offset in the file), no host memory is used, and a scheduler
    /// built with that tier (`ferry_sched::Scheduler::with_disk`) streams them through it.
    /// `disk` must read the same file. Refused when `opts.convert_to` would convert a selected
    /// tensor (the bytes are used as stored). [`HostStore::read`] cannot read these tensors.
    pub fn register_on_disk(
        &self,
        file: &WeightsFile,
        opts: &LoadOptions,
        disk: &crate::disk::DiskTier,
    ) -> Result<Vec<TensorId>> {
        let same = std::fs::canonicalize(file.path()).ok()
            == std::fs::canonicalize(disk.file().path()).ok();
        if !same || disk.file().len() != file.mmap().len() as u64 {
            return Err(Error::InvalidArgument(format!(
                "{}: the disk tier reads {} instead",
                file.path().display(),
                disk.file().path().display()
            )));
        }
        let selected = Self::select(file, opts)?;
        if let Some(to) = opts.convert_to {
            if let Some(t) = selected
                .iter()
                .find(|t| t.dtype.is_float() && to.is_float() && to != t.dtype)
            {
                return Err(Error::InvalidArgument(format!(
                    "{}: tensor '{}' is {} but {to} was asked; tensors left on disk are used as \
                     stored (load_weights copies and converts)",
                    file.path().display(),
                    t.name,
                    t.dtype
                )));
            }
        }
        let mut inner = self.write_inner();
        let names: Vec<String> = selected
            .iter()
            .map(|t| format!("{}{}", opts.prefix, t.name))
            .collect();
        let mut seen = std::collections::HashSet::new();
        for n in &names {
            if inner.by_name.contains_key(n) || !seen.insert(n.as_str()) {
                return Err(Error::InvalidArgument(format!(
                    "tensor '{n}' is already registered"
                )));
            }
        }
        let first = inner.tensors.len();
        let mut ids = Vec::with_capacity(selected.len());
        for (i, (t, name)) in selected.into_iter().zip(names).enumerate() {
            let id = TensorId((first + i) as u32);
            inner.weight_bytes += t.len as u64;
            inner.by_name.insert(name.clone(), id);
            inner.tensors.push(HostTensor {
                name,
                dtype: t.dtype,
                shape: t.shape.clone(),
                len: t.len as u64,
                host: disk.host_handle(),
                offset: file.data_start() + t.offset as u64,
            });
            ids.push(id);
        }
        Ok(ids)
    }

    /// Registers one tensor from bytes. Many small tensors are better registered together with
    /// [`HostStore::register_batch`], which packs them into shared chunks.
    pub fn register_bytes(
        &self,
        name: &str,
        dtype: DType,
        shape: &[usize],
        data: &[u8],
    ) -> Result<TensorId> {
        let ids = self.register_batch(&[RawTensor {
            name,
            dtype,
            shape,
            data,
        }])?;
        Ok(ids[0])
    }

    /// Registers tensors from bytes, packed together; returns their ids in order.
    pub fn register_batch(&self, tensors: &[RawTensor<'_>]) -> Result<Vec<TensorId>> {
        let mut pending = Vec::with_capacity(tensors.len());
        for t in tensors {
            let expected = byte_len(t.dtype, t.shape).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "tensor '{}': shape {:?} overflows",
                    t.name, t.shape
                ))
            })?;
            if expected != t.data.len() {
                return Err(Error::InvalidArgument(format!(
                    "tensor '{}': dtype {} x shape {:?} needs {expected} bytes, got {}",
                    t.name,
                    t.dtype,
                    t.shape,
                    t.data.len()
                )));
            }
            pending.push(Pending {
                name: t.name.to_string(),
                dtype: t.dtype,
                shape: t.shape.to_vec(),
                len: expected as u64,
                src: Source::Bytes(t.data),
            });
        }
        self.register(pending)
    }

    fn register(&self, pending: Vec<Pending<'_>>) -> Result<Vec<TensorId>> {
        let mut inner = self.write_inner();
        let mut seen = std::collections::HashSet::new();
        for p in &pending {
            if inner.by_name.contains_key(&p.name) || !seen.insert(p.name.as_str()) {
                return Err(Error::InvalidArgument(format!(
                    "tensor '{}' is already registered",
                    p.name
                )));
            }
        }
        // Plan: (chunk index, offset) per tensor and the size of each chunk.
        let mut sizes: Vec<u64> = Vec::new();
        let mut places = Vec::with_capacity(pending.len());
        let mut cursor = 0u64;
        for p in &pending {
            let at = cursor.div_ceil(HOST_ALIGN) * HOST_ALIGN;
            if sizes.is_empty() || (cursor > 0 && at + p.len > self.max_chunk) {
                sizes.push(0);
                cursor = 0;
            }
            let at = cursor.div_ceil(HOST_ALIGN) * HOST_ALIGN;
            cursor = at + p.len;
            let last = sizes.len() - 1;
            sizes[last] = cursor;
            places.push((last, at));
        }
        let adding: u64 = sizes.iter().map(|&s| s.max(1)).sum();
        self.check_budget(&inner, adding, "pinning tensors")?;
        let mut ptrs: Vec<HostPtr> = Vec::with_capacity(sizes.len());
        let result = (|| {
            for &s in &sizes {
                // A chunk of only empty tensors still gets one byte so that it has a handle.
                ptrs.push(self.dev.alloc_host(s.max(1), HostMemKind::Upload)?);
            }
            let mut staging = Vec::new();
            for (p, &(c, off)) in pending.iter().zip(&places) {
                self.fill(ptrs[c], off, p, &mut staging)?;
            }
            Ok(())
        })();
        if let Err(e) = result {
            for &p in &ptrs {
                let _ = self.dev.free_host(p);
            }
            return Err(e);
        }
        let first = inner.tensors.len();
        for (&ptr, &size) in ptrs.iter().zip(&sizes) {
            inner.chunks.push(Chunk {
                ptr,
                size: size.max(1),
            });
        }
        let mut ids = Vec::with_capacity(pending.len());
        for (i, (p, &(c, off))) in pending.into_iter().zip(&places).enumerate() {
            let id = TensorId((first + i) as u32);
            inner.weight_bytes += p.len;
            inner.by_name.insert(p.name.clone(), id);
            inner.tensors.push(HostTensor {
                name: p.name,
                dtype: p.dtype,
                shape: p.shape,
                len: p.len,
                host: ptrs[c],
                offset: off,
            });
            ids.push(id);
        }
        Ok(ids)
    }

    fn fill(&self, chunk: HostPtr, off: u64, p: &Pending<'_>, staging: &mut Vec<u8>) -> Result<()> {
        match p.src {
            Source::Bytes(b) => self.dev.host_write(chunk, off, b),
            Source::Convert(b, from) => {
                let (fs, ts) = (from.size(), p.dtype.size());
                let per_block = (STAGING_BYTES / ts).max(1);
                let mut written = 0u64;
                for block in b.chunks(per_block * fs) {
                    staging.resize(block.len() / fs * ts, 0);
                    convert_into(block, from, p.dtype, staging)
                        .map_err(|e| Error::InvalidArgument(format!("tensor '{}': {e}", p.name)))?;
                    self.dev.host_write(chunk, off + written, staging)?;
                    written += staging.len() as u64;
                }
                Ok(())
            }
        }
    }

    /// Number of registered tensors.
    pub fn len(&self) -> usize {
        self.read_inner().tensors.len()
    }
    /// Whether nothing is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The tensor with id `id`.
    pub fn tensor(&self, id: TensorId) -> Result<HostTensor> {
        self.read_inner()
            .tensors
            .get(id.0 as usize)
            .cloned()
            .ok_or_else(|| Error::InvalidHandle(format!("tensor id {} is not registered", id.0)))
    }
    /// The id of the tensor registered as `name`.
    pub fn id(&self, name: &str) -> Option<TensorId> {
        self.read_inner().by_name.get(name).copied()
    }
    /// Sum of the registered tensors' bytes.
    pub fn weight_bytes(&self) -> u64 {
        self.read_inner().weight_bytes
    }
    /// Pinned bytes allocated for copies (weights plus alignment padding); files registered in
    /// place are counted by [`HostStore::registered_bytes`] instead.
    pub fn pinned_bytes(&self) -> u64 {
        self.read_inner().chunks.iter().map(|c| c.size).sum()
    }
    /// Bytes of files registered in place (whole files, headers and unselected tensors included).
    pub fn registered_bytes(&self) -> u64 {
        self.read_inner()
            .registrations
            .iter()
            .map(|r| r.map.len() as u64)
            .sum()
    }
    /// Number of files registered in place.
    pub fn registration_count(&self) -> usize {
        self.read_inner().registrations.len()
    }
    /// Number of pinned allocations.
    pub fn chunk_count(&self) -> usize {
        self.read_inner().chunks.len()
    }
    /// Reads a tensor's bytes back from pinned memory (slow on write-combined memory; for tests).
    pub fn read(&self, id: TensorId) -> Result<Vec<u8>> {
        let t = self.tensor(id)?;
        let mut out = vec![0u8; t.len as usize];
        self.dev.host_read(t.host, t.offset, &mut out)?;
        Ok(out)
    }
}

impl Drop for HostStore {
    fn drop(&mut self) {
        let inner = self.inner.get_mut().unwrap_or_else(|e| e.into_inner());
        for c in inner.chunks.drain(..) {
            // The backend waits for copies reading the chunk to finish before freeing it.
            let _ = self.dev.free_host(c.ptr);
        }
        for r in inner.registrations.drain(..) {
            // Waits for copies still reading the file, like `free_host`.
            let _ = self.dev.unregister_host(r.ptr);
        }
    }
}
