//! The committed header is what cbindgen generates from the sources now.

use std::path::Path;

fn generate(crate_dir: &Path) -> String {
    let config =
        cbindgen::Config::from_file(crate_dir.join("cbindgen.toml")).expect("cbindgen.toml");
    let mut out = Vec::new();
    cbindgen::Builder::new()
        .with_crate(crate_dir)
        .with_config(config)
        .generate()
        .expect("cbindgen runs")
        .write(&mut out);
    String::from_utf8(out).expect("UTF-8 header")
}

#[test]
fn committed_header_is_current() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let path = dir.join("include/ferry.h");
    let fresh = generate(dir);
    if std::env::var_os("FERRY_BLESS").is_some() {
        std::fs::write(&path, &fresh).expect("write header");
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == fresh,
        "bindings/c/include/ferry.h is stale: regenerate it with \
         `FERRY_BLESS=1 cargo test -p ferry-c --test header`"
    );
    for name in [
        "ferry_acquire",
        "ferry_release",
        "FERRY_STATUS_INVALID_HANDLE",
        "FerryScheduler",
    ] {
        assert!(fresh.contains(name), "{name} missing from the header");
    }
}

#[test]
fn a_changed_source_makes_the_header_stale() {
    // Copy the crate, add one entry point, and check the generated header differs.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tmp = tempfile::tempdir().expect("tempdir");
    let copy = tmp.path();
    std::fs::create_dir_all(copy.join("src")).unwrap();
    for f in [
        "cbindgen.toml",
        "src/lib.rs",
        "src/api.rs",
        "src/error.rs",
        "src/handles.rs",
    ] {
        std::fs::copy(dir.join(f), copy.join(f)).unwrap();
    }
    std::fs::write(
        copy.join("Cargo.toml"),
        "[package]\nname = \"ferry-c\"\nversion = \"0.1.0\"\nedition = \"2021\"\n[lib]\nname = \"ferry_c\"\n[workspace]\n",
    )
    .unwrap();
    let before = generate(copy);
    let mut api = std::fs::read_to_string(copy.join("src/api.rs")).unwrap();
    api.push_str(
        "\n/// New.\n#[no_mangle]\npub extern \"C\" fn ferry_added_later() -> u32 { 0 }\n",
    );
    std::fs::write(copy.join("src/api.rs"), api).unwrap();
    let after = generate(copy);
    assert!(!before.contains("ferry_added_later"));
    assert!(after.contains("ferry_added_later"));
    assert_ne!(before, after);
}
