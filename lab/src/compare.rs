//! `shoal lab compare`: what each way of publishing a port costs, measured on a lab.
//!
//! Deploys (through the first answering node's API) a network `compare`, a service `compare`
//! (one `shoal whoami` replica) publishing the same target port three ways (30080 ingress,
//! 30081 host mode, 30082 ingress with SNAT), and a service `compare-probe` with one task per
//! node. Then sequential HTTP/1.1 `GET /?format=json` requests, each on a new TCP
//! connection with `Connection: close`, for a fixed time per target, the targets taking turns
//! in slices of [`SLICE`]:
//!
//! - from the lab's `client` namespace to every node's address on each published port;
//! - from a probe task on the replica's node, and from one on another node, straight to the
//!   replica's address on `compare` (the overlay without any publishing: the reference for
//!   the cost of the VXLAN hop).
//!
//! Per target: requests per second, latency percentiles (an HDR histogram in microseconds,
//! connect to the full response), errors by kind, the source address the backend saw and the
//! node that answered. [`run`] returns a [`Report`] (serde, with every recorded latency
//! bucket), which the CLI prints as a table or JSON and renders as a self-contained HTML page
//! with inline SVG plots ([`render_html`]); the `publish_modes` benchmark calls [`run`] too.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::{ErrorKind, Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow, bail};
use hdrhistogram::Histogram;
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::lab::{Lab, LabNode};
use crate::whoami::Whoami;
use shoal_api::client::Client;
use shoal_api::model::{
    Invalid, Network, Node, NodeStatus, PortConfig, Task, TaskState, invalid, parse_duration_ms,
};
use shoal_api::wire::{NetworkAttach, NetworkCreate, ServiceCreate};
use shoal_api::wire::{ServiceStatus, TaskLocation};

/// The network, service and probe service `compare` deploys (and reuses when present).
pub const NETWORK: &str = "compare";
pub const SERVICE: &str = "compare";
pub const PROBE: &str = "compare-probe";
/// Published ports of `compare`, all to the replica's port 80.
pub const PORT_INGRESS: u16 = 30080;
pub const PORT_HOST: u16 = 30081;
pub const PORT_SNAT: u16 = 30082;
const TARGET_PORT: u16 = 80;
/// Connect, write and read timeout of one request.
pub const IO_TIMEOUT: Duration = Duration::from_secs(1);
/// Pause after a failed request, so that a target that refuses is not hammered.
const ERROR_PAUSE: Duration = Duration::from_millis(1);
/// Histogram range in microseconds (1 µs to 60 s, 3 significant digits).
const HIST_MAX_US: u64 = 60_000_000;
/// Percentiles kept in each row of the report.
const PERCENTILES: [f64; 13] = [
    0.0, 1.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.99, 100.0,
];

/// `--duration`: `3s`, `500ms`, `1m` (or plain seconds); above zero, at most 10 minutes.
pub fn parse_duration(s: &str) -> Result<Duration, Invalid> {
    let ms = parse_duration_ms(s)?;
    if ms == 0 {
        return Err(invalid(format!(
            "invalid duration {s:?}: it must be above zero"
        )));
    }
    if ms > 600_000 {
        return Err(invalid(format!(
            "duration {s:?} is too long: at most 10m per target"
        )));
    }
    Ok(Duration::from_millis(ms))
}

/// How the request reaches the replica.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Host mode: the published port on the node that runs the task, nowhere else.
    Host,
    /// The ingress routing mesh, client address kept.
    Ingress,
    /// The ingress routing mesh with SNAT to the receiving node.
    IngressSnat,
    /// No publishing: task to task on the overlay network (the reference).
    Overlay,
}

pub const MODES: [Mode; 4] = [Mode::Host, Mode::Ingress, Mode::IngressSnat, Mode::Overlay];

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Host => "host",
            Mode::Ingress => "ingress",
            Mode::IngressSnat => "ingress-snat",
            Mode::Overlay => "overlay",
        }
    }

    /// The published port a mode is measured on.
    pub fn port(self) -> Option<u16> {
        match self {
            Mode::Host => Some(PORT_HOST),
            Mode::Ingress => Some(PORT_INGRESS),
            Mode::IngressSnat => Some(PORT_SNAT),
            Mode::Overlay => None,
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where the request enters and where the replica is.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum PathKind {
    HostLocal,
    HostNoReplica,
    MeshLocal,
    MeshAcross,
    SnatLocal,
    SnatAcross,
    TaskToTaskLocal,
    TaskToTaskAcross,
}

impl PathKind {
    /// The path of `mode` entering at a node that runs the replica (`local`) or not.
    pub fn of(mode: Mode, local: bool) -> PathKind {
        match (mode, local) {
            (Mode::Host, true) => PathKind::HostLocal,
            (Mode::Host, false) => PathKind::HostNoReplica,
            (Mode::Ingress, true) => PathKind::MeshLocal,
            (Mode::Ingress, false) => PathKind::MeshAcross,
            (Mode::IngressSnat, true) => PathKind::SnatLocal,
            (Mode::IngressSnat, false) => PathKind::SnatAcross,
            (Mode::Overlay, true) => PathKind::TaskToTaskLocal,
            (Mode::Overlay, false) => PathKind::TaskToTaskAcross,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            PathKind::HostLocal => "host-local",
            PathKind::HostNoReplica => "host-no-replica",
            PathKind::MeshLocal => "mesh-local",
            PathKind::MeshAcross => "mesh-across",
            PathKind::SnatLocal => "snat-local",
            PathKind::SnatAcross => "snat-across",
            PathKind::TaskToTaskLocal => "task-to-task-local",
            PathKind::TaskToTaskAcross => "task-to-task-across",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            PathKind::HostLocal => {
                "host mode, to the node running the replica (the port is open only there)"
            }
            PathKind::HostNoReplica => {
                "host mode, to a node without a replica (nothing listens: refused is expected)"
            }
            PathKind::MeshLocal => {
                "ingress routing mesh keeping the client address, to the node running the replica"
            }
            PathKind::MeshAcross => {
                "ingress routing mesh keeping the client address, to a node without the replica (forwarded over VXLAN)"
            }
            PathKind::SnatLocal => {
                "ingress routing mesh with SNAT, to the node running the replica"
            }
            PathKind::SnatAcross => {
                "ingress routing mesh with SNAT, to a node without the replica (forwarded over VXLAN)"
            }
            PathKind::TaskToTaskLocal => {
                "a probe task to the replica's address on the overlay, same node"
            }
            PathKind::TaskToTaskAcross => {
                "a probe task to the replica's address on the overlay, from another node (one VXLAN hop)"
            }
        }
    }

    pub fn is_local(self) -> bool {
        matches!(
            self,
            PathKind::HostLocal
                | PathKind::MeshLocal
                | PathKind::SnatLocal
                | PathKind::TaskToTaskLocal
        )
    }
}

impl fmt::Display for PathKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One thing to load: from a namespace to an address.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Target {
    pub mode: Mode,
    /// The receiving node (published modes) or the node of the sending probe (overlay).
    pub node: String,
    pub path: PathKind,
    /// Who sends: `client` or a probe task's name.
    pub from: String,
    /// The network namespace the requests leave from.
    pub netns: String,
    pub addr: SocketAddr,
}

// ---------------------------------------------------------------------------------------
// The HTTP client: std blocking sockets, one connection per request.

/// Why a request failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    Refused,
    Timeout,
    Other(String),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Refused => f.write_str("connection refused"),
            Failure::Timeout => f.write_str("timed out"),
            Failure::Other(m) => f.write_str(m),
        }
    }
}

fn classify(e: &std::io::Error) -> Failure {
    match e.kind() {
        ErrorKind::ConnectionRefused => Failure::Refused,
        ErrorKind::TimedOut | ErrorKind::WouldBlock => Failure::Timeout,
        _ => Failure::Other(e.to_string()),
    }
}

