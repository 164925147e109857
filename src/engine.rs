//! Runs sessions on threads of their own, off the async runtime. Each session is owned by one thread that takes
//! jobs from the model's bounded queue; a full queue is refused at once rather than left to grow.

use crossbeam_channel::{Sender, TrySendError};
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

struct Job {
    input: Vec<f32>,
    seeds: Vec<f32>,
    k: usize,
    reply: oneshot::Sender<Result<RunOutput, EngineError>>,
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
    ) -> Self {
        let (queue, jobs) = crossbeam_channel::bounded::<Job>(capacity);
        for (i, mut session) in sessions.into_iter().enumerate() {
            let jobs = jobs.clone();
            std::thread::Builder::new()
                .name(format!("{name}-session-{i}"))
                .spawn(move || {
                    for job in jobs {
                        // The client went away while the job waited: don't spend a Run on it.
                        if job.reply.is_closed() {
                            continue;
                        }
                        let result =
                            model::run(&mut session, &job.input, input_size, &job.seeds, job.k)
                                .map_err(|e| EngineError::Failed(e.to_string()));
                        let _ = job.reply.send(result);
                    }
                })
                .expect("spawning a session thread");
        }
        Self { queue }
    }

    /// Runs one preprocessed image [3,H,W] with K seed rows.
    pub async fn run(
        &self,
        input: Vec<f32>,
        seeds: Vec<f32>,
        k: usize,
    ) -> Result<RunOutput, EngineError> {
        let (reply, result) = oneshot::channel();
        match self.queue.try_send(Job {
            input,
            seeds,
            k,
            reply,
        }) {
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
