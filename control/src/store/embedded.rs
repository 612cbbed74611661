//! The embedded store: one node, no extra process, crash-safe on disk.
//!
//! The whole state (every key with its revisions, and the store revision) lives in memory
//! and is written to `<dir>/state.json` after every write transaction that changes
//! something: the new state goes to `state.json.tmp`, which is fsynced, renamed over
//! `state.json`, and the directory is fsynced. A crash leaves either the old or the new
//! state, never a mix. A transaction is visible to readers only once it is on disk.
//!
//! Writers are serialised by a mutex and run on tokio's blocking pool (they fsync).
//! Readers take a short lock and clone an `Arc` of the current map.
//!
//! Watches: the store keeps the most recent events in memory (a ring of
//! [`EmbeddedOptions::watch_history`] events, always whole transactions) and publishes
//! every transaction on a broadcast channel. A watch replays the retained events after its
//! revision and then follows the channel; the replay is read and the channel subscribed
//! under the same lock that publishes, so there is no gap and no duplicate. Events are not
//! persisted: after a reopen a watch can resume only from the current revision on; older
//! revisions give [`StoreError::Compacted`], like a compacted etcd. A watcher that falls
//! more than [`EmbeddedOptions::watch_channel`] transactions behind gets an
//! [`StoreError::Unavailable`] item and its stream ends: re-watch from the last revision
//! seen (the ring usually still has it) or resync with `list`.
//!
//! A data directory is locked (`flock` on `<dir>/LOCK`) while a store has it open.
//!
//! Leases live in memory only. Keys bound to a lease ([`Op::PutLeased`]) are never
//! written to `state.json` (the revision counter still is), so after a reopen every
//! leased key from before is gone (no Delete event: watch history does not survive a
//! reopen either) and old lease ids are unknown ([`StoreError::LeaseExpired`]). Lease ids
//! start at a random value so a reopened store does not hand out an id a stale client
//! still holds. An expiry task (spawned on the first `grant_lease`, on that tokio runtime)
//! wakes at the earliest lease deadline and deletes the keys of every expired lease in one
//! transaction; `keep_alive` after the deadline fails even if the task has not run yet.
//!
//! Election (etcd's recipe): a candidate puts `<election>/<lease hex>` bound to its lease;
//! the key with the lowest create revision under `<election>/` is the leader; `campaign`
//! watches the prefix until every older candidate key is deleted.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::{self, BoxStream};
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, broadcast};
use tokio::task::JoinHandle;

use super::{
    Compare, Event, KeyValue, Leadership, LeaseId, Op, Result, Snapshot, Store, StoreError,
    TxnResult, candidate_key, ttl_secs,
};

/// Name of the state file inside the data directory.
pub const STATE_FILE: &str = "state.json";
const TMP_FILE: &str = "state.json.tmp";
const LOCK_FILE: &str = "LOCK";
const FORMAT_VERSION: u32 = 1;

/// Tuning of an [`EmbeddedStore`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmbeddedOptions {
    /// How many recent events are kept for watches resuming from an older revision.
    pub watch_history: usize,
    /// How many transactions a live watcher may fall behind before its stream fails.
    pub watch_channel: usize,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        Self {
            watch_history: 10_000,
            watch_channel: 4096,
        }
    }
}

/// Single-node store persisted in a data directory. Cheap to clone (shared state).
#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

struct Inner {
    disk: Option<Disk>,
    /// Serialises writers; holds the reason the store refuses writes after a failed
    /// persist whose outcome on disk is unknown.
    writer: Mutex<Option<String>>,
    /// Lock order: `writer`, then `leases`, then `shared`.
    leases: Mutex<Leases>,
    shared: Mutex<Shared>,
    opts: EmbeddedOptions,
    /// The lease expiry task (spawned on the first grant).
    expiry: Mutex<Option<JoinHandle<()>>>,
    /// Wakes the expiry task: a lease was granted, or the store is dropped.
    wake: Arc<Notify>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.wake.notify_one();
    }
}

struct Leases {
    next_id: LeaseId,
    live: HashMap<LeaseId, Lease>,
    /// Every key bound to a lease (sorted: expiry deletes in key order).
    attached: BTreeMap<String, LeaseId>,
}

struct Lease {
    ttl: Duration,
    deadline: Instant,
}

