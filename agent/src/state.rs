//! The agent's view of the cluster: a full read of the store at start, then a prefix watch
//! applied event by event. Any watch failure leads to a fresh full read (level-triggered).
//! Consumers get immutable snapshots through a `tokio::sync::watch` channel.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::cluster::{ALIVE, NETWORKS, NODES, ROOT, SERVICES, TASKS, decode};
use crate::model::{Network, Node, Service, Task};
use crate::store::{Event, KeyValue, Store};

/// One consistent picture of the cluster. Values keep their store revision for CAS writes.
#[derive(Debug, Clone, Default)]
pub struct ClusterState {
    pub networks: BTreeMap<String, Network>,
    pub services: BTreeMap<String, (Service, i64)>,
    pub tasks: BTreeMap<String, (Task, i64)>,
    pub nodes: BTreeMap<String, (Node, i64)>,
    /// Nodes whose liveness key exists (their agent holds its lease).
    pub alive: BTreeSet<String>,
    pub revision: i64,
    /// False until the first full read succeeded.
    pub synced: bool,
}

impl ClusterState {
    pub fn apply_put(&mut self, kv: &KeyValue) {
        let rev = kv.mod_revision;
        let res = if let Some(name) = kv.key.strip_prefix(NETWORKS) {
            decode(kv).map(|n| {
                self.networks.insert(name.to_string(), n);
            })
        } else if let Some(name) = kv.key.strip_prefix(SERVICES) {
            decode(kv).map(|s| {
                self.services.insert(name.to_string(), (s, rev));
            })
        } else if let Some(id) = kv.key.strip_prefix(TASKS) {
            decode(kv).map(|t| {
                self.tasks.insert(id.to_string(), (t, rev));
            })
        } else if let Some(id) = kv.key.strip_prefix(NODES) {
            decode(kv).map(|n| {
                self.nodes.insert(id.to_string(), (n, rev));
            })
        } else if let Some(id) = kv.key.strip_prefix(ALIVE) {
            self.alive.insert(id.to_string());
            Ok(())
        } else {
            Ok(())
        };
        if let Err(e) = res {
            warn!(key = %kv.key, error = %e, "ignoring undecodable record");
        }
        self.revision = self.revision.max(rev);
    }

    pub fn apply_delete(&mut self, key: &str, rev: i64) {
        if let Some(name) = key.strip_prefix(NETWORKS) {
            self.networks.remove(name);
        } else if let Some(name) = key.strip_prefix(SERVICES) {
            self.services.remove(name);
        } else if let Some(id) = key.strip_prefix(TASKS) {
            self.tasks.remove(id);
        } else if let Some(id) = key.strip_prefix(NODES) {
            self.nodes.remove(id);
        } else if let Some(id) = key.strip_prefix(ALIVE) {
            self.alive.remove(id);
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
    crate::metrics::global().revision_seen(state.revision);
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
        crate::metrics::global().revision_seen(state.revision);
        if tx.send(Arc::new(state.clone())).is_err() {
            return Ok(Ended::ReceiversGone);
        }
    }
    anyhow::bail!("watch stream ended")
}

use futures::FutureExt as _;
