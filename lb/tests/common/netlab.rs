//! A small routed topology in fresh network namespaces for the kernel tests.
//!
//! ```text
//!   client 10.200.0.2/30 --- 10.200.0.1 [router] 10.200.i.1 --- 10.200.i.2/30 backend i
//!                                       VIP 10.96.0.10: local route on lo, LB table here
//! ```
//! Every namespace is named `shoal-t-lb-<pid>-<n>` and removed by [`Lab`]'s Drop, also when a
//! test panics. Nothing is done outside these namespaces: veth pairs are created inside the
//! router with their peer moved straight into the other namespace.

use std::io::{self, Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 2);
/// Port the backends listen on (TCP and UDP).
pub const TARGET_PORT: u16 = 8080;

/// Fails (never skips) when the machine cannot run the kernel tests.
pub fn require_root_and_nft() {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let root = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(2))
        == Some("0");
    assert!(
        root,
        "the shoal-lb kernel tests must run as root (they create network namespaces)"
    );
    match Command::new("nft").arg("--version").output() {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "`nft --version` failed: {}; run the install step: apt-get install -y nftables",
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => {
            panic!("`nft` not found ({e}); run the install step: apt-get install -y nftables")
        }
    }
}

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A unique namespace name for this test process.
pub fn unique_ns() -> String {
    unique_ns_with("shoal-t-lb")
}

/// A unique namespace name `<prefix>-<pid>-<n>`.
pub fn unique_ns_with(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs `ip ARGS...`; panics with its stderr on failure.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Removes its namespaces (and stops its server threads) when dropped.
#[derive(Default)]
pub struct NsGuard {
    pub names: Vec<String>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl NsGuard {
    /// Creates a fresh namespace with `lo` up and registers it for removal.
    pub fn create(&mut self) -> String {
        self.create_with("shoal-t-lb")
    }

    /// Like [`NsGuard::create`] with the name `<prefix>-<pid>-<n>`.
    pub fn create_with(&mut self, prefix: &str) -> String {
        let name = unique_ns_with(prefix);
        self.create_named(&name);
        name
    }

    /// Creates the namespace `name` (which must not exist) and registers it for removal.
    pub fn create_named(&mut self, name: &str) {
        shoal_netns::create(name).unwrap_or_else(|e| panic!("creating {name}: {e}"));
        if !self.names.iter().any(|n| n == name) {
            self.names.push(name.to_string());
        }
        ip(&["-n", name, "link", "set", "lo", "up"]);
    }
}

impl Drop for NsGuard {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        for n in self.names.drain(..) {
            if let Err(e) = shoal_netns::delete(&n) {
                eprintln!("cleanup: deleting namespace {n}: {e}");
            }
        }
    }
}

pub struct Backend {
    pub name: String,
    pub ns: String,
    pub addr: Ipv4Addr,
    /// The router's address on this backend's link (the hairpin masquerade source).
    pub gateway: Ipv4Addr,
}

pub struct Lab {
    pub guard: NsGuard,
    pub router: String,
    pub client: String,
    pub backends: Vec<Backend>,
}

/// Connects a new namespace to the router over a /30: `10.200.<net>.1` on the router side,
/// `10.200.<net>.2` on the other, default route via the router.
fn attach(guard: &mut NsGuard, router: &str, net: u8) -> (String, Ipv4Addr, Ipv4Addr) {
    let ns = guard.create();
    let here = Ipv4Addr::new(10, 200, net, 2);
    let gw = Ipv4Addr::new(10, 200, net, 1);
    let rdev = format!("to{net}");
    ip(&[
        "-n", router, "link", "add", &rdev, "type", "veth", "peer", "name", "eth0", "netns", &ns,
    ]);
    ip(&[
        "-n",
        router,
        "addr",
        "add",
        &format!("{gw}/30"),
        "dev",
        &rdev,
    ]);
    ip(&["-n", router, "link", "set", &rdev, "up"]);
    ip(&[
        "-n",
        &ns,
        "addr",
        "add",
        &format!("{here}/30"),
        "dev",
        "eth0",
    ]);
    ip(&["-n", &ns, "link", "set", "eth0", "up"]);
    ip(&["-n", &ns, "route", "add", "default", "via", &gw.to_string()]);
    (ns, here, gw)
}

impl Lab {
    /// Router, client and `n` backends, each backend serving TCP and UDP on
    /// [`TARGET_PORT`] and answering `"<name> <peer address>"` (TCP: that line, then an echo of
    /// whatever the client sends).
    pub fn new(n: u8) -> Lab {
        require_root_and_nft();
        let mut guard = NsGuard::default();
        let router = guard.create();
        shoal_netns::set_sysctl(&router, "net.ipv4.ip_forward", "1").unwrap();
        add_local_vip(&router, VIP);
        let (client, addr, _) = attach(&mut guard, &router, 0);
        assert_eq!(addr, CLIENT);
        let mut backends = Vec::new();
        for i in 1..=n {
            let (ns, addr, gateway) = attach(&mut guard, &router, i);
            let name = format!("b{i}");
            serve(&mut guard, &ns, &name);
            backends.push(Backend {
                name,
                ns,
                addr,
                gateway,
            });
        }
        Lab {
            guard,
            router,
            client,
            backends,
        }
    }

    pub fn backend_addrs(&self) -> Vec<Ipv4Addr> {
        self.backends.iter().map(|b| b.addr).collect()
    }
}

/// Makes `vip` a local address of `router` the way Shoal does (no dummy device here):
/// `ip route add local VIP/32 dev lo table local`.
pub fn add_local_vip(router: &str, vip: Ipv4Addr) {
    ip(&[
        "-n",
        router,
        "route",
        "add",
        "local",
        &format!("{vip}/32"),
        "dev",
        "lo",
        "table",
        "local",
    ]);
}

/// Binds TCP and UDP servers inside `ns` and serves them on threads of the test process.
fn serve(guard: &mut NsGuard, ns: &str, name: &str) {
    let any = SocketAddr::from((Ipv4Addr::UNSPECIFIED, TARGET_PORT));
    let (tcp, udp) = shoal_netns::run_in(ns, move || {
        (
            TcpListener::bind(any).expect("bind tcp"),
            UdpSocket::bind(any).expect("bind udp"),
        )
    })
    .unwrap();
    tcp.set_nonblocking(true).unwrap();
    udp.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();

    let stop = guard.stop.clone();
    let me = name.to_string();
    guard.threads.push(std::thread::spawn(move || {
        while !stop.load(Ordering::SeqCst) {
            match tcp.accept() {
                Ok((s, peer)) => {
                    let greeting = format!("{me} {}\n", peer.ip());
                    std::thread::spawn(move || echo(s, &greeting));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) => panic!("accept: {e}"),
            }
        }
    }));

    let stop = guard.stop.clone();
    let me = name.to_string();
    guard.threads.push(std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while !stop.load(Ordering::SeqCst) {
            match udp.recv_from(&mut buf) {
                Ok((_, peer)) => {
                    let _ = udp.send_to(format!("{me} {}", peer.ip()).as_bytes(), peer);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => panic!("udp recv: {e}"),
            }
        }
    }));
}