impl Leases {
    fn alive(&self, id: LeaseId, now: Instant) -> bool {
        self.live.get(&id).is_some_and(|l| l.deadline > now)
    }
}

struct Shared {
    kvs: Arc<BTreeMap<String, KeyValue>>,
    revision: i64,
    /// Events of whole transactions with revision > `floor`, oldest first.
    ring: VecDeque<Event>,
    /// Every event with a revision > floor is in `ring`.
    floor: i64,
    tx: broadcast::Sender<Arc<Vec<Event>>>,
}

struct Disk {
    dir: PathBuf,
    path: PathBuf,
    tmp: PathBuf,
    _lock: Flock<File>,
}

impl fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let revision = lock(&self.inner.shared).revision;
        f.debug_struct("EmbeddedStore")
            .field("dir", &self.inner.disk.as_ref().map(|d| &d.dir))
            .field("revision", &revision)
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave the state half-updated (every update
    // is a few assignments after the fallible work), so poisoning is ignored.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl EmbeddedStore {
    /// Opens (creating if needed) the data directory `dir` and loads its state.
    pub fn open(dir: &Path) -> Result<Self> {
        Self::open_with(dir, EmbeddedOptions::default())
    }

    /// [`EmbeddedStore::open`] with explicit options.
    pub fn open_with(dir: &Path, opts: EmbeddedOptions) -> Result<Self> {
        fs::create_dir_all(dir)
            .map_err(|e| StoreError::io_because(format!("create data dir {}", dir.display()), e))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock_file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| StoreError::io_because(format!("open {}", lock_path.display()), e))?;
        let lock = Flock::lock(lock_file, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
            StoreError::unavailable(format!(
                "data dir {} is in use by another store ({e})",
                dir.display()
            ))
        })?;
        let disk = Disk {
            dir: dir.to_path_buf(),
            path: dir.join(STATE_FILE),
            tmp: dir.join(TMP_FILE),
            _lock: lock,
        };
        // A leftover temp file is an unfinished write from a crash: the state file is
        // still the last complete state.
        match fs::remove_file(&disk.tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(StoreError::io(format!(
                    "remove {}: {e}",
                    disk.tmp.display()
                )));
            }
        }
        let (kvs, revision) = match fs::read(&disk.path) {
            Ok(bytes) => decode_state(&bytes)
                .map_err(|e| StoreError::corrupt_because(disk.path.display().to_string(), e))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => (BTreeMap::new(), 0),
            Err(e) => {
                return Err(StoreError::io_because(
                    format!("read {}", disk.path.display()),
                    e,
                ));
            }
        };
        tracing::debug!(dir = %dir.display(), revision, keys = kvs.len(), "embedded store opened");
        Ok(Self::build(Some(disk), kvs, revision, opts))
    }

    /// A store that keeps nothing on disk (tests, throwaway use).
    pub fn in_memory() -> Self {
        Self::in_memory_with(EmbeddedOptions::default())
    }

    /// [`EmbeddedStore::in_memory`] with explicit options.
    pub fn in_memory_with(opts: EmbeddedOptions) -> Self {
        Self::build(None, BTreeMap::new(), 0, opts)
    }

    /// The data directory, or None for an in-memory store.
    pub fn dir(&self) -> Option<&Path> {
        self.inner.disk.as_ref().map(|d| d.dir.as_path())
    }

    fn build(
        disk: Option<Disk>,
        kvs: BTreeMap<String, KeyValue>,
        revision: i64,
        opts: EmbeddedOptions,
    ) -> Self {
        let (tx, _) = broadcast::channel(opts.watch_channel.max(1));
        // Random start (below 2^52, so ids stay exact in JSON numbers and far from
        // overflow): ids from before a reopen are not reissued.
        let next_id = 1 + (rand::random::<u64>() >> 12) as i64;
        Self {
            inner: Arc::new(Inner {
                disk,
                writer: Mutex::new(None),
                leases: Mutex::new(Leases {
                    next_id,
                    live: HashMap::new(),
                    attached: BTreeMap::new(),
                }),
                expiry: Mutex::new(None),
                wake: Arc::new(Notify::new()),
                shared: Mutex::new(Shared {
                    kvs: Arc::new(kvs),
                    revision,
                    ring: VecDeque::new(),
                    floor: revision,
                    tx,
                }),
                opts,
            }),
        }
    }
}

