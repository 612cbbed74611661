//! Image tasks: services whose tasks are OCI containers run by podman (runc) in the
//! namespaces Shoal made, on real labs, from images built offline by scripts/images.sh.
//! Root, podman and runc are required (`make test` installs them); these tests fail
//! without them, never skip (unless SHOAL_ALLOW_SKIP=1 without root).

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

use shoal_tests::{Lab, Run, require_kernel, shoal_bin};

/// The whoami image of the binary under test (built by scripts/images.sh if missing).
fn whoami_image() -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/images.sh");
    let r = Run::from_command(Command::new("bash").arg(script).arg(shoal_bin()));
    assert_eq!(r.code, 0, "building the test images: {r:?}");
    r.stdout.trim().to_string()
}

fn podman(args: &[&str]) -> Run {
    Run::from_command(Command::new("podman").args(args))
}

/// Names of the containers whose prefix label is this lab's.
fn lab_containers(lab: &Lab) -> BTreeSet<String> {
    let r = podman(&[
        "ps",
        "-a",
        "--filter",
        "label=io.shoal.prefix",
        "--format",
        "{{.Names}} {{index .Labels \"io.shoal.prefix\"}}",
    ])
    .ok();
    let prefix = format!("shoal-{}-", lab.name);
    r.stdout
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter(|(_, p)| p.starts_with(&prefix))
        .map(|(n, _)| n.to_string())
        .collect()
}

/// The task's namespace name (the runtime's naming: `{node prefix}t-{short id}`).
fn task_ns(lab: &Lab, node: &str, task_id: &str) -> String {
    format!("shoal-{}-{node}-t-{}", lab.name, &task_id[..12])
}

/// Running tasks of `service`, once there are `n` and each accepts on port 80.
fn wait_serving(lab: &Lab, service: &str, n: usize) -> Vec<serde_json::Value> {
    let tasks = lab.wait_for(
        &format!("{n} running {service} tasks"),
        Duration::from_secs(60),
        || {
            let t = lab.running_tasks(service);
            (t.len() == n).then_some(t)
        },
    );
    let nodes = lab.node_names();
    for t in &tasks {
        let node = &nodes[t["node_id"].as_str().unwrap()];
        let ns = task_ns(lab, node, t["id"].as_str().unwrap());
        lab.wait_for(
            &format!("{service}.{} to listen", t["slot"]),
            Duration::from_secs(20),
            || {
                shoal_netns::run_in(&ns, || TcpStream::connect(("127.0.0.1", 80)).is_ok())
                    .unwrap_or(false)
                    .then_some(())
            },
        );
    }
    tasks
}

/// `n` HTTP GETs of `http://web/` at once from inside a container, with busybox's nc (the
/// name resolved by the image's libc through 127.0.0.11; nc quits when its input ends, so
/// the input stays open a second). Not busybox's wget: Debian 12's busybox-static wget
/// crashes on any URL.
fn http_gets_web(n: u32) -> String {
    format!(
        "for i in $(seq {n}); do ( (printf 'GET / HTTP/1.0\\r\\nHost: web\\r\\n\\r\\n'; sleep 1) | nc -w 3 web 80 | grep Hostname: ) & done; wait"
    )
}

/// `Hostname:` of a whoami answer.
fn hostname_of(answer: &str) -> Option<String> {
    answer
        .lines()
        .find_map(|l| l.strip_prefix("Hostname:"))
        .map(|h| h.trim().to_string())
}

/// One HTTP GET from inside namespace `ns`: the whole answer.
fn http_get(ns: &str, addr: &str) -> std::io::Result<String> {
    let addr: SocketAddr = addr.parse().unwrap();
    shoal_netns::run_in(ns, move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })
    .expect("enter namespace")
}

