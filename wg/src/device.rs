//! The node's WireGuard device, in the calling thread's network namespace: kernel WireGuard
//! (a `wireguard` link configured over generic netlink, [`crate::kernel`]) where the kernel
//! has it, else userspace WireGuard (gotatun) on a TUN interface in this process
//! ([`Backend`]); configured from a [`DeviceSpec`] and diffed against it on every
//! [`Device::apply`]; plus the routing that takes the encrypted networks' VXLAN into it:
//!
//! - rule `pref 84 ipproto udp dport <route_udp_dport> lookup 84` (protocol 83);
//! - table 84: `default dev shoalwg0` and, behind it, `unreachable default metric 4096`:
//!   while the device is missing those datagrams are refused, never sent in the clear.
//!
//! Each peer is another node: its public key, its WireGuard endpoint (underlay address and
//! port), and its underlay address as the only allowed IP (the VXLAN datagrams go to the
//! peer's underlay address, so no inner addresses are needed).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use futures::{FutureExt as _, TryStreamExt as _};
use gotatun::device::{DefaultDeviceTransports, DeviceBuilder, Peer};
use netlink_packet_route::IpProtocol;
use netlink_packet_route::link::LinkAttribute;
use netlink_packet_route::route::{RouteAttribute, RouteMessage, RouteProtocol, RouteType};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RulePortRange};
use rtnetlink::{IpVersion, LinkUnspec, RouteMessageBuilder};

use crate::{Key, ROUTE_TABLE, WgError};

/// Protocol number tagging our routes and rules (Shoal's, as in shoal-mesh).
const RT_PROTO: u8 = 83;
/// Metric of the `unreachable default` behind the device's route.
const FALLBACK_METRIC: u32 = 4096;
/// Persistent keepalive: NAT and conntrack state on the way stay warm.
const KEEPALIVE_SECS: u16 = 25;

/// Which WireGuard to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    /// The kernel's where it has the module, else userspace.
    #[default]
    Auto,
    Kernel,
    Userspace,
}

/// What the device must be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSpec {
    pub ifname: String,
    pub backend: Backend,
    /// UDP port WireGuard listens on.
    pub port: u16,
    pub private_key: Key,
    /// The underlay interface: the device's MTU is its MTU minus [`crate::OVERHEAD`].
    pub underlay_dev: String,
    /// UDP destination port of the datagrams routed into the device (the encrypted
    /// networks' VXLAN port).
    pub route_udp_dport: u16,
    /// The other nodes.
    pub peers: Vec<PeerSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSpec {
    pub public_key: Key,
    pub endpoint: SocketAddrV4,
    /// The peer's underlay address: the only address routed to it.
    pub allowed: Ipv4Addr,
}

/// A peer as the device sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStatus {
    pub public_key: Key,
    pub endpoint: Option<SocketAddr>,
    pub last_handshake: Option<Duration>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

enum Inner {
    User(gotatun::device::Device<DefaultDeviceTransports>),
    Kernel(crate::kernel::KernelWg),
}

/// The running device. A userspace one dropped inside a tokio runtime stops; prefer
/// [`Device::stop`] (which also deletes a kernel link).
pub struct Device {
    inner: Inner,
    applied: DeviceSpec,
    suspended: bool,
}

fn dev_err(ifname: &str, what: &str) -> impl FnOnce(gotatun::device::Error) -> WgError {
    let (ifname, what) = (ifname.to_string(), what.to_string());
    move |source| WgError::Device {
        ifname,
        what,
        source,
    }
}

fn peer_of(p: &PeerSpec) -> Peer {
    let mut peer = Peer::new(p.public_key.public_key())
        .with_endpoint(SocketAddr::V4(p.endpoint))
        .with_allowed_ip(ipnetwork::IpNetwork::V4(
            ipnetwork::Ipv4Network::new(p.allowed, 32).expect("a /32 is valid"),
        ));
    peer.keepalive = Some(KEEPALIVE_SECS);
    peer
}

