//! Running nft scripts and commands inside a network namespace: in-process through
//! libnftables when it can be loaded (see `libnft`), else by spawning `nft`.

mod elements;
mod exists;
mod generation;
mod libnft;
mod process;
mod sync;

use std::sync::{Arc, Once, OnceLock};

use tracing::{debug, info, instrument, warn};

use crate::{LbError, Ruleset, render, validate};
use exists::Object;

pub use elements::{ElementLoad, load_elements};
pub use generation::{Generation, GenerationReader};
pub use sync::{SyncKind, SyncReport, Syncer};

/// Environment variable: `process` makes the process-wide [`Applier`] spawn `nft` even when
/// libnftables is there (an escape hatch; anything else or unset: in-process when possible).
pub const BACKEND_ENV: &str = "SHOAL_LB_NFT";

/// What ran a command: its success, a status for errors and both output streams.
struct Output {
    ok: bool,
    status: String,
    stdout: String,
    stderr: String,
}

/// A command in owned form (it may travel to tokio's blocking pool).
enum Cmd {
    /// `nft -f -` (`dry_run`: `nft -c -f -`).
    Script { text: String, dry_run: bool },
    /// `nft list table ip TABLE`.
    ListTable(String),
    /// `nft -s list table ip TABLE`.
    ListStateless(String),
    /// `nft -j list OBJECT` (e.g. `table ip T`, `map ip T affinity`).
    ListJson(String),
}

/// Runs the LB's nft commands, either in-process (libnftables, one cached context per
/// namespace) or by spawning `nft -f -` per command. Cheap to clone; clones share the cache.
///
/// The free functions [`apply`], [`check`], [`delete_table`] and [`list_table`] use
/// [`Applier::global`].
#[derive(Clone)]
pub struct Applier {
    backend: Backend,
}

#[derive(Clone)]
enum Backend {
    Process,
    InProcess(Arc<libnft::Contexts>),
}

impl std::fmt::Debug for Applier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.backend {
            Backend::Process => "Applier(nft process)",
            Backend::InProcess(_) => "Applier(libnftables)",
        })
    }
}

impl Applier {
    /// Spawns `nft` inside the namespace for every command.
    pub fn process() -> Applier {
        Applier {
            backend: Backend::Process,
        }
    }

    /// Runs commands in this process through `libnftables.so.1`, with its own context cache.
    /// Fails when the library cannot be loaded.
    pub fn in_process() -> Result<Applier, LbError> {
        let lib = libnft::lib().map_err(|e| LbError::Library(e.to_string()))?;
        Ok(Applier {
            backend: Backend::InProcess(Arc::new(libnft::Contexts::new(lib))),
        })
    }

    /// In-process when libnftables can be loaded, else spawning `nft` (logged once, with the
    /// reason).
    pub fn auto() -> Applier {
        match Applier::in_process() {
            Ok(a) => a,
            Err(e) => {
                static WARNED: Once = Once::new();
                WARNED.call_once(|| {
                    warn!(error = %e, "libnftables unavailable: LB rulesets are applied by spawning `nft`")
                });
                Applier::process()
            }
        }
    }

