//! Chaining comb-cni into a node's CNI configuration, and taking it out again: what the
//! DaemonSet's `install-cni` init container runs (`comb cni install` / `comb cni uninstall`).
//!
//! The runtime uses the first configuration file of its directory in name order (`.conflist`,
//! `.conf`, `.json`), so that is the one changed: comb-cni is appended to its `plugins` (a
//! single-plugin `.conf` is turned into a `.conflist` of the same name, and back on
//! uninstall). Both are idempotent; files are replaced atomically.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::PLUGIN_TYPE;

/// Marks a conflist comb-cni made from a single `.conf`, so uninstall turns it back.
const CONVERTED_SUFFIX: &str = ".comb-converted";

/// The conflist entry.
pub fn entry(spool_dir: &Path) -> Value {
    json!({"type": PLUGIN_TYPE, "spoolDir": spool_dir})
}

fn is_comb(p: &Value) -> bool {
    p.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)
}

/// `list` with comb-cni last (replacing an entry already there).
pub fn chain(mut list: Value, spool_dir: &Path) -> Result<Value, String> {
    let plugins = list
        .get_mut("plugins")
        .and_then(Value::as_array_mut)
        .ok_or("the conflist has no plugins array")?;
    plugins.retain(|p| !is_comb(p));
    if plugins.is_empty() {
        return Err("the conflist has no primary plugin to chain after".into());
    }
    plugins.push(entry(spool_dir));
    Ok(list)
}

/// `list` without comb-cni.
pub fn unchain(mut list: Value) -> Value {
    if let Some(plugins) = list.get_mut("plugins").and_then(Value::as_array_mut) {
        plugins.retain(|p| !is_comb(p));
    }
    list
}

/// A single-plugin configuration as a list of one.
pub fn conf_to_list(conf: &Value) -> Result<Value, String> {
    let obj = conf
        .as_object()
        .ok_or("the configuration is not a JSON object")?;
    let mut plugin = obj.clone();
    let version = plugin.remove("cniVersion").unwrap_or(json!("1.0.0"));
    let name = plugin
        .remove("name")
        .ok_or("the configuration has no name")?;
    Ok(json!({"cniVersion": version, "name": name, "plugins": [plugin]}))
}

/// The list of one plugin back as a single configuration.
pub fn list_to_conf(list: &Value) -> Option<Value> {
    let plugins = list.get("plugins")?.as_array()?;
    let [only] = plugins.as_slice() else {
        return None;
    };
    let mut conf = only.as_object()?.clone();
    conf.insert("cniVersion".into(), list.get("cniVersion")?.clone());
    conf.insert("name".into(), list.get("name")?.clone());
    Some(Value::Object(conf))
}

/// The configuration file the runtime uses: the first by name.
pub fn primary(conf_dir: &Path) -> Result<Option<PathBuf>, String> {
    let rd = std::fs::read_dir(conf_dir).map_err(|e| format!("{}: {e}", conf_dir.display()))?;
    let mut files: Vec<PathBuf> = rd
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .is_some_and(|e| e == "conflist" || e == "conf" || e == "json")
        })
        .collect();
    files.sort();
    Ok(files.into_iter().next())
}

fn read_json(p: &Path) -> Result<Value, String> {
    let text = std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))?;
    serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", p.display()))
}

fn write_atomic(p: &Path, bytes: &[u8]) -> Result<(), String> {
    let name = p.file_name().ok_or("no file name")?.to_string_lossy();
    let tmp = p.with_file_name(format!(".{name}.tmp"));
    std::fs::write(&tmp, bytes).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, p).map_err(|e| format!("{}: {e}", p.display()))
}

fn write_json(p: &Path, v: &Value) -> Result<(), String> {
    let mut text = serde_json::to_vec_pretty(v).expect("JSON serializes");
    text.push(b'\n');
    write_atomic(p, &text)
}

/// Copy the plugin binary to `bin_dir` and chain it into the primary configuration of
/// `conf_dir`. Returns the configuration file changed.
pub fn install(
    conf_dir: &Path,
    bin_dir: &Path,
    plugin: &Path,
    spool_dir: &Path,
) -> Result<PathBuf, String> {
    let bin = std::fs::read(plugin).map_err(|e| format!("{}: {e}", plugin.display()))?;
    std::fs::create_dir_all(bin_dir).map_err(|e| format!("{}: {e}", bin_dir.display()))?;
    let dst = bin_dir.join(PLUGIN_TYPE);
    write_atomic(&dst, &bin)?;
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| format!("{}: {e}", dst.display()))?;

    let file = primary(conf_dir)?.ok_or_else(|| {
        format!(
            "no CNI configuration in {} yet: the primary CNI must be installed first",
            conf_dir.display()
        )
    })?;
    let v = read_json(&file)?;
    if v.get("plugins").is_some() {
        write_json(&file, &chain(v, spool_dir)?)?;
        return Ok(file);
    }
    // A single plugin: the same name as a list; the .conf goes, remembered for uninstall.
    let list = chain(conf_to_list(&v)?, spool_dir)?;
    let listed = file.with_extension("conflist");
    write_json(&listed, &list)?;
    let marker = PathBuf::from(format!("{}{CONVERTED_SUFFIX}", listed.display()));
    write_atomic(
        &marker,
        file.file_name().unwrap_or_default().as_encoded_bytes(),
    )?;
    std::fs::remove_file(&file).map_err(|e| format!("{}: {e}", file.display()))?;
    Ok(listed)
}

