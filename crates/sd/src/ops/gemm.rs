//! Strided f32 matrix multiply, the core of linear, conv2d and attention.
//!
//! Built on `matrixmultiply` (bluss): a small, long-maintained pure-Rust GEMM with AVX-512, AVX2+FMA
//! and scalar kernels chosen at run time, arbitrary row/column strides (so transposed and
//! per-head operands need no copy) and optional threading. It was chosen over `gemm` (sarah-ek)
//! for determinism and a small dependency tree: its threads only split the M dimension (loop 3 of
//! the BLIS scheme) and each output's K-reduction runs in one fixed order, so results are
//! bit-identical for any `MATMUL_NUM_THREADS` (default: physical cores, at most 4).

use crate::tensor::{OpError, OpResult};

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

/// `c = alpha * a · b + beta * c`. With `beta == 0`, `c`'s old contents (even NaN) are ignored.
pub fn gemm(alpha: f32, a: MatRef<'_>, b: MatRef<'_>, beta: f32, c: MatMut<'_>) -> OpResult<()> {
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
}
