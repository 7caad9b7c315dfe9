//! A plain owned f32 tensor (row-major, contiguous) for the CPU reference ops, and the error type
//! the ops return.
//!
//! Layouts follow PyTorch: images are NCHW, sequences are `[batch, seq, dim]`, linear weights are
//! `[out, in]`.

use std::fmt;

/// Error from a tensor constructor or a CPU op: what was expected and what was found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpError {
    /// Operand shapes do not fit the op.
    #[error("{op}: expected {expected}, found {found}")]
    Shape {
        /// The op or constructor that failed.
        op: &'static str,
        /// What the op needs.
        expected: String,
        /// What it was given.
        found: String,
    },
    /// A scalar parameter is out of range (e.g. groups not dividing channels, zero stride).
    #[error("{op}: invalid argument: {msg}")]
    Invalid {
        /// The op that failed.
        op: &'static str,
        /// What was wrong.
        msg: String,
    },
}

impl OpError {
    /// Shorthand for [`OpError::Shape`].
    pub fn shape(op: &'static str, expected: impl Into<String>, found: impl Into<String>) -> Self {
        OpError::Shape {
            op,
            expected: expected.into(),
            found: found.into(),
        }
    }

    /// Shorthand for [`OpError::Invalid`].
    pub fn invalid(op: &'static str, msg: impl Into<String>) -> Self {
        OpError::Invalid {
            op,
            msg: msg.into(),
        }
    }
}

/// Result alias for tensor ops.
pub type OpResult<T> = Result<T, OpError>;

/// Element type of raw weight bytes accepted by [`Tensor::from_bytes`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16.
    BF16,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }
}

/// An owned, contiguous, row-major f32 tensor.
#[derive(Clone, PartialEq)]
pub struct Tensor {
    shape: Vec<usize>,
    data: Vec<f32>,
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Printing megabytes of data helps nobody; show the shape and a few values.
        let head: Vec<f32> = self.data.iter().take(6).copied().collect();
        f.debug_struct("Tensor")
            .field("shape", &self.shape)
            .field("head", &head)
            .finish()
    }
}

