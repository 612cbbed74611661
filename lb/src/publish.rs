//! Published ports: the node namespace's table [`PUBLISH_TABLE`] (DNAT of published ports on
//! every local address to backends on the ingress network, host mode to local tasks only)
//! and the ingress namespace's table [`MARK_TABLE`] (which node a flow came from, for the
//! return path that keeps client addresses; see shoal-mesh's `ingress` module).
//!
//! Published ports are few (one per service port, not per VIP and container), so each change
//! replaces the whole table in one nft transaction; established flows keep their NAT binding
//! in conntrack. UDP has no connection end, so after every change the node's UDP conntrack
//! entries of published ports whose NAT target is no longer a backend (or that were never
//! NATed: datagrams that arrived before the port was published) are deleted
//! ([`stale_entries`]): the next datagram is NATed afresh (moby#44742). TCP attempts that
//! never got an answer from a target that left go too: a client that reuses the source port
//! soon (they do, under load) would otherwise be sent to the dead target again.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::Ipv4Addr;

use crate::conntrack::{CtClient, CtEntry};
use crate::{Applier, LbError, Protocol};

/// Table of the node namespace.
pub const PUBLISH_TABLE: &str = "shoal_publish";
/// Table of the ingress namespace.
pub const MARK_TABLE: &str = "shoal_ingress";

/// How a published port reaches its backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum PublishKind {
    /// Every node answers; backends on any node, client address kept.
    Ingress,
    /// Every node answers; the receiving node SNATs to its own address (Docker's way).
    IngressSnat,
    /// Only nodes with a local backend answer (the spec lists local backends only).
    Host,
}

/// One published port on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublishedPort {
    pub protocol: Protocol,
    pub port: u16,
    pub kind: PublishKind,
    /// (address on the ingress network, target port), sorted. Empty: refused (TCP reset /
    /// ICMP port unreachable) for ingress ports; host ports without local backends are not
    /// programmed at all (the node refuses as for any closed port).
    pub backends: Vec<(Ipv4Addr, u16)>,
}

/// Everything the node namespace needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublishSpec {
    /// The node's address: source of SNATed flows (`snat` ports and flows from 127.0.0.0/8).
    pub node_addr: Ipv4Addr,
    /// The node's link to the ingress namespace (SNAT applies on the way out through it).
    pub link: String,
    pub ports: Vec<PublishedPort>,
}

pub(crate) fn check_ifname(name: &str) -> Result<(), LbError> {
    if name.is_empty()
        || name.len() > 15
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(LbError::Invalid(format!("invalid interface name {name:?}")));
    }
    Ok(())
}

/// Checks the spec: no port twice per protocol, valid link name.
pub fn validate_publish(spec: &PublishSpec) -> Result<(), LbError> {
    check_ifname(&spec.link)?;
    let mut seen = BTreeSet::new();
    for p in &spec.ports {
        if p.port == 0 {
            return Err(LbError::Invalid("published port 0".into()));
        }
        if !seen.insert((p.protocol, p.port)) {
            return Err(LbError::Invalid(format!(
                "port {}/{} published twice",
                p.port, p.protocol
            )));
        }
        if p.backends.iter().any(|(_, tp)| *tp == 0) {
            return Err(LbError::Invalid(format!(
                "port {}/{}: target port 0",
                p.port, p.protocol
            )));
        }
    }
    Ok(())
}

fn chain_name(p: &PublishedPort) -> String {
    format!("p_{}_{}", p.protocol, p.port)
}

