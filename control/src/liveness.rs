//! Node liveness and leadership, on the store's leases and election (etcd's primitives).
//!
//! Each agent holds a lease (TTL `lease_ttl_secs`, default 3 s) and a key `/shoal/alive/<id>`
//! bound to it; when the agent dies or is cut off, etcd deletes the key at expiry and every
//! other agent drops that node's tasks from DNS answers and VIP backends. The leader (etcd's
//! election recipe, campaigned with the same lease) runs the orchestrator.
//!
//! A store outage looks like every node dying at once: when the store comes back, leases have
//! expired and alive keys vanish until each agent re-registers. So liveness is only *trusted*
//! once this agent has held a lease continuously for TTL + 1 s; until then the agent keeps
//! the last trusted picture (nodes are not dropped) and the leader does not declare nodes
//! lost.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::{info, warn};

use crate::keys::{self, ELECTION};
use crate::state::ClusterState;
use crate::store::{LeaseId, Op, Store, StoreError};

pub struct Liveness {
    /// This node: always in the alive set this agent acts on (see [`Liveness::effective_alive`]).
    node_id: String,
    ttl: Duration,
    is_leader: AtomicBool,
    /// Since when this agent has held a live lease without interruption.
    connected_since: Mutex<Option<Instant>>,
    lease: watch::Sender<Option<LeaseId>>,
    /// The alive set last seen while trusted.
    last_trusted: Mutex<Option<BTreeSet<String>>>,
}

impl Liveness {
    /// Starts keeping this node's lease and campaigning for leadership.
    pub fn spawn(store: Arc<dyn Store>, node_id: String, ttl: Duration) -> Arc<Liveness> {
        let (tx, _) = watch::channel(None);
        let me = Arc::new(Liveness {
            node_id: node_id.clone(),
            ttl,
            is_leader: AtomicBool::new(false),
            connected_since: Mutex::new(None),
            lease: tx,
            last_trusted: Mutex::new(None),
        });
        tokio::spawn(keep(store.clone(), node_id.clone(), me.clone()));
        tokio::spawn(lead(store, node_id, me.clone()));
        me
    }

    pub fn is_leader(&self) -> bool {
        self.is_leader.load(Ordering::SeqCst)
    }

    /// True once the lease has been held for TTL + 1 s without interruption.
    pub fn trusted(&self) -> bool {
        self.connected_since
            .lock()
            .expect("lock")
            .is_some_and(|t| t.elapsed() >= self.ttl + Duration::from_secs(1))
    }

    pub fn connected(&self) -> bool {
        self.connected_since.lock().expect("lock").is_some()
    }

    /// The alive set to act on: the store's while trusted; after an outage, the last trusted
    /// set plus whoever has re-registered since. This node is always in it: the agent
    /// asking is running. Without that, a restarted agent whose alive key is not (yet)
    /// back in the store (the embedded store forgets leased keys on reopen) would take its
    /// own tasks out of DNS and the VIP backends on its first pass, and put them back a
    /// pass later.
    pub fn effective_alive(&self, seen: &BTreeSet<String>) -> BTreeSet<String> {
        let mut alive = {
            let mut last = self.last_trusted.lock().expect("lock");
            if self.trusted() {
                *last = Some(seen.clone());
                seen.clone()
            } else {
                match &*last {
                    Some(prev) => prev.union(seen).cloned().collect(),
                    None => seen.clone(),
                }
            }
        };
        alive.insert(self.node_id.clone());
        alive
    }

    /// The snapshot with the alive set this agent may act on ([`Liveness::effective_alive`]).
    pub fn adjust<'a>(&self, st: &'a ClusterState) -> std::borrow::Cow<'a, ClusterState> {
        let alive = self.effective_alive(&st.alive);
        if alive == st.alive {
            std::borrow::Cow::Borrowed(st)
        } else {
            let mut s = st.clone();
            s.alive = alive;
            std::borrow::Cow::Owned(s)
        }
    }

    fn set_connected(&self, up: bool) {
        let mut c = self.connected_since.lock().expect("lock");
        match (up, c.is_some()) {
            (true, false) => *c = Some(Instant::now()),
            (false, true) => *c = None,
            _ => {}
        }
    }
}

