//! Shoal's CNI plugin (CNI spec 1.0.0, with 1.1's STATUS and GC). A runtime (podman's CNI
//! backend, containerd) runs the plugin with the `CNI_*` environment and the network's
//! configuration on stdin; the plugin forwards the call to the agent of its node (the
//! socket named by the conflist's `agent` key, which the agent writes) and prints the CNI
//! result, or a CNI error object and a non-zero exit. Addresses, interfaces and DNS are
//! the agent's: the plugin holds no state.
//!
//! Error codes: 1 incompatible CNI version, 3 unknown container (CHECK), 4 missing or bad
//! `CNI_*` variables, 6 stdin is not JSON, 7 invalid network configuration (no `agent`,
//! an unknown or non-attachable network, a refused name), 11 try again later (the agent
//! is unreachable, its store is away, or the node did not attach in time), 50 the agent is
//! not available (STATUS), 100 the name or container is already in use, 101 the agent
//! failed the attachment (or CHECK found it differs from the runtime's view).

use std::collections::HashMap;
use std::path::PathBuf;

use serde_json::{Value, json};
use shoal_api::client::{Client, ClientError};
use shoal_api::wire::{CniAttached, CniGc, CniRequest};

/// The versions this plugin speaks.
pub const SUPPORTED: &[&str] = &["1.0.0", "1.1.0"];

/// A CNI error object (printed on stdout, exit code 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> CniError {
        CniError {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    fn details(mut self, d: impl Into<String>) -> CniError {
        self.details = d.into();
        self
    }

    pub fn to_json(&self, version: &str) -> Value {
        let mut v = json!({ "cniVersion": version, "code": self.code, "msg": self.msg });
        if !self.details.is_empty() {
            v["details"] = Value::from(self.details.clone());
        }
        v
    }
}

pub const INCOMPATIBLE_VERSION: u32 = 1;
pub const UNKNOWN_CONTAINER: u32 = 3;
pub const INVALID_ENV: u32 = 4;
pub const DECODE: u32 = 6;
pub const INVALID_CONFIG: u32 = 7;
pub const TRY_AGAIN: u32 = 11;
pub const NOT_AVAILABLE: u32 = 50;
pub const IN_USE: u32 = 100;
pub const FAILED: u32 = 101;

/// One invocation: the environment and stdin, as the runtime gave them.
pub struct Call {
    pub env: HashMap<String, String>,
    pub stdin: Vec<u8>,
}

/// What the plugin prints on success (None: nothing, as DEL, STATUS and GC print).
pub type Output = Option<Value>;

/// `K8S_POD_NAME=web;IgnoreUnknown=1` -> pairs.
pub fn parse_args(args: &str) -> HashMap<String, String> {
    args.split(';')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// The version a call's configuration asks for (VERSION answers with it when supported).
pub fn version_of(conf: &Value) -> Option<&str> {
    conf.get("cniVersion").and_then(Value::as_str)
}

fn env<'a>(c: &'a Call, k: &str) -> Result<&'a str, CniError> {
    match c.env.get(k).map(String::as_str) {
        Some(v) if !v.is_empty() => Ok(v),
        _ => Err(CniError::new(INVALID_ENV, format!("{k} is not set"))),
    }
}

/// The CNI result (spec 1.0 layout) of an attachment.
pub fn result(version: &str, ifname: &str, netns: &str, a: &CniAttached) -> Value {
    json!({
        "cniVersion": version,
        "interfaces": [{ "name": ifname, "mac": a.mac, "sandbox": netns }],
        "ips": [{
            "address": format!("{}/{}", a.ip, a.prefix_len),
            "gateway": a.gateway.to_string(),
            "interface": 0,
        }],
        "routes": [{ "dst": "0.0.0.0/0", "gw": a.gateway.to_string() }],
        "dns": { "nameservers": [a.nameserver.to_string()], "search": a.search },
    })
}

