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
//!
//! Leases (TTL keys for node liveness) are meant to be added here: the client is held as
//! a cloneable handle ([`EtcdStore::client`]) so lease grant / keep-alive tasks can share
//! the connection.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Client, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions, SortOrder, SortTarget,
    Txn, TxnOp, WatchOptions, WatchStream,
};
use futures::StreamExt;
use futures::stream::{self, BoxStream};

use super::{Compare, Event, KeyValue, Op, Result, Snapshot, Store, StoreError, TxnResult};

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
        if endpoints.is_empty() {
            return Err(StoreError::Unavailable("no etcd endpoints given".into()));
        }
        let copts = ConnectOptions::new()
            .with_timeout(opts.request_timeout)
            .with_connect_timeout(opts.connect_timeout)
            .with_keep_alive(opts.keep_alive_interval, opts.keep_alive_timeout)
            .with_keep_alive_while_idle(true)
            .with_require_leader(true);
        let endpoints = endpoints.to_vec();
        let client = bounded(
            &endpoints,
            opts.request_timeout,
            "connect",
            Client::connect(&endpoints, Some(copts)),
        )
        .await?;
        let store = Self {
            client,
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

    async fn call<T>(
        &self,
        what: &str,
        fut: impl Future<Output = std::result::Result<T, etcd_client::Error>>,
    ) -> Result<T> {
        bounded(&self.endpoints, self.opts.request_timeout, what, fut).await
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
    // A little slack so that tonic's own timeout, with its better message, fires first.
    match tokio::time::timeout(timeout + Duration::from_millis(500), fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(map_err(endpoints, what, e)),
        Err(_) => Err(StoreError::Unavailable(format!(
            "etcd {what} at {}: no answer within {timeout:?}",
            endpoints.join(",")
        ))),
    }
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
                StoreError::Unavailable(text)
            } else {
                StoreError::Io(text)
            }
        }
        E::TransportError(_) | E::IoError(_) | E::EndpointError(_) | E::WatchError(_) => {
            StoreError::Unavailable(format!("etcd {what} at {at}: {}", chain(&e)))
        }
        _ => StoreError::Io(format!("etcd {what} at {at}: {}", chain(&e))),
    }
}

fn utf8_key(key: &[u8]) -> Result<String> {
    String::from_utf8(key.to_vec())
        .map_err(|_| StoreError::Corrupt(format!("etcd key is not UTF-8: {key:?}")))
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
        .ok_or_else(|| StoreError::Corrupt("etcd watch event without key".into()))?;
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
        Op::Delete(k) => TxnOp::delete(k, None),
        Op::DeletePrefix(p) => TxnOp::delete(p, Some(DeleteOptions::new().with_prefix())),
    }
}

fn header_revision(h: Option<&etcd_client::ResponseHeader>) -> Result<i64> {
    h.map(|h| h.revision())
        .ok_or_else(|| StoreError::Corrupt("etcd response without header".into()))
}

#[async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let resp = self
            .call("get", self.client.kv_client().get(key, None))
            .await?;
        resp.kvs().first().map(convert_kv).transpose()
    }

    async fn list(&self, prefix: &str) -> Result<Snapshot> {
        let opts = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Key, SortOrder::Ascend);
        let resp = self
            .call(
                "list",
                self.client
                    .kv_client()
                    .max_decoding_message_size(MAX_LIST_BYTES)
                    .get(prefix, Some(opts)),
            )
            .await?;
        let kvs = resp.kvs().iter().map(convert_kv).collect::<Result<_>>()?;
        Ok(Snapshot {
            kvs,
            revision: header_revision(resp.header())?,
        })
    }

    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<TxnResult> {
        let cmps: Vec<_> = compares.into_iter().flat_map(to_etcd_compare).collect();
        let ops: Vec<_> = ops.into_iter().map(to_etcd_op).collect();
        let txn = Txn::new().when(cmps).and_then(ops);
        let resp = self.call("txn", self.client.kv_client().txn(txn)).await?;
        Ok(TxnResult {
            succeeded: resp.succeeded(),
            revision: header_revision(resp.header())?,
        })
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
            .call(
                "watch",
                self.client.watch_client().watch(prefix, Some(opts)),
            )
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
                        let e = StoreError::Unavailable(format!(
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
                    let e = StoreError::Unavailable(format!(
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
