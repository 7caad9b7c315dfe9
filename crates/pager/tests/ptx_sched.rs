//! Scheduling (barriers, warp shuffles, calls) and the sanitizer: each seeded bug is caught and
//! named correctly; bad launches are one-line errors.

use ferry_pager::device::sim::ptx::{
    launch, ErrorKind, LaunchConfig, LaunchReport, Limits, Module, ParamValue, PtxError, VecMemory,
};

const HEAD: &str = ".version 8.4\n.target sm_80\n.address_size 64\n";

/// A kernel `k(.param .u64 k_out)` with the usual registers, `%rd9` = out, `%r0` = %tid.x.
fn kernel(pre: &str, body: &str) -> String {
    format!(
        "{HEAD}{pre}\n.visible .entry k(.param .u64 k_out)\n{{\n\
         .reg .pred %p<8>;\n.reg .b32 %r<32>;\n.reg .f32 %f<8>;\n.reg .b64 %rd<16>;\n\
         ld.param.u64 %rd9, [k_out];\nmov.u32 %r0, %tid.x;\n{body}\nret;\n}}\n"
    )
}

fn go(
    src: &str,
    threads: u32,
    out_words: usize,
    limits: Limits,
) -> Result<(Vec<u32>, LaunchReport), PtxError> {
    let m = Module::parse(src)?;
    let mut mem = VecMemory::new();
    let out = mem.alloc(out_words * 4);
    let cfg = LaunchConfig {
        grid: [1, 1, 1],
        block: [threads, 1, 1],
        dynamic_shared: 0,
    };
    let rep = launch(&m, "k", cfg, &[ParamValue::Ptr(out)], &mut mem, limits)?;
    let words = mem
        .bytes(out)
        .unwrap_or(&[])
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Ok((words, rep))
}

fn line_of(src: &str, needle: &str) -> usize {
    src.lines().position(|l| l.contains(needle)).unwrap() + 1
}

#[test]
fn butterfly_reduction_over_two_warps() {
    let body = "mov.u32 %r1, %r0;\n\
        shfl.sync.bfly.b32 %r2, %r1, 16, 31, -1;\nadd.s32 %r1, %r1, %r2;\n\
        shfl.sync.bfly.b32 %r2, %r1, 8, 31, -1;\nadd.s32 %r1, %r1, %r2;\n\
        shfl.sync.bfly.b32 %r2, %r1, 4, 31, -1;\nadd.s32 %r1, %r1, %r2;\n\
        shfl.sync.bfly.b32 %r2, %r1, 2, 31, -1;\nadd.s32 %r1, %r1, %r2;\n\
        shfl.sync.bfly.b32 %r2, %r1, 1, 31, -1;\nadd.s32 %r1, %r1, %r2;\n\
        mul.wide.u32 %rd1, %r0, 4;\nadd.s64 %rd2, %rd9, %rd1;\nst.global.u32 [%rd2], %r1;\n";
    let (w, _) = go(&kernel("", body), 64, 64, Limits::default()).unwrap();
    assert!(w[..32].iter().all(|&v| v == 496), "{w:?}");
    assert!(w[32..].iter().all(|&v| v == 1520), "{w:?}");
}

#[test]
fn shuffle_modes_clamp_and_predicate() {
    // out[lane] = value, out[32+lane] = predicate, for one mode at a time.
    let run = |mode: &str, b: u32, c: u32| {
        let body = format!(
            "mul.lo.s32 %r1, %r0, 10;\nshfl.sync.{mode}.b32 %r2|%p1, %r1, {b}, {c}, -1;\n\
             selp.u32 %r3, 1, 0, %p1;\nmul.wide.u32 %rd1, %r0, 4;\nadd.s64 %rd2, %rd9, %rd1;\n\
             st.global.u32 [%rd2], %r2;\nst.global.u32 [%rd2+128], %r3;\n"
        );
        go(&kernel("", &body), 32, 64, Limits::default()).unwrap().0
    };
    let w = run("down", 1, 31);
    assert_eq!((w[0], w[30], w[31]), (10, 310, 310));
    assert_eq!((w[32], w[62], w[63]), (1, 1, 0));
    let w = run("up", 2, 0);
    assert_eq!((w[0], w[1], w[2], w[31]), (0, 10, 0, 290));
    assert_eq!((w[32], w[33], w[34]), (0, 0, 1));
    let w = run("idx", 5, 31);
    assert!(w[..32].iter().all(|&v| v == 50));
    // Segments of 8 lanes (c = 0x1807): idx 3 reads lane 3 of each segment.
    let w = run("idx", 3, 0x1807);
    assert_eq!((w[0], w[9], w[31]), (30, 110, 270));
    let w = run("bfly", 3, 31);
    assert_eq!((w[0], w[5]), (30, 60));
}

