//! The read-modify-write functions of `atom` / `red` (ISA 8.x, "Parallel Synchronization and
//! Communication Instructions: atom").

use super::super::ir::{AtomOp, Op, Round, Ty};
use super::{float, int};

/// The new value an atomic stores, from the `old` memory value and the operands `b` (and `c`
/// for `cas`), all as raw bits of `ty`.
///
/// - `add`: integers wrap; `.f32` rounds to nearest even and flushes subnormal inputs and
///   results to a signed zero (as the ISA specifies for `atom.add.f32`); `.f64` rounds to
///   nearest even; `.noftz.f16x2` / `.noftz.bf16x2` add lane by lane, to nearest even.
/// - `inc`: `(old >= b) ? 0 : old + 1`; `dec`: `(old == 0 || old > b) ? b : old - 1` (unsigned).
/// - `cas`: `(old == b) ? c : old`; `exch`: `b`; `min`/`max` signed or unsigned by type.
pub fn apply(op: AtomOp, ty: Ty, old: u64, b: u64, c: u64) -> u64 {
    let bits = ty.bits();
    let m = int::mask(bits);
    match op {
        AtomOp::Add => match ty {
            Ty::F32 => float::add32(
                f32::from_bits(old as u32),
                f32::from_bits(b as u32),
                Round::Rn,
                true,
                false,
            )
            .to_bits() as u64,
            Ty::F64 => (f64::from_bits(old) + f64::from_bits(b)).to_bits(),
            Ty::F16x2 | Ty::Bf16x2 => {
                let mut out = 0u64;
                for l in 0..2 {
                    let x = [(old >> (16 * l)) as u16, (b >> (16 * l)) as u16];
                    let r = if ty == Ty::F16x2 {
                        float::half_arith(Op::Add, &x, false, false)
                    } else {
                        bf16_add(x[0], x[1])
                    };
                    out |= u64::from(r) << (16 * l);
                }
                out
            }
            _ => old.wrapping_add(b) & m,
        },
        AtomOp::Exch => b & m,
        AtomOp::Cas => {
            if old & m == b & m {
                c & m
            } else {
                old & m
            }
        }
        AtomOp::Min | AtomOp::Max => {
            int::minmax(old & m, b & m, bits, ty.signed(), op == AtomOp::Max)
        }
        AtomOp::Inc => {
            if old & m >= b & m {
                0
            } else {
                (old + 1) & m
            }
        }
        AtomOp::Dec => {
            if old & m == 0 || old & m > b & m {
                b & m
            } else {
                (old - 1) & m
            }
        }
        AtomOp::And => old & b & m,
        AtomOp::Or => (old | b) & m,
        AtomOp::Xor => (old ^ b) & m,
    }
}

/// `bf16 + bf16` rounded to nearest even: the exact sum (TwoSum in f64) goes to f32 with
/// round-to-odd (24 bits ≥ 8 + 2, so no double rounding), then to bf16 to nearest even. NaN
/// gives the canonical `0x7fff`.
pub fn bf16_add(a: u16, b: u16) -> u16 {
    let (x, y) = (
        half::bf16::from_bits(a).to_f64(),
        half::bf16::from_bits(b).to_f64(),
    );
    let (s, e) = float::two_sum(x, y);
    if s.is_nan() {
        return 0x7fff;
    }
    if s == 0.0 && e == 0.0 {
        // Exact zero: −0 only for two −0s (round to nearest).
        return if a == 0x8000 && b == 0x8000 {
            0x8000
        } else {
            0
        };
    }
    let mut c = float::round_f32(s, e, Round::Rz);
    if c.is_finite() && ((c as f64) != s || e != 0.0) {
        c = f32::from_bits(c.to_bits() | 1);
    }
    half::bf16::from_f32(c).to_bits()
}
