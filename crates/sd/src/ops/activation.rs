//! Point-wise activations, in f32 with branch-free polynomial `exp` and `erfc` (no libm calls) so
//! that the loops over a tensor vectorise. Each is within a few ulp of the exact value over the
//! whole f32 range (tested against f64 below: SiLU 3, sigmoid 2, GELU 5, tanh-GELU 3, quick GELU
//! 3 ulp; results under 1e-30 in magnitude to within 1e-34), including the small negative tails
//! of GELU, computed from `erfc` directly rather than by cancellation in `1 + erf`.

use super::parallel::for_each_chunk;
use crate::tensor::Tensor;

/// A point-wise activation, for ops that fuse one (see [`Activation::apply`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `x * sigmoid(x)`.
    Silu,
    /// Exact GELU, `0.5 x (1 + erf(x / sqrt 2))` (`F.gelu`).
    Gelu,
    /// Tanh-approximated GELU (`F.gelu(approximate="tanh")`, CLIP's `gelu_new`).
    GeluTanh,
    /// `x * sigmoid(1.702 x)` (OpenAI CLIP's `quick_gelu`).
    QuickGelu,
    /// `1 / (1 + exp(-x))`.
    Sigmoid,
}

impl Activation {
    /// The activation of one value (the same arithmetic as the tensor paths).
    #[inline(always)]
    pub fn apply(self, x: f32) -> f32 {
        match self {
            Activation::Silu => silu1(x),
            Activation::Gelu => gelu1(x),
            Activation::GeluTanh => gelu_tanh1(x),
            Activation::QuickGelu => quick_gelu1(x),
            Activation::Sigmoid => sigmoid1(x),
        }
    }

    /// Applies the activation to every element in place.
    pub fn apply_inplace(self, data: &mut [f32]) {
        // One monomorphic, multiversioned kernel per activation, so each vectorises (AVX2 too).
        let kernel: fn(&mut [f32]) = match self {
            Activation::Silu => silu_inplace,
            Activation::Gelu => gelu_inplace,
            Activation::GeluTanh => gelu_tanh_inplace,
            Activation::QuickGelu => quick_gelu_inplace,
            Activation::Sigmoid => sigmoid_inplace,
        };
        for_each_chunk(data, |_, chunk| kernel(chunk));
    }

    /// A new tensor with the activation applied.
    pub fn forward(self, x: &Tensor) -> Tensor {
        let kernel: fn(&mut [f32], &[f32]) = match self {
            Activation::Silu => silu_into,
            Activation::Gelu => gelu_into,
            Activation::GeluTanh => gelu_tanh_into,
            Activation::QuickGelu => quick_gelu_into,
            Activation::Sigmoid => sigmoid_into,
        };
        let src = x.data();
        let mut data = vec![0.0f32; src.len()];
        for_each_chunk(&mut data, |start, dst| {
            kernel(dst, &src[start..start + dst.len()])
        });
        Tensor::new(x.shape(), data).expect("same shape and length")
    }
}

/// Defines `$into(dst, src)` (`dst[i] = f(src[i])`) and `$inplace(d)` for the scalar `$f`,
/// compiled for AVX2+FMA and NEON as well and picked at run time. No `mul_add` in `$f`, so
/// every target computes the same bits.
macro_rules! slice_kernels {
    ($f:ident, $into:ident, $inplace:ident) => {
        #[multiversion::multiversion(targets("x86_64+avx2+fma", "aarch64+neon"))]
        fn $into(dst: &mut [f32], src: &[f32]) {
            for (o, &x) in dst.iter_mut().zip(src) {
                *o = $f(x);
            }
        }

        #[multiversion::multiversion(targets("x86_64+avx2+fma", "aarch64+neon"))]
        pub(crate) fn $inplace(d: &mut [f32]) {
            for v in d.iter_mut() {
                *v = $f(*v);
            }
        }
    };
}

