//! diffusers' GEGLU feed-forward input: project, split in two, gate one half with GELU.

use super::activation::gelu_gate_into;
use super::gemm::{gemm_serial, gemm_threads, MatMut, MatRef};
use super::linear::{check_linear, linear};
use super::parallel::for_each_row;
use crate::tensor::{OpError, OpResult, Tensor};
use std::ops::Range;

/// `hidden * gelu(gate)` where `[hidden, gate] = h.chunk(2, dim=-1)`; `h [..., 2*f]` -> `[..., f]`.
pub fn geglu_gate(h: &Tensor) -> OpResult<Tensor> {
    let two_f = h.shape().last().copied().unwrap_or(0);
    if two_f == 0 || !two_f.is_multiple_of(2) {
        return Err(OpError::shape(
            "geglu",
            "projected input [..., 2*f] with f > 0",
            format!("shape {:?}", h.shape()),
        ));
    }
    let f = two_f / 2;
    let mut out = vec![0.0f32; h.numel() / 2];
    // erf per element is the cost here: split rows over threads.
    for_each_row(&mut out, f, |i, dst| {
        let (hidden, gate) = h.data()[i * two_f..(i + 1) * two_f].split_at(f);
        gelu_gate_into(dst, hidden, gate);
    });
    let mut shape = h.shape().to_vec();
    if let Some(last) = shape.last_mut() {
        *last = f;
    }
    Tensor::new(shape, out)
}

/// Rows of the input projected (and gated) per GEMM call.
const ROW_BLOCK: usize = 384;
/// Output columns (`f`, each with its hidden and gate column) projected per GEMM call.
const COL_BLOCK: usize = 384;

/// diffusers `GEGLU.forward`: `linear(x, weight [2f, in], bias)` then [`geglu_gate`], with the
/// same bits as those two calls.
pub fn geglu(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> OpResult<Tensor> {
    geglu_blocked(x, weight, bias, ROW_BLOCK, COL_BLOCK)
}

/// [`geglu`] on tiles of `row_block` rows and `col_block` output columns: each tile's
/// projection (both halves) goes to a per-thread buffer that is still in cache when gated, never
/// to a full `[rows, 2f]` tensor. Every output's GEMM reduction runs in the same order whatever
/// the tiling and thread split (see [`super::gemm`]), so the result does not depend on either.
pub(crate) fn geglu_blocked(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    row_block: usize,
    col_block: usize,
) -> OpResult<Tensor> {
    let (two_f, in_f, rows) = check_linear(x, weight, bias)?;
    if two_f == 0 || !two_f.is_multiple_of(2) {
        return Err(OpError::shape(
            "geglu",
            "weight [2*f, in] with f > 0",
            format!("weight {:?}", weight.shape()),
        ));
    }
    if in_f == 0 {
        // No reduction: the projection is the bias (or 0); keep linear's semantics.
        return geglu_gate(&linear(x, weight, bias)?);
    }
    let f = two_f / 2;
    let (row_block, col_block) = (row_block.max(1), col_block.clamp(1, f));
    let mut out = vec![0.0f32; rows * f];
    let task = Task {
        x: x.data(),
        w: weight.data(),
        b: bias.map(|b| b.data()),
        in_f,
        f,
        row_block,
        col_block,
    };
    let threads = if rows.saturating_mul(two_f).saturating_mul(in_f) < MIN_PARALLEL_MACS {
        1
    } else {
        gemm_threads()
    };
    let row_blocks = rows.div_ceil(row_block);
    if threads <= 1 || rows == 0 {
        let segs = out.chunks_mut(f.max(1)).collect();
        task.run(0..rows, 0..f, segs)?;
    } else if row_blocks >= threads {
        // Whole row blocks per thread: contiguous output rows.
        let per = row_blocks.div_ceil(threads) * row_block;
        let parts = out.chunks_mut(per * f).enumerate().map(|(t, chunk)| {
            let r0 = t * per;
            let r1 = r0 + chunk.len() / f;
            (r0..r1, 0..f, chunk.chunks_mut(f).collect())
        });
        task.run_threads(parts.collect())?;
    } else {
        // Few rows (small latents): split the columns, in multiples of 64 (whole GEMM tiles).
        let per = f.div_ceil(threads).div_ceil(64) * 64;
        let parts = f.div_ceil(per);
        let mut segs: Vec<Vec<&mut [f32]>> = (0..parts).map(|_| Vec::new()).collect();
        for row in out.chunks_mut(f) {
            for (p, seg) in row.chunks_mut(per).enumerate() {
                segs[p].push(seg);
            }
        }
        let parts = segs.into_iter().enumerate().map(|(p, seg)| {
            let c0 = p * per;
            (0..rows, c0..(c0 + per).min(f), seg)
        });
        task.run_threads(parts.collect())?;
    }
    let mut shape = x.shape().to_vec();
    if let Some(last) = shape.last_mut() {
        *last = f;
    }
    Tensor::new(shape, out)
}

/// Below this many multiply-adds a GEGLU runs on the calling thread (as [`super::gemm`]).
const MIN_PARALLEL_MACS: usize = 1 << 21;

/// The operands of one [`geglu_blocked`] call.
struct Task<'a> {
    x: &'a [f32],
    w: &'a [f32],
    b: Option<&'a [f32]>,
    in_f: usize,
    f: usize,
    row_block: usize,
    col_block: usize,
}