/// Status and body length from a response head (status line and headers, without the
/// blank line). `None` length: the body runs to the end of the connection.
pub fn parse_head(head: &[u8]) -> Result<(u16, Option<usize>), String> {
    let text = std::str::from_utf8(head).map_err(|_| "response head is not UTF-8".to_string())?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.split(' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(format!("not an HTTP/1 response: {status_line:?}"));
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let mut length = None;
    for l in lines {
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        let k = k.trim();
        if k.eq_ignore_ascii_case("content-length") {
            length = Some(
                v.trim()
                    .parse::<usize>()
                    .map_err(|_| format!("bad content-length {v:?}"))?,
            );
        } else if k.eq_ignore_ascii_case("transfer-encoding")
            && !v.trim().eq_ignore_ascii_case("identity")
        {
            return Err(format!("unsupported transfer-encoding {:?}", v.trim()));
        }
    }
    Ok((status, length))
}

/// One `GET /?format=json` on a new connection (`Connection: close`), read to the end of the
/// body; the whoami answer parsed.
pub fn http_get(addr: SocketAddr, timeout: Duration) -> Result<Whoami, Failure> {
    http_get_from(None, addr, timeout)
}

/// [`http_get`] from a given local address (`None`: the kernel's choice).
pub fn http_get_from(
    src: Option<IpAddr>,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<Whoami, Failure> {
    let mut s = match src {
        None => TcpStream::connect_timeout(&addr, timeout).map_err(|e| classify(&e))?,
        Some(ip) => {
            let sock = socket2::Socket::new(
                socket2::Domain::IPV4,
                socket2::Type::STREAM,
                Some(socket2::Protocol::TCP),
            )
            .map_err(|e| classify(&e))?;
            sock.bind(&SocketAddr::new(ip, 0).into())
                .map_err(|e| classify(&e))?;
            sock.connect_timeout(&addr.into(), timeout)
                .map_err(|e| classify(&e))?;
            TcpStream::from(sock)
        }
    };
    let io = |e: std::io::Error| classify(&e);
    s.set_nodelay(true).map_err(io)?;
    s.set_read_timeout(Some(timeout)).map_err(io)?;
    s.set_write_timeout(Some(timeout)).map_err(io)?;
    let req = format!(
        "GET /?format=json HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: shoal-compare\r\nAccept: application/json\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).map_err(io)?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    let mut head: Option<(usize, u16, Option<usize>)> = None;
    loop {
        if head.is_none()
            && let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n")
        {
            let (status, len) = parse_head(&buf[..end]).map_err(Failure::Other)?;
            head = Some((end + 4, status, len));
        }
        if let Some((start, _, Some(len))) = head
            && buf.len() >= start + len
        {
            buf.truncate(start + len);
            break;
        }
        let n = s.read(&mut chunk).map_err(io)?;
        if n == 0 {
            match head {
                Some((_, _, None)) => break,
                Some((start, _, Some(len))) => {
                    return Err(Failure::Other(format!(
                        "connection closed after {} of {len} body bytes",
                        buf.len() - start
                    )));
                }
                None => {
                    return Err(Failure::Other(if buf.is_empty() {
                        "connection closed without an answer".into()
                    } else {
                        "connection closed in the response head".into()
                    }));
                }
            }
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > 1 << 20 {
            return Err(Failure::Other("response larger than 1 MiB".into()));
        }
    }
    let (start, status, _) = head.expect("head parsed before the body");
    if status != 200 {
        return Err(Failure::Other(format!("HTTP status {status}")));
    }
    serde_json::from_slice(&buf[start..])
        .map_err(|e| Failure::Other(format!("not a whoami answer: {e}")))
}

/// Failed requests by kind.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Errors {
    pub refused: u64,
    pub timeout: u64,
    pub other: u64,
}

impl Errors {
    pub fn total(&self) -> u64 {
        self.refused + self.timeout + self.other
    }

    fn add(&mut self, f: &Failure) {
        match f {
            Failure::Refused => self.refused += 1,
            Failure::Timeout => self.timeout += 1,
            Failure::Other(_) => self.other += 1,
        }
    }

    fn sum(&mut self, o: &Errors) {
        self.refused += o.refused;
        self.timeout += o.timeout;
        self.other += o.other;
    }
}

impl fmt::Display for Errors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.total() == 0 {
            return f.write_str("0");
        }
        let mut parts = vec![];
        for (n, what) in [
            (self.refused, "refused"),
            (self.timeout, "timeout"),
            (self.other, "other"),
        ] {
            if n > 0 {
                parts.push(format!("{n} {what}"));
            }
        }
        f.write_str(&parts.join(", "))
    }
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIST_MAX_US, 3).expect("valid histogram bounds")
}

/// What one target's load produced.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Latency of each answered request, microseconds.
    pub hist: Histogram<u64>,
    pub errors: Errors,
    pub first_error: Option<String>,
    /// Remote address the backend saw -> answers.
    pub sources: BTreeMap<IpAddr, u64>,
    /// Task that answered (its name, or its hostname outside a lab) -> answers.
    pub answered: BTreeMap<String, u64>,
    pub elapsed: Duration,
}

impl Default for Sample {
    fn default() -> Self {
        Sample {
            hist: new_histogram(),
            errors: Errors::default(),
            first_error: None,
            sources: BTreeMap::new(),
            answered: BTreeMap::new(),
            elapsed: Duration::ZERO,
        }
    }
}

/// Sequential requests to `addr` for `duration`, each on a new connection (blocking; run it
/// on a thread inside the namespace to send from).
pub fn load(addr: SocketAddr, duration: Duration) -> Sample {
    load_from(None, addr, duration)
}

/// [`load`] from a given local address.
pub fn load_from(src: Option<IpAddr>, addr: SocketAddr, duration: Duration) -> Sample {
    let mut s = Sample::default();
    let start = Instant::now();
    while start.elapsed() < duration {
        let t = Instant::now();
        match http_get_from(src, addr, IO_TIMEOUT) {
            Ok(w) => {
                let us = u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX);
                s.hist.saturating_record(us.max(1));
                *s.sources.entry(w.remote_addr.ip()).or_default() += 1;
                let who = if w.task.is_empty() {
                    w.hostname
                } else {
                    w.task
                };
                *s.answered.entry(who).or_default() += 1;
            }
            Err(f) => {
                s.errors.add(&f);
                if s.first_error.is_none() {
                    s.first_error = Some(f.to_string());
                }
                std::thread::sleep(ERROR_PAUSE);
            }
        }
    }
    s.elapsed = start.elapsed();
    s
}

impl Sample {
    /// Adds `o` (another slice of the same target's load) to this one.
    pub fn merge(&mut self, o: &Sample) {
        self.hist
            .add(&o.hist)
            .expect("histograms of the same bounds");
        self.errors.sum(&o.errors);
        if self.first_error.is_none() {
            self.first_error.clone_from(&o.first_error);
        }
        for (ip, n) in &o.sources {
            *self.sources.entry(*ip).or_default() += n;
        }
        for (who, n) in &o.answered {
            *self.answered.entry(who.clone()).or_default() += n;
        }
        self.elapsed += o.elapsed;
    }
}

/// Length of one slice of a target's load: the targets take turns slice by slice, so that
/// what else the machine does at some moment (other VMs, a burst of softirq work) falls on
/// every path alike instead of on whichever target was running then.
pub const SLICE: Duration = Duration::from_millis(250);

/// Where one target's requests leave from.
struct Sender {
    netns: String,
    src: Option<IpAddr>,
    addr: SocketAddr,
}

/// Loads the targets slice by slice in `order` (indexes into `senders`), one request at a
/// time overall. Each target has one thread, in its namespace for the whole run (no thread
/// is created per slice), which warms up before its first slice. Returns a sample per target.
fn run_slices(
    senders: &[Sender],
    order: &[usize],
    slice: Duration,
    warmup: Duration,
) -> anyhow::Result<Vec<Sample>> {
    use std::sync::mpsc;
    std::thread::scope(|scope| {
        let (done_tx, done_rx) = mpsc::channel::<Sample>();
        let mut turns = vec![];
        let mut workers = vec![];
        for s in senders {
            let (turn_tx, turn_rx) = mpsc::channel::<()>();
            turns.push(turn_tx);
            let done = done_tx.clone();
            workers.push(scope.spawn(move || {
                shoal_netns::run_in(&s.netns, move || {
                    let mut first = true;
                    while turn_rx.recv().is_ok() {
                        if std::mem::take(&mut first) && !warmup.is_zero() {
                            let _ = load_from(s.src, s.addr, warmup);
                        }
                        if done.send(load_from(s.src, s.addr, slice)).is_err() {
                            return;
                        }
                    }
                })
                .with_context(|| format!("entering {} to load {}", s.netns, s.addr))
            }));
        }
        drop(done_tx);
        let mut samples = vec![Sample::default(); senders.len()];
        let mut failed = None;
        for &i in order {
            // A worker that could not enter its namespace has dropped its receiver.
            if turns[i].send(()).is_err() {
                failed = Some(i);
                break;
            }
            // A worker that panicked has not answered (the others still hold senders).
            match done_rx.recv_timeout(warmup + slice + Duration::from_secs(30)) {
                Ok(s) => samples[i].merge(&s),
                Err(_) => {
                    failed = Some(i);
                    break;
                }
            }
        }
        drop(turns);
        for w in workers {
            w.join()
                .map_err(|_| anyhow::anyhow!("a load thread panicked"))??;
        }
        if let Some(i) = failed {
            anyhow::bail!("the load thread of {} stopped", senders[i].addr);
        }
        Ok(samples)
    })
}

/// The order in which targets take turns, slice by slice: `slices` rounds over all targets,
/// every other one reversed (`reverse` flips them all), so that no target always follows the
/// same other one.
pub fn slice_order(targets: usize, slices: usize, reverse: bool) -> Vec<usize> {
    let mut out = Vec::with_capacity(targets * slices);
    for s in 0..slices {
        let mut turn: Vec<usize> = (0..targets).collect();
        if (s % 2 == 1) != reverse {
            turn.reverse();
        }
        out.extend(turn);
    }
    out
}

// ---------------------------------------------------------------------------------------
// Rows and the report.

/// Names for addresses a backend may see as its client.
#[derive(Debug, Clone, Default)]
pub struct Labels {
    pub by_ip: BTreeMap<IpAddr, String>,
    /// Subnets of ingress networks (an SNAT source may come from there).
    pub ingress: Vec<Ipv4Net>,
}

impl Labels {
    /// Adds a label unless the address already has one.
    pub fn add(&mut self, ip: IpAddr, label: impl Into<String>) {
        self.by_ip.entry(ip).or_insert_with(|| label.into());
    }

    pub fn label(&self, ip: IpAddr) -> Option<String> {
        if let Some(l) = self.by_ip.get(&ip) {
            return Some(l.clone());
        }
        match ip {
            IpAddr::V4(v4) if self.ingress.iter().any(|n| n.contains(&v4)) => {
                Some("ingress network".into())
            }
            _ => None,
        }
    }
}

/// A source address the backend saw.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Source {
    pub ip: IpAddr,
    pub label: Option<String>,
    pub count: u64,
}

