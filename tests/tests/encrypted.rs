//! Encrypted overlays (`--opt encrypted`): VXLAN inside WireGuard between nodes. On a
//! three-node lab, with a capture (tcpdump) on the lab's underlay bridge:
//!
//! - a marker sent over a plain network crosses the underlay in the clear, one sent over an
//!   encrypted network never does, while both networks carry the traffic across nodes;
//! - a forged plaintext VXLAN datagram for the encrypted network's VNI, sent from a peer
//!   node's own address, is dropped (on the encrypted port and on the plain one);
//! - key rotation (`node rotate-key`) keeps a long-lived TCP flow; a node killed and started
//!   again rejoins by itself;
//! - a node whose WireGuard cannot be set up (its port taken) says so in `node inspect` and
//!   `/metrics`, keeps serving its plain networks, and never sends encrypted traffic in the
//!   clear;
//! - `--opt` with an unknown option or value is refused, naming it, and creates nothing.

use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use shoal_tests::{Lab, Run, http_on, ip_netns, require_kernel, vxlan_frame, vxlan_rx};

/// tcpdump on the lab's underlay bridge, writing a pcap; stopped (and read) by `finish`.
struct Capture {
    child: Child,
    file: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Capture {
    fn start(lab: &Lab) -> Capture {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("underlay.pcap");
        let ul = format!("shoal-{}-ul", lab.name);
        let child = Command::new("ip")
            .args([
                "netns", "exec", &ul, "tcpdump", "-i", "br0", "-U", "-n", "-w",
            ])
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("tcpdump (scripts/deps.sh installs it)");
        // tcpdump says "listening on" once it captures.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !file.exists() || std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0) == 0 {
            assert!(Instant::now() < deadline, "tcpdump did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Capture {
            child,
            file,
            _dir: dir,
        }
    }

    /// Stops the capture; the raw bytes of every packet.
    fn finish(mut self) -> Vec<u8> {
        std::thread::sleep(Duration::from_millis(300));
        let _ = nix_kill(self.child.id());
        let _ = self.child.wait();
        std::fs::read(&self.file).unwrap()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// SIGINT, so that tcpdump flushes its file.
fn nix_kill(pid: u32) -> std::io::Result<()> {
    let r = Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()?;
    if r.success() {
        Ok(())
    } else {
        Err(std::io::Error::other("kill failed"))
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// The running task of `service` on `node`: (name, address on its network, namespace).
fn task_on(lab: &Lab, service: &str, node: &str) -> Option<(String, Ipv4Addr, String)> {
    let nodes = lab.node_names();
    lab.running_tasks(service).into_iter().find_map(|t| {
        (nodes[t["node_id"].as_str()?] == node).then(|| {
            let id = t["id"].as_str().unwrap();
            (
                format!("{service}.{}", t["slot"]),
                t["networks"][0]["ip"].as_str().unwrap().parse().unwrap(),
                format!("shoal-{}-{node}-t-{}", lab.name, &id[..12]),
            )
        })
    })
}

fn curl(lab: &Lab, from: &str, ip: Ipv4Addr, marker: &str) -> Run {
    lab.exec(
        from,
        &[
            "curl",
            "-s",
            "-m",
            "3",
            "-H",
            &format!("X-Marker: {marker}"),
            &format!("http://{ip}/"),
        ],
    )
}

/// Packets counted by the guard rule whose comment is `comment` on `node`.
fn guard_count(lab: &Lab, node: &str, comment: &str) -> u64 {
    let ns = format!("shoal-{}-{node}", lab.name);
    let t = ip_netns(&ns, &["nft", "list", "table", "ip", "shoal_guard"]).ok();
    let line = t
        .stdout
        .lines()
        .find(|l| l.contains(comment))
        .unwrap_or_else(|| panic!("no guard rule {comment:?} on {node}:\n{}", t.stdout));
    line.split("packets ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap()
}

fn wireguard_report(lab: &Lab, node: &str) -> serde_json::Value {
    let r = lab.shoal_on(node, &["node", "inspect"]).ok();
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    v["report"]["wireguard"].clone()
}

fn public_key(lab: &Lab, node: &str) -> String {
    let r = lab.shoal(&["node", "ls", "--format", "json"]).ok();
    let v: Vec<serde_json::Value> = serde_json::from_str(&r.stdout).unwrap();
    v.iter()
        .find(|n| n["name"] == node)
        .and_then(|n| n["wireguard"]["public_key"].as_str())
        .unwrap_or_default()
        .to_string()
}

#[test]
fn encrypted_overlay_end_to_end() {
    if !require_kernel("encrypted_overlay_end_to_end") {
        return;
    }
    let lab = Lab::up(3, "etcd");
    // node3's WireGuard port is taken before any encrypted network exists.
    let blocker = shoal_netns::run_in(&format!("shoal-{}-node3", lab.name), || {
        UdpSocket::bind("0.0.0.0:51820")
    })
    .unwrap()
    .expect("bind 51820 in node3");

    // Bad options are refused by name and make nothing.
    for (opt, named) in [("bogus", "bogus"), ("encrypted=maybe", "maybe")] {
        let r = lab.shoal(&["network", "create", "--opt", opt, "bad"]);
        assert_ne!(r.code, 0, "{r:?}");
        assert!(r.stderr.contains(named), "{r:?}");
    }
    assert!(!lab.shoal(&["network", "ls"]).ok().stdout.contains("bad"));

    lab.shoal(&["network", "create", "--opt", "encrypted", "secure"])
        .ok();
    lab.shoal(&["network", "create", "plain"]).ok();
    let ls = lab.shoal(&["network", "ls"]).ok().stdout;
    let secure_line = ls.lines().find(|l| l.contains("secure")).unwrap();
    assert!(secure_line.contains("encrypted"), "{ls}");
    assert!(
        !ls.lines()
            .find(|l| l.contains("plain"))
            .unwrap()
            .contains("encrypted")
    );
    let inspect: serde_json::Value =
        serde_json::from_str(&lab.shoal(&["network", "inspect", "secure"]).ok().stdout).unwrap();
    assert_eq!(inspect["encrypted"], true, "{inspect}");
    let vni = u32::try_from(inspect["vni"].as_u64().unwrap()).unwrap();

    lab.whoami_service("wsec", "secure", 3);
    lab.whoami_service("wplain", "plain", 3);
    let on = |svc: &str, node: &str| task_on(&lab, svc, node).unwrap();
    let (sec1, _, sec1_ns) = on("wsec", "node1");
    let (_, sec2_ip, _) = on("wsec", "node2");
    let (_, sec3_ip, _) = on("wsec", "node3");
    let (plain1, _, _) = on("wplain", "node1");
    let (_, plain2_ip, _) = on("wplain", "node2");
    let (plain3, _, _) = on("wplain", "node3");
    let (_, plain1_ip, _) = on("wplain", "node1");

    // MTU: 1450 on plain networks, 60 less (WireGuard's overhead) on encrypted ones.
    // (`ip`, not /sys: a process task's /sys is the host's.)
    let mtu = |task: &str| {
        let out = lab
            .exec(task, &["ip", "-o", "link", "show", "eth0"])
            .ok()
            .stdout;
        out.split(" mtu ")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(mtu(&sec1), "1390");
    assert_eq!(mtu(&plain1), "1450");

    // node1 and node2 handshake; node3 reports why it cannot.
    lab.wait_for("node1's WireGuard peers", Duration::from_secs(15), || {
        let w = wireguard_report(&lab, "node1");
        (w["up"] == true
            && w["peers"]
                .as_array()?
                .iter()
                .any(|p| p["endpoint"] == "192.0.2.12:51820"))
        .then_some(())
    });
    let w3 = lab.wait_for("node3's WireGuard error", Duration::from_secs(15), || {
        let w = wireguard_report(&lab, "node3");
        (w["up"] == false && w["error"].is_string()).then_some(w)
    });
    assert!(
        w3["error"].as_str().unwrap().contains("51820"),
        "node3 names the port: {w3}"
    );
    let metrics3 = ip_netns(
        &format!("shoal-{}-node3", lab.name),
        &["curl", "-s", "-m", "5", "http://127.0.0.1:9469/metrics"],
    )
    .ok()
    .stdout;
    assert!(metrics3.contains("shoal_wireguard_wanted 1"), "{metrics3}");
    assert!(metrics3.contains("shoal_wireguard_up 0"), "{metrics3}");

    // The capture: plain in the clear, encrypted never; both cross nodes.
    let cap = Capture::start(&lab);
    let r = curl(&lab, &sec1, sec2_ip, "SECRET-MARKER-4711");
    assert!(
        r.stdout.contains("Hostname:"),
        "encrypted node1 -> node2: {r:?}"
    );
    let r = curl(&lab, &plain1, plain2_ip, "PLAIN-MARKER-0815");
    assert!(
        r.stdout.contains("Hostname:"),
        "plain node1 -> node2: {r:?}"
    );
    // node3 without WireGuard: its plain network works, its encrypted one is cut off.
    let r = curl(&lab, &plain3, plain1_ip, "PLAIN-MARKER-0816");
    assert!(
        r.stdout.contains("Hostname:"),
        "plain node3 -> node1: {r:?}"
    );
    let r = curl(&lab, &sec1, sec3_ip, "SECRET-MARKER-4712");
    assert!(
        !r.stdout.contains("Hostname:"),
        "encrypted to node3 without WireGuard: {r:?}"
    );
    let (sec3, _, _) = on("wsec", "node3");
    let (_, sec1_ip, _) = on("wsec", "node1");
    let r = curl(&lab, &sec3, sec1_ip, "SECRET-MARKER-4713");
    assert!(
        !r.stdout.contains("Hostname:"),
        "encrypted from node3 without WireGuard: {r:?}"
    );
    let pcap = cap.finish();
    assert!(
        contains(&pcap, b"PLAIN-MARKER-0815"),
        "the capture sees plain traffic"
    );
    assert!(contains(&pcap, b"PLAIN-MARKER-0816"));
    assert!(
        !contains(&pcap, b"SECRET-MARKER-4711"),
        "encrypted traffic in the clear"
    );
    assert!(
        !contains(&pcap, b"SECRET-MARKER-4712"),
        "encrypted traffic in the clear"
    );
    assert!(
        !contains(&pcap, b"SECRET-MARKER-4713"),
        "encrypted traffic in the clear"
    );
    // node3 refuses its encrypted network's datagrams at routing (table 84's unreachable
    // default, made even though the device failed); the guard's output rule is behind it.
    let t84 = ip_netns(
        &format!("shoal-{}-node3", lab.name),
        &["ip", "route", "show", "table", "84"],
    )
    .ok();
    assert!(t84.stdout.contains("unreachable default"), "{t84:?}");
    assert!(
        !t84.stdout.contains("shoalwg0"),
        "no device route on node3: {t84:?}"
    );

    // Forged plaintext VXLAN for the encrypted VNI, all dropped: (a) from the underlay to
    // the encrypted port; (b) from a peer node's own address to the plain port; (c) from a
    // peer bound to its underlay interface (around the route into WireGuard) to the
    // encrypted port: its own guard keeps it in.
    let rx_before = vxlan_rx(&lab, "node1", vni);
    let counts = |n: &str| {
        (
            guard_count(&lab, n, "encrypted network in the clear"),
            guard_count(&lab, n, "encrypted VNI in the clear"),
            guard_count(&lab, n, "never in the clear"),
        )
    };
    let (a0, b0, _) = counts("node1");
    let (_, _, c0) = counts("node2");
    let frame = vxlan_frame(vni, "10.0.0.3".parse().unwrap());
    let f = frame.clone();
    shoal_netns::run_in(&format!("shoal-{}-client", lab.name), move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        for _ in 0..3 {
            s.send_to(&f, ("192.0.2.11", 4790)).unwrap();
        }
    })
    .unwrap();
    let f = frame.clone();
    shoal_netns::run_in(&format!("shoal-{}-node2", lab.name), move || {
        let s = UdpSocket::bind("192.0.2.12:0").unwrap();
        for _ in 0..3 {
            s.send_to(&f, ("192.0.2.11", 4789)).unwrap();
        }
        let raw = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
        raw.bind_device(Some(b"eth0")).unwrap();
        let to: SocketAddr = "192.0.2.11:4790".parse().unwrap();
        for _ in 0..3 {
            // Refused locally (EPERM from the guard's drop) or dropped: either way not sent.
            let _ = raw.send_to(&f, &to.into());
        }
    })
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        vxlan_rx(&lab, "node1", vni),
        rx_before,
        "forged VXLAN reached the overlay"
    );
    let (a1, b1, _) = counts("node1");
    let (_, _, c1) = counts("node2");
    assert!(
        a1 >= a0 + 3,
        "plaintext to the encrypted port: {a0} -> {a1}"
    );
    assert!(
        b1 >= b0 + 3,
        "encrypted VNI on the plain port: {b0} -> {b1}"
    );
    assert!(c1 >= c0 + 3, "the peer's own guard: {c0} -> {c1}");

    // Rotation keeps a long-lived TCP flow (one connection, requests before and after each
    // node's new key).
    let addr = SocketAddr::from((sec2_ip, 80));
    let mut conn = shoal_netns::run_in(&sec1_ns, move || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(3))
    })
    .unwrap()
    .expect("connect over the encrypted network");
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert!(http_on(&mut conn).unwrap().contains("Hostname:"));
    for node in ["node1", "node2"] {
        let before = public_key(&lab, node);
        let r = lab.shoal_on(node, &["node", "rotate-key"]).ok();
        let after = r.stdout.trim().to_string();
        assert_ne!(after, before, "{node} has a new key");
        lab.wait_for(
            "the new key in the node record",
            Duration::from_secs(5),
            || (public_key(&lab, node) == after).then_some(()),
        );
        // The other side has the new key as its peer and has completed a handshake with it:
        // the flow below crosses the new session.
        let other = if node == "node1" { "node2" } else { "node1" };
        lab.wait_for(
            &format!("{other} handshaken with {node}'s new key"),
            Duration::from_secs(20),
            || {
                let w = wireguard_report(&lab, other);
                w["peers"]
                    .as_array()?
                    .iter()
                    .any(|p| p["public_key"] == after.as_str() && p["last_handshake_secs"].is_u64())
                    .then_some(())
            },
        );
        let t = Instant::now();
        let answer = http_on(&mut conn)
            .unwrap_or_else(|e| panic!("the flow broke after {node}'s rotation: {e}"));
        assert!(answer.contains("Hostname:"), "{answer}");
        eprintln!(
            "{node} rotated; the open flow answered {:?} later",
            t.elapsed()
        );
    }
    drop(conn);

    // node2 killed and started again: it rejoins (new handshakes) by itself.
    lab.shoal(&["lab", "kill", "--name", &lab.name, "node2"])
        .ok();
    lab.wait_for("node2 down", Duration::from_secs(15), || {
        let r = lab.shoal(&["node", "ls", "--format", "json"]);
        let v: Vec<serde_json::Value> = serde_json::from_str(&r.stdout).ok()?;
        v.iter()
            .any(|n| n["name"] == "node2" && n["status"] == "down")
            .then_some(())
    });
    lab.shoal(&["lab", "start", "--name", &lab.name, "node2"])
        .ok();
    lab.wait_for("node2 ready", Duration::from_secs(20), || {
        let r = lab.shoal(&["node", "ls", "--format", "json"]);
        let v: Vec<serde_json::Value> = serde_json::from_str(&r.stdout).ok()?;
        v.iter().all(|n| n["status"] == "ready").then_some(())
    });
    // A new task lands on node2 (the node with the fewest of the service).
    lab.shoal(&["service", "scale", "wsec=4"]).ok();
    let (_, new2_ip, _) = lab.wait_for("a wsec task on node2", Duration::from_secs(30), || {
        task_on(&lab, "wsec", "node2")
    });
    lab.wait_for(
        "encrypted node1 -> node2 after the restart",
        Duration::from_secs(20),
        || {
            curl(&lab, &sec1, new2_ip, "x")
                .stdout
                .contains("Hostname:")
                .then_some(())
        },
    );
    drop(blocker);
}
