//! The node's appliers, one per dataplane, each owning what it applied. Their order in a
//! pass (see [`crate::appliers::Appliers`]): guard, WireGuard, overlays, ingress, published ports, VIPs, lost
//! flows, DNS, tasks.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::{debug, info, warn};

use crate::desired::{self, View};
use crate::drift::{Check, Drifted, Write};
use crate::names::NODE_NS;
use crate::plan::{NodePlan, VipPlan};
use crate::reconcile::{Dataplane, PassCx, Phase};
use crate::report::{NodeReport, ProgrammedPort, ProgrammedVip};
use crate::runtime::Runtime;
use shoal_control::cluster::Cluster;
use shoal_control::reports::{Adoption, Pending, Report};
use shoal_control::state::ClusterState;

fn applier() -> &'static shoal_lb::Applier {
    shoal_lb::Applier::global()
}

/// The appliers' conntrack clean-ups. Each one dumps a whole conntrack table over
/// ctnetlink, which blocks for as long as the table is large, so the appliers call it on
/// tokio's blocking pool, never on a runtime worker (bug 6 of issue 15). A trait so that a
/// unit test can see which thread it runs on.
pub trait Conntrack: Send + Sync + 'static {
    /// Deletes every NATed flow in `netns` whose target is one of `targets`.
    fn delete_nated_to(
        &self,
        netns: &str,
        targets: &BTreeSet<Ipv4Addr>,
    ) -> Result<usize, shoal_lb::conntrack::CtError>;
    /// Deletes the node namespace's flows to NAT targets that `now` no longer publishes.
    fn clean_published(
        &self,
        before: &shoal_lb::publish::PublishSpec,
        now: &shoal_lb::publish::PublishSpec,
    ) -> Result<usize, shoal_lb::LbError>;
}

/// The kernel's conntrack tables (`shoal_lb::conntrack`).
pub struct KernelConntrack;

impl Conntrack for KernelConntrack {
    fn delete_nated_to(
        &self,
        netns: &str,
        targets: &BTreeSet<Ipv4Addr>,
    ) -> Result<usize, shoal_lb::conntrack::CtError> {
        shoal_lb::conntrack::delete_nated_to(netns, targets)
    }
    fn clean_published(
        &self,
        before: &shoal_lb::publish::PublishSpec,
        now: &shoal_lb::publish::PublishSpec,
    ) -> Result<usize, shoal_lb::LbError> {
        let local = crate::listening::local_ips();
        let is_local = |ip: Ipv4Addr| ip.is_loopback() || local.contains(&std::net::IpAddr::V4(ip));
        shoal_lb::publish::clean_conntrack(NODE_NS, before, now, &is_local)
    }
}

/// The underlay guard in the node namespace (VXLAN from peers only; only published flows
/// into the ingress namespace): first of all, before any VXLAN device exists.
#[derive(Default)]
pub struct Guard {
    applied: Option<shoal_lb::guard::GuardSpec>,
}

#[async_trait::async_trait]
impl Dataplane for Guard {
    async fn apply(&mut self, plan: &NodePlan, phase: Phase, cx: &mut PassCx<'_>) {
        if phase != Phase::Fast || self.applied.as_ref() == Some(&plan.guard) {
            return;
        }
        match shoal_lb::guard::apply_guard(applier(), NODE_NS, Some(&plan.guard)).await {
            Ok(()) => {
                info!(peers = ?plan.guard.peers, "underlay guard programmed");
                self.applied = Some(plan.guard.clone());
                cx.wrote(
                    NODE_NS,
                    Write::whole_table(shoal_lb::guard::GUARD_TABLE, "guard"),
                )
                .await;
            }
            Err(e) => cx.fail("guard", "underlay guard", e),
        }
    }

    fn forget(&mut self, d: &Drifted) -> bool {
        let mine = d.dataplane == "guard";
        if mine {
            self.applied = None;
        }
        mine
    }
}

/// The node's WireGuard device (encrypted networks): made while the cluster has an
/// encrypted network, its peers the other live nodes, re-applied when they change (and on
/// full passes, which also put back its routes and rule); stopped, and its routing
/// removed, when no encrypted network is left. A device that cannot be made (no TUN, its
/// port in use) is reported (`node inspect`, `/metrics`) and tried again every pass; the
/// guard keeps encrypted networks' traffic from leaving in the clear meanwhile, and plain
/// networks are not affected.
#[derive(Default)]
pub struct WireGuard {
    dev: Option<shoal_wg::Device>,
    error: Option<String>,
    peers: Vec<shoal_wg::PeerStatus>,
    /// The spec last planned (for the report).
    last: Option<shoal_wg::DeviceSpec>,
    /// Routing of ours may be in the kernel.
    routing: bool,
    /// After a failed creation, the next try (or the next full pass).
    retry_at: Option<std::time::Instant>,
}

impl WireGuard {
    /// The device failed: the report keeps the error (with its causes) until it works.
    fn failed(&mut self, cx: &mut PassCx<'_>, e: shoal_wg::WgError) {
        let err = crate::reconcile::ApplyError::new("wireguard", "WireGuard device", e);
        self.error = Some(err.chain());
        cx.errors.push(err);
    }
}

/// How long a WireGuard device that could not be made waits before the next try.
const WG_RETRY: Duration = Duration::from_secs(5);

