//! Execution slots, shared fairly between keys.
//!
//! A plain semaphore serves waiters first come, first served: a key that queues 100
//! requests makes every other key wait behind all of them. Here a freed slot goes to the
//! waiting key that has the fewest executions running (the earliest waiter among equals),
//! and no key runs more than its cap at once. So a key's first request waits at most for
//! one running execution to end, however many requests other keys have queued; and while
//! fewer keys are busy than the slots allow, it does not wait at all.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

/// The server's execution slots.
pub struct Slots {
    inner: Mutex<Inner>,
}

struct Inner {
    free: usize,
    per_key: usize,
    /// Executions running, by key (keys with none are removed).
    running: HashMap<String, usize>,
    /// Waiters by key, in arrival order; `seq` orders waiters of different keys.
    waiting: HashMap<String, VecDeque<Waiter>>,
    seq: u64,
    closed: bool,
}

struct Waiter {
    seq: u64,
    /// Receives its slot; if the waiter gave up, the slot comes back when it is dropped.
    wake: oneshot::Sender<Slot>,
}

/// A running execution's slot; dropping it frees the slot for the next waiter.
pub struct Slot {
    slots: Arc<Slots>,
    key: String,
    /// How long the execution waited for its slot.
    pub waited: Duration,
}

/// The server is shutting down: no more slots are handed out.
#[derive(Debug)]
pub struct Closed;

impl Slots {
    /// `total` slots, of which one key may hold `per_key` at once (both at least 1).
    pub fn new(total: usize, per_key: usize) -> Arc<Slots> {
        Arc::new(Slots {
            inner: Mutex::new(Inner {
                free: total.max(1),
                per_key: per_key.max(1),
                running: HashMap::new(),
                waiting: HashMap::new(),
                seq: 0,
                closed: false,
            }),
        })
    }

    /// Waits for a slot for `key`. Dropping the future gives up its place in line (or,
    /// if a slot was just handed to it, the slot).
    pub async fn acquire(self: &Arc<Self>, key: &str) -> Result<Slot, Closed> {
        let started = Instant::now();
        let woken = {
            let mut inner = self.lock();
            if inner.closed {
                return Err(Closed);
            }
            // Free slots with waiters left means those waiters' keys are at their cap.
            if inner.free > 0 && inner.running_of(key) < inner.per_key {
                inner.start(key);
                return Ok(Slot {
                    slots: self.clone(),
                    key: key.to_string(),
                    waited: Duration::ZERO,
                });
            }
            let (wake, woken) = oneshot::channel();
            inner.seq += 1;
            let seq = inner.seq;
            inner
                .waiting
                .entry(key.to_string())
                .or_default()
                .push_back(Waiter { seq, wake });
            woken
        };
        let mut slot = woken.await.map_err(|_| Closed)?;
        slot.waited = started.elapsed();
        Ok(slot)
    }

    /// Hands out no more slots; waiters are told the server is closing.
    pub fn close(&self) {
        let mut inner = self.lock();
        inner.closed = true;
        inner.waiting.clear();
    }

    /// Executions running now.
    pub fn running(&self) -> usize {
        self.occupancy().0
    }

    /// Executions running and waiting now (a waiter that gave up may count until the
    /// next slot is handed out).
    pub fn occupancy(&self) -> (usize, usize) {
        let inner = self.lock();
        (
            inner.running.values().sum(),
            inner.waiting.values().map(VecDeque::len).sum(),
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("slots lock")
    }

    /// Gives `key`'s slot back and starts whoever should run next.
    fn release(self: &Arc<Self>, key: &str) {
        let unclaimed = {
            let mut inner = self.lock();
            inner.stop(key);
            inner.dispatch(self)
        };
        // Slots whose waiter gave up as it was woken: given back (outside the lock, as
        // giving back takes it).
        drop(unclaimed);
    }
}

impl Inner {
    fn running_of(&self, key: &str) -> usize {
        self.running.get(key).copied().unwrap_or(0)
    }

    fn start(&mut self, key: &str) {
        self.free -= 1;
        *self.running.entry(key.to_string()).or_default() += 1;
    }

    fn stop(&mut self, key: &str) {
        self.free += 1;
        if let Some(count) = self.running.get_mut(key) {
            *count -= 1;
            if *count == 0 {
                self.running.remove(key);
            }
        }
    }

