//! `comb-cni`, a chained CNI plugin (CNI spec 1.0; 0.3.x and 0.4.0 accepted): it runs after
//! the primary plugin, reports the pod sandbox (Kubernetes namespace, name and UID, network
//! namespace, host-side interface, addresses) to the node's agent and passes `prevResult` on
//! unchanged.
//!
//! The report is a file per sandbox in a spool directory (`spoolDir` in the plugin's
//! configuration, default [`DEFAULT_SPOOL_DIR`]), written atomically (temporary file, fsync,
//! rename). The directory is the queue: the agent reads it whole when it starts and follows
//! it while it runs, so a sandbox added while the agent is down or restarting is not lost.
//! `DEL` removes the file. Kept free of async runtimes: it runs once per pod start.

pub mod install;

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Where sandboxes are reported when the configuration does not say.
pub const DEFAULT_SPOOL_DIR: &str = "/run/comb/cni";
/// The plugin's `type` in a conflist.
pub const PLUGIN_TYPE: &str = "comb-cni";
/// The CNI versions this plugin speaks; results are returned in the caller's version.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0"];

/// CNI error codes (spec, "Error" section) used here.
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENV: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODE_FAILURE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
}

/// The spec's error object, printed on stdout with a non-zero exit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CniError {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    pub code: u32,
    pub msg: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        CniError {
            cni_version: "1.0.0".into(),
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    fn details(mut self, d: impl fmt::Display) -> Self {
        self.details = d.to_string();
        self
    }
}

impl fmt::Display for CniError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.msg)?;
        if !self.details.is_empty() {
            write!(f, ": {}", self.details)?;
        }
        Ok(())
    }
}

/// The plugin's network configuration (the conflist entry, with the runtime's additions).
#[derive(Debug, Clone, Deserialize)]
pub struct NetConf {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    #[serde(default)]
    pub name: String,
    #[serde(rename = "type", default)]
    pub plugin_type: String,
    #[serde(rename = "spoolDir", default)]
    pub spool_dir: Option<PathBuf>,
    /// The previous plugins' result; required for ADD and CHECK of a chained plugin.
    #[serde(rename = "prevResult", default)]
    pub prev_result: Option<Value>,
}

impl NetConf {
    pub fn spool_dir(&self) -> PathBuf {
        self.spool_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_SPOOL_DIR))
    }
}

/// What the runtime passes in the environment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Env {
    pub command: String,
    pub container_id: String,
    pub netns: String,
    pub if_name: String,
    /// `CNI_ARGS`: `K=V` pairs separated by `;`.
    pub args: BTreeMap<String, String>,
}

impl Env {
    /// From the process environment (`get` is `std::env::var` outside tests).
    pub fn read(get: impl Fn(&str) -> Option<String>) -> Result<Env, CniError> {
        let command = get("CNI_COMMAND")
            .ok_or_else(|| CniError::new(code::INVALID_ENV, "CNI_COMMAND is not set"))?;
        let args = get("CNI_ARGS").unwrap_or_default();
        Ok(Env {
            command,
            container_id: get("CNI_CONTAINERID").unwrap_or_default(),
            netns: get("CNI_NETNS").unwrap_or_default(),
            if_name: get("CNI_IFNAME").unwrap_or_default(),
            args: parse_cni_args(&args)?,
        })
    }

    fn require(&self, what: &str, v: &str) -> Result<(), CniError> {
        if v.is_empty() {
            return Err(CniError::new(
                code::INVALID_ENV,
                format!("{what} is required for {}", self.command),
            ));
        }
        Ok(())
    }

    fn pod_arg(&self, key: &str) -> Result<String, CniError> {
        self.args
            .get(key)
            .filter(|v| !v.is_empty())
            .cloned()
            .ok_or_else(|| {
                CniError::new(
                    code::INVALID_ENV,
                    format!("CNI_ARGS has no {key} (the runtime must pass the pod's identity)"),
                )
            })
    }
}

/// `IgnoreUnknown=1;K8S_POD_NAMESPACE=a;...`
pub fn parse_cni_args(s: &str) -> Result<BTreeMap<String, String>, CniError> {
    let mut out = BTreeMap::new();
    for pair in s.split(';').filter(|p| !p.trim().is_empty()) {
        let (k, v) = pair.split_once('=').ok_or_else(|| {
            CniError::new(
                code::INVALID_ENV,
                format!("CNI_ARGS: {pair:?} is not KEY=VALUE"),
            )
        })?;
        out.insert(k.trim().to_owned(), v.trim().to_owned());
    }
    Ok(out)
}

