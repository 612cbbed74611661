//! The cluster store: a small key-value interface with revisions, compare-and-swap
//! transactions and prefix watches, shaped after etcd v3 so both backends honour one
//! contract (checked by the shared conformance suite in `conformance.rs`).
//!
//! - [`embedded`]: single node, no extra process; crash-safe on disk.
//! - [`etcd`]: etcd v3 through etcd-client.
//!
//! Leases (node liveness) and leader election follow etcd too:
//! - [`Store::grant_lease`] makes a lease with a TTL (whole seconds, rounded up, at least
//!   1 s; etcd raises it to its own minimum, 2 s with default settings). Keys written with
//!   [`Op::PutLeased`] are deleted (a watched Delete event) when the lease expires or is
//!   revoked. A plain [`Op::Put`] of such a key detaches it from its lease, as in etcd.
//! - [`Store::keep_alive`] is one refresh; call it every TTL/3 or so. It fails with
//!   [`StoreError::LeaseExpired`] once the lease is gone.
//! - [`Store::campaign`] is etcd's election recipe: the candidate's key
//!   `<election>/<lease id in hex>` is bound to its lease and the key under `<election>/`
//!   with the lowest create revision is the leader. Leadership ends with [`Store::resign`]
//!   or when the lease expires (the holder learns it from `keep_alive`). Do not nest
//!   election names (`a` and `a/b`): `a`'s candidates are listed under `a/`.

use std::fmt;
use std::time::Duration;

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

/// Id of a lease ([`Store::grant_lease`]).
pub type LeaseId = i64;

/// A write of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put(String, Vec<u8>),
    /// A put bound to a lease: the key is deleted when the lease expires or is revoked. A
    /// transaction whose writes name a lease that does not exist (any more) fails with
    /// [`StoreError::LeaseExpired`] (only when its compares hold, as in etcd).
    PutLeased(String, Vec<u8>, LeaseId),
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

/// The underlying error of a [`StoreError`] (an I/O error, etcd-client's, a decoder's).
pub type Cause = Box<dyn std::error::Error + Send + Sync>;

/// `what: cause: its cause...`: the message is whole on its own (many callers print only
/// the outer error); the cause is also kept as `source()` for code that walks the chain.
fn with_chain(what: String, e: &Cause) -> String {
    let mut s = what;
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e.as_ref());
    while let Some(c) = cur {
        let text = c.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cur = c.source();
    }
    s
}

/// Errors of every backend. Each keeps its cause as `source()`.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store cannot be reached (etcd down, disk gone): retry later.
    #[error("store unavailable: {what}")]
    Unavailable {
        what: String,
        #[source]
        source: Option<Cause>,
    },
    /// A watch could not resume from the asked revision (compacted): resync with `list`.
    #[error("watch revision {0} was compacted; resync")]
    Compacted(i64),
    #[error("store I/O error: {what}")]
    Io {
        what: String,
        #[source]
        source: Option<Cause>,
    },
    #[error("store data is corrupt: {what}")]
    Corrupt {
        what: String,
        #[source]
        source: Option<Cause>,
    },
    /// The lease does not exist: it expired, was revoked, or was never granted here.
    #[error("lease {0:x} expired or does not exist")]
    LeaseExpired(LeaseId),
}

impl StoreError {
    pub fn unavailable(what: impl Into<String>) -> StoreError {
        StoreError::Unavailable {
            what: what.into(),
            source: None,
        }
    }
    pub fn unavailable_because(what: impl Into<String>, e: impl Into<Cause>) -> StoreError {
        let e: Cause = e.into();
        StoreError::Unavailable {
            what: with_chain(what.into(), &e),
            source: Some(e),
        }
    }
    pub fn io(what: impl Into<String>) -> StoreError {
        StoreError::Io {
            what: what.into(),
            source: None,
        }
    }
    pub fn io_because(what: impl Into<String>, e: impl Into<Cause>) -> StoreError {
        let e: Cause = e.into();
        StoreError::Io {
            what: with_chain(what.into(), &e),
            source: Some(e),
        }
    }
    pub fn corrupt(what: impl Into<String>) -> StoreError {
        StoreError::Corrupt {
            what: what.into(),
            source: None,
        }
    }
    pub fn corrupt_because(what: impl Into<String>, e: impl Into<Cause>) -> StoreError {
        let e: Cause = e.into();
        StoreError::Corrupt {
            what: with_chain(what.into(), &e),
            source: Some(e),
        }
    }
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

    /// Grants a lease of (at least) `ttl`, rounded up to whole seconds (minimum 1 s, at
    /// most 9e9 s; etcd may raise it further to its minimum TTL). It lives until `ttl` passes without a
    /// [`Store::keep_alive`], or until revoked.
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId>;

