//! End-to-end test helpers: run the real `shoal` binary, bring labs up and always down.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The `shoal` binary under test: `SHOAL_BIN`, else the one next to this test's target dir.
pub fn shoal_bin() -> PathBuf {
    if let Ok(p) = std::env::var("SHOAL_BIN") {
        return PathBuf::from(p);
    }
    // target/<profile>/deps/<test-binary> -> target/<profile>/shoal
    let exe = std::env::current_exe().expect("current exe");
    let bin = exe
        .parent()
        .and_then(|d| d.parent())
        .map(|d| d.join("shoal"))
        .expect("target dir");
    assert!(
        bin.exists(),
        "{} is missing: build it first (cargo build -p shoal-cli), or set SHOAL_BIN",
        bin.display()
    );
    bin
}

/// Kernel tests need root, `ip` and `nft`. Without them they fail (the project's install
/// step provides them), unless SHOAL_ALLOW_SKIP=1, in which case they print SKIP and why.
pub fn require_kernel(test: &str) -> bool {
    let mut missing = vec![];
    if !nix_is_root() {
        missing.push("root");
    }
    for tool in ["ip", "nft"] {
        if Command::new(tool).arg("-V").output().is_err() {
            missing.push(tool);
        }
    }
    if missing.is_empty() {
        return true;
    }
    if std::env::var("SHOAL_ALLOW_SKIP").as_deref() == Ok("1") {
        eprintln!("SKIP {test}: needs {}", missing.join(", "));
        return false;
    }
    panic!(
        "{test} needs {} (run `make test` as root; it installs what is missing)",
        missing.join(", ")
    );
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// Output of a finished command, with helpers for assertions.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn from(o: Output) -> Run {
        Run {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).to_string(),
            stderr: String::from_utf8_lossy(&o.stderr).to_string(),
        }
    }
    pub fn from_command(c: &mut Command) -> Run {
        Run::from(c.output().expect("run command"))
    }
    #[track_caller]
    pub fn ok(self) -> Run {
        assert_eq!(self.code, 0, "command failed: {self:?}");
        self
    }
}

/// A lab of the real binary, removed on drop (even when the test panics).
pub struct Lab {
    pub name: String,
    pub host: String,
}

static SEQ: AtomicU32 = AtomicU32::new(0);

impl Lab {
    pub fn up(nodes: u32, store: &str) -> Lab {
        Lab::up_with(nodes, store, &[])
    }

    /// `lab up` with more arguments (e.g. `--dns-upstream`).
    pub fn up_with(nodes: u32, store: &str, extra: &[&str]) -> Lab {
        let name = format!(
            "t{}{}",
            std::process::id() % 100_000,
            SEQ.fetch_add(1, Ordering::SeqCst)
        );
        let out = Command::new(shoal_bin())
            .args([
                "lab",
                "up",
                "--name",
                &name,
                "--nodes",
                &nodes.to_string(),
                "--store",
                store,
            ])
            .args(extra)
            .output()
            .expect("run shoal");
        let r = Run::from(out);
        // The guard exists before the assertions, so a failed `up` is still torn down.
        let mut lab = Lab {
            name,
            host: String::new(),
        };
        assert_eq!(r.code, 0, "lab up failed: {r:?}");
        lab.host = r
            .stdout
            .trim()
            .strip_prefix("export SHOAL_HOST=")
            .expect("lab up prints the export line")
            .to_string();
        lab
    }

    /// `shoal ARGS` against this lab's agent.
    pub fn shoal(&self, args: &[&str]) -> Run {
        Run::from(
            Command::new(shoal_bin())
                .args(args)
                .env("SHOAL_HOST", &self.host)
                .env("SHOAL_LAB", &self.name)
                .output()
                .expect("run shoal"),
        )
    }

    /// `shoal ARGS` against the agent of another node of this lab.
    pub fn shoal_on(&self, node: &str, args: &[&str]) -> Run {
        let host = format!("unix:///run/shoal/lab/{}/{node}/shoal.sock", self.name);
        Run::from(
            Command::new(shoal_bin())
                .args(args)
                .env("SHOAL_HOST", host)
                .env("SHOAL_LAB", &self.name)
                .output()
                .expect("run shoal"),
        )
    }

    /// All tasks of a service (any state), from `service ps --format json`.
    pub fn tasks(&self, service: &str) -> Vec<serde_json::Value> {
        let r = self.shoal(&["service", "ps", service, "--format", "json"]);
        if r.code != 0 {
            return vec![];
        }
        serde_json::from_str(&r.stdout).unwrap_or_default()
    }

