//! A Linux TUN device with one queue per worker (`IFF_MULTI_QUEUE`), opened
//! through `/dev/net/tun` and `TUNSETIFF`. The device exists while the queues
//! are open and disappears with them. Every packet read or written starts with
//! a `virtio_net_hdr` (`IFF_VNET_HDR`, see `gso`).

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
};

/// Why the TUN device could not be made, in words an admin can act on.
#[derive(Debug, thiserror::Error)]
pub enum TunError {
    #[error("/dev/net/tun does not exist: load the kernel's tun module (modprobe tun) or create the device node")]
    NoDevice,
    #[error("no permission to open /dev/net/tun: run secta as root or give its user access to /dev/net/tun")]
    OpenDenied,
    #[error("creating TUN interface {0:?} needs the CAP_NET_ADMIN capability: run secta as root or grant it (setcap cap_net_admin+ep)")]
    NoCapability(String),
    #[error("interface {0:?} already exists and is not a multi-queue TUN device (or is in use): pick another name")]
    Busy(String),
    #[error("bad interface name {0:?} (1-15 characters)")]
    BadName(String),
    #[error("creating TUN interface {name:?}: {err}")]
    Other { name: String, err: io::Error },
}

pub struct Tun {
    name: String,
    queues: Vec<OwnedFd>,
}

impl Tun {
    /// Creates (or attaches to) the TUN interface `name` with `queues` queues, all non-blocking.
    pub fn create(name: &str, queues: usize) -> Result<Tun, TunError> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
            return Err(TunError::BadName(name.to_owned()));
        }
        let mut fds = Vec::with_capacity(queues);
        for _ in 0..queues.max(1) {
            // SAFETY: plain open(2) of a constant NUL-terminated path.
            let fd = unsafe {
                libc::open(
                    c"/dev/net/tun".as_ptr(),
                    libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
                )
            };
            if fd < 0 {
                let e = io::Error::last_os_error();
                return Err(match e.raw_os_error() {
                    Some(libc::ENOENT) | Some(libc::ENODEV) | Some(libc::ENXIO) => {
                        TunError::NoDevice
                    }
                    Some(libc::EACCES) | Some(libc::EPERM) => TunError::OpenDenied,
                    _ => TunError::Other {
                        name: name.to_owned(),
                        err: e,
                    },
                });
            }
            // SAFETY: fd was just returned by open and is owned by nothing else.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: ifreq is plain old data; all-zero is a valid value.
            let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
            for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
                *d = s as libc::c_char;
            }
            req.ifr_ifru.ifru_flags =
                (libc::IFF_TUN | libc::IFF_NO_PI | libc::IFF_MULTI_QUEUE | libc::IFF_VNET_HDR)
                    as libc::c_short;
            // SAFETY: TUNSETIFF reads and writes one ifreq, which lives for the call.
            let r = unsafe { libc::ioctl(owned.as_raw_fd(), libc::TUNSETIFF, &mut req) };
            if r < 0 {
                let e = io::Error::last_os_error();
                return Err(match e.raw_os_error() {
                    Some(libc::EPERM) | Some(libc::EACCES) => {
                        TunError::NoCapability(name.to_owned())
                    }
                    Some(libc::EBUSY) | Some(libc::EINVAL) | Some(libc::EEXIST) => {
                        TunError::Busy(name.to_owned())
                    }
                    _ => TunError::Other {
                        name: name.to_owned(),
                        err: e,
                    },
                });
            }
            // TCP segmentation offload: the kernel may hand over 64 KiB TCP
            // blocks (cut up in `gso`). Without it, packets come one by one.
            let offload = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6;
            // SAFETY: TUNSETOFFLOAD takes its flags by value.
            let _ = unsafe {
                libc::ioctl(
                    owned.as_raw_fd(),
                    libc::TUNSETOFFLOAD,
                    offload as libc::c_ulong,
                )
            };
            fds.push(owned);
        }
        Ok(Tun {
            name: name.to_owned(),
            queues: fds,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn queues(&self) -> usize {
        self.queues.len()
    }

    pub fn fd(&self, queue: usize) -> RawFd {
        self.queues[queue % self.queues.len()].as_raw_fd()
    }
}

/// read(2) on a non-blocking fd: `Ok(None)` when nothing is waiting.
pub fn read_fd(fd: RawFd, buf: &mut [u8]) -> io::Result<Option<usize>> {
    // SAFETY: buf is valid for writes of buf.len() bytes.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(None),
            _ => Err(e),
        };
    }
    Ok(Some(n as usize))
}

/// write(2) of one packet.
pub fn write_fd(fd: RawFd, buf: &[u8]) -> io::Result<()> {
    // SAFETY: buf is valid for reads of buf.len() bytes.
    let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Waits until one of `fds` is readable or `timeout_ms` passes; returns which are readable.
pub fn poll_readable<const N: usize>(fds: [RawFd; N], timeout_ms: i32) -> [bool; N] {
    let mut p: [libc::pollfd; N] = fds.map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    });
    // SAFETY: p is a valid array of N pollfd structs.
    let r = unsafe { libc::poll(p.as_mut_ptr(), N as libc::nfds_t, timeout_ms) };
    if r <= 0 {
        return [false; N];
    }
    p.map(|x| x.revents & (libc::POLLIN | libc::POLLERR | libc::POLLHUP) != 0)
}
