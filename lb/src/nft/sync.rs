//! Incremental programming of LB tables: the last applied [`Model`] per namespace, element
//! diffs, adoption of an existing table after a restart, and the clean-ups that follow a
//! backend's removal (affinity entries, UDP conntrack entries, unanswered TCP attempts).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;

use serde_json::Value;
use tracing::{debug, info, warn};

use super::{Applier, load_elements};
use crate::conntrack::{CtClient, CtFilter};
use crate::model::{
    self as json, chains_added, chains_deleted, permanent_chains, sorted_services,
    uses_only_permanent_chains, validate_sorted,
};
use crate::{ANY_PORT, LbError, Model, Protocol, Ruleset, ServiceKey, VirtualService};

/// How a sync changed the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncKind {
    /// The table already was as desired.
    Unchanged,
    /// Element updates (and at most a few selection chains) in one transaction.
    Incremental,
    /// The whole table replaced in one transaction (first sync of a namespace with a table
    /// of another layout, or an incremental update failed), or created (first sync of a
    /// namespace without the table: structure through nft, elements over nfnetlink).
    Full,
}

/// What one [`Syncer::sync`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncReport {
    pub kind: SyncKind,
    /// The table found in the kernel was read back and updated in place (first sync after a
    /// restart).
    pub adopted: bool,
    /// (vip, protocol, port, backend) no longer served, neither active nor draining: their
    /// UDP conntrack entries and unanswered TCP attempts are deleted. Port 0: every port.
    pub removed: Vec<(Ipv4Addr, Protocol, u16, Ipv4Addr)>,
    /// Affinity entries deleted because their backend left the active set.
    pub affinity_deleted: usize,
    /// Conntrack entries deleted (UDP flows and unanswered TCP attempts to a removed backend).
    pub conntrack_deleted: usize,
    /// Why an incremental update was refused, or why the elements of a new table could not be
    /// loaded over nfnetlink (then `kind` is [`SyncKind::Full`] and the whole table was
    /// applied through nft).
    pub fallback: Option<String>,
}

/// Keeps each namespace's LB table in the desired state at the cost of what changed.
///
/// The first sync of a namespace reads the table back from the kernel (`nft -j list`) and,
/// when it has this layout, updates it in place: an agent restart changes nothing that need
/// not change (and the packet path's affinity entries survive). Later syncs diff against the
/// last applied model. Any failed update is followed by a full replace of the table.
#[derive(Debug)]
pub struct Syncer {
    applier: Applier,
    applied: HashMap<String, NsState>,
    conntrack_cleanup: bool,
}

/// What the first sync of a namespace finds in the kernel.
enum Found {
    /// No table of that name.
    Absent,
    /// A table of that name not of this layout (or not readable as such).
    Foreign,
    /// A table of this layout, read back.
    Adoptable(Box<Model>),
}

/// What a namespace's table holds, as model and as the input it was made from.
#[derive(Debug)]
struct NsState {
    model: Model,
    services: BTreeMap<ServiceKey, VirtualService>,
    vips_in: Vec<Ipv4Addr>,
    local_in: Vec<Ipv4Addr>,
    /// nfnetlink socket for element updates, opened on first use, kept while the state is.
    sock: super::elements::SharedSocket,
}

impl SyncReport {
    fn new(adopted: bool) -> SyncReport {
        SyncReport {
            kind: SyncKind::Unchanged,
            adopted,
            removed: vec![],
            affinity_deleted: 0,
            conntrack_deleted: 0,
            fallback: None,
        }
    }
}

