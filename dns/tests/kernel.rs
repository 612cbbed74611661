//! Kernel tests: real namespaces, the resolver bound inside them, and real clients (`dig`,
//! glibc's `getent`) run there with `ip netns exec`. Upstreams are fake DNS servers on
//! 127.0.0.1 in the test process's own namespace. Needs root; skips with a reason otherwise.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};
use shoal_dns::{DnsConfig, DnsError, Records, Resolver};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc_geteuid() == 0 }
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

macro_rules! require_root {
    ($name:literal) => {
        if !is_root() {
            // CI sets SHOAL_REQUIRE_KERNEL_TESTS=1 so that a skip is a failure.
            if std::env::var_os("SHOAL_REQUIRE_KERNEL_TESTS").is_some() {
                panic!("{} must run but needs root", $name);
            }
            eprintln!("SKIP {}: needs root to create network namespaces", $name);
            return;
        }
    };
}

/// A test namespace with `lo` up; deleted (with /etc/netns/NAME) on drop, even on panic.
struct Ns {
    name: String,
}

impl Ns {
    fn new() -> Ns {
        let ns = Ns::without_lo();
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// A fresh namespace whose `lo` stays down (127.0.0.11 cannot be bound there).
    fn without_lo() -> Ns {
        let name = format!(
            "shoal-t-dns4-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        shoal_netns::create(&name).expect("create namespace");
        Ns { name }
    }

    fn ip(&self, args: &[&str]) {
        let out = Command::new("ip")
            .arg("-n")
            .arg(&self.name)
            .args(args)
            .output()
            .expect("run ip");
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn etc_dir(&self) -> std::path::PathBuf {
        std::path::Path::new("/etc/netns").join(&self.name)
    }

    /// Runs `cmd args` inside the namespace (async, so the resolver keeps running).
    async fn exec(&self, cmd: &str, args: &[&str]) -> (bool, String) {
        let out = tokio::process::Command::new("ip")
            .args(["netns", "exec", &self.name, cmd])
            .args(args)
            .output()
            .await
            .expect("ip netns exec");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    async fn dig(&self, args: &[&str]) -> String {
        let mut all = vec!["@127.0.0.11", "+time=4", "+tries=1"];
        all.extend_from_slice(args);
        let (ok, text) = self.exec("dig", &all).await;
        assert!(ok, "dig {args:?} failed: {text}");
        text
    }

    async fn dig_short(&self, args: &[&str]) -> Vec<String> {
        let mut all = vec!["+short"];
        all.extend_from_slice(args);
        let mut lines: Vec<String> = self.dig(&all).await.lines().map(str::to_string).collect();
        lines.sort();
        lines
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(self.etc_dir());
        if let Err(e) = shoal_netns::delete(&self.name) {
            eprintln!("cleanup of {}: {e}", self.name);
        }
    }
}

fn ip(d: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 0, d)
}

fn view() -> Arc<Records> {
    let many: Vec<Ipv4Addr> = (0..100).map(|i| Ipv4Addr::new(10, 1, 0, i)).collect();
    Arc::new(
        Records::builder()
            .a("web", &[ip(2)], false)
            .a("tasks.web", &[ip(3), ip(4)], true)
            .a("many", &many, false)
            .ptr(ip(3), "web.1.abc")
            .build(),
    )
}

fn status(text: &str) -> &str {
    let at = text.find("status: ").expect("dig status line") + 8;
    text[at..].split(',').next().unwrap()
}

fn answer_count(text: &str) -> usize {
    let at = text.find("ANSWER: ").expect("dig counts line") + 8;
    text[at..].split(',').next().unwrap().parse().unwrap()
}

#[tokio::test]
async fn local_names_over_udp_and_tcp() {
    require_root!("local_names_over_udp_and_tcp");
    let ns = Ns::new();
    let resolver = Resolver::new(DnsConfig::default());
    resolver.attach("c1", &ns.name, view()).await.unwrap();
    assert_eq!(resolver.attached(), vec!["c1".to_string()]);

    assert_eq!(ns.dig_short(&["web"]).await, vec!["10.0.0.2"]);
    assert_eq!(ns.dig_short(&["WEB."]).await, vec!["10.0.0.2"]);
    assert_eq!(ns.dig_short(&["+tcp", "web"]).await, vec!["10.0.0.2"]);
    assert_eq!(
        ns.dig_short(&["tasks.web"]).await,
        vec!["10.0.0.3", "10.0.0.4"]
    );
    assert_eq!(ns.dig_short(&["-x", "10.0.0.3"]).await, vec!["web.1.abc."]);
    assert_eq!(
        ns.dig_short(&["+tcp", "-x", "10.0.0.3"]).await,
        vec!["web.1.abc."]
    );

    // Answers carry the configured TTL.
    let text = ns.dig(&["+noall", "+answer", "web"]).await;
    assert!(text.contains("web.\t\t\t5\tIN\tA\t10.0.0.2"), "{text}");

    // One zone whose apex is the root: its SOA answers `. SOA` and is the authority of
    // every negative answer.
    let soa = ".\t\t\t5\tIN\tSOA\tns.shoal.internal. hostmaster.shoal.internal. 1 3600 600 86400 5";
    let text = ns.dig(&[".", "SOA"]).await;
    assert_eq!(status(&text), "NOERROR", "{text}");
    assert!(
        text.contains(&format!("ANSWER SECTION:\n{soa}\n")),
        "{text}"
    );
    // NODATA for AAAA, and for SOA of a service name (not an apex): NOERROR, no answer,
    // the SOA in authority.
    for rtype in ["AAAA", "SOA"] {
        let text = ns.dig(&["web", rtype]).await;
        assert_eq!(status(&text), "NOERROR", "{text}");
        assert_eq!(answer_count(&text), 0);
        assert!(
            text.contains(&format!("AUTHORITY SECTION:\n{soa}\n")),
            "{text}"
        );
    }

    // NXDOMAIN (no upstreams) with the same SOA.
    for extra in [&[][..], &["+tcp"][..]] {
        let mut args = extra.to_vec();
        args.push("nope.example");
        let text = ns.dig(&args).await;
        assert_eq!(status(&text), "NXDOMAIN", "{text}");
        assert!(
            text.contains(&format!("AUTHORITY SECTION:\n{soa}\n")),
            "{text}"
        );
    }

    // EDNS is echoed; without it there is no OPT.
    let text = ns.dig(&["+bufsize=1232", "web"]).await;
    assert!(
        text.contains("OPT PSEUDOSECTION") && text.contains("udp: 4096"),
        "{text}"
    );
    let text = ns.dig(&["+noedns", "web"]).await;
    assert!(!text.contains("OPT PSEUDOSECTION"), "{text}");

    resolver.detach("c1").await;
    assert!(resolver.attached().is_empty());
}

#[tokio::test]
async fn large_answer_truncates_over_udp_only() {
    require_root!("large_answer_truncates_over_udp_only");
    let ns = Ns::new();
    let resolver = Resolver::new(DnsConfig::default());
    resolver.attach("c1", &ns.name, view()).await.unwrap();

    // 100 A records (about 1.6 kB): over UDP without EDNS, or with 1232, truncated to the
    // whole records that fit: (512 - 12 - 10) / 16 = 30, (1232 - 12 - 10 - 11) / 16 = 74.
    for (size, fit) in [("+noedns", 30), ("+bufsize=1232", 74)] {
        let text = ns.dig(&["+ignore", size, "many"]).await;
        assert!(text.contains("flags: qr aa tc rd;"), "{size}: {text}");
        assert_eq!(answer_count(&text), fit, "{text}");
    }
    // A large enough EDNS buffer gets everything over UDP.
    let text = ns.dig(&["+ignore", "+bufsize=4096", "many"]).await;
    assert!(!text.contains(" tc "), "{text}");
    assert_eq!(answer_count(&text), 100, "{text}");
    // TCP, and dig's own retry over TCP after TC, get everything.
    assert_eq!(ns.dig_short(&["+tcp", "many"]).await.len(), 100);
    assert_eq!(ns.dig_short(&["many"]).await.len(), 100);

    resolver.detach("c1").await;
}

/// Detach then attach in the same namespace while other threads spawn processes, as the
/// agent does (nft, tasks) and as the other tests here do: a spawned child holds a copy of
/// every descriptor until its exec, so the socket just closed can still be bound for a
/// moment. Failed in CI once (EADDRINUSE on the re-attach) before attach retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reattach_while_other_threads_spawn_processes() {
    require_root!("reattach_while_other_threads_spawn_processes");
    let ns = Ns::new();
    let resolver = Resolver::new(DnsConfig::default());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let spawned = Arc::new(AtomicUsize::new(0));
    let spawners: Vec<_> = (0..2)
        .map(|_| {
            let (stop, spawned) = (stop.clone(), spawned.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let _ = Command::new("true").status();
                    spawned.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let mut result = Ok(());
    for round in 0..300 {
        if let Err(e) = resolver.attach("c1", &ns.name, view()).await {
            result = Err(format!("attach {round}: {e}"));
            break;
        }
        resolver.detach("c1").await;
    }
    stop.store(true, Ordering::Relaxed);
    for t in spawners {
        t.join().unwrap();
    }
    result.unwrap();
    assert!(spawned.load(Ordering::Relaxed) > 0);
    // And it still serves after all that.
    resolver.attach("c1", &ns.name, view()).await.unwrap();
    assert_eq!(ns.dig_short(&["web"]).await, vec!["10.0.0.2"]);
    resolver.detach("c1").await;
}

#[tokio::test]
async fn update_detach_reattach_and_errors() {
    require_root!("update_detach_reattach_and_errors");
    let ns = Ns::new();
    let resolver = Resolver::new(DnsConfig::default());
    resolver.attach("c1", &ns.name, view()).await.unwrap();
    assert_eq!(ns.dig_short(&["web"]).await, vec!["10.0.0.2"]);

    // update() swaps the whole view.
    let next = Records::builder()
        .a("web", &[ip(9)], false)
        .a("db", &[ip(8)], false)
        .build();
    resolver.update("c1", Arc::new(next)).unwrap();
    assert_eq!(ns.dig_short(&["web"]).await, vec!["10.0.0.9"]);
    assert_eq!(ns.dig_short(&["+tcp", "db"]).await, vec!["10.0.0.8"]);
    assert!(ns.dig_short(&["many"]).await.is_empty());

    // The same id twice; another id on a taken port; unknown namespace; lo down.
    let err = resolver.attach("c1", &ns.name, view()).await.unwrap_err();
    assert!(matches!(err, DnsError::AlreadyAttached(_)), "{err}");
    let err = resolver.attach("c2", &ns.name, view()).await.unwrap_err();
    assert!(matches!(err, DnsError::Bind { .. }), "{err}");
    assert!(err.to_string().contains(&ns.name), "{err}");
    let err = resolver
        .attach("c3", "shoal-t-dns-missing", view())
        .await
        .unwrap_err();
    assert!(matches!(err, DnsError::Netns { .. }), "{err}");
    let down = Ns::without_lo();
    let err = resolver.attach("c4", &down.name, view()).await.unwrap_err();
    assert!(matches!(err, DnsError::LoopbackDown { .. }), "{err}");
    assert!(err.to_string().contains(&down.name), "{err}");
    // The failed attempt left nothing bound: with lo up it attaches.
    down.ip(&["link", "set", "lo", "up"]);
    resolver.attach("c4", &down.name, view()).await.unwrap();
    resolver.detach("c4").await;
    assert_eq!(resolver.attached(), vec!["c1".to_string()]);

    // detach() closes both sockets: the port is free for a new attachment at once.
    resolver.detach("c1").await;
    resolver.detach("c1").await;
    assert!(matches!(
        resolver.update("c1", view()),
        Err(DnsError::NotAttached(_))
    ));
    let text = ns
        .exec("dig", &["@127.0.0.11", "+time=1", "+tries=1", "web"])
        .await
        .1;
    assert!(
        !text.contains("status: NOERROR"),
        "still answering after detach: {text}"
    );
    resolver.attach("c1", &ns.name, view()).await.unwrap();
    assert_eq!(ns.dig_short(&["+tcp", "web"]).await, vec!["10.0.0.2"]);
    resolver.detach("c1").await;

    // A namespace given as a path (as /proc/PID/ns/net would be).
    let path = format!("/run/netns/{}", ns.name);
    resolver.attach("c7", &path, view()).await.unwrap();
    assert_eq!(ns.dig_short(&["web"]).await, vec!["10.0.0.2"]);
    resolver.detach("c7").await;

    // Dropping the last handle stops everything too.
    let other = Resolver::new(DnsConfig::default());
    other.attach("c5", &ns.name, view()).await.unwrap();
    drop(other);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let again = Resolver::new(DnsConfig::default());
    again.attach("c6", &ns.name, view()).await.unwrap();
    again.detach("c6").await;
}

#[tokio::test]
async fn tcp_pipelining_and_idle_timeout() {
    require_root!("tcp_pipelining_and_idle_timeout");
    let ns = Ns::new();
    let resolver = Resolver::new(DnsConfig {
        tcp_idle_timeout: Duration::from_millis(300),
        ..DnsConfig::default()
    });
    resolver.attach("c1", &ns.name, view()).await.unwrap();
    let name = ns.name.clone();
    let result = tokio::task::spawn_blocking(move || {
        let mut stream =
            shoal_netns::run_in(&name, || std::net::TcpStream::connect(("127.0.0.11", 53)))
                .unwrap()
                .unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        // Two queries written back to back, two answers read.
        let mut frames = Vec::new();
        for (id, qname) in [(1u16, "web."), (2, "tasks.web.")] {
            let mut m = Message::query();
            m.metadata.id = id;
            m.add_query(hickory_proto::op::Query::query(
                hickory_proto::rr::Name::from_ascii(qname).unwrap(),
                RecordType::A,
            ));
            let bytes = m.to_vec().unwrap();
            frames.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
            frames.extend_from_slice(&bytes);
        }
        stream.write_all(&frames).unwrap();
        let mut answers = Vec::new();
        for _ in 0..2 {
            let mut len = [0u8; 2];
            stream.read_exact(&mut len).unwrap();
            let mut buf = vec![0u8; u16::from_be_bytes(len).into()];
            stream.read_exact(&mut buf).unwrap();
            let m = Message::from_vec(&buf).unwrap();
            answers.push((m.metadata.id, m.answers.len()));
        }
        // Idle: the server closes the connection.
        let start = Instant::now();
        let mut rest = [0u8; 1];
        let n = stream.read(&mut rest).unwrap_or(0);
        (answers, n, start.elapsed())
    })
    .await
    .unwrap();
    assert_eq!(result.0, vec![(1, 1), (2, 2)]);
    assert_eq!(result.1, 0, "connection not closed");
    assert!(
        result.2 < Duration::from_secs(2),
        "closed after {:?}",
        result.2
    );
    resolver.detach("c1").await;
}

/// A fake upstream on 127.0.0.1 (UDP and TCP on one port): answers every query with `answer`
/// (TTL 60), or never answers when `answer` is `None`. Counts the queries it saw.
struct Upstream {
    addr: SocketAddr,
    seen: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn fake_reply(query: &[u8], answer: Ipv4Addr) -> Option<Vec<u8>> {
    let q = Message::from_vec(query).ok()?;
    let mut m = Message::response(q.metadata.id, q.metadata.op_code);
    m.metadata.recursion_desired = q.metadata.recursion_desired;
    m.metadata.recursion_available = true;
    m.metadata.message_type = MessageType::Response;
    for query in &q.queries {
        m.add_query(query.clone());
        if query.query_type() == RecordType::A {
            m.add_answer(Record::from_rdata(
                query.name().clone(),
                60,
                RData::A(A(answer)),
            ));
        }
    }
    m.to_vec().ok()
}

async fn upstream(answer: Option<Ipv4Addr>) -> Upstream {
    let (udp, tcp) = loop {
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let port = udp.local_addr().unwrap().port();
        if let Ok(tcp) = TcpListener::bind(("127.0.0.1", port)).await {
            break (udp, tcp);
        }
    };
    let addr = udp.local_addr().unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let seen_udp = seen.clone();
    let udp_task = tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, peer)) = udp.recv_from(&mut buf).await {
            seen_udp.fetch_add(1, Ordering::SeqCst);
            if let Some(reply) = answer.and_then(|a| fake_reply(&buf[..n], a)) {
                let _ = udp.send_to(&reply, peer).await;
            }
        }
    });
    let seen_tcp = seen.clone();
    let tcp_task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut stream, _)) = tcp.accept().await {
            let seen = seen_tcp.clone();
            held.push(tokio::spawn(async move {
                let mut len = [0u8; 2];
                while stream.read_exact(&mut len).await.is_ok() {
                    let mut buf = vec![0u8; u16::from_be_bytes(len).into()];
                    if stream.read_exact(&mut buf).await.is_err() {
                        return;
                    }
                    seen.fetch_add(1, Ordering::SeqCst);
                    let Some(reply) = answer.and_then(|a| fake_reply(&buf, a)) else {
                        // Dead: hold the connection open, never answer.
                        tokio::time::sleep(Duration::from_secs(60)).await;
                        return;
                    };
                    let mut frame = (reply.len() as u16).to_be_bytes().to_vec();
                    frame.extend_from_slice(&reply);
                    if stream.write_all(&frame).await.is_err() {
                        return;
                    }
                }
            }));
        }
    });
    Upstream {
        addr,
        seen,
        tasks: vec![udp_task, tcp_task],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_failover_and_servfail() {
    require_root!("forwarding_failover_and_servfail");
    let good = upstream(Some(Ipv4Addr::new(192, 0, 2, 7))).await;
    let dead = upstream(None).await;
    let ns = Ns::new();
    // Without the cache: every query must reach the upstreams (see `upstream_answers_are_cached`).
    let config = |upstreams: Vec<SocketAddr>| DnsConfig {
        upstreams,
        upstream_timeout: Duration::from_millis(400),
        cache_size: 0,
        ..DnsConfig::default()
    };

    // A port nobody listens on (fails fast: ICMP unreachable / RST).
    let closed = {
        let probe = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap()
    };

    // Closed, then dead, then good: failover over UDP and TCP; local names stay local.
    let resolver = Resolver::new(config(vec![closed, dead.addr, good.addr]));
    resolver.attach("c1", &ns.name, view()).await.unwrap();
    assert_eq!(ns.dig_short(&["example.com"]).await, vec!["192.0.2.7"]);
    assert_eq!(dead.seen.load(Ordering::SeqCst), 1);
    assert_eq!(good.seen.load(Ordering::SeqCst), 1);
    assert_eq!(
        ns.dig_short(&["+tcp", "Example.COM"]).await,
        vec!["192.0.2.7"]
    );
    assert_eq!(dead.seen.load(Ordering::SeqCst), 2);
    assert_eq!(good.seen.load(Ordering::SeqCst), 2);
    assert_eq!(ns.dig_short(&["web"]).await, vec!["10.0.0.2"]);
    assert_eq!(good.seen.load(Ordering::SeqCst), 2);
    // The relayed answer keeps the upstream's records and the client's id (dig checks).
    let text = ns.dig(&["example.com"]).await;
    assert_eq!(status(&text), "NOERROR", "{text}");
    assert!(text.contains("flags: qr rd ra;"), "{text}");
    assert!(
        text.contains("example.com.\t\t60\tIN\tA\t192.0.2.7"),
        "{text}"
    );
    // A view that must not forward.
    resolver
        .update("c1", Arc::new(Records::builder().forward(false).build()))
        .unwrap();
    let text = ns.dig(&["example.com"]).await;
    assert_eq!(status(&text), "NXDOMAIN", "{text}");
    resolver.detach("c1").await;

    // Only dead upstreams: SERVFAIL, and a pending forward does not stall local answers.
    let resolver = Resolver::new(DnsConfig {
        upstream_timeout: Duration::from_millis(3000),
        ..config(vec![dead.addr])
    });
    resolver.attach("c1", &ns.name, view()).await.unwrap();
    let slow = {
        let ns_name = ns.name.clone();
        tokio::spawn(async move {
            let out = tokio::process::Command::new("ip")
                .args(["netns", "exec", &ns_name, "dig", "@127.0.0.11"])
                .args(["+time=5", "+tries=1", "example.org"])
                .output()
                .await
                .unwrap();
            String::from_utf8_lossy(&out.stdout).to_string()
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let start = Instant::now();
    assert_eq!(ns.dig_short(&["web"]).await, vec!["10.0.0.2"]);
    // Well before the pending forward gives up (3 s after it started).
    assert!(
        start.elapsed() < Duration::from_millis(2000),
        "{:?}",
        start.elapsed()
    );
    let text = slow.await.unwrap();
    assert_eq!(status(&text), "SERVFAIL", "{text}");
    let text = ns.dig(&["+tcp", "example.org"]).await;
    assert_eq!(status(&text), "SERVFAIL", "{text}");
    resolver.detach("c1").await;
}

#[tokio::test]
async fn glibc_resolves_through_the_resolver() {
    require_root!("glibc_resolves_through_the_resolver");
    let ns = Ns::new();
    // glibc skips A lookups in a namespace without a configured IPv4 address besides lo.
    ns.ip(&["link", "add", "sd0", "type", "veth", "peer", "name", "sd1"]);
    ns.ip(&["addr", "add", "10.0.0.100/24", "dev", "sd0"]);
    ns.ip(&["link", "set", "sd0", "up"]);
    ns.ip(&["link", "set", "sd1", "up"]);
    std::fs::create_dir_all(ns.etc_dir()).unwrap();
    std::fs::write(
        ns.etc_dir().join("resolv.conf"),
        "nameserver 127.0.0.11\noptions timeout:2 attempts:1\n",
    )
    .unwrap();
    let resolver = Resolver::new(DnsConfig::default());
    resolver.attach("c1", &ns.name, view()).await.unwrap();

    let (ok, text) = ns.exec("getent", &["hosts", "web"]).await;
    assert!(ok, "{text}");
    assert_eq!(
        text.split_whitespace().collect::<Vec<_>>(),
        ["10.0.0.2", "web"]
    );
    let (ok, text) = ns.exec("getent", &["ahostsv4", "tasks.web"]).await;
    assert!(
        ok && text.contains("10.0.0.3") && text.contains("10.0.0.4"),
        "{text}"
    );
    let (ok, text) = ns.exec("getent", &["hosts", "10.0.0.3"]).await;
    assert!(ok && text.contains("web.1.abc"), "{text}");
    let (ok, text) = ns.exec("getent", &["hosts", "nope-nothing"]).await;
    assert!(!ok, "{text}");
    resolver.detach("c1").await;
}

/// CPU time (user + system) of this process so far.
fn process_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime) are at 11 and 12 after the command name.
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

/// Throughput and server CPU per query with dnsperf (run in release:
/// `cargo test --release -p shoal-dns --test kernel dnsperf -- --ignored --nocapture`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark; needs dnsperf"]
async fn dnsperf_local_names() {
    require_root!("dnsperf_local_names");
    let ns = Ns::new();
    let resolver = Resolver::new(DnsConfig::default());
    resolver.attach("c1", &ns.name, view()).await.unwrap();
    let dir = tempfile_dir();
    let file = dir.join("queries");
    std::fs::write(
        &file,
        "web A\ntasks.web A\nweb AAAA\n3.0.0.10.in-addr.arpa PTR\n",
    )
    .unwrap();
    let extra = std::env::var("SHOAL_DNSPERF_ARGS").unwrap_or_else(|_| "-l 5 -c 8 -q 200".into());
    let mut args = vec!["-s", "127.0.0.11", "-d", file.to_str().unwrap()];
    args.extend(extra.split_whitespace());
    let cpu = process_cpu();
    let (ok, text) = ns.exec("dnsperf", &args).await;
    let used = process_cpu() - cpu;
    let _ = std::fs::remove_dir_all(&dir);
    assert!(ok, "{text}");
    println!("{text}");
    let snmp = ns.exec("cat", &["/proc/net/snmp"]).await.1;
    for l in snmp.lines().filter(|l| l.starts_with("Udp:")) {
        println!("{l}");
    }
    let completed: u64 = text
        .lines()
        .find(|l| l.contains("Queries completed:"))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|n| n.parse().ok())
        .unwrap();
    println!(
        "server CPU {used:?} for {completed} queries: {:?} per query",
        used / completed.max(1) as u32
    );
    resolver.detach("c1").await;
}

fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "shoal-dns-bench-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Queries keep being answered, each from one whole view, while the view is swapped
/// continuously; garbage and oversized datagrams in between change nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_under_load_loses_nothing() {
    require_root!("update_under_load_loses_nothing");
    let ns = Ns::new();
    let resolver = Resolver::new(DnsConfig::default());
    let views: Vec<Arc<Records>> = (1..=2u8)
        .map(|d| {
            let mut b = Records::builder();
            b.a("web", &[ip(d)], false)
                .a("tasks.web", &[ip(d), ip(d + 10)], true);
            Arc::new(b.build())
        })
        .collect();
    resolver
        .attach("c1", &ns.name, views[0].clone())
        .await
        .unwrap();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let updater = {
        let (resolver, views, done) = (resolver.clone(), views.clone(), done.clone());
        tokio::spawn(async move {
            let mut swaps = 0usize;
            while !done.load(Ordering::SeqCst) {
                resolver.update("c1", views[swaps % 2].clone()).unwrap();
                swaps += 1;
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
            swaps
        })
    };
    let name = ns.name.clone();
    let client = tokio::task::spawn_blocking(move || {
        let sock = shoal_netns::run_in(&name, || std::net::UdpSocket::bind("127.0.0.1:0"))
            .unwrap()
            .unwrap();
        sock.connect(("127.0.0.11", 53)).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut seen = [0usize; 2];
        let mut buf = [0u8; 4096];
        for i in 0..3000u16 {
            if i % 100 == 0 {
                sock.send(&[0xde, 0xad, 0xbe]).unwrap();
                sock.send(&vec![0u8; 6000]).unwrap();
                sock.send(&[i as u8; 40]).unwrap();
            }
            let mut m = Message::query();
            m.metadata.id = i;
            m.add_query(hickory_proto::op::Query::query(
                hickory_proto::rr::Name::from_ascii("tasks.web.").unwrap(),
                RecordType::A,
            ));
            sock.send(&m.to_vec().unwrap()).unwrap();
            let reply = loop {
                let n = sock.recv(&mut buf).expect("query lost");
                let r = Message::from_vec(&buf[..n]).unwrap();
                if r.metadata.id == i && !r.answers.is_empty() {
                    break r;
                }
            };
            let mut got: Vec<Ipv4Addr> = reply
                .answers
                .iter()
                .map(|r| match &r.data {
                    RData::A(a) => a.0,
                    other => panic!("{other:?}"),
                })
                .collect();
            got.sort();
            match got.as_slice() {
                [a, b] if *a == ip(1) && *b == ip(11) => seen[0] += 1,
                [a, b] if *a == ip(2) && *b == ip(12) => seen[1] += 1,
                other => panic!("answer from no single view: {other:?}"),
            }
        }
        seen
    })
    .await
    .unwrap();
    done.store(true, Ordering::SeqCst);
    let swaps = updater.await.unwrap();
    assert!(swaps > 10, "only {swaps} swaps");
    assert!(client[0] > 0 && client[1] > 0, "{client:?}");
    resolver.detach("c1").await;
}

/// Bursts from many client sockets at once (answered in batches): every client gets every
/// answer, for its own question.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bursts_from_many_clients() {
    require_root!("bursts_from_many_clients");
    let ns = Ns::new();
    let resolver = Resolver::new(DnsConfig::default());
    resolver.attach("c1", &ns.name, view()).await.unwrap();
    let name = ns.name.clone();
    tokio::task::spawn_blocking(move || {
        let socks: Vec<std::net::UdpSocket> = shoal_netns::run_in(&name, || {
            (0..8)
                .map(|_| std::net::UdpSocket::bind("127.0.0.1:0").unwrap())
                .collect()
        })
        .unwrap();
        let names = ["web.", "tasks.web.", "nope.", "many."];
        for round in 0..5u16 {
            for (c, sock) in socks.iter().enumerate() {
                for k in 0..40u16 {
                    let mut m = Message::query();
                    m.metadata.id = (c as u16) << 12 | round << 6 | k;
                    let qname = names[usize::from(k) % names.len()];
                    m.add_query(hickory_proto::op::Query::query(
                        hickory_proto::rr::Name::from_ascii(qname).unwrap(),
                        RecordType::A,
                    ));
                    sock.send_to(&m.to_vec().unwrap(), ("127.0.0.11", 53))
                        .unwrap();
                }
            }
            for (c, sock) in socks.iter().enumerate() {
                sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                let mut seen = [false; 40];
                let mut buf = [0u8; 4096];
                for _ in 0..40 {
                    let n = sock.recv(&mut buf).expect("answer lost");
                    let m = Message::from_vec(&buf[..n]).unwrap();
                    let id = m.metadata.id;
                    assert_eq!(usize::from(id >> 12), c, "answer for another client");
                    assert_eq!(id >> 6 & 0x3F, round);
                    let k = usize::from(id & 0x3F);
                    assert!(!seen[k], "duplicate answer");
                    seen[k] = true;
                    assert_eq!(m.queries[0].name().to_ascii(), names[k % names.len()]);
                    // many.: truncated to the 30 whole records that fit in 512 bytes.
                    let want = match k % names.len() {
                        0 => 1,
                        1 => 2,
                        2 => 0,
                        _ => 30,
                    };
                    assert_eq!(m.answers.len(), want, "{m:?}");
                }
            }
        }
    })
    .await
    .unwrap();
    resolver.detach("c1").await;
}

fn srv_view() -> Arc<Records> {
    Arc::new(
        Records::builder()
            .a("web", &[ip(2)], false)
            .a("web.1.abc", &[ip(3)], false)
            .a("web.2.abc", &[ip(4)], false)
            .srv(
                "_80._tcp.web",
                &[("web.1.abc".into(), 80), ("web.2.abc".into(), 8080)],
            )
            .build(),
    )
}

#[tokio::test]
async fn srv_with_additional_records_via_dig() {
    require_root!("srv_with_additional_records_via_dig");
    let ns = Ns::new();
    let resolver = Resolver::new(DnsConfig::default());
    resolver.attach("c1", &ns.name, srv_view()).await.unwrap();
    for extra in [&[][..], &["+tcp"][..]] {
        let mut args = extra.to_vec();
        args.extend(["SRV", "_80._tcp.web"]);
        let text = ns.dig(&args).await;
        assert_eq!(status(&text), "NOERROR", "{text}");
        assert!(text.contains("flags: qr aa rd;"), "{text}");
        assert!(
            text.contains("_80._tcp.web.\t\t5\tIN\tSRV\t0 1 80 web.1.abc.")
                && text.contains("_80._tcp.web.\t\t5\tIN\tSRV\t0 1 8080 web.2.abc."),
            "{text}"
        );
        assert!(
            text.contains("ADDITIONAL SECTION:\nweb.1.abc.\t\t5\tIN\tA\t10.0.0.3\nweb.2.abc.\t\t5\tIN\tA\t10.0.0.4"),
            "{text}"
        );
    }
    assert_eq!(
        ns.dig_short(&["SRV", "_80._TCP.Web."]).await,
        vec!["0 1 80 web.1.abc.", "0 1 8080 web.2.abc."]
    );
    // SRV for a name with only A records: NODATA with the zone's SOA (owned by the root,
    // the apex of the one zone); unknown: NXDOMAIN.
    let text = ns.dig(&["SRV", "web"]).await;
    assert_eq!(
        (status(&text), answer_count(&text)),
        ("NOERROR", 0),
        "{text}"
    );
    assert!(
        text.contains("AUTHORITY SECTION:\n.\t\t\t5\tIN\tSOA\tns.shoal.internal."),
        "{text}"
    );
    let text = ns.dig(&["SRV", "_81._tcp.web"]).await;
    assert_eq!(status(&text), "NXDOMAIN", "{text}");
    resolver.detach("c1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_answers_are_cached() {
    require_root!("upstream_answers_are_cached");
    let good = upstream(Some(Ipv4Addr::new(192, 0, 2, 7))).await;
    let ns = Ns::new();
    let resolver = Resolver::new(DnsConfig {
        upstreams: vec![good.addr],
        upstream_timeout: Duration::from_millis(1000),
        ..DnsConfig::default()
    });
    resolver.attach("c1", &ns.name, view()).await.unwrap();
    let text = ns.dig(&["example.com"]).await;
    assert!(
        text.contains("example.com.\t\t60\tIN\tA\t192.0.2.7"),
        "{text}"
    );
    assert_eq!(good.seen.load(Ordering::SeqCst), 1);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // Same question in another case, over UDP and TCP: from the cache, TTL decreased,
    // the client's letter case and id (dig checks both).
    for extra in [&[][..], &["+tcp"][..]] {
        let mut args = extra.to_vec();
        args.push("ExAmple.COM");
        let text = ns.dig(&args).await;
        assert_eq!(status(&text), "NOERROR", "{text}");
        let ttl: u32 = text
            .lines()
            .find(|l| l.starts_with("ExAmple.COM.") && l.contains("\tA\t"))
            .and_then(|l| l.split('\t').filter(|f| !f.is_empty()).nth(1))
            .and_then(|t| t.parse().ok())
            .unwrap_or_else(|| panic!("{text}"));
        assert!((55..=59).contains(&ttl), "ttl {ttl}: {text}");
    }
    assert_eq!(
        good.seen.load(Ordering::SeqCst),
        1,
        "the cache did not answer"
    );
    // Another type is another key; a view that may not forward never sees cached data.
    assert!(ns.dig_short(&["example.com", "AAAA"]).await.is_empty());
    assert_eq!(good.seen.load(Ordering::SeqCst), 2);
    resolver
        .update("c1", Arc::new(Records::builder().forward(false).build()))
        .unwrap();
    let text = ns.dig(&["example.com"]).await;
    assert_eq!(status(&text), "NXDOMAIN", "{text}");
    resolver.detach("c1").await;
}

/// A fake upstream on 127.0.0.1 that answers every A query after `delay` with an address
/// derived from the first label (`qN.…` gets 198.18.N/256.N%256), TTL 60, each query
/// in its own task (so any number can be pending). Over UDP and TCP.
struct SlowUpstream {
    addr: SocketAddr,
    seen: Arc<AtomicUsize>,
    max_pending: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for SlowUpstream {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn address_for(name: &str) -> Ipv4Addr {
    let n: u16 = name
        .strip_prefix('q')
        .and_then(|r| r.split('.').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    Ipv4Addr::new(198, 18, (n >> 8) as u8, n as u8)
}

fn slow_reply(query: &[u8]) -> Option<Vec<u8>> {
    let q = Message::from_vec(query).ok()?;
    let name = q.queries.first()?.name().to_ascii();
    fake_reply(query, address_for(&name))
}

async fn slow_upstream(delay: Duration) -> SlowUpstream {
    let (udp, tcp) = loop {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        if let Ok(tcp) = TcpListener::bind(("127.0.0.1", port)).await {
            break (udp, tcp);
        }
    };
    // Room for thousands of queries arriving at once.
    let size = 16usize << 20;
    nix::sys::socket::setsockopt(&udp, nix::sys::socket::sockopt::RcvBufForce, &size).unwrap();
    udp.set_nonblocking(true).unwrap();
    let udp = Arc::new(UdpSocket::from_std(udp).unwrap());
    let addr = udp.local_addr().unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let pending = Arc::new(AtomicUsize::new(0));
    let max_pending = Arc::new(AtomicUsize::new(0));
    let (seen_udp, pending_udp, max_udp) = (seen.clone(), pending.clone(), max_pending.clone());
    let udp_task = tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        let mut answers = tokio::task::JoinSet::new();
        while let Ok((n, peer)) = udp.recv_from(&mut buf).await {
            seen_udp.fetch_add(1, Ordering::SeqCst);
            let now = pending_udp.fetch_add(1, Ordering::SeqCst) + 1;
            max_udp.fetch_max(now, Ordering::SeqCst);
            let (query, udp, pending) = (buf[..n].to_vec(), udp.clone(), pending_udp.clone());
            answers.spawn(async move {
                tokio::time::sleep(delay).await;
                if let Some(reply) = slow_reply(&query) {
                    let _ = udp.send_to(&reply, peer).await;
                }
                pending.fetch_sub(1, Ordering::SeqCst);
            });
            while answers.try_join_next().is_some() {}
        }
    });
    let seen_tcp = seen.clone();
    let tcp_task = tokio::spawn(async move {
        let mut held = tokio::task::JoinSet::new();
        while let Ok((mut stream, _)) = tcp.accept().await {
            let seen = seen_tcp.clone();
            held.spawn(async move {
                let mut len = [0u8; 2];
                while stream.read_exact(&mut len).await.is_ok() {
                    let mut buf = vec![0u8; u16::from_be_bytes(len).into()];
                    if stream.read_exact(&mut buf).await.is_err() {
                        return;
                    }
                    seen.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(delay).await;
                    let Some(reply) = slow_reply(&buf) else {
                        return;
                    };
                    let mut frame = (reply.len() as u16).to_be_bytes().to_vec();
                    frame.extend_from_slice(&reply);
                    if stream.write_all(&frame).await.is_err() {
                        return;
                    }
                }
            });
            while held.try_join_next().is_some() {}
        }
    });
    SlowUpstream {
        addr,
        seen,
        max_pending,
        tasks: vec![udp_task, tcp_task],
    }
}

fn a_query(id: u16, name: &str) -> Vec<u8> {
    let mut m = Message::query();
    m.metadata.id = id;
    m.metadata.recursion_desired = true;
    m.add_query(hickory_proto::op::Query::query(
        hickory_proto::rr::Name::from_ascii(name).unwrap(),
        RecordType::A,
    ));
    m.to_vec().unwrap()
}

/// 5,000 forwarded queries pending at once (Docker caps at 1024): all answered, correctly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_concurrent_forwards() {
    require_root!("five_thousand_concurrent_forwards");
    const SOCKETS: usize = 100;
    const PER_SOCKET: usize = 50;
    const TOTAL: usize = SOCKETS * PER_SOCKET;
    let delay = Duration::from_millis(500);
    let slow = slow_upstream(delay).await;
    let ns = Ns::new();
    let resolver = Resolver::new(DnsConfig {
        upstreams: vec![slow.addr],
        upstream_timeout: Duration::from_secs(10),
        ..DnsConfig::default()
    });
    resolver.attach("c1", &ns.name, view()).await.unwrap();
    let name = ns.name.clone();
    let (answered, elapsed) = tokio::task::spawn_blocking(move || {
        let socks: Vec<std::net::UdpSocket> = shoal_netns::run_in(&name, || {
            (0..SOCKETS)
                .map(|_| {
                    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
                    s.connect(("127.0.0.11", 53)).unwrap();
                    s
                })
                .collect()
        })
        .unwrap();
        let start = Instant::now();
        for k in 0..PER_SOCKET {
            for (c, sock) in socks.iter().enumerate() {
                let n = c * PER_SOCKET + k;
                sock.send(&a_query(n as u16, &format!("q{n}.example.")))
                    .unwrap();
            }
        }
        let mut answered = 0;
        let mut buf = [0u8; 4096];
        for (c, sock) in socks.iter().enumerate() {
            sock.set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let mut seen = [false; PER_SOCKET];
            for _ in 0..PER_SOCKET {
                let len = sock.recv(&mut buf).expect("answer lost");
                let m = Message::from_vec(&buf[..len]).unwrap();
                let n = usize::from(m.metadata.id);
                assert_eq!(n / PER_SOCKET, c, "answer for another socket");
                assert!(!seen[n % PER_SOCKET], "duplicate answer");
                seen[n % PER_SOCKET] = true;
                assert_eq!(
                    m.metadata.response_code,
                    hickory_proto::op::ResponseCode::NoError
                );
                assert_eq!(m.queries[0].name().to_ascii(), format!("q{n}.example."));
                match m.answers.as_slice() {
                    [r] => assert_eq!(r.data, RData::A(A(address_for(&format!("q{n}."))))),
                    other => panic!("{n}: {other:?}"),
                }
                answered += 1;
            }
        }
        (answered, start.elapsed())
    })
    .await
    .unwrap();
    let max_pending = slow.max_pending.load(Ordering::SeqCst);
    eprintln!(
        "{answered} forwarded answers in {elapsed:?}; at most {max_pending} pending at the upstream"
    );
    assert_eq!(answered, TOTAL);
    assert_eq!(slow.seen.load(Ordering::SeqCst), TOTAL);
    // They really were pending together, far beyond Docker's 1024.
    assert!(max_pending > 2048, "max pending {max_pending}");
    resolver.detach("c1").await;
}

/// RFC 7766: on one TCP connection a local answer does not wait for an earlier forward.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_local_answer_overtakes_slow_forward() {
    require_root!("tcp_local_answer_overtakes_slow_forward");
    let slow = slow_upstream(Duration::from_millis(800)).await;
    let ns = Ns::new();
    let resolver = Resolver::new(DnsConfig {
        upstreams: vec![slow.addr],
        ..DnsConfig::default()
    });
    resolver.attach("c1", &ns.name, view()).await.unwrap();
    let name = ns.name.clone();
    let got = tokio::task::spawn_blocking(move || {
        let mut stream =
            shoal_netns::run_in(&name, || std::net::TcpStream::connect(("127.0.0.11", 53)))
                .unwrap()
                .unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut frames = Vec::new();
        for (id, qname) in [
            (1u16, "q7.example."),
            (2, "web."),
            (3, "q8.example."),
            (4, "tasks.web."),
        ] {
            let bytes = a_query(id, qname);
            frames.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
            frames.extend_from_slice(&bytes);
        }
        let start = Instant::now();
        stream.write_all(&frames).unwrap();
        let mut got = Vec::new();
        for _ in 0..4 {
            let mut len = [0u8; 2];
            stream.read_exact(&mut len).unwrap();
            let mut buf = vec![0u8; u16::from_be_bytes(len).into()];
            stream.read_exact(&mut buf).unwrap();
            let m = Message::from_vec(&buf).unwrap();
            got.push((m.metadata.id, m.answers.len(), start.elapsed()));
        }
        got
    })
    .await
    .unwrap();
    eprintln!("{got:?}");
    let ids: Vec<u16> = got.iter().map(|g| g.0).collect();
    // Local answers first, at once; the forwards after the upstream's delay.
    assert_eq!(&ids[..2], &[2, 4], "{got:?}");
    let mut late = ids[2..].to_vec();
    late.sort();
    assert_eq!(late, [1, 3], "{got:?}");
    assert!(got[1].2 < Duration::from_millis(400), "{got:?}");
    assert!(got[2].2 >= Duration::from_millis(700), "{got:?}");
    assert_eq!(got.iter().map(|g| g.1).collect::<Vec<_>>()[2..], [1, 1]);
    assert_eq!(slow.seen.load(Ordering::SeqCst), 2);
    resolver.detach("c1").await;
}

/// A directory under the system temp dir, removed on drop (even on panic).
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new(what: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "shoal-dns-{what}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Issue 16: musl before 1.2.4 (Alpine 3.17 and older, Debian 12's musl 1.2.3) asks over UDP
/// with a 512-byte buffer, no EDNS, and never retries over TCP after TC; an answer truncated
/// to the question alone was "name not found" for it. A static musl program
/// (tests/musl_resolve.c, built here with `musl-gcc -static`) resolves a name with 40 A
/// records through the resolver: it must get the records that fit in 512 bytes.
#[tokio::test]
async fn musl_gets_addresses_from_a_truncated_answer() {
    require_root!("musl_gets_addresses_from_a_truncated_answer");
    let Some(musl_gcc) = ["/usr/bin/musl-gcc", "/usr/local/bin/musl-gcc"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
    else {
        if std::env::var_os("SHOAL_REQUIRE_KERNEL_TESTS").is_some() {
            panic!(
                "musl_gets_addresses_from_a_truncated_answer must run but musl-gcc is missing (scripts/deps.sh installs musl-tools)"
            );
        }
        eprintln!(
            "SKIP musl_gets_addresses_from_a_truncated_answer: musl-gcc not found (apt-get install musl-tools)"
        );
        return;
    };
    let dir = TempDir::new("musl");
    let bin = dir.0.join("musl_resolve");
    let src = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/musl_resolve.c");
    let out = Command::new(musl_gcc)
        .args(["-static", "-O1", "-Wall", "-o"])
        .arg(&bin)
        .arg(src)
        .output()
        .expect("run musl-gcc");
    assert!(
        out.status.success(),
        "musl-gcc -static {src}: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let ns = Ns::new();
    std::fs::create_dir_all(ns.etc_dir()).unwrap();
    std::fs::write(
        ns.etc_dir().join("resolv.conf"),
        "nameserver 127.0.0.11\noptions timeout:2 attempts:1\n",
    )
    .unwrap();
    let big: Vec<Ipv4Addr> = (1..=40).map(|i| Ipv4Addr::new(10, 2, 0, i)).collect();
    let records = Records::builder()
        .a("tasks.big", &big, true)
        .a("web", &[ip(2)], false)
        .build();
    let resolver = Resolver::new(DnsConfig::default());
    resolver
        .attach("c1", &ns.name, Arc::new(records))
        .await
        .unwrap();
    let bin = bin.to_str().unwrap();

    // A small answer, to show the program and the namespace's resolv.conf work at all.
    let (ok, text) = ns.exec(bin, &["web"]).await;
    assert!(ok, "{text}");
    assert!(text.contains("getaddrinfo 10.0.0.2"), "{text}");

    // 40 A records (652 bytes) do not fit in 512: the truncated answer carries what fits.
    let (ok, text) = ns.exec(bin, &["tasks.big"]).await;
    assert!(ok, "musl found no address for tasks.big: {text}");
    for call in ["getaddrinfo", "gethostbyname"] {
        let got: Vec<Ipv4Addr> = text
            .lines()
            .filter_map(|l| l.strip_prefix(call)?.trim().parse().ok())
            .collect();
        // (512 - 12 header - 15 question) / 16 bytes per A record = 30 whole records.
        assert!(
            got.len() == 30 && got.iter().all(|a| big.contains(a)),
            "{call}: {got:?}\n{text}"
        );
    }
    resolver.detach("c1").await;
}
