//! Network policy: Kubernetes NetworkPolicy's meaning, enforced by this host's kernel for the
//! endpoints on it.
//!
//! The compiler ([`PolicyIndex`]) turns policies and every endpoint of the cluster into
//! profiles, and the [`Program`] keeps the kernel's elements from them: each local endpoint
//! address a policy isolates points at the profile of its policies, shared by every endpoint
//! with the same policies; a change recompiles only the profiles it may change and moves only
//! the endpoints whose policies changed. The reconciler ([`Agent::run_policy_reconciler`])
//! follows the store's policies, endpoints and networks; this host's own changes program the
//! kernel before they answer:
//! - an attach puts its endpoint's elements in before the interface is made, so its first
//!   packet is already judged (no window);
//! - a detach takes them out only once the interface is retired;
//! - a policy created, replaced or removed here is enforced here before the API answers, and
//!   the established flows it now denies lose their conntrack entries (revocation).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_dataplane::conntrack::{self, FlowTuple};
use berth_dataplane::nftables::PolicySets;
use berth_model::{Endpoint, Network, Policy, Protocol};
use berth_policy::{
    Change, Direction, Explanation, MAX_HOST_ELEMENTS, MAX_POLICY_ELEMENTS, Party, PolicyIndex,
    Profile, Program, Touched, allows,
};
use berth_store::{Compare, Event, Txn, TxnOutcome, Watch};
use serde_json::Value;

use crate::{Agent, AgentError, Result, decode, encode, kernel, keys};

/// How often the kernel's policy sets are read back and compared with what they should hold.
const RESYNC: Duration = Duration::from_secs(30);

/// The watched prefixes, in the order [`Agent::follow_policies`] takes them.
const WATCHED: [&str; 3] = [keys::POLICIES, keys::ENDPOINTS, keys::NETWORKS];

/// The watched prefix `key` is under.
fn watched_prefix(key: &str) -> Option<&'static str> {
    WATCHED.into_iter().find(|p| key.starts_with(p))
}

/// The compiler, and what the kernel was programmed with from it, changed under one lock.
pub(crate) struct PolicyState {
    /// Locked inside the blocking task that writes the kernel.
    sets: Arc<std::sync::Mutex<PolicySets>>,
    index: PolicyIndex,
    /// What the kernel should hold, from the index.
    program: Program,
    /// The index comes from a listing: until then nothing is programmed.
    listed: bool,
    /// The kernel may differ from `wanted` (a change failed): the next change, or the next
    /// tick, writes everything.
    stale: bool,
    synced_at: Instant,
    /// Store keys this host changed (a policy written or removed, an endpoint detached),
    /// with the revision of the change: an older event still in the watch must not undo it.
    /// Forgotten once the watch of its prefix is past it.
    changed_here: HashMap<String, u64>,
    /// The revision each watched prefix's listing or watch has been applied up to.
    seen: HashMap<&'static str, u64>,
    /// Local endpoints being detached, by how many detaches are under way and since when:
    /// their elements go once their interface is retired, not when their record does.
    detaching: HashMap<String, (u32, Instant)>,
    /// Endpoints whose flows are to be judged again once the kernel holds their elements
    /// (a write failed: revoking before would let the flows come back).
    pending_revoke: BTreeSet<String>,
}

/// A detach that has not finished after this long was abandoned (its request went away):
/// its endpoint follows the watch again.
const DETACH_ABANDONED: Duration = Duration::from_secs(60);

/// How soon an abandoned detach whose records could not be looked up, or whose interface is
/// still there, is looked at again.
const DETACH_RECHECK: Duration = Duration::from_secs(5);

/// The start time that makes a detach count as abandoned again after `wait`.
fn retry_after(wait: Duration) -> Instant {
    let now = Instant::now();
    now.checked_sub(DETACH_ABANDONED.saturating_sub(wait))
        .unwrap_or(now)
}

impl PolicyState {
    pub(crate) fn new(me: &str) -> PolicyState {
        PolicyState {
            sets: Arc::new(std::sync::Mutex::new(PolicySets::new())),
            index: PolicyIndex::new(me),
            program: Program::new(),
            listed: false,
            stale: true,
            synced_at: Instant::now(),
            changed_here: HashMap::new(),
            seen: HashMap::new(),
            detaching: HashMap::new(),
            pending_revoke: BTreeSet::new(),
        }
    }

    /// One detach of this endpoint ended; whether others are still under way.
    fn finish_detach(&mut self, id: &str) -> bool {
        match self.detaching.get_mut(id) {
            Some((n, _)) if *n > 1 => {
                *n -= 1;
                true
            }
            _ => {
                self.detaching.remove(id);
                false
            }
        }
    }

    /// Whether a detach of this endpoint is under way here.
    fn is_detaching(&self, id: &str) -> bool {
        self.detaching
            .get(id)
            .is_some_and(|(_, since)| since.elapsed() < DETACH_ABANDONED)
    }

    /// How far the watch of `key`'s prefix has been applied.
    fn seen_for(&self, key: &str) -> u64 {
        watched_prefix(key)
            .and_then(|p| self.seen.get(p))
            .copied()
            .unwrap_or(0)
    }

