//! Three-node labs on a real etcd: overlays across nodes, placement, concurrent writers,
//! node loss and return, and an etcd outage. Real binaries, real namespaces, real clients.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use shoal_tests::{Lab, ipv4s, require_kernel};

fn task_of(out: &str) -> Option<String> {
    out.lines()
        .find_map(|l| l.strip_prefix("Task: "))
        .map(str::to_string)
}

/// name (web.1) -> (node name, ip) of running tasks.
fn placement(lab: &Lab, service: &str) -> BTreeMap<String, (String, Ipv4Addr)> {
    let nodes = lab.node_names();
    lab.running_tasks(service)
        .iter()
        .map(|t| {
            let name = format!("{}.{}", t["service_name"].as_str().unwrap(), t["slot"]);
            let node = nodes[t["node_id"].as_str().unwrap()].clone();
            (
                name,
                (
                    node,
                    t["networks"][0]["ip"].as_str().unwrap().parse().unwrap(),
                ),
            )
        })
        .collect()
}

fn wait_running(lab: &Lab, service: &str, n: usize) -> BTreeMap<String, (String, Ipv4Addr)> {
    lab.wait_for(
        &format!("{n} running {service} tasks"),
        Duration::from_secs(60),
        || {
            let p = placement(lab, service);
            (p.len() == n).then_some(p)
        },
    )
}

fn dig(lab: &Lab, from: &str, name: &str) -> BTreeSet<Ipv4Addr> {
    ipv4s(
        &lab.exec(from, &["dig", "+short", "@127.0.0.11", name])
            .stdout,
    )
}

#[test]
fn three_nodes_spread_resolve_and_balance() {
    if !require_kernel("three_nodes_spread_resolve_and_balance") {
        return;
    }
    let lab = Lab::up(3, "etcd");
    lab.shoal(&["network", "create", "appnet"]).ok();
    lab.shoal(&["network", "create", "other"]).ok();
    lab.shoal(&[
        "service",
        "create",
        "--name",
        "web",
        "--network",
        "appnet",
        "--replicas",
        "6",
        "--",
        "shoal",
        "whoami",
        "--port",
        "80",
    ])
    .ok();
    lab.shoal(&[
        "service",
        "create",
        "--name",
        "db",
        "--network",
        "other",
        "--",
        "shoal",
        "whoami",
        "--port",
        "80",
    ])
    .ok();
    let web = wait_running(&lab, "web", 6);
    let db = wait_running(&lab, "db", 1);
    // Spread: two per node.
    let mut per_node: BTreeMap<&str, usize> = BTreeMap::new();
    for (node, _) in web.values() {
        *per_node.entry(node).or_default() += 1;
    }
    assert_eq!(
        per_node,
        BTreeMap::from([("node1", 2), ("node2", 2), ("node3", 2)]),
        "{web:?}"
    );
    let ips: BTreeSet<Ipv4Addr> = web.values().map(|(_, ip)| *ip).collect();

    // Every node answers identically: tasks.web lists all six, web is one VIP.
    let vip = lab.wait_for(
        "DNS converged on every node",
        Duration::from_secs(10),
        || {
            let mut vips = BTreeSet::new();
            for task in ["web.1", "web.2", "web.3", "web.4", "web.5", "web.6"] {
                if dig(&lab, task, "tasks.web") != ips {
                    return None;
                }
                vips.extend(dig(&lab, task, "web"));
            }
            (vips.len() == 1).then(|| *vips.iter().next().unwrap())
        },
    );

    // From a task on node1: the VIP reaches replicas on every node; direct task-to-task
    // traffic crosses nodes; the answer carries the caller's own address.
    let from = web
        .iter()
        .find(|(_, (n, _))| n == "node1")
        .map(|(t, _)| t.clone())
        .unwrap();
    let from_ip = web[&from].1;
    let mut nodes_seen = BTreeSet::new();
    for _ in 0..60 {
        let r = lab
            .exec(&from, &["curl", "-sS", "--max-time", "5", "http://web/"])
            .ok();
        let t = task_of(&r.stdout).expect("whoami answer");
        nodes_seen.insert(web[&t].0.clone());
    }
    assert_eq!(
        nodes_seen.len(),
        3,
        "the VIP {vip} reached nodes {nodes_seen:?}"
    );
    for (t, (node, ip)) in &web {
        let r = lab
            .exec(
                &from,
                &["curl", "-sS", "--max-time", "5", &format!("http://{ip}/")],
            )
            .ok();
        assert_eq!(
            task_of(&r.stdout).as_deref(),
            Some(t.as_str()),
            "direct to {t} on {node}"
        );
        if *ip != from_ip {
            assert!(
                r.stdout.contains(&format!("RemoteAddr: {from_ip}:")),
                "source kept: {}",
                r.stdout
            );
        }
    }

    // Isolation: another network's service is neither resolved nor reachable.
    let r = lab.exec(&from, &["dig", "@127.0.0.11", "db"]).ok();
    assert!(r.stdout.contains("NXDOMAIN"), "{}", r.stdout);
    let db_ip = db["db.1"].1;
    let r = lab.exec(
        &from,
        &[
            "curl",
            "-sS",
            "--max-time",
            "2",
            &format!("http://{db_ip}/"),
        ],
    );
    assert_ne!(
        r.code, 0,
        "a task reached a network it is not attached to: {r:?}"
    );
}

