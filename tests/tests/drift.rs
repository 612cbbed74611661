//! Kernel drift heals: someone else flushes Shoal's nft tables (`nft flush ruleset`, what
//! `systemctl restart nftables` or a firewalld reload does), deletes the VIP table or a
//! route, and the agent puts them back by itself, without a cluster change, while
//! established flows stay up. The recovery times are printed (p50 and max over ten flushes).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use shoal_tests::{Lab, http_on, require_kernel};

/// The one-node lab's node address on the underlay.
const NODE1: &str = "192.0.2.11";
/// The longest a repair may take: the agent's full pass period (resync_secs, 10 s by
/// default) plus a pass. The nft tables come back much sooner (the 1 s drift canary).
const BOUND: Duration = Duration::from_secs(12);

fn ip_netns(ns: &str, cmd: &[&str]) -> std::process::Output {
    Command::new("ip")
        .args(["netns", "exec", ns])
        .args(cmd)
        .output()
        .expect("run ip netns exec")
}

fn must(ns: &str, cmd: &[&str]) {
    let o = ip_netns(ns, cmd);
    assert!(o.status.success(), "{cmd:?} in {ns}: {o:?}");
}

/// One HTTP GET on a new connection from inside `ns`; the answering host's name.
fn http_get(ns: &str, addr: SocketAddr, timeout: Duration) -> std::io::Result<String> {
    shoal_netns::run_in(ns, move || {
        let mut s = TcpStream::connect_timeout(&addr, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        out.lines()
            .find_map(|l| l.strip_prefix("Hostname:"))
            .map(|h| h.trim().to_string())
            .ok_or_else(|| std::io::Error::other(format!("bad answer {out:?}")))
    })
    .expect("enter namespace")
}

/// Waits until `ok` holds, polling every 20 ms; how long it took.
fn time_until(what: &str, mut ok: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    loop {
        if ok() {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < BOUND,
            "{what}: still broken {BOUND:?} after the drift"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn has_table(ns: &str, table: &str) -> bool {
    ip_netns(ns, &["nft", "list", "table", "ip", table])
        .status
        .success()
}

fn scrape(node_ns: &str) -> String {
    let o = ip_netns(
        node_ns,
        &[
            "curl",
            "-s",
            "--max-time",
            "5",
            "http://127.0.0.1:9469/metrics",
        ],
    );
    String::from_utf8_lossy(&o.stdout).to_string()
}

fn sample(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0)
}

fn summary(what: &str, mut d: Vec<Duration>) -> String {
    d.sort();
    format!(
        "{what}: p50 {} ms, max {} ms over {} runs",
        d[d.len() / 2].as_millis(),
        d[d.len() - 1].as_millis(),
        d.len()
    )
}

#[test]
fn flushed_tables_and_deleted_routes_come_back_and_flows_stay_up() {
    if !require_kernel("flushed_tables_and_deleted_routes_come_back_and_flows_stay_up") {
        return;
    }
    let lab = Lab::up(1, "embedded");
    lab.shoal(&["network", "create", "appnet"]).ok();
    lab.create_whoami("web", "appnet", 2, &["-p", "8080:80"]);
    let tasks = lab.wait_for("2 running web tasks", Duration::from_secs(30), || {
        let t = lab.running_tasks("web");
        (t.len() == 2).then_some(t)
    });
    let svc: serde_json::Value =
        serde_json::from_str(&lab.shoal(&["service", "inspect", "web"]).ok().stdout).unwrap();
    let vip: Ipv4Addr = svc["networks"][0]["vip"].as_str().unwrap().parse().unwrap();
    let net_id = svc["networks"][0]["network_id"].as_str().unwrap();
    let node_ns = format!("shoal-{}-node1", lab.name);
    let client_ns = format!("shoal-{}-client", lab.name);
    let net_ns = format!("shoal-{}-node1-n-{}", lab.name, &net_id[..12]);
    let task_id = tasks[0]["id"].as_str().unwrap();
    let task_ns = format!("shoal-{}-node1-t-{}", lab.name, &task_id[..12]);
    let task_ip = tasks[1]["networks"][0]["ip"].as_str().unwrap().to_string();
    let published: SocketAddr = format!("{NODE1}:8080").parse().unwrap();
    let via_vip: SocketAddr = (vip, 80).into();
    let t = Duration::from_millis(300);
    let port_ok = || http_get(&client_ns, published, t).is_ok();
    let vip_ok = || {
        // Both replicas answer through the VIP (a table with half its backends is not back).
        let mut hosts = std::collections::BTreeSet::new();
        for _ in 0..12 {
            match http_get(&task_ns, via_vip, t) {
                Ok(h) => {
                    hosts.insert(h);
                }
                Err(_) => return false,
            }
        }
        hosts.len() == 2
    };
    time_until("the published port", port_ok);
    time_until("the VIP", vip_ok);

    // Established flows through the published port and through the VIP.
    let mut through_port = shoal_netns::run_in(&client_ns, move || {
        TcpStream::connect_timeout(&published, Duration::from_secs(2))
    })
    .unwrap()
    .unwrap();
    let mut through_vip = shoal_netns::run_in(&task_ns, move || {
        TcpStream::connect_timeout(&via_vip, Duration::from_secs(2))
    })
    .unwrap()
    .unwrap();
    for s in [&mut through_port, &mut through_vip] {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let a = http_on(s).expect("first exchange");
        assert!(a.starts_with("HTTP/1.1 200"), "{a}");
    }
    let before = scrape(&node_ns);

    // 1. `nft flush ruleset` in the node namespace (the host's, on a real node): the
    //    published-port and guard tables are gone; the port must answer again by itself.
    let mut node_flush = vec![];
    for i in 0..10 {
        must(&node_ns, &["nft", "flush", "ruleset"]);
        assert!(!has_table(&node_ns, "shoal_publish"));
        node_flush.push(time_until(
            &format!("published port after flush {i}"),
            || port_ok() && has_table(&node_ns, "shoal_guard"),
        ));
    }
    // 2. The VIP table in the network namespace: deleted outright, or flushed (rules and
    //    elements gone, table left).
    let mut vip_flush = vec![];
    for i in 0..10 {
        let cmd: &[&str] = if i % 2 == 0 {
            &["nft", "delete", "table", "ip", "shoal_lb"]
        } else {
            &["nft", "flush", "table", "ip", "shoal_lb"]
        };
        must(&net_ns, cmd);
        assert!(!vip_ok(), "the VIP still balances after {cmd:?}");
        vip_flush.push(time_until(&format!("VIP after {cmd:?}"), vip_ok));
    }
    // 3. A route of the overlay (to a replica, in the network namespace): put back by the
    //    next full pass.
    must(&net_ns, &["ip", "route", "del", &format!("{task_ip}/32")]);
    let route = time_until("the route to a replica", || {
        let o = ip_netns(&net_ns, &["ip", "route", "show", &format!("{task_ip}/32")]);
        !String::from_utf8_lossy(&o.stdout).trim().is_empty() && vip_ok()
    });

    // The established flows never noticed.
    for (what, s) in [
        ("published port", &mut through_port),
        ("VIP", &mut through_vip),
    ] {
        let a = http_on(s).unwrap_or_else(|e| panic!("established flow through the {what}: {e}"));
        assert!(a.starts_with("HTTP/1.1 200"), "{what}: {a}");
    }
    // Each repair is counted per dataplane.
    let after = scrape(&node_ns);
    let delta = |dp: &str| {
        let s = format!("shoal_drift_repairs_total{{dataplane=\"{dp}\"}}");
        sample(&after, &s) - sample(&before, &s)
    };
    assert!(
        delta("publish") >= 10,
        "publish repairs: {}",
        delta("publish")
    );
    assert!(delta("guard") >= 10, "guard repairs: {}", delta("guard"));
    assert!(
        delta("lb_nft") >= 10,
        "VIP table repairs: {}",
        delta("lb_nft")
    );
    assert!(delta("mesh") >= 1, "mesh repairs: {}", delta("mesh"));
    println!(
        "{}",
        summary("drift: nft flush ruleset in the node", node_flush)
    );
    println!("{}", summary("drift: VIP table deleted/flushed", vip_flush));
    println!(
        "drift: route to a replica deleted: {} ms",
        route.as_millis()
    );
}