/// Keys of services added, removed or changed between the last input and `sorted`.
fn changed_keys(
    sorted: &[&VirtualService],
    last: &BTreeMap<ServiceKey, VirtualService>,
) -> Vec<ServiceKey> {
    let mut out = vec![];
    let mut a = sorted.iter().peekable();
    let mut b = last.iter().peekable();
    loop {
        match (a.peek(), b.peek()) {
            (None, None) => break,
            (Some(s), None) => {
                out.push((s.vip, s.protocol, s.port));
                a.next();
            }
            (None, Some((k, _))) => {
                out.push(**k);
                b.next();
            }
            (Some(s), Some((k, old))) => {
                let ka = (s.vip, s.protocol, s.port);
                match ka.cmp(k) {
                    std::cmp::Ordering::Less => {
                        out.push(ka);
                        a.next();
                    }
                    std::cmp::Ordering::Greater => {
                        out.push(**k);
                        b.next();
                    }
                    std::cmp::Ordering::Equal => {
                        if ***s != **old {
                            out.push(ka);
                        }
                        a.next();
                        b.next();
                    }
                }
            }
        }
    }
    out
}

fn sorted_contains(sorted: &[&VirtualService], k: &ServiceKey) -> bool {
    sorted
        .binary_search_by(|s| (s.vip, s.protocol, s.port).cmp(k))
        .is_ok()
}

impl Syncer {
    pub fn new(applier: Applier) -> Syncer {
        Syncer {
            applier,
            applied: HashMap::new(),
            conntrack_cleanup: true,
        }
    }

    /// Leaves UDP conntrack entries of removed backends alone (measurements only).
    #[doc(hidden)]
    pub fn without_conntrack_cleanup(mut self) -> Syncer {
        self.conntrack_cleanup = false;
        self
    }

    /// The applier this syncer runs commands through.
    pub fn applier(&self) -> &Applier {
        &self.applier
    }

    /// The model last applied in `netns`.
    pub fn applied(&self, netns: &str) -> Option<&Model> {
        self.applied.get(netns).map(|st| &st.model)
    }

    /// Forgets `netns` (its namespace is gone, or its table was deleted): the next sync reads
    /// the kernel's table again.
    pub fn forget(&mut self, netns: &str) {
        self.applied.remove(netns);
    }

    /// Brings the table in `netns` to `rs`. Invalid input changes nothing. On an error the
    /// namespace is forgotten, so the next sync starts from what the kernel has.
    ///
    /// Cost: the first sync of a namespace builds the whole model (and reads the kernel's
    /// table back); later ones compare `rs` with the last one service by service and rebuild
    /// and diff only the (VIP, protocol) groups that changed.
    pub async fn sync(&mut self, netns: &str, rs: &Ruleset) -> Result<SyncReport, LbError> {
        let mut sorted = sorted_services(rs);
        validate_sorted(&rs.table, &sorted)?;
        sorted.dedup_by_key(|s| (s.vip, s.protocol, s.port));
        let prev = self
            .applied
            .remove(netns)
            .filter(|st| st.model.table == rs.table);
        let (st, report) = match prev {
            Some(st) => self.sync_delta(netns, rs, &sorted, st).await?,
            None => self.sync_first(netns, rs, &sorted).await?,
        };
        self.applied.insert(netns.to_string(), st);
        self.log(netns, &report);
        Ok(report)
    }

    fn log(&self, netns: &str, report: &SyncReport) {
        match report.kind {
            SyncKind::Unchanged => debug!(netns, "LB table unchanged"),
            kind => info!(
                netns,
                ?kind,
                adopted = report.adopted,
                removed = report.removed.len(),
                affinity_deleted = report.affinity_deleted,
                conntrack_deleted = report.conntrack_deleted,
                "LB table synced"
            ),
        }
    }