#[async_trait::async_trait]
impl Dataplane for WireGuard {
    async fn apply(&mut self, plan: &NodePlan, phase: Phase, cx: &mut PassCx<'_>) {
        if phase != Phase::Main {
            return;
        }
        let m = crate::metrics::global();
        let Some(spec) = &plan.wireguard else {
            if let Some(d) = self.dev.take() {
                d.stop().await;
                info!("WireGuard device stopped: no encrypted network left");
            }
            if self.routing {
                match shoal_wg::device::remove_routing().await {
                    Ok(()) => self.routing = false,
                    Err(e) => cx.fail("wireguard", "removing the WireGuard routing", e),
                }
            }
            self.error = None;
            self.last = None;
            self.peers.clear();
            for g in [&m.wg_wanted, &m.wg_up, &m.wg_peers, &m.wg_peers_handshaken] {
                g.store(0, std::sync::atomic::Ordering::Relaxed);
            }
            return;
        };
        self.last = Some(spec.clone());
        if let Some(d) = &mut self.dev
            && (d.applied() != spec || cx.full)
        {
            match d.apply(spec).await {
                Ok(_) => self.error = None,
                Err(e) => {
                    if matches!(e, shoal_wg::WgError::Gone(_))
                        && let Some(d) = self.dev.take()
                    {
                        d.stop().await;
                    }
                    self.failed(cx, e);
                }
            }
        }
        let due = cx.full || self.retry_at.is_none_or(|t| std::time::Instant::now() >= t);
        if self.dev.is_none() && due {
            self.routing = true;
            match shoal_wg::Device::create(spec).await {
                Ok(d) => {
                    self.dev = Some(d);
                    self.error = None;
                    self.retry_at = None;
                }
                Err(e) => {
                    self.retry_at = Some(std::time::Instant::now() + WG_RETRY);
                    self.failed(cx, e);
                }
            }
        }
        self.peers = match &self.dev {
            Some(d) => d.peers().await,
            None => vec![],
        };
        use std::sync::atomic::Ordering::Relaxed;
        m.wg_wanted.store(1, Relaxed);
        m.wg_up.store(u64::from(self.dev.is_some()), Relaxed);
        m.wg_peers.store(self.peers.len() as u64, Relaxed);
        m.wg_peers_handshaken.store(
            self.peers
                .iter()
                .filter(|p| {
                    p.last_handshake
                        .is_some_and(|h| h < Duration::from_secs(180))
                })
                .count() as u64,
            Relaxed,
        );
    }

    fn report(&self, r: &mut NodeReport) {
        r.wireguard = self
            .last
            .as_ref()
            .map(|spec| crate::report::WireguardReport {
                backend: self.dev.as_ref().map_or("none", |d| d.backend()).into(),
                interface: spec.ifname.clone(),
                port: spec.port,
                public_key: spec.private_key.public().to_base64(),
                up: self.dev.is_some(),
                error: self.error.clone(),
                peers: self
                    .peers
                    .iter()
                    .map(|p| crate::report::WireguardPeer {
                        public_key: p.public_key.to_base64(),
                        endpoint: p.endpoint.map(|e| e.to_string()),
                        last_handshake_secs: p.last_handshake.map(|d| d.as_secs()),
                        rx_bytes: p.rx_bytes,
                        tx_bytes: p.tx_bytes,
                    })
                    .collect(),
            });
    }
}

/// Overlay networks: namespace, bridge, VXLAN and task endpoints, diffed against the kernel
/// every pass; namespaces of networks no longer used here are removed.
#[derive(Default)]
pub struct Overlays {
    /// As last applied, to tell a repair (the kernel diff changed something though the spec
    /// did not) from a change.
    applied: HashMap<String, shoal_mesh::NetworkSpec>,
}

#[async_trait::async_trait]
impl Dataplane for Overlays {
    async fn apply(&mut self, plan: &NodePlan, phase: Phase, cx: &mut PassCx<'_>) {
        if phase != Phase::Main {
            return;
        }
        for (net_id, spec) in &plan.overlays {
            match shoal_mesh::apply_network(spec).await {
                Ok(applied) => {
                    if !applied.is_empty() {
                        if self.applied.get(net_id) == Some(spec) {
                            warn!(netns = %spec.netns, created = ?applied.created, removed = ?applied.removed, "kernel drift: overlay objects changed by someone else; put back");
                            crate::metrics::global().drift_repaired("mesh");
                        } else {
                            info!(netns = %spec.netns, created = ?applied.created, removed = ?applied.removed, "overlay endpoints changed");
                        }
                    }
                    self.applied.insert(net_id.clone(), spec.clone());
                    cx.ok_networks.insert(net_id.clone());
                }
                Err(e) => {
                    self.applied.remove(net_id);
                    cx.fail("mesh", format!("network {}", spec.netns), e);
                }
            }
        }
        self.applied.retain(|id, _| plan.overlays.contains_key(id));
        let wanted: HashSet<&str> = plan.overlays.values().map(|s| s.netns.as_str()).collect();
        let all = match shoal_netns::list() {
            Ok(all) => all,
            Err(e) => {
                cx.fail("mesh", "listing network namespaces", e);
                return;
            }
        };
        for ns in all {
            if ns.starts_with(&plan.overlay_ns_prefix) && !wanted.contains(ns.as_str()) {
                info!(netns = %ns, "removing overlay network namespace no longer used on this node");
                cx.drift.forget_ns(&ns);
                if let Err(e) = shoal_mesh::remove_network(&ns).await {
                    cx.fail("mesh", format!("removing {ns}"), e);
                }
                cx.removed_ns.push(ns);
            }
        }
    }
}

/// The ingress plumbing (link to the node namespace, return paths, task source routes) and
/// the node marks in the ingress namespace; removed when nothing is published.
#[derive(Default)]
pub struct Ingress {
    applied: Option<shoal_mesh::ingress::IngressSpec>,
    marks: Option<BTreeMap<[u8; 6], u32>>,
    /// The node namespace is known to hold no ingress link of ours.
    clean: bool,
}

#[async_trait::async_trait]
impl Dataplane for Ingress {
    async fn apply(&mut self, plan: &NodePlan, phase: Phase, cx: &mut PassCx<'_>) {
        if phase != Phase::Main {
            return;
        }
        let Some(ing) = &plan.ingress else {
            if self.clean {
                return;
            }
            match shoal_mesh::ingress::remove_ingress_link(None).await {
                Ok(_) => {
                    self.applied = None;
                    self.marks = None;
                    self.clean = true;
                }
                Err(e) => cx.fail("mesh", "removing the ingress link", e),
            }
            return;
        };
        if !cx.ok_networks.contains(&ing.network_id) {
            return;
        }
        self.clean = false;
        match shoal_mesh::ingress::apply_ingress(&ing.spec).await {
            Ok(applied) => {
                if !applied.is_empty() && self.applied.as_ref() == Some(&ing.spec) {
                    warn!(netns = %ing.spec.netns, created = ?applied.created, removed = ?applied.removed, "kernel drift: ingress plumbing changed by someone else; put back");
                    crate::metrics::global().drift_repaired("mesh");
                }
                self.applied = Some(ing.spec.clone());
            }
            Err(e) => {
                self.applied = None;
                cx.fail("mesh", "ingress plumbing", e);
                return;
            }
        }
        if self.marks.as_ref() != Some(&ing.marks) {
            let netns = &ing.spec.netns;
            match shoal_lb::publish::apply_marks(
                applier(),
                netns,
                shoal_mesh::VXLAN_IFNAME,
                &ing.marks,
            )
            .await
            {
                Ok(()) => {
                    self.marks = Some(ing.marks.clone());
                    cx.wrote(
                        netns,
                        Write::whole_table(shoal_lb::publish::MARK_TABLE, "marks"),
                    )
                    .await;
                }
                Err(e) => cx.fail("marks", format!("node marks of {netns}"), e),
            }
        }
        cx.ingress_ready = self.marks.is_some();
    }

