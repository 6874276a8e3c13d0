//! `meshctl`'s expected failures, with the real binaries: one clear line on
//! stderr and a non-zero exit, never a backtrace, even with `RUST_BACKTRACE`
//! set; and `meshctl up` starting a member that died again.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use integration_tests::bin_dir;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

/// Asserts `stderr` holds exactly one line, containing `want`, and no trace
/// of a backtrace or of anyhow's multi-line report.
fn assert_one_line(stderr: &str, want: &str) {
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line, got:\n{stderr}");
    assert!(lines[0].contains(want), "expected {want:?} in {:?}", lines[0]);
    for bad in ["backtrace", "Caused by", "panicked", "Error: "] {
        assert!(!stderr.contains(bad), "{bad:?} in:\n{stderr}");
    }
}

#[test]
fn an_unreachable_coordinator_is_one_line() {
    // A port nobody listens on: bound, then closed.
    let port = free_port();
    for args in [vec!["status"], vec!["servers", "--json"], vec!["drain", "gs-1"], vec!["split", "L0:0,0,0"]] {
        let out = Command::new(bin_dir().join("meshctl"))
            .arg(format!("--coordinator=http://127.0.0.1:{port}"))
            .args(&args)
            .env("RUST_BACKTRACE", "full")
            .output()
            .expect("running meshctl");
        assert_eq!(out.status.code(), Some(1), "meshctl {args:?}");
        assert!(out.stdout.is_empty(), "meshctl {args:?} printed {:?}", String::from_utf8_lossy(&out.stdout));
        assert_one_line(
            &String::from_utf8_lossy(&out.stderr),
            "meshctl: cannot reach the coordinator at http://127.0.0.1:",
        );
    }
}

/// The pid of the process whose command line holds every one of `needles`.
fn pid_of(needles: &[&str]) -> Option<i32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
        let cmd = String::from_utf8_lossy(&cmd);
        needles.iter().all(|n| cmd.contains(n)).then_some(pid)
    })
}