    /// First sync of a namespace: adopt the kernel's table (element diff) or replace it.
    async fn sync_first(
        &self,
        netns: &str,
        rs: &Ruleset,
        sorted: &[&VirtualService],
    ) -> Result<(NsState, SyncReport), LbError> {
        let mut want = Model::from_ruleset(rs);
        let sock = super::elements::SharedSocket::default();
        let found = self.read_back(netns, &rs.table).await?;
        let mut report = SyncReport::new(matches!(found, Found::Adoptable(_)));
        let have = match found {
            Found::Adoptable(h) => {
                let chains = (h.chains != want.chains).then_some((&h.chains, &want.chains));
                match self.update(netns, &sock, &h, &want, chains).await {
                    Ok(true) => report.kind = SyncKind::Incremental,
                    Ok(false) => {}
                    Err(e) => want = self.replace(netns, e, rs, &mut report).await?,
                }
                Some(*h)
            }
            Found::Absent => {
                report.kind = SyncKind::Full;
                self.load_fresh(netns, &want, &mut report).await?;
                None
            }
            Found::Foreign => {
                // A table of another layout is replaced atomically (one nft transaction):
                // the two-step load of `load_fresh` would leave packets a moment with
                // empty maps where a working table was.
                report.kind = SyncKind::Full;
                self.applier
                    .run_script(netns, "apply", want.render())
                    .await?;
                None
            }
        };
        if let Some(h) = &have {
            report.removed = removed_backends(h, sorted.iter().copied());
            if !want.affinity_services.is_empty() {
                report.affinity_deleted = self.clean_affinity(netns, &want).await?;
            }
        }
        self.finish(netns, &mut report).await?;
        let st = NsState {
            model: want,
            services: sorted
                .iter()
                .map(|s| ((s.vip, s.protocol, s.port), (*s).clone()))
                .collect(),
            vips_in: rs.vips.clone(),
            local_in: rs.local_endpoints.clone(),
            sock,
        };
        Ok((st, report))
    }

    /// Later syncs: only the (VIP, protocol) groups whose services changed are rebuilt.
    async fn sync_delta(
        &self,
        netns: &str,
        rs: &Ruleset,
        sorted: &[&VirtualService],
        mut st: NsState,
    ) -> Result<(NsState, SyncReport), LbError> {
        let mut report = SyncReport::new(false);
        let changed = changed_keys(sorted, &st.services);
        let vips_changed = rs.vips != st.vips_in;
        let local_changed = rs.local_endpoints != st.local_in;
        if changed.is_empty() && !vips_changed && !local_changed {
            return Ok((st, report));
        }
        let groups: BTreeSet<(Ipv4Addr, Protocol)> =
            changed.iter().map(|(v, p, _)| (*v, *p)).collect();
        let new_in_groups: Vec<&VirtualService> = groups
            .iter()
            .flat_map(|&(v, p)| {
                let lo = sorted.partition_point(|s| (s.vip, s.protocol) < (v, p));
                let hi = sorted.partition_point(|s| (s.vip, s.protocol) <= (v, p));
                sorted[lo..hi].iter().copied()
            })
            .collect();
        let old_in_groups: Vec<&VirtualService> = groups
            .iter()
            .flat_map(|&(v, p)| {
                st.services
                    .range((v, p, 0)..=(v, p, u16::MAX))
                    .map(|(_, s)| s)
            })
            .collect();
        let mut old_part = Model::from_services(&rs.table, old_in_groups.iter().copied());
        let mut new_part = Model::from_services(&rs.table, new_in_groups.iter().copied());

        // Sets: compared whole, only when they can have changed.
        let keys_came_or_went = changed
            .iter()
            .any(|k| st.services.contains_key(k) != sorted_contains(sorted, k));
        let new_vips = if vips_changed || keys_came_or_went {
            let mut v: BTreeSet<Ipv4Addr> = rs.vips.iter().copied().collect();
            v.extend(sorted.iter().map(|s| s.vip));
            Some(v)
        } else {
            None
        };
        old_part.vips.clear();
        new_part.vips.clear();
        if let Some(v) = &new_vips {
            old_part.vips = st.model.vips.clone();
            new_part.vips = v.clone();
        }
        if local_changed {
            old_part.hairpin = st.model.hairpin.clone();
            new_part.hairpin = rs.local_endpoints.iter().copied().collect();
        }

        // Chains: recomputed over every service only when a non-permanent one is involved;
        // None when they stay as they are.
        let permanent = permanent_chains();
        let new_chains =
            if old_part.chains.is_subset(permanent) && new_part.chains.is_subset(permanent) {
                None
            } else {
                let others = sorted
                    .iter()
                    .copied()
                    .filter(|s| !uses_only_permanent_chains(s));
                let mut c = Model::from_services(&rs.table, others).chains;
                c.extend(permanent.iter().cloned());
                Some(c).filter(|c| *c != st.model.chains)
            };

        report.removed = removed_backends(&old_part, new_in_groups.iter().copied());
        let lost = lost_active(&old_part, &new_part);
        let affinity = !new_part.affinity_services.is_empty();

        let chains = new_chains.as_ref().map(|c| (&st.model.chains, c));
        match self
            .update(netns, &st.sock, &old_part, &new_part, chains)
            .await
        {
            Ok(true) => report.kind = SyncKind::Incremental,
            Ok(false) => {}
            Err(e) => st.model = self.replace(netns, e, rs, &mut report).await?,
        }
        if report.kind != SyncKind::Full {
            st.model.remove_groups(&groups);
            st.model.insert_elements(new_part);
            if let Some(v) = new_vips {
                st.model.vips = v;
            }
            if local_changed {
                st.model.hairpin = rs.local_endpoints.iter().copied().collect();
            }
            if let Some(c) = new_chains {
                st.model.chains = c;
            }
        }
        for k in &changed {
            st.services.remove(k);
        }
        for s in new_in_groups {
            st.services.insert((s.vip, s.protocol, s.port), s.clone());
        }
        if vips_changed {
            st.vips_in = rs.vips.clone();
        }
        if local_changed {
            st.local_in = rs.local_endpoints.clone();
        }
        if affinity && lost {
            report.affinity_deleted = self.clean_affinity(netns, &st.model).await?;
        }
        self.finish(netns, &mut report).await?;
        Ok((st, report))
    }

