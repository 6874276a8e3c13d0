//! What a swarm run saw over time, and the report it leaves: a JSON summary
//! and a self-contained HTML page of plots (inline SVG, nothing fetched).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::{Live, SwarmReport};

/// One second of the run, as the whole swarm saw it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Sample {
    /// Seconds since the start.
    pub t: f64,
    pub connected: u64,
    pub snapshots_per_s: f64,
    pub handoffs_per_s: f64,
    pub errors: u64,
    /// Bytes at the bots' UDP sockets (QUIC included), per connected bot.
    pub up_kbps_per_bot: f64,
    pub down_kbps_per_bot: f64,
    /// Round-trip times the bots' QUIC connections measured in that second.
    pub rtt_p50_ms: f64,
    pub rtt_p99_ms: f64,
}

/// A region split, merge or balancer move, as the coordinator counted it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegionChange {
    pub t: f64,
    pub kind: String,
    pub count: u64,
}

/// What the sampler gathered.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Timeline {
    pub samples: Vec<Sample>,
    /// Tick duration p99 (ms) per game server and second, from each
    /// server's `/metrics` (histogram deltas).
    pub server_tick_p99_ms: BTreeMap<String, Vec<[f64; 2]>>,
    pub region_changes: Vec<RegionChange>,
    /// Every RTT sample of the run, ms (for the overall percentiles).
    #[serde(skip)]
    pub rtt_all_ms: Vec<f64>,
}

pub fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    (v[i.min(v.len() - 1)] * 100.0).round() / 100.0
}

/// Histogram buckets (`le` → cumulative count) of `name` in Prometheus text.
pub fn buckets(text: &str, name: &str) -> Vec<(f64, f64)> {
    let prefix = format!("{name}_bucket{{");
    let mut out: Vec<(f64, f64)> = text
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
            let v = l.rsplit_once(' ')?.1.parse().ok()?;
            Some((le, v))
        })
        .collect();
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    out
}

/// The p-quantile of the observations between two scrapes of a histogram
/// (upper bucket bound; `None` without observations).
pub fn quantile_between(before: &[(f64, f64)], after: &[(f64, f64)], p: f64) -> Option<f64> {
    let delta: Vec<(f64, f64)> =
        after.iter().map(|(le, v)| (*le, v - before.iter().find(|(b, _)| b == le).map_or(0.0, |(_, c)| *c))).collect();
    let total = delta.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let want = total * p;
    delta.iter().find(|(_, c)| *c >= want).map(|(le, _)| if le.is_finite() { *le } else { f64::NAN })
}

/// Counter values of `name` by the value of `label`.
pub fn counters_by(text: &str, name: &str, label: &str) -> BTreeMap<String, f64> {
    let prefix = format!("{name}{{");
    let key = format!("{label}=\"");
    text.lines()
        .filter(|l| l.starts_with(&prefix))
        .filter_map(|l| {
            let v = l.split(&key).nth(1)?.split('"').next()?.to_owned();
            Some((v, l.rsplit_once(' ')?.1.parse().ok()?))
        })
        .collect()
}

/// Samples the swarm and the mesh once a second until `stop`.
pub async fn sample(
    live: Arc<Live>,
    http: reqwest::Client,
    coordinator: String,
    token: Option<String>,
    stop: CancellationToken,
) -> Timeline {
    let started = Instant::now();
    let mut tl = Timeline::default();
    let mut prev = (0u64, 0u64, 0u64, 0u64);
    let mut prev_hist: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    let mut prev_changes: Option<BTreeMap<String, f64>> = None;
    let mut every = tokio::time::interval(Duration::from_secs(1));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    every.tick().await;
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = stop.cancelled() => break,
        }
        let t = started.elapsed().as_secs_f64();
        let now = (
            live.snapshots.load(Ordering::Relaxed),
            live.handoffs.load(Ordering::Relaxed),
            live.bytes_up.load(Ordering::Relaxed),
            live.bytes_down.load(Ordering::Relaxed),
        );
        let connected = live.connected.load(Ordering::Relaxed);
        let mut rtt: Vec<f64> = match live.rtt_us.lock() {
            Ok(mut v) => v.drain(..).map(|us| f64::from(us) / 1000.0).collect(),
            Err(_) => Vec::new(),
        };
        tl.rtt_all_ms.extend(&rtt);
        let per_bot = |bytes: u64| bytes as f64 * 8.0 / 1000.0 / connected.max(1) as f64;
        let (p50, p99) = (percentile(&mut rtt, 0.5), percentile(&mut rtt, 0.99));
        if !rtt.is_empty() {
            live.rtt_p50_us.store((p50 * 1000.0) as u64, Ordering::Relaxed);
            live.rtt_p99_us.store((p99 * 1000.0) as u64, Ordering::Relaxed);
        }
        tl.samples.push(Sample {
            t,
            connected,
            snapshots_per_s: (now.0 - prev.0) as f64,
            handoffs_per_s: (now.1 - prev.1) as f64,
            errors: live.errors.load(Ordering::Relaxed),
            up_kbps_per_bot: per_bot(now.2 - prev.2),
            down_kbps_per_bot: per_bot(now.3 - prev.3),
            rtt_p50_ms: p50,
            rtt_p99_ms: p99,
        });
        prev = now;
        scrape_mesh(&http, &coordinator, token.as_deref(), t, &mut tl, &mut prev_hist, &mut prev_changes).await;
    }
    tl
}

