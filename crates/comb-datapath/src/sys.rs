//! Thin wrappers over the libbpf syscalls libbpf-rs does not expose for raw fds.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use libbpf_rs::libbpf_sys;

/// libbpf returns -errno.
fn check(ret: i32) -> io::Result<i32> {
    if ret < 0 {
        Err(io::Error::from_raw_os_error(-ret))
    } else {
        Ok(ret)
    }
}

fn cpath(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))
}

/// BPF_LINK_CREATE for a cgroup attach type.
pub fn link_create(
    prog: BorrowedFd<'_>,
    target: BorrowedFd<'_>,
    attach: libbpf_sys::bpf_attach_type,
) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall wrapper on valid fds; NULL opts is allowed.
    let fd = check(unsafe {
        libbpf_sys::bpf_link_create(
            prog.as_raw_fd(),
            target.as_raw_fd(),
            attach,
            std::ptr::null(),
        )
    })?;
    // SAFETY: the kernel just gave us this fd.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Point a link at another program (same type), atomically.
pub fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: plain syscall wrapper; NULL opts is allowed.
    check(unsafe {
        libbpf_sys::bpf_link_update(link.as_raw_fd(), prog.as_raw_fd(), std::ptr::null())
    })
    .map(drop)
}

/// Detach a link now, whoever else holds it.
pub fn link_detach(link: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: plain syscall wrapper.
    check(unsafe { libbpf_sys::bpf_link_detach(link.as_raw_fd()) }).map(drop)
}

fn link_info(link: BorrowedFd<'_>) -> io::Result<libbpf_sys::bpf_link_info> {
    let mut info = libbpf_sys::bpf_link_info::default();
    let mut len = size_of::<libbpf_sys::bpf_link_info>() as u32;
    // SAFETY: info and len point at live locals of the right size.
    check(unsafe { libbpf_sys::bpf_link_get_info_by_fd(link.as_raw_fd(), &mut info, &mut len) })?;
    Ok(info)
}

/// The cgroup id of a cgroup link; 0 once its cgroup is gone.
pub fn link_cgroup_id(link: BorrowedFd<'_>) -> io::Result<u64> {
    let info = link_info(link)?;
    if info.type_ != libbpf_sys::BPF_LINK_TYPE_CGROUP {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("link type {} is not a cgroup link", info.type_),
        ));
    }
    // SAFETY: the cgroup member is the active one for BPF_LINK_TYPE_CGROUP.
    Ok(unsafe { info.__bindgen_anon_1.cgroup.cgroup_id })
}

/// BPF_LINK_CREATE of a tcx link (BPF_TCX_INGRESS / BPF_TCX_EGRESS) on the interface with
/// this ifindex in the calling thread's network namespace, appended after existing programs.
pub fn link_create_tcx(
    prog: BorrowedFd<'_>,
    ifindex: u32,
    attach: libbpf_sys::bpf_attach_type,
) -> io::Result<OwnedFd> {
    let target = i32::try_from(ifindex)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "ifindex out of range"))?;
    // SAFETY: plain syscall wrapper; for tcx the target is an ifindex; NULL opts is allowed.
    let fd = check(unsafe {
        libbpf_sys::bpf_link_create(prog.as_raw_fd(), target, attach, std::ptr::null())
    })?;
    // SAFETY: the kernel just gave us this fd.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// (ifindex, attach type) of a tcx link; ifindex 0 once its interface is gone.
pub fn link_tcx(link: BorrowedFd<'_>) -> io::Result<(u32, libbpf_sys::bpf_attach_type)> {
    let info = link_info(link)?;
    if info.type_ != libbpf_sys::BPF_LINK_TYPE_TCX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("link type {} is not a tcx link", info.type_),
        ));
    }
    // SAFETY: the tcx member is the active one for BPF_LINK_TYPE_TCX.
    let tcx = unsafe { info.__bindgen_anon_1.tcx };
    Ok((tcx.ifindex, tcx.attach_type))
}

/// BPF_PROG_TEST_RUN of a tc program on `packet` (starting with its Ethernet header), with
/// `ctx` as the `struct __sk_buff` given to the kernel (e.g. to set ifindex). Returns the
/// program's return value (of the last of `repeat` runs).
pub fn prog_test_run(
    prog: BorrowedFd<'_>,
    packet: &[u8],
    ctx: &[u8],
    repeat: u32,
) -> io::Result<u32> {
    // SAFETY: zeroed opts is the documented initial state.
    let mut opts: libbpf_sys::bpf_test_run_opts = unsafe { std::mem::zeroed() };
    opts.sz = size_of::<libbpf_sys::bpf_test_run_opts>() as _;
    opts.data_in = packet.as_ptr().cast();
    opts.data_size_in = packet.len() as u32;
    opts.ctx_in = ctx.as_ptr().cast();
    opts.ctx_size_in = ctx.len() as u32;
    opts.repeat = repeat as _;
    // SAFETY: the input buffers outlive the call; no output buffers are given.
    check(unsafe { libbpf_sys::bpf_prog_test_run_opts(prog.as_raw_fd(), &mut opts) })?;
    Ok(opts.retval)
}

/// CLOCK_BOOTTIME in nanoseconds, the clock of bpf_ktime_get_boot_ns().
pub fn boot_time_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid clock id and out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let c = cpath(path)?;
    // SAFETY: valid fd and NUL-terminated path.
    check(unsafe { libbpf_sys::bpf_obj_pin(fd.as_raw_fd(), c.as_ptr()) }).map(drop)
}

pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = cpath(path)?;
    // SAFETY: NUL-terminated path.
    let fd = check(unsafe { libbpf_sys::bpf_obj_get(c.as_ptr()) })?;
    // SAFETY: the kernel just gave us this fd.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// BPF_PROG_DETACH of a program attached with BPF_PROG_ATTACH (e.g. sk_msg on a sockhash).
pub fn prog_detach(
    prog: BorrowedFd<'_>,
    target: BorrowedFd<'_>,
    attach: libbpf_sys::bpf_attach_type,
) -> io::Result<()> {
    // SAFETY: plain syscall wrapper.
    check(unsafe { libbpf_sys::bpf_prog_detach2(prog.as_raw_fd(), target.as_raw_fd(), attach) })
        .map(drop)
}

/// True when `path` is on bpffs.
pub fn is_on_bpffs(path: &Path) -> io::Result<bool> {
    const BPF_FS_MAGIC: i64 = 0xcafe4a11;
    let c = cpath(path)?;
    // SAFETY: statfs into a zeroed local.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and out pointer.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between libcs
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}

/// The cookie of the calling thread's network namespace (getsockopt SO_NETNS_COOKIE).
pub fn netns_cookie() -> io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    // SAFETY: plain socket(2).
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: we own the fresh fd.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut cookie = 0u64;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: cookie and len are live locals of the sizes given.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}
