//! The agent's view of the cluster: a full read of the store at start, then a prefix watch
//! applied event by event. Any watch failure leads to a fresh full read (level-triggered).
//! Consumers get immutable snapshots through a `tokio::sync::watch` channel.

use std::collections::BTreeSet;

use imbl::OrdMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::cluster::decode;
use crate::keys::{ROOT, Record};
use crate::store::{Event, KeyValue, Store};
use shoal_api::model::{Network, Node, Service, Task};

/// One consistent picture of the cluster. Values keep their store revision for CAS writes.
#[derive(Debug, Clone, Default)]
pub struct ClusterState {
    // Persistent maps: cloning a snapshot shares every entry (the cache publishes one per
    // watch batch).
    pub networks: OrdMap<String, Network>,
    pub services: OrdMap<String, (Service, i64)>,
    pub tasks: OrdMap<String, (Task, i64)>,
    pub nodes: OrdMap<String, (Node, i64)>,
    /// Nodes whose liveness key exists (their agent holds its lease).
    pub alive: BTreeSet<String>,
    pub revision: i64,
    /// False until the first full read succeeded.
    pub synced: bool,
}

impl ClusterState {
    pub fn apply_put(&mut self, kv: &KeyValue) {
        let rev = kv.mod_revision;
        let res = match Record::parse(&kv.key) {
            Some(Record::Network(name)) => decode(kv).map(|n| {
                self.networks.insert(name.to_string(), n);
            }),
            Some(Record::Service(name)) => decode(kv).map(|s| {
                self.services.insert(name.to_string(), (s, rev));
            }),
            Some(Record::Task(id)) => decode(kv).map(|t| {
                self.tasks.insert(id.to_string(), (t, rev));
            }),
            Some(Record::Node(id)) => decode(kv).map(|n| {
                self.nodes.insert(id.to_string(), (n, rev));
            }),
            Some(Record::Alive(id)) => {
                self.alive.insert(id.to_string());
                Ok(())
            }
            None => Ok(()),
        };
        if let Err(e) = res {
            warn!(key = %kv.key, error = %e, "ignoring undecodable record");
        }
        self.revision = self.revision.max(rev);
    }

    pub fn apply_delete(&mut self, key: &str, rev: i64) {
        match Record::parse(key) {
            Some(Record::Network(name)) => {
                self.networks.remove(name);
            }
            Some(Record::Service(name)) => {
                self.services.remove(name);
            }
            Some(Record::Task(id)) => {
                self.tasks.remove(id);
            }
            Some(Record::Node(id)) => {
                self.nodes.remove(id);
            }
            Some(Record::Alive(id)) => {
                self.alive.remove(id);
            }
            None => {}
        }
        self.revision = self.revision.max(rev);
    }

    pub fn service_by_id(&self, id: &str) -> Option<&Service> {
        self.services.values().map(|(s, _)| s).find(|s| s.id == id)
    }

    pub fn network_by_id(&self, id: &str) -> Option<&Network> {
        self.networks.values().find(|n| n.id == id)
    }

    /// A task serves (DNS answers, VIP backends) when it is serving by its own record and
    /// its node is alive.
    pub fn serving(&self, t: &Task) -> bool {
        t.is_serving() && self.alive.contains(&t.node_id)
    }

    pub fn task_list(&self) -> impl Iterator<Item = &Task> {
        self.tasks.values().map(|(t, _)| t)
    }
}

/// A quiet watch is replaced by a full read after this long.
const RELIST: Duration = Duration::from_secs(10);

/// Keeps a [`ClusterState`] in step with the store; returns the receiving end.
pub fn spawn_cache(store: Arc<dyn Store>) -> watch::Receiver<Arc<ClusterState>> {
    let (tx, rx) = watch::channel(Arc::new(ClusterState::default()));
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(100);
        loop {
            match follow(&store, &tx).await {
                Ok(Ended::ReceiversGone) => return,
                Ok(Ended::Quiet) => {
                    debug!("periodic full read of the store");
                    backoff = Duration::from_millis(100);
                }
                Err(e) => {
                    warn!(error = %e, "store watch failed; resyncing");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    });
    rx
}

/// Why [`follow`] returned without an error.
enum Ended {
    /// Nobody listens any more.
    ReceiversGone,
    /// The watch was quiet for [`RELIST`]: time for a fresh full read.
    Quiet,
}

async fn follow(
    store: &Arc<dyn Store>,
    tx: &watch::Sender<Arc<ClusterState>>,
) -> anyhow::Result<Ended> {
    let snap = store.list(ROOT).await?;
    let mut state = ClusterState::default();
    for kv in &snap.kvs {
        state.apply_put(kv);
    }
    state.revision = snap.revision;
    state.synced = true;
    if tx.send(Arc::new(state.clone())).is_err() {
        return Ok(Ended::ReceiversGone);
    }
    let mut events = store.watch(ROOT, snap.revision).await?;
    debug!(revision = snap.revision, "watching the store");
    // Level-triggered: a watch that goes quiet for RELIST is replaced by a fresh full read,
    // so a stalled stream cannot leave the agent on an old picture for long.
    loop {
        let Ok(next) = tokio::time::timeout(RELIST, events.next()).await else {
            return Ok(Ended::Quiet);
        };
        let Some(ev) = next else { break };
        let ev = ev?;
        match &ev {
            Event::Put(kv) => state.apply_put(kv),
            Event::Delete { key, mod_revision } => state.apply_delete(key, *mod_revision),
        }
        // Coalesce a burst: apply everything already queued before publishing.
        while let Some(Some(more)) = events.next().now_or_never() {
            match more? {
                Event::Put(kv) => state.apply_put(&kv),
                Event::Delete { key, mod_revision } => state.apply_delete(&key, mod_revision),
            }
        }
        if tx.send(Arc::new(state.clone())).is_err() {
            return Ok(Ended::ReceiversGone);
        }
    }
    anyhow::bail!("watch stream ended")
}

use futures::FutureExt as _;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::encode;
    use crate::testing::task;

    fn kv(key: String, value: Vec<u8>, rev: i64) -> KeyValue {
        KeyValue {
            key,
            value,
            create_revision: rev,
            mod_revision: rev,
        }
    }

    /// Bug 9: publishing a snapshot per watch batch copied the whole cluster. Snapshots now
    /// share every entry that did not change: after a clone and one task update, the other
    /// tasks' records are the same memory in both snapshots.
    #[test]
    fn a_new_snapshot_shares_the_records_that_did_not_change() {
        let mut st = ClusterState::default();
        for i in 0..2000 {
            let id = format!("t{i:04}");
            st.apply_put(&kv(
                crate::keys::task(&id),
                encode(&task(&id, shoal_api::model::TaskState::Running)),
                i + 1,
            ));
        }
        let before = st.clone();
        st.apply_put(&kv(
            crate::keys::task("t1000"),
            encode(&task("t1000", shoal_api::model::TaskState::Failed)),
            5000,
        ));
        let shared = (0..2000)
            .map(|i| format!("t{i:04}"))
            .filter(|id| std::ptr::eq(&before.tasks[id], &st.tasks[id]))
            .count();
        assert!(shared >= 1900, "only {shared} of 2000 records shared");
        assert!(!std::ptr::eq(&before.tasks["t1000"], &st.tasks["t1000"]));
        assert_eq!(
            before.tasks["t1000"].0.state,
            shoal_api::model::TaskState::Running
        );
        assert_eq!(
            st.tasks["t1000"].0.state,
            shoal_api::model::TaskState::Failed
        );
    }
}
