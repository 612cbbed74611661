//! Publish modes on a lab: host mode, the ingress routing mesh keeping the client address,
//! and ingress with SNAT, against task-to-task traffic on the overlay (the reference for the
//! VXLAN hop). Brings up its own 3-node lab (etcd store: the embedded store serves one node
//! only) named `pm<pid>`, runs `shoal_lab::compare::run` (what `shoal lab compare` runs) for
//! `--rounds` rounds (default 5) of `--duration` per target (default 3s; the targets take
//! turns in 250 ms slices, the slice order reversed every other round), and takes medians
//! per path over the rounds. The lab is
//! always taken down (also on error or panic).
//!
//! Run as root after `cargo build --release -p shoal-cli -p shoal-benches`:
//!   ./target/release/publish_modes [--rounds 5] [--duration 3s]
//! (`SHOAL_BIN` overrides the `shoal` binary; by default the one next to this program.)
//! Writes benches/reports/publish_modes.md and publish_modes.html (latencies pooled over the
//! rounds).

use std::collections::BTreeMap;

use anyhow::bail;
use shoal_benches::{
    Leftover, arg, check_flags, clean_up_on_signal, lab_up, median, shoal_bin, write_report,
};
use shoal_lab::compare::{self, Mode, PathKind, Report, Row};

/// The prototype's figures (Python server, sequential requests, one connection each): context
/// only, not the same server or run.
const ANCHORS: [(&str, &str, &str); 3] = [
    ("host mode", "5,296", "0.178"),
    ("mesh, local", "5,338", "0.177"),
    ("mesh, across VXLAN", "4,077", "0.227"),
];

type Key = (Mode, String, PathKind);

fn key(r: &Row) -> Key {
    (r.target.mode, r.target.node.clone(), r.target.path)
}

fn find<'a>(rep: &'a Report, path: PathKind, node: Option<&str>) -> Option<&'a Row> {
    rep.rows
        .iter()
        .find(|r| r.target.path == path && node.is_none_or(|n| r.target.node == n))
}

/// Median of the values some rounds have; None when no round has one.
fn med(v: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    let v: Vec<f64> = v.flatten().collect();
    if v.is_empty() { None } else { Some(median(v)) }
}

fn verdict(ok: Option<bool>) -> &'static str {
    match ok {
        Some(true) => "PASS",
        Some(false) => "MISS",
        None => "MISS (no data)",
    }
}

