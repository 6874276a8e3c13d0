//! The bot swarm as a load-test tool: limits on the command line decide its
//! exit code and are named when they fail; a missing coordinator is a clear
//! error, not a hang.

use integration_tests::{Mesh, Proc};
use serde_json::Value;

#[test]
fn limits_decide_the_exit_code_and_the_report_names_the_failing_ones() -> anyhow::Result<()> {
    let mesh = Mesh::start(1, &[])?;
    mesh.wait_regions_owned()?;
    let run = |name: &str, limits: &[&str]| -> anyhow::Result<(Option<i32>, String, Value)> {
        let args = [&["--bots=2", "--seconds=4", "--path=500,10,500;520,10,500"], limits].concat();
        let (mut p, report) = mesh.swarm(name, &args)?;
        let status = p.child.wait()?;
        Ok((status.code(), p.log_text(), Mesh::summary(&report)?))
    };
    let (code, log, summary) = run("easy", &["--max-rtt-p99-ms=1000", "--max-errors=0"])?;
    assert_eq!(code, Some(0), "{log}");
    assert!(summary["verdicts"].as_array().unwrap().iter().all(|v| v["ok"] == true), "{summary}");

    let (code, log, summary) = run("strict", &["--max-rtt-p99-ms=0.000001", "--max-errors=0"])?;
    assert_eq!(code, Some(3), "{log}");
    assert!(log.contains("limits not met: rtt_p99_ms"), "{log}");
    let failed: Vec<&str> = summary["verdicts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["ok"] == false)
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert_eq!(failed, ["rtt_p99_ms"], "{summary}");

    // Credentials the coordinator refuses: no retrying, a clear message, exit 2.
    let (status, body) =
        mesh.post("/v1/accounts", None, serde_json::json!({"name": "refused-1", "password": "the-right-one"}))?;
    assert_eq!(status, 201, "{body}");
    let started = std::time::Instant::now();
    let (mut p, _) =
        mesh.swarm("refused", &["--bots=1", "--seconds=20", "--path=500,10,500", "--password=a-wrong-one"])?;
    let status = p.child.wait()?;
    assert_eq!(status.code(), Some(2), "{}", p.log_text());
    assert!(
        p.log_text().contains("no bot could join the mesh: could not join: login as refused-1 refused: 401"),
        "{}",
        p.log_text()
    );
    assert!(started.elapsed().as_secs() < 10, "gave up at once: {:?}", started.elapsed());

    // Nobody there: a clear message and a failure, at once.
    let mut p = Proc::start(
        "nowhere",
        "bot-swarm",
        &["--coordinator=http://127.0.0.1:1".into(), "--bots=1".into(), "--seconds=2".into()],
        mesh.dir.path(),
    )?;
    let status = p.child.wait()?;
    assert!(!status.success());
    assert!(p.log_text().contains("does not answer"), "{}", p.log_text());
    Ok(())
}

#[test]
fn bots_that_lose_their_server_reconnect_with_backoff_and_count_it() -> anyhow::Result<()> {
    let mut mesh = Mesh::start(2, &[])?;
    let regions = mesh.wait_regions_owned()?;
    let owner = regions.as_array().unwrap().iter().find(|r| r["region"] == "L0:0,0,0").unwrap()["server_id"].as_u64();
    let (mut swarm, dir) =
        mesh.swarm("lost", &["--bots=2", "--seconds=14", "--path=500,10,500;520,10,500", "--max-errors=0"])?;
    std::thread::sleep(std::time::Duration::from_secs(4));
    // SIGKILL the server the bots play on; the coordinator gives its region
    // to the other one within 2 s.
    let index = mesh
        .servers
        .iter()
        .position(|(_, v)| v["server_id"].as_u64() == owner)
        .or_else(|| owner.map(|id| id as usize - 1))
        .expect("the owner's process");
    let (p, _) = &mut mesh.servers[index];
    p.child.kill()?;
    let _ = p.child.wait();
    let status = swarm.child.wait()?;
    let r = Mesh::summary(&dir)?;
    // The lost connections are errors: the --max-errors=0 limit fails, by name.
    assert_eq!(status.code(), Some(3), "{}", swarm.log_text());
    assert!(swarm.log_text().contains("limits not met: errors"), "{}", swarm.log_text());
    for bot in r["per_bot"].as_array().unwrap() {
        assert!(bot["reconnects"].as_u64() >= Some(1), "{bot}");
        let servers: Vec<&String> = bot["acks_by_server"].as_object().unwrap().keys().collect();
        assert_eq!(servers.len(), 2, "played on the other server after reconnecting: {bot}");
        assert_eq!(bot["ack_regressions"], 0, "{bot}");
    }
    Ok(())
}

#[test]
fn ctrl_c_ends_a_run_with_its_report_and_bots_dig_build_grab_and_throw() -> anyhow::Result<()> {
    let mesh = Mesh::start(1, &[])?;
    mesh.wait_regions_owned()?;
    // No duration: the run lasts until Ctrl-C. Both bots are throwers; with
    // seed 3 their first builds (their own debris) come within 5 s.
    let (mut swarm, report) =
        mesh.swarm("work", &["--bots=2", "--seconds=0", "--mix=grab_throw", "--seed=3", "--max-errors=0"])?;
    let started = std::time::Instant::now();
    std::thread::sleep(std::time::Duration::from_secs(22));
    let pid = nix::unistd::Pid::from_raw(swarm.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT)?;
    let status = swarm.child.wait()?;
    assert_eq!(status.code(), Some(0), "{}", swarm.log_text());
    let r = Mesh::summary(&report)?;
    let seconds = r["seconds"].as_f64().unwrap();
    assert!((20.0..started.elapsed().as_secs_f64()).contains(&seconds), "ended at the signal: {seconds} s");
    assert!(std::fs::read_to_string(report.join("report.html"))?.contains("Digging, building"), "the page too");
    let w = &r["work"];
    // Each bot built and dug at least once; every edit was acknowledged durable.
    assert!(w["edits_done"].as_u64() >= Some(4), "{w}");
    assert_eq!(w["edits_done"], w["edits_sent"], "{w}");
    assert!(w["throws"].as_u64() >= Some(1), "{w}");
    // The server agrees: its hands held props and let them go.
    let addr = mesh.servers[0].1["metrics"].as_str().unwrap().to_owned();
    let metrics = integration_tests::blocking_text(&format!("http://{addr}/metrics"))?;
    assert!(integration_tests::metric(&metrics, "props_grabbed_total", "") >= 1.0, "{w}");
    assert!(integration_tests::metric(&metrics, "structures_broken_total", "") >= 1.0, "{w}");
    assert!(integration_tests::metric(&metrics, "world_edits_total", "") >= 4.0, "{w}");
    Ok(())
}
