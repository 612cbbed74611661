//! The store conformance suite against a REAL etcd (Debian's etcd-server at /usr/bin/etcd),
//! started per test on loopback with free ports and a temporary data dir, and killed when
//! the test ends (also on panic). Without /usr/bin/etcd these tests FAIL on purpose.

use std::fs::File;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use shoal_control::store::conformance;
use shoal_control::store::etcd::{EtcdOptions, EtcdStore};
use shoal_control::store::{Store, StoreError};
use tempfile::TempDir;

const ETCD_BIN: &str = "/usr/bin/etcd";
const P: &str = "/conformance/";

fn opts() -> EtcdOptions {
    EtcdOptions {
        request_timeout: Duration::from_secs(3),
        connect_timeout: Duration::from_secs(1),
        keep_alive_interval: Duration::from_secs(2),
        keep_alive_timeout: Duration::from_secs(2),
    }
}

/// A throwaway single-member etcd. Dropping it kills the process.
struct Etcd {
    child: Option<Child>,
    endpoint: String,
    log: PathBuf,
    /// Client TLS (CA, client cert, client key) when etcd was started with client-cert auth.
    tls: Option<TlsFiles>,
    _dir: TempDir,
}

#[derive(Clone)]
struct TlsFiles {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl (the TLS test needs the openssl command)");
    assert!(out.status.success(), "openssl {args:?}: {out:?}");
}

/// A throwaway CA, a server certificate for 127.0.0.1 and a client certificate.
fn make_certs(dir: &Path) -> TlsFiles {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut a = vec!["req", "-x509"];
    a.extend(ec);
    a.extend(["-keyout", "ca.key", "-out", "ca.pem", "-days", "2"]);
    a.extend(["-subj", "/CN=shoal-test-ca"]);
    openssl(dir, &a);
    for (who, ext) in [
        (
            "server",
            "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        ),
        ("client", "extendedKeyUsage=clientAuth\n"),
    ] {
        let (key, csr, pem, extf) = (
            format!("{who}.key"),
            format!("{who}.csr"),
            format!("{who}.pem"),
            format!("{who}.ext"),
        );
        std::fs::write(dir.join(&extf), ext).unwrap();
        let mut a = vec!["req"];
        a.extend(ec);
        let subj = format!("/CN=shoal-test-{who}");
        a.extend(["-keyout", &key, "-out", &csr, "-subj", &subj]);
        openssl(dir, &a);
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "2",
                "-extfile",
                &extf,
            ],
        );
    }
    TlsFiles {
        ca: dir.join("ca.pem"),
        cert: dir.join("client.pem"),
        key: dir.join("client.key"),
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server.key"),
    }
}

fn client_tls(t: &TlsFiles) -> etcd_client::TlsOptions {
    etcd_client::TlsOptions::new()
        .ca_certificate(etcd_client::Certificate::from_pem(
            std::fs::read(&t.ca).unwrap(),
        ))
        .identity(etcd_client::Identity::from_pem(
            std::fs::read(&t.cert).unwrap(),
            std::fs::read(&t.key).unwrap(),
        ))
}

