//! Shoal's resolver against aardvark-dns and dnsmasq: same machine, same run, same dnsperf
//! settings, same data (1,000 services on 3 networks, local names only).
//!
//! Each server runs in a fresh network namespace of its own (only `lo`, so nothing can leave
//! it) and dnsperf runs in the same namespace. The server is pinned to core 0, dnsperf to
//! core 1 (`taskset`). Shoal's resolver is served by this process on a tokio runtime with
//! ONE worker thread (the whole process is pinned to core 0). Per server:
//! - saturation: dnsperf for `--seconds` (default 10) with many queries outstanding -> QPS;
//!   server CPU (utime+stime of the server process from /proc/PID/stat) / answered queries;
//! - 50% of that QPS, latency: this program's `--probe` mode (`shoal_benches::dnsprobe`),
//!   which takes each answer's latency from the kernel's receive timestamp of the answer
//!   and transmit timestamp of its query, so that neither the client's own backlog nor its
//!   own sending counts; the probes of all servers take turns in 100 ms
//!   slices of one phase -> p50/p99 and lost queries;
//! - 50% of that QPS as `dnsperf -v` reports it (its receive queue included), for
//!   comparison only;
//! - the same offered rate for all three (`--equal-qps`, default 8,000: half of the slowest
//!   server's saturation), probes taking turns -> p50/p99 and lost queries, like for like.
//!
//! Two query mixes (with 20% missing names, and existing names only), `--rounds` rounds with
//! the servers interleaved; the report gives the median of each figure over the rounds.
//! For experiments: `--only shoal-dns` (one server), `--half-qps N` (that rate instead of
//! half the saturation).
//!
//! Then memory and attach time: 1,000 namespaces attached to ONE resolver sharing one
//! `Records`; RSS, kernel socket memory and slab before/after, attach() p50/p99.
//!
//! Run as root (needs dnsperf, aardvark-dns, dnsmasq: `scripts/deps.sh`):
//!   cargo run --release -p shoal-benches --bin dns_bench -- [--seconds 10] [--rounds 3]
//!   [--containers 1000] [--fifo 10]

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use shoal_benches::{
    Leftover, arg, check_flags, clean_up_on_signal, creating, median, quantile, remove_netns,
    write_report,
};
use shoal_dns::{DnsConfig, Records, Resolver};

const SERVICES: u32 = 1000;
const NETWORKS: u32 = 3;
const SERVER_CORE: usize = 0;
const CLIENT_CORE: usize = 1;
/// Queries in the dnsperf input file (dnsperf loops over it).
const QUERY_LINES: usize = 100_000;
/// The probe wakes up at most this often (µs). At 20 µs, 90k QPS kept its core 93-95%
/// busy (a wake-up per 2 queries) and, under SCHED_FIFO, the kernel's throttling of a
/// saturated core stalled it for up to 50 ms; at 50 µs it used ~74% (bursts of <= 5).
const PROBE_TICK_US: u64 = 50;
/// The servers' probes take turns in slices of this many ms (see [`probe_turns`]).
const PROBE_SLICE_MS: u64 = 100;
const AARDVARK: &str = "/usr/lib/podman/aardvark-dns";

/// Caveats written into the report (from reading the measured runs and aardvark-dns 1.4).
const NOTES: &str = r#"## Where the comparison is not apples to apples

- dnsperf is the limit for shoal-dns (dnsperf at ~95% of its core, the server below 90%) and also for dnsmasq and for aardvark-dns on existing names: their saturated QPS is partly dnsperf's. Compare QPS per core (from CPU per query); only aardvark-dns with missing names is clearly server-bound.
- The scopes differ: shoal-dns serves one view per namespace (the socket says which container asks); aardvark-dns finds the view from the requester's source address and merges the maps of its 3 networks per lookup; dnsmasq has one global hosts table and no per-container view at all.
- aardvark-dns 1.4.0 (Debian 12) is old. On a miss it scans every name of the network linearly, allocating for each one, before answering NXDOMAIN; that is why missing names cost it 5-6x more per query. Newer releases were rewritten; the anchor of about 111k QPS per core in DESIGN.md is not what 1.4.0 does here (see its QPS per core on existing names above).
- Latency is measured by the probe, not by dnsperf. At shoal-dns's 50% point `dnsperf -v` uses ~95% of its core, and `ss` sampled during such a run (at 80-100k QPS, on the machine where this was found) showed up to ~500 answers (dnsperf's `-q` limit) waiting in dnsperf's own 16 sockets while the server's socket held 0-14 queries: dnsperf's p50 there (1-2.7 ms) was its own receive queue, since it stamps an answer after its `recv` and `fflush`es a line per answer. The probe takes the kernel's timestamp of the answer's arrival instead. The dnsperf column stays in the tables for comparison; it penalises whichever server has the highest 50% rate.
- The probe's own cost matters for the same reason: woken every 20 µs it needed 93-95% of its core at 90k QPS, and under SCHED_FIFO the kernel's throttling of a saturated core then stalled it for up to 50 ms at a time. Woken at most every 50 µs (bursts of up to 5 queries at 100k QPS, single queries below 20k) it used 60-80% at 50-100k QPS (this run: the probe CPU column). "sends >1 ms late" in the all-rounds table counts the remaining client stalls; the queries sent late arrive as a burst, which every server then has to work off.
- Turns: this machine has episodes of 10-100 ms in which every server's answers take 1-7 ms (other virtual machines on the host; visible as steal and as late probe sends). Measured one server after the other, one such episode in one server's run decides its p99. So the probes of all servers run in the same phase and take turns in 100 ms slices: the episodes fall on every server alike.
- Lost queries: at saturation and at 50% load dnsmasq and aardvark-dns drop some queries (their sockets' default receive buffers overflow in bursts); shoal-dns raises its buffer to 4 MiB and drops none.
- The same-rate table shows all servers at one offered rate (`--equal-qps`, default 8,000: below aardvark-dns's saturation with missing names, 11-21k QPS on the machines measured so far), where none of them is busy: it shows the cost of a wake-up and the machine's noise more than the servers.
- CPU per query at 50% load is higher than at saturation for every server: fewer queries per wake-up (shoal-dns batches up to 32 per recvmmsg).
- Answers differ in size and TTL: shoal-dns adds an SOA to NXDOMAIN, TTL 5; dnsmasq TTL 5 (`--local-ttl`), no SOA; aardvark-dns TTL 86400, no SOA.
- The machine is shared with other work (load average in the table): runs are SCHED_FIFO, the servers interleaved and the latency runs taken in turns, but rounds still vary by up to ~30% (saturation) and more (p99); the figures are medians over the rounds.
- Memory: RSS and heap are the resolver's own cost per container (tasks, map entry, buffers); the kernel's per-container cost (two sockets, slab, about 8 KiB) is on top and measured machine-wide, so noisy. The namespaces themselves are not counted.
"#;

static NS_COUNTER: AtomicUsize = AtomicUsize::new(0);

/// How long a dnsperf run with arguments `args` may take: three times its `-l` (10 s when
/// absent), plus a minute for its last timeouts on a loaded machine.
fn dnsperf_limit(args: &[String]) -> Duration {
    let secs: u64 = args
        .iter()
        .position(|a| a == "-l")
        .and_then(|i| args.get(i + 1)?.parse().ok())
        .unwrap_or(10);
    Duration::from_secs(secs * 3 + 60)
}

// ---------------------------------------------------------------------------------------
// Data

/// One name and its A records; `net` is the network whose aardvark file lists it.
struct Entry {
    name: String,
    ips: Vec<Ipv4Addr>,
    shuffle: bool,
    net: u32,
}

/// Listening address of the aardvark/dnsmasq servers on network `k` (on `lo`).
fn gateway(k: u32) -> Ipv4Addr {
    Ipv4Addr::new(10, k as u8, 0, 1)
}

/// The client "container": 10.k.0.2 on every network; dnsperf sends from 10.1.0.2.
fn client(k: u32) -> Ipv4Addr {
    Ipv4Addr::new(10, k as u8, 0, 2)
}

fn vip(s: u32, k: u32) -> Ipv4Addr {
    Ipv4Addr::new(10, k as u8, (1 + s / 250) as u8, (s % 250 + 1) as u8)
}

fn task_ip(s: u32, t: u32, k: u32) -> Ipv4Addr {
    let n = 3 * s + t;
    Ipv4Addr::new(10, k as u8, (10 + n / 250) as u8, (n % 250 + 1) as u8)
}

/// Home network of service `s` (its plain name resolves to its VIP there).
fn home(s: u32) -> u32 {
    s % NETWORKS + 1
}

/// 1,000 services, each with a VIP on each of 3 networks and 3 tasks on its home network:
/// `svcS` (home VIP), `svcS.netK` (VIP on K), `tasks.svcS` (3 task addresses).
fn data() -> Vec<Entry> {
    let mut out = Vec::new();
    for s in 0..SERVICES {
        let h = home(s);
        out.push(Entry {
            name: format!("svc{s}"),
            ips: vec![vip(s, h)],
            shuffle: false,
            net: h,
        });
        for k in 1..=NETWORKS {
            out.push(Entry {
                name: format!("svc{s}.net{k}"),
                ips: vec![vip(s, k)],
                shuffle: false,
                net: k,
            });
        }
        out.push(Entry {
            name: format!("tasks.svc{s}"),
            ips: (0..3).map(|t| task_ip(s, t, h)).collect(),
            shuffle: true,
            net: h,
        });
    }
    out
}

/// xorshift64*: deterministic query mix without a dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u32 {
        (self.next() % n) as u32
    }
}

