//! Pinning under bpffs, shared by every feature: the pin directory's layout, loading an
//! embedded object with its maps pinned (or adopted) under `<pin_dir>/maps/`, handles on its
//! maps, and unpinning.

use std::fs;
use std::io;
use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, ensure};
use libbpf_rs::{MapCore, MapHandle};

use crate::sys;

/// Make sure `pin_dir` is (to be) on bpffs and create `subdirs` below it. The check looks at
/// the closest existing ancestor, so a pin dir that does not exist yet is fine.
pub(crate) fn prepare_dir(pin_dir: &Path, subdirs: &[&str]) -> Result<()> {
    let base = pin_dir.parent().unwrap_or(Path::new("/"));
    ensure!(
        first_existing(pin_dir).is_some_and(|p| sys::is_on_bpffs(&p).unwrap_or(false)),
        "pin dir {} is not on bpffs (mount it: mount -t bpf bpf {})",
        pin_dir.display(),
        base.display()
    );
    for sub in subdirs {
        let d = pin_dir.join(sub);
        fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    }
    Ok(())
}

/// The closest existing ancestor of `p` (itself included).
fn first_existing(p: &Path) -> Option<PathBuf> {
    p.ancestors().find(|a| a.exists()).map(Path::to_path_buf)
}

/// Remove a pin; one that is already gone is fine.
pub(crate) fn remove_pin(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("unpinning {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// Open an embedded skeleton, point its maps at `<maps_dir>/<name>` (so existing pins are
/// adopted and new maps pinned there) and load it. `what` names the object in errors.
pub(crate) fn load_pinned<'obj, B: libbpf_rs::skel::SkelBuilder<'obj>>(
    builder: B,
    storage: &'obj mut MaybeUninit<libbpf_rs::OpenObject>,
    maps_dir: &Path,
    what: &str,
) -> Result<<B::Output as libbpf_rs::skel::OpenSkel<'obj>>::Output> {
    use libbpf_rs::skel::OpenSkel;
    let mut open = builder
        .open(storage)
        .with_context(|| format!("opening the embedded {what} object"))?;
    set_map_pin_paths(open.open_object_mut(), maps_dir)?;
    open.load().with_context(|| {
        format!(
            "loading {what} programs and maps (if a map pinned under {} has an older layout, remove it)",
            maps_dir.display()
        )
    })
}

/// Point every map of an opened object at `<maps_dir>/<name>`: libbpf reuses a map already
/// pinned at its pin path, else creates and pins it.
fn set_map_pin_paths(obj: &mut libbpf_rs::OpenObject, maps_dir: &Path) -> Result<()> {
    for mut m in obj.maps_mut() {
        let path = maps_dir.join(m.name());
        m.set_pin_path(&path)
            .with_context(|| format!("setting pin path {}", path.display()))?;
    }
    Ok(())
}

/// A handle on one of a loaded object's maps.
pub(crate) fn map_handle(m: &libbpf_rs::Map<'_>) -> Result<MapHandle> {
    MapHandle::try_from(m).with_context(|| format!("map {:?}", m.name()))
}

/// Sorted (program, map) names of an embedded object, for the tests that check the Rust
/// constants against it.
#[cfg(test)]
pub(crate) fn object_names<'obj, B: libbpf_rs::skel::SkelBuilder<'obj>>(
    builder: B,
    storage: &'obj mut MaybeUninit<libbpf_rs::OpenObject>,
) -> (Vec<String>, Vec<String>) {
    use libbpf_rs::skel::OpenSkel;
    let open = builder.open(storage).expect("open embedded object");
    let obj = open.open_object();
    let mut progs: Vec<String> = obj
        .progs()
        .map(|p| p.name().to_string_lossy().into_owned())
        .collect();
    let mut maps: Vec<String> = obj
        .maps()
        .map(|m| m.name().to_string_lossy().into_owned())
        .collect();
    progs.sort();
    maps.sort();
    (progs, maps)
}
