//! The GPU backend: device tensors on one stream of any [`Device`] that launches PTX (a CUDA GPU
//! or the simulated GPU), kernels through [`Gpu`], activations from an [`ActivationArena`] over
//! a caller-owned range.

use super::arena::{ActivationArena, ArenaMark, ARENA_ALIGN};
use super::Backend;
use crate::cuda::{Attention, DevBuf, Gpu, IdBuf, Launch};
use crate::error::{Error, Result};
use crate::ops::{self, Activation, Conv2dParams};
use crate::tensor::{DType, OpError, Tensor};
use ferry_pager::{Device, DevicePtr, DeviceRange, HostMemKind, HostPtr, StreamId};
use std::cell::RefCell;
use std::sync::{Mutex, PoisonError};

/// A tensor in device memory: a typed view plus its shape, and whether the backend's arena owns
/// it (an activation) or not (a weight view into the scheduler's arena).
#[derive(Debug, Clone, PartialEq)]
pub struct CudaTensor {
    buf: DevBuf,
    shape: Vec<usize>,
    owned: bool,
}

fn numel(op: &'static str, shape: &[usize]) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| Error::Op(OpError::invalid(op, format!("shape {shape:?} overflows"))))
}

fn shape_err(op: &'static str, expected: impl Into<String>, found: impl Into<String>) -> Error {
    Error::Op(OpError::shape(op, expected, found))
}

impl CudaTensor {
    /// A weight: `shape` elements of `dtype` at the start of `range` (e.g. a tensor of a group
    /// the scheduler made resident). The backend never frees or moves it.
    pub fn weight(
        range: DeviceRange,
        dtype: DType,
        shape: impl Into<Vec<usize>>,
    ) -> Result<CudaTensor> {
        let shape = shape.into();
        let n = numel("CudaTensor::weight", &shape)?;
        let bytes = (n as u64).checked_mul(dtype.size() as u64);
        if bytes.is_none_or(|b| b > range.len) {
            return Err(shape_err(
                "CudaTensor::weight",
                format!("a range of at least {n} {dtype:?} elements for shape {shape:?}"),
                format!("{} bytes at {}", range.len, range.ptr),
            ));
        }
        Ok(CudaTensor {
            buf: DevBuf::new(range.ptr, dtype, n),
            shape,
            owned: false,
        })
    }

    /// The device view (exactly the tensor's elements).
    pub fn buf(&self) -> DevBuf {
        self.buf
    }

    /// The dimensions.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Storage type.
    pub fn dtype(&self) -> DType {
        self.buf.dtype
    }

    /// Whether it lives in the backend's activation arena (false for weight views).
    pub fn is_owned(&self) -> bool {
        self.owned
    }

    /// The bytes it occupies.
    pub fn range(&self) -> DeviceRange {
        DeviceRange::new(self.buf.ptr, self.buf.bytes())
    }
}

/// The SD ops on one stream of a CUDA GPU or the simulated GPU (or recorded, running nothing),
/// activations in `dtype` from an [`ActivationArena`] over the caller's workspace range.
///
/// Every op allocates its output on the arena's stack; [`Backend::mark`] / [`Backend::keep`] /
/// [`Backend::release`] reclaim temporaries. An owned operand that a release has freed is
/// refused (checked against the stack top, so it catches use after release, not every reuse).
/// An op that fails may leave its allocations on the stack until the enclosing release.
#[derive(Debug)]
pub struct CudaBackend<'a> {
    gpu: Gpu<'a>,
    device: Option<(&'a dyn Device, StreamId)>,
    dtype: DType,
    arena: ActivationArena,
    staging: Option<&'a DownloadStaging>,
}

/// Smallest pinned staging buffer for downloads.
const MIN_STAGING: u64 = 1 << 20;

