//! Kernel tests of the in-process applier (libnftables) against the `nft` process applier.
//!
//! Root, `nft` and `libnftables.so.1` are required: they FAIL (never skip) without them.
//! Namespaces are named `shoal-t-lbx-<pid>-<n>` and deleted by a Drop guard, also on panic;
//! the host's ruleset is never touched.

mod common;

use common::fixtures::{self, TABLE};
use common::netlab::{NsGuard, require_root_and_nft};
use shoal_lb::{Applier, BACKEND_ENV, LbError, Ruleset, render};

const PREFIX: &str = "shoal-t-lbx";

fn in_process() -> Applier {
    let a = Applier::in_process()
        .unwrap_or_else(|e| panic!("{e} (install libnftables1: apt-get install -y libnftables1)"));
    assert!(a.is_in_process());
    a
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap()
}

/// `nft list table` run as a process inside `ns` (the reference reading).
fn nft_list(ns: &str) -> Option<String> {
    rt().block_on(Applier::process().list_table(ns, TABLE))
        .unwrap()
}

#[test]
fn global_applier_is_in_process() {
    require_root_and_nft();
    if std::env::var(BACKEND_ENV).is_ok_and(|v| v == "process") {
        assert!(!Applier::global().is_in_process());
    } else {
        assert!(
            Applier::global().is_in_process(),
            "the kernel tests must run through libnftables: is libnftables1 installed?"
        );
    }
}

#[test]
fn in_process_and_process_produce_the_same_table() {
    require_root_and_nft();
    let (lib, proc_) = (in_process(), Applier::process());
    let mut guard = NsGuard::default();
    let (a, b) = (guard.create_with(PREFIX), guard.create_with(PREFIX));
    let rt = rt();
    let mut cases = fixtures::all();
    cases.push(("many", fixtures::many(40, 4, 96)));
    for (name, rs) in cases {
        rt.block_on(lib.check(&a, &rs))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        rt.block_on(lib.apply(&a, &rs))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        rt.block_on(proc_.apply(&b, &rs))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let by_process = rt.block_on(proc_.list_table(&b, TABLE)).unwrap().unwrap();
        // Read back both ways from both namespaces: four identical texts.
        for ns in [&a, &b] {
            for reader in [&lib, &proc_] {
                let text = rt.block_on(reader.list_table(ns, TABLE)).unwrap();
                assert_eq!(
                    text.as_deref(),
                    Some(by_process.as_str()),
                    "{name}: {reader:?} reading {ns}"
                );
            }
        }
        assert!(by_process.contains("map services"), "{name}: {by_process}");
    }
    rt.block_on(lib.delete_table(&a, TABLE)).unwrap();
    assert_eq!(nft_list(&a), None);
    assert_eq!(rt.block_on(lib.list_table(&a, TABLE)).unwrap(), None);
    rt.block_on(lib.delete_table(&a, TABLE)).unwrap();
    // Check mode changed nothing: a fresh namespace checked only has no table.
    let c = guard.create_with(PREFIX);
    rt.block_on(lib.check(&c, &fixtures::several())).unwrap();
    assert_eq!(nft_list(&c), None);
}

