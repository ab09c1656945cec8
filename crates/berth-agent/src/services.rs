//! Services: a virtual IP per address family in front of the endpoints of a network whose
//! labels match a selector, load-balanced by this host's kernel for the clients on it.
//!
//! The intent side (`create_service`, `delete_service`) validates, takes the VIPs and
//! published ports with create-if-absent keys, and commits. The reconciler
//! ([`Agent::run_service_reconciler`]) lists services, endpoints and hosts, then follows
//! their watches, and programs only the frontends of the services an event touches
//! ([`LoadBalancer::apply`]: element work in one batch, whatever the number of services).
//! This host's own attaches, detaches and service changes also program the kernel before
//! they answer, so a detached backend gets no new connection once its detach returned; the
//! watch then finds nothing left to do.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use berth_api::CreateService;
use berth_dataplane::conntrack::{self, FlowMatch};
use berth_dataplane::nftables::{Backend, Frontend, LoadBalancer, Pool};
use berth_model::{
    DEFAULT_AFFINITY_TIMEOUT, Driver, Endpoint, HostRecord, Network, Selector, Service,
    ServiceBackend, ServicePort, Shown, apply_publish, parse_affinity_timeout,
};
use berth_store::{Compare, Event, Txn, TxnOutcome, Watch};
use ipnet::IpNet;

use crate::{Agent, AgentError, Result, decode, encode, kernel, keys};

/// What the reconciler knows: every service, every endpoint of a network with services, and
/// the live hosts. Its decisions are functions of this alone.
#[derive(Debug, Default)]
pub(crate) struct ServiceView {
    me: String,
    /// On a shared store only endpoints of live hosts are backends.
    shared: bool,
    services: HashMap<String, Service>,
    /// Network → names of its services.
    by_network: HashMap<String, BTreeSet<String>>,
    endpoints: HashMap<String, Endpoint>,
    /// Network → ids of its endpoints.
    endpoints_of: HashMap<String, BTreeSet<String>>,
    hosts: HashSet<String>,
    /// Store keys this host removed, with the revision of the removal, until the watch or a
    /// listing has caught up with it: an older put still in the watch must not bring them
    /// back.
    removed_here: HashMap<String, u64>,
    /// The frontends programmed for each service, to remove those it no longer has.
    programmed: HashMap<String, Vec<Frontend>>,
    /// Following the watch (not reading a listing): new local endpoints wait for their
    /// attach to finish.
    live: bool,
    /// Flows to end that no frontend change shows: to the endpoints of a host whose lease
    /// lapsed, once they go (they left the load balancer at the lapse, keeping their flows).
    flows_of_lapsed: Vec<(Frontend, Backend)>,
}

impl ServiceView {
    fn new(me: &str, shared: bool) -> ServiceView {
        ServiceView {
            me: me.to_string(),
            shared,
            ..ServiceView::default()
        }
    }

    fn usable(&self, ep: &Endpoint) -> bool {
        !self.shared
            || ep.is_on(&self.me)
            || ep.host.as_ref().is_some_and(|h| self.hosts.contains(h))
    }

    /// Whether this host carries a service: a bridge network's services only on its host
    /// (nowhere else are its backends reachable).
    fn carried_here(&self, svc: &Service) -> bool {
        svc.host.as_deref().is_none_or(|h| h == self.me)
    }

