//! shoal-dns: the embedded resolver at 127.0.0.11 inside container network namespaces.
//!
//! The agent builds one [`Records`] view per container (the names of the networks it is
//! attached to) and [`Resolver::attach`]es it: UDP and TCP sockets are bound on
//! 127.0.0.11:53 inside the container's namespace and served from the agent process, one
//! UDP task and one TCP accept task per container. Names outside the view are forwarded to
//! the configured upstreams from the agent's own namespace (see [`DnsConfig`]).
//!
//! Query handling is a pure function ([`Handler::handle`]) separated from I/O; see the
//! [`handler`] module for the answer semantics (SOA of negative answers, truncation, EDNS).

mod cache;
pub mod handler;
mod mmsg;
mod records;
mod server;
pub mod stats;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

pub use handler::{Handler, Outcome, Transport};
pub use records::{Records, RecordsBuilder};
pub use server::{LISTEN_ADDR, Resolver};
pub use stats::{DnsStats, DnsStatsSnapshot};

/// Resolver settings shared by every attached container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsConfig {
    /// TTL of local answers (seconds).
    pub ttl: u32,
    /// TTL and SOA MINIMUM of negative answers (seconds).
    pub negative_ttl: u32,
    /// Servers for names outside a view, tried in order (empty: never forward).
    pub upstreams: Vec<SocketAddr>,
    /// How long to wait for one upstream before trying the next.
    pub upstream_timeout: Duration,
    /// Idle client TCP connections are closed after this long.
    pub tcp_idle_timeout: Duration,
    /// Upstream answers kept (shared by all containers; 0 disables the cache).
    pub cache_size: usize,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            ttl: 5,
            negative_ttl: 5,
            upstreams: Vec::new(),
            upstream_timeout: Duration::from_secs(2),
            tcp_idle_timeout: Duration::from_secs(10),
            cache_size: 10_000,
        }
    }
}

/// Errors of the resolver's control API; each names the container and namespace involved.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("container {0:?} is already attached to the resolver")]
    AlreadyAttached(String),
    #[error("container {0:?} is not attached to the resolver")]
    NotAttached(String),
    #[error("entering network namespace {netns:?} for container {id:?}: {source}")]
    Netns {
        id: String,
        netns: String,
        #[source]
        source: shoal_netns::Error,
    },
    #[error(
        "binding {proto} {addr} in network namespace {netns:?} for container {id:?}: \
         {source}"
    )]
    Bind {
        id: String,
        netns: String,
        proto: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "127.0.0.11 is unreachable in network namespace {netns:?} for container {id:?} \
         (bring `lo` up there first): {source}"
    )]
    LoopbackDown {
        id: String,
        netns: String,
        #[source]
        source: std::io::Error,
    },
    #[error("registering sockets of container {id:?} with the runtime: {source}")]
    Runtime {
        id: String,
        #[source]
        source: std::io::Error,
    },
}

/// The first three `nameserver` lines of a resolv.conf, as port-53 socket addresses
/// (IPv6 zone suffixes such as `%eth0` are ignored; unparseable lines skipped).
pub fn nameservers_from_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|line| {
            let line = line.split(['#', ';']).next().unwrap_or("");
            let mut words = line.split_whitespace();
            if words.next() != Some("nameserver") {
                return None;
            }
            let addr = words.next()?;
            let addr = addr.split('%').next().unwrap_or(addr);
            addr.parse::<IpAddr>()
                .ok()
                .map(|ip| SocketAddr::new(ip, 53))
        })
        .take(3)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf() {
        let text = "# comment\nsearch example.org\nnameserver 10.0.0.2\n\
                    nameserver   fe80::1%eth0 # link-local\nnameserver bogus\n\
                    ;nameserver 1.1.1.1\nnameserver 9.9.9.9\nnameserver 8.8.8.8\n";
        let got = nameservers_from_resolv_conf(text);
        let want: Vec<SocketAddr> = vec![
            "10.0.0.2:53".parse().unwrap(),
            "[fe80::1]:53".parse().unwrap(),
            "9.9.9.9:53".parse().unwrap(),
        ];
        assert_eq!(got, want);
        assert!(nameservers_from_resolv_conf("").is_empty());
    }

    #[test]
    fn config_defaults() {
        let c = DnsConfig::default();
        assert_eq!((c.ttl, c.negative_ttl), (5, 5));
        assert_eq!(c.upstream_timeout, Duration::from_secs(2));
        assert_eq!(c.tcp_idle_timeout, Duration::from_secs(10));
        assert_eq!(c.cache_size, 10_000);
    }
}
