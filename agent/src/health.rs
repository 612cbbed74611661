//! Task health checks: `/bin/sh -c CMD` in the task's sandbox every interval. The first
//! success makes a task healthy (it then joins DNS answers and VIP backends); `retries`
//! consecutive failures make it unhealthy (it leaves them). Changes are written to the task's
//! record with compare-and-swap, so every node reacts to them.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::cluster::{Cluster, TASKS, decode};
use crate::model::{Health, HealthCheck, Task};
use crate::runtime::Sandbox;

pub struct Probe {
    pub task_id: String,
    pub task_name: String,
    pub netns: String,
    pub resolv_conf: PathBuf,
    pub hostname: String,
}

/// Runs one check; true when the command exits 0 within the interval (at least 1 s).
async fn check_once(p: &Probe, check: &HealthCheck) -> bool {
    let mut cmd = std::process::Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(&check.cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    match Sandbox::new(&p.netns, &p.resolv_conf, &p.hostname) {
        Ok(sb) => sb.apply(&mut cmd),
        Err(_) => return false,
    }
    let Ok(mut child) = tokio::process::Command::from(cmd)
        .kill_on_drop(true)
        .spawn()
    else {
        return false;
    };
    let limit = Duration::from_millis(check.interval_ms).max(Duration::from_secs(1));
    matches!(tokio::time::timeout(limit, child.wait()).await, Ok(Ok(s)) if s.success())
}

async fn write_health(cluster: &Cluster, task_id: &str, h: Health) {
    for _ in 0..10 {
        let Ok(Some(kv)) = cluster.store.get(&format!("{TASKS}{task_id}")).await else {
            return;
        };
        let Ok(mut t) = decode::<Task>(&kv) else {
            return;
        };
        if t.health == Some(h) {
            return;
        }
        t.health = Some(h);
        if let Ok(true) = cluster.cas_task(&t, kv.mod_revision).await {
            return;
        }
    }
}

/// Starts the checker of one task; abort the handle to stop it.
pub fn spawn(
    cluster: Cluster,
    probe: Probe,
    check: HealthCheck,
    current: Option<Health>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut status = current.unwrap_or(Health::Starting);
        let mut failures = 0u32;
        loop {
            let ok = check_once(&probe, &check).await;
            failures = if ok { 0 } else { failures + 1 };
            let next = if ok {
                Health::Healthy
            } else if failures >= check.retries {
                Health::Unhealthy
            } else {
                status
            };
            if next != status {
                match next {
                    Health::Unhealthy => {
                        warn!(task = %probe.task_name, failures, "task is unhealthy")
                    }
                    _ => info!(task = %probe.task_name, health = ?next, "task health changed"),
                }
                status = next;
                write_health(&cluster, &probe.task_id, status).await;
            }
            tokio::time::sleep(Duration::from_millis(check.interval_ms)).await;
        }
    })
}
