//! Floating-point semantics: correctly rounded f32 arithmetic in all four rounding modes (exact
//! intermediate results via f64 and error-free transformations), `.ftz`, `.sat`, NaN rules.

use super::super::ir::Round;

/// The canonical f32 NaN PTX arithmetic produces.
pub const NAN32: u32 = 0x7fff_ffff;

/// The next f32 toward +∞ (`+∞` and NaN unchanged).
pub fn next_up(x: f32) -> f32 {
    if x.is_nan() || x == f32::INFINITY {
        return x;
    }
    if x == 0.0 {
        return f32::from_bits(1);
    }
    let b = x.to_bits();
    f32::from_bits(if x > 0.0 { b + 1 } else { b - 1 })
}

/// The next f32 toward −∞.
pub fn next_down(x: f32) -> f32 {
    -next_up(-x)
}

/// Flushes a subnormal f32 to a zero of the same sign.
pub fn ftz(x: f32) -> f32 {
    if x.is_subnormal() {
        f32::from_bits(x.to_bits() & 0x8000_0000)
    } else {
        x
    }
}

/// `a + b = s + e` exactly, with `s = fl(a + b)` (Knuth's TwoSum).
pub fn two_sum(a: f64, b: f64) -> (f64, f64) {
    let s = a + b;
    let bb = s - a;
    let e = (a - (s - bb)) + (b - bb);
    (s, e)
}

/// Rounds the exact value `s + e` (where `s` is the f64 nearest to it, so `|e| ≤ ulp(s)/2`) to
/// f32 in `mode` (`None` means `.rn`).
pub fn round_f32(s: f64, e: f64, mode: Round) -> f32 {
    if !s.is_finite() || e == 0.0 && (s as f32) as f64 == s {
        return s as f32;
    }
    let c = s as f32;
    let cf = c as f64;
    match mode {
        Round::None | Round::Rn => {
            if cf == s || e == 0.0 || c.is_infinite() {
                return c;
            }
            let other = if cf < s { next_up(c) } else { next_down(c) };
            if (cf + other as f64) * 0.5 == s {
                // A tie at f64 precision: the error term decides.
                if e > 0.0 {
                    c.max(other)
                } else {
                    c.min(other)
                }
            } else {
                c
            }
        }
        Round::Rm => {
            if cf > s || (cf == s && e < 0.0) {
                next_down(c)
            } else {
                c
            }
        }
        Round::Rp => {
            if cf < s || (cf == s && e > 0.0) {
                next_up(c)
            } else {
                c
            }
        }
        Round::Rz => {
            let towards_zero = if s > 0.0 { next_down(c) } else { next_up(c) };
            if cf.abs() > s.abs() || (cf == s && (e > 0.0) != (s > 0.0)) {
                towards_zero
            } else {
                c
            }
        }
    }
}

fn canon(x: f32) -> f32 {
    if x.is_nan() {
        f32::from_bits(NAN32)
    } else {
        x
    }
}

/// Sign of an exact zero sum `a + b` in `mode` (IEEE 754: −0 only for `.rm` or two −0s).
fn zero_sum(a: f64, b: f64, mode: Round) -> f32 {
    if a == 0.0 && b == 0.0 && a.is_sign_negative() == b.is_sign_negative() {
        a as f32
    } else if mode == Round::Rm {
        -0.0
    } else {
        0.0
    }
}

/// Exact `a + b` of two f64-widened f32 values (or an exact product and an f32), rounded.
fn sum_rounded(a: f64, b: f64, mode: Round) -> f32 {
    let (s, e) = two_sum(a, b);
    if s == 0.0 && e == 0.0 {
        return zero_sum(a, b, mode);
    }
    round_f32(s, e, mode)
}

/// Applies `.ftz` to inputs.
fn fin(x: f32, ftz_: bool) -> f64 {
    (if ftz_ { ftz(x) } else { x }) as f64
}

/// Applies `.ftz`, `.sat` and NaN canonicalisation to a result.
pub fn fout(x: f32, ftz_: bool, sat: bool) -> f32 {
    let x = canon(if ftz_ { ftz(x) } else { x });
    if sat {
        if x.is_nan() {
            0.0
        } else {
            x.clamp(0.0, 1.0)
        }
    } else {
        x
    }
}

/// `add.f32`.
pub fn add32(a: f32, b: f32, mode: Round, z: bool, sat: bool) -> f32 {
    fout(sum_rounded(fin(a, z), fin(b, z), mode), z, sat)
}

/// `sub.f32`.
pub fn sub32(a: f32, b: f32, mode: Round, z: bool, sat: bool) -> f32 {
    add32(a, -b, mode, z, sat)
}

/// `mul.f32`: the f64 product of two f32 is exact.
pub fn mul32(a: f32, b: f32, mode: Round, z: bool, sat: bool) -> f32 {
    let p = fin(a, z) * fin(b, z);
    fout(round_f32(p, 0.0, mode), z, sat)
}

/// `fma.f32`: one rounding of the exact `a*b + c`.
pub fn fma32(a: f32, b: f32, c: f32, mode: Round, z: bool, sat: bool) -> f32 {
    let p = fin(a, z) * fin(b, z);
    fout(sum_rounded(p, fin(c, z), mode), z, sat)
}

