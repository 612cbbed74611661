//! The contract every [`Store`] backend must honour, as runnable checks.
//!
//! Each check takes a key prefix (for example `/conformance/<test>/`) and works only
//! under `<prefix><check name>/`, so checks can run in parallel against one shared etcd
//! whose global revision other writers move at the same time: revisions are checked to be
//! monotonic and consistent with each other, never to be exact numbers.
//!
//! A violation panics with a message naming the check and what differed.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::task::JoinHandle;

use super::{Compare, Event, KeyValue, Leadership, LeaseId, Op, Result, Store, StoreError};

/// TTL of the leases of the lease and election checks (etcd's minimum with its default
/// election timeout is 2 s; shorter TTLs come back raised).
pub const LEASE_TTL: Duration = Duration::from_secs(2);
/// How late after its deadline a lease's keys may still be deleted (etcd checks for
/// expired leases every 500 ms, then commits the deletion through raft).
const EXPIRY_SLACK: Duration = Duration::from_millis(1500);
/// A lease id no backend hands out in these tests.
const UNKNOWN_LEASE: LeaseId = 0x7ead_beef_0bad_f00d;

/// How long a watch may take to deliver an event that was already written.
const EVENT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait to be sure that no further event comes.
const QUIET: Duration = Duration::from_millis(300);

type Events = BoxStream<'static, Result<Event>>;

fn ok<T>(what: &str, r: Result<T>) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("conformance: {what}: unexpected store error: {e}"),
    }
}

async fn get(store: &dyn Store, key: &str) -> Option<KeyValue> {
    ok(&format!("get {key}"), store.get(key).await)
}

async fn put(store: &dyn Store, key: &str, value: &[u8]) -> i64 {
    ok(&format!("put {key}"), store.put(key, value.to_vec()).await)
}

async fn keys(store: &dyn Store, prefix: &str) -> Vec<String> {
    ok(&format!("list {prefix}"), store.list(prefix).await)
        .kvs
        .into_iter()
        .map(|kv| kv.key)
        .collect()
}

/// The next event of a watch, or a panic naming `what` on timeout, error or end.
pub async fn next_event(events: &mut Events, what: &str) -> Event {
    match tokio::time::timeout(EVENT_TIMEOUT, events.next()).await {
        Ok(Some(Ok(e))) => e,
        Ok(Some(Err(e))) => panic!("conformance: {what}: watch yielded an error: {e}"),
        Ok(None) => panic!("conformance: {what}: watch stream ended"),
        Err(_) => panic!("conformance: {what}: no watch event within {EVENT_TIMEOUT:?}"),
    }
}

/// Panics if the watch delivers anything within a short quiet period.
pub async fn expect_quiet(events: &mut Events, what: &str) {
    if let Ok(item) = tokio::time::timeout(QUIET, events.next()).await {
        panic!("conformance: {what}: expected no more events, got {item:?}");
    }
}

/// `get`, `put`, `create`, `delete`: values and create/mod revisions.
pub async fn kv_basics(store: &dyn Store, prefix: &str) {
    let p = format!("{prefix}kv_basics/");
    let k = format!("{p}key");
    assert_eq!(
        get(store, &k).await,
        None,
        "kv_basics: fresh key must be absent"
    );

    let r1 = put(store, &k, b"one").await;
    assert!(
        r1 > 0,
        "kv_basics: put returned revision {r1}, expected > 0"
    );
    let kv = get(store, &k)
        .await
        .expect("kv_basics: key absent after put");
    assert_eq!(
        kv,
        KeyValue {
            key: k.clone(),
            value: b"one".to_vec(),
            create_revision: r1,
            mod_revision: r1,
        },
        "kv_basics: first put"
    );

    let r2 = put(store, &k, b"two").await;
    assert!(r2 > r1, "kv_basics: second put revision {r2} not > {r1}");
    let kv = get(store, &k)
        .await
        .expect("kv_basics: key absent after 2nd put");
    assert_eq!(kv.value, b"two", "kv_basics: value after overwrite");
    assert_eq!(
        kv.create_revision, r1,
        "kv_basics: create_revision must not move on overwrite"
    );
    assert_eq!(
        kv.mod_revision, r2,
        "kv_basics: mod_revision after overwrite"
    );

    let created = ok("create existing", store.create(&k, b"three".to_vec()).await);
    assert!(!created, "kv_basics: create of an existing key must fail");
    let kv = get(store, &k)
        .await
        .expect("kv_basics: key vanished after failed create");
    assert_eq!(
        (kv.value.as_slice(), kv.mod_revision),
        (&b"two"[..], r2),
        "kv_basics: a failed create must not write"
    );

    // Binary values survive.
    let bin = format!("{p}binary");
    let bytes = vec![0u8, 0xff, 0x80, b'\n', 0];
    ok("put binary", store.put(&bin, bytes.clone()).await);
    assert_eq!(
        get(store, &bin).await.map(|kv| kv.value),
        Some(bytes),
        "kv_basics: binary value"
    );
    // Empty values are values, not absence.
    let empty = format!("{p}empty");
    ok("put empty", store.put(&empty, Vec::new()).await);
    assert_eq!(
        get(store, &empty).await.map(|kv| kv.value),
        Some(Vec::new()),
        "kv_basics: an empty value must read back as present and empty"
    );

    let r3 = ok("delete", store.delete(&k).await);
    assert!(r3 > r2, "kv_basics: delete revision {r3} not > {r2}");
    assert_eq!(
        get(store, &k).await,
        None,
        "kv_basics: key present after delete"
    );

    let r4 = ok("delete absent", store.delete(&k).await);
    assert!(r4 >= r3, "kv_basics: revision went back from {r3} to {r4}");
    assert_eq!(
        get(store, &k).await,
        None,
        "kv_basics: deleting an absent key"
    );

    let created = ok(
        "create after delete",
        store.create(&k, b"again".to_vec()).await,
    );
    assert!(created, "kv_basics: create of a deleted key must succeed");
    let kv = get(store, &k)
        .await
        .expect("kv_basics: key absent after re-create");
    assert!(
        kv.create_revision > r3 && kv.create_revision == kv.mod_revision,
        "kv_basics: a re-created key starts a new life: create={} mod={} (deleted at {r3})",
        kv.create_revision,
        kv.mod_revision
    );
}