    /// This host changed `key` at `revision` (and applied it): older events must not undo it.
    fn changed_here_at(&mut self, key: String, revision: u64) {
        if revision > self.seen_for(&key) {
            let at = self.changed_here.entry(key).or_insert(revision);
            *at = (*at).max(revision);
        }
    }

    /// This host's changes the watches are past need no guarding any more.
    fn forget_changes_seen(&mut self) {
        let seen = &self.seen;
        self.changed_here.retain(|key, at| {
            watched_prefix(key)
                .and_then(|p| seen.get(p))
                .is_none_or(|s| *at > *s)
        });
    }

    /// Whether this host's own change of `key` at `revision` is newer than what the index has:
    /// not if the watch (or the listing) is past it, which brought that change or a later one,
    /// nor if a later change of this host's is applied already.
    fn supersedes(&self, key: &str, revision: u64) -> bool {
        self.seen_for(key) < revision && self.changed_here.get(key).is_none_or(|&at| at <= revision)
    }

    /// Applies one store event to the index; returns what it touches.
    fn apply(&mut self, event: &Event) -> Result<Touched> {
        let key = event.key();
        let put = match event {
            Event::Put(kv) => Some(kv),
            Event::Delete { .. } => None,
        };
        if let Some(prefix) = watched_prefix(key) {
            let seen = self.seen.entry(prefix).or_insert(0);
            *seen = (*seen).max(event.revision());
        }
        if let Some(&changed_at) = self.changed_here.get(key) {
            if event.revision() < changed_at {
                // Older than this host's own change, which is applied already.
                return Ok(Touched::default());
            }
            self.changed_here.remove(key);
        }
        if let Some(name) = key.strip_prefix(keys::POLICIES) {
            return Ok(match put {
                Some(kv) => self.index.put_policy(decode(kv)?),
                None => self.index.remove_policy(name),
            });
        }
        if let Some(id) = key.strip_prefix(keys::ENDPOINTS) {
            return Ok(match put {
                Some(kv) => self.index.put_endpoint(decode(kv)?),
                None if self.is_detaching(id) => Touched::default(),
                None => self.index.remove_endpoint(id),
            });
        }
        if let Some(name) = key.strip_prefix(keys::NETWORKS) {
            return Ok(match put {
                Some(kv) => {
                    let net: Network = decode(kv)?;
                    self.index.put_network(name, gateways(&net))
                }
                None => self.index.remove_network(name),
            });
        }
        Ok(Touched::default())
    }

    /// The flows to judge again now, once the kernel holds the elements they are judged by
    /// (none while it may not).
    fn take_revocation(&mut self) -> Revoked {
        if self.stale {
            return Revoked::new();
        }
        let ids: Vec<String> = std::mem::take(&mut self.pending_revoke)
            .into_iter()
            .collect();
        self.revocation(&ids)
    }

    /// What the revocation of these endpoints' flows needs: each address with the profiles
    /// that judge it (ingress, egress; none: not isolated).
    fn revocation(&self, ids: &[String]) -> Revoked {
        let mut out = HashMap::new();
        for id in ids {
            let Some(ep) = self.index.endpoint(id).filter(|_| self.program.judges(id)) else {
                continue;
            };
            for ip in &ep.ips {
                let ip = ip.addr();
                out.insert(
                    ip,
                    [Direction::Ingress, Direction::Egress]
                        .map(|d| self.program.profile_for(d, ip)),
                );
            }
        }
        out
    }
}

/// Addresses of local endpoints whose flows are to be judged again, with the profiles that
/// judge them (ingress, egress).
type Revoked = HashMap<IpAddr, [Option<Arc<Profile>>; 2]>;

/// The gateways of a network: where its endpoints' DNS is.
fn gateways(net: &Network) -> Vec<IpAddr> {
    net.subnets.iter().map(|s| s.gateway).collect()
}

/// Whether a tracked flow is one these elements no longer allow, judged at its destination
/// (ingress) and at its source (egress), where those are endpoints of this host: the way it
/// was opened.
fn condemned(by_addr: &Revoked, f: &FlowTuple) -> bool {
    let denied_at = |target: IpAddr, peer: IpAddr, direction: Direction| {
        by_addr.get(&target).is_some_and(|profiles| {
            let profile = profiles[direction as usize].as_deref();
            !allows(profile, peer, f.protocol, f.dport)
        })
    };
    denied_at(f.dst, f.src, Direction::Ingress) || denied_at(f.src, f.dst, Direction::Egress)
}

/// A flow the other way round: what an answer already on its way when `f`'s entry was deleted
/// makes of itself.
fn reversed(f: &FlowTuple) -> FlowTuple {
    FlowTuple {
        protocol: f.protocol,
        src: f.dst,
        dst: f.src,
        sport: f.dport,
        dport: f.sport,
    }
}

const IPPROTO_TCP: u8 = 6;