impl Device {
    /// Creates the TUN interface and the device (in this thread's namespace), brings the
    /// interface up with the spec's MTU and programs the routing. A port in use, no
    /// /dev/net/tun, or an interface name taken fail here, naming the cause.
    pub async fn create(spec: &DeviceSpec) -> Result<Device, WgError> {
        let ifname = spec.ifname.as_str();
        // First the refusal: should anything below fail, nothing leaves in the clear.
        ensure_fallback(spec.route_udp_dport).await?;
        if spec.backend != Backend::Userspace {
            let (h, task) = netlink()?;
            let kernel = crate::kernel::create_link(&h, ifname).await;
            task.abort();
            match kernel? {
                true => {
                    let peers: Vec<&PeerSpec> = spec.peers.iter().collect();
                    let set = crate::kernel::KernelWg::open().and_then(|k| {
                        k.set_device(ifname, Some(&spec.private_key), spec.port, &peers, &[])
                            .map(|()| k)
                    });
                    let k = match set {
                        Ok(k) => k,
                        Err(e) => {
                            delete_link(ifname).await;
                            return Err(e);
                        }
                    };
                    let d = Device {
                        inner: Inner::Kernel(k),
                        applied: spec.clone(),
                        suspended: false,
                    };
                    if let Err(e) = ensure_routing(spec).await {
                        d.stop().await;
                        return Err(e);
                    }
                    tracing::info!(
                        ifname,
                        port = spec.port,
                        peers = spec.peers.len(),
                        "kernel WireGuard device up"
                    );
                    return Ok(d);
                }
                false if spec.backend == Backend::Kernel => {
                    return Err(WgError::Missing(
                        "the kernel has no WireGuard ([wireguard] backend = \"kernel\")".into(),
                    ));
                }
                false => {}
            }
        }
        let builder = DeviceBuilder::new()
            .with_default_udp()
            .create_tun(ifname)
            .map_err(dev_err(ifname, "creating the TUN interface"))?
            .with_private_key(spec.private_key.secret())
            .with_listen_port(spec.port)
            .with_peers(spec.peers.iter().map(peer_of))
            // Without peers gotatun opens no socket, and adding one later does not either:
            // start suspended and resume with the first peer.
            .suspended(spec.peers.is_empty());
        let dev = builder.build().await.map_err(dev_err(
            ifname,
            &format!("listening on UDP port {}", spec.port),
        ))?;
        let d = Device {
            inner: Inner::User(dev),
            applied: spec.clone(),
            suspended: spec.peers.is_empty(),
        };
        if let Err(e) = ensure_routing(spec).await {
            d.stop().await;
            return Err(e);
        }
        d.greet(spec.peers.iter().map(|p| p.public_key)).await;
        tracing::info!(
            ifname,
            port = spec.port,
            peers = spec.peers.len(),
            "WireGuard device up"
        );
        Ok(d)
    }

    /// Converges the device on `spec`: key, port, peers (a peer whose key changed is a new
    /// peer, greeted with a handshake at once), routing. Returns what changed.
    pub async fn apply(&mut self, spec: &DeviceSpec) -> Result<Vec<String>, WgError> {
        let ifname = spec.ifname.clone();
        if self.failed() {
            return Err(WgError::Gone(ifname));
        }
        if matches!(self.inner, Inner::Kernel(_)) {
            return self.apply_kernel(spec).await;
        }
        let Inner::User(dev) = &self.inner else {
            unreachable!("kernel handled above")
        };
        let mut changes = vec![];
        if spec.private_key != self.applied.private_key {
            dev.set_private_key(spec.private_key.secret())
                .await
                .map_err(dev_err(&ifname, "setting the private key"))?;
            changes.push(format!(
                "private key (public {})",
                spec.private_key.public()
            ));
        }
        if spec.port != self.applied.port {
            dev.set_listen_port(spec.port).await.map_err(dev_err(
                &ifname,
                &format!("listening on UDP port {}", spec.port),
            ))?;
            changes.push(format!("port {}", spec.port));
        }
        let have: BTreeMap<Key, &PeerSpec> = self
            .applied
            .peers
            .iter()
            .map(|p| (p.public_key, p))
            .collect();
        let want: BTreeMap<Key, &PeerSpec> = spec.peers.iter().map(|p| (p.public_key, p)).collect();
        for k in have.keys().filter(|k| !want.contains_key(k)) {
            dev.remove_peer(&k.public_key())
                .await
                .map_err(dev_err(&ifname, "removing a peer"))?;
            changes.push(format!("- peer {k}"));
        }
        let rekeyed = spec.private_key != self.applied.private_key;
        for (k, p) in &want {
            let new = !have.contains_key(k);
            if new || have.get(k) != Some(p) {
                dev.add_or_update_peer(peer_of(p))
                    .await
                    .map_err(dev_err(&ifname, "adding a peer"))?;
                changes.push(format!(
                    "{} peer {k} at {}",
                    if new { "+" } else { "~" },
                    p.endpoint
                ));
            }
        }
        if self.suspended && !spec.peers.is_empty() {
            dev.resume()
                .await
                .map_err(dev_err(&ifname, "opening its UDP socket"))?;
            self.suspended = false;
        }
        if !self.suspended {
            let greet: Vec<Key> = want
                .keys()
                .filter(|k| rekeyed || !have.contains_key(*k))
                .copied()
                .collect();
            self.greet(greet).await;
        }
        // Level-triggered: whoever removed a route, rule or the link state, it comes back.
        changes.extend(ensure_routing(spec).await?);
        self.applied = spec.clone();
        if !changes.is_empty() {
            tracing::info!(ifname = %spec.ifname, ?changes, "WireGuard device applied");
        }
        Ok(changes)
    }