impl Inner {
    fn txn_blocking(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<TxnResult> {
        let mut failed = lock(&self.writer);
        refuse_if_failed(&failed)?;
        let mut leases = lock(&self.leases);
        self.apply(&mut failed, &mut leases, compares, ops)
    }

    /// Deletes the keys of the leases `ids` in one transaction, then forgets the leases.
    fn end_leases_blocking(&self, ids: Option<&[LeaseId]>) -> Result<()> {
        let mut failed = lock(&self.writer);
        refuse_if_failed(&failed)?;
        let mut leases = lock(&self.leases);
        let now = Instant::now();
        let ids: BTreeSet<LeaseId> = match ids {
            Some(ids) => ids.iter().copied().collect(),
            None => leases
                .live
                .iter()
                .filter(|(_, l)| l.deadline <= now)
                .map(|(id, _)| *id)
                .collect(),
        };
        if ids.is_empty() {
            return Ok(());
        }
        let ops = leases
            .attached
            .iter()
            .filter(|(_, id)| ids.contains(id))
            .map(|(k, _)| Op::Delete(k.clone()))
            .collect();
        self.apply(&mut failed, &mut leases, vec![], ops)?;
        for id in &ids {
            leases.live.remove(id);
        }
        tracing::debug!(leases = ?ids, "embedded store: leases ended");
        Ok(())
    }

    fn apply(
        &self,
        failed: &mut Option<String>,
        leases: &mut Leases,
        compares: Vec<Compare>,
        ops: Vec<Op>,
    ) -> Result<TxnResult> {
        let (kvs, revision) = {
            let s = lock(&self.shared);
            (s.kvs.clone(), s.revision)
        };
        let holds = compares.iter().all(|c| match c {
            Compare::Absent(k) => !kvs.contains_key(k),
            Compare::ModRevision(k, r) => kvs.get(k).is_some_and(|kv| kv.mod_revision == *r),
        });
        let unchanged = TxnResult {
            succeeded: holds,
            revision,
        };
        if !holds || ops.is_empty() {
            return Ok(unchanged);
        }
        // Like etcd: a write naming a dead lease fails the whole transaction.
        let now = Instant::now();
        for op in &ops {
            if let Op::PutLeased(_, _, id) = op
                && !leases.alive(*id, now)
            {
                return Err(StoreError::LeaseExpired(*id));
            }
        }
        let new_rev = revision + 1;
        let mut next = (*kvs).clone();
        let mut attached = leases.attached.clone();
        let mut events = Vec::new();
        for op in ops {
            let (key, value, lease) = match op {
                Op::Put(key, value) => (key, value, None),
                Op::PutLeased(key, value, id) => (key, value, Some(id)),
                Op::Delete(key) => {
                    attached.remove(&key);
                    if next.remove(&key).is_some() {
                        events.push(Event::Delete {
                            key,
                            mod_revision: new_rev,
                        });
                    }
                    continue;
                }
                Op::DeletePrefix(prefix) => {
                    let keys: Vec<String> = next
                        .range(prefix.clone()..)
                        .take_while(|(k, _)| k.starts_with(&prefix))
                        .map(|(k, _)| k.clone())
                        .collect();
                    for key in keys {
                        next.remove(&key);
                        attached.remove(&key);
                        events.push(Event::Delete {
                            key,
                            mod_revision: new_rev,
                        });
                    }
                    continue;
                }
            };
            match lease {
                Some(id) => attached.insert(key.clone(), id),
                None => attached.remove(&key),
            };
            let create_revision = next.get(&key).map_or(new_rev, |kv| kv.create_revision);
            let kv = KeyValue {
                key: key.clone(),
                value,
                create_revision,
                mod_revision: new_rev,
            };
            next.insert(key, kv.clone());
            events.push(Event::Put(kv));
        }
        // Like etcd: a transaction that changes nothing (deleting absent keys) does not
        // create a revision.
        if events.is_empty() {
            return Ok(unchanged);
        }
        if let Some(disk) = &self.disk
            && let Err(e) = disk.persist(&next, new_rev, &attached)
        {
            if e.outcome_unknown {
                *failed = Some(e.msg.clone());
            }
            tracing::error!(error = %e.msg, "embedded store write failed");
            return Err(StoreError::io(e.msg));
        }
        leases.attached = attached;
        let mut s = lock(&self.shared);
        s.kvs = Arc::new(next);
        s.revision = new_rev;
        s.ring.extend(events.iter().cloned());
        let cap = self.opts.watch_history;
        while s.ring.len() > cap {
            // Drop whole transactions so that `floor` stays exact.
            let Some(ev) = s.ring.pop_front() else { break };
            let rev = ev.revision();
            while s.ring.front().is_some_and(|e| e.revision() == rev) {
                s.ring.pop_front();
            }
            s.floor = rev;
        }
        // No receivers is fine.
        let _ = s.tx.send(Arc::new(events));
        Ok(TxnResult {
            succeeded: true,
            revision: new_rev,
        })
    }
}

fn refuse_if_failed(failed: &Option<String>) -> Result<()> {
    match failed {
        Some(reason) => Err(StoreError::io(format!(
            "store refuses writes after an earlier failure ({reason}); reopen it"
        ))),
        None => Ok(()),
    }
}

struct PersistError {
    msg: String,
    /// True when the failure came after the rename: the disk may hold the new state.
    outcome_unknown: bool,
}

impl Disk {
    fn persist(
        &self,
        kvs: &BTreeMap<String, KeyValue>,
        revision: i64,
        leased: &BTreeMap<String, LeaseId>,
    ) -> std::result::Result<(), PersistError> {
        let before = |what: &str, path: &Path, e: io::Error| PersistError {
            msg: format!("{what} {}: {e}", path.display()),
            outcome_unknown: false,
        };
        let bytes = encode_state(kvs, revision, |k| leased.contains_key(k));
        let mut f = File::create(&self.tmp).map_err(|e| before("create", &self.tmp, e))?;
        f.write_all(&bytes)
            .map_err(|e| before("write", &self.tmp, e))?;
        f.sync_all().map_err(|e| before("fsync", &self.tmp, e))?;
        drop(f);
        fs::rename(&self.tmp, &self.path).map_err(|e| PersistError {
            msg: format!(
                "rename {} to {}: {e}",
                self.tmp.display(),
                self.path.display()
            ),
            outcome_unknown: true,
        })?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| PersistError {
                msg: format!("fsync dir {}: {e}", self.dir.display()),
                outcome_unknown: true,
            })?;
        Ok(())
    }
}