/// dnsperf input of `QUERY_LINES` A queries. With `misses`: 30% `svcS`, 30% `svcS.netK`, 20%
/// `tasks.svcS`, 20% names that do not exist (`nosuchS`, `nosuchS.netK`: NXDOMAIN from every
/// server, nothing forwarded). Without: the same three kinds of existing names only.
fn query_file(misses: bool) -> String {
    let mut rng = Rng(0x5ee0_0d15_c0ff_ee11);
    let mut out = String::with_capacity(QUERY_LINES * 20);
    let range = if misses { 100 } else { 80 };
    for _ in 0..QUERY_LINES {
        let s = rng.below(SERVICES as u64);
        let k = rng.below(NETWORKS as u64) + 1;
        let line = match rng.below(range) {
            0..30 => format!("svc{s} A\n"),
            30..60 => format!("svc{s}.net{k} A\n"),
            60..80 => format!("tasks.svc{s} A\n"),
            80..90 => format!("nosuch{s} A\n"),
            _ => format!("nosuch{s}.net{k} A\n"),
        };
        out.push_str(&line);
    }
    out
}

/// The two query mixes: (label, file name, with misses).
const MIXES: [(&str, &str, bool); 2] = [
    ("80% existing names, 20% missing", "queries-mixed", true),
    ("existing names only", "queries-hits", false),
];

fn shoal_records(entries: &[Entry]) -> Records {
    let mut b = Records::builder();
    for e in entries {
        b.a(&e.name, &e.ips, e.shuffle);
    }
    b.forward(false).build()
}

/// aardvark-dns 1.4 config directory: one file per network, named after it; first line the
/// listening address(es), then one line per "container": `ID IPV4S IPV6S NAMES`. It answers
/// by the requester's source address (the client must be a container of those networks),
/// so the client 10.k.0.2 is listed on every network.
fn aardvark_config(dir: &Path, entries: &[Entry]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    for k in 1..=NETWORKS {
        let mut text = format!("{}\nclient {}  client\n", gateway(k), client(k));
        for (i, e) in entries.iter().enumerate().filter(|(_, e)| e.net == k) {
            for (j, ip) in e.ips.iter().enumerate() {
                text.push_str(&format!("e{i}x{j} {ip}  {}\n", e.name));
            }
        }
        std::fs::write(dir.join(format!("net{k}")), text)?;
    }
    Ok(())
}

/// dnsmasq: a hosts file of the same names (one line per address).
fn dnsmasq_hosts(entries: &[Entry]) -> String {
    let mut text = String::new();
    for e in entries {
        for ip in &e.ips {
            text.push_str(&format!("{ip} {}\n", e.name));
        }
    }
    text
}

// ---------------------------------------------------------------------------------------
// Cleanup guards

/// A fresh network namespace with `lo` up; on drop, every process left in it is killed and
/// it is removed (also on panic).
struct Netns {
    name: String,
}

