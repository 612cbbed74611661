//! Cost of programming one node's VIP load balancing: Shoal's nft layout through its
//! incremental `Syncer` (in-process libnftables) against the Docker/kube-proxy-style anchor,
//! per-service iptables rules loaded with iptables-restore (nft and legacy back ends), same
//! workload, same run.
//!
//! Workload: N services (VIP:80/tcp -> :8080), 10 backends each, N = 1,000 and 10,000.
//! - full sync: an empty namespace to the whole ruleset (median of `--rounds`);
//! - one backend change: a backend removed from one service, then put back, `--changes`
//!   times on random services; p50/p99/max of the time `Syncer::sync` takes for the whole
//!   desired ruleset (model, diff and one nft transaction). The anchor's change is a
//!   `--noflush` restore of the changed service's chains (kube-proxy's partial sync).
//!
//! Each measurement runs in a fresh namespace `shoal-b-lbs-<pid>-<n>`, deleted afterwards
//! (also on panic). Run as root:
//!   cargo run --release -p shoal-benches --bin lb_sync -- [--rounds 3] [--changes 200]

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use shoal_benches::{
    Leftover, arg, check_flags, clean_up_on_signal, creating, quantile, write_report,
};
use shoal_lb::{Applier, Protocol, Ruleset, SyncKind, Syncer, VirtualService};
use shoal_netns::CommandExt as _;

const BACKENDS: u32 = 10;

static NS_COUNTER: AtomicUsize = AtomicUsize::new(0);

/// This run's namespaces: `shoal-b-lbs-PID-N`.
fn ns_prefix() -> String {
    format!("shoal-b-lbs-{}-", std::process::id())
}

/// A namespace deleted on drop.
struct Ns(String);

impl Ns {
    fn new() -> anyhow::Result<Ns> {
        let name = format!(
            "{}{}",
            ns_prefix(),
            NS_COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        creating(|| shoal_netns::create(&name).context("creating a namespace (root needed)"))?;
        Ok(Ns(name))
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        if let Err(e) = shoal_netns::delete(&self.0) {
            eprintln!("deleting namespace {}: {e}", self.0);
        }
    }
}

fn vip(s: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + s)
}

fn backend(s: u32, b: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + s * BACKENDS + b)
}

fn ruleset(n: u32) -> Ruleset {
    Ruleset {
        table: "shoal_lb".into(),
        vips: vec![],
        services: (0..n)
            .map(|s| VirtualService {
                id: format!("s{s}"),
                vip: vip(s),
                protocol: Protocol::Tcp,
                port: 80,
                target_port: 8080,
                backends: (0..BACKENDS).map(|b| backend(s, b)).collect(),
                ..Default::default()
            })
            .collect(),
        local_endpoints: vec![],
    }
}

/// Small deterministic generator for the services to change.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, n: u32) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((self.0 >> 33) % n as u64) as u32
    }
}

struct Figures {
    full: Duration,
    change: Vec<Duration>,
    /// A backend replaced by another address, the count unchanged (Shoal only).
    replace: Vec<Duration>,
}

