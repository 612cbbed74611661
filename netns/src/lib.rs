//! Named network namespaces, the way iproute2 keeps them (`/run/netns/NAME` bind mounts),
//! without shelling out to `ip`.
//!
//! A namespace switch only ever happens on a dedicated, short-lived thread ([`run_in`]) or in
//! a forked child before `exec` ([`CommandExt::in_netns`]), so no thread of a caller's runtime
//! ever changes namespace. Sockets (UDP, TCP, netlink) created inside [`run_in`] stay in that
//! namespace after the thread ends; hand them to tokio with `from_std`.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, setns, unshare};

/// Where named namespaces live (the same place as `ip netns`).
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// Errors from namespace handling; each keeps the name and the OS cause.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid network namespace name {0:?} (use letters, digits, '-', '_' and '.')")]
    InvalidName(String),
    #[error("network namespace {0:?} already exists")]
    Exists(String),
    #[error("network namespace {0:?} does not exist")]
    NotFound(String),
    #[error("{what} for network namespace {name:?}: {source}")]
    Os {
        name: String,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("the thread that entered network namespace {0:?} panicked")]
    Panicked(String),
}

pub type Result<T> = std::result::Result<T, Error>;

fn os<'a>(name: &'a str, what: &'static str) -> impl FnOnce(io::Error) -> Error + 'a {
    move |source| Error::Os {
        name: name.to_string(),
        what,
        source,
    }
}

fn errno(e: nix::errno::Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// Checks a namespace name: it becomes a file name under [`NETNS_RUN_DIR`].
pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 200
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidName(name.to_string()))
    }
}

/// The file that pins the named namespace.
pub fn path(name: &str) -> PathBuf {
    Path::new(NETNS_RUN_DIR).join(name)
}

/// True when `/run/netns/NAME` exists and is a mounted namespace.
pub fn exists(name: &str) -> bool {
    validate_name(name).is_ok() && is_netns_mount(&path(name))
}

/// True when `path` (a namespace another runtime pinned, e.g. podman's
/// `/run/netns/netns-...`) is a mounted namespace.
pub fn exists_at(path: &Path) -> bool {
    is_netns_mount(path)
}

fn is_netns_mount(p: &Path) -> bool {
    // A pinned namespace is a bind mount of an nsfs inode: its device differs from the
    // directory's. An unmounted leftover file shares the directory's device.
    match (fs::metadata(p), p.parent().map(fs::metadata)) {
        (Ok(f), Some(Ok(d))) => f.dev() != d.dev(),
        _ => false,
    }
}

