//! What the node reconciler last did, for `node inspect` and the API.

/// What the agent last did, for `node inspect` and the API.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct NodeReport {
    pub last_error: Option<String>,
    /// When the last error was hit (seconds since the epoch) and whether the last pass
    /// was clean.
    pub last_error_unix: Option<u64>,
    pub last_pass_ok: bool,
    pub networks: Vec<String>,
    pub dns_attached: usize,
    pub passes: u64,
    /// The store revision the last pass applied.
    pub revision: i64,
    /// The VIPs programmed in this node's network namespaces.
    pub vips: Vec<ProgrammedVip>,
    /// The published ports programmed in the node namespace.
    pub published: Vec<ProgrammedPort>,
    /// The node's WireGuard (encrypted networks), while the cluster has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wireguard: Option<WireguardReport>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct WireguardReport {
    /// "kernel", "userspace" (WireGuard on TUN in the agent), or "none" while it is down.
    pub backend: String,
    pub interface: String,
    pub port: u16,
    pub public_key: String,
    /// Whether the device runs; when not, `error` says why (encrypted networks are then
    /// cut off on this node, never sent in the clear).
    pub up: bool,
    pub error: Option<String>,
    pub peers: Vec<WireguardPeer>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct WireguardPeer {
    pub public_key: String,
    pub endpoint: Option<String>,
    /// Seconds since the last handshake (None: never).
    pub last_handshake_secs: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ProgrammedVip {
    pub network_id: String,
    pub vip: std::net::Ipv4Addr,
    pub protocol: String,
    pub port: u16,
    pub backends: Vec<std::net::Ipv4Addr>,
    pub draining: Vec<std::net::Ipv4Addr>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ProgrammedPort {
    pub protocol: String,
    pub port: u16,
    pub mode: String,
    /// ingress-network address:target port of every backend.
    pub backends: Vec<String>,
}
