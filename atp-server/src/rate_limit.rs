//! The rate limits of tool calls ([`crate::RateLimits`]): calls a second
//! with a burst (GCRA, through `governor`), calls in flight (a semaphore)
//! and the size of a call's arguments, for each LLM key and each toolkit.
//!
//! The counters live in this process: with N servers behind a balancer,
//! a key may make up to N times its limit in all (docs/OPERATIONS.md).

use std::{
    collections::HashMap,
    num::NonZeroU32,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use governor::{
    DefaultDirectRateLimiter, Quota, RateLimiter,
    clock::{Clock, DefaultClock},
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::{Limit, RateLimits};

/// The most counters of one kind kept; past it the idle ones are dropped
/// (only dev mode, which takes any key, can have that many keys).
const MAX_COUNTERS: usize = 10_000;
/// The `Retry-After` of a refusal for calls in flight: they end at their
/// own pace, so this is a guess.
const BUSY_RETRY: Duration = Duration::from_secs(1);

/// Which limit refused a call: the `limit` label of
/// `atp_rate_limited_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LimitKind {
    /// The key's calls a second.
    KeyRate,
    /// The toolkit's calls a second.
    ToolkitRate,
    /// The key's calls in flight.
    KeyConcurrency,
    /// The toolkit's calls in flight.
    ToolkitConcurrency,
    /// The size of the call's arguments.
    RequestSize,
}

impl LimitKind {
    /// Its label value.
    pub fn as_str(self) -> &'static str {
        match self {
            LimitKind::KeyRate => "key_rate",
            LimitKind::ToolkitRate => "toolkit_rate",
            LimitKind::KeyConcurrency => "key_concurrency",
            LimitKind::ToolkitConcurrency => "toolkit_concurrency",
            LimitKind::RequestSize => "request_size",
        }
    }
}

/// A refused call.
#[derive(Debug, Clone)]
pub(crate) struct Refused {
    /// Which limit.
    pub kind: LimitKind,
    /// When to try again (none for a call too large: it never fits).
    pub retry_after: Option<Duration>,
    /// Why, for people (names the limit, never a key).
    pub message: String,
}

/// Held while an admitted call runs: its places among the calls in flight.
#[derive(Debug)]
pub(crate) struct Permit {
    _running: Vec<OwnedSemaphorePermit>,
}

/// A counter of one key or one toolkit, with the limit it was made for
/// (a changed limit makes a new one).
struct Counter<T> {
    limit: Limit,
    inner: Arc<T>,
}

type Table<T> = Mutex<HashMap<String, Counter<T>>>;

/// The counters of every key and toolkit.
pub(crate) struct Limiter {
    limits: RateLimits,
    rates: Table<DefaultDirectRateLimiter>,
    running: Table<Semaphore>,
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

fn quota(limit: &Limit) -> Option<Quota> {
    let rate = limit.calls_per_second?;
    let period = Duration::try_from_secs_f64(1.0 / rate).ok()?;
    let burst = limit
        .burst
        .unwrap_or_else(|| rate.ceil().clamp(1.0, f64::from(u32::MAX)) as u32);
    Some(Quota::with_period(period)?.allow_burst(NonZeroU32::new(burst)?))
}

/// The counter of `name` in `table`, made (or made again, its limit
/// changed) by `make`.
fn counter<T>(table: &Table<T>, name: &str, limit: Limit, make: impl FnOnce() -> T) -> Arc<T> {
    let mut t = table.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(c) = t.get(name)
        && c.limit == limit
    {
        return c.inner.clone();
    }
    if t.len() >= MAX_COUNTERS {
        t.retain(|_, c| Arc::strong_count(&c.inner) > 1);
    }
    let inner = Arc::new(make());
    t.insert(
        name.to_owned(),
        Counter {
            limit,
            inner: inner.clone(),
        },
    );
    inner
}

impl Limiter {
    pub fn new(limits: RateLimits) -> Self {
        Self {
            limits,
            rates: Mutex::default(),
            running: Mutex::default(),
        }
    }

