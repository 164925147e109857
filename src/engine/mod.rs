//! Runs sessions on threads of their own, off the async runtime. Each session is owned by one thread that takes
//! jobs from the model's bounded queue; a full queue is refused at once rather than left to grow. A request waits
//! for its Run on the blocking thread that carries the whole request (decode, Run, maps, encoding), which saves
//! the hand-offs to and from the async runtime between those stages.
//!
//! A job is one or more images with the same number of targets each (one image for a plain explanation; the
//! augmented copies for `aug_smooth`; masked copies for Score-CAM and the trust score). Batching: a session
//! thread that takes a job also takes the jobs already waiting with the same number of targets while the Run
//! stays within `max_batch` images, optionally waiting `max_batch_wait` for more, and runs them in one Run. A job
//! larger than `max_batch` runs alone, in one Run. One-thread [`Role::UnderLoad`] sessions run one job per Run.
//!
//! Cores: every session's Runs keep some threads busy, and a session starts a Run only while the model's threads
//! have room for it. That lets one model hold both a session of several threads, for a request that arrives
//! alone, and one-thread sessions on the same cores, for load (see [`Role`]).

use std::collections::VecDeque;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

/// What runs a batch of jobs: an ONNX Runtime session in the service (`registry`), a fake in the tests.
pub trait Backend: Send + 'static {
    type Output: Send + 'static;

    /// Runs `images` images of `shape` ([height, width]) laid out one after the other in `inputs`, each with `k`
    /// seed rows in `seeds`, in one Run; returns one output per image.
    fn run(
        &mut self,
        inputs: &[f32],
        images: usize,
        shape: [usize; 2],
        seeds: &[f32],
        k: usize,
    ) -> Result<Vec<Self::Output>, String>;
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("the model's queue is full")]
    Overloaded,
    #[error("the request was abandoned before its Run")]
    Abandoned,
    #[error("inference failed: {0}")]
    Failed(String),
}

/// How long a job waited for a session, and how long its Run took.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunTimes {
    pub queue: Duration,
    pub inference: Duration,
    /// Images in the Run that served this job.
    pub batch_size: usize,
    /// Intra-op threads of the session that ran it.
    pub threads: usize,
}

impl RunTimes {
    /// The times of several Runs one request made one after the other: waits and Runs add up; the batch size and
    /// the threads are the largest.
    pub fn then(self, next: RunTimes) -> RunTimes {
        RunTimes {
            queue: self.queue + next.queue,
            inference: self.inference + next.inference,
            batch_size: self.batch_size.max(next.batch_size),
            threads: self.threads.max(next.threads),
        }
    }
}

type Reply<T> = mpsc::Sender<Result<(Vec<T>, RunTimes), EngineError>>;

/// Held by whoever waits for a request's answer (the HTTP handler, across the blocking thread that computes it).
/// Dropping it, because the client went away or the request timed out, abandons the request: its jobs still
/// queued are skipped.
#[derive(Debug, Default)]
pub struct Caller(Arc<()>);

impl Caller {
    /// The mark the request's jobs carry.
    pub fn ticket(&self) -> Ticket {
        Ticket(Arc::downgrade(&self.0))
    }
}

/// A request's mark on its jobs: whether its [`Caller`] still waits.
#[derive(Debug, Clone)]
pub struct Ticket(Weak<()>);

impl Ticket {
    fn abandoned(&self) -> bool {
        self.0.strong_count() == 0
    }
}

struct Job<T> {
    /// Shared with the caller, which may reuse the images (Score-CAM's masks, a second Run) without a copy.
    input: Arc<[f32]>,
    seeds: Vec<f32>,
    images: usize,
    /// [height, width] of every image: only jobs of one shape and one K share a Run.
    shape: [usize; 2],
    k: usize,
    enqueued: Instant,
    ticket: Ticket,
    reply: Reply<T>,
}

#[derive(Debug, Clone, Copy)]
pub struct Batching {
    pub max_batch: usize,
    pub max_wait: Duration,
}

/// When a session may take the next jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Whenever the cores have room for its threads.
    Always,
    /// A session of several threads, while at most one job waits and no [`Role::UnderLoad`] Run holds a core:
    /// a request that arrives alone is served fastest across all the cores.
    Alone,
    /// A one-thread session, once jobs wait for one another or other Runs hold cores: under load, one Run per
    /// core serves more than Runs whose threads synchronise on every operator (docs/performance.md). It runs
    /// one job at a time, never a batch of them.
    UnderLoad,
}