    /// Sends a handshake initiation to each peer at once (new peers, a new key of ours or
    /// theirs), instead of waiting for the next packet and WireGuard's 5 s retry. Waits a
    /// little for the answers; a peer that is down answers its own handshake later.
    async fn greet(&self, keys: impl IntoIterator<Item = Key>) {
        // The kernel starts a handshake with the first packet; nothing to do there.
        let Inner::User(dev) = &self.inner else {
            return;
        };
        let keys: Vec<_> = keys.into_iter().map(|k| k.public_key()).collect();
        let all = futures::future::join_all(keys.iter().map(|k| dev.force_handshake(k)));
        let _ = tokio::time::timeout(Duration::from_millis(200), all).await;
    }

    /// The kernel device: one SET_DEVICE with the new key (if any), the port, the peers that
    /// are new or changed, and the removed ones.
    async fn apply_kernel(&mut self, spec: &DeviceSpec) -> Result<Vec<String>, WgError> {
        let mut changes = vec![];
        let have: BTreeMap<Key, &PeerSpec> = self
            .applied
            .peers
            .iter()
            .map(|p| (p.public_key, p))
            .collect();
        let upsert: Vec<&PeerSpec> = spec
            .peers
            .iter()
            .filter(|p| have.get(&p.public_key) != Some(p))
            .collect();
        let remove: Vec<Key> = have
            .keys()
            .filter(|k| !spec.peers.iter().any(|p| p.public_key == **k))
            .copied()
            .collect();
        let key = (spec.private_key != self.applied.private_key).then_some(&spec.private_key);
        if key.is_some()
            || spec.port != self.applied.port
            || !upsert.is_empty()
            || !remove.is_empty()
        {
            let Inner::Kernel(k) = &self.inner else {
                unreachable!("only called for kernel devices")
            };
            k.set_device(&spec.ifname, key, spec.port, &upsert, &remove)?;
            if key.is_some() {
                changes.push(format!(
                    "private key (public {})",
                    spec.private_key.public()
                ));
            }
            changes.extend(
                upsert
                    .iter()
                    .map(|p| format!("peer {} at {}", p.public_key, p.endpoint)),
            );
            changes.extend(remove.iter().map(|k| format!("- peer {k}")));
        }
        changes.extend(ensure_routing(spec).await?);
        self.applied = spec.clone();
        if !changes.is_empty() {
            tracing::info!(ifname = %spec.ifname, ?changes, "kernel WireGuard device applied");
        }
        Ok(changes)
    }

    /// "kernel" or "userspace".
    pub fn backend(&self) -> &'static str {
        match self.inner {
            Inner::Kernel(_) => "kernel",
            Inner::User(_) => "userspace",
        }
    }

    /// True once the device hit an unrecoverable error (its TUN interface deleted, ...).
    pub fn failed(&mut self) -> bool {
        match &mut self.inner {
            Inner::User(dev) => dev.wait().now_or_never().is_some(),
            // A deleted kernel link is found by the routing check (`Gone`).
            Inner::Kernel(_) => false,
        }
    }

    /// The peers with their handshake and byte counters.
    pub async fn peers(&self) -> Vec<PeerStatus> {
        let dev = match &self.inner {
            Inner::User(dev) => dev,
            Inner::Kernel(k) => return k.peers(&self.applied.ifname).unwrap_or_default(),
        };
        dev.peers()
            .await
            .into_iter()
            .map(|p| PeerStatus {
                public_key: Key(p.peer.public_key.to_bytes()),
                endpoint: p.peer.endpoint,
                last_handshake: p.stats.last_handshake,
                rx_bytes: p.stats.rx_bytes as u64,
                tx_bytes: p.stats.tx_bytes as u64,
            })
            .collect()
    }

    /// The spec last applied.
    pub fn applied(&self) -> &DeviceSpec {
        &self.applied
    }

    /// Stops the device: its socket closes and its interface goes (the routes with it; the
    /// rule and the `unreachable` fallback stay, so nothing leaves in the clear).
    pub async fn stop(self) {
        match self.inner {
            Inner::User(dev) => dev.stop().await,
            Inner::Kernel(_) => delete_link(&self.applied.ifname).await,
        }
    }
}