/// One TCP connection on the server side: greet with a line, then echo until EOF.
fn echo(mut s: TcpStream, greeting: &str) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    if s.write_all(greeting.as_bytes()).is_err() {
        return;
    }
    let mut buf = [0u8; 512];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 || s.write_all(&buf[..n]).is_err() {
            break;
        }
    }
}

/// One TCP request: connect, half-close, read the greeting until EOF.
pub fn tcp_get(dst: Ipv4Addr, port: u16, timeout: Duration) -> io::Result<String> {
    let mut s = tcp_connect(dst, port, timeout)?;
    s.shutdown(std::net::Shutdown::Write)?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out.trim_end().to_string())
}

/// A TCP connection with read timeouts set.
pub fn tcp_connect(dst: Ipv4Addr, port: u16, timeout: Duration) -> io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&SocketAddrV4::new(dst, port).into(), timeout)?;
    s.set_read_timeout(Some(timeout))?;
    Ok(s)
}

/// One UDP request from a new socket (so a new conntrack entry): send, await the answer.
pub fn udp_get(dst: Ipv4Addr, port: u16, timeout: Duration) -> io::Result<String> {
    let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
    s.connect(SocketAddrV4::new(dst, port))?;
    s.set_read_timeout(Some(timeout))?;
    s.send(b"hello")?;
    let mut buf = [0u8; 512];
    let n = s.recv(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// Runs an async LB call from a sync test.
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}
