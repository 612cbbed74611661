//! The one-node slice, end to end, with the real binary, real namespaces, real nft, real DNS
//! on 127.0.0.11 and real clients (glibc's getent, dig, curl) inside the task namespaces.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use shoal_tests::{Lab, host_snapshot, http_on, ipv4s, require_kernel};

fn task_names(out: &str) -> Vec<String> {
    out.lines()
        .filter_map(|l| l.strip_prefix("Task: "))
        .map(str::to_string)
        .collect()
}

#[test]
fn one_node_slice_end_to_end() {
    if !require_kernel("one_node_slice_end_to_end") {
        return;
    }
    let (_, nft_before) = host_snapshot();
    let lab = Lab::up(1, "embedded");
    let prefix = format!("shoal-{}-", lab.name);

    lab.shoal(&["network", "create", "--subnet", "10.10.0.0/24", "appnet"])
        .ok();
    let tasks = lab.whoami_service("web", "appnet", 3);
    let task_ips: BTreeSet<Ipv4Addr> = tasks
        .iter()
        .map(|t| t["networks"][0]["ip"].as_str().unwrap().parse().unwrap())
        .collect();
    assert_eq!(task_ips.len(), 3);

    // The name resolves to the VIP inside web.1, through glibc and our resolver.
    let svc: serde_json::Value =
        serde_json::from_str(&lab.shoal(&["service", "inspect", "web"]).ok().stdout).unwrap();
    let vip: Ipv4Addr = svc["networks"][0]["vip"].as_str().unwrap().parse().unwrap();
    assert!(
        ipnet::Ipv4Net::new(Ipv4Addr::new(10, 10, 0, 0), 24)
            .unwrap()
            .contains(&vip),
        "VIP {vip} outside appnet"
    );
    assert!(!task_ips.contains(&vip));
    // DNS answers come from the task's own namespace: wait until web.1's view has all three
    // serving tasks (the view follows the state write that `service ps` shows).
    lab.wait_for(
        "tasks.web with 3 addresses in web.1",
        Duration::from_secs(10),
        || {
            let r = lab.exec("web.1", &["dig", "+short", "@127.0.0.11", "tasks.web"]);
            (ipv4s(&r.stdout) == task_ips).then_some(())
        },
    );
    let got = lab.wait_for("getent hosts web", Duration::from_secs(10), || {
        let r = lab.exec("web.1", &["getent", "hosts", "web"]);
        (r.code == 0).then_some(r.stdout)
    });
    assert_eq!(
        ipv4s(&got),
        BTreeSet::from([vip]),
        "getent hosts web: {got}"
    );
    let r = lab.exec("web.1", &["getent", "ahostsv4", "tasks.web"]).ok();
    assert_eq!(
        ipv4s(&r.stdout),
        task_ips,
        "getent ahostsv4 tasks.web: {}",
        r.stdout
    );

    // 30 requests to the name reach all three replicas.
    let mut seen = BTreeSet::new();
    for _ in 0..30 {
        let r = lab
            .exec("web.1", &["curl", "-sS", "--max-time", "5", "http://web/"])
            .ok();
        seen.extend(task_names(&r.stdout));
    }
    assert_eq!(
        seen,
        BTreeSet::from(["web.1".to_string(), "web.2".into(), "web.3".into()]),
        "replicas reached through the VIP"
    );

    // Scaling is reflected in DNS within a second of the API call returning.
    let t0 = Instant::now();
    lab.shoal(&["service", "scale", "web=5"]).ok();
    let took = lab.wait_for(
        "tasks.web with 5 addresses",
        Duration::from_secs(10),
        || {
            let r = lab.exec("web.1", &["dig", "+short", "@127.0.0.11", "tasks.web"]);
            (ipv4s(&r.stdout).len() == 5).then(|| t0.elapsed())
        },
    );
    eprintln!("scale 3 -> 5 visible in web.1's DNS after {took:?}");
    assert!(
        took < Duration::from_secs(1),
        "scale took {took:?} to show in DNS"
    );

    // Scale down: the removed tasks leave DNS, their namespaces go away.
    lab.shoal(&["service", "scale", "web=2"]).ok();
    lab.wait_for(
        "tasks.web with 2 addresses",
        Duration::from_secs(10),
        || {
            let r = lab.exec("web.1", &["dig", "+short", "@127.0.0.11", "tasks.web"]);
            (ipv4s(&r.stdout).len() == 2).then_some(())
        },
    );
    lab.wait_for("2 task namespaces", Duration::from_secs(15), || {
        let n = shoal_netns_count(&format!("{prefix}node1-t-"));
        (n == 2).then_some(())
    });

    // Removing the service removes its name and VIP.
    lab.shoal(&["service", "rm", "web"]).ok();
    lab.wait_for("no task namespaces", Duration::from_secs(15), || {
        (shoal_netns_count(&format!("{prefix}node1-t-")) == 0).then_some(())
    });
    lab.shoal(&[
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
    ])
    .ok();
    lab.wait_for("probe running", Duration::from_secs(30), || {
        (lab.running_tasks("probe").len() == 1).then_some(())
    });
    let r = lab.wait_for(
        "web gone from probe.1's DNS",
        Duration::from_secs(10),
        || {
            let r = lab.exec("probe.1", &["dig", "@127.0.0.11", "web"]);
            (r.code == 0 && r.stdout.contains("status: NXDOMAIN")).then_some(r)
        },
    );
    assert!(!r.stdout.contains(&vip.to_string()), "{}", r.stdout);
    // Nothing answers on the old VIP any more (it may be handed out again later).
    let r = lab.exec(
        "probe.1",
        &["curl", "-sS", "--max-time", "2", &format!("http://{vip}/")],
    );
    assert_ne!(r.code, 0, "old VIP still answers: {r:?}");

    let name = lab.name.clone();
    drop(lab);
    assert_eq!(
        shoal_netns_count(&format!("shoal-{name}-")),
        0,
        "lab down left namespaces"
    );
    assert!(
        !std::path::Path::new(&format!("/run/shoal/lab/{name}")).exists(),
        "lab down left files"
    );
    let (_, nft_after) = host_snapshot();
    assert_eq!(nft_before, nft_after, "the host's nft ruleset changed");
}