    /// Node name by node id, from `node ls --format json`.
    pub fn node_names(&self) -> std::collections::BTreeMap<String, String> {
        let r = self.shoal(&["node", "ls", "--format", "json"]).ok();
        let v: Vec<serde_json::Value> = serde_json::from_str(&r.stdout).unwrap();
        v.iter()
            .map(|n| {
                (
                    n["id"].as_str().unwrap().to_string(),
                    n["name"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }

    /// `shoal lab exec TARGET -- CMD...`
    pub fn exec(&self, target: &str, cmd: &[&str]) -> Run {
        let mut args = vec!["lab", "exec", "--name", &self.name, target, "--"];
        args.extend_from_slice(cmd);
        self.shoal(&args)
    }

    /// Polls `f` until it returns Some or the timeout passes.
    pub fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut() -> Option<T>,
    ) -> T {
        let start = Instant::now();
        loop {
            if let Some(v) = f() {
                return v;
            }
            assert!(
                start.elapsed() < timeout,
                "timed out after {timeout:?} waiting for {what}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Creates service `name` on `network`: `replicas` tasks of `shoal whoami --port 80`,
    /// and waits (30 s at most) until all of them run; returns them.
    pub fn whoami_service(
        &self,
        name: &str,
        network: &str,
        replicas: usize,
    ) -> Vec<serde_json::Value> {
        let n = replicas.to_string();
        self.shoal(&[
            "service",
            "create",
            "--name",
            name,
            "--network",
            network,
            "--replicas",
            &n,
            "--",
            "shoal",
            "whoami",
            "--port",
            "80",
        ])
        .ok();
        let tasks = self.wait_for(
            &format!("{replicas} running {name} tasks"),
            std::time::Duration::from_secs(30),
            || {
                let t = self.running_tasks(name);
                (t.len() == replicas).then_some(t)
            },
        );
        // "running" is written once the process is started, which can be a few milliseconds
        // before it listens (README, Gaps): wait until each one accepts on port 80.
        let nodes = self.node_names();
        for t in &tasks {
            let node = &nodes[t["node_id"].as_str().unwrap()];
            let id = t["id"].as_str().unwrap();
            let ns = format!("shoal-{}-{node}-t-{}", self.name, &id[..12]);
            self.wait_for(
                &format!("{name}.{} to listen on port 80", t["slot"]),
                std::time::Duration::from_secs(10),
                || {
                    shoal_netns::run_in(&ns, || {
                        std::net::TcpStream::connect(("127.0.0.1", 80)).is_ok()
                    })
                    .unwrap_or(false)
                    .then_some(())
                },
            );
        }
        tasks
    }

    /// `service create --name NAME --network NET --replicas N [EXTRA...] -- shoal whoami
    /// --port 80`, without waiting for the tasks.
    pub fn create_whoami(&self, name: &str, network: &str, replicas: usize, extra: &[&str]) {
        let n = replicas.to_string();
        let mut args = vec![
            "service",
            "create",
            "--name",
            name,
            "--network",
            network,
            "--replicas",
            &n,
        ];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--", "shoal", "whoami", "--port", "80"]);
        self.shoal(&args).ok();
    }

    /// Tasks of a service that are running (from `service ps --format json`).
    pub fn running_tasks(&self, service: &str) -> Vec<serde_json::Value> {
        self.running_tasks_on(None, service)
    }

    /// Like `running_tasks`, asked of `node`'s agent (None: the lab's first node).
    pub fn running_tasks_on(&self, node: Option<&str>, service: &str) -> Vec<serde_json::Value> {
        let args = ["service", "ps", service, "--format", "json"];
        let r = match node {
            Some(n) => self.shoal_on(n, &args),
            None => self.shoal(&args),
        };
        if r.code != 0 {
            return vec![];
        }
        let v: Vec<serde_json::Value> = serde_json::from_str(&r.stdout).unwrap_or_default();
        v.into_iter()
            .filter(|t| t["state"] == "running" && t["desired_state"] == "running")
            .collect()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // Say what the agents saw before the evidence is removed.
            if let Ok(rd) = std::fs::read_dir(format!("/run/shoal/lab/{}", self.name)) {
                let keep = std::env::var_os("SHOAL_TEST_KEEP_LOGS")
                    .map(|d| std::path::PathBuf::from(d).join(&self.name));
                for e in rd.flatten() {
                    let log = e.path().join("agent.log");
                    if let Some(dir) = &keep {
                        // Whole logs for a post-mortem, when asked for.
                        let _ = std::fs::create_dir_all(dir);
                        let _ = std::fs::copy(
                            &log,
                            dir.join(format!("{}.log", e.file_name().to_string_lossy())),
                        );
                    }
                    if let Ok(text) = std::fs::read_to_string(&log) {
                        let tail: Vec<&str> = text.lines().rev().take(40).collect();
                        eprintln!("--- {} (last 40 lines)", log.display());
                        for l in tail.into_iter().rev() {
                            eprintln!("{l}");
                        }
                    }
                }
            }
        }
        let out = Command::new(shoal_bin())
            .args(["lab", "down", "--name", &self.name])
            .output();
        if let Ok(o) = out
            && !o.status.success()
        {
            eprintln!(
                "lab down {} failed: {}",
                self.name,
                String::from_utf8_lossy(&o.stderr)
            );
        }
    }
}

/// Every IPv4 address in a command's output (dig +short, getent, ...).
pub fn ipv4s(out: &str) -> std::collections::BTreeSet<std::net::Ipv4Addr> {
    out.split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect()
}

/// What the host looks like (namespaces and nft ruleset), to compare before and after.
pub fn host_snapshot() -> (String, String) {
    let ns = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default();
    let nft = Command::new("nft")
        .args(["list", "ruleset"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default();
    (ns, nft)
}

/// One HTTP/1.1 keep-alive exchange on an open connection: the status line and body.
pub fn http_on(s: &mut std::net::TcpStream) -> std::io::Result<String> {
    use std::io::{BufRead as _, Read as _, Write as _};
    s.write_all(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")?;
    let mut r = std::io::BufReader::new(s.try_clone()?);
    let mut status = String::new();
    r.read_line(&mut status)?;
    let mut len = 0usize;
    loop {
        let mut h = String::new();
        r.read_line(&mut h)?;
        if h.trim().is_empty() {
            break;
        }
        if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(format!("{}{}", status, String::from_utf8_lossy(&body)))
}

/// `ip netns exec NS CMD...`
pub fn ip_netns(ns: &str, cmd: &[&str]) -> Run {
    Run::from_command(Command::new("ip").args(["netns", "exec", ns]).args(cmd))
}

/// rx_packets of the VXLAN device of the network with `vni` in `node`'s network namespaces.
pub fn vxlan_rx(lab: &Lab, node: &str, vni: u32) -> u64 {
    let prefix = format!("shoal-{}-{node}-n-", lab.name);
    for ns in shoal_netns::list().unwrap() {
        if !ns.starts_with(&prefix) {
            continue;
        }
        let d = ip_netns(&ns, &["ip", "-d", "link", "show", "vxlan0"]);
        if d.code == 0 && d.stdout.contains(&format!("id {vni} ")) {
            let s = ip_netns(&ns, &["cat", "/sys/class/net/vxlan0/statistics/rx_packets"]).ok();
            return s.stdout.trim().parse().unwrap();
        }
    }
    panic!("no vxlan device with vni {vni} on {node}");
}

/// A VXLAN datagram carrying an Ethernet/IPv4/UDP frame, as an attacker on the underlay
/// would send it.
pub fn vxlan_frame(vni: u32, inner_dst: std::net::Ipv4Addr) -> Vec<u8> {
    let mut f = vec![0x08, 0, 0, 0];
    f.extend_from_slice(&(vni << 8).to_be_bytes());
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01, 0x08, 0x00]);
    f.extend_from_slice(&[0x45, 0, 0, 32, 0, 0, 0x40, 0, 64, 17, 0, 0, 10, 0, 0, 254]);
    f.extend_from_slice(&inner_dst.octets());
    f.extend_from_slice(&[0x30, 0x39, 0, 80, 0, 12, 0, 0]);
    f.extend_from_slice(b"evil");
    f
}

/// Runs a qemu test script (scripts/ipvs-vm.sh or a wrapper of it) with `env` and asserts
/// the guest's `MARKER: PASS`. Without `tools` (or the kernel package: the script's exit 2)
/// it skips with the reason, and fails under `SHOAL_REQUIRE_KERNEL_TESTS=1`. Prints the
/// guest's lines that start with `guest:` or the marker, and the time taken.
pub fn vm_test(test: &str, script: &str, env: &[(&str, &str)], tools: &[&str], marker: &str) {
    let required = std::env::var_os("SHOAL_REQUIRE_KERNEL_TESTS").is_some();
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap();
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| {
            !Command::new("sh")
                .args(["-c", &format!("PATH=$PATH:/usr/sbin:/sbin command -v {t}")])
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false)
        })
        .collect();
    if !missing.is_empty() {
        let why = format!(
            "{} not installed: run the project's install step (scripts/deps.sh)",
            missing.join(", ")
        );
        assert!(!required, "{test} cannot run: {why}");
        eprintln!("SKIP {test}: {why}");
        return;
    }
    let start = Instant::now();
    let out = Command::new("bash")
        .arg(repo.join(script))
        .envs(env.iter().copied())
        .current_dir(repo)
        .output()
        .unwrap_or_else(|e| panic!("running {script}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let tag = format!("{marker}:");
    for l in stdout
        .lines()
        .filter(|l| l.starts_with("guest:") || l.starts_with(&tag))
    {
        println!("{l}");
    }
    eprintln!("{stderr}");
    if out.status.code() == Some(2) {
        // The script's "cannot set up" exit (kernel package not downloadable, ...).
        assert!(!required, "{test} cannot run: {stderr}");
        eprintln!("SKIP {test}: {stderr}");
        return;
    }
    let verdict = stdout
        .lines()
        .find(|l| l.starts_with(&tag))
        .unwrap_or("no marker (the VM timed out or crashed)");
    assert_eq!(
        verdict,
        format!("{marker}: PASS"),
        "{test} failed in the VM (script exit {:?}, {:.1} s):\n{stdout}",
        out.status.code(),
        start.elapsed().as_secs_f64()
    );
    assert!(out.status.success());
    eprintln!("{test}: {:.1} s", start.elapsed().as_secs_f64());
}
