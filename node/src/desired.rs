//! Desired dataplane state as pure functions of the cluster model: DNS records per
//! container view, the overlay networks of this node, and the VIP rulesets. Only this module
//! knows both the cluster model and the narrow input types of dns, lb and mesh.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use crate::names::{LB_TABLE, host_ifname, network_netns, task_ifname};
use shoal_api::model::{
    CniAttachment, EndpointMode, LbSelection, Network, PublishMode, Service, Task, TaskState,
};
use shoal_control::state::ClusterState;

/// Container MTU on a 1500-byte underlay with VXLAN.
pub const OVERLAY_MTU: u32 = 1450;
/// Container MTU of an encrypted network: VXLAN inside WireGuard (60 bytes more).
pub const ENCRYPTED_MTU: u32 = OVERLAY_MTU - shoal_wg::OVERHEAD;

/// Serving tasks of a service with their address on a network.
fn serving_ips<'a>(
    state: &'a ClusterState,
    svc: &'a Service,
    network_id: &'a str,
) -> impl Iterator<Item = (&'a Task, Ipv4Addr)> + 'a {
    state
        .task_list()
        .filter(move |t| t.service_id == svc.id && state.serving(t))
        .filter_map(move |t| t.ip_on(network_id).map(|ip| (t, ip)))
}

/// A DNS view in plain data: what a container on exactly these networks may resolve.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct View {
    /// name -> (addresses, shuffle per answer)
    pub a: BTreeMap<String, (Vec<Ipv4Addr>, bool)>,
    pub ptr: BTreeMap<Ipv4Addr, Vec<String>>,
    /// `_PORT._PROTO.SVC` -> (target host name, port), one per serving task.
    pub srv: BTreeMap<String, Vec<(String, u16)>>,
    pub forward: bool,
}

impl View {
    /// True when every record of `self` is in `old` too: going from `old` to `self` only
    /// takes names and addresses away.
    pub fn only_removes_from(&self, old: &View) -> bool {
        self.forward == old.forward
            && self.a.iter().all(|(n, (ips, _))| {
                old.a
                    .get(n)
                    .is_some_and(|(o, _)| ips.iter().all(|ip| o.contains(ip)))
            })
            && self.ptr.iter().all(|(ip, ns)| {
                old.ptr
                    .get(ip)
                    .is_some_and(|o| ns.iter().all(|n| o.contains(n)))
            })
            && self.srv.iter().all(|(n, t)| {
                old.srv
                    .get(n)
                    .is_some_and(|o| t.iter().all(|x| o.contains(x)))
            })
    }

    fn add(&mut self, name: String, ip: Ipv4Addr, shuffle: bool) {
        let e = self
            .a
            .entry(name.to_ascii_lowercase())
            .or_insert_with(|| (vec![], shuffle));
        if !e.0.contains(&ip) {
            e.0.push(ip);
        }
        e.1 |= shuffle;
    }

    pub fn to_records(&self) -> shoal_dns::Records {
        let mut b = shoal_dns::Records::builder();
        for (name, (ips, shuffle)) in &self.a {
            b.a(name, ips, *shuffle);
        }
        for (ip, names) in &self.ptr {
            for n in names {
                b.ptr(*ip, n);
            }
        }
        for (name, targets) in &self.srv {
            b.srv(name, targets);
        }
        b.forward(self.forward);
        b.build()
    }
}

/// The records a container attached to `network_ids` (in its attachment order) sees.
/// Docker's names: `SVC`, `tasks.SVC`, aliases, `SVC.SLOT` and the full task name, plus the
/// `NAME.NETWORK` qualified forms. Only serving tasks appear.
pub fn dns_view(state: &ClusterState, network_ids: &[String]) -> View {
    // Internal-only containers never forward (Docker: no way out of --internal networks).
    let mut v = View {
        forward: network_ids
            .iter()
            .any(|id| state.network_by_id(id).is_some_and(|n| !n.internal)),
        ..View::default()
    };
    for net_id in network_ids {
        let Some(net) = state.network_by_id(net_id) else {
            continue;
        };
        for (svc, _) in state.services.values() {
            let Some(sn) = svc.networks.iter().find(|n| &n.network_id == net_id) else {
                continue;
            };
            let mut names = vec![svc.name.clone()];
            names.extend(sn.aliases.iter().cloned());
            let tasks: Vec<(&Task, Ipv4Addr)> = serving_ips(state, svc, net_id).collect();
            for name in &names {
                for qualified in [name.clone(), format!("{name}.{}", net.name)] {
                    match (svc.endpoint_mode, sn.vip) {
                        (EndpointMode::Vip, Some(vip)) => v.add(qualified.clone(), vip, false),
                        _ => {
                            for (_, ip) in &tasks {
                                v.add(qualified.clone(), *ip, true);
                            }
                        }
                    }
                    for (_, ip) in &tasks {
                        v.add(format!("tasks.{qualified}"), *ip, true);
                    }
                }
            }
            if let Some(vip) = sn.vip {
                v.ptr
                    .entry(vip)
                    .or_default()
                    .push(format!("{}.{}", svc.name, net.name));
            }
            // SRV for the service's ports (Docker's SRV handler never answers): one record
            // per serving task, its target the task's network-qualified name (an A record of
            // this view, sent along in the additional section).
            for p in &svc.ports {
                let targets: Vec<(String, u16)> = tasks
                    .iter()
                    .map(|(t, _)| (format!("{}.{}", t.name(), net.name), p.target))
                    .collect();
                for name in &names {
                    for qualified in [name.clone(), format!("{name}.{}", net.name)] {
                        let key = format!("_{}._{}.{qualified}", p.target, p.protocol)
                            .to_ascii_lowercase();
                        let e = v.srv.entry(key).or_default();
                        for t in &targets {
                            if !e.contains(t) {
                                e.push(t.clone());
                            }
                        }
                    }
                }
            }
            for (t, ip) in &tasks {
                for n in [t.name(), t.full_name()] {
                    v.add(n.clone(), *ip, false);
                    v.add(format!("{n}.{}", net.name), *ip, false);
                }
                v.ptr
                    .entry(*ip)
                    .or_default()
                    .push(format!("{}.{}", t.full_name(), net.name));
            }
        }
    }
    // Names with no serving task still exist (NODATA rather than NXDOMAIN) only when they
    // have a VIP; a dnsrr service without tasks has no records, as in Docker.
    for names in v.ptr.values_mut() {
        names.sort();
        names.dedup();
    }
    v
}

