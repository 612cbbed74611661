//! The immutable lookup snapshot served to one container ([`Records`]) and its builder.
//!
//! Keys are names normalised once, at build time: ASCII lowercase, labels joined by `.`,
//! no trailing dot. The query path converts the wire name into the same form in a stack
//! buffer, so a lookup allocates nothing.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;

/// A records for one name.
#[derive(Debug, Clone, Default)]
pub(crate) struct AEntry {
    pub(crate) ips: Vec<Ipv4Addr>,
    /// Answer order randomised per query.
    pub(crate) shuffle: bool,
}

/// One SRV target: its name in wire form (uncompressed, absolute) and normal form (to find
/// its A records), and the port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SrvTarget {
    pub(crate) wire: Box<[u8]>,
    pub(crate) key: Box<[u8]>,
    pub(crate) port: u16,
}

/// Immutable lookup snapshot for one container's view: A records by name, PTR records by
/// address, SRV records by name, and whether names outside the view may be forwarded
/// upstream.
#[derive(Debug, Clone, Default)]
pub struct Records {
    pub(crate) a: HashMap<Box<[u8]>, AEntry>,
    /// PTR targets per address, each already in wire form (uncompressed labels).
    pub(crate) ptr: HashMap<Ipv4Addr, Vec<Box<[u8]>>>,
    /// SRV targets per name (`_80._tcp.web`), in insertion order.
    pub(crate) srv: HashMap<Box<[u8]>, Vec<SrvTarget>>,
    /// Every proper ancestor (but the root) of the view's names, reverse names included:
    /// the empty non-terminals of the zone (`abc` and `1.abc` for `web.1.abc`), which exist
    /// without records of their own (NODATA, not NXDOMAIN: RFC 8020). May hold names that
    /// have records too; those are found first. Filled by [`RecordsBuilder::build`].
    pub(crate) ents: HashSet<Box<[u8]>>,
    pub(crate) forward: bool,
}

impl Records {
    /// Starts a builder. Forwarding is allowed unless [`RecordsBuilder::forward`] says otherwise.
    pub fn builder() -> RecordsBuilder {
        RecordsBuilder {
            records: Records {
                forward: true,
                ..Records::default()
            },
        }
    }

    /// A view with no names that still forwards (when upstreams are configured).
    pub fn empty() -> Self {
        Records::builder().build()
    }

    /// True when queries for names outside the view may be forwarded upstream.
    pub fn forward_allowed(&self) -> bool {
        self.forward
    }

    /// Number of names with A records.
    pub fn len(&self) -> usize {
        self.a.len()
    }

    /// True when the view has no A, PTR or SRV records.
    pub fn is_empty(&self) -> bool {
        self.a.is_empty() && self.ptr.is_empty() && self.srv.is_empty()
    }

    /// The SRV targets of `name` (any case, with or without trailing dot) as (target name
    /// without trailing dot, port), in insertion order.
    pub fn lookup_srv(&self, name: &str) -> Option<Vec<(String, u16)>> {
        let key = normalise(name)?;
        self.srv.get(key.as_bytes()).map(|targets| {
            targets
                .iter()
                .map(|t| (String::from_utf8_lossy(&t.key).into_owned(), t.port))
                .collect()
        })
    }

    /// The A records of `name` (any case, with or without trailing dot), in insertion order.
    pub fn lookup_a(&self, name: &str) -> Option<&[Ipv4Addr]> {
        let key = normalise(name)?;
        self.a.get(key.as_bytes()).map(|e| e.ips.as_slice())
    }
}

/// Builds a [`Records`] snapshot. Invalid names are skipped with a warning.
#[derive(Debug, Clone)]
pub struct RecordsBuilder {
    records: Records,
}

impl RecordsBuilder {
    /// Adds A records for `name` (case-insensitive; with or without trailing dot). Calling
    /// twice appends (duplicate addresses are kept once). `shuffle`: the answer order is
    /// randomised per query (`tasks.SVC`); the name is shuffled if any call asked for it.
    pub fn a(&mut self, name: &str, ips: &[Ipv4Addr], shuffle: bool) -> &mut Self {
        let Some(key) = normalise(name) else {
            tracing::warn!(name, "skipping A records for an invalid DNS name");
            return self;
        };
        let entry = self.records.a.entry(key.into_bytes().into_boxed_slice());
        let entry = match entry {
            Entry::Occupied(o) => o.into_mut(),
            Entry::Vacant(v) => v.insert(AEntry::default()),
        };
        entry.shuffle |= shuffle;
        for ip in ips {
            if !entry.ips.contains(ip) {
                entry.ips.push(*ip);
            }
        }
        self
    }

    /// Adds a PTR record `d.c.b.a.in-addr.arpa -> name`. Several names per address append.
    pub fn ptr(&mut self, ip: Ipv4Addr, name: &str) -> &mut Self {
        let Some(key) = normalise(name) else {
            tracing::warn!(name, %ip, "skipping a PTR record with an invalid DNS name");
            return self;
        };
        let wire = to_wire(&key);
        let names = self.records.ptr.entry(ip).or_default();
        if !names.contains(&wire) {
            names.push(wire);
        }
        self
    }

