//! A paced UDP DNS load client that takes each answer's latency from the kernel's receive
//! timestamp (`SO_TIMESTAMPNS`) instead of from the moment the client got round to reading
//! it.
//!
//! Why by hand: dnsperf 2.10 (Debian 12) timestamps an answer after its own `recv`, and with
//! `-v` it also `fflush`es one line per answer. At 80-90k answers per second its one receive
//! thread falls behind: `ss` shows up to ~500 answers (its `-q` limit) waiting in dnsperf's
//! own sockets while the server's socket is nearly empty, so the latency it reports there
//! is mostly its own queue. No packaged client reports per-query latency from kernel
//! timestamps, so this one does: one connected socket, queries sent on schedule in small
//! `sendmmsg` bursts, answers drained with `recvmmsg` between bursts. An answer's latency
//! is (kernel receive timestamp of the answer) - (kernel transmit timestamp of its query):
//! the server's queueing and work plus loopback, as a capture on the interface would see
//! it, and neither the client's own backlog nor its own sending.
//!
//! Transmit timestamps (`SO_TIMESTAMPING`, software, read back from the socket's error
//! queue): a clock read once before a `sendmmsg` burst would charge the k-th query of the
//! burst with the client's own sending of the k-1 before it, which on loopback includes
//! delivering each of them to the server (2-3 µs apiece). Bursts grow with the rate, so
//! that bias would grow with it too and fall hardest on the fastest server. The kernel
//! stamps each datagram as it reaches the device (`lo` calls `skb_tx_timestamp`); the
//! stamp comes back on the error queue with a copy of the packet, whose DNS ID and
//! question say which query it was. A query whose stamp never came back (error queue full)
//! keeps the clock read before its burst and is counted in
//! [`ProbeOutcome::without_tx_stamp`].

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::Duration;

/// Datagrams per system call in either direction.
const BATCH: usize = 64;
/// Largest answer read (larger ones are truncated and still counted).
const ANSWER: usize = 1500;
/// A default pacing tick: the client wakes up at most this often.
pub const TICK: Duration = Duration::from_micros(20);
/// Socket buffers, so that answers wait in the kernel between ticks rather than drop.
const BUFFER: usize = 8 << 20;

pub struct ProbeConfig {
    /// Address the client binds (the "container" asking).
    pub bind: Ipv4Addr,
    pub server: SocketAddrV4,
    /// Queries per second, sent on a fixed schedule (open loop).
    pub rate: u64,
    pub duration: Duration,
    /// How long after the last query answers are still awaited.
    pub timeout: Duration,
    /// The client wakes up at most once per tick and sends every query due by then.
    pub tick: Duration,
    /// Taking turns with other probes (other servers): `None` sends from now on.
    pub turns: Option<Turns>,
}

/// Several probes, one per server, started together, each sending only during its own
/// slice of every period (`turns` slices of `slice`), so that whatever else the machine
/// does hits every server alike. `duration` is then the time this probe is active.
#[derive(Clone, Copy, Debug)]
pub struct Turns {
    /// When the first period begins (CLOCK_REALTIME, ns since the epoch).
    pub start_ns: u64,
    pub slice: Duration,
    /// This probe's slice in each period (0-based) and the number of slices per period.
    pub turn: u32,
    pub turns: u32,
}

/// Maps this probe's active time (ns since it began sending) to the wall clock.
struct Schedule {
    t0: u64,
    slice: u64,
    turn: u64,
    turns: u64,
}

impl Schedule {
    fn real(&self, active: u64) -> u64 {
        let (period, offset) = (active / self.slice, active % self.slice);
        self.t0 + (period * self.turns + self.turn) * self.slice + offset
    }
}