fn f3(v: Option<f64>) -> String {
    v.map_or("n/a".into(), |v| format!("{v:.3}"))
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    check_flags(
        &args,
        &["--rounds", "--duration"],
        "usage: publish_modes [--rounds 5] [--duration 3s]   (root; writes benches/reports/publish_modes.md)",
    );
    let name = format!("pm{}", std::process::id());
    clean_up_on_signal(vec![Leftover::Lab(name.clone())]);
    let rounds: usize = arg(&args, "--rounds", 5);
    let duration_arg: String = arg(&args, "--duration", "3s".to_string());
    let duration = compare::parse_duration(&duration_arg)?;
    if rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    let bin = shoal_bin()?;
    let _guard = lab_up(&bin, &name, 3)?;
    let lab = shoal_lab::lab::Lab::load(&name)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;

    let mut reports: Vec<Report> = vec![];
    for round in 0..rounds {
        let opts = compare::Options {
            duration,
            // The services stay for the next round; the lab goes down at the end anyway.
            keep: true,
            reverse: round % 2 == 1,
            progress: true,
            ..Default::default()
        };
        eprintln!(
            "round {}/{rounds}{}",
            round + 1,
            if opts.reverse { " (reversed)" } else { "" }
        );
        let rep = rt.block_on(compare::run(&lab, &opts))?;
        for l in rep.summary.lines() {
            eprintln!("  {l}");
        }
        reports.push(rep);
    }
    let last = reports.last().expect("at least one round");
    let replica_node = last.replica.node.clone();

    // Medians per path over the rounds, in the order of the first round's rows.
    let keys: Vec<Key> = reports[0].rows.iter().map(key).collect();
    let mut per_key: BTreeMap<Key, Vec<&Row>> = BTreeMap::new();
    for rep in &reports {
        for r in &rep.rows {
            per_key.entry(key(r)).or_default().push(r);
        }
    }
    let mut table = String::from(
        "| mode | node | path | req/s | p50 (ms) | p90 (ms) | p99 (ms) | errors (all rounds) | source seen | answered by |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
    );
    let mut pooled = vec![];
    for k in &keys {
        let rows = &per_key[k];
        let answered: Vec<&&Row> = rows.iter().filter(|r| r.requests > 0).collect();
        let m = |f: fn(&Row) -> f64| {
            if answered.is_empty() {
                "-".to_string()
            } else {
                format!("{:.3}", median(answered.iter().map(|r| f(r)).collect()))
            }
        };
        let merged = Row::merge(rows).expect("rows of every round");
        table.push_str(&format!(
            "| {} | {} | {} | {:.0} | {} | {} | {} | {} | {} | {} |\n",
            k.0,
            k.1,
            k.2,
            median(rows.iter().map(|r| r.req_per_sec).collect()),
            m(|r| r.p50_ms),
            m(|r| r.p90_ms),
            m(|r| r.p99_ms),
            merged.errors,
            merged.sources_text(),
            merged.answered_text()
        ));
        pooled.push(merged);
    }

    // Targets, each from per-round figures of the same run (paired), then the median.
    let s = |f: fn(&compare::Summary) -> Option<f64>| med(reports.iter().map(|r| f(&r.summary)));
    let rate = s(|x| x.mesh_vs_host_rate);
    let p50 = s(|x| x.mesh_vs_host_p50);
    let added = s(|x| x.mesh_across_added_p50_ms);
    let hop = s(|x| x.hop_cost_ms);
    let snat_local = s(|x| x.keep_vs_snat_rate_local);
    let mut targets = String::from("| target | measured | goal | result |\n|---|---|---|---|\n");
    targets.push_str(&format!(
        "| mesh-local / host-local, req/s | {} | >= 0.95 | {} |\n",
        f3(rate),
        verdict(rate.map(|v| v >= 0.95))
    ));
    targets.push_str(&format!(
        "| mesh-local / host-local, p50 | {} | <= 1.05 | {} |\n",
        f3(p50),
        verdict(p50.map(|v| v <= 1.05))
    ));
    targets.push_str(&format!(
        "| mesh-across p50 minus host-local p50, vs the VXLAN hop (task-to-task across minus local) | {} ms vs {} ms{} | <= 1.1 x hop | {} |\n",
        f3(added),
        f3(hop),
        match (added, hop) {
            (Some(a), Some(h)) if h > 0.0 => format!(" (x{:.2})", a / h),
            _ => String::new(),
        },
        verdict(added.zip(hop).map(|(a, h)| a <= 1.1 * h.max(0.0)))
    ));
    targets.push_str(&format!(
        "| client IP kept / SNAT, req/s, {replica_node} (replica's node) | {} | >= 0.95 | {} |\n",
        f3(snat_local),
        verdict(snat_local.map(|v| v >= 0.95))
    ));
    for n in &last.nodes {
        if n.name == replica_node {
            continue;
        }
        let v = med(reports.iter().map(|rep| {
            let m = find(rep, PathKind::MeshAcross, Some(&n.name))?;
            let x = find(rep, PathKind::SnatAcross, Some(&n.name))?;
            (m.requests > 0 && x.req_per_sec > 0.0).then(|| m.req_per_sec / x.req_per_sec)
        }));
        targets.push_str(&format!(
            "| client IP kept / SNAT, req/s, {} (across) | {} | >= 0.95 | {} |\n",
            n.name,
            f3(v),
            verdict(v.map(|v| v >= 0.95))
        ));
    }
    // What the backend saw: the client on the mesh, never the client with SNAT.
    let saw = |paths: &[PathKind], client: bool| -> Option<bool> {
        let rows: Vec<&Row> = pooled
            .iter()
            .filter(|r| paths.contains(&r.target.path) && r.requests > 0)
            .collect();
        if rows.is_empty() {
            return None;
        }
        Some(rows.iter().all(|r| {
            r.sources
                .iter()
                .all(|s| (s.label.as_deref() == Some("client")) == client)
        }))
    };
    targets.push_str(&format!(
        "| backend sees the client address (host, mesh-local, mesh-across) | | always | {} |\n",
        verdict(saw(
            &[
                PathKind::HostLocal,
                PathKind::MeshLocal,
                PathKind::MeshAcross
            ],
            true
        ))
    ));
    targets.push_str(&format!(
        "| backend never sees the client address with SNAT (snat-local, snat-across) | | never | {} |\n",
        verdict(saw(&[PathKind::SnatLocal, PathKind::SnatAcross], false))
    ));

    let mut anchors = String::from("| path | req/s | p50 (ms) |\n|---|---|---|\n");
    for (p, r, l) in ANCHORS {
        anchors.push_str(&format!("| {p} | {r} | {l} |\n"));
    }
    let mut notes: Vec<String> = reports.iter().flat_map(|r| r.notes.clone()).collect();
    notes.sort();
    notes.dedup();
    let notes = if notes.is_empty() {
        String::new()
    } else {
        format!(
            "\nNotes from the runs:\n\n{}\n",
            notes.iter().map(|n| format!("- {n}\n")).collect::<String>()
        )
    };
    println!("\n{table}\n{targets}");
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let report = format!(
        "# Publish modes: host, ingress keeping the client IP, ingress SNAT\n\n\
         Command: `publish_modes --rounds {rounds} --duration {duration_arg}` (root), on its own lab: 3 nodes, etcd store. \
         `shoal_lab::compare::run` (what `shoal lab compare` runs): service `compare` (one `shoal whoami` replica, on {replica_node}) \
         published as 30080 ingress, 30081 host, 30082 ingress with SNAT; from the lab's client namespace (192.0.2.100) to every \
         node; task-to-task from `compare-probe` tasks on the replica's node and another node to the replica's overlay address. \
         Per target: sequential HTTP/1.1 GET, a new TCP connection per request, `Connection: close`, {duration_arg} after a short \
         warm-up, the targets taking turns in 250 ms slices; latency from connect to the full response. {rounds} rounds, slice order reversed every other round; \
         medians over rounds (ratios paired within a round, then the median). Load average at the end: {}\n\n\
         ## Medians per path\n\n{table}\n\
         host-no-replica is expected to be refused: host mode opens the port only where a task runs.\n\n\
         ## Targets\n\n{targets}\n\
         ## Anchors\n\nFrom a hand-built prototype (Python server, sequential requests, one connection each); \
         context only, not the same server or run:\n\n{anchors}{notes}\n\
         Latency distributions (pooled over the rounds): `publish_modes.html`.\n",
        load.trim()
    );
    let p = write_report("publish_modes", &report)?;
    let mut pooled_report = last.clone();
    pooled_report.summary = compare::Summary::compute(&pooled);
    pooled_report.rows = pooled;
    pooled_report.notes.insert(
        0,
        format!(
            "publish_modes benchmark: rows pooled over {rounds} rounds of {duration_arg} per target"
        ),
    );
    let html = p.with_extension("html");
    compare::write_html(&pooled_report, &html)?;
    println!("report: {} and {}", p.display(), html.display());
    Ok(())
}
