//! Strided f32 matrix multiply, the core of linear, conv2d and attention.
//!
//! Built on `matrixmultiply` (bluss): a small, long-maintained pure-Rust GEMM with AVX-512, AVX2+FMA
//! and scalar kernels chosen at run time, arbitrary row/column strides (so transposed and
//! per-head operands need no copy) and optional threading. It was chosen over `gemm` (sarah-ek)
//! for determinism and a small dependency tree. It runs single-threaded (its `threading` feature
//! is off: its pool is shared by all callers, so callers that split work themselves, like
//! conv2d, would queue on it); [`gemm`] splits large products over threads itself. Each
//! output's K-reduction runs in one fixed order, so results are bit-identical for any
//! `MATMUL_NUM_THREADS`.

use crate::tensor::{OpError, OpResult};
use std::sync::OnceLock;

/// A read-only matrix view: element `(i, j)` is `data[offset + i * row_stride + j * col_stride]`.
#[derive(Debug, Clone, Copy)]
pub struct MatRef<'a> {
    data: &'a [f32],
    offset: usize,
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

/// A mutable matrix view with the same addressing as [`MatRef`]; its elements must not overlap.
#[derive(Debug)]
pub struct MatMut<'a> {
    data: &'a mut [f32],
    offset: usize,
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

fn check_bounds(
    what: &'static str,
    len: usize,
    offset: usize,
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
) -> OpResult<()> {
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    let last = (rows - 1)
        .checked_mul(rs)
        .and_then(|r| (cols - 1).checked_mul(cs).and_then(|c| r.checked_add(c)))
        .and_then(|x| x.checked_add(offset));
    match last {
        Some(l) if l < len && l <= isize::MAX as usize => Ok(()),
        _ => Err(OpError::shape(
            what,
            format!("a {rows}x{cols} view (offset {offset}, strides {rs},{cs}) inside the buffer"),
            format!("a buffer of {len} elements"),
        )),
    }
}

impl<'a> MatRef<'a> {
    /// A general strided view; fails if any element lies outside `data`.
    pub fn new(
        data: &'a [f32],
        offset: usize,
        rows: usize,
        cols: usize,
        row_stride: usize,
        col_stride: usize,
    ) -> OpResult<Self> {
        check_bounds(
            "MatRef",
            data.len(),
            offset,
            rows,
            cols,
            row_stride,
            col_stride,
        )?;
        Ok(MatRef {
            data,
            offset,
            rows,
            cols,
            row_stride,
            col_stride,
        })
    }

