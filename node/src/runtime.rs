//! The container runtime behind a trait. The lab runtime makes a task a network namespace
//! plus a process running the service's command, in its own mount namespace (whose
//! /etc/resolv.conf points at 127.0.0.11) and UTS namespace (its hostname). A CNI or
//! containerd runtime can implement [`Runtime`] later.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, anyhow};
use async_trait::async_trait;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use shoal_api::wire::SandboxEntry;
use tokio::sync::mpsc;

/// What a runtime needs to start a task.
#[derive(Debug, Clone)]
pub struct TaskSpec {
    pub id: String,
    /// `web.1`
    pub name: String,
    pub service: String,
    pub hostname: String,
    /// The image of a container task; None: a process task.
    pub image: Option<String>,
    /// A container another runtime made and attached through the CNI plugin: there is
    /// nothing to prepare, start or stop, only its network and DNS.
    pub external: bool,
    pub command: Vec<String>,
    pub env: Vec<String>,
    /// The resolv.conf search list.
    pub search: Vec<String>,
    /// Lines of the task's /etc/resolv.conf.
    pub resolv_conf: String,
}

/// A task process ended (sent by the runtime to the reconciler).
#[derive(Debug, Clone)]
pub struct Exited {
    pub task_id: String,
    pub status: String,
}

#[async_trait]
pub trait Runtime: Send + Sync {
    /// Name of the task's network namespace (stable for a task id).
    fn netns(&self, task_id: &str) -> String;
    /// Creates the task's network namespace (idempotent). Networks are attached by the mesh
    /// between `prepare` and `start`.
    async fn prepare(&self, task_id: &str) -> anyhow::Result<String>;
    /// Starts the task's process.
    async fn start(&self, spec: &TaskSpec) -> anyhow::Result<u32>;
    /// True when the task's process is alive (adopting processes of an earlier agent run).
    fn is_running(&self, task_id: &str) -> bool;
    /// SIGTERM, wait up to `timeout`, SIGKILL; then removes the namespace and files.
    async fn destroy(&self, task_id: &str, timeout: Duration) -> anyhow::Result<()>;
    /// Task ids this runtime holds (for garbage collection after a restart).
    fn list(&self) -> Vec<String>;
    /// Takes over a task whose process an earlier agent run started: its exit must still be
    /// reported.
    fn adopt(self: Arc<Self>, task_id: &str);
    /// How to run a command inside the task's sandbox (health checks, `lab exec`).
    fn entry(&self, task_id: &str, hostname: &str) -> SandboxEntry;
    /// A command printing the task's output (its last `tail` lines, or all; then more as it
    /// comes with `follow`); None when this runtime has no output of it.
    fn logs(&self, _task_id: &str, _tail: Option<u32>, _follow: bool) -> Option<Command> {
        None
    }

    /// Runs `argv` inside the task's sandbox, output discarded; true when it exits 0
    /// within `timeout` (killed otherwise).
    async fn exec_in(
        &self,
        task_id: &str,
        hostname: &str,
        argv: &[String],
        timeout: Duration,
    ) -> anyhow::Result<bool> {
        let mut cmd = sandbox_command(&self.entry(task_id, hostname), argv, true)?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut child = tokio::process::Command::from(cmd)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("running {:?} in task {task_id}", argv.first()))?;
        Ok(matches!(tokio::time::timeout(timeout, child.wait()).await, Ok(Ok(s)) if s.success()))
    }
}

/// A command that runs `argv` inside a sandbox (`new_session`: detached from the caller's
/// terminal; an interactive `lab exec` keeps it).
pub fn sandbox_command(
    entry: &SandboxEntry,
    argv: &[String],
    new_session: bool,
) -> anyhow::Result<Command> {
    let prog = argv.first().context("no command to run in the task")?;
    match entry {
        SandboxEntry::Process {
            netns,
            resolv_conf,
            hostname,
        } => {
            let mut cmd = Command::new(resolve_program(prog));
            cmd.args(&argv[1..]);
            let netns = netns.to_str().context("namespace path is not UTF-8")?;
            let sb = Sandbox::new(netns, resolv_conf, hostname)?;
            let sb = if new_session { sb } else { sb.same_session() };
            cmd.env("HOSTNAME", hostname);
            sb.apply(&mut cmd);
            Ok(cmd)
        }
        SandboxEntry::Container { engine, container } => {
            let mut cmd = Command::new(engine);
            cmd.arg("exec");
            if !new_session {
                // Interactive (`lab exec`): stdin, and a terminal when there is one.
                cmd.arg("-i");
                if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
                    cmd.arg("-t");
                }
            }
            cmd.arg(container).args(argv);
            Ok(cmd)
        }
    }
}