/// The node table as one nft transaction that replaces any previous version.
pub fn render_publish(spec: &PublishSpec) -> String {
    let mut ports: Vec<&PublishedPort> = spec.ports.iter().collect();
    ports.sort_by_key(|p| (p.protocol, p.port));
    let mut s = String::new();
    let t = PUBLISH_TABLE;
    // Create-then-delete makes the delete valid whether or not the table exists.
    let _ = writeln!(s, "table ip {t} {{}}\ndelete table ip {t}\ntable ip {t} {{");
    s.push_str(
        "  chain prerouting {\n    type nat hook prerouting priority dstnat; policy accept;\n    fib daddr type local jump published\n  }\n",
    );
    // Locally generated: `curl localhost:P` on the node.
    s.push_str(
        "  chain output {\n    type nat hook output priority -100; policy accept;\n    fib daddr type local jump published\n  }\n",
    );
    s.push_str("  chain published {\n");
    for p in &ports {
        if p.kind == PublishKind::Host && p.backends.is_empty() {
            continue;
        }
        let _ = writeln!(
            s,
            "    {} dport {} goto {}",
            p.protocol,
            p.port,
            chain_name(p)
        );
    }
    s.push_str("  }\n");
    for p in &ports {
        if p.kind == PublishKind::Host && p.backends.is_empty() {
            continue;
        }
        let _ = writeln!(s, "  chain {} {{", chain_name(p));
        if p.backends.is_empty() {
            match p.protocol {
                Protocol::Tcp => s.push_str("    reject with tcp reset\n"),
                Protocol::Udp => s.push_str("    reject\n"),
            }
        } else {
            let elems: Vec<String> = p
                .backends
                .iter()
                .enumerate()
                .map(|(i, (ip, tp))| format!("{i} : {ip} . {tp}"))
                .collect();
            let _ = writeln!(
                s,
                "    meta l4proto {} dnat ip to numgen random mod {} map {{ {} }}",
                p.protocol,
                p.backends.len(),
                elems.join(", ")
            );
        }
        s.push_str("  }\n");
    }
    let _ = writeln!(
        s,
        "  chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;"
    );
    // From the node itself to 127.0.0.1:P: the backend could not answer 127.0.0.1.
    let _ = writeln!(
        s,
        "    oifname \"{}\" ct status dnat ip saddr 127.0.0.0/8 snat ip to {}",
        spec.link, spec.node_addr
    );
    for p in ports.iter().filter(|p| p.kind == PublishKind::IngressSnat) {
        let _ = writeln!(
            s,
            "    oifname \"{}\" ct status dnat meta l4proto {} ct original proto-dst {} snat ip to {}",
            spec.link, p.protocol, p.port, spec.node_addr
        );
    }
    s.push_str("  }\n}\n");
    s
}

/// The node table with no published port: removed.
pub fn render_unpublish() -> String {
    let t = PUBLISH_TABLE;
    format!("table ip {t} {{}}\ndelete table ip {t}\n")
}

/// The ingress namespace's mark table: `peers` maps each other node's VTEP MAC on the
/// ingress VXLAN device to its mark (shoal-mesh's `ingress::peer_mark`).
pub fn render_marks(vxlan_dev: &str, peers: &BTreeMap<[u8; 6], u32>) -> Result<String, LbError> {
    check_ifname(vxlan_dev)?;
    let t = MARK_TABLE;
    let mut s = format!("table ip {t} {{}}\ndelete table ip {t}\ntable ip {t} {{\n");
    s.push_str("  map node_by_mac {\n    type ether_addr : mark\n");
    if !peers.is_empty() {
        let elems: Vec<String> = peers
            .iter()
            .map(|(mac, mark)| {
                format!(
                    "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x} : {mark:#x}",
                    mac[0], mac[1], mac[2], mac[3], mac[4], mac[5]
                )
            })
            .collect();
        let _ = writeln!(s, "    elements = {{ {} }}", elems.join(", "));
    }
    s.push_str("  }\n");
    // Mangle priority: before the routing decision (and its reverse-path check), so that
    // the mark steers both directions of the flow.
    let _ = writeln!(
        s,
        "  chain prerouting {{\n    type filter hook prerouting priority mangle; policy accept;\n    iifname \"{vxlan_dev}\" ct state new ct mark set ether saddr map @node_by_mac\n    meta mark set ct mark\n  }}\n}}"
    );
    Ok(s)
}

/// Applies the node table (`None` or no ports: removes it), in one transaction.
pub async fn apply_publish(
    applier: &Applier,
    netns: &str,
    spec: Option<&PublishSpec>,
) -> Result<(), LbError> {
    let script = match spec {
        Some(s) if !s.ports.is_empty() => {
            validate_publish(s)?;
            render_publish(s)
        }
        _ => render_unpublish(),
    };
    applier.apply_script(netns, &script).await
}

/// Applies the ingress namespace's mark table.
pub async fn apply_marks(
    applier: &Applier,
    netns: &str,
    vxlan_dev: &str,
    peers: &BTreeMap<[u8; 6], u32>,
) -> Result<(), LbError> {
    let script = render_marks(vxlan_dev, peers)?;
    applier.apply_script(netns, &script).await
}

