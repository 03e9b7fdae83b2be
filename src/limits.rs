//! Edge limits: per-IP new-connection rate, per-IP concurrent sessions, the
//! global session cap, the Origin allow-list, per-session message and byte
//! rates, and the "under attack" switch that tightens them at run time.
//!
//! [`Limits`] is a cheap-clone handle shared by every connection task and the
//! admin API. Connection checks return a [`Refused`] that maps to one HTTP
//! status and one `wsrouter_rejected_connections_total{reason}` word; an
//! [`Admission`] holds a session's place under the caps and gives it back on
//! drop. Per-session rates are a [`MessageBudget`] owned by the session's
//! relay. A limit set to 0 is off.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use tokio::time::Instant;

use crate::config::{LimitsConfig, PerIpLimits};

/// Why a connection was refused at the edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("too many new connections from this address")]
    RateLimited,
    #[error("too many sessions from this address")]
    TooManyFromAddress,
    #[error("the router is at its session limit")]
    AtCapacity,
    #[error("this Origin is not allowed")]
    Origin,
}

impl Refused {
    /// HTTP status and reason phrase answered before the upgrade.
    pub fn status(self) -> (u16, &'static str) {
        match self {
            Refused::RateLimited | Refused::TooManyFromAddress => (429, "Too Many Requests"),
            Refused::AtCapacity => (503, "Service Unavailable"),
            Refused::Origin => (403, "Forbidden"),
        }
    }

    /// `wsrouter_rejected_connections_total{reason}`.
    pub fn reason(self) -> &'static str {
        match self {
            Refused::RateLimited => "rate_limit",
            Refused::TooManyFromAddress => "per_ip_sessions",
            Refused::AtCapacity => "max_sessions",
            Refused::Origin => "origin",
        }
    }
}

/// The edge limits of one router; cheap to clone.
#[derive(Clone)]
pub struct Limits {
    shared: Arc<Shared>,
}

struct Shared {
    config: LimitsConfig,
    /// Token buckets per client address, normal and under attack.
    normal_rate: Option<DefaultKeyedRateLimiter<IpAddr>>,
    attack_rate: Option<DefaultKeyedRateLimiter<IpAddr>>,
    /// Live sessions per client address (entries removed at zero).
    per_ip: DashMap<IpAddr, u32>,
    /// Live sessions in all.
    total: AtomicUsize,
    under_attack: AtomicBool,
}

fn rate_limiter(limits: &PerIpLimits) -> Option<DefaultKeyedRateLimiter<IpAddr>> {
    let rate = NonZeroU32::new(limits.connection_rate)?;
    let burst = NonZeroU32::new(limits.connection_burst).unwrap_or(rate);
    Some(RateLimiter::keyed(
        Quota::per_second(rate).allow_burst(burst),
    ))
}

impl Limits {
    pub fn new(config: &LimitsConfig) -> Limits {
        Limits {
            shared: Arc::new(Shared {
                normal_rate: rate_limiter(&config.per_ip),
                attack_rate: rate_limiter(&config.under_attack),
                per_ip: DashMap::new(),
                total: AtomicUsize::new(0),
                under_attack: AtomicBool::new(config.start_under_attack),
                config: config.clone(),
            }),
        }
    }

    pub fn is_under_attack(&self) -> bool {
        self.shared.under_attack.load(Ordering::Relaxed)
    }

    /// Switch "under attack" mode. Established sessions are not touched.
    pub fn set_under_attack(&self, on: bool) {
        if self.shared.under_attack.swap(on, Ordering::Relaxed) != on {
            tracing::warn!(under_attack = on, "under-attack mode switched");
        }
    }

    fn per_ip(&self) -> &PerIpLimits {
        if self.is_under_attack() {
            &self.shared.config.under_attack
        } else {
            &self.shared.config.per_ip
        }
    }

