//! The cluster model: nodes, networks, services, tasks. Plain data, serialised as JSON
//! into the store. Validation of user input lives here so that the API refuses bad
//! requests before anything is written.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

/// A validation error, phrased for the operator: it names what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

pub fn invalid(msg: impl Into<String>) -> Invalid {
    Invalid(msg.into())
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum NodeStatus {
    Ready,
    Down,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Node {
    pub id: String,
    pub name: String,
    /// Underlay address (VXLAN endpoint), when known.
    pub addr: Option<Ipv4Addr>,
    pub status: NodeStatus,
    pub version: String,
    /// TCP and UDP ports that processes listen on in the node's namespace (kept current by
    /// the agent): publishing one of them is refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub listening: Vec<(Protocol, u16)>,
    /// TCP port of the agent's peer API on `addr` (other agents fetch task logs there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_port: Option<u16>,
    /// The node's WireGuard public key and port (encrypted networks reach it there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wireguard: Option<NodeWireguard>,
}

/// A node's WireGuard identity: the public key (base64) of the key pair made on the node
/// (the private key never leaves it) and its UDP port on `addr`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeWireguard {
    pub public_key: String,
    pub port: u16,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Network {
    pub id: String,
    pub name: String,
    pub driver: String,
    pub subnet: Ipv4Net,
    pub gateway: Ipv4Addr,
    pub vni: u32,
    pub attachable: bool,
    pub internal: bool,
    pub ingress: bool,
    /// `--opt encrypted`: between nodes, the network's VXLAN travels inside WireGuard.
    #[serde(default)]
    pub encrypted: bool,
}

/// The driver options a network takes (`--opt KEY[=VALUE]`, Docker's `-o`).
pub const NETWORK_OPTIONS: &[&str] = &["encrypted"];

/// What `--opt` asked for, parsed; unknown options and values are refused, named.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetworkOptions {
    pub encrypted: bool,
}

impl NetworkOptions {
    pub fn parse(opts: &std::collections::BTreeMap<String, String>) -> Result<Self, Invalid> {
        let mut out = NetworkOptions::default();
        for (k, v) in opts {
            match k.as_str() {
                // Docker writes `--opt encrypted` (an empty value); true/false are accepted too.
                "encrypted" => {
                    out.encrypted = match v.as_str() {
                        "" | "true" => true,
                        "false" => false,
                        _ => {
                            return Err(Invalid(format!(
                                "network option encrypted={v:?}: the value is empty, true or false"
                            )));
                        }
                    }
                }
                _ => {
                    return Err(Invalid(format!(
                        "unknown network option {k:?} (known: {})",
                        NETWORK_OPTIONS.join(", ")
                    )));
                }
            }
        }
        Ok(out)
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

impl FromStr for Protocol {
    type Err = Invalid;
    fn from_str(s: &str) -> Result<Self, Invalid> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Ok(Protocol::Tcp),
            "udp" => Ok(Protocol::Udp),
            _ => Err(invalid(format!("invalid protocol {s:?}: use tcp or udp"))),
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum PublishMode {
    Ingress,
    Host,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash, Default)]
#[serde(rename_all = "lowercase")]
pub enum EndpointMode {
    #[default]
    Vip,
    Dnsrr,
}

impl FromStr for EndpointMode {
    type Err = Invalid;
    fn from_str(s: &str) -> Result<Self, Invalid> {
        match s {
            "vip" => Ok(EndpointMode::Vip),
            "dnsrr" => Ok(EndpointMode::Dnsrr),
            _ => Err(invalid(format!(
                "invalid endpoint mode {s:?}: use vip or dnsrr"
            ))),
        }
    }
}

/// A published port. `published` 0 means "pick one" (ingress mode only) until allocated.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
pub struct PortConfig {
    pub published: u16,
    pub target: u16,
    pub protocol: Protocol,
    pub mode: PublishMode,
    /// Ingress mode only: SNAT to the receiving node's address instead of keeping the
    /// client's (Docker's behaviour; for clients behind NATs that reuse ports, see the README).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub snat: bool,
}

impl fmt::Display for PortConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "*:{}->{}/{}{}",
            self.published,
            self.target,
            self.protocol,
            match (self.mode, self.snat) {
                (PublishMode::Host, _) => " (host)",
                (PublishMode::Ingress, true) => " (snat)",
                (PublishMode::Ingress, false) => "",
            }
        )
    }
}