impl Netns {
    fn new(tag: &str) -> anyhow::Result<Netns> {
        let name = format!(
            "{}{tag}{}",
            ns_prefix(),
            NS_COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        creating(|| shoal_netns::create(&name).with_context(|| format!("creating {name}")))?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    fn ip(&self, args: &[&str]) -> anyhow::Result<()> {
        let out = Command::new("ip")
            .arg("-n")
            .arg(&self.name)
            .args(args)
            .output()?;
        ensure!(
            out.status.success(),
            "ip -n {} {}: {}",
            self.name,
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    /// Server and client addresses on `lo`. (No /etc/netns/NAME/resolv.conf: removing that
    /// directory once hung in the kernel's shrink_dcache_parent here; the namespace has no
    /// route out anyway and neither server is given an upstream.)
    fn with_addresses(self) -> anyhow::Result<Netns> {
        for k in 1..=NETWORKS {
            self.ip(&["addr", "add", &format!("{}/32", gateway(k)), "dev", "lo"])?;
            self.ip(&["addr", "add", &format!("{}/32", client(k)), "dev", "lo"])?;
        }
        Ok(self)
    }

    fn exec(&self, core: usize, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, "taskset", "-c"])
            .arg(core.to_string())
            .arg(program);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        remove_netns(&self.name);
    }
}

/// This run's namespaces: `shoal-b-dns-PID-...`.
fn ns_prefix() -> String {
    format!("shoal-b-dns-{}-", std::process::id())
}

/// This run's query files and server configurations.
fn tmp_dir() -> PathBuf {
    std::env::temp_dir().join(format!("shoal-b-dns-{}", std::process::id()))
}

fn kill(pid: i32) {
    // SAFETY: plain syscall on a pid this program started.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
}

/// A server process: killed (and reaped, when it is our child) on drop.
enum Server {
    InProcess,
    Child(Child),
    Daemon(i32),
}

impl Server {
    fn pid(&self) -> u32 {
        match self {
            Server::InProcess => std::process::id(),
            Server::Child(c) => c.id(),
            Server::Daemon(p) => *p as u32,
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        match self {
            Server::InProcess => {}
            Server::Child(c) => {
                let _ = c.kill();
                let _ = c.wait();
            }
            Server::Daemon(p) => {
                kill(*p);
                // This process is a child subreaper: the orphaned daemon is ours to reap.
                // SAFETY: plain syscall on our own (adopted) child.
                unsafe {
                    libc::waitpid(*p, std::ptr::null_mut(), 0);
                }
            }
        }
    }
}

struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------------------
// Measuring

/// utime+stime of a process, from /proc/PID/stat (clock ticks).
fn proc_cpu(pid: u32) -> anyhow::Result<Duration> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = text.rsplit_once(')').context("stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields after the command: state is field 3 (index 0 here); utime 14, stime 15.
    let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Ok(Duration::from_secs_f64(ticks as f64 / hz as f64))
}

/// (busy, total, steal) jiffies of one CPU, from /proc/stat. Busy includes steal: time the
/// hypervisor ran something else on this virtual CPU.
fn core_ticks(core: usize) -> (u64, u64, u64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let prefix = format!("cpu{core} ");
    let Some(line) = text.lines().find(|l| l.starts_with(&prefix)) else {
        return (0, 0, 0);
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total, v.get(7).copied().unwrap_or(0))
}

fn busy(a: (u64, u64, u64), b: (u64, u64, u64)) -> f64 {
    (b.0 - a.0) as f64 / (b.1 - a.1).max(1) as f64
}

fn steal(a: (u64, u64, u64), b: (u64, u64, u64)) -> f64 {
    (b.2 - a.2) as f64 / (b.1 - a.1).max(1) as f64
}

struct Perf {
    completed: u64,
    sent: u64,
    lost: u64,
    qps: f64,
    /// Server process CPU during the run.
    cpu: Duration,
    /// dnsperf's own CPU (its rusage).
    client_cpu: Duration,
    /// From starting dnsperf to its exit (includes waiting for the last timeouts).
    lifetime: f64,
    server_busy: f64,
    client_busy: f64,
    /// Share of the run the hypervisor took the core away (steal), server and client core.
    server_steal: f64,
    client_steal: f64,
    latencies: Vec<Duration>,
    rcodes: String,
    /// Probe runs: queries sent more than 1 ms behind schedule (the client's health).
    late_sends: u64,
    /// Probe runs: answers timed from the clock before their burst (no kernel transmit
    /// timestamp came back for their query).
    without_tx_stamp: u64,
}

impl Perf {
    fn us_per_query(&self) -> f64 {
        self.cpu.as_secs_f64() * 1e6 / self.completed.max(1) as f64
    }
    fn qps_per_core(&self) -> f64 {
        self.completed as f64 / self.cpu.as_secs_f64().max(1e-9)
    }
    /// Share of one core the server process used while dnsperf ran.
    fn server_share(&self) -> f64 {
        self.cpu.as_secs_f64() / self.lifetime.max(1e-9)
    }
    /// Share of one core dnsperf used (near 100%: dnsperf was the limit).
    fn client_share(&self) -> f64 {
        self.client_cpu.as_secs_f64() / self.lifetime.max(1e-9)
    }
}

fn field(text: &str, key: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.trim().strip_prefix(key))
        .and_then(|r| r.split_whitespace().next())
        .map(str::to_string)
}

/// What a client run measured besides its own figures: the server's CPU, the client's
/// CPU, and both cores' busy and steal ticks.
struct Measured {
    ok: bool,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    cpu: Duration,
    client_cpu: Duration,
    lifetime: f64,
    server_ticks: ((u64, u64, u64), (u64, u64, u64)),
    client_ticks: ((u64, u64, u64), (u64, u64, u64)),
}

/// Runs the client `cmd` to completion (output to `out`), measuring the server's CPU and
/// both cores around it.
fn measured_run(
    server: &Server,
    cmd: Command,
    out: &Path,
    limit: Duration,
) -> anyhow::Result<Measured> {
    let (c0, s0, k0) = (
        proc_cpu(server.pid())?,
        core_ticks(SERVER_CORE),
        core_ticks(CLIENT_CORE),
    );
    let started = Instant::now();
    let (ok, stdout, stderr, client_cpu) = run_with_rusage(cmd, out, limit)?;
    let lifetime = started.elapsed().as_secs_f64();
    let (c1, s1, k1) = (
        proc_cpu(server.pid())?,
        core_ticks(SERVER_CORE),
        core_ticks(CLIENT_CORE),
    );
    Ok(Measured {
        ok,
        stdout,
        stderr,
        cpu: c1.saturating_sub(c0),
        client_cpu,
        lifetime,
        server_ticks: (s0, s1),
        client_ticks: (k0, k1),
    })
}

/// Runs dnsperf on the client core inside `ns` against `server`, measuring the server's CPU.
fn dnsperf(
    ns: &Netns,
    server: &Server,
    addr: Ipv4Addr,
    file: &Path,
    extra: &[String],
) -> anyhow::Result<Perf> {
    let mut cmd = ns.exec(CLIENT_CORE, "dnsperf");
    cmd.args(["-s", &addr.to_string(), "-a", &client(1).to_string(), "-d"])
        .arg(file)
        .args(extra)
        .stdin(Stdio::null());
    let m = measured_run(
        server,
        cmd,
        &file.with_extension("out"),
        dnsperf_limit(extra),
    )
    .context("running dnsperf")?;
    let text = String::from_utf8_lossy(&m.stdout);
    ensure!(
        m.ok,
        "dnsperf failed: {}{}",
        text,
        String::from_utf8_lossy(&m.stderr)
    );
    let num = |k: &str| -> anyhow::Result<u64> {
        field(&text, k)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("dnsperf output without {k:?}:\n{text}"))
    };
    let mut latencies = Vec::new();
    for l in text.lines().filter(|l| l.starts_with("> ")) {
        let w: Vec<&str> = l.split_whitespace().collect();
        if w.len() == 5
            && w[1] != "T"
            && w[1] != "I"
            && let Ok(s) = w[4].parse::<f64>()
        {
            latencies.push(Duration::from_secs_f64(s));
        }
    }
    latencies.sort();
    Ok(Perf {
        completed: num("Queries completed:")?,
        sent: num("Queries sent:")?,
        lost: num("Queries lost:")?,
        qps: field(&text, "Queries per second:")
            .and_then(|v| v.parse().ok())
            .context("dnsperf QPS")?,
        cpu: m.cpu,
        client_cpu: m.client_cpu,
        lifetime: m.lifetime,
        server_busy: busy(m.server_ticks.0, m.server_ticks.1),
        client_busy: busy(m.client_ticks.0, m.client_ticks.1),
        server_steal: steal(m.server_ticks.0, m.server_ticks.1),
        client_steal: steal(m.client_ticks.0, m.client_ticks.1),
        latencies,
        rcodes: field_line(&text, "Response codes:"),
        late_sends: 0,
        without_tx_stamp: 0,
    })
}

/// One probe (this program's `--probe` mode, see `shoal_benches::dnsprobe`) per target
/// `(namespace, server, address, rate)`, all started together on the client core and
/// taking turns in [`PROBE_SLICE_MS`] slices until each has sent for `seconds`: latencies
/// from kernel receive timestamps, and whatever else the machine does meanwhile hits every
/// server alike. Busy and steal are over the whole phase (all servers).
fn probe_turns(
    targets: &[(&Netns, &Server, Ipv4Addr, u64)],
    file: &Path,
    seconds: u64,
) -> anyhow::Result<Vec<Perf>> {
    let exe = std::env::current_exe()?;
    // Time for every probe to start and read its queries before the first slice.
    let start_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos() as u64
        + 1_500_000_000;
    let n = targets.len();
    let mut runs = Vec::new();
    for (k, (ns, _, addr, rate)) in targets.iter().enumerate() {
        let lat = file.with_extension(format!("probe{k}-lat"));
        let out = file.with_extension(format!("probe{k}-out"));
        let mut cmd = ns.exec(CLIENT_CORE, &exe.to_string_lossy());
        cmd.args(["--probe", &format!("{addr}:53"), "--bind"])
            .arg(client(1).to_string())
            .args([
                "--rate",
                &rate.to_string(),
                "--seconds",
                &seconds.to_string(),
            ])
            .arg("--queries")
            .arg(file)
            .arg("--latencies")
            .arg(&lat)
            .args(["--tick-us", &PROBE_TICK_US.to_string()])
            .args(["--turn-start-ns", &start_ns.to_string()])
            .args(["--slice-ms", &PROBE_SLICE_MS.to_string()])
            .args(["--turn", &k.to_string(), "--turns", &n.to_string()])
            .stdin(Stdio::null());
        runs.push((cmd, out, lat));
    }
    let limit = Duration::from_secs(seconds * n as u64 * 3 + 60);
    let c0: Vec<Duration> = targets
        .iter()
        .map(|t| proc_cpu(t.1.pid()))
        .collect::<anyhow::Result<_>>()?;
    let (s0, k0) = (core_ticks(SERVER_CORE), core_ticks(CLIENT_CORE));
    let results: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = runs
            .into_iter()
            .map(|(cmd, out, lat)| scope.spawn(move || (run_with_rusage(cmd, &out, limit), lat)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("probe thread"))
            .collect()
    });
    let (s1, k1) = (core_ticks(SERVER_CORE), core_ticks(CLIENT_CORE));
    let mut perfs = Vec::new();
    for (k, (result, lat_file)) in results.into_iter().enumerate() {
        let (ok, stdout, stderr, client_cpu) = result.context("running the probe")?;
        let text = String::from_utf8_lossy(&stdout);
        ensure!(
            ok,
            "probe failed: {}{}",
            text,
            String::from_utf8_lossy(&stderr)
        );
        let num = |key: &str| -> anyhow::Result<u64> {
            field(&text, key)
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("probe output without {key:?}:\n{text}"))
        };
        let raw = std::fs::read(&lat_file)?;
        let latencies: Vec<Duration> = raw
            .chunks_exact(8)
            .map(|c| Duration::from_nanos(u64::from_le_bytes(c.try_into().unwrap_or_default())))
            .collect();
        let completed = num("answered:")?;
        perfs.push(Perf {
            completed,
            sent: num("sent:")?,
            lost: num("lost:")?,
            qps: completed as f64 / seconds.max(1) as f64,
            cpu: proc_cpu(targets[k].1.pid())?.saturating_sub(c0[k]),
            client_cpu,
            // Its active time: the share is of the time it was sending.
            lifetime: seconds as f64,
            server_busy: busy(s0, s1),
            client_busy: busy(k0, k1),
            server_steal: steal(s0, s1),
            client_steal: steal(k0, k1),
            latencies,
            rcodes: field_line(&text, "slow_windows:"),
            late_sends: num("late_sends:")?,
            without_tx_stamp: num("without_tx_stamp:")?,
        });
    }
    Ok(perfs)
}

