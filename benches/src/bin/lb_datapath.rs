//! Data path cost of a VIP: connection rate and request latency from a client to a service
//! through its VIP (Shoal's nft table, DNAT in the network namespace) versus straight to a
//! backend address, same run, same namespaces, rounds interleaved.
//!
//! Topology (all namespaces created here, deleted on exit, also on panic): `client`,
//! `router` (holds the LB table and the VIP as a local route, like a network namespace) and
//! three backends, each on its own veth /30 to the router. Each backend serves a tiny
//! HTTP/1.0-style exchange on :8080 (read the request, answer; the client closes); the VIP is
//! 10.96.0.10:80 -> backends:8080. Both paths cross the router and its conntrack; the VIP
//! path adds the DNAT.
//!
//! Per round and path: `--seconds` (default 2) of back-to-back requests on `--conns`
//! (default 1) client threads, each request a new TCP connection; the rate is requests per
//! second, latency per request (connect to EOF). The direct path spreads its requests over
//! the three backends like the VIP does. Run as root:
//!   cargo run --release -p shoal-benches --bin lb_datapath -- [--rounds 10] [--seconds 2] [--conns 1]

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use shoal_benches::{
    Leftover, arg, check_flags, clean_up_on_signal, creating, median, quantile, write_report,
};
use shoal_lb::{Protocol, Ruleset, VirtualService};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const BACKENDS: u8 = 3;
const PORT: u16 = 8080;

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Namespaces deleted on drop; server threads stopped first.
struct Lab {
    names: Vec<String>,
    stop: Arc<AtomicBool>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for n in &self.names {
            if let Err(e) = shoal_netns::delete(n) {
                eprintln!("deleting namespace {n}: {e}");
            }
        }
    }
}

/// This run's namespaces: `shoal-b-lbd-PID-ROLE`.
fn ns_prefix() -> String {
    format!("shoal-b-lbd-{}-", std::process::id())
}

impl Lab {
    fn ns(&mut self, role: &str) -> anyhow::Result<String> {
        let name = format!("{}{role}", ns_prefix());
        creating(|| {
            shoal_netns::create(&name).with_context(|| format!("creating {name} (root needed)"))
        })?;
        self.names.push(name.clone());
        ip(&["-n", &name, "link", "set", "lo", "up"])?;
        Ok(name)
    }

