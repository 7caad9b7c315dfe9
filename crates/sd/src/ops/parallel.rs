//! The CPU ops' thread count, and splitting independent work over threads without changing any
//! result bit.

use std::sync::OnceLock;

/// Below this many elements of work, spawning threads costs more than it saves.
const MIN_PARALLEL_ELEMS: usize = 1 << 16;

/// The thread count, fixed at the first op (or by [`set_threads`]).
static THREADS: OnceLock<usize> = OnceLock::new();

/// matrixmultiply's thread-count variable, read once at its first GEMM.
const MATMUL_ENV: &str = "MATMUL_NUM_THREADS";

/// [`set_threads`] was called after the thread count was fixed by an earlier op or call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThreadsAlreadySet {
    /// The thread count in force.
    pub current: usize,
    /// The count that was asked for.
    pub requested: usize,
}

impl std::fmt::Display for ThreadsAlreadySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the CPU thread count is already {} (set_threads({}) must come before the first op)",
            self.current, self.requested
        )
    }
}

impl std::error::Error for ThreadsAlreadySet {}

fn all_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Fixes the thread count and hands it to matrixmultiply through `MATMUL_NUM_THREADS`, unless
/// the user set that variable (it then keeps the GEMM's count).
fn init(n: usize) -> usize {
    if std::env::var_os(MATMUL_ENV).is_none() {
        std::env::set_var(MATMUL_ENV, n.to_string());
    }
    n
}

/// Sets the number of threads the CPU ops use (`0` = all cores, the default when this is never
/// called: `std::thread::available_parallelism`), including the GEMM's (matrixmultiply's
/// `MATMUL_NUM_THREADS`, unless that variable is already set). Results do not depend on it.
///
/// Call it once, before the first op and before spawning threads of your own (it may set an
/// environment variable): the count is fixed at the first op. A later call with a different count
/// returns [`ThreadsAlreadySet`] and changes nothing; repeating the count in force is `Ok`.
pub fn set_threads(n: usize) -> Result<(), ThreadsAlreadySet> {
    let requested = if n == 0 { all_cores() } else { n };
    let current = *THREADS.get_or_init(|| init(requested));
    if current == requested {
        Ok(())
    } else {
        Err(ThreadsAlreadySet { current, requested })
    }
}

/// Worker threads for the CPU ops (see [`set_threads`]); the first call fixes the count.
pub fn num_threads() -> usize {
    *THREADS.get_or_init(|| init(all_cores()))
}

/// Calls `f(row_index, row)` for every `row_len`-sized row of `data`, splitting whole rows over
/// threads. Each row is processed by exactly the same code whatever the split, so results do not
/// depend on the thread count.
pub(crate) fn for_each_row<F>(data: &mut [f32], row_len: usize, f: F)
where
    F: Fn(usize, &mut [f32]) + Sync,
{
    if row_len == 0 || data.is_empty() {
        return;
    }
    let rows = data.len() / row_len;
    let threads = num_threads()
        .min(rows)
        .min(data.len() / MIN_PARALLEL_ELEMS)
        .max(1);
    if threads <= 1 {
        for (i, row) in data.chunks_mut(row_len).enumerate() {
            f(i, row);
        }
        return;
    }
    let rows_per = rows.div_ceil(threads);
    std::thread::scope(|s| {
        for (t, block) in data.chunks_mut(rows_per * row_len).enumerate() {
            let f = &f;
            s.spawn(move || {
                for (i, row) in block.chunks_mut(row_len).enumerate() {
                    f(t * rows_per + i, row);
                }
            });
        }
    });
}

/// Elements per work item of the element-wise maps (fits L1 with its source).
const CHUNK: usize = 4096;

/// Applies `f` to every element, in parallel chunks.
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) fn map_inplace<F>(data: &mut [f32], f: F)
where
    F: Fn(f32) -> f32 + Sync,
{
    for_each_chunk(data, |_, chunk| {
        for v in chunk {
            *v = f(*v);
        }
    });
}

