//! Kernel tests of the network programmer. They need root (namespaces, veths) and must run:
//! a machine without root fails them loudly instead of skipping. Every namespace is made by
//! the test (`shoal-t-mesh-<pid>-<n>`) and deleted by a guard, also when the test panics;
//! all traffic stays inside those namespaces.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use shoal_mesh::{
    Applied, EndpointSpec, NetworkSpec, apply_network, observe_network, remove_network,
};

static SEQ: AtomicU32 = AtomicU32::new(0);

fn require_root() {
    assert!(
        nix_is_root(),
        "the shoal-mesh kernel tests must run as root (they create namespaces and veths)"
    );
}

fn nix_is_root() -> bool {
    // The effective uid, from /proc (no libc call needed).
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// Owns the test's namespaces; deletes them all on drop (panics included).
struct Namespaces(Vec<String>);

impl Namespaces {
    fn new() -> Self {
        require_root();
        Namespaces(Vec::new())
    }

    /// A unique name, registered for deletion, not created.
    fn name(&mut self) -> String {
        let n = format!(
            "shoal-t-mesh-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        self.0.push(n.clone());
        n
    }

    /// A created namespace (a "task").
    fn task(&mut self) -> String {
        let n = self.name();
        shoal_netns::create(&n).expect("create task namespace");
        n
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for n in &self.0 {
            if let Err(e) = shoal_netns::delete(n) {
                eprintln!("cleanup of {n} failed: {e}");
            }
        }
    }
}

fn ip4(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn mac(last: u8) -> [u8; 6] {
    [0x02, 0x42, 0x0a, 0x4d, 0x01, last]
}

fn endpoint(task: &str, host: &str, ifname: &str, ip: &str, default_route: bool) -> EndpointSpec {
    let ip = ip4(ip);
    EndpointSpec {
        task_netns: task.to_string(),
        host_ifname: host.to_string(),
        ifname: ifname.to_string(),
        ip,
        mac: mac(ip.octets()[3]),
        default_route,
    }
}

fn network(netns: &str, third: u8, vips: &[&str], endpoints: Vec<EndpointSpec>) -> NetworkSpec {
    NetworkSpec {
        netns: netns.to_string(),
        subnet: format!("10.77.{third}.0/24").parse().unwrap(),
        gateway: ip4(&format!("10.77.{third}.1")),
        vips: vips.iter().map(|v| ip4(v)).collect(),
        mtu: 1450,
        endpoints,
        vxlan: None,
        egress: None,
    }
}

/// `ip -n NS ARGS…`, stdout; panics with stderr on failure.
fn ip(ns: &str, args: &[&str]) -> String {
    let out = Command::new("ip")
        .arg("-n")
        .arg(ns)
        .args(args)
        .output()
        .expect("run ip");
    assert!(
        out.status.success(),
        "ip -n {ns} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn has_link(ns: &str, name: &str) -> bool {
    ip(ns, &["-o", "link", "show"]).lines().any(|l| {
        l.split(':')
            .nth(1)
            .map(|n| n.trim().split('@').next() == Some(name))
            == Some(true)
    })
}

/// A one-shot TCP server inside `ns` on ip:port that sends `greeting` to its first client.
fn serve_once(ns: &str, ip: Ipv4Addr, port: u16, greeting: &'static str) -> JoinHandle<()> {
    let listener = shoal_netns::run_in(ns, move || TcpListener::bind((ip, port)))
        .unwrap()
        .unwrap_or_else(|e| panic!("bind {ip}:{port} in {ns}: {e}"));
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match listener.accept() {
                Ok((mut s, _)) => {
                    s.set_nonblocking(false).unwrap();
                    s.write_all(greeting.as_bytes()).unwrap();
                    return;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("accept: {e}"),
            }
        }
    })
}

/// Connects from inside `ns` and returns what the server said.
fn fetch(ns: &str, ip: Ipv4Addr, port: u16) -> std::io::Result<String> {
    shoal_netns::run_in(ns, move || {
        let addr = SocketAddr::from((ip, port));
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        let mut buf = String::new();
        s.read_to_string(&mut buf)?;
        Ok(buf)
    })
    .unwrap()
}

fn assert_reaches(from: &str, server_ns: &str, ip: Ipv4Addr, port: u16) {
    let srv = serve_once(server_ns, ip, port, "hello");
    let got = fetch(from, ip, port).unwrap_or_else(|e| panic!("{from} -> {ip}:{port}: {e}"));
    assert_eq!(got, "hello", "{from} -> {ip}:{port}");
    srv.join().unwrap();
}

/// Everything the kernel shows for a namespace, in text (IPv4 only: IPv6 DAD flags change
/// over time on their own).
fn snapshot(ns: &str) -> String {
    [
        ip(ns, &["-d", "link", "show"]),
        ip(ns, &["-4", "addr", "show"]),
        ip(ns, &["-4", "route", "show", "table", "all"]),
    ]
    .join("\n")
}

fn empty() -> Applied {
    Applied::default()
}

#[tokio::test]
async fn two_tasks_reach_each_other_the_gateway_and_a_vip() {
    let mut ns = Namespaces::new();
    let net = ns.name();
    let (a, b) = (ns.task(), ns.task());
    let spec = network(
        &net,
        1,
        &["10.77.1.200"],
        vec![
            endpoint(&a, "sv0000000000a1", "eth0", "10.77.1.2", true),
            endpoint(&b, "sv0000000000b1", "eth0", "10.77.1.3", true),
        ],
    );
    let applied = apply_network(&spec).await.unwrap();
    eprintln!("first apply: {applied:#?}");
    assert!(
        applied.created.contains(&format!("namespace {net}")),
        "{applied:?}"
    );
    assert!(
        applied
            .created
            .contains(&"endpoint sv0000000000a1".to_string())
    );
    assert!(applied.created.contains(&"vip 10.77.1.200".to_string()));
    assert!(applied.removed.is_empty(), "{applied:?}");

    // Container side as specified.
    let link = ip(&a, &["link", "show", "eth0"]);
    assert!(link.contains("mtu 1450"), "{link}");
    assert!(link.contains("02:42:0a:4d:01:02"), "{link}");
    assert!(ip(&a, &["-4", "addr", "show", "eth0"]).contains("10.77.1.2/24"));
    let routes = ip(&a, &["-4", "route", "show"]);
    assert!(
        routes.contains("default via 10.77.1.1 dev eth0"),
        "{routes}"
    );
    assert!(routes.contains("10.77.1.0/24 dev eth0"), "{routes}");
    // Network side.
    assert_eq!(
        shoal_netns::get_sysctl(&net, "net.ipv4.ip_forward").unwrap(),
        "1"
    );
    assert_eq!(
        shoal_netns::get_sysctl(&net, "net/ipv4/conf/sv0000000000a1/proxy_arp").unwrap(),
        "1"
    );
    assert_eq!(
        shoal_netns::get_sysctl(&net, "net/ipv4/neigh/sv0000000000a1/proxy_delay").unwrap(),
        "0"
    );
    assert!(ip(&net, &["-4", "addr", "show", "lo"]).contains("10.77.1.1/32"));
    assert!(ip(&net, &["route", "show", "table", "local"]).contains("local 10.77.1.200 dev lo"));

    // Traffic both ways between the tasks, to the gateway, to the VIP.
    assert_reaches(&b, &a, ip4("10.77.1.2"), 8080);
    assert_reaches(&a, &b, ip4("10.77.1.3"), 8080);
    assert_reaches(&a, &net, ip4("10.77.1.1"), 8081);
    assert_reaches(&b, &net, ip4("10.77.1.200"), 8082);
    // The VIP was resolved by ARP in the task (answered with the node side's MAC).
    let neigh = ip(&b, &["neigh", "show", "10.77.1.200"]);
    assert!(
        neigh.contains("lladdr"),
        "no ARP entry for the VIP: {neigh:?}"
    );

    let seen = observe_network(&net).await.unwrap().unwrap();
    assert_eq!(seen.gateway, Some(ip4("10.77.1.1")));
    assert_eq!(seen.vips, vec![ip4("10.77.1.200")]);
    assert_eq!(seen.endpoints.len(), 2);
    assert_eq!(seen.endpoints[0].host_ifname, "sv0000000000a1");
    assert_eq!(seen.endpoints[0].ip, Some(ip4("10.77.1.2")));
    assert_eq!(seen.endpoints[0].task_netns.as_deref(), Some(a.as_str()));
    assert_eq!(seen.endpoints[0].ifname.as_deref(), Some("eth0"));
    assert!(seen.endpoints[0].up);
    assert_eq!(seen.endpoints[1].ip, Some(ip4("10.77.1.3")));
}

#[tokio::test]
async fn second_apply_changes_nothing() {
    let mut ns = Namespaces::new();
    let net = ns.name();
    let (a, b) = (ns.task(), ns.task());
    let spec = network(
        &net,
        2,
        &["10.77.2.100", "10.77.2.101"],
        vec![
            endpoint(&a, "sv0000000000a2", "eth0", "10.77.2.2", true),
            endpoint(&b, "sv0000000000b2", "eth0", "10.77.2.3", true),
        ],
    );
    assert!(!apply_network(&spec).await.unwrap().is_empty());
    assert_reaches(&a, &b, ip4("10.77.2.3"), 9000);
    // Let link-watch settle operstates before taking the reference.
    std::thread::sleep(Duration::from_millis(1200));
    let before: Vec<String> = [&net, &a, &b].iter().map(|n| snapshot(n)).collect();
    assert_eq!(apply_network(&spec).await.unwrap(), empty());
    assert_eq!(apply_network(&spec).await.unwrap(), empty());
    let after: Vec<String> = [&net, &a, &b].iter().map(|n| snapshot(n)).collect();
    for (x, y) in before.iter().zip(&after) {
        assert_eq!(x, y);
    }
}

#[tokio::test]
async fn removing_an_endpoint_deletes_both_sides() {
    let mut ns = Namespaces::new();
    let net = ns.name();
    let (a, b) = (ns.task(), ns.task());
    let ea = endpoint(&a, "sv0000000000a3", "eth0", "10.77.3.2", true);
    let eb = endpoint(&b, "sv0000000000b3", "eth0", "10.77.3.3", true);
    apply_network(&network(&net, 3, &[], vec![ea.clone(), eb]))
        .await
        .unwrap();
    assert!(has_link(&b, "eth0"));
    let applied = apply_network(&network(&net, 3, &[], vec![ea]))
        .await
        .unwrap();
    assert_eq!(
        applied,
        Applied {
            created: vec![],
            removed: vec!["endpoint sv0000000000b3".into()],
        }
    );
    assert!(!has_link(&net, "sv0000000000b3"));
    assert!(
        !has_link(&b, "eth0"),
        "task's eth0 must go with the node side"
    );
    assert!(has_link(&net, "sv0000000000a3"));
    assert!(!ip(&net, &["-4", "route", "show"]).contains("10.77.3.3"));
    assert_reaches(&a, &net, ip4("10.77.3.1"), 9001);
}

#[tokio::test]
async fn stale_vip_removed_and_foreign_routes_kept() {
    let mut ns = Namespaces::new();
    let net = ns.name();
    let a = ns.task();
    let ea = endpoint(&a, "sv0000000000a4", "eth0", "10.77.4.2", true);
    apply_network(&network(
        &net,
        4,
        &["10.77.4.100", "10.77.4.101"],
        vec![ea.clone()],
    ))
    .await
    .unwrap();
    // Someone else's local route and veth-like names we must not touch.
    ip(
        &net,
        &[
            "route",
            "add",
            "local",
            "10.77.4.150/32",
            "dev",
            "lo",
            "table",
            "local",
        ],
    );
    ip(
        &net,
        &[
            "link", "add", "other0", "type", "veth", "peer", "name", "other1",
        ],
    );
    let applied = apply_network(&network(&net, 4, &["10.77.4.100"], vec![ea]))
        .await
        .unwrap();
    assert_eq!(
        applied,
        Applied {
            created: vec![],
            removed: vec!["vip 10.77.4.101".into()],
        }
    );
    let local = ip(&net, &["route", "show", "table", "local"]);
    assert!(local.contains("local 10.77.4.100 dev lo"), "{local}");
    assert!(!local.contains("10.77.4.101"), "{local}");
    assert!(
        local.contains("local 10.77.4.150 dev lo"),
        "foreign route deleted: {local}"
    );
    assert!(has_link(&net, "other0"));
    let seen = observe_network(&net).await.unwrap().unwrap();
    assert_eq!(seen.vips, vec![ip4("10.77.4.100")]);
    // The remaining VIP still answers; the removed one does not.
    assert_reaches(&a, &net, ip4("10.77.4.100"), 9002);
    let _ = shoal_netns::run_in(&net, || TcpListener::bind((ip4("10.77.4.101"), 9003)))
        .unwrap()
        .expect_err("a removed VIP is no longer a local address");
}

#[tokio::test]
async fn remove_network_deletes_the_namespace() {
    let mut ns = Namespaces::new();
    let net = ns.name();
    let a = ns.task();
    apply_network(&network(
        &net,
        5,
        &["10.77.5.100"],
        vec![endpoint(&a, "sv0000000000a5", "eth0", "10.77.5.2", true)],
    ))
    .await
    .unwrap();
    assert!(shoal_netns::exists(&net));
    remove_network(&net).await.unwrap();
    assert!(!shoal_netns::exists(&net));
    assert!(
        !has_link(&a, "eth0"),
        "task's interface must go with the network"
    );
    assert!(ip(&a, &["-4", "route", "show"]).trim().is_empty());
    assert_eq!(observe_network(&net).await.unwrap(), None);
    remove_network(&net).await.unwrap();
}

#[tokio::test]
async fn task_on_two_networks_has_eth0_eth1_and_one_default_route() {
    let mut ns = Namespaces::new();
    let (n1, n2) = (ns.name(), ns.name());
    let t = ns.task();
    apply_network(&network(
        &n1,
        6,
        &[],
        vec![endpoint(&t, "sv0000000000a6", "eth0", "10.77.6.2", true)],
    ))
    .await
    .unwrap();
    apply_network(&network(
        &n2,
        7,
        &["10.77.7.100"],
        vec![endpoint(&t, "sv0000000000b7", "eth1", "10.77.7.2", false)],
    ))
    .await
    .unwrap();
    assert!(has_link(&t, "eth0") && has_link(&t, "eth1"));
    assert!(ip(&t, &["-4", "addr", "show", "eth1"]).contains("10.77.7.2/24"));
    let defaults = ip(&t, &["-4", "route", "show", "default"]);
    assert_eq!(defaults.lines().count(), 1, "{defaults}");
    assert!(defaults.contains("via 10.77.6.1 dev eth0"), "{defaults}");
    assert_reaches(&t, &n1, ip4("10.77.6.1"), 9004);
    assert_reaches(&t, &n2, ip4("10.77.7.100"), 9005);

    // The default route moves to the network that asks for it (a task that publishes ports
    // defaults to the ingress network): replaced, never two.
    let applied = apply_network(&network(
        &n2,
        7,
        &["10.77.7.100"],
        vec![endpoint(&t, "sv0000000000b7", "eth1", "10.77.7.2", true)],
    ))
    .await
    .unwrap();
    assert!(
        applied
            .created
            .iter()
            .any(|c| c.contains("default via 10.77.7.1 dev eth1")),
        "{applied:?}"
    );
    let defaults = ip(&t, &["-4", "route", "show", "default"]);
    assert_eq!(defaults.lines().count(), 1, "{defaults}");
    assert!(defaults.contains("via 10.77.7.1 dev eth1"), "{defaults}");
    // eth0's network no longer asks for it: nothing to remove, still one default.
    apply_network(&network(
        &n1,
        6,
        &[],
        vec![endpoint(&t, "sv0000000000a6", "eth0", "10.77.6.2", false)],
    ))
    .await
    .unwrap();
    let defaults = ip(&t, &["-4", "route", "show", "default"]);
    assert_eq!(defaults.lines().count(), 1, "{defaults}");
    assert!(defaults.contains("via 10.77.7.1 dev eth1"), "{defaults}");
}

#[tokio::test]
async fn changed_address_and_mac_are_fixed_in_place() {
    let mut ns = Namespaces::new();
    let net = ns.name();
    let (a, b) = (ns.task(), ns.task());
    let eb = endpoint(&b, "sv0000000000b8", "eth0", "10.77.8.3", true);
    let mut ea = endpoint(&a, "sv0000000000a8", "eth0", "10.77.8.2", true);
    apply_network(&network(&net, 8, &[], vec![ea.clone(), eb.clone()]))
        .await
        .unwrap();
    ea.ip = ip4("10.77.8.9");
    ea.mac = mac(0x99);
    let applied = apply_network(&network(&net, 8, &[], vec![ea.clone(), eb.clone()]))
        .await
        .unwrap();
    eprintln!("fix apply: {applied:#?}");
    assert!(!applied.is_empty());
    assert!(
        !applied
            .created
            .iter()
            .any(|c| c == "endpoint sv0000000000a8"),
        "fixed in place, not recreated: {applied:?}"
    );
    assert!(
        applied.removed.contains(&"route 10.77.8.2/32".to_string()),
        "{applied:?}"
    );
    let addrs = ip(&a, &["-4", "addr", "show", "eth0"]);
    assert!(
        addrs.contains("10.77.8.9/24") && !addrs.contains("10.77.8.2/"),
        "{addrs}"
    );
    assert!(ip(&a, &["link", "show", "eth0"]).contains("02:42:0a:4d:01:99"));
    assert!(ip(&a, &["-4", "route", "show", "default"]).contains("via 10.77.8.1 dev eth0"));
    let routes = ip(&net, &["-4", "route", "show"]);
    assert!(routes.contains("10.77.8.9 dev sv0000000000a8") && !routes.contains("10.77.8.2 "));
    assert_reaches(&b, &a, ip4("10.77.8.9"), 9006);
    assert_eq!(
        apply_network(&network(&net, 8, &[], vec![ea, eb]))
            .await
            .unwrap(),
        empty()
    );
}

#[tokio::test]
async fn endpoint_moved_to_another_task_is_recreated() {
    let mut ns = Namespaces::new();
    let net = ns.name();
    let (a, c) = (ns.task(), ns.task());
    apply_network(&network(
        &net,
        9,
        &[],
        vec![endpoint(&a, "sv0000000000a9", "eth0", "10.77.9.2", true)],
    ))
    .await
    .unwrap();
    // Same node-side name, other task: the old pair goes, a new one is made.
    let applied = apply_network(&network(
        &net,
        9,
        &[],
        vec![endpoint(&c, "sv0000000000a9", "eth0", "10.77.9.2", true)],
    ))
    .await
    .unwrap();
    assert_eq!(applied.created, vec!["endpoint sv0000000000a9".to_string()]);
    assert_eq!(applied.removed.len(), 1, "{applied:?}");
    assert!(!has_link(&a, "eth0"));
    assert!(has_link(&c, "eth0"));
    assert_reaches(&c, &net, ip4("10.77.9.1"), 9007);
}

#[tokio::test]
async fn missing_task_namespaces_are_reported_and_the_others_still_converge() {
    let mut ns = Namespaces::new();
    let net = ns.name();
    let good = ns.task();
    let (ghost1, ghost2) = (ns.name(), ns.name()); // never created
    let spec = network(
        &net,
        10,
        &[],
        vec![
            endpoint(&ghost1, "sv0000000000aa", "eth0", "10.77.10.2", true),
            endpoint(&good, "sv0000000000ab", "eth0", "10.77.10.3", true),
            endpoint(&ghost2, "sv0000000000ac", "eth0", "10.77.10.4", true),
        ],
    );
    let err = apply_network(&spec).await.unwrap_err();
    let msg = err.to_string();
    eprintln!("expected error: {msg}");
    assert!(
        matches!(err, shoal_mesh::MeshError::Several { ref errors, .. } if errors.len() == 2),
        "{err:?}"
    );
    for part in [
        "sv0000000000aa",
        &ghost1,
        "sv0000000000ac",
        &ghost2,
        "does not exist",
    ] {
        assert!(msg.contains(part), "{part} missing from {msg}");
    }
    assert_reaches(&good, &net, ip4("10.77.10.1"), 9008);

    // A single failure comes back as that endpoint's error, cause kept.
    let spec = network(
        &net,
        10,
        &[],
        vec![endpoint(
            &ghost1,
            "sv0000000000aa",
            "eth0",
            "10.77.10.2",
            true,
        )],
    );
    let err = apply_network(&spec).await.unwrap_err();
    assert!(
        matches!(err, shoal_mesh::MeshError::Endpoint { ref host_ifname, .. } if host_ifname == "sv0000000000aa"),
        "{err:?}"
    );
    assert!(
        std::error::Error::source(&err).is_some(),
        "cause kept: {err:?}"
    );
    assert!(err.to_string().contains(&ghost1), "{err}");
    // ... and the endpoint that left the spec was removed all the same.
    assert!(!has_link(&net, "sv0000000000ab"));
    assert!(!has_link(&good, "eth0"));
}

#[tokio::test]
async fn gateway_and_mtu_changes_are_fixed_in_place() {
    let mut ns = Namespaces::new();
    let net = ns.name();
    let a = ns.task();
    let mut spec = network(
        &net,
        11,
        &[],
        vec![endpoint(&a, "sv0000000000ad", "eth0", "10.77.11.2", true)],
    );
    apply_network(&spec).await.unwrap();
    spec.gateway = ip4("10.77.11.254");
    spec.mtu = 1400;
    let applied = apply_network(&spec).await.unwrap();
    eprintln!("gateway/mtu apply: {applied:#?}");
    assert!(
        applied
            .removed
            .contains(&"address 10.77.11.1/32 on lo".to_string()),
        "{applied:?}"
    );
    assert!(
        applied
            .created
            .contains(&"address 10.77.11.254/32 on lo".to_string()),
        "{applied:?}"
    );
    assert!(
        !applied
            .created
            .contains(&"endpoint sv0000000000ad".to_string()),
        "{applied:?}"
    );
    let lo = ip(&net, &["-4", "addr", "show", "lo"]);
    assert!(
        lo.contains("10.77.11.254/32") && !lo.contains("10.77.11.1/"),
        "{lo}"
    );
    assert!(ip(&net, &["link", "show", "sv0000000000ad"]).contains("mtu 1400"));
    assert!(ip(&a, &["link", "show", "eth0"]).contains("mtu 1400"));
    let defaults = ip(&a, &["-4", "route", "show", "default"]);
    assert_eq!(
        defaults.trim(),
        "default via 10.77.11.254 dev eth0 proto 83",
        "{defaults}"
    );
    assert_reaches(&a, &net, ip4("10.77.11.254"), 9009);
    assert_eq!(apply_network(&spec).await.unwrap(), empty());
}

#[tokio::test]
async fn addresses_swapped_between_endpoints_converge_in_one_pass() {
    let mut ns = Namespaces::new();
    let net = ns.name();
    let (a, b) = (ns.task(), ns.task());
    let mut ea = endpoint(&a, "sv0000000000ae", "eth0", "10.77.12.2", true);
    let mut eb = endpoint(&b, "sv0000000000af", "eth0", "10.77.12.3", true);
    apply_network(&network(&net, 12, &[], vec![ea.clone(), eb.clone()]))
        .await
        .unwrap();
    std::mem::swap(&mut ea.ip, &mut eb.ip);
    let spec = network(&net, 12, &[], vec![ea, eb]);
    apply_network(&spec).await.unwrap();
    let routes = ip(&net, &["-4", "route", "show"]);
    assert!(routes.contains("10.77.12.3 dev sv0000000000ae"), "{routes}");
    assert!(routes.contains("10.77.12.2 dev sv0000000000af"), "{routes}");
    assert_eq!(routes.matches("dev sv").count(), 2, "{routes}");
    assert_reaches(&a, &b, ip4("10.77.12.2"), 9010);
    assert_reaches(&b, &a, ip4("10.77.12.3"), 9011);
    assert_eq!(apply_network(&spec).await.unwrap(), empty());
}

/// Kills and reaps a helper process on drop.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn task_namespace_given_as_a_proc_path() {
    use shoal_netns::CommandExt;
    let mut ns = Namespaces::new();
    let net = ns.name();
    let named = ns.task();
    // A "container" known only by its process: its namespace as /proc/PID/ns/net.
    let child = Child(
        Command::new("sleep")
            .arg("30")
            .in_netns(&named)
            .unwrap()
            .spawn()
            .unwrap(),
    );
    let task = format!("/proc/{}/ns/net", child.0.id());
    let spec = network(
        &net,
        13,
        &[],
        vec![endpoint(
            &task,
            "sv0000000000b0",
            "eth0",
            "10.77.13.2",
            true,
        )],
    );
    apply_network(&spec).await.unwrap();
    assert!(has_link(&named, "eth0"));
    assert_reaches(&task, &net, ip4("10.77.13.1"), 9012);
    let seen = observe_network(&net).await.unwrap().unwrap();
    assert_eq!(seen.endpoints[0].task_netns.as_deref(), Some(task.as_str()));
    assert_eq!(apply_network(&spec).await.unwrap(), empty());
}

#[tokio::test]
async fn drift_is_repaired() {
    let mut ns = Namespaces::new();
    let net = ns.name();
    let (a, b) = (ns.task(), ns.task());
    let spec = network(
        &net,
        14,
        &["10.77.14.100"],
        vec![
            endpoint(&a, "sv0000000000c1", "eth0", "10.77.14.2", true),
            endpoint(&b, "sv0000000000c2", "eth0", "10.77.14.3", true),
        ],
    );
    apply_network(&spec).await.unwrap();
    // Someone tampers with both sides.
    shoal_netns::set_sysctl(&net, "net/ipv4/conf/sv0000000000c1/proxy_arp", "0").unwrap();
    ip(&net, &["addr", "del", "10.77.14.1/32", "dev", "lo"]);
    ip(&net, &["route", "del", "10.77.14.3/32"]);
    ip(
        &net,
        &["route", "del", "local", "10.77.14.100/32", "table", "local"],
    );
    ip(&a, &["link", "set", "eth0", "down"]);
    ip(&b, &["route", "del", "default"]);
    let applied = apply_network(&spec).await.unwrap();
    eprintln!("repair apply: {applied:#?}");
    for want in [
        "address 10.77.14.1/32 on lo",
        "vip 10.77.14.100",
        "endpoint sv0000000000c1: sysctl net.ipv4.conf.sv0000000000c1.proxy_arp=1",
        "endpoint sv0000000000c1: eth0 up",
        "endpoint sv0000000000c2: route 10.77.14.3/32 dev sv0000000000c2",
        "endpoint sv0000000000c2: default via 10.77.14.1 dev eth0",
    ] {
        assert!(
            applied.created.iter().any(|c| c == want),
            "{want} not in {applied:#?}"
        );
    }
    assert!(applied.removed.is_empty(), "{applied:?}");
    assert_reaches(&a, &b, ip4("10.77.14.3"), 9013);
    assert_reaches(&b, &net, ip4("10.77.14.100"), 9014);
    assert_eq!(apply_network(&spec).await.unwrap(), empty());
}

/// The egress link: a task reaches its node namespace's own address (standing for the
/// outside, before any masquerade) over it; a second apply changes nothing; the
/// unreachable route keeps unknown subnet addresses from going out; egress None removes
/// the link on both sides and the route.
#[tokio::test]
async fn egress_link_to_the_node() {
    let mut ns = Namespaces::new();
    let net = ns.name();
    let node = ns.task();
    let a = ns.task();
    ip(&node, &["link", "set", "lo", "up"]);
    ip(&node, &["addr", "add", "198.51.100.1/32", "dev", "lo"]);
    let mut spec = network(
        &net,
        9,
        &[],
        vec![endpoint(&a, "sv0000000000a9", "eth0", "10.77.9.2", true)],
    );
    spec.egress = Some(shoal_mesh::egress::EgressSpec {
        node_netns: Some(node.clone()),
        node_link: "se-test9".into(),
    });
    assert!(!apply_network(&spec).await.unwrap().is_empty());
    assert!(has_link(&node, "se-test9"));
    assert!(has_link(&net, shoal_mesh::egress::NS_LINK));
    assert_reaches(&a, &node, ip4("198.51.100.1"), 9009);
    let routes = ip(&net, &["route", "show"]);
    assert!(routes.contains("unreachable 10.77.9.0/24"), "{routes}");
    assert!(
        routes.contains("default via 169.254.84.1 dev eg0"),
        "{routes}"
    );
    let node_routes = ip(&node, &["route", "show"]);
    assert!(
        node_routes.contains("10.77.9.0/24 via 169.254.84.2 dev se-test9"),
        "{node_routes}"
    );
    std::thread::sleep(Duration::from_millis(1200));
    let before: Vec<String> = [&net, &node, &a].iter().map(|n| snapshot(n)).collect();
    assert_eq!(apply_network(&spec).await.unwrap(), empty());
    let after: Vec<String> = [&net, &node, &a].iter().map(|n| snapshot(n)).collect();
    assert_eq!(before, after);
    // An address of the subnet without an endpoint is refused in the network namespace,
    // not sent to the node (which would route it straight back).
    let r = fetch(&a, ip4("10.77.9.77"), 9);
    assert!(r.is_err(), "{r:?}");

    spec.egress = None;
    let ap = apply_network(&spec).await.unwrap();
    assert!(!ap.removed.is_empty(), "{ap:?}");
    assert!(!has_link(&net, shoal_mesh::egress::NS_LINK));
    assert!(!has_link(&node, "se-test9"));
    assert!(!ip(&net, &["route", "show"]).contains("unreachable"));
    assert_eq!(apply_network(&spec).await.unwrap(), empty());
}
