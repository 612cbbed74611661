//! Kernel tests of incremental programming ([`Syncer`]): element updates equal a full
//! replace, adoption after a restart, fallback to a full replace, scale-down with open
//! connections, draining, consistent hashing across two "nodes", client-IP affinity.
//!
//! They need root and `nft`, and FAIL (never skip) without them. Namespaces are named
//! `shoal-t-lb-<pid>-<n>` and deleted by Drop guards, also on panic.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream, UdpSocket};
use std::time::Duration;

use common::fixtures::{self, TABLE};
use common::netlab::{
    CLIENT, Lab, NsGuard, TARGET_PORT, VIP, block_on, require_root_and_nft, tcp_connect, tcp_get,
};
use shoal_lb::{
    Applier, Protocol, Ruleset, Selection, SyncKind, Syncer, VirtualService, list_table,
};

const TIMEOUT: Duration = Duration::from_secs(2);

fn syncer() -> Syncer {
    Syncer::new(Applier::auto())
}

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

fn ruleset(services: Vec<VirtualService>) -> Ruleset {
    Ruleset {
        table: TABLE.into(),
        vips: vec![VIP],
        services,
        local_endpoints: vec![],
    }
}

fn listing(ns: &str) -> String {
    block_on(list_table(ns, TABLE))
        .unwrap()
        .expect("table exists")
}

/// nft lists a table's objects in creation order: compare sorted lines.
fn sorted_lines(text: &str) -> Vec<String> {
    let mut l: Vec<String> = text
        .lines()
        .map(|l| l.trim().trim_end_matches(',').to_string())
        .collect();
    l.sort();
    l
}

/// Name of the backend answering a greeting line ("b2 10.200.0.2").
fn name_of(answer: &str) -> String {
    answer.split_once(' ').unwrap().0.to_string()
}

/// A UDP "session": one socket, one source port, several request/answer exchanges.
struct UdpSession(UdpSocket);

impl UdpSession {
    fn open(ns: &str, sport: u16) -> UdpSession {
        let s = shoal_netns::run_in(ns, move || {
            UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, sport))
        })
        .unwrap()
        .unwrap();
        s.connect(SocketAddrV4::new(VIP, 80)).unwrap();
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        UdpSession(s)
    }

    fn ask(&self) -> std::io::Result<String> {
        self.0.send(b"hello")?;
        let mut buf = [0u8; 512];
        let n = self.0.recv(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    }
}

/// Pseudo-random but reproducible changes of a ruleset.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }
}

fn mutate(rs: &mut Ruleset, rng: &mut Lcg) {
    let be = |rng: &mut Lcg| Ipv4Addr::new(10, 1, rng.next(4) as u8, 1 + rng.next(20) as u8);
    match rng.next(8) {
        0 if rs.services.len() < 12 => {
            let port = 1 + rng.next(5) as u16;
            let vip = Ipv4Addr::new(10, 96, 0, 10 + rng.next(3) as u8);
            let protocol = if rng.next(2) == 0 {
                Protocol::Tcp
            } else {
                Protocol::Udp
            };
            if rs
                .services
                .iter()
                .any(|s| (s.vip, s.protocol, s.port) == (vip, protocol, port))
            {
                return;
            }
            let any = rng.next(4) == 0;
            rs.services.push(VirtualService {
                id: format!("s{}", rng.next(1000)),
                vip,
                protocol,
                port: if any { 0 } else { port },
                target_port: if any { 0 } else { 8000 + port },
                backends: (0..rng.next(4)).map(|_| be(rng)).collect(),
                ..Default::default()
            });
        }
        1 if !rs.services.is_empty() => {
            let i = rng.next(rs.services.len() as u64) as usize;
            rs.services.remove(i);
        }
        2 | 3 if !rs.services.is_empty() => {
            let i = rng.next(rs.services.len() as u64) as usize;
            let b = be(rng);
            rs.services[i].backends.push(b);
        }
        4 if !rs.services.is_empty() => {
            let i = rng.next(rs.services.len() as u64) as usize;
            rs.services[i].backends.pop();
        }
        5 if !rs.services.is_empty() => {
            let i = rng.next(rs.services.len() as u64) as usize;
            let s = &mut rs.services[i];
            s.selection = match s.selection {
                Selection::Random => Selection::Consistent,
                Selection::Consistent => Selection::Random,
            };
        }
        6 if !rs.services.is_empty() => {
            let i = rng.next(rs.services.len() as u64) as usize;
            let s = &mut rs.services[i];
            s.affinity = match s.affinity {
                None => Some([30, 600, 10_800][rng.next(3) as usize]),
                Some(_) => None,
            };
        }
        7 if !rs.services.is_empty() => {
            let i = rng.next(rs.services.len() as u64) as usize;
            let s = &mut rs.services[i];
            s.draining = s.backends.first().into_iter().copied().collect();
        }
        _ => {
            let e = Ipv4Addr::new(10, 1, 0, 1 + rng.next(20) as u8);
            if !rs.local_endpoints.contains(&e) {
                rs.local_endpoints.push(e);
            } else {
                rs.local_endpoints.retain(|x| *x != e);
            }
        }
    }
}

