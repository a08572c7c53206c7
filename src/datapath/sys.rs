//! The FFI boundary: every `unsafe` of kpr's datapath and kernel probes
//! lives here, each block with the reason it is sound, behind safe
//! functions. The rest of `datapath` (and `features`) denies unsafe code.
//!
//! What is here: byte views of plain-old-data map structs ([`Pod`]),
//! libbpf calls that libbpf-rs 0.27 does not wrap (tcx and XDP links,
//! probes, tcx among them, link detach by id), and the raw socket calls of
//! netlink and of two ioctls.

#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::ptr::NonNull;

use libbpf_rs::{AsRawLibbpf, ErrorKind, Link, ProgramMut};
use tokio::io::unix::AsyncFd;

use crate::datapath::skel::nodeport::types::{ct_entry, ct_key, dsr_key};
use crate::datapath::skel::sock_lb::types::{
    lb_affinity_key, lb_affinity_val, lb_backend, lb_srcrange_key, lb_svc_key, lb_svc_val,
};

/// Plain-old-data map structs, viewed as the bytes the kernel stores.
///
/// # Safety
///
/// An implementor must be `#[repr(C)]` (or a primitive integer) with no
/// implicit padding, so that every byte of a value is an initialised
/// declared field ([`as_bytes`] reads them all), and every bit pattern of
/// its size must be a valid value ([`from_bytes`] makes one from map
/// bytes). libbpf-cargo generates the map structs as `repr(C)` with every
/// padding byte an explicit field (`pad`, `__pad_N`) and integer fields
/// only (enums are newtypes over integers); the sizes below are those of
/// bpf/include/lb_types.h and are checked when compiling.
pub unsafe trait Pod: Copy + 'static {}

/// Implements [`Pod`] for generated structs whose C size is known, and
/// checks that size at compile time (a change of the struct is a layout
/// change: it needs a new map version, see `pins`).
macro_rules! pod {
    ($($t:ty => $size:expr),+ $(,)?) => {$(
        const _: () = assert!(std::mem::size_of::<$t>() == $size);
        // SAFETY: repr(C), integer fields and explicit padding only (see
        // the trait); the size is the C struct's, asserted above.
        unsafe impl Pod for $t {}
    )+};
}

pod! {
    lb_svc_key => 24,
    lb_svc_val => 20,
    lb_backend => 24,
    lb_affinity_key => 16,
    lb_affinity_val => 16,
    lb_srcrange_key => 24,
    ct_key => 40,
    ct_entry => 64,
    dsr_key => 36,
    u32 => 4,
    u8 => 1,
}

/// The bytes of a map struct.
pub fn as_bytes<T: Pod>(value: &T) -> &[u8] {
    // SAFETY: T: Pod has no padding, so all size_of::<T>() bytes behind the
    // reference are initialised; the slice borrows `value`.
    unsafe {
        std::slice::from_raw_parts((value as *const T).cast::<u8>(), std::mem::size_of::<T>())
    }
}

/// Reads a `T` from map bytes; None when the size does not match.
pub fn from_bytes<T: Pod>(bytes: &[u8]) -> Option<T> {
    if bytes.len() != std::mem::size_of::<T>() {
        return None;
    }
    // SAFETY: the length matches and every bit pattern is a valid T (Pod);
    // the read is unaligned.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

/// libbpf-rs errors carry an errno-like kind; keep the errno where it matters.
pub fn to_io(err: libbpf_rs::Error) -> io::Error {
    match err.kind() {
        ErrorKind::NotFound => io::Error::from_raw_os_error(libc::ENOENT),
        ErrorKind::TooBig => io::Error::from_raw_os_error(libc::E2BIG),
        ErrorKind::OutOfMemory => io::Error::from_raw_os_error(libc::ENOMEM),
        ErrorKind::PermissionDenied => io::Error::from_raw_os_error(libc::EPERM),
        _ => io::Error::other(err.to_string()),
    }
}

/// A datagram socket of `family`, owned.
fn dgram_socket(family: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: socket(2) has no memory preconditions.
    let raw = unsafe { libc::socket(family, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// The MTU of `device` in this network namespace (SIOCGIFMTU).
pub fn device_mtu(device: &str) -> io::Result<i32> {
    let name = device.as_bytes();
    if name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("device name {device:?} is too long"),
        ));
    }
    let sock = dgram_socket(libc::AF_INET)?;
    // SAFETY: ifreq is plain data; all-zero is a valid (empty) request.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFMTU reads the name and writes ifru_mtu of a valid ifreq.
    let ret = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFMTU as _, &mut ifr) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFMTU filled the ifru_mtu member.
    Ok(unsafe { ifr.ifr_ifru.ifru_mtu })
}

