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
        let dir = mesh.dir.path().join(name);
        let mut args = vec![
            format!("--coordinator=http://{}", mesh.http),
            "--bots=2".into(),
            "--seconds=4".into(),
            "--path=500,10,500;520,10,500".into(),
            format!("--account-prefix={name}-"),
            format!("--report={}", dir.display()),
        ];
        args.extend(limits.iter().map(|s| (*s).to_owned()));
        let mut p = Proc::start(name, "bot-swarm", &args, mesh.dir.path())?;
        let status = p.child.wait()?;
        let summary: Value = serde_json::from_slice(&std::fs::read(dir.join("summary.json"))?)?;
        Ok((status.code(), p.log_text(), summary))
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
    let dir = mesh.dir.path().join("lost");
    let mut swarm = Proc::start(
        "lost",
        "bot-swarm",
        &[
            format!("--coordinator=http://{}", mesh.http),
            "--bots=2".into(),
            "--seconds=14".into(),
            "--path=500,10,500;520,10,500".into(),
            "--account-prefix=lost-".into(),
            "--max-errors=0".into(),
            format!("--report={}", dir.display()),
        ],
        mesh.dir.path(),
    )?;
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
    let r: Value = serde_json::from_slice(&std::fs::read(dir.join("summary.json"))?)?;
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
