//! What the kernel holds for this host's endpoints, and the changes that keep it in step with
//! the index: each target points at the profile of its key, each profile is compiled once for
//! all the targets that share it, and a change recompiles only the profiles it may have
//! changed and moves only the targets whose keys changed.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use crate::{Direction, PolicyElement, PolicyIndex, Profile, ProfileId, ProfileKey, Touched};

/// The kernel elements a change adds and removes (one batch: removals first), and the local
/// endpoints that may have lost an allowance, whose established flows are to be judged again.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Change {
    pub remove: Vec<PolicyElement>,
    pub add: Vec<PolicyElement>,
    pub revoke: BTreeSet<String>,
}

impl Change {
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.add.is_empty()
    }
}

/// The most elements a profile's content changes by under its number; a bigger change makes
/// it anew under another number, which its targets move to once it is whole, so that the
/// kernel never has to change a big profile in place in one transaction.
pub const MAX_IN_PLACE: usize = 1024;

/// One target: an address of a local endpoint, judged in a direction by a profile.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    direction: Direction,
    address: IpAddr,
    key: Arc<ProfileKey>,
}

#[derive(Debug, Clone)]
struct Compiled {
    id: ProfileId,
    profile: Arc<Profile>,
    /// The local endpoints with a target judged by it.
    users: BTreeSet<String>,
}

/// The program: from the index's local endpoints to the kernel's policy elements.
#[derive(Debug, Clone, Default)]
pub struct Program {
    endpoints: BTreeMap<String, Vec<Target>>,
    profiles: HashMap<Arc<ProfileKey>, Compiled>,
    ids: HashMap<ProfileId, Arc<ProfileKey>>,
    /// Who claims each target, with the profile each would give it: the first claimant's is
    /// in force (two endpoints share an address only through a stale record).
    claims: BTreeMap<(Direction, IpAddr), BTreeMap<String, ProfileId>>,
    /// How many elements the kernel holds.
    len: usize,
}

impl Program {
    pub fn new() -> Program {
        Program::default()
    }

    /// How many elements the kernel should hold.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every element the kernel should hold, sorted.
    pub fn elements(&self) -> Vec<PolicyElement> {
        let mut out: Vec<PolicyElement> = self
            .profiles
            .iter()
            .flat_map(|(key, c)| c.profile.elements(key.direction, c.id))
            .chain(self.claims.iter().filter_map(|(&(direction, target), by)| {
                let (_, &profile) = by.iter().next()?;
                Some(PolicyElement::Target {
                    direction,
                    target,
                    profile,
                })
            }))
            .collect();
        out.sort_unstable();
        out
    }

    /// The profile that judges a target in `direction`, `None` when nothing isolates it.
    pub fn profile_for(&self, direction: Direction, target: IpAddr) -> Option<Arc<Profile>> {
        let (_, id) = self.claims.get(&(direction, target))?.iter().next()?;
        let key = self.ids.get(id)?;
        Some(self.profiles.get(key)?.profile.clone())
    }

    /// Whether a policy judges the endpoint (it has a target).
    pub fn judges(&self, id: &str) -> bool {
        self.endpoints.contains_key(id)
    }

    /// The profiles in force and their sizes, by key (for `explain` and the budgets).
    pub fn profiles(&self) -> impl Iterator<Item = (&ProfileKey, ProfileId, &Profile)> {
        self.profiles
            .iter()
            .map(|(k, c)| (k.as_ref(), c.id, c.profile.as_ref()))
    }