/// After any sequence of changes the incrementally updated table lists exactly like the
/// same ruleset applied whole in a fresh namespace.
#[test]
fn incremental_updates_equal_a_full_replace() {
    require_root_and_nft();
    let mut guard = NsGuard::default();
    let inc = guard.create();
    let full = guard.create();
    let mut s = syncer();
    let mut rs = fixtures::affinity_draining();
    let mut rng = Lcg(7);
    let first = block_on(s.sync(&inc, &rs)).unwrap();
    assert_eq!(first.kind, SyncKind::Full);
    let mut incremental = 0;
    for step in 0..60 {
        mutate(&mut rs, &mut rng);
        let r = block_on(s.sync(&inc, &rs)).unwrap_or_else(|e| panic!("step {step}: {e}"));
        assert_ne!(
            r.kind,
            SyncKind::Full,
            "step {step}: fell back to a full replace: {r:?}"
        );
        incremental += (r.kind == SyncKind::Incremental) as usize;
        if step % 10 == 9 {
            block_on(shoal_lb::apply(&full, &rs)).unwrap();
            assert_eq!(
                sorted_lines(&listing(&inc)),
                sorted_lines(&listing(&full)),
                "step {step}: ruleset {rs:#?}"
            );
        }
    }
    assert!(incremental > 30, "only {incremental} incremental updates");
}

/// A new syncer (an agent restart) adopts the table: no change when nothing changed, element
/// updates afterwards; open connections are untouched.
#[test]
fn restart_adopts_the_table_and_keeps_connections() {
    let lab = Lab::new(3);
    let rs = ruleset(vec![web(Protocol::Tcp, lab.backend_addrs())]);
    let r = block_on(syncer().sync(&lab.router, &rs)).unwrap();
    assert_eq!((r.kind, r.adopted), (SyncKind::Full, false));
    let before = listing(&lab.router);
    let conns: Vec<(TcpStream, BufReader<TcpStream>)> = (0..6)
        .map(|_| {
            let c = shoal_netns::run_in(&lab.client, || tcp_connect(VIP, 80, TIMEOUT))
                .unwrap()
                .unwrap();
            let mut r = BufReader::new(c.try_clone().unwrap());
            let mut greeting = String::new();
            r.read_line(&mut greeting).unwrap();
            (c, r)
        })
        .collect();

    let mut restarted = syncer();
    let r = block_on(restarted.sync(&lab.router, &rs)).unwrap();
    assert_eq!((r.kind, r.adopted), (SyncKind::Unchanged, true));
    assert_eq!(listing(&lab.router), before, "ruleset changed by a restart");
    for (i, (mut c, mut r)) in conns.into_iter().enumerate() {
        c.write_all(b"ping\n").unwrap();
        let mut echo = String::new();
        r.read_line(&mut echo)
            .unwrap_or_else(|e| panic!("connection {i} after restart: {e}"));
        assert_eq!(echo, "ping\n");
    }
    // The adopted table is updated in place.
    let fewer = ruleset(vec![web(Protocol::Tcp, lab.backend_addrs()[..2].to_vec())]);
    let r = block_on(restarted.sync(&lab.router, &fewer)).unwrap();
    assert_eq!(r.kind, SyncKind::Incremental);
}

