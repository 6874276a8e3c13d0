//! The binary's command line, from outside: an unreachable coordinator is
//! a one-line error naming it and the flag that sets it.
//!
//! (Having an integration test also makes `cargo test` build this binary,
//! which the multi-process tests in `tests/` then run.)

use std::process::Command;

#[test]
fn an_unreachable_coordinator_is_named_with_the_flag_that_sets_it() {
    // Nothing listens on port 1 of loopback.
    let out = Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .args(["--coordinator", "http://127.0.0.1:1", "status"])
        .output()
        .expect("the binary runs");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("cannot reach the coordinator at http://127.0.0.1:1"), "{text}");
    assert!(text.contains("--coordinator or PS_COORDINATOR_HTTP"), "{text}");
    assert_eq!(text.lines().count(), 1, "one line: {text}");
}
