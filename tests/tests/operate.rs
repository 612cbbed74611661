//! Running Shoal as an operator would: metrics, node inspect, API refusals, what the
//! underlay can reach, isolation between networks, and restarts (kill -9 of an agent, a node
//! "reboot") that must not hurt traffic or leave duplicate kernel state.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

use shoal_tests::{Lab, Run, ip_netns, require_kernel, vxlan_frame, vxlan_rx};

fn node_ns(lab: &Lab, node: &str) -> String {
    format!("shoal-{}-{node}", lab.name)
}

/// The metrics text of a node's agent (scraped inside the node's namespace, on loopback).
fn scrape(lab: &Lab, node: &str) -> String {
    ip_netns(
        &node_ns(lab, node),
        &[
            "curl",
            "-s",
            "--max-time",
            "5",
            "http://127.0.0.1:9469/metrics",
        ],
    )
    .ok()
    .stdout
}

/// The value of one sample (exact name with labels), 0 when absent.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// A raw request to the agent's API socket: (HTTP status, body).
fn api(lab: &Lab, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let sock = lab.host.trim_start_matches("unix://").to_string();
    let mut c = Command::new("curl");
    c.args([
        "-s",
        "--max-time",
        "10",
        "--unix-socket",
        &sock,
        "-X",
        method,
    ])
    .args([
        "-w",
        "\n%{http_code}",
        "-H",
        "content-type: application/json",
    ]);
    let file;
    if let Some(b) = body {
        file = tempfile_with(b);
        c.args(["--data-binary", &format!("@{file}")]);
    }
    c.arg(format!("http://shoal{path}"));
    let r = Run::from_command(&mut c);
    let (text, code) = r.stdout.rsplit_once('\n').expect("status line");
    (code.trim().parse().expect("status"), text.to_string())
}

fn tempfile_with(body: &str) -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let p = std::env::temp_dir().join(format!(
        "shoal-operate-{}-{}.json",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    ));
    std::fs::write(&p, body).unwrap();
    p.display().to_string()
}