/// The cookie of this process's network namespace (SO_NETNS_COOKIE, kernel
/// 5.14+); None where the kernel lacks it.
pub fn own_netns_cookie() -> Option<u64> {
    /// SO_NETNS_COOKIE of asm-generic/socket.h (every architecture kpr
    /// builds for).
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let sock = dgram_socket(libc::AF_INET).ok()?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: cookie and len are valid for writes of the sizes given.
    let ret = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    (ret == 0 && cookie != 0).then_some(cookie)
}

/// bpf_program__attach_tcx, which libbpf-rs 0.27 does not wrap.
pub fn attach_tcx(prog: &ProgramMut<'_>, ifindex: i32) -> io::Result<Link> {
    let opts = libbpf_sys::bpf_tcx_opts {
        sz: std::mem::size_of::<libbpf_sys::bpf_tcx_opts>() as libbpf_sys::size_t,
        ..Default::default()
    };
    // SAFETY: the program is loaded and outlives the call; opts is a valid
    // bpf_tcx_opts with its size set. libbpf returns NULL with errno set on
    // failure, or a link that we own from here on.
    let ptr = unsafe {
        libbpf_sys::bpf_program__attach_tcx(prog.as_libbpf_object().as_ptr(), ifindex, &opts)
    };
    match NonNull::new(ptr) {
        // SAFETY: a valid, owned bpf_link from libbpf.
        Some(ptr) => Ok(unsafe { Link::from_ptr(ptr) }),
        None => Err(io::Error::last_os_error()),
    }
}

/// A BPF link of `prog` to XDP on `ifindex` with `flags` (the mode),
/// pinned at `pin`. libbpf-rs 0.27's attach_xdp takes no flags.
pub fn attach_xdp_pinned(
    prog: &ProgramMut<'_>,
    ifindex: i32,
    flags: u32,
    pin: &Path,
) -> io::Result<()> {
    // SAFETY: an all-zero bpf_link_create_opts is its "no options" value;
    // only sz and flags are set.
    let mut opts: libbpf_sys::bpf_link_create_opts = unsafe { std::mem::zeroed() };
    opts.sz = std::mem::size_of::<libbpf_sys::bpf_link_create_opts>() as libbpf_sys::size_t;
    opts.flags = flags;
    let prog_fd = prog.as_fd().as_raw_fd();
    // SAFETY: a loaded program's fd and a valid opts; the returned fd is
    // owned below.
    let fd = unsafe { libbpf_sys::bpf_link_create(prog_fd, ifindex, libbpf_sys::BPF_XDP, &opts) };
    if fd < 0 {
        return Err(io::Error::from_raw_os_error(-fd));
    }
    // SAFETY: fd is a fresh link fd we own (closed when dropped, after
    // pinning).
    let link_fd = unsafe { OwnedFd::from_raw_fd(fd) };
    pin_fd(link_fd.as_fd(), pin)
}