    fn forget(&mut self, d: &Drifted) -> bool {
        let mine = d.dataplane == "marks";
        if mine {
            self.marks = None;
        }
        mine
    }
}

/// Published ports in the node namespace, and the UDP conntrack entries that would keep
/// sending to old NAT targets.
pub struct Publish {
    /// None: not programmed yet in this process, or removed.
    applied: Option<shoal_lb::publish::PublishSpec>,
    /// The node namespace is known to hold no published-port table of ours.
    clean: bool,
    conntrack: Arc<dyn Conntrack>,
}

impl Publish {
    pub fn new(conntrack: Arc<dyn Conntrack>) -> Publish {
        Publish {
            applied: None,
            clean: false,
            conntrack,
        }
    }

    async fn program(&mut self, spec: shoal_lb::publish::PublishSpec, cx: &mut PassCx<'_>) {
        if self.applied.as_ref() == Some(&spec) {
            return;
        }
        let started = std::time::Instant::now();
        let res = shoal_lb::publish::apply_publish(applier(), NODE_NS, Some(&spec)).await;
        crate::metrics::global().lb_sync("publish", res.is_ok(), started.elapsed());
        if let Err(e) = res {
            self.applied = None;
            cx.fail("publish", "published ports", e);
            return;
        }
        info!(ports = spec.ports.len(), "published ports programmed");
        self.clean = false;
        let before = self
            .applied
            .take()
            .unwrap_or(shoal_lb::publish::PublishSpec {
                ports: vec![],
                ..spec.clone()
            });
        // A ctnetlink dump: on the blocking pool, not on a runtime worker.
        let now = spec.clone();
        let ct = self.conntrack.clone();
        let res = tokio::task::spawn_blocking(move || ct.clean_published(&before, &now)).await;
        match res {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => cx.fail("publish", "published ports: conntrack clean-up", e),
            Err(e) => cx.fail("publish", "published ports: conntrack clean-up", e),
        }
        let removed = spec.ports.is_empty();
        self.applied = Some(spec);
        cx.wrote(
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
        )
        .await;
    }
}

#[async_trait::async_trait]
impl Dataplane for Publish {
    async fn apply(&mut self, plan: &NodePlan, phase: Phase, cx: &mut PassCx<'_>) {
        match (phase, &plan.ingress) {
            // Backends and ports only leave: new ones wait for the routes to them.
            (Phase::Fast, Some(ing)) => {
                if let Some(old) = &self.applied {
                    let spec = desired::publish_removals_only(&ing.publish, old);
                    self.program(spec, cx).await;
                }
            }
            (Phase::Main, Some(ing)) if cx.ingress_ready => {
                self.program(ing.publish.clone(), cx).await;
            }
            (Phase::Main, None) if !self.clean => {
                match shoal_lb::publish::apply_publish(applier(), NODE_NS, None).await {
                    Ok(()) => {
                        self.applied = None;
                        self.clean = true;
                        cx.drift
                            .untrack(NODE_NS, shoal_lb::publish::PUBLISH_TABLE)
                            .await;
                    }
                    Err(e) => cx.fail("publish", "removing published ports", e),
                }
            }
            _ => {}
        }
        if self.applied.is_some() {
            cx.nat_namespaces.insert(NODE_NS.to_string());
        }
    }

    fn forget(&mut self, d: &Drifted) -> bool {
        let mine = d.dataplane == "publish";
        if mine {
            self.applied = None;
        }
        mine
    }

    fn report(&self, r: &mut NodeReport) {
        r.published = self
            .applied
            .iter()
            .flat_map(|spec| spec.ports.iter())
            .map(|p| ProgrammedPort {
                protocol: format!("{:?}", p.protocol).to_lowercase(),
                port: p.port,
                mode: format!("{:?}", p.kind).to_lowercase(),
                backends: p.backends.iter().map(|(a, t)| format!("{a}:{t}")).collect(),
            })
            .collect();
    }
}

/// The VIP rulesets to apply in `phase`, given what is applied: in the fast phase only
/// removals in networks already programmed (a backend with no route yet would answer its
/// first clients with "network unreachable"); in the main phase the whole ruleset of every
/// network whose overlay is in place.
fn vip_work(
    plan: &NodePlan,
    applied: &HashMap<String, VipPlan>,
    phase: Phase,
    ok_networks: &HashSet<String>,
) -> Vec<(String, VipPlan)> {
    match phase {
        Phase::Fast => applied
            .iter()
            .filter_map(|(net, old)| {
                let want = plan.vips.get(net)?;
                Some((
                    net.clone(),
                    VipPlan {
                        netns: want.netns.clone(),
                        ruleset: desired::removals_only(&want.ruleset, &old.ruleset),
                    },
                ))
            })
            .collect(),
        Phase::Prepare => vec![],
        Phase::Main => plan
            .vips
            .iter()
            .filter(|(net, _)| ok_networks.contains(*net))
            .map(|(net, v)| (net.clone(), v.clone()))
            .collect(),
    }
}

/// After a VIP phase: networks no longer here are forgotten (main phase), and the
/// namespaces holding VIP tables are where flows to a lost node get deleted.
fn vips_settled(
    applied: &mut HashMap<String, VipPlan>,
    plan: &NodePlan,
    phase: Phase,
    cx: &mut PassCx<'_>,
) {
    if phase == Phase::Main {
        applied.retain(|id, _| plan.overlays.contains_key(id));
    }
    cx.nat_namespaces
        .extend(applied.values().map(|v| v.netns.clone()));
}

