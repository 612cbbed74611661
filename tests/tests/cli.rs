//! The `shoal` binary as an operator types it: agent configuration from file, environment
//! and flags; shell completions; and no input makes it panic.

use std::process::Command;

use shoal_tests::{Run, shoal_bin};

/// `shoal ARGS` with a clean SHOAL_* environment plus `env`, pointing at no agent.
fn shoal(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut c = Command::new(shoal_bin());
    for (k, _) in std::env::vars() {
        if k.starts_with("SHOAL_") {
            c.env_remove(k);
        }
    }
    c.env("SHOAL_HOST", "unix:///nonexistent/shoal-cli-test.sock");
    c.args(args).envs(env.iter().copied());
    Run::from_command(&mut c)
}

fn write_config(text: &str) -> (tempfile_dir::Dir, String) {
    let d = tempfile_dir::Dir::new();
    let p = d.path.join("agent.toml");
    std::fs::write(&p, text).unwrap();
    let s = p.display().to_string();
    (d, s)
}

/// A throwaway directory (removed on drop), without a dependency.
mod tempfile_dir {
    pub struct Dir {
        pub path: std::path::PathBuf,
    }
    impl Dir {
        pub fn new() -> Dir {
            static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let path = std::env::temp_dir().join(format!(
                "shoal-cli-test-{}-{}",
                std::process::id(),
                N.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            ));
            std::fs::create_dir_all(&path).unwrap();
            Dir { path }
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

#[test]
fn agent_config_precedence_flag_env_file_default() {
    let (_d, cfg) = write_config("node_name = \"from-file\"\nlease_ttl_secs = 7\n[dns]\nttl = 9\n");
    // File over defaults.
    let r = shoal(&["agent", "--config", &cfg, "--print-config"], &[]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        r.stdout.contains("node_name = \"from-file\""),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("lease_ttl_secs = 7"), "{}", r.stdout);
    assert!(
        r.stdout.contains("metrics_addr = \"127.0.0.1:9469\""),
        "{}",
        r.stdout
    );
    // Environment over the file (and SHOAL_CONFIG names the file).
    let r = shoal(
        &["agent", "--print-config"],
        &[
            ("SHOAL_CONFIG", &cfg),
            ("SHOAL_NODE_NAME", "from-env"),
            ("SHOAL_METRICS_ADDR", "127.0.0.1:9999"),
            (
                "SHOAL_ETCD_ENDPOINTS",
                "192.0.2.2:2379,http://192.0.2.3:2379",
            ),
            ("SHOAL_STORE", "etcd"),
        ],
    );
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        r.stdout.contains("node_name = \"from-env\""),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains("metrics_addr = \"127.0.0.1:9999\""),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("kind = \"etcd\""), "{}", r.stdout);
    assert!(
        r.stdout
            .contains("endpoints = [\"192.0.2.2:2379\", \"http://192.0.2.3:2379\"]"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("ttl = 9"), "file keys stay: {}", r.stdout);
    // Flags over the environment.
    let r = shoal(
        &[
            "agent",
            "--config",
            &cfg,
            "--node-name",
            "from-flag",
            "--lease-ttl-secs",
            "4",
            "--print-config",
        ],
        &[
            ("SHOAL_NODE_NAME", "from-env"),
            ("SHOAL_LEASE_TTL_SECS", "0"),
        ],
    );
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        r.stdout.contains("node_name = \"from-flag\""),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("lease_ttl_secs = 4"), "{}", r.stdout);
}

#[test]
fn agent_refuses_bad_configuration_naming_it() {
    // (config file, flags, environment, what the error must name)
    type Case<'a> = (&'a str, &'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let cases: &[Case] = &[
        ("node_nam = \"x\"\n", &[], &[], "node_nam"),
        ("[store]\nkind = \"etcd\"\n", &[], &[], "endpoints"),
        ("[dns]\nttl = \"five\"\n", &[], &[], "ttl"),
        ("", &["--metrics-addr", "nonsense"], &[], "metrics_addr"),
        ("", &[], &[("SHOAL_LEASE_TTL_SECS", "0")], "lease_ttl_secs"),
        ("", &["--etcd-endpoints", "no-port"], &[], "no-port"),
        (
            "[store]\nkind = \"etcd\"\nendpoints = [\"h:1\"]\n[store.tls]\nca = \"/nonexistent/ca.pem\"\ncert = \"/nonexistent/c.pem\"\nkey = \"/nonexistent/k.pem\"\n",
            &[],
            &[],
            "store.tls.ca",
        ),
        ("", &["--etcd-ca", "/etc/hostname"], &[], "--etcd-cert"),
        ("", &["--lb-dataplane", "ebpf"], &[], "ebpf"),
    ];
    for (file, flags, env, needle) in cases {
        let d = tempfile_dir::Dir::new();
        let cfg = d.path.join("agent.toml");
        std::fs::write(&cfg, file).unwrap();
        let state = d.path.join("state");
        let sock = d.path.join("shoal.sock");
        let mut args = vec![
            "agent",
            "--config",
            cfg.to_str().unwrap(),
            "--state-dir",
            state.to_str().unwrap(),
            "--socket",
            sock.to_str().unwrap(),
        ];
        args.extend_from_slice(flags);
        let r = shoal(&args, env);
        assert_ne!(r.code, 0, "{file:?} {flags:?} {env:?} was accepted: {r:?}");
        assert!(
            r.stderr.contains(needle),
            "the error names {needle:?}: {}",
            r.stderr
        );
        // Refused before anything was created.
        assert!(
            !state.exists() && !sock.exists(),
            "{file:?}: state was created"
        );
    }
}

#[test]
fn completions_for_each_shell() {
    for (shell, marker) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef shoal"),
        ("fish", "complete -c shoal"),
    ] {
        let r = shoal(&["completion", shell], &[]);
        assert_eq!(r.code, 0, "{r:?}");
        assert!(r.stdout.contains(marker), "{shell}: {}", &r.stdout[..200]);
        // Subcommands and flags are in it.
        assert!(r.stdout.contains("service") && r.stdout.contains("--publish"));
    }
    let r = shoal(&["completion", "tcsh"], &[]);
    assert_eq!(r.code, 2, "{r:?}");
}