/// A table changed behind the syncer's back makes the element update fail: the syncer
/// replaces the table whole, and the result is right.
#[test]
fn failed_update_falls_back_to_a_full_replace() {
    require_root_and_nft();
    let mut guard = NsGuard::default();
    let ns = guard.create();
    let mut s = syncer();
    let rs = fixtures::one_service();
    block_on(s.sync(&ns, &rs)).unwrap();
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns,
            "nft",
            "flush",
            "map",
            "ip",
            TABLE,
            "backends_tcp",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let mut fewer = rs.clone();
    fewer.services[0].backends.pop();
    let r = block_on(s.sync(&ns, &fewer)).unwrap();
    assert_eq!(r.kind, SyncKind::Full);
    let full = guard.create();
    block_on(shoal_lb::apply(&full, &fewer)).unwrap();
    assert_eq!(sorted_lines(&listing(&ns)), sorted_lines(&listing(&full)));
}

/// Scale 3 -> 2 with a long-lived TCP connection and a UDP session on the removed backend:
/// the TCP connection keeps working, no new connection reaches the removed backend, and the
/// UDP session's next packet is answered by a live backend.
#[test]
fn scale_down_keeps_tcp_and_moves_udp() {
    let lab = Lab::new(3);
    let all = lab.backend_addrs();
    let mut s = syncer();
    let rs = ruleset(vec![
        web(Protocol::Tcp, all.clone()),
        web(Protocol::Udp, all),
    ]);
    block_on(s.sync(&lab.router, &rs)).unwrap();

    let conn = shoal_netns::run_in(&lab.client, || tcp_connect(VIP, 80, TIMEOUT))
        .unwrap()
        .unwrap();
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut greeting = String::new();
    reader.read_line(&mut greeting).unwrap();
    let gone = name_of(&greeting);
    let gone_addr = lab.backends.iter().find(|b| b.name == gone).unwrap().addr;
    // A UDP session that landed on the same backend (each new source port is a new flow).
    let session = (40_000..40_200)
        .map(|p| UdpSession::open(&lab.client, p))
        .find(|u| name_of(&u.ask().unwrap()) == gone)
        .expect("some UDP session lands on the backend");

    let left: Vec<Ipv4Addr> = lab
        .backend_addrs()
        .into_iter()
        .filter(|a| *a != gone_addr)
        .collect();
    let smaller = ruleset(vec![
        web(Protocol::Tcp, left.clone()),
        web(Protocol::Udp, left),
    ]);
    let r = block_on(s.sync(&lab.router, &smaller)).unwrap();
    assert_eq!(r.kind, SyncKind::Incremental);
    assert!(
        r.removed.contains(&(VIP, Protocol::Udp, 80, gone_addr)),
        "{r:?}"
    );
    assert!(r.conntrack_deleted >= 1, "{r:?}");

    let mut w = conn;
    w.write_all(b"still there?\n").unwrap();
    let mut echo = String::new();
    reader.read_line(&mut echo).unwrap();
    assert_eq!(echo, "still there?\n", "long-lived TCP connection broken");
    for i in 0..60 {
        let a = shoal_netns::run_in(&lab.client, || tcp_get(VIP, 80, TIMEOUT))
            .unwrap()
            .unwrap();
        assert_ne!(
            name_of(&a),
            gone,
            "new connection {i} reached the removed backend"
        );
    }
    let next = session
        .ask()
        .expect("UDP session answered after scale-down");
    assert_ne!(
        name_of(&next),
        gone,
        "UDP session stuck on the removed backend"
    );
}