    /// Brings the program in line with the index after a change that touched `touched`, and
    /// returns the kernel change that does the same.
    pub fn update(&mut self, index: &PolicyIndex, touched: &Touched) -> Change {
        let mut change = Change::default();
        // The profiles whose content may have changed, compiled again below if still used.
        let mut dirty: Vec<Arc<ProfileKey>> = self
            .profiles
            .keys()
            .filter(|k| touched.dirties(k))
            .cloned()
            .collect();
        // The touched endpoints' targets as they will be, and what was in force at every
        // target they had or will have.
        let retargeted: Vec<(String, Vec<Target>)> = touched
            .endpoints
            .iter()
            .map(|id| (id.clone(), self.targets_of(index, id)))
            .collect();
        dirty.extend(self.rekey(&retargeted));
        let mut moved: BTreeSet<(Direction, IpAddr)> = retargeted
            .iter()
            .flat_map(|(id, new)| {
                new.iter()
                    .chain(self.endpoints.get(id).into_iter().flatten())
            })
            .map(|t| (t.direction, t.address))
            .collect();
        let mut before: HashMap<(Direction, IpAddr), Option<ProfileId>> = moved
            .iter()
            .map(|&(d, a)| ((d, a), self.in_force(d, a)))
            .collect();
        for (id, new) in retargeted {
            let id = &id;
            let old = self.endpoints.remove(id).unwrap_or_default();
            for t in &old {
                self.unclaim(id, t);
            }
            for t in &new {
                let compiled = match self.profiles.get_mut(&t.key) {
                    Some(c) => c,
                    None => {
                        let profile = Arc::new(index.compile_profile(&t.key));
                        let id = self.free_id(&t.key);
                        self.ids.insert(id, t.key.clone());
                        self.len += profile.size();
                        change.add.extend(profile.elements(t.key.direction, id));
                        self.profiles.entry(t.key.clone()).or_insert(Compiled {
                            id,
                            profile,
                            users: BTreeSet::new(),
                        })
                    }
                };
                compiled.users.insert(id.clone());
                let profile = compiled.id;
                self.claims
                    .entry((t.direction, t.address))
                    .or_default()
                    .insert(id.clone(), profile);
            }
            if !new.is_empty() {
                self.endpoints.insert(id.clone(), new);
            }
        }
        // Profiles no target uses any more go.
        let unused: Vec<Arc<ProfileKey>> = self
            .profiles
            .iter()
            .filter(|(_, c)| c.users.is_empty())
            .map(|(k, _)| k.clone())
            .collect();
        for key in unused {
            let c = self.profiles.remove(&key).expect("listed above");
            self.ids.remove(&c.id);
            self.len -= c.profile.size();
            change
                .remove
                .extend(c.profile.elements(key.direction, c.id));
        }
        // Profiles whose content may have changed: their elements follow it, under the same
        // number, or, when much changed, under a new one that their targets move to once it
        // is whole (see `MAX_IN_PLACE`). Their targets' flows are judged again if they lost
        // anything.
        let mut retired: Vec<ProfileId> = Vec::new();
        for key in dirty {
            let Some(c) = self.profiles.get(&key) else {
                continue;
            };
            let fresh = index.compile_profile(&key);
            if fresh == *c.profile {
                continue;
            }
            let old: HashSet<PolicyElement> = c
                .profile
                .elements(key.direction, c.id)
                .into_iter()
                .collect();
            let new: HashSet<PolicyElement> =
                fresh.elements(key.direction, c.id).into_iter().collect();
            let lost = old.difference(&new).count() > 0;
            let in_place = old.symmetric_difference(&new).count() <= MAX_IN_PLACE;
            let (old_id, users) = (c.id, c.users.clone());
            let id = if in_place {
                change.remove.extend(old.difference(&new).copied());
                change.add.extend(new.difference(&old).copied());
                old_id
            } else {
                let id = self.free_id_but(&key, &retired);
                retired.push(old_id);
                change.remove.extend(old);
                change.add.extend(fresh.elements(key.direction, id));
                self.ids.remove(&old_id);
                self.ids.insert(id, key.clone());
                // Every target of the profile moves to the new number.
                for user in &users {
                    for t in self.endpoints.get(user).into_iter().flatten() {
                        if t.key != key {
                            continue;
                        }
                        let at = (t.direction, t.address);
                        if moved.insert(at) {
                            before.insert(at, self.in_force(t.direction, t.address));
                        }
                    }
                    for t in self.endpoints.get(user).into_iter().flatten() {
                        if t.key == key
                            && let Some(p) = self
                                .claims
                                .get_mut(&(t.direction, t.address))
                                .and_then(|by| by.get_mut(user))
                        {
                            *p = id;
                        }
                    }
                }
                id
            };
            let c = self.profiles.get_mut(&key).expect("looked up above");
            self.len = self.len - c.profile.size() + fresh.size();
            c.profile = Arc::new(fresh);
            c.id = id;
            if lost {
                change.revoke.extend(users);
            }
        }
        // Targets whose profile in force changed.
        for (direction, target) in moved {
            let was = before[&(direction, target)];
            let now = self.in_force(direction, target);
            if was == now {
                continue;
            }
            if let Some(profile) = was {
                self.len -= 1;
                change.remove.push(PolicyElement::Target {
                    direction,
                    target,
                    profile,
                });
            }
            if let Some(profile) = now {
                self.len += 1;
                change.add.push(PolicyElement::Target {
                    direction,
                    target,
                    profile,
                });
                // Judged by another profile (or judged at all) now: what it had may be gone.
                if let Some(by) = self.claims.get(&(direction, target)) {
                    change.revoke.extend(by.keys().cloned());
                }
            }
        }
        // An element let go of and taken again in one change stays.
        let removed: HashSet<PolicyElement> = change.remove.iter().copied().collect();
        let added: HashSet<PolicyElement> = change.add.iter().copied().collect();
        change.remove.retain(|e| !added.contains(e));
        change.add.retain(|e| !removed.contains(e));
        change.remove.sort_unstable();
        change.add.sort_unstable();
        change.revoke.retain(|id| self.endpoints.contains_key(id));
        change
    }

