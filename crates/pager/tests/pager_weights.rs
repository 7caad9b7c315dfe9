//! Safetensors reading: a file written by PyTorch/safetensors reads back exactly, our dtype
//! conversions match PyTorch's, and every kind of malformed file is a clear `BadFile` error.

mod pager_support;

use ferry_pager::weights::{convert, DType, WeightsFile};
use ferry_pager::Error;
use pager_support::{fixture, write_raw, write_safetensors, write_with_header};

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

#[test]
fn reads_pytorch_fixture() {
    let f = WeightsFile::open(fixture("dtypes.safetensors")).unwrap();
    assert_eq!(f.tensors().len(), 12);
    let w = f.info("w_f32").unwrap();
    assert_eq!(
        (w.dtype, w.shape.clone(), w.len),
        (DType::F32, vec![73], 292)
    );
    assert_eq!(f.info("ids_i64").unwrap().shape, vec![1, 7]);
    assert_eq!(f.info("scalar").unwrap().shape, Vec::<usize>::new());
    assert_eq!(f32s(f.bytes("scalar").unwrap()), vec![2.5]);
    assert_eq!(f.info("empty").unwrap().len, 0);
    let ids: Vec<i64> = f
        .bytes("ids_i64")
        .unwrap()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(ids, (0..7).collect::<Vec<i64>>());
    assert_eq!(f.metadata().get("format").map(String::as_str), Some("pt"));
    // Data areas are disjoint and sorted.
    for p in f.tensors().windows(2) {
        assert!(p[0].offset + p[0].len <= p[1].offset);
    }
}

#[test]
fn conversions_match_pytorch_bit_for_bit() {
    let f = WeightsFile::open(fixture("dtypes.safetensors")).unwrap();
    for (src, to, golden) in [
        ("w_f32", DType::F16, "w_f32.as_f16"),
        ("w_f32", DType::BF16, "w_f32.as_bf16"),
        ("w_f16", DType::F32, "w_f16.as_f32"),
        ("w_bf16", DType::F32, "w_bf16.as_f32"),
        ("w_bf16", DType::F16, "w_bf16.as_f16"),
    ] {
        let ours = f.read_as(src, to).unwrap();
        assert_eq!(
            ours,
            f.bytes(golden).unwrap(),
            "{src} -> {to} differs from torch"
        );
    }
    // Reading a tensor as its own dtype is a plain copy.
    assert_eq!(
        f.read_as("w_f16", DType::F16).unwrap(),
        f.bytes("w_f16").unwrap()
    );
}

#[test]
fn integers_are_readable_but_not_convertible() {
    let f = WeightsFile::open(fixture("dtypes.safetensors")).unwrap();
    let e = f.read_as("ids_i32", DType::F32).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("ids_i32") && msg.contains("cannot convert I32"),
        "{msg}"
    );
    assert!(convert(f.bytes("ids_i64").unwrap(), DType::I64, DType::F16).is_err());
}

#[test]
fn files_from_the_rust_writer_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("ok.safetensors");
    let a: Vec<u8> = (0..24u8).collect();
    let b: Vec<u8> = (0..6u8).collect();
    write_safetensors(
        &p,
        &[
            ("a", "F32", vec![2, 3], a.clone()),
            ("b", "BF16", vec![3], b.clone()),
        ],
    );
    let f = WeightsFile::open(&p).unwrap();
    assert_eq!(f.bytes("a").unwrap(), &a[..]);
    assert_eq!(f.bytes("b").unwrap(), &b[..]);
    assert_eq!(f.data_bytes(), 30);
}

/// Opens `path`, expects a `BadFile` naming the file, returns the message.
fn bad(path: &std::path::Path) -> String {
    match WeightsFile::open(path) {
        Err(Error::BadFile { path: p, message }) => {
            assert_eq!(p, path);
            let shown = Error::BadFile {
                path: p,
                message: message.clone(),
            }
            .to_string();
            assert!(shown.contains(path.file_name().unwrap().to_str().unwrap()));
            message
        }
        Err(other) => panic!("expected BadFile, got {other:?}"),
        Ok(_) => panic!("{} opened although it is malformed", path.display()),
    }
}

