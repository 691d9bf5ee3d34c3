//! Limits per client address, across all of its sockets and HTTP connections.
//!
//! A socket's own token bucket ([`crate::ratelimit`]) keeps one socket fair
//! to the others of its address; it cannot stop an address that opens many
//! sockets, or reconnects for a fresh bucket. So every client address (after
//! trusted `X-Forwarded-For`, IPv6 grouped by `--ipv6-prefix`) has one entry
//! here with:
//! - its WebSocket and plain-HTTP connection counts (`--max-connections-per-ip`,
//!   `--max-http-connections-per-ip`),
//! - a toggle bucket shared by all of its sockets (`--ip-toggle-rate`/`-burst`),
//! - a connect bucket (`--ip-connect-rate`/`-burst`): new sockets per second,
//! - a snapshot bucket in bytes (`--ip-snapshot-rate`/`-burst`): what connect
//!   snapshots and Resyncs may pull.
//!
//! **Entries outlive connections.** An entry with no connections is kept at
//! least until all of its buckets are full again (only a full table drops
//! entries), so reconnecting refills nothing: an entry that may be forgotten
//! is worth exactly what a fresh one holds.
//!
//! **Bounded.** The table holds at most `--address-table-size` entries of
//! about 250 bytes each with the map's overhead (65,536 entries: ~16 MB;
//! `tests::an_entry_is_about_250_bytes`). When it is full, entries with full
//! buckets and no connections are dropped first, then the least recently used
//! half of those without connections (their clients lose whatever budget they
//! had used up: an attacker needs more addresses than the table holds to get
//! that); `tests::the_table_stays_bounded_and_keeps_connected_addresses`. An
//! address that finds the table full of connected addresses is refused (429):
//! that takes `--address-table-size` connected addresses, and the table is
//! sized above `--max-connections` by default.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::config::Config;
use crate::ratelimit::TokenBucket;

/// How long a socket may be made to wait for a Resync snapshot before it is
/// closed (1008) instead: waiting longer only queues more debt.
pub const SNAPSHOT_MAX_WAIT: Duration = Duration::from_secs(5);

/// The key an address is counted under: IPv4 addresses (and IPv4-mapped IPv6)
/// as they are, IPv6 masked to its first `v6_prefix` bits (a home or a host
/// is given a /64, so per address would be per 2^64 addresses).
pub fn key(ip: IpAddr, v6_prefix: u8) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => {
            let bits = u32::from(v6_prefix.min(128));
            let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
            IpAddr::V6((u128::from(v6) & mask).into())
        }
    }
}

/// What a snapshot of this board costs in bytes (two bitsets), without encoding one.
pub fn snapshot_bytes(board_size: u32) -> f64 {
    f64::from(board_size) / 4.0 + 64.0
}

/// Why an address was refused before its connection was served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Over `--ip-connect-rate`: too many new sockets.
    Connects,
    /// Over `--ip-snapshot-rate`: a new socket's snapshot would exceed it.
    Snapshots,
    /// Over `--max-http-connections-per-ip`.
    HttpConnections,
    /// The table is full of addresses that hold connections.
    TableFull,
    /// Over a connection cap while `--max-connections` refused sockets are
    /// already waiting for their close.
    Busy,
}

/// The budgets of one address, from the configuration.
#[derive(Debug, Clone, Copy)]
struct Budgets {
    toggle: Option<(f64, f64)>,
    connect: Option<(f64, f64)>,
    snapshot: Option<(f64, f64)>,
}

/// One address's counts and buckets.
#[derive(Debug)]
struct State {
    sockets: usize,
    http: usize,
    toggles: Option<TokenBucket>,
    connects: Option<TokenBucket>,
    snapshots: Option<TokenBucket>,
    last_used: Instant,
}

impl State {
    fn new(b: &Budgets, now: Instant) -> Self {
        let bucket =
            |x: Option<(f64, f64)>| x.map(|(rate, burst)| TokenBucket::new(rate, burst, now));
        State {
            sockets: 0,
            http: 0,
            toggles: bucket(b.toggle),
            connects: bucket(b.connect),
            snapshots: bucket(b.snapshot),
            last_used: now,
        }
    }

    /// No connections and every bucket full: forgetting it loses nothing.
    fn forgettable(&mut self, now: Instant) -> bool {
        self.sockets == 0
            && self.http == 0
            && [&mut self.toggles, &mut self.connects, &mut self.snapshots]
                .into_iter()
                .all(|b| b.as_mut().is_none_or(|b| b.is_full(now)))
    }
}

/// One client address (or IPv6 prefix).
#[derive(Debug)]
pub struct Address {
    /// The key it is counted under (see [`key`]).
    pub key: IpAddr,
    state: Mutex<State>,
}

