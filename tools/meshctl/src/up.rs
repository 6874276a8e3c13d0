//! `meshctl up`: a coordinator, game servers and bots as child processes on
//! loopback, a live one-line status, members that die restarted (with
//! backoff) while the rest runs on, and a clean stop on Ctrl-C.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;
use tokio::process::{Child, Command};

#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// Game servers to start.
    #[arg(long, default_value_t = 2)]
    game_servers: u32,
    /// Bots to start.
    #[arg(long, default_value_t = 20)]
    bots: u32,
    /// Start no bots.
    #[arg(long)]
    no_bots: bool,
    /// The coordinators' operator token (drain, split, merge, move,
    /// thresholds). The mesh listens on loopback only.
    #[arg(long, env = "PS_ADMIN_TOKEN", hide_env_values = true, default_value = "dev")]
    admin_token: String,
    /// Logs, ports files and the world (the embedded store in `world/`,
    /// kept across runs).
    #[arg(long, default_value = ".mesh-data")]
    data_dir: PathBuf,
    /// Keep the world in this database instead (`postgres://…` for
    /// CockroachDB or PostgreSQL, `memory:` for a world lost at exit).
    #[arg(long, env = "PS_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Redis for sessions, the player directory, rate limits and events
    /// (optional: without it they degrade to the database and per-process
    /// limits).
    #[arg(long, env = "PS_REDIS_URL", hide_env_values = true)]
    redis_url: Option<String>,
    /// The coordinator's HTTP port on 127.0.0.1.
    #[arg(long, default_value_t = 8080)]
    http_port: u16,
    /// The coordinator's gRPC port on 127.0.0.1.
    #[arg(long, default_value_t = 9090)]
    grpc_port: u16,
    /// Coordinator replicas (one Raft group; 3 to try failover). Replica
    /// `i` listens on the HTTP, gRPC and Raft ports plus `i - 1`.
    #[arg(long, default_value_t = 1)]
    coordinators: u16,
    /// The first replica's Raft port on 127.0.0.1.
    #[arg(long, default_value_t = 7946)]
    raft_port: u16,
    /// The world in root cubes of 2000 m.
    #[arg(long, default_value = "2x1x1")]
    world_size: String,
    /// Walking speed of players, m/s (fast, so bots cross regions often).
    #[arg(long, default_value_t = 8.0)]
    walk_speed: f32,
    /// Directory holding the mesh-coordinator, game-server and bot-swarm
    /// binaries (default: beside meshctl).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Leave a member that dies down (the rest runs on) instead of
    /// restarting it.
    #[arg(long)]
    no_restart: bool,
}

/// `meshctl kill` and `meshctl restart`: which member of which mesh.
#[derive(Debug, clap::Args)]
pub struct MemberArgs {
    /// The member, as `meshctl up` names it (`coordinator`,
    /// `coordinator-N`, `gs-N`, `bot-swarm`).
    name: String,
    /// The data directory `meshctl up` runs with.
    #[arg(long, default_value = ".mesh-data")]
    data_dir: PathBuf,
}

/// Where `meshctl up` says which process each member is (`run/members.json`:
/// its own pid, and each member's, `null` while it is down).
fn members_file(data_dir: &Path) -> PathBuf {
    data_dir.join("run").join("members.json")
}

/// Writes the members file (atomically: a reader never sees half of it).
fn write_members(data_dir: &Path, procs: &[&Proc]) -> anyhow::Result<()> {
    let members: serde_json::Map<String, Value> = procs
        .iter()
        .map(|p| (p.name.clone(), if p.down.is_some() { Value::Null } else { p.child.id().into() }))
        .collect();
    let v = serde_json::json!({ "meshctl": std::process::id(), "members": members });
    let path = members_file(data_dir);
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, v.to_string())?;
    std::fs::rename(&tmp, &path)?;
    Ok(())
}

/// The parent of process `pid`, from `/proc` (`None`: no such process).
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid …": comm may hold spaces and parentheses.
    stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()
}

