//! The CNI plugin (`shoal-cni`): the protocol as the spec describes it (environment and
//! stdin JSON, results and error objects on stdout), and podman's CNI backend using it, on
//! real labs. Root and podman are required (`make test` installs them); these tests fail
//! without them, never skip (unless SHOAL_ALLOW_SKIP=1 without root).

use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use shoal_tests::{Lab, Run, require_kernel, shoal_bin};

/// The plugin under test: beside the `shoal` binary.
fn plugin() -> PathBuf {
    let p = shoal_bin().with_file_name("shoal-cni");
    assert!(
        p.exists(),
        "{} is missing: cargo build --bin shoal-cni",
        p.display()
    );
    p
}

/// One plugin call; the parsed stdout (Null when empty) and the run.
fn cni(env: &[(&str, &str)], stdin: &str) -> (Value, Run) {
    let mut c = Command::new(plugin());
    c.env_clear()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        c.env(k, v);
    }
    let mut child = c.spawn().expect("run shoal-cni");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let r = Run::from(child.wait_with_output().unwrap());
    let v = if r.stdout.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&r.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {r:?}"))
    };
    (v, r)
}

/// A call that must fail with `code`: exit non-zero, an error object naming the version.
fn cni_err(env: &[(&str, &str)], stdin: &str, code: u64) -> String {
    let (v, r) = cni(env, stdin);
    assert_ne!(r.code, 0, "accepted: {r:?}");
    assert_eq!(v["code"], code, "{v}");
    assert!(v["cniVersion"].is_string(), "{v}");
    v["msg"].as_str().unwrap_or_default().to_string()
}

/// The plugin's configuration as a runtime hands it over: the conflist's plugin entry with
/// the list's name and version, plus runtime config.
fn plugin_conf(lab: &Lab, node: &str, network: &str, extra: Value) -> Value {
    let f = format!(
        "/run/shoal/lab/{}/{node}/cni/net.d/shoal-{network}.conflist",
        lab.name
    );
    let list: Value = serde_json::from_str(&std::fs::read_to_string(&f).unwrap()).unwrap();
    let mut p = list["plugins"][0].clone();
    p["name"] = list["name"].clone();
    p["cniVersion"] = list["cniVersion"].clone();
    if let Value::Object(m) = extra {
        for (k, v) in m {
            p[k] = v;
        }
    }
    p
}

/// A namespace the test owns, deleted when dropped.
struct Netns(String);

impl Netns {
    fn new(name: String) -> Netns {
        shoal_netns::create(&name).unwrap();
        Netns(name)
    }
    fn path(&self) -> String {
        format!("/run/netns/{}", self.0)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = shoal_netns::delete(&self.0);
    }
}

fn containers(lab: &Lab) -> Vec<Value> {
    serde_json::from_str(&lab.shoal(&["ps", "--format", "json"]).ok().stdout).unwrap()
}

fn dig_in(ns: &str, name: &str) -> String {
    Run::from_command(Command::new("ip").args([
        "netns",
        "exec",
        ns,
        "dig",
        "+short",
        "+time=2",
        "+tries=1",
        "@127.0.0.11",
        name,
    ]))
    .stdout
    .trim()
    .to_string()
}

