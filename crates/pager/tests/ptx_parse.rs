//! Every line of the shipped PTX parses; every opcode is implemented or reported by name.

use ferry_pager::device::sim::ptx::{ErrorKind, Module};

fn load(name: &str) -> String {
    let path = format!(
        "{}/../../kernels/ptx/{name}.ptx",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn simple_modules_parse_with_everything_implemented() {
    for name in ["busy", "layout", "elementwise", "norm"] {
        let m = Module::parse(&load(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        let uns: Vec<String> = m.unsupported().iter().map(|e| e.to_string()).collect();
        assert!(uns.is_empty(), "{name}: {uns:?}");
        assert!(!m.kernels().is_empty());
    }
}

#[test]
fn tensor_core_modules_parse_with_everything_implemented() {
    for name in ["gemm", "attention"] {
        let m = Module::parse(&load(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        let uns: Vec<String> = m.unsupported().iter().map(|e| e.to_string()).collect();
        assert!(uns.is_empty(), "{name}: {uns:?}");
    }
}

#[test]
fn unimplemented_forms_are_named_with_their_line() {
    let src = ".version 8.4\n.target sm_80\n.address_size 64\n.visible .entry k()\n{\n\
        .reg .b32 %r<4>;\n.reg .b64 %rd<2>;\nprefetch.global.L2 [%rd1];\n\
        mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%r0,%r1,%r2,%r3}, {%r0,%r1}, {%r0}, {%r0,%r1,%r2,%r3};\nret;\n}\n";
    let m = Module::parse(src).unwrap();
    let msgs: Vec<String> = m.unsupported().iter().map(|e| e.to_string()).collect();
    assert_eq!(msgs.len(), 2, "{msgs:?}");
    assert!(
        msgs[0].contains("line 8") && msgs[0].contains("prefetch.global.L2"),
        "{msgs:?}"
    );
    assert!(
        msgs[1].contains("line 9") && msgs[1].contains("m16n8k8"),
        "{msgs:?}"
    );
    for e in m.unsupported() {
        assert_eq!(e.kind, ErrorKind::Unimplemented);
    }
}

#[test]
fn mutated_and_truncated_ptx_never_panics() {
    let src = load("layout");
    let bytes = src.as_bytes();
    // Truncations at many points.
    for cut in (0..bytes.len()).step_by(bytes.len() / 97 + 1) {
        if src.is_char_boundary(cut) {
            let _ = Module::parse(&src[..cut]);
        }
    }
    // Single-character edits at pseudo-random places.
    let alphabet = b"{}()[];,.%<>-+0123456789fdx@!|_ \n";
    let mut s: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = || {
        s = s
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (s >> 33) as usize
    };
    for _ in 0..300 {
        let mut m = bytes.to_vec();
        let pos = next() % m.len();
        let c = alphabet[next() % alphabet.len()];
        match next() % 3 {
            0 => m[pos] = c,
            1 => m.insert(pos, c),
            _ => {
                m.remove(pos);
            }
        }
        if let Ok(text) = String::from_utf8(m) {
            if let Err(e) = Module::parse(&text) {
                assert!(e.message.starts_with("PTX line "), "{e}");
                assert!(!e.message.contains('\n'), "{e}");
            }
        }
    }
}

#[test]
fn oversized_declarations_are_refused_not_allocated() {
    let head = ".version 8.4\n.target sm_80\n.address_size 64\n";
    for body in [
        ".global .align 4 .b8 huge[4000000000];\n".to_string(),
        ".visible .entry k()\n{\n.reg .b32 %r<4000000000>;\nret;\n}\n".to_string(),
        ".visible .entry k()\n{\n.local .align 4 .b8 d[3000000000];\nret;\n}\n".to_string(),
        ".visible .entry k(.param .align 4 .b8 p[4000000000])\n{\nret;\n}\n".to_string(),
        format!(
            ".visible .entry k()\n{}ret;\n{}",
            "{\n".repeat(300),
            "}\n".repeat(300)
        ),
    ] {
        let e = Module::parse(&format!("{head}{body}")).unwrap_err();
        assert!(e.message.starts_with("PTX line "), "{e}");
    }
}
