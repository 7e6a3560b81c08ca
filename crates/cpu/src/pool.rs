//! A persistent compute pool for the per-token path: `n - 1` worker threads plus the calling thread.
//!
//! It owns its worker threads and nothing else; it knows nothing about matrices (the kernels in `matmul` hand it
//! task indices). ARCHITECTURE-NOTES rules out rayon on the per-token path (candle measured decode 86 → 120 tok/s
//! after leaving it), and the per-token path must not allocate, so `run` publishes a borrowed closure through
//! atomics instead of boxing jobs onto a queue.
//!
//! Protocol: the caller stores the job and bumps `epoch`; workers spin briefly on `epoch` (a decode step issues
//! several runs back to back, and a futex wake costs microseconds), then park. `run` returns only after every
//! worker has acknowledged the epoch, because the job pointer borrows the caller's stack.
//!
//! Claiming: the task range is cut into one contiguous stripe per thread. A thread claims its own stripe from the
//! front, in order, and when it is empty steals from the back of the others, so uneven tasks still balance. Why
//! not one shared counter: the matmuls hand out consecutive slices of one weight stream, and a kernel prefetches
//! past the end of its task into the next index. With a shared counter two threads take alternate tasks, so that
//! prefetch lands in the other thread's task and every task starts cold; with stripes a thread's next task is
//! the one it prefetched (BENCHMARKS.md, seventh pass).
//!
//! A panic in a task is caught, the remaining tasks are skipped, and the first payload is re-raised on the caller
//! once every worker is done; the pool stays usable afterwards.

use std::any::Any;
use std::cell::UnsafeCell;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle, Thread};
use std::time::{Duration, Instant};

/// How long an idle thread spins before parking. Long enough to bridge the gap between the matmuls of one layer,
/// short enough not to steal a shared core for long (this machine has 2).
const SPIN: Duration = Duration::from_micros(50);

type Job = dyn Fn(usize) + Sync;

struct Shared {
    /// The current job, lifetime-erased. Written only by `run` while no worker can be reading it.
    job: UnsafeCell<*const Job>,
    /// The thread inside `run`, woken by the last worker to finish.
    caller: UnsafeCell<Option<Thread>>,
    /// Per thread (the caller is 0, worker i is i): its stripe's unclaimed tasks as `front << 32 | back`,
    /// offsets into the current run's task range (half-open).
    stripes: Box<[Stripe]>,
    /// Workers that have not yet finished the current epoch.
    pending: AtomicUsize,
    epoch: AtomicU64,
    panicked: AtomicBool,
    shutdown: AtomicBool,
    /// The first panic payload of the current run (allocation here happens only when a task panicked).
    payload: Mutex<Option<Box<dyn Any + Send>>>,
}

// SAFETY: the `UnsafeCell`s are written only by the thread holding `ThreadPool::run_lock` between epochs (every
// worker has finished the previous epoch and not yet seen the next), and read by workers only after an Acquire
// load of the `epoch` that the Release bump published.
unsafe impl Sync for Shared {}
// SAFETY: the raw job pointer is only dereferenced under the protocol above; `Thread` is Send.
unsafe impl Send for Shared {}

/// A fixed set of worker threads that run `Fn(usize)` tasks split over themselves and the caller.
pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// Serialises `run` calls from different threads (uncontended in practice: one engine thread).
    run_lock: Mutex<()>,
}

impl ThreadPool {
    /// A pool that runs tasks on `n_threads` threads in total: `n_threads - 1` workers plus the caller of `run`.
    /// `0` is treated as `1` (everything runs on the caller).
    pub fn new(n_threads: usize) -> ThreadPool {
        let noop: &'static Job = &|_| {};
        let shared = Arc::new(Shared {
            job: UnsafeCell::new(noop as *const Job),
            caller: UnsafeCell::new(None),
            stripes: (0..n_threads.max(1)).map(|_| Stripe(AtomicU64::new(0))).collect(),
            pending: AtomicUsize::new(0),
            epoch: AtomicU64::new(0),
            panicked: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
            payload: Mutex::new(None),
        });
        let workers = (1..n_threads.max(1))
            .map(|i| {
                let shared = Arc::clone(&shared);
                thread::Builder::new()
                    .name(format!("moestream-cpu-{i}"))
                    .spawn(move || worker_loop(&shared, i))
                    .expect("spawning a compute worker thread")
            })
            .collect();
        ThreadPool { shared, workers, run_lock: Mutex::new(()) }
    }