#[test]
fn help_explains_agent_flags() {
    let r = shoal(&["agent", "--help"], &[]);
    assert_eq!(r.code, 0);
    for flag in [
        "--config",
        "--log-format",
        "--node-name",
        "--metrics-addr",
        "--etcd-endpoints",
        "--etcd-ca",
        "--print-config",
        "SHOAL_METRICS_ADDR",
    ] {
        assert!(r.stdout.contains(flag), "{flag} missing from agent --help");
    }
}

/// A tiny xorshift: reproducible random argument vectors without a crate.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// The binary never panics (exit 101) on random argument vectors: every one ends with 0,
/// a usage error (2) or a clear error (1). The commands that would start servers or build
/// labs (`agent`, `whoami`, `lab`) are not drawn as the command word.
#[test]
fn random_argument_vectors_never_panic() {
    let first = [
        "network",
        "service",
        "node",
        "version",
        "completion",
        "bogus",
        "-H",
        "",
    ];
    let words = [
        "create",
        "ls",
        "inspect",
        "rm",
        "update",
        "scale",
        "ps",
        "--name",
        "web",
        "--network",
        "appnet",
        "--replicas",
        "3",
        "-1",
        "x",
        "-p",
        "8080:80",
        "published=8080,target=80",
        "mode=host",
        "protocol=sctp",
        "70000:1",
        "--format",
        "json",
        "yaml",
        "--subnet",
        "10.0.0.0/24",
        "10.0.0.0/33",
        "--gateway",
        "--internal",
        "--endpoint-mode",
        "dnsrr",
        "--publish-add",
        "--publish-rm",
        "8080/udp",
        "web=2",
        "web=",
        "=",
        "--",
        "-",
        "",
        "--help",
        "bash",
        "zsh",
        "unix:///nonexistent",
        "\u{1F980}",
        "--health-cmd",
        "true",
        "--env",
        "A=B",
        "--lb",
        "consistent",
        "--host",
    ];
    let mut rng = Rng(0x00dd_ba11_c0ff_ee42);
    for _ in 0..300 {
        let mut argv: Vec<&str> =
            vec![first[usize::try_from(rng.next() % first.len() as u64).unwrap()]];
        for _ in 0..rng.next() % 7 {
            argv.push(words[usize::try_from(rng.next() % words.len() as u64).unwrap()]);
        }
        let r = shoal(&argv, &[]);
        assert!(
            [0, 1, 2].contains(&r.code) && !r.stderr.contains("panicked"),
            "shoal {argv:?}: {r:?}"
        );
    }
}
