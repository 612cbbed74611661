//! The VXLAN part of a network: the device in the network namespace (its UDP socket in the
//! underlay namespace), static FDB entries per remote VTEP, and per remote endpoint a
//! permanent neighbour entry and a `/32 dev vxlan0` route. Proxy ARP on the local veths
//! then answers containers for remote addresses as well.
//!
//! Ownership: the device is ours when it is named [`VXLAN_IFNAME`] and of kind vxlan (the
//! network namespace is ours and the name is reserved); every FDB entry on it is ours
//! (learning is off, so the kernel adds none); neighbour entries are ours when tagged with
//! [`SHOAL_RT_PROTO`] (NDA_PROTOCOL); routes likewise (they are swept with the endpoint
//! routes in `sweep_host_routes`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;

use netlink_packet_route::AddressFamily;
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::RouteScope;
use rtnetlink::{LinkUnspec, LinkVxlan, RouteMessageBuilder};

use crate::nl::{Link, Nl, Route};
use crate::plan::fmt_mac;
use crate::{Applied, MeshError, NetworkSpec, ObservedVxlan, SHOAL_RT_PROTO, VxlanSpec};

/// Name of the VXLAN device in every network namespace (one device per namespace).
pub const VXLAN_IFNAME: &str = "vxlan0";
/// Bytes of IPv4 + UDP + VXLAN + inner Ethernet headers: the device MTU is the underlay
/// MTU minus this (1450 on 1500).
pub const VXLAN_OVERHEAD: u32 = 50;

/// Alias written on our device: which underlay namespace (by inode) and device it serves.
/// VNI, local address, port and the underlay ifindex are compared from the kernel's own
/// attributes; the namespace is not visible there, hence the alias.
fn device_alias(underlay_ns_ino: u64, underlay_dev: &str) -> String {
    format!("shoal-vx ns:{underlay_ns_ino} dev:{underlay_dev}")
}

/// The underlay namespace as a name or nsfs path. `/proc/self` is the process (thread group
/// leader), not the calling thread, whose namespace may differ.
fn underlay_ns(vx: &VxlanSpec) -> String {
    vx.underlay_netns
        .clone()
        .unwrap_or_else(|| "/proc/self/ns/net".to_string())
}

pub(crate) fn is_ours(l: &Link) -> bool {
    l.name == VXLAN_IFNAME && l.vxlan.is_some()
}

fn what_dev(vx: &VxlanSpec) -> String {
    format!(
        "VXLAN device {VXLAN_IFNAME} (vni {} local {} dev {} port {})",
        vx.vni, vx.local, vx.underlay_dev, vx.port
    )
}

