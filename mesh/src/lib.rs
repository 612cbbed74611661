//! Overlay network programmer: the per-network namespace on this node, the attachment of
//! local containers to it (routed veths with proxy ARP, no bridge) and, when
//! [`NetworkSpec::vxlan`] is set, the VXLAN overlay towards the network's endpoints on other
//! nodes (see the `vxlan` module: device `vxlan0`, static FDB, tagged neighbours and routes).
//!
//! Layout that [`apply_network`] converges to, for one network:
//!
//! - network namespace `spec.netns`: `lo` up with the gateway `/32` (the same anycast
//!   address on every node; it is also the ARP source towards containers),
//!   `net.ipv4.ip_forward=1`, one `local VIP/32 dev lo table local` route per VIP (ARP
//!   answers for VIPs without a dummy device), and per local container a veth `sv…` with
//!   `proxy_arp=1`, `neigh.<if>.proxy_delay=0` and a `IP/32 dev sv…` route;
//! - each task namespace: the veth peer (`eth0`, `eth1`, …) with the spec's MAC and MTU,
//!   `IP/prefix` (the network prefix stays on-link), `lo` up, and optionally
//!   `default via gateway`;
//! - with [`NetworkSpec::egress`], the network's way out through the node (module
//!   [`egress`]: a veth to the node namespace and the routes through it).
//!
//! Everything we add carries a tag so that a diff never removes what someone else made:
//! routes and addresses have protocol [`SHOAL_RT_PROTO`], node-side veths start with
//! [`ENDPOINT_PREFIX`] and carry an alias naming the task namespace and interface they serve.
//! The functions are level-triggered: they compare with what the kernel has every time, so
//! a restarted agent adopts what is there and an interrupted apply is finished by the next.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;

use netlink_packet_route::address::{AddressAttribute, AddressProtocol};
use netlink_packet_route::link::{InfoData, InfoVeth};
use netlink_packet_route::route::{RouteMessage, RouteProtocol, RouteScope, RouteType};
use rtnetlink::{LinkUnspec, LinkVeth, RouteMessageBuilder};

pub mod egress;
pub mod ingress;
mod nl;
mod pair;
pub mod plan;
mod vxlan;

pub use vxlan::{VXLAN_IFNAME, VXLAN_OVERHEAD};

use nl::{Link, Nl, Route};
use plan::{KernelEndpoint, diff_sets, endpoint_alias, fmt_mac, parse_alias, plan_endpoints};

/// Node-side veths whose name starts with this are ours (the agent names them "sv" + hex).
pub const ENDPOINT_PREFIX: &str = "sv";
/// Route and address protocol number tagging what Shoal added (not in iproute2's rt_protos).
pub const SHOAL_RT_PROTO: u8 = 83;

pub(crate) const RT_TABLE_MAIN: u32 = 254;
const RT_TABLE_LOCAL: u32 = 255;

/// One overlay network as this node must program it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkSpec {
    /// Network namespace name (created if missing).
    pub netns: String,
    /// The network's subnet, e.g. 10.0.1.0/24.
    pub subnet: ipnet::Ipv4Net,
    /// Anycast gateway: a /32 on `lo` of the network namespace.
    pub gateway: Ipv4Addr,
    /// VIPs: local routes in table local on `lo`; stale ones (ours) are removed.
    pub vips: Vec<Ipv4Addr>,
    /// Container interface MTU (1450 over a 1500 underlay).
    pub mtu: u32,
    /// The local containers attached to this network.
    pub endpoints: Vec<EndpointSpec>,
    /// The network's VXLAN overlay towards other nodes; None = this node only (no VXLAN
    /// device; one that we made earlier is removed).
    pub vxlan: Option<VxlanSpec>,
    /// The network's way out through this node (see [`egress`]); None = `--internal` (no
    /// way out; a link made earlier is removed).
    pub egress: Option<egress::EgressSpec>,
}

/// The IANA VXLAN port, used by every network that is not encrypted.
pub const VXLAN_PORT: u16 = 4789;
/// The VXLAN port of encrypted networks: datagrams to it are routed into WireGuard (and the
/// guard drops them from anywhere else), so they never cross the underlay in the clear.
pub const ENCRYPTED_VXLAN_PORT: u16 = 4790;