    /// The endpoints a service balances over.
    fn backends<'a>(&'a self, svc: &'a Service) -> impl Iterator<Item = &'a Endpoint> + 'a {
        self.endpoints_of
            .get(&svc.network)
            .into_iter()
            .flatten()
            .filter_map(|id| self.endpoints.get(id))
            .filter(|ep| self.usable(ep) && svc.selector.matches(&ep.labels))
    }

    /// The frontends a service wants here, with their pools: each port on each VIP, and each
    /// published port per family.
    fn frontends(&self, svc: &Service) -> Vec<(Frontend, Pool)> {
        let backends: Vec<&Endpoint> = self.backends(svc).collect();
        self.frontends_over(svc, &backends)
    }

    /// [`Self::frontends`] with these backends.
    fn frontends_over(&self, svc: &Service, backends: &[&Endpoint]) -> Vec<(Frontend, Pool)> {
        if !self.carried_here(svc) {
            return Vec::new();
        }
        let mut out = Vec::new();
        for vip in &svc.vips {
            for p in &svc.ports {
                let pool = Pool {
                    backends: backends
                        .iter()
                        .flat_map(|ep| {
                            ep.ips
                                .iter()
                                .filter(|ip| ip.addr().is_ipv4() == vip.is_ipv4())
                                .map(|ip| Backend {
                                    addr: ip.addr(),
                                    port: p.target_port,
                                    local: ep.is_on(&self.me),
                                })
                        })
                        .collect(),
                    affinity: svc.affinity_timeout,
                };
                if let Some(np) = p.node_port {
                    out.push((
                        Frontend::NodePort {
                            ipv6: vip.is_ipv6(),
                            protocol: p.protocol,
                            port: np,
                        },
                        pool.clone(),
                    ));
                }
                out.push((
                    Frontend::Vip {
                        vip: *vip,
                        protocol: p.protocol,
                        port: p.port,
                    },
                    pool,
                ));
            }
        }
        out
    }

    fn put_service(&mut self, svc: Service) -> Vec<String> {
        let name = svc.name.clone();
        if let Some(old) = self.services.remove(&name)
            && let Some(names) = self.by_network.get_mut(&old.network)
        {
            names.remove(&name);
        }
        self.by_network
            .entry(svc.network.clone())
            .or_default()
            .insert(name.clone());
        self.services.insert(name.clone(), svc);
        vec![name]
    }

    fn remove_service(&mut self, name: &str) -> Vec<String> {
        if let Some(old) = self.services.remove(name)
            && let Some(names) = self.by_network.get_mut(&old.network)
        {
            names.remove(name);
        }
        vec![name.to_string()]
    }

    /// The services an endpoint's coming or going changes: those of its network it matches.
    fn touched_by(&self, ep: &Endpoint) -> impl Iterator<Item = String> + '_ {
        let labels = ep.labels.clone();
        self.by_network
            .get(&ep.network)
            .into_iter()
            .flatten()
            .filter(move |name| {
                self.services
                    .get(*name)
                    .is_some_and(|s| s.selector.matches(&labels))
            })
            .cloned()
    }

    fn put_endpoint(&mut self, ep: Endpoint) -> Vec<String> {
        let mut dirty: Vec<String> = self.touched_by(&ep).collect();
        if let Some(old) = self.endpoints.get(&ep.id) {
            dirty.extend(self.touched_by(old));
        }
        self.endpoints_of
            .entry(ep.network.clone())
            .or_default()
            .insert(ep.id.clone());
        self.endpoints.insert(ep.id.clone(), ep);
        dirty
    }

    fn remove_endpoint(&mut self, id: &str) -> Vec<String> {
        let Some(old) = self.endpoints.remove(id) else {
            return Vec::new();
        };
        if let Some(ids) = self.endpoints_of.get_mut(&old.network) {
            ids.remove(id);
        }
        let touched: Vec<String> = self.touched_by(&old).collect();
        if !self.usable(&old) {
            let flows: Vec<(Frontend, Backend)> = touched
                .iter()
                .filter_map(|name| self.services.get(name))
                .flat_map(|svc| self.frontends_over(svc, &[&old]))
                .flat_map(|(f, pool)| pool.backends.into_iter().map(move |b| (f, b)))
                .collect();
            self.flows_of_lapsed.extend(flows);
        }
        touched
    }

    /// Of the backends that left their frontends, those whose flows end now, and the flows
    /// of a lapsed host's endpoints that went since. A backend that left because its host's
    /// lease lapsed keeps its flows: its daemon may only be stopped or stalled, and its
    /// container answers on (new connections go elsewhere meanwhile).
    fn flows_ending(&mut self, mut left: Vec<(Frontend, Backend)>) -> Vec<(Frontend, Backend)> {
        if !left.is_empty() {
            let lapsed: HashSet<IpAddr> = self
                .endpoints
                .values()
                .filter(|ep| !self.usable(ep))
                .flat_map(|ep| ep.ips.iter().map(|ip| ip.addr()))
                .collect();
            left.retain(|(_, b)| !lapsed.contains(&b.addr));
        }
        left.append(&mut self.flows_of_lapsed);
        left
    }

    /// Applies one watch event; returns the services it touches (`None`: all of them).
    fn apply(&mut self, event: &Event) -> Result<Option<Vec<String>>> {
        let key = event.key();
        let put = match event {
            Event::Put(kv) => Some(kv),
            Event::Delete { .. } => None,
        };
        if let Some(&removed_at) = self.removed_here.get(key) {
            match put {
                // Older than this host's removal: already undone here.
                Some(kv) if kv.mod_revision < removed_at => return Ok(Some(Vec::new())),
                _ => {
                    self.removed_here.remove(key);
                }
            }
        }
        if let Some(id) = key.strip_prefix(keys::HOSTS) {
            match put {
                Some(kv) => {
                    decode::<HostRecord>(kv)?;
                    self.hosts.insert(id.to_string());
                }
                None => {
                    self.hosts.remove(id);
                }
            }
            return Ok(None);
        }
        if let Some(name) = key.strip_prefix(keys::SERVICES) {
            return Ok(Some(match put {
                Some(kv) => self.put_service(decode(kv)?),
                None => self.remove_service(name),
            }));
        }
        if let Some(id) = key.strip_prefix(keys::ENDPOINTS) {
            return Ok(Some(match put {
                Some(kv) => {
                    let ep: Endpoint = decode(kv)?;
                    // This host's endpoints are backends once their interface is there:
                    // the attach adds them (`services_endpoint_up`), not their record,
                    // which is committed before the interface is made.
                    if self.live && ep.is_on(&self.me) && !self.endpoints.contains_key(id) {
                        return Ok(Some(Vec::new()));
                    }
                    self.put_endpoint(ep)
                }
                None => self.remove_endpoint(id),
            }));
        }
        Ok(Some(Vec::new()))
    }
}

/// The load balancer and the view it was programmed from, changed under one lock.
pub(crate) struct ServiceState {
    /// Locked inside the blocking task that writes the kernel: whatever happens to the
    /// caller (an error, a cancelled request), it stays what the kernel holds.
    lb: Arc<std::sync::Mutex<LoadBalancer>>,
    view: ServiceView,
    /// The view comes from a listing: until then nothing is programmed.
    listed: bool,
    /// The kernel may differ from the view (a change failed or was interrupted): the next
    /// change, or the reconciler's next tick, syncs everything.
    stale: bool,
    /// When everything was last compared with the kernel.
    synced_at: std::time::Instant,
}

impl ServiceState {
    pub(crate) fn new(me: &str, shared: bool) -> ServiceState {
        ServiceState {
            lb: Arc::new(std::sync::Mutex::new(LoadBalancer::empty())),
            view: ServiceView::new(me, shared),
            listed: false,
            stale: true,
            synced_at: std::time::Instant::now(),
        }
    }
}