/// Successful writes get strictly increasing revisions; failed transactions report the
/// current revision and write nothing; a snapshot's revision covers what it lists.
pub async fn revisions(store: &dyn Store, prefix: &str) {
    let p = format!("{prefix}revisions/");
    let mut last = 0;
    for i in 0..10 {
        let r = put(store, &format!("{p}k{}", i % 3), format!("v{i}").as_bytes()).await;
        assert!(
            r > last,
            "revisions: write {i} got revision {r}, not > {last}"
        );
        last = r;
    }
    let snap = ok("list", store.list(&p).await);
    assert!(
        snap.revision >= last,
        "revisions: list revision {} older than the last write {last}",
        snap.revision
    );
    for kv in &snap.kvs {
        assert!(
            kv.create_revision <= kv.mod_revision && kv.mod_revision <= snap.revision,
            "revisions: {kv:?} does not fit snapshot revision {}",
            snap.revision
        );
    }
    let failed = ok(
        "failing txn",
        store
            .txn(
                vec![Compare::Absent(format!("{p}k0"))],
                vec![Op::Put(format!("{p}k0"), b"never".to_vec())],
            )
            .await,
    );
    assert!(
        !failed.succeeded,
        "revisions: txn on a failing compare succeeded"
    );
    assert!(
        failed.revision >= last,
        "revisions: failed txn reported revision {} older than {last}",
        failed.revision
    );
    let after = ok("list", store.list(&p).await);
    assert_eq!(after.kvs, snap.kvs, "revisions: a failed txn changed data");
}

/// `list` returns exactly the keys under the prefix, sorted, and not keys of a sibling
/// prefix that merely starts with the same characters.
pub async fn list_prefix(store: &dyn Store, prefix: &str) {
    let p = format!("{prefix}list_prefix/");
    let inside = [
        format!("{p}a/b/z"),
        format!("{p}a/b/"),
        format!("{p}a/b/x/1"),
        format!("{p}a/b/m"),
    ];
    let outside = [
        format!("{p}a/b"),
        format!("{p}a/bc"),
        format!("{p}a/bc/x"),
        format!("{p}a/a"),
        format!("{p}a/c"),
    ];
    for k in inside.iter().chain(outside.iter()) {
        put(store, k, k.as_bytes()).await;
    }
    let snap = ok("list", store.list(&format!("{p}a/b/")).await);
    let mut want: Vec<String> = inside.to_vec();
    want.sort();
    let got: Vec<String> = snap.kvs.iter().map(|kv| kv.key.clone()).collect();
    assert_eq!(
        got, want,
        "list_prefix: keys of {p}a/b/ (sorted, no siblings)"
    );
    for kv in &snap.kvs {
        assert_eq!(
            kv.value,
            kv.key.as_bytes(),
            "list_prefix: value of {}",
            kv.key
        );
    }
    let all = keys(store, &p).await;
    assert_eq!(
        all.len(),
        inside.len() + outside.len(),
        "list_prefix: all keys"
    );
    assert!(
        all.windows(2).all(|w| w[0] < w[1]),
        "list_prefix: not sorted: {all:?}"
    );
    let none = ok("list empty", store.list(&format!("{p}nothing/")).await);
    assert!(
        none.kvs.is_empty(),
        "list_prefix: empty prefix listed {:?}",
        none.kvs
    );
    assert!(
        none.revision > 0,
        "list_prefix: empty list must still carry the revision"
    );
}

