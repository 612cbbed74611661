//! `shoal agent`: registers the node, serves the API, orchestrates services into tasks (on
//! the leader) and reconciles this node's kernel state with the cluster model.
//!
//! The reconciler is level-triggered: every pass compares the whole desired state with what
//! it has applied, so a failed step is simply retried on the next pass (a change in the
//! store, a task exit, or the periodic tick).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{mpsc, watch};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::cluster::{Cluster, NODES, encode};
use crate::config::{AgentConfig, StoreKind};
use crate::desired::{self, View};
use crate::drift::{Check, DriftWatch, Drifted, Write};
use crate::liveness::Liveness;
use crate::model::{Node, NodeStatus, Service, Task, TaskState};
use crate::reports::{Adoption, Pending, Report};
use crate::runtime::{Exited, ProcessRuntime, Runtime, TaskSpec};
use crate::state::{ClusterState, spawn_cache};
use crate::store::Store;

/// How often the drift canary reads the nf_tables generations of our namespaces (one
/// netlink round trip each): a flushed table is back within about this long.
const DRIFT_CANARY: Duration = Duration::from_secs(1);

/// What the agent last did, for `node inspect` and the API.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct NodeReport {
    pub last_error: Option<String>,
    /// When the last error was hit (seconds since the epoch) and whether the last pass
    /// was clean.
    pub last_error_unix: Option<u64>,
    pub last_pass_ok: bool,
    pub networks: Vec<String>,
    pub dns_attached: usize,
    pub passes: u64,
    /// The store revision the last pass applied.
    pub revision: i64,
    /// The VIPs programmed in this node's network namespaces.
    pub vips: Vec<ProgrammedVip>,
    /// The published ports programmed in the node namespace.
    pub published: Vec<ProgrammedPort>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ProgrammedVip {
    pub network_id: String,
    pub vip: std::net::Ipv4Addr,
    pub protocol: String,
    pub port: u16,
    pub backends: Vec<std::net::Ipv4Addr>,
    pub draining: Vec<std::net::Ipv4Addr>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ProgrammedPort {
    pub protocol: String,
    pub port: u16,
    pub mode: String,
    /// ingress-network address:target port of every backend.
    pub backends: Vec<String>,
}

pub struct Agent {
    cfg: AgentConfig,
    pub node_id: String,
    pub cluster: Cluster,
    runtime: Arc<dyn Runtime>,
    resolver: shoal_dns::Resolver,
    /// task id -> the view it is served
    dns_views: HashMap<String, View>,
    /// network id -> the ruleset applied in its namespace
    lb_applied: HashMap<String, shoal_lb::Ruleset>,
    /// Programs the LB tables incrementally (adopting existing ones after a restart).
    lb: shoal_lb::Syncer,
    started: HashSet<String>,
    stopping: Arc<Mutex<HashSet<String>>>,
    search: Vec<String>,
    pub report: Arc<Mutex<NodeReport>>,
    liveness: Arc<Liveness>,
    underlay: Option<desired::Underlay>,
    health: HashMap<String, tokio::task::JoinHandle<()>>,
    /// Our node record as last written (its `listening` list is kept current).
    node: Node,
    /// The published ports applied in the node namespace (None: not programmed yet, or
    /// removed).
    publish_applied: Option<shoal_lb::publish::PublishSpec>,
    /// The node marks applied in the ingress namespace.
    marks_applied: Option<BTreeMap<[u8; 6], u32>>,
    /// The node namespace's guard table as applied (None: not yet in this process).
    guard_applied: Option<shoal_lb::guard::GuardSpec>,
    /// The node namespace is known to hold no published-port state of ours.
    node_clean: bool,
    /// Targets whose NATed flows have been deleted since their node went down.
    lost_cleaned: std::collections::BTreeSet<std::net::Ipv4Addr>,
    /// Task address -> its node, for [`desired::lost_targets`].
    target_nodes: BTreeMap<std::net::Ipv4Addr, String>,
    /// Where our nft tables are, to notice someone else changing them.
    drift: DriftWatch,
    /// Tables found changed by someone else, until they are written again: (netns, table)
    /// -> (dataplane, confirmed by read-back).
    drift_pending: HashMap<(String, &'static str), (&'static str, bool)>,
    /// Overlay and ingress specs as last applied, to tell a repair (the kernel diff changed
    /// something though the spec did not) from a change.
    mesh_applied: HashMap<String, shoal_mesh::NetworkSpec>,
    ingress_applied: Option<shoal_mesh::ingress::IngressSpec>,
    /// Tasks whose DNS listener ended and is to be attached again.
    dns_reattach: HashSet<String>,
    /// Task reports (started, exited, ...) not written to the store yet.
    reports: Pending,
}

/// The agent's own namespace (the node's): published ports are programmed here.
const NODE_NS: &str = "/proc/self/ns/net";

/// The interface holding `addr` in this namespace (the VXLAN underlay).
fn dev_of(addr: std::net::Ipv4Addr) -> Option<String> {
    nix::ifaddrs::getifaddrs().ok()?.find_map(|ifa| {
        let a = ifa.address?;
        (a.as_sockaddr_in()?.ip() == addr).then_some(ifa.interface_name)
    })
}

pub async fn open_store(cfg: &AgentConfig) -> anyhow::Result<Arc<dyn Store>> {
    Ok(match cfg.store.kind {
        StoreKind::Embedded => {
            let dir = cfg.state_dir.join("store");
            Arc::new(
                crate::store::embedded::EmbeddedStore::open(&dir)
                    .with_context(|| format!("opening the embedded store in {}", dir.display()))?,
            )
        }
        StoreKind::Etcd => {
            let tls = match &cfg.store.tls {
                Some(t) => Some(etcd_tls(t)?),
                None => None,
            };
            Arc::new(
                crate::store::etcd::EtcdStore::connect_tls(
                    &cfg.store.endpoints,
                    Default::default(),
                    tls,
                )
                .await
                .context("connecting to etcd")?,
            )
        }
    })
}

/// Client TLS towards etcd from the PEM files of `[store.tls]`.
fn etcd_tls(t: &crate::config::EtcdTls) -> anyhow::Result<etcd_client::TlsOptions> {
    let read = |what: &str, p: &Path| {
        std::fs::read(p).with_context(|| format!("store.tls.{what}: reading {}", p.display()))
    };
    let mut o = etcd_client::TlsOptions::new()
        .ca_certificate(etcd_client::Certificate::from_pem(read("ca", &t.ca)?))
        .identity(etcd_client::Identity::from_pem(
            read("cert", &t.cert)?,
            read("key", &t.key)?,
        ));
    if let Some(n) = &t.server_name {
        o = o.domain_name(n.clone());
    }
    Ok(o)
}

/// This node's id: read from `state_dir/node_id`, or made and written there (temp file,
/// fsync, rename: a crash never leaves an empty or half-written id). A file that does not
/// hold an id (empty, too long, other characters) is an error naming it, not a node "".
pub(crate) fn node_id(state_dir: &Path) -> anyhow::Result<String> {
    let p = state_dir.join("node_id");
    match std::fs::read_to_string(&p) {
        Ok(text) => {
            let id = text.trim();
            let valid = !id.is_empty()
                && id.len() <= 64
                && id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
            if !valid {
                anyhow::bail!(
                    "{} does not hold a node id ({:?}); remove it to make a new one (the node then joins as a new node)",
                    p.display(),
                    text.chars().take(80).collect::<String>()
                );
            }
            return Ok(id.to_string());
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", p.display())),
    }
    let id = crate::model::new_id();
    let tmp = state_dir.join(".node_id.tmp");
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(id.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &p)?;
        std::fs::File::open(state_dir)?.sync_all()
    };
    write().with_context(|| format!("writing {}", p.display()))?;
    Ok(id)
}

/// Runs the agent until SIGINT/SIGTERM.
pub async fn run(cfg: AgentConfig) -> anyhow::Result<()> {
    // glibc gives each new thread that allocates under contention its own malloc arena and
    // keeps its pages: bursts of blocking work (namespace and netlink calls at a node loss)
    // then leave the resident size a step higher for good (the soak saw +1.6 MB per event).
    // Two arenas are plenty for the agent's allocation rate.
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets an allocator parameter; called before any thread of ours
    // allocates heavily, and glibc tolerates it at any time.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
    // Every forwarded DNS query holds a socket until answered: no fixed cap like Docker's
    // 1024, so lift the soft file limit to the hard one.
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
    std::fs::create_dir_all(&cfg.state_dir)
        .with_context(|| format!("creating {}", cfg.state_dir.display()))?;
    let node_id = node_id(&cfg.state_dir)?;
    // An unreachable etcd at start is waited for (a daemon outlives its store's restarts).
    let store = loop {
        match open_store(&cfg).await {
            Ok(s) => break s,
            Err(e) if cfg.store.kind == StoreKind::Etcd => {
                warn!(error = %format!("{e:#}"), "store not reachable yet; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(e),
        }
    };
    let cluster = Cluster::new(store.clone());
    let node = Node {
        id: node_id.clone(),
        name: cfg.node_name.clone(),
        addr: cfg.advertise_addr,
        status: NodeStatus::Ready,
        version: env!("CARGO_PKG_VERSION").to_string(),
        listening: crate::listening::listening(),
    };
    store
        .put(&format!("{NODES}{node_id}"), encode(&node))
        .await
        .context("registering the node")?;
    // The ingress network comes with the cluster: the first agent creates it.
    if let Err(e) = cluster.ensure_ingress().await {
        warn!(error = %e, "ingress network not available; published ports will not work");
    }

    let upstreams = match &cfg.dns.upstreams {
        Some(u) => u.clone(),
        None => shoal_dns::nameservers_from_resolv_conf(
            &std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
        ),
    };
    let search = match &cfg.dns.search {
        Some(s) => s.clone(),
        None => search_from_resolv_conf(
            &std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
        ),
    };
    let resolver = shoal_dns::Resolver::new(shoal_dns::DnsConfig {
        ttl: cfg.dns.ttl,
        negative_ttl: cfg.dns.negative_ttl,
        upstreams,
        ..Default::default()
    });
    let (exit_tx, mut exit_rx) = mpsc::unbounded_channel();
    let runtime: Arc<dyn Runtime> =
        ProcessRuntime::new(&cfg.netns_prefix, &cfg.state_dir.join("tasks"), exit_tx)?;

    let report = Arc::new(Mutex::new(NodeReport::default()));
    let mut state_rx = spawn_cache(store.clone());
    let api = crate::api::serve(
        &cfg.socket,
        crate::api::ApiState {
            cluster: cluster.clone(),
            node_id: node_id.clone(),
            node_name: cfg.node_name.clone(),
            report: report.clone(),
            netns_prefix: cfg.netns_prefix.clone(),
            tasks_dir: cfg.state_dir.join("tasks"),
            state: state_rx.clone(),
        },
    )
    .await?;
    let metrics_addr = cfg.metrics_socket()?;
    let metrics = match metrics_addr {
        Some(addr) => Some(
            crate::metrics::serve(
                addr,
                crate::metrics::MetricsSources {
                    dns: resolver.stats(),
                    state: state_rx.clone(),
                    node_id: node_id.clone(),
                },
            )
            .await?,
        ),
        None => None,
    };
    info!(node = %cfg.node_name, id = %node_id, socket = %cfg.socket.display(), metrics = ?metrics_addr, "agent started");
    let liveness = Liveness::spawn(
        store.clone(),
        node_id.clone(),
        Duration::from_secs(cfg.lease_ttl_secs),
    );
    let underlay = match cfg.advertise_addr {
        Some(addr) => {
            let dev = cfg
                .underlay_dev
                .clone()
                .or_else(|| dev_of(addr))
                .with_context(|| format!("no interface holds advertise_addr {addr}"))?;
            Some(desired::Underlay { addr, dev })
        }
        None => None,
    };

    let mut agent = Agent {
        cfg,
        node_id,
        cluster,
        runtime,
        resolver,
        dns_views: HashMap::new(),
        lb_applied: HashMap::new(),
        lb: shoal_lb::Syncer::new(shoal_lb::Applier::global().clone()),
        started: HashSet::new(),
        stopping: Arc::new(Mutex::new(HashSet::new())),
        search,
        report,
        liveness,
        underlay,
        health: HashMap::new(),
        node: node.clone(),
        publish_applied: None,
        marks_applied: None,
        guard_applied: None,
        node_clean: false,
        lost_cleaned: Default::default(),
        target_nodes: Default::default(),
        drift: DriftWatch::new(shoal_lb::Applier::global().clone()),
        drift_pending: HashMap::new(),
        mesh_applied: HashMap::new(),
        ingress_applied: None,
        dns_reattach: HashSet::new(),
        reports: Pending::default(),
    };
    // The orchestrator runs beside the node reconciler, so that the leader's decisions never
    // wait for its own node's kernel work.
    tokio::spawn(
        crate::orchestrator::Orchestrator {
            cluster: agent.cluster.clone(),
            liveness: agent.liveness.clone(),
        }
        .run(state_rx.clone()),
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut first = true;
    let resync = agent.cfg.resync_period();
    // A full pass (every table of ours read back, IPVS diffed against the kernel) at least
    // once per resync period, however busy the watch is; in between, the cheap drift canary
    // (one nf_tables generation read per namespace) every DRIFT_CANARY.
    let mut next_full = tokio::time::Instant::now() + resync;
    let mut canary = tokio::time::interval(DRIFT_CANARY);
    canary.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            r = state_rx.changed() => { if r.is_err() { break; } }
            Some(ex) = exit_rx.recv() => { agent.on_exit(&state_rx, ex).await; }
            _ = tokio::time::sleep_until(next_full) => {}
            _ = canary.tick() => {
                if !agent.drift.moved().await {
                    continue;
                }
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        }
        let st = state_rx.borrow_and_update().clone();
        if !st.synced {
            continue;
        }
        if first {
            agent.adopt(&st);
            first = false;
        }
        let started = std::time::Instant::now();
        let full = tokio::time::Instant::now() >= next_full;
        if full {
            next_full = tokio::time::Instant::now() + resync;
        }
        agent
            .pass(&st, full)
            .instrument(info_span!("sync", revision = st.revision, full))
            .await;
        let failed = !agent.report.lock().expect("lock").last_pass_ok;
        crate::metrics::global().pass_done(st.revision, started.elapsed(), failed);
    }
    api.abort();
    if let Some(m) = metrics {
        m.abort();
    }
    let _ = std::fs::remove_file(&agent.cfg.socket);
    info!("agent stopped; tasks and kernel state are left for the next start to adopt");
    Ok(())
}

fn search_from_resolv_conf(text: &str) -> Vec<String> {
    text.lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("search"))
        .map(|s| s.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

impl Agent {
    /// After a restart: processes of tasks that still run are adopted, not restarted (and
    /// reported running if the earlier run's write of that was lost).
    fn adopt(&mut self, st: &ClusterState) {
        for t in desired::local_tasks(st, &self.node_id) {
            let a = crate::reports::adoption(t, self.runtime.is_running(&t.id));
            if a == Adoption::None {
                continue;
            }
            self.started.insert(t.id.clone());
            self.runtime.clone().adopt(&t.id);
            if a == Adoption::AdoptAndReport {
                self.reports.add(&t.id, Report::Running);
            }
            info!(task = %t.name(), "adopted running task");
        }
    }

    /// A process exited: reported (retried until written; see reports.rs).
    async fn on_exit(&mut self, state_rx: &watch::Receiver<Arc<ClusterState>>, ex: Exited) {
        self.started.remove(&ex.task_id);
        let st = state_rx.borrow().clone();
        if let Some((t, _)) = st.tasks.get(&ex.task_id)
            && t.desired_state == TaskState::Running
        {
            warn!(task = %t.name(), status = %ex.status, "task exited");
        }
        self.reports
            .add(&ex.task_id, Report::Exited(ex.status.to_string()));
        for e in self.reports.flush(&self.cluster).await {
            warn!(error = %e, "task report not written yet; will retry");
        }
    }

    async fn pass(&mut self, st: &ClusterState, full: bool) {
        let mut errors = vec![];
        // Liveness as this agent may act on it (see liveness.rs: after a store outage the
        // last trusted picture is kept until the nodes have had time to re-register).
        let st = &*self.liveness.adjust(st);
        let drifted = self.drift.check(full).await;
        self.on_drift(drifted);
        if let Err(e) = self.reconcile(st, full, &mut errors).await {
            errors.push(format!("{e:#}"));
        }
        // Ports in use on this node, for the publish conflict check (a /proc scan of some
        // milliseconds: on the blocking pool).
        let listening = tokio::task::spawn_blocking(crate::listening::listening)
            .await
            .unwrap_or_else(|_| self.node.listening.clone());
        if listening != self.node.listening {
            let mut node = self.node.clone();
            node.listening = listening;
            match self.cluster.put_node(&node).await {
                Ok(()) => self.node = node,
                Err(e) => errors.push(format!("updating the node record: {e}")),
            }
        }
        let mut r = self.report.lock().expect("lock");
        r.passes += 1;
        r.revision = st.revision;
        r.last_pass_ok = errors.is_empty();
        r.dns_attached = self.dns_views.len();
        r.networks = self.lb_applied.keys().cloned().collect();
        r.vips = self
            .lb_applied
            .iter()
            .flat_map(|(net, rs)| {
                rs.services.iter().map(move |s| ProgrammedVip {
                    network_id: net.clone(),
                    vip: s.vip,
                    protocol: format!("{:?}", s.protocol).to_lowercase(),
                    port: s.port,
                    backends: s.backends.clone(),
                    draining: s.draining.clone(),
                })
            })
            .collect();
        r.vips
            .sort_by_key(|v| (v.network_id.clone(), v.vip, v.port));
        r.published = self
            .publish_applied
            .iter()
            .flat_map(|spec| spec.ports.iter())
            .map(|p| ProgrammedPort {
                protocol: format!("{:?}", p.protocol).to_lowercase(),
                port: p.port,
                mode: format!("{:?}", p.kind).to_lowercase(),
                backends: p.backends.iter().map(|(a, t)| format!("{a}:{t}")).collect(),
            })
            .collect();
        if !errors.is_empty() {
            for e in &errors {
                warn!(error = %e, "reconcile error; will retry");
            }
            r.last_error = Some(errors.join("; "));
            r.last_error_unix = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .ok()
                .map(|d| d.as_secs());
        }
    }

    fn task_spec(&self, t: &Task, svc: &Service) -> TaskSpec {
        TaskSpec {
            id: t.id.clone(),
            name: t.name(),
            service: svc.name.clone(),
            hostname: t.hostname(),
            command: svc.command.clone(),
            env: svc.env.clone(),
            resolv_conf: desired::resolv_conf(&self.search),
        }
    }

    /// Tables someone else changed: their appliers forget what they applied, so this pass
    /// writes them again (a VIP table is read back and repaired in place by its syncer).
    fn on_drift(&mut self, drifted: Vec<Drifted>) {
        for d in drifted {
            if d.confirmed {
                warn!(netns = %d.netns, table = d.table, dataplane = d.dataplane, "kernel drift: table changed or deleted by someone else; putting it back");
            } else {
                debug!(netns = %d.netns, table = d.table, "nf_tables generation moved; reading the table back");
            }
            match d.dataplane {
                "guard" => self.guard_applied = None,
                "publish" => self.publish_applied = None,
                "marks" => self.marks_applied = None,
                "lb_nft" => {
                    self.lb_applied.remove(&d.key);
                    self.lb.forget(&d.netns);
                }
                "lb_ipvs" => {
                    self.lb_applied.remove(&d.key);
                }
                other => debug!(dataplane = other, "drift of a table no applier owns"),
            }
            self.drift_pending
                .insert((d.netns, d.table), (d.dataplane, d.confirmed));
        }
    }

    /// An applier wrote (or read back) a table: the drift watch takes note, and a pending
    /// drift of that table counts as repaired when the write changed the kernel (or the
    /// drift was confirmed by read-back).
    async fn wrote(&mut self, netns: &str, w: Write<'_>, errors: &mut Vec<String>) {
        if let Some((dp, confirmed)) = self.drift_pending.remove(&(netns.to_string(), w.table))
            && (confirmed || w.changed)
        {
            if !confirmed {
                warn!(
                    netns,
                    table = w.table,
                    dataplane = dp,
                    "kernel drift: table changed by someone else; repaired in place"
                );
            } else {
                info!(
                    netns,
                    table = w.table,
                    dataplane = dp,
                    "kernel drift repaired"
                );
            }
            crate::metrics::global().drift_repaired(dp);
        }
        if let Err(e) = self.drift.wrote(netns, w).await {
            errors.push(format!("drift watch of {} in {netns}: {e}", w.table));
        }
    }

    /// Applies the VIP ruleset of each network in `nets` whose ruleset changed.
    /// `removals_only` (the fast path, before this pass has routed new endpoints): services
    /// and backends only leave; a backend with no route yet would answer its first clients
    /// with "network unreachable".
    async fn sync_lb(
        &mut self,
        st: &ClusterState,
        nets: &HashSet<String>,
        removals_only: bool,
        full: bool,
        errors: &mut Vec<String>,
    ) {
        let ipvs = self.cfg.lb.dataplane == crate::config::Dataplane::Ipvs;
        for net_id in nets {
            let Some(net) = st.network_by_id(net_id).filter(|n| !n.ingress) else {
                continue;
            };
            let netns = desired::network_netns(&self.cfg.netns_prefix, net);
            if !shoal_netns::exists(&netns) {
                self.lb_applied.remove(net_id);
                self.lb.forget(&netns);
                self.drift.forget_ns(&netns);
                continue;
            }
            let mut rs = desired::lb_ruleset(st, &self.node_id, net_id);
            if removals_only {
                let Some(old) = self.lb_applied.get(net_id) else {
                    continue;
                };
                rs = desired::removals_only(&rs, old);
            }
            let unchanged = self.lb_applied.get(net_id) == Some(&rs);
            // IPVS has no generation to watch: a full pass diffs it against the kernel.
            if unchanged && !(ipvs && full && !removals_only) {
                continue;
            }
            if ipvs {
                // IPVS services (diff against the kernel's table, so a failed run converges on
                // the next pass) + the companion nft table. Without IPVS in the kernel: the
                // clear NoIpvs error, reported on every pass.
                let opts = self.cfg.lb.ipvs_options();
                let started = std::time::Instant::now();
                let res = shoal_lb::ipvs::sync(&netns, &rs, &opts).await;
                crate::metrics::global().lb_sync("ipvs", res.is_ok(), started.elapsed());
                match res {
                    Ok(ops) => {
                        debug!(netns = %netns, services = rs.services.len(), ipvs_ops = ops.len(), "VIP ruleset synced (IPVS)");
                        if unchanged && !ops.is_empty() {
                            warn!(netns = %netns, ipvs_ops = ops.len(), "kernel drift: IPVS services changed by someone else; put back");
                            crate::metrics::global().drift_repaired("lb_ipvs");
                        }
                        self.lb_applied.insert(net_id.clone(), rs);
                        self.wrote(
                            &netns,
                            Write {
                                table: shoal_lb::ipvs::COMPANION_TABLE,
                                dataplane: "lb_ipvs",
                                key: net_id,
                                check: Check::Fingerprint,
                                changed: true,
                                before: None,
                                removed: false,
                            },
                            errors,
                        )
                        .await;
                    }
                    Err(e) => {
                        crate::metrics::global().apply_error("lb_ipvs");
                        self.lb_applied.remove(net_id);
                        errors.push(format!("IPVS ruleset of {netns}: {e}"));
                    }
                }
                continue;
            }
            // Read before the sync: a read-back that writes nothing records it, so a change
            // made meanwhile is seen at the next canary.
            let lb_before = self.drift.generation_now(&netns).await;
            let started = std::time::Instant::now();
            let res = self.lb.sync(&netns, &rs).await;
            let kind = match &res {
                Ok(r) if r.kind == shoal_lb::SyncKind::Incremental => Some("incremental"),
                Ok(r) if r.kind == shoal_lb::SyncKind::Unchanged => None,
                _ => Some("full"),
            };
            if let Some(kind) = kind {
                crate::metrics::global().lb_sync(kind, res.is_ok(), started.elapsed());
            }
            match res {
                Ok(r) => {
                    debug!(netns = %netns, services = rs.services.len(), kind = ?r.kind, "VIP ruleset synced");
                    self.lb_applied.insert(net_id.clone(), rs);
                    self.wrote(
                        &netns,
                        Write {
                            table: desired::LB_TABLE,
                            dataplane: "lb_nft",
                            key: net_id,
                            check: Check::Resync,
                            changed: r.kind != shoal_lb::SyncKind::Unchanged,
                            before: lb_before,
                            removed: false,
                        },
                        errors,
                    )
                    .await;
                }
                Err(e) => {
                    crate::metrics::global().apply_error("lb_nft");
                    self.lb_applied.remove(net_id);
                    errors.push(format!("ruleset of {netns}: {e}"));
                }
            }
        }
    }

    /// Programs the published ports of this node when they changed, then deletes UDP
    /// conntrack entries that would keep sending to old NAT targets. `removals_only` (the
    /// fast path, before this pass has routed new endpoints): backends and ports only
    /// leave; new ones wait for the routes to them.
    async fn sync_publish(
        &mut self,
        st: &ClusterState,
        removals_only: bool,
        errors: &mut Vec<String>,
    ) {
        let addr = self
            .underlay
            .as_ref()
            .map(|u| u.addr)
            .unwrap_or(shoal_mesh::ingress::NODE_LINK_ADDR);
        let Some(mut spec) = desired::publish_spec(st, &self.node_id, addr) else {
            return;
        };
        if removals_only {
            let Some(old) = &self.publish_applied else {
                return;
            };
            spec.ports.retain_mut(|p| {
                let Some(o) = old
                    .ports
                    .iter()
                    .find(|o| (o.protocol, o.port, o.kind) == (p.protocol, p.port, p.kind))
                else {
                    return false;
                };
                p.backends.retain(|b| o.backends.contains(b));
                true
            });
        }
        if self.publish_applied.as_ref() == Some(&spec) {
            return;
        }
        let started = std::time::Instant::now();
        let res =
            shoal_lb::publish::apply_publish(shoal_lb::Applier::global(), NODE_NS, Some(&spec))
                .await;
        crate::metrics::global().lb_sync("publish", res.is_ok(), started.elapsed());
        match res {
            Ok(()) => {
                info!(ports = spec.ports.len(), "published ports programmed");
                self.node_clean = false;
                let before =
                    self.publish_applied
                        .take()
                        .unwrap_or(shoal_lb::publish::PublishSpec {
                            ports: vec![],
                            ..spec.clone()
                        });
                // A ctnetlink dump: on the blocking pool, not on a runtime worker.
                let now = spec.clone();
                let res = tokio::task::spawn_blocking(move || {
                    let local = crate::whoami::local_ips();
                    let is_local = |ip: std::net::Ipv4Addr| {
                        ip.is_loopback() || local.contains(&std::net::IpAddr::V4(ip))
                    };
                    shoal_lb::publish::clean_conntrack(NODE_NS, &before, &now, &is_local)
                })
                .await;
                match res {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => errors.push(format!("published ports: {e}")),
                    Err(e) => errors.push(format!("published ports: conntrack clean-up: {e}")),
                }
                let removed = spec.ports.is_empty();
                self.publish_applied = Some(spec);
                self.wrote(
                    NODE_NS,
                    Write {
                        table: shoal_lb::publish::PUBLISH_TABLE,
                        dataplane: "publish",
                        key: "",
                        check: Check::Fingerprint,
                        changed: true,
                        before: None,
                        removed,
                    },
                    errors,
                )
                .await;
            }
            Err(e) => {
                crate::metrics::global().apply_error("publish");
                self.publish_applied = None;
                errors.push(format!("published ports: {e}"));
            }
        }
    }

    /// Once the backends of a node that went down have left the rulesets: deletes every
    /// NATed flow to them (published ports in the node namespace, VIPs in the network
    /// namespaces), established ones included. Established flows to a drained or scaled-down
    /// task are left to finish; a dead node answers nothing, and a client reusing the source
    /// port of such a flow would be sent there again (conntrack keeps an established entry
    /// for days and ignores a SYN that matches it).
    async fn clean_lost(&mut self, st: &ClusterState, errors: &mut Vec<String>) {
        // Only on a picture that has this node alive: one without it (no liveness read
        // yet) would take every task for lost.
        if !st.alive.contains(&self.node_id) {
            return;
        }
        let lost = desired::lost_targets(st, &mut self.target_nodes);
        let new: std::collections::BTreeSet<_> =
            lost.difference(&self.lost_cleaned).copied().collect();
        if new.is_empty() {
            self.lost_cleaned_done(st, lost);
            return;
        }
        let mut namespaces: Vec<String> = self
            .lb_applied
            .keys()
            .filter_map(|id| st.network_by_id(id))
            .map(|n| desired::network_netns(&self.cfg.netns_prefix, n))
            .collect();
        if self.publish_applied.is_some() {
            namespaces.push(NODE_NS.to_string());
        }
        let targets = new.clone();
        let res = tokio::task::spawn_blocking(move || {
            namespaces.iter().try_fold(0, |n, ns| {
                Ok::<usize, shoal_lb::conntrack::CtError>(
                    n + shoal_lb::conntrack::delete_nated_to(ns, &targets)?,
                )
            })
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()));
        match res {
            Ok(deleted) => {
                if deleted > 0 {
                    info!(targets = ?new, deleted, "deleted flows to the tasks of a node that is down");
                }
                self.lost_cleaned_done(st, lost);
            }
            Err(e) => errors.push(format!("deleting flows to a lost node: {e}")),
        }
    }

    /// The flows to `lost` are deleted: addresses whose task record is gone are done with;
    /// the others are not cleaned again while their node stays down.
    fn lost_cleaned_done(
        &mut self,
        st: &ClusterState,
        lost: std::collections::BTreeSet<std::net::Ipv4Addr>,
    ) {
        let current: std::collections::BTreeSet<std::net::Ipv4Addr> = st
            .task_list()
            .flat_map(|t| t.networks.iter().map(|n| n.ip))
            .collect();
        self.target_nodes
            .retain(|ip, _| current.contains(ip) || !lost.contains(ip));
        self.lost_cleaned = lost.intersection(&current).copied().collect();
    }

    /// Nothing is published: no table in the node namespace, no link to the ingress
    /// namespace (which the namespace sweep removes).
    async fn unpublish(&mut self, errors: &mut Vec<String>) {
        if self.marks_applied.is_none() && self.publish_applied.is_none() && self.node_clean {
            return;
        }
        let res = async {
            shoal_lb::publish::apply_publish(shoal_lb::Applier::global(), NODE_NS, None).await?;
            shoal_mesh::ingress::remove_ingress_link(None)
                .await
                .map_err(|e| anyhow::anyhow!(e))?;
            anyhow::Ok(())
        }
        .await;
        match res {
            Ok(()) => {
                self.publish_applied = None;
                self.marks_applied = None;
                self.node_clean = true;
                self.drift
                    .untrack(NODE_NS, shoal_lb::publish::PUBLISH_TABLE)
                    .await;
            }
            Err(e) => errors.push(format!("removing published ports: {e:#}")),
        }
    }

    /// Serves each local container the view of its networks (one record table per distinct
    /// set of networks); with `attach_new`, attaches containers not served yet.
    async fn sync_dns(
        &mut self,
        st: &ClusterState,
        local: &[(Task, i64)],
        stopping: &HashSet<String>,
        ok_networks: &HashSet<String>,
        attach_new: bool,
        errors: &mut Vec<String>,
    ) {
        if attach_new {
            // A listener that ended (its socket failed) is attached again below.
            let dead: Vec<String> = self
                .dns_views
                .keys()
                .filter(|id| self.resolver.serving(id) == Some(false))
                .cloned()
                .collect();
            for id in dead {
                warn!(task = %id, "kernel drift: the 127.0.0.11 listener of a task ended; attaching it again");
                self.resolver.detach(&id).await;
                self.dns_views.remove(&id);
                self.dns_reattach.insert(id);
            }
        }
        let mut views: BTreeMap<Vec<String>, (View, Arc<shoal_dns::Records>)> = BTreeMap::new();
        for (t, _) in local {
            if stopping.contains(&t.id) || t.desired_state != TaskState::Running {
                continue;
            }
            if !attach_new && !self.dns_views.contains_key(&t.id) {
                continue;
            }
            let ns = self.runtime.netns(&t.id);
            if !t
                .networks
                .iter()
                .all(|n| ok_networks.contains(&n.network_id))
                || !shoal_netns::exists(&ns)
            {
                continue;
            }
            let ids: Vec<String> = t.networks.iter().map(|n| n.network_id.clone()).collect();
            let (view, records) = views
                .entry(ids.clone())
                .or_insert_with(|| {
                    let v = desired::dns_view(st, &ids);
                    let r = Arc::new(v.to_records());
                    (v, r)
                })
                .clone();
            match self.dns_views.get(&t.id) {
                Some(old) if *old == view => {}
                Some(_) => match self.resolver.update(&t.id, records) {
                    Ok(()) => {
                        self.dns_views.insert(t.id.clone(), view);
                    }
                    Err(e) => errors.push(format!("dns of {}: {e}", t.name())),
                },
                None => match self.resolver.attach(&t.id, &ns, records).await {
                    Ok(()) => {
                        if self.dns_reattach.remove(&t.id) {
                            crate::metrics::global().drift_repaired("dns");
                        }
                        self.dns_views.insert(t.id.clone(), view);
                    }
                    Err(e) => errors.push(format!("dns of {}: {e}", t.name())),
                },
            }
        }
    }

    async fn reconcile(
        &mut self,
        st: &ClusterState,
        full: bool,
        errors: &mut Vec<String>,
    ) -> anyhow::Result<()> {
        let local: Vec<(Task, i64)> = st
            .tasks
            .values()
            .filter(|(t, _)| t.node_id == self.node_id)
            .cloned()
            .collect();
        // 0. The underlay guard (VXLAN from peers only; only published flows into the
        // ingress namespace), before any VXLAN device exists, and on every change.
        let guard = desired::guard_spec(st, &self.node_id);
        if self.guard_applied.as_ref() != Some(&guard) {
            match shoal_lb::guard::apply_guard(shoal_lb::Applier::global(), NODE_NS, Some(&guard))
                .await
            {
                Ok(()) => {
                    info!(peers = ?guard.peers, "underlay guard programmed");
                    self.guard_applied = Some(guard);
                    self.wrote(
                        NODE_NS,
                        Write::whole_table(shoal_lb::guard::GUARD_TABLE, "guard"),
                        errors,
                    )
                    .await;
                }
                Err(e) => {
                    crate::metrics::global().apply_error("guard");
                    errors.push(format!("underlay guard: {e}"));
                }
            }
        }
        let stopping = self.stopping.lock().expect("lock").clone();
        let rt = self.runtime.clone();
        let has_ns = move |id: &str| {
            let ns = rt.netns(id);
            shoal_netns::exists(&ns).then_some(ns)
        };
        // 0. Fast path: what changed for networks and containers already in place (tasks
        //    joining or leaving DNS answers and backends) is applied before any slower link
        //    work of this pass.
        let mut known: HashSet<String> = self.lb_applied.keys().cloned().collect();
        if self.marks_applied.is_some()
            && let Some(ing) = desired::ingress_network(st)
        {
            known.insert(ing.id.clone());
        }
        self.sync_lb(st, &known, true, full, errors).await;
        if self.marks_applied.is_some() {
            self.sync_publish(st, true, errors).await;
        }
        self.clean_lost(st, errors).await;
        self.sync_dns(st, &local, &stopping, &known, false, errors)
            .await;
        // 1. Namespaces for new tasks.
        for (t, _) in &local {
            if t.desired_state == TaskState::Running
                && !self.started.contains(&t.id)
                && let Err(e) = self.runtime.prepare(&t.id).await
            {
                errors.push(format!("task {}: {e:#}", t.name()));
            }
        }
        // 2. Overlay networks and endpoints.
        let specs = desired::mesh_specs(
            st,
            &self.node_id,
            &self.cfg.netns_prefix,
            self.underlay.as_ref(),
            &has_ns,
        );
        let mut ok_networks = HashSet::new();
        for (net_id, spec) in &specs {
            match shoal_mesh::apply_network(spec).await {
                Ok(applied) => {
                    if !applied.is_empty() {
                        if self.mesh_applied.get(net_id) == Some(spec) {
                            warn!(netns = %spec.netns, created = ?applied.created, removed = ?applied.removed, "kernel drift: overlay objects changed by someone else; put back");
                            crate::metrics::global().drift_repaired("mesh");
                        } else {
                            info!(netns = %spec.netns, created = ?applied.created, removed = ?applied.removed, "overlay endpoints changed");
                        }
                    }
                    self.mesh_applied.insert(net_id.clone(), spec.clone());
                    ok_networks.insert(net_id.clone());
                }
                Err(e) => {
                    crate::metrics::global().apply_error("mesh");
                    self.mesh_applied.remove(net_id);
                    errors.push(format!("network {}: {e}", spec.netns));
                }
            }
        }
        let wanted_ns: HashSet<&str> = specs.values().map(|s| s.netns.as_str()).collect();
        let net_prefix = format!("{}n-", self.cfg.netns_prefix);
        for ns in shoal_netns::list().unwrap_or_default() {
            if ns.starts_with(&net_prefix) && !wanted_ns.contains(ns.as_str()) {
                info!(netns = %ns, "removing overlay network namespace no longer used on this node");
                self.lb.forget(&ns);
                self.drift.forget_ns(&ns);
                if let Err(e) = shoal_mesh::remove_network(&ns).await {
                    errors.push(format!("removing {ns}: {e}"));
                }
            }
        }
        self.lb_applied.retain(|id, _| specs.contains_key(id));
        self.mesh_applied.retain(|id, _| specs.contains_key(id));
        // 2b. Ingress plumbing and published ports.
        let ingress_ok = desired::ingress_network(st).is_some_and(|n| ok_networks.contains(&n.id));
        match desired::ingress_spec(
            st,
            &self.node_id,
            &self.cfg.netns_prefix,
            self.underlay.as_ref(),
            &has_ns,
        ) {
            Some(spec) if ingress_ok => match shoal_mesh::ingress::apply_ingress(&spec).await {
                Ok(applied) => {
                    if !applied.is_empty() && self.ingress_applied.as_ref() == Some(&spec) {
                        warn!(netns = %spec.netns, created = ?applied.created, removed = ?applied.removed, "kernel drift: ingress plumbing changed by someone else; put back");
                        crate::metrics::global().drift_repaired("mesh");
                    }
                    self.ingress_applied = Some(spec.clone());
                    let marks = desired::ingress_marks(st, &self.node_id);
                    if self.marks_applied.as_ref() != Some(&marks) {
                        match shoal_lb::publish::apply_marks(
                            shoal_lb::Applier::global(),
                            &spec.netns,
                            shoal_mesh::VXLAN_IFNAME,
                            &marks,
                        )
                        .await
                        {
                            Ok(()) => {
                                self.marks_applied = Some(marks);
                                self.wrote(
                                    &spec.netns,
                                    Write::whole_table(shoal_lb::publish::MARK_TABLE, "marks"),
                                    errors,
                                )
                                .await;
                            }
                            Err(e) => {
                                crate::metrics::global().apply_error("marks");
                                errors.push(format!("node marks of {}: {e}", spec.netns));
                            }
                        }
                    }
                    if self.marks_applied.is_some() {
                        self.sync_publish(st, false, errors).await;
                    }
                }
                Err(e) => {
                    crate::metrics::global().apply_error("mesh");
                    self.ingress_applied = None;
                    errors.push(format!("ingress plumbing: {e}"));
                }
            },
            Some(_) => {}
            None => self.unpublish(errors).await,
        }
        // 3. VIP rulesets, applied when they changed.
        self.sync_lb(st, &ok_networks, false, full, errors).await;
        self.clean_lost(st, errors).await;
        // 4. DNS views of local containers, new ones attached.
        self.sync_dns(st, &local, &stopping, &ok_networks, true, errors)
            .await;
        // 5. Start processes of attached tasks.
        for (t, _) in &local {
            if t.desired_state != TaskState::Running
                || self.started.contains(&t.id)
                || !self.dns_views.contains_key(&t.id)
            {
                continue;
            }
            let Some(svc) = st.service_by_id(&t.service_id) else {
                continue;
            };
            let spec = self.task_spec(t, svc);
            match self.runtime.start(&spec).await {
                Ok(pid) => {
                    info!(task = %t.name(), pid, "task started");
                    self.started.insert(t.id.clone());
                    self.reports.add(&t.id, Report::Running);
                }
                Err(e) => {
                    errors.push(format!("task {}: {e:#}", t.name()));
                    self.reports
                        .add(&t.id, Report::StartFailed(format!("{e:#}")));
                }
            }
        }
        // Written with retries; what the store refuses now stays for the next pass.
        errors.extend(self.reports.flush(&self.cluster).await);
        // 5b. Health checkers for started tasks of services with a health check.
        let tasks_dir = self.cfg.state_dir.join("tasks");
        for (t, _) in &local {
            let check = st
                .service_by_id(&t.service_id)
                .and_then(|s| s.health.clone());
            let wanted = t.desired_state == TaskState::Running && self.started.contains(&t.id);
            match (wanted, check, self.health.contains_key(&t.id)) {
                (true, Some(check), false) => {
                    let (resolv_conf, _) =
                        crate::runtime::ProcessRuntime::task_files(&tasks_dir, &t.id);
                    let probe = crate::health::Probe {
                        task_id: t.id.clone(),
                        task_name: t.name(),
                        netns: self.runtime.netns(&t.id),
                        resolv_conf,
                        hostname: t.hostname(),
                    };
                    let h = crate::health::spawn(self.cluster.clone(), probe, check, t.health);
                    self.health.insert(t.id.clone(), h);
                }
                (false, _, true) => {
                    if let Some(h) = self.health.remove(&t.id) {
                        h.abort();
                    }
                }
                _ => {}
            }
        }
        self.dns_reattach.retain(|id| st.tasks.contains_key(id));
        self.health.retain(|id, h| {
            let keep = st.tasks.contains_key(id);
            if !keep {
                h.abort();
            }
            keep
        });
        // 6. Stop tasks that should not run: out of DNS and backends already (they are not
        //    serving); after the grace period, stop and remove, then forget the record.
        for (t, _) in &local {
            if t.desired_state == TaskState::Running || stopping.contains(&t.id) {
                continue;
            }
            self.stopping.lock().expect("lock").insert(t.id.clone());
            self.started.remove(&t.id);
            self.resolver.detach(&t.id).await;
            self.dns_views.remove(&t.id);
            let (rt, cluster, stopping, t) = (
                self.runtime.clone(),
                self.cluster.clone(),
                self.stopping.clone(),
                t.clone(),
            );
            let grace = Duration::from_secs(self.cfg.stop_grace_secs);
            let kill_after = Duration::from_secs(self.cfg.kill_timeout_secs);
            tokio::spawn(async move {
                tokio::time::sleep(grace).await;
                if let Err(e) = rt.destroy(&t.id, kill_after).await {
                    warn!(task = %t.name(), error = %e, "destroying task failed");
                } else if let Err(e) = cluster.delete_task(&t).await {
                    warn!(task = %t.name(), error = %e, "deleting task record failed");
                } else {
                    info!(task = %t.name(), "task removed");
                }
                stopping.lock().expect("lock").remove(&t.id);
            });
        }
        // 7. Garbage: task files/namespaces of tasks the cluster no longer has.
        //    Destroyed in the background (a process may take kill_timeout_secs to die): N
        //    stale tasks must not hold up this pass's DNS and LB work by N x that.
        for id in self.runtime.list() {
            if !st.tasks.contains_key(&id) && self.stopping.lock().expect("lock").insert(id.clone())
            {
                self.resolver.detach(&id).await;
                self.dns_views.remove(&id);
                self.started.remove(&id);
                let (rt, stopping) = (self.runtime.clone(), self.stopping.clone());
                let kill_after = Duration::from_secs(self.cfg.kill_timeout_secs);
                tokio::spawn(async move {
                    match rt.destroy(&id, kill_after).await {
                        Ok(()) => info!(task = %id, "stale task removed"),
                        Err(e) => {
                            warn!(task = %id, error = %format!("{e:#}"), "removing stale task failed; will retry")
                        }
                    }
                    stopping.lock().expect("lock").remove(&id);
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bug 7: the node id file is made once, read back the same, and a damaged one (empty:
    /// a crash of the old plain write) is refused instead of giving the node the id "".
    #[test]
    fn node_id_is_kept_and_a_damaged_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let id = node_id(dir.path()).unwrap();
        assert_eq!(id.len(), 25);
        assert_eq!(node_id(dir.path()).unwrap(), id);
        assert!(!dir.path().join(".node_id.tmp").exists());
        for bad in ["", "  \n", "x y", &"a".repeat(65)] {
            std::fs::write(dir.path().join("node_id"), bad).unwrap();
            let e = node_id(dir.path()).unwrap_err().to_string();
            assert!(e.contains("does not hold a node id"), "{bad:?}: {e}");
        }
    }
}
