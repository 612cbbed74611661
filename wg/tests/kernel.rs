//! Kernel test of the WireGuard device: two namespaces joined by a veth (the "underlay"),
//! one device in each (userspace WireGuard on TUN, as the agent runs it). A datagram to the
//! routed UDP port crosses inside WireGuard (the veth carries only WireGuard's port, and not
//! the marker in the clear); a new key on one side and its peer's update bring traffic back;
//! a stopped device leaves the port unreachable instead of sending in the clear. Needs
//! root; namespaces are the test's own (`shoal-t-wg-<pid>-*`) and removed on drop.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use shoal_wg::{Device, DeviceSpec, Key, PeerSpec};

const DPORT: u16 = 4790;

struct Ns(Vec<String>);
impl Drop for Ns {
    fn drop(&mut self) {
        for n in &self.0 {
            let _ = shoal_netns::delete(n);
        }
    }
}

fn ip(args: &[&str]) {
    let o = Command::new("ip").args(args).output().unwrap();
    assert!(
        o.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

enum Cmd {
    Apply(DeviceSpec, mpsc::Sender<Vec<String>>),
    Stop(mpsc::Sender<()>),
}

/// Runs a device in `ns` on a thread of its own (a current-thread runtime there, so the
/// TUN and the UDP socket are made in that namespace).
fn device_in(ns: &str, spec: DeviceSpec) -> mpsc::Sender<Cmd> {
    let (tx, rx) = mpsc::channel::<Cmd>();
    let (ready_tx, ready_rx) = mpsc::channel();
    let ns = ns.to_string();
    std::thread::spawn(move || {
        shoal_netns::run_in(&ns, move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let mut dev = Device::create(&spec).await.expect("create device");
                ready_tx.send(()).unwrap();
                loop {
                    match rx.try_recv() {
                        Ok(Cmd::Apply(s, done)) => {
                            done.send(dev.apply(&s).await.expect("apply")).unwrap();
                        }
                        Ok(Cmd::Stop(done)) => {
                            dev.stop().await;
                            done.send(()).unwrap();
                            return;
                        }
                        Err(mpsc::TryRecvError::Empty) => {
                            tokio::time::sleep(Duration::from_millis(10)).await
                        }
                        Err(_) => return,
                    }
                }
            })
        })
        .unwrap();
    });
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("device ready");
    tx
}

fn spec(key: Key, peer: Key, peer_addr: &str) -> DeviceSpec {
    let addr: Ipv4Addr = peer_addr.parse().unwrap();
    DeviceSpec {
        ifname: shoal_wg::IFNAME.into(),
        // This kernel has no WireGuard: auto falls back to userspace (the kernel path is
        // tested under qemu).
        backend: shoal_wg::Backend::Auto,
        port: shoal_wg::DEFAULT_PORT,
        private_key: key,
        underlay_dev: "veth0".into(),
        route_udp_dport: DPORT,
        peers: vec![PeerSpec {
            public_key: peer.public(),
            endpoint: SocketAddrV4::new(addr, shoal_wg::DEFAULT_PORT),
            allowed: addr,
        }],
    }
}

