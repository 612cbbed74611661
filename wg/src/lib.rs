//! WireGuard for Shoal's encrypted overlays (`--opt encrypted`): the node's key pair
//! ([`keys`]) and its device ([`device`]): one interface [`IFNAME`] in the node namespace
//! with one peer per other node (the peer's underlay address as its only allowed IP), and
//! the routing that sends the encrypted networks' VXLAN datagrams (their own UDP port)
//! into it, so that they leave only inside WireGuard.
//!
//! The device is the kernel's WireGuard where the kernel has the module (a link configured
//! over generic netlink; it outlives the agent), else userspace WireGuard on TUN (gotatun)
//! in the agent process (this machine's kernel has none): that one goes when the agent
//! goes; a new agent makes it again with the same key, and the peers' next handshake joins
//! it.

pub mod device;
pub mod kernel;
pub mod keys;

pub use device::{Backend, Device, DeviceSpec, PeerSpec, PeerStatus};
pub use keys::Key;

/// The WireGuard interface in the node namespace.
pub const IFNAME: &str = "shoalwg0";
/// WireGuard's UDP port unless configured.
pub const DEFAULT_PORT: u16 = 51820;
/// Bytes WireGuard adds over IPv4: outer IPv4 (20) + UDP (8) + WireGuard data header (16)
/// + authentication tag (16). The device's MTU is the underlay's minus this.
pub const OVERHEAD: u32 = 60;
/// Routing table (and rule priority) that holds `default dev shoalwg0`.
pub const ROUTE_TABLE: u32 = 84;

/// Errors; each names what failed and keeps the cause.
#[derive(Debug, thiserror::Error)]
pub enum WgError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("WireGuard device {ifname}: {what}: {source}")]
    Device {
        ifname: String,
        what: String,
        #[source]
        source: gotatun::device::Error,
    },
    #[error("{what}: {source}")]
    Netlink {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("invalid key: {0}")]
    Key(String),
    #[error("{0}")]
    Missing(String),
    #[error("WireGuard device {0} vanished (its TUN interface was deleted?)")]
    Gone(String),
}