// ---- on-disk format -------------------------------------------------------------------
//
// {"format":1,"revision":N,"kvs":[{"key":..,"create_revision":..,"mod_revision":..,
//   "value":"utf-8 text"} | {..,"value_hex":"00ff.."}]}
// Values that are valid UTF-8 are stored as text, others as hex, so the file stays
// readable with a text editor.

#[derive(Serialize)]
struct FileStateOut<'a> {
    format: u32,
    revision: i64,
    kvs: Vec<FileKvOut<'a>>,
}

#[derive(Serialize)]
struct FileKvOut<'a> {
    key: &'a str,
    create_revision: i64,
    mod_revision: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    value_hex: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileStateIn {
    format: u32,
    revision: i64,
    kvs: Vec<FileKvIn>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileKvIn {
    key: String,
    create_revision: i64,
    mod_revision: i64,
    #[serde(default)]
    value: Option<String>,
    #[serde(default)]
    value_hex: Option<String>,
}

/// The state file's bytes; keys for which `skip` holds (leased keys) are left out.
fn encode_state(
    kvs: &BTreeMap<String, KeyValue>,
    revision: i64,
    skip: impl Fn(&str) -> bool,
) -> Vec<u8> {
    let out = FileStateOut {
        format: FORMAT_VERSION,
        revision,
        kvs: kvs
            .values()
            .filter(|kv| !skip(&kv.key))
            .map(|kv| {
                let text = std::str::from_utf8(&kv.value).ok();
                FileKvOut {
                    key: &kv.key,
                    create_revision: kv.create_revision,
                    mod_revision: kv.mod_revision,
                    value: text,
                    value_hex: text.is_none().then(|| hex_encode(&kv.value)),
                }
            })
            .collect(),
    };
    // Serialising plain strings and integers cannot fail.
    serde_json::to_vec(&out).expect("state serialises")
}

fn decode_state(bytes: &[u8]) -> std::result::Result<(BTreeMap<String, KeyValue>, i64), String> {
    let st: FileStateIn = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if st.format != FORMAT_VERSION {
        return Err(format!(
            "unknown format {} (expected {FORMAT_VERSION})",
            st.format
        ));
    }
    if st.revision < 0 {
        return Err(format!("negative revision {}", st.revision));
    }
    let mut kvs = BTreeMap::new();
    for kv in st.kvs {
        if !(1 <= kv.create_revision
            && kv.create_revision <= kv.mod_revision
            && kv.mod_revision <= st.revision)
        {
            return Err(format!(
                "key {:?}: revisions create={} mod={} do not fit store revision {}",
                kv.key, kv.create_revision, kv.mod_revision, st.revision
            ));
        }
        let value = match (kv.value, kv.value_hex) {
            (Some(v), None) => v.into_bytes(),
            (None, Some(h)) => {
                hex_decode(&h).ok_or_else(|| format!("key {:?}: bad hex", kv.key))?
            }
            _ => {
                return Err(format!(
                    "key {:?}: needs exactly one of value, value_hex",
                    kv.key
                ));
            }
        };
        let key = kv.key;
        let entry = KeyValue {
            key: key.clone(),
            value,
            create_revision: kv.create_revision,
            mod_revision: kv.mod_revision,
        };
        if kvs.insert(key.clone(), entry).is_some() {
            return Err(format!("key {key:?} appears twice"));
        }
    }
    Ok((kvs, st.revision))
}

fn hex_encode(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 0xf) as usize] as char);
    }
    s
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    s.as_bytes()
        .chunks(2)
        .map(|p| {
            let hi = (p[0] as char).to_digit(16)?;
            let lo = (p[1] as char).to_digit(16)?;
            Some((hi * 16 + lo) as u8)
        })
        .collect()
}

