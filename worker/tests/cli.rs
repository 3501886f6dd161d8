//! The `worker` binary's command line: bad input is a clear error, not a hang or a panic.
//! (Its presence also makes `cargo test` build the binary that the coordinator's
//! process tests start.)

use std::process::Command;

#[test]
fn bad_arguments_are_clear_errors() {
    let bin = env!("CARGO_BIN_EXE_worker");
    let out = Command::new(bin)
        .args(["--coordinator", "http://127.0.0.1:1", "--shard", "3/3"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("invalid shard") && err.contains("3/3"),
        "{err}"
    );

    let out = Command::new(bin)
        .args(["--coordinator", "not a url"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a url"), "{err}");
}
