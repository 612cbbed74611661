//! The sorted, deduplicated model of one LB table: what [`Model::render`] writes in full,
//! what [`Model::diff`] turns into element updates, what [`Model::from_nft_json`] reads back
//! from the kernel and what [`Model::trace`] walks.
//!
//! Layout (see the crate docs): a handful of big named maps hold everything that depends on
//! services and backends; the only chains besides the base chains are shared "selection"
//! chains, one per selection method and slot count (`rnd_3`, `hash_256`, `any_rnd_2`,
//! `aff_rnd_3`, `rec_10800`, ...), whose rule is a pure function of their name. A service
//! change is therefore a change of map elements, plus at most adding a selection chain the
//! table does not have yet and deleting one nobody uses any more.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::Ipv4Addr;

use serde_json::Value;

use crate::{LbError, Packet, Protocol, Ruleset, Selection, Trace, VirtualService};

/// Comment on the table: says who owns it and which layout it has. An agent adopts a table
/// (updates it in place) only when this comment matches; bump the number whenever the base
/// chains or the map types change.
pub const TABLE_COMMENT: &str = "managed by shoal-lb, layout 2";

/// An empty chain whose name says the layout: nft 1.0.6 leaves table comments out of its
/// JSON, so this is what [`Model::from_nft_json`] checks before adopting a table. Rename it
/// (and [`TABLE_COMMENT`]) whenever the base chains or the map types change.
const LAYOUT_CHAIN: &str = "layout_2";

/// Slots of a consistent-hash service: a flow's hash picks a slot, the slot names a backend.
/// Fixed, so that a backend change moves only the slots of the backends that changed.
pub const HASH_SLOTS: u32 = 256;
/// Random-selection chains `rnd_{tcp,udp,any}_1..=PERMANENT_RND` and the hash chains are
/// part of every table: a backend count change then only changes map elements. (Adding a
/// chain with a rule makes nft load and the kernel validate the whole table: 30-300 ms at
/// 1,000-10,000 services.) Larger counts and affinity chains come and go with their users.
pub const PERMANENT_RND: usize = 32;

/// Seed of the flow hash: the same on every node, so every node picks the same slot.
pub const HASH_SEED: u32 = 0x5348_4f4c;

/// The base chains: the same for every table, they only refer to its sets and maps.
const BASE_CHAINS: &str = "\
\tchain layout_2 {
\t}
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
\tchain record_in {
\t\ttype filter hook prerouting priority -90; policy accept;
\t\tct state new ct status dnat ct original ip daddr . meta l4proto vmap @affinity_services
\t}
\tchain record_out {
\t\ttype filter hook output priority -90; policy accept;
\t\tct state new ct status dnat ct original ip daddr . meta l4proto vmap @affinity_services
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
// - record_in/out run after the DNAT (priority -90) in filter chains: once one nat chain has
//   bound a NAT mapping the kernel runs no further nat chains of that hook, so the affinity
//   record cannot live in a second nat chain. They see the chosen backend as `ip daddr`.
// - input: what still targets a VIP was not DNATed (not a service port, or no backends) and
//   is rejected at once. The namespace's own connections to a VIP take the VIP as source
//   address (local route), so their replies arrive addressed to it: `ct status dnat` lets
//   them (and their related ICMP) pass.

const BASE_CHAIN_NAMES: [&str; 7] = [
    LAYOUT_CHAIN,
    "prerouting",
    "output",
    "record_in",
    "record_out",
    "postrouting",
    "input",
];

/// How many rules base chain `name` has in [`BASE_CHAINS`] (its `type` line is none).
fn base_chain_rule_count(name: &str) -> usize {
    let head = format!("\tchain {name} {{");
    BASE_CHAINS
        .lines()
        .skip_while(|l| *l != head)
        .skip(1)
        .take_while(|l| *l != "\t}")
        .filter(|l| !l.trim_start().starts_with("type "))
        .count()
}

/// The maps and sets of the table, in render order, with their declarations.
const MAPS: [(&str, &str); 10] = [
    ("vips", "set vips {\n\t\ttype ipv4_addr"),
    ("hairpin", "set hairpin {\n\t\ttype ipv4_addr . ipv4_addr"),
    (
        "services",
        "map services {\n\t\ttype ipv4_addr . inet_proto . inet_service : verdict",
    ),
    (
        "any_port",
        "map any_port {\n\t\ttype ipv4_addr . inet_proto : verdict",
    ),
    (
        "backends_tcp",
        "map backends_tcp {\n\t\ttypeof ip daddr . tcp dport . numgen random mod 1 : ip daddr . tcp dport",
    ),
    (
        "backends_udp",
        "map backends_udp {\n\t\ttypeof ip daddr . udp dport . numgen random mod 1 : ip daddr . udp dport",
    ),
    (
        "any_backends",
        "map any_backends {\n\t\ttypeof ip daddr . meta l4proto . numgen random mod 1 : ip daddr",
    ),
    (
        "target_ports_tcp",
        "map target_ports_tcp {\n\t\ttypeof ip daddr . tcp dport : tcp dport",
    ),
    (
        "target_ports_udp",
        "map target_ports_udp {\n\t\ttypeof ip daddr . udp dport : udp dport",
    ),
    (
        "affinity_services",
        "map affinity_services {\n\t\ttype ipv4_addr . inet_proto : verdict",
    ),
];
// Maps with ports come per protocol (`backends_tcp`, `backends_udp`, ...), declared with
// `typeof ... tcp dport` / `udp dport`: nft 1.0.6 cannot rebuild a `typeof` that mixes `ip`
// and `th` from the kernel's copy ("conflicting protocols specified: ip vs. th"), so a later
// `add rule` naming such a map would fail; and a DNAT whose map data has `tcp dport` gets an
// implicit `meta l4proto tcp`, which is right only in a TCP-only chain.

/// Names of the maps and sets whose elements the model holds, in render order.
#[cfg(test)]
pub(crate) fn map_names() -> Vec<&'static str> {
    MAPS.iter().map(|(n, _)| *n).collect()
}

