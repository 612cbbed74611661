//! Kernel tests: real nft tables and real traffic in fresh network namespaces.
//!
//! They need root and `nft`, and FAIL (never skip) without them. Every namespace is named
//! `shoal-t-lb-<pid>-<n>` and deleted by a Drop guard, also on panic; the host's ruleset is
//! never touched.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader, ErrorKind, Write as _};
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::fixtures::{self, TABLE};
use common::netlab::{
    CLIENT, Lab, NsGuard, TARGET_PORT, VIP, add_local_vip, block_on, require_root_and_nft,
    tcp_connect, tcp_get, udp_get,
};
use shoal_lb::{
    LbError, Protocol, Ruleset, VirtualService, apply, check, delete_table, list_table, render,
};
use shoal_netns::CommandExt as _;

const REQUESTS: usize = 300;
const TIMEOUT: Duration = Duration::from_secs(2);

fn web(protocol: Protocol, backends: Vec<Ipv4Addr>) -> VirtualService {
    VirtualService {
        id: "web".into(),
        vip: VIP,
        protocol,
        port: 80,
        target_port: TARGET_PORT,
        backends,
        ..Default::default()
    }
}

fn ruleset(services: Vec<VirtualService>, local_endpoints: Vec<Ipv4Addr>) -> Ruleset {
    Ruleset {
        table: TABLE.into(),
        vips: vec![VIP],
        services,
        local_endpoints,
    }
}

/// Sends REQUESTS requests from the client and counts answers per backend; checks every
/// backend saw the client's own address (no SNAT).
fn spread(
    lab: &Lab,
    get: fn(Ipv4Addr, u16, Duration) -> std::io::Result<String>,
) -> BTreeMap<String, usize> {
    let answers = shoal_netns::run_in(&lab.client, move || {
        (0..REQUESTS)
            .map(|i| get(VIP, 80, TIMEOUT).unwrap_or_else(|e| panic!("request {i}: {e}")))
            .collect::<Vec<_>>()
    })
    .unwrap();
    let mut counts = BTreeMap::new();
    for a in answers {
        let (name, peer) = a
            .split_once(' ')
            .unwrap_or_else(|| panic!("bad answer {a:?}"));
        assert_eq!(
            peer,
            CLIENT.to_string(),
            "backend must see the client address"
        );
        *counts.entry(name.to_string()).or_insert(0) += 1;
    }
    counts
}

fn assert_balanced(counts: &BTreeMap<String, usize>) {
    assert_eq!(
        counts.len(),
        3,
        "all three backends must answer: {counts:?}"
    );
    assert_eq!(counts.values().sum::<usize>(), REQUESTS);
    for (name, n) in counts {
        assert!(
            *n <= REQUESTS / 2,
            "{name} got {n} of {REQUESTS}: {counts:?}"
        );
    }
}

#[test]
fn check_mode_accepts_every_rendered_fixture() {
    require_root_and_nft();
    let mut guard = NsGuard::default();
    let ns = guard.create();
    for (name, rs) in fixtures::all() {
        block_on(check(&ns, &rs)).unwrap_or_else(|e| panic!("{name}: {e}\n{}", render(&rs)));
    }
    // Check mode changes nothing.
    assert_eq!(block_on(list_table(&ns, TABLE)).unwrap(), None);
}

#[test]
fn tcp_is_spread_over_three_backends() {
    let lab = Lab::new(3);
    block_on(apply(
        &lab.router,
        &ruleset(vec![web(Protocol::Tcp, lab.backend_addrs())], vec![]),
    ))
    .unwrap();
    let counts = spread(&lab, tcp_get);
    eprintln!("tcp: {counts:?}");
    assert_balanced(&counts);

    // The namespace holding the table reaches the VIP too (nat output hook). Its source
    // address is the VIP itself (the kernel picks the destination of a local route), so the
    // reply comes back addressed to the VIP and must pass filter input.
    let answer = shoal_netns::run_in(&lab.router, || tcp_get(VIP, 80, TIMEOUT))
        .unwrap()
        .unwrap();
    let (name, peer) = answer.split_once(' ').unwrap();
    assert!(lab.backends.iter().any(|b| b.name == name), "{answer}");
    assert_eq!(peer, VIP.to_string());
}