fn wait_status(http: u16, deadline: Instant, want: &str) -> anyhow::Result<()> {
    loop {
        let body = integration_tests::blocking_text(&format!("http://127.0.0.1:{http}/v1/status")).unwrap_or_default();
        if body.replace(' ', "").contains(want) {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "the mesh never reported {want}; last status: {body}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `meshctl kill|restart NAME` against the mesh in `data`.
fn member(data: &Path, args: &[&str]) -> anyhow::Result<std::process::Output> {
    Ok(Command::new(bin_dir().join("meshctl")).args(args).arg("--data-dir").arg(data).stdin(Stdio::null()).output()?)
}

fn read_to_string(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

#[test]
fn a_member_of_meshctl_up_that_dies_is_started_again_and_the_mesh_runs_on() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("mesh");
    let (http, grpc, raft) = (free_port(), free_port(), free_port());
    let stderr_path = dir.path().join("stderr");
    let mut up = Command::new(bin_dir().join("meshctl"))
        .args(["up", "--no-bots", "--game-servers", "2", "--database-url", "memory:"])
        .arg("--data-dir")
        .arg(&data)
        .args(["--http-port", &http.to_string(), "--grpc-port", &grpc.to_string(), "--raft-port", &raft.to_string()])
        .arg("--bin-dir")
        .arg(bin_dir())
        .env("RUST_BACKTRACE", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr_path)?)
        .spawn()
        .context("starting meshctl up")?;
    let result = (|| -> anyhow::Result<()> {
        // Both servers up, and meshctl past its start (it has read gs-2's
        // ports file and runs its status loop).
        wait_status(http, Instant::now() + Duration::from_secs(90), "\"servers_alive\":2")?;
        let ports = data.join("run").join("gs-2.json");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ports.is_file() {
            anyhow::ensure!(Instant::now() < deadline, "no ports file from gs-2");
            std::thread::sleep(Duration::from_millis(100));
        }
        std::thread::sleep(Duration::from_secs(2));
        let ports = ports.to_str().context("a UTF-8 temp path")?;
        let killed = pid_of(&["--name=gs-2", ports]).context("gs-2 is not running")?;
        // A name the mesh does not have is refused, naming those it has.
        let out = member(&data, &["kill", "gs-9"])?;
        anyhow::ensure!(!out.status.success(), "killed gs-9?");
        assert_one_line(&String::from_utf8_lossy(&out.stderr), "meshctl: the mesh has no member \"gs-9\"; it has");
        let out = member(&data, &["kill", "gs-2"])?;
        anyhow::ensure!(out.status.success(), "meshctl kill gs-2: {}", String::from_utf8_lossy(&out.stderr));
        let said = String::from_utf8_lossy(&out.stdout);
        anyhow::ensure!(said.starts_with(&format!("gs-2 (pid {killed}) killed (SIGKILL)")), "{said}");
        // Reported, started again; meshctl up runs on.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !read_to_string(&stderr_path).contains("gs-2 started again") {
            anyhow::ensure!(up.try_wait()?.is_none(), "meshctl up stopped when gs-2 died");
            anyhow::ensure!(Instant::now() < deadline, "gs-2 was not started again");
            std::thread::sleep(Duration::from_millis(100));
        }
        let again = pid_of(&["--name=gs-2", ports]).context("gs-2 is not running again")?;
        anyhow::ensure!(again != killed, "the same gs-2 process");
        // Once the coordinator has declared the dead one dead (2 s), two
        // servers are alive again and own the world.
        std::thread::sleep(Duration::from_secs(3));
        wait_status(http, Instant::now() + Duration::from_secs(60), "\"servers_alive\":2")?;
        wait_status(http, Instant::now() + Duration::from_secs(30), "\"regions_owned\":2")?;
        // A clean stop of gs-1, started again too.
        let out = member(&data, &["restart", "gs-1"])?;
        anyhow::ensure!(out.status.success(), "meshctl restart gs-1: {}", String::from_utf8_lossy(&out.stderr));
        let deadline = Instant::now() + Duration::from_secs(30);
        while !read_to_string(&stderr_path).contains("gs-1 started again") {
            anyhow::ensure!(up.try_wait()?.is_none(), "meshctl up stopped when gs-1 stopped");
            anyhow::ensure!(Instant::now() < deadline, "gs-1 was not started again");
            std::thread::sleep(Duration::from_millis(100));
        }
        anyhow::ensure!(up.try_wait()?.is_none(), "meshctl up stopped");
        Ok(())
    })();
    if up.try_wait()?.is_none() {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(up.id() as i32), nix::sys::signal::Signal::SIGINT);
    }
    let code = up.wait()?.code();
    let stderr = read_to_string(&stderr_path);
    result.with_context(|| format!("meshctl up's stderr:\n{stderr}"))?;
    assert_eq!(code, Some(0), "a clean stop; stderr:\n{stderr}");
    // No mesh runs there now: said in one line.
    let out = member(&data, &["kill", "gs-1"])?;
    assert!(!out.status.success());
    assert_one_line(&String::from_utf8_lossy(&out.stderr), "meshctl: no `meshctl up` is running with data directory");
    // One line said why it died, and that it would be started again.
    let said: Vec<&str> = stderr.lines().filter(|l| l.contains("gs-2 exited")).collect();
    assert_eq!(said.len(), 1, "{stderr}");
    assert!(said[0].contains("signal: 9") && said[0].contains("starting it again in 1 s"), "{}", said[0]);
    for bad in ["backtrace", "Caused by", "panicked", "meshctl:"] {
        assert!(!stderr.contains(bad), "{bad:?} in:\n{stderr}");
    }
    // What it logged before it died is kept, the new run after it.
    let log = read_to_string(&data.join("logs").join("gs-2.log"));
    assert!(log.contains("--- meshctl up: starting gs-2 again (restart 1) ---"), "{log}");
    // Nothing of the mesh is left running.
    let run = data.join("run");
    let run = run.to_str().context("a UTF-8 temp path")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Some(pid) = pid_of(&[run]) {
        anyhow::ensure!(Instant::now() < deadline, "process {pid} of the mesh outlived meshctl up");
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

#[test]
fn a_member_that_cannot_start_is_one_line() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    // The coordinator's HTTP port is taken: it exits before it is ready.
    let taken = TcpListener::bind("127.0.0.1:0")?;
    let http = taken.local_addr()?.port();
    let out = Command::new(bin_dir().join("meshctl"))
        .args(["up", "--no-bots", "--database-url", "memory:"])
        .arg("--data-dir")
        .arg(dir.path())
        .args(["--http-port", &http.to_string(), "--grpc-port", &free_port().to_string()])
        .args(["--raft-port", &free_port().to_string()])
        .arg("--bin-dir")
        .arg(bin_dir())
        .env("RUST_BACKTRACE", "1")
        .stdin(Stdio::null())
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let failure: Vec<&str> = stderr.lines().filter(|l| l.starts_with("meshctl:")).collect();
    assert_eq!(failure.len(), 1, "{stderr}");
    assert!(failure[0].contains("coordinator exited"), "{}", failure[0]);
    assert!(failure[0].contains("Address already in use"), "the cause is named: {}", failure[0]);
    assert!(!stderr.contains("backtrace"), "{stderr}");
    // The coordinator's own log says it in one line too.
    let log = read_to_string(&dir.path().join("logs").join("coordinator.log"));
    assert!(!log.contains("Stack backtrace") && !log.contains("Caused by"), "{log}");
    Ok(())
}
