//! Counters of the resolver, for the agent's `/metrics`: relaxed atomics (a few ns per
//! query), no metrics library in this crate; the agent renders them.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Query types counted by name; everything else is `OTHER`.
pub const QTYPES: [&str; 9] = [
    "A", "AAAA", "SRV", "PTR", "CNAME", "MX", "TXT", "ANY", "OTHER",
];
/// Response codes counted by name (RFC 1035/2136 numbering); everything else is `OTHER`.
pub const RCODES: [&str; 7] = [
    "NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED", "OTHER",
];
/// Upper bounds of the latency buckets, seconds (the last bucket, +Inf, is implicit).
pub const LATENCY_BOUNDS: [f64; 12] = [
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.005, 0.025, 0.1, 0.5, 2.0,
];

/// What the resolver did, since it started.
#[derive(Default)]
pub struct DnsStats {
    /// Answers sent, by query type and response code.
    answers: [[AtomicU64; RCODES.len()]; QTYPES.len()],
    /// Queries dropped without an answer (not a DNS query, truncated, ...).
    pub dropped: AtomicU64,
    /// Queries sent upstream (cache misses of names outside the cluster).
    pub forwarded: AtomicU64,
    /// Upstream attempts that failed or timed out (a query may try several upstreams).
    pub upstream_failures: AtomicU64,
    /// Forwarded queries answered with SERVFAIL because every upstream failed.
    pub forward_servfail: AtomicU64,
    /// Answers from the upstream cache.
    pub cache_hits: AtomicU64,
    latency: [AtomicU64; LATENCY_BOUNDS.len() + 1],
    latency_sum_ns: AtomicU64,
}

/// A read-out of [`DnsStats`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DnsStatsSnapshot {
    /// (qtype, rcode, count) for every non-zero pair.
    pub answers: Vec<(&'static str, &'static str, u64)>,
    pub dropped: u64,
    pub forwarded: u64,
    pub upstream_failures: u64,
    pub forward_servfail: u64,
    pub cache_hits: u64,
    /// Cumulative counts per bucket of `LATENCY_BOUNDS`, then +Inf (= the total).
    pub latency_buckets: Vec<u64>,
    pub latency_sum: Duration,
}

fn qtype_index(qtype: u16) -> usize {
    match qtype {
        1 => 0,
        28 => 1,
        33 => 2,
        12 => 3,
        5 => 4,
        15 => 5,
        16 => 6,
        255 => 7,
        _ => 8,
    }
}

/// The query type of a query (0 when it has no complete question).
pub(crate) fn qtype_of(query: &[u8]) -> u16 {
    match crate::handler::question_end(query) {
        Some(end) if end >= 4 && query.len() >= end => {
            u16::from_be_bytes([query[end - 4], query[end - 3]])
        }
        _ => 0,
    }
}

impl DnsStats {
    /// One answer sent for `query` (`reply` is what went out) after `took`.
    pub fn answered(&self, query: &[u8], reply: &[u8], took: Duration) {
        let q = qtype_index(qtype_of(query));
        let r = reply.get(3).map_or(RCODES.len() - 1, |b| {
            usize::from(b & 0x0F).min(RCODES.len() - 1)
        });
        self.answers[q][r].fetch_add(1, Relaxed);
        let secs = took.as_secs_f64();
        let b = LATENCY_BOUNDS
            .iter()
            .position(|&bound| secs <= bound)
            .unwrap_or(LATENCY_BOUNDS.len());
        self.latency[b].fetch_add(1, Relaxed);
        self.latency_sum_ns
            .fetch_add(u64::try_from(took.as_nanos()).unwrap_or(u64::MAX), Relaxed);
    }

    pub fn snapshot(&self) -> DnsStatsSnapshot {
        let mut answers = vec![];
        for (qi, row) in self.answers.iter().enumerate() {
            for (ri, c) in row.iter().enumerate() {
                let n = c.load(Relaxed);
                if n > 0 {
                    answers.push((QTYPES[qi], RCODES[ri], n));
                }
            }
        }
        let mut acc = 0;
        let latency_buckets = self
            .latency
            .iter()
            .map(|c| {
                acc += c.load(Relaxed);
                acc
            })
            .collect();
        DnsStatsSnapshot {
            answers,
            dropped: self.dropped.load(Relaxed),
            forwarded: self.forwarded.load(Relaxed),
            upstream_failures: self.upstream_failures.load(Relaxed),
            forward_servfail: self.forward_servfail.load(Relaxed),
            cache_hits: self.cache_hits.load(Relaxed),
            latency_buckets,
            latency_sum: Duration::from_nanos(self.latency_sum_ns.load(Relaxed)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_type_rcode_and_bucket() {
        let s = DnsStats::default();
        // Query for "a." type AAAA; reply with NXDOMAIN.
        let mut q = vec![
            0u8, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, b'a', 0, 0, 28, 0, 1,
        ];
        let mut r = q.clone();
        r[2] = 0x81;
        r[3] = 0x83;
        s.answered(&q, &r, Duration::from_micros(30));
        q[16] = 1; // type A
        r[3] = 0x80;
        s.answered(&q, &r, Duration::from_secs(3));
        let snap = s.snapshot();
        assert_eq!(
            snap.answers,
            vec![("A", "NOERROR", 1), ("AAAA", "NXDOMAIN", 1)]
        );
        // 30 us falls in the 50 us bucket (index 2); 3 s only in +Inf.
        assert_eq!(snap.latency_buckets[1], 0);
        assert_eq!(snap.latency_buckets[2], 1);
        assert_eq!(snap.latency_buckets[LATENCY_BOUNDS.len() - 1], 1);
        assert_eq!(snap.latency_buckets[LATENCY_BOUNDS.len()], 2);
        assert_eq!(
            snap.latency_sum,
            Duration::from_micros(30) + Duration::from_secs(3)
        );
        // A query without a complete question counts as OTHER.
        s.answered(&[0, 1, 1, 0], &[0, 1, 0x81, 0x81], Duration::ZERO);
        assert!(s.snapshot().answers.contains(&("OTHER", "FORMERR", 1)));
    }
}