/// Tasks this node holds (any state): their endpoints stay attached until destroyed.
pub fn local_tasks<'a>(
    state: &'a ClusterState,
    node_id: &'a str,
) -> impl Iterator<Item = &'a Task> + 'a {
    state.task_list().filter(move |t| t.node_id == node_id)
}

/// The CNI attachment of a task whose container another runtime made (its sandbox is that
/// runtime's namespace), if it is one.
pub fn cni_of<'a>(state: &'a ClusterState, t: &Task) -> Option<&'a CniAttachment> {
    state
        .service_by_id(&t.service_id)?
        .standalone
        .as_ref()?
        .cni
        .as_ref()
}

/// The networks containers of other runtimes may join through the CNI plugin: the
/// attachable ones (never the ingress network), sorted by name.
pub fn cni_networks(state: &ClusterState) -> Vec<String> {
    let mut v: Vec<String> = state
        .networks
        .values()
        .filter(|n| n.attachable && !n.ingress)
        .map(|n| n.name.clone())
        .collect();
    v.sort();
    v
}

/// Where this node meets the other nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Underlay {
    pub addr: Ipv4Addr,
    pub dev: String,
}

pub const VXLAN_PORT: u16 = shoal_mesh::VXLAN_PORT;

/// Endpoints of a network on other live nodes, for the VXLAN forwarding entries.
fn remote_endpoints(
    state: &ClusterState,
    node_id: &str,
    network_id: &str,
) -> Vec<shoal_mesh::RemoteEndpoint> {
    let mut out: Vec<shoal_mesh::RemoteEndpoint> = state
        .task_list()
        .filter(|t| t.node_id != node_id && state.alive.contains(&t.node_id))
        .filter_map(|t| {
            let ip = t.ip_on(network_id)?;
            let vtep = state.nodes.get(&t.node_id)?.0.addr?;
            Some(shoal_mesh::RemoteEndpoint {
                ip,
                vtep,
                vtep_mac: shoal_api::model::vtep_mac(vtep),
            })
        })
        .collect();
    out.sort_by_key(|r| r.ip);
    out
}

/// The overlay networks this node must have: those with a local task that is attached
/// (its namespace prepared). `task_netns(task_id)` tells whether the runtime has it. With an
/// underlay, each network gets a VXLAN device towards the other live nodes.
pub fn mesh_specs(
    state: &ClusterState,
    node_id: &str,
    prefix: &str,
    underlay: Option<&Underlay>,
    task_netns: &dyn Fn(&str) -> Option<String>,
) -> BTreeMap<String, shoal_mesh::NetworkSpec> {
    let mut out: BTreeMap<String, shoal_mesh::NetworkSpec> = BTreeMap::new();
    for t in local_tasks(state, node_id) {
        let Some(tns) = task_netns(&t.id) else {
            continue;
        };
        // Tasks that publish ports answer clients anywhere through the ingress network
        // (unconnected UDP sockets pick their source address by route): their default route
        // is there, as Docker's is on docker_gwbridge (their way out is there too, when
        // they have one). Others default to their first network with a way out (not
        // `--internal`), else to their first network.
        let net_of = |n: &&shoal_api::model::TaskNetwork| state.network_by_id(&n.network_id);
        let default_net = t
            .networks
            .iter()
            .find(|n| net_of(n).is_some_and(|net| net.ingress))
            .or_else(|| {
                t.networks
                    .iter()
                    .find(|n| net_of(n).is_some_and(|net| !net.internal))
            })
            .or(t.networks.first())
            .map(|n| n.network_id.clone());
        let cni = cni_of(state, t);
        for (i, tn) in t.networks.iter().enumerate() {
            let Some(net) = state.network_by_id(&tn.network_id) else {
                continue;
            };
            let spec = out
                .entry(net.id.clone())
                .or_insert_with(|| network_spec(state, node_id, prefix, underlay, net));
            spec.endpoints.push(shoal_mesh::EndpointSpec {
                task_netns: tns.clone(),
                host_ifname: host_ifname(&t.id),
                // A CNI container's interface is named by its runtime (one network).
                ifname: cni.map_or_else(|| task_ifname(i), |c| c.ifname.clone()),
                ip: tn.ip,
                mac: shoal_api::model::mac_for(tn.ip),
                default_route: default_net.as_deref() == Some(tn.network_id.as_str()),
            });
        }
    }
    // The ingress network exists on every node while any port is published: every node
    // answers published ports and forwards to replicas anywhere.
    if let Some(ing) = ingress_network(state).filter(|_| any_published(state)) {
        let spec = out
            .entry(ing.id.clone())
            .or_insert_with(|| network_spec(state, node_id, prefix, underlay, ing));
        if let Some(vx) = &mut spec.vxlan {
            vx.peers = peer_nodes(state, node_id)
                .into_iter()
                .map(|vtep| shoal_mesh::Peer {
                    vtep,
                    vtep_mac: shoal_api::model::vtep_mac(vtep),
                })
                .collect();
        }
    }
    for spec in out.values_mut() {
        spec.endpoints
            .sort_by(|a, b| a.host_ifname.cmp(&b.host_ifname));
    }
    out
}