impl PortConfig {
    /// Parses `published=P,target=T[,protocol=tcp|udp][,mode=ingress|host][,snat=true]` (the long form of
    /// `--publish`) or the short `P:T[/udp]` / `T[/udp]` form.
    pub fn parse(s: &str) -> Result<Self, Invalid> {
        let s = s.trim();
        if s.contains('=') {
            let (mut published, mut target, mut protocol, mut mode, mut snat) =
                (None, None, Protocol::Tcp, PublishMode::Ingress, false);
            for part in s.split(',') {
                let (k, v) = part
                    .split_once('=')
                    .ok_or_else(|| invalid(format!("invalid publish option {part:?} in {s:?}")))?;
                match k.trim() {
                    "published" => published = Some(parse_port(v, "published")?),
                    "target" => target = Some(parse_port(v, "target")?),
                    "protocol" => protocol = v.parse()?,
                    "mode" => {
                        mode = match v {
                            "ingress" => PublishMode::Ingress,
                            "host" => PublishMode::Host,
                            _ => {
                                return Err(invalid(format!(
                                    "invalid publish mode {v:?}: use ingress or host"
                                )));
                            }
                        }
                    }
                    "snat" => {
                        snat = match v.trim() {
                            "true" | "1" | "yes" => true,
                            "false" | "0" | "no" => false,
                            _ => {
                                return Err(invalid(format!(
                                    "invalid publish option snat={v:?}: use true or false"
                                )));
                            }
                        }
                    }
                    other => {
                        return Err(invalid(format!(
                            "unknown publish option {other:?} (use published, target, protocol, mode, snat)"
                        )));
                    }
                }
            }
            let target =
                target.ok_or_else(|| invalid(format!("publish {s:?} needs target=PORT")))?;
            if mode == PublishMode::Host && published.is_none() {
                return Err(invalid(format!(
                    "publish {s:?}: host mode needs published=PORT"
                )));
            }
            if mode == PublishMode::Host && snat {
                return Err(invalid(format!(
                    "publish {s:?}: snat applies to ingress mode only (host mode never crosses nodes)"
                )));
            }
            Ok(PortConfig {
                published: published.unwrap_or(0),
                target,
                protocol,
                mode,
                snat,
            })
        } else {
            let (ports, protocol) = match s.split_once('/') {
                Some((p, proto)) => (p, proto.parse()?),
                None => (s, Protocol::Tcp),
            };
            let (published, target) = match ports.split_once(':') {
                Some((p, t)) => (parse_port(p, "published")?, parse_port(t, "target")?),
                None => (0, parse_port(ports, "target")?),
            };
            Ok(PortConfig {
                published,
                target,
                protocol,
                mode: PublishMode::Ingress,
                snat: false,
            })
        }
    }
}

fn parse_port(v: &str, what: &str) -> Result<u16, Invalid> {
    match v.trim().parse::<u32>() {
        Ok(p) if (1..=65535).contains(&p) => Ok(p as u16),
        Ok(p) => Err(invalid(format!(
            "{what} port {p} is out of range (1-65535)"
        ))),
        Err(_) => Err(invalid(format!("{what} port {v:?} is not a number"))),
    }
}

/// A service's attachment to one network.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServiceNetwork {
    pub network: String,
    pub network_id: String,
    #[serde(default)]
    pub aliases: Vec<String>,
    /// The service's virtual IP on that network (vip mode).
    pub vip: Option<Ipv4Addr>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Service {
    pub id: String,
    pub name: String,
    pub networks: Vec<ServiceNetwork>,
    pub replicas: u32,
    pub endpoint_mode: EndpointMode,
    pub ports: Vec<PortConfig>,
    /// The OCI image each task runs (a container, through podman); None: a process task
    /// of the lab runtime, running `command` on the host's filesystem.
    #[serde(default)]
    pub image: Option<String>,
    /// The command (with an image: overrides the image's command; empty keeps it).
    pub command: Vec<String>,
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub health: Option<HealthCheck>,
    /// How the VIP picks a task for a new connection.
    #[serde(default)]
    pub lb: LbOptions,
    /// Set for a standalone container (`shoal run`), not a service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub standalone: Option<Standalone>,
}

