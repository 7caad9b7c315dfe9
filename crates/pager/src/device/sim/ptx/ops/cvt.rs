//! `cvt`: integer widening/narrowing/saturation, float↔int with rounding and saturation (NaN → 0),
//! float↔float incl. f16/bf16 with round-to-nearest-even, ties and NaN.

use super::super::ir::{Mods, Round, Ty};
use super::float::{self, NAN32};
use super::int::{mask, sext};
use half::{bf16, f16};

/// The canonical f16 NaN.
pub const NAN16: u16 = 0x7fff;
/// The canonical bf16 NaN.
pub const NANBF16: u16 = 0x7fff;

fn is_fp(t: Ty) -> bool {
    matches!(t, Ty::F16 | Ty::Bf16 | Ty::F32 | Ty::F64)
}

fn is_int(t: Ty) -> bool {
    !t.float() && t != Ty::Pred
}

/// Whether the interpreter implements `cvt` from `src` to `dst` with these modifiers.
pub fn check(dst: Ty, src: Ty, m: &Mods) -> bool {
    let r = m.round;
    match (
        is_fp(dst) || matches!(dst, Ty::F16x2 | Ty::Bf16x2),
        is_fp(src),
    ) {
        _ if matches!(dst, Ty::F16x2 | Ty::Bf16x2) => src == Ty::F32 && r == Round::Rn,
        (false, false) => is_int(dst) && is_int(src) && r == Round::None,
        (false, true) => is_int(dst) && r != Round::None,
        (true, false) => {
            is_int(src)
                && (r != Round::None)
                && (dst != Ty::F16 && dst != Ty::Bf16 || r == Round::Rn)
        }
        (true, true) => match (dst, src) {
            (Ty::F32, Ty::F32) | (Ty::F64, Ty::F64) => true,
            (Ty::F64, _) => r == Round::None,
            (Ty::F32, Ty::F64) => r != Round::None,
            (Ty::F32, _) => r == Round::None,
            (Ty::F16 | Ty::Bf16, Ty::F32 | Ty::F64) => r == Round::Rn,
            (Ty::F16, Ty::Bf16) | (Ty::Bf16, Ty::F16) => r == Round::Rn,
            _ => false,
        },
    }
}

/// Any float source value as f64 (exact).
pub fn to_f64(src: Ty, v: u64, ftz: bool) -> f64 {
    match src {
        Ty::F16 => f16::from_bits(v as u16).to_f64(),
        Ty::Bf16 => bf16::from_bits(v as u16).to_f64(),
        Ty::F32 => {
            let x = f32::from_bits(v as u32);
            (if ftz { float::ftz(x) } else { x }) as f64
        }
        _ => f64::from_bits(v),
    }
}

/// f32 → f16 bits, round to nearest even, NaN → canonical NaN.
pub fn f32_to_f16(x: f32) -> u16 {
    if x.is_nan() {
        NAN16
    } else {
        f16::from_f32(x).to_bits()
    }
}

/// f32 → bf16 bits, round to nearest even, NaN → canonical NaN.
pub fn f32_to_bf16(x: f32) -> u16 {
    if x.is_nan() {
        NANBF16
    } else {
        bf16::from_f32(x).to_bits()
    }
}

/// f64 → f16 (`bf = false`) or bf16 bits, round to nearest even: round to odd at f32 first
/// (f32 keeps ≥ 2 more bits than either), then to nearest even, which gives one correct rounding.
pub fn f64_to_half(f: f64, bf: bool) -> u16 {
    if f.is_nan() {
        return if bf { NANBF16 } else { NAN16 };
    }
    let mut c = float::round_f32(f, 0.0, Round::Rz);
    if (c as f64) != f && c.is_finite() {
        c = f32::from_bits(c.to_bits() | 1);
    }
    if bf {
        bf16::from_f32(c).to_bits()
    } else {
        f16::from_f32(c).to_bits()
    }
}

fn round_int(x: f64, r: Round) -> f64 {
    match r {
        Round::Rz => x.trunc(),
        Round::Rm => x.floor(),
        Round::Rp => x.ceil(),
        _ => x.round_ties_even(),
    }
}