/// Take comb-cni out of every configuration in `conf_dir` (turning a list comb-cni made
/// back into its `.conf`) and remove the binary from `bin_dir`.
pub fn uninstall(conf_dir: &Path, bin_dir: &Path) -> Result<Vec<PathBuf>, String> {
    let mut changed = Vec::new();
    let rd = std::fs::read_dir(conf_dir).map_err(|e| format!("{}: {e}", conf_dir.display()))?;
    let mut files: Vec<PathBuf> = rd
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "conflist"))
        .collect();
    files.sort();
    for file in files {
        let v = read_json(&file)?;
        let had = v
            .get("plugins")
            .and_then(Value::as_array)
            .is_some_and(|ps| ps.iter().any(is_comb));
        if !had {
            continue;
        }
        let list = unchain(v);
        let marker = PathBuf::from(format!("{}{CONVERTED_SUFFIX}", file.display()));
        match (std::fs::read_to_string(&marker), list_to_conf(&list)) {
            (Ok(conf_name), Some(conf)) => {
                let conf_path = file.with_file_name(conf_name.trim());
                write_json(&conf_path, &conf)?;
                let _ = std::fs::remove_file(&file);
                let _ = std::fs::remove_file(&marker);
                changed.push(conf_path);
            }
            _ => {
                write_json(&file, &list)?;
                changed.push(file);
            }
        }
    }
    match std::fs::remove_file(bin_dir.join(PLUGIN_TYPE)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(format!("{}: {e}", bin_dir.join(PLUGIN_TYPE).display()));
        }
        _ => {}
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ptp_list() -> Value {
        json!({"cniVersion": "1.0.0", "name": "k8s", "plugins": [
            {"type": "ptp", "ipam": {"type": "host-local", "subnet": "10.1.0.0/24"}},
            {"type": "portmap", "capabilities": {"portMappings": true}}]})
    }

    #[test]
    fn chain_appends_once_and_unchain_restores() {
        let spool = Path::new("/run/comb/cni");
        let once = chain(ptp_list(), spool).unwrap();
        let twice = chain(once.clone(), spool).unwrap();
        assert_eq!(once, twice, "idempotent");
        assert_eq!(once["plugins"].as_array().unwrap().len(), 3);
        assert_eq!(once["plugins"][2], entry(spool));
        assert_eq!(unchain(once), ptp_list());
        assert!(chain(json!({"plugins": []}), spool).is_err());
        assert!(chain(json!({"name": "x"}), spool).is_err());
    }

    #[test]
    fn conf_round_trips_through_a_list() {
        let conf = json!({"cniVersion": "0.4.0", "name": "bridge-net", "type": "bridge",
                          "bridge": "cni0", "ipam": {"type": "host-local"}});
        let list = conf_to_list(&conf).unwrap();
        assert_eq!(list["cniVersion"], "0.4.0");
        assert_eq!(list["plugins"][0]["type"], "bridge");
        assert!(list["plugins"][0].get("name").is_none());
        assert_eq!(list_to_conf(&list).unwrap(), conf);
        assert!(conf_to_list(&json!({"type": "bridge"})).is_err(), "no name");
    }

    #[test]
    fn install_and_uninstall_on_disk() {
        let d = tempfile::tempdir().unwrap();
        let (conf_dir, bin_dir) = (d.path().join("net.d"), d.path().join("bin"));
        std::fs::create_dir_all(&conf_dir).unwrap();
        let plugin = d.path().join("comb-cni-build");
        std::fs::write(&plugin, b"#!binary").unwrap();
        let spool = Path::new("/run/comb/cni");
        assert!(
            install(&conf_dir, &bin_dir, &plugin, spool)
                .unwrap_err()
                .contains("primary CNI")
        );

        // A single .conf (first by name) becomes a list, and comes back on uninstall.
        let conf = json!({"cniVersion": "1.0.0", "name": "a", "type": "bridge"});
        std::fs::write(conf_dir.join("10-a.conf"), conf.to_string()).unwrap();
        std::fs::write(conf_dir.join("20-b.conflist"), ptp_list().to_string()).unwrap();
        let changed = install(&conf_dir, &bin_dir, &plugin, spool).unwrap();
        assert_eq!(changed, conf_dir.join("10-a.conflist"));
        assert!(!conf_dir.join("10-a.conf").exists());
        assert_eq!(primary(&conf_dir).unwrap().unwrap(), changed);
        let list = read_json(&changed).unwrap();
        assert_eq!(list["plugins"][1]["type"], PLUGIN_TYPE);
        assert_eq!(
            std::fs::read(bin_dir.join(PLUGIN_TYPE)).unwrap(),
            b"#!binary"
        );
        // Again: nothing changes.
        install(&conf_dir, &bin_dir, &plugin, spool).unwrap();
        assert_eq!(read_json(&changed).unwrap(), list);

        uninstall(&conf_dir, &bin_dir).unwrap();
        assert_eq!(read_json(&conf_dir.join("10-a.conf")).unwrap(), conf);
        assert!(!conf_dir.join("10-a.conflist").exists());
        assert_eq!(
            read_json(&conf_dir.join("20-b.conflist")).unwrap(),
            ptp_list()
        );
        assert!(!bin_dir.join(PLUGIN_TYPE).exists());
        // Nothing left to undo: a second uninstall changes nothing.
        assert!(uninstall(&conf_dir, &bin_dir).unwrap().is_empty());
    }
}
