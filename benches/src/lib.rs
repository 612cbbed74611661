//! Shared pieces of the benchmark programs: percentiles and reports.

pub mod dnsprobe;

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, bail};
use std::time::Duration;

/// The value at quantile `q` (0..=1) of sorted samples (nearest rank).
pub fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

pub fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

/// The value after `name` on the command line, or `default` when the flag is absent. A value
/// that does not parse stops the program with a message naming the flag.
pub fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    match args.iter().position(|a| a == name) {
        None => default,
        Some(i) => {
            let v = args
                .get(i + 1)
                .unwrap_or_else(|| panic!("{name} needs a value"));
            v.parse()
                .unwrap_or_else(|_| panic!("{name} {v:?}: not a valid value"))
        }
    }
}

/// Stops the program unless every argument is one of `flags` (each followed by its value):
/// `--help` prints `usage` and exits 0; anything else unknown is named, with the usage, and
/// exits 2 before anything is created.
pub fn check_flags(args: &[String], flags: &[&str], usage: &str) {
    if args.iter().skip(1).any(|a| a == "--help" || a == "-h") {
        println!("{usage}");
        std::process::exit(0);
    }
    if let Some(e) = flag_error(args, flags) {
        eprintln!("{e}\n{usage}");
        std::process::exit(2);
    }
}

/// What is wrong with the command line `args` (program name first), if anything.
pub fn flag_error(args: &[String], flags: &[&str]) -> Option<String> {
    let mut i = 1;
    while i < args.len() {
        let a = args[i].as_str();
        if !flags.contains(&a) {
            return Some(format!("unknown argument {a:?}"));
        }
        if args.get(i + 1).is_none() {
            return Some(format!("{a} needs a value"));
        }
        i += 2;
    }
    None
}

/// What a benchmark would leave behind if a signal stopped it: its namespaces (by name
/// prefix, with whatever runs in them), a lab, a directory.
pub enum Leftover {
    Netns(String),
    Lab(String),
    Dir(PathBuf),
}

/// Held while a namespace is being created; the signal handler takes it exclusively (after
/// setting STOPPING), so no namespace appears after its sweep.
static CREATING: std::sync::RwLock<()> = std::sync::RwLock::new(());

/// Set when a signal is being handled.
static STOPPING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Registered with `atexit`: while a signal is being handled, the main thread (which may fail
/// because its namespaces vanish) must not end the process before the clean-up has; it waits
/// here until the clean-up thread's `_exit`.
extern "C" fn wait_for_clean_up() {
    while STOPPING.load(std::sync::atomic::Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `create` (which makes a namespace) unless a signal is being handled; then it fails.
pub fn creating<T>(create: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    let _creating = CREATING.read().unwrap_or_else(|e| e.into_inner());
    if STOPPING.load(std::sync::atomic::Ordering::SeqCst) {
        bail!("stopping: a signal arrived");
    }
    create()
}

/// Kills (SIGKILL) every process inside the named namespace but this one, then removes it.
/// For namespaces a benchmark created, with only what it started inside.
pub fn remove_netns(name: &str) {
    for pid in shoal_netns::pids(name).unwrap_or_default() {
        if pid as u32 != std::process::id() {
            // SAFETY: plain syscall on a process inside a namespace this program created.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    if let Err(e) = shoal_netns::delete(name) {
        eprintln!("deleting namespace {name}: {e}");
    }
}

/// The write end of the pipe from the signal handler to the clean-up thread.
static SIGNAL_PIPE: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

/// The signal handler: only hands the signal number to the clean-up thread (write(2) is
/// async-signal-safe).
extern "C" fn on_signal(sig: libc::c_int) {
    let fd = SIGNAL_PIPE.load(std::sync::atomic::Ordering::SeqCst);
    let b = sig as u8;
    // SAFETY: writes one byte from a live local to a pipe this program opened.
    unsafe { libc::write(fd, (&b as *const u8).cast(), 1) };
}

/// SIGINT, SIGTERM or SIGHUP: remove `leftovers` and exit with 128 + the signal, instead of
/// dying with namespaces and servers left behind (the guards' `Drop` does not run then).
/// A handler passes the signal to a thread through a pipe (the self-pipe pattern; the
/// signal-hook crate does the same, not worth a dependency for this); blocking the signals
/// instead would pass the blocked mask on to every server and dnsperf started later (std's
/// Command does not reset it). A signal the caller ignores (`nohup`, a background job's
/// SIGINT) stays ignored. The process exits with `_exit` once the clean-up is done, even if
/// the main thread fails or returns meanwhile.
pub fn clean_up_on_signal(leftovers: Vec<Leftover>) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the two-element array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        eprintln!(
            "no clean-up on signals: pipe2: {}",
            std::io::Error::last_os_error()
        );
        return;
    }
    SIGNAL_PIPE.store(fds[1], std::sync::atomic::Ordering::SeqCst);
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: sigaction structs are plain data, zeroed then filled; the handler only
        // calls write(2).
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            libc::sigaction(sig, std::ptr::null(), &mut old);
            if old.sa_sigaction == libc::SIG_IGN {
                continue;
            }
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            act.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut act.sa_mask);
            libc::sigaction(sig, &act, std::ptr::null_mut());
        }
    }
    // SAFETY: registers a plain function.
    unsafe { libc::atexit(wait_for_clean_up) };
    let read_fd = fds[0];
    std::thread::spawn(move || {
        let mut b = 0u8;
        // SAFETY: reads one byte into a live local from the pipe opened above.
        while unsafe { libc::read(read_fd, (&mut b as *mut u8).cast(), 1) } != 1 {}
        let sig = b as i32;
        STOPPING.store(true, std::sync::atomic::Ordering::SeqCst);
        eprintln!("signal {sig}: cleaning up");
        let _no_more = CREATING.write().unwrap_or_else(|e| e.into_inner());
        for l in &leftovers {
            match l {
                Leftover::Netns(prefix) => {
                    for name in shoal_netns::list().unwrap_or_default() {
                        if name.starts_with(prefix.as_str()) {
                            remove_netns(&name);
                        }
                    }
                }
                Leftover::Lab(name) => match shoal_bin() {
                    Ok(bin) => drop(LabGuard {
                        bin,
                        name: name.clone(),
                    }),
                    Err(e) => eprintln!("lab {name} left up: {e}"),
                },
                Leftover::Dir(dir) => {
                    let _ = std::fs::remove_dir_all(dir);
                }
            }
        }
        // _exit: the main thread may be waiting in `wait_for_clean_up` inside exit().
        // SAFETY: ends the process; nothing is left to run.
        unsafe { libc::_exit(128 + sig) };
    });
}

