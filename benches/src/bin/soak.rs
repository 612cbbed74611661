//! Soak: a 3-node lab under continuous DNS and HTTP load while a service is scaled up and
//! down every few seconds and one node is killed and later started again.
//!
//! Run as root after `cargo build --release -p shoal-cli -p shoal-benches`:
//!   ./target/release/soak [--duration 10m] [--churn-every 3s] [--report soak]
//! (`SHOAL_BIN` overrides the `shoal` binary; by default the one next to this program.)
//!
//! Load, all from inside the lab (the `probe` task's namespace and the `client` namespace):
//! - DNS (UDP to 127.0.0.11, 1 s timeout) from the probe task: `stable`, `tasks.stable`,
//!   `churn`; an answer must hold at least one A record.
//! - HTTP (a new connection per request, 1.2 s timeout: one SYN retransmission) from the
//!   probe task to the VIPs of `stable` (3 replicas) and `churn` (1 to 4 replicas).
//! - HTTP from the client to the published port 8080 of every node in turn.
//!
//! `stable` and `churn` have a health check (curl of their own server every 500 ms): a new
//! replica joins once it answers. The load starts once the services are healthy in the
//! store and the VIPs and published ports answer (every node's data path has them).
//!
//! Events: `churn` scaled through 1, 3, 2, 4 replicas every `--churn-every`; at a third of
//! the duration one node (not the probe's) is killed (`lab kill`: agent and tasks SIGKILLed,
//! underlay cut), at two thirds started again (`lab start`).
//!
//! Targets: zero failures for names and VIPs of services that kept a healthy replica,
//! except in the grace window after the kill (lease TTL 3 s + 2 s: flows to the dead node's
//! replicas fail until the node is declared down) — those are counted apart; requests to the
//! killed node's own address are not sent while it is down. Agent RSS at the end at most 10%
//! above the start (after a warm-up past the first full pass; in runs under 5 minutes the
//! surviving agents from after the node loss has settled), and open file descriptors flat (at most start + 10% + 4).
//! The restarted agent is a new process: it is measured from its own warm-up.
//! Writes benches/reports/<report>.md and .json; exits 1 when a target is missed.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use shoal_benches::{
    Leftover, arg, check_flags, clean_up_on_signal, lab_up, shoal_bin, write_report,
};

const KILL_GRACE: Duration = Duration::from_secs(5);

/// Runs shorter than this compare the survivors' RSS from after the node loss.
const SHORT_RUN: Duration = Duration::from_secs(300);

/// The lab agents' first full pass (the default `resync_secs`) and a little.
fn first_full_pass() -> Duration {
    shoal::config::AgentConfig::default().resync_period() + Duration::from_secs(2)
}

fn parse_duration(s: &str) -> anyhow::Result<Duration> {
    shoal_lab::compare::parse_duration(s).map_err(|e| anyhow::anyhow!("{e}"))
}

#[derive(Default, Clone, serde::Serialize)]
struct Tally {
    sent: u64,
    failed: u64,
    /// Failures inside the grace window after the kill (not held against the target).
    failed_in_grace: u64,
    examples: Vec<String>,
}

/// Tallies per category, plus when the kill happened.
#[derive(Default)]
struct Book {
    tallies: BTreeMap<String, Tally>,
    kill_at: Option<Instant>,
    /// When the load started (failure examples say how long after).
    t0: Option<Instant>,
}

impl Book {
    fn record(&mut self, what: &str, at: Instant, err: Option<String>) {
        let in_grace = self.kill_at.is_some_and(|k| at >= k && at < k + KILL_GRACE);
        let t = self.tallies.entry(what.to_string()).or_default();
        t.sent += 1;
        if let Some(e) = err {
            if in_grace {
                t.failed_in_grace += 1;
            } else {
                t.failed += 1;
                if t.examples.len() < 5 {
                    let since = self
                        .t0
                        .map_or(0.0, |t0| at.duration_since(t0).as_secs_f64());
                    t.examples.push(format!("+{since:.1}s: {e}"));
                }
            }
        }
    }
}

