//! `weft check` as a user runs it: on the example mesh file shipped in
//! deploy/local and on a broken one. (Having an integration test here also
//! makes `cargo test` build the `weft` binary that tests/ runs.)

use std::process::Command;

#[test]
fn example_mesh_file_is_valid() {
    let mesh = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/local/mesh.toml");
    let out = Command::new(env!("CARGO_BIN_EXE_weft"))
        .args(["check", "--mesh", mesh])
        .output()
        .expect("run weft check");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok (2 services"));
}

#[test]
fn broken_mesh_file_lists_every_error_with_positions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("mesh.toml");
    std::fs::write(
        &path,
        "trust_domain = \"example.org\"\n[services.a]\nprotocol = \"sctp\"\nendpoints = [\"nope\"]\n",
    )
    .expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_weft"))
        .args(["check", "--mesh"])
        .arg(&path)
        .output()
        .expect("run weft check");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("mesh.toml:3:"), "{err}");
    assert!(err.contains("mesh.toml:4:"), "{err}");
    assert_eq!(err.lines().count(), 2, "{err}");
}