async fn get_text(http: &reqwest::Client, url: &str, token: Option<&str>) -> Option<String> {
    let mut req = http.get(url).timeout(Duration::from_millis(800));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = req.send().await.ok()?;
    if !r.status().is_success() {
        return None;
    }
    r.text().await.ok()
}

/// Tick p99 per server (from its `/metrics`) and region changes (from the
/// coordinator's). A mesh that does not answer leaves gaps, not errors.
async fn scrape_mesh(
    http: &reqwest::Client,
    coordinator: &str,
    token: Option<&str>,
    t: f64,
    tl: &mut Timeline,
    prev_hist: &mut BTreeMap<String, Vec<(f64, f64)>>,
    prev_changes: &mut Option<BTreeMap<String, f64>>,
) {
    if let Some(text) = get_text(http, &format!("{coordinator}/metrics"), None).await {
        let now = counters_by(&text, "mesh_region_changes_total", "kind");
        if let Some(before) = prev_changes.as_ref() {
            for (kind, v) in &now {
                let d = v - before.get(kind).copied().unwrap_or(0.0);
                if d > 0.0 {
                    tl.region_changes.push(RegionChange { t, kind: kind.clone(), count: d as u64 });
                }
            }
        }
        *prev_changes = Some(now);
    }
    let Some(servers) = get_text(http, &format!("{coordinator}/v1/servers"), token).await else { return };
    let Ok(servers) = serde_json::from_str::<serde_json::Value>(&servers) else { return };
    for s in servers.as_array().into_iter().flatten().filter(|s| s["alive"] == true) {
        let (Some(name), Some(addr)) = (s["name"].as_str(), s["addresses"]["metrics"].as_str()) else { continue };
        let Some(text) = get_text(http, &format!("http://{addr}/metrics"), None).await else { continue };
        let now = buckets(&text, "server_tick_duration_seconds");
        if let Some(before) = prev_hist.get(name)
            && let Some(p99) = quantile_between(before, &now, 0.99)
        {
            tl.server_tick_p99_ms.entry(name.to_owned()).or_default().push([t, p99 * 1000.0]);
        }
        prev_hist.insert(name.to_owned(), now);
    }
}

/// A limit the run is judged against.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Verdict {
    pub name: String,
    pub limit: f64,
    pub value: f64,
    pub ok: bool,
}

/// Limits from the command line; `None` is not checked.
#[derive(Debug, Clone, Default)]
pub struct Limits {
    pub max_rtt_p99_ms: Option<f64>,
    pub max_handoff_gap_ms: Option<f64>,
    pub max_errors: Option<f64>,
    pub min_joined_fraction: Option<f64>,
    pub max_snapshot_gap_ms: Option<f64>,
    pub max_ack_regressions: Option<f64>,
    pub max_edit_p99_ms: Option<f64>,
}