#[test]
fn in_process_errors_carry_nft_message_and_keep_previous_table() {
    require_root_and_nft();
    let lib = in_process();
    let mut guard = NsGuard::default();
    let ns = guard.create_with(PREFIX);
    let rt = rt();
    rt.block_on(lib.apply(&ns, &fixtures::several())).unwrap();
    let before = nft_list(&ns).unwrap();

    // Refused by nft's parser on line 1.
    let bad = Ruleset {
        table: "9lb".into(),
        ..fixtures::several()
    };
    let err = rt.block_on(lib.apply(&ns, &bad)).unwrap_err();
    match &err {
        LbError::Nft {
            stderr,
            failing_line,
            ..
        } => {
            assert!(stderr.contains("syntax error"), "{stderr}");
            assert!(stderr.starts_with("/dev/stdin:1:"), "{stderr}");
            assert_eq!(
                failing_line,
                &Some((1, "table ip 9lb {}".to_string())),
                "{err}"
            );
        }
        other => panic!("expected an nft error, got {other:?}"),
    }
    assert_eq!(nft_list(&ns).unwrap(), before);

    // Refused by the kernel at the last rule (dnat in a filter chain), after the delete and
    // most of the new table: the transaction is aborted whole, and the error names the line.
    let script = render(&fixtures::one_service()).replace(
        "ip daddr @vips reject with icmp type port-unreachable",
        "ip daddr @vips dnat ip to 10.0.0.1",
    );
    let line = script
        .lines()
        .position(|l| l.contains("dnat ip to 10.0.0.1"))
        .unwrap()
        + 1;
    let err = rt.block_on(lib.apply_script(&ns, &script)).unwrap_err();
    match &err {
        LbError::Nft {
            stderr,
            failing_line,
            ..
        } => {
            assert!(stderr.contains("Could not process rule"), "{stderr}");
            assert_eq!(failing_line.as_ref().map(|(n, _)| *n), Some(line), "{err}");
            assert!(
                failing_line
                    .as_ref()
                    .unwrap()
                    .1
                    .contains("dnat ip to 10.0.0.1")
            );
        }
        other => panic!("expected an nft error, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(msg.contains(&format!("[script line {line}: ")), "{msg}");
    assert_eq!(nft_list(&ns).unwrap(), before);

    // The context still works after errors, and a later success reports no stale error.
    rt.block_on(lib.apply(&ns, &fixtures::one_service()))
        .unwrap();
    assert_ne!(nft_list(&ns).unwrap(), before);
    // Missing namespace: the namespace error, not nft's.
    let err = rt
        .block_on(lib.apply(&format!("{PREFIX}-no-such-ns"), &fixtures::one_service()))
        .unwrap_err();
    assert!(
        matches!(err, LbError::Netns(shoal_netns::Error::NotFound(_))),
        "{err:?}"
    );
}

#[test]
fn recreated_namespace_gets_a_fresh_context() {
    require_root_and_nft();
    let lib = in_process();
    let mut guard = NsGuard::default();
    let ns = guard.create_with(PREFIX);
    let rt = rt();
    rt.block_on(lib.apply(&ns, &fixtures::several())).unwrap();
    assert!(nft_list(&ns).is_some());
    assert_eq!(lib.cached_contexts(), 1);

    // Same name, new namespace. A stale context would still see (and change) the old one.
    shoal_netns::delete(&ns).unwrap();
    guard.create_named(&ns);
    assert_eq!(rt.block_on(lib.list_table(&ns, TABLE)).unwrap(), None);
    rt.block_on(lib.apply(&ns, &fixtures::one_service()))
        .unwrap();
    let text = nft_list(&ns).expect("the table is in the new namespace");
    assert!(
        text.contains("10.96.0.10 . tcp . 80 : goto rnd_tcp_3"),
        "{text}"
    );
    assert!(!text.contains("10.96.0.20 . udp . 53"), "{text}");
    assert_eq!(
        rt.block_on(lib.list_table(&ns, TABLE)).unwrap().as_deref(),
        Some(text.as_str())
    );
    assert_eq!(lib.cached_contexts(), 1);
}

#[test]
fn contexts_of_deleted_namespaces_are_dropped() {
    require_root_and_nft();
    let lib = in_process();
    let mut guard = NsGuard::default();
    let (a, b) = (guard.create_with(PREFIX), guard.create_with(PREFIX));
    let rt = rt();
    rt.block_on(lib.apply(&a, &fixtures::one_service()))
        .unwrap();
    rt.block_on(lib.apply(&b, &fixtures::one_service()))
        .unwrap();
    assert_eq!(lib.cached_contexts(), 2);
    // The cached context of `a` pins the deleted namespace until the cache lets it go: at
    // the latest when another context is created.
    shoal_netns::delete(&a).unwrap();
    let c = guard.create_with(PREFIX);
    rt.block_on(lib.apply(&c, &fixtures::one_service()))
        .unwrap();
    assert_eq!(lib.cached_contexts(), 2, "{a}'s context must be gone");
}

#[test]
fn concurrent_applies_to_two_namespaces() {
    require_root_and_nft();
    let lib = in_process();
    let mut guard = NsGuard::default();
    let names = [guard.create_with(PREFIX), guard.create_with(PREFIX)];
    let rt = rt();
    // Namespace i only ever gets VIPs of 10.(100+i).x.x, with 1..=4 backends.
    let ruleset = |ns: usize, round: u32| fixtures::many(20 + round, 1 + round % 4, 100 + ns as u8);
    rt.block_on(async {
        let mut tasks = Vec::new();
        for t in 0..8usize {
            let (lib, ns_i) = (lib.clone(), t % 2);
            let ns = names[ns_i].clone();
            tasks.push(tokio::spawn(async move {
                for round in 0..6 {
                    let rs = ruleset(ns_i, (t as u32 * 7 + round) % 12);
                    lib.apply(&ns, &rs).await.unwrap();
                    let text = lib.list_table(&ns, TABLE).await.unwrap().unwrap();
                    let own = format!("10.{}.0.", 100 + ns_i);
                    let other = format!("10.{}.0.", 101 - ns_i);
                    assert!(
                        text.contains(&own) && !text.contains(&other),
                        "{ns}: {text}"
                    );
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    assert_eq!(lib.cached_contexts(), 2);
    // A last apply per namespace, concurrently; each must hold exactly its own.
    let finals = [ruleset(0, 11), ruleset(1, 3)];
    rt.block_on(async {
        let (a, b) = tokio::join!(
            lib.apply(&names[0], &finals[0]),
            lib.apply(&names[1], &finals[1])
        );
        a.unwrap();
        b.unwrap();
    });
    let mut reference = NsGuard::default();
    for (ns, rs) in names.iter().zip(&finals) {
        let r = reference.create_with(PREFIX);
        rt.block_on(Applier::process().apply(&r, rs)).unwrap();
        assert_eq!(nft_list(ns), nft_list(&r), "{ns}");
    }
}

/// Netfilter netlink sockets of this process that are not close-on-exec.
fn inheritable_nfnetlink_sockets() -> Vec<i32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        let Ok(fd) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let opt = |o: i32| {
            let (mut v, mut len) = (0i32, std::mem::size_of::<i32>() as libc::socklen_t);
            // SAFETY: getsockopt into a properly sized int; fails harmlessly on non-sockets.
            let r = unsafe {
                libc::getsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    o,
                    (&mut v as *mut i32).cast(),
                    &mut len,
                )
            };
            (r == 0).then_some(v)
        };
        // SAFETY: F_GETFD on a descriptor number: -1/EBADF if it was closed meanwhile.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        if opt(libc::SO_DOMAIN) == Some(libc::AF_NETLINK)
            && opt(libc::SO_PROTOCOL) == Some(libc::NETLINK_NETFILTER)
            && flags >= 0
            && flags & libc::FD_CLOEXEC == 0
        {
            out.push(fd);
        }
    }
    out
}

#[test]
fn context_socket_is_close_on_exec() {
    require_root_and_nft();
    let lib = in_process();
    let mut guard = NsGuard::default();
    let ns = guard.create_with(PREFIX);
    rt().block_on(lib.apply(&ns, &fixtures::one_service()))
        .unwrap();
    // libmnl opens the socket without close-on-exec; the applier sets it right after
    // nft_ctx_new. Other tests of this binary create contexts concurrently, so a socket seen
    // inside that short window is looked at again.
    let mut left = inheritable_nfnetlink_sockets();
    for _ in 0..20 {
        if left.is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
        let now = inheritable_nfnetlink_sockets();
        left.retain(|fd| now.contains(fd));
    }
    assert!(left.is_empty(), "inheritable netfilter sockets: {left:?}");
}

/// A missing table lists as None, through either backend, for the full and the counter-free
/// listing; one that is there lists as Some. "Missing" is the kernel's ENOENT to a netlink
/// GETTABLE, not nft's message; in a namespace that does not exist the listing is an error.
#[test]
fn a_missing_table_is_none_and_a_missing_namespace_an_error() {
    require_root_and_nft();
    let mut guard = NsGuard::default();
    let ns = guard.create_with(PREFIX);
    let rt = rt();
    for a in [in_process(), Applier::process()] {
        let kind = if a.is_in_process() {
            "libnftables"
        } else {
            "nft process"
        };
        assert_eq!(
            rt.block_on(a.list_table(&ns, TABLE)).unwrap(),
            None,
            "{kind}"
        );
        assert_eq!(
            rt.block_on(a.fingerprint(&ns, TABLE)).unwrap(),
            None,
            "{kind}"
        );
        let gone = format!("{ns}-gone");
        assert!(
            rt.block_on(a.list_table(&gone, TABLE)).is_err(),
            "{kind}: a namespace that does not exist is not a missing table"
        );
    }
    let lib = in_process();
    rt.block_on(lib.apply(&ns, &fixtures::all()[0].1)).unwrap();
    for a in [lib, Applier::process()] {
        let listed = rt.block_on(a.list_table(&ns, TABLE)).unwrap();
        assert!(listed.is_some_and(|t| t.contains(TABLE)));
        assert!(rt.block_on(a.fingerprint(&ns, TABLE)).unwrap().is_some());
    }
}
