//! CUDA kernels of the SD ops (`kernels/*.cu`, embedded as PTX) and their launch wrappers.
//!
//! Each wrapper checks shapes, element types and buffer lengths, then launches one kernel on a
//! stream of any [`Device`] through [`Device::launch_ptx`] (a CUDA GPU, or the simulated GPU's
//! PTX interpreter); nothing is synchronised. Storage
//! is f32, f16 or bf16 ([`DType`]); arithmetic is f32. The CPU ops in [`crate::ops`] are the
//! reference each kernel is tested against (`tests/cuda_kernels.rs`, GPU only).

mod kernels;

pub use kernels::all_kernels;

use crate::ops::{Activation, Conv2dParams};
use crate::tensor::DType;
use ferry_pager::device::cuda::{KernelArg, LaunchDims, MAX_GRID};
use ferry_pager::{Device, DevicePtr, Error, Result, StreamId};
use kernels::{Module, ATTENTION, ELEMENTWISE, GEMM, LAYOUT, NORM};
use std::cell::RefCell;

/// A typed view of device memory: `len` elements of `dtype` from `ptr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DevBuf {
    /// First element.
    pub ptr: DevicePtr,
    /// Element type.
    pub dtype: DType,
    /// Length in elements.
    pub len: usize,
}

impl DevBuf {
    /// A view of `len` elements of `dtype` at `ptr`.
    pub fn new(ptr: DevicePtr, dtype: DType, len: usize) -> Self {
        DevBuf { ptr, dtype, len }
    }

    /// Size in bytes.
    pub fn bytes(&self) -> u64 {
        (self.len * self.dtype.size()) as u64
    }

    fn arg(&self) -> KernelArg {
        KernelArg::Buf {
            ptr: self.ptr,
            bytes: self.bytes(),
        }
    }
}

/// `len` u32 indices (token ids, row numbers) in device memory, read by [`Gpu::gather`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdBuf {
    /// First index.
    pub ptr: DevicePtr,
    /// Number of indices.
    pub len: usize,
}

impl IdBuf {
    /// A view of `len` u32 indices at `ptr`.
    pub fn new(ptr: DevicePtr, len: usize) -> Self {
        IdBuf { ptr, len }
    }

    /// Size in bytes.
    pub fn bytes(&self) -> u64 {
        self.len as u64 * 4
    }
}

fn invalid(msg: String) -> Error {
    Error::InvalidArgument(msg)
}

/// Checks that `buf` holds `dtype` elements and at least `need` of them.
fn check(op: &str, name: &str, buf: &DevBuf, dtype: DType, need: usize) -> Result<()> {
    if buf.dtype != dtype {
        return Err(invalid(format!(
            "{op}: {name} must be {dtype:?} like the other operands, found {:?}",
            buf.dtype
        )));
    }
    if buf.len < need {
        return Err(invalid(format!(
            "{op}: {name} needs {need} elements, the buffer has {}",
            buf.len
        )));
    }
    Ok(())
}

fn opt_arg(
    op: &str,
    name: &str,
    buf: Option<&DevBuf>,
    dtype: DType,
    need: usize,
) -> Result<KernelArg> {
    match buf {
        Some(b) => {
            check(op, name, b, dtype, need)?;
            Ok(b.arg())
        }
        None => Ok(KernelArg::Null),
    }
}

fn u32_of(op: &str, what: &str, v: usize) -> Result<KernelArg> {
    u32::try_from(v)
        .map(KernelArg::U32)
        .map_err(|_| invalid(format!("{op}: {what} = {v} exceeds u32")))
}

fn i32_of(op: &str, what: &str, v: usize) -> Result<KernelArg> {
    i32::try_from(v)
        .map(KernelArg::I32)
        .map_err(|_| invalid(format!("{op}: {what} = {v} exceeds i32")))
}

fn mul(op: &str, dims: &[usize]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| invalid(format!("{op}: size {dims:?} overflows")))
}

/// Blocks for a grid-stride loop over `n` elements, 256 threads each.
fn blocks_for(n: usize) -> u32 {
    n.div_ceil(256).clamp(1, 1 << 20) as u32
}

/// Which matrix-multiply kernel [`Gpu::linear_with`] uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemmKernel {
    /// The 128-tile pipelined kernel for large f16/bf16 problems it can run, else 64-tile.
    Auto,
    /// 64×64 tiles, synchronous staging; any type, size and alignment.
    Tile64,
    /// 128×128 tiles, cp.async pipeline, ldmatrix; f16/bf16, `k % 8 == 0`, `k > 0`, 16-byte
    /// aligned operands (an error otherwise).
    Tile128,
}