/// A network's spec on this node, without endpoints (and without VXLAN peers).
fn network_spec(
    state: &ClusterState,
    node_id: &str,
    prefix: &str,
    underlay: Option<&Underlay>,
    net: &Network,
) -> shoal_mesh::NetworkSpec {
    shoal_mesh::NetworkSpec {
        netns: network_netns(prefix, net),
        subnet: net.subnet,
        gateway: net.gateway,
        vips: vips_of(state, &net.id),
        mtu: if net.encrypted {
            ENCRYPTED_MTU
        } else {
            OVERLAY_MTU
        },
        endpoints: vec![],
        // Containers leave through their node unless the network is internal; the ingress
        // network's way out is its existing link to the node (see `guard_spec`).
        egress: (!net.internal && !net.ingress).then(|| shoal_mesh::egress::EgressSpec {
            node_netns: None,
            node_link: crate::names::egress_link(net),
        }),
        vxlan: underlay.map(|u| shoal_mesh::VxlanSpec {
            vni: net.vni,
            local: u.addr,
            underlay_netns: None,
            underlay_dev: u.dev.clone(),
            // An encrypted network's VXLAN has its own port, routed into WireGuard.
            port: if net.encrypted {
                shoal_mesh::ENCRYPTED_VXLAN_PORT
            } else {
                VXLAN_PORT
            },
            mac: shoal_api::model::vtep_mac(u.addr),
            remotes: remote_endpoints(state, node_id, &net.id),
            peers: vec![],
            extra_overhead: if net.encrypted { shoal_wg::OVERHEAD } else { 0 },
        }),
    }
}

/// The cluster's ingress network, once created.
pub fn ingress_network(state: &ClusterState) -> Option<&Network> {
    state.networks.values().find(|n| n.ingress)
}

/// Which node each task address (on any network, the ingress one included) is on, kept
/// across passes in `known`: the leader deletes the task records of a lost node soon after
/// it goes, possibly before this agent has seen them without their node. An address leaves
/// `known` when its task is gone and its node is alive. Returns the addresses on nodes that
/// are down: no flow NATed to one of them can be answered any more.
pub fn lost_targets(
    state: &ClusterState,
    known: &mut BTreeMap<Ipv4Addr, String>,
) -> BTreeSet<Ipv4Addr> {
    let now: BTreeMap<Ipv4Addr, String> = state
        .task_list()
        .flat_map(|t| t.networks.iter().map(|n| (n.ip, t.node_id.clone())))
        .collect();
    known.retain(|ip, node| !now.contains_key(ip) && !state.alive.contains(node));
    known.extend(now);
    known
        .iter()
        .filter(|(_, node)| !state.alive.contains(*node))
        .map(|(ip, _)| *ip)
        .collect()
}

/// True when some service publishes a port.
pub fn any_published(state: &ClusterState) -> bool {
    state.services.values().any(|(s, _)| !s.ports.is_empty())
}

/// Underlay addresses of the other live nodes, sorted.
fn peer_nodes(state: &ClusterState, node_id: &str) -> Vec<Ipv4Addr> {
    let mut v: Vec<Ipv4Addr> = state
        .nodes
        .values()
        .filter(|(n, _)| n.id != node_id && state.alive.contains(&n.id))
        .filter_map(|(n, _)| n.addr)
        .collect();
    v.sort();
    v.dedup();
    v
}

/// `want` restricted to what may change before this pass has routed new endpoints: services
/// of `applied` only, each with the backends of `want` that `applied` already had (backends
/// leave or start draining; none arrives).
pub fn removals_only(want: &shoal_lb::Ruleset, applied: &shoal_lb::Ruleset) -> shoal_lb::Ruleset {
    let mut out = want.clone();
    out.services.retain_mut(|s| {
        let Some(old) = applied.services.iter().find(|o| {
            (o.id.as_str(), o.vip, o.protocol, o.port) == (s.id.as_str(), s.vip, s.protocol, s.port)
        }) else {
            return false;
        };
        let had = |b: &Ipv4Addr| old.backends.contains(b) || old.draining.contains(b);
        s.backends.retain(had);
        s.draining.retain(had);
        true
    });
    out.vips
        .retain(|v| applied.vips.contains(v) || applied.services.iter().any(|s| s.vip == *v));
    out
}

/// The published ports of `want` that may be applied before this pass has routed new
/// endpoints: ports and backends only leave (the published-port twin of [`removals_only`]).
pub fn publish_removals_only(
    want: &shoal_lb::publish::PublishSpec,
    applied: &shoal_lb::publish::PublishSpec,
) -> shoal_lb::publish::PublishSpec {
    let mut out = want.clone();
    out.ports.retain_mut(|p| {
        let Some(o) = applied
            .ports
            .iter()
            .find(|o| (o.protocol, o.port, o.kind) == (p.protocol, p.port, p.kind))
        else {
            return false;
        };
        p.backends.retain(|b| o.backends.contains(b));
        true
    });
    out
}

/// The node namespace's guard table: VXLAN only from the other registered nodes (alive or
/// not: a lease that lapses for a moment must not cut a node off), and only DNATed flows
/// through the ingress link.
pub fn guard_spec(
    state: &ClusterState,
    node_id: &str,
    overlays: &BTreeMap<String, shoal_mesh::NetworkSpec>,
    wg_port: Option<u16>,
) -> shoal_lb::guard::GuardSpec {
    let mut peers: Vec<Ipv4Addr> = state
        .nodes
        .values()
        .filter(|(n, _)| n.id != node_id)
        .filter_map(|(n, _)| n.addr)
        .collect();
    peers.sort();
    peers.dedup();
    shoal_lb::guard::GuardSpec {
        vxlan_port: shoal_mesh::VXLAN_PORT,
        peers,
        ingress_link: Some(shoal_mesh::ingress::NODE_LINK.to_string()),
        egress_links: overlays
            .values()
            .filter_map(|n| n.egress.as_ref().map(|e| e.node_link.clone()))
            .collect(),
        egress_sources: egress_sources(state, node_id),
        // With any encrypted network in the cluster (whether this node's WireGuard works or
        // not: without it their traffic is dropped here, never sent in the clear).
        wireguard: any_encrypted(state).then(|| shoal_lb::guard::WgGuard {
            port: wg_port.unwrap_or(shoal_wg::DEFAULT_PORT),
            ifname: shoal_wg::IFNAME.to_string(),
            vxlan_port: shoal_mesh::ENCRYPTED_VXLAN_PORT,
            vnis: state
                .networks
                .values()
                .filter(|n| n.encrypted)
                .map(|n| n.vni)
                .collect(),
        }),
    }
}