/// A draining backend keeps its established flows (TCP and UDP) and gets no new ones.
#[test]
fn draining_backend_keeps_flows_and_gets_no_new_ones() {
    let lab = Lab::new(2);
    let all = lab.backend_addrs();
    let mut s = syncer();
    block_on(s.sync(
        &lab.router,
        &ruleset(vec![
            web(Protocol::Tcp, all.clone()),
            web(Protocol::Udp, all.clone()),
        ]),
    ))
    .unwrap();
    let session = (41_000..41_200)
        .map(|p| UdpSession::open(&lab.client, p))
        .find(|u| name_of(&u.ask().unwrap()) == "b1")
        .expect("some UDP session lands on b1");
    let mut tcp = web(Protocol::Tcp, all.clone());
    let mut udp = web(Protocol::Udp, all);
    tcp.draining = vec![lab.backends[0].addr];
    udp.draining = vec![lab.backends[0].addr];
    let r = block_on(s.sync(&lab.router, &ruleset(vec![tcp, udp]))).unwrap();
    assert!(r.removed.is_empty(), "draining is not removal: {r:?}");
    assert_eq!(r.conntrack_deleted, 0);
    for _ in 0..3 {
        assert_eq!(name_of(&session.ask().unwrap()), "b1", "UDP flow moved off");
    }
    for i in 0..40 {
        let a = shoal_netns::run_in(&lab.client, || tcp_get(VIP, 80, TIMEOUT))
            .unwrap()
            .unwrap();
        assert_eq!(
            name_of(&a),
            "b2",
            "new connection {i} reached the draining backend"
        );
    }
}

/// Sends one UDP packet per source port from the client to VIP:80; the answering backend
/// per port.
fn flows(lab: &Lab, ports: std::ops::Range<u16>) -> BTreeMap<u16, String> {
    ports
        .map(|p| (p, name_of(&UdpSession::open(&lab.client, p).ask().unwrap())))
        .collect()
}

/// Two independent tables (two "nodes") with the same backends choose the same backend for
/// the same flow; with one backend removed, only that backend's flows go elsewhere.
#[test]
fn consistent_hash_agrees_across_nodes_and_moves_only_removed_flows() {
    let a = Lab::new(3);
    let b = Lab::new(3);
    let consistent = |backends: Vec<Ipv4Addr>| VirtualService {
        selection: Selection::Consistent,
        ..web(Protocol::Udp, backends)
    };
    let (mut sa, mut sb) = (syncer(), syncer());
    block_on(sa.sync(&a.router, &ruleset(vec![consistent(a.backend_addrs())]))).unwrap();
    block_on(sb.sync(&b.router, &ruleset(vec![consistent(b.backend_addrs())]))).unwrap();

    let on_a = flows(&a, 42_000..42_090);
    let on_b = flows(&b, 42_000..42_090);
    assert_eq!(on_a, on_b, "the two nodes disagree");
    let used: BTreeSet<&String> = on_a.values().collect();
    assert_eq!(
        used.len(),
        3,
        "90 flows should use all three backends: {on_a:?}"
    );

    // Fresh flows (new source ports, no conntrack entries yet): node A with 3 backends,
    // node B with b2 removed.
    let b2 = b.backends[1].addr;
    let left: Vec<Ipv4Addr> = b.backend_addrs().into_iter().filter(|x| *x != b2).collect();
    block_on(sb.sync(&b.router, &ruleset(vec![consistent(left)]))).unwrap();
    let three = flows(&a, 43_000..43_090);
    let two = flows(&b, 43_000..43_090);
    let mut moved = 0;
    for (port, before) in &three {
        let after = &two[port];
        if before == "b2" {
            assert_ne!(after, "b2");
            moved += 1;
        } else {
            assert_eq!(
                after, before,
                "flow from port {port} moved off a backend that stayed"
            );
        }
    }
    assert!(moved > 0, "no flow was on b2: {three:?}");
}

