//! Encrypted against plain overlay, task to task across two nodes, measured in one run,
//! interleaved (plain, encrypted, plain, ...): TCP throughput over one connection (the
//! client writes 128 KiB buffers for `--secs` seconds, the server counts) and TCP
//! request/response latency (64 bytes each way on one connection, `--requests` per round,
//! p50/p99). Client and server are sockets of this program opened inside the namespaces of
//! two tasks (node1 and node2 of a two-node lab), so the traffic is the overlay's: VXLAN on
//! the lab underlay, inside WireGuard for the encrypted network.
//!
//! Run as root after `cargo build --release -p shoal-cli -p shoal-benches`:
//!   ./target/release/overlay_crypto [--rounds 3] [--secs 3] [--requests 2000]
//!
//! Anchors (published, not measured here; no Docker engine or Cilium on this machine):
//! Cilium's pod-to-pod WireGuard after an MTU fix 656 Mbit/s against about 2 Gbit/s
//! unencrypted (cilium/cilium PR #30329, ratio 0.33); libreswan's IPsec AES-GCM-128 5.25
//! Gbit/s against 9.78 Gbit/s plain (libreswan wiki via libreswan issue #208, ratio 0.54);
//! Docker's docs say `--opt encrypted` "imposes a non-negligible performance penalty" and
//! give no figure.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use shoal_benches::{
    Leftover, arg, check_flags, clean_up_on_signal, lab_up, median, quantile, shoal_bin,
    write_report,
};

const LAB: &str = "bcrypt";
const PORT_BULK: u16 = 5001;
const PORT_RR: u16 = 5002;

fn shoal(bin: &std::path::Path, host: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(bin).arg("-H").arg(host).args(args).output()?;
    if !out.status.success() {
        bail!(
            "shoal {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

/// The running task of `service` on `node`: (namespace, address).
fn task_on(
    bin: &std::path::Path,
    host: &str,
    service: &str,
    node: &str,
) -> anyhow::Result<Option<(String, Ipv4Addr)>> {
    let nodes: Vec<serde_json::Value> =
        serde_json::from_str(&shoal(bin, host, &["node", "ls", "--format", "json"])?)?;
    let tasks: Vec<serde_json::Value> = serde_json::from_str(&shoal(
        bin,
        host,
        &["service", "ps", service, "--format", "json"],
    )?)?;
    let node_id = nodes
        .iter()
        .find(|n| n["name"] == node)
        .and_then(|n| n["id"].as_str())
        .context("node id")?;
    Ok(tasks
        .iter()
        .find(|t| t["node_id"] == node_id && t["state"] == "running")
        .map(|t| {
            let id = t["id"].as_str().unwrap_or_default();
            (
                format!("shoal-{LAB}-{node}-t-{}", &id[..12.min(id.len())]),
                t["networks"][0]["ip"]
                    .as_str()
                    .unwrap_or_default()
                    .parse()
                    .unwrap_or(Ipv4Addr::UNSPECIFIED),
            )
        }))
}

/// Servers in `ns` (a task's namespace) on its address: a sink that counts bytes, and an
/// echo of 64-byte requests. They run until `stop`.
fn serve(
    ns: &str,
    ip: Ipv4Addr,
    received: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let bulk = shoal_netns::run_in(ns, move || TcpListener::bind((ip, PORT_BULK)))??;
    let rr = shoal_netns::run_in(ns, move || TcpListener::bind((ip, PORT_RR)))??;
    let s1 = stop.clone();
    std::thread::spawn(move || {
        for c in bulk.incoming() {
            let Ok(mut c) = c else { continue };
            let (got, stop) = (received.clone(), s1.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 1 << 17];
                while !stop.load(Ordering::Relaxed) {
                    match c.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            got.fetch_add(n as u64, Ordering::Relaxed);
                        }
                    }
                }
            });
        }
    });
    std::thread::spawn(move || {
        for c in rr.incoming() {
            let Ok(mut c) = c else { continue };
            let _ = c.set_nodelay(true);
            std::thread::spawn(move || {
                let mut buf = [0u8; 64];
                while c.read_exact(&mut buf).is_ok() {
                    if c.write_all(&buf).is_err() {
                        return;
                    }
                }
            });
        }
    });
    let _ = stop;
    Ok(())
}

