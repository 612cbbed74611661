//! The node namespace's guard table (`ip shoal_guard`): what Shoal opens on the underlay is
//! reachable only as meant.
//!
//! - VXLAN (UDP 4789) is accepted only from peer nodes' underlay addresses: anyone else on
//!   the underlay could otherwise inject frames into every overlay.
//! - Into the ingress namespace's link only flows the node DNATed (published ports) pass,
//!   and out of it only their replies: a host on the underlay that routes 10.255.0.0/16 via
//!   a node reaches no task, and tasks have no way out through the ingress network.
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
}

/// The table as one nft script (delete and re-create: one transaction).
pub fn render_guard(spec: &GuardSpec) -> Result<String, LbError> {
    if spec.vxlan_port == 0 {
        return Err(LbError::Invalid("VXLAN port 0".into()));
    }
    let t = GUARD_TABLE;
    let mut s = format!("table ip {t} {{}}\ndelete table ip {t}\ntable ip {t} {{\n");
    s.push_str("  set peers {\n    type ipv4_addr\n");
    if !spec.peers.is_empty() {
        let mut peers = spec.peers.clone();
        peers.sort();
        peers.dedup();
        let elems: Vec<String> = peers.iter().map(Ipv4Addr::to_string).collect();
        let _ = writeln!(s, "    elements = {{ {} }}", elems.join(", "));
    }
    s.push_str("  }\n");
    let _ = writeln!(
        s,
        "  chain input {{\n    type filter hook input priority -10; policy accept;\n    udp dport {} ip saddr != @peers counter drop comment \"vxlan from a non-peer\"\n  }}",
        spec.vxlan_port
    );
    if let Some(link) = &spec.ingress_link {
        check_ifname(link)?;
        let _ = writeln!(
            s,
            "  chain forward {{\n    type filter hook forward priority -10; policy accept;\n    oifname \"{link}\" ct status dnat accept\n    oifname \"{link}\" counter drop comment \"not a published port\"\n    iifname \"{link}\" ct status dnat accept\n    iifname \"{link}\" counter drop comment \"no way out through ingress\"\n  }}"
        );
    }
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
        })
        .unwrap();
        assert!(!s.contains("elements"), "{s}");
        assert!(!s.contains("forward"), "{s}");
        let e = render_guard(&GuardSpec {
            vxlan_port: 4789,
            peers: vec![],
            ingress_link: Some("bad name;".into()),
        })
        .unwrap_err();
        assert!(e.to_string().contains("bad name"), "{e}");
    }
}