/// Holds the lease and the alive key; re-registers after expiry.
async fn keep(store: Arc<dyn Store>, node_id: String, me: Arc<Liveness>) {
    let key = keys::alive(&node_id);
    loop {
        let lease = match store.grant_lease(me.ttl).await {
            Ok(l) => l,
            Err(e) => {
                me.set_connected(false);
                warn!(error = %e, "cannot get a lease; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        if let Err(e) = store
            .txn(vec![], vec![Op::PutLeased(key.clone(), Vec::new(), lease)])
            .await
        {
            warn!(error = %e, "cannot register as alive; retrying");
            let _ = store.revoke_lease(lease).await;
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        }
        me.set_connected(true);
        me.lease.send_replace(Some(lease));
        info!(lease, ttl = ?me.ttl, "holding the node's lease");
        loop {
            tokio::time::sleep(me.ttl / 3).await;
            match store.keep_alive(lease).await {
                Ok(()) => me.set_connected(true),
                Err(StoreError::LeaseExpired(_)) => {
                    warn!(lease, "the node's lease expired; registering again");
                    me.set_connected(false);
                    me.lease.send_replace(None);
                    break;
                }
                Err(e) => {
                    if me.connected() {
                        warn!(error = %e, "lost the store; serving from the last known state");
                    }
                    me.set_connected(false);
                }
            }
        }
    }
}

/// Campaigns with the current lease; leadership ends with the lease.
async fn lead(store: Arc<dyn Store>, node_id: String, me: Arc<Liveness>) {
    let mut rx = me.lease.subscribe();
    loop {
        let lease = loop {
            if let Some(l) = *rx.borrow_and_update() {
                break l;
            }
            if rx.changed().await.is_err() {
                return;
            }
        };
        let campaign = store.campaign(ELECTION, &node_id, lease);
        let won = tokio::select! {
            r = campaign => Some(r),
            _ = rx.changed() => None,
        };
        match won {
            Some(Ok(_leadership)) => {
                me.is_leader.store(true, Ordering::SeqCst);
                info!("this node is the leader");
                // Leader until the lease changes (expired, re-granted).
                while *rx.borrow_and_update() == Some(lease) {
                    if rx.changed().await.is_err() {
                        return;
                    }
                }
                me.is_leader.store(false, Ordering::SeqCst);
                warn!("leadership lost with the lease");
            }
            Some(Err(e)) => {
                warn!(error = %e, "campaign failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn liveness(node_id: &str) -> Liveness {
        Liveness {
            node_id: node_id.into(),
            ttl: Duration::from_secs(3),
            is_leader: AtomicBool::new(false),
            connected_since: Mutex::new(None),
            lease: watch::channel(None).0,
            last_trusted: Mutex::new(None),
        }
    }

    fn set(ids: &[&str]) -> BTreeSet<String> {
        ids.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn this_node_is_alive_before_its_key_is_back() {
        // A restarted agent, not yet registered, sees an alive set without itself.
        let me = liveness("n1");
        assert_eq!(me.effective_alive(&set(&["n2"])), set(&["n1", "n2"]));
        assert_eq!(me.effective_alive(&set(&[])), set(&["n1"]));
    }

    #[test]
    fn untrusted_keeps_the_last_trusted_set() {
        let me = liveness("n1");
        *me.connected_since.lock().unwrap() = Some(Instant::now() - Duration::from_secs(10));
        assert_eq!(
            me.effective_alive(&set(&["n1", "n2", "n3"])),
            set(&["n1", "n2", "n3"])
        );
        // Trusted: a node whose key went is dropped.
        assert_eq!(me.effective_alive(&set(&["n1", "n2"])), set(&["n1", "n2"]));
        // After an outage (not trusted), nodes not yet re-registered are kept.
        me.set_connected(false);
        assert_eq!(me.effective_alive(&set(&[])), set(&["n1", "n2"]));
    }
}
