//! The agent itself on a real kernel with IPVS and WireGuard (this host's kernel has
//! neither): `scripts/agent-vm.sh` boots Debian's cloud kernel under qemu with the static
//! `shoal` binary and runs `scripts/agent-vm-guest.sh` there: a two-node lab with
//! `[lb] dataplane = "ipvs"` and an encrypted network over kernel WireGuard; a VIP spreading
//! requests over replicas on both nodes through IPVS, a published port answering, the
//! encrypted network carrying traffic with no plaintext on the guest's underlay. Without
//! qemu or the kernel package it skips with a visible reason, and FAILS under
//! `SHOAL_REQUIRE_KERNEL_TESTS=1` (set by `make test`).

#[test]
fn agent_on_a_kernel_with_ipvs_and_wireguard() {
    shoal_tests::vm_test(
        "agent_on_a_kernel_with_ipvs_and_wireguard",
        "scripts/agent-vm.sh",
        &[],
        &[
            "qemu-system-x86_64",
            "busybox",
            "ipvsadm",
            "depmod",
            "etcd",
            "tcpdump",
        ],
        "AGENT-VM-TEST",
    );
}