    /// Adds SRV records for `name` (e.g. `_80._tcp.web`): one per (target host name, port),
    /// priority 0 and equal weight. Calling twice appends (duplicate pairs kept once);
    /// invalid target names are skipped with a warning. Answers carry, in the additional
    /// section, the A records this view has for the targets (names added with
    /// [`RecordsBuilder::a`]).
    pub fn srv(&mut self, name: &str, targets: &[(String, u16)]) -> &mut Self {
        let Some(key) = normalise(name) else {
            tracing::warn!(name, "skipping SRV records for an invalid DNS name");
            return self;
        };
        let entry = self
            .records
            .srv
            .entry(key.into_bytes().into_boxed_slice())
            .or_default();
        for (target, port) in targets {
            let Some(tkey) = normalise(target) else {
                tracing::warn!(
                    name,
                    target,
                    "skipping an SRV target with an invalid DNS name"
                );
                continue;
            };
            let t = SrvTarget {
                wire: to_wire(&tkey),
                key: tkey.into_bytes().into_boxed_slice(),
                port: *port,
            };
            if !entry.contains(&t) {
                entry.push(t);
            }
        }
        self
    }

    /// `false`: never forward names outside the view (internal-only containers).
    pub fn forward(&mut self, allowed: bool) -> &mut Self {
        self.records.forward = allowed;
        self
    }

    /// The snapshot (the builder stays usable).
    pub fn build(&self) -> Records {
        let mut records = self.records.clone();
        records.ents = empty_non_terminals(&records);
        records
    }
}

/// Every proper ancestor of the names of `records` (A, SRV and reverse names), the root
/// excepted.
fn empty_non_terminals(records: &Records) -> HashSet<Box<[u8]>> {
    let mut ents: HashSet<Box<[u8]>> = HashSet::new();
    let mut add = |name: &[u8]| {
        let mut rest = name;
        while let Some(dot) = rest.iter().position(|&b| b == b'.') {
            rest = &rest[dot + 1..];
            // Present already: so are all of its ancestors.
            if !ents.insert(rest.into()) {
                break;
            }
        }
    };
    for name in records.a.keys().chain(records.srv.keys()) {
        add(name);
    }
    for ip in records.ptr.keys() {
        let [a, b, c, d] = ip.octets();
        add(format!("{d}.{c}.{b}.{a}.in-addr.arpa").as_bytes());
    }
    ents
}

/// Normal form of a name: lowercase, no trailing dot, each label 1..=63 bytes of printable
/// ASCII other than '.', at most 253 characters. `None` for anything else (including root).
pub(crate) fn normalise(name: &str) -> Option<String> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() || name.len() > 253 {
        return None;
    }
    for label in name.split('.') {
        if label.is_empty()
            || label.len() > 63
            || !label.bytes().all(|b| b.is_ascii_graphic() && b != b'.')
        {
            return None;
        }
    }
    Some(name.to_ascii_lowercase())
}

/// Wire form of a normalised name (length-prefixed labels, terminating zero).
fn to_wire(key: &str) -> Box<[u8]> {
    let mut out = Vec::with_capacity(key.len() + 2);
    for label in key.split('.') {
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    out.into_boxed_slice()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_normalised() {
        assert_eq!(normalise("Web.").as_deref(), Some("web"));
        assert_eq!(normalise("tasks.WEB").as_deref(), Some("tasks.web"));
        for bad in ["", ".", "a..b", "a b", &"x".repeat(64), &"a.".repeat(130)] {
            assert_eq!(normalise(bad), None, "{bad:?}");
        }
        assert_eq!(&*to_wire("a.bc"), b"\x01a\x02bc\x00");
    }

    #[test]
    fn builder_appends_and_dedups() {
        let ip = |d| Ipv4Addr::new(10, 0, 0, d);
        let r = Records::builder()
            .a("Web", &[ip(1), ip(2)], false)
            .a("web.", &[ip(2), ip(3)], true)
            .a("bad name", &[ip(9)], false)
            .ptr(ip(1), "web")
            .ptr(ip(1), "WEB.")
            .forward(false)
            .build();
        assert_eq!(r.lookup_a("WEB"), Some(&[ip(1), ip(2), ip(3)][..]));
        assert!(r.a[&b"web"[..]].shuffle);
        assert_eq!(r.len(), 1);
        assert_eq!(r.ptr[&ip(1)].len(), 1);
        assert!(!r.forward_allowed());
        assert!(Records::empty().forward_allowed());
        assert!(Records::empty().is_empty());
    }

    #[test]
    fn empty_non_terminals_of_every_name() {
        let r = Records::builder()
            .a("web", &[Ipv4Addr::new(10, 0, 0, 2)], false)
            .a("Web.1.ABC", &[Ipv4Addr::new(10, 0, 0, 3)], false)
            .srv("_80._tcp.web", &[("web.1.abc".into(), 80)])
            .ptr(Ipv4Addr::new(10, 0, 0, 3), "web.1.abc")
            .build();
        let mut ents: Vec<&str> = r
            .ents
            .iter()
            .map(|e| std::str::from_utf8(e).unwrap())
            .collect();
        ents.sort();
        assert_eq!(
            ents,
            [
                "0.0.10.in-addr.arpa",
                "0.10.in-addr.arpa",
                "1.abc",
                "10.in-addr.arpa",
                "_tcp.web",
                "abc",
                "arpa",
                "in-addr.arpa",
                "web",
            ]
        );
    }

    #[test]
    fn srv_targets() {
        let r = Records::builder()
            .srv(
                "_80._TCP.web",
                &[("web.1.abc".into(), 80), ("Web.2.abc.".into(), 80)],
            )
            .srv(
                "_80._tcp.web.",
                &[("web.1.abc".into(), 80), ("bad name".into(), 1)],
            )
            .build();
        assert_eq!(
            r.lookup_srv("_80._tcp.WEB"),
            Some(vec![
                ("web.1.abc".to_string(), 80),
                ("web.2.abc".to_string(), 80)
            ])
        );
        assert_eq!(
            &*r.srv[&b"_80._tcp.web"[..]][1].wire,
            b"\x03web\x012\x03abc\x00"
        );
        assert!(!r.is_empty());
        assert_eq!(r.lookup_srv("web"), None);
    }
}