/// Prepared, allocation-free setup applied in the child between fork and exec.
pub struct Sandbox {
    netns: OwnedFd,
    resolv_src: CString,
    resolv_dst: CString,
    hostname: CString,
    new_session: bool,
}

impl Sandbox {
    pub fn new(netns: &str, resolv_conf_file: &Path, hostname: &str) -> anyhow::Result<Self> {
        Ok(Sandbox {
            netns: shoal_netns::open(netns)?,
            resolv_src: CString::new(resolv_conf_file.as_os_str().as_encoded_bytes())?,
            resolv_dst: CString::new("/etc/resolv.conf")?,
            hostname: CString::new(hostname)?,
            new_session: true,
        })
    }

    /// Keep the caller's session and terminal (for interactive `lab exec`).
    pub fn same_session(mut self) -> Self {
        self.new_session = false;
        self
    }

    /// Makes `cmd` run inside the sandbox. The closure only makes system calls on memory
    /// prepared before the fork.
    pub fn apply(self, cmd: &mut Command) {
        // SAFETY: the closure performs only raw system calls (setns, unshare, mount,
        // sethostname, setsid) on data owned by the closure; no allocation after fork.
        unsafe {
            cmd.pre_exec(move || {
                let s = &self;
                let check = |r: i32| {
                    if r != 0 {
                        Err(std::io::Error::last_os_error())
                    } else {
                        Ok(())
                    }
                };
                check(libc::setns(s.netns.as_raw_fd(), libc::CLONE_NEWNET))?;
                check(libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWUTS))?;
                // Our mounts must not leak to the host; host unmounts (of netns pins) must
                // still reach us: slave, not private.
                check(libc::mount(
                    c"none".as_ptr(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_SLAVE,
                    std::ptr::null(),
                ))?;
                check(libc::mount(
                    s.resolv_src.as_ptr(),
                    s.resolv_dst.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                ))?;
                check(libc::sethostname(
                    s.hostname.as_ptr(),
                    s.hostname.as_bytes().len(),
                ))?;
                if s.new_session {
                    libc::setsid();
                }
                Ok(())
            });
        }
    }
}

/// The lab runtime: namespaces + processes on this host.
pub struct ProcessRuntime {
    prefix: String,
    dir: PathBuf,
    children: Mutex<HashMap<String, u32>>,
    exits: mpsc::UnboundedSender<Exited>,
}

