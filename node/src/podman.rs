//! Image tasks: OCI containers that podman runs inside the network namespace Shoal made for
//! the task (`--network ns:PATH`, as Nomad's podman driver joins an orchestrator-made
//! namespace), with 127.0.0.11 as their only nameserver. Process tasks (no image) stay
//! with the [`ProcessRuntime`]; [`NodeRuntime`] is the node's one runtime and picks per task.
//!
//! A container is named as its task's namespace and labelled with the task id, service and
//! the agent's namespace prefix. Its first process's pid is recorded like a process task's,
//! so that a restarted agent finds it alive in the task's namespace and adopts it instead of
//! starting it again. A task's directory holds the file `container` from before `podman
//! run` until the task is destroyed: a crash between the two leaves nothing unknown.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use async_trait::async_trait;
use shoal_api::wire::SandboxEntry;
use tracing::{info, warn};

use crate::names::{LABEL_PREFIX, LABEL_SERVICE, LABEL_TASK, task_container};
use crate::runtime::{Exited, ProcessRuntime, Runtime, TaskSpec};

/// How podman is run on this node (`[runtime]` in the agent's configuration).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodmanSettings {
    /// The podman binary.
    pub engine: PathBuf,
    /// `podman --runtime R`; None: podman's default OCI runtime.
    pub oci_runtime: Option<String>,
    /// `--ulimit` values given to every container (podman's syntax, `nofile=1024:1024`).
    pub ulimits: Vec<String>,
    /// How long a pull of an image the node does not have may take.
    pub pull_timeout: Duration,
}

/// File in a task's directory naming its container.
const CONTAINER_FILE: &str = "container";

/// The OCI runtime this host needs, when podman's default cannot work here: crun refuses
/// hosts whose cgroups are hybrid (v1 controllers with cgroup2 at /sys/fs/cgroup/unified),
/// runc runs there.
pub fn detect_oci_runtime() -> Option<String> {
    let hybrid = nix::sys::statfs::statfs("/sys/fs/cgroup")
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
        && Path::new("/sys/fs/cgroup/unified").is_dir();
    hybrid.then(|| "runc".to_string())
}

/// The rlimits this host needs: podman's defaults raise them, which takes
/// CAP_SYS_RESOURCE; where root lacks it (some container sandboxes) they fail with EPERM,
/// so explicit lower limits are given instead. With the capability: none (podman's).
pub fn detect_ulimits() -> Vec<String> {
    const CAP_SYS_RESOURCE: u32 = 24;
    let has_cap = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << CAP_SYS_RESOURCE) != 0);
    if has_cap {
        return vec![];
    }
    let hard = |r| {
        nix::sys::resource::getrlimit(r)
            .map(|(_, h)| h)
            .unwrap_or(u64::MAX)
    };
    let nofile = hard(nix::sys::resource::Resource::RLIMIT_NOFILE).min(1024);
    let nproc = hard(nix::sys::resource::Resource::RLIMIT_NPROC).min(4096);
    vec![
        format!("nofile={nofile}:{nofile}"),
        format!("nproc={nproc}:{nproc}"),
    ]
}

/// The node's runtime: containers for image tasks, processes for the others.
pub struct NodeRuntime {
    process: Arc<ProcessRuntime>,
    podman: PodmanSettings,
}

/// The last non-empty line of podman's stderr (its error), or its exit status.
fn podman_error(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(|l| l.trim().trim_start_matches("Error: ").to_string())
        .unwrap_or_else(|| out.status.to_string())
}

impl NodeRuntime {
    pub fn new(process: Arc<ProcessRuntime>, podman: PodmanSettings) -> Arc<NodeRuntime> {
        Arc::new(NodeRuntime { process, podman })
    }

    fn container_of(&self, task_id: &str) -> Option<String> {
        std::fs::read_to_string(self.process.task_dir(task_id).join(CONTAINER_FILE))
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    }