/// Median (mean of the middle two for an even count); 0 for none.
pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Writes `benches/reports/<name>.md` (or `$SHOAL_REPORT_DIR/<name>.md`) and returns its path.
pub fn write_report(name: &str, text: &str) -> anyhow::Result<PathBuf> {
    let dir = std::env::var("SHOAL_REPORT_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("reports"));
    std::fs::create_dir_all(&dir)?;
    let p = dir.join(format!("{name}.md"));
    std::fs::write(&p, text)?;
    Ok(p)
}

/// The `shoal` binary: `SHOAL_BIN`, else the one next to this program.
pub fn shoal_bin() -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var("SHOAL_BIN") {
        return Ok(PathBuf::from(p));
    }
    let me = std::env::current_exe()?;
    let bin = me
        .parent()
        .map(|d| d.join("shoal"))
        .context("locating the shoal binary")?;
    if !bin.exists() {
        bail!(
            "{} is missing: build it first (cargo build --release -p shoal-cli) or set SHOAL_BIN",
            bin.display()
        );
    }
    Ok(bin)
}

/// Takes the lab down on drop: after success, on error and during a panic.
pub struct LabGuard {
    pub bin: PathBuf,
    pub name: String,
}

impl Drop for LabGuard {
    fn drop(&mut self) {
        match Command::new(&self.bin)
            .args(["lab", "down", "--name", &self.name])
            .output()
        {
            Ok(o) if o.status.success() => eprintln!("lab {} is down", self.name),
            Ok(o) => eprintln!(
                "lab down --name {} failed: {}",
                self.name,
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => eprintln!("lab down --name {}: {e}", self.name),
        }
    }
}

/// `shoal lab up --name NAME --nodes N --store etcd`, and a guard that takes the lab down
/// again when dropped (after success, on error and during a panic).
pub fn lab_up(bin: &std::path::Path, name: &str, nodes: u32) -> anyhow::Result<LabGuard> {
    let guard = LabGuard {
        bin: bin.to_path_buf(),
        name: name.to_string(),
    };
    let up = Command::new(bin)
        .args(["lab", "up", "--name", name, "--nodes", &nodes.to_string()])
        .args(["--store", "etcd"])
        .output()
        .context("running shoal lab up")?;
    if !up.status.success() {
        bail!(
            "lab up failed: {}",
            String::from_utf8_lossy(&up.stderr).trim()
        );
    }
    Ok(guard)
}

/// Asks the resolver `sock` is connected to (127.0.0.11 inside a container) for the A
/// records of `name`, with DNS id `id`; the addresses answered.
pub fn ask(
    sock: &std::net::UdpSocket,
    id: u16,
    name: &str,
) -> anyhow::Result<Vec<std::net::Ipv4Addr>> {
    let mut m = hickory_proto::op::Message::query();
    m.metadata.id = id;
    m.metadata.recursion_desired = true;
    m.add_query(hickory_proto::op::Query::query(
        hickory_proto::rr::Name::from_ascii(name)?,
        hickory_proto::rr::RecordType::A,
    ));
    sock.send(&m.to_vec()?)?;
    let mut buf = [0u8; 4096];
    loop {
        let n = sock.recv(&mut buf)?;
        let r = hickory_proto::op::Message::from_vec(&buf[..n])?;
        if r.metadata.id != id {
            continue;
        }
        return Ok(r
            .answers
            .iter()
            .filter_map(|rr| match &rr.data {
                hickory_proto::rr::RData::A(a) => Some(a.0),
                _ => None,
            })
            .collect());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_are_checked() {
        let argv = |v: &[&str]| -> Vec<String> {
            std::iter::once("bench")
                .chain(v.iter().copied())
                .map(String::from)
                .collect()
        };
        let flags = ["--rounds", "--seconds"];
        assert_eq!(flag_error(&argv(&[]), &flags), None);
        assert_eq!(
            flag_error(&argv(&["--rounds", "3", "--seconds", "2"]), &flags),
            None
        );
        assert_eq!(
            flag_error(&argv(&["--round", "3"]), &flags).as_deref(),
            Some("unknown argument \"--round\"")
        );
        assert_eq!(
            flag_error(&argv(&["--rounds", "3", "--seconds"]), &flags).as_deref(),
            Some("--seconds needs a value")
        );
        // A stray value is named.
        assert_eq!(
            flag_error(&argv(&["3"]), &flags).as_deref(),
            Some("unknown argument \"3\"")
        );
    }

    #[test]
    fn quantiles_use_nearest_rank() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(quantile(&v, 0.5), Duration::from_millis(50));
        assert_eq!(quantile(&v, 0.99), Duration::from_millis(99));
        assert_eq!(quantile(&v, 1.0), Duration::from_millis(100));
        assert_eq!(quantile(&[], 0.5), Duration::ZERO);
    }
}