/// Which attention kernel [`Gpu::attention`] uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionKernel {
    /// Tensor cores for f16/bf16 with head size 40, 64, 80 or 160; the SIMT kernel otherwise.
    Auto,
    /// The SIMT kernel (any storage type, head size up to 512).
    Simt,
}

/// Head sizes of the tensor-core attention kernels.
pub const FLASH_HEAD_DIMS: [usize; 4] = [40, 64, 80, 160];
/// Largest head size of the SIMT attention kernel.
pub const SIMT_MAX_HEAD_DIM: usize = 512;

/// A launch captured by a recording [`Gpu`] instead of being run.
#[derive(Debug, Clone, PartialEq)]
pub struct Launch {
    /// The module's PTX text.
    pub ptx: &'static str,
    /// The kernel.
    pub func: &'static str,
    /// Grid and block.
    pub dims: LaunchDims,
    /// The arguments, as they would be passed.
    pub args: Vec<KernelArg>,
}

#[derive(Debug, Clone, Copy)]
enum Target<'a> {
    Device {
        dev: &'a dyn Device,
        stream: StreamId,
    },
    Record(&'a RefCell<Vec<Launch>>),
}

/// Launches the SD kernels on one stream of one device — a CUDA GPU or the simulated GPU, the
/// same launches either way — or records the launches, for checks without running anything.
#[derive(Debug, Clone, Copy)]
pub struct Gpu<'a> {
    target: Target<'a>,
}

impl<'a> Gpu<'a> {
    /// Launches on `stream` of `dev` (which must [`Device::can_launch_ptx`]; launches on one
    /// that cannot fail with its error).
    pub fn new(dev: &'a dyn Device, stream: StreamId) -> Self {
        Gpu {
            target: Target::Device { dev, stream },
        }
    }

    /// Runs nothing: every launch is validated like a real one (shapes, types, lengths) and
    /// appended to `log`. Lets the launch plan be checked against the PTX without a GPU.
    pub fn recording(log: &'a RefCell<Vec<Launch>>) -> Self {
        Gpu {
            target: Target::Record(log),
        }
    }

    fn launch(
        &self,
        m: &Module,
        func: &'static str,
        dims: LaunchDims,
        args: &[KernelArg],
    ) -> Result<()> {
        dims.check(func)?;
        match self.target {
            // SAFETY: every wrapper below checks each buffer's type and length against the
            // extent its kernel touches (documented in kernels/*.cu) before calling here, and
            // passes the sizes it checked; the pager checks the argument list against the PTX
            // signature and every buffer range against live allocations.
            Target::Device { dev, stream } => unsafe {
                dev.launch_ptx(stream, m.name, m.ptx, func, dims, args)
            },
            Target::Record(log) => {
                log.borrow_mut().push(Launch {
                    ptx: m.ptx,
                    func,
                    dims,
                    args: args.to_vec(),
                });
                Ok(())
            }
        }
    }

    /// `y = act(x)` for SiLU, GELU (erf), GELU-tanh and quick GELU (`y` may be `x`).
    pub fn activation(&self, act: Activation, x: &DevBuf, y: &DevBuf) -> Result<()> {
        let op = "activation";
        let f = kernels::activation(act, x.dtype)
            .ok_or_else(|| invalid(format!("{op}: no GPU kernel for {act:?}")))?;
        check(op, "y", y, x.dtype, x.len)?;
        let n = x.len;
        self.launch(
            &ELEMENTWISE,
            f,
            LaunchDims::linear(blocks_for(n), 256),
            &[x.arg(), y.arg(), KernelArg::U64(n as u64)],
        )
    }

    /// `y = a + b` element-wise over `a.len` elements (`y` may alias `a` or `b`).
    pub fn add(&self, a: &DevBuf, b: &DevBuf, y: &DevBuf) -> Result<()> {
        let n = a.len;
        check("add", "b", b, a.dtype, n)?;
        check("add", "y", y, a.dtype, n)?;
        let f = kernels::by_dtype(a.dtype, kernels::ADD);
        self.launch(
            &ELEMENTWISE,
            f,
            LaunchDims::linear(blocks_for(n), 256),
            &[a.arg(), b.arg(), y.arg(), KernelArg::U64(n as u64)],
        )
    }

    /// `y = x * s` over `x.len` elements.
    pub fn scale(&self, x: &DevBuf, s: f32, y: &DevBuf) -> Result<()> {
        let n = x.len;
        check("scale", "y", y, x.dtype, n)?;
        let f = kernels::by_dtype(x.dtype, kernels::SCALE);
        self.launch(
            &ELEMENTWISE,
            f,
            LaunchDims::linear(blocks_for(n), 256),
            &[
                x.arg(),
                y.arg(),
                KernelArg::F32(s),
                KernelArg::U64(n as u64),
            ],
        )
    }

