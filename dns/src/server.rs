//! Serving loops: per attached container one UDP task and one TCP accept task (each TCP
//! connection its own task), plus upstream forwarding from the agent's own namespace.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arc_swap::ArcSwap;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::timeout;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::cache::Cache;
use crate::handler::{CacheKey, Handler, Outcome, Transport, cache_key, question_end};
use crate::mmsg;
use crate::records::Records;
use crate::stats::DnsStats;
use crate::{DnsConfig, DnsError};
use std::sync::atomic::Ordering::Relaxed;

/// Where the resolver listens inside every container namespace.
pub const LISTEN_ADDR: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 11), 53));

/// Full batches handled back to back before the UDP task goes back to its select
/// (shutdown, finished forwards).
const UDP_BATCHES: usize = 4;

/// How long `attach` keeps retrying a bind that finds 127.0.0.11:53 in use (see there).
const BIND_IN_USE_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// Requested UDP receive buffer (the kernel doubles it for bookkeeping).
const UDP_RECEIVE_BUFFER: usize = 4 << 20;

/// The embedded resolver: serves any number of containers. Cheap to clone (an `Arc`
/// inside); when the last clone is dropped every container is detached.
#[derive(Clone)]
pub struct Resolver {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    attached: Mutex<HashMap<String, Attachment>>,
}

/// What the serving tasks need (not the attachment table, so dropping the last
/// [`Resolver`] stops them).
struct Shared {
    handler: Handler,
    config: DnsConfig,
    /// Upstream answers, for every container.
    cache: Cache,
    stats: Arc<DnsStats>,
}

struct Attachment {
    view: Arc<ArcSwap<Records>>,
    /// Dropping it tells the container's tasks to stop.
    stop: watch::Sender<()>,
    tasks: Vec<JoinHandle<()>>,
}