/// The VXLAN part of a network on this node: one device [`VXLAN_IFNAME`] in the network
/// namespace whose UDP socket lives in the underlay namespace, plus static FDB, neighbour
/// and route entries for every endpoint of the network on other nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanSpec {
    /// VXLAN network identifier (1..=16777215), one per network in the cluster.
    pub vni: u32,
    /// This node's underlay address (source of the VXLAN packets).
    pub local: Ipv4Addr,
    /// Namespace holding the underlay link (a name under /run/netns or an nsfs path);
    /// None = the namespace of the calling process (`/proc/self/ns/net`, not the calling
    /// thread's).
    pub underlay_netns: Option<String>,
    /// Underlay device, e.g. "eth0"; the VXLAN MTU is its MTU minus [`VXLAN_OVERHEAD`].
    pub underlay_dev: String,
    /// UDP destination port ([`VXLAN_PORT`]).
    pub port: u16,
    /// This node's VTEP MAC on this network (the agent derives it from the underlay address).
    pub mac: [u8; 6],
    /// Every endpoint of this network on other nodes.
    pub remotes: Vec<RemoteEndpoint>,
    /// Other nodes reachable as next hops on this device (the ingress network's return
    /// path): per peer an FDB entry and a permanent neighbour `vtep -> vtep_mac`, no route.
    pub peers: Vec<Peer>,
    /// Bytes taken off the device MTU beyond VXLAN's own (an encrypted network's VXLAN
    /// travels inside WireGuard: its overhead).
    pub extra_overhead: u32,
}

/// Another node, addressed on the overlay by its underlay address (used only as a next hop).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Peer {
    pub vtep: Ipv4Addr,
    pub vtep_mac: [u8; 6],
}

/// An endpoint of the network on another node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteEndpoint {
    /// The container's overlay address.
    pub ip: Ipv4Addr,
    /// The remote node's underlay address.
    pub vtep: Ipv4Addr,
    /// The remote node's VTEP MAC on this network.
    pub vtep_mac: [u8; 6],
}

/// One container interface on a network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSpec {
    /// The container's namespace (a name under /run/netns or an nsfs path); must exist.
    pub task_netns: String,
    /// Node-side veth name inside the network namespace: starts with [`ENDPOINT_PREFIX`],
    /// at most 15 bytes, no '.'.
    pub host_ifname: String,
    /// Container-side name, e.g. "eth0".
    pub ifname: String,
    /// Container address; gets the subnet's prefix length.
    pub ip: Ipv4Addr,
    /// Container-side MAC.
    pub mac: [u8; 6],
    /// Add `default via gateway` in the container (only for its first network).
    pub default_route: bool,
}

/// What an apply changed, one line per object (for logs and tests). Empty when the kernel
/// already matched the spec.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    pub created: Vec<String>,
    pub removed: Vec<String>,
}

impl Applied {
    pub fn is_empty(&self) -> bool {
        self.created.is_empty() && self.removed.is_empty()
    }
}

/// What the kernel has for one network namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedNetwork {
    pub netns: String,
    /// Our /32 on `lo` (tagged with [`SHOAL_RT_PROTO`]); None if absent.
    pub gateway: Option<Ipv4Addr>,
    /// Our local VIP routes, sorted.
    pub vips: Vec<Ipv4Addr>,
    /// Node-side veths named with [`ENDPOINT_PREFIX`], sorted by name.
    pub endpoints: Vec<ObservedEndpoint>,
    /// The VXLAN device [`VXLAN_IFNAME`] and its entries, if present.
    pub vxlan: Option<ObservedVxlan>,
}

/// The VXLAN device of a network namespace and what is programmed on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedVxlan {
    pub ifname: String,
    pub vni: Option<u32>,
    pub local: Option<Ipv4Addr>,
    pub port: Option<u16>,
    pub learning: Option<bool>,
    pub mac: Vec<u8>,
    pub mtu: u32,
    pub up: bool,
    /// Static FDB entries (VTEP MAC, remote underlay address), sorted.
    pub fdb: Vec<([u8; 6], Ipv4Addr)>,
    /// Neighbour entries on the device tagged with [`SHOAL_RT_PROTO`] (remote endpoint
    /// address, VTEP MAC), sorted.
    pub neighbours: Vec<(Ipv4Addr, [u8; 6])>,
    /// Our `/32 dev vxlan` routes (remote endpoint addresses), sorted.
    pub routes: Vec<Ipv4Addr>,
}