#[test]
fn malformed_files_are_bad_file_errors() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);

    std::fs::write(p("short"), [1, 2, 3]).unwrap();
    let m = bad(&p("short"));
    assert!(m.contains("truncated") && m.contains("3 bytes"), "{m}");

    std::fs::write(p("empty"), []).unwrap();
    assert!(bad(&p("empty")).contains("truncated"));

    write_raw(&p("past_eof"), 1000, b"{}", &[]);
    let m = bad(&p("past_eof"));
    assert!(
        m.contains("header length 1000") && m.contains("past the end"),
        "{m}"
    );

    write_raw(&p("huge_header"), u64::MAX, b"{}", &[]);
    assert!(bad(&p("huge_header")).contains("exceeds the limit"));

    write_with_header(&p("bad_json"), "{\"a\": {\"dtype\": ", &[]);
    assert!(bad(&p("bad_json")).contains("not valid JSON"));

    write_raw(&p("not_utf8"), 2, &[0xff, 0xfe], &[]);
    assert!(bad(&p("not_utf8")).contains("not UTF-8"));

    write_with_header(&p("array"), "[1, 2]", &[]);
    assert!(bad(&p("array")).contains("must be a JSON object, found an array"));

    write_with_header(
        &p("outside"),
        r#"{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}"#,
        &[0; 8],
    );
    let m = bad(&p("outside"));
    assert!(
        m.contains("tensor 'w'") && m.contains("outside the data area of 8 bytes"),
        "{m}"
    );

    write_with_header(
        &p("overlap"),
        r#"{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}"#,
        &[0; 12],
    );
    let m = bad(&p("overlap"));
    assert!(
        m.contains("'a'") && m.contains("'b'") && m.contains("overlap"),
        "{m}"
    );

    write_with_header(
        &p("size_mismatch"),
        r#"{"w": {"dtype": "F16", "shape": [2, 3], "data_offsets": [0, 10]}}"#,
        &[0; 10],
    );
    let m = bad(&p("size_mismatch"));
    assert!(
        m.contains("tensor 'w'") && m.contains("needs 12 bytes") && m.contains("span 10"),
        "{m}"
    );

    write_with_header(
        &p("dtype"),
        r#"{"q": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}"#,
        &[0; 2],
    );
    let m = bad(&p("dtype"));
    assert!(
        m.contains("tensor 'q'") && m.contains("unsupported dtype 'F8_E4M3'"),
        "{m}"
    );

    write_with_header(
        &p("reversed"),
        r#"{"w": {"dtype": "F32", "shape": [0], "data_offsets": [8, 0]}}"#,
        &[0; 8],
    );
    assert!(bad(&p("reversed")).contains("end before they start"));

    write_with_header(
        &p("neg_shape"),
        r#"{"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}"#,
        &[0; 4],
    );
    assert!(bad(&p("neg_shape")).contains("non-negative integers"));

    write_with_header(
        &p("overflow"),
        r#"{"w": {"dtype": "F32", "shape": [18446744073709551615, 4], "data_offsets": [0, 4]}}"#,
        &[0; 4],
    );
    assert!(bad(&p("overflow")).contains("overflows"));

    write_with_header(
        &p("missing"),
        r#"{"w": {"dtype": "F32", "shape": [1]}}"#,
        &[0; 4],
    );
    assert!(bad(&p("missing")).contains("data_offsets"));

    write_with_header(&p("meta"), r#"{"__metadata__": {"k": 3}}"#, &[]);
    assert!(bad(&p("meta")).contains("__metadata__ entry 'k' must be a string"));
}

#[test]
fn missing_file_is_an_io_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("nope.safetensors");
    match WeightsFile::open(&p) {
        Err(e @ Error::Io { .. }) => assert!(e.to_string().contains("nope.safetensors")),
        other => panic!("expected Io error, got {other:?}"),
    }
}

#[test]
fn truncated_data_area_is_detected() {
    // A valid file with its last bytes cut off: the last tensor now lies outside the data area.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("cut.safetensors");
    write_safetensors(&p, &[("x", "F32", vec![8], vec![1; 32])]);
    let full = std::fs::read(&p).unwrap();
    std::fs::write(&p, &full[..full.len() - 5]).unwrap();
    let m = bad(&p);
    assert!(
        m.contains("tensor 'x'") && m.contains("outside the data area"),
        "{m}"
    );
}
