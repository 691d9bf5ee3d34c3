//! How long the hub's tick is: the control law that makes it follow a
//! latency budget and an optional egress budget, instead of one number an
//! operator has to guess.
//!
//! The tick is `--batch-ms` (50 ms by default) while nothing asks for more,
//! and never shorter. It grows only for `--egress-budget`: a tick's frame
//! header and batch header go to every socket whatever the tick holds, and a
//! box toggled several times in one tick is sent once (docs/PROTOCOL.md, "A
//! Batch is coalesced"), so longer ticks send fewer bytes for the same
//! changes. That is the worker's first answer to too much egress; the second
//! (a socket whose kernel buffer stays full falls behind `--send-queue` and is
//! dropped to a snapshot, [`crate::sink`]) then only meets what longer ticks
//! could not absorb.
//!
//! The tick never grows past `--latency-budget` minus what a change spends
//! outside the wait for its tick (the feed's delivery to the hub and the
//! fan-out's writes to every socket, measured on each tick): a change waits at
//! most one tick, so it then reaches every socket within the budget. When the
//! two budgets disagree, the latency budget wins and the egress stays above
//! its budget (`omcb_tick_seconds` at its ceiling shows it).
//!
//! Everything here is a pure function of what [`Pacer::delivered`] and
//! [`Pacer::egress`] are told, so the unit tests below drive it without clocks.

use std::time::Duration;

/// How long egress is measured before the tick changes for it: long enough to
/// average over several ticks (20 at 50 ms, 4 at 250 ms), short enough to
/// follow a change of load within seconds.
const EGRESS_WINDOW: Duration = Duration::from_secs(1);

/// The egress the law aims at, as a share of the budget: a window above the
/// budget lengthens the tick to land here, one below [`EGRESS_LOW`] shortens
/// it to land here, and anything between keeps the tick (no hunting).
const EGRESS_TARGET: f64 = 0.95;
/// Below this share of the budget the tick shortens again.
const EGRESS_LOW: f64 = 0.9;
/// At most this factor of change per window, up or down, so one odd window
/// (a burst of connect snapshots) moves the tick a bounded step.
const MAX_STEP: f64 = 2.0;

/// How fast the remembered overhead forgets a slow tick: per published tick,
/// it decays by this factor towards newer samples (a slow fan-out is
/// remembered for ~50 ticks, a few seconds).
const OVERHEAD_DECAY: f64 = 0.95;

/// What the law is told at start.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Budgets {
    /// The shortest tick (`--batch-ms`), and the tick while no budget asks for more.
    pub min_tick: Duration,
    /// Commit of a change to its last socket write (`--latency-budget`).
    pub latency: Duration,
    /// Bytes per second written to this worker's sockets (`--egress-budget`).
    pub egress: Option<u64>,
}

/// The tick's length and what it is computed from; see the module docs.
#[derive(Debug, Clone)]
pub struct Pacer {
    budgets: Budgets,
    /// The tick the egress budget asks for (at least `min_tick`), before the
    /// latency ceiling.
    wanted: Duration,
    /// A decaying maximum of a change's time outside its tick wait (feed
    /// delivery + fan-out), in seconds.
    overhead: f64,
    /// Bytes and time of the egress window so far.
    window_bytes: u64,
    window_time: Duration,
}

impl Pacer {
    /// A pacer at the shortest tick.
    pub fn new(budgets: Budgets) -> Self {
        Self {
            budgets,
            wanted: budgets.min_tick,
            overhead: 0.0,
            window_bytes: 0,
            window_time: Duration::ZERO,
        }
    }

    /// The tick to wait now.
    pub fn tick(&self) -> Duration {
        self.wanted.min(self.ceiling())
    }

    /// The longest tick the latency budget allows now: the budget minus the
    /// remembered overhead, never below `min_tick` (a budget that the
    /// fan-out alone overruns cannot be met by any tick; the shortest one
    /// comes closest).
    pub fn ceiling(&self) -> Duration {
        let room = self.budgets.latency.as_secs_f64() - self.overhead;
        micros(room).max(self.budgets.min_tick)
    }

    /// A published tick reached its last socket: `overhead` is the time its
    /// oldest change spent outside the wait for the tick (from its commit to
    /// its arrival at the hub, plus the fan-out's writes).
    pub fn delivered(&mut self, overhead: Duration) {
        self.overhead = (self.overhead * OVERHEAD_DECAY).max(overhead.as_secs_f64());
    }

    /// `bytes` were written to sockets in the last `elapsed`. Once a window
    /// of [`EGRESS_WINDOW`] is full, the tick is set so the next window's
    /// bytes fit the budget, assuming a tick's bytes stay what they were (the
    /// headers do; coalescing makes the changes' bytes grow slower than the
    /// tick, so a longer tick lands at or under the target and the next
    /// window corrects the rest).
    pub fn egress(&mut self, bytes: u64, elapsed: Duration) {
        let Some(budget) = self.budgets.egress else {
            return;
        };
        self.window_bytes += bytes;
        self.window_time += elapsed;
        if self.window_time < EGRESS_WINDOW {
            return;
        }
        let rate = self.window_bytes as f64 / self.window_time.as_secs_f64();
        self.window_bytes = 0;
        self.window_time = Duration::ZERO;
        let share = rate / budget as f64;
        if (EGRESS_LOW..=1.0).contains(&share) {
            return;
        }
        // Measured at the tick that ran: a wanted tick above the ceiling did
        // not run, and scaling it would wind it up without end.
        let factor = (share / EGRESS_TARGET).clamp(1.0 / MAX_STEP, MAX_STEP);
        let next = self.tick().as_secs_f64() * factor;
        // Bounded above so the arithmetic stays finite; the ceiling binds first.
        self.wanted = micros(next.min(3600.0)).max(self.budgets.min_tick);
    }
}

