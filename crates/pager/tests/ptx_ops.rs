//! Instruction semantics, one family at a time, against values derived by hand from the PTX ISA
//! and IEEE 754 (bit patterns written out here, never produced by the interpreter).

use ferry_pager::device::sim::ptx::{
    launch, ErrorKind, LaunchConfig, Limits, Module, ParamValue, PtxError, VecMemory,
};

/// Runs `body` in a one-thread kernel whose `%rd9` points at 64 output bytes; returns them as
/// u32 words.
fn run(body: &str) -> Vec<u32> {
    let src = format!(
        ".version 8.4\n.target sm_80\n.address_size 64\n\
         .visible .entry k(.param .u64 k_out)\n{{\n\
         .reg .pred %p<8>;\n.reg .b16 %rs<8>;\n.reg .b32 %r<16>;\n.reg .f32 %f<16>;\n\
         .reg .b64 %rd<16>;\n.reg .f64 %fd<8>;\n\
         ld.param.u64 %rd9, [k_out];\n{body}\nret;\n}}\n"
    );
    let m = Module::parse(&src).unwrap_or_else(|e| panic!("{e}\n{src}"));
    assert!(m.unsupported().is_empty(), "{:?}", m.unsupported());
    let mut mem = VecMemory::new();
    let out = mem.alloc(64);
    let cfg = LaunchConfig {
        grid: [1, 1, 1],
        block: [1, 1, 1],
        dynamic_shared: 0,
    };
    launch(
        &m,
        "k",
        cfg,
        &[ParamValue::Ptr(out)],
        &mut mem,
        Limits::default(),
    )
    .unwrap();
    mem.bytes(out)
        .unwrap()
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// `op` applied to f32 bit patterns `a`, `b`, `c` (as many as the op takes), result word 0.
fn f32op(op: &str, args: &[u32]) -> u32 {
    let mut body = String::new();
    let mut names = Vec::new();
    for (i, a) in args.iter().enumerate() {
        body += &format!("mov.b32 %f{}, {a};\n", i + 1);
        names.push(format!("%f{}", i + 1));
    }
    body += &format!(
        "{op} %f0, {};\nst.global.b32 [%rd9], %f0;\n",
        names.join(", ")
    );
    run(&body)[0]
}

fn i32op(op: &str, args: &[u32]) -> u32 {
    let mut body = String::new();
    let mut names = Vec::new();
    for (i, a) in args.iter().enumerate() {
        body += &format!("mov.b32 %r{}, {a};\n", i + 1);
        names.push(format!("%r{}", i + 1));
    }
    body += &format!(
        "{op} %r0, {};\nst.global.b32 [%rd9], %r0;\n",
        names.join(", ")
    );
    run(&body)[0]
}

const ONE: u32 = 0x3F80_0000;
const NAN: u32 = 0x7FC0_0000;

#[test]
fn directed_rounding_of_fma_and_add() {
    // (1 + 2^-23)(1 - 2^-23) = 1 - 2^-46: nearest is 1, below is 1 - 2^-24.
    let (a, b) = (0x3F80_0001, 0x3F7F_FFFE);
    assert_eq!(f32op("fma.rn.f32", &[a, b, 0]), ONE);
    assert_eq!(f32op("fma.rm.f32", &[a, b, 0]), 0x3F7F_FFFF);
    assert_eq!(f32op("fma.rz.f32", &[a, b, 0]), 0x3F7F_FFFF);
    assert_eq!(f32op("fma.rp.f32", &[a, b, 0]), ONE);
    // 1 + 2^-24 is a tie: even (1) for .rn, up for .rp; 1+2^-23 + 2^-24 ties to 1+2^-22.
    assert_eq!(f32op("add.rn.f32", &[ONE, 0x3380_0000]), ONE);
    assert_eq!(f32op("add.rp.f32", &[ONE, 0x3380_0000]), 0x3F80_0001);
    assert_eq!(f32op("add.f32", &[0x3F80_0001, 0x3380_0000]), 0x3F80_0002);
    // A tie only visible below f64 precision: 1 + 2^-24 + 2^-80 rounds up.
    assert_eq!(
        f32op("fma.rn.f32", &[0x3380_0000, 0x1B80_0000, 0x3F80_0000]),
        ONE
    );
    // Exact cancellation: +0, but -0 when rounding down.
    assert_eq!(f32op("add.rn.f32", &[ONE, 0xBF80_0000]), 0);
    assert_eq!(f32op("add.rm.f32", &[ONE, 0xBF80_0000]), 0x8000_0000);
    // Overflow: .rz stays at the largest finite value, .rn goes to infinity.
    assert_eq!(
        f32op("mul.rz.f32", &[0x7F7F_FFFF, 0x4000_0000]),
        0x7F7F_FFFF
    );
    assert_eq!(
        f32op("mul.rn.f32", &[0x7F7F_FFFF, 0x4000_0000]),
        0x7F80_0000
    );
    assert_eq!(f32op("div.rn.f32", &[ONE, 0x4040_0000]), 0x3EAA_AAAB);
}

#[test]
fn denormals_ftz_sat_nan() {
    // 2^-126 * 0.5 = 2^-127, a subnormal; flushed with .ftz.
    assert_eq!(f32op("mul.f32", &[0x0080_0000, 0x3F00_0000]), 0x0040_0000);
    assert_eq!(f32op("mul.ftz.f32", &[0x0080_0000, 0x3F00_0000]), 0);
    assert_eq!(f32op("add.f32", &[1, 0]), 1);
    assert_eq!(f32op("add.ftz.f32", &[1, 0]), 0);
    assert_eq!(
        f32op("add.ftz.f32", &[0x8000_0001, 0x8000_0000]),
        0x8000_0000
    );
    assert_eq!(f32op("add.sat.f32", &[ONE, ONE]), ONE);
    assert_eq!(f32op("add.sat.f32", &[NAN, ONE]), 0);
    assert_eq!(f32op("add.f32", &[NAN, ONE]), 0x7FFF_FFFF);
    assert_eq!(f32op("add.f32", &[0x7F80_0000, 0xFF80_0000]), 0x7FFF_FFFF);
    assert_eq!(f32op("min.f32", &[NAN, ONE]), ONE);
    assert_eq!(f32op("max.f32", &[ONE, NAN]), ONE);
    assert_eq!(f32op("max.f32", &[NAN, NAN]), 0x7FFF_FFFF);
    assert_eq!(f32op("max.f32", &[0x8000_0000, 0]), 0);
    assert_eq!(f32op("min.f32", &[0, 0x8000_0000]), 0x8000_0000);
    assert_eq!(f32op("neg.f32", &[ONE]), 0xBF80_0000);
    assert_eq!(f32op("abs.f32", &[0xBF80_0000]), ONE);
    assert_eq!(f32op("abs.ftz.f32", &[0x8000_0001]), 0);
    assert_eq!(f32op("ex2.approx.ftz.f32", &[ONE]), 0x4000_0000);
    assert_eq!(f32op("ex2.approx.ftz.f32", &[0xFF80_0000]), 0);
    assert_eq!(f32op("rcp.rn.f32", &[0x4000_0000]), 0x3F00_0000);
    assert_eq!(f32op("rcp.approx.ftz.f32", &[0]), 0x7F80_0000);
    assert_eq!(f32op("rsqrt.approx.f32", &[0x4080_0000]), 0x3F00_0000);
    assert_eq!(f32op("lg2.approx.f32", &[0x4100_0000]), 0x4040_0000);
    assert_eq!(f32op("sqrt.rn.f32", &[0x4110_0000]), 0x4040_0000);
}

#[test]
fn setp_ordered_and_unordered() {
    let setp = |cmp: &str, a: u32, b: u32| {
        let body = format!(
            "mov.b32 %f1, {a};\nmov.b32 %f2, {b};\nsetp.{cmp}.f32 %p1, %f1, %f2;\n\
             selp.u32 %r1, 1, 0, %p1;\nst.global.u32 [%rd9], %r1;\n"
        );
        run(&body)[0]
    };
    assert_eq!(setp("lt", NAN, ONE), 0);
    assert_eq!(setp("ltu", NAN, ONE), 1);
    assert_eq!(setp("ne", NAN, ONE), 0);
    assert_eq!(setp("neu", NAN, ONE), 1);
    assert_eq!(setp("geu", ONE, 0x4000_0000), 0);
    assert_eq!(setp("ge", 0x8000_0000, 0), 1);
    assert_eq!(setp("num", ONE, ONE), 1);
    assert_eq!(setp("nan", ONE, NAN), 1);
    assert_eq!(setp("equ", NAN, NAN), 1);
    // Combining form and the complementary destination.
    let r = run(
        "mov.u32 %r1, 5;\nsetp.eq.u32 %p2, %r1, 5;\nsetp.lt.u32.and %p1|%p3, %r1, 3, %p2;\n\
         setp.lt.s32.or %p4, %r1, 3, !%p2;\n\
         selp.u32 %r2, 1, 0, %p1;\nselp.u32 %r3, 1, 0, %p3;\nselp.u32 %r4, 1, 0, %p4;\n\
         st.global.u32 [%rd9], %r2;\nst.global.u32 [%rd9+4], %r3;\nst.global.u32 [%rd9+8], %r4;\n",
    );
    assert_eq!(&r[..3], &[0, 1, 0]);
    // Signed vs unsigned integer comparisons of 0xFFFFFFFF and 1.
    let r = run("mov.u32 %r1, -1;\nsetp.lt.s32 %p1, %r1, 1;\nsetp.lt.u32 %p2, %r1, 1;\nsetp.hi.u32 %p3, %r1, 1;\n\
         selp.u32 %r2, 1, 0, %p1;\nselp.u32 %r3, 1, 0, %p2;\nselp.u32 %r4, 1, 0, %p3;\n\
         st.global.u32 [%rd9], %r2;\nst.global.u32 [%rd9+4], %r3;\nst.global.u32 [%rd9+8], %r4;\n");
    assert_eq!(&r[..3], &[1, 0, 1]);
}

#[test]
fn integer_overflow_division_shifts() {
    assert_eq!(i32op("add.s32", &[0x7FFF_FFFF, 1]), 0x8000_0000);
    assert_eq!(i32op("add.sat.s32", &[0x7FFF_FFFF, 1]), 0x7FFF_FFFF);
    assert_eq!(i32op("sub.sat.s32", &[0x8000_0000, 1]), 0x8000_0000);
    assert_eq!(i32op("mul.lo.s32", &[0x1_0001, 0x1_0001]), 0x0002_0001);
    assert_eq!(
        i32op("mul.hi.u32", &[0xFFFF_FFFF, 0xFFFF_FFFF]),
        0xFFFF_FFFE
    );
    assert_eq!(i32op("mul.hi.s32", &[0xFFFF_FFFF, 0xFFFF_FFFF]), 0);
    assert_eq!(i32op("div.u32", &[7, 0]), 0xFFFF_FFFF);
    assert_eq!(i32op("rem.u32", &[7, 0]), 7);
    assert_eq!(i32op("div.s32", &[0x8000_0000, 0xFFFF_FFFF]), 0x8000_0000);
    assert_eq!(i32op("rem.s32", &[0x8000_0000, 0xFFFF_FFFF]), 0);
    assert_eq!(i32op("div.s32", &[(-7i32) as u32, 2]), (-3i32) as u32);
    assert_eq!(i32op("rem.s32", &[(-7i32) as u32, 2]), (-1i32) as u32);
    assert_eq!(i32op("shl.b32", &[1, 31]), 0x8000_0000);
    assert_eq!(i32op("shl.b32", &[1, 32]), 0);
    assert_eq!(i32op("shl.b32", &[1, 0xFFFF_FFFF]), 0);
    assert_eq!(i32op("shr.u32", &[0x8000_0000, 40]), 0);
    assert_eq!(i32op("shr.s32", &[0x8000_0000, 40]), 0xFFFF_FFFF);
    assert_eq!(i32op("shr.s32", &[0x8000_0000, 4]), 0xF800_0000);
    assert_eq!(i32op("min.s32", &[0xFFFF_FFFF, 1]), 0xFFFF_FFFF);
    assert_eq!(i32op("min.u32", &[0xFFFF_FFFF, 1]), 1);
    assert_eq!(i32op("abs.s32", &[0x8000_0000]), 0x8000_0000);
    assert_eq!(i32op("neg.s32", &[1]), 0xFFFF_FFFF);
    assert_eq!(i32op("not.b32", &[0x0F0F_0F0F]), 0xF0F0_F0F0);
    assert_eq!(i32op("bfi.b32", &[0b101, 0xFFFF_0000, 4, 3]), 0xFFFF_0050);
    assert_eq!(i32op("mad.lo.s32", &[3, 4, 5]), 17);
    // 64-bit results.
    let r = run("mov.u32 %r1, -2;\nmov.u32 %r2, 3;\nmul.wide.s32 %rd1, %r1, %r2;\nmul.wide.u32 %rd2, %r1, %r2;\n\
         st.global.u64 [%rd9], %rd1;\nst.global.u64 [%rd9+8], %rd2;\n\
         mov.u64 %rd3, -9223372036854775808;\nst.global.u64 [%rd9+16], %rd3;\n\
         clz.b64 %r3, %rd2;\nst.global.u32 [%rd9+24], %r3;\n");
    assert_eq!((r[0], r[1]), (0xFFFF_FFFA, 0xFFFF_FFFF));
    assert_eq!((r[2], r[3]), (0xFFFF_FFFA, 2));
    assert_eq!((r[4], r[5]), (0, 0x8000_0000));
    assert_eq!(r[6], 30);
}

#[test]
fn carry_chains() {
    // 128-bit add of (2^64 - 1) + 1 with 32-bit limbs; and a borrow chain.
    let r = run("mov.u32 %r1, -1;\nmov.u32 %r2, 1;\nmov.u32 %r3, 0;\n\
         add.cc.u32 %r4, %r1, %r2;\naddc.cc.u32 %r5, %r1, %r3;\naddc.u32 %r6, %r3, %r3;\n\
         sub.cc.u32 %r7, %r3, %r2;\nsubc.cc.u32 %r8, %r2, %r3;\nsubc.u32 %r10, %r2, %r3;\n\
         mad.lo.cc.u32 %r11, %r1, %r1, %r1;\nmadc.hi.u32 %r12, %r1, %r1, %r3;\n\
         st.global.u32 [%rd9], %r4;\nst.global.u32 [%rd9+4], %r5;\nst.global.u32 [%rd9+8], %r6;\n\
         st.global.u32 [%rd9+12], %r7;\nst.global.u32 [%rd9+16], %r8;\nst.global.u32 [%rd9+20], %r10;\n\
         st.global.u32 [%rd9+24], %r11;\nst.global.u32 [%rd9+28], %r12;\n");
    assert_eq!(&r[..3], &[0, 0, 1]);
    // 0 - 1 borrows; 1 - 0 - borrow = 0 with no borrow; 1 - 0 - 0 = 1.
    assert_eq!(&r[3..6], &[0xFFFF_FFFF, 0, 1]);
    // (2^32-1)^2 + (2^32-1) = 2^64 - 2^32: low word 0 with a carry, high word 0xFFFFFFFF.
    assert_eq!(&r[6..8], &[0, 0xFFFF_FFFF]);
}

#[test]
fn conversions() {
    let cvt = |op: &str, a: &str| {
        run(&format!(
            "mov.b32 %f1, {a};\n{op} %r1, %f1;\nst.global.u32 [%rd9], %r1;\n"
        ))[0]
    };
    assert_eq!(cvt("cvt.rzi.s32.f32", "0f7FC00000"), 0);
    assert_eq!(cvt("cvt.rzi.s32.f32", "0f4F32D05E"), 0x7FFF_FFFF); // 3e9
    assert_eq!(cvt("cvt.rzi.s32.f32", "0fCF32D05E"), 0x8000_0000); // -3e9
    assert_eq!(cvt("cvt.rzi.u32.f32", "0fBF800000"), 0); // -1 saturates to 0
    assert_eq!(cvt("cvt.rni.s32.f32", "0f40200000"), 2); // 2.5 ties to even
    assert_eq!(cvt("cvt.rni.s32.f32", "0f40600000"), 4); // 3.5
    assert_eq!(cvt("cvt.rmi.s32.f32", "0fBFC00000"), (-2i32) as u32); // -1.5
    assert_eq!(cvt("cvt.rpi.s32.f32", "0fBFC00000"), (-1i32) as u32);
    let f2f = |op: &str, a: u32| f32op(op, &[a]);
    assert_eq!(f2f("cvt.rmi.f32.f32", 0xBFC0_0000), 0xC000_0000);
    assert_eq!(f2f("cvt.rni.f32.f32", 0x4020_0000), 0x4000_0000);
    assert_eq!(f2f("cvt.sat.f32.f32", NAN), 0);
    assert_eq!(f2f("cvt.sat.f32.f32", 0x4000_0000), ONE);
    assert_eq!(f2f("cvt.sat.f32.f32", 0xBF80_0000), 0);
    let half = |op: &str, a: u32| {
        run(&format!(
            "mov.b32 %f1, {a};\n{op} %rs1, %f1;\ncvt.u32.u16 %r1, %rs1;\nst.global.u32 [%rd9], %r1;\n"
        ))[0]
    };
    // 1 + 2^-11 ties to 1; 1 + 3*2^-11 ties to 1 + 2^-9 (even); just above a tie rounds up.
    assert_eq!(half("cvt.rn.f16.f32", 0x3F80_1000), 0x3C00);
    assert_eq!(half("cvt.rn.f16.f32", 0x3F80_3000), 0x3C02);
    assert_eq!(half("cvt.rn.f16.f32", 0x3F80_1001), 0x3C01);
    assert_eq!(half("cvt.rn.f16.f32", 0x477F_F000), 0x7C00); // 65520 overflows
    assert_eq!(half("cvt.rn.f16.f32", 0x3380_0000), 0x0001); // 2^-24: smallest subnormal
    assert_eq!(half("cvt.rn.f16.f32", 0x3300_0000), 0x0000); // 2^-25 ties to 0
    assert_eq!(half("cvt.rn.f16.f32", NAN), 0x7FFF);
    assert_eq!(half("cvt.rn.bf16.f32", 0x3F80_8000), 0x3F80);
    assert_eq!(half("cvt.rn.bf16.f32", 0x3F81_8000), 0x3F82);
    assert_eq!(half("cvt.rn.bf16.f32", 0x3F80_8001), 0x3F81);
    assert_eq!(half("cvt.rn.bf16.f32", 0xFFC0_0000), 0x7FFF);
    let r = run("mov.f32 %f1, 0f3F800000;\nmov.f32 %f2, 0f40000000;\n\
         cvt.rn.f16x2.f32 %r1, %f1, %f2;\ncvt.rn.bf16x2.f32 %r2, %f1, %f2;\n\
         mov.b16 %rs1, 0x3C00;\ncvt.f32.f16 %f3, %rs1;\n\
         st.global.u32 [%rd9], %r1;\nst.global.u32 [%rd9+4], %r2;\nst.global.f32 [%rd9+8], %f3;\n");
    assert_eq!(&r[..3], &[0x3C00_4000, 0x3F80_4000, ONE]);
    // Integer widening and narrowing.
    let r = run("mov.u32 %r1, -5;\ncvt.s64.s32 %rd1, %r1;\ncvt.u64.u32 %rd2, %r1;\n\
         mov.u64 %rd3, 0x123456789;\ncvt.u32.u64 %r2, %rd3;\ncvt.sat.u8.s32 %r3, %r1;\n\
         mov.u32 %r4, 300;\ncvt.sat.s8.u32 %r5, %r4;\n\
         st.global.u64 [%rd9], %rd1;\nst.global.u64 [%rd9+8], %rd2;\nst.global.u32 [%rd9+16], %r2;\n\
         st.global.u32 [%rd9+20], %r3;\nst.global.u32 [%rd9+24], %r5;\n");
    assert_eq!(
        &r[..7],
        &[
            0xFFFF_FFFB,
            0xFFFF_FFFF,
            0xFFFF_FFFB,
            0,
            0x2345_6789,
            0,
            127
        ]
    );
    // Integer to float: 2^24 + 1 is a tie at f32, rounding per mode.
    let r = run(
        "mov.u32 %r1, 16777217;\ncvt.rn.f32.u32 %f1, %r1;\ncvt.rp.f32.u32 %f2, %r1;\n\
         cvt.rz.f32.s32 %f3, %r1;\nmov.f64 %fd1, 0d3FF0000000000001;\ncvt.rp.f32.f64 %f4, %fd1;\n\
         cvt.rn.f32.f64 %f5, %fd1;\n\
         st.global.f32 [%rd9], %f1;\nst.global.f32 [%rd9+4], %f2;\nst.global.f32 [%rd9+8], %f3;\n\
         st.global.f32 [%rd9+12], %f4;\nst.global.f32 [%rd9+16], %f5;\n",
    );
    assert_eq!(
        &r[..5],
        &[0x4B80_0000, 0x4B80_0001, 0x4B80_0000, 0x3F80_0001, ONE]
    );
}

#[test]
fn vectors_and_moves() {
    let r = run(
        "mov.u32 %r1, 0x11112222;\nmov.u32 %r2, 0x33334444;\nmov.b64 %rd1, {%r1, %r2};\n\
         mov.b64 {%r3, %r4}, %rd1;\nmov.b16 %rs1, 0xABCD;\nmov.b32 %r5, {0, %rs1};\n\
         mov.b32 {%rs2, %rs3}, %r2;\ncvt.u32.u16 %r6, %rs2;\n\
         st.global.u64 [%rd9], %rd1;\nst.global.v2.u32 [%rd9+8], {%r3, %r4};\n\
         st.global.v4.b32 [%rd9+16], {%r5, %r6, 7, 0f3F800000};\n\
         ld.global.v2.u32 {%r7, %r8}, [%rd9+16];\nst.global.u32 [%rd9+32], %r8;\n",
    );
    assert_eq!(&r[..2], &[0x1111_2222, 0x3333_4444]);
    assert_eq!(&r[2..4], &[0x1111_2222, 0x3333_4444]);
    assert_eq!(&r[4..8], &[0xABCD_0000, 0x4444, 7, ONE]);
    assert_eq!(r[8], 0x4444);
}

#[test]
fn globaltimer_advances() {
    let r = run(
        "mov.u64 %rd1, %globaltimer;\nadd.u32 %r1, %r1, 1;\nmov.u64 %rd2, %globaltimer;\n\
         sub.s64 %rd3, %rd2, %rd1;\nst.global.u64 [%rd9], %rd3;\n",
    );
    assert!(r[0] > 0 || r[1] > 0);
}

/// `op` applied to f16 bit patterns in `.b16` registers; the result's bits.
fn h16op(op: &str, args: &[u16]) -> u16 {
    let mut body = String::new();
    let mut names = Vec::new();
    for (i, a) in args.iter().enumerate() {
        body += &format!("mov.b16 %rs{}, {a};\n", i + 1);
        names.push(format!("%rs{}", i + 1));
    }
    body += &format!(
        "{op} %rs0, {};\nst.global.b16 [%rd9], %rs0;\n",
        names.join(", ")
    );
    run(&body)[0] as u16
}

#[test]
fn f16_arithmetic_rounds_once_to_nearest_even() {
    // f16: 1 sign, 5 exponent (bias 15), 10 fraction bits. 0x3C00 = 1, 0x3C01 = 1 + 2^-10,
    // 0x3C02 = 1 + 2^-9, 0x1000 = 2^-11, 0x4000 = 2, 0x4001 = 2 + 2^-9, 0x7BFF = 65504.
    // 1 + 2^-11 is the midpoint of 1 and 1 + 2^-10: ties to the even 1.
    assert_eq!(h16op("add.rn.f16", &[0x3C00, 0x1000]), 0x3C00);
    // 1 + 2^-10 + 2^-11: midpoint of 0x3C01 and 0x3C02, ties to the even 0x3C02.
    assert_eq!(h16op("add.f16", &[0x3C01, 0x1000]), 0x3C02);
    assert_eq!(
        h16op("sub.rn.f16", &[0x3C02, 0x3C00]),
        0x1800,
        "2^-9 exactly"
    );
    // 65504 · 2 overflows to +inf; +inf + −inf is NaN.
    assert_eq!(h16op("mul.rn.f16", &[0x7BFF, 0x4000]), 0x7C00);
    let nan = h16op("add.rn.f16", &[0x7C00, 0xFC00]);
    assert!(
        nan & 0x7C00 == 0x7C00 && nan & 0x03FF != 0,
        "NaN, got {nan:#06x}"
    );
    // 2^-14 (0x0400, smallest normal) · 0.5 (0x3800) = 2^-15, subnormal 0x0200; .ftz flushes
    // it to a zero of the product's sign.
    assert_eq!(h16op("mul.rn.f16", &[0x0400, 0x3800]), 0x0200);
    assert_eq!(h16op("mul.rn.ftz.f16", &[0x0400, 0x3800]), 0x0000);
    assert_eq!(h16op("mul.rn.ftz.f16", &[0x8400, 0x3800]), 0x8000);
    // .ftz flushes subnormal inputs too: 2^-24 (0x0001) + 0 is 0.
    assert_eq!(h16op("add.rn.f16", &[0x0001, 0x0000]), 0x0001);
    assert_eq!(h16op("add.rn.ftz.f16", &[0x0001, 0x0000]), 0x0000);
    // .sat: 1.5 · 1.5 = 2.25 → 1; −1 · 0.5 → +0; NaN → +0.
    assert_eq!(h16op("mul.rn.sat.f16", &[0x3E00, 0x3E00]), 0x3C00);
    assert_eq!(h16op("mul.rn.sat.f16", &[0xBC00, 0x3800]), 0x0000);
    assert_eq!(h16op("add.rn.sat.f16", &[0x7C00, 0xFC00]), 0x0000);
}

#[test]
fn f16_fma_rounds_the_exact_sum_once() {
    // (1 + 2^-10)(2 − 2^-10) = 2 + 2^-10 − 2^-20; + 17·2^-24 (0x0011) = 2 + 2^-10 + 2^-24,
    // just above the midpoint of 2 (0x4000) and 2 + 2^-9 (0x4001): 0x4001. Rounding to f32
    // first (ulp 2^-22 there) would land on the midpoint and then tie to the even 0x4000.
    assert_eq!(h16op("fma.rn.f16", &[0x3C01, 0x3FFF, 0x0011]), 0x4001);
    // Without the 2^-24: 2 + 2^-10 − 2^-20 + 2^-20 = the midpoint itself, ties to 0x4000.
    assert_eq!(h16op("fma.rn.f16", &[0x3C01, 0x3FFF, 0x0010]), 0x4000);
    // 1 · 1 + (−1) = +0 under round to nearest.
    assert_eq!(h16op("fma.rn.f16", &[0x3C00, 0x3C00, 0xBC00]), 0x0000);
    // The ISA has only .rn for f16 arithmetic; other modes stay unimplemented, named.
    let m = Module::parse(
        ".version 8.4\n.target sm_80\n.address_size 64\n.visible .entry k()\n{\n\
         .reg .b16 %rs<3>;\nadd.rz.f16 %rs0, %rs1, %rs2;\nret;\n}\n",
    )
    .unwrap();
    let uns: Vec<String> = m.unsupported().iter().map(|e| e.to_string()).collect();
    assert!(uns.len() == 1 && uns[0].contains("add.rz.f16"), "{uns:?}");
}

#[test]
fn f16x2_arithmetic_works_lane_by_lane() {
    // Low half is element 0. {1, −2} + {1, 2} = {2, +0}; {1, −2} · {1 + 2^-10, 2} = {0x3C01, −4}.
    let r = run(
        "mov.b32 %r1, 0xC0003C00;\nmov.b32 %r2, 0x40003C00;\nmov.b32 %r3, 0x40003C01;\n\
         add.rn.f16x2 %r4, %r1, %r2;\nmul.rn.f16x2 %r5, %r1, %r3;\n\
         fma.rn.f16x2 %r6, %r1, %r2, %r2;\n\
         st.global.b32 [%rd9], %r4;\nst.global.b32 [%rd9+4], %r5;\nst.global.b32 [%rd9+8], %r6;\n",
    );
    assert_eq!(r[0], 0x0000_4000);
    assert_eq!(r[1], 0xC400_3C01);
    // {1·1 + 1, −2·2 + 2} = {2, −2}.
    assert_eq!(r[2], 0xC000_4000);
}

/// Runs `body` in a kernel of `threads` threads (one CTA) with a 256-byte shared `buf`, `%r0` =
/// `%tid.x`, `%rd9` = output of one u32 per thread; returns the output.
fn block(body: &str, threads: u32) -> Result<Vec<u32>, PtxError> {
    let src = format!(
        ".version 8.4\n.target sm_80\n.address_size 64\n.shared .align 4 .b8 buf[256];\n\
         .visible .entry k(.param .u64 k_out)\n{{\n\
         .reg .pred %p<8>;\n.reg .b32 %r<16>;\n.reg .b64 %rd<16>;\n\
         ld.param.u64 %rd9, [k_out];\nmov.u32 %r0, %tid.x;\n{body}\nret;\n}}\n"
    );
    let m = Module::parse(&src)?;
    assert!(m.unsupported().is_empty(), "{:?}", m.unsupported());
    let mut mem = VecMemory::new();
    let out = mem.alloc(4 * threads as usize);
    let cfg = LaunchConfig {
        grid: [1, 1, 1],
        block: [threads, 1, 1],
        dynamic_shared: 0,
    };
    launch(
        &m,
        "k",
        cfg,
        &[ParamValue::Ptr(out)],
        &mut mem,
        Limits::default(),
    )?;
    Ok(mem
        .bytes(out)
        .unwrap_or(&[])
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

#[test]
fn bar_sync_with_a_thread_count_waits_for_that_many_threads() {
    // Warps 0 and 1 exchange values through shared memory at barrier 1 (64 threads); warp 2
    // meets alone at barrier 2 (32 threads). Barrier 1 must not wait for warp 2.
    let body = "mov.u64 %rd1, buf;\nmul.wide.u32 %rd2, %r0, 4;\nadd.s64 %rd6, %rd9, %rd2;\n\
        setp.ge.u32 %p1, %r0, 64;\n@%p1 bra $L_third;\n\
        add.s64 %rd3, %rd1, %rd2;\nst.shared.u32 [%rd3], %r0;\nbar.sync 1, 64;\n\
        add.s32 %r1, %r0, 32;\nrem.u32 %r1, %r1, 64;\nmul.wide.u32 %rd4, %r1, 4;\n\
        add.s64 %rd5, %rd1, %rd4;\nld.shared.u32 %r2, [%rd5];\nst.global.u32 [%rd6], %r2;\n\
        bra $L_end;\n$L_third:\nbar.sync 2, 32;\nadd.s32 %r2, %r0, 1000;\n\
        st.global.u32 [%rd6], %r2;\n$L_end:";
    let w = block(body, 96).unwrap();
    let want: Vec<u32> = (0..96)
        .map(|i| if i < 64 { (i + 32) % 64 } else { 1000 + i })
        .collect();
    assert_eq!(w, want);
}

#[test]
fn counted_barriers_do_not_count_exited_threads() {
    // Warp 1 exits at once. Without a count, barrier 1 completes (exited threads count as
    // arrived); with a count of 64 only 32 threads ever arrive: a deadlock.
    let exit_warp1 = "setp.ge.u32 %p1, %r0, 32;\n@%p1 bra $L_end;\n";
    let w = block(&format!("{exit_warp1}bar.sync 1;\n$L_end:"), 64).unwrap();
    assert_eq!(w.len(), 64);
    let e = block(&format!("{exit_warp1}bar.sync 1, 64;\n$L_end:"), 64).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Deadlock, "{e}");
    assert!(e.message.contains("bar.sync"), "{e}");
}

#[test]
fn bad_barrier_numbers_and_counts_are_errors() {
    for (bar, why) in [
        ("bar.sync 1, 48;", "multiple of 32"),
        ("bar.sync 1, 96;", "multiple of 32"),
        ("bar.sync 16;", "0..=15"),
    ] {
        let e = block(bar, 64).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Launch, "{bar}: {e}");
        assert!(
            e.message.contains(why) && e.message.contains("PTX line"),
            "{e}"
        );
    }
    // Two warps giving barrier 1 different counts.
    let e = block(
        "setp.ge.u32 %p1, %r0, 32;\n@%p1 bra $L_b;\nbar.sync 1, 64;\nbra $L_end;\n\
         $L_b:\nbar.sync 1, 32;\n$L_end:",
        64,
    )
    .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Launch, "{e}");
    assert!(e.message.contains("bar.sync 1 with"), "{e}");
}