/// Entries to delete after a change, among those to a local address (`is_local`) and a port
/// that was (`before`) or is (`now`) published. UDP: every flow whose reply does not come
/// from a current backend of its port (flows NATed to a target that left, flows of ports no
/// longer published, datagrams conntrack saw before the DNAT existed); a local listener's
/// own flows on a port no longer published stay. TCP: attempts NATed to a target that is no
/// longer a backend and that never got a reply. Flows to current backends always stay.
pub fn stale_entries(
    entries: &[CtEntry],
    before: &PublishSpec,
    now: &PublishSpec,
    is_local: &dyn Fn(Ipv4Addr) -> bool,
) -> Vec<CtEntry> {
    type Ports = BTreeMap<(Protocol, u16), BTreeSet<(Ipv4Addr, u16)>>;
    let ports = |s: &PublishSpec| -> Ports {
        s.ports
            .iter()
            .map(|p| ((p.protocol, p.port), p.backends.iter().copied().collect()))
            .collect()
    };
    let (old, new) = (ports(before), ports(now));
    entries
        .iter()
        .filter(|e| is_local(e.orig.dst))
        .filter(|e| {
            let key = (e.protocol, e.orig.dport);
            let target = (e.reply.src, e.reply.sport);
            let nated = e.reply.src != e.orig.dst || e.reply.sport != e.orig.dport;
            let current = new.get(&key).is_some_and(|b| b.contains(&target));
            let ours = new.contains_key(&key) || old.contains_key(&key);
            match e.protocol {
                Protocol::Udp if new.contains_key(&key) => !current,
                Protocol::Udp => ours && nated,
                Protocol::Tcp => ours && nated && !current && !e.replied,
            }
        })
        .copied()
        .collect()
}