/// Dynamic map filled by the packet path: client . VIP . protocol -> backend.
const AFFINITY_MAP: &str = "\tmap affinity {
\t\ttypeof ip saddr . ip daddr . meta l4proto : ip daddr
\t\tsize 262144
\t\tflags dynamic,timeout
\t}
";

/// `port` 0 in a [`crate::VirtualService`]: every port of that protocol, DNATed to the same
/// port of a backend (Docker Swarm's VIP semantics). A specific port entry wins over it.
pub const ANY_PORT: u16 = 0;

/// Key of the `services` verdict map: `ip daddr . meta l4proto . th dport`.
pub type ServiceKey = (Ipv4Addr, Protocol, u16);

/// What the `services` / `any_port` maps do with a service port.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Dispatch {
    /// No active backend: `accept` leaves the packet addressed to the VIP, and filter input
    /// rejects it at once.
    NoBackends,
    /// `goto` this selection chain.
    Chain(String),
}

impl Dispatch {
    fn verdict(&self) -> String {
        match self {
            Dispatch::NoBackends => "accept".into(),
            Dispatch::Chain(c) => format!("goto {c}"),
        }
    }
}

/// Desired (or read back) content of one table.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Model {
    pub table: String,
    /// `set vips`: all VIPs, including those of services.
    pub vips: BTreeSet<Ipv4Addr>,
    /// `set hairpin`: one `ep . ep` element per local endpoint.
    pub hairpin: BTreeSet<Ipv4Addr>,
    /// `map services`: (vip, proto, port) -> dispatch (ports other than [`ANY_PORT`]).
    pub services: BTreeMap<ServiceKey, Dispatch>,
    /// `map any_port`: (vip, proto) -> dispatch.
    pub any_port: BTreeMap<(Ipv4Addr, Protocol), Dispatch>,
    /// `map backends`: (vip, proto, port, slot) -> (backend, target port).
    pub backends: BTreeMap<(Ipv4Addr, Protocol, u16, u32), (Ipv4Addr, u16)>,
    /// `map any_backends`: (vip, proto, slot) -> backend (the port is kept).
    pub any_backends: BTreeMap<(Ipv4Addr, Protocol, u32), Ipv4Addr>,
    /// `map target_ports`: (vip, proto, port) -> target port, for affinity hits.
    pub target_ports: BTreeMap<ServiceKey, u16>,
    /// `map affinity_services`: (vip, proto) -> `rec_<timeout>` chain.
    pub affinity_services: BTreeMap<(Ipv4Addr, Protocol), String>,
    /// Selection chains in use (their rules follow from their names).
    pub chains: BTreeSet<String>,
}

/// Selection chain for `n` candidates (random) or the hash slots (consistent): `rnd_tcp_3`,
/// `hash_udp_256`, and for every-port services (whose map has no port) `any_rnd_3`.
fn selection_chain(sel: Selection, any: bool, proto: Protocol, n: usize) -> String {
    let p = if any {
        "any".to_string()
    } else {
        proto.to_string()
    };
    match sel {
        Selection::Random => format!("rnd_{p}_{n}"),
        Selection::Consistent => format!("hash_{p}_{HASH_SLOTS}"),
    }
}

/// The rules of a selection chain, from its name; None for a name we never create.
pub fn chain_rules(name: &str) -> Option<Vec<String>> {
    if let Some(t) = name.strip_prefix("rec_") {
        let t: u32 = t.parse().ok().filter(|t| *t > 0)?;
        return Some(vec![format!(
            "update @affinity {{ ip saddr . ct original ip daddr . meta l4proto timeout {t}s : ip daddr }}"
        )]);
    }
    if let Some(inner) = name.strip_prefix("aff_") {
        let (_, p, _) = parse_selection(inner)?;
        let hit = match p {
            "any" => "dnat ip to ip saddr . ip daddr . meta l4proto map @affinity".to_string(),
            p => format!(
                "dnat ip to ip saddr . ip daddr . meta l4proto map @affinity : ip daddr . {p} dport map @target_ports_{p}"
            ),
        };
        return Some(vec![hit, format!("goto {inner}")]);
    }
    let (method, p, n) = parse_selection(name)?;
    let pick = match method {
        "rnd" => format!("numgen random mod {n}"),
        _ => format!("jhash ip saddr . th sport . ip daddr . th dport mod {n} seed {HASH_SEED:#x}"),
    };
    Some(vec![match p {
        "any" => format!("dnat ip to ip daddr . meta l4proto . {pick} map @any_backends"),
        p => format!("dnat ip to ip daddr . {p} dport . {pick} map @backends_{p}"),
    }])
}

