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

/// Entries asked for per `BPF_MAP_LOOKUP_BATCH` (grown when a hash bucket holds more).
const BATCH: u32 = 512;

/// Calls `each` with every (key, value) of a hash or array map, read `BATCH` entries per
/// syscall instead of two syscalls per entry (`entries`), without a copy of its own: a sweep
/// of a conntrack table with tens of thousands of entries took tens of milliseconds of a
/// core. Entries added or removed meanwhile may be missed or seen, as with any walk of a live
/// map. The walk stops at the first error `each` returns.
pub(crate) fn walk_batched<E: From<std::io::Error>>(
    map: &libbpf_rs::MapHandle,
    mut each: impl FnMut(&[u8], &[u8]) -> Result<(), E>,
) -> Result<(), E> {
    use libbpf_rs::MapCore;
    use std::os::fd::AsFd;
    let (ks, vs) = (map.key_size() as usize, map.value_size() as usize);
    // The kernel's position: a bucket index (u32) for hash maps, a key for arrays.
    let (mut pos, mut next) = (vec![0u8; ks.max(4)], vec![0u8; ks.max(4)]);
    let mut started = false;
    let mut batch = BATCH;
    let (mut keys, mut values) = (
        vec![0u8; ks * BATCH as usize],
        vec![0u8; vs * BATCH as usize],
    );
    loop {
        let mut count = batch;
        let r = crate::sys::map_lookup_batch(
            map.as_fd(),
            (ks, vs),
            started.then_some(pos.as_mut_slice()),
            &mut next,
            &mut keys,
            &mut values,
            &mut count,
        );
        let end = match r.as_ref().map_err(std::io::Error::raw_os_error) {
            Ok(()) => false,
            Err(Some(libc::ENOENT)) => true,
            Err(Some(libc::EINTR)) => continue,
            // One hash bucket holds more entries than a batch: ask for more at once.
            Err(Some(libc::ENOSPC)) if batch < 1 << 20 => {
                batch *= 4;
                keys.resize(ks * batch as usize, 0);
                values.resize(vs * batch as usize, 0);
                continue;
            }
            Err(_) => return Err(r.expect_err("an error").into()),
        };
        for (k, v) in keys
            .chunks_exact(ks)
            .zip(values.chunks_exact(vs))
            .take(count as usize)
        {
            each(k, v)?;
        }
        if end {
            return Ok(());
        }
        std::mem::swap(&mut pos, &mut next);
        started = true;
    }
}