    /// Runs podman with `args`, at most `timeout`; its stdout, or an error naming `what`
    /// with podman's own message.
    async fn podman(
        &self,
        what: &str,
        args: &[String],
        timeout: Duration,
    ) -> anyhow::Result<String> {
        let mut cmd = tokio::process::Command::new(&self.podman.engine);
        if let Some(r) = &self.podman.oci_runtime {
            cmd.arg("--runtime").arg(r);
        }
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let child = cmd.spawn().map_err(|e| {
            anyhow::Error::new(e).context(format!(
                "{what}: cannot run {} (install podman, or set [runtime] podman in the agent's configuration)",
                self.podman.engine.display()
            ))
        })?;
        let out = tokio::time::timeout(timeout, child.wait_with_output())
            .await
            .map_err(|_| anyhow!("{what}: podman did not finish within {timeout:?}"))?
            .with_context(|| format!("{what}: waiting for podman"))?;
        if !out.status.success() {
            bail!("{what}: {}", podman_error(&out));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// The image is on this node, pulled if it was not (a registry that cannot be reached
    /// fails the task with podman's reason, within the pull timeout).
    async fn ensure_image(&self, image: &str) -> anyhow::Result<()> {
        let exists = self
            .podman(
                "podman image exists",
                &["image".into(), "exists".into(), image.into()],
                Duration::from_secs(30),
            )
            .await
            .is_ok();
        if exists {
            return Ok(());
        }
        info!(image, "pulling image");
        self.podman(
            &format!("image {image} is not on this node, and pulling it failed"),
            &["pull".into(), "--quiet".into(), image.into()],
            self.podman.pull_timeout,
        )
        .await
        .map(|_| ())
    }

    /// `podman run -d` of an image task in its namespace.
    async fn start_container(&self, spec: &TaskSpec, image: &str) -> anyhow::Result<u32> {
        let name = task_container(self.process.prefix(), &spec.id);
        let dir = self.process.task_dir(&spec.id);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::write(dir.join(CONTAINER_FILE), &name)?;
        self.ensure_image(image)
            .await
            .with_context(|| format!("task {}", spec.name))?;
        let netns = shoal_netns::path(&self.process.netns(&spec.id));
        let mut args: Vec<String> = vec![
            "run".into(),
            "-d".into(),
            "--name".into(),
            name.clone(),
            "--pull".into(),
            "never".into(),
            "--network".into(),
            format!("ns:{}", netns.display()),
            "--dns".into(),
            "127.0.0.11".into(),
            "--hostname".into(),
            spec.hostname.clone(),
            "--label".into(),
            format!("{LABEL_TASK}={}", spec.id),
            "--label".into(),
            format!("{LABEL_SERVICE}={}", spec.service),
            "--label".into(),
            format!("{LABEL_PREFIX}={}", self.process.prefix()),
        ];
        if spec.search.is_empty() {
            // "." is "no search list" (otherwise podman copies the host's).
            args.extend(["--dns-search".into(), ".".into()]);
        }
        for s in &spec.search {
            args.extend(["--dns-search".into(), s.clone()]);
        }
        for (k, v) in [
            ("SHOAL_TASK_ID", &spec.id),
            ("SHOAL_TASK_NAME", &spec.name),
            ("SHOAL_SERVICE_NAME", &spec.service),
        ] {
            args.extend(["--env".into(), format!("{k}={v}")]);
        }
        for e in &spec.env {
            args.extend(["--env".into(), e.clone()]);
        }
        for u in &self.podman.ulimits {
            args.extend(["--ulimit".into(), u.clone()]);
        }
        args.push(image.to_string());
        args.extend(spec.command.iter().cloned());
        let what = format!("starting container {name} of task {}", spec.name);
        if let Err(e) = self.podman(&what, &args, Duration::from_secs(60)).await {
            // Nothing half-made stays behind: a container podman created but could not
            // start is removed.
            self.remove_container(&name).await;
            return Err(e);
        }
        let pid: u32 = self
            .podman(
                &format!("inspecting container {name}"),
                &[
                    "inspect".into(),
                    "--format".into(),
                    "{{.State.Pid}}".into(),
                    name.clone(),
                ],
                Duration::from_secs(30),
            )
            .await?
            .parse()
            .with_context(|| format!("container {name}: pid"))?;
        if pid != 0 {
            self.process.record_pid(&spec.id, pid)?;
        }
        self.watch_exit(&spec.id, &name);
        Ok(pid)
    }

    /// Reports the container's exit (`podman wait`) as the task's.
    fn watch_exit(&self, task_id: &str, name: &str) {
        let mut cmd = tokio::process::Command::new(&self.podman.engine);
        cmd.args(["wait", name])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // It ends with the agent (a new agent waits anew when it adopts the container).
        // SAFETY: prctl(2) is async-signal-safe and touches no memory of ours.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let exits = self.process.exits().clone();
        let (task_id, name) = (task_id.to_string(), name.to_string());
        tokio::spawn(async move {
            let status = match cmd.output().await {
                Ok(o) if o.status.success() => {
                    format!("exit code {}", String::from_utf8_lossy(&o.stdout).trim())
                }
                Ok(o) => format!("container {name} is gone: {}", podman_error(&o)),
                Err(e) => format!("waiting for container {name}: {e}"),
            };
            let _ = exits.send(Exited { task_id, status });
        });
    }

    async fn remove_container(&self, name: &str) {
        let args = ["rm".into(), "-f".into(), "--ignore".into(), name.into()];
        if let Err(e) = self
            .podman("removing container", &args, Duration::from_secs(60))
            .await
        {
            warn!(container = name, error = %format!("{e:#}"), "removing container failed");
        }
    }
}

#[async_trait]
impl Runtime for NodeRuntime {
    fn netns(&self, task_id: &str) -> String {
        self.process.netns(task_id)
    }

    async fn prepare(&self, task_id: &str) -> anyhow::Result<String> {
        self.process.prepare(task_id).await
    }

    async fn start(&self, spec: &TaskSpec) -> anyhow::Result<u32> {
        match &spec.image {
            Some(image) => self.start_container(spec, image).await,
            None => self.process.start(spec).await,
        }
    }

    fn is_running(&self, task_id: &str) -> bool {
        self.process.is_running(task_id)
    }

    /// A container gets `podman stop -t` (SIGTERM, SIGKILL after `timeout`) and is removed;
    /// then the namespace and files go as for a process task.
    async fn destroy(&self, task_id: &str, timeout: Duration) -> anyhow::Result<()> {
        if let Some(name) = self.container_of(task_id) {
            let secs = timeout.as_secs().max(1);
            let args = [
                "stop".into(),
                "--ignore".into(),
                "-t".into(),
                secs.to_string(),
                name.clone(),
            ];
            if let Err(e) = self
                .podman(
                    "stopping container",
                    &args,
                    timeout + Duration::from_secs(30),
                )
                .await
            {
                warn!(container = %name, error = %format!("{e:#}"), "stopping container failed");
            }
            let args = ["rm".into(), "-f".into(), "--ignore".into(), name.clone()];
            self.podman("removing container", &args, Duration::from_secs(60))
                .await?;
        }
        self.process.destroy(task_id, timeout).await
    }

    fn list(&self) -> Vec<String> {
        self.process.list()
    }

    fn adopt(self: Arc<Self>, task_id: &str) {
        match self.container_of(task_id) {
            Some(name) => self.watch_exit(task_id, &name),
            None => self.process.clone().adopt(task_id),
        }
    }

    /// A container's log through `podman logs`; a process task's as the process runtime has it.
    fn logs(
        &self,
        task_id: &str,
        tail: Option<u32>,
        follow: bool,
    ) -> Option<std::process::Command> {
        let Some(name) = self.container_of(task_id) else {
            return self.process.logs(task_id, tail, follow);
        };
        let mut cmd = std::process::Command::new(&self.podman.engine);
        cmd.arg("logs");
        if let Some(n) = tail {
            cmd.args(["--tail", &n.to_string()]);
        }
        if follow {
            cmd.arg("-f");
        }
        cmd.arg(name);
        Some(cmd)
    }

    fn entry(&self, task_id: &str, hostname: &str) -> SandboxEntry {
        match self.container_of(task_id) {
            Some(container) => SandboxEntry::Container {
                engine: self.podman.engine.clone(),
                container,
            },
            None => self.process.entry(task_id, hostname),
        }
    }
}
