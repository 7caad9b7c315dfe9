//! One backend trait over the SD ops, with a CPU and a CUDA implementation, so model code can
//! be written once and run on either.
//!
//! [`Backend`] has an associated activation type ([`Backend::Tensor`]) and the ops the models use,
//! at the granularity of [`crate::ops`]: every op allocates and returns its output. Weights are
//! `&Self::Tensor` too: on the CPU an owned [`Tensor`], on CUDA a [`CudaTensor`] view into the
//! scheduler's arena that the backend does not own ([`CudaTensor::weight`]).
//!
//! - [`CpuBackend`]: `Tensor = crate::tensor::Tensor`; each op is the [`crate::ops`] function
//!   (bit-identical to calling the op directly).
//! - [`CudaBackend`]: device tensors on one stream through [`crate::cuda::Gpu`]; activations come
//!   from an [`ActivationArena`] (a stack over the scheduler's `workspace()` range), never from
//!   the driver's allocator. A recording mode validates launch sequences without a GPU.
//!
//! Scoped release: [`Backend::mark`] and [`Backend::keep`] bracket a layer, so its temporaries
//! are reclaimed and only its output survives (a no-op on the CPU, where `Drop` frees).

mod arena;
mod cpu;
mod cuda;
pub mod profile;

pub use arena::{ActivationArena, ArenaError, ArenaMark, ARENA_ALIGN};
pub use cpu::CpuBackend;
pub use cuda::{staging_growth, CudaBackend, CudaTensor, DownloadStaging};

use crate::error::Result;
use crate::ops::{Activation, Conv2dParams};
use crate::tensor::{DType, OpError, Tensor};

/// The ops the SD models run, over one kind of activation tensor.
///
/// Layouts are PyTorch's, as in [`crate::ops`]: NCHW images, `[batch, seq, dim]` sequences,
/// `[out, in]` linear weights. Every op checks its operands and returns an error saying what it
/// expected and what it found; none panics on input.
pub trait Backend {
    /// An activation or weight on this backend (a clone of a CUDA tensor is another view of
    /// the same memory; of a CPU tensor, a copy).
    type Tensor: Clone + std::fmt::Debug;
    /// A point of the activation stack to return to ([`Backend::keep`], [`Backend::release`]).
    type Mark: Copy;

    /// A short name for messages and test names (`"cpu"`, `"cuda"`).
    fn name(&self) -> &'static str;
    /// Storage type of activations (what [`Backend::upload`] rounds to).
    fn dtype(&self) -> DType;
    /// Copies a host tensor onto the backend (rounded to [`Backend::dtype`]).
    fn upload(&self, t: &Tensor) -> Result<Self::Tensor>;
    /// Copies a backend tensor to the host as f32 (waits for the work that produces it).
    fn download(&self, t: &Self::Tensor) -> Result<Tensor>;
    /// The dimensions of a backend tensor.
    fn shape<'t>(&self, t: &'t Self::Tensor) -> &'t [usize];

    /// The current top of the activation stack.
    fn mark(&self) -> Self::Mark;
    /// Frees every activation allocated since `mark` except `t`, which is returned (moved down
    /// to `mark` on CUDA): the end of a layer that keeps only its output.
    fn keep(&self, mark: Self::Mark, t: Self::Tensor) -> Result<Self::Tensor>;
    /// Frees every activation allocated since `mark`; tensors allocated after it must not be
    /// used again (CUDA refuses them as operands).
    fn release(&self, mark: Self::Mark) -> Result<()>;

    /// `nn.Linear`: `x [..., k] · weight [n, k]ᵀ + bias [n]` -> `[..., n]`.
    fn linear(
        &self,
        x: &Self::Tensor,
        weight: &Self::Tensor,
        bias: Option<&Self::Tensor>,
    ) -> Result<Self::Tensor>;
    /// `F.conv2d`: `x [n, c, h, w]`, `weight [o, c, kh, kw]`, `bias [o]` -> `[n, o, ho, wo]`.
    fn conv2d(
        &self,
        x: &Self::Tensor,
        weight: &Self::Tensor,
        bias: Option<&Self::Tensor>,
        params: Conv2dParams,
    ) -> Result<Self::Tensor>;
    /// `nn.GroupNorm(groups, c, eps)` on `x [n, c, ...]`, optional affine `[c]`, then SiLU if
    /// `silu`.
    fn group_norm(
        &self,
        x: &Self::Tensor,
        groups: usize,
        weight: Option<&Self::Tensor>,
        bias: Option<&Self::Tensor>,
        eps: f32,
        silu: bool,
    ) -> Result<Self::Tensor>;
    /// `nn.LayerNorm(d, eps)` over the last dim of `x [..., d]`, optional affine `[d]`.
    fn layer_norm(
        &self,
        x: &Self::Tensor,
        weight: Option<&Self::Tensor>,
        bias: Option<&Self::Tensor>,
        eps: f32,
    ) -> Result<Self::Tensor>;
    /// Multi-head `softmax(q·kᵀ·scale)·v` for `q [b, nq, heads*d]`, `k`, `v [b, nk, heads*d]`
    /// -> `[b, nq, heads*d]`; `scale = 1/sqrt(d)`. With `causal` (CLIP; needs `nq == nk`)
    /// query `i` sees keys `0..=i` and `scale = d^-0.5` computed as CLIP's model does.
    fn attention(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        heads: usize,
        causal: bool,
    ) -> Result<Self::Tensor>;
    /// A point-wise activation.
    fn activation(&self, act: Activation, x: &Self::Tensor) -> Result<Self::Tensor>;
    /// diffusers `GEGLU`: `linear(x, weight [2f, k], bias)` split in halves, `a * gelu(b)` ->
    /// `[..., f]`.
    fn geglu(
        &self,
        x: &Self::Tensor,
        weight: &Self::Tensor,
        bias: Option<&Self::Tensor>,
    ) -> Result<Self::Tensor>;
    /// `a + b` (equal shapes).
    fn add(&self, a: &Self::Tensor, b: &Self::Tensor) -> Result<Self::Tensor>;
    /// `x * s`.
    fn scale(&self, x: &Self::Tensor, s: f32) -> Result<Self::Tensor>;
    /// `x + b[:, :, None, None]` for `x [n, c, ...]` and `b [c]` or `[n, c]`.
    fn add_channel_bias(&self, x: &Self::Tensor, b: &Self::Tensor) -> Result<Self::Tensor>;
    /// Nearest ×2 upsample of `x [n, c, h, w]`.
    fn upsample_nearest2x(&self, x: &Self::Tensor) -> Result<Self::Tensor>;
    /// `torch.cat([a, b], dim=1)` (UNet skip connections).
    fn cat_channels(&self, a: &Self::Tensor, b: &Self::Tensor) -> Result<Self::Tensor>;
    /// `[b, c, h, w]` -> `[b, h*w, c]` (diffusers' `permute(0, 2, 3, 1).reshape(b, h*w, c)`
    /// before a `Transformer2DModel` / VAE attention).
    fn nchw_to_tokens(&self, x: &Self::Tensor) -> Result<Self::Tensor>;
    /// `[b, h*w, c]` -> `[b, c, h, w]` (the inverse of [`Backend::nchw_to_tokens`]).
    fn tokens_to_nchw(&self, x: &Self::Tensor, h: usize, w: usize) -> Result<Self::Tensor>;
    /// Token embedding lookup: `table [v, d]` rows at host `ids` (`b` rows of `n` ids, each
    /// `< v`) -> `[b, n, d]`.
    fn embedding(&self, table: &Self::Tensor, ids: &[Vec<u32>]) -> Result<Self::Tensor>;
    /// One row per batch item: `x [b, n, d]` at host `rows` (`b` of them, each `< n`) ->
    /// `[b, d]` (CLIP's pooled output at the eos position).
    fn gather_rows(&self, x: &Self::Tensor, rows: &[usize]) -> Result<Self::Tensor>;
    /// `F.interpolate(x, size=(h, w), mode="nearest")` on `x [n, c, ih, iw]` (PyTorch's f32
    /// source-index formula, [`crate::ops::resize_nearest`]).
    fn resize_nearest(&self, x: &Self::Tensor, h: usize, w: usize) -> Result<Self::Tensor>;
    /// The same elements under another shape (metadata only, nothing is copied); the element
    /// count must match.
    fn reshape(&self, x: Self::Tensor, shape: &[usize]) -> Result<Self::Tensor>;
    /// diffusers `get_timestep_embedding` of host timesteps -> `[timesteps.len(), dim]`.
    fn timestep_embedding(
        &self,
        timesteps: &[f32],
        dim: usize,
        flip_sin_to_cos: bool,
        downscale_freq_shift: f32,
    ) -> Result<Self::Tensor>;
}

