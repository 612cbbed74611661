//! VIP load balancing for Shoal's overlay networks: the nftables dataplane (this module) and
//! the IPVS dataplane ([`ipvs`]: same [`Ruleset`] input, programmed over generic netlink).
//!
//! Each overlay network has, on each node, one network namespace where all of that network's
//! container veths end. One nft table (`ip` family) in that namespace sends traffic for a
//! service's virtual IP to one of its backends, keeping the client's address. Everything that
//! depends on services and backends lives in a few big named maps, so that a change is a
//! map-element update whose cost does not grow with the number of services:
//!
//! - `map services` (`vip . proto . port : verdict`) and `map any_port` (`vip . proto :
//!   verdict`, Swarm's every-port VIPs) are consulted from `nat prerouting` (priority dstnat)
//!   and `nat output`. A service with active backends `goto`s a shared selection chain; one
//!   without gets `accept`, so it stays addressed to the VIP and is rejected in filter input.
//! - selection chains, one per method and slot count, shared by all services using it:
//!   `rnd_N` = `dnat ip to ip daddr . meta l4proto . th dport . numgen random mod N map
//!   @backends` (random among N), `hash_256` = the same keyed by `jhash` of the flow with a
//!   fixed seed into a 256-slot table (consistent hashing: every node picks the same backend
//!   for a flow, and a backend change moves only its own slots), and `any_` variants over
//!   `map any_backends` that keep the destination port.
//! - `map backends` (`vip . proto . port . slot : backend . target_port`) and
//!   `map any_backends` (`vip . proto . slot : backend`) hold the slots.
//! - client-IP affinity: `aff_<sel>` chains first look the client up in the dynamic map
//!   `affinity` (`client . vip . proto : backend`, per-element timeout) and DNAT there
//!   (target port from `map target_ports`), else fall through to `<sel>`; filter chains
//!   `record_in`/`record_out` (after the DNAT) refresh the entry through `map
//!   affinity_services` -> `rec_<timeout>`. Affinity is per client and VIP (all ports of the
//!   service), like IPVS persistence.
//! - `filter input` rejects whatever still reaches a VIP (`set vips`): nothing was DNATed, so
//!   the port is not a service port or the service has no backends. TCP gets a reset, anything
//!   else ICMP port unreachable, so clients fail at once instead of timing out.
//! - `nat postrouting` masquerades hairpin connections (a local task picked as the backend of
//!   its own connection to a VIP): `ct status dnat ip saddr . ip daddr @hairpin`, with one
//!   `ep . ep` element per local endpoint.
//!
//! Desired state is data: [`Ruleset`] is turned into a sorted [`Model`] that [`render`] (the
//! whole table, one atomic transaction), [`Model::diff`] (element updates between two models,
//! one transaction), [`Model::from_nft_json`] (adoption of the kernel's table after a
//! restart) and [`trace`] (where would this packet go) read. [`Syncer`] keeps the last model
//! per namespace and applies diffs, falling back to a full replace when an update fails.
//! In a namespace without the table, its first sync lets nft create only the structure
//! ([`Model::render_structure`]) and loads the map elements itself over nfnetlink in one
//! batch ([`load_elements`]), skipping nft's per-element userspace cost.
//!
//! [`conntrack`] deletes the conntrack entries of a removed UDP backend (ctnetlink), so its
//! clients move to a live backend on their next packet.

pub mod conntrack;
pub mod guard;
pub mod ipvs;
mod model;
mod netlink;
mod nft;
pub mod publish;

use std::net::Ipv4Addr;

pub use model::{
    ANY_PORT, Dispatch, HASH_SEED, HASH_SLOTS, MAX_AFFINITY_SECS, Model, ServiceKey, TABLE_COMMENT,
    chain_rules, hash_slots,
};
pub use nft::{
    Applier, BACKEND_ENV, ElementLoad, Generation, GenerationReader, SyncKind, SyncReport, Syncer,
    apply, check, delete_table, list_table, load_elements,
};

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
    /// Backends being drained: no new flows (also not through affinity), established flows
    /// continue, UDP conntrack entries are kept. Listed here or in `backends` (here wins).
    pub draining: Vec<Ipv4Addr>,
    /// How a new flow picks its backend.
    pub selection: Selection,
    /// Client-IP session affinity: a client's new flows to this VIP go to the backend its
    /// last flow went to, for this many seconds after that flow started.
    pub affinity: Option<u32>,
}

impl Default for VirtualService {
    fn default() -> Self {
        VirtualService {
            id: String::new(),
            vip: Ipv4Addr::UNSPECIFIED,
            protocol: Protocol::Tcp,
            port: 0,
            target_port: 0,
            backends: vec![],
            draining: vec![],
            selection: Selection::Random,
            affinity: None,
        }
    }
}

/// Backend selection of a service.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Selection {
    /// Uniformly random per new flow (kube-proxy's nftables mode, Swarm's IPVS rr in effect).
    #[default]
    Random,
    /// By a hash of the flow (addresses and ports) into a fixed slot table: every node picks
    /// the same backend for the same flow; a backend change moves only that backend's flows.
    Consistent,
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
    /// Deleting conntrack entries failed.
    #[error("conntrack: {0}")]
    Conntrack(String),
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
    /// Loading map elements over nfnetlink ([`load_elements`]) failed: the kernel refused
    /// the elements of `map` (its errno is the source), or the socket failed (`map` None).
    #[error("loading LB map elements in network namespace {netns:?}: {what}: {source}")]
    Elements {
        netns: String,
        map: Option<String>,
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// Reading the nf_tables generation of a namespace failed.
    #[error("reading the nf_tables generation in network namespace {netns:?}: {what}: {source}")]
    Generation {
        netns: String,
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// Asking the kernel whether an nf_tables object exists failed.
    #[error("looking up {object} in network namespace {netns:?}: {what}: {source}")]
    Lookup {
        netns: String,
        object: String,
        what: String,
        #[source]
        source: std::io::Error,
    },
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
