//! What each client may take of a DNS server, as bookkeeping without sockets so that every
//! decision can be tested alone: a query rate (token buckets, in a table of bounded size) and
//! the TCP connections of a listener (a cap per client, the longest-idle connection evicted
//! when every slot is taken).

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Instant;

/// Who a limit counts against: an address berth gave an endpoint, or every other source address
/// together. A sandbox that adds addresses to its interface, or forges source addresses, gets
/// one share for all of them rather than one per address, and a flood from forged addresses
/// cannot grow a table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Client {
    Endpoint(IpAddr),
    Stranger,
}

/// What to do with a client's query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Answer,
    /// Over the rate: REFUSED at once, so a resolver over its share for a moment fails fast
    /// (and tries its next server) instead of waiting seconds for a timeout.
    Refuse,
    /// Far over the rate (the refusals are used up too): no answer at all, so a flood costs the
    /// server only its receive and is not reflected at a forged source.
    Drop,
}

/// A token bucket: `rate` tokens a second, at most `burst` held.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    /// When `tokens` was last brought up to date: the last time the client was heard from.
    at: Instant,
}

impl Bucket {
    fn full(burst: f64, now: Instant) -> Bucket {
        Bucket {
            tokens: burst,
            at: now,
        }
    }

    fn tokens_at(&self, now: Instant, rate: f64, burst: f64) -> f64 {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        (self.tokens + elapsed * rate).min(burst)
    }

