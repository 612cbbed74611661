//! Prometheus `/metrics` (text exposition format 0.0.4) on a TCP address, loopback by
//! default. The figures live in relaxed atomics: the DNS resolver's own
//! [`shoal_dns::DnsStats`] (the dns crate must not depend on a metrics library), the
//! agent's counters below, and the cluster state read at scrape time. The exposition is
//! written here by hand: a dozen families of counters, gauges and histograms are a few
//! lines of text, not worth a registry crate and its adapters for the dns crate's stats.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use shoal_api::model::TaskState;
use shoal_control::state::ClusterState;

/// Bounds of the sync duration buckets, seconds.
const SYNC_BOUNDS: [f64; 10] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0];

/// A histogram of fixed buckets.
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    sum_ns: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_ns: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = self
            .bounds
            .iter()
            .position(|&b| s <= b)
            .unwrap_or(self.bounds.len());
        self.counts[i].fetch_add(1, Relaxed);
        self.sum_ns
            .fetch_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX), Relaxed);
    }

    fn write(&self, out: &mut String, name: &str, labels: &str) {
        let cumulative: Vec<u64> = self
            .counts
            .iter()
            .scan(0, |acc, c| {
                *acc += c.load(Relaxed);
                Some(*acc)
            })
            .collect();
        write_buckets(
            out,
            name,
            labels,
            self.bounds,
            &cumulative,
            Duration::from_nanos(self.sum_ns.load(Relaxed)),
        );
    }
}

fn write_buckets(
    out: &mut String,
    name: &str,
    labels: &str,
    bounds: &[f64],
    cumulative: &[u64],
    sum: Duration,
) {
    let sep = if labels.is_empty() { "" } else { "," };
    for (b, c) in bounds.iter().zip(cumulative) {
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {c}");
    }
    let total = cumulative.last().copied().unwrap_or(0);
    let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {total}");
    let braces = if labels.is_empty() {
        String::new()
    } else {
        format!("{{{labels}}}")
    };
    let _ = writeln!(out, "{name}_sum{braces} {}", sum.as_secs_f64());
    let _ = writeln!(out, "{name}_count{braces} {total}");
}

/// LB sync kinds counted separately.
pub const SYNC_KINDS: [&str; 4] = ["full", "incremental", "ipvs", "publish"];

/// The node's dataplanes, as `/metrics` labels them (drift repairs, apply errors).
pub const DATAPLANES: [&str; 10] = [
    "guard",
    "wireguard",
    "publish",
    "marks",
    "lb_nft",
    "lb_ipvs",
    "mesh",
    "dns",
    "conntrack",
    "tasks",
];

/// The agent's own counters.
pub struct AgentMetrics {
    /// Kernel drift found and repaired, per dataplane (an index of [`DATAPLANES`]).
    drift_repairs: [AtomicU64; DATAPLANES.len()],
    /// Failed apply runs, per dataplane.
    apply_errors: [AtomicU64; DATAPLANES.len()],
    syncs: [AtomicU64; SYNC_KINDS.len()],
    sync_errors: [AtomicU64; SYNC_KINDS.len()],
    sync_seconds: Vec<Histogram>,
    /// Reconciliation passes and how long each took.
    pub passes: AtomicU64,
    pub pass_seconds: Histogram,
    /// Newest store revision the watch delivered, and the one the last pass applied.
    pub revision_seen: AtomicI64,
    pub revision_applied: AtomicI64,
    /// When the newest revision arrived (for the lag of a pass behind the watch).
    seen_at: Mutex<Option<Instant>>,
    /// Seconds between a revision arriving from the watch and a pass having applied it.
    pub watch_lag_seconds: Histogram,
    /// Passes that ended with an error, and whether the last one did.
    pub pass_errors: AtomicU64,
    pub last_pass_failed: AtomicU64,
    /// WireGuard: wanted (the cluster has an encrypted network), device up, peers, peers
    /// with a handshake in the last 3 minutes.
    pub wg_wanted: AtomicU64,
    pub wg_up: AtomicU64,
    pub wg_peers: AtomicU64,
    pub wg_peers_handshaken: AtomicU64,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        AgentMetrics {
            drift_repairs: Default::default(),
            apply_errors: Default::default(),
            syncs: Default::default(),
            sync_errors: Default::default(),
            sync_seconds: SYNC_KINDS
                .iter()
                .map(|_| Histogram::new(&SYNC_BOUNDS))
                .collect(),
            passes: AtomicU64::new(0),
            pass_seconds: Histogram::new(&SYNC_BOUNDS),
            revision_seen: AtomicI64::new(0),
            revision_applied: AtomicI64::new(0),
            seen_at: Mutex::new(None),
            watch_lag_seconds: Histogram::new(&SYNC_BOUNDS),
            pass_errors: AtomicU64::new(0),
            last_pass_failed: AtomicU64::new(0),
            wg_wanted: AtomicU64::new(0),
            wg_up: AtomicU64::new(0),
            wg_peers: AtomicU64::new(0),
            wg_peers_handshaken: AtomicU64::new(0),
        }
    }
}

