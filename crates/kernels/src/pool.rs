//! A persistent worker pool for matmuls. Spawning threads (or rayon's fork-join, 10–30 µs) per matmul is too
//! slow for hundreds of small products per token, so workers stay alive, spin briefly waiting for the next job,
//! then park on a condvar. The calling thread takes part in every job.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

type Job = *const (dyn Fn(usize) + Sync);

/// A task cursor on its own cache line, so two threads claiming from their own ranges never share one.
#[repr(align(128))]
struct Cursor(AtomicUsize);

/// First task of participant `p`'s range when `n` tasks are split over `t` participants.
fn range_start(p: usize, n: usize, t: usize) -> usize {
    p * n / t
}

struct Shared {
    /// Bumped for each job; workers run a job once per epoch.
    epoch: AtomicUsize,
    job: UnsafeCell<Option<Job>>,
    n_tasks: AtomicUsize,
    /// Participant p (0 = the calling thread, then the workers) owns tasks [p·n/T, (p+1)·n/T) and claims them in
    /// order from `cursors[p]`; when its range is empty it helps the others through their cursors.
    cursors: Vec<Cursor>,
    /// Workers still inside the current job.
    busy: AtomicUsize,
    shutdown: AtomicBool,
    lock: Mutex<()>,
    wake: Condvar,
}

// SAFETY: `job` is written only by the thread inside `ThreadPool::run` while no worker reads it (all workers have
// finished the previous epoch, `busy == 0`), and read by workers only between the epoch bump (Release/Acquire)
// and their `busy` decrement. The pointee is `Sync`.
unsafe impl Sync for Shared {}
// SAFETY: as above; the raw pointer is only dereferenced under that protocol.
unsafe impl Send for Shared {}

pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// Serialises `run` calls from different threads.
    run_lock: Mutex<()>,
}

const SPIN_ITERS: usize = 1 << 16;