/// Metrics move with what the agent does; `node inspect` shows what it programmed; the API
/// refuses malformed, unknown and oversized bodies with 4xx and changes nothing; the API
/// socket is root-only.
#[test]
fn metrics_inspect_and_api_refusals() {
    if !require_kernel("metrics_inspect_and_api_refusals") {
        return;
    }
    let lab = Lab::up(1, "embedded");
    lab.shoal(&["network", "create", "appnet"]).ok();
    lab.whoami_service("web", "appnet", 2);
    let before = scrape(&lab, "node1");
    for _ in 0..3 {
        let r = lab
            .exec("web.1", &["dig", "+short", "+tries=1", "web"])
            .ok();
        assert!(!r.stdout.trim().is_empty(), "{r:?}");
    }
    lab.exec("web.1", &["dig", "+tries=1", "nosuch.web"]).ok();
    let after = scrape(&lab, "node1");
    let d = |s: &str| sample(&after, s) - sample(&before, s);
    assert!(
        d("shoal_dns_answers_total{qtype=\"A\",rcode=\"NOERROR\"}") >= 3.0,
        "{after}"
    );
    assert!(
        d("shoal_dns_answers_total{qtype=\"A\",rcode=\"NXDOMAIN\"}") >= 1.0,
        "{after}"
    );
    assert!(d("shoal_dns_latency_seconds_count") >= 4.0, "{after}");
    assert_eq!(
        sample(&after, "shoal_service_backends{service=\"web\"}"),
        2.0
    );
    assert_eq!(
        sample(&after, "shoal_service_replicas_desired{service=\"web\"}"),
        2.0
    );
    assert_eq!(
        sample(&after, "shoal_tasks{scope=\"node\",state=\"running\"}"),
        2.0
    );
    assert!(sample(&after, "shoal_lb_syncs_total{kind=\"full\",result=\"ok\"}") >= 1.0);
    assert!(sample(&after, "shoal_sync_passes_total") >= 1.0);
    assert!(sample(&after, "shoal_store_revision{which=\"applied\"}") >= 1.0);
    // Every sample line belongs to a family declared before it.
    let mut declared = BTreeSet::new();
    for l in after.lines() {
        if let Some(rest) = l.strip_prefix("# TYPE ") {
            declared.insert(rest.split(' ').next().unwrap().to_string());
        } else if !l.starts_with('#') && !l.is_empty() {
            let name = l.split(['{', ' ']).next().unwrap();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|f| declared.contains(*f)))
                .unwrap_or(name);
            assert!(declared.contains(family), "undeclared sample {l}");
        }
    }
    // Scaling moves the backends gauge.
    lab.shoal(&["service", "scale", "web=3"]).ok();
    lab.wait_for("3 backends in metrics", Duration::from_secs(30), || {
        (sample(
            &scrape(&lab, "node1"),
            "shoal_service_backends{service=\"web\"}",
        ) == 3.0)
            .then_some(())
    });

    // node inspect: the VIP with its three backends, the last pass clean.
    let svc: serde_json::Value =
        serde_json::from_str(&lab.shoal(&["service", "inspect", "web"]).ok().stdout).unwrap();
    let vip = svc["networks"][0]["vip"].as_str().unwrap().to_string();
    let inspect = lab.wait_for(
        "node inspect with 3 backends",
        Duration::from_secs(30),
        || {
            let v: serde_json::Value =
                serde_json::from_str(&lab.shoal(&["node", "inspect"]).ok().stdout).unwrap();
            let vips = v["report"]["vips"].as_array().cloned().unwrap_or_default();
            vips.iter()
                .any(|x| {
                    x["vip"] == vip.as_str() && x["backends"].as_array().map(Vec::len) == Some(3)
                })
                .then_some(v)
        },
    );
    assert_eq!(inspect["report"]["last_pass_ok"], true, "{inspect}");
    assert!(inspect["report"]["last_error"].is_null(), "{inspect}");

    // The API: malformed JSON, unknown fields, oversized bodies -> 4xx with a message.
    let nets_before = lab
        .shoal(&["network", "ls", "--format", "json"])
        .ok()
        .stdout;
    let (code, body) = api(&lab, "POST", "/v1/networks", Some("{\"name\": \"x\""));
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("error"), "{body}");
    let (code, body) = api(
        &lab,
        "POST",
        "/v1/networks",
        Some("{\"name\": \"x\", \"bogus\": 1}"),
    );
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("bogus"), "the unknown field is named: {body}");
    let big = format!("{{\"name\": \"{}\"}}", "a".repeat(2 << 20));
    let (code, body) = api(&lab, "POST", "/v1/networks", Some(&big));
    assert_eq!(code, 413, "{body}");
    assert!(body.contains("error"), "{body}");
    let (code, body) = api(&lab, "POST", "/v1/services", Some("[1, 2, 3]"));
    assert_eq!(code, 400, "{body}");
    let (code, _) = api(&lab, "GET", "/v1/nope", None);
    assert_eq!(code, 404);
    assert_eq!(
        lab.shoal(&["network", "ls", "--format", "json"])
            .ok()
            .stdout,
        nets_before,
        "a refused request changed nothing"
    );

    // The API socket: a socket, owned by root, mode 0600.
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
    let sock = lab.host.trim_start_matches("unix://");
    let md = std::fs::metadata(sock).unwrap();
    assert!(md.file_type().is_socket());
    assert_eq!(md.uid(), 0);
    assert_eq!(md.permissions().mode() & 0o777, 0o600);
    // Metrics listen on loopback only: the node's underlay address refuses.
    let r = ip_netns(
        &format!("shoal-{}-client", lab.name),
        &[
            "curl",
            "-s",
            "--max-time",
            "3",
            "http://192.0.2.11:9469/metrics",
        ],
    );
    assert_ne!(r.code, 0, "metrics reachable from the underlay: {r:?}");
}

