//! Every line of the shipped PTX parses; every opcode is implemented or reported by name.

use ferry_pager::device::sim::ptx::{ErrorKind, Module};
use std::collections::BTreeSet;

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
fn tensor_core_modules_parse_and_name_what_is_missing() {
    for name in ["gemm", "attention"] {
        let m = Module::parse(&load(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        let mut missing = BTreeSet::new();
        for e in m.unsupported() {
            assert_eq!(e.kind, ErrorKind::Unimplemented);
            assert!(e.message.starts_with("PTX line "), "{e}");
            let op = e.message.split('`').nth(1).unwrap_or_default().to_string();
            missing.insert(op.split('.').next().unwrap_or_default().to_string());
        }
        let allowed: BTreeSet<String> = ["ldmatrix", "mma", "cp"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert!(missing.is_subset(&allowed), "{name}: {missing:?}");
        assert!(!missing.is_empty());
    }
}
