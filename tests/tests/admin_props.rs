//! The game server's admin endpoint spawns props: only with the operator's
//! bearer token, only valid props, and the world really holds them after.
//! Every refusal of its HTTP API is `{"error", "detail"}` JSON.

use std::time::Duration;

use integration_tests::{Mesh, blocking_text, metric};

#[test]
fn props_are_spawned_by_an_admin_with_the_token_only() -> anyhow::Result<()> {
    let mesh = Mesh::start(1, &["--admin-token=s3cret"])?;
    mesh.wait_regions_owned()?;
    let server = &mesh.servers[0].1;
    let http = server["http"].as_str().expect("http address");
    let metrics_addr = server["metrics"].as_str().expect("metrics address");
    let url = format!("http://{http}/v1/props");
    let rt = tokio::runtime::Runtime::new()?;
    let client = reqwest::Client::new();
    let post = |token: Option<&str>, body: serde_json::Value| {
        let mut r = client.post(&url).json(&body).timeout(Duration::from_secs(5));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        rt.block_on(async move {
            let resp = r.send().await?;
            let status = resp.status().as_u16();
            let v: serde_json::Value = resp.json().await?;
            anyhow::Ok((status, v))
        })
    };
    let one = serde_json::json!({ "props": [
        { "pos": [500.0, 120.0, 500.0], "shape": "box", "half": [0.3, 0.3, 0.3] },
        { "pos": [502.0, 120.0, 500.0], "shape": "ball", "radius": 0.2, "vel": [1.0, 0.0, 0.0] }
    ]});
    // A refusal: its status, a stable label and what is wrong.
    let refused = |(status, body): (u16, serde_json::Value), want: u16, label: &str| {
        assert_eq!((status, body["error"].as_str()), (want, Some(label)), "{body}");
        assert!(body["detail"].as_str().is_some_and(|d| !d.is_empty()), "{body}");
    };
    refused(post(None, one.clone())?, 401, "unauthorized");
    refused(post(Some("wrong"), one.clone())?, 401, "unauthorized");
    refused(post(Some("s3cret"), serde_json::json!({ "props": [{ "pos": [1.0, 2.0] }] }))?, 400, "bad_request");
    let (status, body) = post(
        Some("s3cret"),
        serde_json::json!({ "props": [{ "pos": [500.0, 120.0, 500.0], "shape": "ball", "radius": 50.0 }] }),
    )?;
    refused((status, body), 422, "invalid_props");
    // What no handler takes is refused the same way.
    let get = |path: &str| {
        let r = client.get(format!("http://{http}{path}")).bearer_auth("s3cret").timeout(Duration::from_secs(5));
        rt.block_on(async move {
            let resp = r.send().await?;
            let status = resp.status().as_u16();
            let v: serde_json::Value = resp.json().await?;
            anyhow::Ok((status, v))
        })
    };
    refused(get("/v1/chunks/1/two/3")?, 400, "bad_request");
    refused(get("/v1/no-such-thing")?, 404, "no_route");
    refused(get("/v1/props")?, 405, "method_not_allowed");
    let (status, body) = post(
        Some("s3cret"),
        serde_json::json!({ "props": [{ "pos": [5000.0, 120.0, 500.0], "shape": "ball", "radius": 0.2 }] }),
    )?;
    assert_eq!(status, 422, "outside the world: {body}");
    let before = metric(&blocking_text(&format!("http://{metrics_addr}/metrics"))?, "server_entities", "");
    let (status, body) = post(Some("s3cret"), one)?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["ids"].as_array().map(Vec::len), Some(2));
    std::thread::sleep(Duration::from_millis(300));
    let text = blocking_text(&format!("http://{metrics_addr}/metrics"))?;
    assert_eq!(metric(&text, "server_entities", "") - before, 2.0);
    Ok(())
}