    /// Creates the table in a namespace that has none: nft creates the structure (tables,
    /// maps, sets, chains, rules: `render_structure`), then the elements go over nfnetlink in
    /// one batch (`load_elements`), which skips nft's per-element parsing and evaluation, most
    /// of a full load's time. Two transactions, so packets may meet the table with empty maps
    /// in between: harmless only because there was no table before (every VIP was
    /// unserved anyway), which is why an existing table is always replaced through nft in one
    /// transaction instead. When the element load fails, the whole table is applied through
    /// nft (one transaction, replacing the empty structure) and `report.fallback` says why.
    async fn load_fresh(
        &self,
        netns: &str,
        want: &Model,
        report: &mut SyncReport,
    ) -> Result<(), LbError> {
        self.applier
            .run_script(netns, "apply", want.render_structure())
            .await?;
        match load_elements(netns, want).await {
            Ok(load) => {
                debug!(
                    netns,
                    elements = load.elements,
                    messages = load.messages,
                    bytes = load.bytes,
                    "LB elements loaded over nfnetlink"
                );
                Ok(())
            }
            Err(e) => {
                warn!(netns, error = %e, "loading LB elements over nfnetlink failed: applying the whole table through nft");
                report.fallback = Some(e.to_string());
                self.applier.run_script(netns, "apply", want.render()).await
            }
        }
    }

    /// Turns the elements of `old` into those of `new` (whole or partial models of one
    /// table). Element changes only (the usual case): one nfnetlink batch of our own on the
    /// namespace's kept socket, whose cost does not depend on the table's size (libnftables
    /// would first list the table's sets for its cache). With `chains` (from, to) to add or
    /// delete: one nft transaction. Ok(false) when nothing differed.
    async fn update(
        &self,
        netns: &str,
        sock: &super::elements::SharedSocket,
        old: &Model,
        new: &Model,
        chains: Option<(&BTreeSet<String>, &BTreeSet<String>)>,
    ) -> Result<bool, LbError> {
        match chains {
            None => Ok(super::elements::apply_delta(netns, sock, old, new).await? > 0),
            Some((from, to)) => {
                let mut script = chains_added(&new.table, from, to);
                script.push_str(&old.elements_diff(new));
                script.push_str(&chains_deleted(&new.table, from, to));
                self.applier.run_script(netns, "update", script).await?;
                Ok(true)
            }
        }
    }