impl Resolver {
    pub fn new(config: DnsConfig) -> Self {
        Resolver {
            inner: Arc::new(Inner {
                shared: Arc::new(Shared {
                    handler: Handler::new(&config),
                    cache: Cache::new(config.cache_size),
                    config,
                    stats: Arc::new(DnsStats::default()),
                }),
                attached: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// What the resolver has done since it started (every container together).
    pub fn stats(&self) -> Arc<DnsStats> {
        self.inner.shared.stats.clone()
    }

    /// Binds UDP and TCP 127.0.0.11:53 inside the network namespace `netns` (a name under
    /// /run/netns, or a path like /proc/PID/ns/net) and serves `records` there. Fails if
    /// `id` is already attached or binding fails (an address in use is retried for a
    /// second first). The namespace's `lo` must be up.
    pub async fn attach(
        &self,
        id: &str,
        netns: &str,
        records: Arc<Records>,
    ) -> Result<(), DnsError> {
        if self.table().contains_key(id) {
            return Err(DnsError::AlreadyAttached(id.to_string()));
        }
        let started = Instant::now();
        let bound = loop {
            let ns = netns.to_string();
            let bound = tokio::task::spawn_blocking(move || shoal_netns::run_in(&ns, bind_pair))
                .await
                .map_err(|e| DnsError::Runtime {
                    id: id.to_string(),
                    source: io::Error::other(e),
                })?
                .map_err(|source| DnsError::Netns {
                    id: id.to_string(),
                    netns: netns.to_string(),
                    source,
                })?;
            // A socket this process has just closed (a detach) stays bound while a child
            // that another thread is spawning still holds its copy of the descriptor table
            // (between clone and exec; close-on-exec takes effect only at the exec). On a
            // loaded machine that lasts milliseconds, so a re-attach retries for a while
            // before it reports the address as taken.
            match bound {
                Err(BindError::Socket(_, ref e))
                    if e.kind() == io::ErrorKind::AddrInUse
                        && started.elapsed() < BIND_IN_USE_RETRY =>
                {
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                }
                bound => break bound,
            }
        };
        let (udp, tcp) = bound.map_err(|e| match e {
            BindError::Socket(proto, source) => DnsError::Bind {
                id: id.to_string(),
                netns: netns.to_string(),
                proto,
                addr: LISTEN_ADDR,
                source,
            },
            BindError::Unreachable(source) => DnsError::LoopbackDown {
                id: id.to_string(),
                netns: netns.to_string(),
                source,
            },
        })?;
        let runtime = |source| DnsError::Runtime {
            id: id.to_string(),
            source,
        };
        let udp = UdpSocket::from_std(udp).map_err(runtime)?;
        let tcp = TcpListener::from_std(tcp).map_err(runtime)?;

        let mut table = self.table();
        if table.contains_key(id) {
            return Err(DnsError::AlreadyAttached(id.to_string()));
        }
        let view = Arc::new(ArcSwap::new(records));
        let (stop, stop_rx) = watch::channel(());
        let span = info_span!("dns", container = id, netns);
        let shared = &self.inner.shared;
        let tasks = vec![
            tokio::spawn(
                serve_udp(udp, view.clone(), shared.clone(), stop_rx.clone())
                    .instrument(span.clone()),
            ),
            tokio::spawn(serve_tcp(tcp, view.clone(), shared.clone(), stop_rx).instrument(span)),
        ];
        table.insert(id.to_string(), Attachment { view, stop, tasks });
        info!(container = id, netns, "dns attached");
        Ok(())
    }

    /// Swaps the view atomically: each query is answered from either the old or the new
    /// snapshot, never a mix.
    pub fn update(&self, id: &str, records: Arc<Records>) -> Result<(), DnsError> {
        match self.table().get(id) {
            Some(a) => {
                a.view.store(records);
                Ok(())
            }
            None => Err(DnsError::NotAttached(id.to_string())),
        }
    }

    /// Stops serving `id` and closes its sockets (returns once they are closed). Idempotent.
    pub async fn detach(&self, id: &str) {
        let Some(attachment) = self.table().remove(id) else {
            return;
        };
        let Attachment { stop, tasks, .. } = attachment;
        drop(stop);
        for task in tasks {
            if let Err(e) = task.await {
                warn!(container = id, error = %e, "dns task ended abnormally");
            }
        }
        info!(container = id, "dns detached");
    }

    /// Whether `id`'s listeners still run (None: not attached). A listener whose socket failed
    /// for good has ended: the caller detaches and attaches again.
    pub fn serving(&self, id: &str) -> Option<bool> {
        self.table()
            .get(id)
            .map(|a| a.tasks.iter().all(|t| !t.is_finished()))
    }

    /// Ids of the attached containers, sorted.
    pub fn attached(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.table().keys().cloned().collect();
        ids.sort();
        ids
    }

    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<String, Attachment>> {
        // A panic while holding the lock cannot leave the map inconsistent: keep going.
        self.inner
            .attached
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }
}

/// Why binding inside the namespace failed.
enum BindError {
    Socket(&'static str, io::Error),
    /// Bound, but 127.0.0.11 is not reachable (Linux lets 127/8 be bound with `lo` down).
    Unreachable(io::Error),
}

/// Runs inside the namespace: both sockets, non-blocking, and a check that they can be
/// reached at all.
fn bind_pair() -> Result<(std::net::UdpSocket, std::net::TcpListener), BindError> {
    let udp = std::net::UdpSocket::bind(LISTEN_ADDR).map_err(|e| BindError::Socket("UDP", e))?;
    udp.set_nonblocking(true)
        .map_err(|e| BindError::Socket("UDP", e))?;
    grow_receive_buffer(&udp);
    let tcp = std::net::TcpListener::bind(LISTEN_ADDR).map_err(|e| BindError::Socket("TCP", e))?;
    tcp.set_nonblocking(true)
        .map_err(|e| BindError::Socket("TCP", e))?;
    // A connected UDP socket needs a route: ENETUNREACH when `lo` is down.
    std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|probe| probe.connect(LISTEN_ADDR))
        .map_err(BindError::Unreachable)?;
    Ok((udp, tcp))
}

/// A bigger UDP receive queue than the default (about 200 small datagrams) so that bursts
/// (a client starting many lookups at once) are not dropped. Best effort.
fn grow_receive_buffer(udp: &std::net::UdpSocket) {
    use nix::sys::socket::{setsockopt, sockopt};
    let size = UDP_RECEIVE_BUFFER;
    if let Err(e) = setsockopt(udp, sockopt::RcvBufForce, &size)
        .or_else(|_| setsockopt(udp, sockopt::RcvBuf, &size))
    {
        debug!(error = %e, "could not grow the UDP receive buffer");
    }
}

async fn serve_udp(
    sock: UdpSocket,
    view: Arc<ArcSwap<Records>>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<()>,
) {
    let mut forwards: JoinSet<Option<(Vec<u8>, SocketAddr)>> = JoinSet::new();
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            Some(done) = forwards.join_next(), if !forwards.is_empty() => {
                if let Ok(Some((reply, peer))) = done {
                    send_udp(&sock, &reply, peer).await;
                }
            }
            ready = sock.readable() => {
                if let Err(e) = ready {
                    warn!(error = %e, "udp socket failed");
                    break;
                }
                let fd = sock.as_raw_fd();
                for _ in 0..UDP_BATCHES {
                    let view = view.load();
                    // Latency is counted from the batch's receipt to its reply.
                    let received = Instant::now();
                    let stats = &shared.stats;
                    let served = sock.try_io(Interest::READABLE, || {
                        let n = mmsg::serve_batch(fd, |query, peer, out| {
                            match shared.handler.handle(query, &view, Transport::Udp, out) {
                                Outcome::Reply => {
                                    stats.answered(query, out, received.elapsed());
                                    mmsg::Action::Reply
                                }
                                Outcome::Forward => {
                                    let key = cache_key(query, Transport::Udp);
                                    if let Some(key) = &key
                                        && shared.cache.get(key, query, Instant::now(), out)
                                    {
                                        stats.cache_hits.fetch_add(1, Relaxed);
                                        stats.answered(query, out, received.elapsed());
                                        return mmsg::Action::Reply;
                                    }
                                    let shared = shared.clone();
                                    let query = query.to_vec();
                                    forwards.spawn(async move {
                                        let reply =
                                            forward(&shared, query, Transport::Udp, key, received)
                                                .await?;
                                        Some((reply, peer))
                                    });
                                    mmsg::Action::None
                                }
                                Outcome::Ignore => {
                                    stats.dropped.fetch_add(1, Relaxed);
                                    mmsg::Action::None
                                }
                            }
                        })?;
                        if n < mmsg::BATCH {
                            // A short batch emptied the queue (recvmmsg with MSG_DONTWAIT
                            // stops early only there): tell tokio so, which clears the
                            // readiness now, instead of one more recvmmsg that would return
                            // EAGAIN. Safe against a datagram arriving meanwhile: its epoll
                            // edge sets the readiness again (tokio clears only the readiness
                            // it handed out).
                            return Err(io::ErrorKind::WouldBlock.into());
                        }
                        Ok(n)
                    });
                    match served {
                        Ok(_) => continue,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => {
                            // A pending socket error is reported once; anything that
                            // persists must not turn this loop into a spin.
                            debug!(error = %e, "udp receive");
                            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                        }
                    }
                    break;
                }
            }
        }
    }
    forwards.shutdown().await;
}

async fn send_udp(sock: &UdpSocket, data: &[u8], peer: SocketAddr) {
    let res = match sock.try_send_to(data, peer) {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => sock.send_to(data, peer).await,
        r => r,
    };
    if let Err(e) = res {
        debug!(%peer, error = %e, "udp send");
    }
}

async fn serve_tcp(
    listener: TcpListener,
    view: Arc<ArcSwap<Records>>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<()>,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    conns.spawn(serve_conn(stream, view.clone(), shared.clone()));
                }
                Err(e) => {
                    // Typically EMFILE: back off a little instead of spinning.
                    warn!(error = %e, "tcp accept");
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
            },
        }
    }
    conns.shutdown().await;
}

