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
            "{} is missing: build it first (cargo build --release -p shoal) or set SHOAL_BIN",
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_use_nearest_rank() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(quantile(&v, 0.5), Duration::from_millis(50));
        assert_eq!(quantile(&v, 0.99), Duration::from_millis(99));
        assert_eq!(quantile(&v, 1.0), Duration::from_millis(100));
        assert_eq!(quantile(&[], 0.5), Duration::ZERO);
    }
}