/// `--probe ADDR:PORT --bind IP --rate N --seconds S --queries FILE --latencies OUT`: the
/// client side of [`probe`], run as its own process like dnsperf. Prints its counters and
/// writes the sorted latencies (ns, u64 little-endian) to OUT.
fn probe_main(args: &[String]) -> anyhow::Result<()> {
    use shoal_benches::dnsprobe;
    let text = |name: &str| -> anyhow::Result<String> {
        let i = args
            .iter()
            .position(|a| a == name)
            .with_context(|| format!("--probe needs {name}"))?;
        args.get(i + 1)
            .cloned()
            .with_context(|| format!("{name} needs a value"))
    };
    let server: std::net::SocketAddrV4 = text("--probe")?.parse().context("--probe ADDR:PORT")?;
    let bind: Ipv4Addr = text("--bind")?.parse().context("--bind")?;
    let rate: u64 = text("--rate")?.parse().context("--rate")?;
    let seconds: u64 = text("--seconds")?.parse().context("--seconds")?;
    let mut queries = Vec::new();
    for line in std::fs::read_to_string(text("--queries")?)?.lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        // The same query dnsperf builds from the line: type A, recursion desired.
        let mut m = Message::query();
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name)?, RecordType::A));
        queries.push(m.to_vec()?);
    }
    let out = dnsprobe::run(
        &queries,
        &dnsprobe::ProbeConfig {
            bind,
            server,
            rate,
            duration: Duration::from_secs(seconds),
            timeout: Duration::from_secs(2),
            tick: Duration::from_micros(arg(args, "--tick-us", PROBE_TICK_US)),
            turns: match arg(args, "--turn-start-ns", 0u64) {
                0 => None,
                start_ns => Some(dnsprobe::Turns {
                    start_ns,
                    slice: Duration::from_millis(arg(args, "--slice-ms", 500)),
                    turn: arg(args, "--turn", 0),
                    turns: arg(args, "--turns", 1),
                }),
            },
        },
    )?;
    let mut raw = Vec::with_capacity(out.latencies.len() * 8);
    for l in &out.latencies {
        raw.extend_from_slice(&(l.as_nanos() as u64).to_le_bytes());
    }
    std::fs::write(text("--latencies")?, raw)?;
    println!(
        "sent: {}\nanswered: {}\nlost: {}\nunexpected: {}\nlate_sends: {}\nmax_send_lag_us: {}\nwithout_tx_stamp: {}",
        out.sent,
        out.answered,
        out.lost,
        out.unexpected,
        out.late_sends,
        out.max_send_lag.as_micros(),
        out.without_tx_stamp
    );
    // When the slow answers happened: 10 ms windows with answers over 1 ms.
    let mut windows: Vec<(u64, usize, Duration)> = Vec::new();
    for &(at, lat) in &out.slow {
        let w = at / 10_000_000;
        match windows.last_mut() {
            Some(last) if last.0 == w => {
                last.1 += 1;
                last.2 = last.2.max(lat);
            }
            _ => windows.push((w, 1, lat)),
        }
    }
    let shown: Vec<String> = windows
        .iter()
        .map(|(w, n, max)| format!("{}ms:{n}x<={:.1}ms", w * 10, max.as_secs_f64() * 1e3))
        .collect();
    println!("slow_windows: {} {}", windows.len(), shown.join(" "));
    Ok(())
}

/// Runs `cmd` to completion with its stdout and stderr going to files next to `out` (not
/// pipes: nothing of this process, which may be the server, runs while it works); returns
/// success, its output and the CPU time it used (`ip netns exec` and `taskset` exec into the
/// program: same process).
fn run_with_rusage(
    mut cmd: Command,
    out: &Path,
    limit: Duration,
) -> anyhow::Result<(bool, Vec<u8>, Vec<u8>, Duration)> {
    // Next to `out` and as unique (runs may go on in parallel).
    let err = PathBuf::from(format!("{}.err", out.display()));
    cmd.stdout(std::fs::File::create(out)?)
        .stderr(std::fs::File::create(&err)?);
    let child = cmd.spawn()?;
    let pid = child.id() as i32;
    // A watchdog: under SCHED_FIFO dnsperf's threads share one core, and one run kept its
    // sender spinning for 10 minutes past `-l` while the others starved. Killed after
    // `limit`, the run fails (dnsperf's exit status) instead of hanging the benchmark.
    let (cancel, cancelled) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = cancelled.recv_timeout(limit) {
            eprintln!("dnsperf still running after {limit:?}: killing it");
            kill(pid);
            true
        } else {
            false
        }
    });
    let mut status = 0;
    // SAFETY: zeroed rusage is valid; wait4 reaps our own child and fills both out-params.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        if libc::wait4(pid, &mut status, 0, &mut ru) != pid {
            bail!("wait4: {}", std::io::Error::last_os_error());
        }
        ru
    };
    // Reaped above; `child` must not be waited for again.
    drop(child);
    let _ = cancel.send(());
    if watchdog.join().unwrap_or(false) {
        bail!("dnsperf did not finish within {limit:?} (killed)");
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    let ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
    let (stdout, stderr) = (std::fs::read(out)?, std::fs::read(&err)?);
    let _ = std::fs::remove_file(out);
    let _ = std::fs::remove_file(&err);
    Ok((ok, stdout, stderr, tv(ru.ru_utime) + tv(ru.ru_stime)))
}

fn field_line(text: &str, key: &str) -> String {
    text.lines()
        .find_map(|l| l.trim().strip_prefix(key))
        .unwrap_or("")
        .trim()
        .to_string()
}

// ---------------------------------------------------------------------------------------
// Checking answers

/// Asks `server` for `name` (A) from `sock`; returns rcode and sorted addresses.
fn ask(
    sock: &UdpSocket,
    server: SocketAddr,
    id: u16,
    name: &str,
) -> anyhow::Result<(ResponseCode, Vec<Ipv4Addr>)> {
    let mut m = Message::query();
    m.metadata.id = id;
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name)?, RecordType::A));
    sock.send_to(&m.to_vec()?, server)?;
    let mut buf = [0u8; 4096];
    loop {
        let (n, _) = sock.recv_from(&mut buf).context("no answer")?;
        let r = Message::from_vec(&buf[..n])?;
        if r.metadata.id != id {
            continue;
        }
        let mut ips: Vec<Ipv4Addr> = r
            .answers
            .iter()
            .filter_map(|rr| match &rr.data {
                RData::A(a) => Some(a.0),
                _ => None,
            })
            .collect();
        ips.sort();
        return Ok((r.metadata.response_code, ips));
    }
}

/// A client socket inside `ns` bound to the client address.
fn client_socket(ns: &str, from: Ipv4Addr) -> anyhow::Result<UdpSocket> {
    let sock = shoal_netns::run_in(ns, move || -> std::io::Result<UdpSocket> {
        let s = UdpSocket::bind((from, 0))?;
        s.set_read_timeout(Some(Duration::from_millis(500)))?;
        Ok(s)
    })??;
    Ok(sock)
}

/// Every name of the data set and 200 names that do not exist, answered exactly.
fn check_all(ns: &str, server: SocketAddr, entries: &[Entry]) -> anyhow::Result<usize> {
    let sock = client_socket(ns, client(1))?;
    let mut id = 0u16;
    let mut n = 0;
    for e in entries {
        id = id.wrapping_add(1);
        let (rc, ips) = ask(&sock, server, id, &e.name).with_context(|| e.name.clone())?;
        let mut want = e.ips.clone();
        want.sort();
        ensure!(
            rc == ResponseCode::NoError && ips == want,
            "{server}: {} answered {rc:?} {ips:?}, want {want:?}",
            e.name
        );
        n += 1;
    }
    for s in 0..100 {
        for name in [format!("nosuch{s}"), format!("nosuch{s}.net2")] {
            id = id.wrapping_add(1);
            let (rc, ips) = ask(&sock, server, id, &name).with_context(|| name.clone())?;
            ensure!(
                rc == ResponseCode::NXDomain && ips.is_empty(),
                "{server}: {name} answered {rc:?} {ips:?}, want NXDOMAIN"
            );
            n += 1;
        }
    }
    Ok(n)
}

