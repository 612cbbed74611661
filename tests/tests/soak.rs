//! The soak program (benches/src/bin/soak.rs) for one minute: a 3-node lab under continuous
//! DNS and HTTP load while a service is scaled every 3 s and a node is killed and started
//! again. It exits 0 only when every target is met (no failure outside the kill's grace
//! window, agent RSS growth <= 10%, file descriptors flat). The report goes to a temporary
//! directory; the 10-minute report in benches/reports is written by hand
//! (`./target/release/soak --duration 10m`).

use std::process::Command;

use shoal_tests::{require_kernel, shoal_bin};

#[test]
fn soak_one_minute() {
    if !require_kernel("soak_one_minute") {
        return;
    }
    // target/<profile>/deps/<test-binary> -> target/<profile>/soak
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().and_then(|d| d.parent()).unwrap().join("soak");
    assert!(
        bin.exists(),
        "{} is missing: build it first (cargo build --workspace --all-targets)",
        bin.display()
    );
    let dir = std::env::temp_dir().join(format!("shoal-soak-{}", std::process::id()));
    let out = Command::new(&bin)
        .args(["--duration", "60s", "--report", "soak-ci"])
        .env("SHOAL_REPORT_DIR", &dir)
        .env("SHOAL_BIN", shoal_bin())
        .output()
        .expect("run the soak");
    let _ = std::fs::remove_dir_all(&dir);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "the soak missed a target (exit {:?}):\n{stdout}\n{stderr}",
        out.status.code()
    );
}
