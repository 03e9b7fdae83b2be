//! What the router holds in memory on behalf of clients and backends, in
//! bytes, against one budget for the process (`limits.max_buffered_bytes`).
//!
//! Owns: each session's account ([`SessionMemory`]: the bytes its read
//! buffers, write queues, replay window and move queue hold, reported by
//! the session itself), the process total, and the policy under pressure
//! ([`MemoryBudget::enforce`], run by a monitor task):
//!
//! - under [`PAUSE_AT`] of the budget nothing changes;
//! - from there, a session holding at least [`PAUSE_FLOOR`] stops reading
//!   from its client (TCP backpressure) until the total falls back;
//! - no read buffer grows past the budget: a read that would is refused and
//!   wakes the monitor, which closes the largest holders, newest first,
//!   until the total is back under [`RELIEF_AT`] (`1013 Try Again Later`,
//!   `wsrouter_closes_total{reason="memory_pressure"}`);
//! - pausing is for a burst: when the total stays past [`PAUSE_AT`] for
//!   [`PAUSE_GRACE`], the largest holders are closed the same way until it
//!   is back under the pause threshold.
//!
//! Sessions under [`PAUSE_FLOOR`] are never paused or closed. Leaves to
//! others: what counts as held (the session and its relay add it up), and
//! the close itself (the relay's).
//!
//! A session reports its total only when it moved by [`REPORT_STEP`] (or
//! before a read buffer grows), so the 64-byte path touches no shared
//! cache line: the process total may lag each session by under one step.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::task::Context;
use std::time::Duration;

use dashmap::DashMap;
use futures_util::task::AtomicWaker;
use metrics::Gauge;
use tokio::sync::Notify;

use crate::metrics as m;

/// Share of the budget from which the largest holders stop reading.
pub const PAUSE_AT: (usize, usize) = (3, 4);
/// Share of the budget the monitor closes sessions down to.
pub const RELIEF_AT: (usize, usize) = (7, 8);
/// A session holding less than this is never paused or closed for memory.
pub const PAUSE_FLOOR: usize = 64 * 1024;
/// A session's report to the process total moves in steps of this.
pub const REPORT_STEP: usize = 16 * 1024;
/// How often the monitor looks while the total is above [`PAUSE_AT`].
const PRESSURE_CHECK: Duration = Duration::from_millis(50);
/// How often the monitor looks otherwise (one load).
const CALM_CHECK: Duration = Duration::from_millis(250);
/// Pausing is for a burst: pressure that lasts this long closes the
/// largest holders down to the pause threshold (a client that holds a
/// message half-sent forever is never let go of otherwise).
pub const PAUSE_GRACE: Duration = Duration::from_secs(5);

/// Flags the monitor leaves on a session's account.
const PAUSED: u8 = 1;
const EVICT: u8 = 2;

/// The process budget and every session's account; cheap to clone.
#[derive(Clone)]
pub struct MemoryBudget {
    shared: Arc<Shared>,
}

struct Shared {
    /// `limits.max_buffered_bytes` (like all of `[limits]`, it changes at
    /// a restart, not a reload).
    limit: AtomicUsize,
    /// Bytes reported by all sessions.
    held: AtomicUsize,
    /// The most `held` has been since the start.
    peak: AtomicUsize,
    /// The monitor's last [`Pressure`], as its `u8`.
    pressure: AtomicU8,
    accounts: DashMap<u64, Arc<Account>>,
    /// The largest read refused for the budget since the monitor last
    /// looked (0: none): the monitor makes room for it.
    refused: AtomicUsize,
    wake_monitor: Notify,
    gauge: Gauge,
}

/// One session's account, shared with the monitor.
#[derive(Default)]
struct Account {
    held: AtomicUsize,
    flags: AtomicU8,
    waker: AtomicWaker,
}

/// What the monitor found the process in, for the log line on a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Pressure {
    Normal = 0,
    /// Above [`PAUSE_AT`]: the largest holders are paused.
    Pausing = 1,
    /// At the budget: the largest holders are being closed.
    Shedding = 2,
}

impl Pressure {
    pub fn as_str(self) -> &'static str {
        match self {
            Pressure::Normal => "normal",
            Pressure::Pausing => "pausing",
            Pressure::Shedding => "shedding",
        }
    }
}