/// True when some network of the cluster is encrypted.
pub fn any_encrypted(state: &ClusterState) -> bool {
    state.networks.values().any(|n| n.encrypted)
}

/// This node's WireGuard: its key and port (the agent's, from its state directory).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WgFacts {
    pub private_key: shoal_wg::Key,
    pub port: u16,
    pub backend: shoal_wg::Backend,
}

/// The node's WireGuard device while the cluster has an encrypted network: one peer per
/// other live node that has published its key (its underlay address as the only allowed
/// IP; peers follow liveness as the VXLAN FDB does).
pub fn wireguard_spec(
    state: &ClusterState,
    node_id: &str,
    underlay: Option<&Underlay>,
    wg: Option<&WgFacts>,
) -> Option<shoal_wg::DeviceSpec> {
    let (u, wg) = (underlay?, wg?);
    if !any_encrypted(state) {
        return None;
    }
    let mut peers: Vec<shoal_wg::PeerSpec> = state
        .nodes
        .values()
        .filter(|(n, _)| n.id != node_id && state.alive.contains(&n.id))
        .filter_map(|(n, _)| {
            let addr = n.addr?;
            let w = n.wireguard.as_ref()?;
            let public_key = w.public_key.parse().ok()?;
            Some(shoal_wg::PeerSpec {
                public_key,
                endpoint: std::net::SocketAddrV4::new(addr, w.port),
                allowed: addr,
            })
        })
        .collect();
    peers.sort_by_key(|p| p.allowed);
    Some(shoal_wg::DeviceSpec {
        ifname: shoal_wg::IFNAME.to_string(),
        backend: wg.backend,
        port: wg.port,
        private_key: wg.private_key,
        underlay_dev: u.dev.clone(),
        route_udp_dport: shoal_mesh::ENCRYPTED_VXLAN_PORT,
        peers,
    })
}

/// Ingress addresses of the local tasks with a way out (a network that is not internal):
/// publishing tasks default-route through the ingress network, so that is their way out.
fn egress_sources(state: &ClusterState, node_id: &str) -> Vec<Ipv4Addr> {
    let Some(ing) = ingress_network(state) else {
        return vec![];
    };
    let mut v: Vec<Ipv4Addr> = local_tasks(state, node_id)
        .filter(|t| {
            t.networks.iter().any(|n| {
                state
                    .network_by_id(&n.network_id)
                    .is_some_and(|net| !net.internal && !net.ingress)
            })
        })
        .filter_map(|t| t.ip_on(&ing.id))
        .collect();
    v.sort();
    v
}

/// The ingress plumbing of this node (link to the node namespace, return path per peer,
/// local tasks' source routes); None while nothing is published.
pub fn ingress_spec(
    state: &ClusterState,
    node_id: &str,
    prefix: &str,
    underlay: Option<&Underlay>,
    task_netns: &dyn Fn(&str) -> Option<String>,
) -> Option<shoal_mesh::ingress::IngressSpec> {
    let ing = ingress_network(state).filter(|_| any_published(state))?;
    let mut tasks = vec![];
    for t in local_tasks(state, node_id) {
        let Some(tns) = task_netns(&t.id) else {
            continue;
        };
        if let Some(i) = t.networks.iter().position(|n| n.network_id == ing.id) {
            tasks.push(shoal_mesh::ingress::TaskIngress {
                task_netns: tns,
                ifname: task_ifname(i),
                ip: t.networks[i].ip,
            });
        }
    }
    tasks.sort_by_key(|t| t.ip);
    Some(shoal_mesh::ingress::IngressSpec {
        netns: network_netns(prefix, ing),
        node_netns: None,
        subnet: ing.subnet,
        gateway: ing.gateway,
        peers: if underlay.is_some() {
            peer_nodes(state, node_id)
        } else {
            vec![]
        },
        tasks,
    })
}

/// The ingress namespace's node marks: each other live node's VTEP MAC -> its mark.
pub fn ingress_marks(state: &ClusterState, node_id: &str) -> BTreeMap<[u8; 6], u32> {
    peer_nodes(state, node_id)
        .into_iter()
        .map(|ip| {
            (
                shoal_api::model::vtep_mac(ip),
                shoal_mesh::ingress::peer_mark(ip),
            )
        })
        .collect()
}

/// Published ports as this node programs them: ingress ports to every serving replica's
/// ingress address, host ports to local serving replicas only.
pub fn publish_spec(
    state: &ClusterState,
    node_id: &str,
    node_addr: Ipv4Addr,
) -> Option<shoal_lb::publish::PublishSpec> {
    use shoal_lb::publish::{PublishKind, PublishedPort};
    let ing = ingress_network(state).filter(|_| any_published(state))?;
    let mut ports = vec![];
    for (svc, _) in state.services.values() {
        for p in &svc.ports {
            if p.published == 0 {
                continue;
            }
            let kind = match (p.mode, p.snat) {
                (PublishMode::Host, _) => PublishKind::Host,
                (PublishMode::Ingress, true) => PublishKind::IngressSnat,
                (PublishMode::Ingress, false) => PublishKind::Ingress,
            };
            let mut backends: Vec<(Ipv4Addr, u16)> = serving_ips(state, svc, &ing.id)
                .filter(|(t, _)| kind != PublishKind::Host || t.node_id == node_id)
                .map(|(_, ip)| (ip, p.target))
                .collect();
            backends.sort();
            ports.push(PublishedPort {
                protocol: match p.protocol {
                    shoal_api::model::Protocol::Tcp => shoal_lb::Protocol::Tcp,
                    shoal_api::model::Protocol::Udp => shoal_lb::Protocol::Udp,
                },
                port: p.published,
                kind,
                backends,
            });
        }
    }
    ports.sort_by_key(|p| (p.protocol, p.port));
    Some(shoal_lb::publish::PublishSpec {
        node_addr,
        link: shoal_mesh::ingress::NODE_LINK.to_string(),
        ports,
    })
}

