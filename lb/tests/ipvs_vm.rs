//! The IPVS client against real kernels.
//!
//! - `no_ipvs_on_this_kernel`: this host's kernel has no IPVS; opening a client in a fresh
//!   namespace must give the clear [`IpvsError::NoIpvs`] (not a panic, not a raw errno). When a
//!   kernel does have IPVS, it checks that an empty namespace lists no services instead.
//! - `ipvs_in_qemu_vm`: runs `scripts/ipvs-vm.sh`, which boots Debian's cloud kernel (with
//!   IPVS) under qemu and runs `examples/ipvs_guest.rs` as its init's test program; asserts the
//!   guest's `IPVS-TEST: PASS` marker. Without qemu, busybox-static, ipvsadm, kmod or the
//!   kernel package it skips with a visible reason — and FAILS under
//!   `SHOAL_REQUIRE_KERNEL_TESTS=1` (set by `make test`).

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use shoal_lb::ipvs::{IpvsClient, IpvsError};

fn required() -> bool {
    std::env::var_os("SHOAL_REQUIRE_KERNEL_TESTS").is_some()
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(2))
        == Some("0")
}

/// Deletes the namespace on drop, also on panic.
struct Ns(String);

impl Drop for Ns {
    fn drop(&mut self) {
        if let Err(e) = shoal_netns::delete(&self.0) {
            eprintln!("cleanup: deleting namespace {}: {e}", self.0);
        }
    }
}

#[test]
fn no_ipvs_on_this_kernel() {
    if !is_root() {
        assert!(
            !required(),
            "this test must run as root (it creates a network namespace)"
        );
        eprintln!("SKIP no_ipvs_on_this_kernel: not root");
        return;
    }
    let ns = Ns(format!("shoal-t-ipvs-{}", std::process::id()));
    shoal_netns::create(&ns.0).unwrap();
    let has_ipvs = Path::new("/proc/net/ip_vs").exists();
    match IpvsClient::open_in(&ns.0) {
        Err(e @ IpvsError::NoIpvs { .. }) => {
            assert!(!has_ipvs, "NoIpvs although /proc/net/ip_vs exists: {e}");
            let msg = e.to_string();
            assert!(
                msg.contains("no IPVS") && msg.contains("modprobe ip_vs"),
                "{msg}"
            );
            assert!(msg.contains(&ns.0), "{msg}");
        }
        Ok(mut c) => {
            assert!(has_ipvs, "opened an IPVS client without /proc/net/ip_vs");
            assert_eq!(c.list().unwrap(), vec![]);
        }
        Err(e) => panic!("expected NoIpvs, got {e:?}"),
    }
    // A missing namespace is a netns error, not NoIpvs.
    assert!(matches!(
        IpvsClient::open_in("shoal-t-ipvs-no-such-ns"),
        Err(IpvsError::Netns(_))
    ));
}

#[test]
fn ipvs_in_qemu_vm() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let missing: Vec<&str> = ["qemu-system-x86_64", "busybox", "ipvsadm", "depmod"]
        .into_iter()
        .filter(|t| {
            !Command::new("sh")
                .args(["-c", &format!("PATH=$PATH:/usr/sbin:/sbin command -v {t}")])
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false)
        })
        .collect();
    if !missing.is_empty() {
        let why = format!(
            "{} not installed: run the project's install step (`make deps` / scripts/deps.sh: \
             qemu-system-x86 busybox-static ipvsadm kmod + the kernel package)",
            missing.join(", ")
        );
        assert!(!required(), "ipvs_in_qemu_vm cannot run: {why}");
        eprintln!("SKIP ipvs_in_qemu_vm: {why}");
        return;
    }
    let start = Instant::now();
    let out = Command::new("bash")
        .arg(repo.join("scripts/ipvs-vm.sh"))
        .current_dir(repo)
        .output()
        .expect("running scripts/ipvs-vm.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    eprintln!("{stderr}");
    if out.status.code() == Some(2) {
        // The script's "cannot set up" exit (kernel package not downloadable, ...).
        assert!(!required(), "ipvs_in_qemu_vm cannot run: {stderr}");
        eprintln!("SKIP ipvs_in_qemu_vm: {stderr}");
        return;
    }
    let marker = stdout
        .lines()
        .find(|l| l.starts_with("IPVS-TEST:"))
        .unwrap_or("no IPVS-TEST marker (VM timed out or crashed)");
    assert_eq!(
        marker,
        "IPVS-TEST: PASS",
        "IPVS test in the VM failed (script exit {:?}, {:.1} s)",
        out.status.code(),
        start.elapsed().as_secs_f64()
    );
    assert!(out.status.success());
    eprintln!("ipvs_in_qemu_vm: {:.1} s", start.elapsed().as_secs_f64());
}