/// From the underlay (the lab's client), a node answers published ports and nothing else
/// of Shoal: task addresses behind the node are unreachable even with a route to them,
/// VXLAN from a non-peer never reaches an overlay, and a task of an internal network gets
/// no way out through the ingress network (a task with a non-internal network leaves
/// masqueraded: tests/egress.rs).
#[test]
fn underlay_reaches_only_published_ports() {
    if !require_kernel("underlay_reaches_only_published_ports") {
        return;
    }
    let lab = Lab::up(3, "etcd");
    lab.shoal(&["network", "create", "appnet"]).ok();
    lab.shoal(&["network", "create", "--internal", "backnet"])
        .ok();
    lab.create_whoami("web", "appnet", 3, &["-p", "8080:80"]);
    lab.create_whoami("inner", "backnet", 1, &["-p", "8090:80"]);
    let client = format!("shoal-{}-client", lab.name);
    let get = |url: &str| ip_netns(&client, &["curl", "-s", "--max-time", "3", url]);
    lab.wait_for("8080 from the client", Duration::from_secs(60), || {
        get("http://192.0.2.12:8080/")
            .stdout
            .contains("Hostname:")
            .then_some(())
    });
    lab.wait_for("inner running", Duration::from_secs(60), || {
        (lab.running_tasks("inner").len() == 1).then_some(())
    });
    // With a route to the ingress subnet through node1, the tasks' ingress addresses are
    // still out of reach (only the published port is DNATed in).
    ip_netns(
        &client,
        &["ip", "route", "add", "10.255.0.0/16", "via", "192.0.2.11"],
    )
    .ok();
    let tasks = lab.running_tasks("web");
    for t in &tasks {
        for n in t["networks"].as_array().unwrap() {
            if n["network"] == "ingress" {
                let a = n["ip"].as_str().unwrap();
                let r = get(&format!("http://{a}:80/"));
                assert!(
                    !r.stdout.contains("Hostname:"),
                    "task address {a} reached from the underlay: {r:?}"
                );
            }
        }
    }
    assert!(get("http://192.0.2.11:8080/").stdout.contains("Hostname:"));

    // VXLAN from the client (not a node) is dropped before any overlay sees it.
    let show = lab.shoal(&["network", "inspect", "appnet"]).ok().stdout;
    let v: serde_json::Value = serde_json::from_str(&show).unwrap();
    let vni = u32::try_from(v["vni"].as_u64().expect("vni in network inspect")).unwrap();
    let before = vxlan_rx(&lab, "node1", vni);
    shoal_netns::run_in(&client, move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        for _ in 0..5 {
            s.send_to(
                &vxlan_frame(vni, "10.0.0.3".parse().unwrap()),
                "192.0.2.11:4789",
            )
            .unwrap();
        }
    })
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        vxlan_rx(&lab, "node1", vni),
        before,
        "VXLAN frames from a non-peer reached the overlay"
    );
    // Between the nodes VXLAN flows (the published port above went across nodes).
    let guard = ip_netns(
        &node_ns(&lab, "node1"),
        &["nft", "list", "table", "ip", "shoal_guard"],
    )
    .ok()
    .stdout;
    assert!(
        guard.contains("192.0.2.12") && guard.contains("192.0.2.13"),
        "{guard}"
    );

    // No way out: a task of the internal network (attached to ingress for its published
    // port) cannot reach a server on the underlay, even though the client would route the
    // answer back (the route above).
    let server = Command::new("ip")
        .args(["netns", "exec", &client])
        .arg(shoal_tests::shoal_bin())
        .args(["whoami", "--port", "9999"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _server = Kill(server);
    lab.wait_for(
        "a server in the client namespace",
        Duration::from_secs(10),
        || {
            get("http://192.0.2.100:9999/")
                .stdout
                .contains("Hostname:")
                .then_some(())
        },
    );
    let r = lab.exec(
        "inner.1",
        &["curl", "-s", "--max-time", "3", "http://192.0.2.100:9999/"],
    );
    assert!(
        !r.stdout.contains("Hostname:"),
        "a task of an internal network reached the underlay: {r:?}"
    );
    // web.1 (appnet is not internal) leaves through the ingress network, masqueraded: the
    // server sees a node's address, never the task's ingress address.
    let r = lab.exec(
        "web.1",
        &["curl", "-s", "--max-time", "3", "http://192.0.2.100:9999/"],
    );
    let seen = r
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("RemoteAddr: "))
        .unwrap_or_else(|| panic!("web.1 has no way out: {r:?}"));
    let ip = seen.rsplit_once(':').map_or(seen, |(ip, _)| ip);
    assert!(
        ["192.0.2.11", "192.0.2.12", "192.0.2.13"].contains(&ip),
        "not masqueraded to a node's address: {seen}"
    );
}