slice_kernels!(silu1, silu_into, silu_inplace);
slice_kernels!(gelu1, gelu_into, gelu_inplace);
slice_kernels!(gelu_tanh1, gelu_tanh_into, gelu_tanh_inplace);
slice_kernels!(quick_gelu1, quick_gelu_into, quick_gelu_inplace);
slice_kernels!(sigmoid1, sigmoid_into, sigmoid_inplace);

/// `exp(hi + lo)` for a two-part argument, branch-free so that it vectorises: Cephes' `expf`
/// (as in [`super::exp`]) with the argument reduced as `(hi - n ln2) + lo`, so arguments that are
/// not f32 numbers (like `-z^2 + g` or `-1.702 x`) lose nothing to rounding. Within 3 ulp; 0
/// below -87.34 (also for `hi = -inf`) and +inf above 88.38; otherwise NaN stays NaN.
#[inline(always)]
fn exp_hilo(hi: f32, lo: f32) -> f32 {
    use super::exp::{exp_reduced, LN2_HI, LN2_LO, MAX_X, MIN_X, ROUND_MAGIC};
    let x = hi + lo;
    let xc = x.clamp(MIN_X, MAX_X);
    let t = xc * std::f32::consts::LOG2_E + ROUND_MAGIC;
    let n = t - ROUND_MAGIC;
    // hi - n * LN2_HI is exact (n * LN2_HI is, and the two are close), so lo is not swamped.
    let r = (hi - n * LN2_HI) + (lo - n * LN2_LO);
    let v = exp_reduced(t, r);
    if x < MIN_X || hi < MIN_X {
        0.0
    } else if x > MAX_X {
        f32::INFINITY
    } else {
        v
    }
}

/// `num * sigmoid(hi + lo)` as `num / (1 + exp(-w))`. exp overflows only below w = -88.4,
/// where the result (under 1e-34 for the activations here) becomes 0.
#[inline(always)]
fn mul_sigmoid(num: f32, hi: f32, lo: f32) -> f32 {
    num / (1.0 + exp_hilo(-hi, -lo))
}

/// `x * sigmoid(w)` with `w` (formed in f64) split into two f32 parts for [`exp_hilo`].
#[inline(always)]
fn x_sigmoid_of(x: f32, w: f64) -> f32 {
    // Beyond +-200 the sigmoid is saturated in f32; the clamp keeps hi and lo finite.
    let w = w.clamp(-200.0, 200.0);
    let hi = w as f32;
    mul_sigmoid(x, hi, (w - hi as f64) as f32)
}

/// Polynomial in `s = 2t - 1`, `t = 1 / (1 + z/2)`, for `log(erfc(z) / t) + z^2` on all of
/// z >= 0 (the form of Numerical Recipes' `erfcc`, refitted: error about 1e-7 in f32).
const ERFC_G: [f32; 12] = [
    -0.671_794_1,
    0.672_643_1,
    0.047_343_887,
    -0.046_893_64,
    -0.009_880_02,
    0.008_808_825,
    0.001_794_066_3,
    -0.002_288_765_3,
    -0.000_227_910_96,
    0.000_573_766_36,
    0.000_008_000_738,
    -0.000_087_283_81,
];

/// `(hi, lo)` with `hi + lo = x^2` (to f32 rounding of `lo` only): `hi = xh^2` is exact since
/// `xh` (x with the low 12 mantissa bits cleared) has 12 significant bits.
#[inline(always)]
fn square_hilo(x: f32) -> (f32, f32) {
    let xh = f32::from_bits(x.to_bits() & 0xFFFF_F000);
    let xl = x - xh;
    (xh * xh, xl * (x + xh))
}

/// `erfc(z)` for `z >= 0` given `z^2 = zz_hi + zz_lo` to more than f32 precision (z^2 is up
/// to 87 here: its rounding alone would cost ~10 ulp). Branch-free; relative error a few ulp
/// down to the f32 underflow (0 beyond z = 9.3). NaN stays NaN.
#[inline(always)]
fn erfc_nonneg(z: f32, zz_hi: f32, zz_lo: f32) -> f32 {
    let t = 1.0 / (1.0 + 0.5 * z);
    let s = 2.0 * t - 1.0;
    let mut g = ERFC_G[11];
    for &c in ERFC_G[..11].iter().rev() {
        g = g * s + c;
    }
    t * exp_hilo(-zz_hi, g - zz_lo)
}