fn shoal_netns_count(prefix: &str) -> usize {
    std::fs::read_dir("/run/netns")
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
                .count()
        })
        .unwrap_or(0)
}

/// Bad input: a clear one-line error naming the problem, non-zero exit, nothing changed.
#[test]
fn bad_input_is_refused_and_changes_nothing() {
    if !require_kernel("bad_input_is_refused_and_changes_nothing") {
        return;
    }
    let lab = Lab::up(1, "embedded");
    lab.shoal(&["network", "create", "--subnet", "10.20.0.0/24", "appnet"])
        .ok();
    lab.shoal(&[
        "service",
        "create",
        "--name",
        "web",
        "--network",
        "appnet",
        "--publish",
        "published=8080,target=80",
        "--",
        "shoal",
        "whoami",
    ])
    .ok();
    let before = (
        lab.shoal(&["network", "ls", "--format", "json"])
            .ok()
            .stdout,
        lab.shoal(&["service", "ls", "--format", "json"])
            .ok()
            .stdout,
    );

    let cases: &[(&[&str], &str)] = &[
        (
            &["network", "create", "--subnet", "10.0.0.300/24", "n1"],
            "10.0.0.300/24",
        ),
        (
            &["network", "create", "--subnet", "10.20.0.0/25", "n2"],
            "overlaps 10.20.0.0/24",
        ),
        (&["network", "create", "bad name"], "invalid network name"),
        (
            &[
                "service",
                "create",
                "--name",
                "lbx",
                "--network",
                "appnet",
                "--lb",
                "roundrobin",
                "--",
                "true",
            ],
            "invalid --lb \"roundrobin\": use random or consistent",
        ),
        (
            &[
                "service",
                "create",
                "--name",
                "lbx",
                "--network",
                "appnet",
                "--affinity-timeout",
                "48h",
                "--",
                "true",
            ],
            "--affinity-timeout 172800s is out of range (1s-24h)",
        ),
        (
            &[
                "service",
                "create",
                "--name",
                "lbx",
                "--network",
                "appnet",
                "--affinity-timeout",
                "1500ms",
                "--",
                "true",
            ],
            "--affinity-timeout 1500ms: use whole seconds",
        ),
        (
            &["network", "create", "appnet"],
            "network \"appnet\" already exists",
        ),
        (
            &[
                "service",
                "create",
                "--name",
                "web",
                "--network",
                "appnet",
                "--",
                "true",
            ],
            "service \"web\" already exists",
        ),
        (
            &[
                "service",
                "create",
                "--name",
                "s2",
                "--network",
                "nope",
                "--",
                "true",
            ],
            "network \"nope\" not found",
        ),
        (
            &[
                "service",
                "create",
                "--name",
                "s3",
                "--replicas",
                "three",
                "--",
                "true",
            ],
            "three",
        ),
        (
            &[
                "service",
                "create",
                "--name",
                "s4",
                "--publish",
                "published=70000,target=80",
                "--",
                "true",
            ],
            "70000",
        ),
        (
            &[
                "service",
                "create",
                "--name",
                "s5",
                "--publish",
                "published=8080,target=80",
                "--",
                "true",
            ],
            "port 8080/tcp is already published",
        ),
        (&["network", "rm", "appnet"], "in use by service(s) web"),
        (&["service", "scale", "web=lots"], "lots"),
        (&["service", "rm", "ghost"], "service \"ghost\" not found"),
    ];
    for (args, needle) in cases {
        let r = lab.shoal(args);
        assert_ne!(r.code, 0, "{args:?} should fail: {r:?}");
        let msg = r.stderr.trim();
        assert!(
            msg.contains(needle),
            "{args:?}: error {msg:?} should mention {needle:?}"
        );
        assert!(
            r.stdout.trim().is_empty(),
            "{args:?} printed to stdout: {}",
            r.stdout
        );
    }
    let after = (
        lab.shoal(&["network", "ls", "--format", "json"])
            .ok()
            .stdout,
        lab.shoal(&["service", "ls", "--format", "json"])
            .ok()
            .stdout,
    );
    assert_eq!(before.0, after.0, "networks changed by refused requests");
    let strip = |s: &str| -> Vec<(String, String)> {
        let v: Vec<serde_json::Value> = serde_json::from_str(s).unwrap();
        v.iter()
            .map(|x| (x["name"].to_string(), x["ports"].to_string()))
            .collect()
    };
    assert_eq!(
        strip(&before.1),
        strip(&after.1),
        "services changed by refused requests"
    );

    // The API socket absent: the CLI says the agent is not running and where it looked.
    let r = shoal_tests::Run::from_command(
        std::process::Command::new(shoal_tests::shoal_bin()).args([
            "-H",
            "/nonexistent/shoal.sock",
            "network",
            "ls",
        ]),
    );
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains("/nonexistent/shoal.sock") && r.stderr.contains("agent running"),
        "{r:?}"
    );
    // Malformed API bodies are refused with 4xx and a message.
    let r = lab
        .exec(
            "node1",
            &[
                "curl",
                "-sS",
                "--unix-socket",
                lab.host.trim_start_matches("unix://"),
                "-X",
                "POST",
                "-H",
                "content-type: application/json",
                "-d",
                "{\"name\":\"x\",\"bogus\":1}",
                "-w",
                "\\n%{http_code}",
                "http://shoal/v1/networks",
            ],
        )
        .ok();
    assert!(
        r.stdout.contains("bogus") && r.stdout.trim_end().ends_with("400"),
        "{r:?}"
    );
}