/// One pod sandbox as the agent reads it from the spool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SandboxRecord {
    pub container_id: String,
    /// The sandbox's network namespace path (`CNI_NETNS`).
    pub netns: String,
    /// The interface inside the sandbox (`CNI_IFNAME`).
    pub if_name: String,
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// The sandbox's interface on the node side (the veth peer the primary plugin made).
    pub host_interface: Option<String>,
    pub ips: Vec<String>,
}

/// The node-side interface and the addresses from a previous result (0.3.x–1.0 shapes:
/// `interfaces[]` with `sandbox` set on the pod's side; `ips[].address` in CIDR form).
pub fn from_prev_result(prev: &Value) -> Result<(Option<String>, Vec<String>), CniError> {
    let bad = |what: &str| {
        CniError::new(
            code::DECODE_FAILURE,
            format!("prevResult.{what} has an unexpected shape"),
        )
    };
    let mut host = None;
    if let Some(ifs) = prev.get("interfaces") {
        let ifs = ifs.as_array().ok_or_else(|| bad("interfaces"))?;
        host = ifs
            .iter()
            .filter(|i| {
                i.get("sandbox")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .is_empty()
            })
            .find_map(|i| i.get("name").and_then(Value::as_str))
            .map(str::to_owned);
    }
    let mut ips = Vec::new();
    if let Some(list) = prev.get("ips") {
        for ip in list.as_array().ok_or_else(|| bad("ips"))? {
            let addr = ip
                .get("address")
                .and_then(Value::as_str)
                .ok_or_else(|| bad("ips[].address"))?;
            // "10.1.2.3/24" → "10.1.2.3"
            ips.push(addr.split('/').next().unwrap_or(addr).to_owned());
        }
    }
    Ok((host, ips))
}

fn record_path(dir: &Path, container_id: &str) -> Result<PathBuf, CniError> {
    let ok = !container_id.is_empty()
        && container_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !container_id.starts_with('.');
    if !ok {
        return Err(CniError::new(
            code::INVALID_ENV,
            format!("CNI_CONTAINERID {container_id:?} is not a plain identifier"),
        ));
    }
    Ok(dir.join(format!("{container_id}.json")))
}