/// When the conntrack table is swept again after a revocation (since the sweep before), for
/// connectionless flows re-made the other way round: an answer that was on its way when the
/// entry went makes a new entry, opened by the answering side (which its policy may allow),
/// through which the revoked side's datagrams would then pass as answers. By then those
/// answers have arrived, even late from a busy receiver's queue. (A TCP segment that would
/// do so is no SYN, and dropped.) Each sweep may itself land between an answer passing and
/// the next answer to it, which then re-makes the entry once more, and a slow server answers
/// late: so several, denser at first (at 10, 50, 150, 300, 500 ms and 1 s).
const RESWEEPS: [Duration; 6] = [
    Duration::from_millis(10),
    Duration::from_millis(40),
    Duration::from_millis(100),
    Duration::from_millis(150),
    Duration::from_millis(200),
    Duration::from_millis(500),
];

impl Agent {
    /// Writes a change to the kernel (one batch), or everything when the kernel may differ.
    /// The endpoints that lost an allowance are added to those whose flows are to be judged
    /// again ([`PolicyState::take_revocation`]); returns whether there were any. Policy
    /// changes revoke at once, with the lock held (whoever waits for the lock finds them
    /// enforced, established flows included); attaches and detaches leave it to the next
    /// tick, so as not to wait on the conntrack table.
    async fn program_policies(&self, state: &mut PolicyState, touched: Touched) -> bool {
        if touched.is_empty() || !state.listed {
            return false;
        }
        let change = state.program.update(&state.index, &touched);
        self.write_change(state, change).await
    }

