//! The crate's one FFI module: thin safe wrappers over the libbpf calls libbpf-rs does not
//! expose for raw fds, a libbpf ring buffer consumer, and the socket options and ioctls the
//! features need. Every `unsafe` block of the crate's own code is here (besides the
//! [`crate::abi::Pod`] contract and the generated skeletons).

use std::ffi::{CString, c_void};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::ptr::NonNull;
use std::time::Duration;

use libbpf_rs::libbpf_sys;

/// Plain-old-data map types: no padding, any bit pattern valid. Every implementor's layout
/// is checked against the BTF of its object by a test beside it (the features' `abi` modules).
///
/// # Safety
/// Implementors must be `#[repr(C)]`, without padding, made only of integers.
pub unsafe trait Pod: Copy + Default + 'static {
    fn as_bytes(&self) -> &[u8] {
        // SAFETY: Pod types are padding-free integers (the trait's contract), so every byte is
        // initialised.
        unsafe { std::slice::from_raw_parts((self as *const Self).cast::<u8>(), size_of::<Self>()) }
    }

    /// Reads a value from the start of `b`; None when `b` is too short.
    fn from_bytes(b: &[u8]) -> Option<Self> {
        (b.len() >= size_of::<Self>()).then(|| {
            // SAFETY: length checked; any bit pattern is a valid Pod (the trait's contract);
            // read_unaligned because map buffers carry no alignment guarantee.
            unsafe { std::ptr::read_unaligned(b.as_ptr().cast::<Self>()) }
        })
    }
}

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

/// BPF_MAP_LOOKUP_BATCH: up to `*count` entries after position `from` (None: the start) into
/// `keys` and `values` (entries of `sizes` = key and value size); `next` receives the position
/// after them and `*count` how many were read. ENOENT means the walk ended, with `*count`
/// entries still read.
pub fn map_lookup_batch(
    map: BorrowedFd<'_>,
    sizes: (usize, usize),
    from: Option<&mut [u8]>,
    next: &mut [u8],
    keys: &mut [u8],
    values: &mut [u8],
    count: &mut u32,
) -> io::Result<()> {
    let opts = libbpf_sys::bpf_map_batch_opts {
        sz: size_of::<libbpf_sys::bpf_map_batch_opts>() as _,
        ..Default::default()
    };
    let n = *count as usize;
    let token = sizes.0.max(4);
    assert!(keys.len() >= sizes.0 * n && values.len() >= sizes.1 * n && next.len() >= token);
    assert!(from.as_ref().is_none_or(|f| f.len() >= token));
    // SAFETY: the buffers hold `*count` keys and values and a position (asserted above), and
    // all outlive the call.
    check(unsafe {
        libbpf_sys::bpf_map_lookup_batch(
            map.as_raw_fd(),
            from.map_or(std::ptr::null_mut(), |f| f.as_mut_ptr().cast::<c_void>()),
            next.as_mut_ptr().cast::<c_void>(),
            keys.as_mut_ptr().cast::<c_void>(),
            values.as_mut_ptr().cast::<c_void>(),
            count,
            &opts,
        )
    })
    .map(drop)
}

/// BPF_LINK_CREATE on a target fd: a cgroup for the cgroup attach types, a network
/// namespace for BPF_SK_LOOKUP.
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

/// (network namespace inode, attach type) of a netns link (sk_lookup); inode 0 once its
/// namespace is gone.
pub fn link_netns(link: BorrowedFd<'_>) -> io::Result<(u32, libbpf_sys::bpf_attach_type)> {
    let info = link_info(link)?;
    if info.type_ != libbpf_sys::BPF_LINK_TYPE_NETNS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("link type {} is not a netns link", info.type_),
        ));
    }
    // SAFETY: the netns member is the active one for BPF_LINK_TYPE_NETNS.
    let netns = unsafe { info.__bindgen_anon_1.netns };
    Ok((netns.netns_ino, netns.attach_type))
}

/// SO_COOKIE of a socket: the id the kernel gives it, as a SOCKMAP lookup returns it.
pub fn socket_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    getsockopt::<u64>(fd, libc::SOL_SOCKET, libc::SO_COOKIE)
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
#[cfg(any(test, feature = "testing"))]
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

/// getsockopt of a plain-data option (the kernel may fill less than `T`; the rest stays 0).
/// Only for integer and plain C struct types, for which all-zero is valid.
pub fn getsockopt<T: Copy>(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    opt: libc::c_int,
) -> io::Result<T> {
    // SAFETY: only used with integer and plain C struct types, for which all-zero is valid.
    let mut v: T = unsafe { std::mem::zeroed() };
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: v and len are live locals of the sizes given.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            opt,
            (&mut v as *mut T).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v)
}