/// Checks `ids` against a `[v, d]` embedding table: equal row lengths, every id `< v`. Returns
/// `(b, n, v, d)`.
fn check_ids(table: &[usize], ids: &[Vec<u32>]) -> Result<(usize, usize, usize, usize)> {
    let op = "embedding";
    let &[v, d] = table else {
        return Err(OpError::shape(op, "table [vocab, dim]", format!("{table:?}")).into());
    };
    let n = ids.first().map_or(0, Vec::len);
    for (bi, row) in ids.iter().enumerate() {
        if row.len() != n {
            return Err(OpError::shape(
                op,
                format!("{} rows of {n} ids (row 0's length)", ids.len()),
                format!("row {bi} has {} ids", row.len()),
            )
            .into());
        }
        if let Some((i, &id)) = row.iter().enumerate().find(|(_, &id)| id as usize >= v) {
            return Err(OpError::invalid(
                op,
                format!("id {id} at [{bi}, {i}] is out of range for a table of {v} rows"),
            )
            .into());
        }
    }
    Ok((ids.len(), n, v, d))
}

/// Checks `rows` against `x [b, n, d]`: one row per batch item, each `< n`. Returns `(b, n, d)`.
fn check_rows(x: &[usize], rows: &[usize]) -> Result<(usize, usize, usize)> {
    let op = "gather_rows";
    let &[b, n, d] = x else {
        return Err(OpError::shape(op, "x [batch, seq, dim]", format!("{x:?}")).into());
    };
    if rows.len() != b {
        return Err(OpError::shape(
            op,
            format!("one row index per batch item ({b})"),
            format!("{} indices", rows.len()),
        )
        .into());
    }
    if let Some((bi, &r)) = rows.iter().enumerate().find(|(_, &r)| r >= n) {
        return Err(OpError::invalid(
            op,
            format!("row {r} for batch item {bi} is out of range for x {x:?}"),
        )
        .into());
    }
    Ok((b, n, d))
}

/// Checks that `shape` has as many elements as `from` (for [`Backend::reshape`]).
fn check_reshape(from: &[usize], shape: &[usize]) -> Result<()> {
    let count = |s: &[usize]| s.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    if count(from).is_none() || count(from) != count(shape) {
        return Err(OpError::shape(
            "reshape",
            format!("a shape with as many elements as {from:?}"),
            format!("{shape:?}"),
        )
        .into());
    }
    Ok(())
}
