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

// ---------------------------------------------------------------------------------------------
// f64 in every rounding mode, and directed-rounding f32 `div`/`rcp`/`sqrt`.
//
// Method: the host computes the round-to-nearest result `r` (IEEE 754 add, mul, fma, div and
// sqrt are correctly rounded). The sign of the exact residual `exact − r` is then found without
// rounding error — by TwoSum for add/sub, and for mul/fma/div/sqrt as the sign of `x·y + c − r`
// (`a·b + c − r`, `q·b − a`, `q·q − a`) summed exactly: TwoProd via fma gives `x·y = ph + pl`,
// and Shewchuk's grow-expansion adds `ph, pl, c, −r` into a non-overlapping expansion whose
// largest non-zero component carries the sign. Operands are first scaled by 2^±600 (exact) so
// that TwoProd neither underflows nor overflows. Since `|exact − r| ≤ ulp/2`, a directed result
// is `r` or its neighbour one ulp away in the direction of the residual.

/// `2^600`, the scale that keeps TwoProd exact.
const SCALE_UP: f64 = f64::from_bits((1023 + 600) << 52);
/// `2^-600`.
const SCALE_DOWN: f64 = f64::from_bits((1023 - 600) << 52);

/// The next f64 toward +∞ (`+∞` and NaN unchanged).
pub fn next_up64(x: f64) -> f64 {
    if x.is_nan() || x == f64::INFINITY {
        return x;
    }
    if x == 0.0 {
        return f64::from_bits(1);
    }
    let b = x.to_bits();
    f64::from_bits(if x > 0.0 { b + 1 } else { b - 1 })
}

/// The next f64 toward −∞.
pub fn next_down64(x: f64) -> f64 {
    -next_up64(-x)
}

fn sign(x: f64) -> f64 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// The sign (−1, 0 or 1) of the exact `x·y + c − r` for finite operands where `r` is close to
/// `x·y + c` (the round-to-nearest result of an operation). 0 also when an intermediate
/// overflows despite the scaling (not reached by the callers' operands).
pub fn residual_sign(x: f64, y: f64, c: f64, r: f64) -> f64 {
    let (mut x, mut y, mut c, mut r) = (x, y, c, r);
    let ph = x * y;
    if ph.is_infinite() {
        // |x·y| ≥ 2^1024: the larger factor is ≥ 2^512 and scales down exactly, and so do
        // `c` and `r`, which are then either ~x·y or multiples of a large power of two.
        if x.abs() < y.abs() {
            std::mem::swap(&mut x, &mut y);
        }
        x *= SCALE_DOWN;
        c *= SCALE_DOWN;
        r *= SCALE_DOWN;
    } else if x != 0.0 && y != 0.0 && ph.abs() < f64::from_bits((1023 - 968) << 52) {
        // A tiny product: its rounding error may be below the subnormal grid.
        if c.abs() >= f64::from_bits((1023 + 423) << 52)
            || r.abs() >= f64::from_bits((1023 + 423) << 52)
        {
            // c dominates: r = c and the residual is the (non-zero) product.
            let s = sign(c - r);
            return if s != 0.0 { s } else { sign(x) * sign(y) };
        }
        x *= SCALE_UP;
        c *= SCALE_UP;
        r *= SCALE_UP;
    }
    let ph = x * y;
    let pl = x.mul_add(y, -ph);
    let mut e: Vec<f64> = Vec::with_capacity(4);
    for b in [ph, pl, c, -r] {
        let mut q = b;
        let mut h = Vec::with_capacity(e.len() + 1);
        for &ei in &e {
            let (s, err) = two_sum(q, ei);
            h.push(err);
            q = s;
        }
        h.push(q);
        e = h;
    }
    if e.iter().any(|v| !v.is_finite()) {
        return 0.0;
    }
    e.iter()
        .rev()
        .find(|&&v| v != 0.0)
        .map_or(0.0, |&v| sign(v))
}

