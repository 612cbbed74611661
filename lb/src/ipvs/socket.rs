//! A blocking `NETLINK_GENERIC` socket (plain libc: socket, bind, send, recv) and the
//! request/reply loop: ACKed requests end at their NLMSG_ERROR, dumps at NLMSG_DONE.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::IpvsError;
use super::wire::{self, NlMsg};

/// Seconds to wait for the kernel's reply before failing with a timeout.
const RECV_TIMEOUT_S: libc::time_t = 10;

pub struct NlSocket {
    fd: OwnedFd,
    buf: Vec<u8>,
}

pub enum ReqError {
    /// The kernel refused the request with this errno.
    Errno(i32),
    Io(&'static str, io::Error),
    Other(IpvsError),
}

impl ReqError {
    pub fn into_ipvs(self, op: &'static str, what: String) -> IpvsError {
        match self {
            ReqError::Errno(e) => IpvsError::from_errno(op, what, e),
            ReqError::Io(w, source) => IpvsError::Io { what: w, source },
            ReqError::Other(e) => e,
        }
    }
}

fn io_err(what: &'static str) -> IpvsError {
    IpvsError::Io {
        what,
        source: io::Error::last_os_error(),
    }
}

impl NlSocket {
    pub fn open() -> Result<NlSocket, IpvsError> {
        // SAFETY: plain socket(2); the returned descriptor is owned below.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_GENERIC,
            )
        };
        if fd < 0 {
            return Err(io_err("socket"));
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_nl is plain data; all-zero is "kernel assigns the port id".
        let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        sa.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: sa is a valid sockaddr_nl of the given size.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &sa as *const libc::sockaddr_nl as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(io_err("bind"));
        }
        // A kernel that never answers must not hang the caller: recv times out (EAGAIN).
        let tv = libc::timeval {
            tv_sec: RECV_TIMEOUT_S,
            tv_usec: 0,
        };
        // SAFETY: tv is a valid timeval of the given size.
        let r = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const libc::timeval as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(io_err("setsockopt SO_RCVTIMEO"));
        }
        Ok(NlSocket {
            fd,
            buf: vec![0u8; 64 * 1024],
        })
    }

    fn send(&self, msg: &[u8]) -> Result<(), ReqError> {
        // SAFETY: msg is a valid buffer; the kernel is the destination (zeroed sockaddr_nl).
        let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        sa.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        loop {
            // SAFETY: pointers and lengths describe live buffers.
            let n = unsafe {
                libc::sendto(
                    self.fd.as_raw_fd(),
                    msg.as_ptr().cast(),
                    msg.len(),
                    0,
                    &sa as *const libc::sockaddr_nl as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
                )
            };
            if n >= 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(ReqError::Io("send", e));
            }
        }
    }

    fn recv(&mut self) -> Result<usize, ReqError> {
        loop {
            // SAFETY: buf is a live, writable buffer of its length.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    self.buf.as_mut_ptr().cast(),
                    self.buf.len(),
                    0,
                )
            };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(ReqError::Io("recv", e));
            }
        }
    }

    /// Sends `req` and feeds each reply message of sequence `seq` to `each`, until the ACK
    /// (NLMSG_ERROR 0), an error, or NLMSG_DONE.
    pub fn request(
        &mut self,
        req: &[u8],
        seq: u32,
        mut each: impl FnMut(&NlMsg<'_>) -> Result<(), IpvsError>,
    ) -> Result<(), ReqError> {
        self.send(req)?;
        loop {
            let n = self.recv()?;
            let buf = std::mem::take(&mut self.buf);
            let r = (|| {
                let msgs = wire::split_msgs(&buf[..n]).map_err(ReqError::Other)?;
                for m in msgs {
                    if m.seq != seq {
                        continue; // a late reply to an earlier request
                    }
                    match m.ty {
                        wire::NLMSG_ERROR => {
                            let code = wire::error_code(m.payload).map_err(ReqError::Other)?;
                            return Ok(Some(if code == 0 {
                                Ok(())
                            } else {
                                Err(ReqError::Errno(code))
                            }));
                        }
                        wire::NLMSG_DONE => {
                            let code = wire::error_code(m.payload).unwrap_or(0);
                            return Ok(Some(if code > 0 {
                                Err(ReqError::Errno(code))
                            } else {
                                Ok(())
                            }));
                        }
                        _ => each(&m).map_err(ReqError::Other)?,
                    }
                }
                Ok(None)
            })();
            self.buf = buf;
            match r {
                Ok(Some(done)) => return done,
                Ok(None) => {}
                Err(e) => return Err(e),
            }
        }
    }
}