fn free_ports() -> (u16, u16) {
    // Both bound at once so they differ; released just before etcd binds them.
    let a = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    let b = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    (
        a.local_addr().unwrap().port(),
        b.local_addr().unwrap().port(),
    )
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

impl Etcd {
    async fn start() -> Etcd {
        Self::start_with(false).await
    }

    /// etcd serving clients over TLS, client certificates required.
    async fn start_tls() -> Etcd {
        Self::start_with(true).await
    }

    async fn start_with(with_tls: bool) -> Etcd {
        assert!(
            Path::new(ETCD_BIN).exists(),
            "{ETCD_BIN} is missing: the etcd tests need a real etcd. Run the project's install \
             step (it installs Debian's etcd-server: apt-get install -y etcd-server)"
        );
        let mut last_log = String::new();
        // A port taken between probing and etcd's bind makes etcd exit: try again.
        for _attempt in 0..3 {
            let dir = tempfile::tempdir().expect("tempdir");
            let (client_port, peer_port) = free_ports();
            let tls = with_tls.then(|| make_certs(dir.path()));
            let scheme = if with_tls { "https" } else { "http" };
            let client = format!("{scheme}://127.0.0.1:{client_port}");
            let peer = format!("http://127.0.0.1:{peer_port}");
            let log = dir.path().join("etcd.log");
            let out = File::create(&log).expect("create etcd log");
            let mut cmd = Command::new(ETCD_BIN);
            cmd.arg("--name")
                .arg("shoal-test")
                .arg("--data-dir")
                .arg(dir.path().join("data"))
                .arg("--listen-client-urls")
                .arg(&client)
                .arg("--advertise-client-urls")
                .arg(&client)
                .arg("--listen-peer-urls")
                .arg(&peer)
                .arg("--initial-advertise-peer-urls")
                .arg(&peer)
                .arg("--initial-cluster")
                .arg(format!("shoal-test={peer}"))
                .arg("--initial-cluster-state")
                .arg("new")
                .arg("--logger")
                .arg("zap")
                .arg("--log-outputs")
                .arg("stderr")
                .args(tls.iter().flat_map(|t| {
                    [
                        "--cert-file".into(),
                        t.server_cert.clone().into_os_string(),
                        "--key-file".into(),
                        t.server_key.clone().into_os_string(),
                        "--trusted-ca-file".into(),
                        t.ca.clone().into_os_string(),
                        "--client-cert-auth".into(),
                    ]
                }))
                .stdin(Stdio::null())
                .stdout(out.try_clone().expect("dup log"))
                .stderr(out);
            // Belt and braces for a test process killed from outside (no Drop runs then):
            // etcd gets SIGKILL when the thread that started it ends.
            // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
            unsafe {
                cmd.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    Ok(())
                });
            }
            let child = cmd.spawn().expect("spawn etcd");
            let mut etcd = Etcd {
                child: Some(child),
                endpoint: client,
                log,
                tls,
                _dir: dir,
            };
            if etcd.wait_ready().await {
                return etcd;
            }
            last_log = tail(&etcd.log);
            etcd.stop();
        }
        panic!("etcd did not become ready; last log lines:\n{last_log}");
    }

    /// True once etcd answers; false if it exited or did not answer within 20 s.
    async fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                eprintln!("etcd exited early ({status})");
                return false;
            }
            if self.connect().await.is_ok() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }

    async fn connect(&self) -> Result<EtcdStore, StoreError> {
        EtcdStore::connect_tls(
            std::slice::from_ref(&self.endpoint),
            opts(),
            self.tls.as_ref().map(client_tls),
        )
        .await
    }

    async fn store(&self) -> EtcdStore {
        self.connect().await.expect("connect to the test etcd")
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("etcd log (last lines):\n{}", tail(&self.log));
        }
        self.stop();
    }
}

/// etcd with client-certificate auth: the store works through TLS with our certificate,
/// and a client without one (plain HTTP, or TLS without identity) is refused.
#[tokio::test]
async fn tls_client_certificates() {
    let etcd = Etcd::start_tls().await;
    let store = etcd.store().await;
    conformance::kv_basics(&store, P).await;
    let t = etcd.tls.clone().unwrap();
    let plain = etcd.endpoint.replacen("https://", "http://", 1);
    assert!(
        EtcdStore::connect(std::slice::from_ref(&plain), opts())
            .await
            .is_err(),
        "plain HTTP to a TLS-only etcd must fail"
    );
    let no_identity = etcd_client::TlsOptions::new().ca_certificate(
        etcd_client::Certificate::from_pem(std::fs::read(&t.ca).unwrap()),
    );
    let r = EtcdStore::connect_tls(
        std::slice::from_ref(&etcd.endpoint),
        opts(),
        Some(no_identity),
    )
    .await;
    assert!(
        r.is_err(),
        "TLS without a client certificate must be refused"
    );
}

#[tokio::test]
async fn kv_basics() {
    let etcd = Etcd::start().await;
    conformance::kv_basics(&etcd.store().await, P).await;
}

#[tokio::test]
async fn revisions() {
    let etcd = Etcd::start().await;
    conformance::revisions(&etcd.store().await, P).await;
}

#[tokio::test]
async fn list_prefix() {
    let etcd = Etcd::start().await;
    conformance::list_prefix(&etcd.store().await, P).await;
}

#[tokio::test]
async fn txn_semantics() {
    let etcd = Etcd::start().await;
    conformance::txn_semantics(&etcd.store().await, P).await;
}

#[tokio::test]
async fn delete_prefix() {
    let etcd = Etcd::start().await;
    conformance::delete_prefix(&etcd.store().await, P).await;
}

#[tokio::test]
async fn watch_events() {
    let etcd = Etcd::start().await;
    conformance::watch_events(&etcd.store().await, P).await;
}

