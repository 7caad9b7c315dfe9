//! A port of PyTorch's CPU generator (`torch.manual_seed` + `torch.randn`) that reproduces its
//! float32 output bit for bit, so a seed gives the same initial latents as diffusers with a CPU
//! generator.
//!
//! What torch 2.x does (ATen `CPUGeneratorImpl`, `DistributionTemplates.h`, `avx_mathfun.h`):
//! - The engine is a standard 32-bit MT19937 seeded with the low 32 bits of the seed.
//! - A float uniform takes one 32-bit draw: `(r & 0xFF_FFFF) * 2^-24`; a double uniform takes two
//!   draws `hi, lo` and uses the low 53 bits of `hi << 32 | lo`.
//! - `randn` of a contiguous tensor with at least 16 elements first fills the whole buffer with
//!   float uniforms, then runs Box-Muller over blocks of 16: element `j < 8` pairs with `j + 8`
//!   (`u1 = 1 - x[j]`, `u2 = x[j + 8]`, `x[j] = r cos θ`, `x[j + 8] = r sin θ`). If the size is
//!   not a multiple of 16, the last 16 elements are redrawn and transformed again.
//!   On x86-64 CPUs with AVX2 (torch's AVX512 build dispatches `normal` to the AVX2 kernel too)
//!   the transcendental functions are the Cephes-style polynomials of `avx_mathfun.h` in float32;
//!   elsewhere they are libm's `logf`/`cosf`/`sinf`. See [`BoxMullerPath`].
//! - Fewer than 16 elements use the double-precision Box-Muller of `at::normal_distribution`,
//!   which caches the second value (the sine) in the generator for the next call.

use std::f64::consts::PI;

/// MT19937 state size.
const MT_N: usize = 624;
/// MT19937 shift size.
const MT_M: usize = 397;

/// The 32-bit Mersenne Twister as used by `at::mt19937`.
#[derive(Clone, Debug)]
struct Mt19937 {
    state: [u32; MT_N],
    next: usize,
}

impl Mt19937 {
    fn new(seed: u32) -> Self {
        let mut state = [0u32; MT_N];
        state[0] = seed;
        for j in 1..MT_N {
            let prev = state[j - 1];
            state[j] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(j as u32);
        }
        Self { state, next: MT_N }
    }

    fn twist(&mut self) {
        const UPPER: u32 = 0x8000_0000;
        const LOWER: u32 = 0x7fff_ffff;
        const MATRIX_A: u32 = 0x9908_b0df;
        for i in 0..MT_N {
            let y = (self.state[i] & UPPER) | (self.state[(i + 1) % MT_N] & LOWER);
            let mag = if y & 1 == 1 { MATRIX_A } else { 0 };
            self.state[i] = self.state[(i + MT_M) % MT_N] ^ (y >> 1) ^ mag;
        }
        self.next = 0;
    }

    fn next_u32(&mut self) -> u32 {
        if self.next >= MT_N {
            self.twist();
        }
        let mut y = self.state[self.next];
        self.next += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^= y >> 18;
        y
    }
}

/// Which implementation of torch's 16-wide float Box-Muller to reproduce.
///
/// torch's output for tensors of 16 or more float32 elements depends on the CPU it runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BoxMullerPath {
    /// x86-64 with AVX2 or AVX512 (almost every x86 machine torch runs on): `avx_mathfun.h`.
    #[default]
    Avx2,
    /// torch's scalar fallback (`ATEN_CPU_CAPABILITY=default`, and CPUs without an AVX2 or VSX
    /// kernel such as aarch64): libm `logf`/`cosf`/`sinf` in float32.
    Scalar,
}

/// A CPU random generator with the state and outputs of `torch.Generator("cpu")`.
#[derive(Clone, Debug)]
pub struct TorchGenerator {
    engine: Mt19937,
    next_double_normal: Option<f64>,
    path: BoxMullerPath,
}

impl TorchGenerator {
    /// A generator in the state `torch.manual_seed(seed)` leaves (AVX2 Box-Muller path).
    pub fn manual_seed(seed: u64) -> Self {
        Self::with_path(seed, BoxMullerPath::default())
    }

    /// A generator seeded like [`TorchGenerator::manual_seed`] that reproduces a chosen CPU path.
    pub fn with_path(seed: u64, path: BoxMullerPath) -> Self {
        Self {
            // torch seeds the engine with the low 32 bits of the 64-bit seed.
            engine: Mt19937::new(seed as u32),
            next_double_normal: None,
            path,
        }
    }