/// A task that answered, and its node.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Answer {
    pub node: String,
    pub task: String,
    pub count: u64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct Percentile {
    pub p: f64,
    pub ms: f64,
}

/// The figures of one target.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    #[serde(flatten)]
    pub target: Target,
    /// Answered requests.
    pub requests: u64,
    pub seconds: f64,
    pub req_per_sec: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
    pub errors: Errors,
    pub first_error: Option<String>,
    /// By count, most first.
    pub sources: Vec<Source>,
    /// By count, most first.
    pub answered_by: Vec<Answer>,
    pub percentiles: Vec<Percentile>,
    /// Every recorded latency bucket: [microseconds (the bucket's highest value), count].
    pub recorded_us: Vec<[u64; 2]>,
}

fn us_to_ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

impl Row {
    /// The row of a finished load; `task_nodes` maps task names to node names.
    pub fn new(
        target: Target,
        s: &Sample,
        labels: &Labels,
        task_nodes: &BTreeMap<String, String>,
    ) -> Row {
        let mut sources: Vec<Source> = s
            .sources
            .iter()
            .map(|(ip, n)| Source {
                ip: *ip,
                label: labels.label(*ip),
                count: *n,
            })
            .collect();
        sources.sort_by(|a, b| b.count.cmp(&a.count).then(a.ip.cmp(&b.ip)));
        let mut answered: Vec<Answer> = s
            .answered
            .iter()
            .map(|(task, n)| Answer {
                node: task_nodes.get(task).cloned().unwrap_or_else(|| "?".into()),
                task: task.clone(),
                count: *n,
            })
            .collect();
        answered.sort_by(|a, b| b.count.cmp(&a.count).then(a.task.cmp(&b.task)));
        Row::finish(
            target,
            &s.hist,
            s.errors,
            s.first_error.clone(),
            sources,
            answered,
            s.elapsed.as_secs_f64(),
        )
    }

    fn finish(
        target: Target,
        h: &Histogram<u64>,
        errors: Errors,
        first_error: Option<String>,
        sources: Vec<Source>,
        answered_by: Vec<Answer>,
        seconds: f64,
    ) -> Row {
        let n = h.len();
        let at = |p: f64| {
            if n == 0 {
                0.0
            } else {
                us_to_ms(h.value_at_percentile(p))
            }
        };
        Row {
            target,
            requests: n,
            seconds,
            req_per_sec: if seconds > 0.0 {
                n as f64 / seconds
            } else {
                0.0
            },
            p50_ms: at(50.0),
            p90_ms: at(90.0),
            p99_ms: at(99.0),
            max_ms: if n == 0 { 0.0 } else { us_to_ms(h.max()) },
            mean_ms: if n == 0 { 0.0 } else { h.mean() / 1000.0 },
            errors,
            first_error,
            sources,
            answered_by,
            percentiles: PERCENTILES
                .iter()
                .map(|&p| Percentile { p, ms: at(p) })
                .collect(),
            recorded_us: h
                .iter_recorded()
                .map(|v| [v.value_iterated_to(), v.count_at_value()])
                .collect(),
        }
    }

    /// The latency histogram again, from the recorded buckets.
    pub fn histogram(&self) -> Histogram<u64> {
        let mut h = new_histogram();
        for [us, n] in &self.recorded_us {
            h.saturating_record_n(*us, *n);
        }
        h
    }

    /// Pools rows of the same target (rounds of a benchmark): latencies, requests, time,
    /// errors, sources and answers added up. None for no rows.
    pub fn merge(rows: &[&Row]) -> Option<Row> {
        let first = rows.first()?;
        let mut h = new_histogram();
        let mut errors = Errors::default();
        let mut seconds = 0.0;
        let mut sources: BTreeMap<IpAddr, (Option<String>, u64)> = BTreeMap::new();
        let mut answered: BTreeMap<(String, String), u64> = BTreeMap::new();
        for r in rows {
            h.add(r.histogram()).expect("same histogram bounds");
            errors.sum(&r.errors);
            seconds += r.seconds;
            for s in &r.sources {
                let e = sources.entry(s.ip).or_insert((s.label.clone(), 0));
                e.1 += s.count;
            }
            for a in &r.answered_by {
                *answered
                    .entry((a.node.clone(), a.task.clone()))
                    .or_default() += a.count;
            }
        }
        let mut sources: Vec<Source> = sources
            .into_iter()
            .map(|(ip, (label, count))| Source { ip, label, count })
            .collect();
        sources.sort_by(|a, b| b.count.cmp(&a.count).then(a.ip.cmp(&b.ip)));
        let mut answered: Vec<Answer> = answered
            .into_iter()
            .map(|((node, task), count)| Answer { node, task, count })
            .collect();
        answered.sort_by(|a, b| b.count.cmp(&a.count).then(a.task.cmp(&b.task)));
        Some(Row::finish(
            first.target.clone(),
            &h,
            errors,
            rows.iter().find_map(|r| r.first_error.clone()),
            sources,
            answered,
            seconds,
        ))
    }

    /// `192.0.2.100 (client)`, for up to three addresses.
    pub fn sources_text(&self) -> String {
        let mut parts: Vec<String> = self
            .sources
            .iter()
            .take(3)
            .map(|s| match &s.label {
                Some(l) => format!("{} ({l})", s.ip),
                None => s.ip.to_string(),
            })
            .collect();
        if self.sources.len() > 3 {
            parts.push(format!("+{} more", self.sources.len() - 3));
        }
        if parts.is_empty() {
            "-".into()
        } else {
            parts.join(", ")
        }
    }

    /// Distinct node names that answered.
    pub fn answered_text(&self) -> String {
        let nodes: BTreeSet<&str> = self.answered_by.iter().map(|a| a.node.as_str()).collect();
        if nodes.is_empty() {
            "-".into()
        } else {
            nodes.into_iter().collect::<Vec<_>>().join(", ")
        }
    }
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// The comparisons the command exists for. None where a row it needs got no answers.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Summary {
    /// mesh-local req/s / host-local req/s.
    pub mesh_vs_host_rate: Option<f64>,
    /// mesh-local p50 / host-local p50.
    pub mesh_vs_host_p50: Option<f64>,
    /// Median over the other nodes of mesh-across p50, minus host-local p50 (ms).
    pub mesh_across_added_p50_ms: Option<f64>,
    /// task-to-task-across p50 minus task-to-task-local p50 (ms): one VXLAN round trip.
    pub hop_cost_ms: Option<f64>,
    /// mesh-local req/s / snat-local req/s (same receiving node).
    pub keep_vs_snat_rate_local: Option<f64>,
    /// Median over the other nodes of mesh-across req/s / snat-across req/s on that node.
    pub keep_vs_snat_rate_across: Option<f64>,
}

impl Summary {
    pub fn compute(rows: &[Row]) -> Summary {
        let answered = |path: PathKind| -> Vec<&Row> {
            rows.iter()
                .filter(|r| r.target.path == path && r.requests > 0)
                .collect()
        };
        let one = |path: PathKind| answered(path).into_iter().next();
        let host = one(PathKind::HostLocal);
        let mesh = one(PathKind::MeshLocal);
        let snat = one(PathKind::SnatLocal);
        let ratio = |a: f64, b: f64| if b > 0.0 { Some(a / b) } else { None };
        let mut s = Summary::default();
        if let (Some(m), Some(h)) = (mesh, host) {
            s.mesh_vs_host_rate = ratio(m.req_per_sec, h.req_per_sec);
            s.mesh_vs_host_p50 = ratio(m.p50_ms, h.p50_ms);
        }
        if let Some(h) = host {
            s.mesh_across_added_p50_ms = median(
                answered(PathKind::MeshAcross)
                    .iter()
                    .map(|r| r.p50_ms - h.p50_ms)
                    .collect(),
            );
        }
        if let (Some(l), Some(a)) = (
            one(PathKind::TaskToTaskLocal),
            one(PathKind::TaskToTaskAcross),
        ) {
            s.hop_cost_ms = Some(a.p50_ms - l.p50_ms);
        }
        if let (Some(m), Some(n)) = (mesh, snat) {
            s.keep_vs_snat_rate_local = ratio(m.req_per_sec, n.req_per_sec);
        }
        let snat_across = answered(PathKind::SnatAcross);
        s.keep_vs_snat_rate_across = median(
            answered(PathKind::MeshAcross)
                .iter()
                .filter_map(|m| {
                    let n = snat_across
                        .iter()
                        .find(|n| n.target.node == m.target.node)?;
                    ratio(m.req_per_sec, n.req_per_sec)
                })
                .collect(),
        );
        s
    }

    /// The summary as sentences.
    pub fn lines(&self) -> Vec<String> {
        let x = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("x{v:.3}"));
        let ms = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{v:.3} ms"));
        let mut out = vec![
            format!(
                "routing mesh vs host mode on the replica's node (mesh-local / host-local): req/s {}, p50 {}",
                x(self.mesh_vs_host_rate),
                x(self.mesh_vs_host_p50)
            ),
            format!(
                "mesh-across adds {} to host-local's p50; the VXLAN hop (task-to-task across - local) costs {}{}",
                ms(self.mesh_across_added_p50_ms),
                ms(self.hop_cost_ms),
                match (self.mesh_across_added_p50_ms, self.hop_cost_ms) {
                    (Some(a), Some(h)) if h > 0.0 && a >= 0.0 =>
                        format!(" (x{:.2} the hop)", a / h),
                    _ => String::new(),
                }
            ),
            format!(
                "keeping the client IP vs SNAT (same receiving node), req/s: {} on the replica's node, {} across (median over nodes)",
                x(self.keep_vs_snat_rate_local),
                x(self.keep_vs_snat_rate_across)
            ),
        ];
        if self == &Summary::default() {
            out.push("(no comparison: the rows they need got no answers)".into());
        }
        out
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    pub addr: std::net::Ipv4Addr,
}