/// Waits (up to 60 s) until, from the probe's namespace, every VIP answers 5 requests in a
/// row, and from the client every node's published port 8080 answers one.
fn wait_until_serving(
    probe_ns: &str,
    vips: &[Ipv4Addr],
    lab: &shoal_lab::lab::Lab,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let timeout = Duration::from_millis(1200);
    let until_ok = |target: SocketAddr, times: u32| -> Result<(), String> {
        let mut in_a_row = 0;
        let mut last = String::new();
        while in_a_row < times {
            if Instant::now() > deadline {
                return Err(format!(
                    "{target} did not answer within 60 s (last: {last})"
                ));
            }
            match http_get(None, target, timeout) {
                Ok(()) => in_a_row += 1,
                Err(e) => {
                    (in_a_row, last) = (0, e);
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
        Ok(())
    };
    shoal_netns::run_in(probe_ns, || {
        vips.iter()
            .try_for_each(|vip| until_ok((*vip, 80).into(), 5))
    })?
    .map_err(|e| anyhow::anyhow!("before the load, from the probe task: {e}"))?;
    shoal_netns::run_in(&lab.client_netns, || {
        lab.nodes
            .iter()
            .try_for_each(|n| until_ok((n.addr, 8080).into(), 1))
    })?
    .map_err(|e| anyhow::anyhow!("before the load, from the client: {e}"))?;
    Ok(())
}

/// A DNS query for an A record; Ok(number of answers).
fn dns_a(sock: &UdpSocket, id: u16, name: &str) -> Result<u16, String> {
    let mut q = Vec::with_capacity(64);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[1, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(u8::try_from(label.len()).map_err(|e| e.to_string())?);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    sock.send_to(&q, "127.0.0.11:53")
        .map_err(|e| e.to_string())?;
    let mut buf = [0u8; 1500];
    loop {
        let (n, _) = sock
            .recv_from(&mut buf)
            .map_err(|e| format!("{name}: {e}"))?;
        if n < 12 || buf[..2] != id.to_be_bytes() {
            continue; // a late answer to an earlier query
        }
        let rcode = buf[3] & 0x0F;
        let answers = u16::from_be_bytes([buf[6], buf[7]]);
        if rcode != 0 {
            return Err(format!("{name}: rcode {rcode}"));
        }
        if answers == 0 {
            return Err(format!("{name}: no answer"));
        }
        return Ok(answers);
    }
}

/// One HTTP GET on a new connection; Ok(()) on a 200 with a whoami body.
fn http_get(from: Option<Ipv4Addr>, addr: SocketAddr, timeout: Duration) -> Result<(), String> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
        .map_err(|e| e.to_string())?;
    if let Some(ip) = from {
        sock.bind(&SocketAddr::from((ip, 0)).into())
            .map_err(|e| format!("bind {ip}: {e}"))?;
    }
    let r = sock.connect_timeout(&addr.into(), timeout);
    let port = sock
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .map_or(0, |a| a.port());
    if let Err(e) = r {
        return Err(format!("{addr} (source port {port}): {e}"));
    }
    let mut s: TcpStream = sock.into();
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("{addr}: {e}"))?;
    let mut out = String::new();
    s.read_to_string(&mut out)
        .map_err(|e| format!("{addr}: {e}"))?;
    if out.starts_with("HTTP/1.1 200") && out.contains("Hostname:") {
        Ok(())
    } else {
        Err(format!("{addr}: bad answer {:?}", out.lines().next()))
    }
}

fn shoal_on(bin: &std::path::Path, lab: &str, node: &str, args: &[&str]) -> anyhow::Result<String> {
    let host = format!("unix:///run/shoal/lab/{lab}/{node}/shoal.sock");
    let o = Command::new(bin)
        .args(args)
        .env("SHOAL_HOST", host)
        .env("SHOAL_LAB", lab)
        .output()?;
    if !o.status.success() {
        bail!(
            "shoal {args:?} on {node}: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&o.stdout).to_string())
}

/// (VmRSS in KiB, open fds) of a process.
fn usage(pid: u32) -> Option<(u64, usize)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count();
    Some((rss, fds))
}

#[derive(Clone, serde::Serialize)]
struct Usage {
    node: String,
    pid: u32,
    rss_start_kib: u64,
    rss_end_kib: u64,
    fds_start: usize,
    fds_end: usize,
    /// Running tasks on the node at both ends (each holds a pidfd and its DNS sockets).
    tasks_start: usize,
    tasks_end: usize,
}

/// File descriptors the agent holds per local task: the task's pidfd and the UDP and TCP
/// sockets of its resolver.
const FDS_PER_TASK: usize = 3;

/// Running tasks per node name.
fn local_tasks(bin: &std::path::Path, lab: &str, control: &str) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    let Ok(nodes) = shoal_on(bin, lab, control, &["node", "ls", "--format", "json"]) else {
        return out;
    };
    let nodes: Vec<serde_json::Value> = serde_json::from_str(&nodes).unwrap_or_default();
    for svc in ["probe", "stable", "churn"] {
        let Ok(ps) = shoal_on(
            bin,
            lab,
            control,
            &["service", "ps", svc, "--format", "json"],
        ) else {
            continue;
        };
        let tasks: Vec<serde_json::Value> = serde_json::from_str(&ps).unwrap_or_default();
        for t in tasks.iter().filter(|t| t["state"] == "running") {
            if let Some(n) = nodes
                .iter()
                .find(|n| n["id"] == t["node_id"])
                .and_then(|n| n["name"].as_str())
            {
                *out.entry(n.to_string()).or_insert(0) += 1;
            }
        }
    }
    out
}

fn main() {
    match run() {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(2);
        }
    }
}

/// The soak; Ok(false) when a target was missed. The lab is down when it returns.
fn run() -> anyhow::Result<bool> {
    let args: Vec<String> = std::env::args().collect();
    check_flags(
        &args,
        &["--duration", "--churn-every", "--report", "--keep-logs"],
        "usage: soak [--duration 10m] [--churn-every 3s] [--report soak] [--keep-logs DIR]   (root; writes benches/reports/REPORT.md)",
    );
    let name = format!("soak{}", std::process::id());
    clean_up_on_signal(vec![Leftover::Lab(name.clone())]);
    let duration = parse_duration(&arg(&args, "--duration", "10m".to_string()))?;
    let churn_every = parse_duration(&arg(&args, "--churn-every", "3s".to_string()))?;
    let report_name: String = arg(&args, "--report", "soak".to_string());
    // Where to copy the agents' logs at the end (for a post-mortem of a failure).
    let keep_logs: String = arg(&args, "--keep-logs", String::new());
    if duration < Duration::from_secs(30) {
        bail!("--duration must be at least 30s (warm-up, kill, start and settling need it)");
    }
    let bin = shoal_bin()?;
    let _guard = lab_up(&bin, &name, 3)?;
    let lab = shoal_lab::lab::Lab::load(&name)?;
    let run = |node: &str, a: &[&str]| shoal_on(&bin, &name, node, a);
    run("node1", &["network", "create", "appnet"])?;
    let whoami = ["--", "shoal", "whoami", "--port", "80"];
    let create = |svc: &str, replicas: &str, extra: &[&str]| -> anyhow::Result<()> {
        let mut a = vec![
            "service",
            "create",
            "--name",
            svc,
            "--network",
            "appnet",
            "--replicas",
            replicas,
        ];
        a.extend_from_slice(extra);
        a.extend_from_slice(&whoami);
        run("node1", &a).map(|_| ())
    };
    create("probe", "1", &[])?;
    // Health checks, as production services have them: a new replica takes traffic once its
    // server answers (without one it may be picked a few ms before it listens, as in Docker
    // and in Kubernetes without a readiness probe).
    let health = [
        "--health-cmd",
        "curl -sf -o /dev/null --max-time 1 http://127.0.0.1:80/",
        "--health-interval",
        "500ms",
    ];
    let mut stable_args = vec!["-p", "8080:80"];
    stable_args.extend_from_slice(&health);
    create("stable", "3", &stable_args)?;
    create("churn", "2", &health)?;

    // Wait for everything to run; find the probe's node and task namespace, the VIPs.
    let start_wait = Instant::now();
    let (probe_ns, probe_node) = loop {
        let ps = run("node1", &["service", "ps", "probe", "--format", "json"])?;
        let v: serde_json::Value = serde_json::from_str(&ps)?;
        let ok = ["stable", "churn"].iter().all(|s| {
            run("node1", &["service", "ps", s, "--format", "json"])
                .ok()
                .and_then(|o| serde_json::from_str::<Vec<serde_json::Value>>(&o).ok())
                .is_some_and(|t| {
                    t.iter()
                        .filter(|t| t["state"] == "running" && t["health"] == "healthy")
                        .count()
                        >= 2
                })
        });
        if let Some(t) = v
            .as_array()
            .and_then(|a| a.iter().find(|t| t["state"] == "running"))
            && ok
        {
            let id = t["id"].as_str().context("task id")?.to_string();
            let node_id = t["node_id"].as_str().context("node id")?.to_string();
            let nodes: serde_json::Value =
                serde_json::from_str(&run("node1", &["node", "ls", "--format", "json"])?)?;
            let node = nodes
                .as_array()
                .and_then(|a| a.iter().find(|n| n["id"] == node_id.as_str()))
                .and_then(|n| n["name"].as_str())
                .context("probe's node")?
                .to_string();
            let ns = format!("shoal-{name}-{node}-t-{}", &id[..12]);
            break (ns, node);
        }
        if start_wait.elapsed() > Duration::from_secs(90) {
            bail!("services did not come up within 90 s");
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    let vip = |svc: &str| -> anyhow::Result<Ipv4Addr> {
        let v: serde_json::Value =
            serde_json::from_str(&run("node1", &["service", "inspect", svc])?)?;
        Ok(v["networks"][0]["vip"].as_str().context("vip")?.parse()?)
    };
    let (stable_vip, churn_vip) = (vip("stable")?, vip("churn")?);
    // The node to kill: not the probe's; the control node: neither.
    let names: Vec<String> = lab.nodes.iter().map(|n| n.name.clone()).collect();
    let victim = names
        .iter()
        .rev()
        .find(|n| **n != probe_node)
        .context("a node to kill")?
        .clone();
    let control = names
        .iter()
        .find(|n| **n != victim)
        .context("a control node")?
        .clone();
    let victim_addr = lab.node(&victim).context("victim")?.addr;
    eprintln!(
        "soak {name}: {} for {duration:?}; probe on {probe_node}, kill {victim} at 1/3, start at 2/3",
        lab.nodes.len()
    );

    // `service ps` reads the store: a task can be healthy there a moment before every
    // node's load balancer has it (an empty VIP refuses connections). The load, and what
    // it holds against the targets, starts once the data path answers.
    let waited = Instant::now();
    wait_until_serving(&probe_ns, &[stable_vip, churn_vip], &lab)?;
    eprintln!("the data path answered after {:?}", waited.elapsed());

    let book = Arc::new(Mutex::new(Book {
        t0: Some(Instant::now()),
        ..Book::default()
    }));
    let stop = Arc::new(AtomicBool::new(false));
    let victim_down = Arc::new(AtomicBool::new(false));
    let mut workers = vec![];

    // DNS from the probe task.
    {
        let (book, stop, ns) = (book.clone(), stop.clone(), probe_ns.clone());
        workers.push(std::thread::spawn(move || {
            shoal_netns::run_in(&ns, move || {
                let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
                sock.set_read_timeout(Some(Duration::from_secs(1)))
                    .expect("timeout");
                let mut id: u16 = 0;
                while !stop.load(Ordering::Relaxed) {
                    for n in ["stable", "tasks.stable", "churn"] {
                        id = id.wrapping_add(1);
                        let at = Instant::now();
                        let r = dns_a(&sock, id, n).err();
                        book.lock().unwrap().record(&format!("dns {n}"), at, r);
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            })
            .expect("enter the probe's namespace");
        }));
    }
    // HTTP to the VIPs from the probe task.
    for (what, vip) in [
        ("http VIP stable", stable_vip),
        ("http VIP churn", churn_vip),
    ] {
        let (book, stop, ns) = (book.clone(), stop.clone(), probe_ns.clone());
        workers.push(std::thread::spawn(move || {
            shoal_netns::run_in(&ns, move || {
                while !stop.load(Ordering::Relaxed) {
                    let at = Instant::now();
                    let r = http_get(None, (vip, 80).into(), Duration::from_millis(1200)).err();
                    book.lock().unwrap().record(what, at, r);
                    std::thread::sleep(Duration::from_millis(2));
                }
            })
            .expect("enter the probe's namespace");
        }));
    }
    // HTTP to the published port of every node from the client, from one source address
    // per node: one client reaching the same replica through several nodes with reused
    // source ports within TIME_WAIT collides (PAWS; README, Published ports), which is a
    // known limit of keeping the client address, not what this soak measures.
    let out = Command::new("ip")
        .args(["-n", &lab.client_netns, "-o", "-4", "addr", "show"])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let dev = text
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(3)?.starts_with("192.0.2.100/")).then(|| f[1].to_string())
        })
        .context("the client's underlay device")?;
    let sources: Vec<Ipv4Addr> = (0..lab.nodes.len())
        .map(|i| Ipv4Addr::new(192, 0, 2, 160 + u8::try_from(i).unwrap_or(0)))
        .collect();
    for s in &sources {
        let st = Command::new("ip")
            .args([
                "-n",
                &lab.client_netns,
                "addr",
                "add",
                &format!("{s}/24"),
                "dev",
                &dev,
            ])
            .status()?;
        if !st.success() {
            bail!("adding {s} to the client");
        }
    }
    {
        let (book, stop, down) = (book.clone(), stop.clone(), victim_down.clone());
        let client = lab.client_netns.clone();
        let addrs: Vec<Ipv4Addr> = lab.nodes.iter().map(|n| n.addr).collect();
        workers.push(std::thread::spawn(move || {
            shoal_netns::run_in(&client, move || {
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let (a, from) = (addrs[i % addrs.len()], sources[i % addrs.len()]);
                    i += 1;
                    if a == victim_addr && down.load(Ordering::Relaxed) {
                        continue;
                    }
                    let at = Instant::now();
                    let r =
                        http_get(Some(from), (a, 8080).into(), Duration::from_millis(1200)).err();
                    book.lock().unwrap().record("http published 8080", at, r);
                    std::thread::sleep(Duration::from_millis(2));
                }
            })
            .expect("enter the client namespace");
        }));
    }

    let t0 = book.lock().unwrap().t0.unwrap_or_else(Instant::now);
    eprintln!("load started at {:?}", std::time::SystemTime::now());
    // RSS and fds are compared from the end of a warm-up (a tenth of the run, 5 to 60 s: the
    // conntrack tables and caches fill up to their steady state first), and sampled every
    // 30 s for the trend. The warm-up covers the agents' first full pass at least (every
    // table read back once: libnftables' per-namespace output buffers and caches reach their
    // size there, about 1 MB per agent; heaptrack shows the live heap flat after it).
    let warm = (duration / 10)
        .max(first_full_pass())
        .clamp(Duration::from_secs(5), Duration::from_secs(60));
    let settle = Duration::from_secs(5);
    let mut series: Vec<(u64, String, u64)> = vec![];
    let mut next_sample = t0;
    std::thread::sleep(warm);
    let mut usage_start: BTreeMap<String, (u32, u64, usize, usize)> = BTreeMap::new();
    let counts = local_tasks(&bin, &name, &control);
    for n in &lab.nodes {
        if let Some((rss, fds)) = usage(n.pid) {
            let tasks = counts.get(&n.name).copied().unwrap_or(0);
            usage_start.insert(n.name.clone(), (n.pid, rss, fds, tasks));
        }
    }
    let kill_at = t0 + duration / 3;
    let start_at = t0 + duration * 2 / 3;
    let (mut killed, mut started) = (false, false);
    let mut scale_i = 0;
    let mut events = vec![];
    let mut restarted_sample_at = None;
    // A short run (CI's minute) cannot tell the one-time cost of the first node loss (new
    // blocking threads and their stacks, libnftables buffers growing to the rulesets after
    // it) from growth: the survivors are compared from after the loss has settled, so the
    // run still measures the restart and the churn. Long runs measure from the warm-up.
    let mut rebase_at = (duration < SHORT_RUN).then_some(kill_at + KILL_GRACE + settle);
    while t0.elapsed() < duration {
        let now = Instant::now();
        if !killed && now >= kill_at {
            book.lock().unwrap().kill_at = Some(Instant::now());
            victim_down.store(true, Ordering::Relaxed);
            Command::new(&bin)
                .args(["lab", "kill", "--name", &name, &victim])
                .output()?;
            events.push(format!(
                "{:.1}s: killed {victim}",
                t0.elapsed().as_secs_f64()
            ));
            killed = true;
        }
        if killed && !started && now >= start_at {
            let o = Command::new(&bin)
                .args(["lab", "start", "--name", &name, &victim])
                .output()?;
            if !o.status.success() {
                bail!(
                    "lab start {victim}: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
            }
            events.push(format!(
                "{:.1}s: started {victim}",
                t0.elapsed().as_secs_f64()
            ));
            started = true;
            // Its published port is counted again once it has converged; its agent is a
            // new process, compared from its own warm-up.
            restarted_sample_at = Some(Instant::now() + warm.max(settle));
            let down = victim_down.clone();
            std::thread::spawn(move || {
                std::thread::sleep(settle);
                down.store(false, Ordering::Relaxed);
            });
        }
        if Instant::now() >= next_sample {
            next_sample += Duration::from_secs(30);
            if let Ok(l) = shoal_lab::lab::Lab::load(&name) {
                for n in &l.nodes {
                    if let Some((rss, _)) = usage(n.pid) {
                        series.push((t0.elapsed().as_secs(), n.name.clone(), rss));
                    }
                }
            }
        }
        if let Some(at) = rebase_at
            && Instant::now() >= at
        {
            let counts = local_tasks(&bin, &name, &control);
            for n in lab.nodes.iter().filter(|n| n.name != victim) {
                if let Some((rss, fds)) = usage(n.pid) {
                    let tasks = counts.get(&n.name).copied().unwrap_or(0);
                    usage_start.insert(n.name.clone(), (n.pid, rss, fds, tasks));
                }
            }
            events.push(format!(
                "{:.1}s: RSS and fds of the surviving agents taken as the start (short run)",
                t0.elapsed().as_secs_f64()
            ));
            rebase_at = None;
        }
        if let Some(at) = restarted_sample_at
            && Instant::now() >= at
        {
            let lab_now = shoal_lab::lab::Lab::load(&name)?;
            if let Some(n) = lab_now.node(&victim)
                && let Some((rss, fds)) = usage(n.pid)
            {
                let tasks = local_tasks(&bin, &name, &control)
                    .get(&n.name)
                    .copied()
                    .unwrap_or(0);
                usage_start.insert(n.name.clone(), (n.pid, rss, fds, tasks));
            }
            restarted_sample_at = None;
        }
        let n = [1, 3, 2, 4][scale_i % 4];
        scale_i += 1;
        let pair = format!("churn={n}");
        if let Err(e) = shoal_on(&bin, &name, &control, &["service", "scale", &pair]) {
            events.push(format!(
                "{:.1}s: scale failed: {e}",
                t0.elapsed().as_secs_f64()
            ));
        }
        std::thread::sleep(churn_every.min(duration.saturating_sub(t0.elapsed())));
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.join();
    }
    let lab_end = shoal_lab::lab::Lab::load(&name)?;
    if !keep_logs.is_empty() {
        for n in &lab_end.nodes {
            let dir = std::path::Path::new(&keep_logs).join(&name);
            std::fs::create_dir_all(&dir)?;
            let src = shoal_lab::lab::lab_dir(&name)
                .join(&n.name)
                .join("agent.log");
            std::fs::copy(&src, dir.join(format!("{}.log", n.name)))?;
        }
    }
    let mut usages = vec![];
    let counts_end = local_tasks(&bin, &name, &control);
    for n in &lab_end.nodes {
        let (Some((pid, rss0, fds0, tasks0)), Some((rss1, fds1))) =
            (usage_start.get(&n.name).copied(), usage(n.pid))
        else {
            continue;
        };
        if pid != n.pid {
            continue;
        }
        series.push((t0.elapsed().as_secs(), n.name.clone(), rss1));
        usages.push(Usage {
            node: n.name.clone(),
            pid,
            rss_start_kib: rss0,
            rss_end_kib: rss1,
            fds_start: fds0,
            fds_end: fds1,
            tasks_start: tasks0,
            tasks_end: counts_end.get(&n.name).copied().unwrap_or(0),
        });
    }

    // Verdicts.
    let book = book.lock().unwrap();
    let mut missed = vec![];
    let mut md = format!(
        "# Soak\n\n3-node lab (etcd), {} s; `churn` scaled 1/3/2/4 every {} s; {victim} killed at \
         1/3 and started at 2/3. Load from the probe task ({probe_node}) and the client (one \
         source address per node: see PAWS in the README). `stable` and `churn` have health \
         checks.\n\n\
         | what | sent | failed | failed in the {} s after the kill (grace) | target |\n|---|---:|---:|---:|---|\n",
        duration.as_secs(),
        churn_every.as_secs_f64(),
        KILL_GRACE.as_secs()
    );
    for (what, t) in &book.tallies {
        let ok = t.failed == 0 && t.sent > 0;
        if !ok {
            missed.push(format!("{what}: {} of {} failed", t.failed, t.sent));
        }
        md.push_str(&format!(
            "| {what} | {} | {} | {} | 0 failed: {} |\n",
            t.sent,
            t.failed,
            t.failed_in_grace,
            if ok { "PASS" } else { "MISS" }
        ));
    }
    md.push_str(&format!("\n| agent | pid | RSS start KiB | RSS end KiB | growth | local tasks start/end | fds start | fds end | target (fds: + {FDS_PER_TASK} per added task) |\n|---|---:|---:|---:|---:|---:|---:|---:|---|\n"));
    for u in &usages {
        let growth = (u.rss_end_kib as f64 / u.rss_start_kib.max(1) as f64 - 1.0) * 100.0;
        let fd_limit = u.fds_start
            + u.fds_start / 10
            + 4
            + FDS_PER_TASK * u.tasks_end.saturating_sub(u.tasks_start);
        let ok = growth <= 10.0 && u.fds_end <= fd_limit;
        if !ok {
            missed.push(format!(
                "{}: RSS {} -> {} KiB ({growth:+.1}%), fds {} -> {}",
                u.node, u.rss_start_kib, u.rss_end_kib, u.fds_start, u.fds_end
            ));
        }
        md.push_str(&format!(
            "| {} | {} | {} | {} | {growth:+.1}% | {}/{} | {} | {} | RSS <= +10%, fds <= {fd_limit}: {} |\n",
            u.node,
            u.pid,
            u.rss_start_kib,
            u.rss_end_kib,
            u.tasks_start,
            u.tasks_end,
            u.fds_start,
            u.fds_end,
            if ok { "PASS" } else { "MISS" }
        ));
    }
    if usages.len() != lab_end.nodes.len() {
        missed.push(format!(
            "only {} of {} agents measured at both ends",
            usages.len(),
            lab_end.nodes.len()
        ));
    }
    md.push_str(&format!(
        "\nRSS (KiB) every 30 s from the end of the {} s warm-up, per agent process:\n\n",
        warm.as_secs()
    ));
    let mut by_node: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for (t, node, rss) in &series {
        by_node
            .entry(node.as_str())
            .or_default()
            .push(format!("{t}s {rss}"));
    }
    for (node, v) in &by_node {
        md.push_str(&format!("- {node}: {}\n", v.join(", ")));
    }
    md.push_str("\nEvents:\n\n");
    for e in &events {
        md.push_str(&format!("- {e}\n"));
    }
    let examples: Vec<String> = book
        .tallies
        .iter()
        .flat_map(|(w, t)| t.examples.iter().map(move |e| format!("- {w}: {e}")))
        .collect();
    if !examples.is_empty() {
        md.push_str("\nFirst failures outside the grace window:\n\n");
        md.push_str(&examples.join("\n"));
        md.push('\n');
    }
    md.push_str(&format!(
        "\nResult: {}\n",
        if missed.is_empty() {
            "every target met".to_string()
        } else {
            format!("MISSED: {}", missed.join("; "))
        }
    ));
    print!("{md}");
    let p = write_report(&report_name, &md)?;
    let json = serde_json::json!({
        "duration_secs": duration.as_secs(),
        "tallies": book.tallies,
        "agents": usages,
        "warm_up_secs": warm.as_secs(),
        "rss_series": series,
        "events": events,
        "missed": missed,
    });
    std::fs::write(
        p.with_extension("json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    eprintln!("report: {}", p.display());
    Ok(missed.is_empty())
}