    /// The Box-Muller path this generator reproduces.
    pub fn path(&self) -> BoxMullerPath {
        self.path
    }

    /// One raw 32-bit draw (`CPUGeneratorImpl::random`).
    pub fn random_u32(&mut self) -> u32 {
        self.engine.next_u32()
    }

    /// One raw 64-bit draw made of two 32-bit draws, first one high (`CPUGeneratorImpl::random64`).
    pub fn random_u64(&mut self) -> u64 {
        let hi = self.engine.next_u32() as u64;
        let lo = self.engine.next_u32() as u64;
        (hi << 32) | lo
    }

    /// A float uniform in [0, 1) as `at::uniform_real_distribution<float>` draws it.
    fn uniform_f32(&mut self) -> f32 {
        (self.random_u32() & 0x00ff_ffff) as f32 * (1.0 / 16_777_216.0)
    }

    /// A double uniform in [0, 1) as `at::uniform_real_distribution<double>` draws it.
    fn uniform_f64(&mut self) -> f64 {
        (self.random_u64() & ((1u64 << 53) - 1)) as f64 * (1.0 / 9_007_199_254_740_992.0)
    }

    /// One sample of `at::normal_distribution<double>(0, 1)`, using and refilling the cache.
    fn normal_f64(&mut self) -> f64 {
        if let Some(cached) = self.next_double_normal.take() {
            return cached;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let r = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = 2.0 * PI * u1;
        self.next_double_normal = Some(r * theta.sin());
        r * theta.cos()
    }

    /// `torch.randn(n, generator=g)` for a contiguous float32 tensor of `n` elements.
    pub fn randn(&mut self, n: usize) -> Vec<f32> {
        let mut out = vec![0.0f32; n];
        self.randn_into(&mut out);
        out
    }

    /// Fills `out` as `torch.randn` fills a contiguous float32 tensor of `out.len()` elements.
    pub fn randn_into(&mut self, out: &mut [f32]) {
        let n = out.len();
        if n < 16 {
            for v in out.iter_mut() {
                *v = self.normal_f64() as f32;
            }
            return;
        }
        for v in out.iter_mut() {
            *v = self.uniform_f32();
        }
        let path = self.path;
        for block in out.chunks_exact_mut(16) {
            box_muller_16(block, path);
        }
        if !n.is_multiple_of(16) {
            let tail = &mut out[n - 16..];
            for v in tail.iter_mut() {
                *v = self.uniform_f32();
            }
            box_muller_16(tail, path);
        }
    }
}

/// The in-place 16-element Box-Muller transform (`NormalFill16` with mean 0, std 1).
fn box_muller_16(block: &mut [f32], path: BoxMullerPath) {
    for j in 0..8 {
        let u1 = 1.0 - block[j];
        let u2 = block[j + 8];
        let (c, s) = match path {
            BoxMullerPath::Avx2 => {
                let radius = (-2.0 * cephes::log(u1)).sqrt();
                let theta = (2.0 * PI) as f32 * u2;
                let (sin, cos) = cephes::sincos(theta);
                (radius * cos, radius * sin)
            }
            BoxMullerPath::Scalar => {
                let radius = (-2.0 * u1.ln()).sqrt();
                // `2.0f * c10::pi<double> * u2` is evaluated in double, then stored as float.
                let theta = (2.0 * PI * u2 as f64) as f32;
                (radius * theta.cos(), radius * theta.sin())
            }
        };
        // `fma(n, std, mean)` with std 1 and mean 0 is exact.
        block[j] = c;
        block[j + 8] = s;
    }
}

/// Scalar float32 transcriptions of the `log256_ps` / `sincos256_ps` polynomials of
/// `avx_mathfun.h` (zlib licence, after Julien Pommier's `sse_mathfun.h` and Cephes), operation
/// by operation. torch's AVX2 build lets the compiler contract some multiply-adds into FMA
/// instructions; the `mul_add` calls below are exactly the ones found in the disassembly of
/// torch 2.15's `libtorch_cpu.so` (`normal_kernel`, AVX2 variant), so results match bit for bit.
/// The constants are the header's double literals rounded to float, as its initialisers do.
// The literals are kept digit for digit as in the header, rounded to f64 then f32 as C does.
#[allow(clippy::excessive_precision)]
mod cephes {
    const SQRTHF: f32 = std::f64::consts::FRAC_1_SQRT_2 as f32;
    const LOG_P: [f32; 9] = [
        7.0376836292E-2_f64 as f32,
        -1.1514610310E-1_f64 as f32,
        1.1676998740E-1_f64 as f32,
        -1.2420140846E-1_f64 as f32,
        1.4249322787E-1_f64 as f32,
        -1.6668057665E-1_f64 as f32,
        2.0000714765E-1_f64 as f32,
        -2.4999993993E-1_f64 as f32,
        3.3333331174E-1_f64 as f32,
    ];
    const LOG_Q1: f32 = -2.12194440e-4_f64 as f32;
    const LOG_Q2: f32 = 0.693359375_f64 as f32;