/// The agent's refusal as a CNI error: the HTTP status tells which (never its text).
fn agent_error(e: anyhow::Error, command: &str) -> CniError {
    let detail = format!("{e:#}");
    let code = match e.downcast_ref::<ClientError>() {
        Some(ClientError::Unreachable { .. }) if command == "STATUS" => NOT_AVAILABLE,
        Some(ClientError::Unreachable { .. }) => TRY_AGAIN,
        Some(ClientError::Api { status, .. }) => match (*status, command) {
            (404, "CHECK") => UNKNOWN_CONTAINER,
            (400 | 404, _) => INVALID_CONFIG,
            (409, "CHECK") => FAILED,
            (409, _) => IN_USE,
            (503, "STATUS") => NOT_AVAILABLE,
            (503, _) => TRY_AGAIN,
            _ => FAILED,
        },
        None => FAILED,
    };
    let msg = match e.downcast_ref::<ClientError>() {
        Some(ClientError::Api { message, .. }) => message.clone(),
        _ => format!("shoal agent: {detail}"),
    };
    CniError::new(code, msg).details(detail)
}

/// The version of an answer when the call's own could not be read.
pub const FALLBACK_VERSION: &str = "1.0.0";

/// The command and the configuration of a call.
fn parse(c: &Call) -> Result<(String, Value), CniError> {
    let command = env(c, "CNI_COMMAND")?.to_string();
    match serde_json::from_slice(&c.stdin) {
        Ok(v @ Value::Object(_)) => Ok((command, v)),
        Ok(_) => Err(CniError::new(
            DECODE,
            "the network configuration on stdin is not a JSON object",
        )),
        Err(e) => Err(CniError::new(
            DECODE,
            format!("decoding the network configuration on stdin: {e}"),
        )),
    }
}

/// Runs one call; the configuration's version is returned for the output either way.
pub async fn run(c: &Call) -> (String, Result<Output, CniError>) {
    let (command, conf) = match parse(c) {
        Ok(p) => p,
        Err(e) => return (FALLBACK_VERSION.into(), Err(e)),
    };
    let version = version_of(&conf).unwrap_or(FALLBACK_VERSION).to_string();
    let out = if command == "VERSION" {
        let answer = if SUPPORTED.contains(&version.as_str()) {
            version.as_str()
        } else {
            SUPPORTED[SUPPORTED.len() - 1]
        };
        Ok(Some(
            json!({ "cniVersion": answer, "supportedVersions": SUPPORTED }),
        ))
    } else if !SUPPORTED.contains(&version.as_str()) {
        Err(CniError::new(
            INCOMPATIBLE_VERSION,
            format!(
                "CNI version {version:?} is not supported (this plugin speaks {})",
                SUPPORTED.join(", ")
            ),
        ))
    } else {
        dispatch(c, &command, &version, &conf).await
    };
    (version, out)
}

