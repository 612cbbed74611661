//! `shoal agent`: registers the node, serves the API, orchestrates services into tasks (on
//! the leader) and reconciles this node's kernel state with the cluster model.
//!
//! The reconciler is level-triggered: every pass compares the whole desired state with what
//! it has applied, so a failed step is simply retried on the next pass (a change in the
//! store, a task exit, or the periodic tick).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{mpsc, watch};
use tracing::{Instrument, info, info_span, warn};

use crate::config::{AgentConfig, StoreKind};
use shoal_api::model::{Node, NodeStatus, TaskState};
use shoal_control::cluster::{Cluster, encode};
use shoal_control::liveness::Liveness;
use shoal_control::state::{ClusterState, spawn_cache};
use shoal_control::store::Store;
use shoal_node::appliers::{Appliers, Vips};
use shoal_node::dataplanes::{
    Conntrack, Dns, Guard, Ingress, IpvsVips, KernelConntrack, LostFlows, NftVips, Overlays,
    Publish, Tasks, WireGuard,
};
use shoal_node::desired;
use shoal_node::drift::DriftWatch;
use shoal_node::plan::{NodeFacts, NodePlan};
use shoal_node::podman::NodeRuntime;
use shoal_node::reconcile::{self, PassCx};
use shoal_node::report::NodeReport;
use shoal_node::runtime::{Exited, ProcessRuntime, Runtime};

/// How often the drift canary reads the nf_tables generations of our namespaces (one
/// netlink round trip each): a flushed table is back within about this long.
const DRIFT_CANARY: Duration = Duration::from_secs(1);

pub struct Agent {
    cfg: AgentConfig,
    pub node_id: String,
    pub cluster: Cluster,
    search: Vec<String>,
    pub report: Arc<Mutex<NodeReport>>,
    liveness: Arc<Liveness>,
    underlay: Option<desired::Underlay>,
    /// Our node record as last written (its `listening` list is kept current).
    node: Node,
    /// Where our nft tables are, to notice someone else changing them.
    drift: DriftWatch,
    /// Tables found changed by someone else, until they are written again: (netns, table)
    /// -> (dataplane, confirmed by read-back).
    drift_pending: HashMap<(String, &'static str), (&'static str, bool)>,
    /// One applier per dataplane, each with what it applied.
    appliers: Appliers,
    /// The node's WireGuard key and port (None: `[wireguard] port = 0`).
    wg: Option<desired::WgFacts>,
    /// Key rotations asked through the API.
    rotate_rx: mpsc::UnboundedReceiver<crate::server::RotateRequest>,
}