/// A task reaches neither the addresses nor the names of networks it is not attached to.
#[test]
fn networks_are_isolated() {
    if !require_kernel("networks_are_isolated") {
        return;
    }
    let lab = Lab::up(1, "embedded");
    lab.shoal(&["network", "create", "front"]).ok();
    lab.shoal(&["network", "create", "back"]).ok();
    lab.whoami_service("a", "front", 1);
    let b = lab.whoami_service("b", "back", 1);
    let b_ip = b[0]["networks"][0]["ip"].as_str().unwrap().to_string();
    let svc: serde_json::Value =
        serde_json::from_str(&lab.shoal(&["service", "inspect", "b"]).ok().stdout).unwrap();
    let b_vip = svc["networks"][0]["vip"].as_str().unwrap().to_string();
    // b itself resolves and answers (so the refusals below mean something).
    let own = lab.exec("b.1", &["dig", "+short", "b"]).ok();
    assert_eq!(own.stdout.trim(), b_vip);
    for name in ["b", "tasks.b", "b.1"] {
        let r = lab.exec("a.1", &["dig", "+short", "+tries=1", name]).ok();
        assert!(r.stdout.trim().is_empty(), "a.1 resolved {name}: {r:?}");
    }
    for addr in [&b_ip, &b_vip] {
        let r = lab.exec(
            "a.1",
            &["curl", "-s", "--max-time", "2", &format!("http://{addr}/")],
        );
        assert!(!r.stdout.contains("Hostname:"), "a.1 reached {addr}: {r:?}");
    }
    let ok = lab.exec(
        "b.1",
        &["curl", "-s", "--max-time", "5", &format!("http://{b_vip}/")],
    );
    assert!(ok.stdout.contains("Hostname:"), "{ok:?}");
}

/// Every line of the kernel state Shoal owns on a node, normalised (no nft handles or
/// counters, no dynamic neighbour entries), sorted: links, addresses, routes, rules,
/// permanent neighbours, FDB and nft rulesets of the node namespace and of every Shoal
/// namespace of the node.
fn kernel_state(lab: &Lab, node: &str) -> Vec<String> {
    let node_ns = node_ns(lab, node);
    let mut nss = vec![node_ns.clone()];
    let prefix = format!("{node_ns}-");
    nss.extend(
        shoal_netns::list()
            .unwrap()
            .into_iter()
            .filter(|n| n.starts_with(&prefix)),
    );
    nss.sort();
    let mut out = vec![];
    for ns in &nss {
        let short = ns.trim_start_matches(&node_ns);
        for cmd in [
            &["ip", "-o", "link", "show"][..],
            &["ip", "-o", "addr", "show"],
            &["ip", "route", "show", "table", "all"],
            &["ip", "rule", "show"],
            &["ip", "neigh", "show", "nud", "permanent"],
            &["bridge", "fdb", "show", "dev", "vxlan0"],
            &["nft", "list", "ruleset"],
        ] {
            let r = ip_netns(ns, cmd);
            // nft lines carry their table and chain/set, so the same rule in two chains is
            // not a duplicate.
            let mut ctx: Vec<String> = vec![];
            for l in r.stdout.lines() {
                let mut l = l.trim().to_string();
                if l.is_empty() {
                    continue;
                }
                if cmd[0] == "nft" {
                    if l == "}" {
                        ctx.pop();
                        continue;
                    }
                    let opens = l.ends_with('{');
                    let here = ctx.join(" / ");
                    if opens {
                        ctx.push(l.trim_end_matches('{').trim().to_string());
                    }
                    if !here.is_empty() {
                        l = format!("[{here}] {l}");
                    }
                }
                if cmd[0] == "ip" && cmd[2] == "link" {
                    // Counters and state flags move with traffic; keep name, kind, peer.
                    l = l.split(" mtu ").next().unwrap().to_string();
                }
                if let Some(i) = l.find(" counter packets") {
                    l.truncate(i);
                }
                if let Some(i) = l.find(" expires ") {
                    l.truncate(i);
                }
                if l.contains("valid_lft") || l.is_empty() {
                    continue;
                }
                // The kernel's own IPv6 link-local routes (like the addresses above, which
                // `valid_lft` skips): made some time after a link comes up, not by Shoal,
                // which is IPv4 only; a snapshot taken early would miss them.
                if l.contains("fe80::") && l.contains("proto kernel") {
                    continue;
                }
                out.push(format!("{short}: {} | {l}", cmd.join(" ")));
            }
        }
    }
    out.sort();
    out
}

/// Lines that occur more than once (a duplicate rule, route, neighbour...).
fn duplicates(state: &[String]) -> Vec<String> {
    let mut seen = BTreeSet::new();
    let mut dups = vec![];
    for l in state {
        // Element lists and the like may wrap over lines of equal text.
        if l.ends_with('{') || l.ends_with(',') {
            continue;
        }
        if !seen.insert(l.clone()) {
            dups.push(l.clone());
        }
    }
    dups
}

