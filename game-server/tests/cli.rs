//! The binary's command line, from outside: a bad setting stops the server
//! before it binds or calls anything, saying which setting and why.
//!
//! (Having an integration test also makes `cargo test` build this binary,
//! which the multi-process tests in `tests/` then run.)

use std::process::Command;

/// Exit code and everything printed.
fn run(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_game-server"))
        .args(args)
        .env("PS_LOG", "error")
        .output()
        .expect("the binary runs");
    let text = String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    (out.status.code(), text)
}

#[test]
fn a_bad_setting_stops_the_server_at_once_and_says_which() {
    // Out of range: the configuration's own check (exit 1).
    for (args, says) in [
        (&["--snapshot-hz", "9"][..], "snapshot rate must be 10..=90 Hz"),
        (&["--snapshot-hz", "91"][..], "snapshot rate must be 10..=90 Hz"),
        (&["--player-bandwidth-kbps", "10"][..], "player bandwidth must be 64..=1000000 kbit/s"),
    ] {
        let (code, text) = run(args);
        assert_eq!(code, Some(1), "{args:?}: {text}");
        assert!(text.contains(says), "{args:?}: {text}");
    }
    // Not a number: the parser's (exit 2), naming the flag.
    let (code, text) = run(&["--snapshot-hz", "fast"]);
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("--snapshot-hz"), "{text}");
}