/// Waits until `server` answers `svc0` inside `ns`.
fn wait_ready(ns: &str, server: SocketAddr) -> anyhow::Result<()> {
    let sock = client_socket(ns, client(1))?;
    let t0 = Instant::now();
    let mut id = 0;
    loop {
        id += 1;
        if ask(&sock, server, id, "svc0").is_ok() {
            return Ok(());
        }
        if t0.elapsed() > Duration::from_secs(10) {
            bail!("{server} in {ns} did not answer within 10 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------------------
// Memory

fn status_kib(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn meminfo_kib(key: &str) -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// `mem` pages of UDP and TCP from /proc/net/sockstat (global protocol memory).
fn sockstat_mem_pages() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/net/sockstat").unwrap_or_default();
    let get = |proto: &str| {
        text.lines()
            .find(|l| l.starts_with(proto))
            .and_then(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                w.iter()
                    .position(|x| *x == "mem")
                    .and_then(|i| w.get(i + 1))
                    .and_then(|v| v.parse().ok())
            })
            .unwrap_or(0)
    };
    (get("UDP:"), get("TCP:"))
}

/// Bytes allocated and not freed on the heap (glibc's arenas and mmapped chunks).
fn heap_in_use() -> u64 {
    // SAFETY: mallinfo2 has no preconditions.
    let m = unsafe { libc::mallinfo2() };
    (m.uordblks + m.hblkhd) as u64
}

fn raise_fd_limit() {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid pointer to an rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

fn pin_to(core: usize) -> anyhow::Result<()> {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET writes inside it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(core, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            bail!("sched_setaffinity: {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------

struct Row {
    server: &'static str,
    mix: usize,
    round: u64,
    sat: Perf,
    /// 50% load, measured by the probe (kernel timestamps).
    half: Perf,
    /// 50% load, measured by dnsperf -v (its own receive queue included).
    half_dnsperf: Perf,
    /// The same offered rate for every server (`--equal-qps`).
    equal: Perf,
    target_qps: u64,
    load: String,
}

/// Median figures of one server and query mix over the rounds.
struct Summary {
    qps: f64,
    qps_per_core: f64,
    us: f64,
    server_share: f64,
    client_share: f64,
    p50: f64,
    p99: f64,
    lost: u64,
    sent: u64,
    us_half: f64,
    dp_p50: f64,
    dp_p99: f64,
    dp_client: f64,
    probe_client: f64,
    rcodes: String,
    eq_p50: f64,
    eq_p99: f64,
    eq_lost: u64,
    eq_sent: u64,
}

fn ms3(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1000.0)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

const SERVERS: [&str; 3] = ["shoal-dns", "aardvark-dns", "dnsmasq"];

/// Starts `server_name` inside `ns`; returns its process guard and listening address.
fn start_server(
    server_name: &str,
    ns: &Netns,
    rt: &tokio::runtime::Runtime,
    resolver: &Resolver,
    records: &Arc<Records>,
    tmp: &Path,
) -> anyhow::Result<(Server, SocketAddr)> {
    Ok(match server_name {
        "shoal-dns" => {
            rt.block_on(resolver.attach("bench", &ns.name, records.clone()))?;
            (Server::InProcess, shoal_dns::LISTEN_ADDR)
        }
        "aardvark-dns" => {
            // It forks a daemon once its servers are ready and writes its pid there.
            let dir = tmp.join("aardvark");
            let _ = std::fs::remove_file(dir.join("aardvark.pid"));
            let out = ns
                .exec(SERVER_CORE, AARDVARK)
                .env("AARDVARK_NO_PROXY", "1")
                .arg("--config")
                .arg(&dir)
                .args(["-p", "53", "run"])
                .stdin(Stdio::null())
                .output()?;
            ensure!(
                out.status.success(),
                "aardvark-dns: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let pid: i32 = std::fs::read_to_string(dir.join("aardvark.pid"))?
                .trim()
                .parse()?;
            (Server::Daemon(pid), SocketAddr::from((gateway(1), 53)))
        }
        _ => {
            let child = ns
                .exec(SERVER_CORE, "dnsmasq")
                .args(DNSMASQ_ARGS)
                .arg(format!("--listen-address={}", gateway(1)))
                .arg(format!("--addn-hosts={}", tmp.join("hosts").display()))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?;
            (Server::Child(child), SocketAddr::from((gateway(1), 53)))
        }
    })
}

const DNSMASQ_ARGS: [&str; 10] = [
    "--keep-in-foreground",
    "--conf-file=/dev/null",
    "--no-resolv",
    "--no-hosts",
    "--local=/#/",
    "--local-ttl=5",
    "--bind-interfaces",
    "--pid-file=",
    "--user=root",
    "--port=53",
];

const USAGE: &str = "\
usage: dns_bench [--seconds N] [--rounds N] [--containers N] [--equal-qps QPS] [--fifo PRIO]
                 [--only shoal-dns|aardvark-dns|dnsmasq] [--half-qps QPS]
Shoal's resolver vs aardvark-dns vs dnsmasq (root; see benches/reports/dns.md, How).
  --seconds N       length of each dnsperf and probe run (default 10)
  --rounds N        rounds, servers interleaved; figures are medians (default 3)
  --containers N    containers attached for the memory figure (default 1000)
  --equal-qps QPS   the rate offered to every server for the same-rate table (default 8000)
  --fifo PRIO       SCHED_FIFO priority for the benchmark and what it starts; 0 = off
  --only SERVER     one server only (an experiment; no comparison)
  --half-qps QPS    a fixed rate instead of half the saturated QPS (an experiment)
Writes benches/reports/dns.md (or $SHOAL_REPORT_DIR/dns.md).";

fn words(s: &str) -> Vec<String> {
    s.split_whitespace().map(String::from).collect()
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).is_some_and(|a| a == "--probe") {
        return probe_main(&args);
    }
    check_flags(
        &args,
        &[
            "--seconds",
            "--rounds",
            "--containers",
            "--equal-qps",
            "--fifo",
            "--only",
            "--half-qps",
        ],
        USAGE,
    );
    clean_up_on_signal(vec![Leftover::Netns(ns_prefix()), Leftover::Dir(tmp_dir())]);
    let seconds = arg(&args, "--seconds", 10);
    let rounds = arg(&args, "--rounds", 3).max(1);
    let containers = arg(&args, "--containers", 1000) as usize;
    // Half of the slowest server's saturation (aardvark-dns with missing names, ~17k here):
    // every server answers the same offered rate, so their latencies compare like for like.
    let equal_qps = arg(&args, "--equal-qps", 8000);
    // For experiments: one server only, and/or a fixed rate instead of half the saturation.
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1).cloned());
    if let Some(o) = &only {
        ensure!(
            SERVERS.contains(&o.as_str()),
            "--only {o:?}: not one of {}",
            SERVERS.join(", ")
        );
    }
    let half_qps = arg(&args, "--half-qps", 0);
    ensure!(
        std::path::Path::new(AARDVARK).exists(),
        "{AARDVARK} missing: apt-get install aardvark-dns"
    );
    raise_fd_limit();
    // aardvark-dns daemonizes; as subreaper this process adopts and reaps it.
    // SAFETY: plain prctl.
    unsafe {
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1);
    }
    // Other work on this shared machine competes for the two cores. The benchmark and all it
    // starts (servers, dnsperf: the policy is inherited) run SCHED_FIFO, the same for all
    // three servers; the kernel's RT throttling still leaves 5% of each core to the rest.
    // `--fifo 0`: nice -10 instead.
    let fifo = arg(&args, "--fifo", 10) as i32;
    let sched = if fifo > 0 {
        let p = libc::sched_param {
            sched_priority: fifo,
        };
        // SAFETY: valid sched_param; affects this thread and what it creates later.
        if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &p) } != 0 {
            bail!("sched_setscheduler: {}", std::io::Error::last_os_error());
        }
        format!("SCHED_FIFO priority {fifo}")
    } else {
        // SAFETY: plain syscall; a failure only leaves the priority as it was.
        unsafe {
            libc::setpriority(libc::PRIO_PROCESS, 0, -10);
        }
        "nice -10".to_string()
    };
    // Everything of this process (the resolver's one worker thread, tokio's blocking pool,
    // the main thread) on the server core; every thread spawned from here inherits it.
    pin_to(SERVER_CORE)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;

    let entries = data();
    let records = Arc::new(shoal_records(&entries));
    let tmp = TempDir(tmp_dir());
    std::fs::create_dir_all(&tmp.0)?;
    for (_, file, misses) in MIXES {
        std::fs::write(tmp.0.join(file), query_file(misses))?;
    }
    std::fs::write(tmp.0.join("hosts"), dnsmasq_hosts(&entries))?;
    aardvark_config(&tmp.0.join("aardvark"), &entries)?;

    let resolver = Resolver::new(DnsConfig::default());
    // First (fresh heap, nothing freed yet to reuse): memory and attach time, `containers`
    // namespaces on ONE resolver, one shared Records.
    println!("creating {containers} namespaces...");
    let mut nss = Vec::with_capacity(containers);
    let t0 = Instant::now();
    for _ in 0..containers {
        nss.push(Netns::new("m")?);
    }
    let ns_time = t0.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let rss0 = status_kib("VmRSS:");
    let heap0 = heap_in_use();
    let slab0 = meminfo_kib("Slab:");
    let sock0 = sockstat_mem_pages();
    let mut attach = Vec::with_capacity(containers);
    for (i, ns) in nss.iter().enumerate() {
        let t = Instant::now();
        rt.block_on(resolver.attach(&format!("c{i}"), &ns.name, records.clone()))?;
        attach.push(t.elapsed());
    }
    std::thread::sleep(Duration::from_millis(500));
    let rss1 = status_kib("VmRSS:");
    let heap1 = heap_in_use();
    let slab1 = meminfo_kib("Slab:");
    let sock1 = sockstat_mem_pages();
    // A sample of the attached containers answers (this also charges their UDP buffers).
    let step = (containers / 20).max(1);
    let mut sampled = 0;
    for (i, ns) in nss.iter().enumerate().step_by(step) {
        let sock = client_socket(&ns.name, Ipv4Addr::LOCALHOST)?;
        let (rc, ips) = ask(&sock, shoal_dns::LISTEN_ADDR, i as u16, "tasks.svc7")?;
        ensure!(
            rc == ResponseCode::NoError && ips.len() == 3,
            "container {i}"
        );
        sampled += 1;
    }
    let rss2 = status_kib("VmRSS:");
    let t = Instant::now();
    for i in 0..containers {
        rt.block_on(resolver.detach(&format!("c{i}")));
    }
    let detach_time = t.elapsed();
    drop(nss);
    attach.sort();
    let n = containers.max(1) as f64;
    let per = |a: u64, b: u64| b.saturating_sub(a) as f64 / n;
    let page_kib = 4.0;
    let heap_per = heap1.saturating_sub(heap0) as f64 / 1024.0 / n;

    let perf_args = "-c 16 -q 500 -T 1 -t 2";
    let sat_args = words(&format!("-l {seconds} {perf_args}"));
    let mut rows: Vec<Row> = Vec::new();
    let mut checked = 0;
    let load_start = loadavg();
    // Rounds interleave the servers, so that load from elsewhere on the machine hits all.
    for round in 1..=rounds {
        // Every server of the round runs, each in its own namespace, for the whole round:
        // saturation one after the other, the latency runs taking turns (`probe_turns`).
        let mut live = Vec::new();
        for server_name in SERVERS {
            if only.as_ref().is_some_and(|o| o != server_name) {
                continue;
            }
            let ns = Netns::new("s")?.with_addresses()?;
            let (server, addr) = start_server(server_name, &ns, &rt, &resolver, &records, &tmp.0)?;
            let SocketAddr::V4(a4) = addr else {
                bail!("IPv4 only")
            };
            wait_ready(&ns.name, addr)?;
            checked = check_all(&ns.name, addr, &entries)
                .with_context(|| format!("{server_name} answers differ"))?;
            live.push((server_name, ns, server, *a4.ip()));
        }
        for (mix, (label, file, _)) in MIXES.iter().enumerate() {
            let qfile = tmp.0.join(file);
            let mut per_server = Vec::new();
            for (server_name, ns, server, addr) in &live {
                let load = loadavg();
                let sat = dnsperf(ns, server, *addr, &qfile, &sat_args)?;
                let target_qps = if half_qps > 0 {
                    half_qps
                } else {
                    (sat.qps / 2.0) as u64
                };
                let half_args = words(&format!("-l {seconds} {perf_args} -v -Q {target_qps}"));
                let half_dnsperf = dnsperf(ns, server, *addr, &qfile, &half_args)?;
                println!(
                    "round {round} {server_name} [{label}]: {:.0} QPS, {:.2} µs CPU/query, CPU server {:.0}% dnsperf {:.0}%; dnsperf -v @{target_qps}: p50 {} ms p99 {} ms lost {} (dnsperf CPU {:.0}%) (load {load})",
                    sat.qps,
                    sat.us_per_query(),
                    sat.server_share() * 100.0,
                    sat.client_share() * 100.0,
                    ms3(quantile(&half_dnsperf.latencies, 0.5)),
                    ms3(quantile(&half_dnsperf.latencies, 0.99)),
                    half_dnsperf.lost,
                    half_dnsperf.client_share() * 100.0,
                );
                per_server.push((sat, half_dnsperf, target_qps, load));
            }
            let at = |rate: &dyn Fn(usize) -> u64| -> Vec<(&Netns, &Server, Ipv4Addr, u64)> {
                live.iter()
                    .enumerate()
                    .map(|(k, (_, ns, server, addr))| (ns, server, *addr, rate(k)))
                    .collect()
            };
            let halves = probe_turns(&at(&|k| per_server[k].2), &qfile, seconds)?;
            let equals = probe_turns(&at(&|_| equal_qps), &qfile, seconds)?;
            for (((server_name, ..), (sat, half_dnsperf, target_qps, load)), (half, equal)) in live
                .iter()
                .zip(per_server)
                .zip(halves.into_iter().zip(equals))
            {
                println!(
                    "round {round} {server_name} [{label}]: probe @{target_qps}: p50 {} ms p99 {} ms lost {} (client CPU {:.0}%, {} sends >1 ms late, {} answers without a TX stamp); @{equal_qps} (all servers): p50 {} ms p99 {} ms lost {}",
                    ms3(quantile(&half.latencies, 0.5)),
                    ms3(quantile(&half.latencies, 0.99)),
                    half.lost,
                    half.client_share() * 100.0,
                    half.late_sends,
                    half.without_tx_stamp,
                    ms3(quantile(&equal.latencies, 0.5)),
                    ms3(quantile(&equal.latencies, 0.99)),
                    equal.lost,
                );
                rows.push(Row {
                    server: server_name,
                    mix,
                    round,
                    sat,
                    half,
                    half_dnsperf,
                    equal,
                    target_qps,
                    load,
                });
            }
        }
        if live.iter().any(|l| l.0 == "shoal-dns") {
            rt.block_on(resolver.detach("bench"));
        }
        // Servers before their namespaces.
        for (_, ns, server, _) in live {
            drop(server);
            drop(ns);
        }
    }

    // Per server and mix: the median over the rounds of each figure; lost queries summed.
    let summary = |server: &str, mix: usize| -> Summary {
        let rs: Vec<&Row> = rows
            .iter()
            .filter(|r| r.server == server && r.mix == mix)
            .collect();
        let med = |f: &dyn Fn(&Row) -> f64| median(rs.iter().map(|r| f(r)).collect());
        Summary {
            qps: med(&|r| r.sat.qps),
            qps_per_core: med(&|r| r.sat.qps_per_core()),
            us: med(&|r| r.sat.us_per_query()),
            server_share: med(&|r| r.sat.server_share()),
            client_share: med(&|r| r.sat.client_share()),
            p50: med(&|r| quantile(&r.half.latencies, 0.5).as_secs_f64() * 1000.0),
            p99: med(&|r| quantile(&r.half.latencies, 0.99).as_secs_f64() * 1000.0),
            lost: rs
                .iter()
                .map(|r| r.half.lost + r.half_dnsperf.lost + r.equal.lost)
                .sum(),
            sent: rs
                .iter()
                .map(|r| r.half.sent + r.half_dnsperf.sent + r.equal.sent)
                .sum(),
            us_half: med(&|r| r.half.us_per_query()),
            dp_p50: med(&|r| quantile(&r.half_dnsperf.latencies, 0.5).as_secs_f64() * 1000.0),
            dp_p99: med(&|r| quantile(&r.half_dnsperf.latencies, 0.99).as_secs_f64() * 1000.0),
            dp_client: med(&|r| r.half_dnsperf.client_share()),
            probe_client: med(&|r| r.half.client_share()),
            rcodes: rs.first().map(|r| r.sat.rcodes.clone()).unwrap_or_default(),
            eq_p50: med(&|r| quantile(&r.equal.latencies, 0.5).as_secs_f64() * 1000.0),
            eq_p99: med(&|r| quantile(&r.equal.latencies, 0.99).as_secs_f64() * 1000.0),
            eq_lost: rs.iter().map(|r| r.equal.lost).sum(),
            eq_sent: rs.iter().map(|r| r.equal.sent).sum(),
        }
    };
    let mut tables = String::new();
    for (mix, (label, _, _)) in MIXES.iter().enumerate() {
        tables.push_str(&format!(
            "\n### {label}\n\n| server | QPS (saturated) | QPS per core | µs CPU/query | CPU used: server / dnsperf | p50 ms @50% | p99 ms @50% | µs CPU/query @50% | probe CPU @50% | dnsperf -v @50%: p50 / p99 ms, its CPU | lost below saturation (all runs) |\n|---|---|---|---|---|---|---|---|---|---|---|\n"
        ));
        for s in SERVERS {
            let r = summary(s, mix);
            tables.push_str(&format!(
                "| {s} | {:.0} | {:.0} | {:.2} | {:.0}% / {:.0}% | {:.3} | {:.3} | {:.2} | {:.0}% | {:.3} / {:.3}, {:.0}% | {} of {} |\n",
                r.qps,
                r.qps_per_core,
                r.us,
                r.server_share * 100.0,
                r.client_share * 100.0,
                r.p50,
                r.p99,
                r.us_half,
                r.probe_client * 100.0,
                r.dp_p50,
                r.dp_p99,
                r.dp_client * 100.0,
                r.lost,
                r.sent,
            ));
        }
    }
    tables.push_str(&format!(
        "\n### The same offered rate for every server: {equal_qps} QPS\n\n| server | mix | p50 ms | p99 ms | lost (all rounds) |\n|---|---|---|---|---|\n"
    ));
    for (mix, (label, _, _)) in MIXES.iter().enumerate() {
        for s in SERVERS {
            let r = summary(s, mix);
            tables.push_str(&format!(
                "| {s} | {label} | {:.3} | {:.3} | {} of {} |\n",
                r.eq_p50, r.eq_p99, r.eq_lost, r.eq_sent
            ));
        }
    }
    let mem_lines = format!(
        "- {containers} containers attached to one resolver (one shared `Records` of {} names): process RSS {} KiB -> {} KiB = **{:.1} KiB per container**; heap in use (glibc mallinfo2) {:.1} KiB per container; RSS {} KiB after {sampled} of them answered a query\n\
         - kernel: slab {} KiB -> {} KiB = {:.1} KiB per container (machine-wide, so noisy: 2 sockets, 2 files, tokio registrations); socket memory (/proc/net/sockstat `mem`, pages, global) UDP {} -> {}, TCP {} -> {} = {:.2} KiB per container while idle. The 4 MiB UDP receive buffer is a limit, charged only while datagrams wait in it.\n\
         - attach(): p50 {} ms, p99 {} ms, max {} ms over {containers} (enter the namespace on a blocking thread, bind UDP+TCP, spawn 2 tasks); detach of all {containers}: {} ms in total; creating the {containers} namespaces (not part of attach): {:.1} s",
        records.len(),
        rss0,
        rss1,
        per(rss0, rss1),
        heap_per,
        rss2,
        slab0,
        slab1,
        per(slab0, slab1),
        sock0.0,
        sock1.0,
        sock0.1,
        sock1.1,
        per(sock0.0 + sock0.1, sock1.0 + sock1.1) * page_kib,
        ms3(quantile(&attach, 0.5)),
        ms3(quantile(&attach, 0.99)),
        ms3(*attach.last().unwrap_or(&Duration::ZERO)),
        ms3(detach_time),
        ns_time.as_secs_f64(),
    );
    println!("{tables}\n{mem_lines}");
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    let mut targets = String::from("| target | mix | measured | |\n|---|---|---|---|\n");
    for (mix, (label, _, _)) in MIXES.iter().enumerate() {
        let (sh, aa, dm) = (
            summary("shoal-dns", mix),
            summary("aardvark-dns", mix),
            summary("dnsmasq", mix),
        );
        let ratio = sh.qps_per_core / aa.qps_per_core;
        targets.push_str(&format!(
            "| QPS per core ≥ 1.5× aardvark-dns | {label} | {ratio:.2}× ({:.0} vs {:.0}) | {} |\n\
             | CPU per query ≤ dnsmasq's | {label} | {:.2} µs vs {:.2} µs | {} |\n\
             | p99 @50% no worse than either | {label} | {:.3} ms vs {:.3} / {:.3} ms | {} |\n\
             | p99 at the same rate ({equal_qps} QPS) no worse than either | {label} | {:.3} ms vs {:.3} / {:.3} ms | {} |\n\
             | zero lost queries below saturation | {label} | {} lost of {} | {} |\n",
            sh.qps_per_core,
            aa.qps_per_core,
            verdict(ratio >= 1.5),
            sh.us,
            dm.us,
            verdict(sh.us <= dm.us),
            sh.p99,
            aa.p99,
            dm.p99,
            verdict(sh.p99 <= aa.p99 && sh.p99 <= dm.p99),
            sh.eq_p99,
            aa.eq_p99,
            dm.eq_p99,
            verdict(sh.eq_p99 <= aa.eq_p99 && sh.eq_p99 <= dm.eq_p99),
            sh.lost,
            sh.sent,
            verdict(sh.lost == 0),
        ));
    }
    targets.push_str(&format!(
        "| resolver memory per container < 64 KiB | | {:.1} KiB RSS, {:.1} KiB heap | {} |\n",
        per(rss0, rss1),
        heap_per,
        verdict(per(rss0, rss1).max(heap_per) < 64.0),
    ));
    let details: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "| {} | {} | {} | {:.0} | {:.2} | {:.0}% / {:.0}% | {:.0}% / {:.0}% | {} sent, {} lost | {} | {:.0} | {} | {} | {} | {:.0}% / {:.0}%, {} / {} | {:.1}% / {:.1}% | {} / {}, {:.0}% | {} |",
                r.round,
                r.server,
                MIXES[r.mix].0,
                r.sat.qps,
                r.sat.us_per_query(),
                r.sat.server_share() * 100.0,
                r.sat.client_share() * 100.0,
                r.sat.server_busy * 100.0,
                r.sat.client_busy * 100.0,
                r.sat.sent,
                r.sat.lost,
                r.target_qps,
                r.half.qps,
                ms3(quantile(&r.half.latencies, 0.5)),
                ms3(quantile(&r.half.latencies, 0.99)),
                r.half.lost,
                r.half.server_busy * 100.0,
                r.half.client_busy * 100.0,
                r.half.late_sends,
                r.half.without_tx_stamp,
                r.half.server_steal * 100.0,
                r.half.client_steal * 100.0,
                ms3(quantile(&r.half_dnsperf.latencies, 0.5)),
                ms3(quantile(&r.half_dnsperf.latencies, 0.99)),
                r.half_dnsperf.client_share() * 100.0,
                r.load,
            )
        })
        .collect();
    let rcodes: Vec<String> = SERVERS
        .iter()
        .map(|s| format!("- {s}: {}", summary(s, 0).rcodes))
        .collect();
    let report = format!(
        "# DNS: Shoal's resolver vs aardvark-dns vs dnsmasq\n\n\
         Same machine ({} cores), same run, same dnsperf settings, same data: {SERVICES} services on {NETWORKS} networks \
         ({} names: `svcS` -> VIP on its home network, `svcS.netK` -> VIP on network K, `tasks.svcS` -> 3 task addresses). \
         Two query mixes ({QUERY_LINES} A queries each, deterministic): 30% `svcS`, 30% `svcS.netK`, 20% `tasks.svcS`, 20% missing names \
         (NXDOMAIN from every server, nothing forwarded); and the same without the missing names. \
         {rounds} rounds of {seconds} s runs, servers interleaved; each figure is the median over the rounds (lost queries: the sum), every round is listed below.\n\
         {tables}\n{mem_lines}\n\n## Targets\n\n{targets}\n\
         ## How\n\n\
         - Each server in a fresh network namespace `shoal-b-dns-PID-sN` (only `lo` up, with 10.k.0.1 and 10.k.0.2 on it, no route out), dnsperf and the probe in the same namespace: no packet leaves it. In each round all servers run side by side (idle unless asked), each in its own namespace.\n\
         - Server pinned to core {SERVER_CORE}, dnsperf (one sender and one receiver thread, `-T 1`) to core {CLIENT_CORE}: `ip netns exec NS taskset -c {CLIENT_CORE} dnsperf -s ADDR -a 10.1.0.2 -d QUERIES ...`.\n\
         - shoal-dns: this benchmark process, pinned to core {SERVER_CORE}, `Resolver::attach` on a tokio runtime with ONE worker thread, listening on 127.0.0.11:53; `Records` with forwarding off, no upstreams.\n\
         - aardvark-dns ({}): `AARDVARK_NO_PROXY=1 taskset -c {SERVER_CORE} aardvark-dns --config DIR -p 53 run`, one config file per network (`net1..3`: first line the listening address 10.k.0.1, then `ID IPV4  NAME` lines, one per address); it answers by the requester's address, so the client 10.1.0.2 is a container on all three networks. dnsperf asks 10.1.0.1. UDP only (1.4 has no TCP). `AARDVARK_NO_PROXY`: a missing name is NXDOMAIN, never forwarded.\n\
         - dnsmasq ({}): `taskset -c {SERVER_CORE} dnsmasq {} --listen-address=10.1.0.1 --addn-hosts=HOSTS` (one `IP NAME` line per address). `--local=/#/`: missing names are NXDOMAIN, never forwarded.\n\
         - Before measuring, every name is asked once from 10.1.0.2 and must get exactly its addresses ({checked} checks per server per round, including 200 missing names that must get NXDOMAIN).\n\
         - Saturation: `dnsperf -l {seconds} {perf_args}` -> QPS = dnsperf's `Queries per second`. CPU per query = the server process's utime+stime (/proc/PID/stat; for shoal-dns the whole benchmark process) during the run / queries answered. QPS per core = answered / server CPU seconds (= 1 / CPU per query). CPU used = the server's and dnsperf's CPU time (dnsperf's from its rusage) / dnsperf's lifetime (including its wait for the last timeouts), as a share of one core: dnsperf near 100% with the server well below means dnsperf was the limit. Core busy (all rounds table) = non-idle share of that core in /proc/stat during the run (includes softirq work not charged to any process, and anything else the machine ran there). Steal (all rounds table) = the share of the 50%-load phase in which the hypervisor ran something else on that virtual core (/proc/stat `steal`): queries that arrive then wait.\n\
         - 50% load, latency: half that server's saturated QPS for {seconds} s, sent by the probe (`dns_bench --probe`, `shoal_benches::dnsprobe`: the same queries from the same file and address 10.1.0.2, one connected UDP socket, open loop on a fixed schedule, woken at most every {PROBE_TICK_US} µs to send what is due in one `sendmmsg`, answers drained with `recvmmsg`), pinned to core {CLIENT_CORE} like dnsperf. An answer's latency = the kernel's receive timestamp of the answer (`SO_TIMESTAMPNS`; on loopback taken when the server hands it to `lo`) - the kernel's transmit timestamp of its query (`SO_TIMESTAMPING`, software: taken as the query reaches `lo`, read back from the socket's error queue; each query of a burst has its own, so none is charged with the probe's sending of the ones before it; a query whose stamp did not come back is timed from the clock read before its burst and counted in \"answers without a TX stamp\"); p50/p99 nearest rank; lost = never answered within 2 s. The same probe at {equal_qps} QPS gives the same-rate table. Probe CPU = its CPU time / the time it was sending; busy and steal at 50% load (all rounds table) are over the whole phase of turns (all servers); \"sends >1 ms late\" counts queries the probe itself sent more than 1 ms behind schedule (a stalled client core), which would show as the server's latency.\n\
         - 50% load, as dnsperf sees it: `dnsperf -l {seconds} {perf_args} -v -Q <the same rate>`; p50/p99 from dnsperf's per-query lines. dnsperf stamps an answer after its own `recv` and `fflush`es one line per answer, so when its one receive thread falls behind, the wait in its own sockets counts as latency (see below). Shown for comparison, not used for the target.\n\
         - Memory (measured first, before the dnsperf runs, so that no freed heap is reused): {containers} namespaces (`lo` up) created; then RSS (/proc/self/status VmRSS), heap in use (mallinfo2), slab (/proc/meminfo) and /proc/net/sockstat read before and after attaching all of them to one `Resolver` with one shared `Arc<Records>`.\n\
         - Load average at start: {load_start} (the machine is shared; the benchmark and everything it starts run with {sched} so that other work disturbs less, the same for all servers).\n\n\
         Response codes at saturation, mixed queries: \n{}\n\n\
         {NOTES}\n\
         ## All rounds\n\n\
         | round | server | mix | QPS | µs CPU/q | CPU used: server / dnsperf | core {SERVER_CORE} / core {CLIENT_CORE} busy | saturation | 50% rate | QPS @50% | p50 ms | p99 ms | lost @50% | core {SERVER_CORE} / core {CLIENT_CORE} busy @50%, probe: sends >1 ms late / answers without a TX stamp | steal core {SERVER_CORE} / core {CLIENT_CORE} @50% | dnsperf -v @50%: p50 / p99 ms, its CPU | loadavg |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n{}\n\n\
         Anchors from DESIGN.md (dnsperf, 2 cores, local names; earlier runs): aardvark-dns about 111k QPS per core, dnsmasq about 150k, unbound about 156k; Docker's resolver about 9k QPS.\n\n\
         Reproduce (root): `scripts/deps.sh && cargo run --release -p shoal-benches --bin dns_bench -- --seconds {seconds} --rounds {rounds} --containers {containers} --fifo {fifo}`\n",
        // Not available_parallelism(): this process is pinned to one core.
        // SAFETY: sysconf has no preconditions.
        unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) },
        entries.len(),
        version(AARDVARK, &["--version"]),
        version("dnsmasq", &["--version"]),
        DNSMASQ_ARGS.join(" "),
        rcodes.join("\n"),
        details.join("\n"),
    );
    let p = write_report("dns", &report)?;
    println!("{targets}\nreport: {}", p.display());
    Ok(())
}