/// `op` applied to f64 bit patterns (`%fd1`, `%fd2`, ...), result bits.
fn f64op(op: &str, args: &[u64]) -> u64 {
    let mut body = String::new();
    let mut names = Vec::new();
    for (i, a) in args.iter().enumerate() {
        body += &format!("mov.b64 %fd{}, {a:#x};\n", i + 1);
        names.push(format!("%fd{}", i + 1));
    }
    body += &format!(
        "{op} %fd0, {};\nst.global.b64 [%rd9], %fd0;\n",
        names.join(", ")
    );
    let w = run(&body);
    u64::from(w[0]) | u64::from(w[1]) << 32
}

/// The four rounding modes of `op.MODE.f64` on `args`, in the order rn, rz, rm, rp.
fn f64modes(op: &str, args: &[u64]) -> [u64; 4] {
    ["rn", "rz", "rm", "rp"].map(|m| f64op(&format!("{op}.{m}.f64"), args))
}

const ONE64: u64 = 0x3FF0_0000_0000_0000;
/// 1 + 2^-52 and 1 + 2^-51.
const ONE64_UP: u64 = 0x3FF0_0000_0000_0001;
const ONE64_UP2: u64 = 0x3FF0_0000_0000_0002;
/// 1 − 2^-53, the f64 below 1.
const ONE64_DOWN: u64 = 0x3FEF_FFFF_FFFF_FFFF;
const NEG: u64 = 1 << 63;
const MAX64: u64 = 0x7FEF_FFFF_FFFF_FFFF;
const INF64: u64 = 0x7FF0_0000_0000_0000;