/// A backend, the threads its Runs keep busy (its intra-op threads), and when it runs.
pub struct Worker<B> {
    pub backend: B,
    pub threads: usize,
    pub role: Role,
}

/// The queue in front of a model's sessions. Dropping it lets the session threads serve what waits, then exit.
pub struct Runner<B: Backend> {
    queue: Arc<Queue<B::Output>>,
}

impl<B: Backend> Runner<B> {
    /// Starts one thread per worker. `cores` is how many threads the workers' Runs may keep busy at once.
    pub fn start(
        name: &str,
        workers: Vec<Worker<B>>,
        cores: usize,
        capacity: usize,
        batching: Batching,
    ) -> Self {
        let queue = Arc::new(Queue {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            capacity,
            cores,
            batching,
        });
        for (i, worker) in workers.into_iter().enumerate() {
            let queue = queue.clone();
            std::thread::Builder::new()
                .name(format!("{name}-session-{i}"))
                .spawn(move || serve(worker, &queue))
                .expect("spawning a session thread");
        }
        Self { queue }
    }

    /// Runs `images` images of `shape` ([height, width]), each with `k` seed rows, in one Run; one output per
    /// image.
    /// Blocks until the Run is done: call it from a blocking thread, never on the async runtime.
    pub fn run(
        &self,
        input: Arc<[f32]>,
        images: usize,
        shape: [usize; 2],
        seeds: Vec<f32>,
        k: usize,
        ticket: &Ticket,
    ) -> Result<(Vec<B::Output>, RunTimes), EngineError> {
        let (reply, result) = mpsc::channel();
        let job = Job {
            input,
            seeds,
            images,
            shape,
            k,
            enqueued: Instant::now(),
            ticket: ticket.clone(),
            reply,
        };
        {
            let mut state = self.queue.lock();
            if state.jobs.len() >= self.queue.capacity {
                return Err(EngineError::Overloaded);
            }
            state.jobs.push_back(job);
        }
        self.queue.changed.notify_all();
        result
            .recv()
            .unwrap_or_else(|_| Err(EngineError::Failed("a session thread stopped".into())))
    }

    /// Jobs waiting for a session.
    pub fn queue_depth(&self) -> usize {
        self.queue.lock().jobs.len()
    }
}

impl<B: Backend> Drop for Runner<B> {
    fn drop(&mut self) {
        self.queue.lock().closed = true;
        self.queue.changed.notify_all();
    }
}

struct Queue<T> {
    state: Mutex<State<T>>,
    /// Signalled when a job arrives, a Run ends or the runner is dropped.
    changed: Condvar,
    capacity: usize,
    cores: usize,
    batching: Batching,
}

struct State<T> {
    jobs: VecDeque<Job<T>>,
    /// Threads kept busy by Runs in flight, and those of them in [`Role::UnderLoad`] Runs.
    busy: usize,
    busy_under_load: usize,
    closed: bool,
}

impl<T> Default for State<T> {
    fn default() -> Self {
        Self {
            jobs: VecDeque::new(),
            busy: 0,
            busy_under_load: 0,
            closed: false,
        }
    }
}

impl<T> State<T> {
    fn may_start(&self, threads: usize, role: Role, cores: usize) -> bool {
        if self.jobs.is_empty() || self.busy + threads > cores {
            return false;
        }
        // Once the runner is dropped, whoever is free serves what is left.
        self.closed
            || match role {
                Role::Always => true,
                Role::Alone => self.jobs.len() == 1 && self.busy_under_load == 0,
                Role::UnderLoad => self.jobs.len() > 1 || self.busy > 0,
            }
    }
}

