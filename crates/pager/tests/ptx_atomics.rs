//! `atom` / `red` on global and shared memory: results from many threads, returned old values,
//! the ISA's wrap rules, float adds, the documented application order (blocks in order, threads
//! of a block in ascending id), bounds/alignment checks and the shared-memory race check's
//! treatment of atomics. Expected values are derived by hand from the PTX ISA.

use ferry_pager::device::sim::ptx::{
    launch, ErrorKind, LaunchConfig, Limits, Module, ParamValue, PtxError, VecMemory,
};

const HEAD: &str = ".version 8.4\n.target sm_80\n.address_size 64\n";

/// A kernel whose `%rd9` points at the output words (initialised from `init`), `%r0` = tid.x,
/// `%r12` = global thread id (x), `%rd10` = out + 4 * %r12; `sm` is 256 bytes of shared memory.
fn kernel(body: &str) -> String {
    format!(
        "{HEAD}.shared .align 8 .b8 sm[256];\n.visible .entry k(.param .u64 k_out)\n{{\n\
         .reg .pred %p<8>;\n.reg .b32 %r<32>;\n.reg .f32 %f<8>;\n.reg .b64 %rd<16>;\n\
         .reg .f64 %fd<8>;\n\
         ld.param.u64 %rd9, [k_out];\nmov.u32 %r0, %tid.x;\nmov.u32 %r10, %ctaid.x;\n\
         mov.u32 %r11, %ntid.x;\nmad.lo.u32 %r12, %r10, %r11, %r0;\n\
         mul.wide.u32 %rd1, %r12, 4;\nadd.s64 %rd10, %rd9, %rd1;\n{body}\nret;\n}}\n"
    )
}

