//! The store conformance suite on the embedded backend, plus what only it has:
//! persistence across reopen, corrupt files, the data-dir lock, watch history limits.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use shoal_control::store::conformance;
use shoal_control::store::embedded::{EmbeddedOptions, EmbeddedStore, STATE_FILE};
use shoal_control::store::{Event, Op, Store, StoreError};
use tempfile::TempDir;

const P: &str = "/conformance/";

fn open_tmp() -> (TempDir, EmbeddedStore) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = EmbeddedStore::open(dir.path()).expect("open embedded store");
    (dir, store)
}

#[tokio::test]
async fn kv_basics() {
    let (_d, s) = open_tmp();
    conformance::kv_basics(&s, P).await;
}

#[tokio::test]
async fn revisions() {
    let (_d, s) = open_tmp();
    conformance::revisions(&s, P).await;
}

#[tokio::test]
async fn list_prefix() {
    let (_d, s) = open_tmp();
    conformance::list_prefix(&s, P).await;
}

#[tokio::test]
async fn txn_semantics() {
    let (_d, s) = open_tmp();
    conformance::txn_semantics(&s, P).await;
}

#[tokio::test]
async fn delete_prefix() {
    let (_d, s) = open_tmp();
    conformance::delete_prefix(&s, P).await;
}

#[tokio::test]
async fn watch_events() {
    let (_d, s) = open_tmp();
    conformance::watch_events(&s, P).await;
}