/// Services from an image on three nodes: containers in Shoal's namespaces, names
/// resolving inside them, a VIP spreading across nodes, published ports in both modes
/// with the client's address kept, an agent restart that adopts its containers, and a
/// node loss healed; `lab down` leaves no container behind.
#[test]
fn image_services_on_three_nodes() {
    if !require_kernel("image_services_on_three_nodes") {
        return;
    }
    let image = whoami_image();
    let lab = Lab::up(3, "etcd");
    lab.shoal(&["network", "create", "appnet"]).ok();
    // Docker's positional form: IMAGE after the options.
    lab.shoal(&[
        "service",
        "create",
        "--name",
        "web",
        "--network",
        "appnet",
        "--replicas",
        "3",
        "-p",
        "8080:80",
        &image,
    ])
    .ok();
    lab.shoal(&[
        "service",
        "create",
        "--name",
        "pinned",
        "--network",
        "appnet",
        "--publish",
        "published=8081,target=80,mode=host",
        "--image",
        &image,
    ])
    .ok();
    let web = wait_serving(&lab, "web", 3);
    let pinned = wait_serving(&lab, "pinned", 1);
    let nodes = lab.node_names();

    // Each task is a container of ours whose first process is in the task's namespace.
    let containers = lab_containers(&lab);
    assert_eq!(containers.len(), 4, "{containers:?}");
    for t in web.iter().chain(&pinned) {
        let node = &nodes[t["node_id"].as_str().unwrap()];
        let ns = task_ns(&lab, node, t["id"].as_str().unwrap());
        assert!(
            containers.contains(&ns),
            "no container {ns}: {containers:?}"
        );
        let pid = podman(&["inspect", "--format", "{{.State.Pid}}", &ns])
            .ok()
            .stdout;
        let in_ns = std::fs::metadata(format!("/proc/{}/ns/net", pid.trim())).unwrap();
        let netns = std::fs::metadata(format!("/run/netns/{ns}")).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(in_ns.ino(), netns.ino(), "{ns} runs outside its namespace");
    }

    // `service logs` from node1's agent: every task's output, from the node that runs it,
    // with Docker's prefix (tasks on node2 and node3 come through their agents' peer API).
    let logs = lab
        .shoal(&["service", "logs", "web", "--tail", "1"])
        .ok()
        .stdout;
    for t in &web {
        let prefix = format!(
            "web.{}@{} | ",
            t["slot"],
            nodes[t["node_id"].as_str().unwrap()]
        );
        let hostname = &t["id"].as_str().unwrap()[..12];
        assert!(
            logs.lines()
                .any(|l| l.starts_with(&prefix)
                    && l.contains(&format!("whoami: {hostname} serving"))),
            "no start line of {prefix}: {logs}"
        );
    }
    assert_eq!(
        logs.lines().filter(|l| !l.is_empty()).count(),
        3,
        "one start line per task: {logs}"
    );
    let svc: serde_json::Value =
        serde_json::from_str(&lab.shoal(&["service", "inspect", "web"]).ok().stdout).unwrap();
    assert_eq!(
        svc["image"],
        image.as_str(),
        "service inspect shows the image"
    );
    let ps = lab.shoal(&["service", "ps", "web"]).ok().stdout;
    assert!(ps.contains(&image), "service ps shows the image:\n{ps}");

    // Inside a container: only 127.0.0.11, the service name resolves to its VIP.
    let vip = svc["networks"][0]["vip"].as_str().unwrap().to_string();
    let resolv = lab.exec("web.1", &["cat", "/etc/resolv.conf"]).ok().stdout;
    let servers: Vec<&str> = resolv
        .lines()
        .filter(|l| l.starts_with("nameserver"))
        .collect();
    assert_eq!(servers, ["nameserver 127.0.0.11"], "{resolv}");
    let looked_up = lab.exec("web.1", &["nslookup", "web"]).ok().stdout;
    assert!(looked_up.contains(&vip), "nslookup web: {looked_up}");
    let looked_up = lab.exec("web.1", &["nslookup", "pinned"]).ok().stdout;
    assert!(
        looked_up.contains("Address"),
        "nslookup pinned: {looked_up}"
    );

    // The VIP spreads requests over the tasks, on other nodes too.
    let web1_node = web.iter().find(|t| t["slot"] == 1).unwrap()["node_id"].clone();
    let elsewhere: BTreeSet<String> = web
        .iter()
        .filter(|t| t["node_id"] != web1_node)
        .map(|t| t["id"].as_str().unwrap()[..12].to_string())
        .collect();
    let mut seen = BTreeSet::new();
    for _ in 0..2 {
        let out = lab
            .exec("web.1", &["sh", "-c", &http_gets_web(15)])
            .ok()
            .stdout;
        let answers: Vec<&str> = out.lines().collect();
        assert_eq!(answers.len(), 15, "every request answered: {out}");
        seen.extend(answers.iter().filter_map(|l| hostname_of(l)));
    }
    assert!(
        seen.len() >= 2,
        "30 requests through the VIP all went to {seen:?}"
    );
    assert!(
        !seen.is_disjoint(&elsewhere),
        "no request went to another node's task: {seen:?}, elsewhere {elsewhere:?}"
    );

    // Published ports: ingress on every node, client address kept; host mode only where
    // its task runs.
    let client = format!("shoal-{}-client", lab.name);
    let pinned_node = &nodes[pinned[0]["node_id"].as_str().unwrap()];
    for node in ["node1", "node2", "node3"] {
        let n: u32 = node.trim_start_matches("node").parse().unwrap();
        let addr = format!("192.0.2.{}", 10 + n);
        let out = http_get(&client, &format!("{addr}:8080")).expect("ingress port answers");
        assert!(
            out.contains("RemoteAddr: 192.0.2.100:"),
            "{node}: client address lost: {out}"
        );
        let host = http_get(&client, &format!("{addr}:8081"));
        assert_eq!(
            host.is_ok(),
            node == pinned_node,
            "{node}: host-mode port (task on {pinned_node}): {host:?}"
        );
    }

    // An agent restart adopts its containers: same containers, not started again.
    let started = |name: &str| {
        podman(&["inspect", "--format", "{{.State.StartedAt}}", name])
            .ok()
            .stdout
    };
    let node1_tasks: Vec<String> = web
        .iter()
        .filter(|t| nodes[t["node_id"].as_str().unwrap()] == "node1")
        .map(|t| task_ns(&lab, "node1", t["id"].as_str().unwrap()))
        .collect();
    assert!(!node1_tasks.is_empty(), "a web task on node1");
    let before_restart: Vec<String> = node1_tasks.iter().map(|n| started(n)).collect();
    Run::from_command(
        Command::new(shoal_bin()).args(["lab", "restart", "--name", &lab.name, "node1"]),
    )
    .ok();
    let log = format!("/run/shoal/lab/{}/node1/agent.log", lab.name);
    lab.wait_for(
        "the new agent to adopt its tasks",
        Duration::from_secs(20),
        || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            (text.matches("adopted running task").count() >= node1_tasks.len()).then_some(())
        },
    );
    let after: Vec<String> = node1_tasks.iter().map(|n| started(n)).collect();
    assert_eq!(before_restart, after, "containers were started again");
    assert_eq!(lab.running_tasks("web").len(), 3);

    // Node loss: the VIP keeps answering and the slots come back on the survivors.
    let victim = nodes[web
        .iter()
        .find(|t| nodes[t["node_id"].as_str().unwrap()] != "node1")
        .unwrap()["node_id"]
        .as_str()
        .unwrap()]
    .clone();
    Run::from_command(
        Command::new(shoal_bin()).args(["lab", "kill", "--name", &lab.name, &victim]),
    )
    .ok();
    lab.wait_for(
        "3 web tasks on the survivors",
        Duration::from_secs(60),
        || {
            let t = lab.running_tasks("web");
            (t.len() == 3
                && t.iter()
                    .all(|t| nodes[t["node_id"].as_str().unwrap()] != victim))
            .then_some(())
        },
    );
    lab.wait_for(
        "the VIP to answer from node1",
        Duration::from_secs(20),
        || {
            (0..5)
                .all(|_| {
                    lab.exec("web.1", &["sh", "-c", &http_gets_web(1)])
                        .stdout
                        .contains("Hostname:")
                })
                .then_some(())
        },
    );

    // Other tests' labs run beside this one: only this lab's containers count.
    let ours = format!("shoal-{}-", lab.name);
    drop(lab);
    let left: Vec<String> = podman(&["ps", "-a", "--format", "{{.Names}}"])
        .ok()
        .stdout
        .lines()
        .filter(|n| n.starts_with(&ours))
        .map(String::from)
        .collect();
    assert!(
        left.is_empty(),
        "containers left behind after lab down: {left:?}"
    );
}