    /// Threads that execute tasks, the caller included.
    pub fn n_threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Runs `task(i)` for every `i` in `0..n_tasks`, spread over the workers and the calling thread, and returns
    /// when all are done. Does not allocate. A panic in any task is re-raised here after the others finish.
    ///
    /// Must not be called from inside a task of the same pool (it would wait on itself).
    pub fn run(&self, n_tasks: usize, task: &(dyn Fn(usize) + Sync)) {
        if self.workers.is_empty() || n_tasks <= 1 {
            // Nothing to share: skip the handshake entirely.
            (0..n_tasks).for_each(task);
            return;
        }
        // Stripe offsets are 32-bit; a larger range (none today) runs as consecutive runs.
        const MAX: usize = u32::MAX as usize;
        for base in (0..n_tasks).step_by(MAX) {
            let n = (n_tasks - base).min(MAX);
            self.run_striped(n, &|i| task(base + i));
        }
    }

    fn run_striped(&self, n_tasks: usize, task: &(dyn Fn(usize) + Sync)) {
        // A poisoned lock only means an earlier run re-raised a task panic; the pool state is consistent then.
        let _guard = self.run_lock.lock().unwrap_or_else(|e| e.into_inner());
        let s = &*self.shared;
        // SAFETY: every worker finished the previous epoch (`pending` reached 0 before the last `run` returned),
        // so none reads these cells until the Release bump of `epoch` below. The transmute only erases the
        // lifetime: the pointer is not used after this function returns, for the same reason.
        unsafe {
            *s.job.get() = std::mem::transmute::<*const (dyn Fn(usize) + Sync + '_), *const Job>(task);
            *s.caller.get() = Some(thread::current());
        }
        let threads = s.stripes.len();
        for (i, stripe) in s.stripes.iter().enumerate() {
            let (lo, hi) = (i * n_tasks / threads, (i + 1) * n_tasks / threads);
            stripe.0.store(pack(lo, hi), Ordering::Relaxed);
        }
        s.panicked.store(false, Ordering::Relaxed);
        s.pending.store(self.workers.len(), Ordering::Relaxed);
        s.epoch.fetch_add(1, Ordering::Release);
        for w in &self.workers {
            // Cheap when the worker is still spinning: unpark only makes a syscall for a parked thread.
            w.thread().unpark();
        }
        claim_tasks(s, task, 0);
        let start = Instant::now();
        let mut spins = 0u32;
        while s.pending.load(Ordering::Acquire) != 0 {
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(64) || start.elapsed() < SPIN {
                std::hint::spin_loop();
            } else {
                thread::park();
            }
        }
        if s.panicked.load(Ordering::Relaxed) {
            let payload = s.payload.lock().unwrap_or_else(|e| e.into_inner()).take();
            resume_unwind(payload.unwrap_or_else(|| Box::new("a moestream-cpu task panicked")));
        }
    }
}

/// One thread's stripe, alone on its cache lines (two, for the adjacent-line prefetcher): with the stripes packed
/// together every claim missed on a line the other thread had just written (`claim_tasks` was 1.8% of a decode
/// profile, 80% of it on that load).
#[repr(align(128))]
struct Stripe(AtomicU64);

fn pack(front: usize, back: usize) -> u64 {
    ((front as u64) << 32) | back as u64
}

/// Takes one task from stripe `stripe`: its first unclaimed one (`own`) or its last.
fn claim(stripe: &Stripe, own: bool) -> Option<usize> {
    let stripe = &stripe.0;
    let mut cur = stripe.load(Ordering::Relaxed);
    loop {
        let (front, back) = ((cur >> 32) as usize, (cur & 0xffff_ffff) as usize);
        if front >= back {
            return None;
        }
        let (task, next) = if own { (front, pack(front + 1, back)) } else { (back - 1, pack(front, back - 1)) };
        match stripe.compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return Some(task),
            Err(now) => cur = now,
        }
    }
}