fn agent_pid(lab: &Lab, node: &str) -> u32 {
    let v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!("/run/shoal/lab/{}/lab.json", lab.name)).unwrap(),
    )
    .unwrap();
    v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == node)
        .and_then(|n| n["pid"].as_u64())
        .map(|p| u32::try_from(p).unwrap())
        .expect("agent pid in lab.json")
}

fn http_keepalive(s: &mut TcpStream) -> std::io::Result<String> {
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")?;
    let mut buf = vec![0u8; 4096];
    let mut got = Vec::new();
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Err(std::io::Error::other("closed"));
        }
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap_or(0))
                })
                .unwrap_or(0);
            if body.len() >= len {
                return Ok(text.to_string());
            }
        }
    }
}

/// One DNS query for `name` from inside `ns` with a short timeout; true if answered.
fn dns_answers(ns: &str, name: &str) -> bool {
    let name = name.to_string();
    shoal_netns::run_in(ns, move || {
        let s = UdpSocket::bind("127.0.0.1:0").ok()?;
        s.set_read_timeout(Some(Duration::from_millis(100))).ok()?;
        let mut q = vec![0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in name.split('.') {
            q.push(u8::try_from(label.len()).ok()?);
            q.extend_from_slice(label.as_bytes());
        }
        q.extend_from_slice(&[0, 0, 1, 0, 1]);
        s.send_to(&q, "127.0.0.11:53").ok()?;
        let mut buf = [0u8; 512];
        let (n, _) = s.recv_from(&mut buf).ok()?;
        // An answer with at least one record.
        (n > 12 && buf[..2] == [0x12, 0x34] && buf[7] > 0).then_some(())
    })
    .ok()
    .flatten()
    .is_some()
}

/// `kill -9` of an agent, then a new one: established TCP flows through a VIP and through a
/// published port survive, DNS in containers answers again within 1 s of the new agent's
/// start, and once converged the node's kernel state is what it was (nothing duplicated,
/// nothing leaked). Then a node "reboot" (`lab kill` + `lab start`): the node comes back
/// with no duplicate state and no namespace of a task it no longer runs.
#[test]
fn kill9_and_reboot_do_no_harm() {
    if !require_kernel("kill9_and_reboot_do_no_harm") {
        return;
    }
    let lab = Lab::up(3, "etcd");
    lab.shoal(&["network", "create", "appnet"]).ok();
    lab.create_whoami("web", "appnet", 3, &["-p", "8080:80"]);
    let tasks = lab.wait_for("3 web tasks", Duration::from_secs(60), || {
        let t = lab.running_tasks("web");
        (t.len() == 3).then_some(t)
    });
    let names = lab.node_names();
    let on_node1 = tasks
        .iter()
        .find(|t| {
            names
                .get(t["node_id"].as_str().unwrap())
                .map(String::as_str)
                == Some("node1")
        })
        .expect("a web task on node1 (one per node)");
    let tid = on_node1["id"].as_str().unwrap();
    let task_ns = format!("shoal-{}-node1-t-{}", lab.name, &tid[..12]);
    let svc: serde_json::Value =
        serde_json::from_str(&lab.shoal(&["service", "inspect", "web"]).ok().stdout).unwrap();
    let vip: Ipv4Addr = svc["networks"][0]["vip"].as_str().unwrap().parse().unwrap();
    let client = format!("shoal-{}-client", lab.name);
    lab.wait_for("8080 on node1", Duration::from_secs(60), || {
        ip_netns(
            &client,
            &["curl", "-s", "--max-time", "2", "http://192.0.2.11:8080/"],
        )
        .stdout
        .contains("Hostname:")
        .then_some(())
    });
    // Converged: two identical snapshots in a row.
    let settle = || {
        let mut last = kernel_state(&lab, "node1");
        lab.wait_for(
            "node1's kernel state to settle",
            Duration::from_secs(30),
            || {
                std::thread::sleep(Duration::from_millis(700));
                let now = kernel_state(&lab, "node1");
                let same = now == last;
                last = now;
                same.then(|| last.clone())
            },
        )
    };
    let before = settle();
    assert!(duplicates(&before).is_empty(), "{:?}", duplicates(&before));

    // Keep-alive flows: from the node1 task to the VIP, and from the client to node1:8080.
    let mut vip_conns: Vec<TcpStream> = shoal_netns::run_in(&task_ns, move || {
        (0..3)
            .map(|_| TcpStream::connect((vip, 80)).unwrap())
            .collect()
    })
    .unwrap();
    let mut pub_conns: Vec<TcpStream> = shoal_netns::run_in(&client, || {
        (0..3)
            .map(|_| TcpStream::connect("192.0.2.11:8080".parse::<SocketAddr>().unwrap()).unwrap())
            .collect()
    })
    .unwrap();
    for c in vip_conns.iter_mut().chain(pub_conns.iter_mut()) {
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert!(http_keepalive(c).unwrap().starts_with("HTTP/1.1 200"));
    }

    // kill -9, then a new agent.
    let pid = agent_pid(&lab, "node1");
    kill9(pid);
    lab.wait_for("the old agent to be gone", Duration::from_secs(5), || {
        (!std::path::Path::new(&format!("/proc/{pid}")).exists()).then_some(())
    });
    assert!(!dns_answers(&task_ns, "web"), "DNS answered with no agent");
    let prober = {
        let ns = task_ns.clone();
        std::thread::spawn(move || {
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(30) {
                if dns_answers(&ns, "web") {
                    return Some(Instant::now());
                }
            }
            None
        })
    };
    let started = Instant::now();
    lab.shoal(&["lab", "start", "--name", &lab.name, "node1"])
        .ok();
    let answered = prober
        .join()
        .unwrap()
        .expect("DNS answers again after the restart");
    // The agent's start is at most `started`; the prober polls every 100 ms at worst.
    let took = answered.saturating_duration_since(started);
    eprintln!("DNS answered {took:?} after `lab start` began");
    assert!(took <= Duration::from_secs(1), "DNS back after {took:?}");
    for (i, c) in vip_conns.iter_mut().enumerate() {
        let a = http_keepalive(c).unwrap_or_else(|e| panic!("VIP flow {i} after kill -9: {e}"));
        assert!(a.starts_with("HTTP/1.1 200"), "{a}");
    }
    for (i, c) in pub_conns.iter_mut().enumerate() {
        let a =
            http_keepalive(c).unwrap_or_else(|e| panic!("published flow {i} after kill -9: {e}"));
        assert!(a.starts_with("HTTP/1.1 200"), "{a}");
    }
    let after = settle();
    let gone: Vec<_> = before.iter().filter(|l| !after.contains(l)).collect();
    let new: Vec<_> = after.iter().filter(|l| !before.contains(l)).collect();
    assert!(
        gone.is_empty() && new.is_empty(),
        "kernel state changed across kill -9 + restart:\nonly before: {gone:#?}\nonly after: {new:#?}"
    );

    // A node "reboot": agent and tasks killed, underlay down; then started again.
    lab.shoal(&["lab", "kill", "--name", &lab.name, "node1"])
        .ok();
    lab.wait_for("web rescheduled off node1", Duration::from_secs(60), || {
        // Asked of node2's agent: node1's is down.
        let t = lab.running_tasks_on(Some("node2"), "web");
        (t.len() == 3
            && t.iter().all(|t| {
                names
                    .get(t["node_id"].as_str().unwrap())
                    .map(String::as_str)
                    != Some("node1")
            }))
        .then_some(())
    });
    lab.shoal(&["lab", "start", "--name", &lab.name, "node1"])
        .ok();
    let rebooted = settle();
    assert!(
        duplicates(&rebooted).is_empty(),
        "{:?}",
        duplicates(&rebooted)
    );
    // No namespace of a task node1 no longer runs.
    let leftover: Vec<String> = shoal_netns::list()
        .unwrap()
        .into_iter()
        .filter(|n| n.starts_with(&format!("shoal-{}-node1-t-", lab.name)))
        .collect();
    assert!(
        leftover.is_empty(),
        "task namespaces left on node1: {leftover:?}"
    );
    // And node1 still answers the published port (forwarding to the other nodes).
    lab.wait_for(
        "8080 on node1 after the reboot",
        Duration::from_secs(30),
        || {
            ip_netns(
                &client,
                &["curl", "-s", "--max-time", "2", "http://192.0.2.11:8080/"],
            )
            .stdout
            .contains("Hostname:")
            .then_some(())
        },
    );
}

/// `kill -9 pid`.
fn kill9(pid: u32) {
    let r = Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(r.success(), "kill -9 {pid}");
}