impl Address {
    /// Takes one toggle from the address's shared budget.
    pub fn try_toggle(&self, now: Instant) -> bool {
        let mut s = self.state.lock();
        s.last_used = now;
        s.toggles.as_mut().is_none_or(|b| b.try_take(now))
    }

    /// Reserves `bytes` of snapshot for a Resync: how long to wait for them,
    /// or None when the wait would exceed [`SNAPSHOT_MAX_WAIT`].
    pub fn reserve_snapshot(&self, bytes: f64, now: Instant) -> Option<Duration> {
        let mut s = self.state.lock();
        s.last_used = now;
        match s.snapshots.as_mut() {
            None => Some(Duration::ZERO),
            Some(b) => b.reserve(bytes, now, SNAPSHOT_MAX_WAIT),
        }
    }
}

/// A held WebSocket or HTTP connection of an address; released on drop.
#[derive(Debug)]
pub struct Hold {
    address: Arc<Address>,
    kind: Kind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A WebSocket within the caps.
    Socket,
    /// A WebSocket over a cap: it takes no slot while it waits for its 1013.
    Refusing,
    /// A plain HTTP connection.
    Http,
}

impl Hold {
    /// Turns an admitted socket into a refused one (over `--max-connections`):
    /// it no longer counts toward its address's cap.
    pub fn refuse(&mut self) {
        if self.kind == Kind::Socket {
            self.address.state.lock().sockets -= 1;
            self.kind = Kind::Refusing;
        }
    }

    /// The address this connection belongs to.
    pub fn address(&self) -> &Arc<Address> {
        &self.address
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        let mut s = self.address.state.lock();
        match self.kind {
            Kind::Socket => s.sockets -= 1,
            Kind::Http => s.http -= 1,
            Kind::Refusing => {}
        }
        s.last_used = Instant::now();
    }
}

/// Every client address this worker has seen lately.
#[derive(Debug)]
pub struct Addresses {
    table: Mutex<HashMap<IpAddr, Arc<Address>>>,
    capacity: usize,
    v6_prefix: u8,
    budgets: Budgets,
    max_sockets: usize,
    max_http: usize,
}

impl Addresses {
    /// The table for this configuration.
    pub fn new(config: &Config) -> Self {
        let on = |rate: f64, burst: f64| (rate > 0.0).then_some((rate, burst));
        Addresses {
            table: Mutex::new(HashMap::new()),
            capacity: usize::try_from(config.address_table_size).unwrap_or(usize::MAX).max(1),
            v6_prefix: config.ipv6_prefix,
            budgets: Budgets {
                toggle: on(config.ip_toggle_rate(), config.ip_toggle_burst()),
                connect: on(config.ip_connect_rate, config.ip_connect_burst),
                snapshot: on(config.ip_snapshot_rate, config.ip_snapshot_burst),
            },
            max_sockets: config.max_connections_per_ip,
            max_http: config.max_http_connections_per_ip,
        }
    }