#[derive(Debug, Default)]
pub struct ProbeOutcome {
    pub sent: u64,
    /// Answers that matched an outstanding query (ID and question).
    pub answered: u64,
    /// Queries never answered within the timeout (or before their ID was reused).
    pub lost: u64,
    /// Datagrams that matched no outstanding query.
    pub unexpected: u64,
    /// One per answered query, sorted.
    pub latencies: Vec<Duration>,
    /// How far behind its schedule the latest query was sent: the client's own health.
    pub max_send_lag: Duration,
    /// Queries sent more than 1 ms behind schedule (the client's core was taken away).
    pub late_sends: u64,
    /// (ns after the start, latency) of the first answers that took over 1 ms: when the
    /// slow answers happened.
    pub slow: Vec<(u64, Duration)>,
    /// Answers whose query had no kernel transmit timestamp, timed from the clock read
    /// before its `sendmmsg` burst instead.
    pub without_tx_stamp: u64,
}

fn now_ns() -> u64 {
    // SAFETY: a zeroed timespec is valid; clock_gettime only writes it.
    let mut ts: libc::timespec = unsafe { zeroed() };
    // SAFETY: valid clock id and pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn sleep_ns(ns: u64) {
    let ts = libc::timespec {
        tv_sec: (ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: valid timespec; a null remainder is allowed. An early wake-up is harmless.
    unsafe { libc::nanosleep(&ts, std::ptr::null_mut()) };
}

fn setsockopt_int(fd: i32, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: the option value is an int that lives across the call.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const i32).cast(),
            size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A query waiting for its answer: when it was sent and which query (to check the answer's
/// question, so that a late answer to an ID's earlier use is not taken for this one).
#[derive(Clone, Copy)]
struct Slot {
    sent_ns: u64,
    query: u32,
    /// `sent_ns` is the kernel's transmit timestamp (else the clock before the burst).
    kernel_stamp: bool,
}

const FREE: Slot = Slot {
    sent_ns: 0,
    query: 0,
    kernel_stamp: false,
};

/// Sends `queries` (wire format; the first two bytes, the ID, are overwritten) round-robin
/// at `cfg.rate` for `cfg.duration` and measures every answer. The calling thread does all
/// the work (pin it where the client should run).
pub fn run(queries: &[Vec<u8>], cfg: &ProbeConfig) -> io::Result<ProbeOutcome> {
    if queries.is_empty() || queries.iter().any(|q| q.len() < 12) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "queries must be DNS messages (at least a 12-byte header)",
        ));
    }
    if cfg.rate == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "rate must be above 0",
        ));
    }
    let sock = UdpSocket::bind((cfg.bind, 0))?;
    sock.connect(cfg.server)?;
    sock.set_nonblocking(true)?;
    let fd = sock.as_raw_fd();
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_TIMESTAMPNS, 1)?;
    // Transmit timestamps on the error queue; RX_FILTER: no second (SCM_TIMESTAMPING)
    // receive timestamp on answers, SO_TIMESTAMPNS gives that one.
    let tx = libc::SOF_TIMESTAMPING_TX_SOFTWARE
        | libc::SOF_TIMESTAMPING_SOFTWARE
        | libc::SOF_TIMESTAMPING_OPT_RX_FILTER;
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_TIMESTAMPING, tx as i32)?;
    for opt in [libc::SO_RCVBUFFORCE, libc::SO_SNDBUFFORCE] {
        // Best effort: without it answers may drop in a burst, which shows as lost.
        let _ = setsockopt_int(fd, libc::SOL_SOCKET, opt, BUFFER as i32);
    }

    let mut out = ProbeOutcome::default();
    let mut slots = vec![FREE; 1 << 16];
    let mut outstanding = 0u64;
    let mut sendbuf: Vec<Vec<u8>> = (0..BATCH).map(|_| Vec::with_capacity(512)).collect();
    let mut rx = Receiver::new();
    let interval = 1_000_000_000f64 / cfg.rate as f64;
    let duration = cfg.duration.as_nanos() as u64;
    let sched = match cfg.turns {
        Some(t) => Schedule {
            t0: t.start_ns,
            slice: (t.slice.as_nanos() as u64).max(1),
            turn: t.turn as u64,
            turns: (t.turns as u64).max(1),
        },
        None => Schedule {
            t0: now_ns(),
            slice: duration.max(1),
            turn: 0,
            turns: 1,
        },
    };
    let start = sched.t0;
    let total = (cfg.duration.as_secs_f64() * cfg.rate as f64).round() as u64;
    // When query `i` is due, on the wall clock.
    let due_at = |i: u64| sched.real((i as f64 * interval) as u64);
    let mut next = 0u64; // index of the next query to send
    loop {
        let now = now_ns();
        // Every query whose time has come, in bursts of up to BATCH.
        let mut due = next;
        while due < total && due_at(due) <= now {
            due += 1;
        }
        while next < due {
            let n = ((due - next) as usize).min(BATCH);
            for (k, buf) in sendbuf.iter_mut().enumerate().take(n) {
                let i = next + k as u64;
                let q = &queries[(i % queries.len() as u64) as usize];
                buf.clear();
                buf.extend_from_slice(q);
                buf[..2].copy_from_slice(&((i & 0xffff) as u16).to_be_bytes());
            }
            let stamp = now_ns();
            let sent = send_batch(fd, &sendbuf[..n])?;
            for k in 0..sent {
                let i = next + k as u64;
                let id = (i & 0xffff) as usize;
                if slots[id].sent_ns != 0 {
                    // Its answer never came before the ID came round again.
                    out.lost += 1;
                    outstanding -= 1;
                }
                slots[id] = Slot {
                    sent_ns: stamp,
                    query: (i % queries.len() as u64) as u32,
                    kernel_stamp: false,
                };
                outstanding += 1;
                let lag = stamp.saturating_sub(due_at(i));
                if lag > 1_000_000 {
                    out.late_sends += 1;
                }
                out.max_send_lag = out.max_send_lag.max(Duration::from_nanos(lag));
            }
            out.sent += sent as u64;
            next += sent as u64;
            if sent < n {
                break; // send buffer full: the rest at the next tick
            }
        }
        rx.drain(fd, queries, &mut slots, &mut outstanding, &mut out)?;
        if next >= total {
            break;
        }
        let wake = due_at(next).max(now + cfg.tick.as_nanos() as u64);
        sleep_ns(wake.saturating_sub(now_ns()));
    }
    // The last answers.
    let deadline = now_ns() + cfg.timeout.as_nanos() as u64;
    while outstanding > 0 && now_ns() < deadline {
        sleep_ns(1_000_000);
        rx.drain(fd, queries, &mut slots, &mut outstanding, &mut out)?;
    }
    out.lost += outstanding;
    out.latencies.sort();
    for s in &mut out.slow {
        s.0 = s.0.saturating_sub(start);
    }
    Ok(out)
}