#[test]
fn concurrent_creates_from_two_nodes_never_collide() {
    if !require_kernel("concurrent_creates_from_two_nodes_never_collide") {
        return;
    }
    let lab = Lab::up(3, "etcd");
    lab.shoal(&["network", "create", "appnet"]).ok();
    let lab_ref = &lab;
    std::thread::scope(|s| {
        for node in ["node1", "node2"] {
            s.spawn(move || {
                for i in 0..8 {
                    let name = format!("{node}svc{i}");
                    lab_ref
                        .shoal_on(
                            node,
                            &[
                                "service",
                                "create",
                                "--name",
                                &name,
                                "--network",
                                "appnet",
                                "--replicas",
                                "0",
                                "-p",
                                "80",
                                "--",
                                "true",
                            ],
                        )
                        .ok();
                }
            });
        }
    });
    let r = lab.shoal(&["service", "ls", "--format", "json"]).ok();
    let v: Vec<serde_json::Value> = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v.len(), 16);
    let vips: BTreeSet<String> = v
        .iter()
        .map(|s| s["networks"][0]["vip"].as_str().unwrap().to_string())
        .collect();
    let ports: BTreeSet<u64> = v
        .iter()
        .map(|s| s["ports"][0]["published"].as_u64().unwrap())
        .collect();
    assert_eq!(vips.len(), 16, "a VIP was handed out twice");
    assert_eq!(ports.len(), 16, "a published port was handed out twice");
}