/// Rounds in `mode` given the round-to-nearest result `r` of a finite exact value and the sign
/// of `exact − r`; `overflow` says that `r` is an infinity produced by overflow from finite
/// operands (then `.rz` and the mode rounding toward zero give ±MAX).
pub fn directed64(r: f64, residual: f64, mode: Round, overflow: bool) -> f64 {
    if overflow {
        let toward_zero = match mode {
            Round::Rz => true,
            Round::Rm => r > 0.0,
            Round::Rp => r < 0.0,
            _ => false,
        };
        return if toward_zero { f64::MAX.copysign(r) } else { r };
    }
    match mode {
        Round::Rp if residual > 0.0 => next_up64(r),
        Round::Rm if residual < 0.0 => next_down64(r),
        Round::Rz if r > 0.0 && residual < 0.0 => next_down64(r),
        Round::Rz if r < 0.0 && residual > 0.0 => next_up64(r),
        _ => r,
    }
}

/// Sign of an exact zero `t1 + t2` in `mode` (IEEE 754: `x + x` keeps the sign of `x`; other
/// exact zeros are +0, −0 under `.rm`).
fn zero_sum64(t1: f64, t2: f64, mode: Round) -> f64 {
    if t1 == 0.0 && t2 == 0.0 && t1.is_sign_negative() == t2.is_sign_negative() {
        t1
    } else if mode == Round::Rm {
        -0.0
    } else {
        0.0
    }
}

/// `add.f64` (and `sub` with `b` negated) in `mode`.
pub fn add64(a: f64, b: f64, mode: Round) -> f64 {
    let (s, e) = two_sum(a, b);
    if nearest(mode) || !a.is_finite() || !b.is_finite() {
        return a + b;
    }
    if s == 0.0 && e == 0.0 {
        return zero_sum64(a, b, mode);
    }
    directed64(s, sign(e), mode, s.is_infinite())
}

/// Round to nearest: the host's correctly rounded result as it is.
fn nearest(mode: Round) -> bool {
    matches!(mode, Round::Rn | Round::None)
}

/// `mul.f64` in `mode`.
pub fn mul64(a: f64, b: f64, mode: Round) -> f64 {
    let p = a * b;
    if nearest(mode) || !a.is_finite() || !b.is_finite() || a == 0.0 || b == 0.0 {
        return p;
    }
    if p.is_infinite() {
        return directed64(p, 0.0, mode, true);
    }
    directed64(p, residual_sign(a, b, 0.0, p), mode, false)
}

/// `fma.f64` in `mode`: one rounding of the exact `a·b + c`.
pub fn fma64(a: f64, b: f64, c: f64, mode: Round) -> f64 {
    let r = a.mul_add(b, c);
    if nearest(mode) || !a.is_finite() || !b.is_finite() || !c.is_finite() {
        return r;
    }
    if r.is_infinite() {
        return directed64(r, 0.0, mode, true);
    }
    let res = residual_sign(a, b, c, r);
    if r == 0.0 && res == 0.0 {
        let p = if a == 0.0 || b == 0.0 {
            // An exact zero product carries the sign of a·b.
            if a.is_sign_negative() != b.is_sign_negative() {
                -0.0
            } else {
                0.0
            }
        } else {
            // A non-zero product cancelling c: never a same-signed pair of zeros.
            1.0
        };
        return zero_sum64(p, c, mode);
    }
    directed64(r, res, mode, false)
}

/// `div.f64` in `mode` (`.rn` is the host's division).
pub fn div64(a: f64, b: f64, mode: Round) -> f64 {
    let q = a / b;
    if nearest(mode) || !a.is_finite() || !b.is_finite() || b == 0.0 || a == 0.0 {
        return q;
    }
    if q.is_infinite() {
        return directed64(q, 0.0, mode, true);
    }
    // sign(a/b − q) = −sign(q·b − a)·sign(b).
    directed64(q, -residual_sign(q, b, 0.0, a) * sign(b), mode, false)
}

/// `sqrt.f64` in `mode`.
pub fn sqrt64(a: f64, mode: Round) -> f64 {
    let q = a.sqrt();
    if nearest(mode) || !q.is_finite() || a == 0.0 {
        return q;
    }
    directed64(q, -residual_sign(q, q, 0.0, a), mode, false)
}