/// Sends `signal` to a member of the running `meshctl up`, which starts it
/// again (unless it runs with --no-restart).
pub fn signal_member(args: &MemberArgs, signal: Signal) -> anyhow::Result<()> {
    let path = members_file(&args.data_dir);
    let no_mesh = || {
        anyhow::anyhow!(
            "no `meshctl up` is running with data directory {} (--data-dir names it)",
            args.data_dir.display()
        )
    };
    let text = std::fs::read_to_string(&path).map_err(|_| no_mesh())?;
    let v: Value = serde_json::from_str(&text).with_context(|| format!("{} is not readable", path.display()))?;
    let up = v["meshctl"].as_u64().and_then(|p| u32::try_from(p).ok()).ok_or_else(no_mesh)?;
    if parent_of(up).is_none() {
        return Err(no_mesh());
    }
    let members = v["members"].as_object().ok_or_else(no_mesh)?;
    let Some(pid) = members.get(&args.name) else {
        let names: Vec<&str> = members.keys().map(String::as_str).collect();
        anyhow::bail!("the mesh has no member {:?}; it has {}", args.name, names.join(", "));
    };
    let Some(pid) = pid.as_u64().and_then(|p| u32::try_from(p).ok()) else {
        anyhow::bail!("{} is down; meshctl up starts it again (see its log)", args.name);
    };
    // Only a child of that `meshctl up`: never a process that took a
    // recycled pid.
    anyhow::ensure!(
        parent_of(pid) == Some(up),
        "{} (pid {pid}) is no longer running under meshctl up (pid {up}); try again in a second",
        args.name
    );
    kill(Pid::from_raw(pid as i32), signal).with_context(|| format!("signalling {} (pid {pid})", args.name))?;
    let what = if signal == Signal::SIGKILL { "killed (SIGKILL)" } else { "asked to stop (SIGTERM)" };
    println!("{} (pid {pid}) {what}; meshctl up reports it and starts it again", args.name);
    Ok(())
}

/// A member of the mesh, and how to start it again.
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
    bin: PathBuf,
    args: Vec<String>,
    /// Restarts since it last ran a minute (the backoff's exponent).
    restarts: u32,
    started: Instant,
    /// Down since it exited: when it is to be started again (`None`: left down).
    down: Option<Option<Instant>>,
}

/// The longest wait before a member that keeps dying is started again.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A member that ran this long has its backoff start over.
const RAN_WELL: Duration = Duration::from_secs(60);

/// The last line of a log that is not blank, for a one-line error.
/// What a member's log says of why it stopped: its last error (a daemon
/// logs why it exits as an error, and other threads may log after that),
/// else its last line.
fn last_line(log: &Path) -> String {
    cause_in(&std::fs::read_to_string(log).unwrap_or_default())
}

fn cause_in(text: &str) -> String {
    let lines = || text.lines().rev().map(str::trim).filter(|l| !l.is_empty());
    let error = |l: &&str| l.contains(" ERROR ") || l.contains("\"level\":\"ERROR\"");
    lines().find(error).or_else(|| lines().next()).unwrap_or("(empty)").to_owned()
}

fn binary(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let p = dir.join(name);
    anyhow::ensure!(
        p.is_file(),
        "{} not found; build every binary first: cargo build --release --workspace --bins",
        p.display()
    );
    Ok(p)
}

fn spawn(name: &str, bin: &Path, args: &[String], log: &Path) -> anyhow::Result<Proc> {
    let out = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let child = start(bin, args, out)?;
    Ok(Proc {
        name: name.to_owned(),
        child,
        log: log.to_path_buf(),
        bin: bin.to_path_buf(),
        args: args.to_vec(),
        restarts: 0,
        started: Instant::now(),
        down: None,
    })
}

/// Starts a member that exited again, its log appended to (what it said
/// before it died stays).
fn respawn(p: &mut Proc) -> anyhow::Result<()> {
    let mut out = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(&p.log)
        .with_context(|| format!("opening {}", p.log.display()))?;
    writeln!(out, "--- meshctl up: starting {} again (restart {}) ---", p.name, p.restarts + 1)?;
    p.child = start(&p.bin, &p.args, out)?;
    p.restarts += 1;
    p.started = Instant::now();
    p.down = None;
    Ok(())
}