/// The `compare` replica everything is measured against.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Replica {
    pub task: String,
    pub node: String,
    pub ip: std::net::Ipv4Addr,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub lab: String,
    /// When the measurement started (seconds since the Unix epoch).
    pub unix_time: u64,
    /// Load per target.
    pub duration_ms: u64,
    pub nodes: Vec<NodeInfo>,
    pub replica: Replica,
    /// Addresses of the lab's client namespace.
    pub client: Vec<IpAddr>,
    pub rows: Vec<Row>,
    pub summary: Summary,
    /// What could not be measured, and why.
    pub notes: Vec<String>,
}

// ---------------------------------------------------------------------------------------
// Deploying and measuring on a lab.

/// How [`run`] measures.
#[derive(Debug, Clone)]
pub struct Options {
    /// Load per target.
    pub duration: Duration,
    /// Leave the services (and the network) in place afterwards.
    pub keep: bool,
    /// Measure the targets in reverse order (benchmarks alternate it between rounds).
    pub reverse: bool,
    /// One line per target on stderr as the run goes.
    pub progress: bool,
    /// How long the tasks may take to run.
    pub deploy_timeout: Duration,
    /// How long the published ports may take to answer once the tasks run.
    pub ready_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            duration: Duration::from_secs(3),
            keep: false,
            reverse: false,
            progress: false,
            deploy_timeout: Duration::from_secs(60),
            ready_timeout: Duration::from_secs(10),
        }
    }
}

/// What this run may remove again (unless `keep`): the services it created or found as it
/// would have made them, and the network when it created it.
#[derive(Debug, Default)]
struct Created {
    network: bool,
    services: Vec<&'static str>,
}

/// Deploys (or reuses) the network and services, measures every target, removes the
/// services again unless `opts.keep` (the network too when this run created it).
pub async fn run(lab: &Lab, opts: &Options) -> anyhow::Result<Report> {
    let api = api_client(lab).await?;
    let mut created = Created::default();
    let res = async {
        deploy(&api, &mut created).await?;
        measure(lab, &api, opts).await
    }
    .await;
    if opts.keep {
        return res;
    }
    let cleanup = undeploy(&api, &created).await;
    match (res, cleanup) {
        (Ok(mut r), Err(e)) => {
            let msg = format!("clean-up incomplete: {e:#}");
            eprintln!("warning: {msg}");
            r.notes.push(msg);
            Ok(r)
        }
        (Err(e), Err(c)) => {
            eprintln!("warning: clean-up incomplete: {c:#}");
            Err(e)
        }
        (res, Ok(())) => res,
    }
}

/// The API of the lab's first node whose agent answers.
async fn api_client(lab: &Lab) -> anyhow::Result<Client> {
    for n in &lab.nodes {
        let c = Client::new(&n.socket);
        if c.info().await.is_ok() {
            return Ok(c);
        }
    }
    bail!("no agent of lab {:?} answers on its API socket", lab.name)
}

fn compare_ports() -> anyhow::Result<Vec<PortConfig>> {
    [
        format!("published={PORT_INGRESS},target={TARGET_PORT},protocol=tcp,mode=ingress"),
        format!("published={PORT_HOST},target={TARGET_PORT},protocol=tcp,mode=host"),
        format!("published={PORT_SNAT},target={TARGET_PORT},protocol=tcp,mode=ingress,snat=true"),
    ]
    .iter()
    .map(|s| PortConfig::parse(s).map_err(|e| anyhow!("{e}")))
    .collect()
}