// ---- the Store impl -------------------------------------------------------------------

#[async_trait]
impl Store for EmbeddedStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        Ok(lock(&self.inner.shared).kvs.get(key).cloned())
    }

    async fn list(&self, prefix: &str) -> Result<Snapshot> {
        let (kvs, revision) = {
            let s = lock(&self.inner.shared);
            (s.kvs.clone(), s.revision)
        };
        let kvs = kvs
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(_, kv)| kv.clone())
            .collect();
        Ok(Snapshot { kvs, revision })
    }

    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<TxnResult> {
        // etcd refuses a transaction that writes one key twice; so does this store, so that
        // code tested on it behaves the same on etcd.
        let mut seen = std::collections::HashSet::new();
        for op in &ops {
            let key = match op {
                Op::Put(k, _) | Op::PutLeased(k, _, _) | Op::Delete(k) => k,
                Op::DeletePrefix(_) => continue,
            };
            if !seen.insert(key.as_str()) {
                return Err(StoreError::io(format!(
                    "duplicate key given in txn request: {key}"
                )));
            }
        }
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || inner.txn_blocking(compares, ops))
            .await
            .map_err(|e| StoreError::io_because("store write task failed", e))?
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        let ttl = Duration::from_secs(ttl_secs(ttl) as u64);
        let id = {
            let mut l = lock(&self.inner.leases);
            let id = l.next_id;
            l.next_id += 1;
            l.live.insert(
                id,
                Lease {
                    ttl,
                    deadline: Instant::now() + ttl,
                },
            );
            id
        };
        self.ensure_expiry_task();
        self.inner.wake.notify_one();
        Ok(id)
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<()> {
        // The expiry task dies with the runtime it was spawned on: restart it if needed.
        self.ensure_expiry_task();
        let mut l = lock(&self.inner.leases);
        let now = Instant::now();
        match l.live.get_mut(&lease) {
            Some(x) if x.deadline > now => {
                x.deadline = now + x.ttl;
                Ok(())
            }
            _ => Err(StoreError::LeaseExpired(lease)),
        }
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        if !lock(&self.inner.leases).live.contains_key(&lease) {
            return Ok(());
        }
        self.blocking(move |inner| inner.end_leases_blocking(Some(&[lease])))
            .await
    }

    async fn campaign(&self, election: &str, value: &str, lease: LeaseId) -> Result<Leadership> {
        let key = candidate_key(election, lease);
        let prefix = format!("{election}/");
        // Put the candidate key, or take over this lease's existing one (same key: a
        // campaign again with the same lease keeps its place, as in etcd).
        let my_rev = loop {
            let (compare, existing) = match self.get(&key).await? {
                None => (Compare::Absent(key.clone()), None),
                Some(kv) => (
                    Compare::ModRevision(key.clone(), kv.mod_revision),
                    Some(kv.create_revision),
                ),
            };
            let op = Op::PutLeased(key.clone(), value.as_bytes().to_vec(), lease);
            let r = self.txn(vec![compare], vec![op]).await?;
            if r.succeeded {
                break existing.unwrap_or(r.revision);
            }
        };
        // Until won, dropping this future (or failing) withdraws the candidacy, as etcd
        // does when a Campaign call is cancelled.
        let mut withdraw = Withdraw {
            store: self.clone(),
            candidacy: Some(Leadership::new(election, key.clone(), my_rev, lease)),
        };
        loop {
            let snap = self.list(&prefix).await?;
            match snap.kvs.iter().find(|kv| kv.key == key) {
                Some(kv) if kv.create_revision == my_rev => {}
                // Deleted by the lease's end (or by hand): the candidacy is over.
                _ => return Err(StoreError::LeaseExpired(lease)),
            }
            let older: BTreeSet<&str> = snap
                .kvs
                .iter()
                .filter(|kv| kv.create_revision < my_rev)
                .map(|kv| kv.key.as_str())
                .collect();
            if older.is_empty() {
                // Past its deadline but not yet deleted by the expiry task: not a leader.
                if !lock(&self.inner.leases).alive(lease, Instant::now()) {
                    return Err(StoreError::LeaseExpired(lease));
                }
                withdraw.candidacy = None;
                return Ok(Leadership::new(election, key, my_rev, lease));
            }
            // Wait for an older candidate (or this one) to go, then look again.
            let mut events = self.watch(&prefix, snap.revision).await?;
            while let Some(ev) = events.next().await {
                match ev {
                    Ok(Event::Delete { key: k, .. }) if k == key || older.contains(k.as_str()) => {
                        break;
                    }
                    Ok(_) => {}
                    // Fell behind: look again.
                    Err(_) => break,
                }
            }
        }
    }

    async fn leader(&self, election: &str) -> Result<Option<String>> {
        let snap = self.list(&format!("{election}/")).await?;
        snap.kvs
            .into_iter()
            .min_by_key(|kv| kv.create_revision)
            .map(|kv| {
                String::from_utf8(kv.value).map_err(|_| {
                    StoreError::corrupt(format!("leader value of {:?} is not UTF-8", kv.key))
                })
            })
            .transpose()
    }

    async fn resign(&self, leadership: &Leadership) -> Result<()> {
        let key = leadership.key();
        loop {
            let Some(kv) = self.get(key).await? else {
                return Ok(());
            };
            if kv.create_revision != leadership.revision() {
                return Ok(());
            }
            let r = self
                .txn(
                    vec![Compare::ModRevision(key.to_string(), kv.mod_revision)],
                    vec![Op::Delete(key.to_string())],
                )
                .await?;
            if r.succeeded {
                return Ok(());
            }
        }
    }

    async fn watch(
        &self,
        prefix: &str,
        after_revision: i64,
    ) -> Result<BoxStream<'static, Result<Event>>> {
        let (replay, rx) = {
            let s = lock(&self.inner.shared);
            if after_revision < s.floor {
                return Err(StoreError::Compacted(after_revision));
            }
            let replay: Vec<Result<Event>> = s
                .ring
                .iter()
                .filter(|e| e.revision() > after_revision && e.key().starts_with(prefix))
                .cloned()
                .map(Ok)
                .collect();
            // Subscribed under the lock that publishes: the first live transaction is
            // the one right after the replayed ring.
            (replay, s.tx.subscribe())
        };
        let last = match replay.last() {
            Some(Ok(e)) => e.revision(),
            _ => after_revision,
        };
        let live = Live {
            rx,
            pending: VecDeque::new(),
            prefix: prefix.to_string(),
            after: after_revision,
            last,
            done: false,
        };
        let live = stream::unfold(live, |mut st| async move {
            let item = st.next().await?;
            Some((item, st))
        });
        Ok(stream::iter(replay).chain(live).boxed())
    }
}

