//! In-process nftables: Debian's `libnftables.so.1`, loaded at run time with `dlopen`.
//!
//! Hand-written FFI: no maintained crate wraps libnftables (the `nftables` crate spawns
//! `nft -j`), and the API we need is eight functions of `nftables/libnftables.h`
//! (nft 1.0.6):
//!
//! ```c
//! struct nft_ctx *nft_ctx_new(uint32_t flags);           /* NFT_CTX_DEFAULT = 0 */
//! void nft_ctx_free(struct nft_ctx *ctx);
//! void nft_ctx_set_dry_run(struct nft_ctx *ctx, bool dry);
//! int nft_ctx_buffer_output(struct nft_ctx *ctx);
//! int nft_ctx_buffer_error(struct nft_ctx *ctx);
//! const char *nft_ctx_get_output_buffer(struct nft_ctx *ctx);
//! const char *nft_ctx_get_error_buffer(struct nft_ctx *ctx);
//! int nft_run_cmd_from_buffer(struct nft_ctx *nft, const char *buf);
//! int nft_run_cmd_from_filename(struct nft_ctx *nft, const char *filename);
//! unsigned int nft_ctx_output_get_flags(struct nft_ctx *ctx);
//! void nft_ctx_output_set_flags(struct nft_ctx *ctx, unsigned int flags);
//! ```
//!
//! Loading at run time (not linking) keeps the build free of `libnftables-dev`, and a machine
//! without the library falls back to spawning `nft`.
//!
//! Namespaces: `nft_ctx_new(NFT_CTX_DEFAULT)` opens the context's netlink socket (since nft
//! 0.9.9 it is never reopened), and a socket belongs to the network namespace of the thread
//! that created it. So one context per namespace is created on a thread inside it
//! ([`shoal_netns::run_in`]) and afterwards used from any thread (tokio's blocking pool).
//!
//! Thread safety: a context is not thread-safe (parser state, cache, output buffers): each
//! sits behind its own mutex. `nft_ctx_new`/`nft_ctx_free` touch process-global state
//! (one-time GMP init, xtables init), so they are serialised by one global lock. Commands of
//! different contexts run in parallel; the one process-global piece they could share is
//! libnftables' interface cache (used to resolve `iif`/`oif` by index, released by every
//! `nft_ctx_free`, and filled in whatever namespace first needed it): the rendered rulesets
//! never use `iif`/`oif`, and must not start to while contexts run in parallel.
//!
//! Staleness: contexts are cached by namespace name together with the namespace's identity
//! (device and inode of its nsfs file). A namespace deleted and re-created under the same name
//! has a new inode and gets a new context. The identity cannot be reused by another namespace
//! while our context lives: its socket holds a reference to the old namespace, whose inode
//! number is only released when the namespace is freed.

use std::collections::HashMap;
use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::io::Write as _;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::os::unix::fs::MetadataExt as _;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use tracing::{debug, warn};

/// The library's soname (Debian 12: package `libnftables1`).
pub(crate) const SONAME: &str = "libnftables.so.1";

/// Name used for the script in nft's error messages, the same as `nft -f -` prints, so errors
/// read the same whichever way the script was run.
pub(crate) const SCRIPT_NAME: &str = "/dev/stdin";

#[repr(C)]
struct NftCtx {
    _opaque: [u8; 0],
}

type CtxNew = unsafe extern "C" fn(u32) -> *mut NftCtx;
type CtxFn = unsafe extern "C" fn(*mut NftCtx);
type CtxInt = unsafe extern "C" fn(*mut NftCtx) -> c_int;
type CtxBuf = unsafe extern "C" fn(*mut NftCtx) -> *const c_char;
type CtxSetBool = unsafe extern "C" fn(*mut NftCtx, bool);
type CtxRun = unsafe extern "C" fn(*mut NftCtx, *const c_char) -> c_int;
type CtxGetFlags = unsafe extern "C" fn(*mut NftCtx) -> u32;
type CtxSetFlags = unsafe extern "C" fn(*mut NftCtx, u32);

/// `NFT_CTX_OUTPUT_JSON`: list in JSON (`nft -j`).
const NFT_CTX_OUTPUT_JSON: u32 = 1 << 4;
/// `NFT_CTX_OUTPUT_STATELESS`: no counter values (`nft -s`).
const NFT_CTX_OUTPUT_STATELESS: u32 = 1 << 2;

/// `NFT_CTX_DEFAULT`: a context with a netlink socket.
const NFT_CTX_DEFAULT: u32 = 0;