/// Sends the datagrams on the connected socket; returns how many the kernel took.
fn send_batch(fd: i32, bufs: &[Vec<u8>]) -> io::Result<usize> {
    // SAFETY: plain old data; every used field is set below.
    let mut iov: [libc::iovec; BATCH] = unsafe { zeroed() };
    let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { zeroed() };
    for (k, b) in bufs.iter().enumerate() {
        iov[k].iov_base = b.as_ptr().cast_mut().cast();
        iov[k].iov_len = b.len();
    }
    let iovs = iov.as_mut_ptr();
    for (k, h) in hdrs.iter_mut().enumerate().take(bufs.len()) {
        // SAFETY: k < BATCH.
        h.msg_hdr.msg_iov = unsafe { iovs.add(k) };
        h.msg_hdr.msg_iovlen = 1;
    }
    let mut sent = 0;
    while sent < bufs.len() {
        // SAFETY: headers sent..len point at live buffers; sendmmsg only reads them.
        let n = unsafe {
            libc::sendmmsg(
                fd,
                hdrs.as_mut_ptr().add(sent),
                (bufs.len() - sent) as libc::c_uint,
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => break,
                // The server's port not (yet) open: ICMP turns into ECONNREFUSED once.
                io::ErrorKind::ConnectionRefused => continue,
                _ => return Err(e),
            }
        }
        sent += n as usize;
    }
    Ok(sent)
}

/// `recvmmsg` buffers, reused across calls.
struct Receiver {
    bufs: Vec<u8>,
    ctrl: Vec<u8>,
}

/// Control bytes per datagram: an answer carries one SCM_TIMESTAMPNS (a timespec); a
/// transmit timestamp from the error queue carries SCM_TIMESTAMPNS, SCM_TIMESTAMPING (three
/// timespecs) and IP_RECVERR (a sock_extended_err and an address).
const CTRL: usize = 256;