/// Bytes per second over one connection from `ns` to `ip` for `secs`, counted by the server.
fn throughput(ns: &str, ip: Ipv4Addr, secs: u64, received: &AtomicU64) -> anyhow::Result<f64> {
    let addr = SocketAddr::from((ip, PORT_BULK));
    let mut c = shoal_netns::run_in(ns, move || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(3))
    })??;
    let buf = vec![0x5au8; 1 << 17];
    // A second of warm-up (slow start, handshakes), then the measured span.
    let warm = Instant::now();
    while warm.elapsed() < Duration::from_secs(1) {
        c.write_all(&buf)?;
    }
    let start_bytes = received.load(Ordering::Relaxed);
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(secs) {
        c.write_all(&buf)?;
    }
    let elapsed = t.elapsed();
    let got = received.load(Ordering::Relaxed) - start_bytes;
    drop(c);
    Ok(got as f64 / elapsed.as_secs_f64())
}

/// Round-trip times of `n` 64-byte requests on one connection.
fn latency(ns: &str, ip: Ipv4Addr, n: usize) -> anyhow::Result<Vec<Duration>> {
    let addr = SocketAddr::from((ip, PORT_RR));
    let mut c = shoal_netns::run_in(ns, move || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(3))
    })??;
    c.set_nodelay(true)?;
    c.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut buf = [0x11u8; 64];
    for _ in 0..50 {
        c.write_all(&buf)?;
        c.read_exact(&mut buf)?;
    }
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        c.write_all(&buf)?;
        c.read_exact(&mut buf)?;
        v.push(t.elapsed());
    }
    v.sort();
    Ok(v)
}

/// Microseconds (the round trips here are well under a millisecond).
fn us(d: Duration) -> String {
    format!("{} µs", d.as_micros())
}

fn mbit(bps: f64) -> String {
    format!("{:.0}", bps * 8.0 / 1e6)
}