/// What a frontend losing a backend means for conntrack: the flows that went to it.
fn flows_of(left: &[(Frontend, Backend)]) -> Vec<FlowMatch> {
    left.iter()
        .map(|(f, b)| match *f {
            Frontend::Vip {
                vip,
                protocol,
                port,
            } => FlowMatch {
                protocol,
                orig_dst: Some(vip),
                orig_dport: port,
                reply_src: b.addr,
                reply_sport: b.port,
            },
            Frontend::NodePort { protocol, port, .. } => FlowMatch {
                protocol,
                orig_dst: None,
                orig_dport: port,
                reply_src: b.addr,
                reply_sport: b.port,
            },
        })
        .collect()
}

/// How often every frontend is compared with the kernel's maps.
const RESYNC: Duration = Duration::from_secs(30);

/// The watched prefixes (hosts only matter on a shared store, but cost nothing otherwise).
const WATCHED: [&str; 3] = [keys::HOSTS, keys::SERVICES, keys::ENDPOINTS];

impl Agent {
    /// The service ranges VIPs come from.
    pub fn service_cidrs(&self) -> &[IpNet] {
        &self.service_cidrs
    }

    /// Programs the frontends of these services as the view has them now, in one batch;
    /// returns the backends that left (for [`Agent::end_flows`], once the lock is let go).
    /// Before the first listing nothing is programmed (the first sync does it); after a
    /// failed or interrupted change everything is synced.
    async fn program(
        &self,
        state: &mut ServiceState,
        dirty: Vec<String>,
    ) -> Vec<(Frontend, Backend)> {
        if dirty.is_empty() || !state.listed {
            return Vec::new();
        }
        if state.stale {
            return self.sync_or_retry(state).await;
        }
        let mut removals: Vec<Frontend> = Vec::new();
        let mut additions: Vec<(Frontend, Option<Pool>)> = Vec::new();
        let mut programmed: Vec<(String, Vec<Frontend>)> = Vec::new();
        let names: BTreeSet<String> = dirty.into_iter().collect();
        for name in names {
            let want = state
                .view
                .services
                .get(&name)
                .map(|s| state.view.frontends(s))
                .unwrap_or_default();
            let now: Vec<Frontend> = want.iter().map(|(f, _)| *f).collect();
            for old in state.view.programmed.get(&name).into_iter().flatten() {
                if !now.contains(old) {
                    removals.push(*old);
                }
            }
            additions.extend(want.into_iter().map(|(f, p)| (f, Some(p))));
            programmed.push((name, now));
        }
        // A frontend one service lets go of and another takes (a VIP reused at once) is
        // the taker's: removals only where no addition is.
        let mut changes: Vec<(Frontend, Option<Pool>)> = removals
            .into_iter()
            .filter(|f| !additions.iter().any(|(a, _)| a == f))
            .map(|f| (f, None))
            .collect();
        changes.extend(additions);
        state.stale = true;
        let lb = state.lb.clone();
        let applied = tokio::task::spawn_blocking(move || {
            lb.lock().expect("load balancer lock").apply(&changes)
        })
        .await;
        match applied {
            Ok(Ok(left)) => {
                for (name, now) in programmed {
                    if now.is_empty() {
                        state.view.programmed.remove(&name);
                    } else {
                        state.view.programmed.insert(name, now);
                    }
                }
                state.stale = false;
                state.view.flows_ending(left)
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot program services; syncing them all");
                self.sync_or_retry(state).await
            }
            Err(e) => {
                tracing::error!(error = %e, "programming services failed; retrying");
                Vec::new()
            }
        }
    }

