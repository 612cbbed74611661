//! VIP load balancing for Shoal's overlay networks: the nftables dataplane (this module) and
//! the IPVS dataplane ([`ipvs`]: same [`Ruleset`] input, programmed over generic netlink).
//!
//! Each overlay network has, on each node, one network namespace where all of that network's
//! container veths end. One nft table (`ip` family) in that namespace sends traffic for a
//! service's virtual IP to one of its backends, keeping the client's address:
//!
//! - `map services` (`ipv4_addr . inet_proto . inet_service : verdict`) holds one element per
//!   service port, `goto`-ing the service's chain. It is consulted from `nat prerouting`
//!   (priority dstnat) and `nat output` (so the namespace itself reaches VIPs).
//! - chain `svc_<id>_<proto>_<port>` picks a backend with
//!   `dnat ip to numgen random mod N map { 0 : a . port, ... }`. A service without backends has
//!   an empty chain (a comment says so).
//! - `filter input` rejects whatever still reaches a VIP (`set vips`): nothing was DNATed, so
//!   the port is not a service port or the service has no backends. TCP gets a reset, anything
//!   else ICMP port unreachable, so clients fail at once instead of timing out.
//! - `nat postrouting` masquerades hairpin connections (a local task picked as the backend of
//!   its own connection to a VIP): `ct status dnat ip saddr . ip daddr @hairpin`, with one
//!   `ep . ep` element per local endpoint.
//!
//! Desired state is data: [`Ruleset`] is turned into a sorted [`Model`] that both [`render`]
//! (the nft script, one atomic transaction) and [`trace`] (where would this packet go) read.
//! Services are map elements and backends live in per-service chains, so a later incremental
//! mode only has to add/delete elements and replace one chain's rule.
//!
//! [`conntrack`] deletes the conntrack entries of a removed UDP backend (ctnetlink), so its
//! clients move to a live backend on their next packet.

pub mod conntrack;
pub mod ipvs;
mod model;
mod netlink;
mod nft;

use std::net::Ipv4Addr;

pub use model::{ANY_PORT, Model, ServiceChain, ServiceKey, chain_name};
pub use nft::{Applier, BACKEND_ENV, apply, check, delete_table, list_table};

/// Transport protocol of a service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// The nft keyword (`tcp` / `udp`).
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One service port on a VIP and the backends that serve it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VirtualService {
    /// Stable short id used in object names: `[a-z0-9_]`, e.g. a service id prefix.
    pub id: String,
    pub vip: Ipv4Addr,
    pub protocol: Protocol,
    /// 0: every port of the protocol, each DNATed to the same port of a backend (Swarm's VIP
    /// semantics); `target_port` must then be 0 too. A specific port entry wins over it.
    pub port: u16,
    pub target_port: u16,
    /// May be empty: then VIP:port rejects at once (TCP reset / ICMP port unreachable).
    pub backends: Vec<Ipv4Addr>,
}

/// Everything one network namespace's LB table must do.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Ruleset {
    /// Table name, e.g. `shoal_lb`.
    pub table: String,
    /// Every VIP of the network, even those without ports: anything to a VIP that is not a
    /// service port is rejected. VIPs of `services` are added implicitly.
    pub vips: Vec<Ipv4Addr>,
    pub services: Vec<VirtualService>,
    /// This node's task addresses: hairpin masquerade when a task's connection to a VIP is
    /// DNATed back to itself.
    pub local_endpoints: Vec<Ipv4Addr>,
}

/// Errors of the LB programmer. nft's own words are always kept.
#[derive(Debug, thiserror::Error)]
pub enum LbError {
    /// The ruleset cannot be rendered safely (bad identifier, duplicate service, ...).
    #[error("invalid LB ruleset: {0}")]
    Invalid(String),
    /// The namespace could not be opened or entered.
    #[error(transparent)]
    Netns(#[from] shoal_netns::Error),
    /// `nft` could not be started or talked to.
    #[error("running `nft` in network namespace {netns:?}: {source}{hint}")]
    Spawn {
        netns: String,
        #[source]
        source: std::io::Error,
        hint: &'static str,
    },
    /// libnftables could not be loaded or a context could not be set up (nft's own refusals
    /// are [`LbError::Nft`]).
    #[error("libnftables: {0}")]
    Library(String),
    /// `nft` (or libnftables) ran and refused the script or command.
    #[error(
        "nft {action} in network namespace {netns:?} failed ({status}): {stderr}{}",
        failing_line.as_ref().map(|(n, l)| format!(" [script line {n}: {l}]")).unwrap_or_default()
    )]
    Nft {
        netns: String,
        action: &'static str,
        status: String,
        /// nft's error output, trimmed.
        stderr: String,
        /// First line of our script that nft complained about (1-based number, text).
        failing_line: Option<(usize, String)>,
    },
}

/// Renders the whole table as one nft script: `table ip T {}` + `delete table ip T` + the full
/// definition, which `nft -f` runs as ONE transaction (the old table stays if anything fails).
/// Pure and deterministic: every list is sorted and deduplicated.
pub fn render(rs: &Ruleset) -> String {
    Model::from_ruleset(rs).render()
}

/// Checks what [`render`] cannot express safely: identifiers that could break out of the
/// script, duplicate service ports and chain names. nft itself judges everything else.
pub fn validate(rs: &Ruleset) -> Result<(), LbError> {
    model::validate(rs)
}

/// A packet as the tracer sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Packet {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub protocol: Protocol,
    pub dport: u16,
}

/// Where a (new) packet goes through the rendered table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Trace {
    /// Not addressed to a VIP: the table does not touch it.
    NotVip,
    /// DNATed to one of `candidates` (chosen at random); `masquerade_if_hairpin` says whether
    /// postrouting masquerades it when the chosen backend is the sender itself.
    Dnat {
        candidates: Vec<(Ipv4Addr, u16)>,
        masquerade_if_hairpin: bool,
    },
    /// Addressed to a VIP but not DNATed: rejected in filter input.
    Reject,
}

/// Follows a packet through the model the script is rendered from.
pub fn trace(rs: &Ruleset, p: &Packet) -> Trace {
    Model::from_ruleset(rs).trace(p)
}