    /// Take one token from `ip`'s new-connection bucket.
    pub fn check_rate(&self, ip: IpAddr) -> Result<(), Refused> {
        let limiter = if self.is_under_attack() {
            &self.shared.attack_rate
        } else {
            &self.shared.normal_rate
        };
        match limiter {
            Some(limiter) if limiter.check_key(&ip).is_err() => Err(Refused::RateLimited),
            _ => Ok(()),
        }
    }

    /// Check the Origin header against the allow-list. Without a list any
    /// Origin passes. A request without one passes unless `require_origin`
    /// is set or the router is under attack (browsers always send one).
    pub fn check_origin(&self, origin: Option<&str>) -> Result<(), Refused> {
        let config = &self.shared.config;
        let allowed = &config.allowed_origins;
        match origin.map(str::trim) {
            None if config.require_origin || self.is_under_attack() => Err(Refused::Origin),
            None => Ok(()),
            Some(o) if allowed.is_empty() || allowed.iter().any(|a| a.eq_ignore_ascii_case(o)) => {
                Ok(())
            }
            Some(_) => Err(Refused::Origin),
        }
    }

    /// Admit a session from `ip` under the per-IP and global caps.
    pub fn admit(&self, ip: IpAddr) -> Result<Admission, Refused> {
        let max_total = self.shared.config.max_sessions;
        let admitted = self
            .shared
            .total
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (max_total == 0 || n < max_total).then_some(n + 1)
            });
        if admitted.is_err() {
            return Err(Refused::AtCapacity);
        }
        let max_per_ip = self.per_ip().max_sessions;
        let mut count = self.shared.per_ip.entry(ip).or_insert(0);
        if max_per_ip != 0 && *count >= max_per_ip {
            drop(count);
            self.release_total();
            self.forget_if_zero(ip);
            return Err(Refused::TooManyFromAddress);
        }
        *count += 1;
        drop(count);
        Ok(Admission {
            limits: self.clone(),
            ip,
        })
    }

    fn release_total(&self) {
        self.shared.total.fetch_sub(1, Ordering::AcqRel);
    }

    fn forget_if_zero(&self, ip: IpAddr) {
        self.shared.per_ip.remove_if(&ip, |_, n| *n == 0);
    }

    /// Live sessions in all.
    #[cfg(test)]
    pub fn sessions(&self) -> usize {
        self.shared.total.load(Ordering::Relaxed)
    }

    /// A fresh per-session message budget, or `None` when both rates are off.
    pub fn message_budget(&self) -> Option<MessageBudget> {
        let c = &self.shared.config;
        (c.session_message_rate != 0 || c.session_byte_rate != 0).then(|| MessageBudget {
            messages: Bucket::new(c.session_message_rate, c.session_message_burst),
            bytes: Bucket::new(c.session_byte_rate, c.session_byte_burst),
        })
    }

    /// Drop rate-limiter state for addresses not seen lately (memory bound).
    pub fn forget_idle_addresses(&self) {
        for limiter in [&self.shared.normal_rate, &self.shared.attack_rate]
            .into_iter()
            .flatten()
        {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }
}

/// A session's place under the per-IP and global caps, given back on drop.
pub struct Admission {
    limits: Limits,
    ip: IpAddr,
}

impl Drop for Admission {
    fn drop(&mut self) {
        if let Some(mut count) = self.limits.shared.per_ip.get_mut(&self.ip) {
            *count = count.saturating_sub(1);
        }
        self.limits.forget_if_zero(self.ip);
        self.limits.release_total();
    }
}

/// Per-session token buckets for client messages and bytes; exceeding
/// either closes the session with 1008.
#[derive(Debug, Clone)]
pub struct MessageBudget {
    messages: Bucket,
    bytes: Bucket,
}

impl MessageBudget {
    /// Spend one message of `len` bytes; false when over either rate.
    pub fn spend(&mut self, len: usize) -> bool {
        let now = Instant::now();
        self.messages.take(1.0, now) & self.bytes.take(len as f64, now)
    }