#[test]
fn node_loss_is_detected_healed_and_rejoined() {
    if !require_kernel("node_loss_is_detected_healed_and_rejoined") {
        return;
    }
    let lab = Lab::up(3, "etcd");
    lab.shoal(&["network", "create", "appnet"]).ok();
    lab.shoal(&[
        "service",
        "create",
        "--name",
        "web",
        "--network",
        "appnet",
        "--replicas",
        "3",
        "--",
        "shoal",
        "whoami",
        "--port",
        "80",
    ])
    .ok();
    let web = wait_running(&lab, "web", 3);
    let on2: BTreeSet<Ipv4Addr> = web
        .values()
        .filter(|(n, _)| n == "node2")
        .map(|(_, ip)| *ip)
        .collect();
    assert_eq!(on2.len(), 1, "{web:?}");
    let observer = web
        .iter()
        .find(|(_, (n, _))| n == "node1")
        .map(|(t, _)| t.clone())
        .unwrap();
    let all: BTreeSet<Ipv4Addr> = web.values().map(|(_, ip)| *ip).collect();
    lab.wait_for("all tasks in DNS", Duration::from_secs(10), || {
        (dig(&lab, &observer, "tasks.web") == all).then_some(())
    });

    let t0 = Instant::now();
    lab.shoal(&["lab", "kill", "--name", &lab.name, "node2"])
        .ok();
    let gone = lab.wait_for(
        "node2's task gone from DNS on node1",
        Duration::from_secs(15),
        || {
            dig(&lab, &observer, "tasks.web")
                .is_disjoint(&on2)
                .then(|| t0.elapsed())
        },
    );
    eprintln!("node2's task left DNS on node1 {gone:?} after lab kill");
    // `lab exec` into the task on node3 works while node2 (asked before it) is down.
    let on3 = web
        .iter()
        .find(|(_, (n, _))| n == "node3")
        .map(|(t, _)| t.clone())
        .unwrap();
    let r = lab.exec(&on3, &["hostname"]);
    assert_eq!(r.code, 0, "lab exec {on3} with node2 down: {r:?}");
    // TTL 3 s + 1 s, plus the polling cost of `lab exec dig`.
    assert!(
        gone < Duration::from_millis(4500),
        "detection took {gone:?}"
    );
    // The replica count is restored on the survivors.
    let healed = lab.wait_for(
        "3 running web tasks on the survivors",
        Duration::from_secs(30),
        || {
            let p = placement(&lab, "web");
            (p.len() == 3 && p.values().all(|(n, _)| n != "node2")).then_some(p)
        },
    );
    let healed_ips: BTreeSet<Ipv4Addr> = healed.values().map(|(_, ip)| *ip).collect();
    lab.wait_for("replacement in DNS", Duration::from_secs(10), || {
        (dig(&lab, &observer, "tasks.web") == healed_ips).then_some(())
    });
    // Requests to the VIP keep succeeding.
    for _ in 0..20 {
        lab.exec(
            &observer,
            &["curl", "-sS", "--max-time", "3", "http://web/"],
        )
        .ok();
    }

    // node2 comes back: no duplicate tasks, no task namespaces left on it, no stale
    // forwarding entries for its old task anywhere.
    lab.shoal(&["lab", "start", "--name", &lab.name, "node2"])
        .ok();
    lab.wait_for("node2 ready", Duration::from_secs(15), || {
        let r = lab.shoal(&["node", "ls", "--format", "json"]);
        let v: Vec<serde_json::Value> = serde_json::from_str(&r.stdout).ok()?;
        v.iter().all(|n| n["status"] == "ready").then_some(())
    });
    let prefix = format!("shoal-{}-node2-t-", lab.name);
    lab.wait_for(
        "node2's old task namespace removed",
        Duration::from_secs(15),
        || {
            let n = std::fs::read_dir("/run/netns")
                .unwrap()
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
                .count();
            (n == 0).then_some(())
        },
    );
    let tasks = lab.tasks("web");
    let live: Vec<_> = tasks
        .iter()
        .filter(|t| t["desired_state"] == "running")
        .collect();
    assert_eq!(live.len(), 3, "{tasks:?}");
    let old_ip = on2.iter().next().unwrap().to_string();
    let net: serde_json::Value =
        serde_json::from_str(&lab.shoal(&["network", "inspect", "appnet"]).ok().stdout).unwrap();
    let netns_suffix = format!("-n-{}", &net["id"].as_str().unwrap()[..12]);
    for node in ["node1", "node3"] {
        let ns = format!("shoal-{}-{node}{netns_suffix}", lab.name);
        let out = std::process::Command::new("ip")
            .args(["-n", &ns, "neigh", "show"])
            .output()
            .unwrap();
        let neigh = String::from_utf8_lossy(&out.stdout);
        assert!(
            !neigh.lines().any(|l| l.starts_with(&format!("{old_ip} "))),
            "stale neighbour for {old_ip} on {node}: {neigh}"
        );
    }
}

