//! Three coordinator replicas: SIGKILL the leader, a new one is elected and
//! commits writes, the game servers keep their regions (same owners, same
//! epochs, nobody declared dead), and the killed replica comes back from its
//! log and catches up.

use std::time::{Duration, Instant};

use integration_tests::cluster::Cluster;
use integration_tests::metric;
use serde_json::{Value, json};

fn owners(regions: &Value) -> Vec<(String, u64, u64)> {
    let mut v: Vec<_> = regions
        .as_array()
        .expect("regions")
        .iter()
        .map(|r| {
            (
                r["region"].as_str().expect("name").to_owned(),
                r["server_id"].as_u64().expect("owned"),
                r["epoch"].as_u64().expect("epoch"),
            )
        })
        .collect();
    v.sort();
    v
}

fn thresholds(split_players: u64) -> Value {
    json!({"split_players": split_players, "split_cpu": 0.75, "merge_players": 8, "merge_cpu": 0.25, "cooldown_ms": 30000})
}

fn wait_for(what: &str, within: Duration, mut ok: impl FnMut() -> anyhow::Result<bool>) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        if ok()? {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn killing_the_leader_elects_another_and_servers_keep_their_regions() -> anyhow::Result<()> {
    let mut c = Cluster::start(3, 2, &[])?;
    let leader = c.wait_leader(Duration::from_secs(20))?;
    let before = owners(&c.wait_regions_owned(leader)?);

    // A write made on a follower commits and reaches every replica.
    let follower = (leader + 1) % 3;
    let (code, body) = c.put_thresholds(follower, &thresholds(50))?;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["split_players"], 50);
    for i in 0..3 {
        wait_for("the write on every replica", Duration::from_secs(5), || {
            Ok(c.get(i, "/v1/thresholds")?["split_players"] == 50)
        })?;
    }
    // Bad values are refused by the state machine, on any replica.
    let (code, body) = c.put_thresholds(
        follower,
        &json!({"split_players": 10, "split_cpu": 0.7, "merge_players": 9, "merge_cpu": 0.1, "cooldown_ms": 30000}),
    )?;
    assert_eq!((code, body["error"].as_str()), (400, Some("bad_thresholds")), "{body}");

    let status = c.get(leader, "/v1/status")?;
    let term = status["raft"]["term"].as_u64().expect("term");
    let epoch = status["mesh_epoch_unix_nanos"].clone();
    c.kill_replica(leader);
    let killed = Instant::now();
    let new_leader = c.wait_leader(Duration::from_secs(10))?;
    assert_ne!(new_leader, leader);
    // The new leader commits a write (retrying while the election settles).
    wait_for("a write committed by the new leader", Duration::from_secs(10), || {
        Ok(c.put_thresholds(new_leader, &thresholds(60))?.0 == 200)
    })?;
    println!("failover: {} ms from SIGKILL to a committed write", killed.elapsed().as_millis());
    let status = c.get(new_leader, "/v1/status")?;
    assert!(status["raft"]["term"].as_u64() > Some(term), "{status}");

    // Longer than the heartbeat timeout: servers that could not heartbeat
    // during the election must not have been declared dead.
    std::thread::sleep(Duration::from_secs(3));
    let after = owners(&c.get(new_leader, "/v1/regions")?);
    assert_eq!(after, before, "owners and epochs changed across the failover");
    let status = c.get(new_leader, "/v1/status")?;
    assert_eq!(status["servers_alive"], 2, "{status}");
    let metrics = integration_tests::blocking_text(&format!("http://{}/metrics", c.replicas[new_leader].http))?;
    assert_eq!(metric(&metrics, "mesh_server_deaths_total", ""), 0.0);
    for (p, _) in &mut c.servers {
        assert!(p.child.try_wait()?.is_none(), "{} stopped:\n{}", p.name, p.log_text());
    }

    // The killed replica restarts from its log and catches up.
    c.start_replica(leader)?;
    wait_for("the restarted replica catching up", Duration::from_secs(15), || {
        let s = c.get(leader, "/v1/status")?;
        let t = c.get(leader, "/v1/thresholds")?;
        Ok(s["raft"]["leader"].as_u64().is_some_and(|l| l > 0) && t["split_players"] == 60)
    })?;
    assert_eq!(owners(&c.get(leader, "/v1/regions")?), before);
    assert_eq!(
        c.get(leader, "/v1/status")?["mesh_epoch_unix_nanos"],
        epoch,
        "the restarted replica replays the same log: same tick grid"
    );
    Ok(())
}
