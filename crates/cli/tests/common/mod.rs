//! Helpers shared by the CLI's integration tests: run the `mulo` binary and check how it exits.
#![allow(dead_code, clippy::unwrap_used)]

use std::ffi::OsStr;
use std::fmt::Debug;
use std::process::{Command, Output};

pub const MULO: &str = env!("CARGO_BIN_EXE_mulo");

/// Runs `mulo ARGS` to completion.
pub fn mulo<S: AsRef<OsStr>>(args: &[S]) -> Output {
    Command::new(MULO).args(args).output().unwrap()
}

/// Runs `mulo ARGS`, which must succeed; returns its stdout.
pub fn ok<S: AsRef<OsStr> + Debug>(args: &[S]) -> String {
    let o = mulo(args);
    assert!(
        o.status.success(),
        "mulo {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Runs `mulo ARGS`, which must fail; returns its stderr.
pub fn fails<S: AsRef<OsStr> + Debug>(args: &[S]) -> String {
    let o = mulo(args);
    assert!(!o.status.success(), "mulo {args:?} should fail");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs `mulo ARGS`, which must fail with exactly one line on stderr and no panic; returns it.
pub fn fails_one_line<S: AsRef<OsStr> + Debug>(args: &[S]) -> String {
    let err = fails(args);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one clear line expected, got: {err}");
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "{err}"
    );
    lines[0].to_string()
}
