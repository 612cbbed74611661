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
    /// Seconds before a slot whose task exited or failed gets a new task (Docker Swarm's
    /// restart delay: a task that crashes at once is not restarted in a hot loop).
    pub restart_delay_secs: u64,
    /// TTL of the node's liveness lease: a node whose agent stops renewing it is declared
    /// down this long after its last renewal.
    pub lease_ttl_secs: u64,
    /// Seconds between full reconcile passes when nothing else happens: the longest an
    /// object someone else deleted (an nft flush, a removed route) stays gone.
    pub resync_secs: u64,
    /// Underlay interface for VXLAN (default: the one holding advertise_addr).
    pub underlay_dev: Option<String>,
    /// How VIPs are load-balanced.
    pub lb: LbSettings,
    /// TCP port of the peer API on advertise_addr, where other agents fetch this node's
    /// task logs (with the cluster's token). 0: off (logs of this node's tasks are then
    /// read only through its own socket).
    pub peer_port: u16,
    /// How image tasks run.
    pub runtime: RuntimeSettings,
    /// The CNI plugin for other runtimes' containers.
    pub cni: CniSettings,
    /// WireGuard of the encrypted networks.
    pub wireguard: WireguardSettings,
    /// Address of the Prometheus `/metrics` endpoint (plain HTTP; loopback by default).
    /// An empty string turns it off.
    pub metrics_addr: String,
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

/// `[runtime]`: image tasks are containers run by podman.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeSettings {
    /// The podman binary.
    pub podman: PathBuf,
    /// The OCI runtime podman uses: "auto" (runc on hosts with hybrid cgroups, where crun
    /// fails; podman's default elsewhere), "default" (podman's), or a name or path.
    pub oci_runtime: String,
    /// `--ulimit` values for every container. Absent: detected (none where root has
    /// CAP_SYS_RESOURCE; nofile=1024:1024 and nproc=4096:4096 where it lacks it, since
    /// podman's defaults fail with EPERM there).
    pub ulimits: Option<Vec<String>>,
    /// Seconds a pull of an image the node does not have may take.
    pub pull_timeout_secs: u64,
}

/// `[wireguard]`: the node's WireGuard for `--opt encrypted` networks. Its private key is
/// made on the node (`state_dir/wireguard/private.key`, mode 0600) and never leaves it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WireguardSettings {
    /// UDP port on advertise_addr. 0: off (this node then carries no encrypted network's
    /// traffic; it is never sent in the clear instead).
    pub port: u16,
    /// Seconds between key rotations (a new key pair, peers told through the store, open
    /// flows kept). 0: only on `shoal node rotate-key`.
    pub rotate_secs: u64,
    /// "auto" (the kernel's WireGuard where it has the module, else userspace on TUN),
    /// "kernel" or "userspace".
    pub backend: WgBackend,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum WgBackend {
    #[default]
    Auto,
    Kernel,
    Userspace,
}

impl WgBackend {
    pub fn to_wg(self) -> shoal_wg::Backend {
        match self {
            WgBackend::Auto => shoal_wg::Backend::Auto,
            WgBackend::Kernel => shoal_wg::Backend::Kernel,
            WgBackend::Userspace => shoal_wg::Backend::Userspace,
        }
    }
}

impl Default for WireguardSettings {
    fn default() -> Self {
        WireguardSettings {
            port: 51820,
            rotate_secs: 0,
            backend: WgBackend::Auto,
        }
    }
}

/// `[cni]`: conflists for the attachable networks and the plugin binary, for podman's CNI
/// backend and containerd.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CniSettings {
    pub enabled: bool,
    /// Where runtimes read network configurations.
    pub config_dir: PathBuf,
    /// Where runtimes look for plugin binaries.
    pub plugin_dir: PathBuf,
    /// The plugin binary to install; absent: `shoal-cni` beside the agent's binary.
    pub plugin: Option<PathBuf>,
}

impl Default for CniSettings {
    fn default() -> Self {
        CniSettings {
            enabled: true,
            config_dir: PathBuf::from("/etc/cni/net.d"),
            plugin_dir: PathBuf::from("/opt/cni/bin"),
            plugin: None,
        }
    }
}

impl CniSettings {
    /// Where the node writes, or None when CNI is off.
    pub fn paths(&self, socket: &Path) -> Option<shoal_node::cni::CniPaths> {
        if !self.enabled {
            return None;
        }
        let plugin_src = self.plugin.clone().unwrap_or_else(|| {
            std::env::current_exe()
                .ok()
                .and_then(|e| e.parent().map(|d| d.join(shoal_node::cni::PLUGIN_TYPE)))
                .unwrap_or_else(|| PathBuf::from(shoal_node::cni::PLUGIN_TYPE))
        });
        Some(shoal_node::cni::CniPaths {
            config_dir: self.config_dir.clone(),
            plugin_dir: self.plugin_dir.clone(),
            plugin_src,
            socket: std::path::absolute(socket).unwrap_or_else(|_| socket.to_path_buf()),
        })
    }
}

impl Default for RuntimeSettings {
    fn default() -> Self {
        RuntimeSettings {
            podman: PathBuf::from("podman"),
            oci_runtime: "auto".into(),
            ulimits: None,
            pull_timeout_secs: 60,
        }
    }
}

