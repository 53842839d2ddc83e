//! Generic map access every feature needs: delete-if-present and a full read.

/// Delete `key`; a key that is already gone is not an error (the goal is its absence).
pub(crate) fn delete_if_present(map: &libbpf_rs::MapHandle, key: &[u8]) -> libbpf_rs::Result<()> {
    use libbpf_rs::MapCore;
    match map.delete(key) {
        Err(e) if e.kind() == libbpf_rs::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

/// Every (key, value) of a map; entries deleted between iteration and lookup are skipped.
pub(crate) fn entries(map: &libbpf_rs::MapHandle) -> libbpf_rs::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    use libbpf_rs::MapCore;
    let mut out = Vec::new();
    for k in map.keys() {
        if let Some(v) = map.lookup(&k, libbpf_rs::MapFlags::ANY)? {
            out.push((k, v));
        }
    }
    Ok(out)
}