/// `div.rn.f32` (and `.full`/`.approx`, which the interpreter also rounds correctly): f64
/// division then rounding to f32 is correctly rounded (53 ≥ 2·24 + 2).
pub fn div32(a: f32, b: f32, z: bool) -> f32 {
    fout((fin(a, z) / fin(b, z)) as f32, z, false)
}

/// `min.f32`: a NaN operand yields the other; −0 < +0.
pub fn min32(a: f32, b: f32, z: bool) -> f32 {
    let (a, b) = (if z { ftz(a) } else { a }, if z { ftz(b) } else { b });
    match (a.is_nan(), b.is_nan()) {
        (true, true) => f32::from_bits(NAN32),
        (true, false) => b,
        (false, true) => a,
        _ if a == b => {
            if a.is_sign_negative() {
                a
            } else {
                b
            }
        }
        _ => a.min(b),
    }
}

/// `max.f32`: a NaN operand yields the other; +0 > −0.
pub fn max32(a: f32, b: f32, z: bool) -> f32 {
    let (a, b) = (if z { ftz(a) } else { a }, if z { ftz(b) } else { b });
    match (a.is_nan(), b.is_nan()) {
        (true, true) => f32::from_bits(NAN32),
        (true, false) => b,
        (false, true) => a,
        _ if a == b => {
            if a.is_sign_positive() {
                a
            } else {
                b
            }
        }
        _ => a.max(b),
    }
}

/// `min.f64` / `max.f64` with the same NaN and zero rules.
pub fn minmax64(a: f64, b: f64, max: bool) -> f64 {
    match (a.is_nan(), b.is_nan()) {
        (true, true) => f64::NAN,
        (true, false) => b,
        (false, true) => a,
        _ if a == b => {
            if a.is_sign_negative() != max {
                a
            } else {
                b
            }
        }
        _ if max => a.max(b),
        _ => a.min(b),
    }
}

/// Unary f32 functions (`rcp`, `sqrt`, `rsqrt`, `ex2`, `lg2`, `sin`, `cos`, `tanh`), computed in
/// f64 and rounded to nearest: `.rn` forms are correctly rounded; `.approx` forms are at least as
/// accurate as the ISA's bounds (within 1 ulp, usually correctly rounded).
pub fn unary32(op: super::super::ir::Op, x: f32, z: bool) -> f32 {
    use super::super::ir::Op;
    let v = fin(x, z);
    let r = match op {
        Op::Rcp => 1.0 / v,
        Op::Sqrt => v.sqrt(),
        Op::Rsqrt => 1.0 / v.sqrt(),
        Op::Ex2 => v.exp2(),
        Op::Lg2 => v.log2(),
        Op::Sin => v.sin(),
        Op::Cos => v.cos(),
        Op::Tanh => v.tanh(),
        _ => f64::NAN,
    };
    fout(r as f32, z, false)
}

/// Unary f64 functions.
pub fn unary64(op: super::super::ir::Op, v: f64) -> f64 {
    use super::super::ir::Op;
    match op {
        Op::Rcp => 1.0 / v,
        Op::Sqrt => v.sqrt(),
        Op::Rsqrt => 1.0 / v.sqrt(),
        Op::Ex2 => v.exp2(),
        Op::Lg2 => v.log2(),
        Op::Sin => v.sin(),
        Op::Cos => v.cos(),
        Op::Tanh => v.tanh(),
        _ => f64::NAN,
    }
}

/// An f16 operand as f64 (exact), subnormals flushed to a signed zero with `.ftz`.
fn half_in(bits: u16, ftz_: bool) -> f64 {
    let b = if ftz_ && bits & 0x7c00 == 0 {
        bits & 0x8000
    } else {
        bits
    };
    half::f16::from_bits(b).to_f64()
}

/// `add sub mul fma` `.rn{.ftz}{.sat}.f16` on f16 bit patterns (`x` holds 2 or 3 operands),
/// correctly rounded to nearest even: sums and products of f16 are exact in f64 and `fma`'s sum
/// is carried exactly by TwoSum; the exact value goes to f32 with round-to-odd (24 bits ≥ 11 + 2,
/// so no double rounding), then to f16 to nearest even. A NaN result is the canonical
/// `0x7fff` (as for conversions); `.ftz` flushes subnormal inputs and results to a signed zero;
/// `.sat` clamps to [0, 1] with NaN → +0.
pub fn half_arith(op: super::super::ir::Op, x: &[u16], ftz_: bool, sat: bool) -> u16 {
    use super::super::ir::Op;
    let v = |i: usize| x.get(i).map_or(0.0, |&b| half_in(b, ftz_));
    let (s, e) = match op {
        Op::Add => two_sum(v(0), v(1)),
        Op::Sub => two_sum(v(0), -v(1)),
        Op::Mul => (v(0) * v(1), 0.0),
        _ => two_sum(v(0) * v(1), v(2)),
    };
    if s.is_nan() {
        return if sat { 0 } else { super::cvt::NAN16 };
    }
    let mut c = round_f32(s, e, Round::Rz);
    if c.is_finite() && ((c as f64) != s || e != 0.0) {
        // Round to odd: keeps the inexactness visible to the final rounding.
        c = f32::from_bits(c.to_bits() | 1);
    }
    let mut h = half::f16::from_f32(c);
    if ftz_ && h.to_bits() & 0x7c00 == 0 {
        h = half::f16::from_bits(h.to_bits() & 0x8000);
    }
    if sat {
        h = half::f16::from_f32(h.to_f32().clamp(0.0, 1.0));
    }
    h.to_bits()
}