/// `div.{rn,rz,rm,rp}.f32`: the f64 quotient plus the exact sign of its residual, rounded to
/// f32 once.
pub fn div32_round(a: f32, b: f32, mode: Round, z: bool) -> f32 {
    let (x, y) = (fin(a, z), fin(b, z));
    let q = x / y;
    let e = if q.is_finite() && x != 0.0 {
        -residual_sign(q, y, 0.0, x) * sign(y)
    } else {
        0.0
    };
    fout(round_f32(q, e, mode), z, false)
}

/// `sqrt.{rn,rz,rm,rp}.f32`.
pub fn sqrt32_round(a: f32, mode: Round, z: bool) -> f32 {
    let x = fin(a, z);
    let q = x.sqrt();
    let e = if q.is_finite() && x > 0.0 {
        -residual_sign(q, q, 0.0, x)
    } else {
        0.0
    };
    fout(round_f32(q, e, mode), z, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Random f64 bit patterns over the whole exponent range (subnormals and huge values
    /// included), finite only.
    fn sample(state: &mut u64) -> f64 {
        loop {
            *state ^= *state << 13;
            *state ^= *state >> 7;
            *state ^= *state << 17;
            let x = f64::from_bits(*state);
            if x.is_finite() {
                return x;
            }
        }
    }

    /// The four modes bracket the exact value: `rm ≤ rp` at most one ulp apart, `.rn` one of
    /// them, `.rz` the one nearer zero; an exact result (`rm == rp`) is what every mode gives.
    fn bracket(f: impl Fn(Round) -> f64, what: &str) {
        let (rn, rz, rm, rp) = (f(Round::Rn), f(Round::Rz), f(Round::Rm), f(Round::Rp));
        if rn.is_nan() {
            assert!(rz.is_nan() && rm.is_nan() && rp.is_nan(), "{what}");
            return;
        }
        assert!(rm <= rp, "{what}: rm {rm:e} > rp {rp:e}");
        assert!(
            rm.to_bits() == rp.to_bits() || next_up64(rm) == rp,
            "{what}: rm {rm:e} rp {rp:e}"
        );
        assert!(rn == rm || rn == rp, "{what}: rn {rn:e}");
        let want_rz = if rm >= 0.0 && rp > 0.0 { rm } else { rp };
        if rm != rp {
            assert_eq!(rz, want_rz, "{what}");
        }
    }

    #[test]
    fn directed_f64_modes_bracket_the_exact_result() {
        let mut s = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..20_000 {
            let (a, b, c) = (sample(&mut s), sample(&mut s), sample(&mut s));
            bracket(|m| add64(a, b, m), &format!("add {a:e} {b:e}"));
            bracket(|m| mul64(a, b, m), &format!("mul {a:e} {b:e}"));
            bracket(|m| fma64(a, b, c, m), &format!("fma {a:e} {b:e} {c:e}"));
            bracket(|m| div64(a, b, m), &format!("div {a:e} {b:e}"));
            bracket(|m| sqrt64(a.abs(), m), &format!("sqrt {a:e}"));
            // Products in the normal range: exact iff TwoProd's low part is zero.
            let p = a * b;
            if p.is_normal() && p.abs() > 1e-290 {
                let exact = a.mul_add(b, -p) == 0.0;
                assert_eq!(mul64(a, b, Round::Rm) == mul64(a, b, Round::Rp), exact);
            }
        }
    }

    #[test]
    fn tiny_products_round_by_the_sign_of_what_was_lost() {
        // 3·2^-1075 · 1 = 1.5 · 2^-1074: between the subnormals 2^-1074 and 2^-1073.
        let tiny = f64::from_bits(1);
        let x = 3.0 * f64::from_bits((1023 - 60) << 52); // 3 · 2^-60
        let y = f64::from_bits((1023 - 1015) << 52); // 2^-1015 → product 3 · 2^-1075
        assert_eq!(mul64(x, y, Round::Rm), tiny);
        assert_eq!(mul64(x, y, Round::Rp), f64::from_bits(2));
        assert_eq!(mul64(x, y, Round::Rz), tiny);
        // Ties to even: 1.5 ulps go to 2 ulps.
        assert_eq!(mul64(x, y, Round::Rn), f64::from_bits(2));
        assert_eq!(mul64(-x, y, Round::Rm), -f64::from_bits(2));
    }
}