fn vips_of(state: &ClusterState, network_id: &str) -> Vec<Ipv4Addr> {
    let set: BTreeSet<Ipv4Addr> = state
        .services
        .values()
        .filter_map(|(s, _)| s.networks.iter().find(|n| n.network_id == network_id)?.vip)
        .collect();
    set.into_iter().collect()
}

/// The VIP ruleset of one network on this node. A VIP forwards every TCP and UDP port to the
/// same port of a serving task (Docker Swarm's VIP semantics: no port list needed).
pub fn lb_ruleset(state: &ClusterState, node_id: &str, network_id: &str) -> shoal_lb::Ruleset {
    let mut services = vec![];
    for (svc, _) in state.services.values() {
        let Some(sn) = svc.networks.iter().find(|n| n.network_id == network_id) else {
            continue;
        };
        let Some(vip) = sn.vip else { continue };
        let mut backends: Vec<Ipv4Addr> = serving_ips(state, svc, network_id)
            .map(|(_, ip)| ip)
            .collect();
        backends.sort();
        // Tasks being stopped (the grace period between leaving DNS and SIGTERM) drain:
        // no new connections, established ones (UDP flows too) continue.
        let mut draining: Vec<Ipv4Addr> = state
            .task_list()
            .filter(|t| {
                t.service_id == svc.id
                    && t.state == TaskState::Running
                    && t.desired_state != TaskState::Running
                    && state.alive.contains(&t.node_id)
            })
            .filter_map(|t| t.ip_on(network_id))
            .collect();
        draining.sort();
        let selection = match svc.lb.selection {
            LbSelection::Random => shoal_lb::Selection::Random,
            LbSelection::Consistent => shoal_lb::Selection::Consistent,
        };
        for protocol in [shoal_lb::Protocol::Tcp, shoal_lb::Protocol::Udp] {
            services.push(shoal_lb::VirtualService {
                id: svc.id[..svc.id.len().min(12)].to_string(),
                vip,
                protocol,
                port: 0,
                target_port: 0,
                backends: backends.clone(),
                draining: draining.clone(),
                selection,
                affinity: svc.lb.affinity_secs,
            });
        }
    }
    services.sort_by_key(|s| (s.vip, s.protocol));
    // Hairpin masquerade matters only for local tasks that can be picked as backends.
    let mut local: Vec<Ipv4Addr> = local_tasks(state, node_id)
        .filter(|t| state.serving(t))
        .filter_map(|t| t.ip_on(network_id))
        .collect();
    local.sort();
    shoal_lb::Ruleset {
        table: LB_TABLE.to_string(),
        vips: vips_of(state, network_id),
        services,
        local_endpoints: local,
    }
}