impl EmbeddedStore {
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| StoreError::io_because("store write task failed", e))?
    }

    /// Starts the expiry task unless it runs (it ends with the store or its runtime).
    fn ensure_expiry_task(&self) {
        let mut task = lock(&self.inner.expiry);
        if task.as_ref().is_some_and(|t| !t.is_finished()) {
            return;
        }
        let weak = Arc::downgrade(&self.inner);
        let wake = self.inner.wake.clone();
        *task = Some(tokio::spawn(expiry_loop(weak, wake)));
    }
}

/// Sleeps until the earliest lease deadline (or a wake-up), then ends expired leases.
/// Holds only a weak reference between rounds, so dropping the store ends it.
async fn expiry_loop(weak: Weak<Inner>, wake: Arc<Notify>) {
    loop {
        let next = {
            let Some(inner) = weak.upgrade() else { return };
            let l = lock(&inner.leases);
            l.live.values().map(|l| l.deadline).min()
        };
        match next {
            Some(deadline) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(deadline.into()) => {}
                    _ = wake.notified() => continue,
                }
            }
            None => {
                wake.notified().await;
                continue;
            }
        }
        let Some(inner) = weak.upgrade() else { return };
        let res = tokio::task::spawn_blocking(move || inner.end_leases_blocking(None)).await;
        let err = match res {
            Ok(Ok(())) => continue,
            Ok(Err(e)) => e.to_string(),
            Err(e) => e.to_string(),
        };
        tracing::error!(error = %err, "embedded store: deleting keys of expired leases failed; retrying");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Deletes a candidate key whose campaign ended without winning (see `campaign`).