#[test]
fn barrier_orders_shared_memory() {
    let pre = ".shared .align 4 .b8 buf[256];";
    let body = "mov.u64 %rd1, buf;\nmul.wide.u32 %rd2, %r0, 4;\nadd.s64 %rd3, %rd1, %rd2;\n\
        st.shared.u32 [%rd3], %r0;\nbar.sync 0;\nadd.s32 %r1, %r0, 1;\nrem.u32 %r1, %r1, 64;\n\
        mul.wide.u32 %rd4, %r1, 4;\nadd.s64 %rd5, %rd1, %rd4;\nld.shared.u32 %r2, [%rd5];\n\
        add.s64 %rd6, %rd9, %rd2;\nst.global.u32 [%rd6], %r2;\n";
    let (w, rep) = go(&kernel(pre, body), 64, 64, Limits::default()).unwrap();
    assert_eq!(w, (0..64).map(|i| (i + 1) % 64).collect::<Vec<u32>>());
    assert_eq!(rep.shared_bytes, 256);
    // Without the barrier, thread 0 reads thread 1's word before it is written.
    let src = kernel(pre, &body.replace("bar.sync 0;\n", ""));
    let e = go(&src, 64, 64, Limits::default()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Memory);
    assert!(
        e.message.contains("uninitialised shared") && e.message.contains("thread (0,0,0)"),
        "{e}"
    );
}

#[test]
fn out_of_bounds_store_is_named() {
    let body =
        "mul.wide.u32 %rd1, %r0, 4;\nadd.s64 %rd2, %rd9, %rd1;\nst.global.u32 [%rd2], %r0;\n";
    let src = kernel("", body);
    let e = go(&src, 8, 5, Limits::default()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Memory);
    let line = line_of(&src, "st.global.u32");
    assert!(
        e.message
            .contains("kernel k, block (0,0,0), thread (5,0,0)"),
        "{e}"
    );
    assert!(e.message.contains(&format!("PTX line {line}")), "{e}");
    assert!(
        e.message.contains("0x1000000") && e.message.contains("store"),
        "{e}"
    );
    assert!(!e.message.contains('\n'));
}

#[test]
fn misaligned_and_shared_out_of_bounds() {
    let e = go(
        &kernel("", "st.global.u32 [%rd9+2], %r0;\n"),
        1,
        4,
        Limits::default(),
    )
    .unwrap_err();
    assert!(e.message.contains("misaligned 4-byte store"), "{e}");
    let e = go(
        &kernel("", "ld.global.v4.u32 {%r1, %r2, %r3, %r4}, [%rd9+4];\n"),
        1,
        8,
        Limits::default(),
    )
    .unwrap_err();
    assert!(e.message.contains("misaligned 16-byte load"), "{e}");
    let pre = ".shared .align 4 .b8 s[16];";
    let e = go(
        &kernel(pre, "st.shared.u32 [s+16], %r0;\n"),
        1,
        1,
        Limits::default(),
    )
    .unwrap_err();
    assert!(e.message.contains("out-of-bounds shared store"), "{e}");
}

#[test]
fn deadlocked_shuffle_names_warp_and_line() {
    // Lanes 16.. exit; the others wait for them in a full-mask shuffle.
    let body = "setp.ge.u32 %p1, %r0, 16;\n@%p1 bra $L_end;\nshfl.sync.bfly.b32 %r1, %r0, 1, 31, -1;\n$L_end:\n";
    let src = kernel("", body);
    let e = go(&src, 32, 1, Limits::default()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Deadlock);
    let line = line_of(&src, "shfl.sync");
    assert!(e.message.contains("kernel k, block (0,0,0), warp 0"), "{e}");
    assert!(
        e.message.contains(&format!("PTX line {line}")) && e.message.contains("exited"),
        "{e}"
    );
    // One lane at a barrier while its warp waits for it in a shuffle.
    let body = "setp.eq.u32 %p1, %r0, 0;\n@%p1 bar.sync 0;\n@!%p1 shfl.sync.bfly.b32 %r1, %r0, 1, 31, -1;\n";
    let e = go(&kernel("", body), 32, 1, Limits::default()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Deadlock);
    assert!(
        e.message.contains("shfl.sync") && e.message.contains("warp 0"),
        "{e}"
    );
}