    /// One refresh of the lease (its deadline becomes now + TTL).
    /// [`StoreError::LeaseExpired`] when the lease is gone.
    async fn keep_alive(&self, lease: LeaseId) -> Result<()>;

    /// Ends the lease now and deletes its keys (one transaction). Idempotent: revoking an
    /// expired or unknown lease is Ok.
    async fn revoke_lease(&self, lease: LeaseId) -> Result<()>;

    /// Blocks until this candidate is the leader of `election` (etcd's election API:
    /// v3election Campaign with the lease) and returns the [`Leadership`] handle.
    /// The candidate's key is `<election>/<lease hex>` with `value`, bound to `lease`.
    /// Fails with [`StoreError::LeaseExpired`] when the lease is gone (at the start or
    /// while waiting), and with an error when the store connection breaks. Dropping the
    /// future (or a failed campaign) withdraws the candidacy: its key is deleted (etcd:
    /// by the server when the call is cancelled; embedded: by a task spawned on drop).
    async fn campaign(&self, election: &str, value: &str, lease: LeaseId) -> Result<Leadership>;

    /// The current leader's value, if any.
    async fn leader(&self, election: &str) -> Result<Option<String>>;

    /// Gives up the leadership (deletes the leader key if it is still this campaign's).
    /// Idempotent: Ok when the key is already gone (resigned, or the lease expired).
    async fn resign(&self, leadership: &Leadership) -> Result<()>;

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

/// A won election ([`Store::campaign`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leadership {
    election: String,
    key: String,
    /// Create revision of the leader key: identifies this campaign's key.
    revision: i64,
    lease: LeaseId,
}

impl Leadership {
    pub(crate) fn new(election: &str, key: String, revision: i64, lease: LeaseId) -> Self {
        Self {
            election: election.to_string(),
            key,
            revision,
            lease,
        }
    }

    /// The leader key (`<election>/<lease hex>`).
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The election's name.
    pub fn election(&self) -> &str {
        &self.election
    }

    /// The lease the leadership is bound to.
    pub fn lease(&self) -> LeaseId {
        self.lease
    }

    /// Create revision of the leader key.
    pub fn revision(&self) -> i64 {
        self.revision
    }

    /// Gives up the leadership: [`Store::resign`].
    pub async fn resign(self, store: &dyn Store) -> Result<()> {
        store.resign(&self).await
    }
}

/// The key of a candidate in an election (etcd's layout: `<election>/<lease in hex>`).
pub(crate) fn candidate_key(election: &str, lease: LeaseId) -> String {
    format!("{election}/{lease:x}")
}

/// etcd's largest lease TTL (seconds); longer TTLs are cut to it.
pub(crate) const MAX_LEASE_TTL_SECS: i64 = 9_000_000_000;

/// A lease TTL in whole seconds as both backends use it: rounded up, at least 1, at most
/// [`MAX_LEASE_TTL_SECS`].
pub(crate) fn ttl_secs(ttl: Duration) -> i64 {
    let secs = ttl
        .as_secs()
        .saturating_add(u64::from(ttl.subsec_nanos() > 0));
    i64::try_from(secs)
        .unwrap_or(i64::MAX)
        .clamp(1, MAX_LEASE_TTL_SECS)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store error keeps its cause: in its message, and as `source()`.
    #[test]
    fn errors_keep_their_cause() {
        let e = StoreError::io_because("read /x", std::io::Error::from_raw_os_error(5));
        assert!(e.to_string().contains("read /x: Input/output error"), "{e}");
        let src = std::error::Error::source(&e).expect("a source");
        assert!(src.downcast_ref::<std::io::Error>().is_some());
        assert!(std::error::Error::source(&StoreError::io("plain")).is_none());
    }

    #[test]
    fn ttl_rounding() {
        assert_eq!(ttl_secs(Duration::ZERO), 1);
        assert_eq!(ttl_secs(Duration::from_millis(300)), 1);
        assert_eq!(ttl_secs(Duration::from_secs(2)), 2);
        assert_eq!(ttl_secs(Duration::from_millis(2001)), 3);
        assert_eq!(ttl_secs(Duration::MAX), MAX_LEASE_TTL_SECS);
    }

    #[test]
    fn candidate_key_is_etcds() {
        assert_eq!(candidate_key("/e", 0x694d_7a4b_10aa), "/e/694d7a4b10aa");
    }
}

/// Outcome of [`Store::txn`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxnResult {
    pub succeeded: bool,
    pub revision: i64,
}