fn numel_of(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

impl Tensor {
    /// Wraps `data` as a tensor of `shape`; fails if the element count differs.
    pub fn new(shape: impl Into<Vec<usize>>, data: Vec<f32>) -> OpResult<Tensor> {
        let shape = shape.into();
        match numel_of(&shape) {
            Some(n) if n == data.len() => Ok(Tensor { shape, data }),
            _ => Err(OpError::shape(
                "Tensor::new",
                format!("{} elements for shape {:?}", fmt_numel(&shape), shape),
                format!("{} elements", data.len()),
            )),
        }
    }

    /// A tensor of `shape` filled with `value`.
    pub fn full(shape: impl Into<Vec<usize>>, value: f32) -> OpResult<Tensor> {
        let shape = shape.into();
        let n = numel_of(&shape).ok_or_else(|| {
            OpError::invalid("Tensor::full", format!("shape {shape:?} overflows"))
        })?;
        Ok(Tensor {
            shape,
            data: vec![value; n],
        })
    }

    /// A tensor of `shape` filled with zeros.
    pub fn zeros(shape: impl Into<Vec<usize>>) -> OpResult<Tensor> {
        Tensor::full(shape, 0.0)
    }

    /// A 0-d tensor holding one value.
    pub fn scalar(value: f32) -> Tensor {
        Tensor {
            shape: Vec::new(),
            data: vec![value],
        }
    }

    /// Decodes little-endian `bytes` of `dtype` into an f32 tensor of `shape`.
    pub fn from_bytes(
        bytes: &[u8],
        dtype: DType,
        shape: impl Into<Vec<usize>>,
    ) -> OpResult<Tensor> {
        Tensor::from_bytes_in(bytes, dtype, shape, Vec::new())
    }

    /// [`Tensor::from_bytes`] into `buf`'s allocation when it is large enough (its contents are
    /// overwritten), else into a fresh one.
    pub fn from_bytes_in(
        bytes: &[u8],
        dtype: DType,
        shape: impl Into<Vec<usize>>,
        buf: Vec<f32>,
    ) -> OpResult<Tensor> {
        let shape = shape.into();
        let n = numel_of(&shape).ok_or_else(|| {
            OpError::invalid("Tensor::from_bytes", format!("shape {shape:?} overflows"))
        })?;
        let want = n.checked_mul(dtype.size());
        if want != Some(bytes.len()) {
            return Err(OpError::shape(
                "Tensor::from_bytes",
                format!(
                    "{} bytes ({} {:?} elements for shape {:?})",
                    n.saturating_mul(dtype.size()),
                    n,
                    dtype,
                    shape
                ),
                format!("{} bytes", bytes.len()),
            ));
        }
        Ok(Tensor {
            shape,
            data: decode(bytes, dtype, buf),
        })
    }

    /// The dimensions.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of dimensions.
    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    /// Size of dimension `d`, or an error naming the op if the tensor has fewer dimensions.
    pub fn dim(&self, d: usize) -> OpResult<usize> {
        self.shape.get(d).copied().ok_or_else(|| {
            OpError::shape(
                "Tensor::dim",
                format!("a tensor with more than {d} dimensions"),
                format!("shape {:?}", self.shape),
            )
        })
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.data.len()
    }

    /// The elements in row-major order.
    pub fn data(&self) -> &[f32] {
        &self.data
    }

    /// The elements in row-major order, mutable.
    pub fn data_mut(&mut self) -> &mut [f32] {
        &mut self.data
    }

    /// Consumes the tensor, returning its elements.
    pub fn into_data(self) -> Vec<f32> {
        self.data
    }

    /// Same data viewed with a new shape of equal element count (no copy).
    pub fn reshape(self, shape: impl Into<Vec<usize>>) -> OpResult<Tensor> {
        let shape = shape.into();
        if numel_of(&shape) != Some(self.data.len()) {
            return Err(OpError::shape(
                "reshape",
                format!("a shape with {} elements", self.data.len()),
                format!("{shape:?} (from {:?})", self.shape),
            ));
        }
        Ok(Tensor {
            shape,
            data: self.data,
        })
    }

    /// Checks that the shape equals `expected`; `op` names the caller in the error.
    pub fn expect_shape(&self, op: &'static str, expected: &[usize]) -> OpResult<()> {
        if self.shape == expected {
            Ok(())
        } else {
            Err(OpError::shape(
                op,
                format!("shape {expected:?}"),
                format!("{:?}", self.shape),
            ))
        }
    }

    /// Checks that the tensor has `rank` dimensions; `what` describes the expected layout.
    pub fn expect_rank(&self, op: &'static str, rank: usize, what: &str) -> OpResult<()> {
        if self.shape.len() == rank {
            Ok(())
        } else {
            Err(OpError::shape(
                op,
                format!("a {rank}-d tensor {what}"),
                format!("shape {:?}", self.shape),
            ))
        }
    }

    /// The slice `start..start + len` along dimension `dim`, copied.
    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> OpResult<Tensor> {
        let size = self.dim_checked("narrow", dim)?;
        if start.checked_add(len).is_none_or(|end| end > size) {
            return Err(OpError::shape(
                "narrow",
                format!("start + len <= {size} (size of dim {dim})"),
                format!("start {start}, len {len} on shape {:?}", self.shape),
            ));
        }
        let outer: usize = self.shape[..dim].iter().product();
        let inner: usize = self.shape[dim + 1..].iter().product();
        let mut data = Vec::with_capacity(outer * len * inner);
        for o in 0..outer {
            let base = (o * size + start) * inner;
            data.extend_from_slice(&self.data[base..base + len * inner]);
        }
        let mut shape = self.shape.clone();
        shape[dim] = len;
        Ok(Tensor { shape, data })
    }

    /// Splits dimension `dim` into `n` equal chunks (like `torch.chunk` when the size divides).
    pub fn chunk(&self, n: usize, dim: usize) -> OpResult<Vec<Tensor>> {
        let size = self.dim_checked("chunk", dim)?;
        if n == 0 || !size.is_multiple_of(n) {
            return Err(OpError::shape(
                "chunk",
                format!("dim {dim} divisible into {n} equal chunks"),
                format!("shape {:?}", self.shape),
            ));
        }
        let len = size / n;
        (0..n).map(|i| self.narrow(dim, i * len, len)).collect()
    }

    /// Concatenates tensors along `dim`; all other dimensions must match.
    pub fn concat(tensors: &[&Tensor], dim: usize) -> OpResult<Tensor> {
        let first = tensors.first().ok_or_else(|| {
            OpError::invalid("concat", "expected at least one tensor, found none")
        })?;
        first.dim_checked("concat", dim)?;
        let mut total = 0usize;
        for t in tensors {
            let same_rest = t.shape.len() == first.shape.len()
                && t.shape
                    .iter()
                    .zip(&first.shape)
                    .enumerate()
                    .all(|(i, (a, b))| i == dim || a == b);
            if !same_rest {
                return Err(OpError::shape(
                    "concat",
                    format!("shapes equal to {:?} except in dim {dim}", first.shape),
                    format!("{:?}", t.shape),
                ));
            }
            total += t.shape[dim];
        }
        let outer: usize = first.shape[..dim].iter().product();
        let inner: usize = first.shape[dim + 1..].iter().product();
        let mut data = Vec::with_capacity(outer * total * inner);
        for o in 0..outer {
            for t in tensors {
                let block = t.shape[dim] * inner;
                data.extend_from_slice(&t.data[o * block..(o + 1) * block]);
            }
        }
        let mut shape = first.shape.clone();
        shape[dim] = total;
        Ok(Tensor { shape, data })
    }

    /// Reorders dimensions: output dim `i` is input dim `perm[i]` (like `torch.permute`), copied
    /// into a contiguous tensor.
    pub fn permute(&self, perm: &[usize]) -> OpResult<Tensor> {
        let rank = self.shape.len();
        let mut seen = vec![false; rank];
        let valid = perm.len() == rank
            && perm
                .iter()
                .all(|&p| p < rank && !std::mem::replace(&mut seen[p], true));
        if !valid {
            return Err(OpError::shape(
                "permute",
                format!("a permutation of 0..{rank}"),
                format!("{perm:?} for shape {:?}", self.shape),
            ));
        }
        let shape: Vec<usize> = perm.iter().map(|&p| self.shape[p]).collect();
        let data = match transpose_form(&self.shape, perm) {
            Some((b, r, c, d)) => transpose_blocked(&self.data, b, r, c, d),
            None => permute_strided(&self.data, &self.shape, perm),
        };
        Ok(Tensor { shape, data })
    }

    /// Swaps two dimensions (copying).
    pub fn transpose(&self, a: usize, b: usize) -> OpResult<Tensor> {
        let rank = self.shape.len();
        if a >= rank || b >= rank {
            return Err(OpError::shape(
                "transpose",
                format!("dims < {rank}"),
                format!("dims {a} and {b} for shape {:?}", self.shape),
            ));
        }
        let mut perm: Vec<usize> = (0..rank).collect();
        perm.swap(a, b);
        self.permute(&perm)
    }

    /// Largest absolute element-wise difference to `other` (shapes must match); NaN when either
    /// tensor holds a NaN or both hold the same infinity at one position (never a number that
    /// could pass a tolerance check), infinite when only one side is infinite there.
    pub fn max_abs_diff(&self, other: &Tensor) -> OpResult<f32> {
        other.expect_shape("max_abs_diff", &self.shape)?;
        Ok(self
            .data
            .iter()
            .zip(&other.data)
            .fold(0.0f32, |m, (a, b)| nan_max(m, (a - b).abs())))
    }

    /// Largest absolute element (0 for an empty tensor; NaN when any element is NaN, infinite
    /// when any is infinite).
    pub fn max_abs(&self) -> f32 {
        self.data.iter().fold(0.0f32, |m, v| nan_max(m, v.abs()))
    }

    /// The first element that is NaN or infinite, as `(flat index, value)`; `None` when every
    /// element is finite.
    pub fn first_non_finite(&self) -> Option<(usize, f32)> {
        self.data
            .iter()
            .enumerate()
            .find(|(_, v)| !v.is_finite())
            .map(|(i, &v)| (i, v))
    }

    fn dim_checked(&self, op: &'static str, dim: usize) -> OpResult<usize> {
        self.shape.get(dim).copied().ok_or_else(|| {
            OpError::shape(
                op,
                format!("dim < {}", self.shape.len()),
                format!("dim {dim} for shape {:?}", self.shape),
            )
        })
    }
}

/// Little-endian `bytes` of `dtype` as f32 values, in one pass, in `buf` when it already holds
/// at least that many values (overwriting warm memory saves the page faults of a fresh
/// allocation and the zero-fill of a resize). Large inputs are converted in parallel chunks.
/// Aligned input (the usual case: weights in device or mapped memory) goes through `half`'s
/// slice conversion, which uses the CPU's F16C instructions where present; the conversion is
/// exact either way, so the result does not depend on the split.
fn decode(bytes: &[u8], dtype: DType, mut buf: Vec<f32>) -> Vec<f32> {
    use half::slice::HalfFloatSliceExt;
    let n = bytes.len() / dtype.size();
    if buf.len() >= n {
        buf.truncate(n);
    } else {
        // A fresh zeroed allocation comes from untouched pages: no memset pass.
        buf = vec![0.0; n];
    }
    let size = dtype.size();
    let convert = |start: usize, dst: &mut [f32]| {
        let src = &bytes[start * size..(start + dst.len()) * size];
        let le = cfg!(target_endian = "little");
        match dtype {
            DType::F32 => match bytemuck::try_cast_slice::<u8, f32>(src) {
                Ok(v) if le => dst.copy_from_slice(v),
                _ => {
                    for (o, c) in dst.iter_mut().zip(src.chunks_exact(4)) {
                        *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                    }
                }
            },
            DType::F16 => match bytemuck::try_cast_slice::<u8, half::f16>(src) {
                Ok(v) if le => v.convert_to_f32_slice(dst),
                _ => {
                    for (o, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
                        *o = half::f16::from_le_bytes([c[0], c[1]]).to_f32();
                    }
                }
            },
            DType::BF16 => match bytemuck::try_cast_slice::<u8, half::bf16>(src) {
                Ok(v) if le => v.convert_to_f32_slice(dst),
                _ => {
                    for (o, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
                        *o = half::bf16::from_le_bytes([c[0], c[1]]).to_f32();
                    }
                }
            },
        }
    };
    crate::ops::parallel::for_each_chunk(&mut buf, convert);
    buf
}

/// The larger of `a` and `b`, NaN when either is NaN (`f32::max` would drop the NaN).
fn nan_max(a: f32, b: f32) -> f32 {
    if a.is_nan() || b.is_nan() {
        f32::NAN
    } else {
        a.max(b)
    }
}

/// The permutation as a batched transpose `[b, r, c, d] -> [b, c, r, d]` of contiguous runs
/// of `d` elements, when it is one (after dropping size-1 dims and merging dims that stay
/// adjacent and in order); `r` and `c` may be 1 (a plain copy).
fn transpose_form(shape: &[usize], perm: &[usize]) -> Option<(usize, usize, usize, usize)> {
    // Output dims in order, as input dims, without size-1 dims.
    let dims: Vec<usize> = perm.iter().copied().filter(|&p| shape[p] > 1).collect();
    // Runs of output dims that are consecutive input dims: (first input dim, size).
    let mut groups: Vec<(usize, usize)> = Vec::new();
    let mut prev: Option<usize> = None;
    for &p in &dims {
        // Consecutive up to the size-1 input dims in between.
        let joins = prev.is_some_and(|q| q < p && (q + 1..p).all(|k| shape[k] == 1));
        match groups.last_mut() {
            Some(g) if joins => g.1 *= shape[p],
            _ => groups.push((p, shape[p])),
        }
        prev = Some(p);
    }
    // Input order of the groups: rank of each group's first dim.
    let mut order: Vec<usize> = (0..groups.len()).collect();
    order.sort_by_key(|&g| groups[g].0);
    let mut rank = vec![0; groups.len()];
    for (k, &g) in order.iter().enumerate() {
        rank[g] = k;
    }
    let size = |g: usize| groups[g].1;
    match rank.as_slice() {
        [] => Some((1, 1, 1, 1)),
        [0] => Some((1, 1, 1, size(0))),
        [1, 0] => Some((1, size(1), size(0), 1)),
        [0, 2, 1] => Some((size(0), size(2), size(1), 1)),
        [1, 0, 2] => Some((1, size(1), size(0), size(2))),
        [0, 2, 1, 3] => Some((size(0), size(2), size(1), size(3))),
        _ => None,
    }
}

/// Output rows per cache tile of [`transpose_blocked`] (and input rows read per tile).
const TILE: usize = 32;

/// `src [b, r, c, d] -> [b, c, r, d]`, in `TILE x TILE` tiles (each tile's reads and writes
/// stay in L1), output rows split over threads. A copy: no arithmetic, so nothing depends on
/// the split.
fn transpose_blocked(src: &[f32], b: usize, r: usize, c: usize, d: usize) -> Vec<f32> {
    transpose_blocked_on(src, b, r, c, d, crate::ops::num_threads())
}

/// [`transpose_blocked`] on at most `max_threads` threads.
fn transpose_blocked_on(
    src: &[f32],
    b: usize,
    r: usize,
    c: usize,
    d: usize,
    max_threads: usize,
) -> Vec<f32> {
    let n = src.len();
    let mut out = vec![0.0f32; n];
    if n == 0 {
        return out;
    }
    if r == 1 || c == 1 {
        out.copy_from_slice(src);
        return out;
    }
    // One output row: (batch, column) -> r * d elements.
    let row_len = r * d;
    let out_rows = b * c;
    let threads = max_threads
        .min(n / MIN_PARALLEL_COPY)
        .min(out_rows.div_ceil(TILE))
        .max(1);
    let per = out_rows.div_ceil(threads).div_ceil(TILE) * TILE;
    let work = |first_row: usize, dst: &mut [f32]| {
        for (t, tile) in dst.chunks_mut(TILE * row_len).enumerate() {
            let row0 = first_row + t * TILE;
            // Rows of one tile may span two batches: go row by row within the tile's range.
            let rows_here = tile.len() / row_len;
            let mut k = 0;
            while k < rows_here {
                let (bi, ci) = ((row0 + k) / c, (row0 + k) % c);
                // Output rows ci.. of batch bi, up to the tile's or the batch's end.
                let m = (rows_here - k).min(c - ci);
                let block = &mut tile[k * row_len..(k + m) * row_len];
                let base = bi * r * c * d;
                let mut buf = [0.0f32; TILE * TILE];
                for r0 in (0..r).step_by(TILE) {
                    let rn = TILE.min(r - r0);
                    if d == 1 && rn == TILE && m == TILE {
                        transpose_tile(&src[base + r0 * c + ci..], c, &mut block[r0..], row_len);
                        continue;
                    }
                    if d == 1 {
                        // Stage the tile (m <= TILE columns of rn input rows) contiguously: the
                        // input rows are often 2^k floats apart, and reading them column-wise
                        // would thrash one L1 set.
                        for k in 0..rn {
                            let s = base + (r0 + k) * c + ci;
                            buf[k * TILE..k * TILE + m].copy_from_slice(&src[s..s + m]);
                        }
                        for (j, orow) in block.chunks_exact_mut(row_len).enumerate() {
                            for (k, v) in orow[r0..r0 + rn].iter_mut().enumerate() {
                                *v = buf[k * TILE + j];
                            }
                        }
                        continue;
                    }
                    for (j, orow) in block.chunks_exact_mut(row_len).enumerate() {
                        let col = ci + j;
                        {
                            for ri in r0..r0 + rn {
                                let s = base + (ri * c + col) * d;
                                orow[ri * d..(ri + 1) * d].copy_from_slice(&src[s..s + d]);
                            }
                        }
                    }
                }
                k += m;
            }
        }
    };
    if threads <= 1 {
        work(0, &mut out);
    } else {
        std::thread::scope(|s| {
            for (t, chunk) in out.chunks_mut(per * row_len).enumerate() {
                let work = &work;
                s.spawn(move || work(t * per, chunk));
            }
        });
    }
    out
}

/// Transposes one full `TILE x TILE` tile: `dst[j * dst_stride + k] = src[k * src_stride + j]`.
/// Staged through a local tile, since the input rows are often 2^k floats apart and reading
/// them column-wise would thrash one L1 set; fixed sizes, so the copies compile to vector moves.
#[multiversion::multiversion(targets("x86_64+avx2+fma", "aarch64+neon"))]
fn transpose_tile(src: &[f32], src_stride: usize, dst: &mut [f32], dst_stride: usize) {
    let mut t = [[0.0f32; TILE]; TILE];
    for (k, row) in src.chunks(src_stride).take(TILE).enumerate() {
        let row: &[f32; TILE] = row[..TILE].try_into().expect("a full tile row");
        for (tj, &v) in t.iter_mut().zip(row) {
            tj[k] = v;
        }
    }
    for (out, tj) in dst.chunks_mut(dst_stride).zip(&t) {
        let out: &mut [f32; TILE] = (&mut out[..TILE]).try_into().expect("a full tile row");
        *out = *tj;
    }
}

/// Below this many elements a layout copy runs on one thread.
const MIN_PARALLEL_COPY: usize = 1 << 16;

/// Any permutation, by an odometer over the output index (strided reads).
fn permute_strided(src: &[f32], in_shape: &[usize], perm: &[usize]) -> Vec<f32> {
    let rank = in_shape.len();
    let in_strides = strides(in_shape);
    let shape: Vec<usize> = perm.iter().map(|&p| in_shape[p]).collect();
    let src_strides: Vec<usize> = perm.iter().map(|&p| in_strides[p]).collect();
    let n = src.len();
    let mut data = Vec::with_capacity(n);
    if n > 0 {
        // Odometer over the output index; the innermost dim is copied in a tight loop.
        let last = rank.saturating_sub(1);
        let inner_len = shape.get(last).copied().unwrap_or(1);
        let inner_stride = src_strides.get(last).copied().unwrap_or(1);
        let mut idx = vec![0usize; rank];
        loop {
            let base: usize = idx.iter().zip(&src_strides).map(|(i, s)| i * s).sum();
            data.extend((0..inner_len).map(|j| src[base + j * inner_stride]));
            // Advance all but the innermost dim.
            let mut d = last;
            loop {
                if d == 0 {
                    return data;
                }
                d -= 1;
                idx[d] += 1;
                if idx[d] < shape[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
    }
    data
}

/// Row-major strides (in elements) of a contiguous tensor of `shape`.
pub fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1usize; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

fn fmt_numel(shape: &[usize]) -> String {
    numel_of(shape).map_or_else(|| "an overflowing number of".to_string(), |n| n.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arange(shape: &[usize]) -> Tensor {
        let n = shape.iter().product::<usize>();
        Tensor::new(shape, (0..n).map(|i| i as f32).collect()).unwrap()
    }

    #[test]
    fn new_checks_len() {
        let err = Tensor::new([2, 3], vec![0.0; 5]).unwrap_err();
        assert!(err.to_string().contains("6 elements"), "{err}");
        assert!(err.to_string().contains("found 5"), "{err}");
    }

    #[test]
    fn blocked_permutes_match_strided() {
        // Shapes whose permutation is a batched transpose (with and without an inner run, size-1
        // dims, tiles spanning batches) and ones that are not.
        let cases: &[(&[usize], &[usize])] = &[
            (&[2, 37, 5, 7], &[0, 2, 3, 1]),
            (&[3, 41, 70], &[0, 2, 1]),
            (&[300, 333], &[1, 0]),
            (&[2, 1, 33, 1, 9], &[0, 4, 3, 2, 1]),
            (&[4, 35, 3, 6], &[0, 2, 1, 3]),
            (&[35, 3, 6], &[1, 0, 2]),
            (&[2, 3, 4, 5], &[3, 1, 0, 2]),
            (&[2, 3, 4], &[0, 1, 2]),
            (&[2, 0, 4], &[2, 1, 0]),
            (&[1, 1], &[1, 0]),
            (&[2, 320, 64, 64], &[0, 2, 3, 1]),
        ];
        for &(shape, perm) in cases {
            let n: usize = shape.iter().product();
            let x = Tensor::new(shape, (0..n).map(|i| i as f32).collect::<Vec<_>>()).unwrap();
            let got = x.permute(perm).unwrap();
            let want = permute_strided(x.data(), shape, perm);
            assert_eq!(got.data(), &want[..], "{shape:?} {perm:?}");
            let back: Vec<usize> = (0..perm.len())
                .map(|i| perm.iter().position(|&p| p == i).unwrap())
                .collect();
            assert_eq!(got.permute(&back).unwrap(), x, "{shape:?} {perm:?}");
        }
        assert_eq!(
            transpose_form(&[2, 320, 64, 64], &[0, 2, 3, 1]),
            Some((2, 320, 4096, 1))
        );
        assert_eq!(
            transpose_form(&[2, 4096, 320], &[0, 2, 1]),
            Some((2, 4096, 320, 1))
        );
        assert_eq!(transpose_form(&[2, 3, 4, 5], &[3, 1, 0, 2]), None);
    }

    /// Strided (old) vs blocked permutes at the UNet's layout changes, all threads:
    /// `cargo test -p ferry-sd --release --lib -- --ignored --nocapture perf_permute`.
    #[test]
    #[ignore = "timing, run by hand in release"]
    fn perf_permute() {
        use crate::ops::geglu::tests::{time_runs, Run};
        for (shape, perm) in [
            (vec![2, 320, 64, 64], vec![0, 2, 3, 1]),
            (vec![2, 4096, 320], vec![0, 2, 1]),
            (vec![2, 640, 32, 32], vec![0, 2, 3, 1]),
            (vec![2, 1024, 640], vec![0, 2, 1]),
        ] {
            let n: usize = shape.iter().product();
            let x = Tensor::new(&shape[..], (0..n).map(|i| i as f32).collect::<Vec<_>>()).unwrap();
            let runs: Vec<Run<'_, Vec<f32>>> = vec![
                (
                    "old".into(),
                    Box::new(|| permute_strided(x.data(), &shape, &perm)),
                ),
                (
                    "new".into(),
                    Box::new(|| x.permute(&perm).unwrap().into_data()),
                ),
                ("plain copy".into(), Box::new(|| x.data().to_vec())),
                (
                    "new 1 thread".into(),
                    Box::new(|| {
                        let (b, r, c, d) = transpose_form(&shape, &perm).unwrap();
                        transpose_blocked_on(x.data(), b, r, c, d, 1)
                    }),
                ),
            ];
            let (best, cpu) = time_runs(&runs, 7);
            println!(
                "permute {shape:?} {perm:?}: old {:.2} ms (cpu {:.0}), new {:.2} ms (cpu {:.0}), \
                 copy {:.2} ms (cpu {:.0}), new 1 thread {:.2} ms",
                best[0], cpu[0], best[1], cpu[1], best[2], cpu[2], best[3]
            );
        }
    }

    #[test]
    fn permute_and_transpose() {
        let x = arange(&[2, 3, 4]);
        let p = x.permute(&[2, 0, 1]).unwrap();
        assert_eq!(p.shape(), &[4, 2, 3]);
        // p[k, i, j] == x[i, j, k]
        assert_eq!(p.data()[(3 * 2 + 1) * 3 + 2], x.data()[(3 + 2) * 4 + 3]);
        let back = p.permute(&[1, 2, 0]).unwrap();
        assert_eq!(back, x);
        assert_eq!(x.transpose(0, 2).unwrap(), x.permute(&[2, 1, 0]).unwrap());
        assert!(x.permute(&[0, 0, 1]).is_err());
        assert!(x.permute(&[0, 1]).is_err());
    }

    #[test]
    fn narrow_concat_roundtrip() {
        let x = arange(&[2, 5, 3]);
        let a = x.narrow(1, 0, 2).unwrap();
        let b = x.narrow(1, 2, 3).unwrap();
        assert_eq!(Tensor::concat(&[&a, &b], 1).unwrap(), x);
        assert!(x.narrow(1, 4, 2).is_err());
        assert!(x.narrow(3, 0, 1).is_err());
        let parts = x.chunk(5, 1).unwrap();
        assert_eq!(parts.len(), 5);
        assert!(x.chunk(2, 1).is_err());
    }

    #[test]
    fn bytes_length_checked() {
        let err = Tensor::from_bytes(&[0u8; 7], DType::F16, [2, 2]).unwrap_err();
        assert!(err.to_string().contains("8 bytes"), "{err}");
        let t = Tensor::from_bytes(&1.5f32.to_le_bytes(), DType::F32, [1]).unwrap();
        assert_eq!(t.data(), &[1.5]);
    }

    #[test]
    fn decode_aligned_and_unaligned_agree_exactly() {
        // Every f16 / bf16 bit pattern, decoded from an aligned and a misaligned buffer, must give
        // the scalar conversion's bits (NaN payloads included).
        let all: Vec<u8> = (0..=u16::MAX).flat_map(|b| b.to_le_bytes()).collect();
        let mut shifted = vec![0u8; all.len() + 1];
        shifted[1..].copy_from_slice(&all);
        for dt in [DType::F16, DType::BF16] {
            let a = Tensor::from_bytes(&all, dt, [1 << 16]).unwrap();
            let u = Tensor::from_bytes(&shifted[1..], dt, [1 << 16]).unwrap();
            // Into a reused (dirty, larger) buffer: the same bits, the old contents gone.
            let r = Tensor::from_bytes_in(&all, dt, [1 << 16], vec![7.0; (1 << 16) + 5]).unwrap();
            assert_eq!(r.numel(), 1 << 16);
            let ru = Tensor::from_bytes_in(&shifted[1..], dt, [1 << 16], vec![7.0; 1 << 17]);
            let ru = ru.unwrap();
            for (x, y) in [(&a, &r), (&a, &ru)] {
                assert!(x
                    .data()
                    .iter()
                    .zip(y.data())
                    .all(|(p, q)| p.to_bits() == q.to_bits()));
            }
            for (i, (x, y)) in a.data().iter().zip(u.data()).enumerate() {
                let bits = (i as u16).to_le_bytes();
                let want = match dt {
                    DType::F16 => half::f16::from_le_bytes(bits).to_f32(),
                    _ => half::bf16::from_le_bytes(bits).to_f32(),
                };
                assert_eq!(
                    x.to_bits(),
                    want.to_bits(),
                    "{dt:?} aligned, pattern {i:#06x}"
                );
                assert_eq!(
                    y.to_bits(),
                    want.to_bits(),
                    "{dt:?} unaligned, pattern {i:#06x}"
                );
            }
        }
        let f: Vec<u8> = [1.5f32, -0.0, f32::INFINITY]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let mut g = vec![0u8; f.len() + 1];
        g[1..].copy_from_slice(&f);
        for (b, buf) in [(&f[..], vec![]), (&g[1..], vec![]), (&f[..], vec![9.0; 4])] {
            let t = Tensor::from_bytes_in(b, DType::F32, [3], buf).unwrap();
            assert_eq!(t.numel(), 3);
            assert_eq!(t.data()[0], 1.5);
            assert!(t.data()[1] == 0.0 && t.data()[1].is_sign_negative());
            assert_eq!(t.data()[2], f32::INFINITY);
        }
    }

    #[test]
    // The negated comparisons are the point: what a tolerance check does with the value.
    #[allow(clippy::neg_cmp_op_on_partial_ord)]
    fn comparisons_propagate_nan_and_infinity() {
        let good = Tensor::new([4], vec![1.0, -2.0, 3.0, 0.5]).unwrap();
        assert_eq!(good.max_abs(), 3.0);
        assert_eq!(good.max_abs_diff(&good).unwrap(), 0.0);
        assert_eq!(good.first_non_finite(), None);
        for (i, bad) in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY]
            .into_iter()
            .enumerate()
        {
            // The non-finite value first, last and in the middle: a fold must not drop it.
            for pos in [0, 2, 3] {
                let mut d = good.data().to_vec();
                d[pos] = bad;
                let t = Tensor::new([4], d).unwrap();
                assert_eq!(t.first_non_finite().map(|(k, _)| k), Some(pos));
                let diff = t.max_abs_diff(&good).unwrap();
                let back = good.max_abs_diff(&t).unwrap();
                let m = t.max_abs();
                for v in [diff, back, m] {
                    // Neither passes `v <= tol` for any tolerance.
                    assert!(!(v <= f32::MAX), "{bad} at {pos}: {v}");
                }
                if i == 0 {
                    assert!(diff.is_nan() && back.is_nan() && m.is_nan(), "{pos}");
                } else {
                    assert_eq!((diff, m), (f32::INFINITY, f32::INFINITY), "{pos}");
                }
            }
        }
        let all_nan = Tensor::full([3], f32::NAN).unwrap();
        assert!(all_nan.max_abs().is_nan());
        assert!(all_nan.max_abs_diff(&all_nan).unwrap().is_nan());
        let inf = Tensor::full([2], f32::INFINITY).unwrap();
        assert!(inf.max_abs_diff(&inf).unwrap().is_nan());
    }
}
