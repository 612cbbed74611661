//! Task health checks: `/bin/sh -c CMD` in the task's sandbox every interval. The first
//! success makes a task healthy (it then joins DNS answers and VIP backends); `retries`
//! consecutive failures make it unhealthy (it leaves them). Changes are written to the task's
//! record with compare-and-swap, so every node reacts to them.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::runtime::Runtime;
use shoal_api::model::{Health, HealthCheck};
use shoal_control::cluster::Cluster;

pub struct Probe {
    pub task_id: String,
    pub task_name: String,
    pub hostname: String,
    /// Runs the check inside the task's sandbox.
    pub runtime: Arc<dyn Runtime>,
}

/// Runs one check; true when the command exits 0 within the interval (at least 1 s).
async fn check_once(p: &Probe, check: &HealthCheck) -> bool {
    let argv = ["/bin/sh".to_string(), "-c".to_string(), check.cmd.clone()];
    let limit = Duration::from_millis(check.interval_ms).max(Duration::from_secs(1));
    match p
        .runtime
        .exec_in(&p.task_id, &p.hostname, &argv, limit)
        .await
    {
        Ok(ok) => ok,
        Err(e) => {
            tracing::debug!(task = %p.task_name, error = %format!("{e:#}"), "health check could not run");
            false
        }
    }
}

/// Writes `status` unless the store already has it (`written`); a failed write leaves
/// `written` as it was, so the next round tries again (the checker never moves on from a
/// result the store did not take).
pub(crate) async fn publish(
    cluster: &Cluster,
    task_id: &str,
    status: Health,
    written: &mut Option<Health>,
) {
    if *written == Some(status) {
        return;
    }
    match cluster
        .update_task(task_id, |t| shoal_control::reports::with_health(t, status))
        .await
    {
        Ok(_) => *written = Some(status),
        Err(e) => warn!(task = task_id, error = %e, "health not written yet; will retry"),
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
        let mut written = current;
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
            }
            publish(&cluster, &probe.task_id, status, &mut written).await;
            tokio::time::sleep(Duration::from_millis(check.interval_ms)).await;
        }
    })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use shoal_api::model::TaskState;
    use shoal_control::cluster::{decode, encode};
    use shoal_control::testing::{flaky, task};

    /// Bug 3: a health result the store refused (down, or more lost races than the old ten
    /// tries) is written on a later round, though the checker's status did not change.
    #[tokio::test]
    async fn a_refused_health_write_is_retried_on_the_next_round() {
        let dir = tempfile::tempdir().unwrap();
        let (store, c) = flaky(dir.path());
        c.store
            .put(
                &shoal_control::keys::task("a"),
                encode(&task("a", TaskState::Running)),
            )
            .await
            .unwrap();
        let mut written = None;
        store.fail.store(1000, Ordering::SeqCst);
        publish(&c, "a", Health::Healthy, &mut written).await;
        assert_eq!(written, None);
        store.fail.store(0, Ordering::SeqCst);
        publish(&c, "a", Health::Healthy, &mut written).await;
        assert_eq!(written, Some(Health::Healthy));
        let kv = c
            .store
            .get(&shoal_control::keys::task("a"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            decode::<shoal_api::model::Task>(&kv).unwrap().health,
            Some(Health::Healthy)
        );
    }
}