    /// `y = x + bias[:, :, None, None]` for `x [n, c, spatial]` and a bias of `c` or `n*c`
    /// elements (its length decides), like [`crate::ops::add_channel_bias`].
    pub fn add_channel_bias(
        &self,
        x: &DevBuf,
        bias: &DevBuf,
        spatial: usize,
        y: &DevBuf,
    ) -> Result<()> {
        let op = "add_channel_bias";
        let n = x.len;
        if spatial == 0
            || bias.len == 0
            || !n.is_multiple_of(spatial)
            || !(n / spatial).is_multiple_of(bias.len)
        {
            return Err(invalid(format!(
                "{op}: x of {n} elements must be [n, c, {spatial}] with a bias of c or n*c \
                 elements, bias has {}",
                bias.len
            )));
        }
        check(op, "bias", bias, x.dtype, bias.len)?;
        check(op, "y", y, x.dtype, n)?;
        let f = kernels::by_dtype(x.dtype, kernels::ADD_CHANNEL);
        let args = [
            x.arg(),
            bias.arg(),
            y.arg(),
            KernelArg::U64(n as u64),
            KernelArg::U64(spatial as u64),
            KernelArg::U64(bias.len as u64),
        ];
        self.launch(
            &ELEMENTWISE,
            f,
            LaunchDims::linear(blocks_for(n), 256),
            &args,
        )
    }

    /// GEGLU gate: `h [rows, 2f]` -> `y [rows, f]`, `y = h[:, :f] * gelu(h[:, f:])`.
    pub fn geglu_gate(&self, h: &DevBuf, rows: usize, f: usize, y: &DevBuf) -> Result<()> {
        let op = "geglu_gate";
        check(op, "h", h, h.dtype, mul(op, &[rows, 2, f])?)?;
        let n = mul(op, &[rows, f])?;
        check(op, "y", y, h.dtype, n)?;
        let func = kernels::by_dtype(h.dtype, kernels::GEGLU);
        let args = [
            h.arg(),
            y.arg(),
            KernelArg::U64(rows as u64),
            u32_of(op, "f", f)?,
        ];
        self.launch(
            &ELEMENTWISE,
            func,
            LaunchDims::linear(blocks_for(n), 256),
            &args,
        )
    }

    /// Nearest upsample ×2: `x [planes, h, w]` -> `y [planes, 2h, 2w]` (planes = n*c).
    pub fn upsample_nearest2x(
        &self,
        x: &DevBuf,
        planes: usize,
        h: usize,
        w: usize,
        y: &DevBuf,
    ) -> Result<()> {
        let op = "upsample_nearest2x";
        check(op, "x", x, x.dtype, mul(op, &[planes, h, w])?)?;
        let n = mul(op, &[planes, 4, h, w])?;
        check(op, "y", y, x.dtype, n)?;
        let f = kernels::by_dtype(x.dtype, kernels::UPSAMPLE2X);
        let args = [
            x.arg(),
            y.arg(),
            KernelArg::U64(planes as u64),
            u32_of(op, "h", h)?,
            u32_of(op, "w", w)?,
        ];
        self.launch(
            &ELEMENTWISE,
            f,
            LaunchDims::linear(blocks_for(n), 256),
            &args,
        )
    }

    /// `torch.cat([a, b], dim=1)` for `a [n, ca, s]`, `b [n, cb, s]`, given the per-sample
    /// sizes `a_len = ca*s` and `b_len = cb*s`.
    pub fn cat_channels(
        &self,
        a: &DevBuf,
        b: &DevBuf,
        n: usize,
        a_len: usize,
        b_len: usize,
        y: &DevBuf,
    ) -> Result<()> {
        let op = "cat_channels";
        check(op, "a", a, a.dtype, mul(op, &[n, a_len])?)?;
        check(op, "b", b, a.dtype, mul(op, &[n, b_len])?)?;
        let total = mul(op, &[n, a_len + b_len])?;
        check(op, "y", y, a.dtype, total)?;
        let f = kernels::by_dtype(a.dtype, kernels::CAT2);
        let args = [
            a.arg(),
            b.arg(),
            y.arg(),
            KernelArg::U64(n as u64),
            KernelArg::U64(a_len as u64),
            KernelArg::U64(b_len as u64),
        ];
        self.launch(
            &ELEMENTWISE,
            f,
            LaunchDims::linear(blocks_for(total), 256),
            &args,
        )
    }