/// Deletes the link `ifname` if there is one (a kernel device's end).
async fn delete_link(ifname: &str) {
    let Ok((h, task)) = netlink() else {
        return;
    };
    if let Ok(Some(l)) = h
        .link()
        .get()
        .match_name(ifname.to_string())
        .execute()
        .try_next()
        .await
    {
        let _ = h.link().del(l.header.index).execute().await;
    }
    task.abort();
}

/// The IPv4 rules at our priority (84).
async fn our_rules(
    h: &rtnetlink::Handle,
) -> Result<Vec<netlink_packet_route::rule::RuleMessage>, WgError> {
    let rules: Vec<netlink_packet_route::rule::RuleMessage> = h
        .rule()
        .get(IpVersion::V4)
        .execute()
        .try_collect()
        .await
        .map_err(nl_err("listing rules"))?;
    Ok(rules
        .into_iter()
        .filter(|m| {
            m.attributes
                .iter()
                .any(|a| matches!(a, RuleAttribute::Priority(p) if *p == ROUTE_TABLE))
        })
        .collect())
}

/// A netlink connection in this thread's namespace.
fn netlink() -> Result<(rtnetlink::Handle, tokio::task::JoinHandle<()>), WgError> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(|source| WgError::Io {
        what: "opening a netlink socket".into(),
        source,
    })?;
    Ok((handle, tokio::spawn(conn)))
}

fn nl_err(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> WgError {
    let what = what.into();
    move |source| WgError::Netlink { what, source }
}

/// The interface up with its MTU, `default dev IFNAME` and the `unreachable` fallback in
/// table 84, and the rule. Returns what it changed.
pub async fn ensure_routing(spec: &DeviceSpec) -> Result<Vec<String>, WgError> {
    let (h, task) = netlink()?;
    let r = ensure_routing_with(&h, spec).await;
    task.abort();
    r
}

async fn ensure_routing_with(
    h: &rtnetlink::Handle,
    spec: &DeviceSpec,
) -> Result<Vec<String>, WgError> {
    let mut changes = vec![];
    let ifname = &spec.ifname;
    let get = |name: String| async move {
        h.link()
            .get()
            .match_name(name.clone())
            .execute()
            .try_next()
            .await
            .map_err(nl_err(format!("looking up {name}")))
    };
    let mtu_of = |l: &netlink_packet_route::link::LinkMessage| {
        l.attributes.iter().find_map(|a| match a {
            LinkAttribute::Mtu(m) => Some(*m),
            _ => None,
        })
    };
    let underlay = get(spec.underlay_dev.clone())
        .await?
        .ok_or_else(|| WgError::Missing(format!("no underlay interface {}", spec.underlay_dev)))?;
    let want_mtu = mtu_of(&underlay)
        .unwrap_or(1500)
        .saturating_sub(crate::OVERHEAD);
    let link = get(ifname.clone())
        .await?
        .ok_or_else(|| WgError::Gone(ifname.clone()))?;
    let index = link.header.index;
    let up = link
        .header
        .flags
        .contains(netlink_packet_route::link::LinkFlags::Up);
    if !up || mtu_of(&link) != Some(want_mtu) {
        h.link()
            .set(LinkUnspec::new_with_index(index).mtu(want_mtu).up().build())
            .execute()
            .await
            .map_err(nl_err(format!("setting {ifname} up with MTU {want_mtu}")))?;
        changes.push(format!("{ifname} up, mtu {want_mtu}"));
    }

    let routes = table_routes(h).await?;
    let oif = |m: &RouteMessage| {
        m.attributes.iter().find_map(|a| match a {
            RouteAttribute::Oif(i) => Some(*i),
            _ => None,
        })
    };
    let has_dev = routes
        .iter()
        .any(|m| in_table(m) && m.header.kind == RouteType::Unicast && oif(m) == Some(index));
    if !has_dev {
        h.route()
            .add(
                RouteMessageBuilder::<Ipv4Addr>::new()
                    .table_id(ROUTE_TABLE)
                    .protocol(RouteProtocol::Other(RT_PROTO))
                    .output_interface(index)
                    .build(),
            )
            .replace()
            .execute()
            .await
            .map_err(nl_err(format!(
                "adding default dev {ifname} table {ROUTE_TABLE}"
            )))?;
        changes.push(format!("route default dev {ifname} table {ROUTE_TABLE}"));
    }
    changes.extend(ensure_fallback_with(h, spec.route_udp_dport).await?);
    Ok(changes)
}

fn in_table(m: &RouteMessage) -> bool {
    m.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(m.header.table))
        == ROUTE_TABLE
        && m.header.destination_prefix_length == 0
}

