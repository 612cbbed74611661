//! Guest program of the kernel WireGuard test (tests/tests/wg_vm.rs): run as init's test
//! program on Debian's cloud kernel under qemu (scripts/ipvs-vm.sh with
//! SHOAL_VM_EXAMPLE=wg_guest), where the wireguard module exists. Two namespaces joined by a
//! veth, one device in each made by `shoal_wg::Device` with the kernel backend (no fallback
//! allowed): a datagram to the routed UDP port crosses inside WireGuard (the peers' counters
//! and handshake say so), a key rotation brings it back, stopping deletes the link. Prints
//! `WG-TEST: PASS` or `WG-TEST: FAIL <reason>`.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use shoal_wg::{Backend, Device, DeviceSpec, Key, PeerSpec, PeerStatus};

const DPORT: u16 = 4790;

enum Cmd {
    Apply(DeviceSpec, mpsc::Sender<Result<Vec<String>, String>>),
    Peers(mpsc::Sender<Vec<PeerStatus>>),
    Stop(mpsc::Sender<()>),
}

fn ip(args: &[&str]) -> Result<(), String> {
    let o = Command::new("/sbin/ip")
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    if o.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        ))
    }
}

/// A device in `ns` on a thread of its own; Err when it cannot be made.
fn device_in(ns: &str, spec: DeviceSpec) -> Result<mpsc::Sender<Cmd>, String> {
    let (tx, rx) = mpsc::channel::<Cmd>();
    let (ready_tx, ready_rx) = mpsc::channel::<Result<&'static str, String>>();
    let ns = ns.to_string();
    std::thread::spawn(move || {
        let _ = shoal_netns::run_in(&ns, move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let mut dev = match Device::create(&spec).await {
                    Ok(d) => d,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(dev.backend()));
                while let Ok(c) = rx.recv() {
                    match c {
                        Cmd::Apply(s, done) => {
                            let _ = done.send(dev.apply(&s).await.map_err(|e| e.to_string()));
                        }
                        Cmd::Peers(done) => {
                            let _ = done.send(dev.peers().await);
                        }
                        Cmd::Stop(done) => {
                            dev.stop().await;
                            let _ = done.send(());
                            return;
                        }
                    }
                }
            })
        });
    });
    match ready_rx.recv_timeout(Duration::from_secs(30)) {
        Ok(Ok("kernel")) => Ok(tx),
        Ok(Ok(other)) => Err(format!("backend {other}, not kernel")),
        Ok(Err(e)) => Err(e),
        Err(_) => Err("device not ready in 30 s".into()),
    }
}

fn spec(key: Key, peer: Key, peer_addr: Ipv4Addr) -> DeviceSpec {
    DeviceSpec {
        ifname: shoal_wg::IFNAME.into(),
        backend: Backend::Kernel,
        port: shoal_wg::DEFAULT_PORT,
        private_key: key,
        underlay_dev: "veth0".into(),
        route_udp_dport: DPORT,
        peers: vec![PeerSpec {
            public_key: peer.public(),
            endpoint: SocketAddrV4::new(peer_addr, shoal_wg::DEFAULT_PORT),
            allowed: peer_addr,
        }],
    }
}

fn delivered(from: &str, listener: &UdpSocket, to: Ipv4Addr, marker: &[u8]) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut buf = [0u8; 1500];
    while Instant::now() < deadline {
        let m = marker.to_vec();
        let _ = shoal_netns::run_in(from, move || {
            UdpSocket::bind("0.0.0.0:0").and_then(|s| s.send_to(&m, (to, DPORT)))
        });
        if let Ok((n, _)) = listener.recv_from(&mut buf)
            && &buf[..n] == marker
        {
            return true;
        }
    }
    false
}

fn ask<T>(dev: &mpsc::Sender<Cmd>, f: impl FnOnce(mpsc::Sender<T>) -> Cmd) -> Result<T, String> {
    let (tx, rx) = mpsc::channel();
    dev.send(f(tx))
        .map_err(|_| "device thread gone".to_string())?;
    rx.recv_timeout(Duration::from_secs(30))
        .map_err(|_| "no answer from the device thread".to_string())
}

fn run() -> Result<(), String> {
    let (a, b) = ("wga", "wgb");
    for ns in [a, b] {
        shoal_netns::create(ns).map_err(|e| format!("create {ns}: {e}"))?;
    }
    ip(&[
        "-n", a, "link", "add", "veth0", "type", "veth", "peer", "name", "veth0", "netns", b,
    ])?;
    for (ns, addr) in [(a, "10.98.0.1/24"), (b, "10.98.0.2/24")] {
        ip(&["-n", ns, "addr", "add", addr, "dev", "veth0"])?;
        ip(&["-n", ns, "link", "set", "veth0", "up"])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
    }
    let (addr_a, addr_b) = (Ipv4Addr::new(10, 98, 0, 1), Ipv4Addr::new(10, 98, 0, 2));
    // Fixed keys: a freshly booted emulated guest may not have its random pool ready yet
    // (getrandom would block), and the test needs no secrecy.
    let (ka, kb) = (Key([0x11; 32]), Key([0x22; 32]));
    println!("guest: namespaces and veth ready");
    let da = device_in(a, spec(ka, kb, addr_b))?;
    let db = device_in(b, spec(kb, ka, addr_a))?;
    println!("guest: kernel WireGuard devices up in {a} and {b}");
    let listener = shoal_netns::run_in(b, || UdpSocket::bind(("0.0.0.0", DPORT)))
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    listener
        .set_read_timeout(Some(Duration::from_millis(300)))
        .map_err(|e| e.to_string())?;
    if !delivered(a, &listener, addr_b, b"MARKER-1") {
        return Err("no datagram through kernel WireGuard".into());
    }
    let peers = ask(&da, Cmd::Peers)?;
    let p = peers.first().ok_or("no peer on a")?;
    if p.last_handshake.is_none() || p.tx_bytes == 0 {
        return Err(format!("peer without handshake or traffic: {p:?}"));
    }
    println!(
        "guest: through WireGuard; a's peer tx {} rx {} bytes",
        p.tx_bytes, p.rx_bytes
    );

    // Rotation on a, then b learns the new key.
    let ka2 = Key([0x33; 32]);
    let changes = ask(&da, |t| Cmd::Apply(spec(ka2, kb, addr_b), t))??;
    if !changes.iter().any(|c| c.contains("private key")) {
        return Err(format!("no key change: {changes:?}"));
    }
    ask(&db, |t| Cmd::Apply(spec(kb, ka2, addr_a), t))??;
    if !delivered(a, &listener, addr_b, b"MARKER-2") {
        return Err("no datagram after the rotation".into());
    }
    println!("guest: rotation kept the path");

    ask(&da, Cmd::Stop)?;
    let links = Command::new("/sbin/ip")
        .args(["-n", a, "link", "show", shoal_wg::IFNAME])
        .output()
        .map_err(|e| e.to_string())?;
    if links.status.success() {
        return Err("the kernel link outlived stop".into());
    }
    let sent = shoal_netns::run_in(a, move || {
        UdpSocket::bind("0.0.0.0:0").and_then(|s| s.send_to(b"MARKER-3", (addr_b, DPORT)))
    })
    .map_err(|e| e.to_string())?;
    if sent.is_ok() {
        return Err("sent to the encrypted port without a device".into());
    }
    ask(&db, Cmd::Stop)?;
    Ok(())
}

fn main() {
    match run() {
        Ok(()) => println!("WG-TEST: PASS"),
        Err(e) => println!("WG-TEST: FAIL {e}"),
    }
}
