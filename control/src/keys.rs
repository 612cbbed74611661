//! The store's key layout, in one place: every key Shoal reads or writes is made by a
//! function here, and the watched records are told apart by [`Record::parse`].

use std::net::Ipv4Addr;

use shoal_api::model::Protocol;

/// Everything of Shoal's lives under this prefix.
pub const ROOT: &str = "/shoal/";
pub const NETWORKS: &str = "/shoal/networks/";
pub const SERVICES: &str = "/shoal/services/";
pub const TASKS: &str = "/shoal/tasks/";
pub const NODES: &str = "/shoal/nodes/";
/// Per node, a key bound to the node's lease: present while the node's agent is alive.
pub const ALIVE: &str = "/shoal/alive/";
/// The leader election (etcd's election recipe under this prefix).
pub const ELECTION: &str = "/shoal/election/leader";
/// The subnets handed out to networks (one record).
pub const ALLOC_SUBNETS: &str = "/shoal/alloc/subnets";
pub const ALLOC_VNI: &str = "/shoal/alloc/vni/";
const ALLOC_IP: &str = "/shoal/alloc/ip/";
pub const ALLOC_PORT: &str = "/shoal/alloc/port/";
/// Per service and slot: the id of the task that holds the slot. Creating a task for a slot
/// is a compare-and-swap on this key, so a slot never gets two live tasks, however stale the
/// orchestrator's view is.
const SLOTS: &str = "/shoal/slots/";
/// Per network: the address handed out last (a hint for serial allocation, not a claim).
const ALLOC_IP_CURSOR: &str = "/shoal/alloc/ipcursor/";

pub fn network(name: &str) -> String {
    format!("{NETWORKS}{name}")
}
pub fn service(name: &str) -> String {
    format!("{SERVICES}{name}")
}
pub fn task(id: &str) -> String {
    format!("{TASKS}{id}")
}
/// The secret agents show each other on the peer API (made by the first agent).
pub const PEER_TOKEN: &str = "/shoal/peer-token";

pub fn node(id: &str) -> String {
    format!("{NODES}{id}")
}
pub fn alive(node_id: &str) -> String {
    format!("{ALIVE}{node_id}")
}
/// The claim of an address on a network.
pub fn ip(network_id: &str, ip: Ipv4Addr) -> String {
    format!("{}{ip}", ip_prefix(network_id))
}
/// Every address claim of a network.
pub fn ip_prefix(network_id: &str) -> String {
    format!("{ALLOC_IP}{network_id}/")
}
pub fn ip_cursor(network_id: &str) -> String {
    format!("{ALLOC_IP_CURSOR}{network_id}")
}
/// The claim of a published port (cluster-wide: ingress mode, or host mode anywhere).
pub fn port(proto: Protocol, port: u16) -> String {
    format!("{ALLOC_PORT}{proto}/{port}")
}
pub fn slot(service_id: &str, slot: u32) -> String {
    format!("{}{slot}", slots_prefix(service_id))
}
/// Every slot of a service.
pub fn slots_prefix(service_id: &str) -> String {
    format!("{SLOTS}{service_id}/")
}
pub fn vni(vni: u32) -> String {
    format!("{ALLOC_VNI}{vni}")
}

/// The VNI a [`vni`] key claims.
pub fn parse_vni(key: &str) -> Option<u32> {
    key.strip_prefix(ALLOC_VNI)?.parse().ok()
}

/// The protocol and port a [`port`] key claims.
pub fn parse_port(key: &str) -> Option<(Protocol, u16)> {
    let (proto, port) = key.strip_prefix(ALLOC_PORT)?.split_once('/')?;
    Some((proto.parse().ok()?, port.parse().ok()?))
}

/// The address an [`ip`] key of `network_id` claims.
pub fn parse_ip(network_id: &str, key: &str) -> Option<Ipv4Addr> {
    key.strip_prefix(&ip_prefix(network_id))?.parse().ok()
}

/// A record the state cache follows, by its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record<'a> {
    Network(&'a str),
    Service(&'a str),
    Task(&'a str),
    Node(&'a str),
    Alive(&'a str),
}

impl<'a> Record<'a> {
    /// What `key` holds; None for keys the state cache does not follow (claims, slots, ...).
    pub fn parse(key: &'a str) -> Option<Record<'a>> {
        if let Some(name) = key.strip_prefix(NETWORKS) {
            Some(Record::Network(name))
        } else if let Some(name) = key.strip_prefix(SERVICES) {
            Some(Record::Service(name))
        } else if let Some(id) = key.strip_prefix(TASKS) {
            Some(Record::Task(id))
        } else if let Some(id) = key.strip_prefix(NODES) {
            Some(Record::Node(id))
        } else {
            key.strip_prefix(ALIVE).map(Record::Alive)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_record_key_parses_back() {
        assert_eq!(
            Record::parse(&network("appnet")),
            Some(Record::Network("appnet"))
        );
        assert_eq!(Record::parse(&service("web")), Some(Record::Service("web")));
        assert_eq!(Record::parse(&task("t1")), Some(Record::Task("t1")));
        assert_eq!(Record::parse(&node("n1")), Some(Record::Node("n1")));
        assert_eq!(Record::parse(&alive("n1")), Some(Record::Alive("n1")));
        for other in [
            ip("n1", "10.0.0.2".parse().unwrap()),
            port(Protocol::Tcp, 80),
            slot("s1", 1),
            vni(4096),
            ip_cursor("n1"),
            ALLOC_SUBNETS.to_string(),
        ] {
            assert_eq!(Record::parse(&other), None, "{other}");
            assert!(other.starts_with(ROOT), "{other}");
        }
        let a: Ipv4Addr = "10.0.0.2".parse().unwrap();
        assert_eq!(parse_ip("n1", &ip("n1", a)), Some(a));
        assert_eq!(parse_ip("n2", &ip("n1", a)), None);
        assert_eq!(
            parse_port(&port(Protocol::Udp, 53)),
            Some((Protocol::Udp, 53))
        );
        assert_eq!(parse_vni(&vni(4097)), Some(4097));
        assert_eq!(parse_vni(&port(Protocol::Udp, 53)), None);
        assert!(slot("s1", 3).starts_with(&slots_prefix("s1")));
    }
}