    /// `log256_ps` for one lane; inputs here are in (0, 1].
    pub(super) fn log(x: f32) -> f32 {
        if x <= 0.0 || x.is_nan() {
            return f32::NAN;
        }
        let x = x.max(f32::MIN_POSITIVE);
        let bits = x.to_bits();
        let exp = (bits >> 23) as i32 - 0x7f;
        let mut x = f32::from_bits((bits & !0x7f80_0000) | 0.5f32.to_bits());
        let mut e = exp as f32 + 1.0;
        let mask = x < SQRTHF;
        let tmp = if mask { x } else { 0.0 };
        x -= 1.0;
        if mask {
            e -= 1.0;
        }
        x += tmp;
        let z = x * x;
        let mut y = LOG_P[0];
        for &p in &LOG_P[1..] {
            y = y.mul_add(x, p);
        }
        y = (y * x).mul_add(z, e * LOG_Q1);
        y = (-z).mul_add(0.5, y);
        x += y;
        e.mul_add(LOG_Q2, x)
    }

    const DP1: f32 = -0.78515625_f64 as f32;
    const DP2: f32 = -2.4187564849853515625e-4_f64 as f32;
    const DP3: f32 = -3.77489497744594108e-8_f64 as f32;
    const SINCOF: [f32; 3] = [
        -1.9515295891E-4_f64 as f32,
        8.3321608736E-3_f64 as f32,
        -1.6666654611E-1_f64 as f32,
    ];
    const COSCOF: [f32; 3] = [
        2.443315711809948E-005_f64 as f32,
        -1.388731625493765E-003_f64 as f32,
        4.166664568298827E-002_f64 as f32,
    ];
    const FOPI: f32 = 1.27323954473516_f64 as f32;

    /// `sincos256_ps` for one lane: returns (sin x, cos x).
    pub(super) fn sincos(x: f32) -> (f32, f32) {
        let sign_sin = x.to_bits() & 0x8000_0000;
        let mut x = f32::from_bits(x.to_bits() & 0x7fff_ffff);
        // Truncating conversion as `cvttps`; out-of-range values give i32::MIN there.
        let scaled = x * FOPI;
        let mut j = if scaled.abs() < 2_147_483_648.0 {
            scaled as i32
        } else {
            i32::MIN
        };
        j = j.wrapping_add(1) & !1;
        let y = j as f32;
        let swap_sign_sin = ((j & 4) as u32) << 29;
        let poly_is_cos = (j & 2) == 0;
        x = y.mul_add(DP1, x);
        x = y.mul_add(DP2, x);
        x = y.mul_add(DP3, x);
        let sign_cos = ((!(j.wrapping_sub(2)) & 4) as u32) << 29;
        let sign_sin = sign_sin ^ swap_sign_sin;

        let z = x * x;
        let mut yc = COSCOF[0];
        yc = yc.mul_add(z, COSCOF[1]);
        yc = yc.mul_add(z, COSCOF[2]);
        yc = (yc * z).mul_add(z, -(z * 0.5));
        yc += 1.0;

        let mut ys = SINCOF[0];
        ys = ys.mul_add(z, SINCOF[1]);
        ys = ys.mul_add(z, SINCOF[2]);
        ys = x.mul_add(ys * z, x);

        // poly_mask selects the sine polynomial for the sine when set.
        let (sin_abs, cos_abs) = if poly_is_cos { (ys, yc) } else { (yc, ys) };
        (
            f32::from_bits(sin_abs.to_bits() ^ sign_sin),
            f32::from_bits(cos_abs.to_bits() ^ sign_cos),
        )
    }
}