    /// Batched transpose `x [batch, rows, cols]` -> `y [batch, cols, rows]` (`y` must not
    /// overlap `x`): NCHW -> tokens is `(b, c, h*w)`, tokens -> NCHW is `(b, h*w, c)`.
    pub fn transpose(
        &self,
        x: &DevBuf,
        batch: usize,
        rows: usize,
        cols: usize,
        y: &DevBuf,
    ) -> Result<()> {
        let op = "transpose";
        let n = mul(op, &[batch, rows, cols])?;
        check(op, "x", x, x.dtype, n)?;
        check(op, "y", y, x.dtype, n)?;
        let args = [
            x.arg(),
            y.arg(),
            KernelArg::U64(batch as u64),
            u32_of(op, "rows", rows)?,
            u32_of(op, "cols", cols)?,
        ];
        // One 32x32 tile per block iteration (32x8 threads, the kernel's fixed shape).
        let tiles = mul(op, &[batch, rows.div_ceil(32), cols.div_ceil(32)])?;
        let blocks = tiles.clamp(1, 1 << 20) as u32;
        let f = kernels::by_dtype(x.dtype, kernels::TRANSPOSE);
        self.launch(&LAYOUT, f, LaunchDims::linear(blocks, 256), &args)
    }

    /// Row gather: `y [ids.len, dim]`, row `i` = `table [vocab, dim]` row `ids[i]` (token
    /// embedding; with `table` a `[b*n, d]` view, per-batch row picks). The ids are device data
    /// the wrapper cannot see: the caller validates them; an id `>= vocab` yields a NaN row.
    pub fn gather(
        &self,
        table: &DevBuf,
        vocab: usize,
        dim: usize,
        ids: &IdBuf,
        y: &DevBuf,
    ) -> Result<()> {
        let op = "gather";
        check(op, "table", table, table.dtype, mul(op, &[vocab, dim])?)?;
        let n = mul(op, &[ids.len, dim])?;
        check(op, "y", y, table.dtype, n)?;
        let args = [
            table.arg(),
            KernelArg::Buf {
                ptr: ids.ptr,
                bytes: ids.bytes(),
            },
            y.arg(),
            KernelArg::U64(ids.len as u64),
            u32_of(op, "dim", dim)?,
            u32_of(op, "vocab", vocab)?,
        ];
        let f = kernels::by_dtype(table.dtype, kernels::GATHER);
        self.launch(&LAYOUT, f, LaunchDims::linear(blocks_for(n), 256), &args)
    }

    /// `F.interpolate(size=(oh, ow), mode="nearest")`: `x [planes, ih, iw]` ->
    /// `y [planes, oh, ow]` with PyTorch's f32 source-index formula, like
    /// [`crate::ops::resize_nearest`].
    pub fn resize_nearest(
        &self,
        x: &DevBuf,
        planes: usize,
        (ih, iw): (usize, usize),
        (oh, ow): (usize, usize),
        y: &DevBuf,
    ) -> Result<()> {
        let op = "resize_nearest";
        if ih == 0 || iw == 0 || oh == 0 || ow == 0 {
            return Err(invalid(format!(
                "{op}: input and output sizes must be non-zero, found {ih}x{iw} -> {oh}x{ow}"
            )));
        }
        check(op, "x", x, x.dtype, mul(op, &[planes, ih, iw])?)?;
        let n = mul(op, &[planes, oh, ow])?;
        check(op, "y", y, x.dtype, n)?;
        let args = [
            x.arg(),
            y.arg(),
            KernelArg::U64(planes as u64),
            u32_of(op, "ih", ih)?,
            u32_of(op, "iw", iw)?,
            u32_of(op, "oh", oh)?,
            u32_of(op, "ow", ow)?,
            KernelArg::F32(crate::ops::resize::nearest_scale(ih, oh)),
            KernelArg::F32(crate::ops::resize::nearest_scale(iw, ow)),
        ];
        let f = kernels::by_dtype(x.dtype, kernels::RESIZE_NEAREST);
        self.launch(&LAYOUT, f, LaunchDims::linear(blocks_for(n), 256), &args)
    }

    /// Converts `x.len` elements to `y`'s type (round to nearest even).
    pub fn cast(&self, x: &DevBuf, y: &DevBuf) -> Result<()> {
        let f = kernels::cast(x.dtype, y.dtype).ok_or_else(|| {
            invalid(format!(
                "cast: {:?} -> {:?} is not a conversion",
                x.dtype, y.dtype
            ))
        })?;
        check("cast", "y", y, y.dtype, x.len)?;
        let n = x.len;
        self.launch(
            &ELEMENTWISE,
            f,
            LaunchDims::linear(blocks_for(n), 256),
            &[x.arg(), y.arg(), KernelArg::U64(n as u64)],
        )
    }

