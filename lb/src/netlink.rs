//! Plain netlink shared by our hand-written kernel clients, IPVS ([`crate::ipvs`], generic
//! netlink), conntrack ([`crate::conntrack`], nfnetlink) and the nf_tables element loader
//! (`nft::elements`, an nfnetlink batch): the message and attribute layouts
//! of linux/netlink.h (pure, no sockets) and a blocking socket of any netlink protocol with
//! the request/reply loop: ACKed requests end at their NLMSG_ERROR, dumps at NLMSG_DONE.
//!
//! Both families put a 4-byte header after `nlmsghdr` (`genlmsghdr`: cmd, version, reserved;
//! `nfgenmsg`: family, version, res_id), so one [`Msg`] builder serves both.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

// linux/netlink.h
pub const NLMSG_HDRLEN: usize = 16;
pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_MULTI: u16 = 0x2;
pub const NLM_F_ACK: u16 = 0x4;
pub const NLM_F_DUMP: u16 = 0x300;
pub const NLMSG_ERROR: u16 = 2;
pub const NLMSG_DONE: u16 = 3;
pub const NLA_F_NESTED: u16 = 0x8000;
pub const NLA_TYPE_MASK: u16 = 0x3fff;

/// Seconds to wait for the kernel's reply before failing with a timeout.
const RECV_TIMEOUT_S: libc::time_t = 10;

pub fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// A reply that does not parse; each client turns it into its own error type.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DecodeError(pub String);

/// One message being built: nlmsghdr + the family's 4-byte header + attributes. The length is
/// patched in [`Msg::finish`].
pub struct Msg {
    buf: Vec<u8>,
    nests: Vec<usize>,
}

impl Msg {
    pub fn new(ty: u16, flags: u16, seq: u32, family_hdr: [u8; 4]) -> Msg {
        let mut buf = Vec::with_capacity(128);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_len, patched later
        buf.extend_from_slice(&ty.to_ne_bytes()); // nlmsg_type
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_pid: the kernel fills it
        buf.extend_from_slice(&family_hdr);
        Msg { buf, nests: vec![] }
    }

    pub fn attr(&mut self, ty: u16, payload: &[u8]) -> &mut Self {
        let len = 4 + payload.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(payload);
        self.buf.resize(align4(self.buf.len()), 0);
        self
    }

    pub fn u8(&mut self, ty: u16, v: u8) -> &mut Self {
        self.attr(ty, &[v])
    }

    pub fn u16(&mut self, ty: u16, v: u16) -> &mut Self {
        self.attr(ty, &v.to_ne_bytes())
    }

    pub fn u32(&mut self, ty: u16, v: u32) -> &mut Self {
        self.attr(ty, &v.to_ne_bytes())
    }

    /// NUL-terminated string.
    pub fn str(&mut self, ty: u16, s: &str) -> &mut Self {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        self.attr(ty, &v)
    }

    pub fn begin_nest(&mut self, ty: u16) -> &mut Self {
        self.nests.push(self.buf.len());
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
        self
    }

    pub fn end_nest(&mut self) -> &mut Self {
        let start = self.nests.pop().expect("end_nest without begin_nest");
        let len = (self.buf.len() - start) as u16;
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        self
    }

    /// Bytes written so far, header included.
    pub fn size(&self) -> usize {
        self.buf.len()
    }

    pub fn finish(mut self) -> Vec<u8> {
        assert!(self.nests.is_empty(), "unclosed nest");
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

/// A received netlink message.
#[derive(Debug, PartialEq, Eq)]
pub struct NlMsg<'a> {
    pub ty: u16,
    pub flags: u16,
    pub seq: u32,
    pub payload: &'a [u8],
}

/// Splits a datagram into netlink messages.
pub fn split_msgs(mut b: &[u8]) -> Result<Vec<NlMsg<'_>>, DecodeError> {
    let mut out = vec![];
    while b.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes(b[0..4].try_into().unwrap()) as usize;
        if len < NLMSG_HDRLEN || len > b.len() {
            return Err(DecodeError(format!(
                "netlink message length {len} in a {}-byte datagram",
                b.len()
            )));
        }
        out.push(NlMsg {
            ty: u16::from_ne_bytes(b[4..6].try_into().unwrap()),
            flags: u16::from_ne_bytes(b[6..8].try_into().unwrap()),
            seq: u32::from_ne_bytes(b[8..12].try_into().unwrap()),
            payload: &b[NLMSG_HDRLEN..len],
        });
        b = &b[align4(len).min(b.len())..];
    }
    Ok(out)
}

/// The errno of an NLMSG_ERROR payload (0 = ACK), as a positive number.
pub fn error_code(payload: &[u8]) -> Result<i32, DecodeError> {
    if payload.len() < 4 {
        return Err(DecodeError("short NLMSG_ERROR".into()));
    }
    Ok(-i32::from_ne_bytes(payload[0..4].try_into().unwrap()))
}

