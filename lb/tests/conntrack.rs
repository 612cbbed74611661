//! The conntrack client against this kernel, with real flows through the LB's own DNAT table.
//!
//! `removed_udp_backend_loses_its_flows`: client -> router (nft table from [`apply`]) -> two
//! backends, in fresh namespaces (see `common::netlab`). UDP clients on fixed source ports
//! keep talking to VIP:80 while its backend is replaced: conntrack keeps them on the removed
//! backend until [`delete_matching`] deletes exactly their entries; then their next packet
//! reaches the new backend. Cross-checked with the `conntrack` CLI when it is installed.
//!
//! Needs root, `nft` and conntrack with ctnetlink; without them it skips with the reason, and
//! FAILS under `SHOAL_REQUIRE_KERNEL_TESTS=1` (set by `make test`). Every namespace is removed
//! by a Drop guard, also on panic.

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::fixtures::TABLE;
use common::netlab::{CLIENT, Lab, TARGET_PORT, VIP, block_on, tcp_connect};
use shoal_lb::conntrack::{self, CtClient, CtEntry, CtError, CtFilter};
use shoal_lb::{Protocol, Ruleset, VirtualService, apply};
use shoal_netns::CommandExt as _;

const TIMEOUT: Duration = Duration::from_secs(2);
/// Source ports of the long-lived UDP clients of VIP:80.
const CLIENT_PORTS: [u16; 3] = [40001, 40002, 40003];
/// Source port of the UDP client of VIP:81 (same backend, other service port).
const OTHER_PORT_CLIENT: u16 = 40010;

fn required() -> bool {
    std::env::var_os("SHOAL_REQUIRE_KERNEL_TESTS").is_some()
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(2))
        == Some("0")
}

/// Why this machine cannot run the test, if it cannot.
fn missing() -> Option<String> {
    if !is_root() {
        return Some("needs root (it creates network namespaces)".into());
    }
    match Command::new("nft").arg("--version").output() {
        Ok(o) if o.status.success() => {}
        _ => return Some("needs `nft` (apt-get install -y nftables)".into()),
    }
    if !Path::new("/proc/sys/net/netfilter/nf_conntrack_max").exists() {
        return Some("this kernel has no conntrack (modprobe nf_conntrack)".into());
    }
    // Opening the socket talks to nobody; it fails without nfnetlink.
    if let Err(e) = CtClient::open() {
        return Some(format!("no ctnetlink: {e}"));
    }
    None
}

/// Skips (returns false) with the reason, or fails when the test must run.
fn can_run(test: &str) -> bool {
    match missing() {
        None => true,
        Some(why) => {
            assert!(!required(), "{test} must run but {why}");
            eprintln!("SKIP {test}: {why}");
            false
        }
    }
}

fn udp(id: &str, port: u16, backends: Vec<Ipv4Addr>) -> VirtualService {
    VirtualService {
        id: id.into(),
        vip: VIP,
        protocol: Protocol::Udp,
        port,
        target_port: TARGET_PORT,
        backends,
        ..Default::default()
    }
}

/// UDP VIP:80 -> `web`, UDP VIP:81 -> `other`, TCP VIP:80 -> `other`.
fn ruleset(web: Ipv4Addr, other: Ipv4Addr) -> Ruleset {
    Ruleset {
        table: TABLE.into(),
        vips: vec![VIP],
        services: vec![
            udp("web", 80, vec![web]),
            udp("more", 81, vec![other]),
            VirtualService {
                protocol: Protocol::Tcp,
                ..udp("web", 80, vec![other])
            },
        ],
        local_endpoints: vec![],
    }
}

/// A UDP socket in the client namespace, bound to `sport` and connected to VIP:`dport`.
fn client_socket(lab: &Lab, sport: u16, dport: u16) -> UdpSocket {
    shoal_netns::run_in(&lab.client, move || {
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, sport))?;
        s.connect(SocketAddrV4::new(VIP, dport))?;
        s.set_read_timeout(Some(TIMEOUT))?;
        Ok::<_, std::io::Error>(s)
    })
    .unwrap()
    .unwrap_or_else(|e| panic!("client socket :{sport}: {e}"))
}