#[test]
fn runaway_loop_hits_the_budget() {
    let src = kernel("", "$L_loop:\nadd.s32 %r1, %r1, 1;\nbra.uni $L_loop;\n");
    let limits = Limits {
        instruction_budget: 10_000,
        ..Limits::default()
    };
    let e = go(&src, 4, 1, limits).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Budget);
    assert!(
        e.message.contains("budget of 10000") && e.message.contains("kernel k"),
        "{e}"
    );
}

#[test]
fn calls_params_and_local_frames() {
    let pre = ".func (.param .b32 f_ret) f(.param .b32 f_a)\n{\n.local .align 4 .b8 depot[8];\n\
        .reg .b32 %r<4>;\n.reg .b64 %rd<4>;\nld.param.u32 %r1, [f_a];\nmov.u64 %rd1, depot;\n\
        cvta.local.u64 %rd2, %rd1;\nst.u32 [%rd2+4], %r1;\nld.local.u32 %r2, [depot+4];\n\
        add.s32 %r3, %r2, 100;\nst.param.b32 [f_ret], %r3;\nret;\n}";
    let body = "{\n.reg .b32 temp;\n.param .b32 param0;\nst.param.b32 [param0], %r0;\n\
        .param .b32 retval0;\ncall.uni (retval0), f, (param0);\nld.param.b32 %r5, [retval0];\n}\n\
        mul.wide.u32 %rd1, %r0, 4;\nadd.s64 %rd2, %rd9, %rd1;\nst.global.u32 [%rd2], %r5;\n";
    let (w, _) = go(&kernel(pre, body), 4, 4, Limits::default()).unwrap();
    assert_eq!(w, vec![100, 101, 102, 103]);
}

#[test]
fn module_tables_are_read_with_nc_loads() {
    let pre = ".global .align 4 .b8 tab[8] = {1, 0, 0, 0, 2, 1, 0, 0};";
    let body = "mov.u64 %rd1, tab;\nld.global.nc.u32 %r1, [%rd1+4];\nst.global.u32 [%rd9], %r1;\n";
    let (w, _) = go(&kernel(pre, body), 1, 1, Limits::default()).unwrap();
    assert_eq!(w[0], 0x102);
}

#[test]
fn bad_launches_are_one_line_errors() {
    let m = Module::parse(&kernel(
        ".shared .align 4 .b8 big[50000];",
        "st.shared.u32 [big], %r0;\n",
    ))
    .unwrap();
    let mut mem = VecMemory::new();
    let cfg = |block: [u32; 3], grid: [u32; 3]| LaunchConfig {
        grid,
        block,
        dynamic_shared: 0,
    };
    let p = [ParamValue::Ptr(0)];
    let l = Limits::default();
    let e = launch(&m, "k", cfg([1, 1, 1], [1, 1, 1]), &p, &mut mem, l).unwrap_err();
    assert!(
        e.message.contains("static shared memory exceed 48 KiB"),
        "{e}"
    );
    let m = Module::parse(&kernel("", "")).unwrap();
    let e = launch(&m, "k", cfg([1025, 1, 1], [1, 1, 1]), &p, &mut mem, l).unwrap_err();
    assert!(e.message.contains("block (1025,1,1) exceeds"), "{e}");
    let e = launch(&m, "k", cfg([32, 32, 2], [1, 1, 1]), &p, &mut mem, l).unwrap_err();
    assert!(e.message.contains("exceeds"), "{e}");
    let e = launch(&m, "k", cfg([1, 1, 1], [1, 65536, 1]), &p, &mut mem, l).unwrap_err();
    assert!(e.message.contains("grid (1,65536,1) exceeds"), "{e}");
    let e = launch(&m, "k", cfg([1, 1, 1], [1, 1, 1]), &[], &mut mem, l).unwrap_err();
    assert!(e.message.contains("takes 1 parameters, 0 given"), "{e}");
    let e = launch(
        &m,
        "k",
        cfg([1, 1, 1], [1, 1, 1]),
        &[ParamValue::U32(0)],
        &mut mem,
        l,
    )
    .unwrap_err();
    assert!(e.message.contains("is 8 bytes, 4 given"), "{e}");
    let e = launch(&m, "nope", cfg([1, 1, 1], [1, 1, 1]), &p, &mut mem, l).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Launch);
    assert!(!e.message.contains('\n'));
}

