//! The etcd v3 backend (etcd-client).
//!
//! Mapping of the store contract onto etcd:
//! - [`Compare::Absent`] is `create_revision == 0`; [`Compare::ModRevision`] is
//!   `mod_revision == r` (plus `create_revision > 0` when `r <= 0`, because etcd compares
//!   an absent key's `mod_revision` as 0 and the contract says the key must exist).
//! - [`Op::DeletePrefix`] is a range delete with the prefix's range end.
//! - `watch(prefix, after)` is a prefix watch with `start_revision = after + 1`; a watch
//!   canceled for compaction yields [`StoreError::Compacted`], any other cancel or a
//!   broken stream yields [`StoreError::Unavailable`]; after an error item the stream ends.
//! - Errors reaching etcd (refused, timed out, no leader) are [`StoreError::Unavailable`]
//!   with the cause; requests etcd rejects are [`StoreError::Io`].
//!
//! Every unary request is bounded by [`EtcdOptions::request_timeout`] (in tonic and again
//! around the call), so an unreachable etcd fails requests within seconds instead of
//! hanging. Watch streams are kept healthy by HTTP/2 keep-alive pings: a dead connection
//! ends the stream with an error within `keep_alive_interval + keep_alive_timeout`.
//! Requests that may safely be sent twice (reads, lease refresh and revoke, leader,
//! opening a watch) are sent once more when the connection broke under them; writes are not.
//!
//! Leases and election:
//! - `grant_lease` / `revoke_lease` are the lease RPCs (revoking an unknown lease is Ok);
//!   [`Op::PutLeased`] is a put with `PutOptions::with_lease`. A transaction etcd rejects
//!   with "requested lease not found" is [`StoreError::LeaseExpired`] (naming the first
//!   lease of its writes).
//! - `keep_alive` opens a keep-alive stream, which sends one refresh and reads its answer
//!   (TTL 0 = lease gone = [`StoreError::LeaseExpired`]), and closes it again: one
//!   refresh per call, bounded like every request.
//! - `campaign`, `leader`, `resign` are the v3election RPCs. Campaign waits for
//!   leadership, so it runs on a second connection without the per-request timeout (the
//!   timeout is per channel in tonic); HTTP/2 keep-alive still breaks it when etcd is
//!   unreachable. While it waits, a watch on the candidate's own key ends it with
//!   [`StoreError::LeaseExpired`] when the lease expires (etcd's Campaign would otherwise
//!   keep waiting, then report a leadership whose key is gone). Dropping the campaign
//!   future cancels the RPC, and etcd deletes the candidate key.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Client, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions, LeaderKey, PutOptions,
    ResignOptions, SortOrder, SortTarget, Txn, TxnOp, WatchOptions, WatchStream,
};
use futures::StreamExt;
use futures::stream::{self, BoxStream};

use super::{
    Compare, Event, KeyValue, Leadership, LeaseId, Op, Result, Snapshot, Store, StoreError,
    TxnResult, candidate_key, ttl_secs,
};

/// Largest `list` answer accepted (tonic's default is 4 MiB).
const MAX_LIST_BYTES: usize = 64 * 1024 * 1024;

/// Connection tuning of an [`EtcdStore`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EtcdOptions {
    /// Upper bound of every unary request (get, list, txn, opening a watch).
    pub request_timeout: Duration,
    /// Upper bound of establishing a TCP/HTTP2 connection to an endpoint.
    pub connect_timeout: Duration,
    /// HTTP/2 keep-alive ping interval (also while idle).
    pub keep_alive_interval: Duration,
    /// How long a keep-alive ping may go unanswered before the connection is dropped.
    pub keep_alive_timeout: Duration,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(3),
            keep_alive_interval: Duration::from_secs(10),
            keep_alive_timeout: Duration::from_secs(5),
        }
    }
}

/// The store on an etcd v3 cluster. Cheap to clone (one shared connection).
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    /// Same endpoints without the per-request timeout: for campaigns, which wait.
    campaign_client: Client,
    endpoints: Vec<String>,
    opts: EtcdOptions,
}

impl fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.endpoints)
            .field("opts", &self.opts)
            .finish()
    }
}

impl EtcdStore {
    /// Connects to etcd at `endpoints` (`http://host:port` or `host:port`) and checks
    /// that it answers (and has a leader) within `opts.request_timeout`.
    pub async fn connect(endpoints: &[String], opts: EtcdOptions) -> Result<Self> {
        Self::connect_tls(endpoints, opts, None).await
    }