#[test]
fn f64_add_sub_in_every_rounding_mode() {
    let p60 = 0x3C30_0000_0000_0000; // 2^-60
    let p53 = 0x3CA0_0000_0000_0000; // 2^-53: half an ulp of 1
                                     // 1 + 2^-60: only .rp leaves 1.
    assert_eq!(
        f64modes("add", &[ONE64, p60]),
        [ONE64, ONE64, ONE64, ONE64_UP]
    );
    // −1 − 2^-60: only .rm moves (away from zero).
    assert_eq!(
        f64modes("add", &[ONE64 | NEG, p60 | NEG]),
        [ONE64 | NEG, ONE64 | NEG, ONE64_UP | NEG, ONE64 | NEG]
    );
    // 1 − 2^-60: just below 1; .rz and .rm give 1 − 2^-53.
    assert_eq!(
        f64modes("sub", &[ONE64, p60]),
        [ONE64, ONE64_DOWN, ONE64_DOWN, ONE64]
    );
    // Ties: 1 + 2^-53 goes to even 1; (1 + 2^-52) + 2^-53 goes to even 1 + 2^-51.
    assert_eq!(
        f64modes("add", &[ONE64, p53]),
        [ONE64, ONE64, ONE64, ONE64_UP]
    );
    assert_eq!(
        f64modes("add", &[ONE64_UP, p53]),
        [ONE64_UP2, ONE64_UP, ONE64_UP, ONE64_UP2]
    );
    // Overflow: MAX + MAX is ∞ to nearest and upward, MAX toward zero and downward.
    assert_eq!(
        f64modes("add", &[MAX64, MAX64]),
        [INF64, MAX64, MAX64, INF64]
    );
    assert_eq!(
        f64modes("add", &[MAX64 | NEG, MAX64 | NEG]),
        [INF64 | NEG, MAX64 | NEG, INF64 | NEG, MAX64 | NEG]
    );
    // Exact zeros: x − x is +0 except under .rm; −0 + −0 stays −0.
    assert_eq!(f64modes("add", &[ONE64, ONE64 | NEG]), [0, 0, NEG, 0]);
    assert_eq!(f64modes("sub", &[0, 0]), [0, 0, NEG, 0]);
    assert_eq!(f64modes("add", &[NEG, NEG]), [NEG; 4]);
}