/// setsockopt of an int option.
pub fn setsockopt_int(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    opt: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: valid fd, pointer to a live c_int of the given size.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            opt,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Bytes in a socket's send queue not yet acknowledged (SIOCOUTQ).
pub fn outq(fd: BorrowedFd<'_>) -> io::Result<u64> {
    const SIOCOUTQ: libc::c_ulong = 0x5411;
    let mut outq: libc::c_int = 0;
    // SAFETY: valid fd, pointer to a live c_int.
    if unsafe { libc::ioctl(fd.as_raw_fd(), SIOCOUTQ, &mut outq) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(outq.max(0) as u64)
}

/// Records decoded between the libbpf callback and [`RingBuffer::poll`]'s caller.
struct Inbox<T> {
    decode: fn(&[u8]) -> Option<T>,
    items: Vec<T>,
    malformed: u64,
}

/// A consumer of a BPF ring buffer map that decodes each record with a safe function.
pub struct RingBuffer<T> {
    rb: NonNull<libbpf_sys::ring_buffer>,
    /// The callback's context; boxed so its address is stable.
    inbox: Box<Inbox<T>>,
}

// SAFETY: the ring buffer manager is a plain heap object with no thread affinity; it is used
// from one thread at a time (poll takes &mut self), and the inbox is owned by it.
unsafe impl<T: Send> Send for RingBuffer<T> {}

unsafe extern "C" fn on_sample<T>(
    ctx: *mut c_void,
    data: *mut c_void,
    size: libbpf_sys::size_t,
) -> i32 {
    // SAFETY: ctx is the Inbox owned by the RingBuffer that is polling (see RingBuffer::new);
    // libbpf hands us `size` readable bytes at `data`.
    let (inbox, bytes) = unsafe {
        (
            &mut *ctx.cast::<Inbox<T>>(),
            std::slice::from_raw_parts(data.cast::<u8>(), size as usize),
        )
    };
    match (inbox.decode)(bytes) {
        Some(e) => inbox.items.push(e),
        None => inbox.malformed += 1,
    }
    0
}

impl<T> RingBuffer<T> {
    /// A consumer of the ring buffer map `map` (which must stay open while this lives).
    pub fn new(map: BorrowedFd<'_>, decode: fn(&[u8]) -> Option<T>) -> io::Result<Self> {
        let mut inbox = Box::new(Inbox {
            decode,
            items: Vec::new(),
            malformed: 0,
        });
        let ctx: *mut Inbox<T> = &mut *inbox;
        // SAFETY: valid ringbuf map fd; the callback context outlives the ring buffer (both are
        // owned by Self, and Drop frees the ring buffer first).
        let rb = unsafe {
            libbpf_sys::ring_buffer__new(
                map.as_raw_fd(),
                Some(on_sample::<T>),
                ctx.cast(),
                std::ptr::null(),
            )
        };
        let rb = NonNull::new(rb).ok_or_else(io::Error::last_os_error)?;
        Ok(Self { rb, inbox })
    }

    /// Wait up to `timeout` for records; returns those decoded, oldest first (none after a
    /// timeout or an interrupted wait).
    pub fn poll(&mut self, timeout: Duration) -> io::Result<Vec<T>> {
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: rb is live; the callback writes into self.inbox, which we hold exclusively.
        let n = unsafe { libbpf_sys::ring_buffer__poll(self.rb.as_ptr(), ms) };
        if n < 0 && n != -libc::EINTR {
            return Err(io::Error::from_raw_os_error(-n));
        }
        Ok(std::mem::take(&mut self.inbox.items))
    }

    /// Records the decoder refused.
    pub fn malformed(&self) -> u64 {
        self.inbox.malformed
    }
}

impl<T> Drop for RingBuffer<T> {
    fn drop(&mut self) {
        // SAFETY: created by ring_buffer__new, freed once.
        unsafe { libbpf_sys::ring_buffer__free(self.rb.as_ptr()) };
    }
}

/// Give the heap's free pages back to the kernel. glibc keeps what a burst of short-lived
/// allocations freed (e.g. thousands of objects read from an API server at once) as resident
/// memory, spread over its per-thread arenas.
pub fn trim_heap() {
    // SAFETY: malloc_trim only walks and releases the allocator's own free memory.
    unsafe {
        libc::malloc_trim(0);
    }
}
