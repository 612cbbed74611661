//! Example rulesets shared by the golden, tracer and kernel tests.

#![allow(dead_code)]

use std::net::Ipv4Addr;

use shoal_lb::{Protocol, Ruleset, VirtualService};

pub const TABLE: &str = "shoal_lb";

pub fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

pub fn svc(
    id: &str,
    vip: &str,
    protocol: Protocol,
    port: u16,
    target_port: u16,
    backends: &[&str],
) -> VirtualService {
    VirtualService {
        id: id.to_string(),
        vip: ip(vip),
        protocol,
        port,
        target_port,
        backends: backends.iter().map(|b| ip(b)).collect(),
        ..Default::default()
    }
}

/// One TCP service with three backends (given out of order).
pub fn one_service() -> Ruleset {
    Ruleset {
        table: TABLE.to_string(),
        vips: vec![ip("10.96.0.10")],
        services: vec![svc(
            "web",
            "10.96.0.10",
            Protocol::Tcp,
            80,
            8080,
            &["10.0.1.3", "10.0.1.1", "10.0.1.2"],
        )],
        local_endpoints: vec![],
    }
}

/// A service without backends, and a VIP without any port.
pub fn zero_backends() -> Ruleset {
    Ruleset {
        table: TABLE.to_string(),
        vips: vec![ip("10.96.0.12"), ip("10.96.0.11")],
        services: vec![svc("empty", "10.96.0.11", Protocol::Tcp, 80, 8080, &[])],
        local_endpoints: vec![],
    }
}

/// Several services, given unsorted, with duplicates in the VIP and backend lists.
pub fn several() -> Ruleset {
    Ruleset {
        table: TABLE.to_string(),
        vips: vec![ip("10.96.0.20"), ip("10.96.0.10"), ip("10.96.0.10")],
        services: vec![
            svc("dns", "10.96.0.20", Protocol::Udp, 53, 5353, &["10.0.1.7"]),
            svc(
                "web",
                "10.96.0.10",
                Protocol::Tcp,
                443,
                8443,
                &["10.0.1.2", "10.0.1.1"],
            ),
            svc("dns", "10.96.0.20", Protocol::Tcp, 53, 5353, &["10.0.1.7"]),
            svc(
                "web",
                "10.96.0.10",
                Protocol::Tcp,
                80,
                8080,
                &["10.0.1.2", "10.0.1.1", "10.0.1.2"],
            ),
            // VIP only given here, not in `vips`: it is added to the set.
            svc("api", "10.96.0.30", Protocol::Tcp, 80, 80, &["10.0.2.1"]),
        ],
        local_endpoints: vec![],
    }
}

/// Local endpoints that are also backends: the hairpin set.
pub fn hairpin() -> Ruleset {
    Ruleset {
        table: TABLE.to_string(),
        vips: vec![ip("10.96.0.10")],
        services: vec![svc(
            "web",
            "10.96.0.10",
            Protocol::Tcp,
            80,
            8080,
            &["10.0.1.1", "10.0.1.2", "10.0.2.9"],
        )],
        local_endpoints: vec![ip("10.0.1.2"), ip("10.0.1.1")],
    }
}

/// Swarm-style VIP: every TCP and UDP port to the same port of a backend, plus one specific
/// port (which wins over the any-port entry), and a VIP whose any-port service has no backends.
pub fn any_port() -> Ruleset {
    Ruleset {
        table: TABLE.to_string(),
        vips: vec![],
        services: vec![
            svc(
                "web",
                "10.96.0.10",
                Protocol::Tcp,
                0,
                0,
                &["10.0.1.1", "10.0.1.2"],
            ),
            svc(
                "web",
                "10.96.0.10",
                Protocol::Udp,
                0,
                0,
                &["10.0.1.1", "10.0.1.2"],
            ),
            svc("web", "10.96.0.10", Protocol::Tcp, 443, 8443, &["10.0.1.3"]),
            svc("idle", "10.96.0.11", Protocol::Tcp, 0, 0, &[]),
        ],
        local_endpoints: vec![],
    }
}

/// Client-IP affinity (a specific port and an any-port service on one VIP, with different
/// timeouts: the longer one records), a consistent-hash UDP service, and draining backends.
pub fn affinity_draining() -> Ruleset {
    let mut web = svc(
        "web",
        "10.96.0.10",
        Protocol::Tcp,
        80,
        8080,
        &["10.0.1.1", "10.0.1.2", "10.0.1.3"],
    );
    web.affinity = Some(600);
    web.draining = vec![ip("10.0.1.3")];
    let mut all = svc("web", "10.96.0.10", Protocol::Tcp, 0, 0, &["10.0.1.1"]);
    all.affinity = Some(10_800);
    let mut dns = svc("dns", "10.96.0.20", Protocol::Udp, 53, 53, &["10.0.1.7"]);
    dns.draining = vec![ip("10.0.1.7")];
    Ruleset {
        table: TABLE.to_string(),
        vips: vec![],
        services: vec![web, all, dns],
        local_endpoints: vec![],
    }
}

/// The named fixtures, for tests that run all of them.
pub fn all() -> Vec<(&'static str, Ruleset)> {
    vec![
        ("one_service", one_service()),
        ("zero_backends", zero_backends()),
        ("several", several()),
        ("hairpin", hairpin()),
        ("any_port", any_port()),
        ("affinity_draining", affinity_draining()),
    ]
}

/// `services` TCP services VIP:80 -> :8080 with `backends` backends each; VIPs from
/// `10.<vip_net>.0.0`, backends from 10.128.0.0.
pub fn many(services: u32, backends: u32, vip_net: u8) -> Ruleset {
    let vip_base = u32::from(Ipv4Addr::new(10, vip_net, 0, 0));
    let be_base = u32::from(Ipv4Addr::new(10, 128, 0, 0));
    Ruleset {
        table: TABLE.to_string(),
        vips: vec![],
        services: (0..services)
            .map(|s| VirtualService {
                id: format!("s{s}"),
                vip: Ipv4Addr::from(vip_base + s),
                protocol: Protocol::Tcp,
                port: 80,
                target_port: 8080,
                backends: (0..backends)
                    .map(|b| Ipv4Addr::from(be_base + s * backends + b))
                    .collect(),
                ..Default::default()
            })
            .collect(),
        local_endpoints: vec![],
    }
}