    /// Softmax over rows of `len`: `x [rows, len]` -> `y`.
    pub fn softmax(&self, x: &DevBuf, rows: usize, len: usize, y: &DevBuf) -> Result<()> {
        let op = "softmax";
        let n = mul(op, &[rows, len])?;
        check(op, "x", x, x.dtype, n)?;
        check(op, "y", y, x.dtype, n)?;
        if len == 0 {
            return Err(invalid(format!("{op}: rows of length 0")));
        }
        let f = kernels::by_dtype(x.dtype, kernels::SOFTMAX);
        let blocks = rows.clamp(1, 1 << 20) as u32;
        let args = [
            x.arg(),
            y.arg(),
            KernelArg::U64(rows as u64),
            u32_of(op, "len", len)?,
        ];
        self.launch(&ELEMENTWISE, f, LaunchDims::linear(blocks, 256), &args)
    }

    /// diffusers `get_timestep_embedding`: `t` (f32, `count` values) -> `y [count, dim]`, like
    /// [`crate::ops::timestep_embedding`].
    pub fn timestep_embedding(
        &self,
        t: &DevBuf,
        count: usize,
        dim: usize,
        flip_sin_to_cos: bool,
        downscale_freq_shift: f32,
        y: &DevBuf,
    ) -> Result<()> {
        let op = "timestep_embedding";
        check(op, "t", t, DType::F32, count)?;
        let n = mul(op, &[count, dim])?;
        check(op, "y", y, y.dtype, n)?;
        if dim / 2 == 0 || (dim / 2) as f32 == downscale_freq_shift {
            return Err(invalid(format!(
                "{op}: dim {dim} with downscale_freq_shift {downscale_freq_shift} gives no frequencies"
            )));
        }
        let f = kernels::by_dtype(y.dtype, kernels::TIMESTEP_EMBEDDING);
        let args = [
            t.arg(),
            y.arg(),
            u32_of(op, "count", count)?,
            u32_of(op, "dim", dim)?,
            KernelArg::U32(flip_sin_to_cos.into()),
            KernelArg::F32(downscale_freq_shift),
        ];
        self.launch(
            &ELEMENTWISE,
            f,
            LaunchDims::linear(blocks_for(n), 256),
            &args,
        )
    }

    /// `nn.GroupNorm(groups, c, eps)` on `x [n, c, spatial]` with optional affine `weight [c]`,
    /// `bias [c]` (same type as `x`), then SiLU if `silu`.
    #[allow(clippy::too_many_arguments)]
    pub fn group_norm(
        &self,
        x: &DevBuf,
        n: usize,
        c: usize,
        spatial: usize,
        groups: usize,
        weight: Option<&DevBuf>,
        bias: Option<&DevBuf>,
        eps: f32,
        silu: bool,
        y: &DevBuf,
    ) -> Result<()> {
        let op = "group_norm";
        if groups == 0 || !c.is_multiple_of(groups) || spatial == 0 {
            return Err(invalid(format!(
                "{op}: {groups} groups must divide {c} channels (spatial {spatial} > 0)"
            )));
        }
        let total = mul(op, &[n, c, spatial])?;
        check(op, "x", x, x.dtype, total)?;
        check(op, "y", y, x.dtype, total)?;
        let w = opt_arg(op, "weight", weight, x.dtype, c)?;
        let b = opt_arg(op, "bias", bias, x.dtype, c)?;
        let f = kernels::by_dtype(x.dtype, kernels::GROUP_NORM);
        let blocks = (n * groups).clamp(1, 1 << 20) as u32;
        let args = [
            x.arg(),
            y.arg(),
            w,
            b,
            u32_of(op, "n", n)?,
            u32_of(op, "c", c)?,
            u32_of(op, "groups", groups)?,
            KernelArg::U64(spatial as u64),
            KernelArg::F32(eps),
            KernelArg::U32(silu.into()),
        ];
        self.launch(&NORM, f, LaunchDims::linear(blocks, 256), &args)
    }

