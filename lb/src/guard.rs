//! The node namespace's guard table (`ip shoal_guard`): what Shoal opens on the underlay is
//! reachable only as meant.
//!
//! - VXLAN (UDP 4789) is accepted only from peer nodes' underlay addresses: anyone else on
//!   the underlay could otherwise inject frames into every overlay.
//! - Into the ingress namespace's link only flows the node DNATed (published ports) pass,
//!   and out of it only their replies: a host on the underlay that routes 10.255.0.0/16 via
//!   a node reaches no task, and tasks have no way out through the ingress network.
//!
//! - Egress (Docker's docker_gwbridge counterpart): flows that containers start through a
//!   network's egress link (`egress_links`), or through the ingress link from a task with
//!   a way out (`egress_sources`, the ingress addresses of such tasks: publishing tasks
//!   default-route through the ingress network), are masqueraded to the address of the
//!   interface they leave by; only replies go back in. Nothing passes from one egress link
//!   to another (networks stay apart), and no flow started outside enters one.
//!
//! - Encrypted networks (`wireguard`): WireGuard is accepted only from peer nodes; their
//!   VXLAN port is accepted only from the WireGuard interface (a plaintext datagram from the
//!   underlay is dropped), their VNIs are dropped on the plain VXLAN port, and nothing to
//!   their VXLAN port leaves by another interface than WireGuard's: never in the clear,
//!   whatever the routing says (e.g. while the device is missing).
//!
//! Nothing else is filtered: the host's own services are the operator's business.
//! Replaced as a whole in one transaction on every change.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use crate::publish::check_ifname;
use crate::{Applier, LbError};