impl<T> Queue<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // A session thread that panicked holding the lock left the queue consistent: every change is one statement.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Waits until this worker may start a Run, then takes its batch and holds its cores; `None` once the runner
    /// is dropped and nothing waits.
    fn next_batch(&self, threads: usize, role: Role) -> Option<Vec<Job<T>>> {
        let mut state = self.lock();
        while !state.may_start(threads, role, self.cores) {
            if state.closed && state.jobs.is_empty() {
                return None;
            }
            state = self.changed.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        state.busy += threads;
        if role == Role::UnderLoad {
            state.busy_under_load += threads;
        }
        let first = state.jobs.pop_front().expect("may_start saw a job");
        // One-thread Runs take one job each: batching them gained neither EfficientNet-Lite0 nor ResNet-18 any
        // throughput under 16 clients, and cost 28-36% more p99 and 146-235 MiB of arena (docs/performance.md).
        let max_batch = match role {
            Role::UnderLoad => first.images,
            Role::Always | Role::Alone => self.batching.max_batch,
        };
        let (k, shape, mut images) = (first.k, first.shape, first.images);
        let mut batch = vec![first];
        let deadline = Instant::now() + self.batching.max_wait;
        loop {
            while let Some(next) = state.jobs.front() {
                if next.k != k || next.shape != shape || images + next.images > max_batch {
                    break;
                }
                images += next.images;
                batch.extend(state.jobs.pop_front());
            }
            // A job of another K or shape, or one that does not fit, waits for the next Run.
            let closed_batch = images >= max_batch || !state.jobs.is_empty();
            let left = deadline.saturating_duration_since(Instant::now());
            if closed_batch || left.is_zero() || state.closed {
                break;
            }
            state = self
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        Some(batch)
    }
}

/// A worker's cores while its Run is in flight; handed back when dropped, even by a Run that panicked.
struct Held<'a, T> {
    queue: &'a Queue<T>,
    threads: usize,
    role: Role,
}

impl<T> Drop for Held<'_, T> {
    fn drop(&mut self) {
        {
            let mut state = self.queue.lock();
            state.busy -= self.threads;
            if self.role == Role::UnderLoad {
                state.busy_under_load -= self.threads;
            }
        }
        self.queue.changed.notify_all();
    }
}

fn serve<B: Backend>(mut worker: Worker<B>, queue: &Queue<B::Output>) {
    while let Some(batch) = queue.next_batch(worker.threads, worker.role) {
        let _held = Held {
            queue,
            threads: worker.threads,
            role: worker.role,
        };
        // Clients that went away while their job waited cost no Run.
        let (abandoned, batch): (Vec<_>, Vec<_>) =
            batch.into_iter().partition(|job| job.ticket.abandoned());
        for job in abandoned {
            let _ = job.reply.send(Err(EngineError::Abandoned));
        }
        if !batch.is_empty() {
            run_batch(&mut worker.backend, worker.threads, batch);
        }
    }
    drop(worker);
    release_freed_memory();
}

/// Hands memory that a dropped session freed back to the system. glibc keeps freed blocks in its arenas, and
/// ONNX Runtime's are scattered enough that without this every model replacement left about 50 MiB resident
/// (EfficientNet-Lite0: 259 -> 641 MiB after 8 replacements; flat with it).
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists; it is safe to call from any thread.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn run_batch<B: Backend>(backend: &mut B, threads: usize, batch: Vec<Job<B::Output>>) {
    let started = Instant::now();
    let (k, shape) = (batch[0].k, batch[0].shape);
    let batch_size = batch.iter().map(|job| job.images).sum();
    // One job runs from its own buffer; a batch needs the images side by side.
    let result = if let [job] = &batch[..] {
        backend.run(&job.input, batch_size, shape, &job.seeds, k)
    } else {
        let inputs: Vec<f32> = batch.iter().flat_map(|j| j.input.iter().copied()).collect();
        let seeds: Vec<f32> = batch.iter().flat_map(|j| j.seeds.iter().copied()).collect();
        backend.run(&inputs, batch_size, shape, &seeds, k)
    };
    let inference = started.elapsed();
    let result = result.and_then(|outputs| match outputs.len() {
        n if n == batch_size => Ok(outputs),
        n => Err(format!(
            "the Run returned {n} outputs for {batch_size} images"
        )),
    });
    match result {
        Ok(outputs) => {
            let mut outputs = outputs.into_iter();
            for job in batch {
                let times = RunTimes {
                    queue: started - job.enqueued,
                    inference,
                    batch_size,
                    threads,
                };
                let mine = outputs.by_ref().take(job.images).collect();
                let _ = job.reply.send(Ok((mine, times)));
            }
        }
        Err(e) => {
            for job in batch {
                let _ = job.reply.send(Err(EngineError::Failed(e.clone())));
            }
        }
    }
}

#[cfg(test)]
mod tests;
