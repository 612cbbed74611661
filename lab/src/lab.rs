//! `shoal lab`: a whole cluster on one machine, out of network namespaces (what kind/k3d are
//! to Kubernetes). An underlay segment (a bridge in its own namespace), one namespace per
//! node running its own `shoal agent`, an etcd namespace when the store is etcd, and an
//! outside `client` namespace. Everything the lab makes is named `shoal-<lab>-...` and lives
//! under /run/shoal/lab/<lab>/, so `lab down` can find and remove all of it.
//!
//! The topology is built with iproute2 (`ip -n NS ...`): it is test tooling, like kind
//! driving docker; the agent itself programs the kernel through netlink.

use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use shoal_netns::CommandExt as _;

use shoal::config::{AgentConfig, CniSettings, DnsSettings, StoreConfig, StoreKind};
use shoal_api::client::Client;

pub const LAB_ROOT: &str = "/run/shoal/lab";
const UNDERLAY: &str = "192.0.2";
const CLIENT_ADDR: &str = "192.0.2.100";
const ETCD_ADDR: &str = "192.0.2.2";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabNode {
    pub name: String,
    pub netns: String,
    pub addr: Ipv4Addr,
    pub socket: PathBuf,
    pub pid: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Lab {
    pub name: String,
    pub store: StoreKind,
    pub nodes: Vec<LabNode>,
    pub client_netns: String,
    pub underlay_netns: String,
    pub etcd_pid: Option<u32>,
}

pub fn validate_lab_name(name: &str) -> anyhow::Result<()> {
    if name.is_empty()
        || name.len() > 12
        || !name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
    {
        bail!("invalid lab name {name:?}: use 1-12 lowercase letters or digits");
    }
    Ok(())
}

pub fn lab_dir(name: &str) -> PathBuf {
    Path::new(LAB_ROOT).join(name)
}

fn prefix(name: &str) -> String {
    format!("shoal-{name}-")
}

impl Lab {
    pub fn load(name: &str) -> anyhow::Result<Lab> {
        validate_lab_name(name)?;
        let p = lab_dir(name).join("lab.json");
        let text = std::fs::read_to_string(&p)
            .map_err(|_| anyhow!("lab {name:?} is not up (no {})", p.display()))?;
        Ok(serde_json::from_str(&text)?)
    }

    fn save(&self) -> anyhow::Result<()> {
        let dir = lab_dir(&self.name);
        let tmp = dir.join("lab.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(tmp, dir.join("lab.json"))?;
        Ok(())
    }

    pub fn host_env(&self) -> String {
        format!("unix://{}", self.nodes[0].socket.display())
    }

    pub fn node(&self, name: &str) -> Option<&LabNode> {
        self.nodes.iter().find(|n| n.name == name)
    }
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running ip (install iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Connects namespace `ns` to the underlay bridge with address `addr`/24 on its eth0.
fn plug(ul: &str, ns: &str, port: &str, addr: &str) -> anyhow::Result<()> {
    ip(&[
        "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", port, "netns", ul,
    ])?;
    ip(&["-n", ul, "link", "set", port, "master", "br0", "up"])?;
    ip(&[
        "-n",
        ns,
        "addr",
        "add",
        &format!("{addr}/24"),
        "dev",
        "eth0",
    ])?;
    ip(&["-n", ns, "link", "set", "eth0", "up"])?;
    ip(&["-n", ns, "link", "set", "lo", "up"])?;
    Ok(())
}

/// What `lab up` may change in the agents' configuration.
#[derive(Debug, Clone, Default)]
pub struct UpOptions {
    /// The DNS servers the agents forward names outside the cluster to (none by default:
    /// the lab never talks to the outside unless told to, e.g. to a server in its client
    /// namespace).
    pub dns_upstreams: Vec<std::net::SocketAddr>,
    /// `[lb] dataplane` of every agent.
    pub lb_dataplane: shoal::config::Dataplane,
}

/// `shoal lab up`. On any failure everything made so far is removed again.
pub async fn up(name: &str, nodes: u32, store: StoreKind, opts: &UpOptions) -> anyhow::Result<Lab> {
    validate_lab_name(name)?;
    if nodes == 0 || nodes > 9 {
        bail!("--nodes must be between 1 and 9");
    }
    if nodes > 1 && store == StoreKind::Embedded {
        bail!("--nodes {nodes} needs --store etcd: the embedded store serves a single node");
    }
    let dir = lab_dir(name);
    if dir.join("lab.json").exists()
        || shoal_netns::list()?
            .iter()
            .any(|n| n.starts_with(&prefix(name)))
    {
        bail!(
            "lab {name:?} is already up (or left over): run `shoal lab down --name {name}` first"
        );
    }
    std::fs::create_dir_all(&dir)?;
    match build(name, nodes, store, opts, &dir).await {
        Ok(lab) => Ok(lab),
        Err(e) => {
            let _ = down(name).await;
            Err(e)
        }
    }
}

async fn build(
    name: &str,
    nodes: u32,
    store: StoreKind,
    opts: &UpOptions,
    dir: &Path,
) -> anyhow::Result<Lab> {
    let p = prefix(name);
    let ul = format!("{p}ul");
    shoal_netns::create(&ul)?;
    ip(&["-n", &ul, "link", "add", "br0", "type", "bridge"])?;
    ip(&["-n", &ul, "link", "set", "br0", "up"])?;
    let client = format!("{p}client");
    shoal_netns::create(&client)?;
    plug(&ul, &client, "client", CLIENT_ADDR)?;
    let mut lab = Lab {
        name: name.into(),
        store,
        nodes: vec![],
        client_netns: client,
        underlay_netns: ul.clone(),
        etcd_pid: None,
    };
    let exe = std::env::current_exe()?;
    let mut endpoints = vec![];
    if store == StoreKind::Etcd {
        let ns = format!("{p}etcd");
        shoal_netns::create(&ns)?;
        plug(&ul, &ns, "etcd", ETCD_ADDR)?;
        let data = dir.join("etcd");
        let url = format!("http://{ETCD_ADDR}:2379");
        let log = std::fs::File::create(dir.join("etcd.log"))?;
        let mut cmd = Command::new("etcd");
        cmd.args(["--name", "lab", "--data-dir"])
            .arg(&data)
            .args([
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
            ])
            .args([
                "--listen-peer-urls",
                &format!("http://{ETCD_ADDR}:2380"),
                "--initial-advertise-peer-urls",
                &format!("http://{ETCD_ADDR}:2380"),
            ])
            .args(["--initial-cluster", &format!("lab=http://{ETCD_ADDR}:2380")])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .in_netns(&ns)?;
        unsafe_setsid(&mut cmd);
        let child = cmd.spawn().context("starting etcd (install etcd-server)")?;
        lab.etcd_pid = Some(child.id());
        endpoints.push(url);
        lab.save()?;
        wait_tcp(
            &ns,
            &format!("{ETCD_ADDR}:2379"),
            child.id(),
            &dir.join("etcd.log"),
        )?;
    }
    for i in 1..=nodes {
        let node = format!("node{i}");
        let ns = format!("{p}{node}");
        let addr: Ipv4Addr = format!("{UNDERLAY}.{}", 10 + i).parse()?;
        shoal_netns::create(&ns)?;
        plug(&ul, &ns, &node, &addr.to_string())?;
        let ndir = dir.join(&node);
        std::fs::create_dir_all(&ndir)?;
        let cfg = AgentConfig {
            node_name: node.clone(),
            socket: ndir.join("shoal.sock"),
            state_dir: ndir.join("state"),
            netns_prefix: format!("{ns}-"),
            advertise_addr: Some(addr),
            store: StoreConfig {
                kind: store,
                endpoints: endpoints.clone(),
                tls: None,
            },
            // The lab never talks to the outside: no search list, and no upstream servers
            // but those given (`lab up --dns-upstream`).
            dns: DnsSettings {
                upstreams: Some(opts.dns_upstreams.clone()),
                search: Some(vec![]),
                ..Default::default()
            },
            // The lab's CNI files stay under the lab (the host's /etc/cni is left alone):
            // conflists per node, one plugin binary per lab. `lab cni-conf` prints a
            // containers.conf that points podman at them.
            cni: CniSettings {
                config_dir: ndir.join("cni/net.d"),
                plugin_dir: dir.join("cni-bin"),
                ..Default::default()
            },
            lb: shoal::config::LbSettings {
                dataplane: opts.lb_dataplane,
                ..Default::default()
            },
            ..Default::default()
        };
        let cfg_path = ndir.join("agent.toml");
        std::fs::write(&cfg_path, toml::to_string(&cfg)?)?;
        let pid = spawn_agent(&exe, &ndir, &ns)?;
        lab.nodes.push(LabNode {
            name: node,
            netns: ns,
            addr,
            socket: cfg.socket.clone(),
            pid,
        });
        lab.save()?;
    }
    for n in &lab.nodes {
        wait_ready(n, &dir.join(&n.name).join("agent.log")).await?;
    }
    wait_all_ready(&lab).await?;
    Ok(lab)
}

/// Waits until something accepts TCP connections on `addr` inside namespace `ns`.
fn wait_tcp(ns: &str, addr: &str, pid: u32, log: &Path) -> anyhow::Result<()> {
    let start = Instant::now();
    let addr: std::net::SocketAddr = addr.parse()?;
    loop {
        let ok = shoal_netns::run_in(ns, || {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
        })?;
        if ok {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(20) || !pid_alive(pid) {
            let tail = std::fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(10).collect();
            bail!(
                "nothing listens on {addr} in {ns}; the log ends with:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts a node's agent (daemonised, logging to the node's agent.log) in its namespace.
fn spawn_agent(exe: &Path, ndir: &Path, ns: &str) -> anyhow::Result<u32> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(ndir.join("agent.log"))?;
    let mut cmd = Command::new(exe);
    // The lab's config file says everything: no SHOAL_* of the caller overrides it.
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("SHOAL_") {
            cmd.env_remove(k);
        }
    }
    cmd.arg("agent")
        .arg("--config")
        .arg(ndir.join("agent.toml"))
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .in_netns(ns)?;
    unsafe_setsid(&mut cmd);
    Ok(cmd.spawn().context("starting the node agent")?.id())
}

/// `shoal lab kill NODE`: a node loss. SIGKILL of its agent and of every task process, and
/// its underlay link cut (the bridge port goes down). Kernel state stays as a crash leaves it.
pub fn kill(name: &str, node: &str) -> anyhow::Result<()> {
    let lab = Lab::load(name)?;
    let n = lab
        .node(node)
        .with_context(|| format!("no node {node:?} in lab {name:?}"))?;
    let _ = kill_pid(n.pid);
    let tasks = format!("{}-", n.netns);
    for ns in shoal_netns::list()?
        .iter()
        .filter(|x| x.starts_with(&tasks))
    {
        for pid in shoal_netns::pids(ns).unwrap_or_default() {
            let _ = signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
    ip(&["-n", &lab.underlay_netns, "link", "set", &n.name, "down"])?;
    Ok(())
}

fn kill_pid(pid: u32) -> nix::Result<()> {
    signal::kill(Pid::from_raw(pid as i32), Signal::SIGKILL)
}

/// `shoal lab start NODE`: reconnects the node and starts its agent again; the agent adopts
/// or removes what its previous run left.
pub async fn start(name: &str, node: &str) -> anyhow::Result<()> {
    let mut lab = Lab::load(name)?;
    let idx = lab
        .nodes
        .iter()
        .position(|n| n.name == node)
        .with_context(|| format!("no node {node:?} in lab {name:?}"))?;
    let n = lab.nodes[idx].clone();
    if pid_alive(n.pid) {
        bail!(
            "the agent of {node} is running (pid {}); `lab kill {node}` first",
            n.pid
        );
    }
    ip(&["-n", &lab.underlay_netns, "link", "set", &n.name, "up"])?;
    let ndir = lab_dir(name).join(&n.name);
    let pid = spawn_agent(&std::env::current_exe()?, &ndir, &n.netns)?;
    lab.nodes[idx].pid = pid;
    lab.save()?;
    wait_ready(&lab.nodes[idx], &ndir.join("agent.log")).await?;
    wait_all_ready(&lab).await
}

/// `shoal lab restart NODE`: stops the node's agent with SIGTERM (it leaves tasks and kernel
/// state alone) and starts it again; the new agent adopts both.
pub async fn restart(name: &str, node: &str) -> anyhow::Result<()> {
    let lab = Lab::load(name)?;
    let n = lab
        .node(node)
        .with_context(|| format!("no node {node:?} in lab {name:?}"))?;
    if pid_alive(n.pid) {
        stop_pid(n.pid, Duration::from_secs(10));
    }
    start(name, node).await
}

fn unsafe_setsid(cmd: &mut Command) {
    // SAFETY: setsid(2) is async-signal-safe; the daemon must not get the CLI's signals.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
}

async fn wait_ready(n: &LabNode, log: &Path) -> anyhow::Result<()> {
    let client = Client::new(&n.socket);
    let start = Instant::now();
    loop {
        if client.info().await.is_ok() {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(20) || !pid_alive(n.pid) {
            let tail = std::fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(15).collect();
            bail!(
                "agent of {} did not come up; its log ends with:\n{}",
                n.name,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the cluster sees every node of the lab as ready (holding its lease), so that
/// placement right after `lab up` spreads over all of them.
async fn wait_all_ready(lab: &Lab) -> anyhow::Result<()> {
    let Some(live) = lab.nodes.iter().find(|n| pid_alive(n.pid)) else {
        bail!("no agent of lab {:?} is running", lab.name);
    };
    let client = Client::new(&live.socket);
    let want = lab.nodes.iter().filter(|n| pid_alive(n.pid)).count();
    let start = Instant::now();
    loop {
        if let Ok(nodes) = client.nodes().await
            && nodes
                .iter()
                .filter(|n| n.status == shoal_api::model::NodeStatus::Ready)
                .count()
                >= want
        {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(20) {
            bail!(
                "not every node of lab {:?} became ready within 20 s",
                lab.name
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn pid_alive(pid: u32) -> bool {
    // A zombie child still "exists"; look at its state.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(false)
}

fn stop_pid(pid: u32, grace: Duration) {
    let p = Pid::from_raw(pid as i32);
    if signal::kill(p, Signal::SIGTERM).is_err() {
        return;
    }
    let start = Instant::now();
    while pid_alive(pid) && start.elapsed() < grace {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = signal::kill(p, Signal::SIGKILL);
}

/// `shoal lab down`: stops the agents and etcd, kills every process in the lab's
/// namespaces, removes the namespaces (links and nft tables go with them) and the files.
pub async fn down(name: &str) -> anyhow::Result<Vec<String>> {
    validate_lab_name(name)?;
    let mut errors = vec![];
    if let Ok(lab) = Lab::load(name) {
        // Containers podman attached through the lab's CNI plugin, while their agents can
        // still answer the DEL.
        if let Err(e) = remove_cni_containers(&lab).await {
            errors.push(format!("{e:#}"));
        }
        for n in &lab.nodes {
            stop_pid(n.pid, Duration::from_secs(3));
        }
        if let Some(pid) = lab.etcd_pid {
            stop_pid(pid, Duration::from_secs(3));
        }
    }
    let p = prefix(name);
    let mut removed = vec![];
    if let Err(e) = remove_containers(&p) {
        errors.push(format!("{e:#}"));
    }
    let all = shoal_netns::list()?;
    // Tasks and networks first, then nodes and the underlay.
    let mut ours: Vec<String> = all.into_iter().filter(|n| n.starts_with(&p)).collect();
    ours.sort_by_key(|n| std::cmp::Reverse(n.len()));
    for ns in &ours {
        for pid in shoal_netns::pids(ns).unwrap_or_default() {
            let _ = signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
    for ns in &ours {
        let start = Instant::now();
        while !shoal_netns::pids(ns).unwrap_or_default().is_empty()
            && start.elapsed() < Duration::from_secs(2)
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        match shoal_netns::delete(ns) {
            Ok(()) => removed.push(ns.clone()),
            Err(e) => errors.push(e.to_string()),
        }
    }
    let dir = lab_dir(name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    let _ = std::fs::remove_dir(LAB_ROOT);
    if !errors.is_empty() {
        bail!("lab down left things behind: {}", errors.join("; "));
    }
    Ok(removed)
}

/// A containers.conf for podman's CNI backend on a lab node: the node's conflists, the
/// lab's plugin directory, and the OCI runtime and rlimits the agents detect on this host.
pub fn podman_conf(lab: &Lab, node: &str) -> anyhow::Result<String> {
    anyhow::ensure!(
        lab.nodes.iter().any(|n| n.name == node),
        "lab {:?} has no node {node:?}",
        lab.name
    );
    let dir = lab_dir(&lab.name);
    let q = |p: &std::path::Path| toml::Value::from(p.display().to_string()).to_string();
    let mut out = String::from("[network]\nnetwork_backend = \"cni\"\n");
    out += &format!(
        "network_config_dir = {}\n",
        q(&dir.join(node).join("cni/net.d"))
    );
    out += &format!("cni_plugin_dirs = [{}]\n", q(&dir.join("cni-bin")));
    let ulimits = shoal_node::podman::detect_ulimits();
    if !ulimits.is_empty() {
        let v: Vec<String> = ulimits
            .iter()
            .map(|u| toml::Value::from(u.as_str()).to_string())
            .collect();
        out += &format!("\n[containers]\ndefault_ulimits = [{}]\n", v.join(", "));
    }
    if let Some(rt) = shoal_node::podman::detect_oci_runtime() {
        out += &format!("\n[engine]\nruntime = {}\n", toml::Value::from(rt));
    }
    Ok(out)
}

/// Removes the containers podman attached through the lab's CNI plugin (listed by each
/// node's agent), with the lab's containers.conf so that podman calls the plugin's DEL.
async fn remove_cni_containers(lab: &Lab) -> anyhow::Result<()> {
    for n in &lab.nodes {
        let Ok(list) = Client::new(&n.socket).containers().await else {
            continue;
        };
        let ids: Vec<String> = list
            .iter()
            .filter_map(|c| c.container.standalone.as_ref()?.cni.as_ref())
            .map(|c| c.container_id.clone())
            .collect();
        if ids.is_empty() {
            continue;
        }
        let conf = lab_dir(&lab.name).join(format!("{}-podman.conf", n.name));
        std::fs::write(&conf, podman_conf(lab, &n.name)?)?;
        podman_rm(Some(&conf), &ids, "the lab's CNI containers")?;
    }
    Ok(())
}

/// `podman rm -f` of `names` at once (with `conf` as CONTAINERS_CONF when given).
fn podman_rm(
    conf: Option<&std::path::Path>,
    names: &[impl AsRef<std::ffi::OsStr> + std::fmt::Debug],
    what: &str,
) -> anyhow::Result<()> {
    let mut cmd = Command::new("podman");
    if let Some(c) = conf {
        cmd.env("CONTAINERS_CONF", c);
    }
    let o = cmd
        .args(["rm", "-f", "--ignore", "-t", "0"])
        .args(names)
        .output()
        .context("running podman rm")?;
    if !o.status.success() {
        bail!(
            "removing {what} {names:?}: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(())
}

/// Removes the podman containers of the lab's agents (their label names a namespace
/// prefix under the lab's), at once: the lab is going away. Nothing to do without podman.
fn remove_containers(lab_prefix: &str) -> anyhow::Result<()> {
    let label = shoal_node::names::LABEL_PREFIX;
    let listed = match Command::new("podman")
        .args(["ps", "-a", "--filter", &format!("label={label}")])
        .args([
            "--format",
            &format!("{{{{.Names}}}} {{{{index .Labels \"{label}\"}}}}"),
        ])
        .output()
    {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
        Ok(o) => bail!(
            "listing the lab's containers: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        // No podman: no containers.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(anyhow::Error::new(e).context("running podman")),
    };
    let ours: Vec<&str> = listed
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter(|(_, prefix)| prefix.starts_with(lab_prefix))
        .map(|(name, _)| name)
        .collect();
    if ours.is_empty() {
        return Ok(());
    }
    podman_rm(None, &ours, "the lab's containers")
}

/// What `lab exec` runs in.
pub enum ExecTarget {
    Netns(String),
    Task(Box<shoal_api::wire::TaskLocation>),
}

pub async fn resolve_target(lab: &Lab, target: &str) -> anyhow::Result<ExecTarget> {
    if target == "client" {
        return Ok(ExecTarget::Netns(lab.client_netns.clone()));
    }
    if let Some(n) = lab.node(target) {
        return Ok(ExecTarget::Netns(n.netns.clone()));
    }
    // Every node is asked (a task lives on one of them); a node that is down only matters
    // when no live node has the task.
    let mut down = vec![];
    for n in &lab.nodes {
        let loc: anyhow::Result<shoal_api::wire::TaskLocation> =
            Client::new(&n.socket).task(target).await;
        match loc {
            Ok(l) if l.local => return Ok(ExecTarget::Task(Box::new(l))),
            Ok(_) => continue,
            Err(e) if shoal_api::client::ClientError::is_not_found(&e) => continue,
            Err(e) if shoal_api::client::ClientError::is_unreachable(&e) => {
                down.push(n.name.clone())
            }
            Err(e) => return Err(e),
        }
    }
    if !down.is_empty() {
        bail!(
            "no live node of lab {:?} runs a task named {target:?}; node(s) {} did not answer (down?)",
            lab.name,
            down.join(", ")
        );
    }
    bail!(
        "no task, node or client named {target:?} in lab {:?} (nodes: {})",
        lab.name,
        lab.nodes
            .iter()
            .map(|n| n.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// Replaces this process with `cmd` inside the target (never returns on success).
pub fn exec(target: ExecTarget, cmd: &[String]) -> anyhow::Error {
    let Some(prog) = cmd.first() else {
        return anyhow!("lab exec needs a command after --");
    };
    let mut c = match target {
        ExecTarget::Netns(ns) => {
            let mut c = Command::new(shoal_node::runtime::resolve_program(prog));
            c.args(&cmd[1..]);
            if let Err(e) = c.in_netns(&ns) {
                return e.into();
            }
            c
        }
        // The runtime says how to enter its sandbox.
        ExecTarget::Task(loc) => match shoal_node::runtime::sandbox_command(&loc.entry, cmd, false)
        {
            Ok(mut c) => {
                c.env("SHOAL_TASK_NAME", loc.task.name())
                    .env("SHOAL_SERVICE_NAME", &loc.task.service_name);
                c
            }
            Err(e) => return e.context(format!("entering task {}", loc.task.name())),
        },
    };
    let e = c.exec();
    anyhow!("cannot run {prog:?}: {e}")
}