    /// [`connect`](Self::connect) over TLS with a client certificate when `tls` is given
    /// (endpoints then `https://host:port` or bare `host:port`).
    pub async fn connect_tls(
        endpoints: &[String],
        opts: EtcdOptions,
        tls: Option<etcd_client::TlsOptions>,
    ) -> Result<Self> {
        if endpoints.is_empty() {
            return Err(StoreError::unavailable("no etcd endpoints given"));
        }
        let mut copts = ConnectOptions::new()
            .with_connect_timeout(opts.connect_timeout)
            .with_keep_alive(opts.keep_alive_interval, opts.keep_alive_timeout)
            .with_keep_alive_while_idle(true)
            .with_require_leader(true);
        if let Some(tls) = tls {
            copts = copts.with_tls(tls);
        }
        let endpoints = endpoints.to_vec();
        let client = bounded(
            &endpoints,
            opts.request_timeout,
            "connect",
            Client::connect(
                &endpoints,
                Some(copts.clone().with_timeout(opts.request_timeout)),
            ),
        )
        .await?;
        let campaign_client = bounded(
            &endpoints,
            opts.request_timeout,
            "connect",
            Client::connect(&endpoints, Some(copts)),
        )
        .await?;
        let store = Self {
            client,
            campaign_client,
            endpoints,
            opts,
        };
        // The channel connects lazily: make one request so a wrong address fails here.
        store
            .call("status", store.client.maintenance_client().status())
            .await?;
        Ok(store)
    }

    /// The underlying client, for features outside the [`Store`] contract (leases).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The endpoints this store was connected to.
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    async fn call_raw<T>(
        &self,
        what: &str,
        fut: impl Future<Output = std::result::Result<T, etcd_client::Error>>,
    ) -> Result<std::result::Result<T, etcd_client::Error>> {
        bounded_raw(&self.endpoints, self.opts.request_timeout, what, fut).await
    }

    /// Waits for the deletion of `key` (a watch from `after`): the candidate's lease ended.
    async fn await_deleted(&self, key: &str, lease: LeaseId, after: i64) -> StoreError {
        let mut events = match self.watch(key, after).await {
            Ok(w) => w,
            Err(e) => return e,
        };
        while let Some(ev) = events.next().await {
            match ev {
                Ok(Event::Delete { key: k, .. }) if k == key => {
                    return StoreError::LeaseExpired(lease);
                }
                Ok(_) => {}
                Err(e) => return e,
            }
        }
        StoreError::unavailable(format!("etcd watch on campaign key {key:?} ended"))
    }

    async fn call<T>(
        &self,
        what: &str,
        fut: impl Future<Output = std::result::Result<T, etcd_client::Error>>,
    ) -> Result<T> {
        bounded(&self.endpoints, self.opts.request_timeout, what, fut).await
    }

    /// [`call_raw`](Self::call_raw) for a request that may be sent twice (reads, lease
    /// refreshes, opening a watch): when the connection broke under it (or had broken
    /// before it and tonic handed over that error), it is sent once more, on the new
    /// connection tonic makes. The typical case is etcd stalled for a moment: the HTTP/2
    /// keep-alive declares the connection dead just as etcd resumes. Writes are not
    /// retried here; their callers decide.
    async fn call_idempotent_raw<T, F, Fut>(
        &self,
        what: &str,
        mut request: F,
    ) -> Result<std::result::Result<T, etcd_client::Error>>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        match self.call_raw(what, request()).await? {
            Err(e) if is_broken_connection(&e) => {
                tracing::debug!(what, error = %chain(&e), "etcd connection broke; sending again");
                self.call_raw(what, request()).await
            }
            done => Ok(done),
        }
    }

    async fn call_idempotent<T, F, Fut>(&self, what: &str, request: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        self.call_idempotent_raw(what, request)
            .await?
            .map_err(|e| map_err(&self.endpoints, what, e))
    }
}

/// The client's connection failed (a transport error, which tonic reports as UNAVAILABLE
/// with the cause attached), as opposed to an answer from etcd (its own UNAVAILABLE, such
/// as "no leader", carries no cause) or a deadline.
fn is_broken_connection(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => {
            i32::from(s.code()) == 14 && std::error::Error::source(s).is_some()
        }
        etcd_client::Error::TransportError(_) => true,
        _ => false,
    }
}

/// Runs one etcd request with a hard deadline (tonic's own timeout does not cover waiting
/// for a connection in every case) and maps its error.
async fn bounded<T>(
    endpoints: &[String],
    timeout: Duration,
    what: &str,
    fut: impl Future<Output = std::result::Result<T, etcd_client::Error>>,
) -> Result<T> {
    bounded_raw(endpoints, timeout, what, fut)
        .await?
        .map_err(|e| map_err(endpoints, what, e))
}