/// Transactions are all-or-nothing; `Absent` and `ModRevision` compares; one revision
/// per transaction.
pub async fn txn_semantics(store: &dyn Store, prefix: &str) {
    let p = format!("{prefix}txn/");
    let (a, b, c) = (format!("{p}a"), format!("{p}b"), format!("{p}c"));
    let rb = put(store, &b, b"b1").await;

    // One compare holds, one does not: nothing is applied.
    let res = ok(
        "txn mixed compares",
        store
            .txn(
                vec![
                    Compare::Absent(a.clone()),
                    Compare::ModRevision(b.clone(), rb + 1000),
                ],
                vec![
                    Op::Put(a.clone(), b"a".to_vec()),
                    Op::Put(c.clone(), b"c".to_vec()),
                    Op::Delete(b.clone()),
                ],
            )
            .await,
    );
    assert!(
        !res.succeeded,
        "txn: succeeded although ModRevision was wrong"
    );
    assert_eq!(get(store, &a).await, None, "txn: failed txn wrote {a}");
    assert_eq!(get(store, &c).await, None, "txn: failed txn wrote {c}");
    assert!(
        get(store, &b).await.is_some(),
        "txn: failed txn deleted {b}"
    );

    // ModRevision of an absent key never holds, not even against 0.
    for r in [0, rb] {
        let res = ok(
            "txn ModRevision absent",
            store
                .txn(
                    vec![Compare::ModRevision(a.clone(), r)],
                    vec![Op::Put(a.clone(), b"x".to_vec())],
                )
                .await,
        );
        assert!(
            !res.succeeded,
            "txn: ModRevision({a}, {r}) held for an absent key"
        );
    }
    // Absent of an existing key does not hold.
    let res = ok(
        "txn Absent existing",
        store
            .txn(
                vec![Compare::Absent(b.clone())],
                vec![Op::Put(b.clone(), b"x".to_vec())],
            )
            .await,
    );
    assert!(!res.succeeded, "txn: Absent({b}) held for an existing key");

    // All compares hold: every op applied at one revision.
    let res = ok(
        "txn all hold",
        store
            .txn(
                vec![
                    Compare::Absent(a.clone()),
                    Compare::ModRevision(b.clone(), rb),
                ],
                vec![
                    Op::Put(a.clone(), b"a".to_vec()),
                    Op::Put(c.clone(), b"c".to_vec()),
                    Op::Delete(b.clone()),
                ],
            )
            .await,
    );
    assert!(res.succeeded, "txn: compares all held but txn failed");
    assert!(
        res.revision > rb,
        "txn: revision {} not > {rb}",
        res.revision
    );
    let ka = get(store, &a).await.expect("txn: a missing");
    let kc = get(store, &c).await.expect("txn: c missing");
    assert_eq!(get(store, &b).await, None, "txn: b not deleted");
    assert_eq!(
        (ka.mod_revision, kc.mod_revision, ka.create_revision),
        (res.revision, res.revision, res.revision),
        "txn: all writes of one txn carry the txn's revision"
    );

    // CAS on the current mod revision: succeeds once, then the old revision is stale.
    let cas = |r: i64, v: &'static [u8]| {
        store.txn(
            vec![Compare::ModRevision(a.clone(), r)],
            vec![Op::Put(a.clone(), v.to_vec())],
        )
    };
    let first = ok("cas 1", cas(ka.mod_revision, b"a2").await);
    assert!(
        first.succeeded,
        "txn: CAS on the current mod_revision failed"
    );
    let second = ok("cas 2", cas(ka.mod_revision, b"a3").await);
    assert!(
        !second.succeeded,
        "txn: CAS on a stale mod_revision succeeded"
    );
    let now = get(store, &a).await.expect("txn: a missing after CAS");
    assert_eq!(
        (now.value.as_slice(), now.mod_revision, now.create_revision),
        (&b"a2"[..], first.revision, ka.create_revision),
        "txn: state after CAS"
    );

    // No compares: unconditional.
    let res = ok(
        "txn unconditional",
        store.txn(vec![], vec![Op::Delete(a.clone())]).await,
    );
    assert!(res.succeeded, "txn: a txn without compares must succeed");
    assert_eq!(get(store, &a).await, None, "txn: unconditional delete");
}

/// `DeletePrefix` removes exactly the keys under the prefix, in one revision.
pub async fn delete_prefix(store: &dyn Store, prefix: &str) {
    let p = format!("{prefix}delete_prefix/");
    let gone = [
        format!("{p}x/1"),
        format!("{p}x/2"),
        format!("{p}x/sub/3"),
        format!("{p}x/"),
    ];
    let kept = [
        format!("{p}x"),
        format!("{p}xy"),
        format!("{p}xy/1"),
        format!("{p}w"),
    ];
    for k in gone.iter().chain(kept.iter()) {
        put(store, k, b"v").await;
    }
    let before = ok("list", store.list(&p).await);
    let res = ok(
        "txn DeletePrefix",
        store
            .txn(vec![], vec![Op::DeletePrefix(format!("{p}x/"))])
            .await,
    );
    assert!(res.succeeded, "delete_prefix: unconditional txn failed");
    assert!(
        res.revision > before.revision,
        "delete_prefix: revision {} not > {}",
        res.revision,
        before.revision
    );
    let mut want: Vec<String> = kept.to_vec();
    want.sort();
    assert_eq!(keys(store, &p).await, want, "delete_prefix: what remains");
    // Deleting an empty prefix range is fine and changes nothing.
    let res = ok(
        "txn DeletePrefix empty",
        store
            .txn(vec![], vec![Op::DeletePrefix(format!("{p}x/"))])
            .await,
    );
    assert!(res.succeeded, "delete_prefix: deleting nothing failed");
    assert_eq!(
        keys(store, &p).await,
        want,
        "delete_prefix: second delete changed data"
    );
}

