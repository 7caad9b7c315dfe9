//! A branch-free f32 `exp` that the compiler can vectorise, for softmax (where `exp` of every
//! attention score dominates the non-GEMM time). Cephes' `expf` algorithm: round x/ln2 to n,
//! reduce with a two-part ln2, a degree-6 polynomial, scale by 2^n. Within 2 ulp of the correctly
//! rounded result over the normal range (tested below); it uses no FMA, so results are the same
//! on every x86-64 CPU.

const LOG2E: f32 = std::f32::consts::LOG2_E;
// 0.693359375 exactly (355/512), so n * LN2_HI is exact for |n| <= 2^15.
pub(crate) const LN2_HI: f32 = 0.693_359_4;
pub(crate) const LN2_LO: f32 = -2.121_944_4e-4;
/// Below this, exp underflows to subnormals; we return 0 (relative error irrelevant next to the
/// row maximum's exp(0) = 1 in softmax).
pub(crate) const MIN_X: f32 = -87.336_55;
pub(crate) const MAX_X: f32 = 88.376_26;
/// 1.5 * 2^23: adding and subtracting it rounds to the nearest integer without a libm call.
pub(crate) const ROUND_MAGIC: f32 = 12_582_912.0;

/// `2^n * exp(r)` for the reduced argument `r` (|r| <= ln2 / 2) and `t = x * log2(e) +
/// ROUND_MAGIC`, whose low mantissa bits hold `n`: Cephes' degree-6 polynomial, then the scale.
#[inline(always)]
pub(crate) fn exp_reduced(t: f32, r: f32) -> f32 {
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_2e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5; // Cephes: 5.0000001201e-1, which rounds to 0.5 in f32
    let y = p * r * r + r + 1.0;
    // 2^n via the exponent bits: t's low mantissa bits hold n (in [-126, 127] after the clamp)
    // as an offset from ROUND_MAGIC's bits. Integer ops, not `as i32`, so this vectorises.
    let n_bits = t.to_bits().wrapping_sub(ROUND_MAGIC.to_bits());
    y * f32::from_bits(n_bits.wrapping_add(127) << 23)
}

/// `exp(x)` to within 2 ulp; 0 below -87.34 and +inf above 88.38; NaN stays NaN (SiLU and
/// sigmoid; softmax uses [`exp_nonpositive_f32`]).
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    let xc = x.clamp(MIN_X, MAX_X);
    let t = xc * LOG2E + ROUND_MAGIC;
    let n = t - ROUND_MAGIC;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let v = exp_reduced(t, r);
    if x < MIN_X {
        0.0
    } else if x > MAX_X {
        f32::INFINITY
    } else if x.is_nan() {
        x
    } else {
        v
    }
}

/// [`exp_f32`] for softmax arguments `x - max <= 0` (or NaN): the same bits as `exp_f32` for
/// every `x <= 0`, -inf and NaN, in fewer instructions (no overflow handling; the clamp keeps
/// NaN, so one compare finishes the job). Positive `x` are not supported.
#[inline(always)]
pub(crate) fn exp_nonpositive_f32(x: f32) -> f32 {
    // Written as `MIN_X > x` so that a NaN x falls through (and stays NaN), as `maxps` does.
    #[allow(clippy::manual_clamp)]
    let xc = if MIN_X > x { MIN_X } else { x };
    let t = xc * LOG2E + ROUND_MAGIC;
    let n = t - ROUND_MAGIC;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let v = exp_reduced(t, r);
    if x < MIN_X {
        0.0
    } else {
        v
    }
}