fn start(bin: &Path, args: &[String], out: std::fs::File) -> anyhow::Result<Child> {
    Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        // Own process group: Ctrl-C reaches meshctl only, which stops the
        // children in order.
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))
}

async fn wait_for_file(path: &Path, proc: &mut Proc, log: &Path) -> anyhow::Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(45);
    loop {
        if let Ok(text) = std::fs::read_to_string(path)
            && let Ok(v) = serde_json::from_str(&text)
        {
            return Ok(v);
        }
        if let Some(status) = proc.child.try_wait()? {
            anyhow::bail!(
                "{} exited ({status}) before it was ready; its log {} ends: {}",
                proc.name,
                log.display(),
                last_line(log)
            );
        }
        anyhow::ensure!(Instant::now() < deadline, "{} did not become ready; see {}", proc.name, log.display());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The local mesh's ticket signing key: made once (64 hex digits from the
/// OS random source, readable by this user only) and kept with the world,
/// so tickets and sessions survive a restart of the coordinator.
fn ticket_key(data_dir: &Path) -> anyhow::Result<PathBuf> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let path = data_dir.join("ticket.key");
    if path.is_file() {
        return Ok(path);
    }
    let mut seed = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut seed)?;
    let hex: String = seed.iter().map(|b| format!("{b:02x}")).collect();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    std::io::Write::write_all(&mut f, format!("{hex}\n").as_bytes())?;
    Ok(path)
}

async fn stop(procs: &mut [Proc]) {
    for p in procs.iter_mut() {
        if p.down.is_some() {
            eprintln!("  {} was down", p.name);
            continue;
        }
        if let Some(pid) = p.child.id() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
        match tokio::time::timeout(Duration::from_secs(8), p.child.wait()).await {
            Ok(Ok(status)) => eprintln!("  {} stopped ({status})", p.name),
            _ => {
                let _ = p.child.kill().await;
                eprintln!("  {} killed", p.name);
            }
        }
    }
}

pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    anyhow::ensure!((1..=16).contains(&args.game_servers), "--game-servers must be 1..=16");
    anyhow::ensure!((1..=7).contains(&args.coordinators), "--coordinators must be 1..=7 (3 or 5 for a real quorum)");
    let dir = match &args.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()?.parent().context("meshctl has no directory")?.to_path_buf(),
    };
    let (coord_bin, gs_bin, bots_bin) =
        (binary(&dir, "mesh-coordinator")?, binary(&dir, "game-server")?, binary(&dir, "bot-swarm")?);
    let run_dir = args.data_dir.join("run");
    let logs = args.data_dir.join("logs");
    std::fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    std::fs::create_dir_all(&logs)?;
    for f in std::fs::read_dir(&run_dir)? {
        let _ = std::fs::remove_file(f?.path());
    }

    let key_file = ticket_key(&args.data_dir)?;
    // The admin map's position feed between this run's processes only.
    let feed_token = format!(
        "feed-{:x}-{:x}",
        std::process::id(),
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos())
    );
    let storage = match &args.database_url {
        Some(url) => format!("--database-url={url}"),
        None => format!("--data-dir={}", args.data_dir.join("world").display()),
    };
    let redis: Vec<String> = args.redis_url.iter().map(|u| format!("--redis-url={u}")).collect();

    // Stopped in this order on the way out: bots, game servers, coordinator.
    let mut coordinator: Vec<Proc> = Vec::new();
    let mut servers: Vec<Proc> = Vec::new();
    let mut bots: Vec<Proc> = Vec::new();
    let result = async {
        let n = args.coordinators;
        let port = |base: u16, i: u16| base.checked_add(i).context("port out of range");
        let mut peers = Vec::new();
        for i in 0..n {
            peers.push(format!("{}=127.0.0.1:{}", i + 1, port(args.raft_port, i)?));
        }
        let names: Vec<String> =
            (1..=n).map(|id| if n == 1 { "coordinator".into() } else { format!("coordinator-{id}") }).collect();
        let mut grpcs = Vec::new();
        let mut http = String::new();
        for (i, name) in (0..n).zip(&names) {
            let id = i + 1;
            let ports = run_dir.join(format!("{name}.json"));
            let log = logs.join(format!("{name}.log"));
            coordinator.push(spawn(
                name,
                &coord_bin,
                &[
                    vec![
                        format!("--http-addr=127.0.0.1:{}", port(args.http_port, i)?),
                        format!("--grpc-addr=127.0.0.1:{}", port(args.grpc_port, i)?),
                        format!("--world-size={}", args.world_size),
                        format!("--ports-file={}", ports.display()),
                        format!("--ticket-key-file={}", key_file.display()),
                        // The Raft log of each replica is kept with the world.
                        format!("--raft-id={id}"),
                        format!("--raft-addr=127.0.0.1:{}", port(args.raft_port, i)?),
                        format!("--raft-peers={}", peers.join(",")),
                        format!("--raft-dir={}", args.data_dir.join(format!("raft-{id}")).display()),
                        // Every local bot logs in from 127.0.0.1.
                        "--logins-per-address=1000000".into(),
                        format!("--admin-token={}", args.admin_token),
                        format!("--map-feed-token={feed_token}"),
                        storage.clone(),
                    ],
                    redis.clone(),
                ]
                .concat(),
                &log,
            )?);
        }
        for (i, name) in names.iter().enumerate() {
            let log = logs.join(format!("{name}.log"));
            let c = wait_for_file(&run_dir.join(format!("{name}.json")), &mut coordinator[i], &log).await?;
            let h = c["http"].as_str().context("coordinator ports file lacks http")?.to_owned();
            let g = c["grpc"].as_str().context("coordinator ports file lacks grpc")?.to_owned();
            println!("{name}: http://{h} (gRPC {g})");
            if i == 0 {
                http = h;
            }
            grpcs.push(format!("http://{g}"));
        }
        let grpc = grpcs.join(",");
        println!("  map: http://{http}/   ·   try: meshctl servers   ·   logs in {}", logs.display());
        println!("  operator token in PS_ADMIN_TOKEN, or: meshctl --token <token> drain|split|merge|move …");

        for i in 1..=args.game_servers {
            let name = format!("gs-{i}");
            let ports = run_dir.join(format!("{name}.json"));
            let log = logs.join(format!("{name}.log"));
            let mut p = spawn(
                &name,
                &gs_bin,
                &[
                    vec![
                        format!("--name={name}"),
                        format!("--coordinator={grpc}"),
                        "--quic-addr=127.0.0.1:0".into(),
                        "--query-addr=127.0.0.1:0".into(),
                        "--http-addr=127.0.0.1:0".into(),
                        "--metrics-addr=127.0.0.1:0".into(),
                        "--grpc-addr=127.0.0.1:0".into(),
                        format!("--walk-speed={}", args.walk_speed),
                        format!("--ports-file={}", ports.display()),
                        // Every local bot connects from 127.0.0.1.
                        "--connects-per-ip-per-s=100000".into(),
                        format!("--map-feed-token={feed_token}"),
                        storage.clone(),
                    ],
                    redis.clone(),
                ]
                .concat(),
                &log,
            )?;
            let v = wait_for_file(&ports, &mut p, &log).await?;
            println!(
                "{name}: server {} · QUIC {} · metrics http://{}/metrics",
                v["server_id"],
                v["quic"].as_str().unwrap_or("?"),
                v["metrics"].as_str().unwrap_or("?")
            );
            servers.push(p);
        }
        if !args.no_bots && args.bots > 0 {
            bots.push(spawn(
                "bot-swarm",
                &bots_bin,
                &[format!("--coordinator=http://{http}"), format!("--bots={}", args.bots)],
                &logs.join("bot-swarm.log"),
            )?);
        }
        status_loop(&http, &args.data_dir, !args.no_restart, &mut coordinator, &mut servers, &mut bots).await
    }
    .await;
    eprintln!("\nstopping the mesh…");
    stop(&mut bots).await;
    stop(&mut servers).await;
    stop(&mut coordinator).await;
    let _ = std::fs::remove_file(members_file(&args.data_dir));
    result
}

