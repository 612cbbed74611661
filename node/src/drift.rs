//! Kernel drift of Shoal's nft tables: someone else flushed or changed them (`nft flush
//! ruleset`, `systemctl restart nftables`, a firewalld reload, a stray `nft delete table`).
//!
//! The appliers compare desired state with what they last applied; this watch tells them when
//! the kernel no longer holds that. It is cheap when nothing happened: one nf_tables
//! generation read per namespace per pass (a netlink round trip; the kernel bumps the
//! generation on every committed change, whoever makes it). Only when a namespace's
//! generation moved since our own last write there are our tables in it read back:
//!
//! - [`Check::Fingerprint`] tables (whole-table scripts: guard, published ports, ingress
//!   marks, IPVS companion) are listed without counters (`nft -s`) and compared with the
//!   listing taken right after our write. In the node namespace other programs write too
//!   (Docker, firewalld), so their changes alone must not cost a re-apply.
//! - [`Check::Resync`] tables (the VIP table, incrementally updated and possibly large) are
//!   handed back to their syncer, which reads the kernel's table and repairs only what
//!   differs. We are the only writer in the overlay namespaces, so a moved generation there
//!   is rare.
//!
//! A full pass (every `resync_secs`) also lists the fingerprinted tables whatever the
//! generation says, and has the VIP tables written since the last full pass read back
//! once: that covers a change that fell between one of our writes and the generation read
//! after it (which the canary cannot see).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use shoal_lb::{Applier, Generation, GenerationReader, LbError};

/// How drift of a table is confirmed once its namespace's generation moved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    /// Compare a counter-free listing with the one taken after our write.
    Fingerprint,
    /// Let the table's syncer read the kernel back and repair what differs.
    Resync,
}

/// A table of ours that someone else changed or deleted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Drifted {
    pub netns: String,
    pub table: &'static str,
    /// The dataplane that owns it (a label of `metrics::DATAPLANES`).
    pub dataplane: &'static str,
    /// The owner's key (a network id for VIP tables; empty otherwise).
    pub key: String,
    /// Confirmed by read-back (Fingerprint); a Resync table is only suspected.
    pub confirmed: bool,
}

#[derive(Debug)]
struct Owned {
    dataplane: &'static str,
    key: String,
    check: Check,
    /// The listing after our write (Fingerprint tables).
    fingerprint: Option<String>,
}

/// One write (or read-back) of a table of ours, for [`DriftWatch::wrote`].
#[derive(Clone, Copy, Debug)]
pub struct Write<'a> {
    pub table: &'static str,
    /// The dataplane that owns it (a label of `metrics::DATAPLANES`).
    pub dataplane: &'static str,
    /// The owner's key (a network id for VIP tables).
    pub key: &'a str,
    pub check: Check,
    /// The kernel changed.
    pub changed: bool,
    /// The namespace's generation read before the sync.
    pub before: Option<Generation>,
    /// The table was deleted (on purpose).
    pub removed: bool,
}

impl Write<'static> {
    /// A whole-table script of ours was applied (checked by its listing).
    pub fn whole_table(table: &'static str, dataplane: &'static str) -> Write<'static> {
        Write {
            table,
            dataplane,
            key: "",
            check: Check::Fingerprint,
            changed: true,
            before: None,
            removed: false,
        }
    }
}

/// Where our tables are, and each namespace's generation after our last write there.
pub struct DriftWatch {
    applier: Applier,
    reader: Arc<Mutex<GenerationReader>>,
    /// netns -> table -> what we wrote
    tables: BTreeMap<String, BTreeMap<&'static str, Owned>>,
    /// netns -> the generation after our last write (or after a check found nothing of ours
    /// changed)
    seen: HashMap<String, Generation>,
    /// Resync tables written since the last full pass: a change someone made between our
    /// write and the generation read after it would be in that generation and so never
    /// seen by the canary; the next full pass reads them back once.
    unverified: std::collections::BTreeSet<(String, &'static str)>,
}

impl DriftWatch {
    pub fn new(applier: Applier) -> DriftWatch {
        DriftWatch {
            applier,
            reader: Arc::new(Mutex::new(GenerationReader::new())),
            tables: BTreeMap::new(),
            seen: HashMap::new(),
            unverified: Default::default(),
        }
    }

    /// The generation of `netns` now (None when it cannot be read). Read it before a sync
    /// that may write nothing, and give it to [`DriftWatch::wrote`].
    pub async fn generation_now(&self, netns: &str) -> Option<Generation> {
        self.generation(netns).await.ok()
    }