/// The process's metrics (one agent per process).
pub fn global() -> &'static AgentMetrics {
    static M: OnceLock<AgentMetrics> = OnceLock::new();
    M.get_or_init(AgentMetrics::default)
}

impl AgentMetrics {
    /// One LB sync of `kind` (an index of [`SYNC_KINDS`] by name) that took `took`.
    pub fn lb_sync(&self, kind: &str, ok: bool, took: Duration) {
        let Some(i) = SYNC_KINDS.iter().position(|k| *k == kind) else {
            return;
        };
        if ok {
            self.syncs[i].fetch_add(1, Relaxed);
        } else {
            self.sync_errors[i].fetch_add(1, Relaxed);
        }
        self.sync_seconds[i].observe(took);
    }

    /// Someone else changed a kernel object of `dataplane` (a name in [`DATAPLANES`]) and
    /// this pass put it back.
    pub fn drift_repaired(&self, dataplane: &str) {
        if let Some(i) = DATAPLANES.iter().position(|k| *k == dataplane) {
            self.drift_repairs[i].fetch_add(1, Relaxed);
        }
    }

    /// An apply run of `dataplane` failed.
    pub fn apply_error(&self, dataplane: &str) {
        if let Some(i) = DATAPLANES.iter().position(|k| *k == dataplane) {
            self.apply_errors[i].fetch_add(1, Relaxed);
        }
    }

    /// Repairs counted for `dataplane` so far.
    pub fn drift_repairs(&self, dataplane: &str) -> u64 {
        DATAPLANES
            .iter()
            .position(|k| *k == dataplane)
            .map_or(0, |i| self.drift_repairs[i].load(Relaxed))
    }

    /// The watch delivered `revision`.
    pub fn revision_seen(&self, revision: i64) {
        if self.revision_seen.swap(revision, Relaxed) != revision {
            *self.seen_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        }
    }

    /// A pass applied `revision`.
    pub fn pass_done(&self, revision: i64, took: Duration, failed: bool) {
        self.passes.fetch_add(1, Relaxed);
        self.pass_seconds.observe(took);
        if failed {
            self.pass_errors.fetch_add(1, Relaxed);
        }
        self.last_pass_failed.store(u64::from(failed), Relaxed);
        let before = self.revision_applied.swap(revision, Relaxed);
        if before != revision
            && revision == self.revision_seen.load(Relaxed)
            && let Some(at) = *self.seen_at.lock().unwrap_or_else(|e| e.into_inner())
        {
            self.watch_lag_seconds.observe(at.elapsed());
        }
    }
}

/// What a scrape reads.
#[derive(Clone)]
pub struct MetricsSources {
    pub dns: Arc<shoal_dns::DnsStats>,
    pub state: tokio::sync::watch::Receiver<Arc<ClusterState>>,
    pub node_id: String,
}