/// `rnd_tcp_3` -> ("rnd", "tcp", 3); None for anything we never create.
fn parse_selection(name: &str) -> Option<(&str, &str, u32)> {
    let mut it = name.splitn(3, '_');
    let (method, p, n) = (it.next()?, it.next()?, it.next()?);
    let n: u32 = n.parse().ok()?;
    let ok = matches!(p, "tcp" | "udp" | "any")
        && match method {
            "rnd" => n > 0 && n.to_string().len() == name.len() - method.len() - p.len() - 2,
            "hash" => n == HASH_SLOTS,
            _ => false,
        };
    ok.then_some((method, p, n))
}

/// Consistent-hash slot table: slot `s` goes to the backend with the highest score
/// `mix(backend, s)` (rendezvous hashing over a fixed slot table). Every node computes the
/// same table from the same backends, and removing a backend changes exactly the slots it
/// held, so only its flows move. (Maglev's permutation fill balances a little better but can
/// move a few other slots on a change; the guarantee matters more here.)
pub fn hash_slots(backends: &[Ipv4Addr]) -> Vec<Ipv4Addr> {
    if backends.is_empty() {
        return vec![];
    }
    (0..HASH_SLOTS)
        .map(|s| {
            *backends
                .iter()
                .max_by_key(|b| (mix(u32::from(**b), s), u32::from(**b)))
                .expect("non-empty")
        })
        .collect()
}