/// `erf(x)` within a few ulp: a Taylor series below 0.5, else `1 - erfc`. Scalar (it branches);
/// GELU uses [`erfc_nonneg`] directly.
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) fn erf_f32(x: f32) -> f32 {
    let a = x.abs();
    if a < 0.5 {
        // 2/sqrt(pi) * sum (-1)^n x^(2n+1) / (n! (2n+1)), n <= 7 (next term < 1e-9 x).
        let x2 = x * x;
        let mut p = 0.0f32;
        for n in (0..8).rev() {
            let fact: f32 = (1..=n).map(|k| k as f32).product();
            let c = 1.0 / (fact * (2 * n + 1) as f32);
            p = p * x2 + if n % 2 == 0 { c } else { -c };
        }
        return std::f32::consts::FRAC_2_SQRT_PI * x * p;
    }
    let (hi, lo) = square_hilo(a);
    let e = 1.0 - erfc_nonneg(a, hi, lo);
    if x < 0.0 {
        -e
    } else {
        e
    }
}

/// SiLU of one value (for kernels that fuse it).
#[inline(always)]
pub(crate) fn silu1(x: f32) -> f32 {
    x / (1.0 + super::exp::exp_f32(-x))
}

#[inline(always)]
fn gelu1(x: f32) -> f32 {
    // x Phi(x); for x < 0, Phi = erfc(|x| / sqrt 2) / 2 keeps its relative accuracy. z^2 = x^2 / 2
    // from x itself (the rounding of z = |x| / sqrt 2 would be amplified by 2 z^2).
    let a = x.abs();
    let (hi, lo) = square_hilo(a);
    let half = 0.5 * erfc_nonneg(a * std::f32::consts::FRAC_1_SQRT_2, 0.5 * hi, 0.5 * lo);
    x * if x < 0.0 { half } else { 1.0 - half }
}

#[inline(always)]
fn gelu_tanh1(x: f32) -> f32 {
    // 0.5 (1 + tanh(u)) = sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3).
    let v = x as f64;
    let k = (2.0 / std::f64::consts::PI).sqrt();
    x_sigmoid_of(x, 2.0 * k * (v + 0.044715 * v * v * v))
}

#[inline(always)]
fn quick_gelu1(x: f32) -> f32 {
    x_sigmoid_of(x, 1.702 * x as f64)
}

#[inline(always)]
fn sigmoid1(x: f32) -> f32 {
    1.0 / (1.0 + super::exp::exp_f32(-x))
}

/// `x * gelu(g)` for each pair (GEGLU's gate), one thread; compiled for AVX2+FMA / NEON too.
#[multiversion::multiversion(targets("x86_64+avx2+fma", "aarch64+neon"))]
pub(crate) fn gelu_gate_into(dst: &mut [f32], hidden: &[f32], gate: &[f32]) {
    for ((o, &x), &g) in dst.iter_mut().zip(hidden).zip(gate) {
        *o = x * gelu1(g);
    }
}

/// Exact (erf) GELU, `F.gelu(x)`.
pub fn gelu(x: &Tensor) -> Tensor {
    Activation::Gelu.forward(x)
}

/// Tanh-approximated GELU, `F.gelu(x, approximate="tanh")`.
pub fn gelu_tanh(x: &Tensor) -> Tensor {
    Activation::GeluTanh.forward(x)
}

/// `x * sigmoid(1.702 x)`, CLIP's quick GELU.
pub fn quick_gelu(x: &Tensor) -> Tensor {
    Activation::QuickGelu.forward(x)
}

/// SiLU (swish), `x * sigmoid(x)`.
pub fn silu(x: &Tensor) -> Tensor {
    Activation::Silu.forward(x)
}

