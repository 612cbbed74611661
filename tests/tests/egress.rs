//! Egress (Docker's docker_gwbridge counterpart): tasks reach addresses outside the cluster
//! through their node, masqueraded to the node's underlay address; `--internal` tasks have
//! no way out; nothing from outside enters through the egress path; published ports and
//! VIPs work as before; names outside the cluster resolve through the agents' upstreams.
//! "Outside" is the lab's client namespace (192.0.2.100), which stands for the internet:
//! an HTTP echo server and a dnsmasq there.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use shoal_tests::{Lab, Run, ipv4s, require_kernel, shoal_bin};

const OUTSIDE: &str = "192.0.2.100";

/// Processes started in the client namespace, killed on drop (lab down would too).
struct Outside(Vec<Child>);

impl Drop for Outside {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn spawn_in(ns: &str, cmd: &[&str]) -> Child {
    Command::new("ip")
        .args(["netns", "exec", ns])
        .args(cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {cmd:?} in {ns}: {e}"))
}

fn node_addr(node: &str) -> String {
    let n: u32 = node.trim_start_matches("node").parse().unwrap();
    format!("192.0.2.{}", 10 + n)
}

/// `curl` from a task to the outside server: the RemoteAddr it saw, or the curl failure.
fn fetch(lab: &Lab, task: &str, url: &str) -> Result<String, Run> {
    let r = lab.exec(task, &["curl", "-s", "-m", "3", url]);
    if r.code != 0 {
        return Err(r);
    }
    r.stdout
        .lines()
        .find_map(|l| l.strip_prefix("RemoteAddr:"))
        .and_then(|a| a.trim().rsplit_once(':'))
        .map(|(ip, _)| ip.to_string())
        .ok_or(r)
}

#[test]
fn tasks_leave_through_their_node() {
    if !require_kernel("tasks_leave_through_their_node") {
        return;
    }
    let upstream = format!("{OUTSIDE}:53");
    let lab = Lab::up_with(2, "etcd", &["--dns-upstream", &upstream]);
    let client = format!("shoal-{}-client", lab.name);
    let bin = shoal_bin();
    let _outside = Outside(vec![
        spawn_in(
            &client,
            &[bin.to_str().unwrap(), "whoami", "--port", "8000"],
        ),
        spawn_in(
            &client,
            &[
                "dnsmasq",
                "--keep-in-foreground",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                &format!("--listen-address={OUTSIDE}"),
                "--address=/outside.test/198.51.100.7",
                "--pid-file=",
                "--conf-file=/dev/null",
            ],
        ),
    ]);
    lab.shoal(&["network", "create", "appnet"]).ok();
    lab.shoal(&["network", "create", "--internal", "priv"]).ok();
    let web = lab.whoami_service("web", "appnet", 2);
    lab.create_whoami("pub", "appnet", 2, &["-p", "8080:80"]);
    lab.create_whoami("sec", "priv", 1, &[]);
    lab.create_whoami("secpub", "priv", 1, &["-p", "8081:80"]);
    let nodes = lab.node_names();
    let mut all = web.clone();
    for s in ["pub", "sec", "secpub"] {
        let want = if s == "pub" { 2 } else { 1 };
        all.extend(lab.wait_for(
            &format!("{want} running {s} tasks"),
            Duration::from_secs(30),
            || {
                let t = lab.running_tasks(s);
                (t.len() == want).then_some(t)
            },
        ));
    }
    let on: std::collections::BTreeSet<&String> = web
        .iter()
        .map(|t| &nodes[t["node_id"].as_str().unwrap()])
        .collect();
    assert_eq!(on.len(), 2, "web's two tasks are on both nodes: {web:?}");
    let url = format!("http://{OUTSIDE}:8000/");
    lab.wait_for("the outside server", Duration::from_secs(10), || {
        Run::from_command(
            Command::new("ip")
                .args(["netns", "exec", &client, "curl", "-s", "-m", "1"])
                .arg(&url),
        )
        .stdout
        .contains("RemoteAddr")
        .then_some(())
    });

    for t in &all {
        let name = format!(
            "{}.{}",
            t["service_name"].as_str().unwrap(),
            t["slot"].as_u64().unwrap()
        );
        let node = &nodes[t["node_id"].as_str().unwrap()];
        match t["service_name"].as_str().unwrap() {
            // A way out, also for the publishing tasks (their default route is the ingress
            // network's): the server sees the node's address.
            "web" | "pub" => {
                let seen = fetch(&lab, &name, &url)
                    .unwrap_or_else(|r| panic!("{name} on {node} cannot get out: {r:?}"));
                assert_eq!(seen, node_addr(node), "{name} on {node} masqueraded");
            }
            // Internal networks only: no way out, published port or not.
            _ => {
                let r = fetch(&lab, &name, &url);
                assert!(r.is_err(), "{name} (internal) got out: {r:?}");
            }
        }
    }

    // Names outside the cluster resolve through the upstream; the cluster's still do.
    let r = lab.exec("web.1", &["getent", "hosts", "outside.test"]).ok();
    assert_eq!(
        ipv4s(&r.stdout),
        ["198.51.100.7".parse().unwrap()].into(),
        "{r:?}"
    );
    let r = lab.exec("web.1", &["getent", "hosts", "pub"]).ok();
    assert_eq!(ipv4s(&r.stdout).len(), 1, "pub's VIP: {r:?}");

    // Published ports and VIPs as before: the client's address is kept.
    for node in ["node1", "node2"] {
        for port in ["8080", "8081"] {
            let r = Run::from_command(Command::new("ip").args([
                "netns",
                "exec",
                &client,
                "curl",
                "-s",
                "-m",
                "3",
                &format!("http://{}:{port}/", node_addr(node)),
            ]));
            assert!(
                r.stdout.contains(&format!("RemoteAddr: {OUTSIDE}:")),
                "port {port} on {node}: {r:?}"
            );
        }
    }
    let r = lab
        .exec("web.1", &["curl", "-s", "-m", "3", "http://pub/"])
        .ok();
    assert!(r.stdout.contains("Hostname:"), "VIP of pub: {r:?}");

    // From outside, nothing enters through the egress path: the client routes the overlay
    // subnet via a node and tries a task's address directly.
    let target = &web[0];
    let ip = target["networks"][0]["ip"].as_str().unwrap().to_string();
    let via = node_addr(&nodes[target["node_id"].as_str().unwrap()]);
    let subnet = format!("{}.0/24", ip.rsplit_once('.').unwrap().0);
    Run::from_command(
        Command::new("ip").args(["-n", &client, "route", "add", &subnet, "via", &via]),
    )
    .ok();
    let r = Run::from_command(Command::new("ip").args([
        "netns",
        "exec",
        &client,
        "curl",
        "-s",
        "-m",
        "2",
        &format!("http://{ip}/"),
    ]));
    assert_ne!(r.code, 0, "a connection from outside reached {ip}: {r:?}");
    let guard = Run::from_command(Command::new("ip").args([
        "netns",
        "exec",
        &format!(
            "shoal-{}-{}",
            lab.name,
            nodes[target["node_id"].as_str().unwrap()]
        ),
        "nft",
        "list",
        "table",
        "ip",
        "shoal_guard",
    ]))
    .ok();
    let dropped = guard
        .stdout
        .lines()
        .find(|l| l.contains("no way in through egress"))
        .unwrap_or_else(|| panic!("no egress drop rule: {}", guard.stdout));
    assert!(
        !dropped.contains("packets 0 "),
        "the guard dropped the attempt: {dropped}"
    );
}