    /// Admits a call of the toolkit `toolkit` by the key whose hash is
    /// `key_hash` (its id `key_id` if it is a database key), its
    /// arguments `request_bytes` long; or says which limit refuses it.
    pub fn admit(
        &self,
        key_hash: &str,
        key_id: Option<&str>,
        toolkit: &str,
        request_bytes: usize,
    ) -> Result<Permit, Refused> {
        let by_key = self.limits.for_key(key_id);
        let by_kit = self.limits.for_toolkit(toolkit);
        for (limit, whose) in [(&by_key, "this API key"), (&by_kit, "this toolkit")] {
            if let Some(max) = limit.max_request_bytes
                && request_bytes > max
            {
                return Err(Refused {
                    kind: LimitKind::RequestSize,
                    retry_after: None,
                    message: format!(
                        "The call's arguments are {request_bytes} bytes; {whose} takes at most {max}"
                    ),
                });
            }
        }
        let mut running = Vec::new();
        for (limit, name, kind, whose) in [
            (by_key, key_hash, LimitKind::KeyConcurrency, "this API key"),
            (
                by_kit,
                toolkit,
                LimitKind::ToolkitConcurrency,
                "this toolkit",
            ),
        ] {
            let Some(max) = limit.max_concurrent else {
                continue;
            };
            let table_name = format!("{}:{name}", kind.as_str());
            let sem = counter(&self.running, &table_name, limit, || {
                Semaphore::new(max as usize)
            });
            match sem.try_acquire_owned() {
                Ok(p) => running.push(p),
                Err(_) => {
                    return Err(Refused {
                        kind,
                        retry_after: Some(BUSY_RETRY),
                        message: format!(
                            "Rate limited: {whose} has {max} call(s) in flight already, its most at once"
                        ),
                    });
                }
            }
        }
        for (limit, name, kind, whose) in [
            (by_key, key_hash, LimitKind::KeyRate, "this API key"),
            (by_kit, toolkit, LimitKind::ToolkitRate, "this toolkit"),
        ] {
            let Some(q) = quota(&limit) else {
                continue;
            };
            let table_name = format!("{}:{name}", kind.as_str());
            let rate = counter(&self.rates, &table_name, limit, || RateLimiter::direct(q));
            if let Err(not_until) = rate.check() {
                let wait = not_until.wait_time_from(DefaultClock::default().now());
                let per_second = limit.calls_per_second.unwrap_or_default();
                return Err(Refused {
                    kind,
                    retry_after: Some(wait),
                    message: format!(
                        "Rate limited: {whose} may make {per_second} call(s) a second (burst {}); try again in {} s",
                        q.burst_size(),
                        retry_after_secs(wait)
                    ),
                });
            }
        }
        Ok(Permit { _running: running })
    }
}

/// A wait as a `Retry-After` value: whole seconds, rounded up, at least 1.
pub(crate) fn retry_after_secs(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(toml: &str) -> Limiter {
        let c = crate::Config::from_toml(toml).expect("valid");
        Limiter::new(c.rate_limits)
    }

    #[test]
    fn rate_burst_and_overrides() {
        let l = limits(
            "[rate_limits.per_key]\ncalls_per_second = 0.5\nburst = 2\n[rate_limits.keys.kid_0123456789ab]\nburst = 3",
        );
        assert!(l.admit("h1", None, "kit", 0).is_ok());
        assert!(l.admit("h1", None, "kit", 0).is_ok());
        let refused = l.admit("h1", None, "kit", 0).expect_err("over the burst");
        assert_eq!(refused.kind, LimitKind::KeyRate);
        let wait = refused.retry_after.expect("a wait");
        assert!(wait <= Duration::from_secs(2), "{wait:?}");
        assert_eq!(retry_after_secs(wait), 2);
        // Another key has its own bucket; the override's is bigger.
        for _ in 0..3 {
            assert!(l.admit("h2", Some("kid_0123456789ab"), "kit", 0).is_ok());
        }
        assert!(l.admit("h2", Some("kid_0123456789ab"), "kit", 0).is_err());
    }

    #[test]
    fn concurrency_and_size() {
        let l = limits(
            "[rate_limits.per_toolkit]\nmax_concurrent = 1\nmax_request_bytes = 10\n[rate_limits.toolkits.big]\nmax_request_bytes = 100",
        );
        let first = l.admit("h", None, "kit", 5).expect("room");
        let refused = l.admit("h2", None, "kit", 5).expect_err("one at a time");
        assert_eq!(refused.kind, LimitKind::ToolkitConcurrency);
        assert!(l.admit("h", None, "other", 5).is_ok());
        drop(first);
        assert!(l.admit("h2", None, "kit", 5).is_ok());
        let big = l.admit("h", None, "kit", 11).expect_err("too big");
        assert_eq!(big.kind, LimitKind::RequestSize);
        assert!(big.retry_after.is_none());
        assert!(l.admit("h", None, "big", 50).is_ok());
    }

    #[test]
    fn bad_limits_are_refused() {
        for toml in [
            "[rate_limits.per_key]\ncalls_per_second = 0",
            "[rate_limits.per_key]\nburst = 3",
            "[rate_limits.per_toolkit]\nmax_concurrent = 0",
            "[rate_limits.keys.nope]\nmax_concurrent = 1",
            "[rate_limits.toolkits.\"no way\"]\nmax_concurrent = 1",
            "[rate_limits.per_key]\nunknown = 1",
        ] {
            assert!(crate::Config::from_toml(toml).is_err(), "{toml}");
        }
    }
}