/// `f` of every element of `src`, into a new vector, in parallel chunks.
pub(crate) fn map<F>(src: &[f32], f: F) -> Vec<f32>
where
    F: Fn(f32) -> f32 + Sync,
{
    let mut out = vec![0.0f32; src.len()];
    for_each_chunk(&mut out, |start, dst| {
        for (o, &x) in dst.iter_mut().zip(&src[start..]) {
            *o = f(x);
        }
    });
    out
}

/// `f(a, b)` of every pair of elements, into a new vector, in parallel chunks (`a` and `b` have
/// the same length).
pub(crate) fn zip_map<F>(a: &[f32], b: &[f32], f: F) -> Vec<f32>
where
    F: Fn(f32, f32) -> f32 + Sync,
{
    let mut out = vec![0.0f32; a.len()];
    for_each_chunk(&mut out, |start, dst| {
        for ((o, &x), &y) in dst.iter_mut().zip(&a[start..]).zip(&b[start..]) {
            *o = f(x, y);
        }
    });
    out
}

/// `a[i] = f(a[i], b[i])`, in parallel chunks.
pub(crate) fn zip_inplace<F>(a: &mut [f32], b: &[f32], f: F)
where
    F: Fn(f32, f32) -> f32 + Sync,
{
    for_each_chunk(a, |start, dst| {
        for (o, &y) in dst.iter_mut().zip(&b[start..]) {
            *o = f(*o, y);
        }
    });
}

/// Calls `f(start, chunk)` for [`CHUNK`]-sized pieces of `data` (the last may be short), where
/// `start` is the chunk's offset in `data`, splitting whole chunks over threads.
pub(crate) fn for_each_chunk<F>(data: &mut [f32], f: F)
where
    F: Fn(usize, &mut [f32]) + Sync,
{
    let threads = num_threads().min(data.len() / MIN_PARALLEL_ELEMS).max(1);
    if threads <= 1 {
        for (i, c) in data.chunks_mut(CHUNK).enumerate() {
            f(i * CHUNK, c);
        }
        return;
    }
    let per = data.len().div_ceil(threads).div_ceil(CHUNK) * CHUNK;
    std::thread::scope(|s| {
        for (t, block) in data.chunks_mut(per).enumerate() {
            let f = &f;
            s.spawn(move || {
                for (i, c) in block.chunks_mut(CHUNK).enumerate() {
                    f(t * per + i * CHUNK, c);
                }
            });
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threaded_rows_match_sequential() {
        let row_len = 37;
        let rows = 4 * MIN_PARALLEL_ELEMS / row_len + 3;
        let input: Vec<f32> = (0..rows * row_len).map(|i| (i % 101) as f32).collect();
        let f = |i: usize, row: &mut [f32]| {
            let s: f32 = row.iter().sum();
            row.iter_mut().for_each(|v| *v = *v / s + i as f32);
        };
        let mut threaded = input.clone();
        for_each_row(&mut threaded, row_len, f);
        let mut sequential = input.clone();
        for (i, row) in sequential.chunks_mut(row_len).enumerate() {
            f(i, row);
        }
        assert_eq!(threaded, sequential);
        let mut mapped = input.clone();
        map_inplace(&mut mapped, |x| x * 0.5 + 1.0);
        assert!(mapped.iter().zip(&input).all(|(m, x)| *m == x * 0.5 + 1.0));
        assert_eq!(map(&input, |x| x * 0.5 + 1.0), mapped);
        let rev: Vec<f32> = input.iter().rev().copied().collect();
        let sum = zip_map(&input, &rev, |x, y| x - 2.0 * y);
        assert!(sum
            .iter()
            .zip(input.iter().zip(&rev))
            .all(|(s, (x, y))| *s == x - 2.0 * y));
        let mut acc = input.clone();
        zip_inplace(&mut acc, &rev, |x, y| x - 2.0 * y);
        assert_eq!(acc, sum);
    }
}