async fn status_loop(
    http: &str,
    data_dir: &Path,
    restart: bool,
    coordinator: &mut [Proc],
    servers: &mut [Proc],
    bots: &mut [Proc],
) -> anyhow::Result<()> {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(1)).build()?;
    let tty = std::io::stdout().is_terminal();
    let mut every = tokio::time::interval(Duration::from_secs(1));
    let mut n = 0u64;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = term.recv() => return Ok(()),
        }
        let mut down = Vec::new();
        for p in coordinator.iter_mut().chain(servers.iter_mut()).chain(bots.iter_mut()) {
            supervise(p, restart, tty)?;
            if p.down.is_some() {
                down.push(p.name.clone());
            }
        }
        let all: Vec<&Proc> = coordinator.iter().chain(servers.iter()).chain(bots.iter()).collect();
        if let Err(e) = write_members(data_dir, &all) {
            eprintln!(
                "cannot write {}: {e:#} (meshctl kill and restart will not find the members)",
                members_file(data_dir).display()
            );
        }
        let down = if down.is_empty() { String::new() } else { format!(" · down: {}", down.join(", ")) };
        let line = match client.get(format!("http://{http}/v1/status")).send().await {
            Ok(r) => match r.json::<Value>().await {
                Ok(s) => format!(
                    "servers {}/{} · regions owned {}/{} · players {} · handoffs {} · tick p99 {:.2} ms · raft leader {} term {}",
                    s["servers_alive"],
                    s["servers_total"],
                    s["regions_owned"],
                    s["regions"],
                    s["players"],
                    s["transfers_total"],
                    s["tick_p99_ms_max"].as_f64().unwrap_or(0.0),
                    s["raft"]["leader"],
                    s["raft"]["term"]
                ),
                Err(e) => format!("coordinator status unreadable: {e}"),
            },
            Err(e) => format!("coordinator unreachable: {e}"),
        } + &down;
        n += 1;
        if tty {
            print!("\r\x1b[2K{line}");
            let _ = std::io::stdout().flush();
        } else if n % 5 == 1 {
            println!("{line}");
        }
    }
}

/// A member that exited is reported (one line, with the cause its log
/// gives) and, when `restart`, started again after a backoff that doubles
/// while it keeps dying (1 s, 2 s, … at most [`MAX_BACKOFF`]).
fn supervise(p: &mut Proc, restart: bool, tty: bool) -> anyhow::Result<()> {
    match p.down {
        None => {
            let Some(status) = p.child.try_wait()? else { return Ok(()) };
            if p.started.elapsed() >= RAN_WELL {
                p.restarts = 0;
            }
            let wait = Duration::from_secs(1u64 << p.restarts.min(5)).min(MAX_BACKOFF);
            let then = if restart { format!("starting it again in {} s", wait.as_secs()) } else { "left down".into() };
            let clear = if tty { "\r\x1b[2K" } else { "" };
            eprintln!(
                "{clear}{} exited ({status}); {then}; its log {} ends: {}",
                p.name,
                p.log.display(),
                last_line(&p.log)
            );
            p.down = Some(restart.then(|| Instant::now() + wait));
        }
        Some(Some(at)) if Instant::now() >= at => {
            respawn(p)?;
            eprintln!("{} started again", p.name);
        }
        Some(_) => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_cause_is_the_last_error_else_the_last_line() {
        let log = "2026-12-06T23:32:14Z INFO mesh_coordinator: starting\n\
                   2026-12-06T23:32:14Z ERROR svc: exiting: binding 127.0.0.1:80: Address already in use\n\
                   2026-12-06T23:32:14Z INFO mesh_coordinator::node: raft replica stopped\n\n";
        assert!(super::cause_in(log).contains("Address already in use"));
        let json = "{\"level\":\"ERROR\",\"fields\":{\"message\":\"exiting: no\"}}\n{\"level\":\"INFO\"}\n";
        assert!(super::cause_in(json).contains("exiting: no"));
        assert_eq!(super::cause_in("a\nb\n"), "b");
        assert_eq!(super::cause_in(""), "(empty)");
    }
}