/// A node-side veth as the network namespace sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedEndpoint {
    pub host_ifname: String,
    /// The peer's address, from our `/32 dev host_ifname` route, if present.
    pub ip: Option<Ipv4Addr>,
    /// Task namespace and container interface recorded in the veth's alias, if ours.
    pub task_netns: Option<String>,
    pub ifname: Option<String>,
    pub up: bool,
    pub mtu: u32,
}

/// Errors; each names the object that failed and keeps the cause.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error("invalid network spec: {0}")]
    InvalidSpec(String),
    #[error("{what}: {source}")]
    Netns {
        what: String,
        #[source]
        source: shoal_netns::Error,
    },
    #[error("opening a netlink socket in namespace {ns:?}: {source}")]
    Socket {
        ns: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} in namespace {ns:?}: {source}")]
    Netlink {
        ns: String,
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("namespace {ns:?}: {what}")]
    Missing { ns: String, what: String },
    #[error("{what}: {source}")]
    Os {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// Something we did not make is in the way (e.g. a non-VXLAN `vxlan0`).
    #[error("namespace {ns:?}: {what}")]
    Conflict { ns: String, what: String },
    /// One endpoint failed; the others were still converged.
    #[error("endpoint {host_ifname}: {source}")]
    Endpoint {
        host_ifname: String,
        #[source]
        source: Box<MeshError>,
    },
    /// Several objects (endpoints, the VXLAN part) failed; the others were still converged.
    #[error("network {netns}: {} objects failed: {}", errors.len(), join_errors(errors))]
    Several {
        netns: String,
        errors: Vec<MeshError>,
    },
}

fn endpoint_err(host_ifname: &str, e: MeshError) -> MeshError {
    MeshError::Endpoint {
        host_ifname: host_ifname.to_string(),
        source: Box::new(e),
    }
}

