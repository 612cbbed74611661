//! The sorted, deduplicated model of one LB table: what [`Model::render`] writes and
//! [`Model::trace`] walks.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::Ipv4Addr;

use crate::{LbError, Packet, Protocol, Ruleset, Trace};

/// Comment on the table: says who owns it.
pub const TABLE_COMMENT: &str = "managed by shoal-lb";
/// Comment on the chain of a service without backends.
pub const NO_BACKENDS_COMMENT: &str = "no backends: rejected in chain input";

/// The base chains: the same for every table, they only refer to its sets and map.
const BASE_CHAINS: &str = "\
\tchain prerouting {
\t\ttype nat hook prerouting priority dstnat; policy accept;
\t\tip daddr . meta l4proto . th dport vmap @services
\t\tip daddr . meta l4proto vmap @any_port
\t}
\tchain output {
\t\ttype nat hook output priority -100; policy accept;
\t\tip daddr . meta l4proto . th dport vmap @services
\t\tip daddr . meta l4proto vmap @any_port
\t}
\tchain postrouting {
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\tct status dnat ip saddr . ip daddr @hairpin masquerade
\t}
\tchain input {
\t\ttype filter hook input priority filter; policy accept;
\t\tip daddr @vips ct status dnat accept
\t\tip daddr @vips meta l4proto tcp reject with tcp reset
\t\tip daddr @vips reject with icmp type port-unreachable
\t}
";
// Notes on BASE_CHAINS:
// - nft 1.0.6 accepts the `dstnat` priority keyword only on prerouting: -100 is its value.
// - input: what still targets a VIP was not DNATed (not a service port, or no backends) and
//   is rejected at once. The namespace's own connections to a VIP take the VIP as source
//   address (local route), so their replies arrive addressed to it: `ct status dnat` lets
//   them (and their related ICMP) pass.

/// `port` 0 in a [`crate::VirtualService`]: every port of that protocol, DNATed to the same
/// port of a backend (Docker Swarm's VIP semantics). A specific port entry wins over it.
pub const ANY_PORT: u16 = 0;

/// Key of the `services` verdict map: `ip daddr . meta l4proto . th dport`.
pub type ServiceKey = (Ipv4Addr, Protocol, u16);

/// One service port's chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceChain {
    /// `svc_<id>_<proto>_<port>`.
    pub name: String,
    /// Sorted, deduplicated `(backend, target_port)`; slot `i` of the numgen map is element i.
    pub backends: Vec<(Ipv4Addr, u16)>,
}

/// Desired content of one table.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Model {
    pub table: String,
    /// `set vips`: all VIPs, including those of services.
    pub vips: BTreeSet<Ipv4Addr>,
    /// `map services`: key -> chain.
    pub services: BTreeMap<ServiceKey, ServiceChain>,
    /// `set hairpin`: one `ep . ep` element per local endpoint.
    pub hairpin: BTreeSet<Ipv4Addr>,
}

/// Object name of a service port's chain (`..._any` for every port).
pub fn chain_name(id: &str, protocol: Protocol, port: u16) -> String {
    if port == ANY_PORT {
        format!("svc_{id}_{protocol}_any")
    } else {
        format!("svc_{id}_{protocol}_{port}")
    }
}

impl Model {
    /// Builds the model. Services sharing a key: the one with the smallest id wins
    /// ([`crate::validate`] reports such rulesets before they are applied).
    pub fn from_ruleset(rs: &Ruleset) -> Model {
        let mut services_sorted: Vec<_> = rs.services.iter().collect();
        services_sorted.sort_by(|a, b| {
            (a.vip, a.protocol, a.port, &a.id).cmp(&(b.vip, b.protocol, b.port, &b.id))
        });
        let mut services = BTreeMap::new();
        let mut vips: BTreeSet<Ipv4Addr> = rs.vips.iter().copied().collect();
        for s in services_sorted {
            vips.insert(s.vip);
            services
                .entry((s.vip, s.protocol, s.port))
                .or_insert_with(|| {
                    let backends: BTreeSet<_> =
                        s.backends.iter().map(|b| (*b, s.target_port)).collect();
                    ServiceChain {
                        name: chain_name(&s.id, s.protocol, s.port),
                        backends: backends.into_iter().collect(),
                    }
                });
        }
        Model {
            table: rs.table.clone(),
            vips,
            services,
            hairpin: rs.local_endpoints.iter().copied().collect(),
        }
    }