    /// Writes a change the program made (see [`Agent::program_policies`]).
    async fn write_change(&self, state: &mut PolicyState, change: Change) -> bool {
        let Change {
            remove,
            add,
            revoke,
        } = change;
        let lost = !revoke.is_empty();
        state.pending_revoke.extend(revoke);
        if state.stale {
            self.sync_policies_or_retry(state).await;
        } else if !add.is_empty() || !remove.is_empty() {
            state.stale = true;
            let sets = state.sets.clone();
            match kernel(move || sets.lock().expect("policy sets lock").apply(&remove, &add)).await
            {
                Ok(_) => state.stale = false,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot program policies; writing them all");
                    self.sync_policies_or_retry(state).await;
                }
            }
        }
        lost
    }

    /// Deletes the conntrack entries of flows these endpoints' elements no longer allow: the
    /// next packet of such a flow is judged as a new connection, and dropped. Connectionless
    /// flows re-made the other way round by answers on their way go too (see [`RESWEEPS`]).
    async fn revoke_flows(&self, by_addr: Revoked) {
        if by_addr.is_empty() {
            return;
        }
        let ipv4 = by_addr.keys().any(IpAddr::is_ipv4);
        let ipv6 = by_addr.keys().any(IpAddr::is_ipv6);
        let swept = kernel(move || {
            let mut ended = Vec::new();
            conntrack::delete_flows_where(ipv4, ipv6, |f| {
                let doomed = condemned(&by_addr, f);
                if doomed && f.protocol != IPPROTO_TCP && f.sport.is_some() {
                    ended.push(reversed(f));
                }
                doomed
            })
            .map(|n| (n, ended))
        })
        .await;
        let answers: HashSet<FlowTuple> = match swept {
            Ok((0, _)) => return,
            Ok((n, ended)) => {
                tracing::info!(flows = n, "flows a policy no longer allows ended");
                ended.into_iter().collect()
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot end flows a policy no longer allows");
                return;
            }
        };
        if answers.is_empty() {
            return;
        }
        let answers = Arc::new(answers);
        tokio::spawn(async move {
            for wait in RESWEEPS {
                tokio::time::sleep(wait).await;
                let answers = answers.clone();
                let swept = kernel(move || {
                    conntrack::delete_flows_where(ipv4, ipv6, |f| answers.contains(f))
                })
                .await;
                if let Err(e) = swept {
                    tracing::warn!(error = %e, "cannot end flows a policy no longer allows");
                }
            }
        });
    }

    /// Makes the kernel's policy sets hold exactly what is wanted, in one transaction.
    async fn sync_policies(&self, state: &mut PolicyState) -> Result<()> {
        state.stale = true;
        let all = state.program.elements();
        let sets = state.sets.clone();
        kernel(move || sets.lock().expect("policy sets lock").replace(&all)).await?;
        state.stale = false;
        state.synced_at = Instant::now();
        Ok(())
    }

    async fn sync_policies_or_retry(&self, state: &mut PolicyState) {
        if let Err(e) = self.sync_policies(state).await {
            tracing::warn!(error = %e, "cannot write the policy sets; retrying");
        }
    }

    /// After berth's table was restored: the policy sets are written again.
    pub(crate) async fn resync_policies(&self) -> Result<()> {
        let mut state = self.policy_state.lock().await;
        if !state.listed {
            return Ok(());
        }
        self.sync_policies(&mut state).await
    }

    /// An endpoint of this host is about to get its interface: its elements go in first, so
    /// the first packet it sends or receives is judged by policy.
    pub(crate) async fn policy_endpoint_up(&self, ep: &Endpoint) -> Result<()> {
        let mut state = self.policy_state.lock().await;
        if !state.listed {
            // The daemon lists before it serves: an endpoint is never let in unjudged.
            return Err(AgentError::Internal("policies are not loaded yet".into()));
        }
        let s = &mut *state;
        let dirty = s.index.put_endpoint(ep.clone());
        let before = s.program.len();
        let change = s.program.update(&s.index, &dirty);
        if s.program.len() > MAX_HOST_ELEMENTS && s.program.len() > before {
            // Undone before anything reaches the kernel: the two changes cancel out.
            let size = s.program.len();
            let undo = s.index.remove_endpoint(&ep.id);
            s.program.update(&s.index, &undo);
            return Err(AgentError::Conflict(format!(
                "the policies that select this endpoint would take this host's policy elements \
                 to {size}, over the limit of {MAX_HOST_ELEMENTS}: simplify the policies of \
                 network {:?}",
                ep.network
            )));
        }
        self.write_change(&mut state, change).await;
        // Nothing of its own to revoke: it is new (the flows of an earlier holder of its
        // addresses ended with that one's detach); the others only gain.
        state.pending_revoke.remove(&ep.id);
        // Refused only if this endpoint is judged and the kernel may not have its elements:
        // a failed write elsewhere must not stop attaches that no policy selects.
        if state.stale && state.program.judges(&ep.id) {
            return Err(AgentError::Internal(
                "the endpoint's policy could not be written to the kernel".into(),
            ));
        }
        Ok(())
    }

    /// An endpoint of this host is being detached: its record may go from the index's
    /// watch, but its elements stay until [`Agent::policy_endpoint_down`].
    pub(crate) async fn policy_endpoint_detaching(&self, id: &str) {
        let mut state = self.policy_state.lock().await;
        let entry = state
            .detaching
            .entry(id.to_string())
            .or_insert((0, Instant::now()));
        entry.0 += 1;
        entry.1 = Instant::now();
    }

    /// A detached endpoint's interface is retired (its records went at `revision`): its
    /// elements go, and other endpoints lose what they allowed it.
    pub(crate) async fn policy_endpoint_down(&self, ep: &Endpoint, revision: u64) {
        let mut state = self.policy_state.lock().await;
        state.finish_detach(&ep.id);
        state.changed_here_at(keys::endpoint(&ep.id), revision);
        // Whether policy may have judged its flows: its own elements may be gone already (an
        // attach that raced this detach, a detach found abandoned), its network's policies
        // tell.
        let judged =
            state.program.judges(&ep.id) || state.index.policies().any(|p| p.network == ep.network);
        let pending_before = state.pending_revoke.clone();
        let dirty = state.index.remove_endpoint(&ep.id);
        let others_lost = self.program_policies(&mut state, dirty).await;
        if judged || others_lost {
            // What the others lost was about its addresses only, whose flows end here: no
            // second reading of the conntrack table for them.
            state
                .pending_revoke
                .retain(|id| pending_before.contains(id));
        }
        // Its flows end when the reaper releases its addresses (see
        // `Agent::end_flows_of_released`), off the detach's path: a later holder of its
        // addresses must not inherit an entry that bypasses policy.
    }

    /// Deletes the conntrack entries of every flow from or to the endpoint's addresses.
    async fn end_flows_of(&self, ep: &Endpoint) {
        self.end_flows_of_all(std::slice::from_ref(ep)).await;
    }

    /// Deletes the conntrack entries of every flow from or to these endpoints' addresses, in
    /// one reading of the conntrack table.
    async fn end_flows_of_all(&self, eps: &[Endpoint]) {
        let addrs: HashSet<IpAddr> = eps
            .iter()
            .flat_map(|ep| ep.ips.iter().map(|n| n.addr()))
            .collect();
        if addrs.is_empty() {
            return;
        }
        let ipv4 = addrs.iter().any(IpAddr::is_ipv4);
        let ipv6 = addrs.iter().any(IpAddr::is_ipv6);
        let ended = kernel(move || {
            conntrack::delete_flows_where(ipv4, ipv6, |f| {
                addrs.contains(&f.src) || addrs.contains(&f.dst)
            })
        })
        .await;
        if let Err(e) = ended {
            tracing::warn!(error = %e, "cannot end detached endpoints' flows");
        }
    }

    /// Ends the flows of detached endpoints whose addresses the reaper is about to release,
    /// if a policy may have judged them (there is one): a later holder of their addresses
    /// must not inherit an entry that bypasses policy. One reading of the conntrack table for
    /// the whole batch.
    pub(crate) async fn end_flows_of_released(&self, eps: &[Endpoint]) {
        let any = self
            .policy_state
            .lock()
            .await
            .index
            .policies()
            .next()
            .is_some();
        if any {
            self.end_flows_of_all(eps).await;
        }
    }

    /// An endpoint of this host whose attach failed before its interface was made: its
    /// elements go.
    pub(crate) async fn policy_endpoint_gone(&self, ep: &Endpoint) {
        let mut state = self.policy_state.lock().await;
        let dirty = state.index.remove_endpoint(&ep.id);
        self.program_policies(&mut state, dirty).await;
    }

    /// A detach found the endpoint's record gone already: another detach is retiring it
    /// (and removes its elements when done), or it is a leftover, whose elements go now.
    pub(crate) async fn policy_detach_found_gone(&self, ep: &Endpoint) {
        let mut state = self.policy_state.lock().await;
        if state.finish_detach(&ep.id) {
            return;
        }
        let dirty = state.index.remove_endpoint(&ep.id);
        self.program_policies(&mut state, dirty).await;
    }

    /// A detach that gave up before its commit: the endpoint stays, and follows the watch
    /// again.
    pub(crate) async fn policy_detach_abandoned(&self, id: &str) {
        self.policy_state.lock().await.finish_detach(id);
    }

    /// Runs for the life of the daemon: follow the watches until one fails, list again.
    pub async fn run_policy_reconciler(self: std::sync::Arc<Self>, first: Vec<Watch>) {
        let mut watches = Some(first);
        loop {
            let opened = match watches.take() {
                Some(w) => Ok(w),
                None => self.list_policies().await,
            };
            match opened {
                Ok(w) => {
                    let why = self.follow_policies(w).await;
                    tracing::info!("policy watch ended ({why}); listing again");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot list policies; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }

    /// Lists policies, endpoints and networks into a fresh index, writes every element (one
    /// transaction: the kernel goes from the old elements to the new with nothing between)
    /// and opens the watches from the listings' revisions. The lock is held throughout, so
    /// that no change of this host's is programmed from the old index meanwhile and then
    /// lost with it.
    pub async fn list_policies(&self) -> Result<Vec<Watch>> {
        let mut state = self.policy_state.lock().await;
        let mut fresh = PolicyState::new(&self.host.id);
        let mut watches = Vec::new();
        for prefix in WATCHED {
            let listing = self.store.list(prefix).await?;
            for kv in &listing.items {
                if let Err(e) = fresh.apply(&Event::Put(kv.clone())) {
                    tracing::error!(key = %kv.key, error = %e, "bad record in the store; skipped");
                }
            }
            fresh.seen.insert(prefix, listing.revision);
            watches.push(self.store.watch(prefix, listing.revision).await?);
        }
        // This host's changes the listings do not show yet still hold against older events
        // the new watches may bring.
        for (key, at) in std::mem::take(&mut state.changed_here) {
            fresh.changed_here_at(key, at);
        }
        // Endpoints being detached keep their elements until they are retired.
        let detaching: Vec<String> = state
            .detaching
            .keys()
            .filter(|id| state.is_detaching(id))
            .cloned()
            .collect();
        for id in &detaching {
            if fresh.index.endpoint(id).is_none()
                && let Some(ep) = state.index.endpoint(id)
            {
                fresh.index.put_endpoint(ep.clone());
            }
            if let Some(d) = state.detaching.get(id) {
                fresh.detaching.insert(id.clone(), *d);
            }
        }
        let locals = Touched {
            endpoints: fresh
                .index
                .local_endpoints()
                .map(|e| e.id.clone())
                .collect(),
            ..Touched::default()
        };
        fresh.listed = true;
        let (index, program) = (&fresh.index, &mut fresh.program);
        program.update(index, &locals);
        // Numbered as the kernel's profiles are, so that what is in force stays put.
        let sets = state.sets.clone();
        match kernel(move || sets.lock().expect("policy sets lock").elements()).await {
            Ok(held) => fresh.program.adopt_numbers(&held),
            Err(e) => {
                tracing::info!(error = %e, "the kernel's policy is not berth's as it is: written anew")
            }
        }
        fresh.sets = state.sets.clone();
        *state = fresh;
        self.sync_policies(&mut state).await?;
        // Flows of the time the watch was down are judged once against the new elements.
        let ids: Vec<String> = state
            .index
            .local_endpoints()
            .map(|e| e.id.clone())
            .filter(|id| state.program.judges(id))
            .collect();
        let by_addr = state.revocation(&ids);
        self.revoke_flows(by_addr).await;
        Ok(watches)
    }

    /// Applies events as they come, with those already waiting; returns why it stopped.
    async fn follow_policies(&self, mut watches: Vec<Watch>) -> String {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            let [policies, endpoints, networks] = &mut watches[..] else {
                return "watches missing".into();
            };
            let first = tokio::select! {
                e = policies.next() => Some(e),
                e = endpoints.next() => Some(e),
                e = networks.next() => Some(e),
                _ = tick.tick() => None,
            };
            let mut events = Vec::new();
            match first {
                Some(Ok(e)) => events.push(e),
                Some(Err(e)) => return e.to_string(),
                None => {
                    self.policy_tick().await;
                    continue;
                }
            }
            if let Err(e) = crate::ready_events(
                &mut [&mut *policies, &mut *endpoints, &mut *networks],
                &mut events,
            )
            .await
            {
                return e;
            }
            let mut state = self.policy_state.lock().await;
            let mut dirty = Touched::default();
            let mut arrived = Vec::new();
            for event in &events {
                if let Event::Put(kv) = event
                    && let Some(id) = kv.key.strip_prefix(keys::ENDPOINTS)
                    && state.index.endpoint(id).is_none()
                {
                    arrived.push(id.to_string());
                }
                match state.apply(event) {
                    Ok(touched) => dirty.extend(touched),
                    Err(e) => {
                        tracing::error!(key = %event.key(), error = %e, "bad record in the store")
                    }
                }
            }
            // Under the lock: a request that made this change may be waiting for it, and
            // must find the flows ended when it gets the lock.
            self.program_policies(&mut state, dirty).await;
            // A new endpoint has no flows to judge again (as in `policy_endpoint_up`): not
            // asking the kernel for its flows keeps the lock short for the next attach.
            for id in &arrived {
                state.pending_revoke.remove(id);
            }
            let revoked = state.take_revocation();
            self.revoke_flows(revoked).await;
        }
    }

    /// Each second: a failed change is retried; every [`RESYNC`] the kernel's elements are
    /// read back and rewritten if anything changed them.
    async fn policy_tick(&self) {
        let mut state = self.policy_state.lock().await;
        if !state.listed {
            return;
        }
        if state.stale {
            self.sync_policies_or_retry(&mut state).await;
        }
        self.forget_abandoned_detaches(&mut state).await;
        state.forget_changes_seen();
        let revoked = state.take_revocation();
        self.revoke_flows(revoked).await;
        if state.stale || state.synced_at.elapsed() < RESYNC {
            return;
        }
        let want = state.program.elements();
        let sets = state.sets.clone();
        match kernel(move || sets.lock().expect("policy sets lock").elements()).await {
            Ok(mut got) => {
                got.sort();
                if got == want {
                    state.synced_at = Instant::now();
                } else {
                    tracing::warn!("the kernel's policy sets were changed; writing them again");
                    self.sync_policies_or_retry(&mut state).await;
                }
            }
            Err(e) => {
                // Something there that is no policy element, say: rewritten.
                tracing::warn!(error = %e, "cannot read the policy sets; writing them again");
                self.sync_policies_or_retry(&mut state).await;
            }
        }
    }

    /// Detaches that never finished (their request failed or went away after their commit):
    /// an endpoint whose record is gone leaves the index, which ignored its deletion.
    async fn forget_abandoned_detaches(&self, state: &mut PolicyState) {
        let abandoned: Vec<(String, (u32, Instant))> = state
            .detaching
            .iter()
            .filter(|(id, _)| !state.is_detaching(id))
            .map(|(id, d)| (id.clone(), *d))
            .collect();
        let mut dirty = Touched::default();
        let mut gone = Vec::new();
        for (id, detach) in abandoned {
            // Its interface may still be on its bridge until the reaper deletes it (then its
            // `releasing/` record goes too): its elements stay until both records are gone.
            let records = async {
                Ok::<_, AgentError>((
                    self.store.get(&keys::endpoint(&id)).await?.is_some(),
                    self.store.get(&keys::releasing(&id)).await?.is_some(),
                ))
            };
            match records.await {
                Ok((false, false)) => {
                    state.detaching.remove(&id);
                    if let Some(ep) = state.index.endpoint(&id) {
                        gone.push(ep.clone());
                    }
                    dirty.extend(state.index.remove_endpoint(&id));
                }
                Ok((false, true)) => {
                    // Detached, its interface not deleted yet: the reaper's to do.
                    self.reaper.notify_one();
                    state
                        .detaching
                        .insert(id, (detach.0, retry_after(DETACH_RECHECK)));
                }
                Ok((true, _)) => {
                    state.detaching.remove(&id);
                }
                Err(e) => {
                    state
                        .detaching
                        .insert(id.clone(), (detach.0, retry_after(DETACH_RECHECK)));
                    tracing::warn!(endpoint = %id, error = %e, "cannot look up an endpoint whose detach was abandoned");
                }
            }
        }
        self.program_policies(state, dirty).await;
        for ep in gone {
            self.end_flows_of(&ep).await;
        }
    }

    /// Creates a policy (`replace`: or replaces the one of that name), enforced on this host
    /// before it answers; other hosts follow their watch.
    pub async fn put_policy(&self, policy: Policy, replace: bool) -> Result<Value> {
        let mut views = self.put_policies(vec![policy], replace).await?;
        Ok(views.remove(0))
    }

    /// Writes policies in one store transaction and one kernel change (`berth policy apply
    /// -f`): a file that denies everything and allows some is never half there, so no flow
    /// the whole file allows is revoked on the way.
    pub async fn put_policies(&self, policies: Vec<Policy>, replace: bool) -> Result<Vec<Value>> {
        if policies.is_empty() {
            return Err(AgentError::Invalid("no policy given".into()));
        }
        let mut names = HashSet::new();
        let mut checked = Vec::with_capacity(policies.len());
        for policy in policies {
            policy.validate()?;
            if !names.insert(policy.name.clone()) {
                return Err(AgentError::Invalid(format!(
                    "policy {:?} is given twice",
                    policy.name
                )));
            }
            // Stored as it reads back, so that what `inspect` shows is what was applied.
            checked.push(policy.normalized());
        }
        self.check_budgets(&checked).await?;
        let networks: BTreeSet<&str> = checked.iter().map(|p| p.network.as_str()).collect();
        let ops = networks.len() + checked.len() * if replace { 1 } else { 2 };
        if ops > crate::MAX_TXN_OPS {
            return Err(AgentError::Invalid(format!(
                "too many policies in one request: {} policies on {} networks take {ops} store operations, at most {} in one transaction: split them",
                checked.len(),
                networks.len(),
                crate::MAX_TXN_OPS
            )));
        }
        let mut txn = Txn::new();
        for name in networks {
            let (net, net_rev) = self
                .load::<Network>(&keys::network(name))
                .await?
                .ok_or_else(|| AgentError::NotFound(format!("no network named {name:?}")))?;
            if net.removing {
                return Err(AgentError::Conflict(format!(
                    "network {name:?} is being removed"
                )));
            }
            txn = txn.when(Compare::ModRevision(keys::network(name), net_rev));
        }
        for policy in &checked {
            let key = keys::policy(&policy.name);
            if !replace {
                txn = txn.when(Compare::Absent(key.clone()));
            }
            txn = txn.put(key, encode(policy));
        }
        let revision = match self.commit(txn).await? {
            TxnOutcome::Committed { revision } => revision,
            TxnOutcome::CompareFailed(Compare::Absent(key)) => {
                return Err(AgentError::Conflict(format!(
                    "a policy named {:?} exists (`berth policy apply` replaces it)",
                    key.strip_prefix(keys::POLICIES).unwrap_or(&key)
                )));
            }
            TxnOutcome::CompareFailed(_) => {
                return Err(AgentError::Conflict(
                    "a policy's network changed meanwhile; try again".into(),
                ));
            }
        };
        let mut state = self.policy_state.lock().await;
        let mut dirty = Touched::default();
        for policy in &checked {
            let key = keys::policy(&policy.name);
            // A later change of it may have come through the watch already.
            if state.supersedes(&key, revision) {
                state.changed_here_at(key, revision);
                dirty.extend(state.index.put_policy(policy.clone()));
            }
        }
        self.program_policies(&mut state, dirty).await;
        let revoked = state.take_revocation();
        self.revoke_flows(revoked).await;
        let stale = state.stale;
        let views = checked
            .iter()
            .map(|p| policy_view(&state.index, p))
            .collect();
        drop(state);
        for p in &checked {
            tracing::info!(policy = %p.name, network = %p.network, replace, "policy written");
        }
        if stale {
            return Err(AgentError::Internal(
                "the policy is stored, but this host's kernel refused it; retrying every second"
                    .into(),
            ));
        }
        Ok(views)
    }

    /// Refuses policies whose kernel form is too big, on their own or for this host with
    /// everything else it holds ([`MAX_POLICY_ELEMENTS`], [`MAX_HOST_ELEMENTS`]): checked
    /// against the endpoints there are now, before anything is written.
    async fn check_budgets(&self, policies: &[Policy]) -> Result<()> {
        let mut state = self.policy_state.lock().await;
        for p in policies {
            let cost = state.index.cost(p);
            if cost > MAX_POLICY_ELEMENTS {
                return Err(AgentError::Invalid(format!(
                    "policy {:?} compiles to {cost} kernel elements, {} over the limit of \
                     {MAX_POLICY_ELEMENTS} per policy: use fewer peers, exceptions or ports, or \
                     split it",
                    p.name,
                    cost - MAX_POLICY_ELEMENTS
                )));
            }
        }
        if !state.listed {
            return Ok(());
        }
        // A policy joins at most every profile there is and one of its own: when even that
        // fits, there is nothing to try.
        let bound: usize = policies.iter().map(|p| state.index.cost(p)).sum::<usize>()
            * (state.program.profiles().count() + 1);
        if state.program.len() + bound <= MAX_HOST_ELEMENTS {
            return Ok(());
        }
        // This host with them: tried on a copy of the program, the index put back after.
        let mut trial = state.program.clone();
        let mut touched = Touched::default();
        let mut undo = Vec::new();
        for p in policies {
            undo.push((p.name.clone(), state.index.policy(&p.name).cloned()));
            touched.extend(state.index.put_policy(p.clone()));
        }
        trial.update(&state.index, &touched);
        for (name, old) in undo.into_iter().rev() {
            match old {
                Some(old) => state.index.put_policy(old),
                None => state.index.remove_policy(&name),
            };
        }
        let (now, then) = (state.program.len(), trial.len());
        if then > MAX_HOST_ELEMENTS && then > now {
            let names: Vec<&str> = policies.iter().map(|p| p.name.as_str()).collect();
            return Err(AgentError::Invalid(format!(
                "with policy {} this host would hold {then} policy elements, {} over its limit \
                 of {MAX_HOST_ELEMENTS}: simplify the policies that select its endpoints",
                names.join(", "),
                then - MAX_HOST_ELEMENTS
            )));
        }
        Ok(())
    }

    pub async fn delete_policy(&self, name: &str) -> Result<()> {
        let key = keys::policy(name);
        let Some(kv) = self.store.get(&key).await? else {
            return Err(AgentError::NotFound(format!("no policy named {name:?}")));
        };
        let txn = Txn::new()
            .when(Compare::ModRevision(key.clone(), kv.mod_revision))
            .delete(key.clone());
        let revision = match self.commit(txn).await? {
            TxnOutcome::Committed { revision } => revision,
            TxnOutcome::CompareFailed(_) => {
                return Err(AgentError::Conflict(format!(
                    "policy {name:?} changed while being removed; try again"
                )));
            }
        };
        let mut state = self.policy_state.lock().await;
        let dirty = if state.supersedes(&key, revision) {
            state.changed_here_at(key, revision);
            state.index.remove_policy(name)
        } else {
            Touched::default()
        };
        self.program_policies(&mut state, dirty).await;
        // Removing a policy can take allowances away: another one still isolates.
        let revoked = state.take_revocation();
        self.revoke_flows(revoked).await;
        drop(state);
        tracing::info!(policy = %name, "policy removed");
        Ok(())
    }

    pub async fn policies(&self, network: Option<&str>) -> Result<Vec<Value>> {
        let mut all: Vec<Policy> = self
            .load_all::<Policy>(keys::POLICIES)
            .await?
            .into_iter()
            .filter(|p| network.is_none_or(|n| p.network == n))
            .collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        let state = self.policy_state.lock().await;
        Ok(all.iter().map(|p| policy_view(&state.index, p)).collect())
    }

    pub async fn policy(&self, name: &str) -> Result<Value> {
        let (policy, _) = self
            .load::<Policy>(&keys::policy(name))
            .await?
            .ok_or_else(|| AgentError::NotFound(format!("no policy named {name:?}")))?;
        let state = self.policy_state.lock().await;
        Ok(policy_view(&state.index, &policy))
    }

    pub(crate) async fn policies_on(&self, network: &str) -> Result<Vec<String>> {
        Ok(self
            .load_all::<Policy>(keys::POLICIES)
            .await?
            .into_iter()
            .filter(|p| p.network == network)
            .map(|p| p.name)
            .collect())
    }

    /// Whether a connection from `src` to `dst` (endpoint ids, names or addresses) on `port`
    /// (`80/tcp`, `53/udp`; none: a protocol without ports, such as ping) is allowed, and
    /// what decides it, from the elements the kernel gets.
    pub async fn explain_policy(
        &self,
        src: &str,
        dst: &str,
        port: Option<&str>,
    ) -> Result<Explanation> {
        let port = port.map(parse_probe_port).transpose()?;
        // A service's VIP is no endpoint: the connection goes to one of its backends.
        let service = match dst.parse::<IpAddr>() {
            Ok(ip) => self.service_at(ip).await.map(|s| (ip, s)),
            Err(_) => None,
        };
        let state = self.policy_state.lock().await;
        // An address is judged as the address (its family), whoever holds it.
        let party = |what: &str| -> Result<Party> {
            if let Ok(ip) = what.parse::<IpAddr>() {
                return Ok(Party::Address(ip));
            }
            match state.index.find(what) {
                Some(ep) => Ok(Party::Endpoint(ep.id.clone())),
                None => Err(AgentError::NotFound(format!(
                    "{what:?} is neither an endpoint (id, name or address) nor an IP address"
                ))),
            }
        };
        let (src, dst) = (party(src)?, party(dst)?);
        Ok(match service {
            Some((vip, (svc, backends))) => state
                .index
                .explain_service(&src, &svc, vip, &backends, port),
            None => state.index.explain(&src, &dst, port),
        })
    }
}

/// `PORT[/PROTO]` of `policy explain` (TCP when the protocol is left out).
fn parse_probe_port(s: &str) -> Result<(Protocol, u16)> {
    let (port, proto) = s.split_once('/').unwrap_or((s, "tcp"));
    let bad = || {
        AgentError::Invalid(format!(
            "invalid port {s:?}: expected PORT[/tcp|udp|sctp], PORT from 1 to 65535"
        ))
    };
    let port: u16 = port.parse().map_err(|_| bad())?;
    if port == 0 {
        return Err(bad());
    }
    Ok((proto.parse().map_err(|_| bad())?, port))
}

/// A policy as the API shows it: its document, with the endpoints it selects under `status`.
fn policy_view(index: &PolicyIndex, policy: &Policy) -> Value {
    let mut v = serde_json::to_value(policy).expect("policies serialise");
    let selected: Vec<Value> = index
        .selected_by(&policy.name)
        .into_iter()
        .map(|ep| {
            serde_json::json!({
                "endpoint": ep.id,
                "name": ep.name,
                "host": ep.host,
                "ips": ep.ips.iter().map(|n| n.addr()).collect::<Vec<_>>(),
            })
        })
        .collect();
    if let Value::Object(m) = &mut v {
        m.insert(
            "status".into(),
            serde_json::json!({ "selectedEndpoints": selected }),
        );
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_ports_are_checked() {
        assert_eq!(parse_probe_port("80").unwrap(), (Protocol::Tcp, 80));
        assert_eq!(parse_probe_port("53/udp").unwrap(), (Protocol::Udp, 53));
        for bad in ["0", "70000", "x/tcp", "80/icmp", ""] {
            assert!(parse_probe_port(bad).is_err(), "{bad}");
        }
    }
}