    /// `nn.LayerNorm(d, eps)` over rows of `x [rows, d]` with optional `weight [d]`, `bias [d]`.
    #[allow(clippy::too_many_arguments)]
    pub fn layer_norm(
        &self,
        x: &DevBuf,
        rows: usize,
        d: usize,
        weight: Option<&DevBuf>,
        bias: Option<&DevBuf>,
        eps: f32,
        y: &DevBuf,
    ) -> Result<()> {
        let op = "layer_norm";
        if d == 0 {
            return Err(invalid(format!("{op}: rows of length 0")));
        }
        let total = mul(op, &[rows, d])?;
        check(op, "x", x, x.dtype, total)?;
        check(op, "y", y, x.dtype, total)?;
        let w = opt_arg(op, "weight", weight, x.dtype, d)?;
        let b = opt_arg(op, "bias", bias, x.dtype, d)?;
        let f = kernels::by_dtype(x.dtype, kernels::LAYER_NORM);
        let blocks = rows.clamp(1, 1 << 20) as u32;
        let args = [
            x.arg(),
            y.arg(),
            w,
            b,
            KernelArg::U64(rows as u64),
            u32_of(op, "d", d)?,
            KernelArg::F32(eps),
        ];
        self.launch(&NORM, f, LaunchDims::linear(blocks, 128), &args)
    }

    /// `y [m, n] = x [m, k] · weight [n, k]ᵀ + bias [n]` (PyTorch `nn.Linear` layout); tensor
    /// cores for f16/bf16.
    #[allow(clippy::too_many_arguments)]
    pub fn linear(
        &self,
        x: &DevBuf,
        m: usize,
        k: usize,
        weight: &DevBuf,
        n: usize,
        bias: Option<&DevBuf>,
        y: &DevBuf,
    ) -> Result<()> {
        self.linear_with(x, m, k, weight, n, bias, y, GemmKernel::Auto)
    }

    /// [`Gpu::linear`] with the kernel chosen by the caller.
    #[allow(clippy::too_many_arguments)]
    pub fn linear_with(
        &self,
        x: &DevBuf,
        m: usize,
        k: usize,
        weight: &DevBuf,
        n: usize,
        bias: Option<&DevBuf>,
        y: &DevBuf,
        kernel: GemmKernel,
    ) -> Result<()> {
        let op = "linear";
        check(op, "x", x, x.dtype, mul(op, &[m, k])?)?;
        check(op, "weight", weight, x.dtype, mul(op, &[n, k])?)?;
        check(op, "y", y, x.dtype, mul(op, &[m, n])?)?;
        let b = opt_arg(op, "bias", bias, x.dtype, n)?;
        // k == 0 has no k tile to pipeline (y is the bias alone): the 64-tile kernel does it.
        let big_ok = kernels::linear_big(x.dtype).is_some()
            && k > 0
            && k.is_multiple_of(8)
            && x.ptr.0.is_multiple_of(16)
            && weight.ptr.0.is_multiple_of(16);
        let big = match kernel {
            GemmKernel::Auto => big_ok && m >= 512 && n >= 256,
            GemmKernel::Tile64 => false,
            GemmKernel::Tile128 if big_ok => true,
            GemmKernel::Tile128 => {
                return Err(invalid(format!(
                "{op}: the 128-tile kernel needs f16/bf16, k % 8 == 0, k > 0 and 16-byte aligned \
                     x and weight; found {:?}, k = {k}, x at {}, weight at {}",
                x.dtype, x.ptr, weight.ptr
            )))
            }
        };
        if m == 0 || n == 0 {
            return Ok(());
        }
        let args = [
            x.arg(),
            weight.arg(),
            b,
            y.arg(),
            i32_of(op, "m", m)?,
            i32_of(op, "n", n)?,
            i32_of(op, "k", k)?,
        ];
        match kernels::linear_big(x.dtype).filter(|_| big) {
            Some(f) => self.launch(&GEMM, f, gemm_dims(m, n, 128, 256)?, &args),
            None => {
                let f = kernels::by_dtype(x.dtype, kernels::LINEAR);
                self.launch(&GEMM, f, gemm_dims(m, n, 64, gemm_threads(x.dtype))?, &args)
            }
        }
    }