/// The size to reallocate the download staging buffer to for a download of `need` bytes, or
/// `None` when the current buffer (`have` bytes, if any) already fits it. Grows to a power of
/// two, so a run with slowly growing downloads reallocates a few times only.
pub fn staging_growth(have: Option<u64>, need: u64) -> Option<u64> {
    match have {
        Some(have) if have >= need => None,
        _ => Some(
            need.max(MIN_STAGING)
                .checked_next_power_of_two()
                .unwrap_or(need),
        ),
    }
}

/// A pinned host buffer that [`CudaBackend::download`] reads through, kept between downloads
/// (allocating and freeing pinned memory per call costs a device-wide wait each time). Owned
/// by something that outlives the backends using it (the GPU executor), which gives it back
/// with [`DownloadStaging::free`].
#[derive(Debug, Default)]
pub struct DownloadStaging {
    buf: Mutex<Option<(HostPtr, u64)>>,
}

impl DownloadStaging {
    /// Runs `f` with a staging buffer of at least `len` bytes (grown as needed).
    fn with<R>(
        &self,
        dev: &dyn Device,
        len: u64,
        f: impl FnOnce(HostPtr) -> Result<R>,
    ) -> Result<R> {
        let mut buf = self.buf.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(size) = staging_growth(buf.map(|(_, n)| n), len) {
            if let Some((old, _)) = buf.take() {
                dev.free_host(old)?;
            }
            *buf = Some((dev.alloc_host(size, HostMemKind::Readable)?, size));
        }
        match *buf {
            Some((host, _)) => f(host),
            None => Err(Error::InvalidArgument("download: no staging buffer".into())),
        }
    }

    /// Frees the buffer (after pending work), if one was allocated.
    pub fn free(&self, dev: &dyn Device) -> Result<()> {
        let taken = self
            .buf
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        match taken {
            Some((host, _)) => Ok(dev.free_host(host)?),
            None => Ok(()),
        }
    }
}

impl<'a> CudaBackend<'a> {
    /// Runs on `stream` of `dev`, activations in `dtype`, allocated from `workspace` (device
    /// memory the caller owns and keeps alive, e.g. the scheduler's `workspace()`).
    pub fn new(
        dev: &'a dyn Device,
        stream: StreamId,
        workspace: DeviceRange,
        dtype: DType,
    ) -> Result<Self> {
        Ok(CudaBackend {
            gpu: Gpu::new(dev, stream),
            device: Some((dev, stream)),
            dtype,
            arena: ActivationArena::new(workspace)?,
            staging: None,
        })
    }

    /// [`CudaBackend::new`] downloading through `staging` instead of a pinned buffer
    /// allocated and freed per download.
    pub fn with_staging(
        dev: &'a dyn Device,
        stream: StreamId,
        workspace: DeviceRange,
        dtype: DType,
        staging: &'a DownloadStaging,
    ) -> Result<Self> {
        Ok(CudaBackend {
            staging: Some(staging),
            ..CudaBackend::new(dev, stream, workspace, dtype)?
        })
    }

    /// Runs nothing: launches are validated and appended to `log` (see [`Gpu::recording`]);
    /// `workspace` may be any address range. Uploads only allocate; downloads are refused.
    pub fn recording(
        log: &'a RefCell<Vec<Launch>>,
        workspace: DeviceRange,
        dtype: DType,
    ) -> Result<Self> {
        Ok(CudaBackend {
            gpu: Gpu::recording(log),
            device: None,
            dtype,
            arena: ActivationArena::new(workspace)?,
            staging: None,
        })
    }

    /// The activation arena (usage, peak).
    pub fn arena(&self) -> &ActivationArena {
        &self.arena
    }

