//! Spawning `nft` inside a network namespace (the fallback when libnftables is missing).

use std::process::{Command, Stdio};

use shoal_netns::CommandExt as _;
use tokio::io::AsyncWriteExt as _;
use tracing::debug;

use super::Output;
use crate::LbError;

/// The nft binary, looked up in PATH.
const NFT: &str = "nft";
const INSTALL_HINT: &str = " (is nftables installed? `apt-get install nftables`)";

/// Runs nft with `args` inside `netns`, feeding `stdin`.
pub(super) async fn run(
    netns: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<Output, LbError> {
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
    Ok(Output {
        ok: out.status.success(),
        status: out.status.to_string(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}