impl Receiver {
    fn new() -> Self {
        Receiver {
            bufs: vec![0; BATCH * ANSWER],
            ctrl: vec![0; BATCH * CTRL],
        }
    }

    /// One `recvmmsg` (with `flags`, never blocking) into the buffers; calls `each` with
    /// every datagram and its header. Returns how many came (0: none waiting).
    fn recv(
        &mut self,
        fd: i32,
        flags: i32,
        mut each: impl FnMut(&[u8], &libc::msghdr),
    ) -> io::Result<usize> {
        // SAFETY: plain old data; every used field is set below.
        let mut iov: [libc::iovec; BATCH] = unsafe { zeroed() };
        let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { zeroed() };
        let (bufs, ctrl) = (self.bufs.as_mut_ptr(), self.ctrl.as_mut_ptr());
        let iovs = iov.as_mut_ptr();
        for (k, h) in hdrs.iter_mut().enumerate() {
            // SAFETY: k < BATCH: the slot and the control area are inside their buffers.
            unsafe {
                (*iovs.add(k)).iov_base = bufs.add(k * ANSWER).cast();
                (*iovs.add(k)).iov_len = ANSWER;
                h.msg_hdr.msg_iov = iovs.add(k);
                h.msg_hdr.msg_control = ctrl.add(k * CTRL).cast();
            }
            h.msg_hdr.msg_iovlen = 1;
            h.msg_hdr.msg_controllen = CTRL as _;
        }
        let n = loop {
            // SAFETY: every header points at live buffers of the stated sizes.
            let n = unsafe {
                libc::recvmmsg(
                    fd,
                    hdrs.as_mut_ptr(),
                    BATCH as libc::c_uint,
                    flags | libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                )
            };
            if n >= 0 {
                break n as usize;
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::WouldBlock => return Ok(0),
                io::ErrorKind::Interrupted | io::ErrorKind::ConnectionRefused => continue,
                _ => return Err(e),
            }
        };
        for (k, h) in hdrs.iter().enumerate().take(n) {
            let len = (h.msg_len as usize).min(ANSWER);
            each(&self.bufs[k * ANSWER..k * ANSWER + len], &h.msg_hdr);
        }
        Ok(n)
    }

    /// Reads every transmit timestamp, then every answer waiting in the socket. In this
    /// order an answer's query has its stamp already: the kernel queues the stamp while the
    /// query is being sent, before the server can have it.
    fn drain(
        &mut self,
        fd: i32,
        queries: &[Vec<u8>],
        slots: &mut [Slot],
        outstanding: &mut u64,
        out: &mut ProbeOutcome,
    ) -> io::Result<()> {
        while self.recv(fd, libc::MSG_ERRQUEUE, |packet, h| {
            let (Some(at), Some(query)) = (tx_timestamp(h), udp_payload(packet)) else {
                return;
            };
            if let Some(id) = outstanding_query(query, queries, slots)
                && !slots[id].kernel_stamp
            {
                slots[id].sent_ns = at;
                slots[id].kernel_stamp = true;
            }
        })? == BATCH
        {}
        while self.recv(fd, 0, |answer, h| {
            let at = timestamp(h).unwrap_or_else(now_ns);
            let Some(id) = outstanding_query(answer, queries, slots) else {
                out.unexpected += 1;
                return;
            };
            let slot = slots[id];
            slots[id] = FREE;
            *outstanding -= 1;
            out.answered += 1;
            if !slot.kernel_stamp {
                out.without_tx_stamp += 1;
            }
            let latency = Duration::from_nanos(at.saturating_sub(slot.sent_ns));
            if latency > Duration::from_millis(1) && out.slow.len() < 100_000 {
                out.slow.push((slot.sent_ns, latency));
            }
            out.latencies.push(latency);
        })? == BATCH
        {}
        Ok(())
    }
}