/// Pins the BPF object (map, program, link) behind `fd` at `pin`.
pub fn pin_fd(fd: BorrowedFd<'_>, pin: &Path) -> io::Result<()> {
    let path = CString::new(pin.as_os_str().as_encoded_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: a valid fd and NUL-terminated path.
    let ret = unsafe { libbpf_sys::bpf_obj_pin(fd.as_raw_fd(), path.as_ptr()) };
    if ret != 0 {
        return Err(io::Error::from_raw_os_error(-ret));
    }
    Ok(())
}

/// Detaches the BPF link of id `id`; false when it is gone already.
pub fn detach_link_by_id(id: u32) -> io::Result<bool> {
    // SAFETY: a plain syscall wrapper; the fd is owned right away.
    let fd = unsafe { libbpf_sys::bpf_link_get_fd_by_id(id) };
    if fd < 0 {
        return Ok(false);
    }
    // SAFETY: a fresh fd we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: a plain syscall wrapper on a valid fd.
    let ret = unsafe { libbpf_sys::bpf_link_detach(fd.as_raw_fd()) };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(true)
}

/// Whether the kernel supports programs of type `t` (libbpf's probe).
pub fn probe_prog_type(t: libbpf_sys::bpf_prog_type) -> bool {
    // SAFETY: a probe with no options.
    unsafe { libbpf_sys::libbpf_probe_bpf_prog_type(t, std::ptr::null()) == 1 }
}

/// Whether the kernel has tcx (6.6+): a BPF_PROG_QUERY of tcx ingress on
/// the loopback device (ifindex 1 in every network namespace) succeeds,
/// with no program, where a kernel without tcx refuses the attach type.
/// Reads only; attaches nothing.
pub fn tcx_supported() -> bool {
    let mut opts = libbpf_sys::bpf_prog_query_opts {
        sz: std::mem::size_of::<libbpf_sys::bpf_prog_query_opts>() as libbpf_sys::size_t,
        ..Default::default()
    };
    // SAFETY: opts is a valid bpf_prog_query_opts with its size set and no
    // id arrays (the kernel only writes the counts).
    unsafe { libbpf_sys::bpf_prog_query_opts(1, libbpf_sys::BPF_TCX_INGRESS, &mut opts) == 0 }
}

/// Whether programs of type `t` may call `helper` (libbpf's probe).
pub fn probe_helper(t: libbpf_sys::bpf_prog_type, helper: libbpf_sys::bpf_func_id) -> bool {
    // SAFETY: a probe with no options.
    unsafe { libbpf_sys::libbpf_probe_bpf_helper(t, helper, std::ptr::null()) == 1 }
}

/// Whether the kernel loads `insns` as a GPL program of type `prog_type`
/// for `attach` (the program is closed at once).
pub fn prog_loads(
    prog_type: libbpf_sys::bpf_prog_type,
    attach: libbpf_sys::bpf_attach_type,
    insns: &[libbpf_sys::bpf_insn],
) -> bool {
    let mut opts = libbpf_sys::bpf_prog_load_opts {
        sz: std::mem::size_of::<libbpf_sys::bpf_prog_load_opts>() as _,
        expected_attach_type: attach,
        ..Default::default()
    };
    let license = c"GPL";
    // SAFETY: valid instructions and options; the fd is owned below.
    let fd = unsafe {
        libbpf_sys::bpf_prog_load(
            prog_type,
            std::ptr::null(),
            license.as_ptr(),
            insns.as_ptr(),
            insns.len() as _,
            &mut opts,
        )
    };
    if fd < 0 {
        return false;
    }
    // SAFETY: a fresh fd we own; closed here.
    drop(unsafe { OwnedFd::from_raw_fd(fd) });
    true
}

/// A NETLINK_ROUTE socket bound to the multicast `groups` (0: none, for
/// requests), non-blocking when asked.
pub fn netlink_route_socket(groups: u32, nonblocking: bool) -> io::Result<OwnedFd> {
    let flags = if nonblocking { libc::SOCK_NONBLOCK } else { 0 };
    // SAFETY: socket(2) has no memory preconditions; the fd is owned at once.
    let raw = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC | flags,
            libc::NETLINK_ROUTE,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    if groups != 0 {
        // SAFETY: sockaddr_nl is plain data; all-zero is valid.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        addr.nl_groups = groups;
        // SAFETY: bind(2) reads a sockaddr_nl of the size given.
        let ret = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if ret != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(fd)
}

/// SO_RCVTIMEO of `seconds` on `fd`.
pub fn set_recv_timeout(fd: BorrowedFd<'_>, seconds: i64) -> io::Result<()> {
    let timeout = libc::timeval {
        tv_sec: seconds as libc::time_t,
        tv_usec: 0,
    };
    // SAFETY: setsockopt reads a timeval of the size given.
    let ret = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// send(2) of the whole of `buf`.
pub fn send(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: send(2) reads `buf.len()` bytes of a live buffer.
    let n = unsafe { libc::send(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// recv(2) into `buf` with `flags`.
pub fn recv(fd: BorrowedFd<'_>, buf: &mut [u8], flags: libc::c_int) -> io::Result<usize> {
    // SAFETY: recv(2) writes at most buf.len() bytes into buf.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), flags) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Registers an owned descriptor with tokio's reactor.
pub fn async_fd(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the OwnedFd is open and moves into the AsyncFd, which owns it
    // (same descriptor) until dropped.
    Ok(unsafe { AsyncFd::register(fd) }?)
}

/// Creates (and drops at once) a preallocated hash map of `entries`
/// small entries: whether the kernel takes a map of that size.
pub fn probe_hash_map(entries: u32) -> std::io::Result<()> {
    let opts = libbpf_sys::bpf_map_create_opts {
        sz: std::mem::size_of::<libbpf_sys::bpf_map_create_opts>() as _,
        ..Default::default()
    };
    // SAFETY: plain syscall wrapper; the descriptor is closed right away.
    let fd = unsafe {
        libbpf_sys::bpf_map_create(
            libbpf_sys::BPF_MAP_TYPE_HASH,
            c"kpr_probe".as_ptr(),
            4,
            4,
            entries,
            &opts,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::from_raw_os_error(-fd));
    }
    // SAFETY: fd is the map just created, owned here and closed once.
    drop(unsafe { OwnedFd::from_raw_fd(fd) });
    Ok(())
}