    /// The kernel launcher, for ops the trait does not cover.
    pub fn gpu(&self) -> Gpu<'a> {
        self.gpu
    }

    /// A weight view in this backend's storage type (see [`CudaTensor::weight`]).
    pub fn weight(&self, range: DeviceRange, shape: impl Into<Vec<usize>>) -> Result<CudaTensor> {
        CudaTensor::weight(range, self.dtype, shape)
    }

    /// An uninitialised activation of `shape` on the arena's stack.
    pub fn alloc(&self, shape: impl Into<Vec<usize>>) -> Result<CudaTensor> {
        let shape = shape.into();
        let n = numel("CudaBackend::alloc", &shape)?;
        let bytes = (n as u64)
            .checked_mul(self.dtype.size() as u64)
            .ok_or_else(|| {
                Error::Op(OpError::invalid(
                    "CudaBackend::alloc",
                    format!("shape {shape:?} overflows"),
                ))
            })?;
        let range = self.arena.alloc(bytes)?;
        Ok(CudaTensor {
            buf: DevBuf::new(range.ptr, self.dtype, n),
            shape,
            owned: true,
        })
    }

    /// The view of an operand, after checking its type and that it has not been released.
    fn buf(&self, op: &str, name: &str, t: &CudaTensor) -> Result<DevBuf> {
        if t.buf.dtype != self.dtype {
            return Err(Error::InvalidArgument(format!(
                "{op}: {name} is {:?}, this backend computes in {:?}",
                t.buf.dtype, self.dtype
            )));
        }
        if t.owned && !self.arena.is_live(t.range()) {
            return Err(Error::InvalidArgument(format!(
                "{op}: {name} at {} was freed by a release (a tensor may be used only until the \
                 mark it was allocated under is released)",
                t.buf.ptr
            )));
        }
        Ok(t.buf)
    }

    /// An optional per-channel operand of `len` elements.
    fn affine(
        &self,
        op: &'static str,
        name: &str,
        t: Option<&CudaTensor>,
        len: usize,
    ) -> Result<Option<DevBuf>> {
        match t {
            None => Ok(None),
            Some(t) if t.shape == [len] => self.buf(op, name, t).map(Some),
            Some(t) => Err(shape_err(
                op,
                format!("{name} [{len}]"),
                format!("{:?}", t.shape),
            )),
        }
    }

    /// Host u32 indices copied into a new arena allocation (only allocated when recording).
    fn upload_ids(&self, ids: &[u32]) -> Result<IdBuf> {
        let range = self.arena.alloc(ids.len() as u64 * 4)?;
        if let Some((dev, stream)) = self.device {
            if !ids.is_empty() {
                let bytes: Vec<u8> = ids.iter().flat_map(|v| v.to_le_bytes()).collect();
                // Pageable copy on the compute stream, like `upload`.
                dev.copy_h2d_pageable(stream, range.ptr, &bytes)?;
            }
        }
        Ok(IdBuf::new(range.ptr, ids.len()))
    }

    /// `y` = rows `ids` of `table [rows, dim]`, the ids staged in a temporary that is popped
    /// right after the launch (later users of the space are ordered after it on the stream).
    fn gather_into(
        &self,
        table: DevBuf,
        rows: usize,
        dim: usize,
        ids: &[u32],
        y: &CudaTensor,
    ) -> Result<()> {
        let mark = self.arena.mark();
        let run = || -> Result<()> {
            let idb = self.upload_ids(ids)?;
            Ok(self.gpu.gather(&table, rows, dim, &idb, &y.buf)?)
        };
        let ran = run();
        self.arena.release(mark)?;
        ran
    }

    /// Copies `src` to a non-overlapping `dst` of the same type and length (a scale by 1, which
    /// is exact in every storage type).
    fn copy(&self, src: DevBuf, dst: DevBuf) -> Result<()> {
        Ok(self.gpu.scale(&src, 1.0, &dst)?)
    }
}

fn encode(data: &[f32], t: DType) -> Vec<u8> {
    match t {
        DType::F32 => data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::F16 => data
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect(),
        DType::BF16 => data
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect(),
    }
}

fn rank_err(op: &'static str, what: &str, shape: &[usize]) -> Error {
    shape_err(op, what.to_string(), format!("shape {shape:?}"))
}