/// One client TCP connection: length-prefixed queries, each answered as soon as it is
/// ready (RFC 7766 6.2.1.1: local answers and cache hits at once, forwards when their
/// upstream answers, so the order may differ from the queries'). Ends when the client
/// closes (after the pending forwards are answered), sends garbage, a write stalls for
/// `tcp_idle_timeout`, or no query arrives for `tcp_idle_timeout` while no forward is
/// pending.
async fn serve_conn(stream: TcpStream, view: Arc<ArcSwap<Records>>, shared: Arc<Shared>) {
    let _ = stream.set_nodelay(true);
    let idle = shared.config.tcp_idle_timeout;
    let (mut rd, mut wr) = stream.into_split();
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut out = Vec::with_capacity(4096);
    let mut frame = Vec::with_capacity(4096);
    let mut forwards: JoinSet<Option<Vec<u8>>> = JoinSet::new();
    let mut deadline = tokio::time::Instant::now() + idle;
    let mut eof = false;
    loop {
        // Every complete query in the buffer.
        let mut used = 0;
        while let Some(len) = buf
            .get(used..used + 2)
            .map(|l| usize::from(u16::from_be_bytes([l[0], l[1]])))
            && buf.len() >= used + 2 + len
        {
            let query = &buf[used + 2..used + 2 + len];
            used += 2 + len;
            deadline = tokio::time::Instant::now() + idle;
            let received = Instant::now();
            match shared
                .handler
                .handle(query, &view.load(), Transport::Tcp, &mut out)
            {
                Outcome::Reply => shared.stats.answered(query, &out, received.elapsed()),
                Outcome::Ignore => {
                    shared.stats.dropped.fetch_add(1, Relaxed);
                    return;
                }
                Outcome::Forward => {
                    let key = cache_key(query, Transport::Tcp);
                    let hit = key
                        .as_ref()
                        .is_some_and(|k| shared.cache.get(k, query, Instant::now(), &mut out));
                    if !hit {
                        let (shared, query) = (shared.clone(), query.to_vec());
                        forwards.spawn(async move {
                            forward(&shared, query, Transport::Tcp, key, received).await
                        });
                        continue;
                    }
                    shared.stats.cache_hits.fetch_add(1, Relaxed);
                    shared.stats.answered(query, &out, received.elapsed());
                }
            }
            if !write_frame(&mut wr, &out, &mut frame, idle).await {
                return;
            }
        }
        buf.drain(..used);
        if eof && forwards.is_empty() {
            return;
        }
        tokio::select! {
            Some(done) = forwards.join_next(), if !forwards.is_empty() => {
                if let Ok(Some(reply)) = done {
                    if !write_frame(&mut wr, &reply, &mut frame, idle).await {
                        return;
                    }
                    deadline = tokio::time::Instant::now() + idle;
                }
            }
            read = rd.read_buf(&mut buf), if !eof => match read {
                Ok(0) => eof = true,
                Ok(_) => {}
                Err(_) => return,
            },
            _ = tokio::time::sleep_until(deadline), if forwards.is_empty() => return,
        }
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(4096);
        }
    }
}