#[test]
fn unimplemented_and_malformed_ptx() {
    let src = kernel("", "vote.sync.ballot.b32 %r1, %p1, -1;\n");
    let m = Module::parse(&src).unwrap();
    let mut mem = VecMemory::new();
    let cfg = LaunchConfig {
        grid: [1, 1, 1],
        block: [32, 1, 1],
        dynamic_shared: 0,
    };
    let e = launch(
        &m,
        "k",
        cfg,
        &[ParamValue::Ptr(0)],
        &mut mem,
        Limits::default(),
    )
    .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Unimplemented);
    let line = line_of(&src, "vote.sync");
    assert!(
        e.message.contains("vote.sync.ballot.b32") && e.message.contains(&format!("line {line}")),
        "{e}"
    );
    for bad in [
        kernel("", "add.s32 %r1, %r2;\n"),
        kernel("", "add.s32 %r1, %r2, %nope;\n"),
        kernel("", "bra $L_missing;\n"),
        format!("{HEAD}.visible .entry k(\n"),
        format!("{HEAD}.bogus 3;\n"),
        kernel("", "mov.f32 %f1, 0f3F80;\n"),
    ] {
        let e = Module::parse(&bad).unwrap_err();
        assert!(e.message.starts_with("PTX line "), "{e}");
    }
}

#[test]
fn missing_barrier_is_a_shared_race() {
    let pre = ".shared .align 4 .b8 buf[256];";
    let body = "mov.u64 %rd1, buf;\nmul.wide.u32 %rd2, %r0, 4;\nadd.s64 %rd3, %rd1, %rd2;\n\
        st.shared.u32 [%rd3], %r0;\nsetp.eq.u32 %p1, %r0, 0;\n@%p1 bra $L_end;\n\
        ld.shared.u32 %r2, [%rd3+-4];\n$L_end:\n";
    let src = kernel(pre, body);
    let e = go(&src, 64, 1, Limits::default()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Memory);
    let (st, ld) = (line_of(&src, "st.shared"), line_of(&src, "ld.shared"));
    assert!(
        e.message.contains("thread (1,0,0)") && e.message.contains("shared-memory race"),
        "{e}"
    );
    assert!(
        e.message
            .contains(&format!("thread (0,0,0) wrote at PTX line {st}")),
        "{e}"
    );
    assert!(e.message.contains(&format!("(PTX line {ld})")), "{e}");
    // With the barrier it is clean.
    let fixed = kernel(pre, &body.replace("setp.eq", "bar.sync 0;\nsetp.eq"));
    go(&fixed, 64, 1, Limits::default()).unwrap();
}

#[test]
fn busy_kernel_spins_on_the_advancing_globaltimer() {
    let path = format!("{}/../../kernels/ptx/busy.ptx", env!("CARGO_MANIFEST_DIR"));
    let m = Module::parse(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut mem = VecMemory::new();
    let cfg = LaunchConfig {
        grid: [2, 1, 1],
        block: [32, 1, 1],
        dynamic_shared: 0,
    };
    let rep = launch(
        &m,
        "ferry_busy",
        cfg,
        &[ParamValue::U64(5_000)],
        &mut mem,
        Limits::default(),
    )
    .unwrap();
    // Virtual time advances one nanosecond per instruction, and each thread runs alone until it
    // blocks: each of the 64 threads spins about 5000 instructions.
    assert!(
        (64 * 5_000..64 * 5_100).contains(&rep.instructions),
        "{rep:?}"
    );
    // Spinning for ever ends at the budget instead of hanging.
    let limits = Limits {
        instruction_budget: 200_000,
        ..Limits::default()
    };
    let e = launch(
        &m,
        "ferry_busy",
        cfg,
        &[ParamValue::U64(u64::MAX)],
        &mut mem,
        limits,
    )
    .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Budget);
    assert!(e.message.contains("ferry_busy"), "{e}");
}
