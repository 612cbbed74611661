//! Ports that processes listen on in this process's network namespace (the node's), read
//! from /proc/self/net/{tcp,tcp6,udp,udp6}: TCP sockets in LISTEN state and unconnected UDP
//! sockets. Publishing such a port is refused (Docker Swarm silently takes the traffic over:
//! moby#39089). The format is the kernel's fixed text table; no crate reads just this.

use std::collections::BTreeSet;

use shoal_api::model::Protocol;

/// TCP state LISTEN in /proc/net/tcp*.
const TCP_LISTEN: &str = "0A";

/// (protocol, port) pairs in use, sorted. Unreadable files count as empty.
pub fn listening() -> Vec<(Protocol, u16)> {
    let mut out = BTreeSet::new();
    for (file, proto) in [
        ("tcp", Protocol::Tcp),
        ("tcp6", Protocol::Tcp),
        ("udp", Protocol::Udp),
        ("udp6", Protocol::Udp),
    ] {
        let text = std::fs::read_to_string(format!("/proc/self/net/{file}")).unwrap_or_default();
        out.extend(parse(&text, proto).into_iter().map(|p| (proto, p)));
    }
    out.into_iter().collect()
}

/// Local ports of listening (TCP) or unconnected (UDP) sockets in one /proc/net table.
pub fn parse(text: &str, proto: Protocol) -> Vec<u16> {
    let mut ports = vec![];
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(local), Some(remote), Some(state)) = (f.get(1), f.get(2), f.get(3)) else {
            continue;
        };
        let port_of = |a: &str| {
            a.rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
        };
        let Some(port) = port_of(local) else { continue };
        let keep = match proto {
            Protocol::Tcp => *state == TCP_LISTEN,
            Protocol::Udp => port_of(remote) == Some(0),
        };
        if keep && port != 0 {
            ports.push(port);
        }
    }
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// Addresses of this namespace, loopback excluded.
pub fn local_ips() -> Vec<std::net::IpAddr> {
    let mut ips: Vec<std::net::IpAddr> = nix::ifaddrs::getifaddrs()
        .map(|it| {
            it.filter_map(|ifa| {
                let a = ifa.address?;
                if let Some(v4) = a.as_sockaddr_in() {
                    Some(std::net::IpAddr::V4(v4.ip()))
                } else {
                    a.as_sockaddr_in6().map(|v6| std::net::IpAddr::V6(v6.ip()))
                }
            })
            .filter(|ip| {
                !ip.is_loopback()
                    && !matches!(ip, std::net::IpAddr::V6(v6) if v6.is_unicast_link_local())
            })
            .collect()
        })
        .unwrap_or_default();
    ips.sort();
    ips.dedup();
    ips
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_listeners_and_unconnected_udp() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0\n   1: 0100007F:9C40 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0 100 0 0 10 0\n";
        assert_eq!(parse(tcp, Protocol::Tcp), vec![8080]);
        let udp = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n  1: 00000000:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 3 2 0 0\n  2: 0100007F:D431 0100007F:0035 01 00000000:00000000 00:00000000 00000000     0        0 4 2 0 0\n";
        assert_eq!(parse(udp, Protocol::Udp), vec![53]);
        let tcp6 = "  sl  local_address                         remote_address                        st\n   0: 00000000000000000000000000000000:0050 00000000000000000000000000000000:0000 0A 0\n";
        assert_eq!(parse(tcp6, Protocol::Tcp), vec![80]);
        assert!(parse("header only\n", Protocol::Tcp).is_empty());
    }

    #[test]
    fn sees_a_real_listener() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        assert!(listening().contains(&(Protocol::Tcp, port)));
        let u = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let uport = u.local_addr().unwrap().port();
        assert!(listening().contains(&(Protocol::Udp, uport)));
    }
}