    /// `F.conv2d` on NCHW `x [n, c, h, w]` with `weight [o, c, kh, kw]`, `bias [o]`, into
    /// `y [n, o, ho, wo]`; returns `(ho, wo)`. Implicit GEMM (tensor cores for f16/bf16).
    #[allow(clippy::too_many_arguments)]
    pub fn conv2d(
        &self,
        x: &DevBuf,
        xs: [usize; 4],
        weight: &DevBuf,
        ws: [usize; 4],
        bias: Option<&DevBuf>,
        params: Conv2dParams,
        y: &DevBuf,
    ) -> Result<(usize, usize)> {
        let op = "conv2d";
        let [n, c, h, w] = xs;
        let [o, wc, kh, kw] = ws;
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
            return Err(invalid(format!(
                "{op}: input {xs:?} and weight {ws:?} with stride {:?}, padding {:?} do not fit",
                params.stride, params.padding
            )));
        }
        let (ho, wo) = ((h + pt + pb - kh) / sh + 1, (w + pl + pr - kw) / sw + 1);
        check(op, "x", x, x.dtype, mul(op, &[n, c, h, w])?)?;
        check(op, "weight", weight, x.dtype, mul(op, &[o, c, kh, kw])?)?;
        check(op, "y", y, x.dtype, mul(op, &[n, o, ho, wo])?)?;
        let b = opt_arg(op, "bias", bias, x.dtype, o)?;
        let m = mul(op, &[n, ho, wo])?;
        i32_of(op, "c*kh*kw", mul(op, &[c, kh, kw])?)?;
        if m == 0 || o == 0 {
            return Ok((ho, wo));
        }
        let f = kernels::by_dtype(x.dtype, kernels::CONV2D);
        let mut args = vec![x.arg(), weight.arg(), b, y.arg()];
        for (what, v) in [
            ("n", n),
            ("c", c),
            ("h", h),
            ("w", w),
            ("o", o),
            ("kh", kh),
            ("kw", kw),
            ("stride_h", sh),
            ("stride_w", sw),
            ("pad_top", pt),
            ("pad_left", pl),
            ("ho", ho),
            ("wo", wo),
        ] {
            args.push(i32_of(op, what, v)?);
        }
        i32_of(op, "n*ho*wo", m)?;
        self.launch(&GEMM, f, gemm_dims(m, o, 64, gemm_threads(x.dtype))?, &args)?;
        Ok((ho, wo))
    }

    /// Multi-head attention `softmax(q·kᵀ·scale)·v` per head (like
    /// [`crate::ops::scaled_dot_product_attention`] with `scale = 1/sqrt(d)`), without an
    /// `nq × nk` buffer; shapes, strides and options in `attn`.
    pub fn attention(
        &self,
        q: &DevBuf,
        k: &DevBuf,
        v: &DevBuf,
        attn: &Attention,
        out: &DevBuf,
    ) -> Result<()> {
        let op = "attention";
        let Attention {
            batch,
            nq,
            nk,
            heads,
            head_dim: d,
            ..
        } = *attn;
        let t = q.dtype;
        let hd = mul(op, &[heads, d])?;
        let (q_ld, kv_ld, o_ld) = attn.strides();
        if q_ld < hd || kv_ld < hd || o_ld < hd {
            return Err(invalid(format!(
                "{op}: row strides (q {q_ld}, kv {kv_ld}, out {o_ld}) must be at least heads*d = {hd}"
            )));
        }
        if nk == 0 || d == 0 {
            return Err(invalid(format!(
                "{op}: needs nk > 0 and d > 0, found nk {nk}, d {d}"
            )));
        }
        if attn.causal && nq != nk {
            return Err(invalid(format!(
                "{op}: causal attention needs nq == nk, found {nq} and {nk}"
            )));
        }
        if batch == 0 || nq == 0 || heads == 0 {
            return Ok(());
        }
        // Elements the kernel may touch: every row start plus one row of heads*d.
        let span = |rows: usize, ld: usize| -> Result<usize> {
            Ok(mul(op, &[mul(op, &[batch, rows])? - 1, ld])? + hd)
        };
        check(op, "q", q, t, span(nq, q_ld)?)?;
        check(op, "k", k, t, span(nk, kv_ld)?)?;
        check(op, "v", v, t, span(nk, kv_ld)?)?;
        check(op, "out", out, t, span(nq, o_ld)?)?;
        let heads32 = u32::try_from(heads).ok().filter(|&h| h <= 65535);
        let batch32 = u32::try_from(batch).ok().filter(|&b| b <= 65535);
        let (Some(gh), Some(gb)) = (heads32, batch32) else {
            return Err(invalid(format!(
                "{op}: heads {heads} and batch {batch} must be <= 65535"
            )));
        };
        let strides = [
            KernelArg::U64(q_ld as u64),
            KernelArg::U64(kv_ld as u64),
            KernelArg::U64(kv_ld as u64),
            KernelArg::U64(o_ld as u64),
        ];
        let tail = [
            KernelArg::F32(attn.scale),
            KernelArg::U32(attn.causal.into()),
        ];
        let flash = match attn.kernel {
            AttentionKernel::Auto => kernels::flash(t, d),
            AttentionKernel::Simt => None,
        };
        let mut args = vec![
            q.arg(),
            k.arg(),
            v.arg(),
            out.arg(),
            i32_of(op, "nq", nq)?,
            i32_of(op, "nk", nk)?,
        ];
        if let Some(f) = flash {
            // Pair loads: every row start must be 4-byte aligned.
            let odd = [q_ld, kv_ld, o_ld].iter().any(|ld| ld % 2 != 0);
            if odd || [q, k, v, out].iter().any(|b| b.ptr.0 % 4 != 0) {
                return Err(invalid(format!(
                    "{op}: 16-bit operands need 4-byte aligned starts and even row strides"
                )));
            }
            args.extend(strides.into_iter().chain(tail));
            let grid = (u32::try_from(nq.div_ceil(64)).unwrap_or(u32::MAX), gh, gb);
            let dims = LaunchDims {
                grid,
                block: (128, 1, 1),
                shared_mem: 0,
            };
            return self.launch(&ATTENTION, f, dims, &args);
        }
        if d > SIMT_MAX_HEAD_DIM {
            return Err(invalid(format!(
                "{op}: head size {d} exceeds {SIMT_MAX_HEAD_DIM}"
            )));
        }
        let f = kernels::by_dtype(t, kernels::ATTENTION_SIMT);
        args.push(i32_of(op, "d", d)?);
        args.extend(strides.into_iter().chain(tail));
        let grid = (u32::try_from(nq.div_ceil(4)).unwrap_or(u32::MAX), gh, gb);
        let dims = LaunchDims {
            grid,
            block: (128, 1, 1),
            shared_mem: 0,
        };
        self.launch(&ATTENTION, f, dims, &args)
    }
}