    /// Deletes the conntrack entries of flows to backends that left their frontends: UDP
    /// flows move to another backend at their next packet, TCP flows to a gone backend end
    /// instead of hanging.
    async fn end_flows(&self, left: Vec<(Frontend, Backend)>) {
        if left.is_empty() {
            return;
        }
        let matches = flows_of(&left);
        match kernel(move || conntrack::delete_flows(&matches)).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(flows = n, "flows to removed backends ended"),
            Err(e) => tracing::warn!(error = %e, "cannot end flows to removed backends"),
        }
    }

    /// An endpoint of this host attached (its interface is up): it serves its services
    /// before the attach answers.
    pub(crate) async fn services_endpoint_up(&self, ep: &Endpoint) {
        let mut state = self.service_state.lock().await;
        if state
            .view
            .removed_here
            .contains_key(&keys::endpoint(&ep.id))
        {
            // Detached meanwhile.
            return;
        }
        let dirty = state.view.put_endpoint(ep.clone());
        let left = self.program(&mut state, dirty).await;
        drop(state);
        self.end_flows(left).await;
    }

    /// An endpoint of this host is being detached (its records went at `revision`): no
    /// new connection goes to it from here on, and its flows end.
    pub(crate) async fn services_endpoint_down(&self, ep: &Endpoint, revision: u64) {
        let mut state = self.service_state.lock().await;
        state
            .view
            .removed_here
            .insert(keys::endpoint(&ep.id), revision);
        let dirty = state.view.remove_endpoint(&ep.id);
        let left = self.program(&mut state, dirty).await;
        drop(state);
        self.end_flows(left).await;
    }

    /// Runs for the life of the daemon: list, sync everything, follow the watches until one
    /// fails, and start over.
    pub async fn run_service_reconciler(self: std::sync::Arc<Self>) {
        loop {
            match self.list_services_and_watch().await {
                Ok(watches) => {
                    let why = self.follow_services(watches).await;
                    tracing::info!("service watch ended ({why}); listing again");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot list services; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }

    /// Lists into a fresh view, programs every frontend (only what differs from the kernel
    /// is written), and opens the watches from the listings' revisions.
    async fn list_services_and_watch(&self) -> Result<Vec<Watch>> {
        let mut view = ServiceView::new(&self.host.id, self.shared);
        let mut watches = Vec::new();
        let mut listed_at = u64::MAX;
        for prefix in WATCHED {
            let listing = self.store.list(prefix).await?;
            listed_at = listed_at.min(listing.revision);
            for kv in &listing.items {
                if let Err(e) = view.apply(&Event::Put(kv.clone())) {
                    tracing::error!(key = %kv.key, error = %e, "bad record in the store; skipped");
                }
            }
            watches.push(self.store.watch(prefix, listing.revision).await?);
        }
        view.live = true;
        let mut state = self.service_state.lock().await;
        // Removals of this host's that the listings may not show yet keep holding; those
        // they show are done.
        let held = std::mem::take(&mut state.view.removed_here);
        for (key, at) in held {
            if at <= listed_at {
                continue;
            }
            if let Some(id) = key.strip_prefix(keys::ENDPOINTS) {
                view.remove_endpoint(id);
            } else if let Some(name) = key.strip_prefix(keys::SERVICES) {
                view.remove_service(name);
            }
            view.removed_here.insert(key, at);
        }
        let named: Vec<(String, String)> = state
            .view
            .services
            .values()
            .filter(|s| !view.services.contains_key(&s.name))
            .map(|s| (s.network.clone(), s.name.clone()))
            .collect();
        state.view = view;
        state.listed = true;
        let left = self.sync_everything(&mut state).await;
        let services: Vec<Service> = state.view.services.values().cloned().collect();
        drop(state);
        // Services deleted while the watch was down are unnamed; the others named.
        for (network, name) in named {
            self.unname_service(&network, &name);
        }
        for svc in &services {
            self.name_service(svc);
        }
        self.end_flows(left?).await;
        Ok(watches)
    }

    /// Makes the kernel hold every frontend the view wants, reading its maps first (only
    /// what differs is written): after a listing, after a failed change, and when berth's
    /// table was restored.
    async fn sync_everything(&self, state: &mut ServiceState) -> Result<Vec<(Frontend, Backend)>> {
        state.stale = true;
        // Each service's frontends, once: the kernel gets them all, the view learns which
        // service has which.
        let mut want = BTreeMap::new();
        let mut programmed: HashMap<String, Vec<Frontend>> = HashMap::new();
        for svc in state.view.services.values() {
            let fronts = state.view.frontends(svc);
            programmed.insert(svc.name.clone(), fronts.iter().map(|(f, _)| *f).collect());
            want.extend(fronts);
        }
        let lb = state.lb.clone();
        let left = tokio::task::spawn_blocking(move || {
            lb.lock().expect("load balancer lock").sync_all(&want)
        })
        .await
        .map_err(|e| AgentError::Internal(format!("kernel task failed: {e}")))??;
        state.view.programmed = programmed;
        state.stale = false;
        state.synced_at = std::time::Instant::now();
        Ok(state.view.flows_ending(left))
    }

    /// [`Agent::sync_everything`], a failure logged: the state stays stale, and the next
    /// change or the reconciler's next tick tries again.
    async fn sync_or_retry(&self, state: &mut ServiceState) -> Vec<(Frontend, Backend)> {
        self.sync_everything(state).await.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot sync services; retrying");
            Vec::new()
        })
    }

    /// After berth's table was restored (the services' maps may have gone with it): every
    /// frontend is written again. Nothing before the first listing (that syncs anyway).
    pub(crate) async fn resync_services(&self) -> Result<()> {
        let mut state = self.service_state.lock().await;
        if !state.listed {
            return Ok(());
        }
        let left = self.sync_everything(&mut state).await?;
        drop(state);
        self.end_flows(left).await;
        Ok(())
    }

    /// Applies events as they come, with those already waiting; returns why it stopped.
    async fn follow_services(&self, mut watches: Vec<Watch>) -> String {
        // Each second: a change that failed is retried, and every RESYNC all the frontends
        // are compared with the kernel's maps, which can be changed under us (`nft flush map
        // ...`; the guard checks only that they exist). Events do not hold the ticks back.
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            let mut events = Vec::new();
            let [hosts, services, endpoints] = &mut watches[..] else {
                return "watches missing".into();
            };
            let first = tokio::select! {
                e = hosts.next() => Some(e),
                e = services.next() => Some(e),
                e = endpoints.next() => Some(e),
                _ = tick.tick() => None,
            };
            match first {
                Some(Ok(e)) => events.push(e),
                Some(Err(e)) => return e.to_string(),
                None => {
                    // Everything, as after a failed change the kernel may be anywhere
                    // between.
                    let mut state = self.service_state.lock().await;
                    let due = state.synced_at.elapsed() >= RESYNC;
                    if state.listed && (state.stale || due) {
                        let left = self.sync_or_retry(&mut state).await;
                        drop(state);
                        self.end_flows(left).await;
                    }
                    continue;
                }
            }
            // What else is ready now, without waiting.
            if let Err(e) = crate::ready_events(
                &mut [&mut *hosts, &mut *services, &mut *endpoints],
                &mut events,
            )
            .await
            {
                return e;
            }
            let mut state = self.service_state.lock().await;
            let mut dirty = Vec::new();
            let mut renamed = Vec::new();
            for event in &events {
                match state.view.apply(event) {
                    Ok(Some(names)) => {
                        if event.key().starts_with(keys::SERVICES) && !names.is_empty() {
                            renamed.push(event.clone());
                        }
                        dirty.extend(names)
                    }
                    Ok(None) => dirty.extend(state.view.services.keys().cloned()),
                    Err(e) => {
                        tracing::error!(key = %event.key(), error = %e, "bad record in the store")
                    }
                }
            }
            let left = self.program(&mut state, dirty).await;
            drop(state);
            self.end_flows(left).await;
            for event in renamed {
                match event {
                    Event::Put(kv) => {
                        if let Ok(svc) = decode::<Service>(&kv) {
                            self.name_service(&svc);
                        }
                    }
                    Event::Delete { key, prev, .. } => {
                        let network = prev
                            .as_ref()
                            .and_then(|kv| decode::<Service>(kv).ok())
                            .map(|s| s.network);
                        if let (Some(network), Some(name)) =
                            (network, key.strip_prefix(keys::SERVICES))
                        {
                            self.unname_service(&network, name);
                        }
                    }
                }
            }
        }
    }

    pub async fn services(&self, network: Option<&str>) -> Result<Vec<Service>> {
        let mut out: Vec<Service> = self
            .load_all::<Service>(keys::SERVICES)
            .await?
            .into_iter()
            .filter(|s| network.is_none_or(|n| s.network == n))
            .collect();
        let state = self.service_state.lock().await;
        for svc in &mut out {
            svc.backends = backends_of(&state.view, svc);
        }
        Ok(out)
    }

    /// The service whose virtual IP `ip` is, with the endpoints its load balancer sends
    /// connections to.
    pub(crate) async fn service_at(&self, ip: IpAddr) -> Option<(Service, Vec<Endpoint>)> {
        let state = self.service_state.lock().await;
        let view = &state.view;
        let svc = view.services.values().find(|s| s.vips.contains(&ip))?;
        let mut backends: Vec<Endpoint> = view.backends(svc).cloned().collect();
        backends.sort_by(|a, b| a.ips.cmp(&b.ips));
        Some((svc.clone(), backends))
    }

    pub async fn service(&self, name: &str) -> Result<Service> {
        let (mut svc, _) = self
            .load::<Service>(&keys::service(name))
            .await?
            .ok_or_else(|| AgentError::NotFound(format!("no service named {name:?}")))?;
        let state = self.service_state.lock().await;
        svc.backends = backends_of(&state.view, &svc);
        Ok(svc)
    }

    pub async fn create_service(&self, req: CreateService) -> Result<Service> {
        let mut svc = self.service_from_request(&req)?;
        self.check_node_ports_free_here(&svc).await?;
        let mut attempts = 0;
        loop {
            let (net, net_rev) = self
                .load::<Network>(&keys::network(&req.network))
                .await?
                .ok_or_else(|| {
                    AgentError::NotFound(format!("no network named {:?}", req.network))
                })?;
            if net.removing {
                return Err(AgentError::Conflict(format!(
                    "network {:?} is being removed",
                    net.name
                )));
            }
            // A bridge network is on one host: so are its services.
            svc.host = match net.driver {
                Driver::Bridge => net.host.clone(),
                Driver::Overlay => None,
            };
            svc.vips = self
                .choose_vips(&net, &req.vips, &svc.name, attempts)
                .await?;
            let mut txn = Txn::new()
                .when(Compare::Absent(keys::service(&svc.name)))
                .when(Compare::ModRevision(keys::network(&net.name), net_rev))
                .put(keys::service(&svc.name), encode(&svc));
            for vip in &svc.vips {
                txn = txn
                    .when(Compare::Absent(keys::vip(*vip)))
                    .put(keys::vip(*vip), svc.name.as_bytes().to_vec());
            }
            for p in &svc.ports {
                if let Some(np) = p.node_port {
                    let key = keys::node_port(p.protocol, np);
                    txn = txn
                        .when(Compare::Absent(key.clone()))
                        .put(key, svc.name.as_bytes().to_vec());
                }
            }
            match self.commit(txn).await? {
                TxnOutcome::Committed { .. } => break,
                TxnOutcome::CompareFailed(_) => {
                    let why = self.explain_service_conflict(&svc, &req).await?;
                    match why {
                        Some(e) => return Err(e),
                        // A VIP picked here was taken, or the network changed, meanwhile:
                        // again.
                        None if attempts < 8 => attempts += 1,
                        None => {
                            return Err(AgentError::Conflict(format!(
                                "service {:?} could not be created: its network or VIP kept changing; try again",
                                svc.name
                            )));
                        }
                    }
                }
            }
        }
        {
            let mut state = self.service_state.lock().await;
            let dirty = state.view.put_service(svc.clone());
            // Backends that leave a new service: none.
            self.program(&mut state, dirty).await;
            svc.backends = backends_of(&state.view, &svc);
        }
        self.name_service(&svc);
        tracing::info!(
            service = %svc.name, network = %svc.network,
            vips = ?svc.vips, backends = svc.backends.len(), "service created"
        );
        Ok(svc)
    }

    pub async fn delete_service(&self, name: &str) -> Result<()> {
        let Some((svc, rev)) = self.load::<Service>(&keys::service(name)).await? else {
            return Err(AgentError::NotFound(format!("no service named {name:?}")));
        };
        let mut txn = Txn::new()
            .when(Compare::ModRevision(keys::service(name), rev))
            .delete(keys::service(name));
        for vip in &svc.vips {
            txn = txn.delete(keys::vip(*vip));
        }
        for p in &svc.ports {
            if let Some(np) = p.node_port {
                txn = txn.delete(keys::node_port(p.protocol, np));
            }
        }
        let revision = match self.commit(txn).await? {
            TxnOutcome::Committed { revision } => revision,
            TxnOutcome::CompareFailed(_) => {
                return Err(AgentError::Conflict(format!(
                    "service {name:?} changed while being removed; try again"
                )));
            }
        };
        let mut state = self.service_state.lock().await;
        state
            .view
            .removed_here
            .insert(keys::service(name), revision);
        let dirty = state.view.remove_service(name);
        let left = self.program(&mut state, dirty).await;
        drop(state);
        self.end_flows(left).await;
        self.unname_service(&svc.network, name);
        tracing::info!(service = %name, "service removed");
        Ok(())
    }

    /// Parses and checks a request into a service with the requested VIPs.
    fn service_from_request(&self, req: &CreateService) -> Result<Service> {
        let selector: Selector = req.selector.parse()?;
        let mut ports = req
            .ports
            .iter()
            .map(|p| p.parse::<ServicePort>())
            .collect::<std::result::Result<Vec<_>, _>>()?;
        apply_publish(&mut ports, &req.publish)?;
        let affinity_timeout = match req.session_affinity.as_deref() {
            None | Some("none" | "None") => {
                if req.affinity_timeout.is_some() {
                    return Err(AgentError::Invalid(
                        "an affinity timeout needs --session-affinity client-ip".into(),
                    ));
                }
                None
            }
            Some("client-ip" | "ClientIP") => Some(match &req.affinity_timeout {
                Some(t) => parse_affinity_timeout(t)?,
                None => DEFAULT_AFFINITY_TIMEOUT,
            }),
            Some(other) => {
                return Err(AgentError::Invalid(format!(
                    "unknown session affinity {}: none or client-ip",
                    Shown(other)
                )));
            }
        };
        let svc = Service {
            name: req.name.clone(),
            network: req.network.clone(),
            selector,
            ports,
            // The requested ones, to be checked; `choose_vips` settles them.
            vips: req.vips.clone(),
            host: None,
            affinity_timeout,
            backends: Vec::new(),
        };
        svc.validate()?;
        Ok(svc)
    }

    /// One VIP per family of the network's subnets that has a service range: the requested
    /// one, or a free one from the range (starting at a place hashed from the name, so that
    /// hosts creating services at once rarely race for one address).
    async fn choose_vips(
        &self,
        net: &Network,
        requested: &[IpAddr],
        name: &str,
        attempt: u32,
    ) -> Result<Vec<IpAddr>> {
        // At most one per family: `Service::validate` checked.
        for vip in requested {
            let Some(range) = self.service_cidrs.iter().find(|r| r.contains(vip)) else {
                return Err(AgentError::Invalid(format!(
                    "VIP {vip} is outside the service range ({})",
                    ranges_line(&self.service_cidrs)
                )));
            };
            if *vip == range.network() || (vip.is_ipv4() && *vip == range.broadcast()) {
                return Err(AgentError::Invalid(format!(
                    "VIP {vip} is the network or broadcast address of {range}"
                )));
            }
            if net
                .subnets
                .iter()
                .all(|s| s.cidr.addr().is_ipv4() != vip.is_ipv4())
            {
                return Err(AgentError::Invalid(format!(
                    "VIP {vip}: network {:?} has no subnet of its family",
                    net.name
                )));
            }
        }
        let mut vips = Vec::new();
        for subnet in &net.subnets {
            let v4 = subnet.cidr.addr().is_ipv4();
            if let Some(vip) = requested.iter().find(|v| v.is_ipv4() == v4) {
                vips.push(*vip);
                continue;
            }
            let Some(range) = self.service_cidrs.iter().find(|r| r.addr().is_ipv4() == v4) else {
                continue;
            };
            vips.push(self.free_vip(range, name, attempt).await?);
        }
        if vips.is_empty() {
            return Err(AgentError::Invalid(format!(
                "no service range for the address families of network {:?}",
                net.name
            )));
        }
        vips.sort_by_key(|v| v.is_ipv6());
        Ok(vips)
    }

    async fn free_vip(&self, range: &IpNet, name: &str, attempt: u32) -> Result<IpAddr> {
        let size: u128 = match range {
            IpNet::V4(r) => 1u128 << (32 - r.prefix_len()),
            IpNet::V6(r) => 1u128 << (128 - r.prefix_len()).min(64),
        };
        // Neither the range's first nor (IPv4) last address.
        let usable = size.saturating_sub(2).max(1);
        let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        let start = (u128::from(hash) + u128::from(attempt) * 7919) % usable;
        let base = match range.network() {
            IpAddr::V4(a) => u128::from(u32::from(a)),
            IpAddr::V6(a) => u128::from(a),
        };
        for i in 0..usable.min(4096) {
            let offset = 1 + (start + i) % usable;
            let ip = match range {
                IpNet::V4(_) => IpAddr::V4(((base + offset) as u32).into()),
                IpNet::V6(_) => IpAddr::V6((base + offset).into()),
            };
            if self.store.get(&keys::vip(ip)).await?.is_none() {
                return Ok(ip);
            }
        }
        Err(AgentError::Conflict(format!(
            "the service range {range} has no free address"
        )))
    }

    /// Published ports on this host's addresses that a service's NodePort would shadow.
    async fn check_node_ports_free_here(&self, svc: &Service) -> Result<()> {
        for p in &svc.ports {
            let Some(np) = p.node_port else { continue };
            if let Some(kv) = self
                .store
                .list(&keys::port_prefix(p.protocol, np))
                .await?
                .items
                .first()
            {
                return Err(AgentError::Conflict(format!(
                    "port {np}/{} is already published on this host by endpoint {}",
                    p.protocol,
                    String::from_utf8_lossy(&kv.value)
                )));
            }
        }
        Ok(())
    }

    /// Why a service's creating transaction failed; `None` when only a VIP this host picked
    /// was taken meanwhile (worth another pick).
    async fn explain_service_conflict(
        &self,
        svc: &Service,
        req: &CreateService,
    ) -> Result<Option<AgentError>> {
        if self.store.get(&keys::service(&svc.name)).await?.is_some() {
            return Ok(Some(AgentError::Conflict(format!(
                "service {:?} already exists",
                svc.name
            ))));
        }
        match self.load::<Network>(&keys::network(&svc.network)).await? {
            None => {
                return Ok(Some(AgentError::NotFound(format!(
                    "no network named {:?}",
                    svc.network
                ))));
            }
            Some((net, _)) if net.removing => {
                return Ok(Some(AgentError::Conflict(format!(
                    "network {:?} is being removed",
                    net.name
                ))));
            }
            Some(_) => {}
        }
        for p in &svc.ports {
            let Some(np) = p.node_port else { continue };
            if let Some(kv) = self.store.get(&keys::node_port(p.protocol, np)).await? {
                return Ok(Some(AgentError::Conflict(format!(
                    "port {np}/{} is already published by service {:?}",
                    p.protocol,
                    String::from_utf8_lossy(&kv.value)
                ))));
            }
        }
        for vip in &req.vips {
            if let Some(kv) = self.store.get(&keys::vip(*vip)).await? {
                return Ok(Some(AgentError::Conflict(format!(
                    "VIP {vip} is taken by service {:?}",
                    String::from_utf8_lossy(&kv.value)
                ))));
            }
        }
        Ok(None)
    }

    /// The services on a network, by name (a network with services cannot be removed).
    pub(crate) async fn services_on(&self, network: &str) -> Result<Vec<String>> {
        Ok(self
            .load_all::<Service>(keys::SERVICES)
            .await?
            .into_iter()
            .filter(|s| s.network == network)
            .map(|s| s.name)
            .collect())
    }
}

