//! The node's CNI chain, run the way a container runtime runs it (libcni's rules): the
//! conflist's plugins in order for ADD, each given the previous one's result as
//! `prevResult`; in reverse order for DEL. The primary network is Debian's `ptp` with
//! `host-local` addresses from the node's pod /24; `comb-cni` is chained after it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

/// Where Debian's containernetworking-plugins are installed.
pub const DEBIAN_CNI_BIN: &str = "/usr/lib/cni";
/// The network's name (host-local keeps its leases under `dataDir/<name>`).
pub const NETWORK: &str = "comb-lab";

/// One node's chain: what a runtime finds in its conflist, and where the plugins are.
#[derive(Clone, Debug)]
pub struct Chain {
    pub conflist: Value,
    /// `CNI_PATH`.
    pub bin_dirs: Vec<PathBuf>,
    /// The node's network namespace: plugins run there, as on the node's host.
    pub node_netns: String,
}

/// The conflist of a lab node: ptp + host-local over `subnet` (gateway `gateway`), leases in
/// `ipam_dir`; then comb-cni spooling to `spool_dir`.
pub fn conflist(subnet: &str, gateway: &str, ipam_dir: &Path, spool_dir: &Path) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "name": NETWORK,
        "plugins": [
            {
                "type": "ptp",
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "dataDir": ipam_dir,
                    "ranges": [[{"subnet": subnet, "gateway": gateway}]],
                    // Everything beyond the node through the gateway (ptp adds only the
                    // subnet's own route otherwise).
                    "routes": [{"dst": "0.0.0.0/0"}],
                },
            },
            {"type": "comb-cni", "spoolDir": spool_dir},
        ],
    })
}

/// What a sandbox got from the chain's ADD.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attached {
    pub ip: std::net::Ipv4Addr,
    /// The node-side interface (the result's interface without a `sandbox`).
    pub host_veth: String,
}

/// The pod's IPv4 address and host-side interface in a CNI result.
pub fn attached(result: &Value) -> Result<Attached> {
    let ip = result["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["address"].as_str())
        .filter_map(|a| a.split('/').next()?.parse().ok())
        .next()
        .with_context(|| format!("no IPv4 address in the CNI result {result}"))?;
    let host_veth = result["interfaces"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|i| i.get("sandbox").is_none_or(Value::is_null))
        .and_then(|i| i["name"].as_str())
        .with_context(|| format!("no host-side interface in the CNI result {result}"))?
        .to_owned();
    Ok(Attached { ip, host_veth })
}

/// The stdin of plugin `i` of the chain: its own config plus the list's `cniVersion` and
/// `name`, and `prevResult` when there is one.
pub fn plugin_config(conflist: &Value, i: usize, prev: Option<&Value>) -> Value {
    let mut conf = conflist["plugins"][i].clone();
    conf["cniVersion"] = conflist["cniVersion"].clone();
    conf["name"] = conflist["name"].clone();
    if let Some(p) = prev {
        conf["prevResult"] = p.clone();
    }
    conf
}

/// The `CNI_*` identity of one sandbox.
#[derive(Clone, Debug)]
pub struct Invocation<'a> {
    pub container_id: &'a str,
    pub netns: &'a str,
    pub namespace: &'a str,
    pub pod: &'a str,
    pub uid: &'a str,
}

impl Chain {
    fn plugins(&self) -> usize {
        self.conflist["plugins"].as_array().map_or(0, Vec::len)
    }

    fn binary(&self, i: usize) -> Result<PathBuf> {
        let ty = self.conflist["plugins"][i]["type"]
            .as_str()
            .context("a plugin without type")?;
        self.bin_dirs
            .iter()
            .map(|d| d.join(ty))
            .find(|p| p.is_file())
            .with_context(|| format!("CNI plugin {ty} not found in {:?}", self.bin_dirs))
    }

    /// ADD through the chain; the last plugin's result.
    pub fn add(&self, inv: &Invocation<'_>) -> Result<Value> {
        let mut prev: Option<Value> = None;
        for i in 0..self.plugins() {
            let conf = plugin_config(&self.conflist, i, prev.as_ref());
            let out = self.exec(i, "ADD", inv, &conf)?;
            prev = Some(out);
        }
        prev.context("an empty CNI chain")
    }

    /// DEL through the chain in reverse order; every plugin is asked even when one fails
    /// (DEL is idempotent), and the first error is returned.
    pub fn del(&self, inv: &Invocation<'_>) -> Result<()> {
        let mut first = None;
        for i in (0..self.plugins()).rev() {
            let conf = plugin_config(&self.conflist, i, None);
            if let Err(e) = self.exec(i, "DEL", inv, &conf) {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    fn exec(&self, i: usize, cmd: &str, inv: &Invocation<'_>, conf: &Value) -> Result<Value> {
        let bin = self.binary(i)?;
        let path = std::env::join_paths(&self.bin_dirs)?;
        let args = format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
            inv.namespace, inv.pod, inv.container_id, inv.uid
        );
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.node_netns])
            .arg(&bin)
            .env("CNI_COMMAND", cmd)
            .env("CNI_CONTAINERID", inv.container_id)
            .env("CNI_NETNS", crate::netns::path(inv.netns))
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", path)
            .env("CNI_ARGS", args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(conf.to_string().as_bytes())?;
        let out = child.wait_with_output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!(
                "CNI {cmd} {}: {}{}",
                bin.display(),
                text.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        if text.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&text)
            .with_context(|| format!("CNI {cmd} {} printed {text:?}", bin.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_plugin_gets_the_lists_name_and_version_and_the_previous_result() {
        let list = conflist(
            "198.18.2.0/24",
            "198.18.2.1",
            Path::new("/x/ipam"),
            Path::new("/x/spool"),
        );
        let first = plugin_config(&list, 0, None);
        assert_eq!(first["type"], "ptp");
        assert_eq!(first["name"], NETWORK);
        assert_eq!(first["cniVersion"], "1.0.0");
        assert!(first.get("prevResult").is_none());
        assert_eq!(first["ipam"]["ranges"][0][0]["subnet"], "198.18.2.0/24");
        let prev = json!({"cniVersion": "1.0.0", "ips": []});
        let second = plugin_config(&list, 1, Some(&prev));
        assert_eq!(second["type"], "comb-cni");
        assert_eq!(second["spoolDir"], "/x/spool");
        assert_eq!(second["prevResult"], prev);
    }

    #[test]
    fn the_pod_address_and_host_interface_come_from_the_result() {
        // The shape ptp 1.x prints.
        let result = json!({
            "cniVersion": "1.0.0",
            "interfaces": [
                {"name": "veth1a2b3c4d", "mac": "aa:bb:cc:dd:ee:ff"},
                {"name": "eth0", "mac": "11:22:33:44:55:66", "sandbox": "/run/netns/p"}
            ],
            "ips": [{"interface": 1, "address": "198.18.2.7/24", "gateway": "198.18.2.1"}],
        });
        assert_eq!(
            attached(&result).unwrap(),
            Attached {
                ip: "198.18.2.7".parse().unwrap(),
                host_veth: "veth1a2b3c4d".into()
            }
        );
        let e = attached(&json!({"ips": []})).unwrap_err().to_string();
        assert!(e.contains("no IPv4 address"), "{e}");
    }
}