/// `a * b + c`, fused (one rounding) when `FMA`: callers inside `multiversion` functions pass
/// whether the selected target has FMA, where `mul_add` is one instruction.
#[inline(always)]
pub(crate) fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// [`exp_nonpositive_f32`] (same algorithm and special cases, same accuracy) with its
/// multiply-adds fused when `FMA`, for the attention's softmax inside AVX2+FMA code; the bits may
/// differ from [`exp_nonpositive_f32`] in the last place.
#[inline(always)]
pub(crate) fn exp_nonpositive_fused<const FMA: bool>(x: f32) -> f32 {
    #[allow(clippy::manual_clamp)]
    let xc = if MIN_X > x { MIN_X } else { x };
    let t = madd::<FMA>(xc, LOG2E, ROUND_MAGIC);
    let n = t - ROUND_MAGIC;
    let r = madd::<FMA>(-n, LN2_HI, xc);
    let r = madd::<FMA>(-n, LN2_LO, r);
    let mut p = 1.987_569_1e-4f32;
    p = madd::<FMA>(p, r, 1.398_2e-3);
    p = madd::<FMA>(p, r, 8.333_452e-3);
    p = madd::<FMA>(p, r, 4.166_579_6e-2);
    p = madd::<FMA>(p, r, 1.666_666_5e-1);
    p = madd::<FMA>(p, r, 0.5);
    let y = madd::<FMA>(p * r, r, r) + 1.0;
    let n_bits = t.to_bits().wrapping_sub(ROUND_MAGIC.to_bits());
    let v = y * f32::from_bits(n_bits.wrapping_add(127) << 23);
    if x < MIN_X {
        0.0
    } else {
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn within_two_ulp_of_correctly_rounded() {
        let mut worst = 0;
        let steps = 400_000;
        for i in 0..=steps {
            let x = MIN_X + (MAX_X - MIN_X) * i as f32 / steps as f32;
            let want = (x as f64).exp() as f32;
            if want < f32::MIN_POSITIVE {
                continue;
            }
            worst = worst.max(ulps(exp_f32(x), want));
        }
        assert!(worst <= 2, "worst error {worst} ulp");
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(-1000.0), 0.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(1000.0), f32::INFINITY);
        assert!(exp_f32(f32::NAN).is_nan());
    }

    #[test]
    fn nonpositive_variant_has_the_same_bits() {
        let steps = 200_000;
        for i in 0..=steps {
            let x = (MIN_X - 5.0) * i as f32 / steps as f32;
            assert_eq!(
                exp_nonpositive_f32(x).to_bits(),
                exp_f32(x).to_bits(),
                "x = {x}"
            );
        }
        for x in [0.0, -0.0, -1e-30, MIN_X, -1000.0, f32::NEG_INFINITY] {
            assert_eq!(
                exp_nonpositive_f32(x).to_bits(),
                exp_f32(x).to_bits(),
                "x = {x}"
            );
        }
        assert_eq!(exp_nonpositive_f32(f32::NEG_INFINITY), 0.0);
        assert!(exp_nonpositive_f32(f32::NAN).is_nan());
    }

    #[test]
    fn fused_variant_within_two_ulp() {
        fn check<const FMA: bool>() {
            let mut worst = 0;
            let steps = 200_000;
            for i in 0..=steps {
                let x = MIN_X * i as f32 / steps as f32;
                let want = (x as f64).exp() as f32;
                if want < f32::MIN_POSITIVE {
                    continue;
                }
                worst = worst.max(ulps(exp_nonpositive_fused::<FMA>(x), want));
            }
            assert!(worst <= 2, "FMA {FMA}: worst error {worst} ulp");
            assert_eq!(exp_nonpositive_fused::<FMA>(0.0), 1.0);
            assert_eq!(exp_nonpositive_fused::<FMA>(-1000.0), 0.0);
            assert_eq!(exp_nonpositive_fused::<FMA>(f32::NEG_INFINITY), 0.0);
            assert!(exp_nonpositive_fused::<FMA>(f32::NAN).is_nan());
        }
        check::<true>();
        check::<false>();
        // Without FMA it is exp_nonpositive_f32 itself.
        for x in [-0.3f32, -1.7, -20.25, -80.0] {
            assert_eq!(
                exp_nonpositive_fused::<false>(x).to_bits(),
                exp_nonpositive_f32(x).to_bits()
            );
        }
    }
}