/// The same slice with the etcd store: a real etcd in the lab's own namespace on the
/// underlay, the agent reaching it over the lab network.
#[test]
fn one_node_on_etcd() {
    if !require_kernel("one_node_on_etcd") {
        return;
    }
    let lab = Lab::up(1, "etcd");
    lab.shoal(&["network", "create", "appnet"]).ok();
    lab.shoal(&[
        "service",
        "create",
        "--name",
        "api",
        "--network",
        "appnet,alias=backend",
        "--replicas",
        "2",
        "--publish",
        "published=8081,target=8080",
        "--",
        "shoal",
        "whoami",
        "--port",
        "8080",
    ])
    .ok();
    let tasks = lab.wait_for("2 running api tasks", Duration::from_secs(30), || {
        let t = lab.running_tasks("api");
        (t.len() == 2).then_some(t)
    });
    let task_ips: BTreeSet<Ipv4Addr> = tasks
        .iter()
        .map(|t| t["networks"][0]["ip"].as_str().unwrap().parse().unwrap())
        .collect();
    lab.wait_for(
        "tasks.api with both addresses",
        Duration::from_secs(10),
        || {
            let r = lab.exec("api.2", &["dig", "+short", "@127.0.0.11", "tasks.api"]);
            (ipv4s(&r.stdout) == task_ips).then_some(())
        },
    );
    // The alias resolves to the same VIP as the name; requests through it reach both tasks.
    let a = lab
        .exec("api.2", &["dig", "+short", "@127.0.0.11", "api"])
        .ok()
        .stdout;
    let b = lab
        .exec("api.2", &["dig", "+short", "@127.0.0.11", "backend.appnet"])
        .ok()
        .stdout;
    assert_eq!(ipv4s(&a), ipv4s(&b));
    assert_eq!(ipv4s(&a).len(), 1);
    // SRV for the service's port: one record per task, their A records in the additional
    // section (Docker's SRV handler never answers).
    let r = lab
        .exec("api.2", &["dig", "@127.0.0.11", "SRV", "_8080._tcp.api"])
        .ok()
        .stdout;
    assert_eq!(r.matches(" 8080 api.").count(), 2, "{r}");
    let additional = r.split("ADDITIONAL SECTION:").nth(1).unwrap_or_default();
    assert_eq!(ipv4s(additional), task_ips, "{r}");
    let mut seen = BTreeSet::new();
    for _ in 0..20 {
        let r = lab
            .exec(
                "api.2",
                &["curl", "-sS", "--max-time", "5", "http://backend:8080/"],
            )
            .ok();
        seen.extend(task_names(&r.stdout));
    }
    assert_eq!(seen, BTreeSet::from(["api.1".to_string(), "api.2".into()]));
}