#[test]
fn f64_mul_and_fma_in_every_rounding_mode() {
    // (1 + 2^-52)(1 − 2^-53) = 1 + 2^-53 − 2^-105: just below the midpoint.
    assert_eq!(
        f64modes("mul", &[ONE64_UP, ONE64_DOWN]),
        [ONE64, ONE64, ONE64, ONE64_UP]
    );
    // (1 + 2^-52)² = 1 + 2^-51 + 2^-104; negated: .rm moves away from zero.
    let up3 = 0x3FF0_0000_0000_0003;
    assert_eq!(
        f64modes("mul", &[ONE64_UP, ONE64_UP]),
        [ONE64_UP2, ONE64_UP2, ONE64_UP2, up3]
    );
    assert_eq!(
        f64modes("mul", &[ONE64_UP | NEG, ONE64_UP]),
        [ONE64_UP2 | NEG, ONE64_UP2 | NEG, up3 | NEG, ONE64_UP2 | NEG]
    );
    // MAX · 2 overflows: ∞ or MAX by mode.
    let two = 0x4000_0000_0000_0000;
    assert_eq!(f64modes("mul", &[MAX64, two]), [INF64, MAX64, MAX64, INF64]);
    // 2^-600 · 2^-600 = 2^-1200, far below the smallest subnormal 2^-1074.
    let p600 = 0x1A70_0000_0000_0000;
    assert_eq!(f64modes("mul", &[p600, p600]), [0, 0, 0, 1]);
    assert_eq!(
        f64modes("fma", &[p600 | NEG, p600, 0]),
        [NEG, NEG, NEG | 1, NEG]
    );
    // (1 + 2^-52)(1 − 2^-52) − 1 = −2^-104 exactly, in every mode.
    let m52 = 0x3FEF_FFFF_FFFF_FFFE; // 1 − 2^-52
    assert_eq!(
        f64modes("fma", &[ONE64_UP, m52, ONE64 | NEG]),
        [0xB970_0000_0000_0000; 4]
    );
    // (1 + 2^-52)² − 1 = 2^-51 + 2^-104: a tie at f64 precision (ulp of 2^-51 is 2^-103),
    // visible only to an exact fma; to even 2^-51.
    let p51 = 0x3CC0_0000_0000_0000;
    assert_eq!(
        f64modes("fma", &[ONE64_UP, ONE64_UP, ONE64 | NEG]),
        [p51, p51, p51, p51 + 1]
    );
    // 1 · 1 + 2^-60 and an exact zero sum 1 · 1 − 1 (−0 only under .rm).
    assert_eq!(
        f64modes("fma", &[ONE64, ONE64, 0x3C30_0000_0000_0000]),
        [ONE64, ONE64, ONE64, ONE64_UP]
    );
    assert_eq!(
        f64modes("fma", &[ONE64, ONE64, ONE64 | NEG]),
        [0, 0, NEG, 0]
    );
}

