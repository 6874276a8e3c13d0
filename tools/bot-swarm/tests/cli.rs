//! The binary's command line, from outside: a bad plan or an absent
//! coordinator stops the swarm at once, saying what is wrong.
//!
//! (Having an integration test also makes `cargo test` build this binary,
//! which the multi-process tests in `tests/` then run.)

use std::process::Command;

fn run(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_bot-swarm"))
        .args(args)
        .env("PS_LOG", "error")
        .env_remove("PS_COORDINATOR_HTTP")
        .output()
        .expect("the binary runs");
    let text = String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    (out.status.code(), text)
}

#[test]
fn a_bad_plan_or_no_coordinator_stops_the_swarm_and_says_why() {
    for (args, says) in [
        (&["--mix", "wander=x"][..], r#"bad weight in "wander=x""#),
        (&["--path", "1,2"][..], r#"a waypoint is x,y,z, got "1,2""#),
        // Nothing listens on port 1 of loopback.
        (&["--coordinator", "http://127.0.0.1:1"][..], "the coordinator at http://127.0.0.1:1 does not answer"),
    ] {
        let (code, text) = run(&[args, &["--bots", "1", "--seconds", "1"]].concat());
        assert_eq!(code, Some(1), "{args:?}: {text}");
        assert!(text.contains(says), "{args:?}: {text}");
    }
}