    /// The tokens left (messages, bytes), for a router upgrade's new
    /// process.
    pub fn tokens(&self) -> (f64, f64) {
        (self.messages.tokens, self.bytes.tokens)
    }

    /// Start from the tokens an old process left (within this process's
    /// bursts): an upgrade gives no client a fresh allowance.
    pub fn set_tokens(&mut self, (messages, bytes): (f64, f64)) {
        self.messages.tokens = messages.clamp(0.0, self.messages.burst);
        self.bytes.tokens = bytes.clamp(0.0, self.bytes.burst);
    }
}

/// A token bucket: `rate` per second, holding at most `burst`; rate 0 is off.
#[derive(Debug, Clone)]
struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new(rate: u64, burst: u64) -> Bucket {
        let burst = if burst == 0 { rate } else { burst } as f64;
        Bucket {
            rate: rate as f64,
            burst,
            tokens: burst,
            last: Instant::now(),
        }
    }

    fn take(&mut self, amount: f64, now: Instant) -> bool {
        if self.rate == 0.0 {
            return true;
        }
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= amount {
            self.tokens -= amount;
            true
        } else {
            false
        }
    }
}

/// How often idle rate-limiter entries are dropped.
pub const FORGET_INTERVAL: Duration = Duration::from_secs(60);

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> LimitsConfig {
        LimitsConfig {
            max_sessions: 3,
            max_buffered_bytes: 1 << 30,
            per_ip: PerIpLimits {
                connection_rate: 1,
                connection_burst: 2,
                max_sessions: 2,
            },
            under_attack: PerIpLimits {
                connection_rate: 1,
                connection_burst: 1,
                max_sessions: 1,
            },
            start_under_attack: false,
            allowed_origins: vec!["https://chat.example".into()],
            require_origin: false,
            session_message_rate: 2,
            session_message_burst: 2,
            session_byte_rate: 0,
            session_byte_burst: 0,
        }
    }

    #[test]
    fn caps_count_live_sessions_and_give_back_on_drop() {
        let limits = Limits::new(&config());
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let first = limits.admit(a).unwrap();
        let _second = limits.admit(a).unwrap();
        assert_eq!(limits.admit(a).err(), Some(Refused::TooManyFromAddress));
        let _third = limits.admit(b).unwrap();
        assert_eq!(limits.admit(b).err(), Some(Refused::AtCapacity));
        drop(first);
        let _fourth = limits.admit(b).unwrap();
        assert_eq!(limits.sessions(), 3);
        assert_eq!(limits.admit(a).err(), Some(Refused::AtCapacity));
    }

    #[test]
    fn under_attack_tightens_per_ip_limits_and_requires_an_origin() {
        let limits = Limits::new(&config());
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        assert!(limits.check_origin(None).is_ok());
        assert!(limits.check_origin(Some("https://chat.example")).is_ok());
        assert_eq!(
            limits.check_origin(Some("https://evil.example")),
            Err(Refused::Origin)
        );
        limits.set_under_attack(true);
        assert_eq!(limits.check_origin(None), Err(Refused::Origin));
        let _one = limits.admit(a).unwrap();
        assert_eq!(limits.admit(a).err(), Some(Refused::TooManyFromAddress));
        assert!(limits.check_rate(a).is_ok());
        assert_eq!(limits.check_rate(a), Err(Refused::RateLimited));
    }

    #[tokio::test(start_paused = true)]
    async fn message_budget_refills_at_its_rate() {
        let limits = Limits::new(&config());
        let mut budget = limits.message_budget().unwrap();
        assert!(budget.spend(10));
        assert!(budget.spend(10));
        assert!(!budget.spend(10));
        tokio::time::advance(Duration::from_millis(500)).await;
        assert!(budget.spend(10));
        assert!(!budget.spend(10));
    }
}