/// A watch sees puts and deletes under its prefix, in order, with the revisions the
/// writes returned, and nothing from sibling prefixes.
pub async fn watch_events(store: &dyn Store, prefix: &str) {
    let p = format!("{prefix}watch_events/");
    let w = format!("{p}w/");
    let sibling = format!("{p}wx");
    let start = ok("list", store.list(&w).await);
    let mut events = ok("watch", store.watch(&w, start.revision).await);

    let (a, b, c) = (format!("{w}a"), format!("{w}b"), format!("{w}c"));
    let r1 = put(store, &a, b"a1").await;
    put(store, &sibling, b"noise").await;
    let r2 = put(store, &b, b"b1").await;
    let r3 = put(store, &a, b"a2").await;
    let r4 = ok("delete", store.delete(&a).await);
    let r5 = ok(
        "txn",
        store
            .txn(
                vec![],
                vec![Op::Put(c.clone(), b"c1".to_vec()), Op::Delete(b.clone())],
            )
            .await,
    )
    .revision;

    let kv = |k: &str, v: &[u8], cr: i64, mr: i64| {
        Event::Put(KeyValue {
            key: k.to_string(),
            value: v.to_vec(),
            create_revision: cr,
            mod_revision: mr,
        })
    };
    let want = [
        kv(&a, b"a1", r1, r1),
        kv(&b, b"b1", r2, r2),
        kv(&a, b"a2", r1, r3),
        Event::Delete {
            key: a.clone(),
            mod_revision: r4,
        },
    ];
    for (i, want) in want.iter().enumerate() {
        let got = next_event(&mut events, &format!("watch_events: event {i}")).await;
        assert_eq!(&got, want, "watch_events: event {i}");
    }
    // The two events of one txn share its revision; their order within it is not part of
    // the contract.
    let mut last_two = BTreeSet::new();
    for i in 4..6 {
        let got = next_event(&mut events, &format!("watch_events: event {i}")).await;
        assert_eq!(got.revision(), r5, "watch_events: event {i} revision");
        last_two.insert(format!("{got:?}"));
    }
    let want_two: BTreeSet<String> = [
        format!("{:?}", kv(&c, b"c1", r5, r5)),
        format!(
            "{:?}",
            Event::Delete {
                key: b.clone(),
                mod_revision: r5
            }
        ),
    ]
    .into_iter()
    .collect();
    assert_eq!(
        last_two, want_two,
        "watch_events: events of the multi-op txn"
    );
    expect_quiet(&mut events, "watch_events: after the last write").await;
}

/// A watch from an older revision replays what came after it, then continues live,
/// with no gap and no duplicate.
pub async fn watch_resume(store: &dyn Store, prefix: &str) {
    let p = format!("{prefix}watch_resume/");
    let mut revs = Vec::new();
    for i in 0..6 {
        revs.push(put(store, &format!("{p}k{i}"), format!("v{i}").as_bytes()).await);
    }
    // Resume after the third write: replays writes 3, 4, 5.
    let mut events = ok("watch resume", store.watch(&p, revs[2]).await);
    // A watch from the newest revision replays nothing.
    let mut tail = ok("watch tail", store.watch(&p, revs[5]).await);
    // Written while (possibly) replaying: must follow the replay exactly once.
    let mut live = Vec::new();
    for i in 6..9 {
        live.push(put(store, &format!("{p}k{i}"), format!("v{i}").as_bytes()).await);
    }
    let want: Vec<(String, i64)> = (3..9)
        .map(|i| format!("{p}k{i}"))
        .zip(revs[3..].iter().chain(live.iter()).copied())
        .collect();
    let mut got = Vec::new();
    for i in 0..want.len() {
        let e = next_event(&mut events, &format!("watch_resume: event {i}")).await;
        got.push((e.key().to_string(), e.revision()));
    }
    assert_eq!(
        got, want,
        "watch_resume: replay then live, no gap, no duplicate"
    );
    expect_quiet(&mut events, "watch_resume: after the last write").await;

    let mut got = Vec::new();
    for i in 0..3 {
        let e = next_event(&mut tail, &format!("watch_resume: tail event {i}")).await;
        got.push((e.key().to_string(), e.revision()));
    }
    assert_eq!(
        got,
        want[3..],
        "watch_resume: watch from the newest revision"
    );
    expect_quiet(&mut tail, "watch_resume: tail after the last write").await;

    // A deletion is replayed too.
    let rd = ok("delete", store.delete(&format!("{p}k0")).await);
    let mut again = ok("watch again", store.watch(&p, rd - 1).await);
    let e = next_event(&mut again, "watch_resume: replayed delete").await;
    assert_eq!(
        e,
        Event::Delete {
            key: format!("{p}k0"),
            mod_revision: rd
        },
        "watch_resume: replayed delete"
    );
}

/// `n` tasks `create` the same key at once: exactly one wins, and its value stays.
pub async fn cas_race(store: Arc<dyn Store>, prefix: &str) {
    let n = 32;
    let key = format!("{prefix}cas_race/leader");
    let barrier = Arc::new(tokio::sync::Barrier::new(n));
    let mut tasks = Vec::new();
    for i in 0..n {
        let (store, key, barrier) = (store.clone(), key.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let won = ok(
                "create",
                store.create(&key, format!("task{i}").into_bytes()).await,
            );
            (i, won)
        }));
    }
    let mut winners = Vec::new();
    for t in tasks {
        let (i, won) = t.await.expect("cas_race: task panicked");
        if won {
            winners.push(i);
        }
    }
    assert_eq!(
        winners.len(),
        1,
        "cas_race: winners {winners:?}, expected exactly one"
    );
    let kv = store.get(&key).await;
    let kv = ok("get", kv).expect("cas_race: key missing");
    assert_eq!(
        kv.value,
        format!("task{}", winners[0]).into_bytes(),
        "cas_race: value is not the winner's"
    );
    assert_eq!(
        kv.create_revision, kv.mod_revision,
        "cas_race: key was written more than once"
    );
}

