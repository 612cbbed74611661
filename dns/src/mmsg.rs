//! Batched UDP I/O: `recvmmsg` a batch of queries, answer them, `sendmmsg` the answers.
//! One system call per direction per batch instead of one per packet.
//!
//! The buffers are per worker thread (not per container): a batch is received, handled and
//! sent within one synchronous call, never across an `.await`.

use std::cell::RefCell;
use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::RawFd;

/// Datagrams per system call.
pub(crate) const BATCH: usize = 32;
/// Bytes per received datagram slot: the largest query served plus one, to detect larger.
/// Largest UDP query served (queries are small; this bounds the per-container buffer).
pub(crate) const MAX_UDP_QUERY: usize = 4096;

const SLOT: usize = MAX_UDP_QUERY + 1;

pub(crate) struct Batch {
    bufs: Vec<u8>,
    addrs: [libc::sockaddr_in; BATCH],
    lens: [usize; BATCH],
    /// Answers back to back; `replies` says where each one is and whom it goes to.
    out: Vec<u8>,
    /// Where one answer is written before it is appended to `out`.
    scratch: Vec<u8>,
    replies: Vec<(usize, usize, usize)>,
}

thread_local! {
    static BATCH_BUFFERS: RefCell<Batch> = RefCell::new(Batch {
        bufs: vec![0; BATCH * SLOT],
        // SAFETY: sockaddr_in is plain old data; all zeroes is a valid value.
        addrs: unsafe { zeroed() },
        lens: [0; BATCH],
        out: Vec::with_capacity(BATCH * 512),
        scratch: Vec::with_capacity(512),
        replies: Vec::with_capacity(BATCH),
    });
}

/// What a batch handler does with one received datagram.
pub(crate) enum Action {
    /// The buffer holds (only) an answer for the sender.
    Reply,
    /// Nothing to send now.
    None,
}

impl Batch {
    fn peer(&self, i: usize) -> SocketAddr {
        let a = &self.addrs[i];
        SocketAddr::V4(SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
            u16::from_be(a.sin_port),
        ))
    }
}

/// Receives up to [`BATCH`] datagrams from the non-blocking IPv4 UDP socket `fd`, calls
/// `f(query, peer, buf)` for each (it writes an answer into the cleared-or-not `buf` and
/// returns [`Action::Reply`], or returns [`Action::None`]), then sends all answers at once.
/// Returns the number of datagrams received; `WouldBlock` when there were none. Answers
/// the socket cannot take right now (send buffer full) are dropped, as UDP allows.
pub(crate) fn serve_batch(
    fd: RawFd,
    mut f: impl FnMut(&[u8], SocketAddr, &mut Vec<u8>) -> Action,
) -> io::Result<usize> {
    BATCH_BUFFERS.with(|cell| {
        let mut guard = cell.borrow_mut();
        let b = &mut *guard;
        let n = recv(fd, b)?;
        b.out.clear();
        b.replies.clear();
        for i in 0..n {
            let len = b.lens[i];
            if len >= SLOT {
                continue; // oversized, or not from an IPv4 peer
            }
            let peer = b.peer(i);
            let query = &b.bufs[i * SLOT..i * SLOT + len];
            if let Action::Reply = f(query, peer, &mut b.scratch)
                && !b.scratch.is_empty()
            {
                let start = b.out.len();
                b.out.extend_from_slice(&b.scratch);
                b.replies.push((start, b.out.len(), i));
            }
        }
        if let Err(e) = send(fd, b) {
            tracing::debug!(error = %e, "udp batch send");
        }
        Ok(n)
    })
}

fn recv(fd: RawFd, b: &mut Batch) -> io::Result<usize> {
    // SAFETY: iovec and mmsghdr are plain old data; all zeroes is valid (null pointers,
    // zero lengths), and every field used is set below.
    let mut iov: [libc::iovec; BATCH] = unsafe { zeroed() };
    let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { zeroed() };
    let bufs = b.bufs.as_mut_ptr();
    for (i, v) in iov.iter_mut().enumerate() {
        // SAFETY: i * SLOT + SLOT <= bufs.len(): the slot is inside the allocation.
        v.iov_base = unsafe { bufs.add(i * SLOT) }.cast();
        v.iov_len = SLOT;
    }
    let (iovs, addrs) = (iov.as_mut_ptr(), b.addrs.as_mut_ptr());
    for (i, hdr) in hdrs.iter_mut().enumerate() {
        let h = &mut hdr.msg_hdr;
        // SAFETY: i < BATCH, the length of both arrays.
        (h.msg_name, h.msg_iov) = unsafe { (addrs.add(i).cast(), iovs.add(i)) };
        h.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
        h.msg_iovlen = 1;
    }
    // SAFETY: every header points at live buffers of the stated sizes (the slots, the
    // address array, the iovecs), all of which outlive the call; no timeout pointer.
    let n = unsafe {
        libc::recvmmsg(
            fd,
            hdrs.as_mut_ptr(),
            BATCH as libc::c_uint,
            libc::MSG_DONTWAIT,
            std::ptr::null_mut(),
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    for (i, hdr) in hdrs.iter().enumerate().take(n) {
        let truncated = hdr.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
        let ipv4 = hdr.msg_hdr.msg_namelen as usize >= size_of::<libc::sockaddr_in>()
            && b.addrs[i].sin_family == libc::AF_INET as libc::sa_family_t;
        // Oversized or not from an IPv4 peer: mark as unusable.
        b.lens[i] = if truncated || !ipv4 {
            SLOT
        } else {
            hdr.msg_len as usize
        };
    }
    Ok(n)
}

fn send(fd: RawFd, b: &mut Batch) -> io::Result<()> {
    let total = b.replies.len();
    if total == 0 {
        return Ok(());
    }
    // SAFETY: as in recv: plain old data, every used field set below.
    let mut iov: [libc::iovec; BATCH] = unsafe { zeroed() };
    let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { zeroed() };
    let out = b.out.as_ptr();
    for (v, &(start, end, _)) in iov.iter_mut().zip(&b.replies) {
        // SAFETY: start..end lies inside `out` (recorded while appending to it).
        v.iov_base = unsafe { out.add(start) }.cast_mut().cast();
        v.iov_len = end - start;
    }
    let (iovs, addrs) = (iov.as_mut_ptr(), b.addrs.as_mut_ptr());
    for (k, (hdr, &(_, _, slot))) in hdrs.iter_mut().zip(&b.replies).enumerate() {
        let h = &mut hdr.msg_hdr;
        // SAFETY: k < total <= BATCH and slot < BATCH, the lengths of both arrays.
        (h.msg_name, h.msg_iov) = unsafe { (addrs.add(slot).cast(), iovs.add(k)) };
        h.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
        h.msg_iovlen = 1;
    }
    let mut sent = 0;
    while sent < total {
        // SAFETY: headers sent..total point at live buffers (answers in `out`, addresses,
        // iovecs) that outlive the call; sendmmsg only reads them.
        let n = unsafe {
            libc::sendmmsg(
                fd,
                hdrs.as_mut_ptr().add(sent),
                (total - sent) as libc::c_uint,
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            if e.kind() != io::ErrorKind::WouldBlock {
                // One bad destination fails the call: skip it and go on.
                sent += 1;
                tracing::debug!(error = %e, "udp send");
                continue;
            }
            return Err(e);
        }
        sent += n as usize;
    }
    Ok(())
}