impl Backend for CudaBackend<'_> {
    type Tensor = CudaTensor;
    type Mark = ArenaMark;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn dtype(&self) -> DType {
        self.dtype
    }

    fn upload(&self, t: &Tensor) -> Result<CudaTensor> {
        let out = self.alloc(t.shape())?;
        if let Some((dev, stream)) = self.device {
            let bytes = encode(t.data(), self.dtype);
            if !bytes.is_empty() {
                // Pageable copy on the compute stream: ordered after any kernel that still
                // reads this (reused) range, and the host buffer may go when it returns.
                dev.copy_h2d_pageable(stream, out.buf.ptr, &bytes)?;
            }
        }
        Ok(out)
    }

    fn download(&self, t: &CudaTensor) -> Result<Tensor> {
        let Some((dev, stream)) = self.device else {
            return Err(Error::InvalidArgument(
                "download: a recording CudaBackend has no device to read from".into(),
            ));
        };
        let len = t.buf.bytes();
        if len == 0 {
            return Ok(Tensor::new(t.shape.clone(), Vec::new())?);
        }
        let read = |host: HostPtr| -> Result<Vec<u8>> {
            dev.copy_d2h(stream, host, 0, t.buf.ptr, len)?;
            dev.sync_stream(stream)?;
            let mut bytes = vec![0u8; len as usize];
            dev.host_read(host, 0, &mut bytes)?;
            Ok(bytes)
        };
        let bytes = match self.staging {
            Some(staging) => staging.with(dev, len, read)?,
            None => {
                let host = dev.alloc_host(len, HostMemKind::Readable)?;
                let bytes = read(host);
                let freed = dev.free_host(host);
                let bytes = bytes?;
                freed?;
                bytes
            }
        };
        Ok(Tensor::from_bytes(&bytes, t.buf.dtype, t.shape.clone())?)
    }

    fn shape<'t>(&self, t: &'t CudaTensor) -> &'t [usize] {
        &t.shape
    }

    fn mark(&self) -> ArenaMark {
        self.arena.mark()
    }

    fn keep(&self, mark: ArenaMark, t: CudaTensor) -> Result<CudaTensor> {
        // Weights and activations from before the mark survive the release as they are.
        if !t.owned || t.buf.ptr < self.arena.addr(mark) {
            self.arena.release(mark)?;
            return Ok(t);
        }
        let src = self.buf("keep", "t", &t)?;
        self.arena.release(mark)?;
        let dst = self.arena.alloc(src.bytes())?;
        if dst.ptr == src.ptr || src.len == 0 {
            return Ok(CudaTensor {
                buf: DevBuf::new(dst.ptr, src.dtype, src.len),
                ..t
            });
        }
        let es = src.dtype.size();
        let n = src.len;
        let part = |b: &DevBuf, off: usize, len: usize| {
            DevBuf::new(b.ptr.offset((off * es) as u64), b.dtype, len)
        };
        let to = DevBuf::new(dst.ptr, src.dtype, n);
        // Both are ARENA_ALIGN-aligned, so the distance is a whole number of elements.
        let dist = ((src.ptr.0 - dst.ptr.0) / es as u64) as usize;
        let scratch = DevicePtr(src.ptr.0 + src.bytes().div_ceil(ARENA_ALIGN) * ARENA_ALIGN);
        if dist >= n {
            self.copy(src, to)?;
        } else if scratch.0 + src.bytes() <= self.arena.end().0 {
            // Overlapping: stage through the free space above the source (two launches).
            let tmp = DevBuf::new(scratch, src.dtype, n);
            self.copy(src, tmp)?;
            self.copy(tmp, to)?;
        } else {
            // Overlapping, no room to stage: copy forward in pieces no longer than the distance,
            // so each piece only overwrites source elements that were already copied.
            let mut off = 0;
            while off < n {
                let len = dist.min(n - off);
                self.copy(part(&src, off, len), part(&to, off, len))?;
                off += len;
            }
        }
        Ok(CudaTensor {
            buf: to,
            shape: t.shape,
            owned: true,
        })
    }

    fn release(&self, mark: ArenaMark) -> Result<()> {
        Ok(self.arena.release(mark)?)
    }

    fn linear(
        &self,
        x: &CudaTensor,
        weight: &CudaTensor,
        bias: Option<&CudaTensor>,
    ) -> Result<CudaTensor> {
        let op = "linear";
        let (&k, lead) = x
            .shape
            .split_last()
            .ok_or_else(|| rank_err(op, "input [..., k]", &x.shape))?;
        let n = match weight.shape[..] {
            [n, wk] if wk == k => n,
            _ => {
                return Err(shape_err(
                    op,
                    format!("weight [n, {k}] for input {:?}", x.shape),
                    format!("weight {:?}", weight.shape),
                ))
            }
        };
        let m = numel(op, lead)?;
        let (xb, wb) = (self.buf(op, "x", x)?, self.buf(op, "weight", weight)?);
        let bb = self.affine(op, "bias", bias, n)?;
        let mut shape = lead.to_vec();
        shape.push(n);
        let y = self.alloc(shape)?;
        self.gpu.linear(&xb, m, k, &wb, n, bb.as_ref(), &y.buf)?;
        Ok(y)
    }

    fn conv2d(
        &self,
        x: &CudaTensor,
        weight: &CudaTensor,
        bias: Option<&CudaTensor>,
        params: Conv2dParams,
    ) -> Result<CudaTensor> {
        let op = "conv2d";
        let (&[n, c, h, w], &[o, wc, kh, kw]) = (&x.shape[..], &weight.shape[..]) else {
            return Err(shape_err(
                op,
                "input [n, c, h, w] and weight [o, c, kh, kw]",
                format!("input {:?}, weight {:?}", x.shape, weight.shape),
            ));
        };
        let (sh, sw) = params.stride;
        let [pt, pb, pl, pr] = params.padding;
        if wc != c
            || sh == 0
            || sw == 0
            || kh == 0
            || kw == 0
            || h + pt + pb < kh
            || w + pl + pr < kw
        {
            return Err(shape_err(
                op,
                format!(
                    "a weight [o, {c}, kh, kw] that fits input {:?} with {params:?}",
                    x.shape
                ),
                format!("weight {:?}", weight.shape),
            ));
        }
        let (ho, wo) = ((h + pt + pb - kh) / sh + 1, (w + pl + pr - kw) / sw + 1);
        let (xb, wb) = (self.buf(op, "x", x)?, self.buf(op, "weight", weight)?);
        let bb = self.affine(op, "bias", bias, o)?;
        let y = self.alloc([n, o, ho, wo])?;
        self.gpu.conv2d(
            &xb,
            [n, c, h, w],
            &wb,
            [o, c, kh, kw],
            bb.as_ref(),
            params,
            &y.buf,
        )?;
        Ok(y)
    }

    fn group_norm(
        &self,
        x: &CudaTensor,
        groups: usize,
        weight: Option<&CudaTensor>,
        bias: Option<&CudaTensor>,
        eps: f32,
        silu: bool,
    ) -> Result<CudaTensor> {
        let op = "group_norm";
        let &[n, c, ref rest @ ..] = &x.shape[..] else {
            return Err(rank_err(op, "input [n, c, ...]", &x.shape));
        };
        let spatial = numel(op, rest)?;
        let xb = self.buf(op, "x", x)?;
        let wb = self.affine(op, "weight", weight, c)?;
        let bb = self.affine(op, "bias", bias, c)?;
        let y = self.alloc(x.shape.clone())?;
        self.gpu.group_norm(
            &xb,
            n,
            c,
            spatial,
            groups,
            wb.as_ref(),
            bb.as_ref(),
            eps,
            silu,
            &y.buf,
        )?;
        Ok(y)
    }

    fn layer_norm(
        &self,
        x: &CudaTensor,
        weight: Option<&CudaTensor>,
        bias: Option<&CudaTensor>,
        eps: f32,
    ) -> Result<CudaTensor> {
        let op = "layer_norm";
        let (&d, lead) = x
            .shape
            .split_last()
            .ok_or_else(|| rank_err(op, "input [..., d]", &x.shape))?;
        let rows = numel(op, lead)?;
        let xb = self.buf(op, "x", x)?;
        let wb = self.affine(op, "weight", weight, d)?;
        let bb = self.affine(op, "bias", bias, d)?;
        let y = self.alloc(x.shape.clone())?;
        self.gpu
            .layer_norm(&xb, rows, d, wb.as_ref(), bb.as_ref(), eps, &y.buf)?;
        Ok(y)
    }

    fn attention(
        &self,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        heads: usize,
        causal: bool,
    ) -> Result<CudaTensor> {
        let op = "attention";
        let &[b, nq, hd] = &q.shape[..] else {
            return Err(rank_err(op, "q [b, nq, heads*d]", &q.shape));
        };
        let nk = k.shape.get(1).copied().unwrap_or(0);
        let kv_ok = k.shape == [b, nk, hd] && v.shape == k.shape;
        if !kv_ok || heads == 0 || !hd.is_multiple_of(heads) || (causal && nq != nk) {
            return Err(shape_err(
                op,
                format!(
                    "q [b, nq, {heads}*d], k and v [b, nk, {heads}*d]{}",
                    if causal {
                        " with nq == nk (causal)"
                    } else {
                        ""
                    }
                ),
                format!("q {:?}, k {:?}, v {:?}", q.shape, k.shape, v.shape),
            ));
        }
        let d = hd / heads;
        let (qb, kb, vb) = (
            self.buf(op, "q", q)?,
            self.buf(op, "k", k)?,
            self.buf(op, "v", v)?,
        );
        let mut attn = Attention::new(b, nq, nk, heads, d);
        if causal {
            attn.causal = true;
            attn.scale = (d as f32).powf(-0.5);
        }
        let y = self.alloc([b, nq, hd])?;
        self.gpu.attention(&qb, &kb, &vb, &attn, &y.buf)?;
        Ok(y)
    }

    fn activation(&self, act: Activation, x: &CudaTensor) -> Result<CudaTensor> {
        let xb = self.buf("activation", "x", x)?;
        let y = self.alloc(x.shape.clone())?;
        self.gpu.activation(act, &xb, &y.buf)?;
        Ok(y)
    }

    fn geglu(
        &self,
        x: &CudaTensor,
        weight: &CudaTensor,
        bias: Option<&CudaTensor>,
    ) -> Result<CudaTensor> {
        let op = "geglu";
        let (&k, lead) = x
            .shape
            .split_last()
            .ok_or_else(|| rank_err(op, "input [..., k]", &x.shape))?;
        let two_f = match weight.shape[..] {
            [two_f, wk] if wk == k && two_f > 0 && two_f.is_multiple_of(2) => two_f,
            _ => {
                return Err(shape_err(
                    op,
                    format!("weight [2*f, {k}] with f > 0 for input {:?}", x.shape),
                    format!("weight {:?}", weight.shape),
                ))
            }
        };
        let rows = numel(op, lead)?;
        let (xb, wb) = (self.buf(op, "x", x)?, self.buf(op, "weight", weight)?);
        let bb = self.affine(op, "bias", bias, two_f)?;
        let mut shape = lead.to_vec();
        shape.push(two_f / 2);
        // The output below the projection, so the projection can be popped right away.
        let y = self.alloc(shape)?;
        let mark = self.arena.mark();
        let h = self.alloc([rows, two_f])?;
        let run = || -> Result<()> {
            self.gpu
                .linear(&xb, rows, k, &wb, two_f, bb.as_ref(), &h.buf)?;
            Ok(self.gpu.geglu_gate(&h.buf, rows, two_f / 2, &y.buf)?)
        };
        let ran = run();
        self.arena.release(mark)?;
        ran.map(|()| y)
    }

    fn add(&self, a: &CudaTensor, b: &CudaTensor) -> Result<CudaTensor> {
        if a.shape != b.shape {
            return Err(shape_err(
                "add",
                format!("equal shapes ({:?})", a.shape),
                format!("{:?}", b.shape),
            ));
        }
        let (ab, bb) = (self.buf("add", "a", a)?, self.buf("add", "b", b)?);
        let y = self.alloc(a.shape.clone())?;
        self.gpu.add(&ab, &bb, &y.buf)?;
        Ok(y)
    }

    fn scale(&self, x: &CudaTensor, s: f32) -> Result<CudaTensor> {
        let xb = self.buf("scale", "x", x)?;
        let y = self.alloc(x.shape.clone())?;
        self.gpu.scale(&xb, s, &y.buf)?;
        Ok(y)
    }

    fn add_channel_bias(&self, x: &CudaTensor, b: &CudaTensor) -> Result<CudaTensor> {
        let op = "add_channel_bias";
        let ok = match (&x.shape[..], &b.shape[..]) {
            ([n, c, ..], [bn, bc]) => bn == n && bc == c,
            ([_, c, ..], [bc]) => bc == c,
            _ => false,
        };
        if !ok {
            return Err(shape_err(
                op,
                format!("bias [n, c] or [c] for input {:?}", x.shape),
                format!("bias {:?}", b.shape),
            ));
        }
        let spatial = numel(op, &x.shape[2..])?;
        let (xb, bb) = (self.buf(op, "x", x)?, self.buf(op, "bias", b)?);
        let y = self.alloc(x.shape.clone())?;
        self.gpu.add_channel_bias(&xb, &bb, spatial, &y.buf)?;
        Ok(y)
    }

    fn upsample_nearest2x(&self, x: &CudaTensor) -> Result<CudaTensor> {
        let op = "upsample_nearest2x";
        let &[n, c, h, w] = &x.shape[..] else {
            return Err(rank_err(op, "input [n, c, h, w]", &x.shape));
        };
        let xb = self.buf(op, "x", x)?;
        let y = self.alloc([n, c, 2 * h, 2 * w])?;
        self.gpu
            .upsample_nearest2x(&xb, numel(op, &[n, c])?, h, w, &y.buf)?;
        Ok(y)
    }

    fn cat_channels(&self, a: &CudaTensor, b: &CudaTensor) -> Result<CudaTensor> {
        let op = "cat_channels";
        let fits = match (&a.shape[..], &b.shape[..]) {
            ([an, _, ar @ ..], [bn, _, br @ ..]) => an == bn && ar == br,
            _ => false,
        };
        if !fits {
            return Err(shape_err(
                op,
                format!("shapes equal to {:?} except in dim 1", a.shape),
                format!("{:?}", b.shape),
            ));
        }
        let (n, ca, cb) = (a.shape[0], a.shape[1], b.shape[1]);
        let s = numel(op, &a.shape[2..])?;
        let (ab, bb) = (self.buf(op, "a", a)?, self.buf(op, "b", b)?);
        let mut shape = a.shape.clone();
        shape[1] = ca + cb;
        let y = self.alloc(shape)?;
        self.gpu.cat_channels(
            &ab,
            &bb,
            n,
            numel(op, &[ca, s])?,
            numel(op, &[cb, s])?,
            &y.buf,
        )?;
        Ok(y)
    }

    fn nchw_to_tokens(&self, x: &CudaTensor) -> Result<CudaTensor> {
        let op = "nchw_to_tokens";
        let &[b, c, h, w] = &x.shape[..] else {
            return Err(rank_err(op, "x [b, c, h, w]", &x.shape));
        };
        let hw = numel(op, &[h, w])?;
        let xb = self.buf(op, "x", x)?;
        let y = self.alloc([b, hw, c])?;
        self.gpu.transpose(&xb, b, c, hw, &y.buf)?;
        Ok(y)
    }

    fn tokens_to_nchw(&self, x: &CudaTensor, h: usize, w: usize) -> Result<CudaTensor> {
        let op = "tokens_to_nchw";
        let (b, p, c) = match x.shape[..] {
            [b, p, c] if h.checked_mul(w) == Some(p) => (b, p, c),
            _ => {
                return Err(shape_err(
                    op,
                    format!("x [b, {h}*{w}, c]"),
                    format!("{:?}", x.shape),
                ))
            }
        };
        let xb = self.buf(op, "x", x)?;
        let y = self.alloc([b, c, h, w])?;
        self.gpu.transpose(&xb, b, p, c, &y.buf)?;
        Ok(y)
    }

    fn embedding(&self, table: &CudaTensor, ids: &[Vec<u32>]) -> Result<CudaTensor> {
        let (b, n, v, d) = super::check_ids(&table.shape, ids)?;
        let tb = self.buf("embedding", "table", table)?;
        let flat: Vec<u32> = ids.iter().flatten().copied().collect();
        let y = self.alloc([b, n, d])?;
        self.gather_into(tb, v, d, &flat, &y)?;
        Ok(y)
    }

    fn gather_rows(&self, x: &CudaTensor, rows: &[usize]) -> Result<CudaTensor> {
        let op = "gather_rows";
        let (b, n, d) = super::check_rows(&x.shape, rows)?;
        // Rows of x viewed as a [b*n, d] table: item bi's row r is row bi*n + r.
        let ids = rows
            .iter()
            .enumerate()
            .map(|(bi, &r)| u32::try_from(bi * n + r).ok())
            .collect::<Option<Vec<u32>>>()
            .ok_or_else(|| {
                Error::Op(OpError::invalid(
                    op,
                    format!("x {:?} has more rows than u32 indices address", x.shape),
                ))
            })?;
        let xb = self.buf(op, "x", x)?;
        let y = self.alloc([b, d])?;
        self.gather_into(xb, b * n, d, &ids, &y)?;
        Ok(y)
    }

    fn resize_nearest(&self, x: &CudaTensor, h: usize, w: usize) -> Result<CudaTensor> {
        let op = "resize_nearest";
        let &[n, c, ih, iw] = &x.shape[..] else {
            return Err(rank_err(op, "x [n, c, h, w]", &x.shape));
        };
        if ih == 0 || iw == 0 || h == 0 || w == 0 {
            return Err(Error::Op(OpError::invalid(
                op,
                format!("input and output sizes must be non-zero, found {ih}x{iw} -> {h}x{w}"),
            )));
        }
        let xb = self.buf(op, "x", x)?;
        let y = self.alloc([n, c, h, w])?;
        self.gpu
            .resize_nearest(&xb, numel(op, &[n, c])?, (ih, iw), (h, w), &y.buf)?;
        Ok(y)
    }

    fn reshape(&self, x: CudaTensor, shape: &[usize]) -> Result<CudaTensor> {
        super::check_reshape(&x.shape, shape)?;
        self.buf("reshape", "x", &x)?;
        Ok(CudaTensor {
            shape: shape.to_vec(),
            ..x
        })
    }

    fn timestep_embedding(
        &self,
        timesteps: &[f32],
        dim: usize,
        flip_sin_to_cos: bool,
        downscale_freq_shift: f32,
    ) -> Result<CudaTensor> {
        // Computed on the host and uploaded: the timesteps are host values anyway, the result
        // is tiny ([count, dim], once per step), and this makes it the very values of the CPU
        // path. The frequencies must round exactly as the reference does — at t ≈ 1000 one ulp
        // of an `exp` result moves the embedding by ~6e-5 (the ops tests bound PyTorch's own
        // 1-ulp `exp` differences by exactly that) — and a device libm need not round the same.
        let t = ops::timestep_embedding(timesteps, dim, flip_sin_to_cos, downscale_freq_shift)?;
        self.upload(&t)
    }
}