/// Two groups of 50 tasks (think: two agents, possibly two store handles) allocate
/// addresses from one pool with create-if-absent loops; no address is handed out twice
/// and every task gets one.
pub async fn allocation_race(a: Arc<dyn Store>, b: Arc<dyn Store>, prefix: &str) {
    const PER_GROUP: usize = 50;
    const POOL: usize = 120;
    let p = format!("{prefix}allocation_race/");
    let barrier = Arc::new(tokio::sync::Barrier::new(2 * PER_GROUP));
    let mut tasks = Vec::new();
    for (group, store) in [a.clone(), b].into_iter().enumerate() {
        for i in 0..PER_GROUP {
            let (store, p, barrier) = (store.clone(), p.clone(), barrier.clone());
            let owner = format!("g{group}-t{i}");
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                for addr in 0..POOL {
                    let key = format!("{p}10.0.0.{addr}");
                    let won = store.create(&key, owner.clone().into_bytes()).await;
                    if ok(&format!("allocation_race: create {key}"), won) {
                        return (owner, Some(addr));
                    }
                }
                (owner, None)
            }));
        }
    }
    let mut given = std::collections::BTreeMap::new();
    for t in tasks {
        let (owner, addr) = t.await.expect("allocation_race: task panicked");
        let addr = addr.unwrap_or_else(|| panic!("allocation_race: {owner} got no address"));
        if let Some(other) = given.insert(addr, owner.clone()) {
            panic!("allocation_race: address {addr} handed to both {other} and {owner}");
        }
    }
    assert_eq!(given.len(), 2 * PER_GROUP, "allocation_race: allocations");
    let snap = ok("list", a.list(&p).await);
    assert_eq!(
        snap.kvs.len(),
        2 * PER_GROUP,
        "allocation_race: stored allocations"
    );
    for kv in snap.kvs {
        let addr: usize = kv.key[p.len() + "10.0.0.".len()..]
            .parse()
            .expect("allocation_race: key format");
        assert_eq!(
            given.get(&addr).map(|o| o.as_bytes()),
            Some(kv.value.as_slice()),
            "allocation_race: stored owner of {}",
            kv.key
        );
    }
}

/// Runs a watch from `after` and expects [`StoreError::Compacted`], either from `watch`
/// itself or as the stream's first item (etcd reports it asynchronously).
pub async fn expect_compacted(store: &dyn Store, prefix: &str, after: i64) {
    match store.watch(prefix, after).await {
        Err(StoreError::Compacted(_)) => {}
        Err(e) => panic!("conformance: watch after {after}: expected Compacted, got {e}"),
        Ok(mut events) => match tokio::time::timeout(EVENT_TIMEOUT, events.next()).await {
            Ok(Some(Err(StoreError::Compacted(_)))) => {}
            other => panic!("conformance: watch after {after}: expected Compacted, got {other:?}"),
        },
    }
}

/// Every check above, concurrently, each under its own sub-prefix of `prefix`.
pub async fn run_all(store: Arc<dyn Store>, prefix: &str) {
    let s: &dyn Store = store.as_ref();
    futures::join!(
        kv_basics(s, prefix),
        revisions(s, prefix),
        list_prefix(s, prefix),
        txn_semantics(s, prefix),
        delete_prefix(s, prefix),
        watch_events(s, prefix),
        watch_resume(s, prefix),
        cas_race(store.clone(), prefix),
        allocation_race(store.clone(), store.clone(), prefix),
    );
}

/// Refreshes `lease` every TTL/3 until aborted; ends with the error if a refresh fails.
fn keep_alive_every(store: Arc<dyn Store>, lease: LeaseId) -> JoinHandle<StoreError> {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(LEASE_TTL / 3).await;
            if let Err(e) = store.keep_alive(lease).await {
                return e;
            }
        }
    })
}

/// Stops a [`keep_alive_every`] task; panics if it had failed.
fn stop_keep_alive(task: JoinHandle<StoreError>, what: &str) {
    if task.is_finished() {
        // A finished task has its result ready; `now_or_never` cannot block here.
        let e = futures::FutureExt::now_or_never(task).and_then(|r| r.ok());
        panic!("conformance: {what}: keep-alive failed: {e:?}");
    }
    task.abort();
}

fn expect_lease_expired<T: std::fmt::Debug>(r: Result<T>, lease: LeaseId, what: &str) {
    match r {
        Err(StoreError::LeaseExpired(id)) => {
            assert_eq!(
                id, lease,
                "conformance: {what}: LeaseExpired names the lease"
            )
        }
        other => panic!("conformance: {what}: expected LeaseExpired({lease:x}), got {other:?}"),
    }
}