/// Converges the VXLAN device and its FDB and neighbour entries and routes. Stale routes
/// are left to the caller's sweep.
pub(crate) async fn sync(nl: &Nl, spec: &NetworkSpec, ap: &mut Applied) -> Result<(), MeshError> {
    let links = nl.links().await?;
    let existing = links.iter().find(|l| l.name == VXLAN_IFNAME);
    let Some(vx) = &spec.vxlan else {
        if let Some(l) = existing.filter(|l| is_ours(l)) {
            nl.del_link(l.index, VXLAN_IFNAME).await?;
            tracing::info!("removed VXLAN device");
            ap.removed.push(format!("vxlan {VXLAN_IFNAME}"));
        }
        return Ok(());
    };
    if existing.is_some_and(|l| !is_ours(l)) {
        return Err(MeshError::Conflict {
            ns: nl.ns.clone(),
            what: format!("interface {VXLAN_IFNAME} exists and is not a VXLAN device"),
        });
    }

    // Underlay: its namespace (identified by inode) and device (MTU, ifindex).
    let uns = underlay_ns(vx);
    let ufd = shoal_netns::open(&uns).map_err(|source| MeshError::Netns {
        what: format!("opening underlay namespace {uns:?} for {}", what_dev(vx)),
        source,
    })?;
    let ino = std::fs::File::from(ufd)
        .metadata()
        .map_err(|source| MeshError::Os {
            what: format!("reading the inode of underlay namespace {uns:?}"),
            source,
        })?
        .ino();
    let under = Nl::open(&uns)?;
    let udev = under
        .link(&vx.underlay_dev)
        .await?
        .ok_or_else(|| MeshError::Missing {
            ns: uns.clone(),
            what: format!(
                "underlay device {} of {} not found",
                vx.underlay_dev,
                what_dev(vx)
            ),
        })?;
    let mtu = udev
        .mtu
        .saturating_sub(VXLAN_OVERHEAD)
        .saturating_sub(vx.extra_overhead);
    let alias = device_alias(ino, &vx.underlay_dev);

    let matches = |l: &Link| {
        let Some(a) = &l.vxlan else { return false };
        a.vni == Some(vx.vni)
            && a.local == Some(vx.local)
            && a.port == Some(vx.port)
            && a.link == Some(udev.index)
            && a.learning == Some(false)
            && l.mac == vx.mac
            && l.alias.as_deref() == Some(alias.as_str())
    };
    let dev = match existing {
        Some(l) if matches(l) => {
            if l.mtu != mtu {
                nl.set_link(
                    format!("setting MTU {mtu} on {VXLAN_IFNAME}"),
                    LinkUnspec::new_with_index(l.index).mtu(mtu),
                )
                .await?;
                ap.created.push(format!("vxlan {VXLAN_IFNAME}: mtu {mtu}"));
            }
            if !l.up {
                nl.set_link(
                    format!("setting {VXLAN_IFNAME} up"),
                    LinkUnspec::new_with_index(l.index).up(),
                )
                .await?;
                ap.created.push(format!("vxlan {VXLAN_IFNAME} up"));
            }
            l.index
        }
        other => {
            if let Some(l) = other {
                nl.del_link(l.index, VXLAN_IFNAME).await?;
                let old = l.vxlan.clone().unwrap_or_default();
                tracing::info!(?old, "removed VXLAN device with another configuration");
                ap.removed.push(format!(
                    "vxlan {VXLAN_IFNAME} (vni {} local {} port {}: spec changed)",
                    opt(old.vni),
                    opt(old.local),
                    opt(old.port)
                ));
            }
            let index = create_device(nl, &under, spec, vx, udev.index, mtu, &alias).await?;
            tracing::info!(vni = vx.vni, local = %vx.local, "created VXLAN device");
            ap.created.push(format!(
                "vxlan {VXLAN_IFNAME} (vni {} local {} port {})",
                vx.vni, vx.local, vx.port
            ));
            index
        }
    };
    drop(under);

    sync_fdb(nl, dev, vx, ap).await?;
    sync_neighbours(nl, dev, vx, ap).await?;
    sync_routes(nl, dev, vx, ap).await
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "?".into())
}

/// Creates the device in one request sent from the underlay namespace with
/// IFLA_NET_NS_FD = the network namespace: the kernel binds the UDP socket in the namespace
/// of the request (the underlay, where `local` and `dev` resolve) and registers the device
/// directly in the network namespace under its final name — no temporary name, nothing
/// left behind in the underlay if the call is interrupted.
async fn create_device(
    nl: &Nl,
    under: &Nl,
    spec: &NetworkSpec,
    vx: &VxlanSpec,
    underlay_index: u32,
    mtu: u32,
    alias: &str,
) -> Result<u32, MeshError> {
    let netfd = shoal_netns::open(&spec.netns).map_err(|source| MeshError::Netns {
        what: format!("opening network namespace {:?}", spec.netns),
        source,
    })?;
    let msg = LinkVxlan::new(VXLAN_IFNAME, vx.vni)
        .local(vx.local)
        .dev(underlay_index)
        .port(vx.port)
        .learning(false)
        .address(vx.mac.to_vec())
        .mtu(mtu)
        .setns_by_fd(netfd.as_raw_fd())
        .build();
    under
        .handle
        .link()
        .add(msg)
        .execute()
        .await
        .map_err(under.err(format!(
            "creating {} into namespace {:?}",
            what_dev(vx),
            spec.netns
        )))?;
    drop(netfd);
    let l = nl
        .link(VXLAN_IFNAME)
        .await?
        .ok_or_else(|| MeshError::Missing {
            ns: nl.ns.clone(),
            what: format!("{VXLAN_IFNAME} vanished right after creation"),
        })?;
    nl.set_link(
        format!("setting alias and up on {VXLAN_IFNAME}"),
        LinkUnspec::new_with_index(l.index)
            .alias(alias.to_string())
            .up(),
    )
    .await?;
    Ok(l.index)
}