fn backends_of(view: &ServiceView, svc: &Service) -> Vec<ServiceBackend> {
    let mut out: Vec<ServiceBackend> = view
        .backends(svc)
        .map(|ep| ServiceBackend {
            endpoint: ep.id.clone(),
            name: ep.name.clone(),
            host: ep.host.clone(),
            ips: ep.ips.iter().map(|ip| ip.addr()).collect(),
        })
        .collect();
    out.sort_by(|a, b| a.ips.cmp(&b.ips));
    out
}

fn ranges_line(ranges: &[IpNet]) -> String {
    ranges
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The service ranges this daemon uses: the cluster's (recorded by the first daemon), which
/// an explicit `--service-cidr` may replace only while no service exists.
pub(crate) async fn agree_on_service_cidrs(
    store: &dyn berth_store::Store,
    given: &[IpNet],
) -> Result<Vec<IpNet>> {
    let defaults = || -> Vec<IpNet> {
        [
            berth_model::DEFAULT_SERVICE_CIDR,
            berth_model::DEFAULT_SERVICE_CIDR6,
        ]
        .iter()
        .map(|c| c.parse().expect("valid default range"))
        .collect()
    };
    let recorded: Option<(Vec<IpNet>, u64)> = match store.get(keys::SERVICE_CIDRS).await? {
        Some(kv) => Some((decode(&kv)?, kv.mod_revision)),
        None => None,
    };
    let want = if given.is_empty() {
        match &recorded {
            Some((r, _)) => return Ok(r.clone()),
            None => defaults(),
        }
    } else {
        given.to_vec()
    };
    // Traffic to the service ranges is refused unless a service takes it: a network (made
    // before services existed) inside one would be cut off.
    for kv in store.list(keys::NETWORKS).await?.items {
        let net: Network = decode(&kv)?;
        for subnet in &net.subnets {
            if let Some(range) = want
                .iter()
                .find(|r| r.contains(&subnet.cidr) || subnet.cidr.contains(*r))
            {
                return Err(AgentError::Invalid(format!(
                    "the service range {range} overlaps subnet {} of network {:?}; choose another with --service-cidr",
                    subnet.cidr, net.name
                )));
            }
        }
    }
    match recorded {
        Some((r, _)) if r == want => Ok(r),
        Some((r, rev)) => {
            if !store.list(keys::SERVICES).await?.items.is_empty() {
                return Err(AgentError::Invalid(format!(
                    "the cluster's service range is {}; --service-cidr {} can replace it only when no service exists",
                    ranges_line(&r),
                    ranges_line(&want)
                )));
            }
            let txn = Txn::new()
                .when(Compare::ModRevision(keys::SERVICE_CIDRS.into(), rev))
                .put(keys::SERVICE_CIDRS, encode(&want));
            store.txn(txn).await?;
            Ok(want)
        }
        None => {
            let txn = Txn::new()
                .when(Compare::Absent(keys::SERVICE_CIDRS.into()))
                .put(keys::SERVICE_CIDRS, encode(&want));
            match store.txn(txn).await? {
                TxnOutcome::Committed { .. } => Ok(want),
                // Another host recorded its ranges first: those are the cluster's.
                TxnOutcome::CompareFailed(_) => match store.get(keys::SERVICE_CIDRS).await? {
                    Some(kv) => decode(&kv),
                    None => Ok(want),
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_model::{MacAddr, NetnsRef};
    use berth_store::KeyValue;

    fn svc(name: &str, network: &str, selector: &str, ports: &[&str]) -> Service {
        Service {
            name: name.into(),
            network: network.into(),
            selector: selector.parse().unwrap(),
            ports: ports.iter().map(|p| p.parse().unwrap()).collect(),
            vips: vec!["10.211.0.10".parse().unwrap()],
            host: None,
            affinity_timeout: None,
            backends: vec![],
        }
    }

    fn ep(id: &str, network: &str, host: &str, ip: &str, labels: &[(&str, &str)]) -> Endpoint {
        Endpoint {
            id: id.into(),
            network: network.into(),
            netns: NetnsRef {
                path: String::new(),
                id: String::new(),
                sandbox: None,
            },
            ifname: "eth0".into(),
            host_ifname: format!("veth{id}"),
            name: None,
            aliases: vec![],
            container_id: None,
            runtime_configured: false,
            mac: MacAddr([2, 0, 0, 0, 0, 1]),
            ips: vec![format!("{ip}/24").parse().unwrap()],
            ports: vec![],
            default_gateways: vec![],
            host: Some(host.into()),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            named_ports: vec![],
        }
    }

    fn pool_addrs(view: &ServiceView, s: &Service) -> Vec<String> {
        let fronts = view.frontends(s);
        fronts[0]
            .1
            .backends
            .iter()
            .map(|b| format!("{}:{}", b.addr, b.port))
            .collect()
    }

    #[test]
    fn backends_are_the_matching_endpoints_of_live_hosts_on_the_network() {
        let mut v = ServiceView::new("h1", true);
        v.hosts.insert("h1".into());
        v.hosts.insert("h2".into());
        let web = svc("web", "blue", "app=web", &["80:8080"]);
        v.put_service(web.clone());
        assert_eq!(
            v.put_endpoint(ep("a", "blue", "h1", "10.0.0.2", &[("app", "web")])),
            ["web"]
        );
        assert!(
            v.put_endpoint(ep("b", "blue", "h2", "10.0.0.3", &[("app", "db")]))
                .is_empty()
        );
        assert!(
            v.put_endpoint(ep("c", "red", "h1", "10.0.1.2", &[("app", "web")]))
                .is_empty()
        );
        v.put_endpoint(ep("d", "blue", "h3", "10.0.0.4", &[("app", "web")]));
        // h3 is not alive: d is no backend until it is.
        assert_eq!(pool_addrs(&v, &web), ["10.0.0.2:8080"]);
        v.hosts.insert("h3".into());
        assert_eq!(pool_addrs(&v, &web), ["10.0.0.2:8080", "10.0.0.4:8080"]);
        let fronts = v.frontends(&web);
        assert!(
            fronts[0]
                .1
                .backends
                .iter()
                .any(|b| b.local && b.addr.to_string() == "10.0.0.2")
        );
        assert_eq!(v.remove_endpoint("a"), ["web"]);
        assert_eq!(pool_addrs(&v, &web), ["10.0.0.4:8080"]);
    }

    #[test]
    fn a_lapsed_hosts_backends_keep_their_flows_until_their_endpoints_go() {
        let mut v = ServiceView::new("h1", true);
        for h in ["h1", "h2"] {
            v.hosts.insert(h.into());
        }
        let web = svc("web", "blue", "app=web", &["80:8080"]);
        v.put_service(web.clone());
        v.put_endpoint(ep("a", "blue", "h1", "10.0.0.2", &[("app", "web")]));
        v.put_endpoint(ep("b", "blue", "h2", "10.0.0.3", &[("app", "web")]));
        let (vip, _) = v.frontends(&web)[0].clone();
        let backend = |addr: &str| Backend {
            addr: addr.parse().unwrap(),
            port: 8080,
            local: false,
        };

        // h2's lease lapses: b leaves the pool, but its flows are not ended.
        v.hosts.remove("h2");
        assert_eq!(pool_addrs(&v, &web), ["10.0.0.2:8080"]);
        assert_eq!(v.flows_ending(vec![(vip, backend("10.0.0.3"))]), []);
        // A backend that leaves for another reason (its labels) ends its flows.
        let left = vec![(vip, backend("10.0.0.2"))];
        assert_eq!(v.flows_ending(left.clone()), left);

        // h2 is freed: b's record goes, and with it its flows.
        assert_eq!(v.remove_endpoint("b"), ["web"]);
        assert_eq!(v.flows_ending(vec![]), [(vip, backend("10.0.0.3"))]);
        assert_eq!(v.flows_ending(vec![]), [], "once");
    }

    #[test]
    fn published_ports_and_families_make_their_own_frontends() {
        let v = ServiceView::new("h1", false);
        let mut s = svc("web", "blue", "", &["80:8080", "53/udp"]);
        s.ports[0].node_port = Some(30080);
        s.vips.push("fd00:b5:5e7::10".parse().unwrap());
        let fronts: Vec<Frontend> = v.frontends(&s).into_iter().map(|(f, _)| f).collect();
        // 2 ports × 2 VIPs, and the published port once per family.
        assert_eq!(fronts.len(), 6);
        assert!(fronts.contains(&Frontend::NodePort {
            ipv6: true,
            protocol: berth_model::Protocol::Tcp,
            port: 30080
        }));
    }

    #[test]
    fn a_removal_made_here_is_not_undone_by_an_older_event() {
        let mut v = ServiceView::new("h1", false);
        v.put_service(svc("web", "blue", "app=web", &["80"]));
        let a = ep("a", "blue", "h1", "10.0.0.2", &[("app", "web")]);
        v.put_endpoint(a.clone());
        v.removed_here.insert(keys::endpoint("a"), 6);
        v.remove_endpoint("a");
        let put = Event::Put(KeyValue {
            key: keys::endpoint("a"),
            value: serde_json::to_vec(&a).unwrap(),
            mod_revision: 5,
            create_revision: 5,
            lease: None,
        });
        assert_eq!(v.apply(&put).unwrap(), Some(vec![]));
        assert!(v.endpoints.is_empty());
        let del = Event::Delete {
            key: keys::endpoint("a"),
            prev: None,
            revision: 6,
        };
        v.apply(&del).unwrap();
        assert!(v.removed_here.is_empty());
    }
}
