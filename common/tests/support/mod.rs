//! What the integration tests of `ccq-common` share: where the data beside the repository
//! is, and the one rule for a test that cannot run here.
// Each test file uses a subset.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// `../shared/<rel>` (ResNet-20, CIFAR-10, MNIST: read-only data that CI machines and the
/// development machine keep beside the repository), when it is there.
pub fn shared(rel: &str) -> Option<PathBuf> {
    let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared")).join(rel);
    dir.is_dir().then_some(dir)
}

/// Ends a test that cannot run here for want of a tool or fixture (`reason`). Locally that
/// is a printed skip; under `CI=true` it is a failure, because CI machines have every tool
/// (`.ci/run` installs them) and `../shared`, and a skip there would pass without checking
/// anything. Use as `return skip(reason)` in a test returning `()`.
pub fn skip(reason: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{reason} (CI=true: every test must run on CI, none may skip)");
    }
    println!("skipped: {reason}");
}