#[test]
fn reapply_keeps_established_connections() {
    let lab = Lab::new(2);
    let rs = ruleset(vec![web(Protocol::Tcp, lab.backend_addrs())], vec![]);
    block_on(apply(&lab.router, &rs)).unwrap();
    let conn = shoal_netns::run_in(&lab.client, || tcp_connect(VIP, 80, TIMEOUT))
        .unwrap()
        .unwrap();
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut greeting = String::new();
    reader.read_line(&mut greeting).unwrap();
    let (name, _) = greeting.split_once(' ').unwrap();

    // Replace the table with a different one (the chosen backend removed, another service
    // added): the established flow keeps its conntrack NAT binding.
    let other = lab.backends.iter().find(|b| b.name != name).unwrap().addr;
    let mut changed = ruleset(vec![web(Protocol::Tcp, vec![other])], vec![]);
    changed.services.push(VirtualService {
        id: "more".into(),
        port: 81,
        ..web(Protocol::Tcp, vec![other])
    });
    block_on(apply(&lab.router, &changed)).unwrap();

    let mut w = conn;
    w.write_all(b"still there?\n").unwrap();
    let mut echo = String::new();
    reader.read_line(&mut echo).unwrap();
    assert_eq!(echo, "still there?\n");
    // New connections follow the new table.
    let answer = shoal_netns::run_in(&lab.client, || tcp_get(VIP, 80, TIMEOUT))
        .unwrap()
        .unwrap();
    assert!(!answer.starts_with(&format!("{name} ")), "{answer}");
}

#[test]
fn udp_is_spread_over_three_backends() {
    let lab = Lab::new(3);
    block_on(apply(
        &lab.router,
        &ruleset(vec![web(Protocol::Udp, lab.backend_addrs())], vec![]),
    ))
    .unwrap();
    let counts = spread(&lab, udp_get);
    eprintln!("udp: {counts:?}");
    assert_balanced(&counts);
}

#[test]
fn zero_backends_and_other_ports_reject_at_once() {
    let lab = Lab::new(1);
    let b1 = lab.backends[0].addr;
    let portless = Ipv4Addr::new(10, 96, 0, 11);
    add_local_vip(&lab.router, portless);
    let rs = Ruleset {
        table: TABLE.into(),
        vips: vec![VIP, portless],
        services: vec![
            web(Protocol::Tcp, vec![]),
            web(Protocol::Udp, vec![]),
            VirtualService {
                id: "other".into(),
                port: 81,
                ..web(Protocol::Tcp, vec![b1])
            },
        ],
        local_endpoints: vec![],
    };
    block_on(apply(&lab.router, &rs)).unwrap();
    shoal_netns::run_in(&lab.client, move || {
        // The backend is reachable through the VIP's other port: the path works.
        assert!(tcp_get(VIP, 81, TIMEOUT).unwrap().starts_with("b1 "));
        // TCP to a service without backends, to a non-service port, to a VIP without ports.
        for (dst, port) in [(VIP, 80), (VIP, 82), (portless, 80)] {
            let t = Instant::now();
            let err = tcp_get(dst, port, TIMEOUT).unwrap_err();
            assert_eq!(
                err.kind(),
                ErrorKind::ConnectionRefused,
                "tcp {dst}:{port}: {err}"
            );
            assert!(
                t.elapsed() < Duration::from_secs(1),
                "tcp {dst}:{port} took {:?}",
                t.elapsed()
            );
        }
        // UDP: ICMP port unreachable makes a connected socket's recv fail.
        for (dst, port) in [(VIP, 80), (VIP, 81), (portless, 53)] {
            let t = Instant::now();
            let err = udp_get(dst, port, TIMEOUT).unwrap_err();
            assert_eq!(
                err.kind(),
                ErrorKind::ConnectionRefused,
                "udp {dst}:{port}: {err}"
            );
            assert!(
                t.elapsed() < Duration::from_secs(1),
                "udp {dst}:{port} took {:?}",
                t.elapsed()
            );
        }
    })
    .unwrap();
}

#[test]
fn apply_is_idempotent_and_delete_is_too() {
    require_root_and_nft();
    let mut guard = NsGuard::default();
    let ns = guard.create();
    assert_eq!(block_on(list_table(&ns, TABLE)).unwrap(), None);
    let rs = fixtures::several();
    block_on(apply(&ns, &rs)).unwrap();
    let first = block_on(list_table(&ns, TABLE))
        .unwrap()
        .expect("table exists");
    block_on(apply(&ns, &rs)).unwrap();
    let second = block_on(list_table(&ns, TABLE))
        .unwrap()
        .expect("table exists");
    assert_eq!(first, second);
    for name in [
        "10.96.0.10 . tcp . 80 : goto rnd_tcp_2",
        "10.96.0.20 . 53 . 0 : 10.0.1.7 . 5353",
        "map services",
        "set hairpin",
    ] {
        assert!(first.contains(name), "{name} missing from:\n{first}");
    }
    // A changed ruleset replaces the table whole: nothing of the old one remains.
    block_on(apply(&ns, &fixtures::one_service())).unwrap();
    let third = block_on(list_table(&ns, TABLE)).unwrap().unwrap();
    assert!(!third.contains("10.96.0.20"), "{third}");
    assert!(
        third.contains("10.96.0.10 . tcp . 80 : goto rnd_tcp_3"),
        "{third}"
    );

    block_on(delete_table(&ns, TABLE)).unwrap();
    assert_eq!(block_on(list_table(&ns, TABLE)).unwrap(), None);
    block_on(delete_table(&ns, TABLE)).unwrap();
}