fn vip_report(applied: &HashMap<String, VipPlan>, r: &mut NodeReport) {
    r.networks = applied.keys().cloned().collect();
    r.networks.sort();
    r.vips = applied
        .iter()
        .flat_map(|(net, v)| {
            v.ruleset.services.iter().map(move |s| ProgrammedVip {
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
}

/// VIPs as nft tables (the default dataplane), synced incrementally and watched through
/// the namespace's nf_tables generation.
pub struct NftVips {
    applied: HashMap<String, VipPlan>,
    /// Programs the tables incrementally (adopting existing ones after a restart).
    syncer: shoal_lb::Syncer,
}

impl Default for NftVips {
    fn default() -> Self {
        NftVips {
            applied: HashMap::new(),
            syncer: shoal_lb::Syncer::new(applier().clone()),
        }
    }
}

#[async_trait::async_trait]
impl Dataplane for NftVips {
    async fn apply(&mut self, plan: &NodePlan, phase: Phase, cx: &mut PassCx<'_>) {
        for ns in &cx.removed_ns {
            self.syncer.forget(ns);
        }
        for (net_id, want) in vip_work(plan, &self.applied, phase, &cx.ok_networks) {
            if !shoal_netns::exists(&want.netns) {
                self.applied.remove(&net_id);
                self.syncer.forget(&want.netns);
                cx.drift.forget_ns(&want.netns);
                continue;
            }
            if self.applied.get(&net_id) == Some(&want) {
                continue;
            }
            // Read before the sync: a read-back that writes nothing records it, so a change
            // made meanwhile is seen at the next canary.
            let before = cx.drift.generation_now(&want.netns).await;
            let started = std::time::Instant::now();
            let res = self.syncer.sync(&want.netns, &want.ruleset).await;
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
                    debug!(netns = %want.netns, services = want.ruleset.services.len(), kind = ?r.kind, "VIP ruleset synced");
                    let netns = want.netns.clone();
                    self.applied.insert(net_id.clone(), want);
                    cx.wrote(
                        &netns,
                        Write {
                            table: crate::names::LB_TABLE,
                            dataplane: "lb_nft",
                            key: &net_id,
                            check: Check::Resync,
                            changed: r.kind != shoal_lb::SyncKind::Unchanged,
                            before,
                            removed: false,
                        },
                    )
                    .await;
                }
                Err(e) => {
                    self.applied.remove(&net_id);
                    cx.fail("lb_nft", format!("ruleset of {}", want.netns), e);
                }
            }
        }
        vips_settled(&mut self.applied, plan, phase, cx);
    }

    fn forget(&mut self, d: &Drifted) -> bool {
        let mine = d.dataplane == "lb_nft";
        if mine {
            self.applied.remove(&d.key);
            self.syncer.forget(&d.netns);
        }
        mine
    }

    fn report(&self, r: &mut NodeReport) {
        vip_report(&self.applied, r);
    }
}

/// VIPs as IPVS services (plus the companion nft table), diffed against the kernel's
/// table on every change and every full pass (IPVS has no generation to watch). Without
/// IPVS in the kernel: the clear NoIpvs error, on every pass.
pub struct IpvsVips {
    applied: HashMap<String, VipPlan>,
    opts: shoal_lb::ipvs::IpvsOptions,
}

impl IpvsVips {
    pub fn new(opts: shoal_lb::ipvs::IpvsOptions) -> IpvsVips {
        IpvsVips {
            applied: HashMap::new(),
            opts,
        }
    }
}

#[async_trait::async_trait]
impl Dataplane for IpvsVips {
    async fn apply(&mut self, plan: &NodePlan, phase: Phase, cx: &mut PassCx<'_>) {
        for (net_id, want) in vip_work(plan, &self.applied, phase, &cx.ok_networks) {
            if !shoal_netns::exists(&want.netns) {
                self.applied.remove(&net_id);
                cx.drift.forget_ns(&want.netns);
                continue;
            }
            let unchanged = self.applied.get(&net_id) == Some(&want);
            if unchanged && !(cx.full && phase == Phase::Main) {
                continue;
            }
            let started = std::time::Instant::now();
            let res = shoal_lb::ipvs::sync(&want.netns, &want.ruleset, &self.opts).await;
            crate::metrics::global().lb_sync("ipvs", res.is_ok(), started.elapsed());
            match res {
                Ok(ops) => {
                    debug!(netns = %want.netns, services = want.ruleset.services.len(), ipvs_ops = ops.len(), "VIP ruleset synced (IPVS)");
                    if unchanged && !ops.is_empty() {
                        warn!(netns = %want.netns, ipvs_ops = ops.len(), "kernel drift: IPVS services changed by someone else; put back");
                        crate::metrics::global().drift_repaired("lb_ipvs");
                    }
                    let netns = want.netns.clone();
                    self.applied.insert(net_id.clone(), want);
                    cx.wrote(
                        &netns,
                        Write {
                            table: shoal_lb::ipvs::COMPANION_TABLE,
                            dataplane: "lb_ipvs",
                            key: &net_id,
                            check: Check::Fingerprint,
                            changed: true,
                            before: None,
                            removed: false,
                        },
                    )
                    .await;
                }
                Err(e) => {
                    self.applied.remove(&net_id);
                    cx.fail("lb_ipvs", format!("IPVS ruleset of {}", want.netns), e);
                }
            }
        }
        vips_settled(&mut self.applied, plan, phase, cx);
    }

    fn forget(&mut self, d: &Drifted) -> bool {
        let mine = d.dataplane == "lb_ipvs";
        if mine {
            self.applied.remove(&d.key);
        }
        mine
    }

    fn report(&self, r: &mut NodeReport) {
        vip_report(&self.applied, r);
    }
}

/// Once the backends of a node that went down have left the rulesets: deletes every NATed
/// flow to them (published ports, VIPs), established ones included. Established flows to a
/// drained or scaled-down task are left to finish; a dead node answers nothing, and a
/// client reusing the source port of such a flow would be sent there again (conntrack
/// keeps an established entry for days and ignores a SYN that matches it).
pub struct LostFlows {
    node_id: String,
    /// Targets whose NATed flows have been deleted since their node went down.
    cleaned: BTreeSet<Ipv4Addr>,
    /// Task address -> its node, for [`desired::lost_targets`].
    target_nodes: BTreeMap<Ipv4Addr, String>,
    conntrack: Arc<dyn Conntrack>,
}

impl LostFlows {
    pub fn new(node_id: &str, conntrack: Arc<dyn Conntrack>) -> LostFlows {
        LostFlows {
            node_id: node_id.to_string(),
            cleaned: Default::default(),
            target_nodes: Default::default(),
            conntrack,
        }
    }

    /// The flows to `lost` are deleted: addresses whose task record is gone are done with;
    /// the others are not cleaned again while their node stays down.
    fn done(&mut self, st: &ClusterState, lost: BTreeSet<Ipv4Addr>) {
        let current: BTreeSet<Ipv4Addr> = st
            .task_list()
            .flat_map(|t| t.networks.iter().map(|n| n.ip))
            .collect();
        self.target_nodes
            .retain(|ip, _| current.contains(ip) || !lost.contains(ip));
        self.cleaned = lost.intersection(&current).copied().collect();
    }
}

#[async_trait::async_trait]
impl Dataplane for LostFlows {
    async fn apply(&mut self, _plan: &NodePlan, phase: Phase, cx: &mut PassCx<'_>) {
        // Only on a picture that has this node alive: one without it (no liveness read
        // yet) would take every task for lost.
        if phase == Phase::Prepare || !cx.st.alive.contains(&self.node_id) {
            return;
        }
        let lost = desired::lost_targets(cx.st, &mut self.target_nodes);
        let new: BTreeSet<_> = lost.difference(&self.cleaned).copied().collect();
        if new.is_empty() {
            self.done(cx.st, lost);
            return;
        }
        let namespaces: Vec<String> = cx.nat_namespaces.iter().cloned().collect();
        let targets = new.clone();
        let ct = self.conntrack.clone();
        // ctnetlink dumps: on the blocking pool, not on a runtime worker.
        let res = tokio::task::spawn_blocking(move || {
            namespaces.iter().try_fold(0, |n, ns| {
                Ok::<usize, shoal_lb::conntrack::CtError>(n + ct.delete_nated_to(ns, &targets)?)
            })
        })
        .await;
        match res {
            Ok(Ok(deleted)) => {
                if deleted > 0 {
                    info!(targets = ?new, deleted, "deleted flows to the tasks of a node that is down");
                }
                self.done(cx.st, lost);
            }
            Ok(Err(e)) => cx.fail("conntrack", "deleting flows to a lost node", e),
            Err(e) => cx.fail("conntrack", "deleting flows to a lost node", e),
        }
    }
}

/// The embedded DNS server: each local container is answered the view of its networks at
/// 127.0.0.11 in its namespace.
pub struct Dns {
    resolver: shoal_dns::Resolver,
    /// task id -> the view it is served
    views: HashMap<String, View>,
    /// Tasks whose listener ended and is to be attached again.
    reattach: HashSet<String>,
}

impl Dns {
    pub fn new(resolver: shoal_dns::Resolver) -> Dns {
        Dns {
            resolver,
            views: HashMap::new(),
            reattach: HashSet::new(),
        }
    }
}

#[async_trait::async_trait]
impl Dataplane for Dns {
    async fn apply(&mut self, plan: &NodePlan, phase: Phase, cx: &mut PassCx<'_>) {
        if phase == Phase::Prepare {
            return;
        }
        let main = phase == Phase::Main;
        if main {
            // Out of the answers: tasks to stop, stopping or gone (before they are stopped).
            let gone: Vec<String> = self
                .views
                .keys()
                .filter(|id| !plan.dns.contains_key(*id))
                .cloned()
                .collect();
            for id in gone {
                self.resolver.detach(&id).await;
                self.views.remove(&id);
            }
            // A listener that ended (its socket failed) is attached again below.
            let dead: Vec<String> = self
                .views
                .keys()
                .filter(|id| self.resolver.serving(id) == Some(false))
                .cloned()
                .collect();
            for id in dead {
                warn!(task = %id, "kernel drift: the 127.0.0.11 listener of a task ended; attaching it again");
                self.resolver.detach(&id).await;
                self.views.remove(&id);
                self.reattach.insert(id);
            }
            self.reattach.retain(|id| cx.st.tasks.contains_key(id));
        }
        for (id, t) in &plan.dns {
            let Some(ns) = &t.netns else { continue };
            match self.views.get(id) {
                Some(old) if *old == t.view.view => {}
                // Before the main phase only removals are served: a new VIP or task address
                // is answered once this pass has routed it. A client told a VIP whose route
                // is not there yet would wait a second for its next ARP probe.
                Some(old) if !main && !t.view.view.only_removes_from(old) => {}
                Some(_) => match self.resolver.update(id, t.view.records.clone()) {
                    Ok(()) => {
                        self.views.insert(id.clone(), t.view.view.clone());
                    }
                    Err(e) => cx.fail("dns", format!("dns of {}", t.name), e),
                },
                // New containers are attached in the main phase, once their networks are
                // in place.
                None if main && t.networks.iter().all(|n| cx.ok_networks.contains(n)) => {
                    match self.resolver.attach(id, ns, t.view.records.clone()).await {
                        Ok(()) => {
                            if self.reattach.remove(id) {
                                crate::metrics::global().drift_repaired("dns");
                            }
                            self.views.insert(id.clone(), t.view.view.clone());
                        }
                        Err(e) => cx.fail("dns", format!("dns of {}", t.name), e),
                    }
                }
                None => {}
            }
        }
        cx.dns_attached = self.views.keys().cloned().collect();
    }

    fn report(&self, r: &mut NodeReport) {
        r.dns_attached = self.views.len();
    }
}

/// Task processes: namespaces prepared, processes started once answered by DNS, health
/// checkers, stops after the grace period, garbage of tasks the cluster no longer has, and
/// the reports of all that to the store.
pub struct Tasks {
    runtime: Arc<dyn Runtime>,
    cluster: Cluster,
    started: HashSet<String>,
    /// Being stopped or removed (shared with the background stops).
    stopping: Arc<Mutex<HashSet<String>>>,
    health: HashMap<String, tokio::task::JoinHandle<()>>,
    /// Reports (started, exited, ...) not written to the store yet.
    reports: Pending,
    stop_grace: Duration,
    kill_after: Duration,
}

impl Tasks {
    pub fn new(
        runtime: Arc<dyn Runtime>,
        cluster: Cluster,
        stop_grace: Duration,
        kill_after: Duration,
    ) -> Tasks {
        Tasks {
            runtime,
            cluster,
            started: HashSet::new(),
            stopping: Arc::new(Mutex::new(HashSet::new())),
            health: HashMap::new(),
            reports: Pending::default(),
            stop_grace,
            kill_after,
        }
    }

    pub fn runtime(&self) -> &Arc<dyn Runtime> {
        &self.runtime
    }

    /// Tasks being stopped or removed now.
    pub fn stopping(&self) -> HashSet<String> {
        self.stopping.lock().expect("lock").clone()
    }

    /// After a restart: processes of tasks that still run are adopted, not restarted (and
    /// reported running if the earlier run's write of that was lost).
    pub fn adopt(&mut self, st: &ClusterState, node_id: &str) {
        for t in desired::local_tasks(st, node_id) {
            let cni = desired::cni_of(st, t);
            let running = match cni {
                // Another runtime's container: alive while its namespace is.
                Some(c) => shoal_netns::exists_at(std::path::Path::new(&c.netns)),
                None => self.runtime.is_running(&t.id),
            };
            let a = shoal_control::reports::adoption(t, running);
            if a == Adoption::None {
                continue;
            }
            self.started.insert(t.id.clone());
            if cni.is_none() {
                self.runtime.clone().adopt(&t.id);
            }
            if a == Adoption::AdoptAndReport {
                self.reports.add(&t.id, Report::Running);
            }
            info!(task = %t.name(), "adopted running task");
        }
    }

    /// A process exited: reported (retried until written; see reports.rs).
    pub async fn exited(&mut self, task_id: &str, status: String) {
        self.started.remove(task_id);
        self.reports.add(task_id, Report::Exited(status));
        for e in self.reports.flush(&self.cluster).await {
            warn!(error = %e, cause = %e.source, "task report not written yet; will retry");
        }
    }

    fn keep_health(&mut self, plan: &NodePlan) {
        let started = &self.started;
        self.health.retain(|id, h| {
            let keep = started.contains(id) && plan.run.get(id).is_some_and(|r| r.health.is_some());
            if !keep {
                h.abort();
            }
            keep
        });
        for (id, r) in &plan.run {
            let Some(check) = &r.health else { continue };
            if !self.started.contains(id) || self.health.contains_key(id) {
                continue;
            }
            let probe = crate::health::Probe {
                task_id: id.clone(),
                task_name: r.spec.name.clone(),
                hostname: r.spec.hostname.clone(),
                runtime: self.runtime.clone(),
            };
            let h = crate::health::spawn(self.cluster.clone(), probe, check.clone(), r.last_health);
            self.health.insert(id.clone(), h);
        }
    }

    /// A container another runtime made (CNI): running once its interface and DNS are in
    /// place (the CNI ADD waits for that); ended when its namespace is gone without a DEL.
    fn external(&mut self, id: &str, r: &crate::plan::RunTask, plan: &NodePlan, cx: &PassCx<'_>) {
        let gone = plan.dns.get(id).is_none_or(|d| d.netns.is_none());
        if self.started.contains(id) {
            if gone {
                self.started.remove(id);
                self.reports.add(
                    id,
                    Report::Exited(
                        "its network namespace is gone (ended without a CNI DEL)".into(),
                    ),
                );
            }
        } else if !gone && cx.dns_attached.contains(id) {
            info!(task = %r.spec.name, "CNI container attached");
            self.started.insert(id.to_string());
            self.reports.add(id, Report::Running);
        }
    }

    /// Out of DNS and backends already (they are not serving): after the grace period,
    /// stopped and removed, then the record forgotten.
    fn stop(&mut self, t: &shoal_api::model::Task) {
        self.stopping.lock().expect("lock").insert(t.id.clone());
        self.started.remove(&t.id);
        let (rt, cluster, stopping, t) = (
            self.runtime.clone(),
            self.cluster.clone(),
            self.stopping.clone(),
            t.clone(),
        );
        let (grace, kill_after) = (self.stop_grace, self.kill_after);
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            if let Err(e) = rt.destroy(&t.id, kill_after).await {
                warn!(task = %t.name(), error = %format!("{e:#}"), "destroying task failed");
            } else if let Err(e) = cluster.delete_task(&t).await {
                warn!(task = %t.name(), error = %e, "deleting task record failed");
            } else {
                info!(task = %t.name(), "task removed");
            }
            stopping.lock().expect("lock").remove(&t.id);
        });
    }

    /// Task files and namespaces of tasks the cluster no longer has, destroyed in the
    /// background (a process may take kill_timeout_secs to die: N stale tasks must not
    /// hold up a pass by N x that).
    fn collect(&mut self, plan: &NodePlan) {
        for id in self.runtime.list() {
            if plan.known_tasks.contains(&id)
                || !self.stopping.lock().expect("lock").insert(id.clone())
            {
                continue;
            }
            self.started.remove(&id);
            let (rt, stopping, kill_after) =
                (self.runtime.clone(), self.stopping.clone(), self.kill_after);
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
}

#[async_trait::async_trait]
impl Dataplane for Tasks {
    async fn apply(&mut self, plan: &NodePlan, phase: Phase, cx: &mut PassCx<'_>) {
        match phase {
            Phase::Fast => {}
            Phase::Prepare => {
                for (id, t) in &plan.dns {
                    let external = plan.run.get(id).is_some_and(|r| r.spec.external);
                    if !self.started.contains(id)
                        && !external
                        && let Err(e) = self.runtime.prepare(id).await
                    {
                        cx.fail("tasks", format!("task {}", t.name), e);
                    }
                }
            }
            Phase::Main => {
                for (id, r) in &plan.run {
                    if r.spec.external {
                        self.external(id, r, plan, cx);
                        continue;
                    }
                    if self.started.contains(id) || !cx.dns_attached.contains(id) {
                        continue;
                    }
                    match self.runtime.start(&r.spec).await {
                        Ok(pid) => {
                            info!(task = %r.spec.name, pid, "task started");
                            self.started.insert(id.clone());
                            self.reports.add(id, Report::Running);
                        }
                        Err(e) => {
                            self.reports.add(id, Report::StartFailed(format!("{e:#}")));
                            cx.fail("tasks", format!("task {}", r.spec.name), e);
                        }
                    }
                }
                // Written with retries; what the store refuses now stays for the next pass.
                for e in self.reports.flush(&self.cluster).await {
                    cx.errors.push(crate::reconcile::ApplyError::new(
                        "tasks",
                        e.to_string(),
                        e.source,
                    ));
                }
                self.keep_health(plan);
                for t in &plan.stop {
                    self.stop(t);
                }
                self.collect(plan);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::NodeFacts;
    use crate::runtime::TaskSpec;
    use shoal_api::wire::SandboxEntry;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A runtime that records what it is asked; `destroy` waits for a permit (a unit test
    /// of the applier's logic: the real runtime is in the end-to-end tests).
    struct FakeRuntime {
        held: Vec<String>,
        started: Mutex<Vec<String>>,
        prepared: Mutex<Vec<String>>,
        destroyed: AtomicUsize,
        permits: tokio::sync::Semaphore,
    }

    #[async_trait::async_trait]
    impl Runtime for FakeRuntime {
        fn netns(&self, task_id: &str) -> String {
            format!("p-t-{task_id}")
        }
        async fn prepare(&self, task_id: &str) -> anyhow::Result<String> {
            self.prepared.lock().unwrap().push(task_id.into());
            Ok(self.netns(task_id))
        }
        async fn start(&self, spec: &TaskSpec) -> anyhow::Result<u32> {
            self.started.lock().unwrap().push(spec.id.clone());
            Ok(1)
        }
        fn is_running(&self, _task_id: &str) -> bool {
            false
        }
        async fn destroy(&self, _task_id: &str, _timeout: Duration) -> anyhow::Result<()> {
            self.permits.acquire().await?.forget();
            self.destroyed.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn list(&self) -> Vec<String> {
            self.held.clone()
        }
        fn adopt(self: Arc<Self>, _task_id: &str) {}
        fn entry(&self, _task_id: &str, hostname: &str) -> SandboxEntry {
            SandboxEntry::Process {
                netns: "/nonexistent".into(),
                resolv_conf: "/nonexistent".into(),
                hostname: hostname.into(),
            }
        }
    }

    fn fake(held: &[&str]) -> Arc<FakeRuntime> {
        Arc::new(FakeRuntime {
            held: held.iter().map(|s| s.to_string()).collect(),
            started: Mutex::new(vec![]),
            prepared: Mutex::new(vec![]),
            destroyed: AtomicUsize::new(0),
            permits: tokio::sync::Semaphore::new(0),
        })
    }

    fn tasks(rt: &Arc<FakeRuntime>, dir: &std::path::Path) -> Tasks {
        let store = Arc::new(shoal_control::store::embedded::EmbeddedStore::open(dir).unwrap());
        Tasks::new(
            rt.clone(),
            Cluster::new(store),
            Duration::from_secs(5),
            Duration::from_secs(5),
        )
    }

    fn plan_of(st: &ClusterState, stopping: &HashSet<String>) -> NodePlan {
        NodePlan::compute(
            st,
            &NodeFacts {
                node_id: "me",
                netns_prefix: "p-",
                underlay: None,
                search: &[],
                task_netns: &|id| Some(format!("p-t-{id}")),
                stopping,
                wireguard: None,
            },
        )
    }

    /// Bug 8: stale tasks are destroyed in the background. With every destroy blocked, the
    /// pass still ends (paused clock: a pass waiting on a destroy would run into the
    /// timeout, not into a slow machine); released, all of them go.
    #[tokio::test(start_paused = true)]
    async fn garbage_never_holds_up_a_pass() {
        let dir = tempfile::tempdir().unwrap();
        let rt = fake(&["stale1", "stale2", "stale3"]);
        let mut t = tasks(&rt, dir.path());
        let st = crate::desired::tests::fixture();
        let plan = plan_of(&st, &t.stopping());
        let mut drift = crate::drift::DriftWatch::new(applier().clone());
        let mut pending = HashMap::new();
        let mut cx = PassCx::new(&st, false, &mut drift, &mut pending);
        tokio::time::timeout(Duration::from_secs(1), t.apply(&plan, Phase::Main, &mut cx))
            .await
            .expect("the pass waited for a destroy");
        assert_eq!(t.stopping().len(), 3, "all three being removed");
        // A second pass does not start them again.
        t.apply(&plan, Phase::Main, &mut cx).await;
        rt.permits.add_permits(10);
        while !t.stopping().is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(rt.destroyed.load(Ordering::SeqCst), 3);
    }

    /// A task is prepared first, started only once its DNS listener is attached, and
    /// started once.
    #[tokio::test]
    async fn a_task_starts_once_and_only_when_answered() {
        let dir = tempfile::tempdir().unwrap();
        let rt = fake(&[]);
        let mut t = tasks(&rt, dir.path());
        let st = crate::desired::tests::fixture();
        let plan = plan_of(&st, &t.stopping());
        let mut drift = crate::drift::DriftWatch::new(applier().clone());
        let mut pending = HashMap::new();
        let mut cx = PassCx::new(&st, false, &mut drift, &mut pending);
        t.apply(&plan, Phase::Prepare, &mut cx).await;
        assert_eq!(*rt.prepared.lock().unwrap(), ["t1", "t3", "t4"]);
        t.apply(&plan, Phase::Main, &mut cx).await;
        assert!(rt.started.lock().unwrap().is_empty(), "no DNS yet");
        cx.dns_attached = ["t1".to_string()].into();
        t.apply(&plan, Phase::Main, &mut cx).await;
        t.apply(&plan, Phase::Main, &mut cx).await;
        assert_eq!(*rt.started.lock().unwrap(), ["t1"]);
        // Prepared again only while not started.
        rt.prepared.lock().unwrap().clear();
        t.apply(&plan, Phase::Prepare, &mut cx).await;
        assert_eq!(*rt.prepared.lock().unwrap(), ["t3", "t4"]);
    }

    /// A CNI container's sandbox is its runtime's: never prepared or started by ours;
    /// running once its DNS is attached, ended when its namespace is gone.
    #[tokio::test]
    async fn a_cni_container_is_never_prepared_or_started() {
        let dir = tempfile::tempdir().unwrap();
        let rt = fake(&[]);
        let mut t = tasks(&rt, dir.path());
        let mut st = crate::desired::tests::fixture();
        let sid = st.tasks["t1"].0.service_id.clone();
        let name = st
            .services
            .iter()
            .find(|(_, (s, _))| s.id == sid)
            .map(|(n, _)| n.clone())
            .unwrap();
        st.services.get_mut(&name).unwrap().0.standalone = Some(shoal_api::model::Standalone {
            node_id: "me".into(),
            exited: None,
            cni: Some(shoal_api::model::CniAttachment {
                container_id: "c".repeat(64),
                netns: "/run/netns/netns-x".into(),
                ifname: "eth0".into(),
            }),
        });
        let plan = plan_of(&st, &t.stopping());
        assert!(plan.run["t1"].spec.external);
        let mut drift = crate::drift::DriftWatch::new(applier().clone());
        let mut pending = HashMap::new();
        let mut cx = PassCx::new(&st, false, &mut drift, &mut pending);
        t.apply(&plan, Phase::Prepare, &mut cx).await;
        assert!(!rt.prepared.lock().unwrap().contains(&"t1".to_string()));
        cx.dns_attached = ["t1".to_string()].into();
        t.apply(&plan, Phase::Main, &mut cx).await;
        assert!(
            rt.started.lock().unwrap().is_empty(),
            "ours never starts it"
        );
        assert!(t.started.contains("t1"), "running once answered");
        // Its namespace gone (no DEL): ended.
        let gone = NodePlan::compute(
            &st,
            &NodeFacts {
                node_id: "me",
                netns_prefix: "p-",
                underlay: None,
                search: &[],
                task_netns: &|id| (id != "t1").then(|| format!("p-t-{id}")),
                stopping: &t.stopping(),
                wireguard: None,
            },
        );
        t.apply(&gone, Phase::Main, &mut cx).await;
        assert!(!t.started.contains("t1"));
        assert!(rt.started.lock().unwrap().is_empty());
    }

    /// A task to stop is stopped once (it is then in `stopping`, which the next plan
    /// leaves out).
    #[tokio::test(start_paused = true)]
    async fn a_task_to_stop_is_stopped_once() {
        let dir = tempfile::tempdir().unwrap();
        let rt = fake(&[]);
        let mut t = tasks(&rt, dir.path());
        let mut st = crate::desired::tests::fixture();
        st.tasks.get_mut("t1").unwrap().0.desired_state = shoal_api::model::TaskState::Shutdown;
        let plan = plan_of(&st, &t.stopping());
        let mut drift = crate::drift::DriftWatch::new(applier().clone());
        let mut pending = HashMap::new();
        let mut cx = PassCx::new(&st, false, &mut drift, &mut pending);
        t.apply(&plan, Phase::Main, &mut cx).await;
        assert_eq!(t.stopping(), ["t1".to_string()].into());
        assert!(plan_of(&st, &t.stopping()).stop.is_empty());
        // After the grace period it is destroyed (and its record deleted).
        rt.permits.add_permits(1);
        while !t.stopping().is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(rt.destroyed.load(Ordering::SeqCst), 1);
    }

    /// Records which thread each conntrack clean-up ran on.
    #[derive(Default)]
    struct FakeConntrack {
        calls: Mutex<Vec<(String, BTreeSet<Ipv4Addr>, std::thread::ThreadId)>>,
    }

    impl Conntrack for FakeConntrack {
        fn delete_nated_to(
            &self,
            netns: &str,
            targets: &BTreeSet<Ipv4Addr>,
        ) -> Result<usize, shoal_lb::conntrack::CtError> {
            let me = std::thread::current().id();
            let call = (netns.to_string(), targets.clone(), me);
            self.calls.lock().unwrap().push(call);
            Ok(1)
        }
        fn clean_published(
            &self,
            _before: &shoal_lb::publish::PublishSpec,
            _now: &shoal_lb::publish::PublishSpec,
        ) -> Result<usize, shoal_lb::LbError> {
            let me = std::thread::current().id();
            let call = (NODE_NS.to_string(), BTreeSet::new(), me);
            self.calls.lock().unwrap().push(call);
            Ok(0)
        }
    }

    /// Bug 6: the ctnetlink dumps for the flows of a lost node run on the blocking pool.
    /// The test's runtime has one thread, the test's own; a dump called inline would run
    /// on it (and stall every other task of the agent while the table is dumped).
    #[tokio::test(flavor = "current_thread")]
    async fn flows_of_a_lost_node_are_deleted_off_the_runtime_thread() {
        let ct = Arc::new(FakeConntrack::default());
        let mut lost = LostFlows::new("me", ct.clone());
        let mut st = crate::desired::tests::fixture();
        st.alive.remove("other-node");
        let plan = plan_of(&st, &HashSet::new());
        let mut drift = crate::drift::DriftWatch::new(applier().clone());
        let mut pending = HashMap::new();
        let mut cx = PassCx::new(&st, false, &mut drift, &mut pending);
        cx.nat_namespaces = ["p-n-a".to_string(), "p-n-b".to_string()].into();
        lost.apply(&plan, Phase::Main, &mut cx).await;
        assert!(cx.errors.is_empty(), "{:?}", cx.errors);
        let runtime_thread = std::thread::current().id();
        let calls = ct.calls.lock().unwrap().clone();
        let t2: BTreeSet<Ipv4Addr> = ["10.0.1.4".parse().unwrap()].into();
        assert_eq!(
            calls
                .iter()
                .map(|(ns, t, _)| (ns.as_str(), t))
                .collect::<Vec<_>>(),
            [("p-n-a", &t2), ("p-n-b", &t2)],
            "the lost node's task, in every namespace with NAT state"
        );
        for (ns, _, thread) in &calls {
            assert_ne!(
                *thread, runtime_thread,
                "{ns}: dumped on the runtime thread"
            );
        }
        // Cleaned once while the node stays down.
        lost.apply(&plan, Phase::Main, &mut cx).await;
        assert_eq!(ct.calls.lock().unwrap().len(), 2);
    }
}