/// [`bounded`] leaving etcd's error unmapped (only the deadline is a [`StoreError`]).
async fn bounded_raw<T>(
    endpoints: &[String],
    timeout: Duration,
    what: &str,
    fut: impl Future<Output = std::result::Result<T, etcd_client::Error>>,
) -> Result<std::result::Result<T, etcd_client::Error>> {
    // A little slack so that tonic's own timeout, with its better message, fires first.
    tokio::time::timeout(timeout + Duration::from_millis(500), fut)
        .await
        .map_err(|_| {
            StoreError::unavailable(format!(
                "etcd {what} at {}: no answer within {timeout:?}",
                endpoints.join(",")
            ))
        })
}

/// etcd's "requested lease not found": gRPC NOT_FOUND from the KV and lease services,
/// UNKNOWN with the same text when the election service passes it on.
fn is_lease_not_found(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => {
            matches!(i32::from(s.code()), 2 | 5)
                && s.message().contains("requested lease not found")
        }
        // etcd-client's keep_alive on an answer with TTL 0.
        etcd_client::Error::LeaseKeepAliveError(m) => m.contains("not found"),
        _ => false,
    }
}

/// The election server's "election: no leader" (a plain error: gRPC UNKNOWN).
fn is_no_leader(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s) if s.message().contains("election: no leader"))
}

/// The error with its chain of causes, on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

fn map_err(endpoints: &[String], what: &str, e: etcd_client::Error) -> StoreError {
    use etcd_client::Error as E;
    // gRPC status codes (tonic is not a direct dependency): CANCELLED, UNKNOWN,
    // DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, ABORTED, INTERNAL, UNAVAILABLE.
    const TRANSIENT: [i32; 7] = [1, 2, 4, 8, 10, 13, 14];
    let at = endpoints.join(",");
    match &e {
        E::GRpcStatus(s) => {
            let text = format!("etcd {what} at {at}: {:?}: {}", s.code(), s.message());
            let text = match std::error::Error::source(s) {
                Some(src) => format!("{text}: {}", chain(src)),
                None => text,
            };
            if TRANSIENT.contains(&i32::from(s.code())) {
                StoreError::unavailable(text)
            } else {
                StoreError::io(text)
            }
        }
        // The etcd client's error is kept as the source (and its chain in the message).
        E::TransportError(_) | E::IoError(_) | E::EndpointError(_) | E::WatchError(_) => {
            StoreError::unavailable_because(format!("etcd {what} at {at}"), e)
        }
        _ => StoreError::io_because(format!("etcd {what} at {at}"), e),
    }
}

fn utf8_key(key: &[u8]) -> Result<String> {
    String::from_utf8(key.to_vec())
        .map_err(|_| StoreError::corrupt(format!("etcd key is not UTF-8: {key:?}")))
}

fn convert_kv(kv: &etcd_client::KeyValue) -> Result<KeyValue> {
    Ok(KeyValue {
        key: utf8_key(kv.key())?,
        value: kv.value().to_vec(),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
    })
}

fn convert_event(ev: &etcd_client::Event) -> Result<Event> {
    let kv = ev
        .kv()
        .ok_or_else(|| StoreError::corrupt("etcd watch event without key"))?;
    Ok(match ev.event_type() {
        EventType::Put => Event::Put(convert_kv(kv)?),
        EventType::Delete => Event::Delete {
            key: utf8_key(kv.key())?,
            mod_revision: kv.mod_revision(),
        },
    })
}

fn to_etcd_compare(c: Compare) -> Vec<etcd_client::Compare> {
    match c {
        Compare::Absent(k) => vec![etcd_client::Compare::create_revision(
            k,
            CompareOp::Equal,
            0,
        )],
        Compare::ModRevision(k, r) if r <= 0 => vec![
            etcd_client::Compare::create_revision(k.clone(), CompareOp::Greater, 0),
            etcd_client::Compare::mod_revision(k, CompareOp::Equal, r),
        ],
        Compare::ModRevision(k, r) => {
            vec![etcd_client::Compare::mod_revision(k, CompareOp::Equal, r)]
        }
    }
}

fn to_etcd_op(op: Op) -> TxnOp {
    match op {
        Op::Put(k, v) => TxnOp::put(k, v, None),
        Op::PutLeased(k, v, lease) => TxnOp::put(k, v, Some(PutOptions::new().with_lease(lease))),
        Op::Delete(k) => TxnOp::delete(k, None),
        Op::DeletePrefix(p) => TxnOp::delete(p, Some(DeleteOptions::new().with_prefix())),
    }
}

