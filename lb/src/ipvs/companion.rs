//! The nft table that goes with the IPVS dataplane (`ip shoal_ipvs`): what IPVS itself
//! cannot do.
//!
//! - **fwmarks for port-0 services.** IPVS serves "every port of a VIP" only as a
//!   firewall-mark service; `map fwmarks` (`vip . proto : mark`, one element per port-0
//!   service, value [`fwmark_for`]) is applied in mangle prerouting (traffic from containers)
//!   and in a `route` output chain (the namespace's own connections; a `route` chain
//!   re-routes after the mark changes). IPVS looks fwmark services up before address
//!   services, so packets to a port that has its own service (`set ports`) are not marked.
//! - **hairpin masquerade.** A task picked as the backend of its own connection to a VIP
//!   would answer itself directly; `ip saddr . ip daddr @hairpin masquerade` (one `ep . ep`
//!   per local endpoint) in nat postrouting makes the reply come back through the namespace.
//!   netfilter sees IPVS's NAT only with `net.ipv4.vs.conntrack=1` (set by
//!   [`sync`](super::sync)).
//!
//! Rendered like the nft dataplane's table: `table ip T {}` + `delete table ip T` + the full
//! definition, one transaction; sorted and deduplicated, so the text is deterministic.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::Ipv4Addr;

use super::fwmark_for;
use crate::{Protocol, Ruleset};

/// Name of the companion table (`ip` family).
pub const COMPANION_TABLE: &str = "shoal_ipvs";

/// Comment of the companion table (tells our tables from others).
pub const COMPANION_COMMENT: &str = "managed by shoal-lb, IPVS companion";

/// The companion table of `rs` as one nft script (pure). See the module documentation.
pub fn companion_script(rs: &Ruleset) -> String {
    let mut marks: BTreeMap<(Ipv4Addr, Protocol), u32> = BTreeMap::new();
    let mut ports: BTreeSet<(Ipv4Addr, Protocol, u16)> = BTreeSet::new();
    for s in &rs.services {
        if s.port == 0 {
            marks.insert((s.vip, s.protocol), fwmark_for(s.vip, s.protocol));
        } else {
            ports.insert((s.vip, s.protocol, s.port));
        }
    }
    // Only ports that a fwmark would otherwise capture need the exception.
    ports.retain(|(vip, p, _)| marks.contains_key(&(*vip, *p)));
    let hairpin: BTreeSet<Ipv4Addr> = rs.local_endpoints.iter().copied().collect();

    let t = COMPANION_TABLE;
    let mut s = format!("table ip {t} {{}}\ndelete table ip {t}\ntable ip {t} {{\n");
    let _ = writeln!(s, "\tcomment \"{COMPANION_COMMENT}\"");
    elements(
        &mut s,
        "map fwmarks",
        "ipv4_addr . inet_proto : mark",
        marks
            .iter()
            .map(|((vip, p), m)| format!("{vip} . {p} : {m:#010x}")),
    );
    elements(
        &mut s,
        "set ports",
        "ipv4_addr . inet_proto . inet_service",
        ports
            .iter()
            .map(|(vip, p, port)| format!("{vip} . {p} . {port}")),
    );
    elements(
        &mut s,
        "set hairpin",
        "ipv4_addr . ipv4_addr",
        hairpin.iter().map(|ep| format!("{ep} . {ep}")),
    );
    let mark_rules = "\t\tip daddr . meta l4proto . th dport @ports return\n\
                      \t\tmeta mark set ip daddr . meta l4proto map @fwmarks\n";
    let _ = write!(
        s,
        "\tchain prerouting {{\n\
         \t\ttype filter hook prerouting priority mangle; policy accept;\n\
         {mark_rules}\
         \t}}\n\
         \tchain output {{\n\
         \t\ttype route hook output priority mangle; policy accept;\n\
         {mark_rules}\
         \t}}\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\tip saddr . ip daddr @hairpin masquerade\n\
         \t}}\n\
         }}\n"
    );
    s
}

/// `\t<kind> NAME {` with its type and elements (one per line when there are several).
fn elements(out: &mut String, kind: &str, ty: &str, items: impl Iterator<Item = String>) {
    let items: Vec<String> = items.collect();
    let _ = write!(out, "\t{kind} {{\n\t\ttype {ty}\n");
    match items.len() {
        0 => {}
        1 => {
            let _ = writeln!(out, "\t\telements = {{ {} }}", items[0]);
        }
        _ => {
            let _ = writeln!(
                out,
                "\t\telements = {{\n\t\t\t{}\n\t\t}}",
                items.join(",\n\t\t\t")
            );
        }
    }
    out.push_str("\t}\n");
}
