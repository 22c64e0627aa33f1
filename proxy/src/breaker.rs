//! The per-service circuit breaker (Envoy's sense of the word): a limit on
//! requests in flight to a service, with a bounded queue of requests waiting
//! for a slot. When both are full, a request fails at once with [`Overflow`]
//! instead of piling up behind a service that cannot keep up.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};

/// Per-service limits (checked config).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct BreakerConfig {
    /// Requests in flight to the service at once.
    pub max_requests: usize,
    /// Requests waiting for a slot when all are busy.
    pub max_pending: usize,
}

impl Default for BreakerConfig {
    /// Envoy's defaults (1024 each): high enough that a healthy service never
    /// meets them, so they only bite when something is already wrong (a stuck
    /// upstream holding every slot), and then they cap the memory and the
    /// queueing delay a sidecar spends on it.
    fn default() -> Self {
        Self {
            max_requests: 1024,
            max_pending: 1024,
        }
    }
}

/// All request slots busy and the pending queue full.
#[derive(Debug, thiserror::Error)]
#[error(
    "circuit breaker open: all {max_requests} request slots are busy and \
     {max_pending} requests are already waiting; the service is not keeping up \
     (add endpoints, or raise its max_requests / max_pending limits)"
)]
pub struct Overflow {
    pub max_requests: usize,
    pub max_pending: usize,
}

/// A concurrency limit with a bounded queue, shared by all requests to one
/// service.
#[derive(Debug)]
pub struct Breaker {
    cfg: BreakerConfig,
    /// One permit per request slot.
    slots: Arc<Semaphore>,
    /// The number of slots: `cfg.max_requests`, clamped to what a semaphore
    /// can hold.
    capacity: usize,
    /// Requests waiting for a slot; never above `cfg.max_pending`.
    pending: AtomicUsize,
}

/// One request slot; the slot is free again when this is dropped.
#[derive(Debug)]
pub struct BreakerPermit {
    _permit: OwnedSemaphorePermit,
}

impl Breaker {
    /// A breaker with `cfg`'s limits. `max_requests` above
    /// [`Semaphore::MAX_PERMITS`] (far more than any real limit) is clamped to it.
    pub fn new(cfg: BreakerConfig) -> Self {
        let capacity = cfg.max_requests.min(Semaphore::MAX_PERMITS);
        Self {
            cfg,
            slots: Arc::new(Semaphore::new(capacity)),
            capacity,
            pending: AtomicUsize::new(0),
        }
    }

    pub fn config(&self) -> BreakerConfig {
        self.cfg
    }

    /// A slot for one request. With a free slot: at once. With all slots busy
    /// and fewer than `max_pending` requests waiting: waits for a slot, in
    /// arrival order. With the queue full too: `Err(Overflow)` at once.
    ///
    /// The caller bounds the wait (with its request timeout) by dropping the
    /// future; a dropped waiter leaves the queue.
    pub async fn acquire(&self) -> Result<BreakerPermit, Overflow> {
        match self.slots.clone().try_acquire_owned() {
            Ok(permit) => return Ok(BreakerPermit { _permit: permit }),
            Err(TryAcquireError::NoPermits) => {}
            // The semaphore is never closed; treat it as full if it ever were.
            Err(TryAcquireError::Closed) => return Err(self.overflow()),
        }
        let _queued = self.enqueue()?;
        match self.slots.clone().acquire_owned().await {
            Ok(permit) => Ok(BreakerPermit { _permit: permit }),
            Err(_closed) => Err(self.overflow()),
        }
    }

    /// Requests holding a slot (including waiters just handed one).
    pub fn active(&self) -> usize {
        self.capacity.saturating_sub(self.slots.available_permits())
    }

    /// Requests waiting for a slot.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Acquire)
    }

    /// Takes a place in the queue, if there is one.
    fn enqueue(&self) -> Result<Queued<'_>, Overflow> {
        let max = self.cfg.max_pending;
        self.pending
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .map(|_| Queued(&self.pending))
            .map_err(|_| self.overflow())
    }

    fn overflow(&self) -> Overflow {
        Overflow {
            max_requests: self.cfg.max_requests,
            max_pending: self.cfg.max_pending,
        }
    }
}