fn header_revision(h: Option<&etcd_client::ResponseHeader>) -> Result<i64> {
    h.map(|h| h.revision())
        .ok_or_else(|| StoreError::corrupt("etcd response without header"))
}

#[async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let resp = self
            .call_idempotent("get", || {
                let mut kv = self.client.kv_client();
                async move { kv.get(key, None).await }
            })
            .await?;
        resp.kvs().first().map(convert_kv).transpose()
    }

    async fn list(&self, prefix: &str) -> Result<Snapshot> {
        let opts = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Key, SortOrder::Ascend);
        let resp = self
            .call_idempotent("list", || {
                let mut kv = self
                    .client
                    .kv_client()
                    .max_decoding_message_size(MAX_LIST_BYTES);
                let opts = opts.clone();
                async move { kv.get(prefix, Some(opts)).await }
            })
            .await?;
        let kvs = resp.kvs().iter().map(convert_kv).collect::<Result<_>>()?;
        Ok(Snapshot {
            kvs,
            revision: header_revision(resp.header())?,
        })
    }

    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<TxnResult> {
        let cmps: Vec<_> = compares.into_iter().flat_map(to_etcd_compare).collect();
        let lease = ops.iter().find_map(|op| match op {
            Op::PutLeased(_, _, id) => Some(*id),
            _ => None,
        });
        let ops: Vec<_> = ops.into_iter().map(to_etcd_op).collect();
        let txn = Txn::new().when(cmps).and_then(ops);
        let resp = match self
            .call_raw("txn", self.client.kv_client().txn(txn))
            .await?
        {
            Ok(resp) => resp,
            Err(e) => match lease {
                Some(id) if is_lease_not_found(&e) => return Err(StoreError::LeaseExpired(id)),
                _ => return Err(map_err(&self.endpoints, "txn", e)),
            },
        };
        Ok(TxnResult {
            succeeded: resp.succeeded(),
            revision: header_revision(resp.header())?,
        })
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        let resp = self
            .call(
                "lease grant",
                self.client.lease_client().grant(ttl_secs(ttl), None),
            )
            .await?;
        if !resp.error().is_empty() {
            return Err(StoreError::io(format!(
                "etcd lease grant at {}: {}",
                self.endpoints.join(","),
                resp.error()
            )));
        }
        tracing::debug!(lease = resp.id(), ttl = resp.ttl(), "etcd lease granted");
        Ok(resp.id())
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<()> {
        // etcd-client's keep_alive sends the first refresh and reads its answer (an answer
        // with TTL 0 is its "lease not found" error); the stream closes when dropped.
        match self
            .call_idempotent_raw("lease keep-alive", || {
                let mut lc = self.client.lease_client();
                async move { lc.keep_alive(lease).await }
            })
            .await?
        {
            Ok((_keeper, _stream)) => Ok(()),
            Err(e) if is_lease_not_found(&e) => Err(StoreError::LeaseExpired(lease)),
            Err(e) => Err(map_err(&self.endpoints, "lease keep-alive", e)),
        }
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        let revoke = || {
            let mut lc = self.client.lease_client();
            async move { lc.revoke(lease).await }
        };
        match self.call_idempotent_raw("lease revoke", revoke).await? {
            Ok(_) => Ok(()),
            Err(e) if is_lease_not_found(&e) => Ok(()),
            Err(e) => Err(map_err(&self.endpoints, "lease revoke", e)),
        }
    }

    async fn campaign(&self, election: &str, value: &str, lease: LeaseId) -> Result<Leadership> {
        let key = candidate_key(election, lease);
        let start = self
            .call_idempotent("get", || {
                let mut kv = self.client.kv_client();
                let key = key.clone();
                async move { kv.get(key, None).await }
            })
            .await?;
        let start = header_revision(start.header())?;
        let mut ec = self.campaign_client.election_client();
        let campaign = ec.campaign(election, value, lease);
        let resp = tokio::select! {
            r = campaign => match r {
                Ok(resp) => resp,
                Err(e) if is_lease_not_found(&e) => return Err(StoreError::LeaseExpired(lease)),
                Err(e) => return Err(map_err(&self.endpoints, "campaign", e)),
            },
            e = self.await_deleted(&key, lease, start) => return Err(e),
        };
        let leader = resp
            .leader()
            .ok_or_else(|| StoreError::corrupt("etcd campaign answer without leader key"))?;
        let won_key = utf8_key(leader.key())?;
        let rev = leader.rev();
        // etcd reports a won campaign even if the key expired while it waited.
        match self.get(&won_key).await? {
            Some(kv) if kv.create_revision == rev => {}
            _ => return Err(StoreError::LeaseExpired(lease)),
        }
        Ok(Leadership::new(election, won_key, rev, lease))
    }

    async fn leader(&self, election: &str) -> Result<Option<String>> {
        let leader = || {
            let mut ec = self.client.election_client();
            async move { ec.leader(election).await }
        };
        match self.call_idempotent_raw("leader", leader).await? {
            Ok(resp) => resp
                .kv()
                .map(|kv| {
                    String::from_utf8(kv.value().to_vec()).map_err(|_| {
                        StoreError::corrupt(format!(
                            "leader value of {:?} is not UTF-8",
                            String::from_utf8_lossy(kv.key())
                        ))
                    })
                })
                .transpose(),
            Err(e) if is_no_leader(&e) => Ok(None),
            Err(e) => Err(map_err(&self.endpoints, "leader", e)),
        }
    }

    async fn resign(&self, leadership: &Leadership) -> Result<()> {
        let key = LeaderKey::new()
            .with_name(leadership.election())
            .with_key(leadership.key())
            .with_rev(leadership.revision())
            .with_lease(leadership.lease());
        let mut ec = self.client.election_client();
        self.call(
            "resign",
            ec.resign(Some(ResignOptions::new().with_leader(key))),
        )
        .await?;
        Ok(())
    }

    async fn watch(
        &self,
        prefix: &str,
        after_revision: i64,
    ) -> Result<BoxStream<'static, Result<Event>>> {
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(after_revision + 1);
        let ws = self
            .call_idempotent("watch", || {
                let mut wc = self.client.watch_client();
                let opts = opts.clone();
                async move { wc.watch(prefix, Some(opts)).await }
            })
            .await?;
        let st = EtcdWatch {
            ws,
            pending: VecDeque::new(),
            last: after_revision,
            endpoints: self.endpoints.clone(),
            prefix: prefix.to_string(),
            done: false,
        };
        Ok(stream::unfold(st, |mut st| async move {
            let item = st.next().await?;
            Some((item, st))
        })
        .boxed())
    }
}

