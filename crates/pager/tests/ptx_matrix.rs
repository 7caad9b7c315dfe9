//! `ldmatrix`, `mma.sync.m16n8k16` and `cp.async`: fragment layouts element by element, as the
//! PTX ISA's fragment figures give them (groupID = lane / 4, threadID_in_group = lane % 4).

use ferry_pager::device::sim::ptx::{
    launch, ErrorKind, LaunchConfig, Limits, Module, ParamValue, PtxError, VecMemory,
};
use half::{bf16, f16};

const HEAD: &str = ".version 8.4\n.target sm_80\n.address_size 64\n";

/// Runs `k(in, out)` with 32 threads (or `threads`); returns the out words.
fn run(src: &str, input: &[u32], out_words: usize, threads: u32) -> Result<Vec<u32>, PtxError> {
    let m = Module::parse(src)?;
    let mut mem = VecMemory::new();
    let bytes: Vec<u8> = input.iter().flat_map(|v| v.to_le_bytes()).collect();
    let a = mem.alloc_bytes(&bytes);
    let o = mem.alloc(out_words * 4);
    let cfg = LaunchConfig {
        grid: [1, 1, 1],
        block: [threads, 1, 1],
        dynamic_shared: 0,
    };
    launch(
        &m,
        "k",
        cfg,
        &[ParamValue::Ptr(a), ParamValue::Ptr(o)],
        &mut mem,
        Limits::default(),
    )?;
    Ok(mem
        .bytes(o)
        .unwrap_or(&[])
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

fn kernel(pre: &str, body: &str) -> String {
    format!(
        "{HEAD}{pre}\n.visible .entry k(.param .u64 k_in, .param .u64 k_out)\n{{\n\
         .reg .pred %p<4>;\n.reg .b32 %r<40>;\n.reg .f32 %f<16>;\n.reg .b64 %rd<16>;\n\
         ld.param.u64 %rd8, [k_in];\nld.param.u64 %rd9, [k_out];\nmov.u32 %r0, %tid.x;\n\
         mul.wide.u32 %rd10, %r0, 4;\n{body}\nret;\n}}\n"
    )
}

/// Element (row r, col c) of stored matrix `i`: distinct 16-bit values.
fn elem(i: usize, r: usize, c: usize) -> u16 {
    ((i << 8) | (r << 4) | c) as u16
}

fn ldmatrix_case(num: usize, trans: bool) {
    // Four 8x8 matrices of b16, row-major, 512 bytes: thread t copies 16 bytes to shared.
    let mut halves = Vec::new();
    for i in 0..4 {
        for r in 0..8 {
            for c in 0..8 {
                halves.push(elem(i, r, c));
            }
        }
    }
    let input: Vec<u32> = halves
        .chunks(2)
        .map(|p| p[0] as u32 | (p[1] as u32) << 16)
        .collect();
    // Lane L gives the address of row (7 - L%8) of matrix L/8: logical row r is stored row 7-r.
    let regs: Vec<String> = (1..=num).map(|i| format!("%r{i}")).collect();
    let body = format!(
        "mul.wide.u32 %rd1, %r0, 16;\nadd.s64 %rd2, %rd8, %rd1;\nld.global.v4.u32 {{%r10, %r11, %r12, %r13}}, [%rd2];\n\
         mov.u64 %rd3, smem;\nadd.s64 %rd4, %rd3, %rd1;\nst.shared.v4.u32 [%rd4], {{%r10, %r11, %r12, %r13}};\n\
         bar.sync 0;\nshr.u32 %r14, %r0, 3;\nand.b32 %r15, %r0, 7;\nsub.s32 %r15, 7, %r15;\n\
         shl.b32 %r16, %r14, 3;\nadd.s32 %r16, %r16, %r15;\nshl.b32 %r16, %r16, 4;\n\
         cvt.u32.u64 %r17, %rd3;\nadd.s32 %r18, %r17, %r16;\n\
         ldmatrix.sync.aligned.m8n8.x{num}{}.shared.b16 {{{}}}, [%r18];\n\
         mul.wide.u32 %rd5, %r0, 16;\nadd.s64 %rd6, %rd9, %rd5;\n{}",
        if trans { ".trans" } else { "" },
        regs.join(", "),
        regs.iter()
            .enumerate()
            .map(|(i, r)| format!("st.global.u32 [%rd6+{}], {r};\n", 4 * i))
            .collect::<String>()
    );
    let src = kernel(".shared .align 16 .b8 smem[512];", &body);
    let out = run(&src, &input, 32 * 4, 32).unwrap();
    for lane in 0..32 {
        let (g, c) = (lane / 4, 2 * (lane % 4));
        for i in 0..num {
            // Logical M_i[r][col] = stored (i, 7 - r, col).
            let m = |r: usize, col: usize| elem(i, 7 - r, col) as u32;
            let want = if trans {
                m(c, g) | m(c + 1, g) << 16
            } else {
                m(g, c) | m(g, c + 1) << 16
            };
            assert_eq!(
                out[lane * 4 + i],
                want,
                "x{num} trans={trans} lane {lane} matrix {i}"
            );
        }
    }
}

#[test]
fn ldmatrix_fragments() {
    for num in [1, 2, 4] {
        for trans in [false, true] {
            ldmatrix_case(num, trans);
        }
    }
}

fn mma_case(bf: bool) {
    // Small integers: every product and sum is exact in f16/bf16 inputs and f32 accumulation.
    let a = |m: usize, k: usize| ((m * 3 + k * 5) % 7) as f32 - 3.0;
    let b = |k: usize, n: usize| ((k * 2 + n * 3) % 5) as f32 - 2.0;
    let c = |m: usize, n: usize| (m * 8 + n) as f32 * 0.5;
    let h = |v: f32| -> u32 {
        if bf {
            bf16::from_f32(v).to_bits() as u32
        } else {
            f16::from_f32(v).to_bits() as u32
        }
    };
    let pair = |lo: f32, hi: f32| h(lo) | h(hi) << 16;
    // Per lane: a0..a3, b0..b1, c0..c3 (10 words, padded to 12), from the ISA's fragment figures.
    let mut input = Vec::new();
    for lane in 0..32 {
        let (g, t) = (lane / 4, lane % 4);
        for j in 0..4 {
            let (row, col) = (g + 8 * (j & 1), 2 * t + 8 * (j >> 1));
            input.push(pair(a(row, col), a(row, col + 1)));
        }
        for j in 0..2 {
            let k = 2 * t + 8 * j;
            input.push(pair(b(k, g), b(k + 1, g)));
        }
        for j in 0..4 {
            input.push(c(g + 8 * (j >> 1), 2 * t + (j & 1)).to_bits());
        }
        input.extend([0, 0]);
    }
    let ty = if bf { "bf16" } else { "f16" };
    let body = format!(
        "mul.wide.u32 %rd1, %r0, 48;\nadd.s64 %rd2, %rd8, %rd1;\n\
         ld.global.v4.u32 {{%r1, %r2, %r3, %r4}}, [%rd2];\nld.global.v2.u32 {{%r5, %r6}}, [%rd2+16];\n\
         ld.global.v2.f32 {{%f1, %f2}}, [%rd2+24];\nld.global.v2.f32 {{%f3, %f4}}, [%rd2+32];\n\
         mma.sync.aligned.m16n8k16.row.col.f32.{ty}.{ty}.f32 {{%f5, %f6, %f7, %f8}}, {{%r1, %r2, %r3, %r4}}, {{%r5, %r6}}, {{%f1, %f2, %f3, %f4}};\n\
         mul.wide.u32 %rd3, %r0, 16;\nadd.s64 %rd4, %rd9, %rd3;\nst.global.v4.f32 [%rd4], {{%f5, %f6, %f7, %f8}};\n"
    );
    let out = run(&kernel("", &body), &input, 32 * 4, 32).unwrap();
    for lane in 0..32 {
        let (g, t) = (lane / 4, lane % 4);
        for j in 0..4 {
            let (row, col) = (g + 8 * (j >> 1), 2 * t + (j & 1));
            let want: f32 = (0..16).map(|k| a(row, k) * b(k, col)).sum::<f32>() + c(row, col);
            assert_eq!(
                f32::from_bits(out[lane * 4 + j]),
                want,
                "{ty} lane {lane} d{j} = D[{row}][{col}]"
            );
        }
    }
}

#[test]
fn mma_m16n8k16_fragments_f16_and_bf16() {
    mma_case(false);
    mma_case(true);
}

#[test]
fn mma_with_a_lane_gone_is_a_deadlock() {
    let body = "setp.eq.u32 %p1, %r0, 7;\n@%p1 bra $L_end;\n\
        mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%f5, %f6, %f7, %f8}, {%r1, %r2, %r3, %r4}, {%r5, %r6}, {%f1, %f2, %f3, %f4};\n$L_end:\n";
    let e = run(&kernel("", body), &[0], 1, 32).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Deadlock);
    assert!(
        e.message.contains("mma.sync") && e.message.contains("lane 7"),
        "{e}"
    );
}

const CP: &str = ".shared .align 16 .b8 smem[512];";

fn cp_body(read_before_wait: bool, wait: bool) -> String {
    format!(
        "mul.wide.u32 %rd1, %r0, 16;\nadd.s64 %rd2, %rd8, %rd1;\nmov.u64 %rd3, smem;\n\
         cvt.u32.u64 %r1, %rd3;\nmul.lo.s32 %r2, %r0, 16;\nadd.s32 %r3, %r1, %r2;\n\
         mov.u32 %r9, 12;\ncp.async.cg.shared.global [%r3], [%rd2], 16, %r9;\ncp.async.commit_group;\n\
         {}{}bar.sync 0;\nadd.s32 %r4, %r0, 1;\nand.b32 %r4, %r4, 31;\nmul.lo.s32 %r5, %r4, 16;\n\
         add.s32 %r6, %r1, %r5;\nld.shared.v4.u32 {{%r10, %r11, %r12, %r13}}, [%r6];\n\
         add.s64 %rd4, %rd9, %rd1;\nst.global.v4.u32 [%rd4], {{%r10, %r11, %r12, %r13}};\n",
        if read_before_wait { "ld.shared.u32 %r20, [%r3];\n" } else { "" },
        if wait { "cp.async.wait_group 0;\n" } else { "" },
    )
}

#[test]
fn cp_async_copies_with_zero_fill_and_catches_early_reads() {
    let input: Vec<u32> = (0..128).collect();
    let out = run(&kernel(CP, &cp_body(false, true)), &input, 128, 32).unwrap();
    for t in 0..32 {
        let src = (t + 1) % 32;
        // src-size 12: three words copied, the fourth zero-filled.
        let want = [4 * src as u32, 4 * src as u32 + 1, 4 * src as u32 + 2, 0];
        assert_eq!(&out[4 * t..4 * t + 4], &want, "thread {t}");
    }
    let e = run(&kernel(CP, &cp_body(true, true)), &input, 128, 32).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Memory);
    assert!(
        e.message.contains("before its cp.async.wait_group")
            && e.message.contains("thread (0,0,0)"),
        "{e}"
    );
    let e = run(&kernel(CP, &cp_body(false, false)), &input, 128, 32).unwrap_err();
    assert!(e.message.contains("cp.async"), "{e}");
}