/// A leased key lives while its lease is kept alive (more than two TTLs), and is deleted
/// (a watched Delete; all keys of the lease in one revision) within TTL + slack after the
/// last refresh; a plain put detaches a key from its lease; a dead lease cannot be
/// refreshed or written with.
pub async fn lease_keep_alive_and_expiry(store: Arc<dyn Store>, prefix: &str) {
    let s: &dyn Store = store.as_ref();
    let p = format!("{prefix}lease_expiry/");
    let (k1, k2, detached) = (format!("{p}k1"), format!("{p}k2"), format!("{p}detached"));
    let lease = ok("grant", s.grant_lease(LEASE_TTL).await);
    let start = ok("list", s.list(&p).await).revision;
    let mut events = ok("watch", s.watch(&p, start).await);
    ok(
        "put leased",
        s.txn(
            vec![],
            vec![
                Op::PutLeased(k1.clone(), b"1".to_vec(), lease),
                Op::PutLeased(k2.clone(), b"2".to_vec(), lease),
                Op::PutLeased(detached.clone(), b"d".to_vec(), lease),
            ],
        )
        .await,
    );
    // A plain put of a leased key takes it off the lease (etcd semantics).
    // Four Put events: three from the txn, one from the plain put.
    put(s, &detached, b"plain").await;
    for i in 0..4 {
        let e = next_event(&mut events, &format!("lease_expiry: put event {i}")).await;
        assert!(
            matches!(e, Event::Put(_)),
            "lease_expiry: put event {i}: {e:?}"
        );
    }

    // Kept alive every TTL/3 for 2.5 TTLs: the keys stay.
    let until = Instant::now() + LEASE_TTL * 5 / 2;
    let mut last_refresh = Instant::now();
    while Instant::now() < until {
        tokio::time::sleep(LEASE_TTL / 3).await;
        ok("keep_alive", s.keep_alive(lease).await);
        last_refresh = Instant::now();
        assert!(
            get(s, &k1).await.is_some() && get(s, &k2).await.is_some(),
            "lease_expiry: a leased key vanished while its lease was kept alive"
        );
    }

    // Not refreshed any more: both keys go in one revision, within TTL + slack.
    let mut deleted = Vec::new();
    while deleted.len() < 2 {
        match next_event(&mut events, "lease_expiry: delete on expiry").await {
            Event::Delete { key, mod_revision } => deleted.push((key, mod_revision)),
            other => panic!("lease_expiry: expected a Delete, got {other:?}"),
        }
    }
    let took = last_refresh.elapsed();
    assert!(
        took >= LEASE_TTL - Duration::from_millis(100),
        "lease_expiry: keys deleted {took:?} after the last refresh, before the TTL {LEASE_TTL:?}"
    );
    assert!(
        took <= LEASE_TTL + EXPIRY_SLACK,
        "lease_expiry: keys deleted only {took:?} after the last refresh (TTL {LEASE_TTL:?})"
    );
    deleted.sort();
    assert_eq!(
        deleted.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>(),
        vec![k1.clone(), k2.clone()],
        "lease_expiry: deleted keys"
    );
    assert_eq!(
        deleted[0].1, deleted[1].1,
        "lease_expiry: the keys of one lease are deleted in one revision"
    );
    assert!(get(s, &k1).await.is_none(), "lease_expiry: k1 still there");
    assert_eq!(
        get(s, &detached).await.map(|kv| kv.value),
        Some(b"plain".to_vec()),
        "lease_expiry: a key re-put without lease must survive the lease"
    );
    expect_quiet(&mut events, "lease_expiry: after the expiry").await;

    expect_lease_expired(s.keep_alive(lease).await, lease, "keep_alive after expiry");
    expect_lease_expired(
        s.txn(
            vec![],
            vec![Op::PutLeased(k1.clone(), b"x".to_vec(), lease)],
        )
        .await,
        lease,
        "put with an expired lease",
    );
    assert!(
        get(s, &k1).await.is_none(),
        "lease_expiry: put with a dead lease wrote"
    );
    ok("revoke expired", s.revoke_lease(lease).await);
}

/// Revoking deletes the lease's keys at once (one revision, watched); it is idempotent;
/// a revoked lease cannot be refreshed.
pub async fn lease_revoke(store: &dyn Store, prefix: &str) {
    let p = format!("{prefix}lease_revoke/");
    let lease = ok("grant", store.grant_lease(Duration::from_secs(30)).await);
    let other = ok("grant", store.grant_lease(Duration::from_secs(30)).await);
    assert_ne!(lease, other, "lease_revoke: two grants gave one id");
    let (a, b, c) = (format!("{p}a"), format!("{p}b"), format!("{p}c"));
    let r = ok(
        "put leased",
        store
            .txn(
                vec![],
                vec![
                    Op::PutLeased(a.clone(), b"a".to_vec(), lease),
                    Op::PutLeased(b.clone(), b"b".to_vec(), lease),
                    Op::PutLeased(c.clone(), b"c".to_vec(), other),
                ],
            )
            .await,
    );
    let kv = get(store, &a)
        .await
        .expect("lease_revoke: leased key missing");
    assert_eq!(
        (kv.value.as_slice(), kv.create_revision, kv.mod_revision),
        (&b"a"[..], r.revision, r.revision),
        "lease_revoke: a leased key is a key like any other"
    );
    let mut events = ok("watch", store.watch(&p, r.revision).await);
    ok("keep_alive", store.keep_alive(lease).await);
    ok("revoke", store.revoke_lease(lease).await);
    assert!(
        get(store, &a).await.is_none(),
        "lease_revoke: a not deleted by revoke"
    );
    assert!(
        get(store, &b).await.is_none(),
        "lease_revoke: b not deleted by revoke"
    );
    assert!(
        get(store, &c).await.is_some(),
        "lease_revoke: revoke deleted another lease's key"
    );
    let e1 = next_event(&mut events, "lease_revoke: delete 1").await;
    let e2 = next_event(&mut events, "lease_revoke: delete 2").await;
    for e in [&e1, &e2] {
        assert!(
            matches!(e, Event::Delete { .. }),
            "lease_revoke: expected a Delete, got {e:?}"
        );
        assert!(e.revision() > r.revision, "lease_revoke: delete revision");
    }
    assert_eq!(
        e1.revision(),
        e2.revision(),
        "lease_revoke: one revision for the lease's keys"
    );
    expect_quiet(&mut events, "lease_revoke: after revoke").await;
    ok("revoke again", store.revoke_lease(lease).await);
    ok("revoke unknown", store.revoke_lease(UNKNOWN_LEASE).await);
    expect_lease_expired(
        store.keep_alive(lease).await,
        lease,
        "keep_alive after revoke",
    );
    ok("keep_alive other", store.keep_alive(other).await);
    ok("revoke other", store.revoke_lease(other).await);
    assert!(
        get(store, &c).await.is_none(),
        "lease_revoke: c not deleted by revoke"
    );
}