fn help(out: &mut String, name: &str, kind: &str, text: &str) {
    let _ = writeln!(out, "# HELP {name} {text}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Label values are escaped as the text format asks (backslash, quote, newline).
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The whole exposition.
pub fn render(src: &MetricsSources) -> String {
    let m = global();
    let mut out = String::with_capacity(8192);
    let d = src.dns.snapshot();
    help(
        &mut out,
        "shoal_dns_answers_total",
        "counter",
        "DNS answers sent by the embedded resolver, by query type and response code.",
    );
    for (t, r, n) in &d.answers {
        let _ = writeln!(
            out,
            "shoal_dns_answers_total{{qtype=\"{t}\",rcode=\"{r}\"}} {n}"
        );
    }
    for (name, text, v) in [
        (
            "shoal_dns_dropped_total",
            "Queries dropped without an answer (malformed).",
            d.dropped,
        ),
        (
            "shoal_dns_forwarded_total",
            "Queries forwarded to upstream servers (cache misses).",
            d.forwarded,
        ),
        (
            "shoal_dns_upstream_failures_total",
            "Upstream attempts that failed or timed out.",
            d.upstream_failures,
        ),
        (
            "shoal_dns_forward_servfail_total",
            "Forwarded queries answered SERVFAIL because every upstream failed.",
            d.forward_servfail,
        ),
        (
            "shoal_dns_cache_hits_total",
            "Answers from the upstream cache.",
            d.cache_hits,
        ),
    ] {
        help(&mut out, name, "counter", text);
        let _ = writeln!(out, "{name} {v}");
    }
    help(
        &mut out,
        "shoal_dns_latency_seconds",
        "histogram",
        "Time from a query's receipt to its answer (forwarded ones include the upstream).",
    );
    write_buckets(
        &mut out,
        "shoal_dns_latency_seconds",
        "",
        &shoal_dns::stats::LATENCY_BOUNDS,
        &d.latency_buckets,
        d.latency_sum,
    );

    help(
        &mut out,
        "shoal_drift_repairs_total",
        "counter",
        "Kernel objects of Shoal's that someone else deleted or changed (an nft flush, a firewall reload, ipvsadm -C, a deleted route) and that the agent put back, by dataplane.",
    );
    for (i, k) in DATAPLANES.iter().enumerate() {
        let _ = writeln!(
            out,
            "shoal_drift_repairs_total{{dataplane=\"{k}\"}} {}",
            m.drift_repairs[i].load(Relaxed)
        );
    }
    help(
        &mut out,
        "shoal_apply_errors_total",
        "counter",
        "Failed runs of a dataplane's applier (retried on the next pass), by dataplane.",
    );
    for (i, k) in DATAPLANES.iter().enumerate() {
        let _ = writeln!(
            out,
            "shoal_apply_errors_total{{dataplane=\"{k}\"}} {}",
            m.apply_errors[i].load(Relaxed)
        );
    }
    help(
        &mut out,
        "shoal_lb_syncs_total",
        "counter",
        "Load-balancer programming runs that changed something, by kind (full: table built or adopted; incremental: element diff; ipvs; publish: published ports) and result.",
    );
    for (i, k) in SYNC_KINDS.iter().enumerate() {
        let _ = writeln!(
            out,
            "shoal_lb_syncs_total{{kind=\"{k}\",result=\"ok\"}} {}",
            m.syncs[i].load(Relaxed)
        );
        let _ = writeln!(
            out,
            "shoal_lb_syncs_total{{kind=\"{k}\",result=\"error\"}} {}",
            m.sync_errors[i].load(Relaxed)
        );
    }
    help(
        &mut out,
        "shoal_lb_sync_duration_seconds",
        "histogram",
        "Duration of load-balancer programming runs, by kind.",
    );
    for (i, k) in SYNC_KINDS.iter().enumerate() {
        m.sync_seconds[i].write(
            &mut out,
            "shoal_lb_sync_duration_seconds",
            &format!("kind=\"{k}\""),
        );
    }
    help(
        &mut out,
        "shoal_sync_passes_total",
        "counter",
        "Reconciliation passes.",
    );
    let _ = writeln!(out, "shoal_sync_passes_total {}", m.passes.load(Relaxed));
    help(
        &mut out,
        "shoal_sync_pass_errors_total",
        "counter",
        "Reconciliation passes that hit an error (see `shoal node inspect`).",
    );
    let _ = writeln!(
        out,
        "shoal_sync_pass_errors_total {}",
        m.pass_errors.load(Relaxed)
    );
    help(
        &mut out,
        "shoal_sync_last_pass_failed",
        "gauge",
        "1 when the last pass hit an error.",
    );
    let _ = writeln!(
        out,
        "shoal_sync_last_pass_failed {}",
        m.last_pass_failed.load(Relaxed)
    );
    for (name, v, text) in [
        (
            "shoal_wireguard_wanted",
            &m.wg_wanted,
            "1 while the cluster has an encrypted network (this node needs WireGuard).",
        ),
        (
            "shoal_wireguard_up",
            &m.wg_up,
            "1 while the node's WireGuard device runs; 0 with wanted=1 means encrypted networks are cut off here (never sent in the clear).",
        ),
        (
            "shoal_wireguard_peers",
            &m.wg_peers,
            "Peer nodes configured on the WireGuard device.",
        ),
        (
            "shoal_wireguard_peers_handshaken",
            &m.wg_peers_handshaken,
            "Peers with a handshake in the last 180 s.",
        ),
    ] {
        help(&mut out, name, "gauge", text);
        let _ = writeln!(out, "{name} {}", v.load(Relaxed));
    }
    help(
        &mut out,
        "shoal_sync_pass_duration_seconds",
        "histogram",
        "Duration of reconciliation passes.",
    );
    m.pass_seconds
        .write(&mut out, "shoal_sync_pass_duration_seconds", "");
    help(
        &mut out,
        "shoal_store_revision",
        "gauge",
        "Store revision: the newest the watch delivered (seen) and the one the last pass applied.",
    );
    let _ = writeln!(
        out,
        "shoal_store_revision{{which=\"seen\"}} {}",
        m.revision_seen.load(Relaxed)
    );
    let _ = writeln!(
        out,
        "shoal_store_revision{{which=\"applied\"}} {}",
        m.revision_applied.load(Relaxed)
    );
    help(
        &mut out,
        "shoal_store_watch_lag_seconds",
        "histogram",
        "Time from a store change arriving on the watch until a pass had applied it.",
    );
    m.watch_lag_seconds
        .write(&mut out, "shoal_store_watch_lag_seconds", "");

    let st = src.state.borrow().clone();
    let mut backends = String::new();
    let mut desired = String::new();
    for (svc, _) in st.services.values() {
        let n = st
            .tasks
            .values()
            .filter(|(t, _)| {
                t.service_id == svc.id && t.is_serving() && st.alive.contains(&t.node_id)
            })
            .count();
        let _ = writeln!(
            backends,
            "shoal_service_backends{{service=\"{}\"}} {n}",
            esc(&svc.name)
        );
        let _ = writeln!(
            desired,
            "shoal_service_replicas_desired{{service=\"{}\"}} {}",
            esc(&svc.name),
            svc.replicas
        );
    }
    // One family after the other, never interleaved.
    help(
        &mut out,
        "shoal_service_backends",
        "gauge",
        "Replicas of a service that receive traffic (running, not failing a health check), cluster-wide.",
    );
    out.push_str(&backends);
    help(
        &mut out,
        "shoal_service_replicas_desired",
        "gauge",
        "Replicas a service asks for.",
    );
    out.push_str(&desired);

    help(
        &mut out,
        "shoal_tasks",
        "gauge",
        "Tasks by state: on this node (scope=node) and in the whole cluster (scope=cluster).",
    );
    for state in [
        TaskState::New,
        TaskState::Starting,
        TaskState::Running,
        TaskState::Shutdown,
        TaskState::Failed,
    ] {
        let all = || st.tasks.values().filter(|(t, _)| t.state == state);
        let cluster = all().count();
        let node = all().filter(|(t, _)| t.node_id == src.node_id).count();
        let s = state.to_string();
        let _ = writeln!(out, "shoal_tasks{{scope=\"node\",state=\"{s}\"}} {node}");
        let _ = writeln!(
            out,
            "shoal_tasks{{scope=\"cluster\",state=\"{s}\"}} {cluster}"
        );
    }
    help(
        &mut out,
        "shoal_nodes_alive",
        "gauge",
        "Nodes whose agent holds its liveness lease.",
    );
    let _ = writeln!(out, "shoal_nodes_alive {}", st.alive.len());
    out
}
