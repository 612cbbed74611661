//! A network's way out through its node: the counterpart of Docker's docker_gwbridge, one
//! link per network namespace instead of one bridge and a second interface per container.
//!
//! For a network that is not `--internal`, [`crate::apply_network`] converges:
//!
//! - a veth pair: `spec.egress.node_link` in the node namespace ([`NODE_ADDR`]/32) <->
//!   [`NS_LINK`] in the network namespace ([`NS_ADDR`]/32). Every network uses the same
//!   two link-local addresses: each route names its device (`onlink`), so they never meet;
//! - in the network namespace `default via NODE_ADDR dev eg0 onlink` (the containers'
//!   default route already points at the network's gateway there), and `unreachable
//!   SUBNET`, so that a subnet address with no endpoint is refused here instead of being
//!   proxy-ARPed and sent to the node, which would route it straight back;
//! - in the node namespace `SUBNET via NS_ADDR dev node_link onlink` (the way back for
//!   replies) and `net.ipv4.ip_forward=1`.
//!
//! Masquerade to the node's address and the filter that lets only flows started inside
//! out (and nothing from outside in) are nft rules of the guard table (shoal-lb). A network
//! without egress (`--internal`) has none of this; a link made earlier is removed.

use std::net::Ipv4Addr;

use netlink_packet_route::route::{RouteScope, RouteType};
use rtnetlink::RouteMessageBuilder;

use crate::nl::{Nl, Route};
use crate::pair::{ensure_addr, ensure_pair, ensure_route, ensure_up};
use crate::{Applied, MeshError, NetworkSpec, RT_TABLE_MAIN, SHOAL_RT_PROTO};

/// The network-namespace end of the egress link.
pub const NS_LINK: &str = "eg0";
/// Node-side address of every egress link (the network namespaces' default gateway).
pub const NODE_ADDR: Ipv4Addr = Ipv4Addr::new(169, 254, 84, 1);
/// Network-namespace address of every egress link (the node's next hop to the subnet).
pub const NS_ADDR: Ipv4Addr = Ipv4Addr::new(169, 254, 84, 2);

/// The way out of one network on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressSpec {
    /// The node's namespace (a name or nsfs path); None = this process's.
    pub node_netns: Option<String>,
    /// Node-side name of the link (unique per network on the node, at most 15 bytes).
    pub node_link: String,
}

fn node_ns(spec: &EgressSpec) -> String {
    spec.node_netns
        .as_deref()
        .unwrap_or("/proc/self/ns/net")
        .to_string()
}

fn is_unreachable_subnet(r: &Route, spec: &NetworkSpec) -> bool {
    r.table == RT_TABLE_MAIN
        && r.proto == SHOAL_RT_PROTO
        && r.msg.header.kind == RouteType::Unreachable
        && r.dst == spec.subnet.network()
        && r.dst_len == spec.subnet.prefix_len()
}

/// Converges the egress part of `spec` (`ns` is a netlink socket in its namespace).
pub(crate) async fn sync(nl: &Nl, spec: &NetworkSpec, ap: &mut Applied) -> Result<(), MeshError> {
    let Some(eg) = &spec.egress else {
        // Deleting our end removes both (and the routes through them).
        if let Some(l) = nl.link(NS_LINK).await?.filter(|l| l.is_veth) {
            nl.del_link(l.index, NS_LINK).await?;
            ap.removed.push(format!("egress link {NS_LINK}"));
        }
        for r in nl
            .routes()
            .await?
            .iter()
            .filter(|r| is_unreachable_subnet(r, spec))
        {
            crate::del_route(nl, &r.msg, format!("deleting unreachable {}", spec.subnet)).await?;
            ap.removed
                .push(format!("route unreachable {}", spec.subnet));
        }
        return Ok(());
    };
    if eg.node_link.is_empty() || eg.node_link.len() > 15 {
        return Err(MeshError::InvalidSpec(format!(
            "egress link name {:?} must be 1 to 15 bytes",
            eg.node_link
        )));
    }
    let nodens = node_ns(eg);
    crate::ensure_sysctl(&nodens, "net/ipv4/ip_forward", "1", &mut ap.created)?;
    let node = Nl::open(&nodens)?;
    let (node_link, ns_link) =
        ensure_pair(&node, nl, &spec.netns, &eg.node_link, NS_LINK, ap).await?;
    ensure_addr(&node, node_link.index, NODE_ADDR, 32, &eg.node_link, ap).await?;
    ensure_addr(nl, ns_link.index, NS_ADDR, 32, NS_LINK, ap).await?;
    ensure_up(&node, &node_link, ap).await?;
    ensure_up(nl, &ns_link, ap).await?;

    let node_routes = node.routes().await?;
    ensure_route(
        &node,
        &node_routes,
        RT_TABLE_MAIN,
        spec.subnet.network(),
        spec.subnet.prefix_len(),
        NS_ADDR,
        node_link.index,
        true,
        ap,
    )
    .await?;
    let routes = nl.routes().await?;
    ensure_route(
        nl,
        &routes,
        RT_TABLE_MAIN,
        Ipv4Addr::UNSPECIFIED,
        0,
        NODE_ADDR,
        ns_link.index,
        true,
        ap,
    )
    .await?;
    if !routes.iter().any(|r| is_unreachable_subnet(r, spec)) {
        let msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .table_id(RT_TABLE_MAIN)
            .protocol(crate::proto())
            .scope(RouteScope::Universe)
            .kind(RouteType::Unreachable)
            .destination_prefix(spec.subnet.network(), spec.subnet.prefix_len())
            .build();
        crate::add_route(nl, msg, format!("adding unreachable {}", spec.subnet)).await?;
        ap.created
            .push(format!("route unreachable {}", spec.subnet));
    }
    Ok(())
}
