//! The node's side of the CNI plugin (`cni/`, binary `shoal-cni`): one conflist per
//! attachable network in the runtimes' configuration directory, naming the plugin and this
//! agent's socket, and the plugin binary installed where runtimes look for plugins. The
//! conflists are rendered from the plan ([`crate::plan::NodePlan::cni_networks`]) and diffed
//! against the directory on every pass, so a removed network loses its file and a deleted
//! file comes back.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;
use tracing::info;

use crate::plan::NodePlan;
use crate::reconcile::{Dataplane, PassCx, Phase};

/// The plugin's `type` in a conflist: the binary's name in the plugin directory.
pub const PLUGIN_TYPE: &str = "shoal-cni";
/// The CNI spec version of the conflists (what podman 4.3's libcni takes).
pub const CNI_VERSION: &str = "1.0.0";
/// Our files in the configuration directory: `shoal-<network>.conflist`.
const FILE_PREFIX: &str = "shoal-";
const FILE_SUFFIX: &str = ".conflist";

/// Where conflists and the plugin go.
#[derive(Debug, Clone)]
pub struct CniPaths {
    /// The runtimes' network configuration directory (`/etc/cni/net.d`).
    pub config_dir: PathBuf,
    /// Where the plugin binary is installed (`/opt/cni/bin`).
    pub plugin_dir: PathBuf,
    /// The plugin binary to install (`shoal-cni` beside the agent's binary).
    pub plugin_src: PathBuf,
    /// This agent's API socket, which the plugin calls.
    pub socket: PathBuf,
}

/// The conflist file name of a network.
pub fn file_name(network: &str) -> String {
    format!("{FILE_PREFIX}{network}{FILE_SUFFIX}")
}

/// The conflist of one network: the plugin alone (addresses, routes and DNS are Shoal's),
/// with the `aliases` capability so that podman passes `--network NET:alias=A`.
pub fn conflist(network: &str, socket: &Path) -> String {
    let v = serde_json::json!({
        "cniVersion": CNI_VERSION,
        "name": network,
        "plugins": [{
            "type": PLUGIN_TYPE,
            "agent": socket,
            "capabilities": { "aliases": true },
        }],
    });
    let mut s = serde_json::to_string_pretty(&v).expect("json");
    s.push('\n');
    s
}

/// Every conflist the node should have, file name -> content.
pub fn desired(networks: &[String], socket: &Path) -> BTreeMap<String, String> {
    networks
        .iter()
        .map(|n| (file_name(n), conflist(n, socket)))
        .collect()
}

/// Writes `content` to `path` unless it is there already (temp file, fsync, rename).
fn write_if_changed(path: &Path, content: &[u8]) -> anyhow::Result<bool> {
    if fs::read(path).is_ok_and(|c| c == content) {
        return Ok(false);
    }
    let dir = path.parent().context("no directory")?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("shoal")
    ));
    let mut f = fs::File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(content)?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(true)
}

/// Installs the plugin binary (mode 0755) unless the same bytes are there already.
pub fn install_plugin(p: &CniPaths) -> anyhow::Result<bool> {
    use std::os::unix::fs::PermissionsExt as _;
    let bin = fs::read(&p.plugin_src).with_context(|| {
        format!(
            "reading the CNI plugin {} (build it with the agent: cargo build --bin shoal-cni)",
            p.plugin_src.display()
        )
    })?;
    let dst = p.plugin_dir.join(PLUGIN_TYPE);
    let changed = write_if_changed(&dst, &bin)?;
    fs::set_permissions(&dst, fs::Permissions::from_mode(0o755))?;
    Ok(changed)
}

/// CNI CHECK's look at the kernel: `ifname` exists in the namespace at `netns` (a path),
/// is up, and carries `ip`.
pub fn check_interface(netns: &str, ifname: &str, ip: std::net::Ipv4Addr) -> anyhow::Result<()> {
    let (name, want) = (ifname.to_string(), ip);
    let found = shoal_netns::run_in(netns, move || -> anyhow::Result<(bool, bool, bool)> {
        let (mut exists, mut up, mut has_ip) = (false, false, false);
        for a in nix::ifaddrs::getifaddrs().context("listing interfaces")? {
            if a.interface_name != name {
                continue;
            }
            exists = true;
            up |= a.flags.contains(nix::net::if_::InterfaceFlags::IFF_UP);
            if let Some(sin) = a.address.as_ref().and_then(|x| x.as_sockaddr_in()) {
                has_ip |= sin.ip() == want;
            }
        }
        Ok((exists, up, has_ip))
    })
    .with_context(|| format!("entering {netns}"))??;
    match found {
        (false, _, _) => anyhow::bail!("interface {ifname} is missing in {netns}"),
        (_, false, _) => anyhow::bail!("interface {ifname} in {netns} is down"),
        (_, _, false) => anyhow::bail!("interface {ifname} in {netns} lacks its address {ip}"),
        _ => Ok(()),
    }
}