struct Withdraw {
    store: EmbeddedStore,
    candidacy: Option<Leadership>,
}

impl Drop for Withdraw {
    fn drop(&mut self) {
        if let Some(c) = self.candidacy.take()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            let store = self.store.clone();
            rt.spawn(async move {
                if let Err(e) = store.resign(&c).await {
                    tracing::warn!(key = c.key(), error = %e, "withdrawing a candidacy failed");
                }
            });
        }
    }
}

struct Live {
    rx: broadcast::Receiver<Arc<Vec<Event>>>,
    pending: VecDeque<Event>,
    prefix: String,
    after: i64,
    /// Revision of the last event delivered (or the watch's start).
    last: i64,
    done: bool,
}

impl Live {
    async fn next(&mut self) -> Option<Result<Event>> {
        loop {
            if let Some(e) = self.pending.pop_front() {
                self.last = e.revision();
                return Some(Ok(e));
            }
            if self.done {
                return None;
            }
            match self.rx.recv().await {
                Ok(batch) => self.pending.extend(
                    batch
                        .iter()
                        .filter(|e| e.revision() > self.after && e.key().starts_with(&self.prefix))
                        .cloned(),
                ),
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    self.done = true;
                    return Some(Err(StoreError::unavailable(format!(
                        "watch on {:?} fell {n} transactions behind; re-watch after revision {}",
                        self.prefix, self.last
                    ))));
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_roundtrip() {
        let b = [0u8, 1, 0x7f, 0x80, 0xff];
        assert_eq!(hex_decode(&hex_encode(&b)).unwrap(), b);
        assert!(hex_decode("0").is_none());
        assert!(hex_decode("zz").is_none());
    }

    #[test]
    fn state_roundtrip_text_and_binary() {
        let mut kvs = BTreeMap::new();
        for (k, v) in [("/a", b"text".to_vec()), ("/b", vec![0xff, 0, 1])] {
            kvs.insert(
                k.to_string(),
                KeyValue {
                    key: k.to_string(),
                    value: v,
                    create_revision: 1,
                    mod_revision: 2,
                },
            );
        }
        let bytes = encode_state(&kvs, 3, |_| false);
        let (back, rev) = decode_state(&bytes).unwrap();
        assert_eq!(rev, 3);
        assert_eq!(back, kvs);
    }

    #[test]
    fn decode_rejects_inconsistent_revisions() {
        let bad = br#"{"format":1,"revision":1,"kvs":[{"key":"/a","create_revision":1,"mod_revision":5,"value":"x"}]}"#;
        assert!(decode_state(bad).unwrap_err().contains("/a"));
    }
}