    /// The process-wide applier: [`Applier::auto`], or [`Applier::process`] when
    /// `SHOAL_LB_NFT=process`.
    pub fn global() -> &'static Applier {
        static GLOBAL: OnceLock<Applier> = OnceLock::new();
        GLOBAL.get_or_init(|| {
            let a = if std::env::var(BACKEND_ENV).is_ok_and(|v| v == "process") {
                Applier::process()
            } else {
                Applier::auto()
            };
            info!(applier = ?a, "LB ruleset applier chosen");
            a
        })
    }

    /// True when commands run through libnftables in this process.
    pub fn is_in_process(&self) -> bool {
        matches!(self.backend, Backend::InProcess(_))
    }

    /// Replaces the table in `netns` with the rendered ruleset in one transaction (what
    /// `nft -f -` does). On failure nft's message and the offending script line are in the
    /// error, and the previous table is untouched.
    #[instrument(skip(self, rs), fields(table = %rs.table, services = rs.services.len()))]
    pub async fn apply(&self, netns: &str, rs: &Ruleset) -> Result<(), LbError> {
        validate(rs)?;
        let text = render(rs);
        self.run(
            netns,
            "apply",
            Cmd::Script {
                text,
                dry_run: false,
            },
        )
        .await?;
        debug!("LB table applied");
        Ok(())
    }

    /// Like [`Applier::apply`] but in nft's check mode (`nft -c -f -`): parses and validates
    /// against the kernel without changing anything.
    #[instrument(skip(self, rs), fields(table = %rs.table))]
    pub async fn check(&self, netns: &str, rs: &Ruleset) -> Result<(), LbError> {
        validate(rs)?;
        let text = render(rs);
        self.run(
            netns,
            "check",
            Cmd::Script {
                text,
                dry_run: true,
            },
        )
        .await?;
        Ok(())
    }

    /// Deletes the table; deleting a table that does not exist is not an error.
    #[instrument(skip(self))]
    pub async fn delete_table(&self, netns: &str, table: &str) -> Result<(), LbError> {
        check_table_name(table)?;
        // Create-then-delete in one transaction: idempotent, no race with a concurrent delete.
        let text = format!("table ip {table} {{}}\ndelete table ip {table}\n");
        self.run(
            netns,
            "delete",
            Cmd::Script {
                text,
                dry_run: false,
            },
        )
        .await?;
        Ok(())
    }

    /// `nft list table ip TABLE` inside the namespace, or None when the table does not exist.
    #[instrument(skip(self))]
    pub async fn list_table(&self, netns: &str, table: &str) -> Result<Option<String>, LbError> {
        check_table_name(table)?;
        let res = self
            .run(netns, "list", Cmd::ListTable(table.to_string()))
            .await;
        or_missing(netns, Object::Table(table.to_string()), res).await
    }

    /// `nft -s list table ip TABLE` (the table without counter values: the same text for as
    /// long as nobody changes the table), or None when the table does not exist. What a
    /// drift check compares with the listing taken right after our own write.
    #[instrument(skip(self))]
    pub async fn fingerprint(&self, netns: &str, table: &str) -> Result<Option<String>, LbError> {
        check_table_name(table)?;
        let res = self
            .run(netns, "list", Cmd::ListStateless(table.to_string()))
            .await;
        or_missing(netns, Object::Table(table.to_string()), res).await
    }

    /// `nft -j list OBJECT`, or None when it does not exist.
    async fn list_json(&self, netns: &str, object: Object) -> Result<Option<String>, LbError> {
        let res = self
            .run(netns, "list", Cmd::ListJson(object.to_string()))
            .await;
        or_missing(netns, object, res).await
    }

    /// Runs an nft script of our own making (one transaction).
    async fn run_script(
        &self,
        netns: &str,
        action: &'static str,
        text: String,
    ) -> Result<(), LbError> {
        self.run(
            netns,
            action,
            Cmd::Script {
                text,
                dry_run: false,
            },
        )
        .await
        .map(|_| ())
    }

    /// Runs a script of this crate's making (e.g. the IPVS companion table) as one
    /// transaction (`dry_run`: nft's check mode).
    pub(crate) async fn run_crate_script(
        &self,
        netns: &str,
        text: String,
        dry_run: bool,
    ) -> Result<(), LbError> {
        let action = if dry_run { "check" } else { "apply" };
        self.run(netns, action, Cmd::Script { text, dry_run })
            .await
            .map(|_| ())
    }

    /// Runs `cmd` in `netns`; returns its standard output, or nft's refusal as
    /// [`LbError::Nft`].
    async fn run(&self, netns: &str, action: &'static str, cmd: Cmd) -> Result<String, LbError> {
        let cmd = Arc::new(cmd);
        let out = match &self.backend {
            Backend::Process => match &*cmd {
                Cmd::Script { text, dry_run } => {
                    let args: &[&str] = if *dry_run {
                        &["-c", "-f", "-"]
                    } else {
                        &["-f", "-"]
                    };
                    process::run(netns, args, Some(text)).await?
                }
                Cmd::ListTable(table) => {
                    process::run(netns, &["list", "table", "ip", table], None).await?
                }
                Cmd::ListStateless(table) => {
                    process::run(netns, &["-s", "list", "table", "ip", table], None).await?
                }
                Cmd::ListJson(what) => {
                    let mut args = vec!["-j", "list"];
                    args.extend(what.split(' '));
                    process::run(netns, &args, None).await?
                }
            },
            Backend::InProcess(contexts) => {
                let (contexts, ns, c) = (contexts.clone(), netns.to_string(), cmd.clone());
                // The FFI call blocks (netlink round trips): tokio's blocking pool.
                let res = tokio::task::spawn_blocking(move || match &*c {
                    Cmd::Script { text, dry_run } => contexts.run(
                        &ns,
                        &libnft::Cmd::Script {
                            text,
                            dry_run: *dry_run,
                        },
                    ),
                    Cmd::ListTable(table) => {
                        contexts.run(&ns, &libnft::Cmd::Line(&format!("list table ip {table}")))
                    }
                    Cmd::ListStateless(table) => contexts.run(
                        &ns,
                        &libnft::Cmd::StatelessLine(&format!("list table ip {table}")),
                    ),
                    Cmd::ListJson(what) => {
                        contexts.run(&ns, &libnft::Cmd::JsonLine(&format!("list {what}")))
                    }
                })
                .await
                .map_err(|e| {
                    LbError::Library(format!("command in network namespace {netns:?}: {e}"))
                })?;
                let o = res.map_err(|e| match e {
                    libnft::RunError::Netns(e) => LbError::Netns(e),
                    libnft::RunError::Lib(e) => {
                        LbError::Library(format!("in network namespace {netns:?}: {e}"))
                    }
                })?;
                Output {
                    ok: o.rc == 0,
                    status: format!("libnftables returned {}", o.rc),
                    stdout: o.stdout,
                    stderr: o.stderr,
                }
            }
        };
        finish(netns, action, &cmd, out)
    }

    /// Runs a raw nft script as [`Applier::apply`] runs the rendered one (one transaction).
    /// For tests and measurements only: nothing checks what the script does.
    #[doc(hidden)]
    pub async fn apply_script(&self, netns: &str, script: &str) -> Result<(), LbError> {
        let text = script.to_string();
        self.run(
            netns,
            "apply",
            Cmd::Script {
                text,
                dry_run: false,
            },
        )
        .await?;
        Ok(())
    }

    /// Number of cached libnftables contexts (0 for the process applier).
    #[doc(hidden)]
    pub fn cached_contexts(&self) -> usize {
        match &self.backend {
            Backend::Process => 0,
            Backend::InProcess(c) => c.len(),
        }
    }
}

