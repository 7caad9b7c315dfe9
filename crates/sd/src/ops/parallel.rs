//! Splitting independent work over threads without changing any result bit.

use std::sync::OnceLock;

/// Below this many elements of work, spawning threads costs more than it saves.
const MIN_PARALLEL_ELEMS: usize = 1 << 16;

/// Worker threads for element-wise and row-wise ops (the machine's available parallelism).
pub(crate) fn num_threads() -> usize {
    static N: OnceLock<usize> = OnceLock::new();
    *N.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
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

/// Applies `f` to every element, in parallel chunks.
pub(crate) fn map_inplace<F>(data: &mut [f32], f: F)
where
    F: Fn(f32) -> f32 + Sync,
{
    const CHUNK: usize = 4096;
    for_each_row_ragged(data, CHUNK, |chunk| {
        for v in chunk {
            *v = f(*v);
        }
    });
}

/// Like [`for_each_row`] but the last chunk may be short and no index is passed.
fn for_each_row_ragged<F>(data: &mut [f32], chunk: usize, f: F)
where
    F: Fn(&mut [f32]) + Sync,
{
    let threads = num_threads().min(data.len() / MIN_PARALLEL_ELEMS).max(1);
    if threads <= 1 {
        data.chunks_mut(chunk).for_each(&f);
        return;
    }
    let per = data.len().div_ceil(threads).div_ceil(chunk) * chunk;
    std::thread::scope(|s| {
        for block in data.chunks_mut(per) {
            let f = &f;
            s.spawn(move || block.chunks_mut(chunk).for_each(f));
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
    }
}
