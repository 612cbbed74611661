//! A benchmark stopped by SIGTERM removes what it created: its namespaces, the servers
//! running in them, its temporary directory. Runs the real `dns_bench` (root; aardvark-dns,
//! dnsmasq and dnsperf from scripts/deps.sh) and stops it once its servers are up.

use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Processes whose command line contains `needle`.
fn pids_with(needle: &str) -> Vec<u32> {
    let mut out = vec![];
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        if String::from_utf8_lossy(&cmd)
            .replace('\0', " ")
            .contains(needle)
        {
            out.push(pid);
        }
    }
    out
}

fn netns_with(prefix: &str) -> Vec<String> {
    let mut names = shoal_netns::list().unwrap();
    names.retain(|n| n.starts_with(prefix));
    names
}

/// Removes what the benchmark left if the test fails: namespaces by prefix (and what runs in
/// them), its temporary directory.
struct Sweep(String, std::path::PathBuf);
impl Drop for Sweep {
    fn drop(&mut self) {
        for n in netns_with(&self.0) {
            shoal_benches::remove_netns(&n);
        }
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

#[test]
fn dns_bench_cleans_up_on_sigterm() {
    // SAFETY: plain syscall.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP dns_bench_cleans_up_on_sigterm: needs root (network namespaces)");
        return;
    }
    let reports = std::env::temp_dir().join(format!("shoal-b-sigtest-{}", std::process::id()));
    let mut child = Command::new(env!("CARGO_BIN_EXE_dns_bench"))
        .args([
            "--rounds",
            "1",
            "--seconds",
            "2",
            "--containers",
            "20",
            "--fifo",
            "0",
        ])
        .env("SHOAL_REPORT_DIR", &reports)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let prefix = format!("shoal-b-dns-{pid}-");
    let tmp = std::env::temp_dir().join(format!("shoal-b-dns-{pid}"));
    let _sweep = Sweep(prefix.clone(), tmp.clone());
    let aardvark = format!("{}/aardvark", tmp.display());
    let hosts = format!("{}/hosts", tmp.display());

    // Wait until the round's servers run: aardvark-dns and dnsmasq, started with files
    // from the benchmark's temporary directory.
    let start = Instant::now();
    loop {
        if !pids_with(&aardvark).is_empty() && !pids_with(&hosts).is_empty() {
            break;
        }
        if let Some(st) = child.try_wait().unwrap() {
            panic!("dns_bench ended before its servers ran: {st}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "dns_bench's servers did not start within 180 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!netns_with(&prefix).is_empty());
    assert!(tmp.exists());

    // SAFETY: plain syscall on our own child.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(128 + libc::SIGTERM),
        "exit status {:?} (signal {:?}); stderr:\n{stderr}",
        out.status.code(),
        out.status.signal()
    );
    assert!(stderr.contains("signal 15: cleaning up"), "{stderr}");
    assert_eq!(netns_with(&prefix), Vec::<String>::new());
    // SIGKILLed processes may take a moment to be gone from /proc.
    let start = Instant::now();
    while !(pids_with(&aardvark).is_empty() && pids_with(&hosts).is_empty()) {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "servers left running: {:?} {:?}",
            pids_with(&aardvark),
            pids_with(&hosts)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!tmp.exists(), "{} left behind", tmp.display());
    assert!(
        !reports.join("dns.md").exists(),
        "the run should not have finished"
    );
    let _ = std::fs::remove_dir_all(&reports);
}