/// Write `rec` into `dir` so a reader sees the whole record or none of it.
pub fn write_record(dir: &Path, rec: &SandboxRecord) -> Result<(), CniError> {
    let io = |what: &str, e: std::io::Error| {
        CniError::new(code::IO_FAILURE, format!("{what} in {}", dir.display())).details(e)
    };
    std::fs::create_dir_all(dir).map_err(|e| io("creating the spool directory", e))?;
    let path = record_path(dir, &rec.container_id)?;
    // A dotfile: the agent reads only `*.json`.
    let tmp = dir.join(format!(".{}.tmp", rec.container_id));
    let text = serde_json::to_vec_pretty(rec).expect("a record serializes");
    let mut f = std::fs::File::create(&tmp).map_err(|e| io("creating a record", e))?;
    f.write_all(&text)
        .and_then(|()| f.sync_all())
        .map_err(|e| io("writing a record", e))?;
    std::fs::rename(&tmp, &path).map_err(|e| io("renaming a record", e))?;
    // The rename is durable once the directory is synced.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Read one record (the agent's side).
pub fn read_record(path: &Path) -> Result<SandboxRecord, String> {
    let text = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// What the plugin prints on success.
#[derive(Debug, PartialEq)]
pub enum Output {
    /// ADD: the previous result, unchanged.
    Result(Value),
    /// VERSION
    Versions(Value),
    /// DEL, CHECK
    Nothing,
}

/// Run one CNI command. Pure except for the spool directory.
pub fn run(env: &Env, stdin: &[u8]) -> Result<Output, CniError> {
    if env.command == "VERSION" {
        return Ok(Output::Versions(serde_json::json!({
            "cniVersion": "1.0.0",
            "supportedVersions": SUPPORTED_VERSIONS,
        })));
    }
    let conf: NetConf = serde_json::from_slice(stdin).map_err(|e| {
        CniError::new(
            code::DECODE_FAILURE,
            "the network configuration is not valid JSON",
        )
        .details(e)
    })?;
    if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
        let mut e = CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "cniVersion {:?} is not supported (supported: {})",
                conf.cni_version,
                SUPPORTED_VERSIONS.join(", ")
            ),
        );
        e.cni_version = "1.0.0".into();
        return Err(e);
    }
    let with_version = |mut e: CniError| {
        e.cni_version = conf.cni_version.clone();
        e
    };
    let dir = conf.spool_dir();
    match env.command.as_str() {
        "ADD" => {
            env.require("CNI_CONTAINERID", &env.container_id)
                .map_err(with_version)?;
            env.require("CNI_NETNS", &env.netns).map_err(with_version)?;
            let prev = conf.prev_result.clone().ok_or_else(|| {
                with_version(CniError::new(
                    code::INVALID_CONFIG,
                    format!(
                        "prevResult is missing: {PLUGIN_TYPE} is a chained plugin and must follow the primary plugin in the conflist"
                    ),
                ))
            })?;
            let (host_interface, ips) = from_prev_result(&prev).map_err(with_version)?;
            let rec = SandboxRecord {
                container_id: env.container_id.clone(),
                netns: env.netns.clone(),
                if_name: env.if_name.clone(),
                namespace: env.pod_arg("K8S_POD_NAMESPACE").map_err(with_version)?,
                name: env.pod_arg("K8S_POD_NAME").map_err(with_version)?,
                uid: env.pod_arg("K8S_POD_UID").map_err(with_version)?,
                host_interface,
                ips,
            };
            write_record(&dir, &rec).map_err(with_version)?;
            Ok(Output::Result(prev))
        }
        "DEL" => {
            // Idempotent (spec): an unknown or already deleted sandbox is not an error.
            if env.container_id.is_empty() {
                return Ok(Output::Nothing);
            }
            let path = record_path(&dir, &env.container_id).map_err(with_version)?;
            match std::fs::remove_file(&path) {
                Ok(()) => Ok(Output::Nothing),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Output::Nothing),
                Err(e) => Err(with_version(
                    CniError::new(code::IO_FAILURE, format!("removing {}", path.display()))
                        .details(e),
                )),
            }
        }
        "CHECK" => {
            env.require("CNI_CONTAINERID", &env.container_id)
                .map_err(with_version)?;
            let path = record_path(&dir, &env.container_id).map_err(with_version)?;
            let rec = read_record(&path).map_err(|e| {
                with_version(CniError::new(
                    code::UNKNOWN_CONTAINER,
                    "the sandbox was never reported to the agent",
                ))
                .details(e)
            })?;
            if rec.netns != env.netns {
                return Err(with_version(CniError::new(
                    code::UNKNOWN_CONTAINER,
                    format!(
                        "the sandbox was reported with netns {}, not {}",
                        rec.netns, env.netns
                    ),
                )));
            }
            Ok(Output::Nothing)
        }
        other => Err(with_version(CniError::new(
            code::INVALID_ENV,
            format!("CNI_COMMAND {other:?} is not ADD, DEL, CHECK or VERSION"),
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// ptp's result as Debian's containernetworking-plugins print it (1.0.0).
    fn ptp_result() -> Value {
        json!({"cniVersion": "1.0.0",
            "interfaces": [
                {"name": "veth1a2b3c4d", "mac": "aa:bb:cc:dd:ee:01"},
                {"name": "eth0", "mac": "aa:bb:cc:dd:ee:02", "sandbox": "/run/netns/p1"}],
            "ips": [{"interface": 1, "address": "10.22.0.5/24", "gateway": "10.22.0.1"}],
            "routes": [{"dst": "0.0.0.0/0"}],
            "dns": {}})
    }

    fn env(cmd: &str) -> Env {
        Env {
            command: cmd.into(),
            container_id: "abc123".into(),
            netns: "/run/netns/p1".into(),
            if_name: "eth0".into(),
            args: parse_cni_args(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=apps;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=abc123;K8S_POD_UID=1f2e-33",
            )
            .unwrap(),
        }
    }

    fn conf(dir: &Path, prev: Option<Value>) -> Vec<u8> {
        let mut c = json!({"cniVersion": "1.0.0", "name": "k8s", "type": PLUGIN_TYPE,
                           "spoolDir": dir});
        if let Some(p) = prev {
            c["prevResult"] = p;
        }
        serde_json::to_vec(&c).unwrap()
    }

    #[test]
    fn version_lists_what_is_spoken() {
        let Output::Versions(v) = run(&env("VERSION"), b"").unwrap() else {
            panic!()
        };
        assert_eq!(v["supportedVersions"], json!(SUPPORTED_VERSIONS));
    }

    #[test]
    fn add_passes_the_previous_result_through_and_spools_the_sandbox() {
        let dir = tempfile::tempdir().unwrap();
        let out = run(&env("ADD"), &conf(dir.path(), Some(ptp_result()))).unwrap();
        assert_eq!(out, Output::Result(ptp_result()));
        let rec = read_record(&dir.path().join("abc123.json")).unwrap();
        assert_eq!(
            rec,
            SandboxRecord {
                container_id: "abc123".into(),
                netns: "/run/netns/p1".into(),
                if_name: "eth0".into(),
                namespace: "apps".into(),
                name: "web-0".into(),
                uid: "1f2e-33".into(),
                host_interface: Some("veth1a2b3c4d".into()),
                ips: vec!["10.22.0.5".into()],
            }
        );
        // No temporary file is left for the agent to trip over.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        run(&env("CHECK"), &conf(dir.path(), Some(ptp_result()))).unwrap();
    }

    #[test]
    fn del_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        run(&env("ADD"), &conf(dir.path(), Some(ptp_result()))).unwrap();
        assert_eq!(
            run(&env("DEL"), &conf(dir.path(), None)).unwrap(),
            Output::Nothing
        );
        assert!(!dir.path().join("abc123.json").exists());
        assert_eq!(
            run(&env("DEL"), &conf(dir.path(), None)).unwrap(),
            Output::Nothing
        );
        let e = run(&env("CHECK"), &conf(dir.path(), None)).unwrap_err();
        assert_eq!(e.code, code::UNKNOWN_CONTAINER);
    }

    #[test]
    fn bad_input_names_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let e = run(&env("ADD"), &conf(dir.path(), None)).unwrap_err();
        assert_eq!(e.code, code::INVALID_CONFIG);
        assert!(e.msg.contains("prevResult"), "{e}");

        let mut no_uid = env("ADD");
        no_uid.args.remove("K8S_POD_UID");
        let e = run(&no_uid, &conf(dir.path(), Some(ptp_result()))).unwrap_err();
        assert_eq!(e.code, code::INVALID_ENV);
        assert!(e.msg.contains("K8S_POD_UID"), "{e}");

        let old = serde_json::to_vec(&json!({"cniVersion": "0.2.0", "type": PLUGIN_TYPE})).unwrap();
        let e = run(&env("ADD"), &old).unwrap_err();
        assert_eq!(e.code, code::INCOMPATIBLE_VERSION);
        assert!(e.msg.contains("0.2.0"), "{e}");

        let e = run(&env("ADD"), b"{not json").unwrap_err();
        assert_eq!(e.code, code::DECODE_FAILURE);

        let mut sneaky = env("ADD");
        sneaky.container_id = "../../etc/x".into();
        let e = run(&sneaky, &conf(dir.path(), Some(ptp_result()))).unwrap_err();
        assert!(e.msg.contains("CNI_CONTAINERID"), "{e}");

        let e = parse_cni_args("K8S_POD_NAME").unwrap_err();
        assert!(e.msg.contains("KEY=VALUE"), "{e}");

        let e = run(&env("GC2"), &conf(dir.path(), None)).unwrap_err();
        assert_eq!(e.code, code::INVALID_ENV);
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(json["cniVersion"], "1.0.0");
        assert_eq!(json["code"], 4);
    }

    #[test]
    fn older_result_shapes_are_read() {
        // 0.3.1 from a plugin that reports no host interface.
        let prev =
            json!({"cniVersion": "0.3.1", "ips": [{"version": "4", "address": "10.1.0.9/16"}]});
        assert_eq!(
            from_prev_result(&prev).unwrap(),
            (None, vec!["10.1.0.9".to_owned()])
        );
        let bad = json!({"ips": "10.0.0.1"});
        assert!(from_prev_result(&bad).is_err());
    }
}