/// An image the node does not have (and no registry to pull from) fails its task at once
/// with an error naming the image, leaving no container; a malformed reference is refused
/// by the API with nothing written.
#[test]
fn missing_or_bad_images_are_clear_errors() {
    if !require_kernel("missing_or_bad_images_are_clear_errors") {
        return;
    }
    whoami_image();
    let lab = Lab::up(1, "embedded");
    lab.shoal(&["network", "create", "appnet"]).ok();
    let bad = lab.shoal(&[
        "service",
        "create",
        "--name",
        "bad",
        "--network",
        "appnet",
        "--image",
        "-rm",
    ]);
    assert_ne!(bad.code, 0);
    assert!(bad.stderr.contains("invalid image"), "{bad:?}");
    let ls = lab.shoal(&["service", "ls"]).ok().stdout;
    assert!(!ls.contains("bad"), "{ls}");

    let missing = "localhost/shoal-no-such-image:1";
    lab.shoal(&[
        "service",
        "create",
        "--name",
        "ghost",
        "--network",
        "appnet",
        "--image",
        missing,
    ])
    .ok();
    let err = lab.wait_for("the task's error", Duration::from_secs(30), || {
        let r = lab.shoal(&["service", "ps", "ghost", "--format", "json"]);
        let tasks: Vec<serde_json::Value> = serde_json::from_str(&r.stdout).ok()?;
        tasks
            .iter()
            .find_map(|t| t["error"].as_str().map(str::to_string))
    });
    assert!(err.contains(missing), "the error names the image: {err}");
    assert!(
        lab_containers(&lab).is_empty(),
        "a container was left: {:?}",
        lab_containers(&lab)
    );
}