/// The slot of the outstanding query that `message` (a query or its answer) is about: same
/// ID and same question (everything after the header up to the query's length, for a query
/// with one question and nothing else), so that a late answer to an ID's earlier use is not
/// taken for this one.
fn outstanding_query(message: &[u8], queries: &[Vec<u8>], slots: &[Slot]) -> Option<usize> {
    if message.len() < 12 {
        return None;
    }
    let id = u16::from_be_bytes([message[0], message[1]]) as usize;
    let slot = slots[id];
    let query = &queries[slot.query as usize];
    (slot.sent_ns != 0 && message.len() >= query.len() && message[12..query.len()] == query[12..])
        .then_some(id)
}

/// The UDP payload of a packet from the error queue: an IPv4 packet, or an Ethernet frame
/// carrying one (what `lo` transmits).
fn udp_payload(packet: &[u8]) -> Option<&[u8]> {
    let ip = if packet.len() > 14 && packet[12..14] == [0x08, 0x00] && packet[14] >> 4 == 4 {
        &packet[14..]
    } else {
        packet
    };
    if ip.len() < 28 || ip[0] >> 4 != 4 || ip[9] != libc::IPPROTO_UDP as u8 {
        return None;
    }
    let udp = ip.get((ip[0] & 0x0f) as usize * 4..)?;
    let len = u16::from_be_bytes([*udp.get(4)?, *udp.get(5)?]) as usize;
    udp.get(8..len)
}

/// The kernel's software transmit timestamp of a message read from the error queue, in ns
/// since the epoch: SCM_TIMESTAMPING's first timespec, when IP_RECVERR says it is a
/// timestamp of the packet's send (not an ICMP error or another kind of stamp).
fn tx_timestamp(h: &libc::msghdr) -> Option<u64> {
    let (mut stamp, mut is_send) = (None, false);
    // SAFETY: as in `timestamp`; the payloads are read unaligned, at their kernel types.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(h);
        while !c.is_null() {
            match ((*c).cmsg_level, (*c).cmsg_type) {
                (libc::SOL_SOCKET, libc::SCM_TIMESTAMPING) => {
                    let ts: libc::timespec = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                    stamp = Some(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64);
                }
                (libc::SOL_IP, libc::IP_RECVERR) => {
                    let e: libc::sock_extended_err =
                        std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                    is_send = e.ee_errno == libc::ENOMSG as u32
                        && e.ee_origin == libc::SO_EE_ORIGIN_TIMESTAMPING
                        && e.ee_info == SCM_TSTAMP_SND;
                }
                _ => {}
            }
            c = libc::CMSG_NXTHDR(h, c);
        }
    }
    stamp.filter(|&s| is_send && s != 0)
}

/// `linux/errqueue.h`: the stamp was taken as the packet left for the device (not in libc).
const SCM_TSTAMP_SND: u32 = 0;