/// The resolv.conf of a task: our resolver and the node's search list.
pub fn resolv_conf(search: &[String]) -> String {
    let mut s = String::from("# written by shoal\nnameserver 127.0.0.11\n");
    if !search.is_empty() {
        s.push_str(&format!("search {}\n", search.join(" ")));
    }
    s
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Removing a task only removes records; adding one (or a service) does not.
    #[test]
    fn a_view_knows_when_it_only_removes() {
        let st = fixture();
        let nets: Vec<String> = st.tasks["t1"]
            .0
            .networks
            .iter()
            .map(|n| n.network_id.clone())
            .collect();
        let full = dns_view(&st, &nets);
        let mut less = st.clone();
        less.tasks.remove("t1");
        let fewer = dns_view(&less, &nets);
        assert_ne!(full, fewer, "the fixture's t1 is in the view");
        assert!(fewer.only_removes_from(&full));
        assert!(!full.only_removes_from(&fewer));
        assert!(full.only_removes_from(&full));
    }
    use shoal_api::model::*;

    pub(crate) fn net(id: &str, name: &str, subnet: &str, internal: bool) -> Network {
        let subnet: ipnet::Ipv4Net = subnet.parse().unwrap();
        Network {
            id: id.into(),
            name: name.into(),
            driver: "overlay".into(),
            subnet,
            gateway: shoal_control::alloc::default_gateway(&subnet),
            vni: 4096,
            attachable: false,
            internal,
            ingress: false,
            encrypted: false,
        }
    }

    pub(crate) fn task(
        id: &str,
        svc: &Service,
        slot: u32,
        node: &str,
        nets: &[(&str, &str)],
        state: TaskState,
    ) -> Task {
        Task {
            id: id.into(),
            service_id: svc.id.clone(),
            service_name: svc.name.clone(),
            slot,
            node_id: node.into(),
            desired_state: TaskState::Running,
            state,
            networks: nets
                .iter()
                .map(|(nid, ip)| TaskNetwork {
                    network: String::new(),
                    network_id: (*nid).into(),
                    ip: ip.parse().unwrap(),
                    mac: String::new(),
                })
                .collect(),
            error: None,
            health: None,
        }
    }

    pub(crate) fn fixture() -> ClusterState {
        let mut st = ClusterState::default();
        st.networks.insert(
            "appnet".into(),
            net("n1aaaaaaaaaaaa", "appnet", "10.0.1.0/24", false),
        );
        st.networks.insert(
            "other".into(),
            net("n2bbbbbbbbbbbb", "other", "10.0.2.0/24", true),
        );
        let web = Service {
            id: "s1".into(),
            name: "web".into(),
            networks: vec![ServiceNetwork {
                network: "appnet".into(),
                network_id: "n1aaaaaaaaaaaa".into(),
                aliases: vec!["www".into()],
                vip: Some("10.0.1.2".parse().unwrap()),
            }],
            replicas: 2,
            endpoint_mode: EndpointMode::Vip,
            ports: vec![PortConfig {
                published: 8080,
                target: 80,
                protocol: Protocol::Tcp,
                mode: PublishMode::Ingress,
                snat: false,
            }],
            image: None,
            command: vec!["x".into()],
            env: vec![],
            health: None,
            lb: Default::default(),
            standalone: None,
        };
        let db = Service {
            id: "s2".into(),
            name: "db".into(),
            networks: vec![ServiceNetwork {
                network: "other".into(),
                network_id: "n2bbbbbbbbbbbb".into(),
                aliases: vec![],
                vip: None,
            }],
            replicas: 1,
            endpoint_mode: EndpointMode::Dnsrr,
            ports: vec![],
            image: None,
            command: vec!["x".into()],
            env: vec![],
            health: None,
            lb: Default::default(),
            standalone: None,
        };
        let t1 = task(
            "t1",
            &web,
            1,
            "me",
            &[("n1aaaaaaaaaaaa", "10.0.1.3")],
            TaskState::Running,
        );
        let t2 = task(
            "t2",
            &web,
            2,
            "other-node",
            &[("n1aaaaaaaaaaaa", "10.0.1.4")],
            TaskState::Running,
        );
        let t3 = task(
            "t3",
            &web,
            3,
            "me",
            &[("n1aaaaaaaaaaaa", "10.0.1.5")],
            TaskState::Starting,
        );
        let t4 = task(
            "t4",
            &db,
            1,
            "me",
            &[("n2bbbbbbbbbbbb", "10.0.2.3")],
            TaskState::Running,
        );
        st.services.insert("web".into(), (web, 1));
        st.services.insert("db".into(), (db, 1));
        for t in [t1, t2, t3, t4] {
            st.tasks.insert(t.id.clone(), (t, 1));
        }
        st.alive.insert("me".into());
        st.alive.insert("other-node".into());
        st
    }

    fn ips(v: &View, name: &str) -> Vec<String> {
        let mut r: Vec<String> =
            v.a.get(name)
                .map(|(ips, _)| ips.iter().map(|i| i.to_string()).collect())
                .unwrap_or_default();
        r.sort();
        r
    }

    #[test]
    fn lost_targets_outlive_the_task_records_of_a_dead_node() {
        let mut st = fixture();
        let mut known = BTreeMap::new();
        assert!(lost_targets(&st, &mut known).is_empty());
        assert_eq!(known.len(), 4);
        let t2: Ipv4Addr = "10.0.1.4".parse().unwrap();
        // other-node dies: its task's address is lost.
        st.alive.remove("other-node");
        assert_eq!(lost_targets(&st, &mut known), [t2].into());
        // The leader deletes the record: still lost (the agent may not have cleaned yet).
        st.tasks.remove("t2");
        assert_eq!(lost_targets(&st, &mut known), [t2].into());
        // A task of a live node that goes (scale-down) is not lost: it may drain.
        st.tasks.remove("t1");
        assert_eq!(lost_targets(&st, &mut known), [t2].into());
        assert!(!known.contains_key(&"10.0.1.3".parse().unwrap()));
        // The node comes back: nothing is lost, and the gone task is forgotten.
        st.alive.insert("other-node".into());
        assert!(lost_targets(&st, &mut known).is_empty());
        assert!(!known.contains_key(&t2));
        // An address handed to a task on a live node is not lost, whatever it was before.
        st.alive.remove("other-node");
        let mut t5 = st.tasks["t4"].0.clone();
        t5.id = "t5".into();
        t5.networks[0].ip = t2;
        st.tasks.insert("t5".into(), (t5, 2));
        known.insert(t2, "other-node".into());
        assert!(lost_targets(&st, &mut known).is_empty());
    }

    #[test]
    fn view_has_docker_names_for_own_networks_only() {
        let st = fixture();
        let v = dns_view(&st, &["n1aaaaaaaaaaaa".into()]);
        assert_eq!(ips(&v, "web"), ["10.0.1.2"]);
        assert_eq!(ips(&v, "web.appnet"), ["10.0.1.2"]);
        assert_eq!(ips(&v, "www"), ["10.0.1.2"]);
        // Only serving tasks: t3 is still starting.
        assert_eq!(ips(&v, "tasks.web"), ["10.0.1.3", "10.0.1.4"]);
        assert!(v.a["tasks.web"].1, "tasks.SVC answers are shuffled");
        assert_eq!(ips(&v, "web.1"), ["10.0.1.3"]);
        assert_eq!(ips(&v, "web.2.t2"), ["10.0.1.4"]);
        assert!(ips(&v, "web.3").is_empty());
        // db lives on a network this container is not on.
        assert!(ips(&v, "db").is_empty());
        assert!(v.forward);
        assert_eq!(v.ptr[&"10.0.1.2".parse().unwrap()], ["web.appnet"]);
        assert_eq!(v.ptr[&"10.0.1.3".parse().unwrap()], ["web.1.t1.appnet"]);
        // SRV for declared ports: one record per serving task.
        let srv = &v.srv["_80._tcp.web"];
        assert_eq!(srv.len(), 2);
        assert!(srv.contains(&("web.1.appnet".to_string(), 80)));
        assert_eq!(v.srv["_80._tcp.www.appnet"].len(), 2);
    }

    #[test]
    fn fast_path_only_removes() {
        let vs = |id: &str, vip: [u8; 4], backends: &[[u8; 4]], draining: &[[u8; 4]]| {
            shoal_lb::VirtualService {
                id: id.into(),
                vip: vip.into(),
                protocol: shoal_lb::Protocol::Tcp,
                port: 80,
                target_port: 80,
                backends: backends.iter().map(|b| (*b).into()).collect(),
                draining: draining.iter().map(|b| (*b).into()).collect(),
                selection: Default::default(),
                affinity: None,
            }
        };
        let applied = shoal_lb::Ruleset {
            table: "t".into(),
            vips: vec![[10, 0, 0, 2].into()],
            services: vec![vs("a", [10, 0, 0, 2], &[[10, 0, 0, 3], [10, 0, 0, 4]], &[])],
            ..Default::default()
        };
        let want = shoal_lb::Ruleset {
            table: "t".into(),
            vips: vec![[10, 0, 0, 2].into(), [10, 0, 0, 9].into()],
            services: vec![
                // .4 drains, .5 is new (no route yet), .3 stays.
                vs(
                    "a",
                    [10, 0, 0, 2],
                    &[[10, 0, 0, 3], [10, 0, 0, 5]],
                    &[[10, 0, 0, 4]],
                ),
                // A new service waits for the full pass.
                vs("b", [10, 0, 0, 9], &[[10, 0, 0, 6]], &[]),
            ],
            ..Default::default()
        };
        let fast = removals_only(&want, &applied);
        assert_eq!(fast.vips, vec![Ipv4Addr::new(10, 0, 0, 2)]);
        assert_eq!(
            fast.services,
            vec![vs("a", [10, 0, 0, 2], &[[10, 0, 0, 3]], &[[10, 0, 0, 4]])]
        );
    }

    #[test]
    fn dnsrr_and_internal() {
        let st = fixture();
        let v = dns_view(&st, &["n2bbbbbbbbbbbb".into()]);
        assert_eq!(ips(&v, "db"), ["10.0.2.3"]);
        assert!(v.a["db"].1);
        assert!(ips(&v, "web").is_empty());
        assert!(!v.forward, "internal-only containers never forward");
    }

    #[test]
    fn lb_ruleset_uses_serving_backends_and_local_hairpin() {
        let st = fixture();
        let rs = lb_ruleset(&st, "me", "n1aaaaaaaaaaaa");
        assert_eq!(rs.table, LB_TABLE);
        assert_eq!(rs.vips, vec!["10.0.1.2".parse::<Ipv4Addr>().unwrap()]);
        assert_eq!(rs.services.len(), 2, "tcp and udp");
        let be: Vec<String> = rs.services[0]
            .backends
            .iter()
            .map(|i| i.to_string())
            .collect();
        assert_eq!(be, ["10.0.1.3", "10.0.1.4"]);
        let local: Vec<String> = rs.local_endpoints.iter().map(|i| i.to_string()).collect();
        assert_eq!(local, ["10.0.1.3"], "only serving local tasks need hairpin");
    }

    #[test]
    fn lb_ruleset_drains_stopping_tasks_and_carries_lb_options() {
        let mut st = fixture();
        // t2 is being stopped (grace period): it drains; t1 still serves.
        st.tasks.get_mut("t2").unwrap().0.desired_state = TaskState::Shutdown;
        let web = &mut st.services.get_mut("web").unwrap().0;
        web.lb = shoal_api::model::LbOptions {
            selection: LbSelection::Consistent,
            affinity_secs: Some(600),
        };
        let rs = lb_ruleset(&st, "me", "n1aaaaaaaaaaaa");
        for s in &rs.services {
            assert_eq!(s.backends, vec!["10.0.1.3".parse::<Ipv4Addr>().unwrap()]);
            assert_eq!(s.draining, vec!["10.0.1.4".parse::<Ipv4Addr>().unwrap()]);
            assert_eq!(s.selection, shoal_lb::Selection::Consistent);
            assert_eq!(s.affinity, Some(600));
        }
        // A stopping task on a dead node does not drain: it is gone.
        st.alive.remove("other-node");
        let rs = lb_ruleset(&st, "me", "n1aaaaaaaaaaaa");
        assert!(rs.services.iter().all(|s| s.draining.is_empty()));
    }

    #[test]
    fn mesh_specs_only_for_attached_local_tasks() {
        let st = fixture();
        let specs = mesh_specs(&st, "me", "p-", None, &|id| {
            (id != "t3").then(|| format!("p-t-{id}"))
        });
        assert_eq!(specs.len(), 2);
        let app = &specs["n1aaaaaaaaaaaa"];
        assert_eq!(app.netns, "p-n-n1aaaaaaaaaa");
        assert_eq!(app.endpoints.len(), 1);
        assert_eq!(app.endpoints[0].host_ifname, "svt1");
        assert_eq!(app.endpoints[0].ifname, "eth0");
        assert!(app.endpoints[0].default_route);
        assert_eq!(app.vips, vec!["10.0.1.2".parse::<Ipv4Addr>().unwrap()]);
        assert_eq!(app.gateway.to_string(), "10.0.1.1");
    }

    /// Non-internal networks get a way out; a task defaults to the ingress network when it
    /// publishes, else to its first network with a way out; the guard lets out the ingress
    /// addresses of tasks with a way out only.
    #[test]
    fn egress_follows_internal() {
        let mut st = fixture();
        // t4 (db, internal "other") also joins appnet, second.
        st.tasks
            .get_mut("t4")
            .unwrap()
            .0
            .networks
            .push(TaskNetwork {
                network: String::new(),
                network_id: "n1aaaaaaaaaaaa".into(),
                ip: "10.0.1.9".parse().unwrap(),
                mac: String::new(),
            });
        let all = |id: &str| Some(format!("p-t-{id}"));
        let specs = mesh_specs(&st, "me", "p-", None, &all);
        let app = &specs["n1aaaaaaaaaaaa"];
        assert_eq!(
            app.egress.as_ref().map(|e| e.node_link.as_str()),
            Some("se-n1aaaaaaaaaa")
        );
        assert_eq!(specs["n2bbbbbbbbbbbb"].egress, None, "internal: no way out");
        let t4_app = app
            .endpoints
            .iter()
            .find(|e| e.host_ifname == "svt4")
            .unwrap();
        let t4_other = &specs["n2bbbbbbbbbbbb"].endpoints[0];
        assert!(t4_app.default_route && !t4_other.default_route);
        let guard = guard_spec(&st, "me", &specs, None);
        assert_eq!(guard.egress_links, ["se-n1aaaaaaaaaa"]);
        assert!(guard.egress_sources.is_empty(), "no ingress network yet");

        // With the ingress network: t1 (publishes, appnet) may leave through it; a task on
        // the internal network only (t5) may not, though it publishes too.
        let mut ing = net("ingressnetid0", "ingress", "10.255.0.0/16", false);
        ing.ingress = true;
        st.networks.insert("ingress".into(), ing);
        let web = st.services["web"].0.clone();
        for (id, nets) in [
            (
                "t1",
                vec![
                    ("n1aaaaaaaaaaaa", "10.0.1.3"),
                    ("ingressnetid0", "10.255.0.3"),
                ],
            ),
            (
                "t5",
                vec![
                    ("n2bbbbbbbbbbbb", "10.0.2.5"),
                    ("ingressnetid0", "10.255.0.5"),
                ],
            ),
        ] {
            let t = task(id, &web, 9, "me", &nets, TaskState::Running);
            st.tasks.insert(id.into(), (t, 2));
        }
        let specs = mesh_specs(&st, "me", "p-", None, &all);
        assert_eq!(
            specs["ingressnetid0"].egress, None,
            "ingress leaves by its own link"
        );
        let t1_ing = specs["ingressnetid0"]
            .endpoints
            .iter()
            .find(|e| e.host_ifname == "svt1")
            .unwrap();
        assert!(
            t1_ing.default_route,
            "publishers default to the ingress network"
        );
        let guard = guard_spec(&st, "me", &specs, None);
        assert_eq!(
            guard.egress_sources,
            ["10.255.0.3".parse::<Ipv4Addr>().unwrap()]
        );
    }

    /// WireGuard is planned only with an encrypted network, a key and an underlay; its peers
    /// are the other live nodes that published a key (their underlay address as the only
    /// allowed IP); the guard gets the encrypted VNIs.
    #[test]
    fn wireguard_follows_encrypted_networks_and_liveness() {
        let mut st = fixture();
        let u = Underlay {
            addr: "192.0.2.1".parse().unwrap(),
            dev: "eth0".into(),
        };
        let wg = WgFacts {
            private_key: shoal_wg::Key([7; 32]),
            port: 51820,
            backend: shoal_wg::Backend::Auto,
        };
        let peer_key = shoal_wg::Key([9; 32]).public();
        for (id, addr, key) in [
            ("me", "192.0.2.1", Some(wg.private_key.public())),
            ("other-node", "192.0.2.2", Some(peer_key)),
            ("keyless", "192.0.2.3", None),
            ("dead", "192.0.2.4", Some(shoal_wg::Key([5; 32]).public())),
        ] {
            let node = Node {
                id: id.into(),
                name: id.into(),
                addr: Some(addr.parse().unwrap()),
                status: NodeStatus::Ready,
                version: String::new(),
                listening: vec![],
                peer_port: None,
                wireguard: key.map(|k| NodeWireguard {
                    public_key: k.to_base64(),
                    port: 51820,
                }),
            };
            st.nodes.insert(id.into(), (node, 1));
        }
        st.alive.insert("keyless".into());
        assert_eq!(
            wireguard_spec(&st, "me", Some(&u), Some(&wg)),
            None,
            "nothing encrypted"
        );
        let overlays = BTreeMap::new();
        assert_eq!(
            guard_spec(&st, "me", &overlays, Some(51820)).wireguard,
            None
        );

        st.networks.get_mut("appnet").unwrap().encrypted = true;
        let spec = wireguard_spec(&st, "me", Some(&u), Some(&wg)).unwrap();
        assert_eq!(spec.private_key, wg.private_key);
        assert_eq!(spec.route_udp_dport, shoal_mesh::ENCRYPTED_VXLAN_PORT);
        assert_eq!(spec.underlay_dev, "eth0");
        let peers: Vec<(shoal_wg::Key, String, Ipv4Addr)> = spec
            .peers
            .iter()
            .map(|p| (p.public_key, p.endpoint.to_string(), p.allowed))
            .collect();
        assert_eq!(
            peers,
            [(
                peer_key,
                "192.0.2.2:51820".to_string(),
                "192.0.2.2".parse().unwrap()
            )],
            "only live nodes with a key, never this node"
        );
        assert_eq!(
            wireguard_spec(&st, "me", None, Some(&wg)),
            None,
            "no underlay"
        );
        assert_eq!(
            wireguard_spec(&st, "me", Some(&u), None),
            None,
            "WireGuard off"
        );
        let g = guard_spec(&st, "me", &overlays, Some(51820))
            .wireguard
            .unwrap();
        assert_eq!(g.vnis, [4096]);
        assert_eq!(g.vxlan_port, shoal_mesh::ENCRYPTED_VXLAN_PORT);
        // An encrypted network's containers get the lower MTU, its VXLAN the other port.
        let specs = mesh_specs(&st, "me", "p-", Some(&u), &|id| Some(format!("p-t-{id}")));
        let app = &specs["n1aaaaaaaaaaaa"];
        assert_eq!(app.mtu, ENCRYPTED_MTU);
        assert_eq!(ENCRYPTED_MTU, 1390);
        let vx = app.vxlan.as_ref().unwrap();
        assert_eq!(vx.port, shoal_mesh::ENCRYPTED_VXLAN_PORT);
        assert_eq!(vx.extra_overhead, shoal_wg::OVERHEAD);
        assert_eq!(
            specs["n2bbbbbbbbbbbb"].mtu, OVERLAY_MTU,
            "plain networks unchanged"
        );
    }

    #[test]
    fn resolv_conf_lines() {
        assert_eq!(
            resolv_conf(&[]),
            "# written by shoal\nnameserver 127.0.0.11\n"
        );
        assert!(resolv_conf(&["lab.local".into()]).contains("search lab.local\n"));
    }
}