#[test]
fn cni_plugin_protocol() {
    if !require_kernel("cni_plugin_protocol") {
        return;
    }
    let lab = Lab::up(1, "embedded");
    lab.shoal(&["network", "create", "--attachable", "appnet"])
        .ok();
    lab.shoal(&["network", "create", "closed"]).ok();
    let conflists = format!("/run/shoal/lab/{}/node1/cni/net.d", lab.name);
    let listed = lab.wait_for("the conflist of appnet", Duration::from_secs(20), || {
        let mut v: Vec<String> = std::fs::read_dir(&conflists)
            .ok()?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        (!v.is_empty()).then_some(v)
    });
    assert_eq!(
        listed,
        vec!["shoal-appnet.conflist"],
        "only attachable networks get one"
    );
    let installed = PathBuf::from(format!("/run/shoal/lab/{}/cni-bin/shoal-cni", lab.name));
    assert_eq!(
        std::fs::read(&installed).unwrap(),
        std::fs::read(plugin()).unwrap(),
        "the plugin is installed"
    );

    let ns = Netns::new(format!("shoal-{}-cnitest", lab.name));
    let nspath = ns.path();
    let id_a = "a".repeat(64);
    let env = |cmd: &'static str, id: &str| -> Vec<(&'static str, String)> {
        vec![
            ("CNI_COMMAND", cmd.to_string()),
            ("CNI_CONTAINERID", id.to_string()),
            ("CNI_NETNS", nspath.clone()),
            ("CNI_IFNAME", "eth0".into()),
            ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAME=probe".into()),
            ("CNI_PATH", "/nonexistent".into()),
        ]
    };
    let as_ref = |e: &Vec<(&'static str, String)>| -> Vec<(&'static str, String)> { e.clone() };
    let call = |e: &[(&'static str, String)], stdin: &str| {
        let e: Vec<(&str, &str)> = e.iter().map(|(k, v)| (*k, v.as_str())).collect();
        cni(&e, stdin)
    };
    let call_err = |e: &[(&'static str, String)], stdin: &str, code: u64| {
        let e: Vec<(&str, &str)> = e.iter().map(|(k, v)| (*k, v.as_str())).collect();
        cni_err(&e, stdin, code)
    };
    let aliases =
        json!({ "runtimeConfig": { "aliases": { "appnet": ["probe-alias", "aaaaaaaaaaaa"] } } });
    let conf = plugin_conf(&lab, "node1", "appnet", aliases.clone()).to_string();

    // VERSION.
    let (v, r) = call(&env("VERSION", ""), r#"{"cniVersion":"1.0.0"}"#);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(v["cniVersion"], "1.0.0");
    let sup: Vec<&str> = v["supportedVersions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap())
        .collect();
    assert!(sup.contains(&"1.0.0") && sup.contains(&"1.1.0"), "{v}");

    // Bad input: each a spec error code, and nothing attached.
    call_err(&[], &conf, 4);
    call_err(&env("ADD", &id_a), "{not json", 6);
    call_err(&env("ADD", &id_a), "[1]", 6);
    call_err(&env("BOGUS", &id_a), &conf, 4);
    let mut old = plugin_conf(&lab, "node1", "appnet", json!({}));
    old["cniVersion"] = json!("0.2.0");
    assert!(call_err(&env("ADD", &id_a), &old.to_string(), 1).contains("0.2.0"));
    let mut no_agent = plugin_conf(&lab, "node1", "appnet", json!({}));
    no_agent.as_object_mut().unwrap().remove("agent");
    assert!(call_err(&env("ADD", &id_a), &no_agent.to_string(), 7).contains("agent"));
    let mut nosuch = plugin_conf(&lab, "node1", "appnet", json!({}));
    nosuch["name"] = json!("nosuch");
    assert!(call_err(&env("ADD", &id_a), &nosuch.to_string(), 7).contains("nosuch"));
    let mut closed = plugin_conf(&lab, "node1", "appnet", json!({}));
    closed["name"] = json!("closed");
    assert!(call_err(&env("ADD", &id_a), &closed.to_string(), 7).contains("not attachable"));
    let mut away = plugin_conf(&lab, "node1", "appnet", json!({}));
    away["agent"] = json!("/nonexistent/shoal.sock");
    call_err(&env("ADD", &id_a), &away.to_string(), 11);
    call_err(&env("STATUS", ""), &away.to_string(), 50);
    let mut no_netns = as_ref(&env("ADD", &id_a));
    no_netns.retain(|(k, _)| *k != "CNI_NETNS");
    call_err(&no_netns, &conf, 4);
    assert!(
        containers(&lab).is_empty(),
        "a refused ADD left a container"
    );

    // STATUS (1.1).
    let (_, r) = call(
        &env("STATUS", ""),
        &plugin_conf(&lab, "node1", "appnet", json!({"cniVersion": "1.1.0"})).to_string(),
    );
    assert_eq!(r.code, 0, "{r:?}");

    // ADD: an address from Shoal's allocator, the interface in the namespace, DNS.
    let (res, r) = call(&env("ADD", &id_a), &conf);
    assert_eq!(r.code, 0, "{r:?}");
    let addr = res["ips"][0]["address"].as_str().unwrap().to_string();
    let ip = addr.split('/').next().unwrap().to_string();
    let net: Value =
        serde_json::from_str(&lab.shoal(&["network", "inspect", "appnet"]).ok().stdout).unwrap();
    let subnet: ipnet::Ipv4Net = net["subnet"].as_str().unwrap().parse().unwrap();
    assert!(
        subnet.contains(&ip.parse::<std::net::Ipv4Addr>().unwrap()),
        "{addr} in {subnet}"
    );
    assert_eq!(res["ips"][0]["gateway"], net["gateway"]);
    assert_eq!(res["dns"]["nameservers"][0], "127.0.0.11");
    assert_eq!(res["interfaces"][0]["name"], "eth0");
    assert_eq!(res["interfaces"][0]["sandbox"], nspath.as_str());
    let ipa =
        Run::from_command(Command::new("ip").args(["-n", &ns.0, "-4", "addr", "show", "eth0"]))
            .ok();
    assert!(ipa.stdout.contains(&addr), "{}", ipa.stdout);
    for name in ["probe", "probe-alias", "aaaaaaaaaaaa"] {
        assert_eq!(dig_in(&ns.0, name), ip, "{name} in DNS");
    }
    let ps = containers(&lab);
    assert_eq!(ps.len(), 1);
    assert_eq!(ps[0]["container"]["name"], "probe");

    // ADD again: the same attachment.
    let (res2, r) = call(&env("ADD", &id_a), &conf);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(res2, res);
    assert_eq!(containers(&lab).len(), 1);
    // Another container with the same name: refused, nothing made.
    let id_b = "b".repeat(64);
    assert!(call_err(&env("ADD", &id_b), &conf, 100).contains("probe"));
    assert_eq!(containers(&lab).len(), 1);

    // CHECK: what the runtime recorded, and the kernel.
    let mut with_prev = plugin_conf(&lab, "node1", "appnet", aliases.clone());
    with_prev["prevResult"] = res.clone();
    let (_, r) = call(&env("CHECK", &id_a), &with_prev.to_string());
    assert_eq!(r.code, 0, "{r:?}");
    let mut wrong = with_prev.clone();
    wrong["prevResult"]["ips"][0]["address"] = json!("10.255.0.9/24");
    call_err(&env("CHECK", &id_a), &wrong.to_string(), 101);
    call_err(&env("CHECK", &id_b), &with_prev.to_string(), 3);
    // The interface gone from the kernel: CHECK says so (and the agent puts it back).
    Run::from_command(Command::new("ip").args(["-n", &ns.0, "link", "set", "eth0", "down"])).ok();
    assert!(call_err(&env("CHECK", &id_a), &with_prev.to_string(), 101).contains("down"));
    Run::from_command(Command::new("ip").args(["-n", &ns.0, "link", "set", "eth0", "up"])).ok();

    // An observer in a namespace of its own, to see names come and go.
    let ns2 = Netns::new(format!("shoal-{}-cniobs", lab.name));
    let id_o = "c".repeat(64);
    let observer = vec![
        ("CNI_COMMAND", "ADD".to_string()),
        ("CNI_CONTAINERID", id_o.clone()),
        ("CNI_NETNS", ns2.path()),
        ("CNI_IFNAME", "eth0".into()),
        ("CNI_ARGS", "K8S_POD_NAME=observer".into()),
    ];
    let (_, r) = call(
        &observer,
        &plugin_conf(&lab, "node1", "appnet", json!({})).to_string(),
    );
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(dig_in(&ns2.0, "probe-alias"), ip);

    // DEL: out of DNS, the task and its address gone; DEL again is fine.
    let (_, r) = call(&env("DEL", &id_a), &conf);
    assert_eq!(r.code, 0, "{r:?}");
    lab.wait_for("probe to leave DNS", Duration::from_secs(20), || {
        dig_in(&ns2.0, "probe").is_empty().then_some(())
    });
    assert_eq!(containers(&lab).len(), 1, "only the observer is left");
    let (_, r) = call(&env("DEL", &id_a), &conf);
    assert_eq!(r.code, 0, "DEL is idempotent: {r:?}");
    call_err(&env("CHECK", &id_a), &with_prev.to_string(), 3);

    // GC (1.1): attachments the runtime does not list are removed.
    let (_, r) = call(&env("ADD", &id_b), &conf);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(containers(&lab).len(), 2);
    // The runtime made a new namespace for it without a DEL: the new one replaces the old.
    let ns3 = Netns::new(format!("shoal-{}-cninew", lab.name));
    let mut moved = as_ref(&env("ADD", &id_b));
    moved[2].1 = ns3.path();
    let (res3, r) = call(&moved, &conf);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(res3["interfaces"][0]["sandbox"], ns3.path().as_str());
    let ip3 = res3["ips"][0]["address"]
        .as_str()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string();
    lab.wait_for(
        "the name to follow the new sandbox",
        Duration::from_secs(10),
        || (dig_in(&ns2.0, "probe") == ip3).then_some(()),
    );
    assert_eq!(containers(&lab).len(), 2);
    let mut gc = plugin_conf(&lab, "node1", "appnet", json!({"cniVersion": "1.1.0"}));
    let listed = |id: &str| json!({ "containerID": id, "ifname": "eth0" });
    gc["cni.dev/valid-attachments"] = json!([listed(&id_b), listed(&id_o)]);
    let (_, r) = call(&env("GC", ""), &gc.to_string());
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(containers(&lab).len(), 2, "listed attachments stay");
    gc["cni.dev/valid-attachments"] = json!([listed(&id_o)]);
    let (_, r) = call(&env("GC", ""), &gc.to_string());
    assert_eq!(r.code, 0, "{r:?}");
    let ps = containers(&lab);
    assert_eq!(ps.len(), 1, "GC removed the unlisted one: {ps:?}");
    assert_eq!(ps[0]["container"]["name"], "observer");
    let mut del_o = observer.clone();
    del_o[0].1 = "DEL".into();
    let (_, r) = call(&del_o, &conf);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(containers(&lab).is_empty());

    // No task (and so no address: they go together) is left: the network can be removed
    // (refused while it has tasks), and it loses its conflist.
    lab.wait_for("appnet to be removable", Duration::from_secs(20), || {
        (lab.shoal(&["network", "rm", "appnet"]).code == 0).then_some(())
    });
    lab.wait_for("the conflist to go", Duration::from_secs(20), || {
        (!std::path::Path::new(&format!("{conflists}/shoal-appnet.conflist")).exists())
            .then_some(())
    });
}

/// A podman container, removed when dropped (with the lab's containers.conf, so that
/// podman's DEL reaches the agent).
struct Podman {
    conf: PathBuf,
    name: String,
}

impl Podman {
    fn run(&self, args: &[&str]) -> Run {
        Run::from_command(
            Command::new("podman")
                .env("CONTAINERS_CONF", &self.conf)
                .args(args),
        )
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.run(&["rm", "-f", "--ignore", "-t", "0", &self.name]);
    }
}

#[test]
fn podman_through_the_cni_plugin() {
    if !require_kernel("podman_through_the_cni_plugin") {
        return;
    }
    let lab = Lab::up(1, "embedded");
    lab.shoal(&["network", "create", "--attachable", "appnet"])
        .ok();
    lab.shoal(&[
        "service",
        "create",
        "--name",
        "web",
        "--network",
        "appnet",
        "--replicas",
        "2",
        "localhost/shoal-busybox:2",
        "sh",
        "-c",
        "while true; do printf 'HTTP/1.0 200 OK\\r\\n\\r\\n%s\\n' $HOSTNAME | nc -l -p 80; done",
    ])
    .ok();
    lab.wait_for("2 running web tasks", Duration::from_secs(60), || {
        (lab.running_tasks("web").len() == 2).then_some(())
    });
    let conf = PathBuf::from(format!("/run/shoal/lab/{}/podman-cni.conf", lab.name));
    let text = lab
        .shoal(&["lab", "podman-conf", "--name", &lab.name])
        .ok()
        .stdout;
    std::fs::write(&conf, text).unwrap();
    lab.wait_for("the conflist", Duration::from_secs(20), || {
        std::path::Path::new(&format!(
            "/run/shoal/lab/{}/node1/cni/net.d/shoal-appnet.conflist",
            lab.name
        ))
        .exists()
        .then_some(())
    });

    let name = format!("cni-{}", lab.name);
    let ctr = Podman {
        conf,
        name: name.clone(),
    };
    let r = ctr.run(&[
        "--network-backend",
        "cni",
        "run",
        "-d",
        "--name",
        &name,
        "--network",
        "appnet:alias=cnibox",
        "localhost/shoal-busybox:2",
        "sleep",
        "1000",
    ]);
    assert_eq!(r.code, 0, "podman run through the plugin: {r:?}");
    let ps = containers(&lab);
    assert_eq!(ps.len(), 1, "{ps:?}");
    assert_eq!(ps[0]["container"]["name"], name.as_str());
    assert_eq!(ps[0]["task"]["state"], "running");
    let ip = ps[0]["task"]["networks"][0]["ip"]
        .as_str()
        .unwrap()
        .to_string();

    // Inside: the address from Shoal, 127.0.0.11 first in resolv.conf, services by name
    // and through the VIP.
    let addr = ctr
        .run(&["exec", &name, "ip", "-4", "addr", "show", "eth0"])
        .ok()
        .stdout;
    assert!(addr.contains(&format!("{ip}/")), "{addr}");
    let resolv = ctr
        .run(&["exec", &name, "cat", "/etc/resolv.conf"])
        .ok()
        .stdout;
    let first = resolv
        .lines()
        .find(|l| l.starts_with("nameserver"))
        .unwrap_or_default();
    assert_eq!(first, "nameserver 127.0.0.11", "{resolv}");
    let svc: Value =
        serde_json::from_str(&lab.shoal(&["service", "inspect", "web"]).ok().stdout).unwrap();
    let vip = svc["networks"][0]["vip"].as_str().unwrap().to_string();
    let out = ctr.run(&["exec", &name, "nslookup", "web"]).ok().stdout;
    assert!(out.contains(&vip), "web from the CNI container: {out}");
    let mut hosts = std::collections::BTreeSet::new();
    for _ in 0..12 {
        let got = ctr
            .run(&[
                "exec",
                &name,
                "sh",
                "-c",
                "(printf 'GET / HTTP/1.0\\r\\n\\r\\n'; sleep 1) | nc web 80",
            ])
            .stdout;
        if let Some(h) = got.lines().last().filter(|l| !l.is_empty()) {
            hosts.insert(h.trim().to_string());
        }
        if hosts.len() == 2 {
            break;
        }
    }
    assert_eq!(
        hosts.len(),
        2,
        "the VIP spreads requests from the CNI container: {hosts:?}"
    );
    // And the service's tasks find the container by its name and alias.
    for n in [name.as_str(), "cnibox"] {
        let out = lab.exec("web.1", &["nslookup", n]).ok().stdout;
        assert!(out.contains(&ip), "web -> {n}: {out}");
    }

    // podman rm: DEL through the plugin; the name leaves DNS, the record goes.
    ctr.run(&["rm", "-f", "-t", "0", &name]).ok();
    assert!(
        containers(&lab).is_empty(),
        "after podman rm: {:?}",
        containers(&lab)
    );
    lab.wait_for("the name to leave DNS", Duration::from_secs(20), || {
        let out = lab.exec("web.1", &["nslookup", &name]).stdout;
        (!out.contains(&ip)).then_some(())
    });
}