/// Writes one length-prefixed message; false when it is too large or the write fails or
/// stalls for `idle`.
async fn write_frame(
    wr: &mut tokio::net::tcp::OwnedWriteHalf,
    msg: &[u8],
    frame: &mut Vec<u8>,
    idle: std::time::Duration,
) -> bool {
    let Ok(n) = u16::try_from(msg.len()) else {
        return false;
    };
    frame.clear();
    frame.extend_from_slice(&n.to_be_bytes());
    frame.extend_from_slice(msg);
    matches!(timeout(idle, wr.write_all(frame)).await, Ok(Ok(_)))
}

/// Forwards `query` (as received, with a fresh random id) to the upstreams in order over
/// the client's transport, each with `upstream_timeout`; relays the first answer with the
/// client's id and stores it in the cache (`key`) when it may be cached. All failed:
/// SERVFAIL. `None`: nothing to send.
async fn forward(
    shared: &Shared,
    mut query: Vec<u8>,
    transport: Transport,
    key: Option<CacheKey>,
    received: Instant,
) -> Option<Vec<u8>> {
    let original = query.clone();
    shared.stats.forwarded.fetch_add(1, Relaxed);
    let client_id = [query[0], query[1]];
    // The upstream sees the client's EDNS size: no UDP answer can be larger (a buffer
    // per pending forward, so not 64 KiB each).
    let reply_max = key
        .as_ref()
        .map_or(usize::from(u16::MAX), |k| k.udp_payload);
    for upstream in &shared.config.upstreams {
        let id: u16 = rand::random();
        query[..2].copy_from_slice(&id.to_be_bytes());
        let attempt = async {
            match transport {
                Transport::Udp => exchange_udp(*upstream, &query, reply_max).await,
                Transport::Tcp => exchange_tcp(*upstream, &query).await,
            }
        };
        match timeout(shared.config.upstream_timeout, attempt).await {
            Ok(Ok(mut reply)) => {
                reply[..2].copy_from_slice(&client_id);
                if let Some(key) = &key {
                    shared.cache.insert(key, &reply, Instant::now());
                }
                shared.stats.answered(&original, &reply, received.elapsed());
                return Some(reply);
            }
            Ok(Err(e)) => debug!(%upstream, error = %e, "upstream failed"),
            Err(_) => debug!(%upstream, "upstream timed out"),
        }
        shared.stats.upstream_failures.fetch_add(1, Relaxed);
    }
    let mut out = Vec::new();
    shared.stats.forward_servfail.fetch_add(1, Relaxed);
    let sent = shared.handler.servfail(&original, &mut out);
    if sent {
        shared.stats.answered(&original, &out, received.elapsed());
    }
    sent.then_some(out)
}