    /// veth /30 between the router and `ns`: 10.200.NET.1 (router) / .2 (ns).
    fn attach(&self, router: &str, ns: &str, net: u8) -> anyhow::Result<Ipv4Addr> {
        let rdev = format!("to{net}");
        ip(&[
            "-n", router, "link", "add", &rdev, "type", "veth", "peer", "name", "eth0", "netns", ns,
        ])?;
        ip(&[
            "-n",
            router,
            "addr",
            "add",
            &format!("10.200.{net}.1/30"),
            "dev",
            &rdev,
        ])?;
        ip(&["-n", router, "link", "set", &rdev, "up"])?;
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("10.200.{net}.2/30"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", ns, "link", "set", "eth0", "up"])?;
        ip(&[
            "-n",
            ns,
            "route",
            "add",
            "default",
            "via",
            &format!("10.200.{net}.1"),
        ])?;
        Ok(Ipv4Addr::new(10, 200, net, 2))
    }
}

/// Accepts on `l` until stopped: read the request, answer, close.
fn serve(l: TcpListener, stop: Arc<AtomicBool>) {
    l.set_nonblocking(false).ok();
    while !stop.load(Ordering::SeqCst) {
        let Ok((mut s, _)) = l.accept() else { continue };
        let mut buf = [0u8; 256];
        let _ = s.read(&mut buf);
        let _ = s.write_all(RESPONSE);
        // The client closes first (its side keeps TIME_WAIT, which tcp_tw_reuse recycles):
        // wait for its FIN.
        let _ = s.read(&mut buf);
    }
}

const RESPONSE: &[u8] = b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok";

fn request(dst: SocketAddrV4) -> std::io::Result<()> {
    let mut s = TcpStream::connect(dst)?;
    s.set_nodelay(true)?;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
    let mut out = [0u8; RESPONSE.len()];
    s.read_exact(&mut out)?;
    if out != RESPONSE {
        return Err(std::io::Error::other("bad answer"));
    }
    Ok(())
}

struct Run {
    rate: f64,
    lat: Vec<Duration>,
}

/// `conns` threads in the client namespace, each sending requests for `secs`.
fn run(client: &str, targets: &[SocketAddrV4], conns: u64, secs: u64) -> anyhow::Result<Run> {
    let targets = targets.to_vec();
    let t0 = Instant::now();
    let lats = shoal_netns::run_in(client, move || {
        std::thread::scope(|sc| {
            let hs: Vec<_> = (0..conns)
                .map(|c| {
                    let targets = targets.clone();
                    sc.spawn(move || -> std::io::Result<Vec<Duration>> {
                        let end = Instant::now() + Duration::from_secs(secs);
                        let mut lat = vec![];
                        let mut i = c as usize;
                        while Instant::now() < end {
                            let t = Instant::now();
                            request(targets[i % targets.len()])?;
                            lat.push(t.elapsed());
                            i += 1;
                        }
                        Ok(lat)
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| h.join().expect("client thread"))
                .collect::<std::io::Result<Vec<_>>>()
        })
    })??;
    let elapsed = t0.elapsed().as_secs_f64();
    let mut lat: Vec<Duration> = lats.into_iter().flatten().collect();
    lat.sort();
    Ok(Run {
        rate: lat.len() as f64 / elapsed,
        lat,
    })
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    check_flags(
        &args,
        &["--rounds", "--seconds", "--conns"],
        "usage: lb_datapath [--rounds 10] [--seconds 2] [--conns 1]   (root; writes benches/reports/lb_datapath.md)",
    );
    clean_up_on_signal(vec![Leftover::Netns(ns_prefix())]);
    let rounds = arg(&args, "--rounds", 10);
    let secs = arg(&args, "--seconds", 2);
    let conns = arg(&args, "--conns", 1);

    let stop = Arc::new(AtomicBool::new(false));
    let mut lab = Lab {
        names: vec![],
        stop: stop.clone(),
    };
    let router = lab.ns("router")?;
    let client = lab.ns("client")?;
    shoal_netns::set_sysctl(&router, "net.ipv4.ip_forward", "1")?;
    shoal_netns::set_sysctl(&client, "net.ipv4.ip_local_port_range", "10000 65000")?;
    shoal_netns::set_sysctl(&client, "net.ipv4.tcp_tw_reuse", "1")?;
    lab.attach(&router, &client, 0)?;
    ip(&[
        "-n",
        &router,
        "route",
        "add",
        "local",
        &format!("{VIP}/32"),
        "dev",
        "lo",
        "table",
        "local",
    ])?;
    let mut backends = vec![];
    for i in 1..=BACKENDS {
        let ns = lab.ns(&format!("b{i}"))?;
        let addr = lab.attach(&router, &ns, i)?;
        let l = shoal_netns::run_in(&ns, || {
            TcpListener::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, PORT))
        })??;
        for _ in 0..2 {
            let (l, stop) = (l.try_clone()?, stop.clone());
            std::thread::spawn(move || serve(l, stop));
        }
        backends.push(addr);
    }
    let rs = Ruleset {
        table: "shoal_lb".into(),
        vips: vec![VIP],
        services: vec![VirtualService {
            id: "web".into(),
            vip: VIP,
            protocol: Protocol::Tcp,
            port: 80,
            target_port: PORT,
            backends: backends.clone(),
            ..Default::default()
        }],
        local_endpoints: vec![],
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(shoal_lb::apply(&router, &rs))?;

    let vip = [SocketAddrV4::new(VIP, 80)];
    let direct: Vec<SocketAddrV4> = backends
        .iter()
        .map(|b| SocketAddrV4::new(*b, PORT))
        .collect();
    // Warm-up (ARP, caches), not counted.
    run(&client, &vip, conns, 1)?;
    run(&client, &direct, conns, 1)?;
    let (mut v_rate, mut d_rate, mut v_p50, mut d_p50, mut v_p99, mut d_p99) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    for r in 0..rounds {
        // Alternate which path goes first.
        let order: [(&str, &[SocketAddrV4]); 2] = if r % 2 == 0 {
            [("vip", &vip), ("direct", &direct)]
        } else {
            [("direct", &direct), ("vip", &vip)]
        };
        for (path, targets) in order {
            let x = run(&client, targets, conns, secs)?;
            let (p50, p99) = (
                quantile(&x.lat, 0.5).as_secs_f64() * 1e3,
                quantile(&x.lat, 0.99).as_secs_f64() * 1e3,
            );
            println!(
                "round {r} {path:<6} {:8.0} req/s  p50 {p50:.3} ms  p99 {p99:.3} ms",
                x.rate
            );
            if path == "vip" {
                v_rate.push(x.rate);
                v_p50.push(p50);
                v_p99.push(p99);
            } else {
                d_rate.push(x.rate);
                d_p50.push(p50);
                d_p99.push(p99);
            }
        }
    }
    // Paired: each round's VIP and direct runs are adjacent in time, so their ratio is less
    // exposed to the machine's drift than the ratio of the medians.
    let paired = |v: &[f64], d: &[f64]| median(v.iter().zip(d).map(|(a, b)| a / b).collect());
    let (pr, p50r, p99r) = (
        paired(&v_rate, &d_rate),
        paired(&v_p50, &d_p50),
        paired(&v_p99, &d_p99),
    );
    let (vr, dr) = (median(v_rate), median(d_rate));
    let (v50, d50) = (median(v_p50), median(d_p50));
    let (v99, d99) = (median(v_p99), median(d_p99));
    let table = format!(
        "| path | requests/s | p50 (ms) | p99 (ms) |\n|---|---|---|---|\n\
         | straight to a backend address | {dr:.0} | {d50:.3} | {d99:.3} |\n\
         | through the VIP (nft DNAT) | {vr:.0} | {v50:.3} | {v99:.3} |\n\
         | ratio of the medians, VIP / direct | {:.3} | {:.3} | {:.3} |\n\
         | median of the per-round ratios (paired) | {pr:.3} | {p50r:.3} | {p99r:.3} |\n",
        vr / dr,
        v50 / d50,
        v99 / d99
    );
    println!("\n{table}");
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let report = format!(
        "# LB data path: VIP versus direct\n\n\
         Command: `cargo run --release -p shoal-benches --bin lb_datapath -- --rounds {rounds} --seconds {secs} --conns {conns}` (root).\n\
         One new TCP connection per request (request, answer, close), {conns} client thread(s), {rounds} interleaved rounds of {secs} s per path; medians over rounds. \
         Client -> router namespace (LB table, conntrack) -> 3 backends on veths. Load average at the end: {}\n\n{table}\n\
         Targets (issue 5): rate ratio >= 0.95, p50 ratio <= 1.05.\n",
        load.trim()
    );
    let p = write_report("lb_datapath", &report)?;
    println!("report: {}", p.display());
    Ok(())
}