fn whoami_command() -> Vec<String> {
    ["shoal", "whoami", "--port", "80"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

async fn deploy(api: &Client, created: &mut Created) -> anyhow::Result<()> {
    let nets: Vec<Network> = api.networks().await?;
    if !nets.iter().any(|n| n.name == NETWORK) {
        let _: Network = api
            .network_create(&NetworkCreate {
                name: NETWORK.into(),
                driver: Some("overlay".into()),
                ..Default::default()
            })
            .await
            .with_context(|| format!("creating network {NETWORK}"))?;
        created.network = true;
    }
    let nodes: Vec<Node> = api.nodes().await?;
    let ready = nodes
        .iter()
        .filter(|n| n.status == NodeStatus::Ready)
        .count()
        .max(1) as u32;
    let svcs: Vec<ServiceStatus> = api.services().await?;
    let attach = vec![NetworkAttach {
        network: NETWORK.into(),
        aliases: vec![],
    }];
    let want = compare_ports()?;
    match svcs.iter().find(|s| s.service.name == SERVICE) {
        Some(s) => {
            let svc = &s.service;
            let missing: Vec<String> = want
                .iter()
                .filter(|p| !svc.ports.contains(p))
                .map(|p| p.to_string())
                .collect();
            if svc.replicas != 1 || !missing.is_empty() || !on_network(&svc.networks) {
                bail!(
                    "service {SERVICE} exists but is not the one `lab compare` deploys (it needs 1 replica on network {NETWORK} publishing {}; it has {} replica(s), ports {}): remove it with `shoal service rm {SERVICE}`",
                    want.iter()
                        .map(|p| p.to_string())
                        .collect::<Vec<_>>()
                        .join(" "),
                    svc.replicas,
                    if svc.ports.is_empty() {
                        "none".to_string()
                    } else {
                        svc.ports
                            .iter()
                            .map(|p| p.to_string())
                            .collect::<Vec<_>>()
                            .join(" ")
                    }
                );
            }
        }
        None => {
            let _: shoal_api::model::Service = api
                .service_create(&ServiceCreate {
                    name: SERVICE.into(),
                    networks: attach.clone(),
                    replicas: 1,
                    ports: want,
                    command: whoami_command(),
                    ..Default::default()
                })
                .await
                .with_context(|| {
                    format!(
                        "creating service {SERVICE} (ports {PORT_INGRESS}-{PORT_SNAT} must be free)"
                    )
                })?;
        }
    }
    created.services.push(SERVICE);
    match svcs.iter().find(|s| s.service.name == PROBE) {
        Some(s) if !on_network(&s.service.networks) => bail!(
            "service {PROBE} exists but is not on network {NETWORK}: remove it with `shoal service rm {PROBE}`"
        ),
        Some(_) => {}
        None => {
            let _: shoal_api::model::Service = api
                .service_create(&ServiceCreate {
                    name: PROBE.into(),
                    networks: attach,
                    replicas: ready,
                    command: whoami_command(),
                    ..Default::default()
                })
                .await
                .with_context(|| format!("creating service {PROBE}"))?;
        }
    }
    created.services.push(PROBE);
    Ok(())
}

fn on_network(nets: &[shoal_api::model::ServiceNetwork]) -> bool {
    nets.iter().any(|n| n.network == NETWORK)
}

async fn undeploy(api: &Client, created: &Created) -> anyhow::Result<()> {
    let mut errors = vec![];
    for name in &created.services {
        let r = api.service_rm(name).await;
        if let Err(e) = r
            && !shoal_api::client::ClientError::is_not_found(&e)
        {
            errors.push(format!("removing service {name}: {e:#}"));
        }
    }
    if created.network {
        // Refused while the tasks are still shutting down: retry for a while.
        let start = Instant::now();
        loop {
            let r = api.network_rm(NETWORK).await;
            match r {
                Ok(_) => break,
                Err(e) if shoal_api::client::ClientError::is_not_found(&e) => break,
                Err(e) if start.elapsed() > Duration::from_secs(30) => {
                    errors.push(format!("removing network {NETWORK}: {e:#}"));
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        bail!("{}", errors.join("; "))
    }
}

/// Waits until every task of `compare` and `compare-probe` runs; returns their tasks.
async fn wait_running(api: &Client, timeout: Duration) -> anyhow::Result<(Vec<Task>, Vec<Task>)> {
    let start = Instant::now();
    loop {
        let svcs: Vec<ServiceStatus> = api.services().await?;
        let mut all = vec![];
        let mut ready = true;
        let mut waiting = vec![];
        for name in [SERVICE, PROBE] {
            let want = svcs
                .iter()
                .find(|s| s.service.name == name)
                .map(|s| s.service.replicas)
                .with_context(|| format!("service {name} disappeared"))?;
            let tasks: Vec<Task> = api.service_tasks(name).await?;
            let running = tasks.iter().filter(|t| t.is_serving()).count();
            if running < want as usize {
                ready = false;
                waiting.push(format!("{name} {running}/{want} running"));
                for t in tasks
                    .iter()
                    .filter(|t| t.desired_state == TaskState::Running && !t.is_serving())
                {
                    waiting.push(format!(
                        "{}: {}{}",
                        t.name(),
                        t.state,
                        t.error
                            .as_deref()
                            .map(|e| format!(" ({e})"))
                            .unwrap_or_default()
                    ));
                }
            }
            all.push(tasks);
        }
        if ready {
            let probe = all.pop().unwrap_or_default();
            let compare = all.pop().unwrap_or_default();
            return Ok((compare, probe));
        }
        if start.elapsed() > timeout {
            bail!(
                "timed out after {} s waiting for the tasks to run: {}",
                timeout.as_secs(),
                waiting.join("; ")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Addresses of a namespace (loopback excluded); empty when it cannot be entered.
fn ns_ips(netns: &str) -> Vec<IpAddr> {
    shoal_netns::run_in(netns, shoal_node::listening::local_ips).unwrap_or_default()
}

async fn measure(lab: &Lab, api: &Client, opts: &Options) -> anyhow::Result<Report> {
    let (compare_tasks, probe_tasks) = wait_running(api, opts.deploy_timeout).await?;
    let unix_time = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let mut notes = vec![];
    let cluster_nodes: Vec<Node> = api.nodes().await?;
    let node_name = |id: &str| {
        cluster_nodes
            .iter()
            .find(|n| n.id == id)
            .map(|n| n.name.clone())
            .unwrap_or_else(|| id.to_string())
    };
    let live: Vec<&LabNode> = lab
        .nodes
        .iter()
        .filter(|n| {
            let ready = cluster_nodes
                .iter()
                .any(|c| c.name == n.name && c.status == NodeStatus::Ready);
            if !ready {
                notes.push(format!("{} is not ready: not measured", n.name));
            }
            ready
        })
        .collect();
    let nets: Vec<Network> = api.networks().await?;
    let net = nets
        .iter()
        .find(|n| n.name == NETWORK)
        .with_context(|| format!("network {NETWORK} disappeared"))?;
    let replica_task = compare_tasks
        .iter()
        .find(|t| t.is_serving())
        .with_context(|| format!("no running task of {SERVICE}"))?;
    let replica = Replica {
        task: replica_task.name(),
        node: node_name(&replica_task.node_id),
        ip: replica_task
            .ip_on(&net.id)
            .with_context(|| format!("{} has no address on {NETWORK}", replica_task.name()))?,
    };
    // Task name -> node; a slot's running task wins over its old ones.
    let mut task_nodes: BTreeMap<String, String> = BTreeMap::new();
    let all_tasks = || compare_tasks.iter().chain(probe_tasks.iter());
    for t in all_tasks()
        .filter(|t| t.is_serving())
        .chain(all_tasks().filter(|t| !t.is_serving()))
    {
        task_nodes
            .entry(t.name())
            .or_insert_with(|| node_name(&t.node_id));
    }

    // Who is who, for the addresses the backend reports.
    let client_ips = ns_ips(&lab.client_netns);
    let mut labels = Labels::default();
    for ip in &client_ips {
        labels.add(*ip, "client");
    }
    for n in &lab.nodes {
        labels.add(IpAddr::V4(n.addr), n.name.clone());
    }
    for n in &nets {
        labels.add(IpAddr::V4(n.gateway), format!("gateway of {}", n.name));
        if n.ingress {
            labels.ingress.push(n.subnet);
        }
    }
    for t in &probe_tasks {
        if let Some(ip) = t.ip_on(&net.id) {
            labels.add(IpAddr::V4(ip), t.name());
        }
    }
    for n in &live {
        for ip in ns_ips(&n.netns) {
            labels.add(ip, n.name.clone());
        }
        let prefix = format!("{}-", n.netns);
        for net in &nets {
            let ns = shoal_node::names::network_netns(&prefix, net);
            if shoal_netns::exists(&ns) {
                for ip in ns_ips(&ns) {
                    labels.add(ip, format!("{} on {}", n.name, net.name));
                }
            }
        }
    }

    // The targets, in display order.
    let mut targets = vec![];
    for mode in [Mode::Host, Mode::Ingress, Mode::IngressSnat] {
        let port = mode.port().expect("published mode");
        for n in &live {
            targets.push(Target {
                mode,
                node: n.name.clone(),
                path: PathKind::of(mode, n.name == replica.node),
                from: "client".into(),
                netns: lab.client_netns.clone(),
                addr: SocketAddr::V4(SocketAddrV4::new(n.addr, port)),
            });
        }
    }
    let probe_on = |local: bool| {
        live.iter().find_map(|n| {
            if (n.name == replica.node) != local {
                return None;
            }
            let t = probe_tasks
                .iter()
                .find(|t| t.is_serving() && node_name(&t.node_id) == n.name)?;
            Some((*n, t))
        })
    };
    for local in [true, false] {
        let path = PathKind::of(Mode::Overlay, local);
        let Some((n, t)) = probe_on(local) else {
            notes.push(format!(
                "{path}: no running {PROBE} task on {} node: not measured",
                if local {
                    "the replica's"
                } else {
                    "another ready"
                }
            ));
            continue;
        };
        let loc: TaskLocation = Client::new(&n.socket)
            .task(&t.id)
            .await
            .with_context(|| format!("locating {} on {}", t.name(), n.name))?;
        targets.push(Target {
            mode: Mode::Overlay,
            node: n.name.clone(),
            path,
            from: t.name(),
            netns: loc.netns,
            addr: SocketAddr::V4(SocketAddrV4::new(replica.ip, TARGET_PORT)),
        });
    }

    // Many short connections: let the senders reuse ports in TIME_WAIT (the client
    // namespace and our own probe tasks only).
    let senders: BTreeSet<String> = targets.iter().map(|t| t.netns.clone()).collect();
    for ns in &senders {
        if let Err(e) = shoal_netns::set_sysctl(ns, "net.ipv4.tcp_tw_reuse", "1") {
            notes.push(format!("could not set tcp_tw_reuse in {ns}: {e}"));
        }
    }

    // One client reusing a source port through two nodes within TIME_WAIT reaches the
    // backend as the same 4-tuple (the client address is kept) with another TCP timestamp
    // base, and PAWS drops the SYN (see the README's known limits). A single sequential
    // client opening thousands of connections per second through every path hits exactly
    // that; a population of clients rarely does. So each client target sends from an
    // address of its own in the client namespace (192.0.2.160 + its index, removed after).
    let sources = ClientSources::add(&lab.client_netns, &targets, client_ips.first().copied())?;
    for ip in sources.addrs.values() {
        labels.add(*ip, "client");
    }
    if !sources.addrs.is_empty() {
        notes.push(format!(
            "the client sends from one address per target ({} .. {}): see PAWS in the README",
            sources.addrs.values().next().expect("not empty"),
            sources.addrs.values().last().expect("not empty")
        ));
    }
    // Wait until what should answer answers (the published ports are programmed a moment
    // after the tasks run); one deadline for all.
    let deadline = Instant::now() + opts.ready_timeout;
    for (i, t) in targets
        .iter()
        .enumerate()
        .filter(|(_, t)| t.path != PathKind::HostNoReplica)
    {
        let src = sources.addrs.get(&i).copied();
        let (ns, addr) = (t.netns.clone(), t.addr);
        let last = tokio::task::spawn_blocking(move || {
            shoal_netns::run_in(&ns, move || {
                loop {
                    match http_get_from(src, addr, IO_TIMEOUT) {
                        Ok(_) => return None,
                        Err(f) if Instant::now() >= deadline => return Some(f),
                        Err(_) => std::thread::sleep(Duration::from_millis(100)),
                    }
                }
            })
        })
        .await??;
        if let Some(f) = last {
            let msg = format!(
                "{} {} ({}) did not answer within {} s of the tasks running: {f}",
                t.mode,
                t.node,
                t.addr,
                opts.ready_timeout.as_secs()
            );
            if opts.progress {
                eprintln!("warning: {msg}");
            }
            notes.push(msg);
        }
    }

    // The targets take turns in slices of SLICE, for `duration` each in total; a short
    // warm-up before each target's first slice.
    let warmup = (opts.duration / 10).min(Duration::from_millis(300));
    let slices = (opts.duration.as_millis() / SLICE.as_millis()).max(1) as usize;
    let slice = opts.duration / slices as u32;
    let senders: Vec<Sender> = targets
        .iter()
        .enumerate()
        .map(|(i, t)| Sender {
            netns: t.netns.clone(),
            src: sources.addrs.get(&i).copied(),
            addr: t.addr,
        })
        .collect();
    let order = slice_order(targets.len(), slices, opts.reverse);
    let samples =
        tokio::task::spawn_blocking(move || run_slices(&senders, &order, slice, warmup)).await??;
    let mut rows: Vec<Option<Row>> = vec![None; targets.len()];
    for (i, sample) in samples.iter().enumerate() {
        let t = targets[i].clone();
        let row = Row::new(t, sample, &labels, &task_nodes);
        if opts.progress {
            eprintln!(
                "{:<12} {:<6} {:<19} {:>8.0} req/s  p50 {:.3} ms  p99 {:.3} ms  errors {}",
                row.target.mode.as_str(),
                row.target.node,
                row.target.path.as_str(),
                row.req_per_sec,
                row.p50_ms,
                row.p99_ms,
                row.errors
            );
        }
        rows[i] = Some(row);
    }
    drop(sources);
    let rows: Vec<Row> = rows.into_iter().flatten().collect();
    let published: Vec<&Row> = rows
        .iter()
        .filter(|r| r.target.mode != Mode::Overlay && r.target.path != PathKind::HostNoReplica)
        .collect();
    if !published.is_empty() && published.iter().all(|r| r.requests == 0) {
        notes.push(
            "no published port answered anywhere: does this agent build program published ports?"
                .into(),
        );
    }
    Ok(Report {
        lab: lab.name.clone(),
        unix_time,
        duration_ms: u64::try_from(opts.duration.as_millis()).unwrap_or(u64::MAX),
        nodes: lab
            .nodes
            .iter()
            .map(|n| NodeInfo {
                name: n.name.clone(),
                addr: n.addr,
            })
            .collect(),
        replica,
        client: client_ips,
        summary: Summary::compute(&rows),
        rows,
        notes,
    })
}

/// Extra client addresses, one per client target, on the client namespace's interface;
/// removed on drop. Lab tooling: made with iproute2 like the rest of the lab topology.
struct ClientSources {
    netns: String,
    dev: String,
    addrs: BTreeMap<usize, IpAddr>,
}

impl ClientSources {
    fn add(netns: &str, targets: &[Target], main: Option<IpAddr>) -> anyhow::Result<Self> {
        let mut me = ClientSources {
            netns: netns.to_string(),
            dev: String::new(),
            addrs: BTreeMap::new(),
        };
        let Some(IpAddr::V4(main)) = main else {
            return Ok(me);
        };
        let out = std::process::Command::new("ip")
            .args(["-n", netns, "-o", "-4", "addr", "show"])
            .output()
            .context("running ip addr show in the client namespace")?;
        let text = String::from_utf8_lossy(&out.stdout);
        let Some(dev) = text.lines().find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(3)?.split('/').next()? == main.to_string()).then(|| f[1].to_string())
        }) else {
            return Ok(me);
        };
        me.dev = dev;
        let o = main.octets();
        for (i, t) in targets.iter().enumerate() {
            if t.netns != netns {
                continue;
            }
            let ip = Ipv4Addr::new(o[0], o[1], o[2], 160u8.saturating_add(i as u8));
            let st = std::process::Command::new("ip")
                .args([
                    "-n",
                    netns,
                    "addr",
                    "replace",
                    &format!("{ip}/32"),
                    "dev",
                    &me.dev,
                ])
                .status()
                .context("running ip addr replace")?;
            if !st.success() {
                anyhow::bail!("could not add client address {ip} in {netns}");
            }
            me.addrs.insert(i, IpAddr::V4(ip));
        }
        Ok(me)
    }
}

impl Drop for ClientSources {
    fn drop(&mut self) {
        for ip in self.addrs.values() {
            let _ = std::process::Command::new("ip")
                .args([
                    "-n",
                    &self.netns,
                    "addr",
                    "del",
                    &format!("{ip}/32"),
                    "dev",
                    &self.dev,
                ])
                .status();
        }
    }
}

// ---------------------------------------------------------------------------------------
// Output: table, HTML.

pub const TABLE_HEADER: [&str; 11] = [
    "MODE",
    "NODE",
    "PATH",
    "REQ/S",
    "P50",
    "P90",
    "P99",
    "MAX",
    "ERRORS",
    "SOURCE SEEN",
    "ANSWERED BY",
];

/// The table's cells, one row per target (latencies in ms, 3 decimals).
pub fn table_rows(r: &Report) -> Vec<Vec<String>> {
    r.rows
        .iter()
        .map(|row| {
            let ms = |v: f64| {
                if row.requests == 0 {
                    "-".to_string()
                } else {
                    format!("{v:.3}")
                }
            };
            vec![
                row.target.mode.to_string(),
                row.target.node.clone(),
                row.target.path.to_string(),
                format!("{:.0}", row.req_per_sec),
                ms(row.p50_ms),
                ms(row.p90_ms),
                ms(row.p99_ms),
                ms(row.max_ms),
                row.errors.to_string(),
                row.sources_text(),
                row.answered_text(),
            ]
        })
        .collect()
}

/// The table, the summary and the notes, on stdout.
pub fn print(r: &Report) {
    println!(
        "lab {}: replica {} on {} ({}), {} ms per target, sequential requests, one connection each",
        r.lab, r.replica.task, r.replica.node, r.replica.ip, r.duration_ms
    );
    shoal_api::client::table(&TABLE_HEADER, table_rows(r));
    println!();
    for l in r.summary.lines() {
        println!("{l}");
    }
    for n in &r.notes {
        println!("note: {n}");
    }
}

fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

/// `YYYY-MM-DD hh:mm:ss UTC` for seconds since the epoch (proleptic Gregorian calendar).
pub fn utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Days since 1970-01-01 -> civil date, counting in 400-year eras from 0000-03-01.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

const PLOT_W: u32 = 960;
const PLOT_H: u32 = 380;

/// Distinct colours for series on white (the usual ten of plotting tools).
const COLORS: [(u8, u8, u8); 10] = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
];

fn color(i: usize) -> plotters::style::RGBColor {
    let (r, g, b) = COLORS[i % COLORS.len()];
    plotters::style::RGBColor(r, g, b)
}

fn series_name(r: &Row) -> String {
    match r.target.mode {
        Mode::Overlay => format!("from {} - {}", r.target.node, r.target.path),
        _ => format!("{} - {}", r.target.node, r.target.path),
    }
}

/// x of the percentile plot: -log10(1 - q), so 1 is p90, 2 is p99, 3 is p99.9.
fn pct_label(x: f64) -> String {
    let p = 100.0 * (1.0 - 10f64.powf(-x));
    let s = if (p - p.round()).abs() < 1e-6 {
        format!("{p:.0}")
    } else {
        let s = format!("{p:.3}");
        s.trim_end_matches('0').to_string()
    };
    format!("{s}%")
}

type Plot = anyhow::Result<String>;

/// Latency by percentile, one line per row; x on the -log10(1 - q) scale.
fn percentile_svg(title: &str, rows: &[&Row]) -> Plot {
    use plotters::prelude::*;
    let series: Vec<(String, Vec<(f64, f64)>)> = rows
        .iter()
        .map(|r| {
            let h = r.histogram();
            let xmax = (h.len() as f64).log10().clamp(1.0, 4.0);
            let pts = (0..=200)
                .map(|i| {
                    let x = xmax * f64::from(i) / 200.0;
                    let q = (1.0 - 10f64.powf(-x)).clamp(0.0, 1.0);
                    (x, us_to_ms(h.value_at_quantile(q)))
                })
                .collect();
            (series_name(r), pts)
        })
        .collect();
    let xmax = series
        .iter()
        .filter_map(|(_, p)| p.last().map(|p| p.0))
        .fold(1.0, f64::max);
    let ymax = rows
        .iter()
        .map(|r| us_to_ms(r.histogram().value_at_quantile(0.999)))
        .fold(0.01, f64::max)
        * 1.15;
    let mut buf = String::new();
    {
        let root = SVGBackend::with_string(&mut buf, (PLOT_W, PLOT_H)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(42)
            .y_label_area_size(64)
            .build_cartesian_2d(0f64..xmax, 0f64..ymax)?;
        chart
            .configure_mesh()
            .x_desc("percentile")
            .y_desc("latency (ms)")
            .x_labels(xmax.ceil() as usize + 1)
            .x_label_formatter(&|x| pct_label(*x))
            .y_label_formatter(&|y| format!("{y:.2}"))
            .draw()?;
        for (i, (name, pts)) in series.iter().enumerate() {
            let color = color(i);
            chart
                .draw_series(LineSeries::new(
                    pts.iter().map(|&(x, y)| (x, y.min(ymax))),
                    color.stroke_width(2),
                ))?
                .label(name.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .draw()?;
        root.present()?;
    }
    Ok(buf)
}

/// Share of requests per latency bin, one translucent bar series per row; latencies above the
/// widest p99 are counted in the legend, not drawn.
fn histogram_svg(title: &str, rows: &[&Row]) -> Plot {
    use plotters::prelude::*;
    const BINS: usize = 40;
    let hists: Vec<Histogram<u64>> = rows.iter().map(|r| r.histogram()).collect();
    let lo = hists
        .iter()
        .map(|h| us_to_ms(h.min()))
        .fold(f64::INFINITY, f64::min);
    let hi = hists
        .iter()
        .map(|h| us_to_ms(h.value_at_quantile(0.99)))
        .fold(0.0, f64::max);
    let lo = (lo * 0.95).max(0.0);
    let hi = if hi > lo { hi * 1.05 } else { lo + 0.1 };
    let width = (hi - lo) / BINS as f64;
    let mut series = vec![];
    let mut ymax: f64 = 0.1;
    for (r, h) in rows.iter().zip(&hists) {
        let total = h.len().max(1) as f64;
        let mut bins = vec![0u64; BINS];
        let mut above = 0;
        for v in h.iter_recorded() {
            let ms = us_to_ms(v.value_iterated_to());
            if ms > hi {
                above += v.count_at_value();
            } else {
                let i = (((ms - lo) / width) as usize).min(BINS - 1);
                bins[i] += v.count_at_value();
            }
        }
        let shares: Vec<f64> = bins.iter().map(|&n| n as f64 * 100.0 / total).collect();
        ymax = shares.iter().copied().fold(ymax, f64::max);
        let mut name = series_name(r);
        if above > 0 {
            name.push_str(&format!(
                " ({:.1}% above {hi:.2} ms)",
                above as f64 * 100.0 / total
            ));
        }
        series.push((name, shares));
    }
    let ymax = ymax * 1.1;
    let mut buf = String::new();
    {
        let root = SVGBackend::with_string(&mut buf, (PLOT_W, PLOT_H)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(42)
            .y_label_area_size(64)
            .build_cartesian_2d(lo..hi, 0f64..ymax)?;
        chart
            .configure_mesh()
            .x_desc("latency (ms)")
            .y_desc("share of requests (%)")
            .x_label_formatter(&|x| format!("{x:.3}"))
            .y_label_formatter(&|y| format!("{y:.1}"))
            .draw()?;
        for (i, (name, shares)) in series.iter().enumerate() {
            let color = color(i);
            chart
                .draw_series(shares.iter().enumerate().map(|(b, &s)| {
                    let x0 = lo + width * b as f64;
                    Rectangle::new([(x0, 0.0), (x0 + width, s)], color.mix(0.35).filled())
                }))?
                .label(name.as_str())
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 18, y + 5)], color.mix(0.6).filled())
                });
            // The outline, so that overlapping series stay readable.
            chart.draw_series(LineSeries::new(
                shares.iter().enumerate().flat_map(|(b, &s)| {
                    let x0 = lo + width * b as f64;
                    [(x0, s), (x0 + width, s)]
                }),
                color.stroke_width(1),
            ))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .draw()?;
        root.present()?;
    }
    Ok(buf)
}

const CSS: &str = "body{font-family:sans-serif;margin:2em;color:#222;max-width:1100px}\
table{border-collapse:collapse;font-size:13px}\
th,td{border:1px solid #ccc;padding:3px 7px;text-align:left;white-space:nowrap}\
th{background:#f0f0f0}td.n{text-align:right;font-variant-numeric:tabular-nums}\
tr.err td{color:#a00}h2{margin-top:1.6em}svg{display:block;margin:1em 0;max-width:100%;height:auto}\
dt{font-weight:bold}div.wide{overflow-x:auto}pre{font-size:11px;background:#f8f8f8;padding:1em;overflow:auto;max-height:30em}";

/// The report as one HTML page: no scripts, styles or images from anywhere else.
pub fn render_html(r: &Report) -> anyhow::Result<String> {
    let mut h = String::new();
    h.push_str("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">");
    h.push_str(&format!(
        "<title>shoal lab compare: {}</title><style>{CSS}</style></head><body>\n",
        esc(&r.lab)
    ));
    h.push_str(&format!(
        "<h1>Publish modes on lab {}</h1>\n<p>{}. Replica <b>{}</b> on <b>{}</b> ({}). Nodes: {}. \
         Client namespace: {}. Per target: sequential HTTP/1.1 <code>GET /?format=json</code>, a new \
         TCP connection per request (<code>Connection: close</code>), {} ms of load after a short \
         warm-up, the targets taking turns in 250 ms slices; latency from connect to the full response; 1 s connect and read timeouts.</p>\n",
        esc(&r.lab),
        esc(&utc(r.unix_time)),
        esc(&r.replica.task),
        esc(&r.replica.node),
        r.replica.ip,
        esc(&r
            .nodes
            .iter()
            .map(|n| format!("{} {}", n.name, n.addr))
            .collect::<Vec<_>>()
            .join(", ")),
        esc(&r
            .client
            .iter()
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(", ")),
        r.duration_ms
    ));
    h.push_str("<h2>Results</h2>\n<div class=\"wide\"><table><tr>");
    for c in TABLE_HEADER {
        h.push_str(&format!("<th>{}</th>", esc(c)));
    }
    h.push_str("<th>REQUESTS</th></tr>\n");
    for (row, cells) in r.rows.iter().zip(table_rows(r)) {
        let class = if row.errors.total() > 0 && row.target.path != PathKind::HostNoReplica {
            " class=\"err\""
        } else {
            ""
        };
        h.push_str(&format!("<tr{class}>"));
        for (i, c) in cells.iter().enumerate() {
            let num = (3..=7).contains(&i);
            h.push_str(&format!(
                "<td{}>{}</td>",
                if num { " class=\"n\"" } else { "" },
                esc(c)
            ));
        }
        h.push_str(&format!("<td class=\"n\">{}</td></tr>\n", row.requests));
    }
    h.push_str("</table></div>\n<p>Latencies in ms.</p>\n<h2>Summary</h2>\n<ul>");
    for l in r.summary.lines() {
        h.push_str(&format!("<li>{}</li>", esc(&l)));
    }
    h.push_str("</ul>\n");
    if !r.notes.is_empty() {
        h.push_str("<h2>Notes</h2>\n<ul>");
        for n in &r.notes {
            h.push_str(&format!("<li>{}</li>", esc(n)));
        }
        h.push_str("</ul>\n");
    }
    let errors: Vec<&Row> = r.rows.iter().filter(|x| x.first_error.is_some()).collect();
    if !errors.is_empty() {
        h.push_str("<h2>First error per target</h2>\n<ul>");
        for x in errors {
            h.push_str(&format!(
                "<li>{} {} {}: {}</li>",
                esc(x.target.mode.as_str()),
                esc(&x.target.node),
                esc(x.target.path.as_str()),
                esc(x.first_error.as_deref().unwrap_or_default())
            ));
        }
        h.push_str("</ul>\n");
    }
    h.push_str("<h2>Latency by percentile</h2>\n");
    for mode in MODES {
        let rows: Vec<&Row> = r
            .rows
            .iter()
            .filter(|x| x.target.mode == mode && x.requests > 0)
            .collect();
        if rows.is_empty() {
            h.push_str(&format!("<p>{mode}: no answers.</p>\n"));
            continue;
        }
        h.push_str(&percentile_svg(
            &format!("{mode}: latency by percentile"),
            &rows,
        )?);
        h.push('\n');
    }
    h.push_str("<h2>Latency histograms</h2>\n");
    for mode in MODES {
        let rows: Vec<&Row> = r
            .rows
            .iter()
            .filter(|x| x.target.mode == mode && x.requests > 0)
            .collect();
        if rows.is_empty() {
            continue;
        }
        h.push_str(&histogram_svg(
            &format!("{mode}: latency histogram"),
            &rows,
        )?);
        h.push('\n');
    }
    h.push_str("<h2>Paths</h2>\n<dl>");
    let mut paths: Vec<PathKind> = r.rows.iter().map(|x| x.target.path).collect();
    paths.sort();
    paths.dedup();
    for p in paths {
        h.push_str(&format!(
            "<dt>{}</dt><dd>{}</dd>",
            esc(p.as_str()),
            esc(p.describe())
        ));
    }
    h.push_str("</dl>\n<details><summary>Raw data (JSON)</summary><pre>");
    h.push_str(&esc(&serde_json::to_string_pretty(r)?));
    h.push_str("</pre></details>\n</body></html>\n");
    Ok(h)
}

/// Renders the HTML report and writes it (temp file + rename).
pub fn write_html(r: &Report, path: &Path) -> anyhow::Result<()> {
    let html = render_html(r)?;
    let tmp = path.with_extension("html.tmp");
    std::fs::write(&tmp, html).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A whoami server on 127.0.0.1 (its own runtime on a thread; lives as long as the test
    /// process).
    fn start_whoami() -> SocketAddr {
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                let res = rt.block_on(crate::whoami::run(port, port));
                let _ = tx.send(res);
            });
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(10) {
                if rx.try_recv().is_ok() {
                    break; // the port was taken meanwhile: try another
                }
                if http_get(addr, IO_TIMEOUT).is_ok() {
                    return addr;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("whoami did not start");
    }

    #[test]
    fn client_talks_to_whoami() {
        let addr = start_whoami();
        let w = http_get(addr, IO_TIMEOUT).unwrap();
        assert_eq!(w.remote_addr.ip(), IpAddr::V4(Ipv4Addr::LOCALHOST));
        let s = load(addr, Duration::from_millis(200));
        assert!(!s.hist.is_empty());
        assert_eq!(s.errors, Errors::default(), "{:?}", s.first_error);
        assert_eq!(
            s.sources.keys().copied().collect::<Vec<_>>(),
            vec![IpAddr::V4(Ipv4Addr::LOCALHOST)]
        );
        assert_eq!(s.answered.len(), 1, "{:?}", s.answered);
        assert_eq!(s.answered.values().sum::<u64>(), s.hist.len());
    }

    #[test]
    fn refused_is_counted_as_refused() {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        assert_eq!(http_get(addr, IO_TIMEOUT).unwrap_err(), Failure::Refused);
        let s = load(addr, Duration::from_millis(20));
        assert!(s.errors.refused > 0 && s.errors.timeout + s.errors.other == 0);
        assert_eq!(s.hist.len(), 0);
        assert_eq!(s.first_error.as_deref(), Some("connection refused"));
    }

    #[test]
    fn response_heads() {
        assert_eq!(
            parse_head(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nContent-Length: 12"),
            Ok((200, Some(12)))
        );
        assert_eq!(parse_head(b"HTTP/1.0 503 Busy"), Ok((503, None)));
        assert!(parse_head(b"SSH-2.0-x").unwrap_err().contains("SSH"));
        assert!(
            parse_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked")
                .unwrap_err()
                .contains("chunked")
        );
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: x").is_err());
    }

    fn target(mode: Mode, node: &str, local: bool) -> Target {
        Target {
            mode,
            node: node.into(),
            path: PathKind::of(mode, local),
            from: "client".into(),
            netns: "shoal-lab-client".into(),
            addr: "192.0.2.11:30080".parse().unwrap(),
        }
    }

    /// A sample of `n` answers spread evenly over 1..=max_us microseconds in `secs`.
    fn sample(n: u64, max_us: u64, secs: f64) -> Sample {
        let mut s = Sample::default();
        for i in 1..=n {
            s.hist.record(i * max_us / n).unwrap();
        }
        s.sources.insert("192.0.2.100".parse().unwrap(), n);
        s.answered.insert("compare.1".into(), n);
        s.elapsed = Duration::from_secs_f64(secs);
        s
    }

    #[test]
    fn slices_alternate_direction_and_merge_into_one_sample() {
        assert_eq!(slice_order(3, 3, false), [0, 1, 2, 2, 1, 0, 0, 1, 2]);
        assert_eq!(slice_order(3, 2, true), [2, 1, 0, 0, 1, 2]);
        assert_eq!(slice_order(2, 1, false), [0, 1]);
        let mut a = sample(100, 1000, 0.5);
        a.errors.refused = 2;
        let mut b = sample(300, 3000, 1.5);
        b.errors.timeout = 1;
        b.first_error = Some("timed out".into());
        b.sources.insert("192.0.2.160".parse().unwrap(), 7);
        a.merge(&b);
        assert_eq!(a.hist.len(), 400);
        assert_eq!(a.hist.max(), b.hist.max());
        assert_eq!((a.errors.refused, a.errors.timeout), (2, 1));
        assert_eq!(a.first_error.as_deref(), Some("timed out"));
        assert_eq!(a.sources[&"192.0.2.100".parse::<IpAddr>().unwrap()], 400);
        assert_eq!(a.sources[&"192.0.2.160".parse::<IpAddr>().unwrap()], 7);
        assert_eq!(a.answered["compare.1"], 400);
        assert_eq!(a.elapsed, Duration::from_secs(2));
    }

    fn labels() -> Labels {
        let mut l = Labels::default();
        l.add("192.0.2.100".parse().unwrap(), "client");
        l.add("192.0.2.11".parse().unwrap(), "node1");
        l.add("192.0.2.100".parse().unwrap(), "not this one");
        l.ingress.push("10.255.0.0/16".parse().unwrap());
        l
    }

    fn task_nodes() -> BTreeMap<String, String> {
        [("compare.1".to_string(), "node2".to_string())].into()
    }

    #[test]
    fn row_statistics_from_a_histogram() {
        let r = Row::new(
            target(Mode::Ingress, "node2", true),
            &sample(1000, 1000, 2.0),
            &labels(),
            &task_nodes(),
        );
        assert_eq!(r.requests, 1000);
        assert!((r.req_per_sec - 500.0).abs() < 1e-9);
        assert!((r.p50_ms - 0.5).abs() < 0.001, "{}", r.p50_ms);
        assert!((r.p90_ms - 0.9).abs() < 0.001, "{}", r.p90_ms);
        assert!((r.p99_ms - 0.99).abs() < 0.001, "{}", r.p99_ms);
        assert!((r.max_ms - 1.0).abs() < 0.001, "{}", r.max_ms);
        assert_eq!(r.percentiles.len(), PERCENTILES.len());
        assert_eq!(r.sources_text(), "192.0.2.100 (client)");
        assert_eq!(r.answered_text(), "node2");
        assert_eq!(r.errors.to_string(), "0");
        // The recorded buckets give the same histogram back.
        let h = r.histogram();
        assert_eq!(h.len(), 1000);
        assert_eq!(us_to_ms(h.value_at_percentile(50.0)), r.p50_ms);
        // Pooling two rounds: twice the requests and the time, the same distribution.
        let m = Row::merge(&[&r, &r]).unwrap();
        assert_eq!(m.requests, 2000);
        assert!((m.req_per_sec - 500.0).abs() < 1e-9);
        assert_eq!(m.p50_ms, r.p50_ms);
        assert_eq!(m.sources[0].count, 2000);
        assert_eq!(m.answered_by[0].count, 2000);
        assert!(Row::merge(&[]).is_none());
        // JSON round trip.
        let back: Row = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back.target, r.target);
        assert_eq!(back.recorded_us, r.recorded_us);
    }

    #[test]
    fn empty_rows_and_labels() {
        let mut s = Sample::default();
        s.errors.refused = 7;
        s.errors.timeout = 1;
        s.elapsed = Duration::from_secs(1);
        let r = Row::new(
            target(Mode::Host, "node1", false),
            &s,
            &labels(),
            &task_nodes(),
        );
        assert_eq!((r.requests, r.p50_ms, r.max_ms), (0, 0.0, 0.0));
        assert_eq!(r.errors.to_string(), "7 refused, 1 timeout");
        assert_eq!(r.sources_text(), "-");
        let l = labels();
        assert_eq!(l.label("192.0.2.100".parse().unwrap()).unwrap(), "client");
        assert_eq!(
            l.label("10.255.0.3".parse().unwrap()).unwrap(),
            "ingress network"
        );
        assert_eq!(l.label("10.0.0.3".parse().unwrap()), None);
    }

    fn report() -> Report {
        let rows = vec![
            Row::new(
                target(Mode::Host, "node2", true),
                &sample(1000, 200, 1.0),
                &labels(),
                &task_nodes(),
            ),
            Row::new(
                target(Mode::Host, "node1", false),
                &Sample {
                    errors: Errors {
                        refused: 5,
                        ..Default::default()
                    },
                    first_error: Some("connection refused".into()),
                    elapsed: Duration::from_secs(1),
                    ..Default::default()
                },
                &labels(),
                &task_nodes(),
            ),
            Row::new(
                target(Mode::Ingress, "node2", true),
                &sample(990, 200, 1.0),
                &labels(),
                &task_nodes(),
            ),
            Row::new(
                target(Mode::Ingress, "node1", false),
                &sample(800, 260, 1.0),
                &labels(),
                &task_nodes(),
            ),
            Row::new(
                target(Mode::IngressSnat, "node2", true),
                &sample(1000, 200, 1.0),
                &labels(),
                &task_nodes(),
            ),
            Row::new(
                target(Mode::IngressSnat, "node1", false),
                &sample(800, 260, 1.0),
                &labels(),
                &task_nodes(),
            ),
            Row::new(
                target(Mode::Overlay, "node2", true),
                &sample(1200, 160, 1.0),
                &labels(),
                &task_nodes(),
            ),
            Row::new(
                target(Mode::Overlay, "node1", false),
                &sample(1000, 220, 1.0),
                &labels(),
                &task_nodes(),
            ),
        ];
        Report {
            lab: "lab".into(),
            unix_time: 1_700_000_000,
            duration_ms: 1000,
            nodes: vec![
                NodeInfo {
                    name: "node1".into(),
                    addr: "192.0.2.11".parse().unwrap(),
                },
                NodeInfo {
                    name: "node2".into(),
                    addr: "192.0.2.12".parse().unwrap(),
                },
            ],
            replica: Replica {
                task: "compare.1".into(),
                node: "node2".into(),
                ip: "10.0.0.2".parse().unwrap(),
            },
            client: vec!["192.0.2.100".parse().unwrap()],
            summary: Summary::compute(&rows),
            rows,
            notes: vec!["a <note> & more".into()],
        }
    }

    #[test]
    fn summary_compares_the_paths() {
        let s = report().summary;
        assert!((s.mesh_vs_host_rate.unwrap() - 0.99).abs() < 1e-9);
        assert!((s.mesh_vs_host_p50.unwrap() - 1.0).abs() < 0.02);
        // p50s: host-local 0.1, mesh-across 0.13, task-to-task 0.08 and 0.11.
        assert!((s.mesh_across_added_p50_ms.unwrap() - 0.03).abs() < 0.002);
        assert!((s.hop_cost_ms.unwrap() - 0.03).abs() < 0.002);
        assert!((s.keep_vs_snat_rate_local.unwrap() - 0.99).abs() < 1e-9);
        assert!((s.keep_vs_snat_rate_across.unwrap() - 1.0).abs() < 1e-9);
        assert!(s.lines().iter().any(|l| l.contains("x0.990")));
        let none = Summary::compute(&[]);
        assert_eq!(none, Summary::default());
        assert_eq!(
            none.lines().len(),
            4,
            "the three comparisons and why they are empty"
        );
    }

    #[test]
    fn html_is_self_contained_with_svg_plots() {
        let r = report();
        let html = render_html(&r).unwrap();
        assert!(html.starts_with("<!DOCTYPE html>"));
        assert!(html.trim_end().ends_with("</html>"));
        assert!(html.matches("<svg").count() >= 2, "plots missing");
        assert!(html.contains("latency by percentile"));
        assert!(html.contains("mesh-across"));
        assert!(html.contains("a &lt;note&gt; &amp; more"));
        for external in ["<script", "<link", "<img", "url(", "@import"] {
            assert!(!html.contains(external), "{external} in the page");
        }
        let table = table_rows(&r);
        assert_eq!(table.len(), r.rows.len());
        assert_eq!(table[0].len(), TABLE_HEADER.len());
        assert_eq!(table[1][4], "-");
        assert_eq!(table[1][8], "5 refused");
        // Writing it.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.html");
        write_html(&r, &p).unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), html);
        // A report with no answers at all still renders.
        let mut empty = r.clone();
        empty.rows.retain(|x| x.requests == 0);
        assert!(render_html(&empty).unwrap().contains("no answers"));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("3s").unwrap(), Duration::from_secs(3));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert!(parse_duration("soon").unwrap_err().0.contains("soon"));
        assert!(parse_duration("1.5s").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("0s").unwrap_err().0.contains("above zero"));
        assert!(parse_duration("1h").unwrap_err().0.contains("too long"));
    }

    #[test]
    fn percentile_axis_and_dates() {
        assert_eq!(pct_label(0.0), "0%");
        assert_eq!(pct_label(1.0), "90%");
        assert_eq!(pct_label(2.0), "99%");
        assert_eq!(pct_label(3.0), "99.9%");
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(1_700_000_000), "2023-11-14 22:13:20 UTC");
    }

    #[test]
    fn ports_are_the_documented_ones() {
        let p = compare_ports().unwrap();
        assert_eq!(
            p.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
            [
                "*:30080->80/tcp",
                "*:30081->80/tcp (host)",
                "*:30082->80/tcp (snat)"
            ]
        );
        assert_eq!(
            PathKind::of(Mode::IngressSnat, false).as_str(),
            "snat-across"
        );
        assert!(PathKind::TaskToTaskLocal.is_local());
    }
}