#[test]
fn f64_div_and_sqrt_in_every_rounding_mode() {
    let three = 0x4008_0000_0000_0000;
    // 1/3 = 0x3FD5555555555555 + 1/3 ulp.
    let third = 0x3FD5_5555_5555_5555;
    assert_eq!(
        f64modes("div", &[ONE64, three]),
        [third, third, third, third + 1]
    );
    assert_eq!(
        f64modes("div", &[ONE64 | NEG, three]),
        [third | NEG, third | NEG, (third + 1) | NEG, third | NEG]
    );
    // Exact quotients do not move; MAX / 0.5 overflows.
    let quarter = 0x3FD0_0000_0000_0000;
    let four = 0x4010_0000_0000_0000;
    assert_eq!(f64modes("div", &[ONE64, four]), [quarter; 4]);
    let half = 0x3FE0_0000_0000_0000;
    assert_eq!(
        f64modes("div", &[MAX64, half]),
        [INF64, MAX64, MAX64, INF64]
    );
    assert_eq!(f64modes("rcp", &[three]), [third, third, third, third + 1]);
    // sqrt(2) = 1.41421356237309504880...; 0x3FF6A09E667F3BCD = 1.41421356237309514547... is
    // above it, so .rz/.rm give the f64 below.
    let s2 = 0x3FF6_A09E_667F_3BCD;
    assert_eq!(f64modes("sqrt", &[two_f64()]), [s2, s2 - 1, s2 - 1, s2]);
    assert_eq!(f64modes("sqrt", &[four]), [0x4000_0000_0000_0000; 4]);
}

