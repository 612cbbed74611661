//! Kernel tests of the VXLAN overlay across "nodes". They need root and must run: a machine
//! without root fails them loudly. Each test builds its own lab out of namespaces named
//! `shoal-t-vx-<pid>-<n>`: an underlay namespace with a bridge, node namespaces joined to it
//! by veths (`eth0`, 192.0.2.0/24), and per node a network namespace and task namespaces.
//! A guard deletes every namespace on drop, panics included; all traffic stays inside them.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use shoal_mesh::{
    Applied, EndpointSpec, NetworkSpec, RemoteEndpoint, VXLAN_IFNAME, VxlanSpec, apply_network,
    observe_network, remove_network,
};

static SEQ: AtomicU32 = AtomicU32::new(0);

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// Owns the test's namespaces; deletes them all on drop (panics included). Network
/// namespaces go first (their VXLAN devices hold sockets in the node namespaces).
struct Namespaces(Vec<String>);

impl Namespaces {
    fn new() -> Self {
        assert!(
            is_root(),
            "the shoal-mesh VXLAN tests must run as root (they create namespaces, veths, bridges)"
        );
        Namespaces(Vec::new())
    }

    /// A unique name, registered for deletion, not created.
    fn name(&mut self) -> String {
        let n = format!(
            "shoal-t-vx-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        self.0.push(n.clone());
        n
    }

    fn create(&mut self) -> String {
        let n = self.name();
        shoal_netns::create(&n).expect("create namespace");
        n
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for n in self.0.iter().rev() {
            if let Err(e) = shoal_netns::delete(n) {
                eprintln!("cleanup of {n} failed: {e}");
            }
        }
    }
}

/// `ip -n NS ARGS…` (or another iproute2 tool), stdout; panics with stderr on failure.
fn tool(cmd: &str, ns: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .arg("-n")
        .arg(ns)
        .args(args)
        .output()
        .expect("run iproute2");
    assert!(
        out.status.success(),
        "{cmd} -n {ns} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn ip(ns: &str, args: &[&str]) -> String {
    tool("ip", ns, args)
}

fn ip4(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

/// A file under /proc/net as the namespace sees it (thread-self: the thread that entered).
fn proc_net(ns: &str, file: &str) -> String {
    let path = format!("/proc/thread-self/net/{file}");
    shoal_netns::run_in(ns, move || std::fs::read_to_string(path))
        .unwrap()
        .unwrap()
}

/// (rx_bytes, tx_bytes) of a device, from /proc/net/dev.
fn dev_bytes(ns: &str, dev: &str) -> (u64, u64) {
    let text = proc_net(ns, "dev");
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with(&format!("{dev}:")))
        .unwrap_or_else(|| panic!("{dev} not in /proc/net/dev of {ns}"));
    let f: Vec<u64> = line
        .split_once(':')
        .unwrap()
        .1
        .split_whitespace()
        .map(|x| x.parse().unwrap())
        .collect();
    (f[0], f[8])
}

/// A counter of /proc/net/snmp, e.g. ("Udp", "InDatagrams").
fn snmp(ns: &str, group: &str, field: &str) -> u64 {
    let text = proc_net(ns, "snmp");
    let prefix = format!("{group}:");
    let mut lines = text.lines().filter(|l| l.starts_with(&prefix));
    let names: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    let values: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    let i = names.iter().position(|n| *n == field).unwrap();
    values[i].parse().unwrap()
}

/// Whether a UDP socket is bound to 0.0.0.0:4789 in the namespace.
fn has_vxlan_socket(ns: &str) -> bool {
    proc_net(ns, "udp").contains("00000000:12B5 ")
}

/// A one-shot TCP server inside `ns` that sends `size` bytes to its first client.
fn serve_once(ns: &str, ip: Ipv4Addr, port: u16, size: usize) -> JoinHandle<()> {
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
                    let _ = s.write_all(&vec![b'x'; size]);
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

/// Connects from inside `ns`; returns how many bytes the server sent.
fn fetch(ns: &str, ip: Ipv4Addr, port: u16, timeout: Duration) -> std::io::Result<usize> {
    shoal_netns::run_in(ns, move || {
        let addr = SocketAddr::from((ip, port));
        let mut s = TcpStream::connect_timeout(&addr, timeout)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf)?;
        Ok(buf.len())
    })
    .unwrap()
}

/// A TCP connection from `from` to a server in `server_ns` on ip:port moves `size` bytes.
fn assert_reaches(from: &str, server_ns: &str, ip: Ipv4Addr, port: u16, size: usize) {
    let srv = serve_once(server_ns, ip, port, size);
    let got = fetch(from, ip, port, Duration::from_secs(3))
        .unwrap_or_else(|e| panic!("{from} -> {ip}:{port}: {e}"));
    assert_eq!(got, size, "{from} -> {ip}:{port}");
    srv.join().unwrap();
}

fn vtep_mac(node_ip: Ipv4Addr) -> [u8; 6] {
    let o = node_ip.octets();
    [0x02, 0x56, o[0], o[1], o[2], o[3]]
}

/// Underlay namespace with bridge `br0`, and nodes attached to it.
struct Lab {
    ns: Namespaces,
    underlay: String,
    nodes: Vec<Node>,
}

#[derive(Clone)]
struct Node {
    ns: String,
    ip: Ipv4Addr,
}

impl Lab {
    fn new(n: usize) -> Lab {
        let mut ns = Namespaces::new();
        let underlay = ns.create();
        ip(&underlay, &["link", "add", "br0", "type", "bridge"]);
        ip(&underlay, &["link", "set", "br0", "up"]);
        let mut nodes = Vec::new();
        for i in 0..n {
            let node = ns.create();
            let port = format!("u{i}");
            let addr = format!("192.0.2.{}", i + 1);
            ip(
                &underlay,
                &[
                    "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &node,
                ],
            );
            ip(&underlay, &["link", "set", &port, "master", "br0", "up"]);
            ip(
                &node,
                &["addr", "add", &format!("{addr}/24"), "dev", "eth0"],
            );
            ip(&node, &["link", "set", "eth0", "up"]);
            ip(&node, &["link", "set", "lo", "up"]);
            nodes.push(Node {
                ns: node,
                ip: ip4(&addr),
            });
        }
        Lab {
            ns,
            underlay,
            nodes,
        }
    }
}

/// A container of a test network: where it runs and its address.
#[derive(Clone)]
struct Task {
    node: usize,
    ns: String,
    host_ifname: String,
    ip: Ipv4Addr,
}

/// One overlay network across the lab's nodes.
struct Net {
    third: u8,
    vni: u32,
    /// Network namespace per node.
    netns: Vec<String>,
    tasks: Vec<Task>,
}

impl Net {
    fn new(lab: &mut Lab, third: u8, vni: u32) -> Net {
        let netns = (0..lab.nodes.len()).map(|_| lab.ns.name()).collect();
        Net {
            third,
            vni,
            netns,
            tasks: Vec::new(),
        }
    }

    /// Adds a task on `node` with address 10.78.<third>.<last>; returns its namespace.
    fn task(&mut self, lab: &mut Lab, node: usize, last: u8) -> String {
        let ns = lab.ns.create();
        self.tasks.push(Task {
            node,
            ns: ns.clone(),
            host_ifname: format!("sv{:02x}{:02x}{last:02x}", self.third, node),
            ip: self.addr(last),
        });
        ns
    }

    fn addr(&self, last: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 78, self.third, last)
    }

    fn remote(lab: &Lab, t: &Task) -> RemoteEndpoint {
        let vtep = lab.nodes[t.node].ip;
        RemoteEndpoint {
            ip: t.ip,
            vtep,
            vtep_mac: vtep_mac(vtep),
        }
    }

    /// The spec of `node`, with every task of the other nodes (except those in `hidden`)
    /// as a remote endpoint.
    fn spec_without(&self, lab: &Lab, node: usize, hidden: &[Ipv4Addr]) -> NetworkSpec {
        let me = &lab.nodes[node];
        let endpoints = self
            .tasks
            .iter()
            .filter(|t| t.node == node)
            .map(|t| EndpointSpec {
                task_netns: t.ns.clone(),
                host_ifname: t.host_ifname.clone(),
                ifname: "eth0".into(),
                ip: t.ip,
                mac: [0x02, 0x42, 10, 78, self.third, t.ip.octets()[3]],
                default_route: true,
            })
            .collect();
        let remotes = self
            .tasks
            .iter()
            .filter(|t| t.node != node && !hidden.contains(&t.ip))
            .map(|t| Net::remote(lab, t))
            .collect();
        NetworkSpec {
            netns: self.netns[node].clone(),
            subnet: format!("10.78.{}.0/24", self.third).parse().unwrap(),
            gateway: self.addr(1),
            vips: vec![],
            mtu: 1450,
            endpoints,
            vxlan: Some(VxlanSpec {
                vni: self.vni,
                local: me.ip,
                underlay_netns: Some(me.ns.clone()),
                underlay_dev: "eth0".into(),
                port: 4789,
                mac: vtep_mac(me.ip),
                remotes,
                peers: vec![],
                extra_overhead: 0,
            }),
            egress: None,
        }
    }

    fn spec(&self, lab: &Lab, node: usize) -> NetworkSpec {
        self.spec_without(lab, node, &[])
    }

    async fn apply_all(&self, lab: &Lab) {
        for node in 0..lab.nodes.len() {
            let a = apply_network(&self.spec(lab, node))
                .await
                .unwrap_or_else(|e| panic!("apply on node {node}: {e}"));
            eprintln!("node {node} vni {}: {a:#?}", self.vni);
        }
    }
}

fn sorted<T: Ord>(v: impl IntoIterator<Item = T>) -> Vec<T> {
    v.into_iter().collect::<BTreeSet<_>>().into_iter().collect()
}

/// Checks the observed VXLAN entries of a network namespace against exactly these remotes.
async fn assert_entries(netns: &str, remotes: &[RemoteEndpoint]) {
    let seen = observe_network(netns).await.unwrap().unwrap();
    let vx = seen.vxlan.expect("vxlan device observed");
    assert_eq!(
        vx.fdb,
        sorted(remotes.iter().map(|r| (r.vtep_mac, r.vtep))),
        "fdb of {netns}"
    );
    assert_eq!(
        vx.neighbours,
        sorted(remotes.iter().map(|r| (r.ip, r.vtep_mac))),
        "neighbours of {netns}"
    );
    assert_eq!(
        vx.routes,
        sorted(remotes.iter().map(|r| r.ip)),
        "routes of {netns}"
    );
}

#[tokio::test]
async fn tasks_on_two_nodes_talk_over_vxlan() {
    let mut lab = Lab::new(2);
    let mut net = Net::new(&mut lab, 1, 100);
    let a = net.task(&mut lab, 0, 2);
    let b = net.task(&mut lab, 1, 3);
    let spec0 = net.spec(&lab, 0);
    let applied = apply_network(&spec0).await.unwrap();
    eprintln!("node 0: {applied:#?}");
    for want in [
        "vxlan vxlan0 (vni 100 local 192.0.2.1 port 4789)",
        "fdb 02:56:c0:00:02:02 dst 192.0.2.2",
        "neighbour 10.78.1.3 lladdr 02:56:c0:00:02:02",
        "route 10.78.1.3/32 dev vxlan0",
    ] {
        assert!(
            applied.created.iter().any(|c| c == want),
            "{want} not in {applied:#?}"
        );
    }
    apply_network(&net.spec(&lab, 1)).await.unwrap();

    // The device: in the network namespace, its socket in the node namespace.
    let link = ip(&net.netns[0], &["-d", "link", "show", VXLAN_IFNAME]);
    for want in [
        "mtu 1450",
        "02:56:c0:00:02:01",
        "vxlan id 100 local 192.0.2.1 dev",
        "dstport 4789",
        "nolearning",
        "state UNKNOWN",
    ] {
        assert!(link.contains(want), "{want} not in {link}");
    }
    assert!(!ip(&net.netns[0], &["-4", "addr", "show", VXLAN_IFNAME]).contains("inet "));
    assert!(has_vxlan_socket(&lab.nodes[0].ns));
    assert!(!has_vxlan_socket(&net.netns[0]));
    let fdb = tool(
        "bridge",
        &net.netns[0],
        &["fdb", "show", "dev", VXLAN_IFNAME],
    );
    assert!(
        fdb.contains("02:56:c0:00:02:02 dst 192.0.2.2") && fdb.contains("self permanent"),
        "{fdb}"
    );
    let neigh = ip(&net.netns[0], &["neigh", "show", "dev", VXLAN_IFNAME]);
    assert!(
        neigh.contains("10.78.1.3 lladdr 02:56:c0:00:02:02 PERMANENT proto 83"),
        "{neigh}"
    );
    let routes = ip(&net.netns[0], &["-4", "route", "show"]);
    assert!(
        routes.contains("10.78.1.3 dev vxlan0 proto 83 scope link"),
        "{routes}"
    );
    let seen = observe_network(&net.netns[0]).await.unwrap().unwrap();
    let vx = seen.vxlan.as_ref().unwrap();
    assert_eq!(vx.vni, Some(100));
    assert_eq!(vx.local, Some(ip4("192.0.2.1")));
    assert_eq!(vx.port, Some(4789));
    assert_eq!(vx.learning, Some(false));
    assert_eq!(vx.mtu, 1450);
    assert!(vx.up);
    assert_entries(&net.netns[0], &spec0.vxlan.as_ref().unwrap().remotes).await;

    // Traffic both ways, and it really crosses the underlay as VXLAN.
    let (_, tx0) = dev_bytes(&lab.nodes[0].ns, "eth0");
    let (rx1, _) = dev_bytes(&lab.nodes[1].ns, "eth0");
    let udp1 = snmp(&lab.nodes[1].ns, "Udp", "InDatagrams");
    let size = 300_000;
    assert_reaches(&a, &b, ip4("10.78.1.3"), 7000, size); // b sends to a
    assert_reaches(&b, &a, ip4("10.78.1.2"), 7001, size); // a sends to b
    let (_, tx0b) = dev_bytes(&lab.nodes[0].ns, "eth0");
    let (rx1b, _) = dev_bytes(&lab.nodes[1].ns, "eth0");
    let udp1b = snmp(&lab.nodes[1].ns, "Udp", "InDatagrams");
    eprintln!(
        "node0 eth0 tx +{} bytes, node1 eth0 rx +{} bytes, node1 udp in +{}",
        tx0b - tx0,
        rx1b - rx1,
        udp1b - udp1
    );
    assert!(tx0b - tx0 > size as u64, "node 0 underlay sent too little");
    assert!(
        rx1b - rx1 > size as u64,
        "node 1 underlay received too little"
    );
    // GSO/GRO carry many segments per datagram across the veths: count, not size.
    assert!(udp1b > udp1, "node 1 did not receive VXLAN datagrams");
    // The remote's address was resolved by proxy ARP on the local veth.
    let neigh = ip(&a, &["neigh", "show", "10.78.1.3"]);
    assert!(neigh.contains("lladdr"), "{neigh}");
}

#[tokio::test]
async fn two_vnis_on_the_same_nodes_stay_isolated() {
    let mut lab = Lab::new(2);
    let mut n1 = Net::new(&mut lab, 2, 201);
    let mut n2 = Net::new(&mut lab, 3, 202);
    let t1a = n1.task(&mut lab, 0, 2);
    let t1b = n1.task(&mut lab, 1, 3);
    let t2a = n2.task(&mut lab, 0, 2);
    let t2b = n2.task(&mut lab, 1, 3);
    n1.apply_all(&lab).await;
    n2.apply_all(&lab).await;
    assert_reaches(&t1a, &t1b, n1.addr(3), 7100, 1000);
    assert_reaches(&t2a, &t2b, n2.addr(3), 7101, 1000);
    assert_reaches(&t2b, &t2a, n2.addr(2), 7102, 1000);

    let t2b_ip = n2.addr(3);
    // Let the last connection's closing segments land before taking the reference.
    std::thread::sleep(Duration::from_millis(300));
    let before = snmp(&t2b, "Ip", "InReceives");
    let _srv = serve_once(&t2b, t2b_ip, 7103, 10);
    let short = Duration::from_millis(800);
    assert!(
        fetch(&t1a, t2b_ip, 7103, short).is_err(),
        "net1 reached net2 by IP"
    );
    // Even with a hand-made entry steering net2's address into net1's VXLAN towards node 1
    // (same VTEP MAC on both networks), VNI 201 lands in net1 on node 1, never in net2.
    let node1_mac = "02:56:c0:00:02:02";
    let dst = t2b_ip.to_string();
    ip(
        &n1.netns[0],
        &["route", "add", &format!("{dst}/32"), "dev", VXLAN_IFNAME],
    );
    ip(
        &n1.netns[0],
        &[
            "neigh",
            "add",
            &dst,
            "lladdr",
            node1_mac,
            "dev",
            VXLAN_IFNAME,
            "nud",
            "permanent",
        ],
    );
    assert!(
        fetch(&t1a, t2b_ip, 7103, short).is_err(),
        "net1 reached net2 through VXLAN"
    );
    assert_eq!(
        snmp(&t2b, "Ip", "InReceives"),
        before,
        "a packet from net1 arrived in net2's task"
    );
    // Our apply leaves those foreign entries alone.
    assert_eq!(
        apply_network(&n1.spec(&lab, 0)).await.unwrap(),
        Applied::default()
    );
    assert!(ip(&n1.netns[0], &["neigh", "show", "dev", VXLAN_IFNAME]).contains(&dst));
    assert!(ip(&n1.netns[0], &["-4", "route", "show"]).contains(&format!("{dst} dev vxlan0")));
}

/// What the brief calls the kernel's view of a network namespace.
fn snapshot(ns: &str) -> String {
    [
        ip(ns, &["-d", "link", "show"]),
        tool("bridge", ns, &["fdb", "show"]),
        ip(ns, &["neigh", "show"]),
        ip(ns, &["-4", "route", "show", "table", "all"]),
        ip(ns, &["-4", "addr", "show"]),
    ]
    .join("\n")
}

#[tokio::test]
async fn second_apply_changes_nothing() {
    let mut lab = Lab::new(3);
    let mut net = Net::new(&mut lab, 4, 104);
    net.task(&mut lab, 0, 2);
    net.task(&mut lab, 1, 3);
    net.task(&mut lab, 1, 4);
    net.task(&mut lab, 2, 5);
    net.apply_all(&lab).await;
    std::thread::sleep(Duration::from_millis(1200));
    let before: Vec<String> = net.netns.iter().map(|n| snapshot(n)).collect();
    for node in 0..3 {
        assert_eq!(
            apply_network(&net.spec(&lab, node)).await.unwrap(),
            Applied::default(),
            "node {node}"
        );
    }
    let after: Vec<String> = net.netns.iter().map(|n| snapshot(n)).collect();
    for (x, y) in before.iter().zip(&after) {
        assert_eq!(x, y);
    }
    assert!(before[0].contains("vxlan id 104"), "{}", before[0]);
}

#[tokio::test]
async fn removed_endpoints_and_vteps_leave_no_stale_entries() {
    let mut lab = Lab::new(3);
    let mut net = Net::new(&mut lab, 5, 105);
    let a = net.task(&mut lab, 0, 2);
    let b1 = net.task(&mut lab, 1, 3);
    let b2 = net.task(&mut lab, 1, 4);
    let c = net.task(&mut lab, 2, 5);
    net.apply_all(&lab).await;
    let (ip_b1, ip_b2) = (net.addr(3), net.addr(4));
    assert_reaches(&a, &b2, ip_b2, 7200, 1000);
    let remotes = |hidden: &[Ipv4Addr]| net.spec_without(&lab, 0, hidden).vxlan.unwrap().remotes;

    // One of node 1's endpoints leaves: its neighbour and route go, the FDB entry stays.
    let applied = apply_network(&net.spec_without(&lab, 0, &[ip_b2]))
        .await
        .unwrap();
    assert_eq!(
        applied,
        Applied {
            created: vec![],
            removed: vec!["neighbour 10.78.5.4".into(), "route 10.78.5.4/32".into()],
        }
    );
    assert_entries(&net.netns[0], &remotes(&[ip_b2])).await;
    assert!(!ip(&net.netns[0], &["-4", "route", "show"]).contains("10.78.5.4"));

    // The last endpoint on node 1 leaves: its VTEP's FDB entry goes too.
    let applied = apply_network(&net.spec_without(&lab, 0, &[ip_b1, ip_b2]))
        .await
        .unwrap();
    assert_eq!(
        applied,
        Applied {
            created: vec![],
            removed: vec![
                "fdb 02:56:c0:00:02:02 dst 192.0.2.2".into(),
                "neighbour 10.78.5.3".into(),
                "route 10.78.5.3/32".into()
            ],
        }
    );
    assert_entries(&net.netns[0], &remotes(&[ip_b1, ip_b2])).await;
    let fdb = tool(
        "bridge",
        &net.netns[0],
        &["fdb", "show", "dev", VXLAN_IFNAME],
    );
    assert!(!fdb.contains("192.0.2.2"), "{fdb}");
    assert!(fdb.contains("dst 192.0.2.3"), "{fdb}");
    // Node 2 is untouched.
    assert_reaches(&a, &c, net.addr(5), 7201, 1000);

    // Node 1 leaves entirely, then rejoins with the same spec.
    remove_network(&net.netns[1]).await.unwrap();
    assert!(!has_socket_soon(&lab.nodes[1].ns, false));
    let applied = apply_network(&net.spec(&lab, 1)).await.unwrap();
    assert!(
        applied
            .created
            .contains(&"vxlan vxlan0 (vni 105 local 192.0.2.2 port 4789)".to_string()),
        "{applied:#?}"
    );
    let applied = apply_network(&net.spec(&lab, 0)).await.unwrap();
    assert_eq!(
        applied,
        Applied {
            created: vec![
                "fdb 02:56:c0:00:02:02 dst 192.0.2.2".into(),
                "neighbour 10.78.5.3 lladdr 02:56:c0:00:02:02".into(),
                "neighbour 10.78.5.4 lladdr 02:56:c0:00:02:02".into(),
                "route 10.78.5.3/32 dev vxlan0".into(),
                "route 10.78.5.4/32 dev vxlan0".into(),
            ],
            removed: vec![],
        }
    );
    for node in 0..3 {
        assert_entries(
            &net.netns[node],
            &net.spec(&lab, node).vxlan.unwrap().remotes,
        )
        .await;
    }
    assert_reaches(&a, &b1, ip_b1, 7202, 1000);
    assert_reaches(&b2, &a, net.addr(2), 7203, 1000);
    assert_reaches(&c, &b2, ip_b2, 7204, 1000);
    for node in 0..3 {
        assert_eq!(
            apply_network(&net.spec(&lab, node)).await.unwrap(),
            Applied::default()
        );
    }
}

/// Polls for the VXLAN socket in a node namespace to be present (`want`) for up to 2 s;
/// returns what it saw last.
fn has_socket_soon(ns: &str, want: bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let has = has_vxlan_socket(ns);
        if has == want || Instant::now() > deadline {
            return has;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test]
async fn changed_local_address_recreates_the_device() {
    let mut lab = Lab::new(2);
    let mut net = Net::new(&mut lab, 6, 106);
    let a = net.task(&mut lab, 0, 2);
    let b = net.task(&mut lab, 1, 3);
    net.apply_all(&lab).await;
    // Node 0 gets another underlay address and moves its VTEP to it.
    ip(
        &lab.nodes[0].ns,
        &["addr", "add", "192.0.2.11/24", "dev", "eth0"],
    );
    lab.nodes[0].ip = ip4("192.0.2.11");
    let applied = apply_network(&net.spec(&lab, 0)).await.unwrap();
    eprintln!("node 0: {applied:#?}");
    assert!(
        applied
            .removed
            .contains(&"vxlan vxlan0 (vni 106 local 192.0.2.1 port 4789: spec changed)".into()),
        "{applied:#?}"
    );
    assert!(
        applied
            .created
            .contains(&"vxlan vxlan0 (vni 106 local 192.0.2.11 port 4789)".into()),
        "{applied:#?}"
    );
    // Entries are back on the new device.
    assert!(
        applied
            .created
            .contains(&"route 10.78.6.3/32 dev vxlan0".into())
    );
    let link = ip(&net.netns[0], &["-d", "link", "show", VXLAN_IFNAME]);
    assert!(link.contains("local 192.0.2.11"), "{link}");
    assert!(link.contains("02:56:c0:00:02:0b"), "{link}");
    let applied = apply_network(&net.spec(&lab, 1)).await.unwrap();
    assert_eq!(
        applied,
        Applied {
            created: vec![
                "fdb 02:56:c0:00:02:0b dst 192.0.2.11".into(),
                "neighbour 10.78.6.2 lladdr 02:56:c0:00:02:0b".into(),
            ],
            removed: vec!["fdb 02:56:c0:00:02:01 dst 192.0.2.1".into()],
        }
    );
    assert_reaches(&a, &b, net.addr(3), 7300, 100_000);
    assert_reaches(&b, &a, net.addr(2), 7301, 100_000);
    let (rx, _) = dev_bytes(&lab.nodes[0].ns, "eth0");
    assert!(rx > 100_000);

    // Another VNI: recreated as well.
    net.vni = 116;
    let applied = apply_network(&net.spec(&lab, 0)).await.unwrap();
    assert!(
        applied
            .created
            .contains(&"vxlan vxlan0 (vni 116 local 192.0.2.11 port 4789)".into()),
        "{applied:#?}"
    );
    assert!(ip(&net.netns[0], &["-d", "link", "show", VXLAN_IFNAME]).contains("vxlan id 116"));
    assert_eq!(
        apply_network(&net.spec(&lab, 0)).await.unwrap(),
        Applied::default()
    );
}

#[tokio::test]
async fn vxlan_none_returns_to_one_node() {
    let mut lab = Lab::new(2);
    let mut net = Net::new(&mut lab, 7, 107);
    let a = net.task(&mut lab, 0, 2);
    net.task(&mut lab, 1, 3);
    net.apply_all(&lab).await;
    assert!(has_vxlan_socket(&lab.nodes[0].ns));
    let mut spec = net.spec(&lab, 0);
    spec.vxlan = None;
    let applied = apply_network(&spec).await.unwrap();
    assert_eq!(
        applied,
        Applied {
            created: vec![],
            removed: vec!["vxlan vxlan0".into()],
        }
    );
    assert!(!ip(&net.netns[0], &["-o", "link", "show"]).contains("vxlan"));
    let routes = ip(&net.netns[0], &["-4", "route", "show"]);
    assert!(!routes.contains("10.78.7.3"), "{routes}");
    assert!(!has_socket_soon(&lab.nodes[0].ns, false));
    let seen = observe_network(&net.netns[0]).await.unwrap().unwrap();
    assert_eq!(seen.vxlan, None);
    assert_eq!(seen.endpoints.len(), 1);
    // The one-node part is intact.
    assert_reaches(&a, &net.netns[0], net.addr(1), 7400, 100);
    assert_eq!(apply_network(&spec).await.unwrap(), Applied::default());

    // A vxlan0 that is not ours is reported, never deleted.
    ip(
        &net.netns[0],
        &[
            "link",
            "add",
            VXLAN_IFNAME,
            "type",
            "veth",
            "peer",
            "name",
            "other1",
        ],
    );
    let err = apply_network(&net.spec(&lab, 0)).await.unwrap_err();
    eprintln!("expected error: {err}");
    assert!(err.to_string().contains("not a VXLAN device"), "{err}");
    assert!(ip(&net.netns[0], &["-o", "link", "show"]).contains("vxlan0@other1"));
    assert_eq!(apply_network(&spec).await.unwrap(), Applied::default());
}

#[tokio::test]
async fn errors_name_the_object_and_keep_the_cause() {
    let mut lab = Lab::new(2);
    let mut net = Net::new(&mut lab, 8, 108);
    net.task(&mut lab, 0, 2);
    let mut spec = net.spec(&lab, 0);
    spec.vxlan.as_mut().unwrap().underlay_dev = "eth9".into();
    let err = apply_network(&spec).await.unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("eth9") && msg.contains(&lab.nodes[0].ns),
        "{msg}"
    );

    // The same VNI twice on one node: EEXIST from the kernel, kept, with the device named.
    apply_network(&net.spec(&lab, 0)).await.unwrap();
    let other = lab.ns.name();
    let mut dup = net.spec(&lab, 0);
    dup.netns = other;
    dup.endpoints.clear();
    let err = apply_network(&dup).await.unwrap_err();
    let msg = err.to_string();
    eprintln!("expected error: {msg}");
    assert!(msg.contains("vni 108"), "{msg}");
    let shoal_mesh::MeshError::Netlink { source, .. } = &err else {
        panic!("expected the netlink cause: {err:?}");
    };
    assert!(source.to_string().contains("File exists"), "{source}");
}

#[tokio::test]
async fn drift_on_the_device_and_its_entries_is_repaired() {
    let mut lab = Lab::new(2);
    let mut net = Net::new(&mut lab, 9, 109);
    let a = net.task(&mut lab, 0, 2);
    let b = net.task(&mut lab, 1, 3);
    net.apply_all(&lab).await;
    let n0 = net.netns[0].clone();
    // Someone deletes ours and leaves tagged leftovers of an older apply.
    tool(
        "bridge",
        &n0,
        &[
            "fdb",
            "del",
            "02:56:c0:00:02:02",
            "dev",
            "vxlan0",
            "dst",
            "192.0.2.2",
            "self",
        ],
    );
    ip(&n0, &["neigh", "del", "10.78.9.3", "dev", "vxlan0"]);
    tool(
        "bridge",
        &n0,
        &[
            "fdb",
            "add",
            "02:56:c0:00:02:63",
            "dev",
            "vxlan0",
            "dst",
            "192.0.2.99",
            "self",
            "permanent",
        ],
    );
    ip(
        &n0,
        &[
            "neigh",
            "add",
            "10.78.9.77",
            "lladdr",
            "02:56:c0:00:02:63",
            "dev",
            "vxlan0",
            "nud",
            "permanent",
            "protocol",
            "83",
        ],
    );
    ip(
        &n0,
        &[
            "route",
            "add",
            "10.78.9.77/32",
            "dev",
            "vxlan0",
            "proto",
            "83",
        ],
    );
    let applied = apply_network(&net.spec(&lab, 0)).await.unwrap();
    assert_eq!(
        applied,
        Applied {
            created: vec![
                "fdb 02:56:c0:00:02:02 dst 192.0.2.2".into(),
                "neighbour 10.78.9.3 lladdr 02:56:c0:00:02:02".into(),
            ],
            removed: vec![
                "fdb 02:56:c0:00:02:63 dst 192.0.2.99".into(),
                "neighbour 10.78.9.77".into(),
                "route 10.78.9.77/32".into(),
            ],
        }
    );
    assert_entries(&n0, &net.spec(&lab, 0).vxlan.unwrap().remotes).await;

    // Device taken down (the kernel flushes its routes and neighbours with it).
    ip(&n0, &["link", "set", "vxlan0", "down"]);
    let applied = apply_network(&net.spec(&lab, 0)).await.unwrap();
    eprintln!("after down: {applied:#?}");
    assert!(applied.created.contains(&"vxlan vxlan0 up".to_string()));
    assert!(applied.removed.is_empty(), "{applied:#?}");
    assert_entries(&n0, &net.spec(&lab, 0).vxlan.unwrap().remotes).await;

    // The underlay MTU changes: the device follows in place.
    ip(&lab.nodes[0].ns, &["link", "set", "eth0", "mtu", "1400"]);
    let applied = apply_network(&net.spec(&lab, 0)).await.unwrap();
    assert_eq!(
        applied,
        Applied {
            created: vec!["vxlan vxlan0: mtu 1350".into()],
            removed: vec![],
        }
    );
    assert!(ip(&n0, &["link", "show", "vxlan0"]).contains("mtu 1350"));
    assert_reaches(&a, &b, net.addr(3), 7500, 50_000);
    assert_reaches(&b, &a, net.addr(2), 7501, 50_000);
    assert_eq!(
        apply_network(&net.spec(&lab, 0)).await.unwrap(),
        Applied::default()
    );
}

/// Environment of the child process of [`underlay_of_the_calling_process`].
const CHILD_ENV: &str = "SHOAL_VX_TEST_CHILD";

/// `underlay_netns: None` means the namespace of the process (/proc/self/ns/net), not the
/// calling thread's. The test binary re-runs itself as a child inside node 0's namespace,
/// and calls apply_network from a thread that has entered another namespace (the underlay
/// bridge's): the device must still get its socket in node 0's namespace.
#[tokio::test]
async fn underlay_of_the_calling_process() {
    if let Ok(args) = std::env::var(CHILD_ENV) {
        // Child: netns, other, task, remote ip, remote vtep.
        let v: Vec<String> = args.split(' ').map(String::from).collect();
        let spec = NetworkSpec {
            netns: v[0].clone(),
            subnet: "10.78.10.0/24".parse().unwrap(),
            gateway: ip4("10.78.10.1"),
            vips: vec![],
            mtu: 1450,
            endpoints: vec![EndpointSpec {
                task_netns: v[2].clone(),
                host_ifname: "sv0a0002".into(),
                ifname: "eth0".into(),
                ip: ip4("10.78.10.2"),
                mac: [0x02, 0x42, 10, 78, 10, 2],
                default_route: true,
            }],
            vxlan: Some(VxlanSpec {
                vni: 110,
                local: ip4("192.0.2.1"),
                underlay_netns: None,
                underlay_dev: "eth0".into(),
                port: 4789,
                mac: vtep_mac(ip4("192.0.2.1")),
                remotes: vec![RemoteEndpoint {
                    ip: ip4(&v[3]),
                    vtep: ip4(&v[4]),
                    vtep_mac: vtep_mac(ip4(&v[4])),
                }],
                peers: vec![],
                extra_overhead: 0,
            }),
            egress: None,
        };
        let applied = shoal_netns::run_in(&v[1], move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(apply_network(&spec))
        })
        .unwrap()
        .unwrap();
        eprintln!("child applied: {applied:#?}");
        assert!(
            applied
                .created
                .contains(&"vxlan vxlan0 (vni 110 local 192.0.2.1 port 4789)".to_string()),
            "{applied:#?}"
        );
        return;
    }
    use shoal_netns::CommandExt;
    let mut lab = Lab::new(2);
    let mut net = Net::new(&mut lab, 10, 110);
    let a = net.task(&mut lab, 0, 2);
    let b = net.task(&mut lab, 1, 3);
    apply_network(&net.spec(&lab, 1)).await.unwrap();
    let args = format!(
        "{} {} {a} {} {}",
        net.netns[0],
        lab.underlay,
        net.addr(3),
        lab.nodes[1].ip
    );
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "underlay_of_the_calling_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, args)
        .in_netns(&lab.nodes[0].ns)
        .unwrap()
        .output()
        .unwrap();
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "child failed");
    assert!(has_vxlan_socket(&lab.nodes[0].ns));
    assert!(!has_vxlan_socket(&lab.underlay));
    assert!(!has_vxlan_socket(&net.netns[0]));
    assert_reaches(&a, &b, net.addr(3), 7600, 50_000);
    assert_reaches(&b, &a, net.addr(2), 7601, 50_000);
}
