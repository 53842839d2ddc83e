//! The one system call without a safe wrapper we use: poll(2) over many sockets at once.

/// poll(2) over `fds`; returns what poll returns (-1 with errno set on failure).
pub(crate) fn poll(fds: &mut [libc::pollfd], timeout_ms: libc::c_int) -> libc::c_int {
    // SAFETY: `fds` is an exclusively borrowed slice of `fds.len()` initialised pollfd
    // structs for the whole call; the caller keeps the descriptors open until it returns.
    unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) }
}
