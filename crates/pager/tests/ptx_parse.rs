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
        .reg .b32 %r<4>;\n.reg .b64 %rd<2>;\natom.global.add.u32 %r1, [%rd1], 1;\n\
        mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%r0,%r1,%r2,%r3}, {%r0,%r1}, {%r0}, {%r0,%r1,%r2,%r3};\nret;\n}\n";
    let m = Module::parse(src).unwrap();
    let msgs: Vec<String> = m.unsupported().iter().map(|e| e.to_string()).collect();
    assert_eq!(msgs.len(), 2, "{msgs:?}");
    assert!(
        msgs[0].contains("line 8") && msgs[0].contains("atom.global.add.u32"),
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
