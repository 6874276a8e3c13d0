//! The coordinator keeps the mesh topology in the database: when every
//! replica restarts, the tick grid and the region epochs carry on, so no
//! server can act under an epoch that was already given out.

use integration_tests::Mesh;
use serde_json::Value;

fn epochs(regions: &Value) -> Vec<(String, u64)> {
    let mut v: Vec<_> = regions
        .as_array()
        .expect("regions")
        .iter()
        .map(|r| (r["region"].as_str().expect("name").to_owned(), r["epoch"].as_u64().expect("epoch")))
        .collect();
    v.sort();
    v
}

#[test]
fn a_restarted_coordinator_restores_the_topology() -> anyhow::Result<()> {
    let mut mesh = Mesh::start(2, &[])?;
    let before = epochs(&mesh.wait_regions_owned()?);
    let status = mesh.get("/v1/status")?;
    assert!(before.iter().all(|(_, e)| *e > 0), "{before:?}");

    // Every coordinator goes away; so do the servers (they would be fenced:
    // the new coordinator listens elsewhere).
    for (p, _) in &mut mesh.servers {
        assert!(p.stop(), "{}", p.log_text());
    }
    mesh.servers.clear();
    mesh.restart_coordinator()?;
    let restored = mesh.get("/v1/status")?;
    assert_eq!(
        restored["mesh_epoch_unix_nanos"], status["mesh_epoch_unix_nanos"],
        "the tick grid is the same: servers keep agreeing on tick numbers"
    );
    assert_eq!(restored["servers_total"].as_u64(), Some(2), "the servers it knew: {restored}");
    assert!(mesh.coordinator.log_text().contains("restored the stored topology"));

    // The old servers never check in: they are declared dead, and the new
    // ones get the regions under newer epochs.
    mesh.start_server("gs-3", &[])?;
    mesh.start_server("gs-4", &[])?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let regions = mesh.get("/v1/regions")?;
        let owners: Vec<_> = regions.as_array().expect("regions").iter().map(|r| r["server_name"].clone()).collect();
        if owners.iter().all(|o| o == "gs-3" || o == "gs-4") {
            let after = epochs(&regions);
            for ((region, old), (_, new)) in before.iter().zip(&after) {
                assert!(new > old, "{region}: epoch {new} after the restart, {old} before");
            }
            break;
        }
        anyhow::ensure!(std::time::Instant::now() < deadline, "regions never moved to the new servers: {regions}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    Ok(())
}