/// One datagram there and back; returns the name of the backend that answered (checking it
/// saw the client's own address).
fn ask(s: &UdpSocket) -> String {
    let port = s.local_addr().unwrap().port();
    s.send(b"hello")
        .unwrap_or_else(|e| panic!("send from :{port}: {e}"));
    let mut buf = [0u8; 512];
    let n = s
        .recv(&mut buf)
        .unwrap_or_else(|e| panic!("answer to :{port}: {e}"));
    let answer = String::from_utf8_lossy(&buf[..n]).into_owned();
    let (name, peer) = answer
        .split_once(' ')
        .unwrap_or_else(|| panic!("bad answer {answer:?}"));
    assert_eq!(peer, CLIENT.to_string(), "no SNAT expected: {answer}");
    name.to_string()
}

/// The UDP entry of the client's flow from `sport` to VIP:`dport`, if any.
fn flow(entries: &[CtEntry], sport: u16, dport: u16) -> Option<CtEntry> {
    entries.iter().copied().find(|e| {
        e.protocol == Protocol::Udp
            && e.orig.src == CLIENT
            && e.orig.sport == sport
            && e.orig.dst == VIP
            && e.orig.dport == dport
    })
}

/// `conntrack -L -p udp` in the namespace, one flow per line; `None` when the CLI is not
/// installed.
fn cli_udp_flows(ns: &str) -> Option<Vec<String>> {
    let mut cmd = Command::new("conntrack");
    cmd.args(["-L", "-p", "udp"]).in_netns(ns).unwrap();
    match cmd.output() {
        Ok(o) => {
            assert!(
                o.status.success(),
                "conntrack -L: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            Some(
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .map(str::to_string)
                    .collect(),
            )
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => panic!("running conntrack: {e}"),
    }
}

/// Whether the CLI shows the flow from `sport` to VIP:80 answered by `backend`.
fn cli_has(lines: &[String], sport: u16, backend: Ipv4Addr) -> bool {
    let orig = format!("src={CLIENT} dst={VIP} sport={sport} dport=80 ");
    let reply = format!("src={backend} dst={CLIENT} sport={TARGET_PORT} dport={sport}");
    lines
        .iter()
        .any(|l| l.contains(&orig) && l.contains(&reply))
}

#[test]
fn removed_udp_backend_loses_its_flows() {
    if !can_run("removed_udp_backend_loses_its_flows") {
        return;
    }
    let lab = Lab::new(2);
    let (b1, b2) = (lab.backends[0].addr, lab.backends[1].addr);
    block_on(apply(&lab.router, &ruleset(b1, b1))).unwrap();

    // Long-lived flows: three UDP clients of VIP:80, one of VIP:81, one TCP connection to
    // VIP:80, all on b1.
    let clients: Vec<UdpSocket> = CLIENT_PORTS
        .iter()
        .map(|&p| client_socket(&lab, p, 80))
        .collect();
    let other_port = client_socket(&lab, OTHER_PORT_CLIENT, 81);
    for s in clients.iter().chain([&other_port]) {
        assert_eq!(ask(s), "b1");
    }
    let tcp = shoal_netns::run_in(&lab.client, || tcp_connect(VIP, 80, TIMEOUT))
        .unwrap()
        .unwrap();
    let mut tcp_reader = BufReader::new(tcp.try_clone().unwrap());
    let mut greeting = String::new();
    tcp_reader.read_line(&mut greeting).unwrap();
    assert!(greeting.starts_with("b1 "), "{greeting}");

    // The router's table as our client lists it: each flow DNATed to b1:8080.
    let before = conntrack::list(Some(&lab.router)).unwrap();
    for &p in &CLIENT_PORTS {
        let e = flow(&before, p, 80).unwrap_or_else(|| panic!("no entry for :{p} in {before:?}"));
        assert_eq!((e.reply.src, e.reply.sport), (b1, TARGET_PORT), "{e}");
        assert_eq!((e.reply.dst, e.reply.dport), (CLIENT, p), "{e}");
        assert_eq!(e.zone, 0);
        assert!(e.id.is_some(), "{e}");
    }
    let kept_udp = flow(&before, OTHER_PORT_CLIENT, 81).expect("entry of the VIP:81 flow");
    assert_eq!(kept_udp.reply.src, b1);
    let tcp_port = tcp.local_addr().unwrap().port();
    let kept_tcp = before
        .iter()
        .copied()
        .find(|e| e.protocol == Protocol::Tcp && e.orig.sport == tcp_port)
        .expect("entry of the TCP connection");
    assert_eq!((kept_tcp.orig.dst, kept_tcp.orig.dport), (VIP, 80));
    assert_eq!(kept_tcp.reply.src, b1);
    // `None` is the calling thread's namespace.
    let from_inside = shoal_netns::run_in(&lab.router, || conntrack::list(None))
        .unwrap()
        .unwrap();
    assert_eq!(
        from_inside.iter().collect::<BTreeSet<_>>(),
        before.iter().collect::<BTreeSet<_>>()
    );
    match cli_udp_flows(&lab.router) {
        Some(lines) => {
            for &p in &CLIENT_PORTS {
                assert!(
                    cli_has(&lines, p, b1),
                    ":{p} not in conntrack -L: {lines:#?}"
                );
            }
        }
        None => eprintln!("conntrack CLI not installed: cross-check skipped"),
    }

    // b1 leaves the UDP service. Conntrack keeps the existing flows on it: the problem.
    block_on(apply(&lab.router, &ruleset(b2, b1))).unwrap();
    for s in &clients {
        assert_eq!(
            ask(s),
            "b1",
            "the stale entry should still send this flow to b1"
        );
    }

    // Delete exactly the UDP VIP:80 flows answered by b1.
    let f = CtFilter::backend(Protocol::Udp, VIP, 80, b1);
    let current = conntrack::list(Some(&lab.router)).unwrap();
    let doomed: BTreeSet<CtEntry> = current.iter().copied().filter(|e| f.matches(e)).collect();
    assert_eq!(doomed.len(), CLIENT_PORTS.len(), "{doomed:?}");
    assert_eq!(
        conntrack::delete_matching(Some(&lab.router), &f).unwrap(),
        CLIENT_PORTS.len()
    );
    let after = conntrack::list(Some(&lab.router)).unwrap();
    let want: BTreeSet<CtEntry> = current
        .iter()
        .copied()
        .filter(|e| !doomed.contains(e))
        .collect();
    assert_eq!(after.iter().copied().collect::<BTreeSet<_>>(), want);
    assert!(after.contains(&kept_udp) && after.contains(&kept_tcp));
    if let Some(lines) = cli_udp_flows(&lab.router) {
        for &p in &CLIENT_PORTS {
            assert!(
                !cli_has(&lines, p, b1),
                ":{p} still in conntrack -L: {lines:#?}"
            );
        }
    }
    // Nothing left to delete; an entry that is already gone is not an error.
    assert_eq!(
        conntrack::delete_matching(Some(&lab.router), &f).unwrap(),
        0
    );
    let mut c = CtClient::open_in(&lab.router).unwrap();
    assert!(!c.delete(doomed.first().unwrap()).unwrap());

    // The same clients' next packets are new flows: the live backend answers.
    for s in &clients {
        assert_eq!(ask(s), "b2");
    }
    let now = c.list().unwrap();
    for &p in &CLIENT_PORTS {
        let e = flow(&now, p, 80).unwrap_or_else(|| panic!("no new entry for :{p}"));
        assert_eq!(e.reply.src, b2, "{e}");
    }
    if let Some(lines) = cli_udp_flows(&lab.router) {
        for &p in &CLIENT_PORTS {
            assert!(
                cli_has(&lines, p, b2),
                ":{p} not on b2 in conntrack -L: {lines:#?}"
            );
        }
    }
    // The flows that did not match are untouched: same backend, TCP connection alive.
    assert_eq!(ask(&other_port), "b1");
    let mut w = tcp;
    w.write_all(b"still there?\n").unwrap();
    let mut echo = String::new();
    tcp_reader.read_line(&mut echo).unwrap();
    assert_eq!(echo, "still there?\n");
}

#[test]
fn missing_namespace_is_a_netns_error() {
    let err = conntrack::list(Some("shoal-t-ct-no-such-namespace")).unwrap_err();
    assert!(
        matches!(err, CtError::Netns(shoal_netns::Error::NotFound(_))),
        "{err:?}"
    );
}