/// splitmix64 of (backend, slot): a fixed function (not std's hasher, whose algorithm may
/// change between Rust releases) so that nodes running different builds agree.
fn mix(backend: u32, slot: u32) -> u64 {
    let mut z = ((backend as u64) << 32 | slot as u64).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Model {
    /// Builds the model. Services sharing a key: the one with the smallest id wins
    /// ([`crate::validate`] reports such rulesets before they are applied).
    pub fn from_ruleset(rs: &Ruleset) -> Model {
        let mut sorted = sorted_services(rs);
        sorted.dedup_by_key(|s| (s.vip, s.protocol, s.port));
        let mut m = Model::from_services(&rs.table, sorted);
        m.vips.extend(rs.vips.iter().copied());
        m.hairpin = rs.local_endpoints.iter().copied().collect();
        m.chains.extend(permanent_chains().iter().cloned());
        m
    }

    /// The part of a model that `services` (sorted, one per key) make: their map elements,
    /// their VIPs and the selection chains they use. A set of whole (vip, protocol) groups
    /// gives exactly those groups' elements of the full model.
    pub(crate) fn from_services<'a>(
        table: &str,
        services: impl IntoIterator<Item = &'a VirtualService>,
    ) -> Model {
        let mut m = Model {
            table: table.to_string(),
            ..Model::default()
        };
        for s in services {
            m.vips.insert(s.vip);
            let active = active_backends(s);
            let any = s.port == ANY_PORT;
            let dispatch = if active.is_empty() {
                Dispatch::NoBackends
            } else {
                let sel = selection_chain(s.selection, any, s.protocol, active.len());
                m.chains.insert(sel.clone());
                let chain = match s.affinity {
                    Some(t) if t > 0 => {
                        let rec = format!("rec_{t}");
                        m.chains.insert(rec.clone());
                        // Ports of one VIP share the record; the longest timeout wins.
                        let e = m
                            .affinity_services
                            .entry((s.vip, s.protocol))
                            .or_insert(rec.clone());
                        if rec_timeout(e) < t {
                            *e = rec;
                        }
                        if !any {
                            m.target_ports
                                .insert((s.vip, s.protocol, s.port), s.target_port);
                        }
                        let aff = format!("aff_{sel}");
                        m.chains.insert(aff.clone());
                        aff
                    }
                    _ => sel,
                };
                Dispatch::Chain(chain)
            };
            let slots = match s.selection {
                Selection::Random => active,
                Selection::Consistent => hash_slots(&active),
            };
            if any {
                m.any_port.insert((s.vip, s.protocol), dispatch);
                for (i, b) in slots.into_iter().enumerate() {
                    m.any_backends.insert((s.vip, s.protocol, i as u32), b);
                }
            } else {
                m.services.insert((s.vip, s.protocol, s.port), dispatch);
                for (i, b) in slots.into_iter().enumerate() {
                    m.backends
                        .insert((s.vip, s.protocol, s.port, i as u32), (b, s.target_port));
                }
            }
        }
        // Only the records still referenced count (a shorter timeout may have lost).
        let used_recs: BTreeSet<&String> = m.affinity_services.values().collect();
        m.chains
            .retain(|c| !c.starts_with("rec_") || used_recs.contains(c));
        m
    }

    /// Removes every element of these (vip, protocol) groups.
    pub(crate) fn remove_groups(&mut self, groups: &BTreeSet<(Ipv4Addr, Protocol)>) {
        for &(v, p) in groups {
            remove_range(&mut self.services, (v, p, 0)..=(v, p, u16::MAX));
            self.any_port.remove(&(v, p));
            remove_range(
                &mut self.backends,
                (v, p, 0, 0)..=(v, p, u16::MAX, u32::MAX),
            );
            remove_range(&mut self.any_backends, (v, p, 0)..=(v, p, u32::MAX));
            remove_range(&mut self.target_ports, (v, p, 0)..=(v, p, u16::MAX));
            self.affinity_services.remove(&(v, p));
        }
    }

    /// Adds the map elements of a partial model (see [`Model::from_services`]).
    pub(crate) fn insert_elements(&mut self, part: Model) {
        self.services.extend(part.services);
        self.any_port.extend(part.any_port);
        self.backends.extend(part.backends);
        self.any_backends.extend(part.any_backends);
        self.target_ports.extend(part.target_ports);
        self.affinity_services.extend(part.affinity_services);
    }

    /// The elements of each map and set, as nft writes them (`key` or `key : value`).
    fn elements(&self) -> [(&'static str, BTreeMap<String, String>); 10] {
        let kv = |k: String, v: String| (k, v);
        [
            (
                "vips",
                self.vips
                    .iter()
                    .map(|v| kv(v.to_string(), String::new()))
                    .collect(),
            ),
            (
                "hairpin",
                self.hairpin
                    .iter()
                    .map(|e| kv(format!("{e} . {e}"), String::new()))
                    .collect(),
            ),
            (
                "services",
                self.services
                    .iter()
                    .map(|((v, p, port), d)| kv(format!("{v} . {p} . {port}"), d.verdict()))
                    .collect(),
            ),
            (
                "any_port",
                self.any_port
                    .iter()
                    .map(|((v, p), d)| kv(format!("{v} . {p}"), d.verdict()))
                    .collect(),
            ),
            ("backends_tcp", self.port_backends(Protocol::Tcp)),
            ("backends_udp", self.port_backends(Protocol::Udp)),
            (
                "any_backends",
                self.any_backends
                    .iter()
                    .map(|((v, p, s), b)| kv(format!("{v} . {p} . {s}"), b.to_string()))
                    .collect(),
            ),
            ("target_ports_tcp", self.target_ports_of(Protocol::Tcp)),
            ("target_ports_udp", self.target_ports_of(Protocol::Udp)),
            (
                "affinity_services",
                self.affinity_services
                    .iter()
                    .map(|((v, p), c)| kv(format!("{v} . {p}"), format!("goto {c}")))
                    .collect(),
            ),
        ]
    }

    fn port_backends(&self, proto: Protocol) -> BTreeMap<String, String> {
        self.backends
            .iter()
            .filter(|((_, p, _, _), _)| *p == proto)
            .map(|((v, _, port, s), (b, tp))| {
                (format!("{v} . {port} . {s}"), format!("{b} . {tp}"))
            })
            .collect()
    }

    fn target_ports_of(&self, proto: Protocol) -> BTreeMap<String, String> {
        self.target_ports
            .iter()
            .filter(|((_, p, _), _)| *p == proto)
            .map(|((v, _, port), tp)| (format!("{v} . {port}"), tp.to_string()))
            .collect()
    }

    /// The nft script that replaces the whole table (see [`crate::render`]).
    pub fn render(&self) -> String {
        self.render_table(true)
    }

    /// [`Model::render`] without any `elements = ...` line: the table with its maps, sets,
    /// chains and rules, all maps and sets empty (the same one-transaction replace). The
    /// elements are then loaded over nfnetlink ([`crate::load_elements`]).
    pub fn render_structure(&self) -> String {
        self.render_table(false)
    }

    fn render_table(&self, with_elements: bool) -> String {
        let t = &self.table;
        let mut o = String::new();
        // Creating the table first makes the delete valid when it does not exist yet; all
        // three commands form one transaction.
        let _ = writeln!(o, "table ip {t} {{}}");
        let _ = writeln!(o, "delete table ip {t}");
        let _ = writeln!(o, "table ip {t} {{");
        let _ = writeln!(o, "\tcomment \"{TABLE_COMMENT}\"");
        // The structure alone does not format the elements at all.
        let mut elements = with_elements.then(|| self.elements().into_iter());
        for (name, decl) in MAPS.iter() {
            let _ = writeln!(o, "\t{decl}");
            if let Some((ename, elems)) = elements.as_mut().and_then(|e| e.next()) {
                debug_assert_eq!(*name, ename);
                write_elements(&mut o, elems.iter().map(|(k, v)| join_kv(k, v)));
            }
            let _ = writeln!(o, "\t}}");
        }
        o.push_str(AFFINITY_MAP);
        for c in &self.chains {
            let _ = writeln!(o, "\tchain {c} {{");
            for r in chain_rules(c).expect("model holds only known chain names") {
                let _ = writeln!(o, "\t\t{r}");
            }
            let _ = writeln!(o, "\t}}");
        }
        o.push_str(BASE_CHAINS);
        o.push_str("}\n");
        o
    }

    /// The nft script that turns the table `self` describes into `to`, as one transaction:
    /// new selection chains, deleted then added elements (a changed value is a delete and an
    /// add), and finally selection chains nothing refers to any more. None when nothing
    /// differs. Any element the kernel does not have as `self` says makes nft refuse the
    /// whole transaction (and the caller falls back to a full replace).
    pub fn diff(&self, to: &Model) -> Option<String> {
        let mut o = chains_added(&to.table, &self.chains, &to.chains);
        o.push_str(&self.elements_diff(to));
        o.push_str(&chains_deleted(&to.table, &self.chains, &to.chains));
        (!o.is_empty()).then_some(o)
    }

    /// Element deletes, then element adds, of every map and set (chains left out).
    pub(crate) fn elements_diff(&self, to: &Model) -> String {
        let t = &to.table;
        let mut o = String::new();
        let (old, new) = (self.elements(), to.elements());
        for ((name, a), (_, b)) in old.iter().zip(new.iter()) {
            let gone: Vec<&String> = a
                .iter()
                .filter(|(k, v)| b.get(*k) != Some(*v))
                .map(|(k, _)| k)
                .collect();
            if !gone.is_empty() {
                write_chunked(&mut o, "delete", t, name, gone.into_iter().cloned());
            }
        }
        for ((name, a), (_, b)) in old.iter().zip(new.iter()) {
            let added: Vec<String> = b
                .iter()
                .filter(|(k, v)| a.get(*k) != Some(*v))
                .map(|(k, v)| join_kv(k, v))
                .collect();
            if !added.is_empty() {
                write_chunked(&mut o, "add", t, name, added.into_iter());
            }
        }
        o
    }

    /// Reads a table back from `nft -j list table ip T` output. None when the JSON does not
    /// describe a table of this layout (unknown chain or map, unparsable element): the caller
    /// then replaces the table instead of updating it. The layout is recognised by its
    /// marker chain and the exact set of maps.
    pub fn from_nft_json(table: &str, json: &str) -> Option<Model> {
        let v: Value = serde_json::from_str(json).ok()?;
        let mut m = Model {
            table: table.to_string(),
            ..Model::default()
        };
        let mut maps_seen = BTreeSet::new();
        let mut base_seen = BTreeSet::new();
        // Rules per chain: a table whose chains were flushed (`nft flush table`) or lost a
        // rule still has every chain and map, but is not ours to update in place.
        let mut rules: BTreeMap<String, usize> = BTreeMap::new();
        for obj in v.get("nftables")?.as_array()? {
            if let Some(r) = obj.get("rule") {
                *rules
                    .entry(r.get("chain")?.as_str()?.to_string())
                    .or_default() += 1;
            } else if let Some(c) = obj.get("chain") {
                let name = c.get("name")?.as_str()?;
                if BASE_CHAIN_NAMES.contains(&name) {
                    base_seen.insert(name);
                    continue;
                }
                chain_rules(name)?;
                m.chains.insert(name.to_string());
            } else if let Some(s) = obj.get("set").or_else(|| obj.get("map")) {
                let name = s.get("name")?.as_str()?;
                maps_seen.insert(name.to_string());
                let elems = match s.get("elem") {
                    None => continue,
                    Some(e) => e.as_array()?,
                };
                for e in elems {
                    m.read_element(name, e)?;
                }
            }
        }
        let want: BTreeSet<String> = MAPS
            .iter()
            .map(|(n, _)| n.to_string())
            .chain(["affinity".to_string()])
            .collect();
        let rules_as_rendered = BASE_CHAIN_NAMES
            .iter()
            .map(|c| (c.to_string(), base_chain_rule_count(c)))
            .chain(
                m.chains
                    .iter()
                    .map(|c| (c.clone(), chain_rules(c).map_or(0, |r| r.len()))),
            )
            .all(|(c, n)| rules.get(&c).copied().unwrap_or(0) == n);
        (maps_seen == want && base_seen.len() == BASE_CHAIN_NAMES.len() && rules_as_rendered)
            .then_some(m)
    }

    fn read_element(&mut self, map: &str, e: &Value) -> Option<()> {
        // Sets: the key; maps: [key, value]. Keys of maps with timeouts come wrapped in
        // {"elem": {"val": key, ...}}.
        let (key, val) = match map {
            "vips" | "hairpin" => (unwrap_elem(e), None),
            _ => {
                let pair = e.as_array()?;
                (unwrap_elem(pair.first()?), Some(pair.get(1)?))
            }
        };
        let k = concat(key);
        match map {
            "vips" => {
                self.vips.insert(addr(key)?);
            }
            "hairpin" => {
                let a = addr(k.first()?)?;
                (addr(k.get(1)?)? == a).then_some(())?;
                self.hairpin.insert(a);
            }
            "services" => {
                let key = (addr(k.first()?)?, proto(k.get(1)?)?, num(k.get(2)?)? as u16);
                self.services.insert(key, dispatch(val?)?);
            }
            "any_port" => {
                let key = (addr(k.first()?)?, proto(k.get(1)?)?);
                self.any_port.insert(key, dispatch(val?)?);
            }
            "backends_tcp" | "backends_udp" => {
                let p = if map == "backends_tcp" {
                    Protocol::Tcp
                } else {
                    Protocol::Udp
                };
                let key = (
                    addr(k.first()?)?,
                    p,
                    num(k.get(1)?)? as u16,
                    num(k.get(2)?)? as u32,
                );
                let v = concat(val?);
                let value = (addr(v.first()?)?, num(v.get(1)?)? as u16);
                self.backends.insert(key, value);
            }
            "any_backends" => {
                let key = (addr(k.first()?)?, proto(k.get(1)?)?, num(k.get(2)?)? as u32);
                self.any_backends.insert(key, addr(val?)?);
            }
            "target_ports_tcp" | "target_ports_udp" => {
                let p = if map == "target_ports_tcp" {
                    Protocol::Tcp
                } else {
                    Protocol::Udp
                };
                let key = (addr(k.first()?)?, p, num(k.get(1)?)? as u16);
                self.target_ports.insert(key, num(val?)? as u16);
            }
            "affinity_services" => {
                let key = (addr(k.first()?)?, proto(k.get(1)?)?);
                match dispatch(val?)? {
                    Dispatch::Chain(c) => self.affinity_services.insert(key, c),
                    Dispatch::NoBackends => return None,
                };
            }
            // The packet path's own state: not part of the model.
            "affinity" => {}
            _ => return None,
        }
        Some(())
    }

    /// Where a new packet goes, following the rendered rules in hook order: nat prerouting /
    /// output (`vmap @services`, then `vmap @any_port`) -> selection chain -> dnat, then
    /// filter input for what still targets a VIP, and nat postrouting's hairpin set for the
    /// chosen backend. The candidates are every backend the selection can pick (an affinity
    /// hit picks one of them too: its entries are deleted when their backend leaves).
    pub fn trace(&self, p: &Packet) -> Trace {
        let candidates: Option<BTreeSet<(Ipv4Addr, u16)>> = match self
            .services
            .get(&(p.dst, p.protocol, p.dport))
        {
            Some(Dispatch::Chain(_)) => Some(
                self.backends
                    .range((p.dst, p.protocol, p.dport, 0)..=(p.dst, p.protocol, p.dport, u32::MAX))
                    .map(|(_, v)| *v)
                    .collect(),
            ),
            Some(Dispatch::NoBackends) => None,
            None => match self.any_port.get(&(p.dst, p.protocol)) {
                Some(Dispatch::Chain(_)) => Some(
                    self.any_backends
                        .range((p.dst, p.protocol, 0)..=(p.dst, p.protocol, u32::MAX))
                        .map(|(_, b)| (*b, p.dport))
                        .collect(),
                ),
                _ => None,
            },
        };
        if let Some(c) = candidates
            && !c.is_empty()
        {
            // postrouting: ct status dnat (true after the dnat) and saddr . daddr in @hairpin.
            let masquerade_if_hairpin = c
                .iter()
                .any(|(b, _)| *b == p.src && self.hairpin.contains(b));
            return Trace::Dnat {
                candidates: c.into_iter().collect(),
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

    /// Backend addresses that serve (vip, proto) through this table (any port).
    pub fn backends_of(&self, vip: Ipv4Addr, protocol: Protocol) -> BTreeSet<Ipv4Addr> {
        let mut out: BTreeSet<Ipv4Addr> = self
            .backends
            .iter()
            .filter(|((v, p, _, _), _)| *v == vip && *p == protocol)
            .map(|(_, (b, _))| *b)
            .collect();
        out.extend(
            self.any_backends
                .range((vip, protocol, 0)..=(vip, protocol, u32::MAX))
                .map(|(_, b)| *b),
        );
        out
    }
}

/// `add chain` + `add rule` for the chains `to` has and `from` has not.
pub(crate) fn chains_added(t: &str, from: &BTreeSet<String>, to: &BTreeSet<String>) -> String {
    let mut o = String::new();
    // `aff_X` jumps to `X`: X must exist first.
    let mut fresh: Vec<&String> = to.difference(from).collect();
    fresh.sort_by_key(|c| (c.starts_with("aff_"), *c));
    for c in fresh {
        let _ = writeln!(o, "add chain ip {t} {c}");
        for r in chain_rules(c).expect("model holds only known chain names") {
            let _ = writeln!(o, "add rule ip {t} {c} {r}");
        }
    }
    o
}

/// `flush chain` + `delete chain` for the chains `from` has and `to` has not.
pub(crate) fn chains_deleted(t: &str, from: &BTreeSet<String>, to: &BTreeSet<String>) -> String {
    let mut o = String::new();
    // All flushes first: `aff_X` jumps to `X`, and a chain something still jumps to cannot
    // be deleted.
    let stale: Vec<&String> = from.difference(to).collect();
    for c in &stale {
        let _ = writeln!(o, "flush chain ip {t} {c}");
    }
    for c in &stale {
        let _ = writeln!(o, "delete chain ip {t} {c}");
    }
    o
}

/// Whether a service uses only permanent selection chains (no affinity, random or
/// consistent with at most [`PERMANENT_RND`] active backends).
pub(crate) fn uses_only_permanent_chains(s: &VirtualService) -> bool {
    !matches!(s.affinity, Some(t) if t > 0)
        && (s.selection == Selection::Consistent || active_backends(s).len() <= PERMANENT_RND)
}

/// The active (not draining) backends of a service, sorted and deduplicated.
fn active_backends(s: &VirtualService) -> Vec<Ipv4Addr> {
    let draining: BTreeSet<_> = s.draining.iter().collect();
    s.backends
        .iter()
        .filter(|b| !draining.contains(b))
        .copied()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// Removes the entries of `map` whose keys fall in `range` (a contiguous run: no full scan).
fn remove_range<K: Ord + Copy, V>(map: &mut BTreeMap<K, V>, range: std::ops::RangeInclusive<K>) {
    let keys: Vec<K> = map.range(range).map(|(k, _)| *k).collect();
    for k in keys {
        map.remove(&k);
    }
}

/// The selection chains every table has (see [`PERMANENT_RND`]), built once.
pub(crate) fn permanent_chains() -> &'static BTreeSet<String> {
    static CHAINS: std::sync::OnceLock<BTreeSet<String>> = std::sync::OnceLock::new();
    CHAINS.get_or_init(|| {
        let mut c = BTreeSet::new();
        for p in ["tcp", "udp", "any"] {
            for n in 1..=PERMANENT_RND {
                c.insert(format!("rnd_{p}_{n}"));
            }
            c.insert(format!("hash_{p}_{HASH_SLOTS}"));
        }
        c
    })
}

fn rec_timeout(chain: &str) -> u32 {
    chain
        .strip_prefix("rec_")
        .and_then(|t| t.parse().ok())
        .unwrap_or(0)
}

fn join_kv(k: &str, v: &str) -> String {
    if v.is_empty() {
        k.to_string()
    } else {
        format!("{k} : {v}")
    }
}

/// `add|delete element ip T MAP { ... }`, at most 10,000 elements a command (one
/// transaction all the same: the whole script is one batch).
fn write_chunked(
    o: &mut String,
    verb: &str,
    t: &str,
    map: &str,
    elems: impl Iterator<Item = String>,
) {
    let elems: Vec<String> = elems.collect();
    for chunk in elems.chunks(10_000) {
        let _ = writeln!(o, "{verb} element ip {t} {map} {{ {} }}", chunk.join(", "));
    }
}

pub(crate) fn unwrap_elem(v: &Value) -> &Value {
    v.get("elem").and_then(|e| e.get("val")).unwrap_or(v)
}

pub(crate) fn concat(v: &Value) -> Vec<&Value> {
    match v.get("concat").and_then(|c| c.as_array()) {
        Some(parts) => parts.iter().collect(),
        None => vec![v],
    }
}

pub(crate) fn addr(v: &Value) -> Option<Ipv4Addr> {
    v.as_str()?.parse().ok()
}

fn num(v: &Value) -> Option<u64> {
    v.as_u64()
}

pub(crate) fn proto(v: &Value) -> Option<Protocol> {
    match v {
        Value::String(s) if s == "tcp" => Some(Protocol::Tcp),
        Value::String(s) if s == "udp" => Some(Protocol::Udp),
        Value::Number(n) if n.as_u64() == Some(6) => Some(Protocol::Tcp),
        Value::Number(n) if n.as_u64() == Some(17) => Some(Protocol::Udp),
        _ => None,
    }
}

fn dispatch(v: &Value) -> Option<Dispatch> {
    if v.get("accept").is_some() {
        return Some(Dispatch::NoBackends);
    }
    let target = v.get("goto")?.get("target")?.as_str()?;
    chain_rules(target)?;
    Some(Dispatch::Chain(target.to_string()))
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

/// Longest client-IP affinity timeout: a day (kube-proxy's default is 3 h).
pub const MAX_AFFINITY_SECS: u32 = 86_400;

pub(crate) fn validate(rs: &Ruleset) -> Result<(), LbError> {
    validate_sorted(&rs.table, &sorted_services(rs))
}

/// The services of `rs` sorted by key, then id ([`Model::from_ruleset`]'s order).
pub(crate) fn sorted_services(rs: &Ruleset) -> Vec<&VirtualService> {
    let mut sorted: Vec<&VirtualService> = rs.services.iter().collect();
    sorted.sort_by(|a, b| {
        (a.vip, a.protocol, a.port, &a.id).cmp(&(b.vip, b.protocol, b.port, &b.id))
    });
    sorted
}

/// [`validate`] of services already sorted by [`sorted_services`] (duplicates are adjacent:
/// no second sort on the sync path).
pub(crate) fn validate_sorted(table: &str, sorted: &[&VirtualService]) -> Result<(), LbError> {
    if !is_table_name(table) {
        return Err(LbError::Invalid(format!(
            "table name {table:?} must be 1-{MAX_NAME} characters of [A-Za-z0-9_.-]"
        )));
    }
    for s in sorted {
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
        if let Some(t) = s.affinity
            && !(1..=MAX_AFFINITY_SECS).contains(&t)
        {
            return Err(LbError::Invalid(format!(
                "service {:?}: affinity timeout {t} s must be 1-{MAX_AFFINITY_SECS}",
                s.id
            )));
        }
    }
    for w in sorted.windows(2) {
        if (w[0].vip, w[0].protocol, w[0].port) == (w[1].vip, w[1].protocol, w[1].port) {
            return Err(LbError::Invalid(format!(
                "services {:?} and {:?} both claim {}:{}/{}",
                w[0].id, w[1].id, w[0].vip, w[0].port, w[0].protocol
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ips(n: u8) -> Vec<Ipv4Addr> {
        (1..=n).map(|i| Ipv4Addr::new(10, 0, 1, i)).collect()
    }

    #[test]
    fn hash_slots_move_only_the_removed_backends_slots() {
        let all = ips(5);
        let before = hash_slots(&all);
        let gone = all[2];
        let rest: Vec<_> = all.iter().copied().filter(|b| *b != gone).collect();
        let after = hash_slots(&rest);
        for (s, (b, a)) in before.iter().zip(&after).enumerate() {
            if *b != gone {
                assert_eq!(b, a, "slot {s} moved from a backend that stayed");
            } else {
                assert_ne!(*a, gone);
            }
        }
        // Order of the input does not matter.
        let mut rev = all.clone();
        rev.reverse();
        assert_eq!(hash_slots(&rev), before);
    }

    #[test]
    fn hash_slots_are_reasonably_balanced() {
        for n in [2u8, 3, 5, 10] {
            let slots = hash_slots(&ips(n));
            let mean = HASH_SLOTS as f64 / n as f64;
            for b in ips(n) {
                let c = slots.iter().filter(|s| **s == b).count() as f64;
                // Rendezvous hashing balances in expectation: one standard deviation is
                // about 19% of the mean at 10 backends over 256 slots.
                assert!(
                    c > mean * 0.5 && c < mean * 1.5,
                    "{n} backends: {b} holds {c} of {HASH_SLOTS} slots (mean {mean})"
                );
            }
        }
    }

    /// The structure is the full script without its `elements = ...` blocks, nothing else.
    #[test]
    fn render_structure_is_render_without_elements() {
        let web = VirtualService {
            id: "web".into(),
            vip: Ipv4Addr::new(10, 96, 0, 10),
            port: 80,
            target_port: 8080,
            backends: ips(3),
            affinity: Some(60),
            ..Default::default()
        };
        let one = VirtualService {
            id: "one".into(),
            vip: Ipv4Addr::new(10, 96, 0, 11),
            backends: ips(1),
            ..Default::default()
        };
        let m = Model::from_ruleset(&Ruleset {
            table: "t".into(),
            vips: vec![],
            services: vec![web, one],
            local_endpoints: ips(1),
        });
        let full = m.render();
        let mut stripped = String::new();
        let mut in_block = false;
        for l in full.lines() {
            if in_block {
                in_block = l != "\t\t}";
            } else if l.starts_with("\t\telements = {") {
                in_block = !l.ends_with('}');
            } else {
                stripped.push_str(l);
                stripped.push('\n');
            }
        }
        assert!(full.contains("elements = {"));
        assert_eq!(m.render_structure(), stripped);
        assert!(!m.render_structure().contains("elements"));
    }

    #[test]
    fn chain_rules_refuse_unknown_names() {
        for bad in [
            "rnd_tcp_0",
            "rnd_tcp_x",
            "rnd_tcp_03",
            "rnd_sctp_3",
            "hash_tcp_100",
            "aff_foo",
            "rec_0",
            "prerouting",
            "",
        ] {
            assert!(chain_rules(bad).is_none(), "{bad}");
        }
        for good in [
            "rnd_tcp_3",
            "rnd_any_1",
            "hash_udp_256",
            "aff_hash_any_256",
            "rec_30",
        ] {
            assert!(chain_rules(good).is_some(), "{good}");
        }
    }
}