fn mac6(v: &[u8]) -> Option<[u8; 6]> {
    v.try_into().ok()
}

/// (MAC, dst) of an FDB entry; IPv4 destinations come back as `Other(4 bytes)`.
fn fdb_entry(m: &NeighbourMessage) -> Option<([u8; 6], Ipv4Addr)> {
    let mut mac = None;
    let mut dst = None;
    for a in &m.attributes {
        match a {
            NeighbourAttribute::LinkLayerAddress(v) => mac = mac6(v),
            NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => dst = Some(*ip),
            NeighbourAttribute::Destination(NeighbourAddress::Other(b)) if b.len() == 4 => {
                dst = Some(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
            }
            _ => {}
        }
    }
    Some((mac?, dst?))
}

/// An ARP entry: (ip, lladdr, ours, permanent).
fn neigh_entry(m: &NeighbourMessage) -> Option<(Ipv4Addr, Option<[u8; 6]>, bool)> {
    let mut ip = None;
    let mut mac = None;
    let mut ours = false;
    for a in &m.attributes {
        match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(v)) => ip = Some(*v),
            NeighbourAttribute::LinkLayerAddress(v) => mac = mac6(v),
            NeighbourAttribute::Protocol(p) => ours = u8::from(*p) == SHOAL_RT_PROTO,
            _ => {}
        }
    }
    Some((ip?, mac, ours))
}

async fn fdb(nl: &Nl, dev: u32) -> Result<BTreeSet<([u8; 6], Ipv4Addr)>, MeshError> {
    Ok(nl
        .neighbours(AddressFamily::Bridge)
        .await?
        .iter()
        .filter(|m| m.header.ifindex == dev)
        .filter_map(fdb_entry)
        .collect())
}

/// One `self permanent` entry per distinct remote VTEP (of endpoints and peers):
/// `vtep_mac -> dst vtep`.
async fn sync_fdb(nl: &Nl, dev: u32, vx: &VxlanSpec, ap: &mut Applied) -> Result<(), MeshError> {
    let have = fdb(nl, dev).await?;
    let want: BTreeSet<([u8; 6], Ipv4Addr)> = vx
        .remotes
        .iter()
        .map(|r| (r.vtep_mac, r.vtep))
        .chain(vx.peers.iter().map(|p| (p.vtep_mac, p.vtep)))
        .collect();
    for (mac, dst) in have.difference(&want) {
        let mut msg = NeighbourMessage::default();
        msg.header.family = AddressFamily::Bridge;
        msg.header.ifindex = dev;
        msg.header.flags = NeighbourFlags::Own;
        msg.header.state = NeighbourState::Permanent;
        msg.attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
        msg.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(
                *dst,
            )));
        match nl.handle.neighbours().del(msg).execute().await {
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENOENT => {}
            r => r.map_err(nl.err(format!(
                "deleting FDB entry {} dst {dst} on {VXLAN_IFNAME}",
                fmt_mac(mac)
            )))?,
        }
        ap.removed.push(format!("fdb {} dst {dst}", fmt_mac(mac)));
    }
    for (mac, dst) in want.difference(&have) {
        nl.handle
            .neighbours()
            .add_bridge(dev, mac)
            .flags(NeighbourFlags::Own)
            .destination(IpAddr::V4(*dst))
            .execute()
            .await
            .map_err(nl.err(format!(
                "adding FDB entry {} dst {dst} on {VXLAN_IFNAME}",
                fmt_mac(mac)
            )))?;
        ap.created.push(format!("fdb {} dst {dst}", fmt_mac(mac)));
    }
    Ok(())
}