/// Shapes and options of [`Gpu::attention`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Attention {
    /// Batch size.
    pub batch: usize,
    /// Query rows per batch item.
    pub nq: usize,
    /// Key / value rows per batch item (differs from `nq` in cross-attention).
    pub nk: usize,
    /// Number of heads.
    pub heads: usize,
    /// Head size `d`.
    pub head_dim: usize,
    /// Softmax temperature (`1/sqrt(d)` in SD).
    pub scale: f32,
    /// Query `i` sees keys `0..=i` only (CLIP's text encoder); needs `nq == nk`.
    pub causal: bool,
    /// Elements between consecutive rows of q, of k and v, of the output; `None` means
    /// `heads * head_dim` for all (contiguous `[b, n, heads*d]`). Larger strides address column
    /// slices, e.g. q, k and v inside one fused QKV projection output.
    pub row_strides: Option<(usize, usize, usize)>,
    /// Which kernel runs.
    pub kernel: AttentionKernel,
}

impl Attention {
    /// Non-causal attention over contiguous operands with `scale = 1/sqrt(head_dim)`.
    pub fn new(batch: usize, nq: usize, nk: usize, heads: usize, head_dim: usize) -> Self {
        Attention {
            batch,
            nq,
            nk,
            heads,
            head_dim,
            scale: 1.0 / (head_dim.max(1) as f32).sqrt(),
            causal: false,
            row_strides: None,
            kernel: AttentionKernel::Auto,
        }
    }

    /// Row strides of q, k/v and the output, in elements.
    pub fn strides(&self) -> (usize, usize, usize) {
        let hd = self.heads * self.head_dim;
        self.row_strides.unwrap_or((hd, hd, hd))
    }
}

/// Threads per block of the 64-tile GEMM kernels: 256 for f32 (SIMT), 128 for tensor cores.
fn gemm_threads(t: DType) -> u32 {
    if t == DType::F32 {
        256
    } else {
        128
    }
}

/// Grid of the GEMM kernels for `tile`×`tile` output tiles: M tiles on x (up to 2^31 − 1
/// blocks, so any M the kernels' i32 indices allow), N tiles on y (up to 65535).
pub fn gemm_dims(m: usize, n: usize, tile: usize, threads: u32) -> Result<LaunchDims> {
    let (gx, gy) = (m.div_ceil(tile), n.div_ceil(tile));
    // The kernels compute `blockIdx.x * tile` in i32: the last tile's start must fit.
    let m_ok = gx.checked_mul(tile).is_some_and(|e| e <= i32::MAX as usize);
    if !m_ok || gy > MAX_GRID.1 as usize {
        return Err(invalid(format!(
            "gemm: {m}x{n} output needs too many {tile}x{tile} tiles"
        )));
    }
    let dims = LaunchDims {
        grid: (gx.max(1) as u32, gy.max(1) as u32, 1),
        block: (threads, 1, 1),
        shared_mem: 0,
    };
    dims.check("gemm")?;
    Ok(dims)
}