/// Our conflists in the directory now.
fn ours(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.starts_with(FILE_PREFIX) && n.ends_with(FILE_SUFFIX))
                .collect()
        })
        .unwrap_or_default()
}

/// Brings the directory to `want`, installing the plugin first unless `installed`; what
/// failed, and whether the plugin is in place. Blocking file work (the plugin is tens of
/// MB): run off the async threads.
fn sync_dir(
    p: &CniPaths,
    want: &BTreeMap<String, String>,
    installed: bool,
) -> (bool, Vec<(String, anyhow::Error)>) {
    let mut failed = vec![];
    let mut installed = installed;
    if !want.is_empty() && !installed {
        match install_plugin(p) {
            Ok(changed) => {
                if changed {
                    info!(dir = %p.plugin_dir.display(), "CNI plugin installed");
                }
                installed = true;
            }
            // Without the plugin a conflist would name a binary that is not there.
            Err(e) => return (false, vec![("installing the CNI plugin".into(), e)]),
        }
    }
    for (name, content) in want {
        let path = p.config_dir.join(name);
        match write_if_changed(&path, content.as_bytes()) {
            Ok(true) => info!(file = %path.display(), "CNI network configuration written"),
            Ok(false) => {}
            Err(e) => failed.push((format!("writing {}", path.display()), e)),
        }
    }
    for name in ours(&p.config_dir) {
        if !want.contains_key(&name) {
            let path = p.config_dir.join(&name);
            match fs::remove_file(&path) {
                Ok(()) => info!(file = %path.display(), "CNI network configuration removed"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => failed.push((format!("removing {}", path.display()), e.into())),
            }
        }
    }
    (installed, failed)
}

/// Brings the configuration directory to the plan's conflists; the plugin is installed
/// before the first one is written. The directory is looked at when the conflists change,
/// after a failure, and on full passes (someone may have deleted a file).
pub struct CniConfigs {
    paths: Option<CniPaths>,
    installed: bool,
    /// What the directory was last brought to, without a failure.
    synced: Option<BTreeMap<String, String>>,
}

impl CniConfigs {
    /// `None`: CNI is off (`[cni] enabled = false`).
    pub fn new(paths: Option<CniPaths>) -> CniConfigs {
        CniConfigs {
            paths,
            installed: false,
            synced: None,
        }
    }
}

#[async_trait::async_trait]
impl Dataplane for CniConfigs {
    async fn apply(&mut self, plan: &NodePlan, phase: Phase, cx: &mut PassCx<'_>) {
        let Some(p) = &self.paths else { return };
        if phase != Phase::Main {
            return;
        }
        let want = desired(&plan.cni_networks, &p.socket);
        if !cx.full && self.synced.as_ref() == Some(&want) {
            return;
        }
        let (p, installed, w) = (p.clone(), self.installed, want.clone());
        let (installed, failed) =
            match tokio::task::spawn_blocking(move || sync_dir(&p, &w, installed)).await {
                Ok(r) => r,
                Err(e) => (self.installed, vec![("CNI files".into(), e.into())]),
            };
        self.installed = installed;
        self.synced = failed.is_empty().then_some(want);
        for (what, e) in failed {
            cx.fail("cni", what, e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_conflist_names_the_network_the_plugin_and_the_socket() {
        let s = conflist("appnet", Path::new("/run/shoal/shoal.sock"));
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["cniVersion"], CNI_VERSION);
        assert_eq!(v["name"], "appnet");
        assert_eq!(v["plugins"][0]["type"], PLUGIN_TYPE);
        assert_eq!(v["plugins"][0]["agent"], "/run/shoal/shoal.sock");
        assert_eq!(v["plugins"][0]["capabilities"]["aliases"], true);
        assert_eq!(v["plugins"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn only_our_files_are_listed() {
        let d = tempfile::tempdir().unwrap();
        for n in [
            "shoal-a.conflist",
            "87-podman-bridge.conflist",
            "shoal-b.conf",
            "x",
        ] {
            fs::write(d.path().join(n), "{}").unwrap();
        }
        assert_eq!(ours(d.path()), vec!["shoal-a.conflist".to_string()]);
        let f = d.path().join("shoal-a.conflist");
        assert!(write_if_changed(&f, b"one").unwrap());
        assert!(!write_if_changed(&f, b"one").unwrap());
        assert_eq!(fs::read(&f).unwrap(), b"one");
    }
}
