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
