//! The orchestrator (leader only): services -> tasks. It runs in its own task beside the
//! node reconciler and acts on the same state snapshots.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::warn;

use crate::cluster::Cluster;
use crate::liveness::Liveness;
use crate::state::ClusterState;
use shoal_api::model::{Node, PublishMode, Task, TaskState};

pub struct Orchestrator {
    pub cluster: Cluster,
    pub liveness: Arc<Liveness>,
    /// How long a slot whose task exited or failed waits for its next task.
    pub restart_delay: Duration,
    /// (service id, slot) -> the failed task last seen there and when it was first seen.
    failures: Mutex<HashMap<(String, u32), (String, Instant)>>,
}

impl Orchestrator {
    pub fn new(cluster: Cluster, liveness: Arc<Liveness>, restart_delay: Duration) -> Self {
        Orchestrator {
            cluster,
            liveness,
            restart_delay,
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// Remembers slots whose task failed (an exit, a failed start) when the failure is
    /// first seen, and forgets those whose delay is over; true for a slot still waiting.
    /// Kept in the leader's memory: the failed task's record is gone once its node removed
    /// it, which is usually before the delay ends (a new leader starts without delays).
    fn note_failures(&self, st: &ClusterState) -> impl Fn(&str, u32) -> bool + '_ {
        let mut f = self.failures.lock().expect("lock");
        let now = Instant::now();
        for t in st.task_list() {
            if t.state == TaskState::Failed && st.alive.contains(&t.node_id) {
                let e = f
                    .entry((t.service_id.clone(), t.slot))
                    .or_insert_with(|| (t.id.clone(), now));
                if e.0 != t.id {
                    *e = (t.id.clone(), now);
                }
            }
        }
        let delay = self.restart_delay;
        f.retain(|_, (_, at)| now.duration_since(*at) < delay);
        drop(f);
        move |svc: &str, slot: u32| {
            self.failures
                .lock()
                .expect("lock")
                .contains_key(&(svc.to_string(), slot))
        }
    }

    /// Runs a pass on every new snapshot while this node is the leader, and every second
    /// (leadership can arrive without a store change).
    pub async fn run(self, mut state_rx: watch::Receiver<Arc<ClusterState>>) {
        loop {
            tokio::select! {
                r = state_rx.changed() => if r.is_err() { return },
                _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
            }
            let st = state_rx.borrow_and_update().clone();
            if !st.synced || !self.liveness.is_leader() {
                continue;
            }
            let st = self.liveness.adjust(&st);
            for e in self.orchestrate(&st).await {
                warn!(error = %format!("{e:#}"), "orchestrator step failed; will retry");
            }
        }
    }

    /// Services -> tasks (leader only): shut down extra and orphaned tasks and tasks of lost
    /// nodes, create missing slots on the ready node with the fewest tasks of that service
    /// (never two host-mode tasks publishing the same port on one node).
    /// One failing step (a service that cannot be placed, a record that cannot be deleted)
    /// does not stop the others: the errors are returned together.
    pub(crate) async fn orchestrate(&self, st: &ClusterState) -> Vec<anyhow::Error> {
        let mut errors = vec![];
        let trusted = self.liveness.trusted();
        // Desired-state changes of this pass, written in one transaction (one watch event
        // batch, one reconcile pass on every node).
        let mut stop: Vec<(Task, i64)> = vec![];
        for (t, rev) in st.tasks.values() {
            let node_lost = !st.alive.contains(&t.node_id);
            if node_lost && trusted {
                if t.desired_state == TaskState::Running {
                    let mut t = t.clone();
                    t.desired_state = TaskState::Shutdown;
                    t.error = Some("node down".into());
                    stop.push((t, *rev));
                } else {
                    // Its node cannot remove it; a node that comes back removes what is
                    // left of it (its namespaces) as garbage.
                    if let Err(e) = self.cluster.delete_task(t).await {
                        errors.push(
                            anyhow::Error::new(e)
                                .context(format!("deleting task {} of a lost node", t.name())),
                        );
                    }
                }
                continue;
            }
            if t.desired_state != TaskState::Running {
                continue;
            }
            let keep = st
                .service_by_id(&t.service_id)
                .is_some_and(|s| t.slot <= s.replicas);
            if !keep {
                let mut t = t.clone();
                t.desired_state = TaskState::Shutdown;
                stop.push((t, *rev));
            }
        }
        if !stop.is_empty()
            && let Err(e) = self.cluster.cas_tasks(&stop).await
        {
            errors.push(anyhow::Error::new(e).context("shutting tasks down"));
        }
        let ready: Vec<&Node> = st
            .nodes
            .values()
            .map(|(n, _)| n)
            .filter(|n| st.alive.contains(&n.id))
            .collect();
        if ready.is_empty() {
            return errors;
        }
        let networks: Vec<&shoal_api::model::Network> = st.networks.values().collect();
        let waiting = self.note_failures(st);
        for (svc, svc_rev) in st.services.values() {
            if let Some(sa) = &svc.standalone {
                // A standalone container runs once: its exit is recorded, never replaced.
                if sa.exited.is_some() {
                    continue;
                }
                let failed = st
                    .task_list()
                    .find(|t| t.service_id == svc.id && t.state == TaskState::Failed);
                if let Some(t) = failed {
                    let why = t.error.clone().unwrap_or_else(|| "exited".into());
                    if let Err(e) = self.cluster.container_exited(svc, *svc_rev, why).await {
                        errors.push(
                            anyhow::Error::new(e)
                                .context(format!("recording the exit of container {}", svc.name)),
                        );
                    }
                    continue;
                }
            }
            let pinned = svc.standalone.as_ref().map(|s| s.node_id.as_str());
            let live: Vec<&Task> = st
                .task_list()
                .filter(|t| t.service_id == svc.id && t.desired_state == TaskState::Running)
                .collect();
            let host_ports: Vec<_> = svc
                .ports
                .iter()
                .filter(|p| p.mode == PublishMode::Host)
                .map(|p| (p.protocol, p.published))
                .collect();
            // Tasks placed in this pass (not in the view yet).
            let mut placed: HashMap<String, usize> = HashMap::new();
            let mut placements = vec![];
            for slot in 1..=svc.replicas {
                if live.iter().any(|t| t.slot == slot)
                    || (pinned.is_none() && waiting(&svc.id, slot))
                {
                    continue;
                }
                let candidates: Vec<&&Node> = ready
                    .iter()
                    .filter(|n| pinned.is_none_or(|p| p == n.id))
                    .filter(|n| host_ports.is_empty() || !host_port_taken(st, &n.id, &host_ports))
                    .collect();
                let Some(node) = candidates
                    .into_iter()
                    .filter(|n| host_ports.is_empty() || !placed.contains_key(&n.id))
                    .min_by_key(|n| {
                        (
                            live.iter().filter(|t| t.node_id == n.id).count()
                                + placed.get(&n.id).copied().unwrap_or(0),
                            n.name.clone(),
                        )
                    })
                else {
                    // No node can take it (host-mode port everywhere taken): stays pending.
                    continue;
                };
                *placed.entry(node.id.clone()).or_default() += 1;
                placements.push((slot, node.id.clone()));
            }
            // One transaction for all of them. Nothing written: the service changed or a
            // slot is taken (this view is behind the store); the watch brings the newer
            // picture and another pass.
            if !placements.is_empty()
                && let Err(e) = self
                    .cluster
                    .create_tasks(svc, *svc_rev, &placements, &networks)
                    .await
            {
                errors.push(
                    anyhow::Error::new(e).context(format!("placing tasks of service {}", svc.name)),
                );
            }
        }
        errors
    }
}

/// True when a live task on `node` already publishes one of `ports` in host mode.
fn host_port_taken(
    st: &ClusterState,
    node: &str,
    ports: &[(shoal_api::model::Protocol, u16)],
) -> bool {
    st.task_list()
        .filter(|t| t.node_id == node && t.desired_state == TaskState::Running)
        .filter_map(|t| st.service_by_id(&t.service_id))
        .flat_map(|s| s.ports.iter())
        .any(|p| p.mode == PublishMode::Host && ports.contains(&(p.protocol, p.published)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::encode;
    use crate::keys::ROOT;
    use crate::store::embedded::EmbeddedStore;
    use shoal_api::model::NodeStatus;
    use shoal_api::wire::{NetworkAttach, NetworkCreate, ServiceCreate};

    async fn state(c: &Cluster) -> ClusterState {
        let snap = c.store.list(ROOT).await.unwrap();
        let mut st = ClusterState::default();
        for kv in &snap.kvs {
            st.apply_put(kv);
        }
        st.revision = snap.revision;
        st.synced = true;
        st
    }

    /// A ready node `id` whose liveness key is there.
    async fn ready_node(store: &Arc<dyn crate::store::Store>, id: &str) {
        let node = Node {
            id: id.into(),
            name: format!("node-{id}"),
            addr: None,
            status: NodeStatus::Ready,
            version: "test".into(),
            listening: vec![],
            peer_port: None,
            wireguard: None,
        };
        store
            .put(&crate::keys::node(id), encode(&node))
            .await
            .unwrap();
        store.put(&crate::keys::alive(id), vec![]).await.unwrap();
    }

    fn svc(name: &str, net: &str, replicas: u32) -> ServiceCreate {
        ServiceCreate {
            name: name.into(),
            networks: vec![NetworkAttach {
                network: net.into(),
                aliases: vec![],
            }],
            replicas,
            command: vec!["sleep".into(), "1000".into()],
            ..Default::default()
        }
    }

    /// Bug 5: a service that cannot be placed (its network has no free address) does not
    /// stop the placement of the services after it.
    #[tokio::test]
    async fn a_service_that_cannot_be_placed_does_not_block_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn crate::store::Store> =
            Arc::new(EmbeddedStore::open(dir.path()).unwrap());
        let c = Cluster::new(store.clone());
        for (name, subnet) in [("small", "10.77.0.0/29"), ("big", "10.78.0.0/24")] {
            c.create_network(NetworkCreate {
                name: name.into(),
                subnet: Some(subnet.into()),
                ..Default::default()
            })
            .await
            .unwrap();
        }
        // "a-..." sorts first: the old loop stopped there.
        c.create_service(svc("a-full", "small", 20)).await.unwrap();
        c.create_service(svc("b-fine", "big", 2)).await.unwrap();
        ready_node(&store, "n1").await;
        let o = Orchestrator::new(
            c.clone(),
            Liveness::spawn(store.clone(), "n1".into(), Duration::from_secs(3)),
            Duration::ZERO,
        );
        let errors = o.orchestrate(&state(&c).await).await;
        assert_eq!(errors.len(), 1, "{errors:?}");
        let msg = format!("{:#}", errors[0]);
        assert!(
            msg.contains("a-full") && msg.contains("no free address"),
            "{msg}"
        );
        let fine = c.service_tasks("b-fine").await.unwrap();
        assert_eq!(fine.len(), 2, "b-fine placed despite a-full");
    }

    /// A slot whose task failed gets its next task only after the restart delay (no hot
    /// crash loop); without a delay at once.
    #[tokio::test]
    async fn a_failed_slot_waits_for_the_restart_delay() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn crate::store::Store> =
            Arc::new(EmbeddedStore::open(dir.path()).unwrap());
        let c = Cluster::new(store.clone());
        c.create_network(NetworkCreate {
            name: "net".into(),
            subnet: Some("10.79.0.0/24".into()),
            ..Default::default()
        })
        .await
        .unwrap();
        c.create_service(svc("crashy", "net", 1)).await.unwrap();
        ready_node(&store, "n1").await;
        let liveness = Liveness::spawn(store.clone(), "n1".into(), Duration::from_secs(3));
        let slow = Orchestrator::new(c.clone(), liveness.clone(), Duration::from_secs(3600));
        assert!(slow.orchestrate(&state(&c).await).await.is_empty());
        let first = c.tasks().await.unwrap();
        assert_eq!(first.len(), 1);
        c.update_task(&first[0].id, |t| {
            crate::reports::Report::Exited("exit code 1".into()).apply(t)
        })
        .await
        .unwrap();
        for _ in 0..3 {
            assert!(slow.orchestrate(&state(&c).await).await.is_empty());
        }
        assert_eq!(
            c.tasks().await.unwrap().len(),
            1,
            "replaced within the delay"
        );
        let quick = Orchestrator::new(c.clone(), liveness, Duration::ZERO);
        assert!(quick.orchestrate(&state(&c).await).await.is_empty());
        let now = c.tasks().await.unwrap();
        assert_eq!(
            now.len(),
            2,
            "a new task for the slot once the delay is over"
        );
    }
}