/// Iterates attributes: (type without the NESTED/BYTEORDER bits, payload).
pub fn attrs(mut b: &[u8]) -> Result<Vec<(u16, &[u8])>, DecodeError> {
    let mut out = vec![];
    while b.len() >= 4 {
        let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
        let ty = u16::from_ne_bytes([b[2], b[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > b.len() {
            return Err(DecodeError(format!(
                "attribute {ty} length {len} in {} bytes",
                b.len()
            )));
        }
        out.push((ty, &b[4..len]));
        b = &b[align4(len).min(b.len())..];
    }
    Ok(out)
}

/// A socket call that failed: which one, and the OS error.
#[derive(Debug)]
pub struct SocketError {
    pub what: &'static str,
    pub source: io::Error,
}

fn io_err(what: &'static str) -> SocketError {
    SocketError {
        what,
        source: io::Error::last_os_error(),
    }
}

/// How a request failed. `E` is the client's error type, returned by its reply callback and
/// built from a [`DecodeError`] when a reply does not parse.
pub enum ReqError<E> {
    /// The kernel refused the request with this errno.
    Errno(i32),
    Io(&'static str, io::Error),
    Other(E),
}

/// A blocking netlink socket (plain libc: socket, bind, send, recv) of one netlink protocol.
/// It belongs to the network namespace of the thread that opened it.
pub struct NlSocket {
    fd: OwnedFd,
    buf: Vec<u8>,
}

impl std::fmt::Debug for NlSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NlSocket")
    }
}

impl NlSocket {
    /// Opens and binds a socket of `protocol` (`libc::NETLINK_GENERIC`,
    /// `libc::NETLINK_NETFILTER`, ...).
    pub fn open(protocol: libc::c_int) -> Result<NlSocket, SocketError> {
        // SAFETY: plain socket(2); the returned descriptor is owned below.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                protocol,
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

    /// Sets an integer socket option.
    pub fn set_int_opt(
        &self,
        level: libc::c_int,
        name: libc::c_int,
        value: libc::c_int,
        what: &'static str,
    ) -> Result<(), SocketError> {
        // SAFETY: value is a valid c_int of the given size.
        let r = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                level,
                name,
                &value as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(io_err(what));
        }
        Ok(())
    }

    /// Sends `buf` (one or several netlink messages, e.g. an nfnetlink batch) to the kernel
    /// in ONE sendto: the kernel processes a batch only as one datagram. The send buffer
    /// must hold it (`SO_SNDBUF`/`SO_SNDBUFFORCE`), else EMSGSIZE.
    pub fn send_datagram(&self, buf: &[u8]) -> io::Result<()> {
        match self.send::<()>(buf) {
            Ok(()) => Ok(()),
            Err(ReqError::Io(_, e)) => Err(e),
            Err(_) => unreachable!("send returns only I/O errors"),
        }
    }

    /// Receives one datagram; with `wait` false, None when nothing is queued. Blocking
    /// receives time out after the socket's receive timeout (an `io::Error`).
    pub fn recv_datagram(&mut self, wait: bool) -> io::Result<Option<&[u8]>> {
        let flags = if wait { 0 } else { libc::MSG_DONTWAIT };
        loop {
            // SAFETY: buf is a live, writable buffer of its length.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    self.buf.as_mut_ptr().cast(),
                    self.buf.len(),
                    flags,
                )
            };
            if n >= 0 {
                return Ok(Some(&self.buf[..n as usize]));
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => {}
                io::ErrorKind::WouldBlock if !wait => return Ok(None),
                _ => return Err(e),
            }
        }
    }

    fn send<E>(&self, msg: &[u8]) -> Result<(), ReqError<E>> {
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

    fn recv<E>(&mut self) -> Result<usize, ReqError<E>> {
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
    pub fn request<E: From<DecodeError>>(
        &mut self,
        req: &[u8],
        seq: u32,
        mut each: impl FnMut(&NlMsg<'_>) -> Result<(), E>,
    ) -> Result<(), ReqError<E>> {
        self.send(req)?;
        loop {
            let n = self.recv()?;
            let buf = std::mem::take(&mut self.buf);
            let r = (|| {
                let msgs = split_msgs(&buf[..n]).map_err(|e| ReqError::Other(e.into()))?;
                for m in msgs {
                    if m.seq != seq {
                        continue; // a late reply to an earlier request
                    }
                    match m.ty {
                        NLMSG_ERROR => {
                            let code =
                                error_code(m.payload).map_err(|e| ReqError::Other(e.into()))?;
                            return Ok(Some(if code == 0 {
                                Ok(())
                            } else {
                                Err(ReqError::Errno(code))
                            }));
                        }
                        NLMSG_DONE => {
                            let code = error_code(m.payload).unwrap_or(0);
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