/// Client-IP affinity: every connection of the client goes to one backend; when that
/// backend leaves, its affinity entry goes too and the client sticks to a new one.
#[test]
fn affinity_pins_the_client_and_follows_removal() {
    let lab = Lab::new(3);
    let mut s = syncer();
    let svc = |backends: Vec<Ipv4Addr>| VirtualService {
        affinity: Some(600),
        ..web(Protocol::Tcp, backends)
    };
    block_on(s.sync(&lab.router, &ruleset(vec![svc(lab.backend_addrs())]))).unwrap();
    let names = |n: usize| -> BTreeSet<String> {
        (0..n)
            .map(|_| {
                let a = shoal_netns::run_in(&lab.client, || tcp_get(VIP, 80, TIMEOUT))
                    .unwrap()
                    .unwrap();
                assert!(a.ends_with(&format!(" {CLIENT}")), "{a}");
                name_of(&a)
            })
            .collect()
    };
    let first = names(20);
    assert_eq!(first.len(), 1, "affinity must pin the client: {first:?}");
    let pinned = first.into_iter().next().unwrap();
    let pinned_addr = lab.backends.iter().find(|b| b.name == pinned).unwrap().addr;
    let left: Vec<Ipv4Addr> = lab
        .backend_addrs()
        .into_iter()
        .filter(|a| *a != pinned_addr)
        .collect();
    let r = block_on(s.sync(&lab.router, &ruleset(vec![svc(left)]))).unwrap();
    assert_eq!(r.affinity_deleted, 1, "{r:?}");
    let second = names(20);
    assert_eq!(
        second.len(),
        1,
        "affinity must pin the client again: {second:?}"
    );
    assert!(!second.contains(&pinned), "{second:?}");
}

/// A TCP connection attempt from `port` (address reuse on, so the same source port again
/// and again): Ok once connected.
fn connect_from(port: u16) -> std::io::Result<()> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.bind(&SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port).into())?;
    s.connect_timeout(
        &SocketAddrV4::new(VIP, 80).into(),
        Duration::from_millis(500),
    )
}

/// A backend that leaves takes its unanswered TCP attempts with it: a client that reuses
/// the source port of an attempt that went to the gone backend (its conntrack entry would
/// live on for two minutes) reaches a live backend, not the gone one again.
#[test]
fn removed_backend_takes_its_unanswered_tcp_attempts() {
    require_root_and_nft();
    let lab = Lab::new(1);
    let live = lab.backend_addrs();
    // A backend address nothing answers for: the router sends it to b1, which drops it
    // (the attempt leaves the router, so its conntrack entry is confirmed, never replied).
    let dead: Ipv4Addr = "10.201.0.9".parse().unwrap();
    common::netlab::ip(&[
        "-n",
        &lab.router,
        "route",
        "add",
        &format!("{dead}/32"),
        "via",
        &lab.backends[0].addr.to_string(),
    ]);
    let mut s = syncer();
    let mut both = live.clone();
    both.push(dead);
    block_on(s.sync(&lab.router, &ruleset(vec![web(Protocol::Tcp, both)]))).unwrap();
    // A source port whose first attempt was sent to the dead backend: it keeps failing,
    // because the attempt's conntrack entry (and its NAT) stays.
    let port = shoal_netns::run_in(&lab.client, || {
        (42_000..42_100).find(|p| connect_from(*p).is_err())
    })
    .unwrap()
    .expect("some attempt goes to the dead backend");
    let again = shoal_netns::run_in(&lab.client, move || connect_from(port)).unwrap();
    assert!(
        again.is_err(),
        "the same source port is sent to the same backend"
    );
    // The dead backend leaves: its unanswered attempt is deleted with it.
    let r = block_on(s.sync(&lab.router, &ruleset(vec![web(Protocol::Tcp, live)]))).unwrap();
    assert!(r.removed.contains(&(VIP, Protocol::Tcp, 80, dead)), "{r:?}");
    assert!(r.conntrack_deleted >= 1, "{r:?}");
    let after = shoal_netns::run_in(&lab.client, move || connect_from(port)).unwrap();
    assert!(
        after.is_ok(),
        "source port {port} still sent to the gone backend: {after:?}"
    );
}

