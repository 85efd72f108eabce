//! A precise sleep for the emulator's latency.
//!
//! Tokio's timer has millisecond resolution and rounds a deadline up (its driver rounds the park
//! timeout up again), so a 5 ms `tokio::time::sleep` lasts 5–7 ms: an emulator meant to answer
//! after 5 ms would model a slower server than asked for. A blocking thread's
//! `std::thread::sleep` per request is precise but costs a pool thread hand-off per call.
//!
//! Here one thread per process keeps every pending deadline in a heap and parks until the
//! earliest (`park_timeout` is a futex wait with a high-resolution timeout), then wakes every
//! sleeper whose deadline has passed. Requests that arrive together — eight calls in flight
//! finish and restart together — are woken by one timer wake-up.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, Waker};
use std::thread::Thread;
use std::time::Instant;

struct Entry {
    fired: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

struct Pending {
    deadline: Instant,
    seq: u64,
    entry: Arc<Entry>,
}

impl PartialEq for Pending {
    fn eq(&self, other: &Self) -> bool {
        (self.deadline, self.seq) == (other.deadline, other.seq)
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Pending {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.deadline, self.seq).cmp(&(other.deadline, other.seq))
    }
}

#[derive(Default)]
struct Queue {
    heap: BinaryHeap<Reverse<Pending>>,
    seq: u64,
}

struct Timer {
    queue: Mutex<Queue>,
    thread: Thread,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn timer() -> &'static Timer {
    static TIMER: OnceLock<&'static Timer> = OnceLock::new();
    TIMER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<&'static Timer>();
        let handle = std::thread::Builder::new()
            .name("emulator-timer".into())
            .spawn(move || {
                let Ok(timer) = rx.recv() else { return };
                run(timer);
            })
            .expect("spawn the emulator's timer thread");
        let timer: &'static Timer = Box::leak(Box::new(Timer {
            queue: Mutex::new(Queue::default()),
            thread: handle.thread().clone(),
        }));
        let _ = tx.send(timer);
        timer
    })
}

/// The timer thread: wakes every due sleeper, then parks until the next deadline.
fn run(timer: &'static Timer) {
    let mut due: Vec<Arc<Entry>> = Vec::new();
    loop {
        let now = Instant::now();
        let next = {
            let mut q = lock(&timer.queue);
            while q.heap.peek().is_some_and(|Reverse(p)| p.deadline <= now) {
                if let Some(Reverse(p)) = q.heap.pop() {
                    due.push(p.entry);
                }
            }
            q.heap.peek().map(|Reverse(p)| p.deadline)
        };
        for entry in due.drain(..) {
            entry.fired.store(true, Ordering::Release);
            if let Some(w) = lock(&entry.waker).take() {
                w.wake();
            }
        }
        match next {
            Some(deadline) => std::thread::park_timeout(deadline.saturating_duration_since(now)),
            None => std::thread::park(),
        }
    }
}

/// A future that completes at `deadline`, never before: on an idle machine within the kernel's
/// timer slack (tens of µs) of it, on a busy one when the timer thread and then a runtime worker
/// get a core.
pub(crate) struct Sleep {
    deadline: Instant,
    entry: Option<Arc<Entry>>,
}

/// Sleeps for `d`, accurate to well under a millisecond.
#[cfg(test)]
pub(crate) fn sleep(d: std::time::Duration) -> Sleep {
    sleep_until(Instant::now() + d)
}

/// Sleeps until `deadline`, accurate to well under a millisecond.
pub(crate) fn sleep_until(deadline: Instant) -> Sleep {
    Sleep {
        deadline,
        entry: None,
    }
}

impl Future for Sleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if let Some(entry) = &self.entry {
            if entry.fired.load(Ordering::Acquire) {
                return Poll::Ready(());
            }
            let mut slot = lock(&entry.waker);
            // Fired between the check and the lock: the waker was already taken.
            if entry.fired.load(Ordering::Acquire) {
                return Poll::Ready(());
            }
            match slot.as_ref() {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => *slot = Some(cx.waker().clone()),
            }
            return Poll::Pending;
        }
        if Instant::now() >= self.deadline {
            return Poll::Ready(());
        }
        let entry = Arc::new(Entry {
            fired: AtomicBool::new(false),
            waker: Mutex::new(Some(cx.waker().clone())),
        });
        let timer = timer();
        let earliest = {
            let mut q = lock(&timer.queue);
            q.seq += 1;
            let seq = q.seq;
            let earlier = q
                .heap
                .peek()
                .is_none_or(|Reverse(p)| self.deadline < p.deadline);
            q.heap.push(Reverse(Pending {
                deadline: self.deadline,
                seq,
                entry: entry.clone(),
            }));
            earlier
        };
        // Only a new earliest deadline needs the thread to shorten its park.
        if earliest {
            timer.thread.unpark();
        }
        self.entry = Some(entry);
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_sleeper_wakes_and_none_before_its_deadline() {
        // Concurrent sleeps of different lengths, registered out of order, so later
        // registrations move the timer thread's earliest deadline both ways.
        let lengths = [7u64, 3, 5, 1, 9, 5, 2, 8];
        let tasks: Vec<_> = lengths
            .iter()
            .map(|&ms| {
                tokio::spawn(async move {
                    let t = Instant::now();
                    sleep(Duration::from_millis(ms)).await;
                    (ms, t.elapsed())
                })
            })
            .collect();
        // A lost wake-up would hang: bound the wait.
        let all = tokio::time::timeout(Duration::from_secs(10), futures::future::join_all(tasks))
            .await
            .expect("every sleeper is woken");
        for r in all {
            let (ms, took) = r.expect("task");
            assert!(took >= Duration::from_millis(ms), "{ms} ms took {took:?}");
        }
        // A zero sleep is ready at once.
        sleep(Duration::ZERO).await;
    }
}
