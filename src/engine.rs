//! Runs sessions on threads of their own, off the async runtime. Each session is owned by one thread that takes
//! jobs from the model's bounded queue; a full queue is refused at once rather than left to grow.
//!
//! A job is one or more images with the same number of targets each (one image for a plain explanation; the
//! augmented copies for `aug_smooth`; masked copies for Score-CAM and the trust score). Batching: a session
//! thread that takes a job also takes the jobs already waiting with the same number of targets while the Run
//! stays within `max_batch` images, optionally waiting `max_batch_wait` for more, and runs them in one Run. A job
//! larger than `max_batch` runs alone, in one Run.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use ort::session::Session;
use tokio::sync::oneshot;

use crate::model::{self, RunOutput};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("the model's queue is full")]
    Overloaded,
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
}

impl RunTimes {
    /// The times of several Runs one request made one after the other: waits and Runs add up; the batch size is
    /// the largest.
    pub fn then(self, next: RunTimes) -> RunTimes {
        RunTimes {
            queue: self.queue + next.queue,
            inference: self.inference + next.inference,
            batch_size: self.batch_size.max(next.batch_size),
        }
    }
}

type Reply = oneshot::Sender<Result<(Vec<RunOutput>, RunTimes), EngineError>>;

struct Job {
    /// Shared with the caller, which may reuse the images (Score-CAM's masks, a second Run) without a copy.
    input: Arc<[f32]>,
    seeds: Vec<f32>,
    images: usize,
    k: usize,
    enqueued: Instant,
    reply: Reply,
}

#[derive(Debug, Clone, Copy)]
pub struct Batching {
    pub max_batch: usize,
    pub max_wait: Duration,
}

/// The queue in front of a model's sessions. Dropping it lets the session threads finish and exit.
pub struct Runner {
    queue: Sender<Job>,
}

impl Runner {
    pub fn start(
        name: &str,
        sessions: Vec<Session>,
        input_size: [usize; 2],
        capacity: usize,
        batching: Batching,
    ) -> Self {
        let (queue, jobs) = crossbeam_channel::bounded::<Job>(capacity);
        for (i, session) in sessions.into_iter().enumerate() {
            let jobs = jobs.clone();
            std::thread::Builder::new()
                .name(format!("{name}-session-{i}"))
                .spawn(move || serve_session(session, jobs, input_size, batching))
                .expect("spawning a session thread");
        }
        Self { queue }
    }

    /// Runs `images` preprocessed images [images,3,H,W], each with K seed rows, in one Run; one output per image.
    pub async fn run(
        &self,
        input: Arc<[f32]>,
        images: usize,
        seeds: Vec<f32>,
        k: usize,
    ) -> Result<(Vec<RunOutput>, RunTimes), EngineError> {
        let (reply, result) = oneshot::channel();
        let job = Job {
            input,
            seeds,
            images,
            k,
            enqueued: Instant::now(),
            reply,
        };
        match self.queue.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => return Err(EngineError::Overloaded),
            Err(TrySendError::Disconnected(_)) => {
                return Err(EngineError::Failed(
                    "the model's sessions have stopped".into(),
                ));
            }
        }
        result
            .await
            .unwrap_or_else(|_| Err(EngineError::Failed("a session thread stopped".into())))
    }

    /// Jobs waiting for a session.
    pub fn queue_depth(&self) -> usize {
        self.queue.len()
    }
}

fn serve_session(
    mut session: Session,
    jobs: Receiver<Job>,
    input_size: [usize; 2],
    batching: Batching,
) {
    // A job taken while filling a batch of another K waits here for the next Run.
    let mut held: Option<Job> = None;
    loop {
        let Some(first) = held.take().or_else(|| jobs.recv().ok()) else {
            drop(session);
            release_freed_memory();
            return;
        };
        let mut images = first.images;
        let mut batch = vec![first];
        let deadline = Instant::now() + batching.max_wait;
        while images < batching.max_batch {
            let next = match deadline.checked_duration_since(Instant::now()) {
                Some(left) if !left.is_zero() => jobs.recv_timeout(left),
                _ => jobs.try_recv().map_err(|_| RecvTimeoutError::Timeout),
            };
            match next {
                Ok(job) if job.k == batch[0].k && images + job.images <= batching.max_batch => {
                    images += job.images;
                    batch.push(job);
                }
                Ok(job) => {
                    held = Some(job);
                    break;
                }
                Err(_) => break,
            }
        }
        // Clients that went away while their job waited cost no Run.
        batch.retain(|job| !job.reply.is_closed());
        if !batch.is_empty() {
            run_batch(&mut session, batch, input_size);
        }
    }
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

fn run_batch(session: &mut Session, batch: Vec<Job>, input_size: [usize; 2]) {
    let started = Instant::now();
    let k = batch[0].k;
    // One job runs from its own buffer; a batch needs the images side by side.
    let result = if let [job] = &batch[..] {
        model::run(session, &job.input, input_size, &job.seeds, k)
    } else {
        let inputs: Vec<f32> = batch.iter().flat_map(|j| j.input.iter().copied()).collect();
        let seeds: Vec<f32> = batch.iter().flat_map(|j| j.seeds.iter().copied()).collect();
        model::run(session, &inputs, input_size, &seeds, k)
    };
    let inference = started.elapsed();
    let batch_size = batch.iter().map(|job| job.images).sum();
    match result {
        Ok(outputs) => {
            let mut outputs = outputs.into_iter();
            for job in batch {
                let times = RunTimes {
                    queue: started - job.enqueued,
                    inference,
                    batch_size,
                };
                let mine = outputs.by_ref().take(job.images).collect();
                let _ = job.reply.send(Ok((mine, times)));
            }
        }
        Err(e) => {
            for job in batch {
                let _ = job.reply.send(Err(EngineError::Failed(e.to_string())));
            }
        }
    }
}