/// A lease that was never granted: refresh and writes fail with LeaseExpired and write
/// nothing (the check applies only when the transaction's compares hold, as in etcd).
pub async fn lease_unknown(store: &dyn Store, prefix: &str) {
    let p = format!("{prefix}lease_unknown/");
    let k = format!("{p}k");
    expect_lease_expired(
        store.keep_alive(UNKNOWN_LEASE).await,
        UNKNOWN_LEASE,
        "keep_alive unknown",
    );
    let before = ok("list", store.list(&p).await).revision;
    expect_lease_expired(
        store
            .txn(
                vec![],
                vec![
                    Op::Put(format!("{p}plain"), b"p".to_vec()),
                    Op::PutLeased(k.clone(), b"v".to_vec(), UNKNOWN_LEASE),
                ],
            )
            .await,
        UNKNOWN_LEASE,
        "put with an unknown lease",
    );
    assert!(
        keys(store, &p).await.is_empty(),
        "lease_unknown: a failed txn wrote"
    );
    let res = ok(
        "txn with failing compare",
        store
            .txn(
                vec![Compare::ModRevision(format!("{p}absent"), 1)],
                vec![Op::PutLeased(k.clone(), b"v".to_vec(), UNKNOWN_LEASE)],
            )
            .await,
    );
    assert!(
        !res.succeeded,
        "lease_unknown: txn with a failing compare succeeded"
    );
    assert!(res.revision >= before, "lease_unknown: revision went back");
    expect_lease_expired(
        store
            .campaign(&format!("{p}election"), "x", UNKNOWN_LEASE)
            .await,
        UNKNOWN_LEASE,
        "campaign with an unknown lease",
    );
    assert_eq!(
        ok("leader", store.leader(&format!("{p}election")).await),
        None,
        "lease_unknown: a failed campaign left a leader"
    );
}

async fn campaign_task(
    store: Arc<dyn Store>,
    election: String,
    value: &'static str,
    lease: LeaseId,
) -> JoinHandle<Result<Leadership>> {
    tokio::spawn(async move { store.campaign(&election, value, lease).await })
}

/// The result of a campaign expected to complete within `within`.
async fn won(
    task: &mut JoinHandle<Result<Leadership>>,
    within: Duration,
    what: &str,
) -> Leadership {
    match tokio::time::timeout(within, task).await {
        Ok(Ok(Ok(l))) => l,
        Ok(Ok(Err(e))) => panic!("conformance: {what}: campaign failed: {e}"),
        Ok(Err(e)) => panic!("conformance: {what}: campaign task failed: {e}"),
        Err(_) => panic!("conformance: {what}: campaign not won within {within:?}"),
    }
}

async fn still_waiting(task: &mut JoinHandle<Result<Leadership>>, what: &str) {
    if let Ok(r) = tokio::time::timeout(Duration::from_secs(1), task).await {
        panic!("conformance: {what}: campaign completed while another candidate leads: {r:?}");
    }
}

struct Candidate {
    store: Arc<dyn Store>,
    lease: LeaseId,
    name: &'static str,
    keeper: Option<JoinHandle<StoreError>>,
}