fn shoal(
    rt: &tokio::runtime::Runtime,
    n: u32,
    rounds: usize,
    changes: usize,
) -> anyhow::Result<Figures> {
    let applier = Applier::in_process().context("libnftables.so.1")?;
    let rs = ruleset(n);
    let mut fulls = vec![];
    for _ in 0..rounds {
        let ns = Ns::new()?;
        // The namespace's libnftables context is created by the first command: not counted.
        rt.block_on(applier.list_table(&ns.0, "shoal_lb"))?;
        let mut s = Syncer::new(applier.clone()).without_conntrack_cleanup();
        let t = Instant::now();
        let r = rt.block_on(s.sync(&ns.0, &rs))?;
        fulls.push(t.elapsed());
        anyhow::ensure!(r.kind == SyncKind::Full, "{r:?}");
    }
    fulls.sort();
    let ns = Ns::new()?;
    let mut s = Syncer::new(applier.clone()).without_conntrack_cleanup();
    let mut cur = rs.clone();
    rt.block_on(s.sync(&ns.0, &cur))?;
    let mut rng = Lcg(42);
    let mut change = vec![];
    for i in 0..changes {
        let svc = rng.next(n) as usize;
        let removed = cur.services[svc].backends.pop().expect("backends");
        let t = Instant::now();
        let r = rt.block_on(s.sync(&ns.0, &cur))?;
        change.push(t.elapsed());
        anyhow::ensure!(r.kind == SyncKind::Incremental, "change {i}: {r:?}");
        cur.services[svc].backends.push(removed);
        let t = Instant::now();
        rt.block_on(s.sync(&ns.0, &cur))?;
        change.push(t.elapsed());
    }
    change.sort();
    // A backend replaced (a task rescheduled): the count, hence the service's verdict, stays.
    let mut replace = vec![];
    for i in 0..changes {
        let svc = rng.next(n) as usize;
        let old = cur.services[svc].backends[0];
        cur.services[svc].backends[0] =
            Ipv4Addr::new(10, 200, (i / 250) as u8, (i % 250) as u8 + 1);
        let t = Instant::now();
        let r = rt.block_on(s.sync(&ns.0, &cur))?;
        replace.push(t.elapsed());
        anyhow::ensure!(r.kind == SyncKind::Incremental, "replace {i}: {r:?}");
        cur.services[svc].backends[0] = old;
        rt.block_on(s.sync(&ns.0, &cur))?;
    }
    replace.sort();
    // A sync that finds nothing to do: the cost of comparing the desired ruleset.
    let mut idle = vec![];
    for _ in 0..50 {
        let t = Instant::now();
        let r = rt.block_on(s.sync(&ns.0, &cur))?;
        idle.push(t.elapsed());
        anyhow::ensure!(r.kind == SyncKind::Unchanged, "{r:?}");
    }
    idle.sort();
    println!(
        "  ({n} services: a sync with nothing to change p50 {:.2} ms)",
        quantile(&idle, 0.5).as_secs_f64() * 1e3
    );
    Ok(Figures {
        full: fulls[fulls.len() / 2],
        change,
        replace,
    })
}

/// Docker/kube-proxy-style iptables: a KUBE-SERVICES-like dispatch chain with one rule per
/// service jumping to a per-service chain, which picks one of 10 per-endpoint chains with
/// `statistic --mode random` rules; each endpoint chain DNATs.
fn service_chains(s: u32, backends: &[Ipv4Addr], out: &mut String) {
    let _ = writeln!(out, ":SVC-{s} - [0:0]");
    for (i, _) in backends.iter().enumerate() {
        let _ = writeln!(out, ":SEP-{s}-{i} - [0:0]");
    }
    let n = backends.len();
    for (i, b) in backends.iter().enumerate() {
        let left = n - i;
        if left > 1 {
            let _ = writeln!(
                out,
                "-A SVC-{s} -m statistic --mode random --probability {:.11} -j SEP-{s}-{i}",
                1.0 / left as f64
            );
        } else {
            let _ = writeln!(out, "-A SVC-{s} -j SEP-{s}-{i}");
        }
        let _ = writeln!(
            out,
            "-A SEP-{s}-{i} -p tcp -m tcp -j DNAT --to-destination {b}:8080"
        );
    }
}

fn iptables_full(n: u32) -> String {
    let mut o = String::from("*nat\n:PREROUTING ACCEPT [0:0]\n:SERVICES - [0:0]\n");
    for s in 0..n {
        let be: Vec<Ipv4Addr> = (0..BACKENDS).map(|b| backend(s, b)).collect();
        service_chains(s, &be, &mut o);
    }
    o.push_str("-A PREROUTING -j SERVICES\n");
    for s in 0..n {
        let _ = writeln!(
            o,
            "-A SERVICES -d {}/32 -p tcp -m tcp --dport 80 -j SVC-{s}",
            vip(s)
        );
    }
    o.push_str("COMMIT\n");
    o
}

/// kube-proxy's partial sync: the changed service's chains flushed and rewritten
/// (`--noflush`); an endpoint chain no longer used is deleted.
fn iptables_change(s: u32, backends: &[Ipv4Addr], dropped: Option<usize>) -> String {
    let mut o = String::from("*nat\n");
    service_chains(s, backends, &mut o);
    if let Some(i) = dropped {
        let _ = writeln!(o, ":SEP-{s}-{i} - [0:0]");
        let _ = writeln!(o, "-X SEP-{s}-{i}");
    }
    o.push_str("COMMIT\n");
    o
}

