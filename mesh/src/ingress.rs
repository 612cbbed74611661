//! The ingress network's extra plumbing on one node, on top of what [`crate::apply_network`]
//! does for every overlay network (namespace, endpoints, VXLAN device):
//!
//! - a veth pair [`NODE_LINK`] (node namespace, 169.254.83.1/30) <-> [`NS_LINK`] (ingress
//!   namespace, 169.254.83.2/30): the node reaches the ingress subnet through it
//!   (`SUBNET via 169.254.83.2`, the DNAT of published ports sends packets there) and the
//!   ingress namespace's default route points back (`default via 169.254.83.1`);
//! - the return path that keeps client addresses: the ingress namespace marks each flow that
//!   arrived over VXLAN with the sending node (an nft table of shoal-lb sets the conntrack
//!   mark from the inner source MAC and restores it on every packet); here, per peer node, a
//!   rule `fwmark <peer> lookup <peer>` and in that table `default via <peer underlay
//!   address> dev vxlan0 onlink` (the address is only a next hop: a permanent neighbour entry
//!   made by the VXLAN part resolves it to the peer's MAC). Ahead of them
//!   `lookup main suppress_prefixlength 0`, so marked packets still reach local endpoints
//!   and remote ones by their /32 routes; `src_valid_mark=1` lets strict reverse-path
//!   filtering accept the client's packets on the VXLAN device with that mark;
//! - in each local task attached to the ingress network: `from <task ingress ip> lookup
//!   83` with `default via <ingress gateway> dev <ifname> onlink` there, so the task answers
//!   ingress flows through the ingress network, whatever its default route.
//!
//! Marks and table numbers of a peer are its underlay IPv4 address as a u32: unique per node,
//! the same on every node, stable while nodes come and go.
//!
//! Ownership: the two link names are reserved; routes and rules of ours carry protocol
//! [`SHOAL_RT_PROTO`] (rules: priorities [`RULE_PREF_MAIN`] and [`RULE_PREF_PEER`] in the
//! ingress namespace, which is ours).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use rtnetlink::IpVersion;

use crate::nl::{Nl, Route};
use crate::pair::{ensure_addr, ensure_pair, ensure_route, ensure_up};
use crate::{Applied, MeshError, SHOAL_RT_PROTO, VXLAN_IFNAME};

/// Node-side end of the link to the ingress namespace.
pub const NODE_LINK: &str = "shoal-ingress";
/// Ingress-namespace end of that link.
pub const NS_LINK: &str = "gw0";
/// Node-side address of the link (also where the ingress namespace's default route points).
pub const NODE_LINK_ADDR: Ipv4Addr = Ipv4Addr::new(169, 254, 83, 1);
/// Ingress-namespace address of the link (the node's next hop to the ingress subnet).
pub const NS_LINK_ADDR: Ipv4Addr = Ipv4Addr::new(169, 254, 83, 2);
const LINK_PREFIX: u8 = 30;
/// Routing table of a task's ingress source route.
pub const TASK_TABLE: u32 = 83;
/// `lookup main suppress_prefixlength 0` in the ingress namespace.
pub const RULE_PREF_MAIN: u32 = 90;
/// `fwmark <peer> lookup <peer>` in the ingress namespace; `from <ip> lookup 83` in tasks.
pub const RULE_PREF_PEER: u32 = 100;
const RT_TABLE_MAIN: u32 = 254;

/// A peer node's mark and routing table number.
pub fn peer_mark(vtep: Ipv4Addr) -> u32 {
    u32::from(vtep)
}

/// What [`apply_ingress`] converges to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngressSpec {
    /// The ingress network namespace (made by `apply_network` beforehand).
    pub netns: String,
    /// The node's namespace (where published ports are DNATed); None = this process's.
    pub node_netns: Option<String>,
    /// The ingress subnet, routed from the node into the ingress namespace.
    pub subnet: ipnet::Ipv4Net,
    /// The ingress network's gateway (on `lo` of the ingress namespace).
    pub gateway: Ipv4Addr,
    /// Underlay addresses of the other live nodes (need the VXLAN part's `peers`).
    pub peers: Vec<Ipv4Addr>,
    /// Local tasks' ingress interfaces: source routing so they answer through it.
    pub tasks: Vec<TaskIngress>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskIngress {
    pub task_netns: String,
    pub ifname: String,
    pub ip: Ipv4Addr,
}

/// The node's namespace: a name or path, or this process's.
fn node_ns(node_netns: Option<&str>) -> String {
    node_netns.unwrap_or("/proc/self/ns/net").to_string()
}