/// Make `/run/netns` a shared mount point, as iproute2 does, so that namespace mounts and
/// unmounts propagate into mount namespaces created later (task mount namespaces are slaves
/// of the host's): otherwise a deleted namespace stays pinned by a copy of its mount.
fn prepare_run_dir() -> io::Result<()> {
    fs::create_dir_all(NETNS_RUN_DIR)?;
    let shared = || {
        mount(
            None::<&str>,
            NETNS_RUN_DIR,
            None::<&str>,
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
    };
    match shared() {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EINVAL) => {
            // Not a mount point yet: bind it onto itself, then make it shared.
            mount(
                Some(NETNS_RUN_DIR),
                NETNS_RUN_DIR,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .map_err(errno)?;
            shared().map_err(errno)
        }
        Err(e) => Err(errno(e)),
    }
}

/// Creates a new, empty network namespace pinned at `/run/netns/NAME`.
/// Fails with [`Error::Exists`] when it is already there.
pub fn create(name: &str) -> Result<()> {
    validate_name(name)?;
    prepare_run_dir().map_err(os(name, "preparing /run/netns"))?;
    let p = path(name);
    if is_netns_mount(&p) {
        return Err(Error::Exists(name.to_string()));
    }
    // A leftover plain file (from a crash between create and mount) is reused.
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&p)
        .map_err(os(name, "creating the pin file"))?;
    let owned = name.to_string();
    let target = p.clone();
    let res = std::thread::spawn(move || -> Result<()> {
        unshare(CloneFlags::CLONE_NEWNET)
            .map_err(errno)
            .map_err(os(&owned, "unshare(CLONE_NEWNET)"))?;
        mount(
            Some("/proc/thread-self/ns/net"),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(errno)
        .map_err(os(&owned, "bind-mounting the namespace"))
    })
    .join()
    .map_err(|_| Error::Panicked(name.to_string()))?;
    if res.is_err() {
        let _ = fs::remove_file(&p);
    }
    res
}

/// Creates the namespace unless it exists. Returns true when it was created.
pub fn ensure(name: &str) -> Result<bool> {
    match create(name) {
        Ok(()) => Ok(true),
        Err(Error::Exists(_)) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Unpins and removes a named namespace. Processes still inside keep it alive until they
/// exit (see [`pids`]). Removing a namespace that does not exist is not an error.
pub fn delete(name: &str) -> Result<()> {
    validate_name(name)?;
    let p = path(name);
    if !p.exists() {
        return Ok(());
    }
    match umount2(&p, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
        Err(e) => return Err(os(name, "unmounting")(errno(e))),
    }
    match fs::remove_file(&p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(os(name, "removing the pin file")(e)),
    }
}

/// Names of all pinned namespaces.
pub fn list() -> Result<Vec<String>> {
    let mut out = Vec::new();
    let rd = match fs::read_dir(NETNS_RUN_DIR) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(os("*", "listing /run/netns")(e)),
    };
    for entry in rd.flatten() {
        if let Some(n) = entry.file_name().to_str()
            && is_netns_mount(&entry.path())
        {
            out.push(n.to_string());
        }
    }
    out.sort();
    Ok(out)
}

/// The (device, inode) pair that identifies a namespace.
fn ns_id(p: &Path) -> io::Result<(u64, u64)> {
    let m = fs::metadata(p)?;
    Ok((m.dev(), m.ino()))
}

/// Process ids whose network namespace is the named one (like `ip netns pids`).
pub fn pids(name: &str) -> Result<Vec<i32>> {
    validate_name(name)?;
    let id = ns_id(&path(name)).map_err(|_| Error::NotFound(name.to_string()))?;
    let mut out = Vec::new();
    let rd = fs::read_dir("/proc").map_err(os(name, "reading /proc"))?;
    for entry in rd.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if let Ok(pid_ns) = ns_id(&entry.path().join("ns/net"))
            && pid_ns == id
        {
            out.push(pid);
        }
    }
    Ok(out)
}

/// Opens a handle on a namespace: a name under `/run/netns`, or any path to an nsfs file
/// (`/proc/PID/ns/net`).
pub fn open(name_or_path: &str) -> Result<OwnedFd> {
    let p = if name_or_path.contains('/') {
        PathBuf::from(name_or_path)
    } else {
        validate_name(name_or_path)?;
        if !exists(name_or_path) {
            return Err(Error::NotFound(name_or_path.to_string()));
        }
        path(name_or_path)
    };
    File::open(&p)
        .map(OwnedFd::from)
        .map_err(os(name_or_path, "opening"))
}

/// Runs `f` on a new thread that has entered the namespace, and returns its result.
/// Whatever `f` opens (sockets, netlink, /proc/sys/net files) belongs to that namespace.
pub fn run_in<F, R>(name_or_path: &str, f: F) -> Result<R>
where
    F: FnOnce() -> R + Send,
    R: Send,
{
    let fd = open(name_or_path)?;
    std::thread::scope(|s| {
        s.spawn(|| {
            setns(fd.as_fd(), CloneFlags::CLONE_NEWNET)
                .map_err(errno)
                .map_err(os(name_or_path, "setns"))?;
            Ok(f())
        })
        .join()
        .map_err(|_| Error::Panicked(name_or_path.to_string()))?
    })
}

/// Writes a sysctl (`net.ipv4.ip_forward` or `net/ipv4/ip_forward`) inside the namespace.
pub fn set_sysctl(name_or_path: &str, key: &str, value: &str) -> Result<()> {
    let file = format!("/proc/sys/{}", key.replace('.', "/"));
    let value = value.to_string();
    run_in(name_or_path, move || fs::write(&file, value.as_bytes()))?.map_err(|e| Error::Os {
        name: name_or_path.to_string(),
        what: "writing a sysctl",
        source: io::Error::new(e.kind(), format!("{key}: {e}")),
    })
}

/// Reads a sysctl inside the namespace, trimmed.
pub fn get_sysctl(name_or_path: &str, key: &str) -> Result<String> {
    let file = format!("/proc/sys/{}", key.replace('.', "/"));
    run_in(name_or_path, move || fs::read_to_string(&file))?
        .map(|s| s.trim().to_string())
        .map_err(os(name_or_path, "reading a sysctl"))
}

/// Runs a spawned command inside a network namespace.
pub trait CommandExt {
    /// The child enters the namespace between fork and exec.
    fn in_netns(&mut self, name_or_path: &str) -> Result<&mut Self>;
}

impl CommandExt for Command {
    fn in_netns(&mut self, name_or_path: &str) -> Result<&mut Self> {
        let fd = open(name_or_path)?;
        // SAFETY: between fork and exec only async-signal-safe calls are allowed; setns(2)
        // is a plain system call and `fd` is owned by the closure (closed when the Command
        // is dropped, and marked close-on-exec by File::open).
        unsafe {
            self.pre_exec(move || {
                if libc_setns(fd.as_raw_fd()) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(self)
    }
}

fn libc_setns(fd: i32) -> i32 {
    // nix's setns needs a BorrowedFd; this raw form avoids any allocation after fork.
    // SAFETY: fd is a valid open namespace descriptor owned by the caller's closure.
    unsafe { nix::libc::setns(fd, nix::libc::CLONE_NEWNET) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    fn unique(tag: &str) -> String {
        format!(
            "shoal-t-{tag}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos()
        )
    }

    #[test]
    fn names_are_checked() {
        assert!(validate_name("shoal-n-abc_1.2").is_ok());
        for bad in ["", ".", "..", "a/b", "a b", "x\0"] {
            assert!(
                matches!(validate_name(bad), Err(Error::InvalidName(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn create_enter_delete() {
        if !is_root() {
            // `make test` sets SHOAL_REQUIRE_KERNEL_TESTS=1: there a skip is a failure.
            assert!(
                std::env::var_os("SHOAL_REQUIRE_KERNEL_TESTS").is_none(),
                "create_enter_delete needs root (CAP_SYS_ADMIN) to create namespaces"
            );
            eprintln!("SKIP create_enter_delete: needs root (CAP_SYS_ADMIN) to create namespaces");
            return;
        }
        struct Guard(String);
        impl Drop for Guard {
            fn drop(&mut self) {
                let _ = delete(&self.0);
            }
        }
        let name = unique("ns");
        let _guard = Guard(name.clone());
        create(&name).unwrap();
        assert!(exists(&name));
        assert!(list().unwrap().contains(&name));
        assert!(matches!(create(&name), Err(Error::Exists(_))));
        assert!(!ensure(&name).unwrap());
        // A fresh namespace has only lo.
        let dev = run_in(&name, || fs::read_to_string("/proc/thread-self/net/dev"))
            .unwrap()
            .unwrap();
        assert_eq!(dev.lines().skip(2).count(), 1, "only lo expected: {dev}");
        set_sysctl(&name, "net.ipv4.ip_forward", "1").unwrap();
        assert_eq!(get_sysctl(&name, "net.ipv4.ip_forward").unwrap(), "1");
        // The host's value is untouched by the namespace's.
        let out = Command::new("cat")
            .arg("/proc/sys/net/ipv4/conf/lo/forwarding")
            .in_netns(&name)
            .unwrap()
            .output()
            .unwrap();
        assert!(out.status.success());
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1");
        delete(&name).unwrap();
        assert!(!exists(&name));
        assert!(!path(&name).exists());
        delete(&name).unwrap();
        assert!(matches!(open(&name), Err(Error::NotFound(_))));
    }
}