impl RuntimeSettings {
    /// The settings podman is run with, with "auto" and absent values detected.
    pub fn podman(&self) -> shoal_node::podman::PodmanSettings {
        shoal_node::podman::PodmanSettings {
            engine: self.podman.clone(),
            oci_runtime: match self.oci_runtime.as_str() {
                "auto" => shoal_node::podman::detect_oci_runtime(),
                "default" => None,
                r => Some(r.to_string()),
            },
            ulimits: self
                .ulimits
                .clone()
                .unwrap_or_else(shoal_node::podman::detect_ulimits),
            pull_timeout: std::time::Duration::from_secs(self.pull_timeout_secs),
        }
    }
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
    /// etcd client URLs, e.g. `http://192.0.2.2:2379` (`https://` with `tls`).
    pub endpoints: Vec<String>,
    /// TLS towards etcd (client certificates). Absent: plain HTTP.
    pub tls: Option<EtcdTls>,
}

/// `[store.tls]`: PEM files; all three are needed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EtcdTls {
    /// CA certificate that signed etcd's server certificate.
    pub ca: PathBuf,
    /// This agent's client certificate.
    pub cert: PathBuf,
    /// The client certificate's private key.
    pub key: PathBuf,
    /// Name expected in etcd's certificate (default: the endpoint's host).
    #[serde(default)]
    pub server_name: Option<String>,
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
            socket: PathBuf::from(shoal_api::client::DEFAULT_SOCKET),
            state_dir: PathBuf::from("/var/lib/shoal"),
            netns_prefix: "shoal-".into(),
            advertise_addr: None,
            store: StoreConfig::default(),
            dns: DnsSettings::default(),
            stop_grace_secs: 1,
            kill_timeout_secs: 5,
            restart_delay_secs: 5,
            lease_ttl_secs: 3,
            resync_secs: 10,
            underlay_dev: None,
            lb: LbSettings::default(),
            peer_port: 7950,
            runtime: RuntimeSettings::default(),
            cni: CniSettings::default(),
            wireguard: WireguardSettings::default(),
            metrics_addr: DEFAULT_METRICS_ADDR.into(),
        }
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            kind: StoreKind::Embedded,
            endpoints: vec![],
            tls: None,
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

/// Where `/metrics` listens unless told otherwise.
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9469";

impl AgentConfig {
    /// The metrics listener, None when turned off.
    pub fn metrics_socket(&self) -> anyhow::Result<Option<SocketAddr>> {
        if self.metrics_addr.trim().is_empty() {
            return Ok(None);
        }
        self.metrics_addr
            .parse()
            .map(Some)
            .map_err(|_| anyhow::anyhow!("metrics_addr {:?} is not ip:port", self.metrics_addr))
    }

    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let cfg = Self::load_unvalidated(path)?;
        cfg.validate()
            .map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))?;
        Ok(cfg)
    }

    /// Reads and parses (unknown keys refused) without the whole-config checks, which
    /// wait until flags and environment have been applied.
    pub fn load_unvalidated(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read config {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let cfg: AgentConfig = toml::from_str(text)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The period of full passes ([`AgentConfig::resync_secs`]).
    pub fn resync_period(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.resync_secs)
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
        if !(1..=3600).contains(&self.resync_secs) {
            anyhow::bail!("resync_secs {} is out of range (1-3600)", self.resync_secs);
        }
        if self.store.kind == StoreKind::Etcd && self.store.endpoints.is_empty() {
            anyhow::bail!("store.kind = \"etcd\" needs store.endpoints");
        }
        for e in &self.store.endpoints {
            let rest = e
                .strip_prefix("http://")
                .or_else(|| e.strip_prefix("https://"))
                .unwrap_or(e);
            let ok = rest
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
            if !ok {
                anyhow::bail!("store.endpoints: {e:?} is not host:port (or http[s]://host:port)");
            }
        }
        if let Some(tls) = &self.store.tls {
            for (what, p) in [("ca", &tls.ca), ("cert", &tls.cert), ("key", &tls.key)] {
                if !p.is_file() {
                    anyhow::bail!("store.tls.{what}: {} is not a readable file", p.display());
                }
            }
        }
        self.metrics_socket()?;
        if self.restart_delay_secs > 3600 {
            anyhow::bail!(
                "restart_delay_secs {} is out of range (0-3600)",
                self.restart_delay_secs
            );
        }
        if self.runtime.oci_runtime.is_empty() || self.runtime.oci_runtime.starts_with('-') {
            anyhow::bail!(
                "runtime.oci_runtime {:?} must be \"auto\", \"default\", or a runtime name or path such as \"runc\"",
                self.runtime.oci_runtime
            );
        }
        for u in self.runtime.ulimits.iter().flatten() {
            let ok = u.split_once('=').is_some_and(|(name, v)| {
                !name.is_empty()
                    && name.bytes().all(|b| b.is_ascii_lowercase())
                    && !v.is_empty()
                    && v.split(':').count() <= 2
                    && v.split(':').all(|n| n == "-1" || n.parse::<u64>().is_ok())
            });
            if !ok {
                anyhow::bail!(
                    "runtime.ulimits: {u:?} is not NAME=SOFT[:HARD] (e.g. nofile=1024:1024)"
                );
            }
        }
        if !(1..=3600).contains(&self.runtime.pull_timeout_secs) {
            anyhow::bail!(
                "runtime.pull_timeout_secs {} is out of range (1-3600)",
                self.runtime.pull_timeout_secs
            );
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

    /// The sample config of the repository parses (unknown keys would fail) and sets every
    /// key to its default (the systemd unit's command line is tested in the CLI crate).
    #[test]
    fn sample_config() {
        let c = AgentConfig::parse(include_str!("../../config/agent.toml")).unwrap();
        assert_eq!(c, AgentConfig::default());
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