/// The SCM_TIMESTAMPNS of a received datagram, in ns since the epoch.
fn timestamp(h: &libc::msghdr) -> Option<u64> {
    // SAFETY: the CMSG_* macros walk the control area the kernel filled for this header
    // (msg_controllen was set by recvmmsg to what it wrote).
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(h);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_TIMESTAMPNS {
                let ts: libc::timespec = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                return Some(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64);
            }
            c = libc::CMSG_NXTHDR(h, c);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// A query for `name` (type A, class IN) with ID 0.
    fn query(name: &str) -> Vec<u8> {
        let mut q = vec![0, 0, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in name.split('.') {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.extend_from_slice(&[0, 0, 1, 0, 1]);
        q
    }

    /// On loopback: a responder that echoes queries back as answers after `delay`, except
    /// every `drop_every`-th, which it ignores.
    fn responder(
        delay: Duration,
        drop_every: u64,
        garbage: bool,
    ) -> (SocketAddrV4, Arc<AtomicBool>, std::thread::JoinHandle<u64>) {
        let sock = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        // Best effort: room for the bursts while this thread is not running.
        let _ = setsockopt_int(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            4 << 20,
        );
        let std::net::SocketAddr::V4(addr) = sock.local_addr().unwrap() else {
            unreachable!()
        };
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let t = std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            let mut seen = 0u64;
            while !stop2.load(Ordering::Relaxed) {
                let Ok((n, peer)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                seen += 1;
                if drop_every > 0 && seen.is_multiple_of(drop_every) {
                    continue;
                }
                std::thread::sleep(delay);
                buf[2] |= 0x80; // QR
                if garbage {
                    sock.send_to(&buf[..5], peer).unwrap();
                }
                sock.send_to(&buf[..n], peer).unwrap();
            }
            seen
        });
        (addr, stop, t)
    }

    #[test]
    fn counts_answers_losses_and_measures_the_servers_delay() {
        let (server, stop, t) = responder(Duration::from_millis(2), 4, true);
        let queries = vec![query("a.example"), query("bb.example")];
        let cfg = ProbeConfig {
            bind: Ipv4Addr::LOCALHOST,
            server,
            rate: 200,
            duration: Duration::from_millis(500),
            timeout: Duration::from_millis(300),
            tick: TICK,
            turns: None,
        };
        let out = run(&queries, &cfg).unwrap();
        stop.store(true, Ordering::Relaxed);
        let seen = t.join().unwrap();
        assert_eq!(out.sent, 100);
        assert_eq!(seen, 100);
        // Every 4th query is never answered.
        assert_eq!(out.lost, 25, "{out:?}");
        assert_eq!(out.answered, 75);
        assert_eq!(out.latencies.len(), 75);
        // The 5-byte datagrams before each answer match nothing.
        assert_eq!(out.unexpected, 75);
        // Every query was timed from the kernel's transmit timestamp.
        assert_eq!(out.without_tx_stamp, 0, "{out:?}");
        // The responder waits 2 ms before answering: every latency includes it, and none
        // includes more than a little scheduling on top.
        assert!(out.latencies[0] >= Duration::from_millis(2), "{out:?}");
        assert!(out.latencies[74] < Duration::from_millis(50), "{out:?}");
    }

    #[test]
    fn every_query_of_a_burst_gets_its_own_transmit_timestamp() {
        // 20 queries per 200 µs tick: sendmmsg bursts of 20, answered at once.
        let (server, stop, t) = responder(Duration::ZERO, 0, false);
        let cfg = ProbeConfig {
            bind: Ipv4Addr::LOCALHOST,
            server,
            rate: 100_000,
            duration: Duration::from_millis(50),
            timeout: Duration::from_millis(300),
            tick: Duration::from_micros(200),
            turns: None,
        };
        let out = run(&[query("a.example"), query("bb.example")], &cfg).unwrap();
        stop.store(true, Ordering::Relaxed);
        t.join().unwrap();
        assert_eq!(out.sent, 5000);
        // The one-thread responder may drop some when this machine is busy; those that it
        // answered were all timed from their own transmit timestamps.
        assert_eq!(out.answered + out.lost, 5000, "{out:?}");
        assert!(out.answered > 0, "{out:?}");
        assert_eq!(out.without_tx_stamp, 0, "{out:?}");
    }

    #[test]
    fn finds_the_dns_message_in_a_transmitted_frame() {
        let dns = query("a.example");
        let mut ip = vec![
            0x45, 0, 0, 0, 0, 0, 0, 0, 64, 17, 0, 0, 127, 0, 0, 1, 127, 0, 0, 11,
        ];
        let udp_len = (8 + dns.len()) as u16;
        ip.extend_from_slice(&[0x9c, 0x40, 0, 53]);
        ip.extend_from_slice(&udp_len.to_be_bytes());
        ip.extend_from_slice(&[0, 0]);
        ip.extend_from_slice(&dns);
        let mut frame = vec![0u8; 12];
        frame.extend_from_slice(&[0x08, 0x00]);
        frame.extend_from_slice(&ip);
        assert_eq!(udp_payload(&frame), Some(&dns[..]));
        assert_eq!(udp_payload(&ip), Some(&dns[..]));
        // Not UDP, or cut short: nothing.
        let mut tcp = ip.clone();
        tcp[9] = 6;
        assert_eq!(udp_payload(&tcp), None);
        assert_eq!(udp_payload(&ip[..30]), None);
    }

    #[test]
    fn a_schedule_maps_active_time_into_its_own_slices() {
        let s = Schedule {
            t0: 1000,
            slice: 10,
            turn: 1,
            turns: 3,
        };
        assert_eq!(s.real(0), 1010);
        assert_eq!(s.real(9), 1019);
        assert_eq!(s.real(10), 1040);
        assert_eq!(s.real(25), 1075);
    }

    #[test]
    fn a_probe_taking_turns_sends_only_in_its_slices() {
        // Records when each query arrived.
        let sock = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let std::net::SocketAddr::V4(server) = sock.local_addr().unwrap() else {
            unreachable!()
        };
        // The kernel's arrival timestamp, not the clock when this thread got round to
        // reading: under a loaded CI that thread can run milliseconds late.
        setsockopt_int(sock.as_raw_fd(), libc::SOL_SOCKET, libc::SO_TIMESTAMPNS, 1).unwrap();
        let t = std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            let mut ctrl = [0u8; CTRL];
            let mut at = Vec::new();
            loop {
                // SAFETY: a zeroed sockaddr_in is valid; recvmsg fills it.
                let mut peer: libc::sockaddr_in = unsafe { zeroed() };
                let mut iov = libc::iovec {
                    iov_base: buf.as_mut_ptr().cast(),
                    iov_len: buf.len(),
                };
                // SAFETY: a zeroed msghdr is valid; every pointer set below outlives the call.
                let mut h: libc::msghdr = unsafe { zeroed() };
                h.msg_name = (&mut peer as *mut libc::sockaddr_in).cast();
                h.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as u32;
                h.msg_iov = &mut iov;
                h.msg_iovlen = 1;
                h.msg_control = ctrl.as_mut_ptr().cast();
                h.msg_controllen = ctrl.len();
                // SAFETY: `h` points at live buffers; the socket's read timeout ends the loop.
                let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut h, 0) };
                if n < 0 {
                    break;
                }
                at.push(timestamp(&h).expect("SO_TIMESTAMPNS"));
                buf[2] |= 0x80;
                let peer = SocketAddrV4::new(
                    Ipv4Addr::from(u32::from_be(peer.sin_addr.s_addr)),
                    u16::from_be(peer.sin_port),
                );
                sock.send_to(&buf[..n as usize], peer).unwrap();
            }
            at
        });
        let turns = Turns {
            start_ns: now_ns() + 20_000_000,
            slice: Duration::from_millis(30),
            turn: 1,
            turns: 2,
        };
        let cfg = ProbeConfig {
            bind: Ipv4Addr::LOCALHOST,
            server,
            rate: 1000,
            duration: Duration::from_millis(90),
            timeout: Duration::from_millis(50),
            tick: TICK,
            turns: Some(turns),
        };
        let out = run(&[query("a.example")], &cfg).unwrap();
        let at = t.join().unwrap();
        assert_eq!(out.sent, 90);
        assert_eq!(out.answered, 90, "{out:?}");
        assert_eq!(at.len(), 90);
        // Inside the second 30 ms of a 60 ms period, give or take 1 ms: never in the first
        // slice's [1, 29) ms (shifted by 10 ms so that 60 ms + slack does not wrap) -- unless
        // the probe itself was stalled: a query due at the end of its slice and sent after
        // the stall is more than 1 ms late, and the probe counts it in `late_sends` (which
        // dns_bench reports). On an idle machine that is none.
        let outside = at
            .iter()
            .map(|a| (a - turns.start_ns + 10_000_000) % 60_000_000)
            .filter(|shifted| (11_000_000..39_000_000).contains(shifted))
            .map(|shifted| shifted as f64 / 1e6 - 10.0)
            .collect::<Vec<_>>();
        assert!(
            outside.len() as u64 <= out.late_sends,
            "{} queries arrived outside the probe's slices (ms into the period: {outside:?}) \
             but only {} were sent late",
            outside.len(),
            out.late_sends
        );
    }

    #[test]
    fn refuses_queries_that_are_not_dns_messages() {
        let cfg = ProbeConfig {
            bind: Ipv4Addr::LOCALHOST,
            server: SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9),
            rate: 10,
            duration: Duration::from_millis(10),
            timeout: Duration::from_millis(10),
            tick: TICK,
            turns: None,
        };
        assert!(run(&[vec![1, 2, 3]], &cfg).is_err());
        assert!(run(&[], &cfg).is_err());
    }
}