    /// After a refused update: the whole table replaced by `rs` in one nft transaction.
    /// Returns the model now in the kernel.
    async fn replace(
        &self,
        netns: &str,
        e: LbError,
        rs: &Ruleset,
        report: &mut SyncReport,
    ) -> Result<Model, LbError> {
        warn!(netns, error = %e, "incremental LB update failed: replacing the whole table");
        let want = Model::from_ruleset(rs);
        report.kind = SyncKind::Full;
        report.fallback = Some(e.to_string());
        self.applier
            .run_script(netns, "apply", want.render())
            .await?;
        Ok(want)
    }

    async fn finish(&self, netns: &str, report: &mut SyncReport) -> Result<(), LbError> {
        if self.conntrack_cleanup {
            report.conntrack_deleted = self.clean_conntrack(netns, &report.removed).await?;
        }
        Ok(())
    }

    /// The kernel's table: absent, of another layout, or as a model.
    async fn read_back(&self, netns: &str, table: &str) -> Result<Found, LbError> {
        let Some(json) = self
            .applier
            .list_json(netns, super::exists::Object::Table(table.to_string()))
            .await?
        else {
            return Ok(Found::Absent);
        };
        match Model::from_nft_json(table, &json) {
            Some(m) => Ok(Found::Adoptable(Box::new(m))),
            None => {
                info!(
                    netns,
                    table, "existing LB table has another layout: replacing it"
                );
                Ok(Found::Foreign)
            }
        }
    }

    /// Deletes affinity entries whose backend no longer serves their VIP (removed or
    /// draining): otherwise the client's next flow would still go there.
    async fn clean_affinity(&self, netns: &str, want: &Model) -> Result<usize, LbError> {
        let Some(json) = self
            .applier
            .list_json(
                netns,
                super::exists::Object::Map(want.table.clone(), "affinity".into()),
            )
            .await?
        else {
            return Ok(0);
        };
        let stale = stale_affinity(&json, want);
        if stale.is_empty() {
            return Ok(0);
        }
        let n = stale.len();
        let text = format!(
            "delete element ip {} affinity {{ {} }}\n",
            want.table,
            stale.join(", ")
        );
        // An entry may time out between the listing and the delete: then the delete fails
        // as a whole; deleting one by one is the fallback.
        if self
            .applier
            .run_script(netns, "update", text)
            .await
            .is_err()
        {
            for e in &stale {
                let text = format!("delete element ip {} affinity {{ {e} }}\n", want.table);
                let _ = self.applier.run_script(netns, "update", text).await;
            }
        }
        Ok(n)
    }

    /// Deletes the conntrack entries in `netns` of flows to `(vip, port)` (port 0: any) NATed
    /// to a removed backend: UDP ones, so their clients' next packets pick a live backend;
    /// TCP ones that never got a reply, so a client that reuses the source port (while the
    /// entry would live on for two minutes) is not sent to the gone backend again.
    /// Established TCP flows stay (a drained backend finishes them). One dump, then a delete
    /// per matching entry.
    async fn clean_conntrack(
        &self,
        netns: &str,
        removed: &[(Ipv4Addr, Protocol, u16, Ipv4Addr)],
    ) -> Result<usize, LbError> {
        let filters: Vec<CtFilter> = removed
            .iter()
            .map(|&(vip, proto, port, backend)| {
                let mut f = CtFilter::backend(proto, vip, port, backend);
                if port == ANY_PORT {
                    f.orig_dport = None;
                }
                f.unreplied_only = proto == Protocol::Tcp;
                f
            })
            .collect();
        if filters.is_empty() {
            return Ok(0);
        }
        let ns = netns.to_string();
        tokio::task::spawn_blocking(move || {
            CtClient::open_in(&ns)?.delete_where(|e| filters.iter().any(|f| f.matches(e)))
        })
        .await
        .map_err(|e| LbError::Library(format!("conntrack clean-up in {netns:?}: {e}")))?
        .map_err(|e| LbError::Conntrack(e.to_string()))
    }
}

