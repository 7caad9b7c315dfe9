//! Integer semantics on bit patterns of a given width: wrapping arithmetic, `.hi/.wide`
//! multiplies, division by zero, clamped shifts, carry chains.

/// Mask of the low `bits` bits.
pub fn mask(bits: u32) -> u64 {
    if bits >= 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    }
}

/// Sign-extends the low `bits` bits of `v`.
pub fn sext(v: u64, bits: u32) -> i64 {
    if bits >= 64 {
        v as i64
    } else {
        let sh = 64 - bits;
        ((v << sh) as i64) >> sh
    }
}

/// Integer division. Division by zero gives all ones for the quotient (what NVIDIA GPUs
/// return for unsigned division; the interpreter uses it for signed too), and
/// `MIN / -1` wraps to `MIN`.
pub fn div(a: u64, b: u64, bits: u32, signed: bool) -> u64 {
    let m = mask(bits);
    if b & m == 0 {
        return m;
    }
    if signed {
        let (x, y) = (sext(a, bits), sext(b, bits));
        (x.wrapping_div(y) as u64) & m
    } else {
        ((a & m) / (b & m)) & m
    }
}

/// Integer remainder: by zero gives the dividend; `MIN % -1` is 0; the sign follows the dividend.
pub fn rem(a: u64, b: u64, bits: u32, signed: bool) -> u64 {
    let m = mask(bits);
    if b & m == 0 {
        return a & m;
    }
    if signed {
        let (x, y) = (sext(a, bits), sext(b, bits));
        (x.wrapping_rem(y) as u64) & m
    } else {
        ((a & m) % (b & m)) & m
    }
}

/// The full product of two `bits`-wide integers, as a 128-bit value.
pub fn full_mul(a: u64, b: u64, bits: u32, signed: bool) -> u128 {
    if signed {
        (sext(a, bits) as i128).wrapping_mul(sext(b, bits) as i128) as u128
    } else {
        ((a & mask(bits)) as u128) * ((b & mask(bits)) as u128)
    }
}

/// `shl`: shift amounts ≥ the width clamp to the width (result 0).
pub fn shl(a: u64, n: u64, bits: u32) -> u64 {
    let n = (n & 0xffff_ffff).min(bits as u64) as u32;
    if n >= 64 {
        0
    } else {
        (a << n) & mask(bits)
    }
}

/// `shr`: arithmetic for signed types (sign fill when clamped), logical otherwise.
pub fn shr(a: u64, n: u64, bits: u32, signed: bool) -> u64 {
    let n = (n & 0xffff_ffff).min(bits as u64) as u32;
    if signed {
        let v = sext(a, bits);
        ((v >> n.min(63)) as u64) & mask(bits)
    } else if n >= 64 {
        0
    } else {
        ((a & mask(bits)) >> n) & mask(bits)
    }
}

/// `min`/`max` for signed or unsigned integers.
pub fn minmax(a: u64, b: u64, bits: u32, signed: bool, max: bool) -> u64 {
    let lt = if signed {
        sext(a, bits) < sext(b, bits)
    } else {
        a & mask(bits) < b & mask(bits)
    };
    let r = if lt != max { a } else { b };
    r & mask(bits)
}

/// `bfi`: inserts the low `len` bits of `a` into `b` at `pos` (both taken mod 256 and clamped).
pub fn bfi(a: u64, b: u64, pos: u64, len: u64, bits: u32) -> u64 {
    let pos = (pos & 0xff) as u32;
    let len = (len & 0xff) as u32;
    let mut d = b & mask(bits);
    let mut i = 0;
    while i < len && pos + i < bits {
        let bit = (a >> i) & 1;
        d = (d & !(1 << (pos + i))) | (bit << (pos + i));
        i += 1;
    }
    d
}

/// `bfe`: extracts `len` bits at `pos`, sign-extending for signed types.
pub fn bfe(a: u64, pos: u64, len: u64, bits: u32, signed: bool) -> u64 {
    let pos = (pos & 0xff) as u32;
    let len = (len & 0xff) as u32;
    let msb = if pos + len == 0 || pos + len > bits {
        bits - 1
    } else {
        pos + len - 1
    };
    let sbit = if signed && len != 0 {
        (a >> msb.min(bits - 1)) & 1
    } else {
        0
    };
    let mut d = 0u64;
    for i in 0..bits {
        let bit = if i < len && pos + i < bits {
            (a >> (pos + i)) & 1
        } else {
            sbit
        };
        d |= bit << i;
    }
    d
}

/// `a + b + carry_in` at `bits` width, with the carry out.
pub fn add_carry(a: u64, b: u64, cin: bool, bits: u32) -> (u64, bool) {
    let m = mask(bits);
    let s = (a & m) as u128 + (b & m) as u128 + cin as u128;
    ((s as u64) & m, s > m as u128)
}

/// `a - (b + borrow_in)` at `bits` width, with the borrow out (the ISA's CC.CF for `sub.cc`/`subc`).
pub fn sub_borrow(a: u64, b: u64, bin: bool, bits: u32) -> (u64, bool) {
    let m = mask(bits);
    let rhs = (b & m) as u128 + bin as u128;
    let lhs = (a & m) as u128;
    (((lhs.wrapping_sub(rhs)) as u64) & m, rhs > lhs)
}