/// Deletes [`stale_entries`] in `netns`; returns how many were deleted.
pub fn clean_conntrack(
    netns: &str,
    before: &PublishSpec,
    now: &PublishSpec,
    is_local: &dyn Fn(Ipv4Addr) -> bool,
) -> Result<usize, LbError> {
    if before.ports.is_empty() && now.ports.is_empty() {
        return Ok(0);
    }
    let ct_err = |e: crate::conntrack::CtError| LbError::Conntrack(e.to_string());
    let mut ct = CtClient::open_in(netns).map_err(ct_err)?;
    // Only what `stale_entries` can pick is kept from the dump (UDP, or TCP never answered,
    // on a port that is or was published): not the TIME_WAIT bulk of a busy port.
    let ports: BTreeSet<(Protocol, u16)> = before
        .ports
        .iter()
        .chain(&now.ports)
        .map(|p| (p.protocol, p.port))
        .collect();
    let candidates = ct
        .list_where(|e| {
            ports.contains(&(e.protocol, e.orig.dport))
                && (e.protocol == Protocol::Udp || !e.replied)
        })
        .map_err(ct_err)?;
    let stale = stale_entries(&candidates, before, now, is_local);
    let mut n = 0;
    for e in &stale {
        if ct.delete(e).map_err(ct_err)? {
            n += 1;
        }
    }
    if n > 0 {
        tracing::info!(
            netns,
            deleted = n,
            "deleted stale conntrack entries of published ports"
        );
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conntrack::CtTuple;

    fn spec(ports: Vec<PublishedPort>) -> PublishSpec {
        PublishSpec {
            node_addr: "192.0.2.11".parse().unwrap(),
            link: "shoal-ingress".into(),
            ports,
        }
    }
    fn port(protocol: Protocol, port: u16, kind: PublishKind, b: &[(&str, u16)]) -> PublishedPort {
        PublishedPort {
            protocol,
            port,
            kind,
            backends: b.iter().map(|(ip, p)| (ip.parse().unwrap(), *p)).collect(),
        }
    }

    #[test]
    fn renders_ingress_host_snat_and_refusals() {
        let s = spec(vec![
            port(
                Protocol::Tcp,
                8080,
                PublishKind::Ingress,
                &[("10.255.0.3", 80), ("10.255.0.4", 80)],
            ),
            port(Protocol::Udp, 5353, PublishKind::Ingress, &[]),
            port(Protocol::Tcp, 9090, PublishKind::Host, &[]),
            port(
                Protocol::Tcp,
                8082,
                PublishKind::IngressSnat,
                &[("10.255.0.3", 80)],
            ),
        ]);
        let text = render_publish(&s);
        assert!(text.contains("    tcp dport 8080 goto p_tcp_8080\n"));
        assert!(text.contains(
            "meta l4proto tcp dnat ip to numgen random mod 2 map { 0 : 10.255.0.3 . 80, 1 : 10.255.0.4 . 80 }"
        ));
        assert!(text.contains("  chain p_udp_5353 {\n    reject\n"));
        // A host port without a local backend is not programmed: the node refuses it.
        assert!(!text.contains("9090"));
        assert!(text.contains(
            "oifname \"shoal-ingress\" ct status dnat meta l4proto tcp ct original proto-dst 8082 snat ip to 192.0.2.11"
        ));
        assert!(!text.contains("proto-dst 8080"));
        assert!(text.starts_with("table ip shoal_publish {}\ndelete table ip shoal_publish\n"));
    }

    #[test]
    fn validation_names_the_problem() {
        let mut s = spec(vec![
            port(Protocol::Tcp, 80, PublishKind::Ingress, &[]),
            port(Protocol::Tcp, 80, PublishKind::Host, &[]),
        ]);
        let e = validate_publish(&s).unwrap_err().to_string();
        assert!(e.contains("80/tcp published twice"), "{e}");
        s.ports.pop();
        s.link = "bad name\"".into();
        assert!(validate_publish(&s).is_err());
    }

    #[test]
    fn marks_map_macs_to_marks() {
        let mut peers = BTreeMap::new();
        peers.insert([2, 0x53, 192, 0, 2, 12], 0xc000020c);
        let t = render_marks("vxlan0", &peers).unwrap();
        assert!(
            t.contains("elements = { 02:53:c0:00:02:0c : 0xc000020c }"),
            "{t}"
        );
        assert!(
            t.contains("iifname \"vxlan0\" ct state new ct mark set ether saddr map @node_by_mac")
        );
        let empty = render_marks("vxlan0", &BTreeMap::new()).unwrap();
        assert!(!empty.contains("elements"));
    }

    fn entry(orig_dst: &str, dport: u16, reply_src: &str, reply_sport: u16) -> CtEntry {
        CtEntry {
            protocol: Protocol::Udp,
            orig: CtTuple {
                src: "192.0.2.100".parse().unwrap(),
                dst: orig_dst.parse().unwrap(),
                sport: 40000,
                dport,
            },
            reply: CtTuple {
                src: reply_src.parse().unwrap(),
                dst: "192.0.2.100".parse().unwrap(),
                sport: reply_sport,
                dport: 40000,
            },
            id: None,
            zone: 0,
            replied: false,
        }
    }

    #[test]
    fn stale_udp_entries_are_those_not_going_to_a_current_backend() {
        let node: Ipv4Addr = "192.0.2.11".parse().unwrap();
        let is_local = |ip: Ipv4Addr| ip == node;
        let before = spec(vec![
            port(
                Protocol::Udp,
                53,
                PublishKind::Ingress,
                &[("10.255.0.3", 53), ("10.255.0.4", 53)],
            ),
            port(
                Protocol::Udp,
                99,
                PublishKind::Ingress,
                &[("10.255.0.3", 99)],
            ),
        ]);
        let now = spec(vec![port(
            Protocol::Udp,
            53,
            PublishKind::Ingress,
            &[("10.255.0.3", 53)],
        )]);
        let keep = entry("192.0.2.11", 53, "10.255.0.3", 53);
        let moved = entry("192.0.2.11", 53, "10.255.0.4", 53);
        let early = entry("192.0.2.11", 53, "192.0.2.11", 53); // before the DNAT existed
        let unpublished = entry("192.0.2.11", 99, "10.255.0.3", 99);
        let listener = entry("192.0.2.11", 99, "192.0.2.11", 99);
        let elsewhere = entry("198.51.100.1", 53, "198.51.100.1", 53);
        let all = [keep, moved, early, unpublished, listener, elsewhere];
        let stale = stale_entries(&all, &before, &now, &is_local);
        assert_eq!(stale, vec![moved, early, unpublished]);
    }

    #[test]
    fn stale_tcp_entries_are_unanswered_attempts_to_a_target_that_left() {
        let node: Ipv4Addr = "192.0.2.11".parse().unwrap();
        let is_local = |ip: Ipv4Addr| ip == node;
        let tcp = |e: CtEntry, replied: bool| CtEntry {
            protocol: Protocol::Tcp,
            replied,
            ..e
        };
        let before = spec(vec![port(
            Protocol::Tcp,
            80,
            PublishKind::Ingress,
            &[("10.255.0.3", 80), ("10.255.0.4", 80)],
        )]);
        let now = spec(vec![port(
            Protocol::Tcp,
            80,
            PublishKind::Ingress,
            &[("10.255.0.3", 80)],
        )]);
        let syn_to_gone = tcp(entry("192.0.2.11", 80, "10.255.0.4", 80), false);
        let est_to_gone = tcp(entry("192.0.2.11", 80, "10.255.0.4", 80), true);
        let syn_to_live = tcp(entry("192.0.2.11", 80, "10.255.0.3", 80), false);
        let not_ours = tcp(entry("192.0.2.11", 22, "192.0.2.11", 22), false);
        let all = [syn_to_gone, est_to_gone, syn_to_live, not_ours];
        assert_eq!(
            stale_entries(&all, &before, &now, &is_local),
            vec![syn_to_gone]
        );
    }
}