/// A place in the pending queue, given back on drop (including when the
/// waiting future is dropped).
struct Queued<'a>(&'a AtomicUsize);

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::poll;
    use std::task::Poll;

    fn breaker(max_requests: usize, max_pending: usize) -> Breaker {
        Breaker::new(BreakerConfig {
            max_requests,
            max_pending,
        })
    }

    #[test]
    fn default_is_envoys() {
        let cfg = BreakerConfig::default();
        assert_eq!(cfg.max_requests, 1024);
        assert_eq!(cfg.max_pending, 1024);
        assert_eq!(Breaker::new(cfg).config(), cfg);
    }

    #[tokio::test]
    async fn queues_then_overflows() {
        let b = breaker(2, 1);
        let first = b.acquire().await.expect("free slot");
        let _second = b.acquire().await.expect("free slot");
        assert_eq!((b.active(), b.pending()), (2, 0));

        let mut third = Box::pin(b.acquire());
        assert!(poll!(&mut third).is_pending(), "third should wait");
        assert_eq!(b.pending(), 1);

        // The queue is full: the fourth fails on its first poll.
        let mut fourth = Box::pin(b.acquire());
        match poll!(&mut fourth) {
            Poll::Ready(Err(Overflow {
                max_requests: 2,
                max_pending: 1,
            })) => {}
            other => panic!("fourth: {other:?}"),
        }
        assert_eq!(b.pending(), 1, "an overflow does not take a queue place");

        // A finished request lets the waiter in.
        drop(first);
        let _third = match poll!(&mut third) {
            Poll::Ready(Ok(permit)) => permit,
            other => panic!("third after a release: {other:?}"),
        };
        assert_eq!((b.active(), b.pending()), (2, 0));
    }

    #[tokio::test]
    async fn dropped_waiter_leaves_the_queue() {
        let b = breaker(1, 1);
        let held = b.acquire().await.expect("free slot");
        let mut waiter = Box::pin(b.acquire());
        assert!(poll!(&mut waiter).is_pending());
        assert_eq!(b.pending(), 1);
        assert!(b.acquire().await.is_err(), "queue is full");

        drop(waiter);
        assert_eq!(b.pending(), 0);

        // The freed queue place is usable, and the slot goes to the new waiter.
        let mut next = Box::pin(b.acquire());
        assert!(poll!(&mut next).is_pending());
        assert_eq!(b.pending(), 1);
        drop(held);
        let _next = match poll!(&mut next) {
            Poll::Ready(Ok(permit)) => permit,
            other => panic!("next after a release: {other:?}"),
        };
        assert_eq!((b.active(), b.pending()), (1, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn waiter_bounded_by_timeout() {
        let b = breaker(1, 4);
        let _held = b.acquire().await.expect("free slot");
        let waited = tokio::time::timeout(std::time::Duration::from_secs(1), b.acquire()).await;
        assert!(waited.is_err(), "no slot came free");
        assert_eq!(b.pending(), 0, "the timed-out waiter left the queue");
    }

    #[tokio::test]
    async fn no_queue_overflows_at_once_when_full() {
        let b = breaker(1, 0);
        let held = b.acquire().await.expect("free slot");
        let err = b.acquire().await.expect_err("full, no queue");
        assert_eq!((err.max_requests, err.max_pending), (1, 0));
        let msg = err.to_string();
        assert!(
            msg.contains("1 request slots") && msg.contains("max_pending"),
            "{msg}"
        );
        assert_eq!(b.pending(), 0);
        drop(held);
        assert!(b.acquire().await.is_ok(), "free again after release");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn never_more_than_max_in_flight() {
        let b = Arc::new(breaker(3, 1000));
        let in_flight = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..200)
            .map(|_| {
                let (b, in_flight, peak) = (b.clone(), in_flight.clone(), peak.clone());
                tokio::spawn(async move {
                    let _permit = b.acquire().await.expect("queue is big enough");
                    let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    tokio::task::yield_now().await;
                    in_flight.fetch_sub(1, Ordering::SeqCst);
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("task");
        }
        assert!(peak.load(Ordering::SeqCst) <= 3, "peak {peak:?}");
        assert_eq!((b.active(), b.pending()), (0, 0));
    }
}