#[derive(Default)]
struct Figures {
    tput: Vec<f64>,
    rtt: Vec<Duration>,
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    check_flags(
        &args,
        &["--rounds", "--secs", "--requests"],
        "usage: overlay_crypto [--rounds 3] [--secs 3] [--requests 2000]   (root; writes benches/reports/overlay_crypto.md)",
    );
    clean_up_on_signal(vec![Leftover::Lab(LAB.to_string())]);
    let rounds: usize = arg(&args, "--rounds", 3);
    let secs: u64 = arg(&args, "--secs", 3);
    let requests: usize = arg(&args, "--requests", 2000);
    let bin = shoal_bin()?;
    let _ = Command::new(&bin)
        .args(["lab", "down", "--name", LAB])
        .output();
    let _lab = lab_up(&bin, LAB, 2)?;
    let host = format!("unix:///run/shoal/lab/{LAB}/node1/shoal.sock");
    shoal(&bin, &host, &["network", "create", "plain"])?;
    shoal(
        &bin,
        &host,
        &["network", "create", "--opt", "encrypted", "secure"],
    )?;
    for net in ["plain", "secure"] {
        shoal(
            &bin,
            &host,
            &[
                "service",
                "create",
                "--name",
                &format!("t-{net}"),
                "--network",
                net,
                "--replicas",
                "2",
                "--",
                "sleep",
                "100000",
            ],
        )?;
    }
    // One task of each network on each node.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut ends = vec![];
    for net in ["plain", "secure"] {
        let svc = format!("t-{net}");
        loop {
            let (a, b) = (
                task_on(&bin, &host, &svc, "node1")?,
                task_on(&bin, &host, &svc, "node2")?,
            );
            if let (Some(a), Some(b)) = (a, b) {
                ends.push((net, a, b));
                break;
            }
            if Instant::now() > deadline {
                bail!("{svc}: no running task on each node after 60 s");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let mut counters = vec![];
    for (_, _, (ns, ip)) in &ends {
        let c = Arc::new(AtomicU64::new(0));
        serve(ns, *ip, c.clone(), stop.clone())?;
        counters.push(c);
    }
    // Both paths answer before anything is measured (the encrypted one after a handshake).
    for (net, (ns, _), (_, ip)) in &ends {
        let t = Instant::now();
        loop {
            if latency(ns, *ip, 1).is_ok() {
                break;
            }
            if t.elapsed() > Duration::from_secs(30) {
                bail!("{net}: node1 -> node2 does not answer");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    let mut figs = [Figures::default(), Figures::default()];
    for round in 0..rounds {
        for (i, (net, (ns, _), (_, ip))) in ends.iter().enumerate() {
            let bps = throughput(ns, *ip, secs, &counters[i])?;
            let rtt = latency(ns, *ip, requests)?;
            println!(
                "round {} {net:6}: {} Mbit/s, rtt p50 {} p99 {}",
                round + 1,
                mbit(bps),
                us(quantile(&rtt, 0.5)),
                us(quantile(&rtt, 0.99))
            );
            figs[i].tput.push(bps);
            figs[i].rtt.extend(rtt);
        }
    }
    stop.store(true, Ordering::Relaxed);
    for f in &mut figs {
        f.rtt.sort();
    }
    let t = |i: usize| median(figs[i].tput.clone());
    let (tp, te) = (t(0), t(1));
    let (p50p, p50e) = (quantile(&figs[0].rtt, 0.5), quantile(&figs[1].rtt, 0.5));
    let (p99p, p99e) = (quantile(&figs[0].rtt, 0.99), quantile(&figs[1].rtt, 0.99));
    let spread = |i: usize| {
        let v = &figs[i].tput;
        let lo = v.iter().copied().fold(f64::MAX, f64::min);
        let hi = v.iter().copied().fold(0.0, f64::max);
        format!("{}-{}", mbit(lo), mbit(hi))
    };
    let table = format!(
        "| task to task, node1 -> node2 | plain overlay | encrypted (WireGuard, userspace) | encrypted / plain |\n|---|---|---|---|\n| TCP throughput, one connection (median of {rounds} rounds of {secs} s; spread) | {} Mbit/s ({}) | {} Mbit/s ({}) | {:.2} |\n| request/response 64 B, p50 | {} | {} | {:.2} |\n| request/response 64 B, p99 | {} | {} | {:.2} |\n",
        mbit(tp),
        spread(0),
        mbit(te),
        spread(1),
        te / tp,
        us(p50p),
        us(p50e),
        p50e.as_secs_f64() / p50p.as_secs_f64(),
        us(p99p),
        us(p99e),
        p99e.as_secs_f64() / p99p.as_secs_f64(),
    );
    println!("\n{table}");
    let report = format!(
        "# overlay_crypto: encrypted against plain overlay\n\n\
Two-node lab (namespaces, veth underlay on one host, 2 shared vCPUs), one task per network \
on each node; sockets of the bench opened in the tasks' namespaces; plain and encrypted \
interleaved in each of {rounds} rounds ({requests} requests per latency round). Both \
directions of both paths share the machine's two cores with the agents (userspace WireGuard \
runs in the agent processes), so absolute figures are this machine's; the ratio is the \
point.\n\n{table}\n\
Anchors (published figures, other hardware; not measured here):\n\n\
| source | plain | encrypted | ratio |\n|---|---|---|---|\n\
| Cilium WireGuard pod to pod, after an MTU fix (cilium/cilium PR #30329) | ~2 Gbit/s | 656 Mbit/s | 0.33 |\n\
| IPsec AES-GCM-128, iperf3 (libreswan wiki, via libreswan issue #208) | 9.78 Gbit/s | 5.25 Gbit/s | 0.54 |\n\
| Docker `--opt encrypted` (IPsec ESP) docs | | \"a non-negligible performance penalty\", no figure | |\n\
| Cilium CNI benchmark (docs.cilium.io, operations/performance/benchmark) | | WireGuard reaches a higher maximum throughput than IPsec but costs more CPU; figures in charts only | |\n\n\
Run: `./target/release/overlay_crypto --rounds {rounds} --secs {secs} --requests {requests}`\n"
    );
    let p = write_report("overlay_crypto", &report)?;
    println!("report: {}", p.display());
    Ok(())
}