/// One permanent neighbour entry per remote endpoint (`ip -> vtep_mac`, protocol 83) and per
/// peer (`vtep -> vtep_mac`);
/// ours that no remote endpoint wants are deleted, foreign ones for other addresses kept.
async fn sync_neighbours(
    nl: &Nl,
    dev: u32,
    vx: &VxlanSpec,
    ap: &mut Applied,
) -> Result<(), MeshError> {
    let msgs = nl.neighbours(AddressFamily::Inet).await?;
    let want: BTreeMap<Ipv4Addr, [u8; 6]> = vx
        .remotes
        .iter()
        .map(|r| (r.ip, r.vtep_mac))
        .chain(vx.peers.iter().map(|p| (p.vtep, p.vtep_mac)))
        .collect();
    let mut good = BTreeSet::new();
    for m in msgs.iter().filter(|m| m.header.ifindex == dev) {
        let Some((ip, mac, ours)) = neigh_entry(m) else {
            continue;
        };
        match want.get(&ip) {
            Some(w) if ours && mac == Some(*w) && m.header.state == NeighbourState::Permanent => {
                good.insert(ip);
            }
            Some(_) => {} // replaced below
            None if ours => {
                match nl.handle.neighbours().del(m.clone()).execute().await {
                    Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENOENT => {}
                    r => r.map_err(nl.err(format!("deleting neighbour {ip} on {VXLAN_IFNAME}")))?,
                }
                ap.removed.push(format!("neighbour {ip}"));
            }
            None => {}
        }
    }
    for (ip, mac) in want.iter().filter(|(ip, _)| !good.contains(*ip)) {
        let mut req = nl
            .handle
            .neighbours()
            .add(dev, IpAddr::V4(*ip))
            .link_layer_address(mac)
            .state(NeighbourState::Permanent)
            .replace();
        req.message_mut()
            .attributes
            .push(NeighbourAttribute::Protocol(SHOAL_RT_PROTO.into()));
        req.execute().await.map_err(nl.err(format!(
            "adding neighbour {ip} lladdr {} on {VXLAN_IFNAME}",
            fmt_mac(mac)
        )))?;
        ap.created
            .push(format!("neighbour {ip} lladdr {}", fmt_mac(mac)));
    }
    Ok(())
}

fn is_remote_route(r: &Route, dev: u32) -> bool {
    crate::is_host_route(r) && r.oif == Some(dev)
}

/// `/32 dev vxlan0 scope link proto 83` per remote endpoint. Added with NLM_F_REPLACE: the
/// address may have been a local endpoint's a moment ago (its route is replaced here, as an
/// endpoint's replaces a remote one). Stale ones are swept by the caller.
async fn sync_routes(nl: &Nl, dev: u32, vx: &VxlanSpec, ap: &mut Applied) -> Result<(), MeshError> {
    let routes = nl.routes().await?;
    let have: BTreeSet<Ipv4Addr> = routes
        .iter()
        .filter(|r| is_remote_route(r, dev))
        .map(|r| r.dst)
        .collect();
    let want: BTreeSet<Ipv4Addr> = vx.remotes.iter().map(|r| r.ip).collect();
    for ip in want.difference(&have) {
        let msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .protocol(crate::proto())
            .scope(RouteScope::Link)
            .destination_prefix(*ip, 32)
            .output_interface(dev)
            .build();
        nl.handle
            .route()
            .add(msg)
            .replace()
            .execute()
            .await
            .map_err(nl.err(format!("adding route {ip}/32 dev {VXLAN_IFNAME}")))?;
        ap.created.push(format!("route {ip}/32 dev {VXLAN_IFNAME}"));
    }
    Ok(())
}

/// The device and its entries as the kernel has them; None without the device.
pub(crate) async fn observe(
    nl: &Nl,
    links: &[Link],
    routes: &[Route],
) -> Result<Option<ObservedVxlan>, MeshError> {
    let Some(l) = links.iter().find(|l| is_ours(l)) else {
        return Ok(None);
    };
    let a = l.vxlan.clone().unwrap_or_default();
    let fdb: Vec<_> = fdb(nl, l.index).await?.into_iter().collect();
    let mut neighbours: Vec<(Ipv4Addr, [u8; 6])> = nl
        .neighbours(AddressFamily::Inet)
        .await?
        .iter()
        .filter(|m| m.header.ifindex == l.index)
        .filter_map(neigh_entry)
        .filter_map(|(ip, mac, ours)| Some((ip, mac?)).filter(|_| ours))
        .collect();
    neighbours.sort();
    let mut rts: Vec<Ipv4Addr> = routes
        .iter()
        .filter(|r| is_remote_route(r, l.index))
        .map(|r| r.dst)
        .collect();
    rts.sort();
    Ok(Some(ObservedVxlan {
        ifname: l.name.clone(),
        vni: a.vni,
        local: a.local,
        port: a.port,
        learning: a.learning,
        mac: l.mac.clone(),
        mtu: l.mtu,
        up: l.up,
        fdb,
        neighbours,
        routes: rts,
    }))
}