    /// The nft script (see [`crate::render`]).
    pub fn render(&self) -> String {
        let t = &self.table;
        let mut o = String::new();
        // Creating the table first makes the delete valid when it does not exist yet; all
        // three commands form one transaction.
        let _ = writeln!(o, "table ip {t} {{}}");
        let _ = writeln!(o, "delete table ip {t}");
        let _ = writeln!(o, "table ip {t} {{");
        let _ = writeln!(o, "\tcomment \"{TABLE_COMMENT}\"");

        let _ = writeln!(o, "\tset vips {{");
        let _ = writeln!(o, "\t\ttype ipv4_addr");
        write_elements(&mut o, self.vips.iter().map(|v| v.to_string()));
        let _ = writeln!(o, "\t}}");

        let _ = writeln!(o, "\tset hairpin {{");
        let _ = writeln!(o, "\t\ttype ipv4_addr . ipv4_addr");
        write_elements(&mut o, self.hairpin.iter().map(|e| format!("{e} . {e}")));
        let _ = writeln!(o, "\t}}");

        let _ = writeln!(o, "\tmap services {{");
        let _ = writeln!(
            o,
            "\t\ttype ipv4_addr . inet_proto . inet_service : verdict"
        );
        write_elements(
            &mut o,
            self.services
                .iter()
                .filter(|((_, _, port), _)| *port != ANY_PORT)
                .map(|((vip, proto, port), c)| {
                    format!("{vip} . {proto} . {port} : goto {}", c.name)
                }),
        );
        let _ = writeln!(o, "\t}}");

        let _ = writeln!(o, "\tmap any_port {{");
        let _ = writeln!(o, "\t\ttype ipv4_addr . inet_proto : verdict");
        write_elements(
            &mut o,
            self.services
                .iter()
                .filter(|((_, _, port), _)| *port == ANY_PORT)
                .map(|((vip, proto, _), c)| format!("{vip} . {proto} : goto {}", c.name)),
        );
        let _ = writeln!(o, "\t}}");

        for ((_, proto, _), c) in &self.services {
            let _ = writeln!(o, "\tchain {} {{", c.name);
            if c.backends.is_empty() {
                let _ = writeln!(o, "\t\tcomment \"{NO_BACKENDS_COMMENT}\"");
            } else {
                let slots: Vec<String> = c
                    .backends
                    .iter()
                    .enumerate()
                    .map(|(i, (a, p))| {
                        if *p == ANY_PORT {
                            // The destination port is kept: only the address changes.
                            format!("{i} : {a}")
                        } else {
                            format!("{i} : {a} . {p}")
                        }
                    })
                    .collect();
                let _ = writeln!(
                    o,
                    "\t\tmeta l4proto {proto} dnat ip to numgen random mod {} map {{ {} }}",
                    c.backends.len(),
                    slots.join(", ")
                );
            }
            let _ = writeln!(o, "\t}}");
        }

        o.push_str(BASE_CHAINS);
        o.push_str("}\n");
        o
    }

    /// Where a new packet goes, following the rendered rules in hook order: nat prerouting /
    /// output (`vmap @services` -> service chain -> dnat), then filter input for what still
    /// targets a VIP, and nat postrouting's hairpin set for the chosen backend.
    pub fn trace(&self, p: &Packet) -> Trace {
        // The per-port map is consulted first, then the any-port map.
        let chain = self
            .services
            .get(&(p.dst, p.protocol, p.dport))
            .or_else(|| self.services.get(&(p.dst, p.protocol, ANY_PORT)));
        if let Some(c) = chain
            && !c.backends.is_empty()
        {
            // postrouting: ct status dnat (true after the dnat) and saddr . daddr in @hairpin.
            let masquerade_if_hairpin = c
                .backends
                .iter()
                .any(|(b, _)| *b == p.src && self.hairpin.contains(b));
            return Trace::Dnat {
                candidates: c
                    .backends
                    .iter()
                    .map(|(b, port)| (*b, if *port == ANY_PORT { p.dport } else { *port }))
                    .collect(),
                masquerade_if_hairpin,
            };
        }
        // Not DNATed: still addressed to the VIP, a local address of the namespace, so it
        // reaches filter input, where `ip daddr @vips` rejects it.
        if self.vips.contains(&p.dst) {
            Trace::Reject
        } else {
            Trace::NotVip
        }
    }
}

fn write_elements(o: &mut String, elems: impl Iterator<Item = String>) {
    // One element per line once there are several: readable diffs of big maps.
    let elems: Vec<String> = elems.collect();
    match elems.as_slice() {
        [] => {}
        [one] => {
            let _ = writeln!(o, "\t\telements = {{ {one} }}");
        }
        many => {
            let _ = writeln!(
                o,
                "\t\telements = {{\n\t\t\t{}\n\t\t}}",
                many.join(",\n\t\t\t")
            );
        }
    }
}

/// Longest object name nft accepts is 255 bytes; stay well below it.
const MAX_NAME: usize = 200;

fn is_table_name(s: &str) -> bool {
    // Characters nft's lexer takes inside one identifier; anything else (space, quote, brace,
    // semicolon, newline, '#') could end the token and inject commands. Whether nft accepts
    // the name (e.g. a leading digit) is left to nft, whose error is reported.
    !s.is_empty()
        && s.len() <= MAX_NAME
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

fn is_service_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME - 20
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

pub(crate) fn validate(rs: &Ruleset) -> Result<(), LbError> {
    if !is_table_name(&rs.table) {
        return Err(LbError::Invalid(format!(
            "table name {:?} must be 1-{MAX_NAME} characters of [A-Za-z0-9_.-]",
            rs.table
        )));
    }
    let mut keys = BTreeMap::new();
    let mut chains = BTreeMap::new();
    for s in &rs.services {
        if !is_service_id(&s.id) {
            return Err(LbError::Invalid(format!(
                "service id {:?} must be 1-{} characters of [a-z0-9_]",
                s.id,
                MAX_NAME - 20
            )));
        }
        if (s.port == ANY_PORT) != (s.target_port == ANY_PORT) {
            return Err(LbError::Invalid(format!(
                "service {:?}: port {} with target port {}: 0 (every port) must be used for both or neither",
                s.id, s.port, s.target_port
            )));
        }
        if let Some(other) = keys.insert((s.vip, s.protocol, s.port), &s.id) {
            return Err(LbError::Invalid(format!(
                "services {other:?} and {:?} both claim {}:{}/{}",
                s.id, s.vip, s.port, s.protocol
            )));
        }
        let name = chain_name(&s.id, s.protocol, s.port);
        if let Some(other) = chains.insert(name.clone(), s.vip) {
            return Err(LbError::Invalid(format!(
                "chain {name} would serve both VIP {other} and VIP {} (service ids must be unique per table)",
                s.vip
            )));
        }
    }
    Ok(())
}