fn go(body: &str, grid: u32, threads: u32, init: &[u32]) -> Result<Vec<u32>, PtxError> {
    let src = kernel(body);
    let m = Module::parse(&src)?;
    if let Some(e) = m.unsupported().first() {
        return Err((*e).clone());
    }
    let mut mem = VecMemory::new();
    let bytes: Vec<u8> = init.iter().flat_map(|w| w.to_le_bytes()).collect();
    let out = mem.alloc_bytes(&bytes);
    let cfg = LaunchConfig {
        grid: [grid, 1, 1],
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
        .unwrap()
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

fn ok(body: &str, grid: u32, threads: u32, init: &[u32]) -> Vec<u32> {
    go(body, grid, threads, init).unwrap_or_else(|e| panic!("{e}\n{}", kernel(body)))
}

#[test]
fn global_counter_from_every_thread_returns_distinct_old_values() {
    // 4 blocks x 96 threads; word 0 counts with atom (old values kept at 8 + gid), word 1 with
    // red adding 2, with memory-order and scope qualifiers.
    let body = "atom.relaxed.gpu.global.add.u32 %r1, [%rd9], 1;\n\
        red.relaxed.gpu.global.add.u32 [%rd9+4], 2;\n\
        st.global.u32 [%rd10+32], %r1;\n";
    let w = ok(body, 4, 96, &[0; 8 + 384]);
    assert_eq!(w[0], 384);
    assert_eq!(w[1], 768);
    // Documented order: blocks one after another, threads in ascending id, so the old value
    // each thread sees is its global id.
    let olds: Vec<u32> = w[8..].to_vec();
    assert_eq!(olds, (0..384).collect::<Vec<u32>>());
}

#[test]
fn shared_histogram_then_global_flush() {
    // 128 threads, 8 bins in shared memory (thread i adds 1 to bin i % 8 and i to word 8 + i % 8).
    let body = "setp.lt.u32 %p1, %r0, 16;\nmul.lo.u32 %r2, %r0, 4;\nmov.u32 %r3, sm;\n\
        add.u32 %r4, %r3, %r2;\n@%p1 st.shared.u32 [%r4], 0;\nbar.sync 0;\n\
        and.b32 %r5, %r0, 7;\nmul.lo.u32 %r6, %r5, 4;\nadd.u32 %r7, %r3, %r6;\n\
        atom.shared::cta.add.u32 %r8, [%r7], 1;\nred.release.cta.shared.add.u32 [%r7+32], %r0;\nbar.sync 0;\n\
        @%p1 ld.shared.u32 %r9, [%r4];\n@%p1 st.global.u32 [%rd10], %r9;\n";
    let w = ok(body, 1, 128, &[0; 16]);
    // Each bin gets 16 threads; bin b's sum is sum_{k<16} (8k + b) = 960 + 16b.
    assert_eq!(&w[..8], &[16; 8]);
    let sums: Vec<u32> = (0..8).map(|b| 960 + 16 * b).collect();
    assert_eq!(&w[8..16], sums.as_slice());
}

#[test]
fn cas_loop_increment_and_failed_cas() {
    // Lock-free add of (tid + 1) with a CAS retry loop: sum over 64 threads = 2080.
    let body = "add.u32 %r5, %r0, 1;\n$L_retry:\nld.global.u32 %r2, [%rd9];\n\
        add.u32 %r3, %r2, %r5;\natom.global.cas.b32 %r4, [%rd9], %r2, %r3;\n\
        setp.ne.u32 %p1, %r4, %r2;\n@%p1 bra $L_retry;\n\
        setp.eq.u32 %p2, %r0, 0;\n\
        @%p2 atom.global.cas.b32 %r6, [%rd9+4], 5, 9;\n@%p2 st.global.u32 [%rd9+8], %r6;\n\
        @%p2 atom.global.cas.b32 %r7, [%rd9+4], 6, 11;\n@%p2 st.global.u32 [%rd9+12], %r7;\n";
    let w = ok(body, 1, 64, &[0, 6, 0, 0]);
    assert_eq!(w[0], 2080);
    // Compare 5 against 6 fails (memory keeps 6, old 6); compare 6 succeeds (memory 11, old 6).
    assert_eq!(&w[1..4], &[11, 6, 6]);
}

#[test]
fn signed_and_unsigned_min_max() {
    // Thread i offers i - 50 (bits), i in 0..64: signed min is -50, signed max 13; unsigned max
    // is 0xFFFF_FFFF (i = 49, -1), unsigned min 0 (i = 50).
    let body = "sub.s32 %r1, %r0, 50;\n\
        atom.global.min.s32 %r2, [%rd9], %r1;\natom.global.max.s32 %r2, [%rd9+4], %r1;\n\
        red.global.max.u32 [%rd9+8], %r1;\nred.global.min.u32 [%rd9+12], %r1;\n\
        cvt.s64.s32 %rd2, %r1;\natom.global.min.s64 %rd3, [%rd9+16], %rd2;\n\
        atom.global.max.u64 %rd3, [%rd9+24], %rd2;\n";
    let w = ok(body, 1, 64, &[0, 0, 0, 7, 0, 0, 5, 0]);
    assert_eq!(w[0], (-50i32) as u32);
    assert_eq!(w[1], 13);
    assert_eq!(w[2], 0xFFFF_FFFF);
    assert_eq!(w[3], 0);
    // s64 min: -50 sign-extended; u64 max: -1 sign-extended = all ones.
    assert_eq!(&w[4..6], &[(-50i32) as u32, 0xFFFF_FFFF]);
    assert_eq!(&w[6..8], &[0xFFFF_FFFF, 0xFFFF_FFFF]);
}

#[test]
fn inc_and_dec_wrap_rules() {
    // inc with b = 4 from 0 by 10 threads: old values 0 1 2 3 4 0 1 2 3 4, final 0.
    // dec with b = 3 from 0 by 5 threads: old values 0 3 2 1 0, final 3.
    let body = "setp.lt.u32 %p1, %r0, 10;\nsetp.lt.u32 %p2, %r0, 5;\n\
        @%p1 atom.global.inc.u32 %r1, [%rd9], 4;\n@%p1 st.global.u32 [%rd10+16], %r1;\n\
        @%p2 atom.global.dec.u32 %r2, [%rd9+4], 3;\n@%p2 st.global.u32 [%rd10+64], %r2;\n\
        setp.eq.u32 %p3, %r0, 0;\n\
        @%p3 atom.global.inc.u32 %r3, [%rd9+8], 4;\n@%p3 atom.global.dec.u32 %r4, [%rd9+12], 3;\n";
    // Word 2 starts at 7 >= 4 (inc gives 0); word 3 starts at 10 > 3 (dec gives 3).
    let mut init = vec![0u32; 32];
    init[2] = 7;
    init[3] = 10;
    let w = ok(body, 1, 32, &init);
    assert_eq!(&w[..4], &[0, 3, 0, 3]);
    assert_eq!(&w[4..14], &[0, 1, 2, 3, 4, 0, 1, 2, 3, 4]);
    assert_eq!(&w[16..21], &[0, 3, 2, 1, 0]);
}

#[test]
fn exch_and_bitwise() {
    let body = "add.u32 %r1, %r0, 100;\natom.global.exch.b32 %r2, [%rd9], %r1;\n\
        st.global.u32 [%rd10+64], %r2;\n\
        shl.b32 %r3, 1, %r0;\nred.global.or.b32 [%rd9+4], %r3;\n\
        not.b32 %r4, %r3;\nsetp.lt.u32 %p1, %r0, 16;\n@%p1 red.global.and.b32 [%rd9+8], %r4;\n\
        and.b32 %r5, %r0, 3;\nshl.b32 %r6, 1, %r5;\nsetp.lt.u32 %p2, %r0, 6;\n\
        @%p2 atom.global.xor.b32 %r7, [%rd9+12], %r6;\n";
    let mut init = vec![0u32; 48];
    init[0] = 7;
    init[2] = 0xFFFF_FFFF;
    let w = ok(body, 1, 32, &init);
    // exch: final value from the last thread (131); thread 0 sees 7, thread i sees 99 + i.
    assert_eq!(w[0], 131);
    assert_eq!(w[16], 7);
    assert_eq!(&w[17..20], &[100, 101, 102]);
    assert_eq!(w[47], 130);
    assert_eq!(w[1], 0xFFFF_FFFF);
    assert_eq!(w[2], 0xFFFF_0000);
    // Bits 0 1 2 3 0 1 toggled: 0b1100.
    assert_eq!(w[3], 0xC);
}

#[test]
fn float_adds() {
    // f32: 8 x 0.5 = 4.0; subnormal 2^-149 is flushed (atom.add.f32 is .ftz): 1.0 stays 1.0
    // and a subnormal memory value 2^-149 plus 0 gives +0.
    // f64: 4 x 0.25 onto 0 = 1.0; 1.0 + 2^-53 is a tie, to even: stays 1.0 twice.
    // f16x2 .noftz: 1.0 + 1.0 = 2.0 in both lanes; bf16x2: 1.0 + 1.0 = 2.0, and
    // 1.0 + 2^-8 (bf16 0x3B80, upper lane) is a tie that goes to even 1.0.
    let body = "setp.lt.u32 %p1, %r0, 8;\nsetp.lt.u32 %p2, %r0, 4;\nsetp.lt.u32 %p3, %r0, 2;\n\
        @%p1 atom.global.add.f32 %f1, [%rd9], 0f3F000000;\n\
        @%p3 red.global.add.f32 [%rd9+4], 0f00000001;\n\
        @%p3 red.global.add.f32 [%rd9+8], 0f00000000;\n\
        @%p2 red.global.add.f64 [%rd9+16], 0d3FD0000000000000;\n\
        @%p3 atom.global.add.f64 %fd1, [%rd9+24], 0d3CA0000000000000;\n\
        @%p3 red.global.add.noftz.f16x2 [%rd9+32], 0x3C003C00;\n\
        @%p3 red.global.add.noftz.bf16x2 [%rd9+36], 0x3B803F80;\n";
    let mut init = vec![0u32; 10];
    init[1] = 0x3F80_0000;
    init[2] = 0x0000_0001;
    init[7] = 0x3FF0_0000; // f64 1.0 at word 6..8 (little-endian: low word 6, high word 7)
    init[8] = 0x3C00_0000; // f16x2: lane 0 = +0, lane 1 = 1.0
    init[9] = 0x3F80_3F80; // bf16x2: 1.0, 1.0
    let w = ok(body, 1, 32, &init);
    assert_eq!(w[0], 0x4080_0000);
    assert_eq!(w[1], 0x3F80_0000);
    assert_eq!(w[2], 0);
    assert_eq!((w[4], w[5]), (0, 0x3FF0_0000));
    assert_eq!((w[6], w[7]), (0, 0x3FF0_0000));
    // lane 0: 0 + 1 + 1 = 2.0 (0x4000); lane 1: 1 + 1 + 1 = 3.0 (0x4200).
    assert_eq!(w[8], 0x4200_4000);
    // lane 0: 1 + 1 + 1 = 3.0 (0x4040); lane 1: 1.0 + 2^-8 twice, each a tie to even 1.0.
    assert_eq!(w[9], 0x3F80_4040);
}

#[test]
fn generic_and_64_bit_atomics() {
    // A generic address into shared memory (cvta) and u64 add with a carry out of the low word.
    let body = "mov.u32 %r3, sm;\nsetp.eq.u32 %p1, %r0, 0;\n\
        @%p1 st.shared.u64 [%r3], 0xFFFFFFFF;\nbar.sync 0;\n\
        cvta.shared.u64 %rd2, sm;\natom.add.u64 %rd3, [%rd2], 1;\nbar.sync 0;\n\
        @%p1 ld.shared.u64 %rd4, [%r3];\n@%p1 st.global.u64 [%rd9], %rd4;\n\
        @%p1 st.global.u64 [%rd9+8], %rd3;\n";
    let w = ok(body, 1, 4, &[0; 4]);
    // 0xFFFF_FFFF + 4 = 0x1_0000_0003; thread 0's old value is the initial one.
    assert_eq!(&w[..4], &[3, 1, 0xFFFF_FFFF, 0]);
}

#[test]
fn atomics_to_one_shared_address_do_not_race() {
    let body = "mov.u32 %r3, sm;\nsetp.eq.u32 %p1, %r0, 0;\n@%p1 st.shared.u32 [%r3], 0;\n\
        bar.sync 0;\natom.shared.add.u32 %r1, [%r3], 1;\natom.shared.exch.b32 %r2, [%r3+4], 1;\n\
        red.shared.max.u32 [%r3], %r0;\n";
    // Word 1 is never written before the exch: an uninitialised read.
    let e = go(body, 1, 64, &[0]).unwrap_err();
    assert!(e.message.contains("uninitialised"), "{e}");
    let body = body.replace("[%r3], 0;\n", "[%r3], 0;\n@%p1 st.shared.u32 [%r3+4], 0;\n");
    ok(&body, 1, 64, &[0]);
}

#[test]
fn atomic_racing_plain_accesses_is_reported() {
    let pre = "mov.u32 %r3, sm;\nsetp.eq.u32 %p1, %r0, 0;\n\
        @%p1 st.shared.u32 [%r3], 0;\nbar.sync 0;\n";
    // Thread 0 stores plainly, thread 1 adds atomically to the same word.
    for (body, other) in [
        (
            "setp.eq.u32 %p2, %r0, 1;\n@%p1 st.shared.u32 [%r3], 5;\n\
             @%p2 atom.shared.add.u32 %r1, [%r3], 1;\n",
            "wrote",
        ),
        (
            "setp.eq.u32 %p2, %r0, 1;\n@%p1 red.shared.add.u32 [%r3], 5;\n\
             @%p2 ld.shared.u32 %r1, [%r3];\n",
            "accessed atomically",
        ),
        (
            "setp.eq.u32 %p2, %r0, 1;\n@%p1 ld.shared.u32 %r1, [%r3];\n\
             @%p2 red.shared.add.u32 [%r3], 5;\n",
            "read",
        ),
    ] {
        let e = go(&format!("{pre}{body}"), 1, 2, &[0]).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Memory, "{e}");
        assert!(
            e.message.contains("shared-memory race") && e.message.contains(other),
            "{e}"
        );
        assert!(e.message.contains("thread (1,0,0)"), "{e}");
    }
    // Separated by a barrier, the same accesses are fine.
    ok(
        &format!(
            "{pre}@%p1 st.shared.u32 [%r3], 5;\nbar.sync 0;\n\
             atom.shared.add.u32 %r1, [%r3], 1;\nbar.sync 0;\n@%p1 ld.shared.u32 %r2, [%r3];\n\
             @%p1 st.global.u32 [%rd9], %r2;\n"
        ),
        1,
        2,
        &[0],
    );
}

#[test]
fn bounds_and_alignment_are_checked() {
    let e = go("atom.global.add.u32 %r1, [%rd9+2], 1;\n", 1, 1, &[0; 2]).unwrap_err();
    assert!(
        e.kind == ErrorKind::Memory && e.message.contains("misaligned"),
        "{e}"
    );
    let e = go("red.global.add.u64 [%rd9+8], 1;\n", 1, 1, &[0; 2]).unwrap_err();
    assert!(
        e.kind == ErrorKind::Memory && e.message.contains("global"),
        "{e}"
    );
    let e = go(
        "mov.u32 %r3, sm;\natom.shared.add.u32 %r1, [%r3+256], 1;\n",
        1,
        1,
        &[0],
    )
    .unwrap_err();
    assert!(
        e.kind == ErrorKind::Memory && e.message.contains("out-of-bounds shared atomic"),
        "{e}"
    );
}

#[test]
fn unsupported_atomic_forms_are_named() {
    for bad in [
        "atom.global.inc.u64 %rd1, [%rd9], 1;",
        "red.global.cas.b32 [%rd9], 1, 2;",
        "atom.global.add.noftz.f32 %f1, [%rd9], 0f3F800000;",
        "atom.global.min.f32 %f1, [%rd9], 0f3F800000;",
        "atom.global.add.u32.bogus %r1, [%rd9], 1;",
    ] {
        let src = kernel(&format!("{bad}\n"));
        let m = Module::parse(&src).unwrap();
        let u = m.unsupported();
        assert_eq!(u.len(), 1, "{bad}: {u:?}");
        let opcode = bad.split(' ').next().unwrap();
        let line = src.lines().position(|l| l.contains(opcode)).unwrap() + 1;
        assert!(
            u[0].message.contains(opcode) && u[0].to_string().contains(&format!("line {line}")),
            "{bad}: {}",
            u[0]
        );
    }
}
