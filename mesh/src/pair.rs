//! Shared plumbing of the links between the node namespace and a network namespace (the
//! ingress link, the egress links): a veth pair across two namespaces, its addresses, state
//! and routes, each converged level-triggered.

use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;

use netlink_packet_route::link::{InfoData, InfoVeth};
use netlink_packet_route::route::RouteScope;
use rtnetlink::{LinkUnspec, LinkVeth, RouteMessageBuilder};

use crate::nl::{Link, Nl, Route};
use crate::{Applied, MeshError, SHOAL_RT_PROTO};

/// The veth pair, recreated when one end is missing or not the other's peer.
pub(crate) async fn ensure_pair(
    node: &Nl,
    ns: &Nl,
    ns_path: &str,
    node_name: &str,
    ns_name: &str,
    ap: &mut Applied,
) -> Result<(Link, Link), MeshError> {
    let a = node.link(node_name).await?;
    let b = ns.link(ns_name).await?;
    if let (Some(a), Some(b)) = (&a, &b)
        && a.is_veth
        && b.is_veth
        && a.peer_index == Some(b.index)
        && b.peer_index == Some(a.index)
    {
        return Ok((a.clone(), b.clone()));
    }
    if let Some(a) = &a {
        if !a.is_veth {
            return Err(MeshError::Conflict {
                ns: node.ns.clone(),
                what: format!("interface {node_name} exists and is not a veth"),
            });
        }
        node.del_link(a.index, node_name).await?;
        ap.removed
            .push(format!("link {node_name} (peer not found)"));
    }
    if let Some(b) = ns.link(ns_name).await? {
        ns.del_link(b.index, ns_name).await?;
    }
    let fd = shoal_netns::open(ns_path).map_err(|source| MeshError::Netns {
        what: format!("opening ingress namespace {:?}", ns_path),
        source,
    })?;
    let peer = LinkUnspec::new_with_name(ns_name)
        .setns_by_fd(fd.as_raw_fd())
        .build();
    let msg = LinkVeth::new(node_name, ns_name)
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
        .build();
    node.handle
        .link()
        .add(msg)
        .execute()
        .await
        .map_err(node.err(format!(
            "creating veth {node_name} (peer {ns_name} in {:?})",
            ns_path
        )))?;
    drop(fd);
    ap.created
        .push(format!("link {node_name} <-> {ns_name} in {}", ns_path));
    let missing = |ns: &Nl, name: &str| MeshError::Missing {
        ns: ns.ns.clone(),
        what: format!("{name} vanished right after creation"),
    };
    let a = node
        .link(node_name)
        .await?
        .ok_or_else(|| missing(node, node_name))?;
    let b = ns
        .link(ns_name)
        .await?
        .ok_or_else(|| missing(ns, ns_name))?;
    Ok((a, b))
}

pub(crate) async fn ensure_up(nl: &Nl, l: &Link, ap: &mut Applied) -> Result<(), MeshError> {
    if !l.up {
        nl.set_link(
            format!("setting {} up", l.name),
            LinkUnspec::new_with_index(l.index).up(),
        )
        .await?;
        ap.created.push(format!("link {} up", l.name));
    }
    Ok(())
}

/// Exactly one IPv4 address `ip/prefix` on the link.
pub(crate) async fn ensure_addr(
    nl: &Nl,
    index: u32,
    ip: Ipv4Addr,
    prefix: u8,
    ifname: &str,
    ap: &mut Applied,
) -> Result<(), MeshError> {
    let mut present = false;
    for a in nl.addrs().await?.iter().filter(|a| a.index == index) {
        if a.ip == ip && a.prefix == prefix {
            present = true;
            continue;
        }
        nl.handle
            .address()
            .del(a.msg.clone())
            .execute()
            .await
            .map_err(nl.err(format!(
                "deleting address {}/{} from {ifname}",
                a.ip, a.prefix
            )))?;
        ap.removed
            .push(format!("address {}/{} on {ifname}", a.ip, a.prefix));
    }
    if !present {
        crate::add_address(nl, index, ip, prefix, ifname).await?;
        ap.created
            .push(format!("address {ip}/{prefix} on {ifname}"));
    }
    Ok(())
}

/// `dst/len via gw dev oif [onlink]` in `table`, replaced when it differs.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn ensure_route(
    nl: &Nl,
    routes: &[Route],
    table: u32,
    dst: Ipv4Addr,
    len: u8,
    gw: Ipv4Addr,
    oif: u32,
    onlink: bool,
    ap: &mut Applied,
) -> Result<(), MeshError> {
    let present = routes.iter().any(|r| {
        r.table == table
            && r.dst_len == len
            && r.dst == dst
            && r.gateway == Some(gw)
            && r.oif == Some(oif)
            && r.proto == SHOAL_RT_PROTO
    });
    if present {
        return Ok(());
    }
    let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
        .table_id(table)
        .protocol(crate::proto())
        .scope(RouteScope::Universe)
        .destination_prefix(dst, len)
        .gateway(gw)
        .output_interface(oif);
    if onlink {
        b = b.onlink();
    }
    nl.handle
        .route()
        .add(b.build())
        .replace()
        .execute()
        .await
        .map_err(nl.err(format!("adding route {dst}/{len} via {gw} table {table}")))?;
    ap.created
        .push(format!("route {dst}/{len} via {gw} table {table}"));
    Ok(())
}