fn unspecified_for(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    }
}

/// True when `reply` answers `query`: same id, QR set, and the same question (name compared
/// case-insensitively) — or no question at all in an error reply.
fn is_reply_to(reply: &[u8], query: &[u8]) -> bool {
    let Some(q_end) = question_end(query) else {
        return false;
    };
    if reply.len() < 12 || reply[..2] != query[..2] || reply[2] & 0x80 == 0 {
        return false;
    }
    match reply[4..6] {
        [0, 0] => reply[3] & 0x0F != 0,
        [0, 1] => reply.len() >= q_end && reply[12..q_end].eq_ignore_ascii_case(&query[12..q_end]),
        _ => false,
    }
}

async fn exchange_udp(upstream: SocketAddr, query: &[u8], max: usize) -> io::Result<Vec<u8>> {
    let sock = UdpSocket::bind(unspecified_for(upstream)).await?;
    sock.connect(upstream).await?;
    sock.send(query).await?;
    // One more byte than allowed: a larger datagram is seen as such and ignored.
    let mut buf = vec![0u8; max + 1];
    loop {
        let n = sock.recv(&mut buf).await?;
        if n <= max && is_reply_to(&buf[..n], query) {
            buf.truncate(n);
            return Ok(buf);
        }
    }
}

async fn exchange_tcp(upstream: SocketAddr, query: &[u8]) -> io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(upstream).await?;
    stream.set_nodelay(true)?;
    let len = u16::try_from(query.len()).map_err(io::Error::other)?;
    let mut frame = Vec::with_capacity(query.len() + 2);
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(query);
    stream.write_all(&frame).await?;
    loop {
        let mut len = [0u8; 2];
        stream.read_exact(&mut len).await?;
        let mut reply = vec![0u8; usize::from(u16::from_be_bytes(len))];
        stream.read_exact(&mut reply).await?;
        if is_reply_to(&reply, query) {
            return Ok(reply);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The agent spawns these futures: they must be Send (no lock guard across an await).
    #[test]
    fn control_futures_are_send() {
        fn is_send<T: Send>(_: &T) {}
        let resolver = Resolver::new(DnsConfig::default());
        is_send(&resolver);
        is_send(&resolver.attach("a", "b", Arc::new(Records::empty())));
        is_send(&resolver.detach("a"));
        fn is_sync<T: Sync>() {}
        is_sync::<Resolver>();
        is_sync::<Records>();
    }

    #[test]
    fn replies_must_match_the_query() {
        let mut query = vec![0xAB, 0xCD, 0x01, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        query.extend_from_slice(b"\x03Web\x03com\x00\x00\x01\x00\x01");
        let mut reply = query.clone();
        reply[2] |= 0x80;
        reply.extend_from_slice(&[0xC0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 1, 2, 3, 4]);
        assert!(is_reply_to(&reply, &query));
        let mut lower = reply.clone();
        lower[13] = b'w';
        assert!(is_reply_to(&lower, &query));
        let mut other = reply.clone();
        other[14] = b'x';
        assert!(!is_reply_to(&other, &query));
        let mut wrong_id = reply.clone();
        wrong_id[1] ^= 1;
        assert!(!is_reply_to(&wrong_id, &query));
        assert!(!is_reply_to(&query, &query), "not a response");
        assert!(!is_reply_to(&reply[..20], &query));
        // An error without question is accepted; a NOERROR without question is not.
        let mut formerr = reply[..12].to_vec();
        formerr[5] = 0;
        assert!(!is_reply_to(&formerr, &query));
        formerr[3] = 1;
        assert!(is_reply_to(&formerr, &query));
    }
}
