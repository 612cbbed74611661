//! Helpers for unit tests, shared with the node crate's tests (feature `testing`).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use futures::stream::BoxStream;
use shoal_api::model::{Task, TaskState};

use crate::cluster::Cluster;
use crate::store::embedded::EmbeddedStore;
use crate::store::{
    Compare, Event, KeyValue, Leadership, LeaseId, Op, Snapshot, Store, StoreError, TxnResult,
};

/// A real embedded store whose next `fail` transactions fail as if it were down (a
/// fake only of the outage, for these unit tests of the retry logic).
#[derive(Debug)]
pub struct Flaky {
    pub inner: EmbeddedStore,
    pub fail: AtomicUsize,
}

#[async_trait]
impl Store for Flaky {
    async fn get(&self, key: &str) -> crate::store::Result<Option<KeyValue>> {
        self.inner.get(key).await
    }
    async fn list(&self, prefix: &str) -> crate::store::Result<Snapshot> {
        self.inner.list(prefix).await
    }
    async fn txn(&self, c: Vec<Compare>, o: Vec<Op>) -> crate::store::Result<TxnResult> {
        if self
            .fail
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(StoreError::unavailable("injected outage"));
        }
        self.inner.txn(c, o).await
    }
    async fn watch(
        &self,
        prefix: &str,
        after: i64,
    ) -> crate::store::Result<BoxStream<'static, crate::store::Result<Event>>> {
        self.inner.watch(prefix, after).await
    }
    async fn grant_lease(&self, ttl: std::time::Duration) -> crate::store::Result<LeaseId> {
        self.inner.grant_lease(ttl).await
    }
    async fn keep_alive(&self, lease: LeaseId) -> crate::store::Result<()> {
        self.inner.keep_alive(lease).await
    }
    async fn revoke_lease(&self, lease: LeaseId) -> crate::store::Result<()> {
        self.inner.revoke_lease(lease).await
    }
    async fn campaign(
        &self,
        election: &str,
        value: &str,
        lease: LeaseId,
    ) -> crate::store::Result<Leadership> {
        self.inner.campaign(election, value, lease).await
    }
    async fn leader(&self, election: &str) -> crate::store::Result<Option<String>> {
        self.inner.leader(election).await
    }
    async fn resign(&self, l: &Leadership) -> crate::store::Result<()> {
        self.inner.resign(l).await
    }
}

pub fn task(id: &str, state: TaskState) -> Task {
    Task {
        id: id.into(),
        service_id: "s1".into(),
        service_name: "web".into(),
        slot: 1,
        node_id: "n1".into(),
        desired_state: TaskState::Running,
        state,
        networks: vec![],
        error: None,
        health: None,
    }
}

pub fn flaky(dir: &std::path::Path) -> (Arc<Flaky>, Cluster) {
    let s = Arc::new(Flaky {
        inner: EmbeddedStore::open(dir).unwrap(),
        fail: AtomicUsize::new(0),
    });
    (s.clone(), Cluster::new(s))
}