    fn take(&mut self, now: Instant, rate: f64, burst: f64) -> bool {
        self.tokens = self.tokens_at(now, rate, burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The query rate of every client: answered up to `qps` a second (as many at once), as many
/// again refused, the rest dropped.
pub struct Rates {
    qps: f64,
    capacity: usize,
    /// A client's answers and refusals.
    clients: HashMap<Client, (Bucket, Bucket)>,
}

impl Rates {
    pub fn new(qps: u32, capacity: usize) -> Rates {
        Rates {
            qps: f64::from(qps),
            capacity,
            clients: HashMap::new(),
        }
    }

    pub fn verdict(&mut self, client: Client, now: Instant) -> Verdict {
        let (rate, burst) = (self.qps, self.qps);
        if self.clients.len() >= self.capacity && !self.clients.contains_key(&client) {
            self.make_room(now);
        }
        let (answers, refusals) = self
            .clients
            .entry(client)
            .or_insert_with(|| (Bucket::full(burst, now), Bucket::full(burst, now)));
        if answers.take(now, rate, burst) {
            Verdict::Answer
        } else if refusals.take(now, rate, burst) {
            Verdict::Refuse
        } else {
            Verdict::Drop
        }
    }

    /// Forgets the clients whose buckets are full again (a new entry would be the same), or
    /// when every client is busy, the one heard from longest ago (it starts afresh).
    fn make_room(&mut self, now: Instant) {
        let (rate, burst) = (self.qps, self.qps);
        self.clients.retain(|_, (a, r)| {
            a.tokens_at(now, rate, burst) < burst || r.tokens_at(now, rate, burst) < burst
        });
        if self.clients.len() >= self.capacity
            && let Some(oldest) = self
                .clients
                .iter()
                .min_by_key(|(_, (a, _))| a.at)
                .map(|(c, _)| *c)
        {
            self.clients.remove(&oldest);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.clients.len()
    }
}

/// The connections of one TCP listener: at most `slots`, at most `per_client` of one client. A
/// connection is idle while berth waits for the client (for its first or next query, or for
/// it to read an answer) and busy while berth works on a query it sent (looking the name up,
/// asking upstream). A newcomer over a cap takes the place of the longest-idle connection
/// (the client's own when it is the client's cap), and is refused only when every connection
/// in the way is busy.
pub struct TcpConns {
    slots: usize,
    per_client: usize,
    open: HashMap<u64, Conn>,
    next: u64,
}

struct Conn {
    client: Client,
    /// None while busy.
    idle_since: Option<Instant>,
}

impl TcpConns {
    pub fn new(slots: usize, per_client: usize) -> TcpConns {
        TcpConns {
            slots,
            per_client,
            open: HashMap::new(),
            next: 0,
        }
    }

    /// Admits a new connection (idle from `now`): its id, and the connection it displaces
    /// (which the caller closes); None when it must be refused.
    pub fn admit(&mut self, client: Client, now: Instant) -> Option<(u64, Option<u64>)> {
        let held = self.open.values().filter(|c| c.client == client).count();
        let evicted = if held >= self.per_client {
            Some(self.longest_idle(|c| c.client == client)?)
        } else if self.open.len() >= self.slots {
            Some(self.longest_idle(|_| true)?)
        } else {
            None
        };
        if let Some(e) = evicted {
            self.open.remove(&e);
        }
        let id = self.next;
        self.next += 1;
        self.open.insert(
            id,
            Conn {
                client,
                idle_since: Some(now),
            },
        );
        Some((id, evicted))
    }

    /// Marks a connection busy; false when it was evicted meanwhile (its session ends).
    pub fn busy(&mut self, id: u64) -> bool {
        self.open
            .get_mut(&id)
            .map(|c| c.idle_since = None)
            .is_some()
    }

    /// Marks a connection idle from `now`; false when it was evicted meanwhile.
    pub fn idle(&mut self, id: u64, now: Instant) -> bool {
        self.open
            .get_mut(&id)
            .map(|c| c.idle_since = Some(now))
            .is_some()
    }

    pub fn close(&mut self, id: u64) {
        self.open.remove(&id);
    }

    /// The connection idle for longest among those `which` picks (the older one of a tie).
    fn longest_idle(&self, which: impl Fn(&Conn) -> bool) -> Option<u64> {
        self.open
            .iter()
            .filter(|(_, c)| which(c))
            .filter_map(|(id, c)| c.idle_since.map(|t| (t, *id)))
            .min()
            .map(|(_, id)| id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn client(last: u8) -> Client {
        Client::Endpoint(IpAddr::from([10, 0, 0, last]))
    }

    fn verdicts(rates: &mut Rates, c: Client, n: usize, now: Instant) -> [usize; 3] {
        let mut seen = [0; 3];
        for _ in 0..n {
            seen[rates.verdict(c, now) as usize] += 1;
        }
        seen
    }

    #[test]
    fn answers_a_burst_then_the_rate_then_refuses_as_many_then_drops() {
        let t0 = Instant::now();
        let mut rates = Rates::new(100, 16);
        let (a, b) = (client(1), client(2));
        // A second's worth at once: answered; as many again refused; the rest dropped.
        assert_eq!(verdicts(&mut rates, a, 250, t0), [100, 100, 50]);
        // Another client is not affected.
        assert_eq!(verdicts(&mut rates, b, 100, t0), [100, 0, 0]);
        // Refilled at the rate: 0.5 s later, 50 more answers and 50 more refusals.
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!(verdicts(&mut rates, a, 150, t1), [50, 50, 50]);
        // Never more than the burst held, however long the client was quiet.
        let t2 = t1 + Duration::from_secs(60);
        assert_eq!(verdicts(&mut rates, a, 101, t2), [100, 1, 0]);
    }

    #[test]
    fn a_steady_client_at_the_rate_is_always_answered() {
        let t0 = Instant::now();
        let mut rates = Rates::new(1000, 16);
        for ms in 0..5000u64 {
            let now = t0 + Duration::from_millis(ms);
            assert_eq!(rates.verdict(client(1), now), Verdict::Answer, "at {ms} ms");
        }
    }

    #[test]
    fn the_table_stays_bounded_forgetting_idle_clients_first() {
        let t0 = Instant::now();
        let mut rates = Rates::new(10, 4);
        // A flood uses up its buckets; three others ask once each and are full again 0.1 s on.
        verdicts(&mut rates, client(1), 30, t0);
        for c in 2..=4 {
            rates.verdict(client(c), t0);
        }
        assert_eq!(rates.len(), 4);
        let t1 = t0 + Duration::from_millis(100);
        rates.verdict(client(5), t1);
        assert_eq!(rates.len(), 2, "the idle ones went, the flooder stayed");
        let seen = verdicts(&mut rates, client(1), 10, t1);
        assert!(seen[0] <= 1 && seen[2] > 0, "still limited: {seen:?}");

        // Every client busy: the one heard from longest ago goes.
        let mut rates = Rates::new(10, 3);
        for (c, ms) in [(1, 20), (2, 0), (3, 10)] {
            verdicts(&mut rates, client(c), 15, t0 + Duration::from_millis(ms));
        }
        let t1 = t0 + Duration::from_millis(30);
        rates.verdict(client(4), t1);
        assert_eq!(rates.len(), 3);
        assert_eq!(
            rates.verdict(client(1), t1),
            Verdict::Refuse,
            "1 is remembered"
        );
        assert_eq!(
            rates.verdict(client(2), t1),
            Verdict::Answer,
            "2 started afresh"
        );
    }

    #[test]
    fn a_full_listener_evicts_the_longest_idle_connection() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut conns = TcpConns::new(3, 2);
        let (c1, _) = conns.admit(client(1), at(0)).unwrap();
        let (c2, _) = conns.admit(client(2), at(1)).unwrap();
        let (c3, _) = conns.admit(client(3), at(2)).unwrap();
        // c1 is working on a query, c3 answered one later than c2 was accepted.
        assert!(conns.busy(c1));
        assert!(conns.idle(c3, at(3)));
        let (c4, evicted) = conns.admit(client(4), at(4)).unwrap();
        assert_eq!(evicted, Some(c2));
        assert!(
            !conns.busy(c2),
            "an evicted connection learns it at its next step"
        );
        let (c5, evicted) = conns.admit(client(5), at(5)).unwrap();
        assert_eq!(evicted, Some(c3));
        // Every one busy: refused, nothing evicted.
        assert!(conns.busy(c4) && conns.busy(c5));
        assert_eq!(conns.admit(client(6), at(6)), None);
        // One done: it goes for the newcomer.
        conns.close(c1);
        assert_eq!(conns.admit(client(6), at(7)).unwrap().1, None);
    }

    #[test]
    fn a_client_at_its_cap_displaces_only_its_own_connections() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut conns = TcpConns::new(10, 2);
        let (other, _) = conns.admit(client(9), at(0)).unwrap();
        let (a1, _) = conns.admit(client(1), at(1)).unwrap();
        let (a2, _) = conns.admit(client(1), at(2)).unwrap();
        let (a3, evicted) = conns.admit(client(1), at(3)).unwrap();
        assert_eq!(
            evicted,
            Some(a1),
            "its own longest-idle, not the other client's"
        );
        assert!(conns.busy(a2) && conns.busy(a3));
        assert_eq!(conns.admit(client(1), at(4)), None, "its own are all busy");
        assert!(
            conns.idle(other, at(5)),
            "the other client kept its connection"
        );
        assert_eq!(conns.open.len(), 3);
    }
}