/// A standalone container (`shoal run`): one task on the node it was started from, never
/// moved or restarted; its name and aliases resolve to its own address (no VIP). Stored
/// as a service record so that names, addresses and DNS work as for services.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Standalone {
    /// The node it runs on.
    pub node_id: String,
    /// Why it ended (its exit), once it did: it is not started again.
    #[serde(default)]
    pub exited: Option<String>,
    /// Set for a container another runtime made and attached through Shoal's CNI plugin:
    /// its sandbox is that runtime's, Shoal only plumbs its interface and serves its DNS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cni: Option<CniAttachment>,
}

/// A container of another runtime (podman, containerd), attached through the CNI plugin.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CniAttachment {
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_NETNS`: the path of the container's network namespace.
    pub netns: String,
    /// `CNI_IFNAME`: the container-side interface name.
    pub ifname: String,
}

/// `--lb random|consistent` and `--affinity-timeout DURATION` of a service.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct LbOptions {
    #[serde(default)]
    pub selection: LbSelection,
    /// Client-IP session affinity: seconds a client keeps going to the task its last
    /// connection went to (kube-proxy's `sessionAffinity: ClientIP`); None: off.
    #[serde(default)]
    pub affinity_secs: Option<u32>,
}

impl LbOptions {
    pub fn validate(&self) -> Result<(), Invalid> {
        if let Some(t) = self.affinity_secs
            && !(1..=86_400).contains(&t)
        {
            return Err(invalid(format!(
                "--affinity-timeout {t}s is out of range (1s-24h)"
            )));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash, Default)]
#[serde(rename_all = "lowercase")]
pub enum LbSelection {
    /// A random task per new connection.
    #[default]
    Random,
    /// By a hash of the connection's addresses and ports: every node picks the same task, and
    /// a task leaving moves only its own connections.
    Consistent,
}

impl FromStr for LbSelection {
    type Err = Invalid;
    fn from_str(s: &str) -> Result<Self, Invalid> {
        match s {
            "random" => Ok(LbSelection::Random),
            "consistent" => Ok(LbSelection::Consistent),
            _ => Err(invalid(format!(
                "invalid --lb {s:?}: use random or consistent"
            ))),
        }
    }
}

/// `--health-cmd CMD [--health-interval D] [--health-retries N]`: the command runs in the
/// task's sandbox through `/bin/sh -c`; exit 0 is healthy.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HealthCheck {
    pub cmd: String,
    pub interval_ms: u64,
    /// Consecutive failures that make a task unhealthy.
    pub retries: u32,
}

impl HealthCheck {
    pub const DEFAULT_INTERVAL_MS: u64 = 1000;
    pub const DEFAULT_RETRIES: u32 = 3;

    pub fn validate(&self) -> Result<(), Invalid> {
        if self.cmd.trim().is_empty() {
            return Err(invalid("--health-cmd is empty"));
        }
        if !(100..=3_600_000).contains(&self.interval_ms) {
            return Err(invalid(format!(
                "--health-interval {}ms is out of range (100ms-1h)",
                self.interval_ms
            )));
        }
        if !(1..=100).contains(&self.retries) {
            return Err(invalid(format!(
                "--health-retries {} is out of range (1-100)",
                self.retries
            )));
        }
        Ok(())
    }
}

/// Parses a duration as Docker writes them: `500ms`, `2s`, `1m`, or plain seconds.
pub fn parse_duration_ms(s: &str) -> Result<u64, Invalid> {
    let s = s.trim();
    let (num, mult) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1000)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60_000)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3_600_000)
    } else {
        (s, 1000)
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| invalid(format!("invalid duration {s:?}: use e.g. 500ms, 2s, 1m")))
}

/// Health of a task: `None` when its service has no health check.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Starting,
    Healthy,
    Unhealthy,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    New,
    Starting,
    Running,
    Shutdown,
    Failed,
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TaskState::New => "new",
            TaskState::Starting => "starting",
            TaskState::Running => "running",
            TaskState::Shutdown => "shutdown",
            TaskState::Failed => "failed",
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TaskNetwork {
    pub network: String,
    pub network_id: String,
    pub ip: Ipv4Addr,
    pub mac: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Task {
    pub id: String,
    pub service_id: String,
    pub service_name: String,
    pub slot: u32,
    pub node_id: String,
    pub desired_state: TaskState,
    pub state: TaskState,
    pub networks: Vec<TaskNetwork>,
    #[serde(default)]
    pub error: Option<String>,
    /// Set for tasks of services with a health check.
    #[serde(default)]
    pub health: Option<Health>,
}

impl Task {
    /// The name docker users know: `web.1`.
    pub fn name(&self) -> String {
        format!("{}.{}", self.service_name, self.slot)
    }
    /// The full task name: `web.1.<id>`.
    pub fn full_name(&self) -> String {
        format!("{}.{}.{}", self.service_name, self.slot, self.id)
    }
    /// The task's hostname: its short id, as Docker names containers.
    pub fn hostname(&self) -> String {
        short_id(&self.id).to_string()
    }
    /// The task's address on a network, if it is attached to it.
    pub fn ip_on(&self, network_id: &str) -> Option<Ipv4Addr> {
        self.networks
            .iter()
            .find(|n| n.network_id == network_id)
            .map(|n| n.ip)
    }
    /// A task is a backend and in DNS only while it runs, is meant to, and (with a health
    /// check) has been found healthy. Node liveness is judged by the caller.
    pub fn is_serving(&self) -> bool {
        self.state == TaskState::Running
            && self.desired_state == TaskState::Running
            && matches!(self.health, None | Some(Health::Healthy))
    }
}

/// MAC of a task interface, derived from its address as Docker does (02:42 + IPv4).
pub fn mac_for(ip: Ipv4Addr) -> [u8; 6] {
    let o = ip.octets();
    [0x02, 0x42, o[0], o[1], o[2], o[3]]
}

/// The VXLAN endpoint MAC of a node on every overlay network, derived from its underlay
/// address: fixed per node, so a receiving node can tell which node a frame came from.
pub fn vtep_mac(underlay: Ipv4Addr) -> [u8; 6] {
    let o = underlay.octets();
    [0x02, 0x53, o[0], o[1], o[2], o[3]]
}

pub fn mac_string(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Names of networks and services: what Docker accepts, and safe as a DNS label.
pub fn validate_name(kind: &str, name: &str) -> Result<(), Invalid> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "invalid {kind} name {name:?}: use 1-63 letters, digits, '-' or '_', starting with a letter or digit"
        )))
    }
}

/// An image reference as podman takes it (`busybox`, `localhost/whoami:1`,
/// `docker.io/library/nginx:1.25`, `name@sha256:...`). Refused: empty, too long, spaces or
/// other characters no reference has, and a leading '-' (it would read as a flag).
pub fn validate_image(image: &str) -> Result<(), Invalid> {
    let ok = !image.is_empty()
        && image.len() <= 255
        && !image.starts_with(['-', '.', '/', ':', '@'])
        && image
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-/:@".contains(c));
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "invalid image {image:?}: expected a reference like busybox, localhost/whoami:1 or docker.io/library/nginx:1.25"
        )))
    }
}

/// Parses a CIDR given by the user; the address must be the network address.
pub fn parse_subnet(s: &str) -> Result<Ipv4Net, Invalid> {
    let net: Ipv4Net = s.parse().map_err(|_| {
        invalid(format!(
            "invalid subnet {s:?}: expected IPv4 CIDR like 10.10.0.0/24"
        ))
    })?;
    if net.prefix_len() > 29 {
        return Err(invalid(format!(
            "subnet {s} is too small: use a /29 or larger"
        )));
    }
    if net.network() != net.addr() {
        return Err(invalid(format!(
            "invalid subnet {s}: host bits are set (did you mean {}?)",
            net.trunc()
        )));
    }
    Ok(net)
}

/// A random lowercase hex id, as Docker shows short ids.
/// The first 12 characters of an id (Docker's short form), or the whole id when it is
/// shorter. Never panics, whatever an API client sent.
pub fn short_id(id: &str) -> &str {
    match id.char_indices().nth(12) {
        Some((i, _)) => &id[..i],
        None => id,
    }
}

pub fn new_id() -> String {
    let n: u128 = rand::random();
    format!("{n:032x}")[..25].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bug 7: short ids from the API did not survive `id[..12]`.
    #[test]
    fn short_id_takes_twelve_characters_at_most() {
        assert_eq!(short_id("0123456789abcdef"), "0123456789ab");
        assert_eq!(short_id("abc"), "abc");
        assert_eq!(short_id(""), "");
        assert_eq!(short_id("ééééééééééééé"), "éééééééééééé");
    }

    #[test]
    fn publish_long_and_short_forms() {
        let p = PortConfig::parse("published=8080,target=80,mode=ingress").unwrap();
        assert_eq!(
            (p.published, p.target, p.protocol, p.mode),
            (8080, 80, Protocol::Tcp, PublishMode::Ingress)
        );
        let p = PortConfig::parse("published=53,target=53,protocol=udp,mode=host").unwrap();
        assert_eq!((p.protocol, p.mode), (Protocol::Udp, PublishMode::Host));
        let p = PortConfig::parse("8080:80/udp").unwrap();
        assert_eq!(
            (p.published, p.target, p.protocol),
            (8080, 80, Protocol::Udp)
        );
        assert_eq!(PortConfig::parse("80").unwrap().published, 0);
    }

    #[test]
    fn publish_errors_name_the_problem() {
        let e = PortConfig::parse("published=70000,target=80").unwrap_err();
        assert!(e.0.contains("70000") && e.0.contains("out of range"), "{e}");
        let e = PortConfig::parse("published=80").unwrap_err();
        assert!(e.0.contains("target"), "{e}");
        let e = PortConfig::parse("8080:http").unwrap_err();
        assert!(e.0.contains("\"http\""), "{e}");
        let e = PortConfig::parse("published=1,target=2,proto=tcp").unwrap_err();
        assert!(e.0.contains("proto"), "{e}");
        let e = PortConfig::parse("80/sctp").unwrap_err();
        assert!(e.0.contains("sctp"), "{e}");
        assert!(PortConfig::parse("target=80,mode=host").is_err());
        assert!(PortConfig::parse("0:80").is_err());
    }

    #[test]
    fn names() {
        assert!(validate_name("service", "web-1_a").is_ok());
        for bad in ["", "-web", "web.x", "a b", &"x".repeat(64)] {
            assert!(validate_name("service", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn subnets() {
        assert_eq!(
            parse_subnet("10.10.0.0/24").unwrap().to_string(),
            "10.10.0.0/24"
        );
        assert!(
            parse_subnet("10.10.0.1/24")
                .unwrap_err()
                .0
                .contains("10.10.0.0/24")
        );
        assert!(parse_subnet("10.10.0.0/33").is_err());
        assert!(parse_subnet("banana").unwrap_err().0.contains("banana"));
        assert!(parse_subnet("10.0.0.0/30").is_err());
    }

    #[test]
    fn macs_follow_addresses() {
        assert_eq!(
            mac_string(mac_for("10.0.1.7".parse().unwrap())),
            "02:42:0a:00:01:07"
        );
    }

    #[test]
    fn task_names() {
        let t = Task {
            id: "abc".into(),
            service_id: "s".into(),
            service_name: "web".into(),
            slot: 2,
            node_id: "n".into(),
            desired_state: TaskState::Running,
            state: TaskState::Running,
            networks: vec![],
            error: None,
            health: None,
        };
        assert_eq!(t.name(), "web.2");
        assert_eq!(t.full_name(), "web.2.abc");
        assert!(t.is_serving());
        let starting = Task {
            health: Some(Health::Starting),
            ..t.clone()
        };
        assert!(
            !starting.is_serving(),
            "a task with a health check serves only once healthy"
        );
        let healthy = Task {
            health: Some(Health::Healthy),
            ..t.clone()
        };
        assert!(healthy.is_serving());
        let unhealthy = Task {
            health: Some(Health::Unhealthy),
            ..t
        };
        assert!(!unhealthy.is_serving());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("500ms").unwrap(), 500);
        assert_eq!(parse_duration_ms("2s").unwrap(), 2000);
        assert_eq!(parse_duration_ms("3").unwrap(), 3000);
        assert_eq!(parse_duration_ms("1m").unwrap(), 60_000);
        assert!(parse_duration_ms("soon").unwrap_err().0.contains("soon"));
        let h = HealthCheck {
            cmd: "true".into(),
            interval_ms: 50,
            retries: 3,
        };
        assert!(h.validate().unwrap_err().0.contains("50ms"));
    }
}
