//! Kernel WireGuard, the other backend of `shoal_wg::Device`, on a real kernel that has it:
//! runs `scripts/ipvs-vm.sh` with `wg/examples/wg_guest.rs` as the guest program, which
//! boots Debian's cloud kernel (WIREGUARD=m) under qemu, makes two namespaces joined by a
//! veth, one kernel device in each through `Device::create`, sends through them, rotates a
//! key and stops; asserts the guest's `WG-TEST: PASS`. Without qemu, busybox-static, kmod
//! or the kernel package it skips with a visible reason, and FAILS under
//! `SHOAL_REQUIRE_KERNEL_TESTS=1` (set by `make test`).

#[test]
fn kernel_wireguard_in_qemu_vm() {
    shoal_tests::vm_test(
        "kernel_wireguard_in_qemu_vm",
        "scripts/ipvs-vm.sh",
        &[
            ("SHOAL_VM_PKG", "shoal-wg"),
            ("SHOAL_VM_EXAMPLE", "wg_guest"),
            ("SHOAL_VM_MARKER", "WG-TEST"),
            ("SHOAL_VM_MODULES", "wireguard"),
        ],
        &["qemu-system-x86_64", "busybox", "ipvsadm", "depmod"],
        "WG-TEST",
    );
}