impl ProcessRuntime {
    /// `prefix`: namespace name prefix; `dir`: where task files live.
    pub fn new(
        prefix: &str,
        dir: &Path,
        exits: mpsc::UnboundedSender<Exited>,
    ) -> anyhow::Result<Arc<Self>> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Arc::new(ProcessRuntime {
            prefix: prefix.to_string(),
            dir: dir.to_path_buf(),
            children: Mutex::new(HashMap::new()),
            exits,
        }))
    }

    pub(crate) fn task_dir(&self, task_id: &str) -> PathBuf {
        self.dir.join(task_id)
    }

    /// Records the pid of a task's first process (a container's, started by another
    /// runtime in this task's sandbox): what `is_running` checks.
    pub(crate) fn record_pid(&self, task_id: &str, pid: u32) -> anyhow::Result<()> {
        fs::write(self.task_dir(task_id).join("pid"), pid.to_string())?;
        self.children
            .lock()
            .expect("lock")
            .insert(task_id.to_string(), pid);
        Ok(())
    }

    pub(crate) fn exits(&self) -> &mpsc::UnboundedSender<Exited> {
        &self.exits
    }

    pub(crate) fn prefix(&self) -> &str {
        &self.prefix
    }

    fn pid_of(&self, task_id: &str) -> Option<u32> {
        if let Some(p) = self.children.lock().expect("lock").get(task_id) {
            return Some(*p);
        }
        fs::read_to_string(self.task_dir(task_id).join("pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Files a task keeps: resolv.conf and hostname, for `lab exec` to use the same view.
    pub fn task_files(dir: &Path, task_id: &str) -> (PathBuf, PathBuf) {
        let d = dir.join(task_id);
        (d.join("resolv.conf"), d.join("hostname"))
    }
}

fn alive_in(pid: u32, netns: &str) -> bool {
    // The pid must be alive AND still in the task's namespace (pids get reused).
    let Ok(ns) = fs::metadata(shoal_netns::path(netns)) else {
        return false;
    };
    let Ok(p) = fs::metadata(format!("/proc/{pid}/ns/net")) else {
        return false;
    };
    use std::os::unix::fs::MetadataExt;
    ns.ino() == p.ino() && ns.dev() == p.dev()
}

#[async_trait]
impl Runtime for ProcessRuntime {
    fn netns(&self, task_id: &str) -> String {
        crate::names::task_netns(&self.prefix, task_id)
    }

    /// The process's output file, through `tail`.
    fn logs(&self, task_id: &str, tail: Option<u32>, follow: bool) -> Option<Command> {
        let log = self.task_dir(task_id).join("log");
        if !log.exists() {
            return None;
        }
        let mut cmd = Command::new("tail");
        cmd.arg("-n")
            .arg(tail.map_or("+1".to_string(), |n| n.to_string()));
        if follow {
            cmd.arg("-f");
        }
        cmd.arg(log);
        Some(cmd)
    }

    fn entry(&self, task_id: &str, hostname: &str) -> SandboxEntry {
        SandboxEntry::Process {
            netns: shoal_netns::path(&self.netns(task_id)),
            resolv_conf: Self::task_files(&self.dir, task_id).0,
            hostname: hostname.to_string(),
        }
    }

    async fn prepare(&self, task_id: &str) -> anyhow::Result<String> {
        let ns = self.netns(task_id);
        shoal_netns::ensure(&ns)
            .with_context(|| format!("creating namespace of task {task_id}"))?;
        fs::create_dir_all(self.task_dir(task_id))?;
        Ok(ns)
    }

    async fn start(&self, spec: &TaskSpec) -> anyhow::Result<u32> {
        let ns = self.netns(&spec.id);
        let dir = self.task_dir(&spec.id);
        fs::create_dir_all(&dir)?;
        let (resolv, hostname) = Self::task_files(&self.dir, &spec.id);
        fs::write(&resolv, &spec.resolv_conf)?;
        fs::write(&hostname, &spec.hostname)?;
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("log"))?;
        let prog = spec
            .command
            .first()
            .ok_or_else(|| anyhow!("task {} has no command", spec.name))?;
        let mut cmd = Command::new(resolve_program(prog));
        cmd.args(&spec.command[1..])
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("HOSTNAME", &spec.hostname)
            .env("SHOAL_TASK_ID", &spec.id)
            .env("SHOAL_TASK_NAME", &spec.name)
            .env("SHOAL_SERVICE_NAME", &spec.service)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .current_dir("/");
        for e in &spec.env {
            if let Some((k, v)) = e.split_once('=') {
                cmd.env(k, v);
            }
        }
        Sandbox::new(&ns, &resolv, &spec.hostname)?.apply(&mut cmd);
        let mut child = tokio::process::Command::from(cmd)
            .kill_on_drop(false)
            .spawn()
            .with_context(|| format!("starting {:?} for task {}", spec.command, spec.name))?;
        let pid = child
            .id()
            .ok_or_else(|| anyhow!("task {} exited at once", spec.name))?;
        fs::write(dir.join("pid"), pid.to_string())?;
        self.children
            .lock()
            .expect("lock")
            .insert(spec.id.clone(), pid);
        let exits = self.exits.clone();
        let id = spec.id.clone();
        tokio::spawn(async move {
            let status = match child.wait().await {
                Ok(s) => s.to_string(),
                Err(e) => e.to_string(),
            };
            let _ = exits.send(Exited {
                task_id: id,
                status,
            });
        });
        Ok(pid)
    }

    fn is_running(&self, task_id: &str) -> bool {
        self.pid_of(task_id)
            .is_some_and(|pid| alive_in(pid, &self.netns(task_id)))
    }

    async fn destroy(&self, task_id: &str, timeout: Duration) -> anyhow::Result<()> {
        let ns = self.netns(task_id);
        if shoal_netns::exists(&ns) {
            let pids = shoal_netns::pids(&ns).unwrap_or_default();
            for p in &pids {
                let _ = kill(Pid::from_raw(*p), Signal::SIGTERM);
            }
            let deadline = tokio::time::Instant::now() + timeout;
            while tokio::time::Instant::now() < deadline
                && !shoal_netns::pids(&ns).unwrap_or_default().is_empty()
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            for p in shoal_netns::pids(&ns).unwrap_or_default() {
                let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
            }
            shoal_netns::delete(&ns)?;
        }
        self.children.lock().expect("lock").remove(task_id);
        let _ = fs::remove_dir_all(self.task_dir(task_id));
        Ok(())
    }

    fn list(&self) -> Vec<String> {
        fs::read_dir(&self.dir)
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| e.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Adopted processes are not our children: their exit is noticed by polling.
    fn adopt(self: Arc<Self>, task_id: &str) {
        let task_id = task_id.to_string();
        tokio::spawn(async move {
            while self.is_running(&task_id) {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            let _ = self.exits.send(Exited {
                task_id,
                status: "exited (adopted process)".into(),
            });
        });
    }
}

/// `shoal` in a command means this very binary (so `shoal whoami` works in the lab
/// wherever the binary lives).
pub fn resolve_program(prog: &str) -> PathBuf {
    if prog == "shoal"
        && let Ok(me) = std::env::current_exe()
    {
        return me;
    }
    PathBuf::from(prog)
}