impl MemoryBudget {
    pub fn new(limit: usize) -> MemoryBudget {
        MemoryBudget {
            shared: Arc::new(Shared {
                limit: AtomicUsize::new(limit),
                held: AtomicUsize::new(0),
                peak: AtomicUsize::new(0),
                pressure: AtomicU8::new(Pressure::Normal as u8),
                accounts: DashMap::new(),
                refused: AtomicUsize::new(0),
                wake_monitor: Notify::new(),
                gauge: metrics::gauge!(m::BUFFERED_BYTES),
            }),
        }
    }

    pub fn limit(&self) -> usize {
        self.shared.limit.load(Ordering::Relaxed)
    }

    /// The most the sessions have held at once since the start.
    pub fn peak(&self) -> usize {
        self.shared.peak.load(Ordering::Relaxed)
    }

    /// What the monitor last found.
    pub fn pressure(&self) -> Pressure {
        match self.shared.pressure.load(Ordering::Relaxed) {
            2 => Pressure::Shedding,
            1 => Pressure::Pausing,
            _ => Pressure::Normal,
        }
    }

    fn pause_at(&self) -> usize {
        self.limit() / PAUSE_AT.1 * PAUSE_AT.0
    }

    fn relief_at(&self) -> usize {
        self.limit() / RELIEF_AT.1 * RELIEF_AT.0
    }

    /// Bytes held by all sessions, as last reported.
    pub fn held(&self) -> usize {
        self.shared.held.load(Ordering::Relaxed)
    }

    /// Open the account of session `id`; it is closed (its bytes given
    /// back) when dropped.
    pub fn open(&self, id: u64) -> SessionMemory {
        let account = Arc::new(Account::default());
        self.shared.accounts.insert(id, Arc::clone(&account));
        SessionMemory {
            budget: self.clone(),
            account,
            id,
            reported: 0,
            seen_flags: 0,
        }
    }

    /// One look: pause, resume or close sessions as the total calls for.
    /// `sustained`: the total has been past the pause threshold for
    /// [`PAUSE_GRACE`].
    pub fn enforce(&self, sustained: bool) -> Pressure {
        let pressure = self.look(sustained);
        self.shared
            .pressure
            .store(pressure as u8, Ordering::Relaxed);
        pressure
    }

    fn look(&self, sustained: bool) -> Pressure {
        let shared = &*self.shared;
        let held = self.held();
        let (limit, pause_at, relief_at) = (self.limit(), self.pause_at(), self.relief_at());
        shared.gauge.set(held as f64);
        let wanted = shared.refused.swap(0, Ordering::AcqRel);
        if held < pause_at && wanted == 0 {
            // Whoever was paused reads again.
            for account in shared.accounts.iter() {
                if account.flags.fetch_and(!PAUSED, Ordering::AcqRel) & PAUSED != 0 {
                    account.waker.wake();
                }
            }
            return Pressure::Normal;
        }
        if held < limit && wanted == 0 && !sustained {
            return Pressure::Pausing;
        }
        // Past the budget (or with a read refused), down to relief;
        // after sustained pausing, down to the pause threshold.
        let target = if held >= limit || wanted > 0 {
            relief_at
        } else {
            pause_at
        };
        // The largest holders (at least half the largest one's bytes), the
        // newest first, until the total and the refused read are back
        // under relief.
        let mut holders: Vec<(u64, usize, Arc<Account>)> = shared
            .accounts
            .iter()
            .filter(|a| a.flags.load(Ordering::Acquire) & EVICT == 0)
            .map(|a| {
                (
                    *a.key(),
                    a.held.load(Ordering::Relaxed),
                    Arc::clone(a.value()),
                )
            })
            .filter(|(_, bytes, _)| *bytes >= PAUSE_FLOOR)
            .collect();
        let largest = holders
            .iter()
            .map(|(_, bytes, _)| *bytes)
            .max()
            .unwrap_or(0);
        holders.retain(|(_, bytes, _)| *bytes >= largest / 2);
        holders.sort_by_key(|holder| std::cmp::Reverse(holder.0));
        let mut left = held;
        for (_, bytes, account) in holders {
            if left + wanted < target {
                break;
            }
            account.flags.fetch_or(EVICT, Ordering::AcqRel);
            account.waker.wake();
            left = left.saturating_sub(bytes);
        }
        // A small session refused a read tries again: it is never held
        // back for long for the large ones' sake.
        for account in shared.accounts.iter() {
            if account.held.load(Ordering::Relaxed) < PAUSE_FLOOR
                && account.flags.fetch_and(!PAUSED, Ordering::AcqRel) & PAUSED != 0
            {
                account.waker.wake();
            }
        }
        Pressure::Shedding
    }