    /// The generation of `netns`, read on the blocking pool (a first read of a namespace
    /// opens a socket on a thread inside it).
    async fn generation(&self, netns: &str) -> Result<Generation, LbError> {
        let (reader, ns) = (self.reader.clone(), netns.to_string());
        tokio::task::spawn_blocking(move || {
            reader.lock().unwrap_or_else(|e| e.into_inner()).read(&ns)
        })
        .await
        .map_err(|e| LbError::Generation {
            netns: netns.to_string(),
            what: "blocking task".into(),
            source: std::io::Error::other(e),
        })?
    }

    /// We have just written `table` in `netns` (created, replaced or updated it) or read it
    /// back: remember its listing (Fingerprint) and the namespace's generation.
    /// `w.changed`: the kernel changed; when it did not, `w.before` (read before the sync)
    /// is recorded, so that anything that happened since shows up at the next canary.
    /// `w.removed`: we deleted the table (not watched any more); a table missing after a
    /// write that should have left it is watched as drifted.
    pub async fn wrote(&mut self, netns: &str, w: Write<'_>) -> Result<(), LbError> {
        let Write {
            table,
            dataplane,
            key,
            check,
            changed,
            before,
            removed,
        } = w;
        if removed {
            self.untrack(netns, table).await;
            return Ok(());
        }
        let fingerprint = match check {
            // Missing right after our write: someone deleted it at once. An empty listing
            // never matches, so the next check reports it.
            Check::Fingerprint => Some(
                self.applier
                    .fingerprint(netns, table)
                    .await?
                    .unwrap_or_default(),
            ),
            Check::Resync => None,
        };
        let g = match before {
            Some(b) if !changed => b,
            _ => self.generation(netns).await?,
        };
        self.tables.entry(netns.to_string()).or_default().insert(
            table,
            Owned {
                dataplane,
                key: key.to_string(),
                check,
                fingerprint,
            },
        );
        self.seen.insert(netns.to_string(), g);
        if check == Check::Resync && changed {
            self.unverified.insert((netns.to_string(), table));
        }
        Ok(())
    }

    /// We removed `table` (or no longer own it): not watched any more. The namespace's
    /// generation is read again, since the removal moved it.
    pub async fn untrack(&mut self, netns: &str, table: &str) {
        let Some(t) = self.tables.get_mut(netns) else {
            return;
        };
        t.remove(table);
        if t.is_empty() {
            self.forget_ns(netns);
        } else if let Ok(g) = self.generation(netns).await {
            self.seen.insert(netns.to_string(), g);
        }
    }

    /// The namespace is gone (or will be): nothing in it is watched.
    pub fn forget_ns(&mut self, netns: &str) {
        self.tables.remove(netns);
        self.seen.remove(netns);
        self.unverified.retain(|(ns, _)| ns != netns);
        self.reader
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .forget(netns);
    }

    /// Whether the generation of a namespace holding tables of ours moved since our last
    /// write there (or could not be read): the canary, one netlink round trip per namespace.
    pub async fn moved(&self) -> bool {
        for (ns, seen) in &self.seen {
            if self.generation(ns).await.ok() != Some(*seen) {
                return true;
            }
        }
        false
    }

    /// Our tables that someone else changed since our last write. `full` (the periodic
    /// pass): fingerprinted tables are listed even where the generation did not move. A
    /// namespace that cannot be read is reported as drift of all its tables (its owner's next
    /// write then shows whether it is still there).
    pub async fn check(&mut self, full: bool) -> Vec<Drifted> {
        let mut out = vec![];
        let namespaces: Vec<String> = self.tables.keys().cloned().collect();
        for ns in namespaces {
            let now = self.generation(&ns).await.ok();
            let moved = now.is_none() || now != self.seen.get(&ns).copied();
            if !moved && !full {
                continue;
            }
            let mut found = vec![];
            for (table, owned) in &self.tables[&ns] {
                let drifted = match owned.check {
                    Check::Resync => {
                        moved || (full && self.unverified.contains(&(ns.clone(), *table)))
                    }
                    Check::Fingerprint => match self.applier.fingerprint(&ns, table).await {
                        Ok(f) => f.is_none() || f != owned.fingerprint,
                        Err(e) => {
                            tracing::debug!(netns = %ns, table, error = %e, "listing a table for the drift check failed");
                            true
                        }
                    },
                };
                if drifted {
                    found.push(Drifted {
                        netns: ns.clone(),
                        table,
                        dataplane: owned.dataplane,
                        key: owned.key.clone(),
                        confirmed: owned.check == Check::Fingerprint,
                    });
                }
            }
            if found.is_empty() {
                // Someone else's change, none of ours touched: this is the new baseline.
                if let Some(g) = now {
                    self.seen.insert(ns.clone(), g);
                }
            }
            out.extend(found);
        }
        if full {
            // Reported above where written since the last full pass; their owners read
            // them back now (and a write puts them in the set again).
            self.unverified.clear();
        }
        out
    }
}