/// Integer value (as i128) → f32 or f64 bits in rounding mode `r`.
fn int_to_float(x: i128, dst: Ty, r: Round) -> u64 {
    if matches!(dst, Ty::F16 | Ty::Bf16) {
        // |x| < 2^53 is exact in f64; anything larger overflows both types.
        return f64_to_half(x as f64, dst == Ty::Bf16) as u64;
    }
    if dst == Ty::F64 {
        let c = x as f64;
        let c = adjust(c, x, r, next_up64, |v| -next_up64(-v));
        return c.to_bits();
    }
    let c = x as f32;
    let c = adjust(
        c as f64,
        x,
        r,
        |v| float::next_up(v as f32) as f64,
        |v| float::next_down(v as f32) as f64,
    );
    (c as f32).to_bits() as u64
}

fn next_up64(x: f64) -> f64 {
    if x.is_nan() || x == f64::INFINITY {
        return x;
    }
    if x == 0.0 {
        return f64::from_bits(1);
    }
    let b = x.to_bits();
    f64::from_bits(if x > 0.0 { b + 1 } else { b - 1 })
}

fn adjust(c: f64, x: i128, r: Round, up: impl Fn(f64) -> f64, down: impl Fn(f64) -> f64) -> f64 {
    // `c` is an integer-valued float at most 2^64 in magnitude: exact in i128.
    let ci = c as i128;
    match r {
        Round::Rm if ci > x => down(c),
        Round::Rp if ci < x => up(c),
        Round::Rz if ci.abs() > x.abs() => {
            if x > 0 {
                down(c)
            } else {
                up(c)
            }
        }
        _ => c,
    }
}

fn sat_float(bits: u64, dst: Ty) -> u64 {
    match dst {
        Ty::F32 => {
            let x = f32::from_bits(bits as u32);
            let y = if x.is_nan() { 0.0 } else { x.clamp(0.0, 1.0) };
            y.to_bits() as u64
        }
        Ty::F64 => {
            let x = f64::from_bits(bits);
            let y = if x.is_nan() { 0.0 } else { x.clamp(0.0, 1.0) };
            y.to_bits()
        }
        _ => bits,
    }
}

/// Converts the bits `v` of type `src` to bits of type `dst`.
pub fn convert(dst: Ty, src: Ty, m: &Mods, v: u64) -> u64 {
    let r = m.round;
    if is_int(src) {
        let x: i128 = if src.signed() {
            sext(v, src.bits()) as i128
        } else {
            (v & mask(src.bits())) as i128
        };
        if is_int(dst) {
            if m.sat {
                let (lo, hi) = range(dst);
                return (x.clamp(lo, hi) as u64) & mask(dst.bits());
            }
            return (x as u64) & mask(dst.bits());
        }
        let b = int_to_float(x, dst, r);
        return if m.sat { sat_float(b, dst) } else { b };
    }
    let f = to_f64(src, v, m.ftz);
    if is_int(dst) {
        if f.is_nan() {
            return 0;
        }
        let (lo, hi) = range(dst);
        let y = round_int(f, r);
        let i = if y <= lo as f64 {
            lo
        } else if y >= hi as f64 {
            hi
        } else {
            y as i128
        };
        return (i as u64) & mask(dst.bits());
    }
    let out = match dst {
        Ty::F64 => {
            let y = if src == Ty::F64 && r != Round::None {
                round_int(f, r)
            } else {
                f
            };
            y.to_bits()
        }
        Ty::F32 => {
            let y = if src == Ty::F32 || src == Ty::F16 || src == Ty::Bf16 {
                let x = f as f32;
                if src == Ty::F32 && r != Round::None {
                    round_int(f, r) as f32
                } else {
                    x
                }
            } else {
                float::round_f32(f, 0.0, r)
            };
            let y = if m.ftz { float::ftz(y) } else { y };
            (if y.is_nan() { f32::from_bits(NAN32) } else { y }).to_bits() as u64
        }
        Ty::F16 => f64_to_half(f, false) as u64,
        Ty::Bf16 => f64_to_half(f, true) as u64,
        _ => 0,
    };
    if m.sat {
        sat_float(out, dst)
    } else {
        out
    }
}

fn range(t: Ty) -> (i128, i128) {
    let b = t.bits();
    if t.signed() {
        (-(1i128 << (b - 1)), (1i128 << (b - 1)) - 1)
    } else {
        (0, (1i128 << b) - 1)
    }
}