/// `secs` (finite) as a duration of whole microseconds, 0 for a negative one:
/// rounded, so a budget minus an overhead is the duration it reads as.
fn micros(secs: f64) -> Duration {
    Duration::from_micros((secs.max(0.0) * 1e6).round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn pacer(egress: Option<u64>) -> Pacer {
        Pacer::new(Budgets { min_tick: 50 * MS, latency: 250 * MS, egress })
    }

    /// One second of ticks of `tick`, each writing `bytes_per_tick`.
    fn second(p: &mut Pacer, bytes_per_tick: impl Fn(Duration) -> u64) {
        let tick = p.tick();
        let mut t = Duration::ZERO;
        while t < Duration::from_secs(1) {
            p.egress(bytes_per_tick(tick), tick);
            t += tick;
        }
    }

    #[test]
    fn without_an_egress_budget_the_tick_stays_at_batch_ms() {
        let mut p = pacer(None);
        assert_eq!(p.tick(), 50 * MS);
        for _ in 0..100 {
            p.egress(10_000_000, 50 * MS);
            p.delivered(20 * MS);
        }
        assert_eq!(p.tick(), 50 * MS);
    }

    #[test]
    fn headers_over_the_budget_lengthen_the_tick_until_the_bytes_fit() {
        // 10,000 sockets x 20 bytes a tick: 4 MB/s at 50 ms; budget 1 MB/s.
        let mut p = Pacer::new(Budgets {
            min_tick: 50 * MS,
            latency: Duration::from_secs(1),
            egress: Some(1_000_000),
        });
        for _ in 0..10 {
            second(&mut p, |_| 200_000);
        }
        let rate = 200_000.0 / p.tick().as_secs_f64();
        assert!((0.9e6..=1.0e6).contains(&rate), "{rate} B/s at {:?}", p.tick());
    }

    #[test]
    fn bytes_that_grow_with_the_tick_still_converge_into_the_band() {
        // Per tick: headers 100 KB plus 2 MB/s of changes that do not coalesce
        // (every box distinct): rate = 100 KB / tick + 2 MB/s; budget 2.5 MB/s
        // is met at a tick of 250 ms (and under the 1 s ceiling).
        let mut p = Pacer::new(Budgets {
            min_tick: 50 * MS,
            latency: Duration::from_secs(1),
            egress: Some(2_500_000),
        });
        let bytes = |t: Duration| 100_000 + (2e6 * t.as_secs_f64()) as u64;
        for _ in 0..30 {
            second(&mut p, bytes);
        }
        let rate = bytes(p.tick()) as f64 / p.tick().as_secs_f64();
        assert!((0.9 * 2.5e6..=2.5e6).contains(&rate), "{rate} B/s at {:?}", p.tick());
    }

    #[test]
    fn the_latency_budget_caps_the_tick_whatever_the_egress() {
        let mut p = pacer(Some(1_000));
        p.delivered(30 * MS);
        for _ in 0..20 {
            second(&mut p, |_| 1_000_000);
        }
        assert_eq!(p.tick(), 220 * MS, "budget 250 ms - 30 ms of feed and fan-out");
        // The wanted tick did not wind up past the ceiling: with the egress
        // gone it comes back down within a few windows.
        for _ in 0..10 {
            second(&mut p, |_| 0);
        }
        assert_eq!(p.tick(), 50 * MS);
    }

    #[test]
    fn a_slow_fan_out_shortens_the_ceiling_and_is_forgotten_slowly() {
        let mut p = pacer(None);
        assert_eq!(p.ceiling(), 250 * MS);
        p.delivered(100 * MS);
        assert_eq!(p.ceiling(), 150 * MS);
        p.delivered(5 * MS);
        assert!(p.ceiling() < 160 * MS, "one fast tick does not forget a slow one");
        for _ in 0..200 {
            p.delivered(5 * MS);
        }
        let ceiling = p.ceiling();
        assert!(ceiling > 240 * MS && ceiling <= 245 * MS, "{ceiling:?}");
        // An overhead past the budget leaves the shortest tick, not zero.
        p.delivered(400 * MS);
        assert_eq!(p.ceiling(), 50 * MS);
    }

    #[test]
    fn egress_inside_the_band_keeps_the_tick_and_a_window_moves_it_at_most_twofold() {
        let mut p = pacer(Some(1_000_000));
        second(&mut p, |t| (0.95e6 * t.as_secs_f64()) as u64);
        assert_eq!(p.tick(), 50 * MS);
        second(&mut p, |t| (100e6 * t.as_secs_f64()) as u64);
        assert_eq!(p.tick(), 100 * MS);
        second(&mut p, |t| (0.92e6 * t.as_secs_f64()) as u64);
        assert_eq!(p.tick(), 100 * MS, "inside the band: kept");
        second(&mut p, |_| 0);
        assert_eq!(p.tick(), 50 * MS, "halved, at most, and never below --batch-ms");
    }
}