/// Two candidates (separate leases, possibly separate store handles) campaign at once:
/// exactly one wins and `leader()` reports its value; the other wins only after the first
/// resigns. Then the first campaigns again and wins only once the leader's lease expires.
pub async fn election(a: Arc<dyn Store>, b: Arc<dyn Store>, prefix: &str) {
    let election = format!("{prefix}election/leader");
    let deadline = Duration::from_secs(10);
    assert_eq!(
        ok("leader before", a.leader(&election).await),
        None,
        "election: leader of an election without candidates"
    );
    let mut cands = Vec::new();
    for (store, name) in [(a, "a"), (b, "b")] {
        let lease = ok("grant", store.grant_lease(LEASE_TTL).await);
        let keeper = Some(keep_alive_every(store.clone(), lease));
        cands.push(Candidate {
            store,
            lease,
            name,
            keeper,
        });
    }
    assert_ne!(
        cands[0].lease, cands[1].lease,
        "election: two grants gave one id"
    );

    // Both at once: exactly one wins.
    let mut ta = campaign_task(
        cands[0].store.clone(),
        election.clone(),
        "a",
        cands[0].lease,
    )
    .await;
    let mut tb = campaign_task(
        cands[1].store.clone(),
        election.clone(),
        "b",
        cands[1].lease,
    )
    .await;
    let (won_first, mut waiting, a_first) = tokio::time::timeout(deadline, async {
        tokio::select! {
            r = &mut ta => (r, tb, true),
            r = &mut tb => (r, ta, false),
        }
    })
    .await
    .expect("election: no candidate won within 10 s");
    let leadership = match won_first {
        Ok(Ok(l)) => l,
        other => panic!("election: the first campaign failed: {other:?}"),
    };
    let second = cands.remove(usize::from(a_first));
    let first = cands.remove(0);
    assert_eq!(
        leadership.lease(),
        first.lease,
        "election: leadership's lease"
    );
    assert!(
        leadership.key().starts_with(&format!("{election}/")),
        "election: leader key {:?} not under the election",
        leadership.key()
    );
    still_waiting(&mut waiting, "election: the second candidate").await;
    assert_eq!(
        ok("leader", second.store.leader(&election).await).as_deref(),
        Some(first.name),
        "election: leader() while the first leads"
    );

    // The first resigns: the second wins.
    ok(
        "resign",
        leadership.clone().resign(first.store.as_ref()).await,
    );
    let second_l = won(&mut waiting, deadline, "election: second after resign").await;
    assert_eq!(
        second_l.lease(),
        second.lease,
        "election: second leadership's lease"
    );
    assert_ne!(
        second_l.key(),
        leadership.key(),
        "election: both leaders share a key"
    );
    assert_eq!(
        ok("leader", first.store.leader(&election).await).as_deref(),
        Some(second.name),
        "election: leader() after the first resigned"
    );
    // Resigning again is harmless and leaves the new leader alone.
    ok("resign again", first.store.resign(&leadership).await);
    assert_eq!(
        ok("leader", first.store.leader(&election).await).as_deref(),
        Some(second.name),
        "election: a stale resign removed the new leader"
    );

    // The first campaigns again; the second's lease is let expire: the first wins.
    let mut again = campaign_task(
        first.store.clone(),
        election.clone(),
        first.name,
        first.lease,
    )
    .await;
    still_waiting(&mut again, "election: campaign behind the second").await;
    stop_keep_alive(second.keeper.expect("keeper"), "election: second");
    let stopped = Instant::now();
    let l = won(
        &mut again,
        LEASE_TTL + EXPIRY_SLACK + Duration::from_secs(5),
        "election: campaign after the leader's lease expired",
    )
    .await;
    let took = stopped.elapsed();
    // The last refresh was at most TTL/3 before the keeper stopped.
    assert!(
        took >= LEASE_TTL * 2 / 3 - Duration::from_millis(100),
        "election: won {took:?} after the leader stopped refreshing, before its TTL ran out"
    );
    assert_eq!(l.lease(), first.lease, "election: the winner's lease");
    assert_eq!(
        ok("leader", second.store.leader(&election).await).as_deref(),
        Some(first.name),
        "election: leader() after the old leader's lease expired"
    );
    expect_lease_expired(
        second.store.keep_alive(second.lease).await,
        second.lease,
        "election: the old leader's keep_alive",
    );
    ok("resign", l.resign(first.store.as_ref()).await);
    assert_eq!(
        ok("leader", first.store.leader(&election).await),
        None,
        "election: leader() after the last candidate resigned"
    );
    stop_keep_alive(first.keeper.expect("keeper"), "election: first");
    ok("revoke", first.store.revoke_lease(first.lease).await);
}

/// A candidate waiting in a campaign whose lease expires gets LeaseExpired instead of
/// waiting on (or winning with a dead key).
pub async fn campaign_lease_lost(store: Arc<dyn Store>, prefix: &str) {
    let election = format!("{prefix}campaign_lease_lost/leader");
    let leader_lease = ok("grant", store.grant_lease(LEASE_TTL).await);
    let keeper = keep_alive_every(store.clone(), leader_lease);
    let leader = ok(
        "campaign",
        store.campaign(&election, "leader", leader_lease).await,
    );
    let lease = ok("grant", store.grant_lease(LEASE_TTL).await);
    let mut task = campaign_task(store.clone(), election.clone(), "waiter", lease).await;
    match tokio::time::timeout(LEASE_TTL + EXPIRY_SLACK + Duration::from_secs(5), &mut task).await {
        Ok(Ok(r)) => expect_lease_expired(r, lease, "campaign_lease_lost: waiting campaign"),
        Ok(Err(e)) => panic!("conformance: campaign_lease_lost: task failed: {e}"),
        Err(_) => panic!(
            "conformance: campaign_lease_lost: campaign still waiting after its lease expired"
        ),
    }
    assert_eq!(
        ok("leader", store.leader(&election).await).as_deref(),
        Some("leader"),
        "campaign_lease_lost: leader"
    );
    ok("resign", store.resign(&leader).await);
    stop_keep_alive(keeper, "campaign_lease_lost");
    ok("revoke", store.revoke_lease(leader_lease).await);
}

/// A campaign that is dropped while waiting withdraws its candidate key; the leader is
/// untouched.
pub async fn campaign_cancel(store: Arc<dyn Store>, prefix: &str) {
    let election = format!("{prefix}campaign_cancel/leader");
    let leader_lease = ok("grant", store.grant_lease(Duration::from_secs(30)).await);
    let leader = ok(
        "campaign",
        store.campaign(&election, "leader", leader_lease).await,
    );
    let lease = ok("grant", store.grant_lease(Duration::from_secs(30)).await);
    let mut task = campaign_task(store.clone(), election.clone(), "waiter", lease).await;
    still_waiting(&mut task, "campaign_cancel: second candidate").await;
    let candidates = keys(store.as_ref(), &format!("{election}/")).await;
    assert_eq!(
        candidates.len(),
        2,
        "campaign_cancel: candidates {candidates:?}"
    );
    task.abort();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = keys(store.as_ref(), &format!("{election}/")).await;
        if left == [leader.key().to_string()] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "campaign_cancel: keys {left:?} 5 s after the campaign was dropped"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        ok("leader", store.leader(&election).await).as_deref(),
        Some("leader"),
        "campaign_cancel: leader"
    );
    ok("keep_alive", store.keep_alive(lease).await);
    ok("resign", store.resign(&leader).await);
    ok("revoke", store.revoke_lease(leader_lease).await);
    ok("revoke", store.revoke_lease(lease).await);
}