#[test]
fn etcd_outage_keeps_serving_and_converges_after() {
    if !require_kernel("etcd_outage_keeps_serving_and_converges_after") {
        return;
    }
    let lab = Lab::up(3, "etcd");
    lab.shoal(&["network", "create", "appnet"]).ok();
    lab.shoal(&[
        "service",
        "create",
        "--name",
        "web",
        "--network",
        "appnet",
        "--replicas",
        "3",
        "--",
        "shoal",
        "whoami",
        "--port",
        "80",
    ])
    .ok();
    let web = wait_running(&lab, "web", 3);
    let all: BTreeSet<Ipv4Addr> = web.values().map(|(_, ip)| *ip).collect();
    let observer = "web.1";
    lab.wait_for("all tasks in DNS", Duration::from_secs(10), || {
        (dig(&lab, observer, "tasks.web") == all).then_some(())
    });
    let ids_before: BTreeSet<String> = lab
        .running_tasks("web")
        .iter()
        .map(|t| t["id"].to_string())
        .collect();

    // Cut etcd off the underlay for 20 s.
    let ul = format!("shoal-{}-ul", lab.name);
    let cut = std::process::Command::new("ip")
        .args(["-n", &ul, "link", "set", "etcd", "down"])
        .status()
        .unwrap();
    assert!(cut.success());
    let t0 = Instant::now();
    let r = lab.shoal(&["service", "scale", "web=4"]);
    assert_ne!(r.code, 0, "a write succeeded without etcd: {r:?}");
    assert!(
        r.stderr.contains("store unavailable"),
        "unclear error: {}",
        r.stderr
    );
    while t0.elapsed() < Duration::from_secs(20) {
        assert_eq!(
            dig(&lab, observer, "tasks.web"),
            all,
            "DNS changed during the outage"
        );
        lab.exec(observer, &["curl", "-sS", "--max-time", "3", "http://web/"])
            .ok();
        std::thread::sleep(Duration::from_millis(500));
    }
    let up = std::process::Command::new("ip")
        .args(["-n", &ul, "link", "set", "etcd", "up"])
        .status()
        .unwrap();
    assert!(up.success());
    // After etcd returns: nothing was rescheduled, and writes converge without restarts.
    lab.wait_for("writes accepted again", Duration::from_secs(30), || {
        (lab.shoal(&["service", "scale", "web=4"]).code == 0).then_some(())
    });
    let web4 = wait_running(&lab, "web", 4);
    let ids_after: BTreeSet<String> = lab
        .running_tasks("web")
        .iter()
        .map(|t| t["id"].to_string())
        .collect();
    assert!(
        ids_before.is_subset(&ids_after),
        "tasks were replaced after the outage: {ids_before:?} -> {ids_after:?}"
    );
    let all4: BTreeSet<Ipv4Addr> = web4.values().map(|(_, ip)| *ip).collect();
    lab.wait_for("4 tasks in DNS", Duration::from_secs(15), || {
        (dig(&lab, observer, "tasks.web") == all4).then_some(())
    });
}

/// Host-mode ports: never two tasks publishing the same port on one node.
#[test]
fn host_mode_ports_never_share_a_node() {
    if !require_kernel("host_mode_ports_never_share_a_node") {
        return;
    }
    let lab = Lab::up(3, "etcd");
    lab.shoal(&["network", "create", "appnet"]).ok();
    lab.shoal(&[
        "service",
        "create",
        "--name",
        "edge",
        "--network",
        "appnet",
        "--replicas",
        "4",
        "--publish",
        "published=9000,target=80,mode=host",
        "--",
        "shoal",
        "whoami",
        "--port",
        "80",
    ])
    .ok();
    let placed = wait_running(&lab, "edge", 3);
    let nodes: BTreeSet<&String> = placed.values().map(|(n, _)| n).collect();
    assert_eq!(nodes.len(), 3, "{placed:?}");
    // The fourth replica has nowhere to go and stays pending.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(placement(&lab, "edge").len(), 3);
    assert_eq!(lab.tasks("edge").len(), 3, "a fourth task was placed");
}