    /// A contiguous row-major `rows x cols` matrix at the start of `data`.
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize) -> OpResult<Self> {
        Self::new(data, 0, rows, cols, cols, 1)
    }

    /// The transposed view (no copy).
    pub fn t(self) -> Self {
        MatRef {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns.
    pub fn cols(&self) -> usize {
        self.cols
    }
}

impl<'a> MatMut<'a> {
    /// A general strided view; fails if any element lies outside `data` or elements overlap.
    pub fn new(
        data: &'a mut [f32],
        offset: usize,
        rows: usize,
        cols: usize,
        row_stride: usize,
        col_stride: usize,
    ) -> OpResult<Self> {
        check_bounds(
            "MatMut",
            data.len(),
            offset,
            rows,
            cols,
            row_stride,
            col_stride,
        )?;
        // Distinct elements: rows laid out after one another (or columns after one another).
        let disjoint = rows <= 1 && (cols <= 1 || col_stride >= 1)
            || cols <= 1 && row_stride >= 1
            || col_stride >= 1 && row_stride >= cols * col_stride
            || row_stride >= 1 && col_stride >= rows * row_stride;
        if !disjoint {
            return Err(OpError::invalid(
                "MatMut",
                format!("strides {row_stride},{col_stride} make elements of a {rows}x{cols} view overlap"),
            ));
        }
        Ok(MatMut {
            data,
            offset,
            rows,
            cols,
            row_stride,
            col_stride,
        })
    }

    /// A contiguous row-major `rows x cols` matrix at the start of `data`.
    pub fn row_major(data: &'a mut [f32], rows: usize, cols: usize) -> OpResult<Self> {
        Self::new(data, 0, rows, cols, cols, 1)
    }
}

/// Threads [`gemm`] splits large products over: `MATMUL_NUM_THREADS` if set (as for
/// `matrixmultiply`'s own threading, which this replaces), else the available parallelism.
pub(crate) fn gemm_threads() -> usize {
    static N: OnceLock<usize> = OnceLock::new();
    *N.get_or_init(|| {
        std::env::var("MATMUL_NUM_THREADS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(super::parallel::num_threads)
            .max(1)
    })
}

/// Below this many multiply-adds (`m * n * k`) a product runs on the calling thread.
const MIN_PARALLEL_MACS: usize = 1 << 21;

/// `c = alpha * a · b + beta * c`. With `beta == 0`, `c`'s old contents (even NaN) are ignored.
///
/// Large products are split over threads by blocks of `c`'s outer dimension; every element's
/// K-reduction runs in the same fixed order whatever the split, so results are bit-identical for
/// any thread count.
pub fn gemm(alpha: f32, a: MatRef<'_>, b: MatRef<'_>, beta: f32, c: MatMut<'_>) -> OpResult<()> {
    check_shapes(&a, &b, &c)?;
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let threads = gemm_threads();
    if threads <= 1 || m.saturating_mul(n).saturating_mul(k) < MIN_PARALLEL_MACS {
        return gemm_serial(alpha, a, b, beta, c);
    }
    // Split c along its outer dimension (the larger stride): those blocks are contiguous
    // ranges of c's buffer, so they can be handed to threads as disjoint slices.
    let rows_outer = c.row_stride >= c.col_stride;
    let (outer, stride) = if rows_outer {
        (m, c.row_stride)
    } else {
        (n, c.col_stride)
    };
    // Blocks of whole 8-row/column micro-tiles (the kernel's tile), at least 64 per thread.
    let per = outer.div_ceil(threads).div_ceil(8) * 8;
    if per < 64 || per >= outer {
        return gemm_serial(alpha, a, b, beta, c);
    }
    let MatMut {
        data,
        offset,
        rows,
        cols,
        row_stride,
        col_stride,
    } = c;
    let mut rest = &mut data[offset..];
    let mut parts = Vec::new();
    let mut start = 0;
    while start < outer {
        let len = per.min(outer - start);
        let take = if start + len < outer {
            len * stride
        } else {
            rest.len()
        };
        let (head, tail) = std::mem::take(&mut rest).split_at_mut(take);
        rest = tail;
        let (sub_a, sub_b, sub_c) = if rows_outer {
            let sa = MatRef::new(
                a.data,
                a.offset + start * a.row_stride,
                len,
                a.cols,
                a.row_stride,
                a.col_stride,
            )?;
            let sc = MatMut::new(head, 0, len, cols, row_stride, col_stride)?;
            (sa, b, sc)
        } else {
            let sb = MatRef::new(
                b.data,
                b.offset + start * b.col_stride,
                b.rows,
                len,
                b.row_stride,
                b.col_stride,
            )?;
            let sc = MatMut::new(head, 0, rows, len, row_stride, col_stride)?;
            (a, sb, sc)
        };
        parts.push((sub_a, sub_b, sub_c));
        start += len;
    }
    std::thread::scope(|s| {
        let mut parts = parts.into_iter();
        let first = parts.next();
        let handles: Vec<_> = parts
            .map(|(pa, pb, pc)| s.spawn(move || gemm_serial(alpha, pa, pb, beta, pc)))
            .collect();
        let mut result = match first {
            Some((pa, pb, pc)) => gemm_serial(alpha, pa, pb, beta, pc),
            None => Ok(()),
        };
        for h in handles {
            let r = h.join().unwrap_or_else(|e| std::panic::resume_unwind(e));
            result = result.and(r);
        }
        result
    })
}

fn check_shapes(a: &MatRef<'_>, b: &MatRef<'_>, c: &MatMut<'_>) -> OpResult<()> {
    if a.cols != b.rows || a.rows != c.rows || b.cols != c.cols {
        return Err(OpError::shape(
            "gemm",
            format!(
                "a [m, k] · b [k, n] -> c [m, n] with a {}x{}",
                a.rows, a.cols
            ),
            format!("b {}x{}, c {}x{}", b.rows, b.cols, c.rows, c.cols),
        ));
    }
    Ok(())
}

/// [`gemm`] on the calling thread only (for callers that split work over threads themselves).
pub(crate) fn gemm_serial(
    alpha: f32,
    a: MatRef<'_>,
    b: MatRef<'_>,
    beta: f32,
    c: MatMut<'_>,
) -> OpResult<()> {
    check_shapes(&a, &b, &c)?;
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        for i in 0..m {
            for j in 0..n {
                let v = &mut c.data[c.offset + i * c.row_stride + j * c.col_stride];
                *v = if beta == 0.0 { 0.0 } else { beta * *v };
            }
        }
        return Ok(());
    }
    // Fixes the thread count (and MATMUL_NUM_THREADS, read at matrixmultiply's first GEMM).
    super::parallel::num_threads();
    // Strides fit isize: check_bounds bounded every reachable index by isize::MAX.
    let s = |x: usize| x as isize;
    // SAFETY: the constructors checked that every element (offset + i*rs + j*cs for i < rows,
    // j < cols) of a, b and c lies inside its slice and that c's elements are pairwise distinct;
    // the shapes were checked above. `c` is borrowed mutably, so it cannot alias `a` or `b`.
    // matrixmultiply reads/writes exactly those elements.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            alpha,
            a.data.as_ptr().add(a.offset),
            s(a.row_stride),
            s(a.col_stride),
            b.data.as_ptr().add(b.offset),
            s(b.row_stride),
            s(b.col_stride),
            beta,
            c.data.as_mut_ptr().add(c.offset),
            s(c.row_stride),
            s(c.col_stride),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strided_views_and_errors() {
        let a: Vec<f32> = (0..6).map(|x| x as f32).collect(); // 2x3
        let b: Vec<f32> = (0..6).map(|x| (x * 2) as f32).collect(); // 2x3, use as 3x2 via t()
        let mut c = vec![f32::NAN; 4];
        gemm(
            1.0,
            MatRef::row_major(&a, 2, 3).unwrap(),
            MatRef::row_major(&b, 2, 3).unwrap().t(),
            0.0,
            MatMut::row_major(&mut c, 2, 2).unwrap(),
        )
        .unwrap();
        // a · bᵀ with b = 2a: [[0+2+8, 0+6+16],[.., 2*(9+16+25)]]
        assert_eq!(c, vec![10.0, 28.0, 28.0, 100.0]);
        assert!(MatRef::new(&a, 1, 2, 3, 3, 1).is_err());
        assert!(MatMut::new(&mut c, 0, 2, 2, 1, 1).is_err());
        let err = gemm(
            1.0,
            MatRef::row_major(&a, 2, 3).unwrap(),
            MatRef::row_major(&b, 2, 3).unwrap(),
            0.0,
            MatMut::row_major(&mut c, 2, 2).unwrap(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("b 2x3"), "{err}");
    }

    #[test]
    fn threaded_split_matches_serial_bits() {
        // Row-major c (split by rows) and column-major c (split by columns), odd sizes.
        let (m, k, n) = (203, 67, 181);
        let a: Vec<f32> = (0..m * k)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let b: Vec<f32> = (0..k * n)
            .map(|i| ((i * 53 % 97) as f32 - 48.0) / 5.0)
            .collect();
        let (ar, br) = (
            MatRef::row_major(&a, m, k).unwrap(),
            MatRef::row_major(&b, k, n).unwrap(),
        );
        assert!(m * n * k >= MIN_PARALLEL_MACS);
        for col_major in [false, true] {
            let (rs, cs) = if col_major { (1, m) } else { (n, 1) };
            let mut serial = vec![1.5f32; m * n];
            let mut threaded = serial.clone();
            gemm_serial(
                0.5,
                ar,
                br,
                1.0,
                MatMut::new(&mut serial, 0, m, n, rs, cs).unwrap(),
            )
            .unwrap();
            gemm(
                0.5,
                ar,
                br,
                1.0,
                MatMut::new(&mut threaded, 0, m, n, rs, cs).unwrap(),
            )
            .unwrap();
            assert_eq!(serial, threaded, "col_major {col_major}");
            let i = 17 * rs + 9 * cs;
            let want: f32 = 0.5 * (0..k).map(|j| a[17 * k + j] * b[j * n + 9]).sum::<f32>() + 1.5;
            assert!((serial[i] - want).abs() < 1e-2 * want.abs().max(1.0));
        }
    }
}