async fn dispatch(
    c: &Call,
    command: &str,
    version: &str,
    conf: &Value,
) -> Result<Output, CniError> {
    let network = conf
        .get("name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| CniError::new(INVALID_CONFIG, "the network configuration has no \"name\""))?
        .to_string();
    let socket = conf
        .get("agent")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| {
            CniError::new(
                INVALID_CONFIG,
                "the network configuration has no \"agent\" (the shoal agent's socket)",
            )
        })?;
    let client = Client::new(&PathBuf::from(socket));
    let request = |need_netns: bool| -> Result<CniRequest, CniError> {
        let container_id = env(c, "CNI_CONTAINERID")?.to_string();
        let ifname = env(c, "CNI_IFNAME")?.to_string();
        let netns = if need_netns {
            env(c, "CNI_NETNS")?.to_string()
        } else {
            c.env.get("CNI_NETNS").cloned().unwrap_or_default()
        };
        let args = parse_args(c.env.get("CNI_ARGS").map_or("", String::as_str));
        let name = args.get("K8S_POD_NAME").filter(|n| !n.is_empty()).cloned();
        let mut aliases: Vec<String> = conf
            .pointer("/runtimeConfig/aliases")
            .and_then(|a| a.get(&network))
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        aliases.retain(|a| Some(a) != name.as_ref());
        aliases.sort();
        aliases.dedup();
        Ok(CniRequest {
            network: network.clone(),
            container_id,
            netns,
            ifname,
            name,
            aliases,
        })
    };
    match command {
        "ADD" => {
            let req = request(true)?;
            let a = client
                .cni_add(&req)
                .await
                .map_err(|e| agent_error(e, command))?;
            Ok(Some(result(version, &req.ifname, &req.netns, &a)))
        }
        "CHECK" => {
            let req = request(true)?;
            let a = client
                .cni_check(&req)
                .await
                .map_err(|e| agent_error(e, command))?;
            // The runtime's record of the ADD must match what Shoal has.
            if let Some(prev) = conf
                .pointer("/prevResult/ips/0/address")
                .and_then(Value::as_str)
            {
                let ours = format!("{}/{}", a.ip, a.prefix_len);
                if prev != ours {
                    return Err(CniError::new(
                        FAILED,
                        format!(
                            "the runtime has address {prev} for this container; Shoal has {ours}"
                        ),
                    ));
                }
            }
            Ok(None)
        }
        "DEL" => {
            let req = request(false)?;
            client
                .cni_del(&req)
                .await
                .map_err(|e| agent_error(e, command))?;
            Ok(None)
        }
        "STATUS" => {
            client.info().await.map_err(|e| agent_error(e, command))?;
            Ok(None)
        }
        "GC" => {
            let valid = conf
                .get("cni.dev/valid-attachments")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|v| {
                            Some((
                                v.get("containerID")?.as_str()?.to_string(),
                                v.get("ifname")?.as_str()?.to_string(),
                            ))
                        })
                        .collect()
                })
                .unwrap_or_default();
            client
                .cni_gc(&CniGc { network, valid })
                .await
                .map_err(|e| agent_error(e, command))?;
            Ok(None)
        }
        other => Err(CniError::new(
            INVALID_ENV,
            format!("unknown CNI_COMMAND {other:?} (ADD, DEL, CHECK, STATUS, GC, VERSION)"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cni_args_are_split_into_pairs() {
        let a = parse_args("IgnoreUnknown=1;K8S_POD_NAME=web_1; K8S_POD_NAMESPACE=x;junk");
        assert_eq!(a.get("K8S_POD_NAME").map(String::as_str), Some("web_1"));
        assert_eq!(a.get("K8S_POD_NAMESPACE").map(String::as_str), Some("x"));
        assert_eq!(a.len(), 3);
    }

    #[test]
    fn a_result_carries_the_address_route_and_nameserver() {
        let a = CniAttached {
            name: "box".into(),
            ip: "10.0.1.5".parse().unwrap(),
            prefix_len: 24,
            gateway: "10.0.1.1".parse().unwrap(),
            mac: "02:42:0a:00:01:05".into(),
            nameserver: "127.0.0.11".parse().unwrap(),
            search: vec!["example".into()],
        };
        let r = result("1.0.0", "eth0", "/run/netns/x", &a);
        assert_eq!(r["ips"][0]["address"], "10.0.1.5/24");
        assert_eq!(r["ips"][0]["gateway"], "10.0.1.1");
        assert_eq!(r["interfaces"][0]["mac"], "02:42:0a:00:01:05");
        assert_eq!(r["interfaces"][0]["sandbox"], "/run/netns/x");
        assert_eq!(r["routes"][0]["dst"], "0.0.0.0/0");
        assert_eq!(r["dns"]["nameservers"][0], "127.0.0.11");
        assert_eq!(r["dns"]["search"][0], "example");
    }

    #[test]
    fn statuses_map_to_spec_codes() {
        let api = |status| {
            anyhow::Error::new(ClientError::Api {
                status,
                message: "m".into(),
            })
        };
        assert_eq!(agent_error(api(404), "CHECK").code, UNKNOWN_CONTAINER);
        assert_eq!(agent_error(api(404), "ADD").code, INVALID_CONFIG);
        assert_eq!(agent_error(api(400), "ADD").code, INVALID_CONFIG);
        assert_eq!(agent_error(api(409), "ADD").code, IN_USE);
        assert_eq!(agent_error(api(503), "ADD").code, TRY_AGAIN);
        assert_eq!(agent_error(api(503), "STATUS").code, NOT_AVAILABLE);
        assert_eq!(agent_error(api(500), "ADD").code, FAILED);
        let gone = anyhow::Error::new(ClientError::Unreachable {
            socket: "/nonexistent".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        });
        assert_eq!(agent_error(gone, "ADD").code, TRY_AGAIN);
    }
}