/// Claims and runs tasks until none are left (or a task has panicked): thread `me`'s own stripe in order, then
/// the others' from their backs.
fn claim_tasks(s: &Shared, task: &(dyn Fn(usize) + Sync + '_), me: usize) {
    let n = s.stripes.len();
    loop {
        if s.panicked.load(Ordering::Relaxed) {
            return;
        }
        let Some(i) = (0..n).find_map(|k| claim(&s.stripes[(me + k) % n], k == 0)) else {
            return;
        };
        if let Err(p) = catch_unwind(AssertUnwindSafe(|| task(i))) {
            let mut slot = s.payload.lock().unwrap_or_else(|e| e.into_inner());
            if slot.is_none() {
                *slot = Some(p);
            }
            s.panicked.store(true, Ordering::Release);
        }
    }
}

fn worker_loop(s: &Shared, me: usize) {
    let mut seen = 0u64;
    loop {
        let start = Instant::now();
        let mut spins = 0u32;
        let epoch = loop {
            let e = s.epoch.load(Ordering::Acquire);
            if e != seen {
                break e;
            }
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(64) || start.elapsed() < SPIN {
                std::hint::spin_loop();
            } else {
                // A bump between the load and park leaves the unpark token set, so this returns at once.
                thread::park();
            }
        };
        seen = epoch;
        if s.shutdown.load(Ordering::Acquire) {
            return;
        }
        // SAFETY: the Acquire load of `epoch` above synchronises with the Release bump in `run`, which wrote
        // these cells first; `run` does not return (so the job stays alive) until `pending` reaches 0 below.
        let (job, caller) = unsafe { (&**s.job.get(), (*s.caller.get()).clone()) };
        claim_tasks(s, job, me);
        // `caller` was cloned before this decrement: once it reaches 0, `run` may return and start a new epoch.
        if s.pending.fetch_sub(1, Ordering::AcqRel) == 1
            && let Some(c) = caller
        {
            c.unpark();
        }
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::Release);
        self.shared.epoch.fetch_add(1, Ordering::Release);
        for w in self.workers.drain(..) {
            w.thread().unpark();
            // A worker never panics outside `catch_unwind`, so join only fails if the thread was killed.
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[test]
    fn every_task_runs_once_for_many_shapes() {
        for threads in [0, 1, 2, 3, 5] {
            let pool = ThreadPool::new(threads);
            assert_eq!(pool.n_threads(), threads.max(1));
            for n_tasks in [0, 1, 2, 3, 4, 7, 100, 1000] {
                let hits: Vec<AtomicU32> = (0..n_tasks).map(|_| AtomicU32::new(0)).collect();
                pool.run(n_tasks, &|i| {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                });
                assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1), "threads {threads} tasks {n_tasks}");
            }
        }
    }

    /// A thread's own stripe runs front to back (so a kernel's prefetch past its task lands in its next task);
    /// what it steals comes from the other stripe's back.
    #[test]
    fn each_thread_walks_its_stripe_in_order_and_steals_from_the_back() {
        let pool = ThreadPool::new(2);
        let n = 64;
        let caller = thread::current().id();
        for _ in 0..20 {
            let seq = Mutex::new(Vec::new());
            pool.run(n, &|i| {
                if thread::current().id() == caller {
                    seq.lock().unwrap().push(i);
                }
                std::hint::black_box((0..2000).sum::<u64>());
            });
            let seq = seq.into_inner().unwrap();
            let own: Vec<usize> = seq.iter().copied().filter(|&i| i < n / 2).collect();
            assert_eq!(own, (0..own.len()).collect::<Vec<_>>(), "{seq:?}");
            let stolen: Vec<usize> = seq.iter().copied().filter(|&i| i >= n / 2).collect();
            assert!(stolen.windows(2).all(|w| w[0] == w[1] + 1), "{seq:?}");
            assert!(stolen.first().is_none_or(|&i| i == n - 1), "{seq:?}");
        }
    }

    #[test]
    fn many_consecutive_runs() {
        let pool = ThreadPool::new(3);
        let total = AtomicUsize::new(0);
        for round in 0..20_000 {
            pool.run(1 + round % 5, &|i| {
                total.fetch_add(i + 1, Ordering::Relaxed);
            });
        }
        let want: usize = (0..20_000).map(|r| (1..=(1 + r % 5)).sum::<usize>()).sum();
        assert_eq!(total.load(Ordering::Relaxed), want);
    }

    #[test]
    fn runs_after_workers_parked() {
        let pool = ThreadPool::new(2);
        let total = AtomicUsize::new(0);
        for _ in 0..3 {
            thread::sleep(Duration::from_millis(5));
            pool.run(8, &|i| {
                total.fetch_add(i, Ordering::Relaxed);
            });
        }
        assert_eq!(total.load(Ordering::Relaxed), 3 * 28);
    }

    #[test]
    fn task_panic_reaches_the_caller_and_pool_survives() {
        let pool = ThreadPool::new(3);
        for bad in [0, 5, 63] {
            let r = catch_unwind(AssertUnwindSafe(|| {
                pool.run(64, &|i| {
                    if i == bad {
                        panic!("task {i} failed");
                    }
                })
            }));
            let msg = r.expect_err("the panic must propagate");
            assert_eq!(msg.downcast_ref::<String>().map(String::as_str), Some(format!("task {bad} failed").as_str()));
            let count = AtomicUsize::new(0);
            pool.run(10, &|_| {
                count.fetch_add(1, Ordering::Relaxed);
            });
            assert_eq!(count.load(Ordering::Relaxed), 10);
        }
    }
}