/// Each error with its whole cause chain, separated by "; ".
fn join_errors(errors: &[MeshError]) -> String {
    errors
        .iter()
        .map(|e| {
            let mut s = e.to_string();
            let mut cur = std::error::Error::source(e);
            while let Some(c) = cur {
                let cs = c.to_string();
                if !s.contains(&cs) {
                    s.push_str(": ");
                    s.push_str(&cs);
                }
                cur = c.source();
            }
            s
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn netns_err(what: impl Into<String>) -> impl FnOnce(shoal_netns::Error) -> MeshError {
    let what = what.into();
    move |source| MeshError::Netns { what, source }
}

pub(crate) fn proto() -> RouteProtocol {
    RouteProtocol::from(SHOAL_RT_PROTO)
}

/// Converges the network namespace and the listed endpoints to `spec`. Idempotent: a second
/// call with the same spec changes nothing and returns an empty [`Applied`].
#[tracing::instrument(skip_all, fields(netns = %spec.netns))]
pub async fn apply_network(spec: &NetworkSpec) -> Result<Applied, MeshError> {
    plan::validate(spec)?;
    let mut ap = Applied::default();
    if shoal_netns::ensure(&spec.netns).map_err(netns_err(format!(
        "creating network namespace {:?}",
        spec.netns
    )))? {
        ap.created.push(format!("namespace {}", spec.netns));
    }
    // Before any veth exists: new devices inherit forwarding from conf/default.
    ensure_sysctl(&spec.netns, "net/ipv4/ip_forward", "1", &mut ap.created)?;

    let nl = Nl::open(&spec.netns)?;
    let links = nl.links().await?;
    let lo = ensure_lo_up(&nl, &links, &mut ap.created).await?;
    sync_lo_addrs(&nl, lo, &[spec.gateway], &mut ap).await?;
    sync_vips(&nl, lo, &spec.vips, &mut ap).await?;

    let kernel: Vec<KernelEndpoint> = links
        .iter()
        .filter(|l| is_endpoint(l))
        .map(|l| KernelEndpoint {
            name: l.name.clone(),
            alias: l.alias.clone(),
        })
        .collect();
    let plan = plan_endpoints(&spec.endpoints, &kernel);
    let find_link = |name: &str| links.iter().find(|l| l.name == name);
    let find_spec = |name: &str| {
        spec.endpoints
            .iter()
            .find(|e| e.host_ifname == name)
            .expect("planned endpoints come from the spec")
    };
    // One failing endpoint must not keep the others from converging: collect the errors
    // and report them after the whole pass.
    let mut failures = Vec::new();
    for name in &plan.delete {
        if let Some(l) = find_link(name) {
            match nl.del_link(l.index, name).await {
                Ok(()) => {
                    tracing::info!(endpoint = %name, "removed endpoint");
                    ap.removed.push(format!("endpoint {name}"));
                }
                Err(e) => failures.push(endpoint_err(name, e)),
            }
        }
    }
    for name in &plan.recreate {
        let res = async {
            if let Some(l) = find_link(name) {
                nl.del_link(l.index, name).await?;
                ap.removed
                    .push(format!("endpoint {name} (attached elsewhere)"));
            }
            create_endpoint(&nl, spec, find_spec(name)).await?;
            ap.created.push(format!("endpoint {name}"));
            Ok::<(), MeshError>(())
        }
        .await;
        if let Err(e) = res {
            failures.push(endpoint_err(name, e));
        }
    }
    for name in &plan.create {
        match create_endpoint(&nl, spec, find_spec(name)).await {
            Ok(()) => {
                tracing::info!(endpoint = %name, "created endpoint");
                ap.created.push(format!("endpoint {name}"));
            }
            Err(e) => failures.push(endpoint_err(name, e)),
        }
    }
    let routes = nl.routes().await?;
    for name in &plan.check {
        let host = find_link(name).expect("checked endpoints come from the dump");
        if let Err(e) = check_endpoint(&nl, spec, find_spec(name), host, &routes, &mut ap).await {
            failures.push(endpoint_err(name, e));
        }
    }
    // The VXLAN part does not depend on the endpoints; a failure there is reported with
    // theirs and does not stop them.
    if let Err(e) = vxlan::sync(&nl, spec, &mut ap).await {
        failures.push(e);
    }
    if let Err(e) = egress::sync(&nl, spec, &mut ap).await {
        failures.push(e);
    }
    sweep_host_routes(&nl, spec, &mut ap).await?;
    if !ap.is_empty() {
        tracing::info!(created = ?ap.created, removed = ?ap.removed, "network applied");
    }
    match failures.len() {
        0 => Ok(ap),
        1 => Err(failures.remove(0)),
        _ => Err(MeshError::Several {
            netns: spec.netns.clone(),
            errors: failures,
        }),
    }
}

/// Deletes the network namespace and every endpoint in it (so the containers lose their
/// interface at once, even if something still pins the namespace). Idempotent.
#[tracing::instrument]
pub async fn remove_network(netns: &str) -> Result<(), MeshError> {
    if !shoal_netns::exists(netns) {
        return Ok(());
    }
    {
        let nl = Nl::open(netns)?;
        // The VXLAN device goes first and synchronously: namespace teardown is
        // asynchronous, and until its device is gone the VNI stays taken in the underlay
        // namespace (a quick re-apply would fail with EEXIST).
        for l in nl.links().await?.iter().filter(|l| {
            is_endpoint(l) || vxlan::is_ours(l) || (l.is_veth && l.name == egress::NS_LINK)
        }) {
            nl.del_link(l.index, &l.name).await?;
        }
    }
    shoal_netns::delete(netns)
        .map_err(netns_err(format!("deleting network namespace {netns:?}")))?;
    tracing::info!("removed network namespace");
    Ok(())
}

/// Reads back what the kernel has for a network; None when the namespace does not exist.
pub async fn observe_network(netns: &str) -> Result<Option<ObservedNetwork>, MeshError> {
    if !shoal_netns::exists(netns) {
        return Ok(None);
    }
    let nl = Nl::open(netns)?;
    let links = nl.links().await?;
    let lo_index = links.iter().find(|l| l.name == "lo").map(|l| l.index);
    let addrs = nl.addrs().await?;
    let routes = nl.routes().await?;
    let gateway = addrs
        .iter()
        .find(|a| Some(a.index) == lo_index && a.proto == SHOAL_RT_PROTO && a.prefix == 32)
        .map(|a| a.ip);
    let mut vips: Vec<Ipv4Addr> = routes
        .iter()
        .filter(|r| is_vip_route(r))
        .map(|r| r.dst)
        .collect();
    vips.sort();
    let mut endpoints: Vec<ObservedEndpoint> = links
        .iter()
        .filter(|l| is_endpoint(l))
        .map(|l| {
            let ip = routes
                .iter()
                .find(|r| is_host_route(r) && r.oif == Some(l.index))
                .map(|r| r.dst);
            let (task_netns, ifname) = match l.alias.as_deref().and_then(parse_alias) {
                Some((n, i)) => (Some(n), Some(i)),
                None => (None, None),
            };
            ObservedEndpoint {
                host_ifname: l.name.clone(),
                ip,
                task_netns,
                ifname,
                up: l.up,
                mtu: l.mtu,
            }
        })
        .collect();
    endpoints.sort_by(|a, b| a.host_ifname.cmp(&b.host_ifname));
    let vxlan = vxlan::observe(&nl, &links, &routes).await?;
    Ok(Some(ObservedNetwork {
        netns: netns.to_string(),
        gateway,
        vips,
        endpoints,
        vxlan,
    }))
}

fn is_endpoint(l: &Link) -> bool {
    l.is_veth && l.name.starts_with(ENDPOINT_PREFIX)
}

fn is_vip_route(r: &Route) -> bool {
    r.table == RT_TABLE_LOCAL
        && r.proto == SHOAL_RT_PROTO
        && r.dst_len == 32
        && r.msg.header.kind == RouteType::Local
}

fn is_host_route(r: &Route) -> bool {
    r.table == RT_TABLE_MAIN && r.proto == SHOAL_RT_PROTO && r.dst_len == 32
}

/// Sets a sysctl (slash-separated key) when it differs; notes the change.
pub(crate) fn ensure_sysctl(
    ns: &str,
    key: &str,
    value: &str,
    changes: &mut Vec<String>,
) -> Result<(), MeshError> {
    let cur = shoal_netns::get_sysctl(ns, key)
        .map_err(netns_err(format!("reading sysctl {key} in {ns:?}")))?;
    if cur != value {
        shoal_netns::set_sysctl(ns, key, value)
            .map_err(netns_err(format!("setting sysctl {key}={value} in {ns:?}")))?;
        changes.push(format!("sysctl {}={value}", key.replace('/', ".")));
    }
    Ok(())
}

async fn ensure_lo_up<'a>(
    nl: &Nl,
    links: &'a [Link],
    changes: &mut Vec<String>,
) -> Result<&'a Link, MeshError> {
    let lo = links
        .iter()
        .find(|l| l.name == "lo")
        .ok_or_else(|| MeshError::Missing {
            ns: nl.ns.clone(),
            what: "no lo interface".into(),
        })?;
    if !lo.up {
        nl.set_link(
            "setting lo up".into(),
            LinkUnspec::new_with_index(lo.index).up(),
        )
        .await?;
        changes.push("link lo up".into());
    }
    Ok(lo)
}

/// Our /32 addresses on lo: exactly `want`.
async fn sync_lo_addrs(
    nl: &Nl,
    lo: &Link,
    want: &[Ipv4Addr],
    ap: &mut Applied,
) -> Result<(), MeshError> {
    let addrs = nl.addrs().await?;
    let ours: Vec<_> = addrs
        .iter()
        .filter(|a| a.index == lo.index && a.proto == SHOAL_RT_PROTO)
        .collect();
    let have: BTreeSet<Ipv4Addr> = ours
        .iter()
        .filter(|a| a.prefix == 32)
        .map(|a| a.ip)
        .collect();
    let d = diff_sets(&want.iter().copied().collect(), &have);
    for a in ours
        .iter()
        .filter(|a| d.del.contains(&a.ip) || a.prefix != 32)
    {
        nl.handle
            .address()
            .del(a.msg.clone())
            .execute()
            .await
            .map_err(nl.err(format!("deleting address {}/{} from lo", a.ip, a.prefix)))?;
        ap.removed
            .push(format!("address {}/{} on lo", a.ip, a.prefix));
    }
    for ip in d.add {
        add_address(nl, lo.index, ip, 32, "lo").await?;
        ap.created.push(format!("address {ip}/32 on lo"));
    }
    Ok(())
}

pub(crate) async fn add_address(
    nl: &Nl,
    index: u32,
    ip: Ipv4Addr,
    prefix: u8,
    ifname: &str,
) -> Result<(), MeshError> {
    let mut req = nl.handle.address().add(index, IpAddr::V4(ip), prefix);
    req.message_mut()
        .attributes
        .push(AddressAttribute::Protocol(AddressProtocol::from(
            SHOAL_RT_PROTO,
        )));
    req.execute()
        .await
        .map_err(nl.err(format!("adding address {ip}/{prefix} to {ifname}")))
}

async fn sync_vips(
    nl: &Nl,
    lo: &Link,
    vips: &[Ipv4Addr],
    ap: &mut Applied,
) -> Result<(), MeshError> {
    let routes = nl.routes().await?;
    let ours: Vec<&Route> = routes.iter().filter(|r| is_vip_route(r)).collect();
    let have: BTreeSet<Ipv4Addr> = ours.iter().map(|r| r.dst).collect();
    let d = diff_sets(&plan::vip_set(vips), &have);
    for r in ours.iter().filter(|r| d.del.contains(&r.dst)) {
        del_route(nl, &r.msg, format!("deleting VIP route local {}/32", r.dst)).await?;
        ap.removed.push(format!("vip {}", r.dst));
    }
    for vip in d.add {
        let msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .table_id(RT_TABLE_LOCAL)
            .kind(RouteType::Local)
            .scope(RouteScope::Host)
            .protocol(proto())
            .destination_prefix(vip, 32)
            .output_interface(lo.index)
            .build();
        add_route(nl, msg, format!("adding VIP route local {vip}/32 dev lo")).await?;
        ap.created.push(format!("vip {vip}"));
    }
    Ok(())
}

pub(crate) async fn add_route(nl: &Nl, msg: RouteMessage, what: String) -> Result<(), MeshError> {
    nl.handle
        .route()
        .add(msg)
        .execute()
        .await
        .map_err(nl.err(what))
}

pub(crate) async fn del_route(nl: &Nl, msg: &RouteMessage, what: String) -> Result<(), MeshError> {
    nl.handle
        .route()
        .del(msg.clone())
        .execute()
        .await
        .map_err(nl.err(what))
}

/// Creates the veth pair with the peer made directly in the task namespace under its final
/// name, MAC and MTU (IFLA_NET_NS_FD in the peer's attributes: one atomic request, no
/// temporary name in either namespace), then configures both sides.
async fn create_endpoint(nl: &Nl, spec: &NetworkSpec, ep: &EndpointSpec) -> Result<(), MeshError> {
    let fd = shoal_netns::open(&ep.task_netns).map_err(netns_err(format!(
        "opening task namespace {:?} of endpoint {}",
        ep.task_netns, ep.host_ifname
    )))?;
    let peer = LinkUnspec::new_with_name(&ep.ifname)
        .address(ep.mac.to_vec())
        .mtu(spec.mtu)
        .setns_by_fd(fd.as_raw_fd())
        .build();
    let msg = LinkVeth::new(&ep.host_ifname, &ep.ifname)
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
        .mtu(spec.mtu)
        .build();
    nl.handle
        .link()
        .add(msg)
        .execute()
        .await
        .map_err(nl.err(format!(
            "creating veth {} (peer {} in {:?})",
            ep.host_ifname, ep.ifname, ep.task_netns
        )))?;
    drop(fd);
    let host = nl
        .link(&ep.host_ifname)
        .await?
        .ok_or_else(|| MeshError::Missing {
            ns: nl.ns.clone(),
            what: format!("veth {} vanished right after creation", ep.host_ifname),
        })?;
    let mut details = Vec::new();
    configure_host(nl, spec, ep, &host, &[], &mut details).await?;
    let task = Nl::open(&ep.task_netns)?;
    configure_task(&task, spec, ep, &mut details).await?;
    Ok(())
}

/// An endpoint the kernel has: make sure its peer is still the task's interface, then fix
/// whatever differs from the spec on either side.
async fn check_endpoint(
    nl: &Nl,
    spec: &NetworkSpec,
    ep: &EndpointSpec,
    host: &Link,
    routes: &[Route],
    ap: &mut Applied,
) -> Result<(), MeshError> {
    let task = Nl::open(&ep.task_netns)?;
    let peer = task.link(&ep.ifname).await?;
    let paired = peer.as_ref().is_some_and(|p| {
        p.is_veth && p.peer_index == Some(host.index) && host.peer_index == Some(p.index)
    });
    if !paired {
        drop(task);
        nl.del_link(host.index, &host.name).await?;
        ap.removed
            .push(format!("endpoint {} (peer not found)", ep.host_ifname));
        create_endpoint(nl, spec, ep).await?;
        ap.created.push(format!("endpoint {}", ep.host_ifname));
        return Ok(());
    }
    let mut details = Vec::new();
    configure_host(nl, spec, ep, host, routes, &mut details).await?;
    configure_task(&task, spec, ep, &mut details).await?;
    for d in details {
        let (kind, rest) = d.split_once(' ').unwrap_or(("", &d));
        if kind == "-" {
            ap.removed
                .push(format!("endpoint {}: {rest}", ep.host_ifname));
        } else {
            ap.created
                .push(format!("endpoint {}: {rest}", ep.host_ifname));
        }
    }
    Ok(())
}

/// Node side: alias, MTU, up, sysctls, `/32 dev host` route. Changes are noted as
/// "+ what" / "- what".
async fn configure_host(
    nl: &Nl,
    spec: &NetworkSpec,
    ep: &EndpointSpec,
    host: &Link,
    routes: &[Route],
    changes: &mut Vec<String>,
) -> Result<(), MeshError> {
    let name = &ep.host_ifname;
    let alias = endpoint_alias(ep);
    if host.alias.as_deref() != Some(alias.as_str()) {
        nl.set_link(
            format!("setting alias of {name}"),
            LinkUnspec::new_with_index(host.index).alias(alias),
        )
        .await?;
        changes.push("+ alias".into());
    }
    if host.mtu != spec.mtu {
        nl.set_link(
            format!("setting MTU {} on {name}", spec.mtu),
            LinkUnspec::new_with_index(host.index).mtu(spec.mtu),
        )
        .await?;
        changes.push(format!("+ mtu {} on {name}", spec.mtu));
    }
    let mut sysctls = Vec::new();
    ensure_sysctl(
        &spec.netns,
        &format!("net/ipv4/conf/{name}/proxy_arp"),
        "1",
        &mut sysctls,
    )?;
    ensure_sysctl(
        &spec.netns,
        &format!("net/ipv4/neigh/{name}/proxy_delay"),
        "0",
        &mut sysctls,
    )?;
    changes.extend(sysctls.into_iter().map(|s| format!("+ {s}")));
    if !host.up {
        nl.set_link(
            format!("setting {name} up"),
            LinkUnspec::new_with_index(host.index).up(),
        )
        .await?;
        changes.push(format!("+ {name} up"));
    }
    let present = routes
        .iter()
        .any(|r| is_host_route(r) && r.dst == ep.ip && r.oif == Some(host.index));
    if !present {
        let msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .protocol(proto())
            .scope(RouteScope::Link)
            .destination_prefix(ep.ip, 32)
            .output_interface(host.index)
            .build();
        // Replace: the address may still be routed to another endpoint that gives it up in
        // this same pass (its stale route is swept at the end); the namespace is ours.
        nl.handle
            .route()
            .add(msg)
            .replace()
            .execute()
            .await
            .map_err(nl.err(format!("adding route {}/32 dev {name}", ep.ip)))?;
        changes.push(format!("+ route {}/32 dev {name}", ep.ip));
    }
    Ok(())
}

/// Container side: `lo` up, the interface's MAC, MTU, up, address and default route.
async fn configure_task(
    task: &Nl,
    spec: &NetworkSpec,
    ep: &EndpointSpec,
    changes: &mut Vec<String>,
) -> Result<(), MeshError> {
    let links = task.links().await?;
    let mut lo_changes = Vec::new();
    ensure_lo_up(task, &links, &mut lo_changes).await?;
    changes.extend(lo_changes.into_iter().map(|c| format!("+ {c}")));
    let ifname = &ep.ifname;
    let dev = links
        .iter()
        .find(|l| &l.name == ifname)
        .ok_or_else(|| MeshError::Missing {
            ns: task.ns.clone(),
            what: format!(
                "container interface {ifname} of endpoint {} not found",
                ep.host_ifname
            ),
        })?;
    let idx = dev.index;
    let mut up = dev.up;
    if dev.mac != ep.mac {
        // Not every driver changes a MAC while up: take it down for the change.
        if up {
            task.set_link(
                format!("setting {ifname} down"),
                LinkUnspec::new_with_index(idx).down(),
            )
            .await?;
            up = false;
        }
        task.set_link(
            format!("setting MAC {} on {ifname}", fmt_mac(&ep.mac)),
            LinkUnspec::new_with_index(idx).address(ep.mac.to_vec()),
        )
        .await?;
        changes.push(format!("+ mac {} on {ifname}", fmt_mac(&ep.mac)));
    }
    if dev.mtu != spec.mtu {
        task.set_link(
            format!("setting MTU {} on {ifname}", spec.mtu),
            LinkUnspec::new_with_index(idx).mtu(spec.mtu),
        )
        .await?;
        changes.push(format!("+ mtu {} on {ifname}", spec.mtu));
    }
    if !up {
        task.set_link(
            format!("setting {ifname} up"),
            LinkUnspec::new_with_index(idx).up(),
        )
        .await?;
        changes.push(format!("+ {ifname} up"));
    }

    // Exactly one IPv4 address on the interface: ip/prefix. The interface is ours (our
    // veth's peer), so any other IPv4 address on it is stale.
    let prefix = spec.subnet.prefix_len();
    let addrs = task.addrs().await?;
    let mut present = false;
    for a in addrs.iter().filter(|a| a.index == idx) {
        if a.ip == ep.ip && a.prefix == prefix {
            present = true;
            continue;
        }
        task.handle
            .address()
            .del(a.msg.clone())
            .execute()
            .await
            .map_err(task.err(format!(
                "deleting address {}/{} from {ifname}",
                a.ip, a.prefix
            )))?;
        changes.push(format!("- address {}/{} on {ifname}", a.ip, a.prefix));
    }
    if !present {
        add_address(task, idx, ep.ip, prefix, ifname).await?;
        changes.push(format!("+ address {}/{prefix} on {ifname}", ep.ip));
    }

    // Our default route through this interface: present iff asked, via the gateway.
    let routes = task.routes().await?;
    let mut have_default = false;
    for r in routes.iter().filter(|r| {
        r.table == RT_TABLE_MAIN
            && r.proto == SHOAL_RT_PROTO
            && r.dst_len == 0
            && r.oif == Some(idx)
    }) {
        if ep.default_route && r.gateway == Some(spec.gateway) && !have_default {
            have_default = true;
            continue;
        }
        del_route(task, &r.msg, format!("deleting default route via {ifname}")).await?;
        changes.push(format!("- default route dev {ifname}"));
    }
    if ep.default_route && !have_default {
        let msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .protocol(proto())
            .gateway(spec.gateway)
            .output_interface(idx)
            .build();
        // Replace: the default may still point at another of the task's interfaces, whose
        // own pass would remove it only later (the task namespace is ours).
        task.handle
            .route()
            .add(msg)
            .replace()
            .execute()
            .await
            .map_err(task.err(format!("adding default via {} dev {ifname}", spec.gateway)))?;
        changes.push(format!("+ default via {} dev {ifname}", spec.gateway));
    }
    Ok(())
}

/// Removes our `/32 dev sv…` routes that no endpoint of the spec wants (an address change;
/// routes of deleted veths went with them).
async fn sweep_host_routes(nl: &Nl, spec: &NetworkSpec, ap: &mut Applied) -> Result<(), MeshError> {
    let links = nl.links().await?;
    let mut want: BTreeSet<(Ipv4Addr, u32)> = spec
        .endpoints
        .iter()
        .filter_map(|ep| {
            links
                .iter()
                .find(|l| l.name == ep.host_ifname)
                .map(|l| (ep.ip, l.index))
        })
        .collect();
    // Remote endpoints: `/32 dev vxlan0`, while the device is there.
    if let (Some(vx), Some(dev)) = (&spec.vxlan, links.iter().find(|l| vxlan::is_ours(l))) {
        want.extend(vx.remotes.iter().map(|r| (r.ip, dev.index)));
    }
    for r in nl.routes().await?.iter().filter(|r| is_host_route(r)) {
        let Some(oif) = r.oif else { continue };
        if !want.contains(&(r.dst, oif)) {
            del_route(nl, &r.msg, format!("deleting stale route {}/32", r.dst)).await?;
            ap.removed.push(format!("route {}/32", r.dst));
        }
    }
    Ok(())
}
