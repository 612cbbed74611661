//! Kernel WireGuard, the other backend of `shoal_wg::Device`, on a real kernel that has it:
//! runs `scripts/ipvs-vm.sh` with `examples/wg_guest.rs` as the guest program, which boots
//! Debian's cloud kernel (WIREGUARD=m) under qemu, makes two namespaces joined by a veth,
//! one kernel device in each through `Device::create`, sends through them, rotates a key
//! and stops; asserts the guest's `WG-TEST: PASS`. Without qemu, busybox-static, kmod or the
//! kernel package it skips with a visible reason — and FAILS under
//! `SHOAL_REQUIRE_KERNEL_TESTS=1` (set by `make test`).

use std::path::Path;
use std::process::Command;
use std::time::Instant;

fn required() -> bool {
    std::env::var_os("SHOAL_REQUIRE_KERNEL_TESTS").is_some()
}

#[test]
fn kernel_wireguard_in_qemu_vm() {
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
            "{} not installed: run the project's install step (scripts/deps.sh)",
            missing.join(", ")
        );
        assert!(!required(), "kernel_wireguard_in_qemu_vm cannot run: {why}");
        eprintln!("SKIP kernel_wireguard_in_qemu_vm: {why}");
        return;
    }
    let start = Instant::now();
    let out = Command::new("bash")
        .arg(repo.join("scripts/ipvs-vm.sh"))
        .env("SHOAL_VM_PKG", "shoal-wg")
        .env("SHOAL_VM_EXAMPLE", "wg_guest")
        .env("SHOAL_VM_MARKER", "WG-TEST")
        .env("SHOAL_VM_MODULES", "wireguard")
        .current_dir(repo)
        .output()
        .expect("running scripts/ipvs-vm.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    eprintln!("{stderr}");
    if out.status.code() == Some(2) {
        assert!(
            !required(),
            "kernel_wireguard_in_qemu_vm cannot run: {stderr}"
        );
        eprintln!("SKIP kernel_wireguard_in_qemu_vm: {stderr}");
        return;
    }
    let marker = stdout
        .lines()
        .find(|l| l.starts_with("WG-TEST:"))
        .unwrap_or("no WG-TEST marker (VM timed out or crashed)");
    assert_eq!(
        marker,
        "WG-TEST: PASS",
        "kernel WireGuard in the VM failed (script exit {:?}, {:.1} s)",
        out.status.code(),
        start.elapsed().as_secs_f64()
    );
    assert!(out.status.success());
    eprintln!(
        "kernel_wireguard_in_qemu_vm: {:.1} s",
        start.elapsed().as_secs_f64()
    );
}