fn nft_in(ns: &str, args: &[&str]) {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", ns, "nft"])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "nft {args:?}: {out:?}");
}

/// Drift: a table someone flushed (`nft flush table`: every chain and map left, no rule) or
/// that lost one rule is not adopted as it is: the syncer's read-back (what the agent does
/// once the nf_tables generation moved) replaces it, and it equals a fresh table again.
#[test]
fn forgotten_namespace_repairs_a_flushed_or_edited_table() {
    require_root_and_nft();
    let mut guard = NsGuard::default();
    let ns = guard.create();
    let full = guard.create();
    let rs = fixtures::several();
    block_on(shoal_lb::apply(&full, &rs)).unwrap();
    let mut s = syncer();
    block_on(s.sync(&ns, &rs)).unwrap();
    let mut gens = shoal_lb::GenerationReader::new();
    let g0 = gens.read(&ns).unwrap();
    assert_eq!(
        gens.read(&ns).unwrap(),
        g0,
        "nothing changed, same generation"
    );
    let damage: [&[&str]; 3] = [
        &["flush", "table", "ip", TABLE],
        &["flush", "chain", "ip", TABLE, "input"],
        &["delete", "table", "ip", TABLE],
    ];
    for d in damage {
        let g = gens.read(&ns).unwrap();
        nft_in(&ns, d);
        assert_ne!(gens.read(&ns).unwrap(), g, "{d:?} moved the generation");
        // Without a read-back the syncer trusts its memory: nothing to do.
        let r = block_on(s.sync(&ns, &rs)).unwrap();
        assert_eq!(r.kind, SyncKind::Unchanged, "{d:?}");
        s.forget(&ns);
        let r = block_on(s.sync(&ns, &rs)).unwrap();
        assert_eq!(r.kind, SyncKind::Full, "{d:?}: replaced, not adopted");
        assert_eq!(
            sorted_lines(&listing(&ns)),
            sorted_lines(&listing(&full)),
            "after {d:?}"
        );
        // And an intact table is adopted without a write.
        s.forget(&ns);
        let g = gens.read(&ns).unwrap();
        let r = block_on(s.sync(&ns, &rs)).unwrap();
        assert_eq!((r.kind, r.adopted), (SyncKind::Unchanged, true), "{d:?}");
        assert_eq!(gens.read(&ns).unwrap(), g, "adoption wrote nothing");
    }
}

/// A namespace deleted and made again under the same name is read afresh (its own
/// generation), not through the old namespace's socket.
#[test]
fn generation_of_a_recreated_namespace_is_its_own() {
    require_root_and_nft();
    let mut guard = NsGuard::default();
    let ns = guard.create();
    let mut gens = shoal_lb::GenerationReader::new();
    for _ in 0..5 {
        nft_in(&ns, &["add", "table", "ip", "t"]);
        nft_in(&ns, &["delete", "table", "ip", "t"]);
    }
    let busy = gens.read(&ns).unwrap();
    let out = std::process::Command::new("ip")
        .args(["netns", "del", &ns])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(
        gens.read(&ns).is_err(),
        "a deleted namespace has no generation"
    );
    let out = std::process::Command::new("ip")
        .args(["netns", "add", &ns])
        .output()
        .unwrap();
    assert!(out.status.success());
    let fresh = gens.read(&ns).unwrap();
    assert!(
        fresh < busy,
        "fresh namespace {fresh} vs the old one's {busy}"
    );
}
