//! Running `nft` inside a network namespace.

use std::process::{Command, Stdio};

use shoal_netns::CommandExt as _;
use tokio::io::AsyncWriteExt as _;
use tracing::{debug, instrument};

use crate::{LbError, Ruleset, render, validate};

/// The nft binary, looked up in PATH.
const NFT: &str = "nft";
const INSTALL_HINT: &str = " (is nftables installed? `apt-get install nftables`)";

/// Replaces the table in `netns` with the rendered ruleset in one transaction (`nft -f -`).
/// On failure nft's stderr and the offending script line are in the error, and the previous
/// table is untouched.
#[instrument(skip(rs), fields(table = %rs.table, services = rs.services.len()))]
pub async fn apply(netns: &str, rs: &Ruleset) -> Result<(), LbError> {
    validate(rs)?;
    let script = render(rs);
    run(netns, "apply", &["-f", "-"], Some(&script)).await?;
    debug!("LB table applied");
    Ok(())
}

/// Like [`apply`] but in nft's check mode (`nft -c -f -`): parses and validates against the
/// kernel without changing anything.
#[instrument(skip(rs), fields(table = %rs.table))]
pub async fn check(netns: &str, rs: &Ruleset) -> Result<(), LbError> {
    validate(rs)?;
    let script = render(rs);
    run(netns, "check", &["-c", "-f", "-"], Some(&script)).await?;
    Ok(())
}

/// Deletes the table; deleting a table that does not exist is not an error.
#[instrument]
pub async fn delete_table(netns: &str, table: &str) -> Result<(), LbError> {
    check_table_name(table)?;
    // Create-then-delete in one transaction: idempotent, no race with a concurrent delete.
    let script = format!("table ip {table} {{}}\ndelete table ip {table}\n");
    run(netns, "delete", &["-f", "-"], Some(&script)).await?;
    Ok(())
}

/// `nft list table ip TABLE` inside the namespace, or None when the table does not exist.
#[instrument]
pub async fn list_table(netns: &str, table: &str) -> Result<Option<String>, LbError> {
    check_table_name(table)?;
    match run(netns, "list", &["list", "table", "ip", table], None).await {
        Ok(out) => Ok(Some(out)),
        Err(LbError::Nft { stderr, .. }) if stderr.contains("No such file or directory") => {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

fn check_table_name(table: &str) -> Result<(), LbError> {
    validate(&Ruleset {
        table: table.to_string(),
        ..Ruleset::default()
    })
}

/// Runs nft with `args` inside `netns`, feeding `stdin`; returns stdout.
async fn run(
    netns: &str,
    action: &'static str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String, LbError> {
    let mut std_cmd = Command::new(NFT);
    std_cmd
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    std_cmd.in_netns(netns)?;
    let mut cmd = tokio::process::Command::from(std_cmd);
    cmd.kill_on_drop(true);
    let spawn_err = |source: std::io::Error| LbError::Spawn {
        netns: netns.to_string(),
        hint: if source.kind() == std::io::ErrorKind::NotFound {
            INSTALL_HINT
        } else {
            ""
        },
        source,
    };
    let mut child = cmd.spawn().map_err(spawn_err)?;
    let pipe = child.stdin.take();
    // Feed stdin while collecting stdout/stderr, so that neither side can block the other.
    let feed = async move {
        if let (Some(mut pipe), Some(text)) = (pipe, stdin) {
            // A write error (nft exited early) shows in its status and stderr.
            if let Err(e) = pipe.write_all(text.as_bytes()).await {
                debug!(error = %e, "writing the script to nft");
            }
        }
    };
    let ((), out) = tokio::join!(feed, child.wait_with_output());
    let out = out.map_err(spawn_err)?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    let failing_line = stdin.and_then(|s| failing_line(&stderr, s));
    Err(LbError::Nft {
        netns: netns.to_string(),
        action,
        status: out.status.to_string(),
        stderr,
        failing_line,
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