    /// Profiles whose every target moves to one new key (a policy added to or removed from
    /// all the endpoints that share them: the common case) take that key, keeping their
    /// number, so that the change is a difference of their content rather than a new
    /// profile and every target moved. Returns the keys to compile again.
    fn rekey(&mut self, retargeted: &[(String, Vec<Target>)]) -> Vec<Arc<ProfileKey>> {
        // For each old key of a touched endpoint, the keys its targets of that direction
        // move to.
        let mut moves: HashMap<Arc<ProfileKey>, BTreeSet<Arc<ProfileKey>>> = HashMap::new();
        let mut movers: HashMap<Arc<ProfileKey>, BTreeSet<&str>> = HashMap::new();
        for (id, new) in retargeted {
            for old in self.endpoints.get(id).into_iter().flatten() {
                let to = new
                    .iter()
                    .find(|t| t.direction == old.key.direction && t.address == old.address)
                    .map(|t| t.key.clone());
                let entry = moves.entry(old.key.clone()).or_default();
                match to {
                    Some(k) => {
                        entry.insert(k);
                    }
                    // Not judged any more in that direction: no single key to move to.
                    None => {
                        entry.insert(old.key.clone());
                    }
                }
                movers.entry(old.key.clone()).or_default().insert(id);
            }
        }
        let mut rekeyed = Vec::new();
        let mut taken: BTreeSet<Arc<ProfileKey>> = BTreeSet::new();
        for (old, to) in moves {
            if to.len() != 1 {
                continue;
            }
            let new = to.into_iter().next().expect("one key");
            let Some(c) = self.profiles.get(&old) else {
                continue;
            };
            let all_move = movers
                .get(&old)
                .is_some_and(|m| c.users.iter().all(|u| m.contains(u.as_str())));
            if new == old
                || !all_move
                || self.profiles.contains_key(&new)
                || !taken.insert(new.clone())
            {
                continue;
            }
            let c = self.profiles.remove(&old).expect("looked up above");
            self.ids.insert(c.id, new.clone());
            self.profiles.insert(new.clone(), c);
            // The endpoints' old targets still name the old key: they are unclaimed below by
            // endpoint, whatever key they name.
            rekeyed.push(new);
        }
        rekeyed
    }

    /// The targets of endpoint `id` as the index has it now: none if it is not local.
    fn targets_of(&self, index: &PolicyIndex, id: &str) -> Vec<Target> {
        let Some(ep) = index.endpoint(id).filter(|ep| index.is_local(ep)) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for direction in [Direction::Ingress, Direction::Egress] {
            let Some(key) = index.profile_key(ep, direction) else {
                continue;
            };
            // Targets of the same key share one key in memory.
            let key = match self.profiles.get_key_value(&key) {
                Some((k, _)) => k.clone(),
                None => Arc::new(key),
            };
            let mut addrs: Vec<IpAddr> = ep.ips.iter().map(|n| n.addr()).collect();
            addrs.sort_unstable();
            addrs.dedup();
            out.extend(addrs.into_iter().map(|address| Target {
                direction,
                address,
                key: key.clone(),
            }));
        }
        out
    }

    fn unclaim(&mut self, id: &str, t: &Target) {
        let mut profile = None;
        if let Some(by) = self.claims.get_mut(&(t.direction, t.address)) {
            profile = by.remove(id);
            if by.is_empty() {
                self.claims.remove(&(t.direction, t.address));
            }
        }
        // Its key's profile, or the one that took over from it (see `rekey`).
        let key = self
            .profiles
            .contains_key(&t.key)
            .then(|| t.key.clone())
            .or_else(|| profile.and_then(|p| self.ids.get(&p).cloned()));
        if let Some(c) = key.and_then(|k| self.profiles.get_mut(&k)) {
            c.users.remove(id);
        }
    }

    /// The profile in force at a target now.
    fn in_force(&self, direction: Direction, target: IpAddr) -> Option<ProfileId> {
        let by = self.claims.get(&(direction, target))?;
        by.values().next().copied()
    }