#[tokio::test]
async fn watch_resume() {
    let etcd = Etcd::start().await;
    conformance::watch_resume(&etcd.store().await, P).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cas_race() {
    let etcd = Etcd::start().await;
    conformance::cas_race(Arc::new(etcd.store().await), P).await;
}

/// The two groups use two separate connections, like two agents.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn allocation_race_two_clients() {
    let etcd = Etcd::start().await;
    let a: Arc<dyn Store> = Arc::new(etcd.store().await);
    let b: Arc<dyn Store> = Arc::new(etcd.store().await);
    conformance::allocation_race(a, b, P).await;
}

/// All checks at once against one etcd, twice over under different prefixes: the suite
/// does not depend on owning the etcd's revision counter.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn run_all_twice_in_parallel_on_one_etcd() {
    let etcd = Etcd::start().await;
    let a: Arc<dyn Store> = Arc::new(etcd.store().await);
    let b: Arc<dyn Store> = Arc::new(etcd.store().await);
    futures::join!(
        conformance::run_all(a, "/suite-a/"),
        conformance::run_all(b, "/suite-b/")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_keep_alive_and_expiry() {
    let etcd = Etcd::start().await;
    conformance::lease_keep_alive_and_expiry(Arc::new(etcd.store().await), P).await;
}

#[tokio::test]
async fn lease_revoke() {
    let etcd = Etcd::start().await;
    conformance::lease_revoke(&etcd.store().await, P).await;
}

#[tokio::test]
async fn lease_unknown() {
    let etcd = Etcd::start().await;
    conformance::lease_unknown(&etcd.store().await, P).await;
}

/// The two candidates use two separate connections, like two agents.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn election() {
    let etcd = Etcd::start().await;
    let a: Arc<dyn Store> = Arc::new(etcd.store().await);
    let b: Arc<dyn Store> = Arc::new(etcd.store().await);
    conformance::election(a, b, P).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn campaign_cancel() {
    let etcd = Etcd::start().await;
    conformance::campaign_cancel(Arc::new(etcd.store().await), P).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn campaign_lease_lost() {
    let etcd = Etcd::start().await;
    conformance::campaign_lease_lost(Arc::new(etcd.store().await), P).await;
}

/// etcd raises a TTL below its minimum; the lease is still usable and lives at least as
/// long as asked.
#[tokio::test]
async fn short_ttl_is_raised_not_refused() {
    let etcd = Etcd::start().await;
    let store = etcd.store().await;
    let lease = store.grant_lease(Duration::from_millis(300)).await.unwrap();
    let mut client = store.client().clone();
    let ttl = client
        .lease_time_to_live(lease, None)
        .await
        .unwrap()
        .granted_ttl();
    eprintln!("granted TTL for a 300 ms request: {ttl} s");
    assert!(ttl >= 1, "granted TTL {ttl}");
    store.keep_alive(lease).await.unwrap();
    store.revoke_lease(lease).await.unwrap();
}

/// With etcd gone, lease requests fail fast with Unavailable, and a waiting campaign
/// ends with an error instead of waiting forever.
#[tokio::test]
async fn lease_and_campaign_with_etcd_down() {
    let mut etcd = Etcd::start().await;
    let store = etcd.store().await;
    let leader_lease = store.grant_lease(Duration::from_secs(30)).await.unwrap();
    let _leader = store
        .campaign("/d/e", "leader", leader_lease)
        .await
        .unwrap();
    let lease = store.grant_lease(Duration::from_secs(30)).await.unwrap();
    let waiting = {
        let store = store.clone();
        tokio::spawn(async move { store.campaign("/d/e", "waiter", lease).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiting.is_finished(), "the second campaign must wait");
    etcd.stop();

    let calls: [(&str, BoxFuture<'_, Result<(), StoreError>>); 4] = [
        (
            "grant",
            async { store.grant_lease(Duration::from_secs(5)).await.map(|_| ()) }.boxed(),
        ),
        ("keep_alive", store.keep_alive(lease)),
        ("revoke", store.revoke_lease(lease)),
        (
            "leader",
            async { store.leader("/d/e").await.map(|_| ()) }.boxed(),
        ),
    ];
    for (what, fut) in calls {
        let started = Instant::now();
        match tokio::time::timeout(Duration::from_secs(15), fut).await {
            Ok(Err(StoreError::Unavailable { what: msg, .. })) => {
                eprintln!("{what} with etcd down: {msg}")
            }
            other => panic!("{what} with etcd down: expected Unavailable, got {other:?}"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(6),
            "{what} took {:?} to fail",
            started.elapsed()
        );
    }
    match tokio::time::timeout(Duration::from_secs(15), waiting).await {
        Ok(Ok(Err(e))) => eprintln!("campaign with etcd down: {e}"),
        other => panic!("campaign with etcd down: expected an error, got {other:?}"),
    }
}

#[tokio::test]
async fn watch_from_compacted_revision_is_compacted() {
    let etcd = Etcd::start().await;
    let store = etcd.store().await;
    let mut revs = Vec::new();
    for i in 0..5 {
        revs.push(store.put(&format!("/c/{i}"), b"v".to_vec()).await.unwrap());
    }
    let mut client = store.client().clone();
    client.compact(revs[3], None).await.expect("compact");
    conformance::expect_compacted(&store, "/c/", revs[1]).await;
    // From the compaction point on, history is still there.
    let mut w = store.watch("/c/", revs[3]).await.unwrap();
    let e = conformance::next_event(&mut w, "after compaction point").await;
    assert_eq!(e.revision(), revs[4]);
}

#[tokio::test]
async fn unreachable_etcd_fails_fast_with_unavailable() {
    let mut etcd = Etcd::start().await;
    let store = etcd.store().await;
    store.put("/u/k", b"v".to_vec()).await.unwrap();
    let mut watch = store.watch("/u/", 0).await.unwrap();
    let first = conformance::next_event(&mut watch, "before stop").await;
    assert_eq!(first.key(), "/u/k");
    etcd.stop();

    let started = Instant::now();
    let got = tokio::time::timeout(Duration::from_secs(15), store.get("/u/k"))
        .await
        .expect("get hung although etcd is down");
    let took = started.elapsed();
    match got {
        Err(StoreError::Unavailable { what: msg, .. }) => {
            eprintln!("get after stop ({took:?}): {msg}")
        }
        other => panic!("get with etcd down: expected Unavailable, got {other:?}"),
    }
    assert!(took < Duration::from_secs(6), "get took {took:?} to fail");

    let started = Instant::now();
    match store.txn(vec![], vec![]).await {
        Err(StoreError::Unavailable { .. }) => {}
        other => panic!("txn with etcd down: expected Unavailable, got {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "txn took {:?}",
        started.elapsed()
    );

    // The open watch ends with an error instead of waiting forever.
    match tokio::time::timeout(Duration::from_secs(10), watch.next()).await {
        Ok(Some(Err(StoreError::Unavailable { what: msg, .. }))) => {
            eprintln!("watch after stop: {msg}")
        }
        other => panic!("watch with etcd down: expected an Unavailable item, got {other:?}"),
    }

    // Connecting to a dead endpoint fails too, within the request timeout.
    let started = Instant::now();
    match EtcdStore::connect(std::slice::from_ref(&etcd.endpoint), opts()).await {
        Err(StoreError::Unavailable { what: msg, .. }) => assert!(!msg.is_empty()),
        other => panic!("connect to a stopped etcd: expected Unavailable, got {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "connect took {:?}",
        started.elapsed()
    );
}

/// SIGSTOPs etcd and waits until it is stopped; returns its pid (for SIGCONT).
async fn freeze(etcd: &Etcd) -> nix::unistd::Pid {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let pid = Pid::from_raw(etcd.child.as_ref().unwrap().id() as i32);
    kill(pid, Signal::SIGSTOP).expect("SIGSTOP etcd");
    // The stop takes effect asynchronously: wait until /proc says "T (stopped)".
    let stat = format!("/proc/{pid}/stat");
    for _ in 0..100 {
        let s = std::fs::read_to_string(&stat).unwrap_or_default();
        if s.rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('T'))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    pid
}

/// A frozen etcd (connections open, nothing answers): keep_alive fails within the
/// request timeout, and a waiting campaign ends with an error (HTTP/2 keep-alive) instead
/// of waiting forever.
#[tokio::test]
async fn lease_and_campaign_with_etcd_frozen() {
    use nix::sys::signal::{Signal, kill};
    let etcd = Etcd::start().await;
    let store = etcd.store().await;
    let leader_lease = store.grant_lease(Duration::from_secs(60)).await.unwrap();
    let _leader = store
        .campaign("/z/e", "leader", leader_lease)
        .await
        .unwrap();
    let lease = store.grant_lease(Duration::from_secs(60)).await.unwrap();
    let waiting = {
        let store = store.clone();
        tokio::spawn(async move { store.campaign("/z/e", "waiter", lease).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiting.is_finished(), "the second campaign must wait");
    let pid = freeze(&etcd).await;
    let started = Instant::now();
    let refresh = tokio::time::timeout(Duration::from_secs(15), store.keep_alive(lease)).await;
    let took = started.elapsed();
    let campaign = tokio::time::timeout(Duration::from_secs(20), waiting).await;
    let campaign_took = started.elapsed();
    kill(pid, Signal::SIGCONT).expect("SIGCONT etcd");
    match refresh {
        Ok(Err(StoreError::Unavailable { what: msg, .. })) => {
            eprintln!("keep_alive on frozen etcd ({took:?}): {msg}")
        }
        other => panic!("keep_alive on a frozen etcd: expected Unavailable, got {other:?}"),
    }
    assert!(took < Duration::from_secs(6), "keep_alive took {took:?}");
    match campaign {
        Ok(Ok(Err(e))) => eprintln!("campaign on frozen etcd ({campaign_took:?}): {e}"),
        other => panic!("campaign on a frozen etcd: expected an error, got {other:?}"),
    }
    // Unfrozen, the lease is still there (60 s TTL).
    store
        .keep_alive(lease)
        .await
        .expect("keep_alive after etcd resumed");
}

/// A frozen etcd (SIGSTOP: connections stay open, nothing answers) must not hang
/// requests: they fail with Unavailable within the request timeout, and work again once
/// etcd resumes.
#[tokio::test]
async fn frozen_etcd_times_out_then_recovers() {
    use nix::sys::signal::{Signal, kill};
    let etcd = Etcd::start().await;
    let store = etcd.store().await;
    store.put("/f/k", b"v".to_vec()).await.unwrap();
    let pid = freeze(&etcd).await;
    let started = Instant::now();
    let got = tokio::time::timeout(Duration::from_secs(15), store.get("/f/k")).await;
    let took = started.elapsed();
    kill(pid, Signal::SIGCONT).expect("SIGCONT etcd");
    match got {
        Ok(Err(StoreError::Unavailable { what: msg, .. })) => {
            eprintln!("get on frozen etcd ({took:?}): {msg}")
        }
        other => panic!("get on a frozen etcd: expected Unavailable, got {other:?}"),
    }
    assert!(
        took < Duration::from_secs(6),
        "get on a frozen etcd took {took:?}"
    );
    let kv = store.get("/f/k").await.expect("get after etcd resumed");
    assert_eq!(kv.map(|kv| kv.value), Some(b"v".to_vec()));
}

/// etcd stalls while a request is in flight, long enough for the client's HTTP/2
/// keep-alive to declare the connection dead, then resumes: the request fails on the dead
/// connection, and the store's idempotent requests must try once more on a new one (failed
/// once in CI: a keep_alive right after etcd resumed met the keep-alive timeout).
#[tokio::test]
async fn idempotent_requests_survive_a_connection_that_died_under_them() {
    use nix::sys::signal::{Signal, kill};
    let etcd = Etcd::start().await;
    // The connection under the request dies 1-2 s into the stall (a ping unanswered for
    // 1 s, sent 1 s after the last thing read); the one the store opens then would die 2 s
    // later. etcd resumes in between.
    let pings = EtcdOptions {
        keep_alive_interval: Duration::from_secs(1),
        keep_alive_timeout: Duration::from_secs(1),
        request_timeout: Duration::from_secs(4),
        ..opts()
    };
    let resume_after = Duration::from_millis(2500);
    let store = EtcdStore::connect(std::slice::from_ref(&etcd.endpoint), pings)
        .await
        .unwrap();
    store.put("/d/k", b"v".to_vec()).await.unwrap();
    let lease = store.grant_lease(Duration::from_secs(60)).await.unwrap();
    let request = |what: &'static str| -> BoxFuture<'_, Result<(), StoreError>> {
        match what {
            "get" => store.get("/d/k").map(|r| r.map(drop)).boxed(),
            "list" => store.list("/d/").map(|r| r.map(drop)).boxed(),
            "keep_alive" => store.keep_alive(lease).boxed(),
            "leader" => store.leader("/d/e").map(|r| r.map(drop)).boxed(),
            _ => store.watch("/d/", 0).map(|r| r.map(drop)).boxed(),
        }
    };
    for what in ["get", "list", "keep_alive", "leader", "watch"] {
        let pid = freeze(&etcd).await;
        let started = Instant::now();
        let (got, ()) = tokio::join!(request(what), async {
            tokio::time::sleep(resume_after).await;
            kill(pid, Signal::SIGCONT).expect("SIGCONT etcd");
        });
        if let Err(e) = got {
            panic!("{what} across an etcd stall: {e}");
        }
        eprintln!(
            "{what} across an etcd stall: ok after {:?}",
            started.elapsed()
        );
    }
}