struct EtcdWatch {
    /// Holds the request sender too: dropping it cancels the watch on the server.
    ws: WatchStream,
    pending: VecDeque<Event>,
    /// Revision of the last event delivered (or the watch's start).
    last: i64,
    endpoints: Vec<String>,
    prefix: String,
    done: bool,
}

impl EtcdWatch {
    fn fail(&mut self, e: StoreError) -> Option<Result<Event>> {
        self.done = true;
        self.pending.clear();
        Some(Err(e))
    }

    async fn next(&mut self) -> Option<Result<Event>> {
        loop {
            if let Some(e) = self.pending.pop_front() {
                self.last = e.revision();
                return Some(Ok(e));
            }
            if self.done {
                return None;
            }
            match self.ws.message().await {
                Ok(Some(resp)) => {
                    if resp.compact_revision() > 0 {
                        tracing::debug!(
                            prefix = %self.prefix,
                            compact_revision = resp.compact_revision(),
                            "etcd watch compacted"
                        );
                        return self.fail(StoreError::Compacted(self.last));
                    }
                    if resp.canceled() {
                        let e = StoreError::unavailable(format!(
                            "etcd at {} canceled the watch on {:?}: {}",
                            self.endpoints.join(","),
                            self.prefix,
                            resp.cancel_reason()
                        ));
                        return self.fail(e);
                    }
                    for ev in resp.events() {
                        match convert_event(ev) {
                            Ok(e) => self.pending.push_back(e),
                            Err(e) => return self.fail(e),
                        }
                    }
                }
                Ok(None) => {
                    let e = StoreError::unavailable(format!(
                        "etcd at {} closed the watch on {:?}",
                        self.endpoints.join(","),
                        self.prefix
                    ));
                    return self.fail(e);
                }
                Err(e) => {
                    let e = map_err(&self.endpoints, "watch", e);
                    return self.fail(e);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mod_revision_zero_requires_existence() {
        assert_eq!(
            to_etcd_compare(Compare::ModRevision("k".into(), 0)).len(),
            2
        );
        assert_eq!(
            to_etcd_compare(Compare::ModRevision("k".into(), 7)).len(),
            1
        );
        assert_eq!(to_etcd_compare(Compare::Absent("k".into())).len(), 1);
    }
}