async fn table_routes(h: &rtnetlink::Handle) -> Result<Vec<RouteMessage>, WgError> {
    h.route()
        .get(
            RouteMessageBuilder::<Ipv4Addr>::new()
                .table_id(ROUTE_TABLE)
                .build(),
        )
        .execute()
        .try_collect()
        .await
        .map_err(nl_err("listing routes"))
}

/// The rule and `unreachable default` in table 84, without the device: what a node needs
/// so that an encrypted network's datagrams are refused while its device is missing (made
/// before the device, kept when it fails).
pub async fn ensure_fallback(route_udp_dport: u16) -> Result<Vec<String>, WgError> {
    let (h, task) = netlink()?;
    let r = ensure_fallback_with(&h, route_udp_dport).await;
    task.abort();
    r
}

async fn ensure_fallback_with(h: &rtnetlink::Handle, dport: u16) -> Result<Vec<String>, WgError> {
    let mut changes = vec![];
    let has_fallback = table_routes(h)
        .await?
        .iter()
        .any(|m| in_table(m) && m.header.kind == RouteType::Unreachable);
    if !has_fallback {
        h.route()
            .add(
                RouteMessageBuilder::<Ipv4Addr>::new()
                    .table_id(ROUTE_TABLE)
                    .protocol(RouteProtocol::Other(RT_PROTO))
                    .kind(RouteType::Unreachable)
                    .priority(FALLBACK_METRIC)
                    .build(),
            )
            .execute()
            .await
            .map_err(nl_err(format!(
                "adding unreachable default table {ROUTE_TABLE}"
            )))?;
        changes.push(format!("route unreachable default table {ROUTE_TABLE}"));
    }
    changes.extend(ensure_rule(h, dport).await?);
    Ok(changes)
}

/// Exactly one rule of ours at priority 84: `ipproto udp dport P lookup 84`.
async fn ensure_rule(h: &rtnetlink::Handle, dport: u16) -> Result<Vec<String>, WgError> {
    let mut changes = vec![];
    let mut present = false;
    for m in &our_rules(h).await? {
        let ours = m.attributes.iter().any(|a| {
            matches!(a, RuleAttribute::DestinationPortRange(r) if r.start == dport && r.end == dport)
        }) && m
            .attributes
            .iter()
            .any(|a| matches!(a, RuleAttribute::IpProtocol(IpProtocol::Udp)))
            && m
                .attributes
                .iter()
                .any(|a| matches!(a, RuleAttribute::Table(t) if *t == ROUTE_TABLE));
        if ours && !present {
            present = true;
            continue;
        }
        h.rule()
            .del(m.clone())
            .execute()
            .await
            .map_err(nl_err("deleting a stale rule at priority 84"))?;
        changes.push("- stale rule at priority 84".to_string());
    }
    if !present {
        let mut req = h
            .rule()
            .add()
            .v4()
            .action(RuleAction::ToTable)
            .priority(ROUTE_TABLE)
            .table_id(ROUTE_TABLE);
        let attrs = &mut req.message_mut().attributes;
        attrs.push(RuleAttribute::IpProtocol(IpProtocol::Udp));
        attrs.push(RuleAttribute::DestinationPortRange(RulePortRange {
            start: dport,
            end: dport,
        }));
        attrs.push(RuleAttribute::Protocol(RouteProtocol::Other(RT_PROTO)));
        req.execute().await.map_err(nl_err(format!(
            "adding rule ipproto udp dport {dport} lookup {ROUTE_TABLE}"
        )))?;
        changes.push(format!(
            "rule ipproto udp dport {dport} lookup {ROUTE_TABLE}"
        ));
    }
    Ok(changes)
}

/// Removes the rule and table 84 (no encrypted network left on the node). Idempotent.
pub async fn remove_routing() -> Result<(), WgError> {
    let (h, task) = netlink()?;
    let r = async {
        for m in our_rules(&h).await? {
            h.rule()
                .del(m)
                .execute()
                .await
                .map_err(nl_err("deleting the rule at priority 84"))?;
        }
        for m in table_routes(&h).await?.iter().filter(|m| {
            m.attributes
                .iter()
                .any(|a| matches!(a, RouteAttribute::Table(t) if *t == ROUTE_TABLE))
        }) {
            h.route()
                .del(m.clone())
                .execute()
                .await
                .map_err(nl_err("deleting a route of table 84"))?;
        }
        Ok(())
    }
    .await;
    task.abort();
    r
}