/// Backends the old model served that `services` neither serve nor drain, per service port.
fn removed_backends<'a>(
    have: &Model,
    services: impl Iterator<Item = &'a VirtualService>,
) -> Vec<(Ipv4Addr, Protocol, u16, Ipv4Addr)> {
    let mut old: BTreeSet<(Ipv4Addr, Protocol, u16, Ipv4Addr)> = have
        .backends
        .iter()
        .map(|((v, p, port, _), (b, _))| (*v, *p, *port, *b))
        .collect();
    old.extend(
        have.any_backends
            .iter()
            .map(|((v, p, _), b)| (*v, *p, 0, *b)),
    );
    let mut kept = BTreeSet::new();
    for s in services {
        for b in s.backends.iter().chain(&s.draining) {
            kept.insert((s.vip, s.protocol, s.port, *b));
        }
    }
    old.difference(&kept).copied().collect()
}

/// Whether some (vip, proto) lost an active backend between the two models.
fn lost_active(have: &Model, want: &Model) -> bool {
    want.affinity_services.keys().any(|(vip, p)| {
        !have
            .backends_of(*vip, *p)
            .is_subset(&want.backends_of(*vip, *p))
    })
}

/// Elements of the `affinity` map (nft JSON) whose backend is not an active backend of their
/// VIP in `want`, written as nft element keys.
fn stale_affinity(json: &str, want: &Model) -> Vec<String> {
    let Ok(v) = serde_json::from_str::<Value>(json) else {
        return vec![];
    };
    let mut out = vec![];
    let Some(objs) = v.get("nftables").and_then(|n| n.as_array()) else {
        return out;
    };
    for o in objs {
        let Some(elems) = o
            .get("map")
            .and_then(|m| m.get("elem"))
            .and_then(|e| e.as_array())
        else {
            continue;
        };
        for e in elems {
            let Some(pair) = e.as_array() else { continue };
            let (Some(k), Some(val)) = (pair.first(), pair.get(1)) else {
                continue;
            };
            let parts = json::concat(json::unwrap_elem(k));
            let (Some(client), Some(vip), Some(proto), Some(backend)) = (
                parts.first().and_then(|v| json::addr(v)),
                parts.get(1).and_then(|v| json::addr(v)),
                parts.get(2).and_then(|v| json::proto(v)),
                json::addr(val),
            ) else {
                continue;
            };
            if !want.backends_of(vip, proto).contains(&backend) {
                out.push(format!("{client} . {vip} . {proto}"));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_affinity_entries_are_those_of_inactive_backends() {
        let rs = Ruleset {
            table: "t".into(),
            services: vec![crate::VirtualService {
                id: "web".into(),
                vip: "10.96.0.10".parse().unwrap(),
                port: 80,
                target_port: 8080,
                backends: vec!["10.0.1.1".parse().unwrap(), "10.0.1.2".parse().unwrap()],
                draining: vec!["10.0.1.2".parse().unwrap()],
                affinity: Some(60),
                ..Default::default()
            }],
            ..Default::default()
        };
        let want = Model::from_ruleset(&rs);
        let json = r#"{"nftables": [{"map": {"name": "affinity", "elem": [
            [{"elem": {"val": {"concat": ["1.1.1.1", "10.96.0.10", "tcp"]}, "timeout": 60, "expires": 50}}, "10.0.1.1"],
            [{"elem": {"val": {"concat": ["1.1.1.2", "10.96.0.10", "tcp"]}, "timeout": 60, "expires": 50}}, "10.0.1.2"],
            [{"elem": {"val": {"concat": ["1.1.1.3", "10.96.0.10", "tcp"]}, "timeout": 60, "expires": 50}}, "10.0.1.9"]
        ]}}]}"#;
        assert_eq!(
            stale_affinity(json, &want),
            vec![
                "1.1.1.2 . 10.96.0.10 . tcp".to_string(),
                "1.1.1.3 . 10.96.0.10 . tcp".to_string()
            ]
        );
    }
}
