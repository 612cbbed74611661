//! What a node reports about its tasks to the store: started, failed to start, exited,
//! health changed. Each report is a pure change of the task record (applied with
//! [`Cluster::update_task`], so a lost race reads the record again instead of dropping the
//! report), and a report that could not be written at all (store down) stays pending and is
//! written by a later pass: a node never forgets that it started or lost a process.

use std::collections::BTreeMap;

use crate::cluster::Cluster;
use shoal_api::model::{Health, Task, TaskState};

/// One report about a task of this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// Its process was started (or adopted while the record did not say running yet).
    Running,
    /// Its process could not be started.
    StartFailed(String),
    /// Its process exited.
    Exited(String),
}

impl Report {
    /// The record with this report applied, or None when the record is already past it
    /// (the task is being shut down, or says so already).
    pub fn apply(&self, t: &Task) -> Option<Task> {
        if t.desired_state != TaskState::Running {
            return None;
        }
        let mut n = t.clone();
        match self {
            Report::Running => {
                if t.state != TaskState::New && t.state != TaskState::Starting {
                    return None;
                }
                n.state = TaskState::Running;
            }
            Report::StartFailed(e) => {
                n.state = TaskState::Failed;
                n.desired_state = TaskState::Shutdown;
                n.error = Some(e.clone());
            }
            Report::Exited(status) => {
                n.state = TaskState::Failed;
                n.desired_state = TaskState::Shutdown;
                n.error = Some(format!("process exited: {status}"));
            }
        }
        Some(n)
    }
}

/// The record with health `h`, or None when it says so already.
pub fn with_health(t: &Task, h: Health) -> Option<Task> {
    (t.health != Some(h)).then(|| Task {
        health: Some(h),
        ..t.clone()
    })
}

/// What an agent that has just started does with a local task whose process may still run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Adoption {
    /// No process: nothing to adopt.
    None,
    /// Take the process over (its exit is watched); the record is right.
    Adopt,
    /// Take it over and report it running: the earlier run started it but its "running"
    /// write was lost (without this the task would be started a second time).
    AdoptAndReport,
}

pub fn adoption(t: &Task, process_running: bool) -> Adoption {
    if !process_running {
        return Adoption::None;
    }
    match Report::Running.apply(t) {
        Some(_) => Adoption::AdoptAndReport,
        None => Adoption::Adopt,
    }
}

/// A task report the store did not take (kept for the next flush).
#[derive(Debug, thiserror::Error)]
#[error("reporting task {task_id} as {report:?}")]
pub struct ReportError {
    pub task_id: String,
    pub report: Report,
    #[source]
    pub source: crate::cluster::ClusterError,
}

/// Reports not written yet, by task id (a newer report of a task replaces an older one).
#[derive(Debug, Default)]
pub struct Pending {
    reports: BTreeMap<String, Report>,
}

impl Pending {
    pub fn add(&mut self, task_id: &str, r: Report) {
        self.reports.insert(task_id.to_string(), r);
    }

    pub fn len(&self) -> usize {
        self.reports.len()
    }

    pub fn is_empty(&self) -> bool {
        self.reports.is_empty()
    }

    /// Writes every pending report; those that fail stay for the next call. Returns the
    /// errors, one per report not written.
    pub async fn flush(&mut self, cluster: &Cluster) -> Vec<ReportError> {
        let mut errors = vec![];
        let ids: Vec<String> = self.reports.keys().cloned().collect();
        for id in ids {
            let r = self.reports[&id].clone();
            match cluster.update_task(&id, |t| r.apply(t)).await {
                Ok(_) => {
                    self.reports.remove(&id);
                }
                Err(source) => errors.push(ReportError {
                    task_id: id,
                    report: r,
                    source,
                }),
            }
        }
        errors
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::cluster::encode;
    use crate::testing::{flaky, task};

    async fn read(c: &Cluster, id: &str) -> Task {
        let kv = c.store.get(&crate::keys::task(id)).await.unwrap().unwrap();
        crate::cluster::decode(&kv).unwrap()
    }

    #[test]
    fn reports_apply_only_where_they_mean_something() {
        let t = task("a", TaskState::Starting);
        assert_eq!(Report::Running.apply(&t).unwrap().state, TaskState::Running);
        assert_eq!(Report::Running.apply(&task("a", TaskState::Running)), None);
        assert_eq!(Report::Running.apply(&task("a", TaskState::Failed)), None);
        let e = Report::Exited("exit status: 3".into()).apply(&t).unwrap();
        assert_eq!(
            (e.state, e.desired_state),
            (TaskState::Failed, TaskState::Shutdown)
        );
        assert_eq!(e.error.as_deref(), Some("process exited: exit status: 3"));
        let mut down = t.clone();
        down.desired_state = TaskState::Shutdown;
        assert_eq!(
            Report::Exited("x".into()).apply(&down),
            None,
            "a stop is no failure"
        );
        assert_eq!(
            with_health(&t, Health::Healthy).unwrap().health,
            Some(Health::Healthy)
        );
        let mut h = t.clone();
        h.health = Some(Health::Healthy);
        assert_eq!(with_health(&h, Health::Healthy), None);
    }

    /// Bug 1: a task whose "running" write was lost is adopted and reported after a
    /// restart, not started a second time (adoption used to require the record to say
    /// running).
    #[test]
    fn a_started_task_whose_running_write_was_lost_is_adopted() {
        let t = task("a", TaskState::Starting);
        assert_eq!(adoption(&t, true), Adoption::AdoptAndReport);
        assert_eq!(
            adoption(&task("a", TaskState::Running), true),
            Adoption::Adopt
        );
        assert_eq!(adoption(&t, false), Adoption::None);
    }

    /// Bugs 1 and 2: a report races another writer of the record (a health write) and the
    /// store being down; it is written in the end, with the other write kept.
    #[tokio::test]
    async fn reports_survive_lost_races_and_store_outages() {
        let dir = tempfile::tempdir().unwrap();
        let (store, c) = flaky(dir.path());
        for id in ["a", "b"] {
            c.store
                .put(
                    &crate::keys::task(id),
                    encode(&task(id, TaskState::Starting)),
                )
                .await
                .unwrap();
        }
        // The record changes after the node read it (the old code wrote with that stale
        // revision, lost, and never tried again).
        c.update_task("a", |t| with_health(t, Health::Healthy))
            .await
            .unwrap()
            .unwrap();
        let mut p = Pending::default();
        p.add("a", Report::Running);
        p.add("b", Report::Exited("signal: 9 (SIGKILL)".into()));
        store.fail.store(5, Ordering::SeqCst);
        let errors = p.flush(&c).await;
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert_eq!(p.len(), 2, "kept for the next pass");
        assert_eq!(read(&c, "a").await.state, TaskState::Starting);
        // Next pass: the store is back for good.
        let mut errors = p.flush(&c).await;
        while !errors.is_empty() {
            errors = p.flush(&c).await;
        }
        assert!(p.is_empty());
        let a = read(&c, "a").await;
        assert_eq!(
            (a.state, a.health),
            (TaskState::Running, Some(Health::Healthy))
        );
        let b = read(&c, "b").await;
        assert_eq!(
            (b.state, b.desired_state),
            (TaskState::Failed, TaskState::Shutdown)
        );
    }
}
