//! Agent configuration: TOML, unknown keys refused, every field with a default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// `shoal agent --config FILE`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// The node's name in `node ls` (default: the host name).
    pub node_name: String,
    /// Unix socket of the API (mode 0600).
    pub socket: PathBuf,
    /// Where the node keeps its id, task files and (embedded store) data.
    pub state_dir: PathBuf,
    /// Prefix of every namespace this agent creates (networks: PREFIXn-ID, tasks: PREFIXt-ID).
    pub netns_prefix: String,
    /// Underlay address of this node (VXLAN endpoint); detected later when absent.
    pub advertise_addr: Option<std::net::Ipv4Addr>,
    pub store: StoreConfig,
    pub dns: DnsSettings,
    /// Seconds between a task leaving DNS/backends and its process receiving SIGTERM.
    pub stop_grace_secs: u64,
    /// Seconds between SIGTERM and SIGKILL.
    pub kill_timeout_secs: u64,
    /// TTL of the node's liveness lease: a node whose agent stops renewing it is declared
    /// down this long after its last renewal.
    pub lease_ttl_secs: u64,
    /// Underlay interface for VXLAN (default: the one holding advertise_addr).
    pub underlay_dev: Option<String>,
    /// How VIPs are load-balanced.
    pub lb: LbSettings,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LbSettings {
    /// `nftables` (default: one nft table per network namespace) or `ipvs` (the kernel's IP
    /// Virtual Server plus a small companion nft table; needs the ip_vs modules).
    pub dataplane: Dataplane,
    /// IPVS scheduler of services with random selection (`rr`, `wrr`, `lc`, `sh`, ...);
    /// services with consistent selection always use `mh`. Only read with `dataplane = "ipvs"`.
    pub ipvs_scheduler: String,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Dataplane {
    #[default]
    Nftables,
    Ipvs,
}

impl Default for LbSettings {
    fn default() -> Self {
        LbSettings {
            dataplane: Dataplane::Nftables,
            ipvs_scheduler: "rr".into(),
        }
    }
}

impl LbSettings {
    /// The IPVS dataplane's options from these settings.
    pub fn ipvs_options(&self) -> shoal_lb::ipvs::IpvsOptions {
        shoal_lb::ipvs::IpvsOptions {
            scheduler: shoal_lb::ipvs::Scheduler::from_name(&self.ipvs_scheduler),
            flags: 0,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// `embedded` (single node, on disk under state_dir) or `etcd`.
    pub kind: StoreKind,
    /// etcd client URLs, e.g. `http://192.0.2.2:2379`.
    pub endpoints: Vec<String>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    #[default]
    Embedded,
    Etcd,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DnsSettings {
    /// TTL of cluster records, seconds (Docker: a fixed 600).
    pub ttl: u32,
    /// TTL of negative answers (the SOA minimum), seconds.
    pub negative_ttl: u32,
    /// Upstream servers for names outside the cluster. None: the first three nameservers of
    /// the node's /etc/resolv.conf. An empty list: never forward.
    pub upstreams: Option<Vec<SocketAddr>>,
    /// The search list written into containers' resolv.conf. None: the node's.
    pub search: Option<Vec<String>>,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            node_name: nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| "node".into()),
            socket: PathBuf::from(crate::client::DEFAULT_SOCKET),
            state_dir: PathBuf::from("/var/lib/shoal"),
            netns_prefix: "shoal-".into(),
            advertise_addr: None,
            store: StoreConfig::default(),
            dns: DnsSettings::default(),
            stop_grace_secs: 1,
            kill_timeout_secs: 5,
            lease_ttl_secs: 3,
            underlay_dev: None,
            lb: LbSettings::default(),
        }
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            kind: StoreKind::Embedded,
            endpoints: vec![],
        }
    }
}

impl Default for DnsSettings {
    fn default() -> Self {
        DnsSettings {
            ttl: 5,
            negative_ttl: 5,
            upstreams: None,
            search: None,
        }
    }
}

impl AgentConfig {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read config {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let cfg: AgentConfig = toml::from_str(text)?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        shoal_netns::validate_name(&format!("{}x", self.netns_prefix)).map_err(|_| {
            anyhow::anyhow!(
                "netns_prefix {:?} may hold only letters, digits, '-', '_' and '.'",
                self.netns_prefix
            )
        })?;
        if !(1..=3600).contains(&self.lease_ttl_secs) {
            anyhow::bail!(
                "lease_ttl_secs {} is out of range (1-3600)",
                self.lease_ttl_secs
            );
        }
        if self.store.kind == StoreKind::Etcd && self.store.endpoints.is_empty() {
            anyhow::bail!("store.kind = \"etcd\" needs store.endpoints");
        }
        let sched = &self.lb.ipvs_scheduler;
        if sched.is_empty()
            || sched.len() > 15
            || !sched
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        {
            anyhow::bail!(
                "lb.ipvs_scheduler {sched:?} must be an IPVS scheduler name such as \"rr\", \"wrr\", \"lc\" or \"sh\""
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses_unknown_keys() {
        let c = AgentConfig::parse("node_name = \"n1\"\n[dns]\nttl = 7\nupstreams = []\n").unwrap();
        assert_eq!(c.node_name, "n1");
        assert_eq!(c.dns.ttl, 7);
        assert_eq!(c.dns.upstreams, Some(vec![]));
        let e = AgentConfig::parse("node_nam = \"n1\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("node_nam"), "{e}");
        let e = AgentConfig::parse("[store]\nkind = \"etcd\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("endpoints"), "{e}");
        let e = AgentConfig::parse("netns_prefix = \"a/b\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("netns_prefix"), "{e}");
    }

    #[test]
    fn lb_dataplane() {
        let c = AgentConfig::parse("").unwrap();
        assert_eq!(c.lb, LbSettings::default());
        assert_eq!(c.lb.dataplane, Dataplane::Nftables);
        assert_eq!(c.lb.ipvs_scheduler, "rr");
        let c = AgentConfig::parse("[lb]\ndataplane = \"nftables\"\n").unwrap();
        assert_eq!(c.lb.dataplane, Dataplane::Nftables);
        let c =
            AgentConfig::parse("[lb]\ndataplane = \"ipvs\"\nipvs_scheduler = \"wlc\"\n").unwrap();
        assert_eq!(c.lb.dataplane, Dataplane::Ipvs);
        assert_eq!(
            c.lb.ipvs_options(),
            shoal_lb::ipvs::IpvsOptions {
                scheduler: shoal_lb::ipvs::Scheduler::Other("wlc".into()),
                flags: 0
            }
        );
        assert_eq!(
            AgentConfig::parse("[lb]\ndataplane = \"ipvs\"\n")
                .unwrap()
                .lb
                .ipvs_options()
                .scheduler,
            shoal_lb::ipvs::Scheduler::Rr
        );
        // An unknown dataplane names the field and the accepted values.
        let e = AgentConfig::parse("[lb]\ndataplane = \"ebpf\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("dataplane")
                && e.contains("ebpf")
                && e.contains("nftables")
                && e.contains("ipvs"),
            "{e}"
        );
        let e = AgentConfig::parse("[lb]\nscheduler = \"rr\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("scheduler"), "{e}");
        let e = AgentConfig::parse("[lb]\nipvs_scheduler = \"r r\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("ipvs_scheduler"), "{e}");
    }
}