#[tokio::test]
async fn watch_resume() {
    let (_d, s) = open_tmp();
    conformance::watch_resume(&s, P).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cas_race() {
    let (_d, s) = open_tmp();
    conformance::cas_race(Arc::new(s), P).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn allocation_race() {
    let (_d, s) = open_tmp();
    let s: Arc<dyn Store> = Arc::new(s);
    conformance::allocation_race(s.clone(), s, P).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn run_all_concurrently_on_disk() {
    let (_d, s) = open_tmp();
    conformance::run_all(Arc::new(s), P).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn run_all_concurrently_in_memory() {
    conformance::run_all(Arc::new(EmbeddedStore::in_memory()), P).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_keep_alive_and_expiry() {
    let (_d, s) = open_tmp();
    conformance::lease_keep_alive_and_expiry(Arc::new(s), P).await;
}

#[tokio::test]
async fn lease_revoke() {
    let (_d, s) = open_tmp();
    conformance::lease_revoke(&s, P).await;
}

#[tokio::test]
async fn lease_unknown() {
    let (_d, s) = open_tmp();
    conformance::lease_unknown(&s, P).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn election() {
    let (_d, s) = open_tmp();
    let s: Arc<dyn Store> = Arc::new(s);
    conformance::election(s.clone(), s, P).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn campaign_cancel() {
    let (_d, s) = open_tmp();
    conformance::campaign_cancel(Arc::new(s), P).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn campaign_lease_lost() {
    let (_d, s) = open_tmp();
    conformance::campaign_lease_lost(Arc::new(s), P).await;
}

/// Leases are not persisted: leased keys are not in the state file and are gone after a
/// reopen; the lease id is unknown there; plain keys and the revision survive.
#[tokio::test]
async fn leased_keys_do_not_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (lease, rev) = {
        let s = EmbeddedStore::open(dir.path()).unwrap();
        let lease = s.grant_lease(Duration::from_secs(60)).await.unwrap();
        s.put("/r/plain", b"p".to_vec()).await.unwrap();
        let r = s
            .txn(
                vec![],
                vec![Op::PutLeased("/r/leased".into(), b"l".to_vec(), lease)],
            )
            .await
            .unwrap();
        // A plain key overwritten by a leased put becomes leased.
        s.put("/r/plain2", b"p".to_vec()).await.unwrap();
        s.txn(
            vec![],
            vec![Op::PutLeased("/r/plain2".into(), b"x".to_vec(), lease)],
        )
        .await
        .unwrap();
        assert!(s.get("/r/leased").await.unwrap().is_some());
        (lease, r.revision + 2)
    };
    let text = std::fs::read_to_string(dir.path().join(STATE_FILE)).unwrap();
    assert!(!text.contains("/r/leased"), "leased key persisted: {text}");
    let s = EmbeddedStore::open(dir.path()).unwrap();
    let snap = s.list("/r/").await.unwrap();
    let keys: Vec<&str> = snap.kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, ["/r/plain"]);
    assert_eq!(snap.revision, rev, "the revision counter survives");
    match s.keep_alive(lease).await {
        Err(StoreError::LeaseExpired(id)) => assert_eq!(id, lease),
        other => panic!("keep_alive of a lease from before the reopen: {other:?}"),
    }
    let fresh = s.grant_lease(Duration::from_secs(60)).await.unwrap();
    assert_ne!(fresh, lease, "a reopened store reissued a lease id");
}

/// Dropping the store ends the expiry task and releases the data dir although leases
/// are still live.
#[tokio::test]
async fn drop_with_live_leases_releases_the_store() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = EmbeddedStore::open(dir.path()).unwrap();
        let lease = s.grant_lease(Duration::from_secs(60)).await.unwrap();
        s.txn(
            vec![],
            vec![Op::PutLeased("/k".into(), b"v".to_vec(), lease)],
        )
        .await
        .unwrap();
    }
    // The expiry task holds only a weak reference; give it a moment to notice.
    for _ in 0..50 {
        if EmbeddedStore::open(dir.path()).is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("data dir still locked after the store was dropped");
}

#[tokio::test]
async fn state_and_revision_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (rev, before) = {
        let s = EmbeddedStore::open(dir.path()).unwrap();
        s.put("/a/1", b"one".to_vec()).await.unwrap();
        s.put("/a/2", vec![0xff, 0]).await.unwrap();
        s.put("/a/1", b"uno".to_vec()).await.unwrap();
        s.put("/a/3", b"three".to_vec()).await.unwrap();
        let rev = s.delete("/a/3").await.unwrap();
        (rev, s.list("/").await.unwrap())
    };
    assert_eq!(rev, 5);
    let s = EmbeddedStore::open(dir.path()).unwrap();
    let after = s.list("/").await.unwrap();
    assert_eq!(after.revision, rev, "revision after reopen");
    assert_eq!(after.kvs, before.kvs, "keys after reopen");
    let one = s.get("/a/1").await.unwrap().unwrap();
    assert_eq!((one.create_revision, one.mod_revision), (1, 3));
    // The counter continues; it never reuses a revision.
    assert_eq!(s.put("/a/4", b"four".to_vec()).await.unwrap(), rev + 1);
    // Events are not persisted: history before the reopen is gone, later history is kept.
    conformance::expect_compacted(&s, "/a/", 1).await;
    let mut w = s.watch("/a/", rev).await.unwrap();
    let e = conformance::next_event(&mut w, "watch after reopen").await;
    assert_eq!((e.key(), e.revision()), ("/a/4", rev + 1));
}

#[tokio::test]
async fn leftover_temp_file_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = EmbeddedStore::open(dir.path()).unwrap();
        s.put("/k", b"v".to_vec()).await.unwrap();
    }
    std::fs::write(dir.path().join("state.json.tmp"), b"{\"half-writ").unwrap();
    let s = EmbeddedStore::open(dir.path()).unwrap();
    assert_eq!(s.get("/k").await.unwrap().unwrap().value, b"v");
    assert!(!dir.path().join("state.json.tmp").exists());
}

#[tokio::test]
async fn corrupt_state_file_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = EmbeddedStore::open(dir.path()).unwrap();
        for i in 0..20 {
            s.put(&format!("/k/{i}"), b"value".to_vec()).await.unwrap();
        }
    }
    let path = dir.path().join(STATE_FILE);
    let good = std::fs::read(&path).unwrap();
    let bad_contents: [&[u8]; 3] = [
        &good[..good.len() / 2],                   // truncated
        b"\x00\x01garbage",                        // not JSON
        br#"{"format":99,"revision":0,"kvs":[]}"#, // unknown format
    ];
    for bad in bad_contents {
        std::fs::write(&path, bad).unwrap();
        match EmbeddedStore::open(dir.path()) {
            Err(StoreError::Corrupt { what: msg, .. }) => {
                assert!(
                    msg.contains(STATE_FILE),
                    "message must name the file: {msg}"
                )
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }
    std::fs::write(&path, &good).unwrap();
    let s = EmbeddedStore::open(dir.path()).unwrap();
    assert_eq!(s.list("/k/").await.unwrap().kvs.len(), 20);
}

#[tokio::test]
async fn data_dir_is_locked_while_open() {
    let dir = tempfile::tempdir().unwrap();
    let s = EmbeddedStore::open(dir.path()).unwrap();
    match EmbeddedStore::open(dir.path()) {
        Err(StoreError::Unavailable { what: msg, .. }) => assert!(msg.contains("in use"), "{msg}"),
        other => panic!("second open of a data dir must fail, got {other:?}"),
    }
    drop(s);
    EmbeddedStore::open(dir.path()).expect("reopen after close");
}

#[tokio::test]
async fn watch_older_than_history_is_compacted() {
    let s = EmbeddedStore::in_memory_with(EmbeddedOptions {
        watch_history: 5,
        ..EmbeddedOptions::default()
    });
    for i in 1..=10 {
        s.put(&format!("/h/{i}"), b"v".to_vec()).await.unwrap();
    }
    // Revisions 6..=10 are retained.
    conformance::expect_compacted(&s, "/h/", 4).await;
    let mut w = s.watch("/h/", 5).await.unwrap();
    for rev in 6..=10 {
        let e = conformance::next_event(&mut w, "replay").await;
        assert_eq!(e.revision(), rev);
    }
    // A txn with more events than the ring holds is dropped whole.
    let ops = (0..8)
        .map(|i| Op::Put(format!("/h/big{i}"), b"v".to_vec()))
        .collect();
    let r = s.txn(vec![], ops).await.unwrap().revision;
    assert_eq!(r, 11);
    conformance::expect_compacted(&s, "/h/", 10).await;
    assert!(s.watch("/h/", 11).await.is_ok());
}

#[tokio::test]
async fn lagging_watcher_gets_an_error_not_a_gap() {
    let s = EmbeddedStore::in_memory_with(EmbeddedOptions {
        watch_channel: 4,
        ..EmbeddedOptions::default()
    });
    let start = s.put("/l/0", b"v".to_vec()).await.unwrap();
    let mut w = s.watch("/l/", start).await.unwrap();
    for i in 1..=20 {
        s.put(&format!("/l/{i}"), b"v".to_vec()).await.unwrap();
    }
    match tokio::time::timeout(Duration::from_secs(5), w.next()).await {
        Ok(Some(Err(StoreError::Unavailable { what: msg, .. }))) => {
            assert!(msg.contains("behind"), "{msg}")
        }
        other => panic!("expected a lag error, got {other:?}"),
    }
    assert!(w.next().await.is_none(), "stream ends after the lag error");
    // Re-watching from the last revision seen replays everything from the ring.
    let mut w = s.watch("/l/", start).await.unwrap();
    for rev in start + 1..=start + 20 {
        let e = conformance::next_event(&mut w, "re-watch").await;
        assert_eq!(e.revision(), rev);
        assert!(matches!(e, Event::Put(_)));
    }
}