impl Limits {
    pub fn judge(&self, r: &SwarmReport) -> Vec<Verdict> {
        let joined = if r.bots == 0 { 1.0 } else { f64::from(r.joined) / f64::from(r.bots) };
        let max_gap = r.per_bot.iter().map(|b| b.max_snapshot_gap_ms).max().unwrap_or(0) as f64;
        let mut out = Vec::new();
        let mut at_most = |name: &str, limit: Option<f64>, value: f64| {
            if let Some(limit) = limit {
                out.push(Verdict { name: name.into(), limit, value, ok: value <= limit });
            }
        };
        at_most("rtt_p99_ms", self.max_rtt_p99_ms, r.rtt_p99_ms);
        at_most("handoff_gap_p99_ms", self.max_handoff_gap_ms, r.handoff_gap_p99_ms);
        at_most("errors", self.max_errors, r.errors as f64);
        at_most("max_snapshot_gap_ms", self.max_snapshot_gap_ms, max_gap);
        at_most("ack_regressions", self.max_ack_regressions, r.ack_regressions as f64);
        at_most("edit_p99_ms", self.max_edit_p99_ms, r.work.edit_p99_ms);
        if let Some(limit) = self.min_joined_fraction {
            out.push(Verdict { name: "joined_fraction".into(), limit, value: joined, ok: joined >= limit });
        }
        out
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

const COLOURS: [&str; 8] = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"];

/// A line chart of `series` (name, points) as inline SVG.
fn line_chart(title: &str, unit: &str, series: &[(String, Vec<[f64; 2]>)]) -> String {
    let (w, h, l, b) = (640.0, 220.0, 56.0, 28.0);
    let pts = series.iter().flat_map(|(_, p)| p.iter()).filter(|p| p[1].is_finite());
    let (mut xmax, mut ymax) = (1.0f64, 0.0f64);
    for p in pts {
        xmax = xmax.max(p[0]);
        ymax = ymax.max(p[1]);
    }
    let ymax = if ymax <= 0.0 { 1.0 } else { ymax * 1.1 };
    let x = |v: f64| l + v / xmax * (w - l - 10.0);
    let y = |v: f64| h - b - v / ymax * (h - b - 10.0);
    let mut svg = format!(
        r#"<figure><figcaption>{}</figcaption><svg viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img">"#,
        esc(title)
    );
    let _ = write!(
        svg,
        r##"<line x1="{l}" y1="{0}" x2="{1}" y2="{0}" stroke="#888"/><line x1="{l}" y1="10" x2="{l}" y2="{0}" stroke="#888"/>"##,
        h - b,
        w - 10.0
    );
    for k in 0..=4 {
        let v = ymax * f64::from(k) / 4.0;
        let _ = write!(
            svg,
            r##"<text x="{}" y="{}" font-size="10" text-anchor="end">{:.1}</text>"##,
            l - 4.0,
            y(v) + 3.0,
            v
        );
    }
    let _ = write!(
        svg,
        r#"<text x="{}" y="{}" font-size="10" text-anchor="end">{:.0} s</text><text x="4" y="12" font-size="10">{}</text>"#,
        w - 10.0,
        h - 8.0,
        xmax,
        esc(unit)
    );
    for (i, (name, points)) in series.iter().enumerate() {
        let c = COLOURS[i % COLOURS.len()];
        let path: Vec<String> =
            points.iter().filter(|p| p[1].is_finite()).map(|p| format!("{:.1},{:.1}", x(p[0]), y(p[1]))).collect();
        if !path.is_empty() {
            let _ =
                write!(svg, r#"<polyline fill="none" stroke="{c}" stroke-width="1.5" points="{}"/>"#, path.join(" "));
        }
        let _ = write!(
            svg,
            r#"<text x="{}" y="{}" font-size="10" fill="{c}">{}</text>"#,
            l + 8.0 + 110.0 * (i % 5) as f64,
            22.0 + 12.0 * (i / 5) as f64,
            esc(name)
        );
    }
    svg.push_str("</svg></figure>");
    svg
}

/// Bars of a histogram (label, count) as inline SVG.
fn bar_chart(title: &str, bars: &[(String, u64)]) -> String {
    let (w, h, b) = (640.0, 200.0, 40.0);
    let max = bars.iter().map(|(_, c)| *c).max().unwrap_or(1).max(1) as f64;
    let bw = (w - 20.0) / bars.len().max(1) as f64;
    let mut svg = format!(
        r#"<figure><figcaption>{}</figcaption><svg viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img">"#,
        esc(title)
    );
    for (i, (label, c)) in bars.iter().enumerate() {
        let bh = *c as f64 / max * (h - b - 20.0);
        let x = 10.0 + bw * i as f64;
        let _ = write!(
            svg,
            r##"<rect x="{x:.1}" y="{:.1}" width="{:.1}" height="{bh:.1}" fill="#1f77b4"/><text x="{:.1}" y="{:.1}" font-size="9" text-anchor="middle">{}</text><text x="{:.1}" y="{:.1}" font-size="9" text-anchor="middle">{c}</text>"##,
            h - b - bh,
            bw * 0.8,
            x + bw * 0.4,
            h - b + 12.0,
            esc(label),
            x + bw * 0.4,
            h - b - bh - 3.0
        );
    }
    svg.push_str("</svg></figure>");
    svg
}

/// Region changes on a time axis: one row per kind, a mark per change.
fn timeline_chart(changes: &[RegionChange], seconds: f64) -> String {
    let mut kinds: Vec<&str> = changes.iter().map(|c| c.kind.as_str()).collect();
    kinds.sort_unstable();
    kinds.dedup();
    let (w, l, row) = (640.0, 70.0, 24.0);
    let h = 30.0 + row * kinds.len() as f64;
    let xmax = changes.iter().map(|c| c.t).fold(seconds.max(1.0), f64::max);
    let x = |t: f64| l + t / xmax * (w - l - 10.0);
    let mut svg = format!(
        r#"<figure><figcaption>Region changes over the run (from the coordinator's counters)</figcaption><svg viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img">"#
    );
    for (i, kind) in kinds.iter().enumerate() {
        let y = 14.0 + row * i as f64;
        let c = COLOURS[i % COLOURS.len()];
        let _ = write!(
            svg,
            r##"<text x="{}" y="{}" font-size="10" text-anchor="end">{}</text><line x1="{l}" y1="{y}" x2="{}" y2="{y}" stroke="#ddd"/>"##,
            l - 6.0,
            y + 3.0,
            esc(kind),
            w - 10.0
        );
        for ch in changes.iter().filter(|ch| ch.kind == *kind) {
            let _ = write!(
                svg,
                r#"<circle cx="{:.1}" cy="{y}" r="{:.1}" fill="{c}"><title>{} × {} at {:.0} s</title></circle>"#,
                x(ch.t),
                (3.0 + ch.count as f64).min(8.0),
                ch.count,
                esc(kind),
                ch.t
            );
        }
    }
    let _ = write!(
        svg,
        r##"<line x1="{l}" y1="{0}" x2="{1}" y2="{0}" stroke="#888"/><text x="{l}" y="{2}" font-size="10">0 s</text><text x="{1}" y="{2}" font-size="10" text-anchor="end">{3:.0} s</text>"##,
        h - 12.0,
        w - 10.0,
        h - 1.0,
        xmax
    );
    svg.push_str("</svg></figure>");
    svg
}

/// Counts of `values` in the buckets `edges` (upper bounds, the last open).
fn histogram(values: &[f64], edges: &[f64]) -> Vec<(String, u64)> {
    let mut out: Vec<(String, u64)> = edges.iter().map(|e| (format!("≤{e}"), 0)).collect();
    out.push((format!(">{}", edges.last().copied().unwrap_or(0.0)), 0));
    for v in values {
        let i = edges.iter().position(|e| v <= e).unwrap_or(edges.len());
        out[i].1 += 1;
    }
    out
}

/// The self-contained HTML report.
pub fn html(r: &SwarmReport, verdicts: &[Verdict]) -> String {
    let tl = &r.timeline;
    let series = |name: &str, f: &dyn Fn(&Sample) -> f64| -> (String, Vec<[f64; 2]>) {
        (name.to_owned(), tl.samples.iter().map(|s| [s.t, f(s)]).collect())
    };
    let mut body = String::new();
    let _ = write!(
        body,
        "<h1>Bot swarm report</h1><p>{} bots, {} joined, {:.0} s · {} snapshots · {} handoffs · {} errors · {} ack \
         regressions · RTT p50 {:.2} ms, p99 {:.2} ms · up {:.1} kbit/s, down {:.1} kbit/s per bot</p>",
        r.bots,
        r.joined,
        r.seconds,
        r.snapshots,
        r.handoffs,
        r.errors,
        r.ack_regressions,
        r.rtt_p50_ms,
        r.rtt_p99_ms,
        r.up_kbps_per_bot,
        r.down_kbps_per_bot
    );
    let p = &r.process;
    let _ = write!(
        body,
        "<p>The swarm process: peak {:.1} MiB ({:.1} before its bots; {:.0} KiB a bot) · {:.1} s of CPU ({:.2} ms a \
         bot-second) · {:.1} inputs a second a bot</p>",
        p.rss_peak_mib,
        p.rss_before_bots_mib,
        p.kib_per_bot,
        p.cpu_seconds,
        p.cpu_ms_per_bot_second,
        p.input_hz_per_bot
    );
    if !verdicts.is_empty() {
        body.push_str("<table><tr><th>limit</th><th>value</th><th>allowed</th><th></th></tr>");
        for v in verdicts {
            let _ = write!(
                body,
                r#"<tr class="{}"><td>{}</td><td>{:.2}</td><td>{}</td><td>{}</td></tr>"#,
                if v.ok { "ok" } else { "fail" },
                esc(&v.name),
                v.value,
                v.limit,
                if v.ok { "ok" } else { "FAILED" }
            );
        }
        body.push_str("</table>");
    }
    body.push_str(&line_chart(
        "Round-trip time",
        "ms",
        &[series("p50", &|s| s.rtt_p50_ms), series("p99", &|s| s.rtt_p99_ms)],
    ));
    body.push_str(&line_chart(
        "Bandwidth per bot (at the UDP socket, QUIC included)",
        "kbit/s",
        &[series("up", &|s| s.up_kbps_per_bot), series("down", &|s| s.down_kbps_per_bot)],
    ));
    body.push_str(&line_chart(
        "Bots connected, snapshots and handoffs",
        "per second",
        &[
            series("connected", &|s| s.connected as f64),
            series("snapshots/s ÷ 90", &|s| s.snapshots_per_s / 90.0),
            series("handoffs/s", &|s| s.handoffs_per_s),
        ],
    ));
    let tick: Vec<(String, Vec<[f64; 2]>)> =
        tl.server_tick_p99_ms.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    body.push_str(&line_chart("Server tick p99 (from each server's /metrics)", "ms", &tick));
    let gaps: Vec<f64> = r.per_bot.iter().map(|b| b.max_snapshot_gap_ms as f64).collect();
    body.push_str(&bar_chart(
        "Largest gap between authoritative snapshots, per bot (ms)",
        &histogram(&gaps, &[15.0, 25.0, 50.0, 100.0, 250.0, 1000.0]),
    ));
    body.push_str(&bar_chart(
        "Handoff gap: from the old server's last snapshot to the new server's first (ms)",
        &histogram(&r.handoff_gaps_ms, &[11.0, 22.0, 33.0, 50.0, 100.0, 250.0]),
    ));
    body.push_str("<h2>Region splits, merges and moves</h2>");
    if tl.region_changes.is_empty() {
        body.push_str("<p>None during the run.</p>");
    } else {
        body.push_str(&timeline_chart(&tl.region_changes, r.seconds));
    }
    let w = &r.work;
    if w.edits_sent + w.grips > 0 {
        let reasons: Vec<String> = w.edit_rejections.iter().map(|(k, n)| format!("{} {n}", esc(k))).collect();
        let _ = write!(
            body,
            "<h2>Digging, building, grabbing, throwing</h2><p>{} edits sent, {} done, {} refused{} · edit to durable              p50 {:.1} ms, p99 {:.1} ms · {} grips, {} throws: {} props flew, {} stayed, {} out of view a second \
             later</p>",
            w.edits_sent,
            w.edits_done,
            w.edits_rejected,
            if reasons.is_empty() { String::new() } else { format!(" ({})", reasons.join(", ")) },
            w.edit_p50_ms,
            w.edit_p99_ms,
            w.grips,
            w.throws,
            w.props_flew,
            w.props_stayed,
            w.props_unseen
        );
        body.push_str(&bar_chart(
            "Edit latency: sent to acknowledged durable (ms)",
            &histogram(&w.edit_ms, &[5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 1000.0]),
        ));
    }
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Bot swarm report</title><style>\
         body{{font-family:sans-serif;max-width:700px;margin:2em auto;color:#222}}figure{{margin:1.5em 0}}\
         figcaption{{font-weight:bold;margin-bottom:.3em}}table{{border-collapse:collapse}}td,th{{padding:2px 8px;\
         border-bottom:1px solid #ddd;text-align:left}}tr.fail{{color:#b00;font-weight:bold}}</style></head>\
         <body>{body}</body></html>\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCRAPE_1: &str = "server_tick_duration_seconds_bucket{le=\"0.001\"} 10\n\
        server_tick_duration_seconds_bucket{le=\"0.005\"} 90\n\
        server_tick_duration_seconds_bucket{le=\"0.02\"} 100\n\
        server_tick_duration_seconds_bucket{le=\"+Inf\"} 100\n";
    const SCRAPE_2: &str = "server_tick_duration_seconds_bucket{le=\"0.001\"} 10\n\
        server_tick_duration_seconds_bucket{le=\"0.005\"} 180\n\
        server_tick_duration_seconds_bucket{le=\"0.02\"} 200\n\
        server_tick_duration_seconds_bucket{le=\"+Inf\"} 200\n";

    #[test]
    fn the_p99_of_the_ticks_between_two_scrapes() {
        let (a, b) =
            (buckets(SCRAPE_1, "server_tick_duration_seconds"), buckets(SCRAPE_2, "server_tick_duration_seconds"));
        assert_eq!(a.len(), 4);
        // 100 new ticks: 90 at most 5 ms, 10 at most 20 ms.
        assert_eq!(quantile_between(&a, &b, 0.5), Some(0.005));
        assert_eq!(quantile_between(&a, &b, 0.99), Some(0.02));
        assert_eq!(quantile_between(&b, &b, 0.99), None, "no ticks, no figure");
    }

    #[test]
    fn counters_by_label_and_percentiles() {
        let text =
            "mesh_region_changes_total{kind=\"merge\"} 1\nmesh_region_changes_total{kind=\"split\"} 3\nother 1\n";
        let c = counters_by(text, "mesh_region_changes_total", "kind");
        assert_eq!(c.get("split"), Some(&3.0));
        assert_eq!(c.len(), 2);
        let mut v = vec![5.0, 1.0, 3.0, 2.0, 4.0];
        assert_eq!(percentile(&mut v, 0.5), 3.0);
        assert_eq!(percentile(&mut v, 1.0), 5.0);
        assert_eq!(percentile(&mut [], 0.5), 0.0);
    }

    #[test]
    fn limits_name_what_failed() {
        let r = SwarmReport { bots: 10, joined: 9, errors: 3, rtt_p99_ms: 12.0, ..Default::default() };
        let limits = Limits {
            max_rtt_p99_ms: Some(20.0),
            max_errors: Some(0.0),
            min_joined_fraction: Some(1.0),
            ..Default::default()
        };
        let v = limits.judge(&r);
        let failed: Vec<&str> = v.iter().filter(|v| !v.ok).map(|v| v.name.as_str()).collect();
        assert_eq!(failed, ["errors", "joined_fraction"]);
        let page = html(&r, &v);
        assert!(page.contains("FAILED") && page.contains("<svg") && !page.contains("http"), "self-contained");
    }

    #[test]
    fn region_changes_are_plotted_on_a_timeline_and_work_is_shown() {
        let mut r = SwarmReport { bots: 2, joined: 2, seconds: 60.0, ..Default::default() };
        r.timeline.region_changes = vec![
            RegionChange { t: 10.0, kind: "split".into(), count: 1 },
            RegionChange { t: 30.0, kind: "move".into(), count: 2 },
            RegionChange { t: 45.0, kind: "split".into(), count: 1 },
        ];
        r.work.edits_sent = 4;
        r.work.edit_ms = vec![3.0, 40.0];
        r.work.edit_rejections.insert("out_of_reach".into(), 1);
        let page = html(&r, &[]);
        // One row per kind, one mark per change, placed along the run.
        assert_eq!(page.matches("<circle").count(), 3);
        assert!(page.contains("2 × move at 30 s") && page.contains("1 × split at 45 s"));
        let row_labels = page.matches(">move</text>").count() + page.matches(">split</text>").count();
        assert_eq!(row_labels, 2);
        assert!(page.contains("out_of_reach 1") && page.contains("Edit latency"));
        let quiet = html(&SwarmReport::default(), &[]);
        assert!(!quiet.contains("<circle") && !quiet.contains("Edit latency") && quiet.contains("None during the run"));
    }
}
