//! Scale convergence on a one-node lab: from the API call that changes a service's replica
//! count to the moment (a) a container's DNS answer for `tasks.web` and (b) the VIP's nft
//! backend map reflect it. Alternates web between 2 and 4 replicas, `--events` times
//! (default 20), and reports p50/p99/max.
//!
//! Run as root after `cargo build --release -p shoal`:
//!   cargo run --release -p shoal-benches --bin scale_convergence -- [--events N]
//!
//! Anchor (from the multi-node issue): Docker Swarm's gossip converges in about 1-2 s plus a
//! fixed 2 s delay; there is no Docker engine on this machine to measure it in the same run.

use std::net::{Ipv4Addr, UdpSocket};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RData, RecordType};
use shoal::api::TaskLocation;
use shoal::client::Client;
use shoal::cluster::ServiceUpdate;
use shoal_benches::{ms, quantile, write_report};

const LAB: &str = "bconv";

fn shoal_bin() -> PathBuf {
    std::env::var("SHOAL_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
            let rel = root.join("target/release/shoal");
            if rel.exists() {
                rel
            } else {
                root.join("target/debug/shoal")
            }
        })
}

fn shoal(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(shoal_bin())
        .args(args)
        .env("SHOAL_LAB", LAB)
        .output()?;
    if !out.status.success() {
        bail!(
            "shoal {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

struct LabGuard;
impl Drop for LabGuard {
    fn drop(&mut self) {
        let _ = shoal(&["lab", "down", "--name", LAB]);
    }
}

/// Asks 127.0.0.11 inside the probe container for `name` and returns the addresses.
fn ask(sock: &UdpSocket, id: u16, name: &str) -> anyhow::Result<Vec<Ipv4Addr>> {
    let mut m = Message::query();
    m.metadata.id = id;
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name)?, RecordType::A));
    sock.send(&m.to_vec()?)?;
    let mut buf = [0u8; 4096];
    loop {
        let n = sock.recv(&mut buf)?;
        let r = Message::from_vec(&buf[..n])?;
        if r.metadata.id != id {
            continue;
        }
        return Ok(r
            .answers
            .iter()
            .filter_map(|rr| match &rr.data {
                RData::A(a) => Some(a.0),
                _ => None,
            })
            .collect());
    }
}

/// Number of backends in the VIP's any-port TCP chain, read from the kernel.
fn lb_backends(netns: &str, chain: &str) -> anyhow::Result<usize> {
    let out = Command::new("ip")
        .args([
            "netns", "exec", netns, "nft", "list", "chain", "ip", "shoal_lb", chain,
        ])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .split("mod ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let events: usize = args
        .iter()
        .position(|a| a == "--events")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let _ = shoal(&["lab", "down", "--name", LAB]);
    let up = shoal(&["lab", "up", "--name", LAB, "--nodes", "1"])?;
    let _guard = LabGuard;
    let host = up
        .trim()
        .strip_prefix("export SHOAL_HOST=")
        .context("lab up output")?
        .to_string();
    let sock_path = shoal::client::socket_path(Some(&host));
    let client = Client::new(&sock_path);
    let h = ["-H", host.as_str()];
    shoal(&[&h[..], &["network", "create", "appnet"]].concat())?;
    shoal(
        &[
            &h[..],
            &[
                "service",
                "create",
                "--name",
                "web",
                "--network",
                "appnet",
                "--replicas",
                "2",
                "--",
                "shoal",
                "whoami",
                "--port",
                "80",
            ],
        ]
        .concat(),
    )?;
    shoal(
        &[
            &h[..],
            &[
                "service",
                "create",
                "--name",
                "probe",
                "--network",
                "appnet",
                "--",
                "shoal",
                "whoami",
                "--port",
                "80",
            ],
        ]
        .concat(),
    )?;

    // Wait for the probe container and open a socket inside it.
    let start = Instant::now();
    let loc: TaskLocation = loop {
        if let Ok(l) = client.get::<TaskLocation>("/v1/tasks/probe.1").await
            && l.task.state == shoal::model::TaskState::Running
        {
            break l;
        }
        if start.elapsed() > Duration::from_secs(30) {
            bail!("probe.1 did not start");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let sock = shoal_netns::run_in(&loc.netns, || -> std::io::Result<UdpSocket> {
        let s = UdpSocket::bind("127.0.0.1:0")?;
        s.connect("127.0.0.11:53")?;
        s.set_read_timeout(Some(Duration::from_millis(500)))?;
        Ok(s)
    })??;
    let svc: shoal::model::Service = client.get("/v1/services/web").await?;
    let net: shoal::model::Network = client.get("/v1/networks/appnet").await?;
    let netns = shoal::desired::network_netns(&format!("shoal-{LAB}-node1-"), &net);
    let chain = format!("svc_{}_tcp_any", &svc.id[..12]);

    let mut id: u16 = 1;
    let mut wait_dns = |want: usize, deadline: Duration| -> anyhow::Result<()> {
        let t = Instant::now();
        loop {
            id = id.wrapping_add(1);
            if ask(&sock, id, "tasks.web.").map(|v| v.len()).unwrap_or(0) == want {
                return Ok(());
            }
            if t.elapsed() > deadline {
                bail!("DNS did not show {want} tasks within {deadline:?}");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    wait_dns(2, Duration::from_secs(30))?;

    let (mut dns_t, mut lb_t) = (vec![], vec![]);
    let mut current = 2;
    for i in 0..events {
        let want = if current == 2 { 4 } else { 2 };
        let t0 = Instant::now();
        let _: shoal::model::Service = client
            .post(
                "/v1/services/web/update",
                &ServiceUpdate {
                    replicas: Some(want),
                    ..Default::default()
                },
            )
            .await?;
        wait_dns(want as usize, Duration::from_secs(10)).with_context(|| format!("event {i}"))?;
        dns_t.push(t0.elapsed());
        while lb_backends(&netns, &chain)? != want as usize {
            if t0.elapsed() > Duration::from_secs(10) {
                bail!("event {i}: LB did not show {want} backends");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        lb_t.push(t0.elapsed());
        current = want;
        // Let scale-downs finish removing tasks before the next event.
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    dns_t.sort();
    lb_t.sort();
    let row = |name: &str, v: &[Duration]| {
        format!(
            "| {name} | {} | {} | {} | {} |",
            v.len(),
            ms(quantile(v, 0.5)),
            ms(quantile(v, 0.99)),
            ms(*v.last().unwrap())
        )
    };
    let table = [
        "| what changed after `service scale` | events | p50 ms | p99 ms | max ms |".to_string(),
        "|---|---|---|---|---|".to_string(),
        row("DNS answer (`tasks.web` inside a container)", &dns_t),
        row("VIP backend map in the kernel (nft)", &lb_t),
    ]
    .join("\n");
    println!("{table}");
    let report = format!(
        "# Scale convergence, one node\n\nOne-node lab, embedded store, `web` alternating 2 <-> 4 replicas, {events} events; time from the API call to the change being visible. DNS is polled every 1 ms from inside a container; the nft map is read with `nft list chain` (a process per poll, so the LB column includes up to ~10 ms of polling cost).\n\n{table}\n\nAnchor: Docker Swarm's gossip converges in about 1-2 s plus a fixed 2 s delay (not measurable here: no Docker engine on this machine). Target of the multi-node issue: p99 under 200 ms.\n\nReproduce: `cargo build --release -p shoal && cargo run --release -p shoal-benches --bin scale_convergence -- --events {events}` (root).\n"
    );
    let p = write_report("scale_convergence", &report)?;
    println!("report: {}", p.display());
    Ok(())
}