    /// Entries in the table now.
    pub fn len(&self) -> usize {
        self.table.lock().len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Runs `f` on the entry of `ip` (made if need be), under the table's
    /// lock so that an entry is never dropped between lookup and hold.
    fn with_entry<T>(
        &self,
        ip: IpAddr,
        f: impl FnOnce(&Arc<Address>, &mut State) -> T,
    ) -> Result<T, Refused> {
        let key = key(ip, self.v6_prefix);
        let now = Instant::now();
        let mut table = self.table.lock();
        if !table.contains_key(&key) && table.len() >= self.capacity {
            make_room(&mut table, now, self.capacity);
            if table.len() >= self.capacity {
                return Err(Refused::TableFull);
            }
        }
        let entry = table.entry(key).or_insert_with(|| {
            Arc::new(Address { key, state: Mutex::new(State::new(&self.budgets, now)) })
        });
        let mut state = entry.state.lock();
        state.last_used = now;
        Ok(f(entry, &mut state))
    }

    /// A new WebSocket from `ip` (before its upgrade). Refused outright over
    /// the connect or snapshot budget (HTTP 429); admitted as `Refusing` over
    /// `--max-connections-per-ip` (it gets its 1013 but holds no slot). The
    /// socket is charged the `snapshot` bytes it starts with up front: a full
    /// Snapshot's, a range Snapshot's for one subscribed at connect
    /// (`?first=&count=`), none for one that resumes (`?since=`).
    pub fn socket(&self, ip: IpAddr, snapshot: Option<f64>) -> Result<(Hold, bool), Refused> {
        let max = self.max_sockets;
        self.with_entry(ip, |entry, s| {
            let now = s.last_used;
            if !s.connects.as_mut().is_none_or(|b| b.try_take(now)) {
                return Err(Refused::Connects);
            }
            let over_cap = max > 0 && s.sockets >= max;
            if !over_cap && let Some(bytes) = snapshot {
                // Charge the snapshot only to sockets that will get one.
                if !s.snapshots.as_mut().is_none_or(|b| b.try_take_n(bytes, now)) {
                    return Err(Refused::Snapshots);
                }
            }
            let kind = if over_cap {
                Kind::Refusing
            } else {
                s.sockets += 1;
                Kind::Socket
            };
            Ok((Hold { address: entry.clone(), kind }, !over_cap))
        })?
    }

    /// A new plain-HTTP connection from `ip`, refused over `--max-http-connections-per-ip`.
    pub fn http(&self, ip: IpAddr) -> Result<Hold, Refused> {
        let max = self.max_http;
        self.with_entry(ip, |entry, s| {
            if max > 0 && s.http >= max {
                return Err(Refused::HttpConnections);
            }
            s.http += 1;
            Ok(Hold { address: entry.clone(), kind: Kind::Http })
        })?
    }
}

/// Frees room in a full table: entries worth nothing first, then the least
/// recently used half of the entries without connections.
/// Either way at least a tenth of the table is freed when it can be, so the
/// scans cost O(1) per new address, amortized.
fn make_room(table: &mut HashMap<IpAddr, Arc<Address>>, now: Instant, capacity: usize) {
    table.retain(|_, a| !a.state.lock().forgettable(now));
    if table.len() < capacity - capacity / 10 {
        return;
    }
    let mut idle: Vec<(Instant, IpAddr)> = table
        .iter()
        .filter_map(|(k, a)| {
            let s = a.state.lock();
            (s.sockets == 0 && s.http == 0).then_some((s.last_used, *k))
        })
        .collect();
    idle.sort_unstable();
    let evict = idle.len().div_ceil(2);
    for (_, k) in &idle[..evict] {
        table.remove(k);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        config: Config,
    }

    fn config(args: &str) -> Config {
        Cli::parse_from(std::iter::once("omcb").chain(args.split_whitespace())).config
    }

    #[test]
    fn ipv6_is_grouped_by_prefix_and_ipv4_by_address() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(key(a, 64), key(b, 64));
        assert_ne!(key(a, 64), key(c, 64));
        assert_eq!(key(a, 48), key(c, 48));
        assert_ne!(key(a, 128), key(b, 128));
        let v4: IpAddr = "192.0.2.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert_eq!(key(mapped, 64), v4);
        assert_ne!(key(v4, 64), key("192.0.2.2".parse().unwrap(), 64));
    }

    #[test]
    fn toggles_are_shared_by_an_address_and_outlive_its_sockets() {
        let t = Addresses::new(&config("--ip-toggle-rate 0.001 --ip-toggle-burst 10"));
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let now = Instant::now();
        let (one, _) = t.socket(ip, Some(1.0)).unwrap();
        let (two, _) = t.socket(ip, Some(1.0)).unwrap();
        let taken = (0..20)
            .filter(|i| if i % 2 == 0 { &one } else { &two }.address().try_toggle(now))
            .count();
        assert_eq!(taken, 10, "two sockets share one budget");
        drop((one, two));
        let (again, _) = t.socket(ip, Some(1.0)).unwrap();
        assert!(!again.address().try_toggle(now), "reconnecting refills nothing");
    }

    #[test]
    fn the_table_stays_bounded_and_keeps_connected_addresses() {
        let t = Addresses::new(&config("--address-table-size 100 --ip-connect-burst 1"));
        let held: Vec<_> =
            (0..50u32).map(|i| t.http(IpAddr::from((i + 1).to_be_bytes())).unwrap()).collect();
        for i in 0..10_000u32 {
            // Each used its one connect: not forgettable, yet evictable.
            let ip = IpAddr::from((1_000_000 + i).to_be_bytes());
            let _ = t.socket(ip, None).unwrap();
            assert!(t.len() <= 100);
        }
        // Connected addresses were never evicted: their counts still hold.
        for h in &held {
            assert_eq!(h.address().state.lock().http, 1);
            assert!(Arc::ptr_eq(h.address(), &t.table.lock()[&h.address().key]));
        }
        // A table full of connected addresses refuses newcomers.
        let t = Addresses::new(&config("--address-table-size 2"));
        let _a = t.http("192.0.2.1".parse().unwrap()).unwrap();
        let _b = t.http("192.0.2.2".parse().unwrap()).unwrap();
        assert_eq!(t.http("192.0.2.3".parse().unwrap()).unwrap_err(), Refused::TableFull);
    }

    #[test]
    fn an_entry_is_about_250_bytes() {
        // The entry, Arc's two counts, and the map's slot (key, pointer, control
        // byte, 7/8 load): what the module docs and --address-table-size promise.
        let slot = (size_of::<(IpAddr, Arc<Address>)>() + 1) * 8 / 7;
        let entry = size_of::<Address>() + 2 * size_of::<usize>() + slot;
        assert!(entry <= 256, "{entry} bytes per address");
    }
}