/// Sends `marker` from `from` to `to_addr:DPORT` until `to`'s listener gets it.
fn delivered(from: &str, listener: &UdpSocket, to_addr: &str, marker: &[u8]) -> bool {
    let to: SocketAddrV4 = format!("{to_addr}:{DPORT}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(8);
    let mut buf = [0u8; 1500];
    while Instant::now() < deadline {
        let m = marker.to_vec();
        let _ = shoal_netns::run_in(from, move || {
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            s.send_to(&m, to)
        })
        .unwrap();
        if let Ok((n, _)) = listener.recv_from(&mut buf)
            && &buf[..n] == marker
        {
            return true;
        }
    }
    false
}

fn veth_bytes(ns: &str) -> u64 {
    let o = Command::new("ip")
        .args(["-n", ns, "-s", "-j", "link", "show", "veth0"])
        .output()
        .unwrap();
    let v: serde_like::Value = serde_like::parse(&String::from_utf8_lossy(&o.stdout));
    v.tx_bytes
}

/// Just enough JSON reading for `ip -s -j link` (tx bytes of the first link).
mod serde_like {
    pub struct Value {
        pub tx_bytes: u64,
    }
    pub fn parse(s: &str) -> Value {
        let tx = s.split("\"tx\":").nth(1).unwrap_or("");
        let bytes = tx
            .split("\"bytes\":")
            .nth(1)
            .unwrap_or("0")
            .chars()
            .take_while(|c| c.is_ascii_digit())
            .collect::<String>();
        Value {
            tx_bytes: bytes.parse().unwrap_or(0),
        }
    }
}

#[test]
fn datagrams_cross_inside_wireguard() {
    assert!(
        std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0")),
        "the shoal-wg kernel test must run as root"
    );
    let (a, b) = (
        format!("shoal-t-wg-{}-a", std::process::id()),
        format!("shoal-t-wg-{}-b", std::process::id()),
    );
    let _ns = Ns(vec![a.clone(), b.clone()]);
    shoal_netns::create(&a).unwrap();
    shoal_netns::create(&b).unwrap();
    ip(&[
        "-n", &a, "link", "add", "veth0", "type", "veth", "peer", "name", "veth0", "netns", &b,
    ]);
    for (ns, addr) in [(&a, "10.98.0.1/24"), (&b, "10.98.0.2/24")] {
        ip(&["-n", ns, "addr", "add", addr, "dev", "veth0"]);
        ip(&["-n", ns, "link", "set", "veth0", "up"]);
        ip(&["-n", ns, "link", "set", "lo", "up"]);
    }
    let (ka, kb) = (Key::generate(), Key::generate());
    let da = device_in(&a, spec(ka, kb, "10.98.0.2"));
    let db = device_in(&b, spec(kb, ka, "10.98.0.1"));
    let listener = shoal_netns::run_in(&b, || UdpSocket::bind(("0.0.0.0", DPORT)))
        .unwrap()
        .unwrap();
    listener
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();

    let before = veth_bytes(&a);
    assert!(
        delivered(&a, &listener, "10.98.0.2", b"MARKER-1"),
        "first datagram"
    );
    assert!(
        veth_bytes(&a) > before,
        "it left over the veth (inside WireGuard)"
    );
    // The rule sends only the routed port into WireGuard: the table is in place.
    let rules = Command::new("ip")
        .args(["-n", &a, "rule"])
        .output()
        .unwrap();
    let rules = String::from_utf8_lossy(&rules.stdout).to_string();
    assert!(
        rules.contains("ipproto udp dport 4790 lookup 84"),
        "{rules}"
    );

    // Rotation: a new key on a, then b learns it; traffic comes back.
    let ka2 = Key::generate();
    let (done, wait) = mpsc::channel();
    da.send(Cmd::Apply(spec(ka2, kb, "10.98.0.2"), done))
        .unwrap();
    let changes = wait.recv().unwrap();
    assert!(
        changes.iter().any(|c| c.contains("private key")),
        "{changes:?}"
    );
    let (done, wait) = mpsc::channel();
    db.send(Cmd::Apply(spec(kb, ka2, "10.98.0.1"), done))
        .unwrap();
    wait.recv().unwrap();
    let t = Instant::now();
    assert!(
        delivered(&a, &listener, "10.98.0.2", b"MARKER-2"),
        "after rotation"
    );
    eprintln!(
        "traffic back {:?} after the peer learnt the new key",
        t.elapsed()
    );

    // A stopped device: the port is unreachable, nothing leaves in the clear.
    let (done, wait) = mpsc::channel();
    da.send(Cmd::Stop(done)).unwrap();
    wait.recv().unwrap();
    // (The interface goes a moment after the device stops; until then datagrams go into
    // a TUN nobody reads: not in the clear either.)
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        let o = Command::new("ip")
            .args(["-n", &a, "link", "show", shoal_wg::IFNAME])
            .output();
        if o.is_ok_and(|o| !o.status.success()) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = shoal_netns::run_in(&a, || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.send_to(b"MARKER-3", "10.98.0.2:4790")
    })
    .unwrap();
    assert!(r.is_err(), "sent without the device: {r:?}");
    let (done, wait) = mpsc::channel();
    db.send(Cmd::Stop(done)).unwrap();
    wait.recv().unwrap();
}
