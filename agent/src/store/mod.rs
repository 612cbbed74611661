//! The cluster store: a small key-value interface with revisions, compare-and-swap
//! transactions and prefix watches, shaped after etcd v3 so both backends honour one
//! contract (checked by the shared conformance suite in `conformance.rs`).
//!
//! - [`embedded`]: single node, no extra process; crash-safe on disk.
//! - [`etcd`]: etcd v3 through etcd-client.

use std::fmt;

use async_trait::async_trait;
use futures::stream::BoxStream;

pub mod conformance;
pub mod embedded;
pub mod etcd;

/// One stored key with its value and revisions (etcd semantics: the store has one
/// revision counter, bumped by every successful write transaction).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// Revision of the transaction that created this key (since its last deletion).
    pub create_revision: i64,
    /// Revision of the last transaction that modified this key.
    pub mod_revision: i64,
}

/// A condition of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compare {
    /// The key does not exist.
    Absent(String),
    /// The key exists and its `mod_revision` equals the given one.
    ModRevision(String, i64),
}

/// A write of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put(String, Vec<u8>),
    Delete(String),
    /// Deletes every key under the prefix.
    DeletePrefix(String),
}

/// What a watch reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Put(KeyValue),
    /// The deleted key, with `mod_revision` = the revision of the deletion.
    Delete {
        key: String,
        mod_revision: i64,
    },
}

impl Event {
    pub fn key(&self) -> &str {
        match self {
            Event::Put(kv) => &kv.key,
            Event::Delete { key, .. } => key,
        }
    }
    pub fn revision(&self) -> i64 {
        match self {
            Event::Put(kv) => kv.mod_revision,
            Event::Delete { mod_revision, .. } => *mod_revision,
        }
    }
}

/// Errors of every backend.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store cannot be reached (etcd down, disk gone): retry later.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A watch could not resume from the asked revision (compacted): resync with `list`.
    #[error("watch revision {0} was compacted; resync")]
    Compacted(i64),
    #[error("store I/O error: {0}")]
    Io(String),
    #[error("store data is corrupt: {0}")]
    Corrupt(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// A consistent read of a prefix: the keys and the store revision they were read at.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub kvs: Vec<KeyValue>,
    pub revision: i64,
}

/// The store contract. All keys are UTF-8 strings; callers use `/`-separated paths.
#[async_trait]
pub trait Store: Send + Sync + fmt::Debug {
    /// One key, or None.
    async fn get(&self, key: &str) -> Result<Option<KeyValue>>;

    /// Every key under `prefix`, sorted by key, with the revision of the read.
    async fn list(&self, prefix: &str) -> Result<Snapshot>;

    /// Applies all `ops` atomically if every compare holds; returns whether it did and
    /// the store revision after the transaction (unchanged when it did not apply).
    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<TxnResult>;

    /// Events for keys under `prefix` with revision > `after_revision`, in order, until the
    /// stream is dropped. A stream that ends or yields an error must be re-established by
    /// the caller (with a fresh `list` when the error is [`StoreError::Compacted`]).
    async fn watch(
        &self,
        prefix: &str,
        after_revision: i64,
    ) -> Result<BoxStream<'static, Result<Event>>>;

    /// Convenience: unconditional put.
    async fn put(&self, key: &str, value: Vec<u8>) -> Result<i64> {
        Ok(self
            .txn(vec![], vec![Op::Put(key.to_string(), value)])
            .await?
            .revision)
    }

    /// Convenience: put only if absent; true when written.
    async fn create(&self, key: &str, value: Vec<u8>) -> Result<bool> {
        Ok(self
            .txn(
                vec![Compare::Absent(key.to_string())],
                vec![Op::Put(key.to_string(), value)],
            )
            .await?
            .succeeded)
    }

    /// Convenience: unconditional delete.
    async fn delete(&self, key: &str) -> Result<i64> {
        Ok(self
            .txn(vec![], vec![Op::Delete(key.to_string())])
            .await?
            .revision)
    }
}

/// Outcome of [`Store::txn`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxnResult {
    pub succeeded: bool,
    pub revision: i64,
}