/// The guard table's name.
pub const GUARD_TABLE: &str = "shoal_guard";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuardSpec {
    /// UDP port of the VXLAN devices.
    pub vxlan_port: u16,
    /// Underlay addresses of the other nodes.
    pub peers: Vec<Ipv4Addr>,
    /// The node's link to the ingress namespace, when it exists.
    pub ingress_link: Option<String>,
    /// Node-side egress links of the networks with a way out on this node.
    pub egress_links: Vec<String>,
    /// Ingress addresses of local tasks that may leave through the ingress link.
    pub egress_sources: Vec<Ipv4Addr>,
    /// The encrypted networks' rules, when the cluster has any.
    pub wireguard: Option<WgGuard>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WgGuard {
    /// WireGuard's UDP port.
    pub port: u16,
    /// The WireGuard interface.
    pub ifname: String,
    /// The encrypted networks' VXLAN port.
    pub vxlan_port: u16,
    /// Their VNIs (dropped on the plain VXLAN port).
    pub vnis: Vec<u32>,
}

/// `{ "a", "b" }`: an anonymous set of interface names (checked).
fn ifname_set(names: &[String]) -> Result<String, LbError> {
    let mut v = names.to_vec();
    v.sort();
    v.dedup();
    for n in &v {
        check_ifname(n)?;
    }
    let quoted: Vec<String> = v.iter().map(|n| format!("\"{n}\"")).collect();
    Ok(format!("{{ {} }}", quoted.join(", ")))
}

fn addr_elements(addrs: &[Ipv4Addr]) -> String {
    let mut v = addrs.to_vec();
    v.sort();
    v.dedup();
    if v.is_empty() {
        return String::new();
    }
    let elems: Vec<String> = v.iter().map(Ipv4Addr::to_string).collect();
    format!("    elements = {{ {} }}\n", elems.join(", "))
}

/// The table as one nft script (delete and re-create: one transaction).
pub fn render_guard(spec: &GuardSpec) -> Result<String, LbError> {
    if spec.vxlan_port == 0 {
        return Err(LbError::Invalid("VXLAN port 0".into()));
    }
    let t = GUARD_TABLE;
    let mut s = format!("table ip {t} {{}}\ndelete table ip {t}\ntable ip {t} {{\n");
    s.push_str("  set peers {\n    type ipv4_addr\n");
    s.push_str(&addr_elements(&spec.peers));
    s.push_str("  }\n");
    s.push_str("  set egress_sources {\n    type ipv4_addr\n");
    s.push_str(&addr_elements(&spec.egress_sources));
    s.push_str("  }\n");
    let _ = write!(
        s,
        "  chain input {{\n    type filter hook input priority -10; policy accept;\n    udp dport {} ip saddr != @peers counter drop comment \"vxlan from a non-peer\"\n",
        spec.vxlan_port
    );
    if let Some(wg) = &spec.wireguard {
        check_ifname(&wg.ifname)?;
        let _ = writeln!(
            s,
            "    udp dport {} ip saddr != @peers counter drop comment \"wireguard from a non-peer\"\n    udp dport {} iifname != \"{}\" counter drop comment \"encrypted network in the clear\"",
            wg.port, wg.vxlan_port, wg.ifname
        );
        let mut vnis = wg.vnis.clone();
        vnis.sort();
        vnis.dedup();
        if !vnis.is_empty() {
            let v: Vec<String> = vnis.iter().map(u32::to_string).collect();
            // The VNI: 24 bits after the UDP header (8 bytes) and the VXLAN flags (4).
            let _ = writeln!(
                s,
                "    udp dport {} @th,96,24 {{ {} }} counter drop comment \"encrypted VNI in the clear\"",
                spec.vxlan_port,
                v.join(", ")
            );
        }
    }
    s.push_str("  }\n");
    if let Some(wg) = &spec.wireguard {
        let _ = writeln!(
            s,
            "  chain output {{\n    type filter hook output priority -10; policy accept;\n    udp dport {} oifname != \"{}\" counter drop comment \"never in the clear\"\n  }}",
            wg.vxlan_port, wg.ifname
        );
    }
    if spec.ingress_link.is_none() && spec.egress_links.is_empty() {
        s.push_str("}\n");
        return Ok(s);
    }
    let mut fwd = String::from(
        "  chain forward {\n    type filter hook forward priority -10; policy accept;\n",
    );
    let mut nat = String::from(
        "  chain postrouting {\n    type nat hook postrouting priority srcnat; policy accept;\n",
    );
    if !spec.egress_links.is_empty() {
        let links = ifname_set(&spec.egress_links)?;
        let _ = writeln!(
            fwd,
            "    iifname {links} oifname {links} counter drop comment \"no way between networks\"\n    oifname {links} ct direction reply accept\n    oifname {links} counter drop comment \"no way in through egress\""
        );
        let _ = writeln!(nat, "    iifname {links} masquerade");
    }
    if let Some(link) = &spec.ingress_link {
        check_ifname(link)?;
        let _ = writeln!(
            fwd,
            "    oifname \"{link}\" ct status dnat accept\n    oifname \"{link}\" ct direction reply ip daddr @egress_sources accept\n    oifname \"{link}\" counter drop comment \"not a published port\"\n    iifname \"{link}\" ct status dnat accept\n    iifname \"{link}\" ct direction original ip saddr @egress_sources accept\n    iifname \"{link}\" counter drop comment \"no way out through ingress\""
        );
        let _ = writeln!(
            nat,
            "    iifname \"{link}\" ip saddr @egress_sources masquerade"
        );
    }
    fwd.push_str("  }\n");
    nat.push_str("  }\n");
    s.push_str(&fwd);
    s.push_str(&nat);
    s.push_str("}\n");
    Ok(s)
}

/// The table removed (the node has no overlay left).
pub fn render_unguard() -> String {
    let t = GUARD_TABLE;
    format!("table ip {t} {{}}\ndelete table ip {t}\n")
}

/// Applies the guard table (`None`: removes it), in one transaction.
pub async fn apply_guard(
    applier: &Applier,
    netns: &str,
    spec: Option<&GuardSpec>,
) -> Result<(), LbError> {
    let script = match spec {
        Some(s) => render_guard(s)?,
        None => render_unguard(),
    };
    applier.apply_script(netns, &script).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_peers_and_ingress_rules() {
        let s = render_guard(&GuardSpec {
            vxlan_port: 4789,
            peers: vec!["192.0.2.13".parse().unwrap(), "192.0.2.12".parse().unwrap()],
            ingress_link: Some("shoal-ingress".into()),
            egress_links: vec![],
            egress_sources: vec![],
            wireguard: None,
        })
        .unwrap();
        assert!(s.contains("elements = { 192.0.2.12, 192.0.2.13 }"), "{s}");
        assert!(
            s.contains("udp dport 4789 ip saddr != @peers counter drop"),
            "{s}"
        );
        assert!(
            s.contains("oifname \"shoal-ingress\" ct status dnat accept"),
            "{s}"
        );
        assert!(s.contains("iifname \"shoal-ingress\" counter drop"), "{s}");
        // No peers: an empty set, every VXLAN datagram dropped; no ingress link: no forward chain.
        let s = render_guard(&GuardSpec {
            vxlan_port: 4789,
            peers: vec![],
            ingress_link: None,
            egress_links: vec![],
            egress_sources: vec![],
            wireguard: None,
        })
        .unwrap();
        assert!(!s.contains("elements"), "{s}");
        assert!(!s.contains("forward"), "{s}");
        let e = render_guard(&GuardSpec {
            vxlan_port: 4789,
            peers: vec![],
            ingress_link: Some("bad name;".into()),
            egress_links: vec![],
            egress_sources: vec![],
            wireguard: None,
        })
        .unwrap_err();
        assert!(e.to_string().contains("bad name"), "{e}");
    }

    #[test]
    fn renders_wireguard() {
        let s = render_guard(&GuardSpec {
            vxlan_port: 4789,
            peers: vec!["192.0.2.12".parse().unwrap()],
            ingress_link: None,
            egress_links: vec![],
            egress_sources: vec![],
            wireguard: Some(WgGuard {
                port: 51820,
                ifname: "shoalwg0".into(),
                vxlan_port: 4790,
                vnis: vec![4098, 4097, 4098],
            }),
        })
        .unwrap();
        for want in [
            "udp dport 51820 ip saddr != @peers counter drop",
            "udp dport 4790 iifname != \"shoalwg0\" counter drop",
            "udp dport 4789 @th,96,24 { 4097, 4098 } counter drop",
            "type filter hook output priority -10; policy accept;\n    udp dport 4790 oifname != \"shoalwg0\" counter drop",
        ] {
            assert!(s.contains(want), "{want:?} missing in\n{s}");
        }
    }

    #[test]
    fn renders_egress() {
        let s = render_guard(&GuardSpec {
            vxlan_port: 4789,
            peers: vec![],
            ingress_link: Some("shoal-ingress".into()),
            egress_links: vec!["se-b".into(), "se-a".into()],
            egress_sources: vec!["10.255.0.9".parse().unwrap()],
            wireguard: None,
        })
        .unwrap();
        let links = "{ \"se-a\", \"se-b\" }";
        for want in [
            format!("iifname {links} oifname {links} counter drop"),
            format!("oifname {links} ct direction reply accept"),
            format!("oifname {links} counter drop comment \"no way in through egress\""),
            format!("iifname {links} masquerade"),
            "elements = { 10.255.0.9 }".to_string(),
            "iifname \"shoal-ingress\" ct direction original ip saddr @egress_sources accept"
                .to_string(),
            "iifname \"shoal-ingress\" ip saddr @egress_sources masquerade".to_string(),
        ] {
            assert!(s.contains(&want), "{want:?} missing in\n{s}");
        }
        // The egress rules come before the ingress link's drops.
        assert!(
            s.find("no way in through egress") < s.find("not a published port"),
            "{s}"
        );
        // Egress without an ingress link still gets its chains.
        let s = render_guard(&GuardSpec {
            vxlan_port: 4789,
            peers: vec![],
            ingress_link: None,
            egress_links: vec!["se-a".into()],
            egress_sources: vec![],
            wireguard: None,
        })
        .unwrap();
        assert!(s.contains("iifname { \"se-a\" } masquerade"), "{s}");
        assert!(!s.contains("shoal-ingress"), "{s}");
        let e = render_guard(&GuardSpec {
            vxlan_port: 4789,
            peers: vec![],
            ingress_link: None,
            egress_links: vec!["x;y".into()],
            egress_sources: vec![],
            wireguard: None,
        })
        .unwrap_err();
        assert!(e.to_string().contains("x;y"), "{e}");
    }
}