fn two_f64() -> u64 {
    0x4000_0000_0000_0000
}

#[test]
fn f32_directed_div_rcp_sqrt() {
    let three = 0x4040_0000;
    // 1/3 = 0x3EAAAAAA + 2/3 ulp: nearest and upward give 0x3EAAAAAB.
    let modes = |op: &str, args: &[u32]| {
        ["rn", "rz", "rm", "rp"].map(|m| f32op(&format!("{op}.{m}.f32"), args))
    };
    assert_eq!(
        modes("div", &[ONE, three]),
        [0x3EAA_AAAB, 0x3EAA_AAAA, 0x3EAA_AAAA, 0x3EAA_AAAB]
    );
    assert_eq!(
        modes("div", &[ONE | 0x8000_0000, three]),
        [0xBEAA_AAAB, 0xBEAA_AAAA, 0xBEAA_AAAB, 0xBEAA_AAAA]
    );
    assert_eq!(
        modes("rcp", &[three]),
        [0x3EAA_AAAB, 0x3EAA_AAAA, 0x3EAA_AAAA, 0x3EAA_AAAB]
    );
    // sqrt(2) in f32: 0x3FB504F3 = 1.41421353816... lies below the exact value.
    assert_eq!(
        modes("sqrt", &[0x4000_0000]),
        [0x3FB5_04F3, 0x3FB5_04F3, 0x3FB5_04F3, 0x3FB5_04F4]
    );
    // MAX / 0.5 overflows: ∞ or MAX by mode.
    assert_eq!(
        modes("div", &[0x7F7F_FFFF, 0x3F00_0000]),
        [0x7F80_0000, 0x7F7F_FFFF, 0x7F7F_FFFF, 0x7F80_0000]
    );
}