    /// Fills free slots from the waiters: the key with the fewest running first, the
    /// earliest waiter among equals; keys at their cap wait. Waiters that gave up are
    /// dropped; a slot sent to one that gave up this instant is returned, to be dropped.
    fn dispatch(&mut self, slots: &Arc<Slots>) -> Vec<Slot> {
        let mut unclaimed = Vec::new();
        while self.free > 0 {
            self.waiting.retain(|_, queue| {
                queue.retain(|w| !w.wake.is_closed());
                !queue.is_empty()
            });
            let next = self
                .waiting
                .iter()
                .filter(|(key, _)| self.running_of(key) < self.per_key)
                .min_by_key(|(key, queue)| (self.running_of(key), queue[0].seq))
                .map(|(key, _)| key.clone());
            let Some(key) = next else { break };
            let queue = self.waiting.get_mut(&key).expect("a waiting key");
            let waiter = queue.pop_front().expect("a non-empty queue");
            if queue.is_empty() {
                self.waiting.remove(&key);
            }
            self.start(&key);
            let slot = Slot {
                slots: slots.clone(),
                key,
                waited: Duration::ZERO,
            };
            if let Err(slot) = waiter.wake.send(slot) {
                unclaimed.push(slot);
            }
        }
        unclaimed
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slots.release(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Polls `future` once: `Some` if it finished.
    fn poll_once<F: std::future::Future>(future: std::pin::Pin<&mut F>) -> Option<F::Output> {
        let waker = futures_util::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        match future.poll(&mut cx) {
            std::task::Poll::Ready(out) => Some(out),
            std::task::Poll::Pending => None,
        }
    }

    #[tokio::test]
    async fn a_key_at_its_cap_waits_and_another_key_goes_first() {
        let slots = Slots::new(3, 2);
        let a1 = slots.acquire("a").await.unwrap();
        let _a2 = slots.acquire("a").await.unwrap();
        // "a" is at its cap: its third waits although a slot is free; "b" takes it.
        let mut a3 = Box::pin(slots.acquire("a"));
        assert!(poll_once(a3.as_mut()).is_none());
        let _b1 = slots.acquire("b").await.unwrap();
        assert_eq!(slots.running(), 3);
        // Many more of "a" queue up; then "c" arrives. When a slot frees, "c" (nothing
        // running) goes before all of "a"'s.
        let mut more_a: Vec<_> = (0..10).map(|_| Box::pin(slots.acquire("a"))).collect();
        for f in &mut more_a {
            assert!(poll_once(f.as_mut()).is_none());
        }
        let mut c1 = Box::pin(slots.acquire("c"));
        assert!(poll_once(c1.as_mut()).is_none());
        drop(a1);
        let c1 = c1.await.unwrap();
        assert!(poll_once(a3.as_mut()).is_none());
        // The next freed slot goes to "a"'s earliest waiter.
        drop(c1);
        let a3 = a3.await.unwrap();
        assert!(a3.waited > Duration::ZERO);
        assert_eq!(slots.running(), 3);
    }

    #[tokio::test]
    async fn a_waiter_that_gives_up_leaves_no_slot_behind() {
        let slots = Slots::new(1, 1);
        let held = slots.acquire("a").await.unwrap();
        let mut gone = Box::pin(slots.acquire("b"));
        assert!(poll_once(gone.as_mut()).is_none());
        drop(gone);
        drop(held);
        assert_eq!(slots.running(), 0);
        // Woken, then dropped before it ran: the slot comes back too.
        let held = slots.acquire("a").await.unwrap();
        let mut woken = Box::pin(slots.acquire("b"));
        assert!(poll_once(woken.as_mut()).is_none());
        drop(held);
        drop(woken);
        assert_eq!(slots.running(), 0);
        let _again = slots.acquire("c").await.unwrap();
        assert_eq!(slots.running(), 1);
    }

    #[tokio::test]
    async fn closing_refuses_waiters_and_new_callers() {
        let slots = Slots::new(1, 1);
        let _held = slots.acquire("a").await.unwrap();
        let waiter = slots.acquire("b");
        let mut waiter = Box::pin(waiter);
        assert!(poll_once(waiter.as_mut()).is_none());
        slots.close();
        assert!(waiter.await.is_err());
        assert!(slots.acquire("c").await.is_err());
    }
}