/// A task whose process exits is replaced by a new task for its slot (as Swarm does); a
/// task with a health check is in DNS only while healthy.
#[test]
fn exits_are_replaced_and_health_gates_dns() {
    if !require_kernel("exits_are_replaced_and_health_gates_dns") {
        return;
    }
    let lab = Lab::up(1, "embedded");
    lab.shoal(&["network", "create", "appnet"]).ok();
    // A task that dies after a second.
    lab.shoal(&[
        "service",
        "create",
        "--name",
        "flaky",
        "--network",
        "appnet",
        "--",
        "sh",
        "-c",
        "sleep 1; exit 3",
    ])
    .ok();
    let first = lab.wait_for("flaky.1 running", Duration::from_secs(30), || {
        lab.running_tasks("flaky")
            .first()
            .map(|t| t["id"].as_str().unwrap().to_string())
    });
    let seen_running = std::time::Instant::now();
    let second = lab.wait_for("a new task for flaky.1", Duration::from_secs(30), || {
        lab.running_tasks("flaky")
            .first()
            .map(|t| t["id"].as_str().unwrap().to_string())
            .filter(|id| *id != first)
    });
    assert_ne!(first, second);
    // Not in a hot loop: the slot waited for the restart delay (5 s by default) after the
    // exit, which came a second after the start.
    let replaced_after = seen_running.elapsed();
    assert!(
        replaced_after >= Duration::from_secs(5),
        "replaced {replaced_after:?} after it ran: no restart delay"
    );
    lab.shoal(&["service", "rm", "flaky"]).ok();

    // Health: the check passes while a marker file exists.
    let marker = format!("/run/shoal-test-health-{}", lab.name);
    let _ = std::fs::remove_file(&marker);
    struct Rm(String);
    impl Drop for Rm {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let _rm = Rm(marker.clone());
    lab.shoal(&[
        "service",
        "create",
        "--name",
        "web",
        "--network",
        "appnet",
        "--health-cmd",
        &format!("test -f {marker}"),
        "--health-interval",
        "200ms",
        "--health-retries",
        "2",
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
        "probe",
        "--network",
        "appnet",
        "--",
        "shoal",
        "whoami",
        "--port",
        "80",
    ])
    .ok();
    lab.wait_for("probe running", Duration::from_secs(30), || {
        (lab.running_tasks("probe").len() == 1).then_some(())
    });
    // web.1 runs but is not healthy yet: not in DNS.
    let web = lab.wait_for("web task started", Duration::from_secs(30), || {
        lab.tasks("web")
            .into_iter()
            .find(|t| t["state"] == "running")
    });
    let ip: Ipv4Addr = web["networks"][0]["ip"].as_str().unwrap().parse().unwrap();
    std::thread::sleep(Duration::from_millis(800));
    assert!(
        ipv4s(
            &lab.exec("probe.1", &["dig", "+short", "@127.0.0.11", "tasks.web"])
                .ok()
                .stdout
        )
        .is_empty(),
        "an unhealthy task is in DNS"
    );
    std::fs::write(&marker, b"ok").unwrap();
    lab.wait_for("healthy web.1 in DNS", Duration::from_secs(10), || {
        (ipv4s(
            &lab.exec("probe.1", &["dig", "+short", "@127.0.0.11", "tasks.web"])
                .stdout,
        ) == BTreeSet::from([ip]))
        .then_some(())
    });
    let r = lab
        .exec(
            "probe.1",
            &["curl", "-sS", "--max-time", "3", "http://web/"],
        )
        .ok();
    assert!(r.stdout.contains("Task: web.1"), "{}", r.stdout);
    std::fs::remove_file(&marker).unwrap();
    lab.wait_for(
        "unhealthy web.1 out of DNS",
        Duration::from_secs(10),
        || {
            ipv4s(
                &lab.exec("probe.1", &["dig", "+short", "@127.0.0.11", "tasks.web"])
                    .stdout,
            )
            .is_empty()
            .then_some(())
        },
    );
    let t = lab.tasks("web");
    assert_eq!(t[0]["health"], "unhealthy", "{t:?}");
}

/// Agent restart with connections open through a VIP: none is reset, the new agent adopts
/// the LB table without changing it (same listing), and the VIP keeps balancing.
#[test]
fn agent_restart_keeps_connections_and_ruleset() {
    if !require_kernel("agent_restart_keeps_connections_and_ruleset") {
        return;
    }
    let lab = Lab::up(1, "embedded");
    lab.shoal(&["network", "create", "appnet"]).ok();
    let tasks = lab.whoami_service("web", "appnet", 3);
    let svc: serde_json::Value =
        serde_json::from_str(&lab.shoal(&["service", "inspect", "web"]).ok().stdout).unwrap();
    let vip: Ipv4Addr = svc["networks"][0]["vip"].as_str().unwrap().parse().unwrap();
    let net_id = svc["networks"][0]["network_id"]
        .as_str()
        .unwrap()
        .to_string();
    let task_id = tasks[0]["id"].as_str().unwrap().to_string();
    let all = shoal_netns::list().unwrap();
    let find = |infix: String| {
        all.iter()
            .find(|n| n.contains(&lab.name) && n.contains(&infix))
            .unwrap_or_else(|| panic!("no namespace with {infix} in {all:?}"))
            .clone()
    };
    let net_ns = find(format!("n-{}", &net_id[..12]));
    let task_ns = find(format!("t-{}", &task_id[..12]));
    let listing = || {
        let out = std::process::Command::new("ip")
            // -a: with object handles, so a replaced (re-created) table would show.
            .args([
                "netns", "exec", &net_ns, "nft", "-a", "list", "table", "ip", "shoal_lb",
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    // The store says "running" a moment before this node's LB has synced it (the next
    // reconciliation pass): take the reference listing only once every replica is a backend.
    let task_ips: Vec<String> = tasks
        .iter()
        .map(|t| t["networks"][0]["ip"].as_str().unwrap().to_string())
        .collect();
    let before = lab.wait_for(
        "the LB table to hold the three replicas",
        Duration::from_secs(10),
        || {
            let l = listing();
            task_ips
                .iter()
                .all(|ip| l.contains(&format!(": {ip}")))
                .then_some(l)
        },
    );

    // Six keep-alive connections from inside web.1 to the VIP, one exchange each.
    let mut conns: Vec<std::net::TcpStream> = shoal_netns::run_in(&task_ns, || {
        (0..6)
            .map(|_| std::net::TcpStream::connect((vip, 80)).unwrap())
            .collect()
    })
    .unwrap();
    for (i, c) in conns.iter_mut().enumerate() {
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let a = http_on(c).unwrap_or_else(|e| panic!("connection {i} before restart: {e}"));
        assert!(a.starts_with("HTTP/1.1 200"), "{a}");
    }

    // The table is listed over and over from just before the restart until two seconds
    // after it (a few reconciliation passes of the new agent): it must not change even for
    // a moment, e.g. a first pass that drops the backends and a later one that restores them.
    let done = AtomicBool::new(false);
    let changed: Vec<String> = std::thread::scope(|s| {
        let watcher = s.spawn(|| {
            let mut changed: Vec<String> = vec![];
            while !done.load(Ordering::SeqCst) {
                let l = listing();
                if l != before && !changed.contains(&l) {
                    changed.push(l);
                }
            }
            changed
        });
        lab.shoal(&["lab", "restart", "--name", &lab.name, "node1"])
            .ok();
        std::thread::sleep(Duration::from_secs(2));
        done.store(true, Ordering::SeqCst);
        watcher.join().unwrap()
    });
    if let Some(l) = changed.first() {
        let (b, a): (BTreeSet<&str>, BTreeSet<&str>) =
            (before.lines().collect(), l.lines().collect());
        panic!(
            "the LB table was changed or re-created across the restart ({} different \
             listings); the first: only before: {:#?}\nonly then: {:#?}",
            changed.len(),
            b.difference(&a).collect::<Vec<_>>(),
            a.difference(&b).collect::<Vec<_>>()
        );
    }
    for (i, c) in conns.iter_mut().enumerate() {
        let a = http_on(c).unwrap_or_else(|e| panic!("connection {i} after restart: {e}"));
        assert!(a.starts_with("HTTP/1.1 200"), "connection {i}: {a}");
    }
    // New connections still spread over the three replicas.
    let seen: BTreeSet<String> = (0..30)
        .flat_map(|_| {
            task_names(
                &lab.exec("web.1", &["curl", "-s", "--max-time", "5", "http://web/"])
                    .ok()
                    .stdout,
            )
        })
        .collect();
    assert_eq!(seen.len(), 3, "{seen:?}");
}