fn finish(netns: &str, action: &'static str, cmd: &Cmd, out: Output) -> Result<String, LbError> {
    if out.ok {
        return Ok(out.stdout);
    }
    let stderr = out.stderr.trim().to_string();
    let failing_line = match cmd {
        Cmd::Script { text, .. } => failing_line(&stderr, text),
        Cmd::ListTable(_) | Cmd::ListStateless(_) | Cmd::ListJson(_) => None,
    };
    Err(LbError::Nft {
        netns: netns.to_string(),
        action,
        status: out.status,
        stderr,
        failing_line,
    })
}

/// Replaces the table in `netns` with the rendered ruleset in one transaction, through
/// [`Applier::global`] (in-process libnftables, or `nft -f -`). On failure nft's message and
/// the offending script line are in the error, and the previous table is untouched.
pub async fn apply(netns: &str, rs: &Ruleset) -> Result<(), LbError> {
    Applier::global().apply(netns, rs).await
}

/// Like [`apply`] but in nft's check mode (`nft -c -f -`): parses and validates against the
/// kernel without changing anything.
pub async fn check(netns: &str, rs: &Ruleset) -> Result<(), LbError> {
    Applier::global().check(netns, rs).await
}

/// Deletes the table; deleting a table that does not exist is not an error.
pub async fn delete_table(netns: &str, table: &str) -> Result<(), LbError> {
    Applier::global().delete_table(netns, table).await
}

/// `nft list table ip TABLE` inside the namespace, or None when the table does not exist.
pub async fn list_table(netns: &str, table: &str) -> Result<Option<String>, LbError> {
    Applier::global().list_table(netns, table).await
}

/// A listing, or None when the listed object does not exist: a failed `nft list` is
/// "missing" only when the kernel says so (ENOENT over netlink), never from nft's message.
async fn or_missing(
    netns: &str,
    object: Object,
    listed: Result<String, LbError>,
) -> Result<Option<String>, LbError> {
    let err = match listed {
        Ok(out) => return Ok(Some(out)),
        Err(e @ LbError::Nft { .. }) => e,
        Err(e) => return Err(e),
    };
    let (ns, obj) = (netns.to_string(), object.clone());
    let found = tokio::task::spawn_blocking(move || exists::exists(&ns, &obj))
        .await
        .map_err(|e| LbError::Lookup {
            netns: netns.to_string(),
            object: object.to_string(),
            what: "lookup thread".into(),
            source: std::io::Error::other(e),
        })??;
    if found { Err(err) } else { Ok(None) }
}

fn check_table_name(table: &str) -> Result<(), LbError> {
    validate(&Ruleset {
        table: table.to_string(),
        ..Ruleset::default()
    })
}

/// nft reports errors as `/dev/stdin:LINE:COLS: Error: ...`: the first such line number and
/// the script's text there.
fn failing_line(stderr: &str, script: &str) -> Option<(usize, String)> {
    stderr.lines().find_map(|l| {
        let rest = l
            .strip_prefix("/dev/stdin:")
            .or_else(|| l.strip_prefix("-:"))?;
        let n: usize = rest.split(':').next()?.parse().ok()?;
        let text = script.lines().nth(n.checked_sub(1)?)?;
        Some((n, text.trim().to_string()))
    })
}

#[cfg(test)]
mod tests {
    use super::failing_line;

    #[test]
    fn failing_line_is_found() {
        let script = "table ip 9lb {}\ndelete table ip 9lb\n";
        let stderr = "/dev/stdin:2:17-17: Error: syntax error, unexpected number\ndelete table ip 9lb\n                ^";
        assert_eq!(
            failing_line(stderr, script),
            Some((2, "delete table ip 9lb".to_string()))
        );
        assert_eq!(failing_line("Error: Could not process rule", script), None);
    }
}