fn restore(ns: &str, bin: &str, noflush: bool, text: &str) -> anyhow::Result<Duration> {
    let mut cmd = Command::new(bin);
    if noflush {
        cmd.arg("--noflush");
    }
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd.in_netns(ns)?;
    let t = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("running {bin}"))?;
    child.stdin.take().unwrap().write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    let d = t.elapsed();
    if !out.status.success() {
        bail!("{bin}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(d)
}

fn iptables(bin: &str, n: u32, rounds: usize, changes: usize) -> anyhow::Result<Figures> {
    let full_text = iptables_full(n);
    let mut fulls = vec![];
    for _ in 0..rounds {
        let ns = Ns::new()?;
        fulls.push(restore(&ns.0, bin, false, &full_text)?);
    }
    fulls.sort();
    let ns = Ns::new()?;
    restore(&ns.0, bin, false, &full_text)?;
    let mut rng = Lcg(42);
    let mut change = vec![];
    for _ in 0..changes {
        let s = rng.next(n);
        let all: Vec<Ipv4Addr> = (0..BACKENDS).map(|b| backend(s, b)).collect();
        let fewer = &all[..all.len() - 1];
        change.push(restore(
            &ns.0,
            bin,
            true,
            &iptables_change(s, fewer, Some(all.len() - 1)),
        )?);
        change.push(restore(&ns.0, bin, true, &iptables_change(s, &all, None))?);
    }
    change.sort();
    Ok(Figures {
        full: fulls[fulls.len() / 2],
        change,
        replace: vec![],
    })
}

fn f(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1e3;
    if ms < 10.0 {
        format!("{ms:.2}")
    } else {
        format!("{ms:.0}")
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    check_flags(
        &args,
        &["--rounds", "--changes"],
        "usage: lb_sync [--rounds 3] [--changes 200]   (root; writes benches/reports/lb_sync.md)",
    );
    clean_up_on_signal(vec![Leftover::Netns(ns_prefix())]);
    let rounds = arg(&args, "--rounds", 3);
    let changes = arg(&args, "--changes", 200);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let mut table = String::from(
        "| layout / applier | services | full sync (ms) | one backend removed or added p50 / p99 / max (ms) | one backend replaced, count kept p50 / p99 (ms) |\n|---|---|---|---|---|\n",
    );
    for n in [1_000u32, 10_000] {
        let legacy_rounds = rounds;
        let runs: Vec<(&str, anyhow::Result<Figures>)> = vec![
            (
                "shoal nft maps, Syncer (libnftables structure + nfnetlink elements)",
                shoal(&rt, n, rounds, changes),
            ),
            (
                "iptables per-service chains, iptables-nft-restore",
                iptables("iptables-nft-restore", n, rounds, changes.min(20)),
            ),
            (
                "iptables per-service chains, iptables-legacy-restore",
                iptables("iptables-legacy-restore", n, legacy_rounds, changes.min(20)),
            ),
        ];
        for (label, r) in runs {
            let line = match r {
                Ok(fig) => format!(
                    "| {label} | {n} | {} | {} / {} / {} | {} |",
                    f(fig.full),
                    f(quantile(&fig.change, 0.5)),
                    f(quantile(&fig.change, 0.99)),
                    f(*fig.change.last().unwrap_or(&Duration::ZERO)),
                    if fig.replace.is_empty() {
                        "same as a change".to_string()
                    } else {
                        format!(
                            "{} / {}",
                            f(quantile(&fig.replace, 0.5)),
                            f(quantile(&fig.replace, 0.99))
                        )
                    },
                ),
                Err(e) => format!("| {label} | {n} | failed: {e} | | |"),
            };
            println!("{line}");
            table.push_str(&line);
            table.push('\n');
        }
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let report = format!(
        "# LB sync cost: Shoal's map layout vs iptables per-service chains\n\n\
         Command: `cargo run --release -p shoal-benches --bin lb_sync -- --rounds {rounds} --changes {changes}` (root).\n\
         Each service VIP:80/tcp with {BACKENDS} backends. Full sync: median of {rounds} loads into an empty namespace (structure through in-process libnftables, then every element in one nfnetlink batch). \
         One backend change: a backend removed from a random service and put back, {changes} times each way for Shoal \
         (whole desired ruleset handed to `Syncer::sync`: it compares it service by service, and sends the element changes of the changed service in one nfnetlink batch; a removed or added backend changes the service's selection chain, a verdict-map element, which makes the kernel validate the table's jumps at commit: that part grows with the number of services. A replaced backend (same count) touches only the slot's element), up to 20 times each way \
         for the iptables anchor (`--noflush` restore of the changed service's chains, kube-proxy's partial sync). \
         Load average at the end: {}\n\n{table}\n\
         Targets (issue 5): full sync under 100 ms (1,000 services) and under 1 s (10,000); one change p99 under 5 ms, \
         independent of the number of services.\n",
        load.trim()
    );
    let p = write_report("lb_sync", &report)?;
    println!("report: {}", p.display());
    Ok(())
}