/// Where the node's WireGuard private key lives.
fn wg_key_path(state_dir: &Path) -> std::path::PathBuf {
    state_dir.join("wireguard").join("private.key")
}

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
                shoal_control::store::embedded::EmbeddedStore::open(&dir)
                    .with_context(|| format!("opening the embedded store in {}", dir.display()))?,
            )
        }
        StoreKind::Etcd => {
            let tls = match &cfg.store.tls {
                Some(t) => Some(etcd_tls(t)?),
                None => None,
            };
            Arc::new(
                shoal_control::store::etcd::EtcdStore::connect_tls(
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
    let id = shoal_api::model::new_id();
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
    let peer_token = match cluster.peer_token().await {
        Ok(t) => Some(t),
        Err(e) => {
            warn!(error = %e, "no peer token: logs of other nodes' tasks will not be served");
            None
        }
    };
    let peer_addr = cfg
        .advertise_addr
        .filter(|_| cfg.peer_port != 0 && peer_token.is_some())
        .map(|ip| std::net::SocketAddr::from((ip, cfg.peer_port)));
    // The node's WireGuard key pair: made here on first start, kept in the state directory
    // (0600); only the public key goes into the node record.
    let wg = match cfg.wireguard.port {
        0 => None,
        port => {
            let path = wg_key_path(&cfg.state_dir);
            let (private_key, made) = shoal_wg::keys::load_or_create(&path)
                .with_context(|| format!("the WireGuard key in {}", path.display()))?;
            if made {
                info!(path = %path.display(), public_key = %private_key.public(), "made the node's WireGuard key pair");
            }
            Some(desired::WgFacts {
                private_key,
                port,
                backend: cfg.wireguard.backend.to_wg(),
            })
        }
    };
    let node = Node {
        id: node_id.clone(),
        name: cfg.node_name.clone(),
        addr: cfg.advertise_addr,
        status: NodeStatus::Ready,
        version: env!("CARGO_PKG_VERSION").to_string(),
        listening: shoal_node::listening::listening(),
        peer_port: peer_addr.map(|a| a.port()),
        wireguard: wg.as_ref().map(|w| shoal_api::model::NodeWireguard {
            public_key: w.private_key.public().to_base64(),
            port: w.port,
        }),
    };
    store
        .put(&shoal_control::keys::node(&node_id), encode(&node))
        .await
        .context("registering the node")?;
    // The ingress network comes with the cluster: the first agent creates it.
    if let Err(e) = cluster.ensure_ingress().await {
        warn!(error = %e, "ingress network not available; published ports will not work");
    }

    let (resolver, search) = resolver_of(&cfg);
    let (exit_tx, exit_rx) = mpsc::unbounded_channel();
    let podman = cfg.runtime.podman();
    info!(podman = ?podman, "container runtime");
    let runtime: Arc<dyn Runtime> = NodeRuntime::new(
        ProcessRuntime::new(&cfg.netns_prefix, &cfg.state_dir.join("tasks"), exit_tx)?,
        podman,
    );

    let report = Arc::new(Mutex::new(NodeReport::default()));
    let (rotate_tx, rotate_rx) = mpsc::unbounded_channel();
    let state_rx = spawn_cache(store.clone());
    // When each revision arrives (the metrics' lag of a pass behind the watch).
    let mut seen_rx = state_rx.clone();
    tokio::spawn(async move {
        while seen_rx.changed().await.is_ok() {
            let revision = seen_rx.borrow_and_update().revision;
            shoal_node::metrics::global().revision_seen(revision);
        }
    });
    let api = crate::server::serve(
        &cfg.socket,
        crate::server::ApiState {
            cluster: cluster.clone(),
            node_id: node_id.clone(),
            node_name: cfg.node_name.clone(),
            report: report.clone(),
            runtime: runtime.clone(),
            state: state_rx.clone(),
            search: search.clone(),
            peer_token: peer_token.clone(),
            rotate: rotate_tx,
        },
    )
    .await?;
    let _peer = match (peer_addr, &peer_token) {
        (Some(addr), Some(token)) => Some(
            crate::logs::serve_peer(
                addr,
                crate::logs::PeerState {
                    node_id: node_id.clone(),
                    token: token.clone(),
                    runtime: runtime.clone(),
                    state: state_rx.clone(),
                },
            )
            .await?,
        ),
        _ => None,
    };
    let metrics_addr = cfg.metrics_socket()?;
    let metrics = match metrics_addr {
        Some(addr) => Some(
            crate::metrics_http::serve(
                addr,
                shoal_node::metrics::MetricsSources {
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

    let vips = match cfg.lb.dataplane {
        crate::config::Dataplane::Ipvs => Vips::Ipvs(IpvsVips::new(cfg.lb.ipvs_options())),
        crate::config::Dataplane::Nftables => Vips::Nft(NftVips::default()),
    };
    let conntrack: Arc<dyn Conntrack> = Arc::new(KernelConntrack);
    let tasks = Tasks::new(
        runtime,
        cluster.clone(),
        Duration::from_secs(cfg.stop_grace_secs),
        Duration::from_secs(cfg.kill_timeout_secs),
    );
    let mut agent = Agent {
        appliers: Appliers {
            guard: Guard::default(),
            wireguard: WireGuard::default(),
            overlays: Overlays::default(),
            ingress: Ingress::default(),
            publish: Publish::new(conntrack.clone()),
            vips,
            lost: LostFlows::new(&node_id, conntrack),
            dns: Dns::new(resolver),
            tasks,
            cni: shoal_node::cni::CniConfigs::new(cfg.cni.paths(&cfg.socket)),
        },
        cfg,
        node_id,
        cluster,
        search,
        report,
        liveness,
        underlay,
        node: node.clone(),
        drift: DriftWatch::new(shoal_lb::Applier::global().clone()),
        drift_pending: HashMap::new(),
        wg,
        rotate_rx,
    };

    // The orchestrator runs beside the node reconciler, so that the leader's decisions never
    // wait for its own node's kernel work.
    tokio::spawn(
        shoal_control::orchestrator::Orchestrator::new(
            agent.cluster.clone(),
            agent.liveness.clone(),
            Duration::from_secs(agent.cfg.restart_delay_secs),
        )
        .run(state_rx.clone()),
    );
    agent.serve(state_rx, exit_rx).await?;
    api.abort();
    if let Some(m) = metrics {
        m.abort();
    }
    let _ = std::fs::remove_file(&agent.cfg.socket);
    info!("agent stopped; tasks and kernel state are left for the next start to adopt");
    Ok(())
}

/// The embedded resolver and the search domains of task resolv.conf files: from the config,
/// else from the host's /etc/resolv.conf.
fn resolver_of(cfg: &AgentConfig) -> (shoal_dns::Resolver, Vec<String>) {
    let host = || std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let upstreams = match &cfg.dns.upstreams {
        Some(u) => u.clone(),
        None => shoal_dns::nameservers_from_resolv_conf(&host()),
    };
    let search = match &cfg.dns.search {
        Some(s) => s.clone(),
        None => search_from_resolv_conf(&host()),
    };
    let resolver = shoal_dns::Resolver::new(shoal_dns::DnsConfig {
        ttl: cfg.dns.ttl,
        negative_ttl: cfg.dns.negative_ttl,
        upstreams,
        ..Default::default()
    });
    (resolver, search)
}

fn search_from_resolv_conf(text: &str) -> Vec<String> {
    text.lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("search"))
        .map(|s| s.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

impl Agent {
    /// The event loop: a pass on every store change, task exit, moved nf_tables generation
    /// (the drift canary) and full-pass tick, until SIGINT or SIGTERM.
    async fn serve(
        &mut self,
        mut state_rx: watch::Receiver<Arc<ClusterState>>,
        mut exit_rx: mpsc::UnboundedReceiver<Exited>,
    ) -> anyhow::Result<()> {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut first = true;
        let resync = self.cfg.resync_period();
        // A full pass (every table of ours read back, IPVS diffed against the kernel) at least
        // once per resync period, however busy the watch is; in between, the cheap drift canary
        // (one nf_tables generation read per namespace) every DRIFT_CANARY.
        let mut next_full = tokio::time::Instant::now() + resync;
        let mut canary = tokio::time::interval(DRIFT_CANARY);
        canary.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Periodic key rotation (`[wireguard] rotate_secs`; 0: off).
        let rotate_every =
            Some(Duration::from_secs(self.cfg.wireguard.rotate_secs)).filter(|d| !d.is_zero());
        let mut next_rotation = rotate_every.map(|d| tokio::time::Instant::now() + d);
        loop {
            tokio::select! {
                r = state_rx.changed() => { if r.is_err() { break; } }
                Some(ex) = exit_rx.recv() => { self.on_exit(&state_rx, ex).await; }
                _ = tokio::time::sleep_until(next_full) => {}
                _ = canary.tick() => {
                    if !self.drift.moved().await {
                        continue;
                    }
                }
                _ = tokio::time::sleep_until(next_rotation.unwrap_or_else(tokio::time::Instant::now)), if next_rotation.is_some() => {
                    next_rotation = rotate_every.map(|d| tokio::time::Instant::now() + d);
                    if let Err(e) = self.rotate_key().await {
                        warn!(error = %e, "WireGuard key rotation failed; will retry at the next period");
                    }
                }
                Some(reply) = self.rotate_rx.recv() => {
                    let r = self.rotate_key().await.map_err(|e| format!("{e:#}"));
                    let _ = reply.send(r);
                }
                _ = tokio::signal::ctrl_c() => break,
                _ = term.recv() => break,
            }
            let st = state_rx.borrow_and_update().clone();
            if !st.synced {
                continue;
            }
            if first {
                self.appliers.tasks.adopt(&st, &self.node_id);
                first = false;
            }
            let started = std::time::Instant::now();
            let full = tokio::time::Instant::now() >= next_full;
            if full {
                next_full = tokio::time::Instant::now() + resync;
            }
            self.pass(&st, full)
                .instrument(info_span!("sync", revision = st.revision, full))
                .await;
            let failed = !self.report.lock().expect("lock").last_pass_ok;
            shoal_node::metrics::global().pass_done(st.revision, started.elapsed(), failed);
        }
        Ok(())
    }

    /// A new WireGuard key pair: written to the state directory first (a crash after this
    /// starts with the new key), then published in the node record; the next pass sets it
    /// on the device, and each peer, seeing the new public key, replaces our peer entry and
    /// greets us with a handshake. Open flows see a gap of about one pass, not a reset.
    async fn rotate_key(&mut self) -> anyhow::Result<String> {
        let Some(wg) = &mut self.wg else {
            anyhow::bail!("WireGuard is off on this node ([wireguard] port = 0)");
        };
        let (key, old) = (shoal_wg::Key::generate(), wg.private_key);
        let path = wg_key_path(&self.cfg.state_dir);
        shoal_wg::keys::store(&path, &key)?;
        let public = key.public().to_base64();
        let mut node = self.node.clone();
        node.wireguard = Some(shoal_api::model::NodeWireguard {
            public_key: public.clone(),
            port: wg.port,
        });
        if let Err(e) = self.cluster.put_node(&node).await {
            // The peers would never learn the new key: keep the old one.
            shoal_wg::keys::store(&path, &old)?;
            return Err(e).context("publishing the new public key (the old key stays)");
        }
        wg.private_key = key;
        self.node = node;
        info!(public_key = %public, "WireGuard key rotated");
        Ok(public)
    }

    /// A process exited: reported (retried until written; see reports.rs).
    async fn on_exit(&mut self, state_rx: &watch::Receiver<Arc<ClusterState>>, ex: Exited) {
        let st = state_rx.borrow().clone();
        if let Some((t, _)) = st.tasks.get(&ex.task_id)
            && t.desired_state == TaskState::Running
        {
            warn!(task = %t.name(), status = %ex.status, "task exited");
        }
        self.appliers
            .tasks
            .exited(&ex.task_id, ex.status.to_string())
            .await;
    }

    /// One reconcile pass: drift found since the last is handed to its appliers, the plan
    /// is computed whole and every applier brings its dataplane to it.
    async fn pass(&mut self, st: &ClusterState, full: bool) {
        // Liveness as this agent may act on it (see liveness.rs: after a store outage the
        // last trusted picture is kept until the nodes have had time to re-register).
        let st = &*self.liveness.adjust(st);
        let drifted = self.drift.check(full).await;
        let stopping = self.appliers.tasks.stopping();
        let rt = self.appliers.tasks.runtime().clone();
        let (node_id, prefix) = (self.node_id.as_str(), self.cfg.netns_prefix.as_str());
        let (underlay, search) = (self.underlay.as_ref(), self.search.as_slice());
        let wg = self.wg.as_ref();
        // The plan from the node as it is now: which local task namespaces exist is looked
        // up once per plan (the plan asks for each task several times).
        let plan_of = || {
            let present: HashMap<String, String> = desired::local_tasks(st, node_id)
                .filter_map(|t| match desired::cni_of(st, t) {
                    // Another runtime's namespace, given by path (CNI).
                    Some(c) => shoal_netns::exists_at(std::path::Path::new(&c.netns))
                        .then(|| (t.id.clone(), c.netns.clone())),
                    None => {
                        let ns = rt.netns(&t.id);
                        shoal_netns::exists(&ns).then(|| (t.id.clone(), ns))
                    }
                })
                .collect();
            let task_netns = move |id: &str| present.get(id).cloned();
            NodePlan::compute(
                st,
                &NodeFacts {
                    node_id,
                    netns_prefix: prefix,
                    underlay,
                    search,
                    task_netns: &task_netns,
                    stopping: &stopping,
                    wireguard: wg,
                },
            )
        };
        let mut appliers = self.appliers.in_order();
        reconcile::on_drift(&mut appliers, drifted, &mut self.drift_pending);
        let mut cx = PassCx::new(st, full, &mut self.drift, &mut self.drift_pending);
        reconcile::run_pass(&mut appliers, &mut cx, plan_of).await;
        let mut errors: Vec<String> = cx.errors.iter().map(|e| e.chain()).collect();
        drop(cx);
        // Ports in use on this node, for the publish conflict check (a /proc scan of some
        // milliseconds: on the blocking pool).
        let listening = tokio::task::spawn_blocking(shoal_node::listening::listening)
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
        self.appliers.report(&mut r);
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
