//! The combd binary's command line, run as a user runs it; no privileges needed (nothing is
//! loaded: clap rejects bad input before the agent starts). Being an integration test of
//! this package also makes `cargo test --workspace` build combd, which the lab tests of
//! comb-cli start.

use std::process::{Command, Output};

const COMBD: &str = env!("CARGO_BIN_EXE_combd");

fn combd(args: &[&str]) -> Output {
    Command::new(COMBD)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {COMBD}: {e}"))
}

#[test]
fn help_lists_the_flags() {
    let out = combd(&["--help"]);
    assert!(out.status.success(), "{out:?}");
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "--node",
        "--manifests",
        "--admin-socket",
        "--pin-dir",
        "--splice",
        "--socket-lb",
        "--lb-cgroup",
        "--policy",
        "--proxy",
    ] {
        assert!(help.contains(flag), "combd --help lacks {flag}:\n{help}");
    }
}

#[test]
fn bad_flag_value_fails_naming_it() {
    let out = combd(&[
        "--node",
        "n1",
        "--manifests",
        "/nonexistent",
        "--splice",
        "sometimes",
    ]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("invalid value 'sometimes'") && err.contains("--splice"),
        "{err}"
    );
}

#[test]
fn missing_required_flags_fail() {
    let out = combd(&[]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("--node") && err.contains("--manifests"),
        "{err}"
    );
}