    /// Run [`MemoryBudget::enforce`] until `stop` resolves, logging each
    /// change of state.
    pub async fn monitor(self, stop: impl Future<Output = ()>) {
        let mut stop = std::pin::pin!(stop);
        let mut state = Pressure::Normal;
        let mut pressed_since: Option<tokio::time::Instant> = None;
        loop {
            let sustained = pressed_since.is_some_and(|at| at.elapsed() >= PAUSE_GRACE);
            let next = self.enforce(sustained);
            pressed_since = match next {
                Pressure::Normal => None,
                // A shed after sustained pausing gives the rest a new grace.
                _ if sustained => Some(tokio::time::Instant::now()),
                _ => pressed_since.or_else(|| Some(tokio::time::Instant::now())),
            };
            if next != state {
                let (held, limit) = (self.held(), self.limit());
                match next {
                    Pressure::Normal => tracing::info!(held, limit, "memory pressure over"),
                    Pressure::Pausing => tracing::warn!(
                        held,
                        limit,
                        "memory pressure: the largest holders stop reading"
                    ),
                    Pressure::Shedding => tracing::warn!(
                        held,
                        limit,
                        "memory budget reached: closing the largest holders with 1013"
                    ),
                }
                state = next;
            }
            let pause = match state {
                Pressure::Normal => CALM_CHECK,
                _ => PRESSURE_CHECK,
            };
            tokio::select! {
                _ = &mut stop => return,
                _ = tokio::time::sleep(pause) => {}
                _ = self.shared.wake_monitor.notified() => {}
            }
        }
    }
}

/// A session's account: what it holds, as it last reported it, and the
/// monitor's word to it. Dropping it gives the bytes back.
pub struct SessionMemory {
    budget: MemoryBudget,
    account: Arc<Account>,
    id: u64,
    /// Bytes this session last added to the process total.
    reported: usize,
    /// The flags as the session last acted on them.
    seen_flags: u8,
}

impl SessionMemory {
    /// Report that the session holds `held` bytes; the process total moves
    /// only when the change reaches a step.
    pub fn update(&mut self, held: usize) {
        if held.abs_diff(self.reported) >= REPORT_STEP {
            self.report(held);
        }
    }

    fn report(&mut self, held: usize) {
        let shared = &*self.budget.shared;
        let total = &shared.held;
        if held > self.reported {
            let now =
                total.fetch_add(held - self.reported, Ordering::Relaxed) + held - self.reported;
            shared.peak.fetch_max(now, Ordering::Relaxed);
        } else {
            total.fetch_sub(self.reported - held, Ordering::Relaxed);
        }
        self.reported = held;
        self.account.held.store(held, Ordering::Relaxed);
    }

    /// Whether the session may read from its client now, holding `held`
    /// bytes, when the read would grow its buffer by `growth`. When not,
    /// `cx` is woken once it may.
    pub fn may_read(&mut self, cx: &mut Context<'_>, held: usize, growth: usize) -> bool {
        if growth > 0 {
            // Exact before a buffer grows: the total never passes the limit.
            self.report(held);
        } else {
            self.update(held);
        }
        let shared = &*self.budget.shared;
        let total = shared.held.load(Ordering::Relaxed);
        let limit = shared.limit.load(Ordering::Relaxed);
        let over_limit = growth > 0 && total + growth > limit;
        let pausing = total >= limit / PAUSE_AT.1 * PAUSE_AT.0 && self.reported >= PAUSE_FLOOR;
        if !over_limit && !pausing {
            return true;
        }
        self.account.waker.register(cx.waker());
        self.account.flags.fetch_or(PAUSED, Ordering::AcqRel);
        self.seen_flags |= PAUSED;
        if over_limit {
            shared.refused.fetch_max(growth, Ordering::AcqRel);
            shared.wake_monitor.notify_one();
        }
        false
    }

    /// Whether the monitor has asked this session to close. Registers `cx`
    /// for the monitor's next word when `register` or the flags changed.
    pub fn must_close(&mut self, cx: &mut Context<'_>, register: bool) -> bool {
        let flags = self.account.flags.load(Ordering::Acquire);
        if register || flags != self.seen_flags {
            self.account.waker.register(cx.waker());
            self.seen_flags = self.account.flags.load(Ordering::Acquire);
        }
        self.seen_flags & EVICT != 0
    }

    /// Whether the session, holding `held` bytes, may hold `more` (for
    /// holders that cannot wait for a read, such as the queue of a session
    /// being moved: when not, the caller closes the session).
    pub fn may_hold(&mut self, held: usize, more: usize) -> bool {
        self.report(held);
        self.budget.held() + more <= self.budget.limit()
    }
}