/// Converges the link, routes, rules and task source routes. Idempotent.
#[tracing::instrument(skip_all, fields(netns = %spec.netns))]
pub async fn apply_ingress(spec: &IngressSpec) -> Result<Applied, MeshError> {
    let mut ap = Applied::default();
    let nodens = node_ns(spec.node_netns.as_deref());
    crate::ensure_sysctl(&nodens, "net/ipv4/ip_forward", "1", &mut ap.created)?;
    crate::ensure_sysctl(
        &spec.netns,
        "net/ipv4/conf/all/src_valid_mark",
        "1",
        &mut ap.created,
    )?;
    let node = Nl::open(&nodens)?;
    let ns = Nl::open(&spec.netns)?;
    let (nl_link, ns_link) =
        ensure_pair(&node, &ns, &spec.netns, NODE_LINK, NS_LINK, &mut ap).await?;
    // A packet from 127.0.0.1 DNATed to the ingress subnet leaves through the link (it is
    // SNATed on the way out): the kernel routes it only with route_localnet.
    crate::ensure_sysctl(
        &nodens,
        &format!("net/ipv4/conf/{NODE_LINK}/route_localnet"),
        "1",
        &mut ap.created,
    )?;
    ensure_addr(
        &node,
        nl_link.index,
        NODE_LINK_ADDR,
        LINK_PREFIX,
        NODE_LINK,
        &mut ap,
    )
    .await?;
    ensure_addr(
        &ns,
        ns_link.index,
        NS_LINK_ADDR,
        LINK_PREFIX,
        NS_LINK,
        &mut ap,
    )
    .await?;
    ensure_up(&node, &nl_link, &mut ap).await?;
    ensure_up(&ns, &ns_link, &mut ap).await?;

    // Node: the ingress subnet via the link.
    let node_routes = node.routes().await?;
    ensure_route(
        &node,
        &node_routes,
        RT_TABLE_MAIN,
        spec.subnet.network(),
        spec.subnet.prefix_len(),
        NS_LINK_ADDR,
        nl_link.index,
        false,
        &mut ap,
    )
    .await?;
    // Ingress namespace: default back to the node.
    let routes = ns.routes().await?;
    ensure_route(
        &ns,
        &routes,
        RT_TABLE_MAIN,
        Ipv4Addr::UNSPECIFIED,
        0,
        NODE_LINK_ADDR,
        ns_link.index,
        false,
        &mut ap,
    )
    .await?;

    // Return path per peer.
    let vx = ns.link(VXLAN_IFNAME).await?;
    let want_tables: BTreeMap<u32, Ipv4Addr> = match &vx {
        Some(_) => spec.peers.iter().map(|p| (peer_mark(*p), *p)).collect(),
        None => BTreeMap::new(),
    };
    for r in routes
        .iter()
        .filter(|r| is_peer_table_route(r) && want_tables.get(&r.table) != r.gateway.as_ref())
    {
        ns.handle
            .route()
            .del(r.msg.clone())
            .execute()
            .await
            .map_err(ns.err(format!("deleting default route of table {}", r.table)))?;
        ap.removed.push(format!("route default table {}", r.table));
    }
    if let Some(vx) = &vx {
        for (table, peer) in &want_tables {
            ensure_route(
                &ns,
                &routes,
                *table,
                Ipv4Addr::UNSPECIFIED,
                0,
                *peer,
                vx.index,
                true,
                &mut ap,
            )
            .await?;
        }
    }
    let mut want_rules: BTreeSet<RuleKey> = want_tables
        .keys()
        .map(|t| RuleKey::Mark {
            mark: *t,
            table: *t,
        })
        .collect();
    want_rules.insert(RuleKey::SuppressMain);
    sync_rules(&ns, &want_rules, &mut ap).await?;

    // Tasks: answer ingress flows through the ingress interface.
    let mut failures = vec![];
    for t in &spec.tasks {
        if let Err(e) = task_source_route(t, spec.gateway, &mut ap).await {
            failures.push(e);
        }
    }
    if !ap.is_empty() {
        tracing::info!(created = ?ap.created, removed = ?ap.removed, "ingress plumbing applied");
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

/// Removes the node side of the link (its peer and the node's route go with it). The
/// ingress namespace itself is removed like any network namespace. Idempotent.
pub async fn remove_ingress_link(node_netns: Option<&str>) -> Result<bool, MeshError> {
    let nodens = node_ns(node_netns);
    let node = Nl::open(&nodens)?;
    match node.link(NODE_LINK).await? {
        Some(l) if l.is_veth => {
            node.del_link(l.index, NODE_LINK).await?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

fn is_peer_table_route(r: &Route) -> bool {
    r.proto == SHOAL_RT_PROTO && r.dst_len == 0 && !matches!(r.table, 0 | 253..=255)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum RuleKey {
    SuppressMain,
    Mark { mark: u32, table: u32 },
}

fn rule_key(m: &RuleMessage) -> Option<RuleKey> {
    let mut prio = None;
    let mut mark = None;
    let mut table = u32::from(m.header.table);
    let mut suppress = None;
    for a in &m.attributes {
        match a {
            RuleAttribute::Priority(p) => prio = Some(*p),
            RuleAttribute::FwMark(v) => mark = Some(*v),
            RuleAttribute::Table(t) => table = *t,
            RuleAttribute::SuppressPrefixLen(s) => suppress = Some(*s),
            _ => {}
        }
    }
    match prio? {
        RULE_PREF_MAIN if table == RT_TABLE_MAIN && suppress == Some(0) => {
            Some(RuleKey::SuppressMain)
        }
        RULE_PREF_PEER => Some(RuleKey::Mark { mark: mark?, table }),
        _ => None,
    }
}

fn is_our_pref(m: &RuleMessage) -> bool {
    m.attributes.iter().any(
        |a| matches!(a, RuleAttribute::Priority(p) if *p == RULE_PREF_MAIN || *p == RULE_PREF_PEER),
    )
}

async fn rules(nl: &Nl) -> Result<Vec<RuleMessage>, MeshError> {
    nl.handle
        .rule()
        .get(IpVersion::V4)
        .execute()
        .try_collect()
        .await
        .map_err(nl.err("listing rules"))
}

/// Rules at our priorities in the ingress namespace: exactly `want`.
async fn sync_rules(nl: &Nl, want: &BTreeSet<RuleKey>, ap: &mut Applied) -> Result<(), MeshError> {
    let mut have = BTreeSet::new();
    for m in rules(nl).await?.iter().filter(|m| is_our_pref(m)) {
        match rule_key(m) {
            Some(k) if want.contains(&k) && !have.contains(&k) => {
                have.insert(k);
            }
            _ => {
                nl.handle
                    .rule()
                    .del(m.clone())
                    .execute()
                    .await
                    .map_err(nl.err("deleting a stale rule"))?;
                ap.removed.push(format!("rule {:?}", rule_key(m)));
            }
        }
    }
    for k in want.difference(&have) {
        let mut req = nl.handle.rule().add().v4().action(RuleAction::ToTable);
        match k {
            RuleKey::SuppressMain => {
                req = req.priority(RULE_PREF_MAIN).table_id(RT_TABLE_MAIN);
                req.message_mut()
                    .attributes
                    .push(RuleAttribute::SuppressPrefixLen(0));
            }
            RuleKey::Mark { mark, table } => {
                req = req.priority(RULE_PREF_PEER).fw_mark(*mark).table_id(*table);
            }
        }
        req.message_mut()
            .attributes
            .push(RuleAttribute::Protocol(crate::proto()));
        req.execute()
            .await
            .map_err(nl.err(format!("adding rule {k:?}")))?;
        ap.created.push(format!("rule {k:?}"));
    }
    Ok(())
}

/// In the task: `from ip lookup 83` and `default via gateway dev ifname onlink` in 83.
async fn task_source_route(
    t: &TaskIngress,
    gateway: Ipv4Addr,
    ap: &mut Applied,
) -> Result<(), MeshError> {
    let nl = Nl::open(&t.task_netns)?;
    let Some(dev) = nl.link(&t.ifname).await? else {
        return Err(MeshError::Missing {
            ns: t.task_netns.clone(),
            what: format!("ingress interface {} not found", t.ifname),
        });
    };
    let routes = nl.routes().await?;
    ensure_route(
        &nl,
        &routes,
        TASK_TABLE,
        Ipv4Addr::UNSPECIFIED,
        0,
        gateway,
        dev.index,
        true,
        ap,
    )
    .await?;
    let want_src = IpAddr::V4(t.ip);
    let mut present = false;
    for m in rules(&nl).await?.iter().filter(|m| is_our_pref(m)) {
        let src = m.attributes.iter().find_map(|a| match a {
            RuleAttribute::Source(s) => Some(*s),
            _ => None,
        });
        let table = m
            .attributes
            .iter()
            .find_map(|a| match a {
                RuleAttribute::Table(t) => Some(*t),
                _ => None,
            })
            .unwrap_or(u32::from(m.header.table));
        if !present && src == Some(want_src) && m.header.src_len == 32 && table == TASK_TABLE {
            present = true;
            continue;
        }
        nl.handle
            .rule()
            .del(m.clone())
            .execute()
            .await
            .map_err(nl.err("deleting a stale source rule"))?;
    }
    if !present {
        let mut req = nl
            .handle
            .rule()
            .add()
            .v4()
            .action(RuleAction::ToTable)
            .priority(RULE_PREF_PEER)
            .table_id(TASK_TABLE)
            .source_prefix(t.ip, 32);
        req.message_mut()
            .attributes
            .push(RuleAttribute::Protocol(crate::proto()));
        req.execute()
            .await
            .map_err(nl.err(format!("adding rule from {} lookup {TASK_TABLE}", t.ip)))?;
        ap.created.push(format!(
            "rule from {} lookup {TASK_TABLE} in {}",
            t.ip, t.task_netns
        ));
    }
    Ok(())
}