/// One thread's share of a [`Task`]: output rows, output columns, and those outputs (one slice
/// per row).
type Part<'o> = (Range<usize>, Range<usize>, Vec<&'o mut [f32]>);

impl Task<'_> {
    /// Runs each part on its own thread (the first on the calling thread).
    fn run_threads(&self, parts: Vec<Part<'_>>) -> OpResult<()> {
        std::thread::scope(|s| {
            let mut parts = parts.into_iter();
            let first = parts.next();
            let handles: Vec<_> = parts
                .map(|(r, c, seg)| s.spawn(move || self.run(r, c, seg)))
                .collect();
            let mut result = match first {
                Some((r, c, seg)) => self.run(r, c, seg),
                None => Ok(()),
            };
            for h in handles {
                let r = h.join().unwrap_or_else(|e| std::panic::resume_unwind(e));
                result = result.and(r);
            }
            result
        })
    }

    /// Projects and gates output rows `rows` x columns `cols`; `segs[i]` is output row
    /// `rows.start + i`, columns `cols`.
    fn run(
        &self,
        rows: Range<usize>,
        cols: Range<usize>,
        mut segs: Vec<&mut [f32]>,
    ) -> OpResult<()> {
        let (in_f, f) = (self.in_f, self.f);
        let cb = self.col_block.min(cols.len());
        let mut buf = vec![0.0f32; self.row_block.min(rows.len()) * 2 * cb];
        let beta = if self.b.is_some() { 1.0 } else { 0.0 };
        for r0 in rows.clone().step_by(self.row_block) {
            let rn = self.row_block.min(rows.end - r0);
            let a = MatRef::new(self.x, r0 * in_f, rn, in_f, in_f, 1)?;
            for j0 in cols.clone().step_by(cb) {
                let cn = cb.min(cols.end - j0);
                let tile = &mut buf[..rn * 2 * cn];
                // Each tile row: [hidden j0..j0+cn | gate j0..j0+cn], started from the bias as
                // linear does (beta = 1).
                if let Some(b) = self.b {
                    for row in tile.chunks_exact_mut(2 * cn) {
                        row[..cn].copy_from_slice(&b[j0..j0 + cn]);
                        row[cn..].copy_from_slice(&b[f + j0..f + j0 + cn]);
                    }
                }
                if cn == f {
                    // Both halves in one product: weight rows [0, 2f) are [hidden | gate].
                    let w = MatRef::row_major(self.w, 2 * f, in_f)?.t();
                    gemm_serial(1.0, a, w, beta, MatMut::row_major(tile, rn, 2 * f)?)?;
                } else {
                    for (half, w0) in [(0, j0), (cn, f + j0)] {
                        let w = MatRef::new(self.w, w0 * in_f, cn, in_f, in_f, 1)?.t();
                        let c = MatMut::new(tile, half, rn, cn, 2 * cn, 1)?;
                        gemm_serial(1.0, a, w, beta, c)?;
                    }
                }
                for (i, row) in tile.chunks_exact(2 * cn).enumerate() {
                    let seg = &mut segs[r0 - rows.start + i];
                    let (hidden, gate) = row.split_at(cn);
                    let o = j0 - cols.start;
                    gelu_gate_into(&mut seg[o..o + cn], hidden, gate);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn filled(shape: &[usize], seed: u32) -> Tensor {
        crate::ops::lcg_tensor(shape, seed, 4.0, -2.0)
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        t.data().iter().map(|v| v.to_bits()).collect()
    }

    #[test]
    fn fused_matches_linear_then_gate_bits_for_any_tiling() {
        // Odd sizes: short last tiles, column tiles that do not divide f.
        for (rows, in_f, f, bias) in [(301, 67, 83, true), (37, 19, 130, false), (1, 5, 3, true)] {
            let x = filled(&[rows, in_f], 1);
            let w = filled(&[2 * f, in_f], 2);
            let b = filled(&[2 * f], 3);
            let b = bias.then_some(&b);
            let want = geglu_gate(&linear(&x, &w, b).unwrap()).unwrap();
            assert_eq!(want.shape(), &[rows, f]);
            for (rb, cb) in [
                (256, usize::MAX),
                (7, usize::MAX),
                (64, 32),
                (5, 17),
                (1000, 1),
            ] {
                let got = geglu_blocked(&x, &w, b, rb, cb).unwrap();
                assert_eq!(got.shape(), want.shape());
                assert_eq!(
                    bits(&got),
                    bits(&want),
                    "{rows}x{in_f}->{f} tiles {rb}x{cb}"
                );
            }
            assert_eq!(bits(&geglu(&x, &w, b).unwrap()), bits(&want));
        }
    }

    #[test]
    fn threaded_splits_match_serial() {
        // Enough work to use threads: by row blocks, and by columns when rows are few.
        for (rows, in_f, f) in [(1100, 48, 96), (40, 128, 640)] {
            let x = filled(&[1, rows, in_f], 4);
            let w = filled(&[2 * f, in_f], 5);
            let b = filled(&[2 * f], 6);
            assert!(rows * 2 * f * in_f >= MIN_PARALLEL_MACS);
            let want = geglu_gate(&linear(&x, &w, Some(&b)).unwrap()).unwrap();
            for (rb, cb) in [(256, usize::MAX), (64, 100)] {
                let got = geglu_blocked(&x, &w, Some(&b), rb, cb).unwrap();
                assert_eq!(got.shape(), &[1, rows, f]);
                assert_eq!(
                    bits(&got),
                    bits(&want),
                    "{rows}x{in_f}->{f} tiles {rb}x{cb}"
                );
            }
        }
    }

    #[test]
    fn rejects_odd_projection() {
        let x = filled(&[4, 3], 1);
        let err = geglu(&x, &filled(&[5, 3], 2), None).unwrap_err();
        assert!(err.to_string().contains("2*f"), "{err}");
        assert!(geglu(&x, &filled(&[6, 4], 2), None).is_err());
    }

    /// This process's CPU time (all threads, exited ones included) in ms, from /proc (10 ms
    /// ticks, assuming USER_HZ = 100).
    pub(crate) fn cpu_ms() -> f64 {
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<f64> = rest
            .split_whitespace()
            .map(|v| v.parse().unwrap_or(0.0))
            .collect();
        // Fields 14 and 15 (utime, stime), counted from 1 with the command name as field 2.
        (f.get(11).unwrap_or(&0.0) + f.get(12).unwrap_or(&0.0)) * 10.0
    }

    /// A named closure to time.
    pub(crate) type Run<'a, T> = (String, Box<dyn Fn() -> T + 'a>);

    /// Runs each closure `reps` times, interleaved (the machine is shared); returns the best wall
    /// time and the mean CPU time of each, in ms.
    pub(crate) fn time_runs<T>(runs: &[Run<'_, T>], reps: usize) -> (Vec<f64>, Vec<f64>) {
        let mut best = vec![f64::MAX; runs.len()];
        let mut cpu = vec![0.0; runs.len()];
        for _ in 0..reps {
            for (i, (_, run)) in runs.iter().enumerate() {
                let c = cpu_ms();
                let t = std::time::Instant::now();
                std::hint::black_box(run());
                best[i] = best[i].min(t.elapsed().as_secs_f64() * 1e3);
                cpu[i] += (cpu_ms() - c) / reps as f64;
            }
        }
        (best, cpu)
    }

    /// The GEGLU before this module fused it: linear, then the SSE2 gate over the full
    /// projection.
    fn geglu_old(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Tensor {
        let h = linear(x, w, b).unwrap();
        let f = w.shape()[0] / 2;
        let mut out = vec![0.0f32; h.numel() / 2];
        for_each_row(&mut out, f, |i, dst| {
            let (hidden, gate) = h.data()[i * 2 * f..(i + 1) * 2 * f].split_at(f);
            crate::ops::activation::tests::gelu_gate_scalar(dst, hidden, gate);
        });
        Tensor::new([h.numel() / 2 / f, f], out).unwrap()
    }

    /// Old vs new GEGLU at the SD 1.5 shapes, all threads:
    /// `cargo test -p ferry-sd --release --lib -- --ignored --nocapture perf_geglu`.
    #[test]
    #[ignore = "timing, run by hand in release"]
    fn perf_geglu() {
        let tilings: Vec<(usize, usize)> = std::env::var("GEGLU_TILES")
            .ok()
            .map(|v| {
                v.split(',')
                    .map(|p| {
                        let (r, c) = p.split_once('x').unwrap();
                        (r.parse().unwrap(), c.parse().unwrap_or(usize::MAX))
                    })
                    .collect()
            })
            .unwrap_or(vec![(ROW_BLOCK, COL_BLOCK)]);
        for (rows, in_f, f) in [
            (8192, 320, 1280),
            (2048, 640, 2560),
            (512, 1280, 5120),
            (128, 1280, 5120),
        ] {
            let x = filled(&[rows, in_f], 1);
            let w = filled(&[2 * f, in_f], 2);
            let b = filled(&[2 * f], 3);
            let mut runs: Vec<Run<'_, Tensor>> = vec![
                ("old".into(), Box::new(|| geglu_old(&x, &w, Some(&b)))),
                (
                    "linear".into(),
                    Box::new(|| linear(&x, &w, Some(&b)).unwrap()),
                ),
                (
                    "unfused".into(),
                    Box::new(|| geglu_gate(&linear(&x, &w, Some(&b)).unwrap()).unwrap()),
                ),
            ];
            for &(rb, cb) in &tilings {
                let (x, w, b) = (&x, &w, &b);
                runs.push((
                    format!("fused {rb}x{cb}"),
                    Box::new(move || geglu_blocked(x, w, Some(b), rb, cb).unwrap()),
                ));
            }
            let (best, cpu) = time_runs(&runs, 7);
            let line: Vec<String> = runs
                .iter()
                .zip(best.iter().zip(&cpu))
                .map(|((n, _), (t, c))| format!("{n} {t:.1} (cpu {c:.0})"))
                .collect();
            println!("geglu {rows}x{in_f}->{f}: {} ms", line.join(", "));
        }
    }
}