impl Drop for SessionMemory {
    fn drop(&mut self) {
        self.report(0);
        self.budget.shared.accounts.remove(&self.id);
    }
}

/// The default budget: half of the memory the process may use (the cgroup
/// limit when there is one, else the machine's memory), or 1 GiB when
/// neither can be read.
pub fn default_budget() -> usize {
    let available = cgroup_limit().or_else(machine_memory);
    available.map_or(1 << 30, |bytes| bytes / 2)
}

fn cgroup_limit() -> Option<usize> {
    // cgroup v2, then v1 (whose "no limit" is a huge number).
    let v2 = std::fs::read_to_string("/sys/fs/cgroup/memory.max").ok();
    let v1 = || std::fs::read_to_string("/sys/fs/cgroup/memory/memory.limit_in_bytes").ok();
    let text = v2.or_else(v1)?;
    let bytes: usize = text.trim().parse().ok()?;
    let machine = machine_memory().unwrap_or(usize::MAX);
    (bytes < machine).then_some(bytes)
}

fn machine_memory() -> Option<usize> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cx() -> Context<'static> {
        Context::from_waker(futures_util::task::noop_waker_ref())
    }

    #[test]
    fn small_changes_stay_local_and_drop_gives_everything_back() {
        let budget = MemoryBudget::new(1 << 30);
        let mut a = budget.open(1);
        a.update(4 * 1024);
        assert_eq!(budget.held(), 0, "under a step, nothing is shared");
        a.update(100 * 1024);
        assert_eq!(budget.held(), 100 * 1024);
        let mut b = budget.open(2);
        b.update(50 * 1024);
        assert_eq!(budget.held(), 150 * 1024);
        drop(a);
        assert_eq!(budget.held(), 50 * 1024);
        drop(b);
        assert_eq!(budget.held(), 0);
    }

    #[test]
    fn large_holders_pause_near_the_budget_and_small_ones_never_do() {
        let mb = 1 << 20;
        let budget = MemoryBudget::new(64 * mb);
        let mut big = budget.open(1);
        let mut small = budget.open(2);
        assert!(big.may_read(&mut cx(), 40 * mb, 0), "under 3/4: reads");
        assert!(!big.may_read(&mut cx(), 50 * mb, 0), "past 3/4: paused");
        assert!(small.may_read(&mut cx(), 8 * 1024, 0));
        assert_eq!(budget.enforce(false), Pressure::Pausing);
        drop(big);
        assert_eq!(budget.enforce(false), Pressure::Normal);
    }

    #[test]
    fn a_read_past_the_budget_is_refused_and_the_largest_newest_close() {
        let mb = 1 << 20;
        let budget = MemoryBudget::new(16 * mb);
        let mut sessions: Vec<SessionMemory> = (1..=5).map(|id| budget.open(id)).collect();
        for s in &mut sessions[..4] {
            s.report(3 * mb);
        }
        // 12 MiB held: the fifth may not grow its buffer past 16 MiB.
        assert!(!sessions[4].may_read(&mut cx(), 0, 5 * mb));
        assert_eq!(budget.enforce(false), Pressure::Shedding);
        let closing: Vec<bool> = sessions
            .iter_mut()
            .map(|s| s.must_close(&mut cx(), true))
            .collect();
        // Until what is held and the refused 5 MiB fit under 14 MiB: the
        // two newest of the equal holders (the fifth holds too little).
        assert_eq!(closing, [false, false, true, true, false]);
    }

    #[test]
    fn pausing_that_lasts_closes_the_largest_down_to_the_pause_threshold() {
        let mb = 1 << 20;
        let budget = MemoryBudget::new(64 * mb);
        let mut sessions: Vec<SessionMemory> = (1..=6).map(|id| budget.open(id)).collect();
        for s in &mut sessions[..5] {
            s.report(10 * mb);
        }
        sessions[5].report(32 * 1024);
        // 50 MiB held, past 3/4 of 64: paused, and nobody closed...
        assert_eq!(budget.enforce(false), Pressure::Pausing);
        assert!(sessions.iter_mut().all(|s| !s.must_close(&mut cx(), true)));
        // ...until it lasts: the newest large holder goes, down under 48.
        assert_eq!(budget.enforce(true), Pressure::Shedding);
        let closing: Vec<bool> = sessions
            .iter_mut()
            .map(|s| s.must_close(&mut cx(), true))
            .collect();
        assert_eq!(closing, [false, false, false, false, true, false]);
    }
}