impl ThreadPool {
    /// A pool of `n_threads` in total (the caller plus `n_threads - 1` workers).
    pub fn new(n_threads: usize) -> ThreadPool {
        let shared = Arc::new(Shared {
            epoch: AtomicUsize::new(0),
            job: UnsafeCell::new(None),
            n_tasks: AtomicUsize::new(0),
            cursors: (0..n_threads.max(1)).map(|_| Cursor(AtomicUsize::new(0))).collect(),
            busy: AtomicUsize::new(0),
            shutdown: AtomicBool::new(false),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        let workers = (1..n_threads.max(1))
            .map(|i| {
                let s = shared.clone();
                std::thread::Builder::new()
                    .name(format!("ternlm-worker-{i}"))
                    .spawn(move || worker(&s, i))
                    .expect("spawn worker")
            })
            .collect();
        ThreadPool { shared, workers, run_lock: Mutex::new(()) }
    }

    pub fn n_threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Runs `f(0..n_tasks)` across the pool and returns when every task has finished.
    pub fn run(&self, n_tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        if n_tasks == 0 {
            return;
        }
        if self.workers.is_empty() || n_tasks == 1 {
            (0..n_tasks).for_each(f);
            return;
        }
        let _serial = self.run_lock.lock().unwrap_or_else(|e| e.into_inner());
        let s = &*self.shared;
        // SAFETY: the lifetime is erased only for the duration of this call; we do not return before every worker
        // has decremented `busy`, after which none touches the pointer again until the next epoch.
        let job: Job = unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync), &'static (dyn Fn(usize) + Sync)>(f) };
        // SAFETY: no worker is inside a job (busy == 0 since the last run returned), so nobody reads `job` now.
        unsafe { *s.job.get() = Some(job) };
        s.n_tasks.store(n_tasks, Ordering::Relaxed);
        let t = s.cursors.len();
        for (p, c) in s.cursors.iter().enumerate() {
            c.0.store(range_start(p, n_tasks, t), Ordering::Relaxed);
        }
        s.busy.store(self.workers.len(), Ordering::Relaxed);
        {
            let _g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.epoch.fetch_add(1, Ordering::Release);
            s.wake.notify_all();
        }
        run_tasks(s, f, 0);
        let mut spins = 0usize;
        while s.busy.load(Ordering::Acquire) != 0 {
            spins += 1;
            if spins < SPIN_ITERS {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }
}

/// Runs participant `me`'s own tasks in order, then helps the others. Contiguous ranges matter for decode: each
/// thread streams its own run of weight rows (what the hardware prefetchers follow), while the stealing at the end
/// keeps a slow or preempted thread from holding up the job for more than one task.
fn run_tasks(s: &Shared, f: &(dyn Fn(usize) + Sync), me: usize) {
    let n = s.n_tasks.load(Ordering::Relaxed);
    let t = s.cursors.len();
    for k in 0..t {
        let p = (me + k) % t;
        let end = range_start(p + 1, n, t);
        loop {
            let i = s.cursors[p].0.fetch_add(1, Ordering::Relaxed);
            if i >= end {
                break;
            }
            f(i);
        }
    }
}

fn worker(s: &Shared, me: usize) {
    let mut seen = 0usize;
    loop {
        let mut spins = 0usize;
        let mut epoch = s.epoch.load(Ordering::Acquire);
        while epoch == seen {
            if spins < SPIN_ITERS {
                spins += 1;
                std::hint::spin_loop();
            } else {
                let g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
                let _g = s
                    .wake
                    .wait_while(g, |_| s.epoch.load(Ordering::Acquire) == seen)
                    .unwrap_or_else(|e| e.into_inner());
            }
            epoch = s.epoch.load(Ordering::Acquire);
        }
        seen = epoch;
        if s.shutdown.load(Ordering::Acquire) {
            return;
        }
        // SAFETY: the epoch bump (Acquire above) publishes `job`, which stays valid until we decrement `busy`.
        let job = unsafe { (*s.job.get()).expect("job set before epoch bump") };
        // SAFETY: see `ThreadPool::run`: the closure outlives this use.
        run_tasks(s, unsafe { &*job }, me);
        s.busy.fetch_sub(1, Ordering::Release);
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::Release);
        {
            let _g = self.shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.epoch.fetch_add(1, Ordering::Release);
            self.shared.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// A mutable slice that pool tasks write to at disjoint indices.
pub struct Disjoint<T>(*mut T, usize);
// SAFETY: callers guarantee that concurrent tasks touch disjoint index ranges (documented at each use).
unsafe impl<T: Send> Sync for Disjoint<T> {}
impl<T> Disjoint<T> {
    pub fn new(s: &mut [T]) -> Self {
        Disjoint(s.as_mut_ptr(), s.len())
    }
    /// # Safety
    /// No other live reference may overlap `start..start+len`.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice(&self, start: usize, len: usize) -> &mut [T] {
        assert!(start + len <= self.1, "disjoint slice out of bounds");
        // SAFETY: bounds asserted above; exclusivity is the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(start), len) }
    }

    /// # Safety
    /// No other task may access index `i` concurrently.
    #[inline(always)]
    pub unsafe fn write(&self, i: usize, v: T) {
        debug_assert!(i < self.1, "disjoint write out of bounds");
        // SAFETY: in bounds (the callers index within the buffer they wrapped); exclusivity is the caller's contract.
        unsafe { *self.0.add(i) = v };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_once() {
        let pool = ThreadPool::new(3);
        for n in [0usize, 1, 2, 7, 100] {
            let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            pool.run(n, &|i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
        }
    }

    #[test]
    fn many_small_jobs() {
        let pool = ThreadPool::new(2);
        let total = AtomicUsize::new(0);
        for _ in 0..2000 {
            pool.run(4, &|i| {
                total.fetch_add(i, Ordering::Relaxed);
            });
        }
        assert_eq!(total.load(Ordering::Relaxed), 2000 * 6);
    }
}