/// The resolved entry points. The library is never unloaded.
pub(crate) struct Lib {
    ctx_new: CtxNew,
    ctx_free: CtxFn,
    set_dry_run: CtxSetBool,
    buffer_output: CtxInt,
    buffer_error: CtxInt,
    get_output_buffer: CtxBuf,
    get_error_buffer: CtxBuf,
    run_cmd_from_buffer: CtxRun,
    run_cmd_from_filename: CtxRun,
    output_get_flags: CtxGetFlags,
    output_set_flags: CtxSetFlags,
}

/// Loads `soname` with `dlopen` and resolves every function, or says why not.
pub(crate) fn load(soname: &str) -> Result<Lib, String> {
    let c_name = CString::new(soname).map_err(|e| e.to_string())?;
    // SAFETY: dlopen with a valid C string; the handle is intentionally never closed, so the
    // resolved function pointers stay valid for the life of the process.
    let handle = unsafe { libc::dlopen(c_name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if handle.is_null() {
        return Err(format!("dlopen({soname}): {}", dlerror()));
    }
    let sym = |name: &CStr| -> Result<*mut c_void, String> {
        // SAFETY: `handle` is a live dlopen handle and `name` a valid C string.
        let p = unsafe { libc::dlsym(handle, name.as_ptr()) };
        if p.is_null() {
            Err(format!(
                "{soname}: symbol {name:?} not found: {}",
                dlerror()
            ))
        } else {
            Ok(p)
        }
    };
    // SAFETY (all transmutes below): each symbol is the libnftables function of that name,
    // whose C prototype (libnftables.h, quoted in the module docs) matches the Rust type.
    unsafe {
        Ok(Lib {
            ctx_new: std::mem::transmute::<*mut c_void, CtxNew>(sym(c"nft_ctx_new")?),
            ctx_free: std::mem::transmute::<*mut c_void, CtxFn>(sym(c"nft_ctx_free")?),
            set_dry_run: std::mem::transmute::<*mut c_void, CtxSetBool>(sym(
                c"nft_ctx_set_dry_run",
            )?),
            buffer_output: std::mem::transmute::<*mut c_void, CtxInt>(sym(
                c"nft_ctx_buffer_output",
            )?),
            buffer_error: std::mem::transmute::<*mut c_void, CtxInt>(sym(c"nft_ctx_buffer_error")?),
            get_output_buffer: std::mem::transmute::<*mut c_void, CtxBuf>(sym(
                c"nft_ctx_get_output_buffer",
            )?),
            get_error_buffer: std::mem::transmute::<*mut c_void, CtxBuf>(sym(
                c"nft_ctx_get_error_buffer",
            )?),
            run_cmd_from_buffer: std::mem::transmute::<*mut c_void, CtxRun>(sym(
                c"nft_run_cmd_from_buffer",
            )?),
            run_cmd_from_filename: std::mem::transmute::<*mut c_void, CtxRun>(sym(
                c"nft_run_cmd_from_filename",
            )?),
            output_get_flags: std::mem::transmute::<*mut c_void, CtxGetFlags>(sym(
                c"nft_ctx_output_get_flags",
            )?),
            output_set_flags: std::mem::transmute::<*mut c_void, CtxSetFlags>(sym(
                c"nft_ctx_output_set_flags",
            )?),
        })
    }
}

fn dlerror() -> String {
    // SAFETY: dlerror returns NULL or a valid C string owned by libc (thread-local).
    let p = unsafe { libc::dlerror() };
    if p.is_null() {
        "unknown error".into()
    } else {
        // SAFETY: non-null C string from dlerror, copied at once.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

/// The process-wide library, loaded on first use.
pub(crate) fn lib() -> Result<&'static Lib, &'static str> {
    static LIB: OnceLock<Result<Lib, String>> = OnceLock::new();
    LIB.get_or_init(|| load(SONAME))
        .as_ref()
        .map_err(String::as_str)
}

/// Serialises `nft_ctx_new` / `nft_ctx_free` (process-global state inside libnftables).
static CTX_LIFECYCLE: Mutex<()> = Mutex::new(());

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks cannot leave the C state half-changed in a way
    // a retry would make worse; keep going.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One libnftables context, bound to the namespace it was created in.
struct Ctx {
    lib: &'static Lib,
    ptr: *mut NftCtx,
}

// SAFETY: a context may be used from any thread as long as only one thread uses it at a time,
// which the Mutex around every Ctx guarantees (Ctx is deliberately not Sync).
unsafe impl Send for Ctx {}

impl Drop for Ctx {
    fn drop(&mut self) {
        let _g = lock(&CTX_LIFECYCLE);
        // SAFETY: `ptr` came from nft_ctx_new and is freed exactly once.
        unsafe { (self.lib.ctx_free)(self.ptr) }
    }
}

/// What one command produced: its return code, and both buffers (read after every command:
/// reading a buffer is what rewinds it for the next command).
pub(crate) struct Outcome {
    pub rc: c_int,
    pub stdout: String,
    pub stderr: String,
}

/// A command for a context.
pub(crate) enum Cmd<'a> {
    /// A whole script, as `nft -f` runs it (`dry_run`: `nft -c -f`).
    Script { text: &'a str, dry_run: bool },
    /// A one-line command, as `nft CMD` runs it.
    Line(&'a str),
    /// A one-line command with JSON output, as `nft -j CMD` runs it.
    JsonLine(&'a str),
    /// A one-line command without stateful values (counters), as `nft -s CMD` runs it.
    StatelessLine(&'a str),
}

impl Ctx {
    fn run(&mut self, cmd: &Cmd<'_>) -> std::io::Result<Outcome> {
        let rc = match cmd {
            Cmd::Line(line) => {
                let c = CString::new(*line).map_err(std::io::Error::other)?;
                // SAFETY: exclusive use of a live context; `c` outlives the call.
                unsafe { (self.lib.run_cmd_from_buffer)(self.ptr, c.as_ptr()) }
            }
            Cmd::JsonLine(line) | Cmd::StatelessLine(line) => {
                let extra = match cmd {
                    Cmd::JsonLine(_) => NFT_CTX_OUTPUT_JSON,
                    _ => NFT_CTX_OUTPUT_STATELESS,
                };
                let c = CString::new(*line).map_err(std::io::Error::other)?;
                // SAFETY: exclusive use of a live context; `c` outlives the call. The output
                // flags are restored before the context's mutex is released.
                unsafe {
                    let flags = (self.lib.output_get_flags)(self.ptr);
                    (self.lib.output_set_flags)(self.ptr, flags | extra);
                    let rc = (self.lib.run_cmd_from_buffer)(self.ptr, c.as_ptr());
                    (self.lib.output_set_flags)(self.ptr, flags);
                    rc
                }
            }
            Cmd::Script { text, dry_run } => {
                // A script goes through a file, not nft_run_cmd_from_buffer: nft 1.0.6 reports
                // errors in a multi-line buffer without the line number and quotes the
                // buffer's FIRST line whatever line failed. From a file it prints
                // `FILE:LINE:COLS: Error: ...` and the failing line, as `nft -f -` does.
                let file = memfd(text)?;
                let path = format!("/proc/self/fd/{}", file.as_raw_fd());
                let c = CString::new(path).map_err(std::io::Error::other)?;
                // SAFETY: exclusive use of a live context; `c` and `file` outlive the calls.
                unsafe {
                    (self.lib.set_dry_run)(self.ptr, *dry_run);
                    let rc = (self.lib.run_cmd_from_filename)(self.ptr, c.as_ptr());
                    (self.lib.set_dry_run)(self.ptr, false);
                    rc
                }
            }
        };
        // SAFETY: the buffers are valid C strings until the next command on this context;
        // both are copied at once.
        let (stdout, stderr) = unsafe {
            (
                copy_c((self.lib.get_output_buffer)(self.ptr)),
                copy_c((self.lib.get_error_buffer)(self.ptr)),
            )
        };
        let stderr = match cmd {
            Cmd::Script { .. } => rename_script(&stderr),
            Cmd::Line(_) | Cmd::JsonLine(_) | Cmd::StatelessLine(_) => stderr,
        };
        Ok(Outcome { rc, stdout, stderr })
    }
}

/// Replaces `/proc/self/fd/N:` (our memfd) with [`SCRIPT_NAME`] in nft's messages.
fn rename_script(stderr: &str) -> String {
    let mut out = String::with_capacity(stderr.len());
    for line in stderr.split_inclusive('\n') {
        match line.strip_prefix("/proc/self/fd/").and_then(|rest| {
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            (digits > 0).then(|| &rest[digits..])
        }) {
            Some(rest) if rest.starts_with(':') => {
                out.push_str(SCRIPT_NAME);
                out.push_str(rest);
            }
            _ => out.push_str(line),
        }
    }
    out
}

/// # Safety
/// `p` is NULL or a valid NUL-terminated string.
unsafe fn copy_c(p: *const c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: guaranteed by the caller.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

/// An anonymous in-memory file holding `text` (close-on-exec).
fn memfd(text: &str) -> std::io::Result<OwnedFd> {
    // SAFETY: plain system call with a valid C string.
    let fd = unsafe { libc::memfd_create(c"shoal-lb-script".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut f = std::fs::File::from(fd);
    f.write_all(text.as_bytes())?;
    Ok(f.into())
}

/// Identity of a network namespace: device and inode of its nsfs file.
pub(crate) type NsId = (u64, u64);

fn ns_id_of(path: &str) -> std::io::Result<NsId> {
    let m = std::fs::metadata(path)?;
    Ok((m.dev(), m.ino()))
}

/// Creates a context on a thread inside the namespace open as `ns_fd`; returns it with the
/// identity of the namespace the thread really was in.
fn new_ctx(lib: &'static Lib, netns: &str, ns_fd: &OwnedFd) -> Result<(Ctx, NsId), String> {
    let fd_path = format!("/proc/self/fd/{}", ns_fd.as_raw_fd());
    let made = shoal_netns::run_in(&fd_path, move || -> Result<(Ctx, NsId), String> {
        let id = ns_id_of("/proc/thread-self/ns/net").map_err(|e| format!("own namespace: {e}"))?;
        // libnftables calls exit() when it cannot open its netlink socket: find out first.
        // SAFETY: plain system calls; the descriptor is closed at once.
        unsafe {
            let s = libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_NETFILTER,
            );
            if s < 0 {
                return Err(format!(
                    "no nfnetlink socket: {}",
                    std::io::Error::last_os_error()
                ));
            }
            libc::close(s);
        }
        let ptr = {
            let _g = lock(&CTX_LIFECYCLE);
            // SAFETY: plain constructor, serialised with every other new/free.
            unsafe { (lib.ctx_new)(NFT_CTX_DEFAULT) }
        };
        if ptr.is_null() {
            return Err("nft_ctx_new failed".into());
        }
        let ctx = Ctx { lib, ptr };
        set_cloexec_on_nfnetlink_sockets();
        // SAFETY: live context, not yet shared.
        let (o, e) = unsafe { ((lib.buffer_output)(ptr), (lib.buffer_error)(ptr)) };
        if o != 0 || e != 0 {
            return Err("nft_ctx_buffer_output/error failed".into());
        }
        Ok((ctx, id))
    })
    .map_err(|e| e.to_string())??;
    debug!(netns, ns = ?made.1, "libnftables context created");
    Ok(made)
}

/// libmnl opens the context's socket without close-on-exec, so every process spawned later
/// (containers, `ip`, ...) would inherit a netfilter netlink socket in the network namespace.
/// Marks every netfilter netlink socket of this process close-on-exec (nothing else opens
/// them without the flag). Between nft_ctx_new and this a concurrent spawn could still
/// inherit it: a window of microseconds, once per namespace.
fn set_cloexec_on_nfnetlink_sockets() {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        warn!("cannot list /proc/self/fd: the libnftables socket stays inheritable");
        return;
    };
    for entry in dir.flatten() {
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<c_int>().ok())
        else {
            continue;
        };
        let int_opt = |opt: c_int| -> Option<c_int> {
            let mut v: c_int = 0;
            let mut len = std::mem::size_of::<c_int>() as libc::socklen_t;
            // SAFETY: getsockopt on a descriptor number (EBADF/ENOTSOCK if it is not a socket)
            // into a properly sized buffer.
            let r = unsafe {
                libc::getsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    opt,
                    (&mut v as *mut c_int).cast(),
                    &mut len,
                )
            };
            (r == 0).then_some(v)
        };
        if int_opt(libc::SO_DOMAIN) == Some(libc::AF_NETLINK)
            && int_opt(libc::SO_PROTOCOL) == Some(libc::NETLINK_NETFILTER)
        {
            // SAFETY: fcntl on a descriptor that is (at least a moment ago was) a socket.
            unsafe {
                let flags = libc::fcntl(fd, libc::F_GETFD);
                if flags >= 0 && flags & libc::FD_CLOEXEC == 0 {
                    libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
                }
            }
        }
    }
}

struct Slot {
    id: NsId,
    ctx: Mutex<Ctx>,
}

/// Contexts by namespace name. Held by an [`crate::Applier`]; the process-wide applier keeps
/// one for the life of the process.
pub(crate) struct Contexts {
    lib: &'static Lib,
    slots: Mutex<HashMap<String, Arc<Slot>>>,
    last_prune: Mutex<Instant>,
}

/// How often the cache is checked for namespaces that are gone (a cached context pins its
/// deleted namespace in the kernel until it is dropped).
const PRUNE_EVERY: Duration = Duration::from_secs(5);

/// Why a command could not be run at all (nft's own refusals are in [`Outcome`]).
pub(crate) enum RunError {
    Netns(shoal_netns::Error),
    Lib(String),
}

impl Contexts {
    pub(crate) fn new(lib: &'static Lib) -> Contexts {
        Contexts {
            lib,
            slots: Mutex::new(HashMap::new()),
            last_prune: Mutex::new(Instant::now()),
        }
    }

    /// Runs `cmd` in `netns` (a name under /run/netns or a path to an nsfs file). Blocking:
    /// call it on tokio's blocking pool.
    pub(crate) fn run(&self, netns: &str, cmd: &Cmd<'_>) -> Result<Outcome, RunError> {
        let ns_fd = shoal_netns::open(netns).map_err(RunError::Netns)?;
        let id = ns_id_of(&format!("/proc/self/fd/{}", ns_fd.as_raw_fd())).map_err(|e| {
            RunError::Netns(shoal_netns::Error::Os {
                name: netns.to_string(),
                what: "reading the namespace's identity",
                source: e,
            })
        })?;
        let slot = self.slot(netns, id, &ns_fd)?;
        drop(ns_fd);
        self.maybe_prune();
        let mut ctx = lock(&slot.ctx);
        ctx.run(cmd)
            .map_err(|e| RunError::Lib(format!("preparing the command: {e}")))
    }

    fn slot(&self, netns: &str, id: NsId, ns_fd: &OwnedFd) -> Result<Arc<Slot>, RunError> {
        let mut slots = lock(&self.slots);
        if let Some(s) = slots.get(netns)
            && s.id == id
        {
            return Ok(s.clone());
        }
        if slots.remove(netns).is_some() {
            debug!(
                netns,
                "namespace was re-created: dropping its old libnftables context"
            );
        }
        // Created under the map lock: rare (once per namespace), and two callers must not
        // race to create two contexts for one namespace.
        let (ctx, real_id) = new_ctx(self.lib, netns, ns_fd).map_err(RunError::Lib)?;
        // A new namespace often means an old one went away.
        prune(&mut slots);
        let slot = Arc::new(Slot {
            id: real_id,
            ctx: Mutex::new(ctx),
        });
        slots.insert(netns.to_string(), slot.clone());
        Ok(slot)
    }

    /// [`prune`], at most every [`PRUNE_EVERY`] (and whenever a context is created).
    fn maybe_prune(&self) {
        {
            let mut last = lock(&self.last_prune);
            if last.elapsed() < PRUNE_EVERY {
                return;
            }
            *last = Instant::now();
        }
        prune(&mut lock(&self.slots));
    }

    /// Number of cached contexts (tests).
    pub(crate) fn len(&self) -> usize {
        lock(&self.slots).len()
    }
}

/// Drops contexts of namespaces that no longer exist under their name (deleted, or
/// re-created: a new identity), so they stop pinning dead namespaces.
fn prune(slots: &mut HashMap<String, Arc<Slot>>) {
    let before = slots.len();
    slots.retain(|name, slot| {
        let path = if name.contains('/') {
            name.clone()
        } else {
            shoal_netns::path(name).to_string_lossy().into_owned()
        };
        ns_id_of(&path).is_ok_and(|id| id == slot.id)
    });
    if slots.len() != before {
        debug!(
            dropped = before - slots.len(),
            "libnftables contexts of vanished namespaces dropped"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_library_is_an_error_not_a_crash() {
        let err = load("libnftables-does-not-exist.so.1").err().unwrap();
        assert!(err.contains("dlopen"), "{err}");
    }

    #[test]
    fn script_name_is_replaced_in_errors() {
        assert_eq!(
            rename_script("/proc/self/fd/17:2:17-19: Error: x\ndelete\n   ^^^\n"),
            "/dev/stdin:2:17-19: Error: x\ndelete\n   ^^^\n"
        );
        assert_eq!(rename_script("Error: y\n"), "Error: y\n");
    }
}