#[test]
fn invalid_ruleset_fails_with_nft_message_and_keeps_previous_table() {
    require_root_and_nft();
    let mut guard = NsGuard::default();
    let ns = guard.create();
    block_on(apply(&ns, &fixtures::one_service())).unwrap();
    let before = block_on(list_table(&ns, TABLE)).unwrap().unwrap();

    // A table name nft refuses (identifiers start with a letter).
    let bad = Ruleset {
        table: "9lb".into(),
        ..fixtures::several()
    };
    let err = block_on(apply(&ns, &bad)).unwrap_err();
    match &err {
        LbError::Nft {
            stderr,
            failing_line,
            ..
        } => {
            assert!(stderr.contains("syntax error"), "{stderr}");
            assert_eq!(failing_line.as_ref().map(|(n, _)| *n), Some(1), "{err}");
        }
        other => panic!("expected an nft error, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("syntax error") && msg.contains("table ip 9lb {}"),
        "{msg}"
    );
    assert_eq!(block_on(list_table(&ns, TABLE)).unwrap().unwrap(), before);

    // The rendered script is one transaction: a failure in its last rule (after the delete
    // and most of the new definition), refused by the kernel itself (dnat in a filter
    // chain), still leaves the old table as it was.
    let script = render(&fixtures::several()).replace(
        "ip daddr @vips reject with icmp type port-unreachable",
        "ip daddr @vips dnat ip to 10.0.0.1",
    );
    let mut cmd = Command::new("nft");
    cmd.args(["-f", "-"]).in_netns(&ns).unwrap();
    let mut child = cmd
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the broken script must fail");
    assert!(stderr.contains("Could not process rule"), "{stderr}");
    assert_eq!(block_on(list_table(&ns, TABLE)).unwrap().unwrap(), before);

    // Our own validation refuses what could escape the script.
    let inject = Ruleset {
        table: "t {}\nflush ruleset\n".into(),
        ..Ruleset::default()
    };
    assert!(matches!(
        block_on(apply(&ns, &inject)),
        Err(LbError::Invalid(_))
    ));
}

#[test]
fn hairpin_backend_reaches_itself_through_the_vip() {
    let lab = Lab::new(1);
    let b1 = &lab.backends[0];
    let (addr, gateway) = (b1.addr, b1.gateway);

    // Without the hairpin set the SYN comes back with source = own address: dropped.
    block_on(apply(
        &lab.router,
        &ruleset(vec![web(Protocol::Tcp, vec![addr])], vec![]),
    ))
    .unwrap();
    let without =
        shoal_netns::run_in(&b1.ns, || tcp_get(VIP, 80, Duration::from_millis(700))).unwrap();
    assert!(
        without.is_err(),
        "without masquerade hairpin should fail: {without:?}"
    );

    block_on(apply(
        &lab.router,
        &ruleset(vec![web(Protocol::Tcp, vec![addr])], vec![addr]),
    ))
    .unwrap();
    let answer = shoal_netns::run_in(&b1.ns, || tcp_get(VIP, 80, TIMEOUT))
        .unwrap()
        .expect("hairpin connection");
    // Masqueraded to the router's address on the backend's link.
    assert_eq!(answer, format!("b1 {gateway}"));

    // A client's connection to the same backend is not masqueraded.
    let answer = shoal_netns::run_in(&lab.client, || tcp_get(VIP, 80, TIMEOUT))
        .unwrap()
        .unwrap();
    assert_eq!(answer, format!("b1 {CLIENT}"));
}

#[test]
fn missing_namespace_is_a_netns_error() {
    let rs = fixtures::one_service();
    let err = block_on(apply("shoal-t-lb-no-such-namespace", &rs)).unwrap_err();
    assert!(
        matches!(err, LbError::Netns(shoal_netns::Error::NotFound(_))),
        "{err:?}"
    );
}
