//! The IPVS dataplane's companion nft table (`ipvs::companion_script`) and `ipvs::sync` on
//! this host.
//!
//! - golden scripts in `tests/golden/ipvs_*.nft` (rewrite with `SHOAL_UPDATE_GOLDEN=1` and
//!   review the diff);
//! - the kernel accepts every companion script: `nft -c` in a fresh namespace
//!   (`shoal-t-ipvsc-<pid>-<n>`), then applied for real and listed back (nf_tables only, no
//!   IPVS needed);
//! - `ipvs::sync` on this kernel (no IPVS) fails with the clear `IpvsError::NoIpvs` and
//!   touches nothing: no companion table, the nft dataplane's table is left alone.
//!
//! The kernel parts need root and `nft`; they FAIL without them (as tests/kernel.rs).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::fixtures::{self, ip, svc};
use common::netlab::{NsGuard, require_root_and_nft};
use shoal_lb::ipvs::{self, COMPANION_TABLE, IpvsError, IpvsOptions, companion_script, fwmark_for};
use shoal_lb::{Protocol, Ruleset};
use shoal_netns::CommandExt as _;

fn golden(name: &str, got: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(format!("{name}.nft"));
    if std::env::var_os("SHOAL_UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, got).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    assert_eq!(
        got,
        want,
        "companion_script differs from {}",
        path.display()
    );
}

/// Port-0 TCP and UDP services of two VIPs, a specific port on one of them (excluded from
/// marking), a specific port on a VIP without port-0 service (not in `ports`), hairpin
/// endpoints given unsorted with a duplicate.
fn swarm_like() -> Ruleset {
    let mut rs = fixtures::any_port();
    rs.services.push(svc(
        "dns",
        "10.96.0.20",
        Protocol::Udp,
        53,
        5353,
        &["10.0.1.7"],
    ));
    rs.services
        .push(svc("idle", "10.96.0.11", Protocol::Udp, 0, 0, &[]));
    rs.local_endpoints = vec![ip("10.0.1.2"), ip("10.0.1.1"), ip("10.0.1.2")];
    rs
}

#[test]
fn golden_companion_swarm_like() {
    let rs = swarm_like();
    let got = companion_script(&rs);
    // The marks are fwmark_for's, in hex.
    let m = fwmark_for(ip("10.96.0.10"), Protocol::Udp);
    assert!(
        got.contains(&format!("10.96.0.10 . udp : {m:#010x}")),
        "{got}"
    );
    golden("ipvs_companion", &got);
    // Order of the input does not matter.
    let mut rev = rs.clone();
    rev.services.reverse();
    rev.local_endpoints.reverse();
    assert_eq!(companion_script(&rev), got);
}

#[test]
fn golden_companion_empty() {
    golden(
        "ipvs_companion_empty",
        &companion_script(&fixtures::one_service()),
    );
}

fn nft(ns: &str, args: &[&str]) -> String {
    let out = Command::new("nft")
        .args(args)
        .in_netns(ns)
        .expect("entering the namespace")
        .output()
        .expect("running nft");
    assert!(
        out.status.success(),
        "nft {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn kernel_accepts_the_companion_table() {
    require_root_and_nft();
    let mut guard = NsGuard::default();
    let ns = guard.create_with("shoal-t-ipvsc");
    let mut all = fixtures::all();
    all.push(("swarm_like", swarm_like()));
    for (name, rs) in &all {
        // nft -c: parsed and checked by the kernel, nothing created.
        ipvs::check_companion(&ns, rs)
            .await
            .unwrap_or_else(|e| panic!("{name}: nft -c refused the companion table: {e}"));
        let script = companion_script(rs);
        let dir = std::env::temp_dir().join(format!("shoal-ipvsc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join(format!("{name}.nft"));
        std::fs::write(&f, &script).unwrap();
        nft(&ns, &["-c", "-f", f.to_str().unwrap()]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
    let listed = nft(&ns, &["list", "tables"]);
    assert!(!listed.contains(COMPANION_TABLE), "nft -c created {listed}");
    // Applied for real, twice (the replace transaction also works over an existing table).
    let rs = swarm_like();
    for _ in 0..2 {
        shoal_lb::Applier::global()
            .apply_script(&ns, &companion_script(&rs))
            .await
            .unwrap();
    }
    let t = nft(&ns, &["list", "table", "ip", COMPANION_TABLE]);
    for want in [
        "type filter hook prerouting priority mangle; policy accept;",
        "type route hook output priority mangle; policy accept;",
        "type nat hook postrouting priority srcnat; policy accept;",
        "meta mark set ip daddr . meta l4proto map @fwmarks",
        "ip daddr . meta l4proto . th dport @ports return",
        "ip saddr . ip daddr @hairpin masquerade",
        "10.96.0.10 . tcp . 443",
        "10.0.1.1 . 10.0.1.1",
    ] {
        assert!(t.contains(want), "{want:?} not in\n{t}");
    }
    let m = fwmark_for(ip("10.96.0.11"), Protocol::Udp);
    assert!(t.contains(&format!("10.96.0.11 . udp : {m:#010x}")), "{t}");
}

#[tokio::test]
async fn sync_without_ipvs_is_a_clear_error_and_touches_nothing() {
    require_root_and_nft();
    assert!(
        !Path::new("/proc/net/ip_vs").exists(),
        "this test expects a host kernel without IPVS (the VM test covers one with it)"
    );
    let mut guard = NsGuard::default();
    let ns = guard.create_with("shoal-t-ipvsc");
    // The nft dataplane's table is there (a node switched to IPVS on a kernel without it).
    let rs = swarm_like();
    shoal_lb::apply(&ns, &rs).await.unwrap();
    for _ in 0..2 {
        match ipvs::sync(&ns, &rs, &IpvsOptions::default()).await {
            Err(e @ IpvsError::NoIpvs { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains("no IPVS") && msg.contains(&ns), "{msg}");
            }
            other => panic!("expected NoIpvs, got {other:?}"),
        }
    }
    let tables = nft(&ns, &["list", "tables"]);
    assert!(tables.contains(&rs.table), "{tables}");
    assert!(!tables.contains(COMPANION_TABLE), "{tables}");
    // Invalid input is refused before the kernel is asked.
    let mut bad = rs.clone();
    bad.services[0].target_port = 80;
    assert!(matches!(
        ipvs::sync(&ns, &bad, &IpvsOptions::default()).await,
        Err(IpvsError::Invalid(_))
    ));
    let mut clash = rs.clone();
    clash.table = COMPANION_TABLE.into();
    assert!(matches!(
        ipvs::sync(&ns, &clash, &IpvsOptions::default()).await,
        Err(IpvsError::Invalid(_))
    ));
}
