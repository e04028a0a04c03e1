//! Regenerates the gRPC code from `proto/` and checks it matches what is committed.
//! `FERROCLAW_REGENERATE=1 cargo test -p ferroclaw-proto --test codegen` rewrites it.

use std::path::{Path, PathBuf};

const PROTOS: &[&str] = &["common", "runner", "delivery", "scheduler", "gateway"];

fn generate(out_dir: &Path) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files: Vec<PathBuf> = PROTOS
        .iter()
        .map(|p| root.join(format!("ferroclaw/v1/{p}.proto")))
        .collect();
    let protoc = protoc_bin_vendored::protoc_bin_path().expect("vendored protoc");
    // SAFETY: this test binary holds a single test, so no other thread reads the environment.
    unsafe { std::env::set_var("PROTOC", protoc) };
    tonic_prost_build::configure()
        .out_dir(out_dir)
        .file_descriptor_set_path(out_dir.join("descriptor.bin"))
        .compile_protos(&files, &[root])
        .expect("protoc compiles the protos");
}

#[test]
fn generated_code_matches_protos() {
    let committed = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/gen");
    let fresh = tempfile::tempdir().expect("temp dir");
    generate(fresh.path());
    let mut stale = Vec::new();
    for name in ["ferroclaw.v1.rs", "descriptor.bin"] {
        let new = std::fs::read(fresh.path().join(name)).expect("generated file");
        let old = std::fs::read(committed.join(name)).unwrap_or_default();
        if new != old {
            if std::env::var_os("FERROCLAW_REGENERATE").is_some() {
                std::fs::write(committed.join(name), &new).expect("write generated file");
            } else {
                stale.push(name);
            }
        }
    }
    assert!(
        stale.is_empty(),
        "generated code is stale: {stale:?}; run FERROCLAW_REGENERATE=1 cargo test -p ferroclaw-proto --test codegen"
    );
}