fn version(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .stderr(Stdio::null())
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(|l| l.trim().to_string())
        })
        .unwrap_or_else(|| "?".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn data_is_deterministic_and_distinct() {
        let d = data();
        assert_eq!(d.len(), (SERVICES * 5) as usize);
        let mut all: Vec<Ipv4Addr> = d
            .iter()
            .filter(|e| !e.name.contains('.') || e.name.starts_with("tasks."))
            .flat_map(|e| e.ips.clone())
            .collect();
        let n = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), n, "VIPs and task addresses are unique");
        assert!(!all.contains(&gateway(1)) && !all.contains(&client(1)));
        assert_eq!(query_file(true), query_file(true));
        assert!(!query_file(false).contains("nosuch"));
        let names: HashMap<&str, usize> =
            d.iter().map(|e| (e.name.as_str(), e.ips.len())).collect();
        assert_eq!(names["tasks.svc7"], 3);
        assert_eq!(names["svc7.net3"], 1);
    }

    #[test]
    fn aardvark_lines() {
        let dir = std::env::temp_dir().join(format!("shoal-b-dns-t-{}", std::process::id()));
        aardvark_config(&dir, &data()).unwrap();
        let net1 = std::fs::read_to_string(dir.join("net1")).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        let mut lines = net1.lines();
        assert_eq!(lines.next(), Some("10.1.0.1"));
        assert_eq!(lines.next(), Some("client 10.1.0.2  client"));
        assert!(lines.all(|l| l.split(' ').count() == 4));
    }
}