    /// Takes the numbers the kernel's profiles have (`kernel`: what it holds) for the
    /// profiles of the same targets, so that a program built anew (a daemon that starts) finds
    /// the kernel's elements as they are rather than making every profile again: a profile
    /// whose targets all point at one kernel profile takes its number. Call it on a program
    /// before any of its changes reach the kernel.
    pub fn adopt_numbers(&mut self, kernel: &[PolicyElement]) {
        let held: HashMap<(Direction, IpAddr), ProfileId> = kernel
            .iter()
            .filter_map(|e| match *e {
                PolicyElement::Target {
                    direction,
                    target,
                    profile,
                } => Some(((direction, target), profile)),
                _ => None,
            })
            .collect();
        // By the targets in force: the profile of each takes the number the kernel has there
        // (the first to want a number, or to be given one, keeps it).
        let mut wanted: BTreeMap<ProfileId, Arc<ProfileKey>> = BTreeMap::new();
        let mut given: HashSet<Arc<ProfileKey>> = HashSet::new();
        for (at, by) in &self.claims {
            let (Some(&kernel_id), Some((_, ours))) = (held.get(at), by.iter().next()) else {
                continue;
            };
            let Some(key) = self.ids.get(ours) else {
                continue;
            };
            if !wanted.contains_key(&kernel_id) && given.insert(key.clone()) {
                wanted.insert(kernel_id, key.clone());
            }
        }
        // Profiles no target in force points at (an endpoint whose address another has, as a
        // stale record may make): by their content, among the kernel's profiles left.
        let unmatched: Vec<Arc<ProfileKey>> = {
            let mut keys: Vec<Arc<ProfileKey>> = self
                .profiles
                .keys()
                .filter(|k| !given.contains(*k))
                .cloned()
                .collect();
            keys.sort();
            keys
        };
        if !unmatched.is_empty() {
            let mut content: BTreeMap<(Direction, ProfileId), Vec<PolicyElement>> = BTreeMap::new();
            for e in kernel {
                if !matches!(e, PolicyElement::Target { .. }) {
                    content
                        .entry((e.direction(), e.profile()))
                        .or_default()
                        .push(renumbered(e, 0));
                }
            }
            for key in unmatched {
                let c = &self.profiles[&key];
                let mut mine: Vec<PolicyElement> =
                    c.profile.elements(key.direction, 0).into_iter().collect();
                mine.sort_unstable();
                let found = content.iter().find(|((d, id), els)| {
                    *d == key.direction && !wanted.contains_key(id) && {
                        let mut els = (*els).clone();
                        els.sort_unstable();
                        els == mine
                    }
                });
                if let Some((&(_, id), _)) = found {
                    wanted.insert(id, key.clone());
                }
            }
        }
        let adopted: HashSet<Arc<ProfileKey>> = wanted.values().cloned().collect();
        let mut numbers: HashMap<Arc<ProfileKey>, ProfileId> =
            wanted.iter().map(|(id, k)| (k.clone(), *id)).collect();
        // The others keep theirs, unless an adopted one took it.
        let mut taken: HashSet<ProfileId> = wanted.keys().copied().collect();
        let mut keys: Vec<Arc<ProfileKey>> = self.profiles.keys().cloned().collect();
        keys.sort();
        for key in keys.iter().filter(|k| !adopted.contains(*k)) {
            let mut id = self.profiles[key].id;
            while taken.contains(&id) {
                id = id.wrapping_add(1);
            }
            taken.insert(id);
            numbers.insert(key.clone(), id);
        }
        let renames: HashMap<ProfileId, ProfileId> = self
            .profiles
            .iter()
            .map(|(k, c)| (c.id, numbers[k]))
            .collect();
        self.ids = numbers.iter().map(|(k, id)| (*id, k.clone())).collect();
        for (key, c) in self.profiles.iter_mut() {
            c.id = numbers[key];
        }
        for by in self.claims.values_mut() {
            for p in by.values_mut() {
                *p = renames[p];
            }
        }
    }

    /// A number for a new profile: from its key, so that a restarted daemon numbers its
    /// profiles as before (and finds the kernel's elements as they are); the next free one if
    /// taken.
    fn free_id(&self, key: &ProfileKey) -> ProfileId {
        self.free_id_but(key, &[])
    }

    /// [`Program::free_id`], also avoiding numbers let go of in this change (whose elements
    /// the change removes while it adds the new profile's).
    fn free_id_but(&self, key: &ProfileKey, retired: &[ProfileId]) -> ProfileId {
        let mut id = key_hash(key);
        while self.ids.contains_key(&id) || retired.contains(&id) {
            id = id.wrapping_add(1);
        }
        id
    }
}

/// A key's digest, folded to a profile's number.
fn key_hash(key: &ProfileKey) -> ProfileId {
    let d = key.digest();
    (d ^ (d >> 32)) as u32
}

/// `e` under profile number `profile`.
fn renumbered(e: &PolicyElement, profile: ProfileId) -> PolicyElement {
    let mut e = *e;
    match &mut e {
        PolicyElement::Profile { profile: p, .. }
        | PolicyElement::Class { profile: p, .. }
        | PolicyElement::Any { profile: p, .. }
        | PolicyElement::Ports { profile: p, .. }
        | PolicyElement::Peers { profile: p, .. }
        | PolicyElement::Pair { profile: p, .. }
        | PolicyElement::Target { profile: p, .. } => *p = profile,
    }
    e
}