/// Logistic sigmoid.
pub fn sigmoid(x: &Tensor) -> Tensor {
    Activation::Sigmoid.forward(x)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn ulps(a: f32, b: f32) -> u64 {
        if a == b {
            return 0; // also +0 == -0
        }
        let key = |v: f32| {
            let b = v.to_bits() as i64;
            if b < 0 {
                i64::MIN - b
            } else {
                b
            }
        };
        (key(a) - key(b)).unsigned_abs()
    }

    /// f64 references (libm), rounded once.
    fn reference(a: Activation, x: f32) -> f64 {
        let v = x as f64;
        let sig = |w: f64| 1.0 / (1.0 + (-w).exp());
        match a {
            Activation::Silu => v * sig(v),
            Activation::Gelu => 0.5 * v * libm::erfc(-v * std::f64::consts::FRAC_1_SQRT_2),
            Activation::GeluTanh => {
                let k = (2.0 / std::f64::consts::PI).sqrt();
                v * sig(2.0 * k * (v + 0.044715 * v * v * v))
            }
            Activation::QuickGelu => v * sig(1.702 * v),
            Activation::Sigmoid => sig(v),
        }
    }

    fn inputs() -> impl Iterator<Item = f32> {
        let grid = (-300_000..=300_000).map(|i| i as f32 * 1e-4 * 3.0);
        let mut s = 12345u32;
        let random = std::iter::repeat_with(move || {
            s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            f32::from_bits(s)
        })
        .filter(|v| v.is_finite())
        .take(200_000);
        grid.chain(random)
    }

    /// Worst ulp error over the inputs whose exact result is at least 1e-30 in magnitude (below
    /// that, where exp flushes to 0, an absolute error under 1e-34 is allowed).
    fn worst_ulps(a: Activation) -> u64 {
        let mut worst = 0;
        for x in inputs() {
            let want = reference(a, x);
            let got = a.apply(x);
            if want.abs() < 1e-30 {
                assert!(
                    (got as f64 - want).abs() < 1e-34,
                    "{a:?}({x}) = {got}, want {want}"
                );
                continue;
            }
            let e = ulps(got, want as f32);
            assert!(e <= 8, "{a:?}({x:e}) = {got:e}, want {want:e} ({e} ulp)");
            worst = worst.max(e);
        }
        worst
    }

    #[test]
    fn activations_within_a_few_ulp_of_f64() {
        // The measured maxima (GELU's from erfc's polynomial and the two-part exp).
        assert!(worst_ulps(Activation::Silu) <= 3);
        assert!(worst_ulps(Activation::Sigmoid) <= 2);
        assert!(worst_ulps(Activation::Gelu) <= 5);
        assert!(worst_ulps(Activation::GeluTanh) <= 3);
        assert!(worst_ulps(Activation::QuickGelu) <= 3);
    }

    #[test]
    fn erf_within_a_few_ulp_of_f64() {
        let mut worst = 0;
        for i in -100_000..=100_000 {
            let x = i as f32 * 1e-4;
            let want = libm::erf(x as f64);
            let got = erf_f32(x);
            worst = worst.max(ulps(got, want as f32));
        }
        println!("erf worst {worst} ulp");
        assert!(worst <= 4, "erf worst {worst} ulp");
        let tiny = (1e-30f64 * std::f64::consts::FRAC_2_SQRT_PI) as f32;
        assert!(ulps(erf_f32(1e-30), tiny) <= 1);
    }

    #[test]
    fn special_values() {
        for a in [
            Activation::Silu,
            Activation::Gelu,
            Activation::GeluTanh,
            Activation::QuickGelu,
        ] {
            assert_eq!(a.apply(0.0), 0.0, "{a:?}");
            assert_eq!(a.apply(f32::INFINITY), f32::INFINITY, "{a:?}");
            assert!(a.apply(f32::NAN).is_nan(), "{a:?}");
            assert_eq!(a.apply(-200.0), 0.0, "{a:?}");
        }
        assert_eq!(Activation::Sigmoid.apply(f32::INFINITY), 1.0);
        assert_eq!(Activation::Sigmoid.apply(f32::NEG_INFINITY), 0.0);
        assert!(Activation::Sigmoid.apply(f32::NAN).is_nan());
    }

    #[test]
    fn tensor_path_matches_scalar() {
        // The multiversioned slice kernels (AVX2 here when the CPU has it) give the scalar bits:
        // no FMA contraction, so every target computes the same arithmetic.
        let x: Vec<f32> = inputs().take(300_000).collect();
        let t = Tensor::new([x.len()], x.clone()).unwrap();
        for a in [
            Activation::Silu,
            Activation::Gelu,
            Activation::GeluTanh,
            Activation::QuickGelu,
            Activation::Sigmoid,
        ] {
            let y = a.forward(&t);
            let same = |y: &[f32]| {
                y.iter()
                    .zip(&x)
                    .all(|(y, &x)| y.to_bits() == a.apply(x).to_bits() || y.is_nan())
            };
            assert!(same(y.data()), "{a:?}");
            let mut z = x.clone();
            a.apply_inplace(&mut z);
            assert!(same(&z), "{a:?}");
            assert_eq!(y.data().iter().filter(|v| v.is_nan()).count(), 0, "{a:?}");
        }
        let rev: Vec<f32> = x.iter().rev().copied().collect();
        let mut gated = vec![0.0f32; x.len()];
        gelu_gate_into(&mut gated, &rev, &x);
        let mut scalar = vec![0.0f32; x.len()];
        gelu_gate_scalar(&mut scalar, &rev, &x);
        assert!(gated
            .iter()
            .zip(&scalar)
            .all(|(a, b)| a.to_bits() == b.to_bits() || a.is_nan() && b.is_nan()));
    }

    /// The gate as it was before the multiversioned kernel (baseline x86-64: SSE2).
    pub(crate) fn gelu_gate_scalar(dst: &mut [f32], hidden: &[f32], gate: &[f32]) {
        for ((o, &x), &g) in dst.iter_mut().zip(hidden).zip(gate) {
            *o = x * gelu1(g);
        }
    }

    /// Old (SSE2) vs new (multiversioned) loops, one thread:
    /// `cargo test -p ferry-sd --release --lib -- --ignored --nocapture perf_activations`.
    #[test]
    #[ignore = "timing, run by hand in release"]
    fn perf_activations() {
        let n = 2 * 4096 * 1280;
        let x: Vec<f32> = (0..n)
            .map(|i| ((i * 7919 % 10007) as f32 - 5000.0) / 1000.0)
            .collect();
        let h: Vec<f32> = x.iter().rev().copied().collect();
        let mut out = vec![0.0f32; n];
        // Old and new alternate, best of 7 each (the machine is shared).
        let pair = |old: &mut dyn FnMut(), new: &mut dyn FnMut()| {
            let (mut o, mut n) = (f64::MAX, f64::MAX);
            for _ in 0..7 {
                let t = std::time::Instant::now();
                old();
                o = o.min(t.elapsed().as_secs_f64() * 1e3);
                let t = std::time::Instant::now();
                new();
                n = n.min(t.elapsed().as_secs_f64() * 1e3);
            }
            (o, n)
        };
        let mut out2 = out.clone();
        let (old, new) = pair(&mut || gelu_gate_scalar(&mut out, &h, &x), &mut || {
            gelu_gate_into(&mut out2, &h, &x)
        });
        println!("gelu gate [{n}] 1 thread: old {old:.1} ms, new {new:.1} ms");
        macro_rules! act {
            ($name:literal, $f:ident, $k:ident) => {
                let (old, new) = pair(
                    &mut || {
                        for (o, &v) in out.iter_mut().zip(&x) {
                            *o = $f(v);
                        }
                    },
                    &mut || $k(&mut out2, &x),
                );
                println!("{} [{n}] 1 thread: old {old:.1} ms, new {new:.1} ms", $name);
            };
        }
        act!("silu", silu1, silu_into);
        act!("gelu", gelu1, gelu_into);
        act!("gelu_tanh", gelu_tanh1, gelu_tanh_into);
        act!("quick_gelu", quick_gelu1, quick_gelu_into);
        act!("sigmoid", sigmoid1, sigmoid_into);
    }
}