/// `shoal run` on attachable networks: a standalone container resolves services, services
/// resolve it by its name and aliases, `shoal logs` shows its output, `shoal rm` takes its
/// name out of DNS, an exit is recorded and not restarted; a network that is not
/// attachable or unknown, or a name in use, is refused with nothing left behind.
#[test]
fn standalone_containers_on_attachable_networks() {
    if !require_kernel("standalone_containers_on_attachable_networks") {
        return;
    }
    let image = whoami_image();
    let lab = Lab::up(1, "embedded");
    lab.shoal(&["network", "create", "--attachable", "appnet"])
        .ok();
    lab.shoal(&["network", "create", "closed"]).ok();
    lab.shoal(&[
        "service",
        "create",
        "--name",
        "web",
        "--network",
        "appnet",
        "--image",
        &image,
    ])
    .ok();
    wait_serving(&lab, "web", 1);

    let run = lab
        .shoal(&[
            "run",
            "-d",
            "--name",
            "box",
            "--network",
            "appnet,alias=boxy",
            "localhost/shoal-busybox:2",
            "sh",
            "-c",
            "echo hello-from-box; exec sleep 1000",
        ])
        .ok();
    assert_eq!(run.stdout.trim(), "box");
    let ps: Vec<serde_json::Value> =
        serde_json::from_str(&lab.shoal(&["ps", "--format", "json"]).ok().stdout).unwrap();
    assert_eq!(ps.len(), 1, "{ps:?}");
    assert_eq!(ps[0]["task"]["state"], "running");
    let box_ip = ps[0]["task"]["networks"][0]["ip"]
        .as_str()
        .unwrap()
        .to_string();
    let svc: serde_json::Value =
        serde_json::from_str(&lab.shoal(&["service", "inspect", "web"]).ok().stdout).unwrap();
    let vip = svc["networks"][0]["vip"].as_str().unwrap().to_string();
    let ls = lab.shoal(&["service", "ls"]).ok().stdout;
    assert!(!ls.contains("box"), "a container is not a service: {ls}");

    // Names both ways.
    let out = lab.exec("box.1", &["nslookup", "web"]).ok().stdout;
    assert!(out.contains(&vip), "box -> web: {out}");
    for name in ["box", "boxy"] {
        let out = lab.exec("web.1", &["nslookup", name]).ok().stdout;
        assert!(out.contains(&box_ip), "web -> {name}: {out}");
    }
    let logs = lab.shoal(&["logs", "box"]).ok().stdout;
    assert!(logs.contains("hello-from-box"), "logs: {logs}");

    // Refused, with nothing made.
    for (args, why) in [
        (&["--network", "closed"][..], "not attachable"),
        (&["--network", "nosuch"][..], "not found"),
        (
            &["--name", "web", "--network", "appnet"][..],
            "in use by a service",
        ),
        (
            &["--name", "box", "--network", "appnet"][..],
            "already exists",
        ),
    ] {
        let mut argv = vec!["run", "-d"];
        argv.extend_from_slice(args);
        argv.extend_from_slice(&["localhost/shoal-busybox:2", "sleep", "1"]);
        let r = lab.shoal(&argv);
        assert_ne!(r.code, 0, "{argv:?} accepted");
        assert!(r.stderr.contains(why), "{argv:?}: {}", r.stderr);
    }
    let svc_rm = lab.shoal(&["service", "rm", "box"]);
    assert!(svc_rm.stderr.contains("standalone container"), "{svc_rm:?}");
    assert_eq!(lab_containers(&lab).len(), 2, "{:?}", lab_containers(&lab));

    // Removed: its name leaves DNS, its container goes.
    lab.shoal(&["rm", "box"]).ok();
    lab.wait_for("box to leave DNS", Duration::from_secs(10), || {
        let out = lab.exec("web.1", &["nslookup", "box"]).stdout;
        (!out.contains(&box_ip)).then_some(())
    });
    lab.wait_for("box's container to go", Duration::from_secs(20), || {
        (lab_containers(&lab).len() == 1).then_some(())
    });

    // An exit is recorded and the container is not started again.
    let _ = lab.shoal(&[
        "run",
        "-d",
        "--name",
        "once",
        "--network",
        "appnet",
        "localhost/shoal-busybox:2",
        "sh",
        "-c",
        "sleep 1; exit 3",
    ]);
    let exited = lab.wait_for("once to exit", Duration::from_secs(30), || {
        let r = lab.shoal(&["ps", "--format", "json"]);
        let ps: Vec<serde_json::Value> = serde_json::from_str(&r.stdout).ok()?;
        ps.iter()
            .find(|c| c["container"]["name"] == "once")
            .and_then(|c| {
                c["container"]["standalone"]["exited"]
                    .as_str()
                    .map(String::from)
            })
    });
    assert!(exited.contains("exit code 3"), "{exited}");
    std::thread::sleep(Duration::from_secs(7));
    let tasks: Vec<serde_json::Value> = serde_json::from_str(
        &lab.shoal(&["service", "ps", "once", "--format", "json"])
            .ok()
            .stdout,
    )
    .unwrap();
    assert!(
        tasks.iter().all(|t| t["desired_state"] != "running"),
        "restarted: {tasks:?}"
    );
}
