//! The engine's rules, with a fake backend whose Runs the test opens and closes: queueing, batching, roles,
//! backpressure, abandoned jobs, shutdown. No timing: each test waits for the state it asserts.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::*;

/// What a fake Run saw.
#[derive(Debug, Clone, PartialEq)]
struct Ran {
    worker: usize,
    images: usize,
    shape: [usize; 2],
    k: usize,
    /// The first value of each image: the test numbers its images.
    firsts: Vec<f32>,
}

/// A backend that reports each Run as it starts, then waits for the test to let it finish.
struct Fake {
    worker: usize,
    started: mpsc::Sender<Ran>,
    finish: Arc<Mutex<mpsc::Receiver<()>>>,
    fail: bool,
}

/// The shape of the test images (one value per pixel), unless a test says otherwise.
const SHAPE: [usize; 2] = [2, 2];

impl Backend for Fake {
    type Output = f32;

    fn run(
        &mut self,
        inputs: &[f32],
        images: usize,
        shape: [usize; 2],
        seeds: &[f32],
        k: usize,
    ) -> Result<Vec<f32>, String> {
        assert_eq!(inputs.len(), images * shape[0] * shape[1]);
        assert_eq!(seeds.len(), images * k);
        let firsts: Vec<f32> = inputs
            .chunks(shape[0] * shape[1])
            .map(|image| image[0])
            .collect();
        let ran = Ran {
            worker: self.worker,
            images,
            shape,
            k,
            firsts: firsts.clone(),
        };
        self.started.send(ran).unwrap();
        self.finish.lock().unwrap().recv().unwrap();
        if self.fail {
            return Err("the fake failed".into());
        }
        Ok(firsts)
    }
}

struct Harness {
    runner: Arc<Runner<Fake>>,
    started: mpsc::Receiver<Ran>,
    finish: mpsc::Sender<()>,
}

/// Workers of (threads, role) on `cores`, a queue of `capacity`, batches of up to `max_batch` images.
fn harness(workers: &[(usize, Role)], cores: usize, capacity: usize, max_batch: usize) -> Harness {
    let (started_tx, started) = mpsc::channel();
    let (finish, finish_rx) = mpsc::channel();
    let finish_rx = Arc::new(Mutex::new(finish_rx));
    let workers = workers
        .iter()
        .enumerate()
        .map(|(worker, &(threads, role))| Worker {
            backend: Fake {
                worker,
                started: started_tx.clone(),
                finish: finish_rx.clone(),
                fail: false,
            },
            threads,
            role,
        })
        .collect();
    let batching = Batching {
        max_batch,
        max_wait: Duration::ZERO,
    };
    let runner = Arc::new(Runner::start("fake", workers, cores, capacity, batching));
    Harness {
        runner,
        started,
        finish,
    }
}

impl Harness {
    /// Submits image `n` (k seed rows) from a thread of its own; its answer arrives on the returned channel.
    fn submit(
        &self,
        n: f32,
        k: usize,
        caller: &Caller,
    ) -> mpsc::Receiver<Result<(Vec<f32>, RunTimes), EngineError>> {
        self.submit_shaped(n, SHAPE, k, caller)
    }

    fn submit_shaped(
        &self,
        n: f32,
        shape: [usize; 2],
        k: usize,
        caller: &Caller,
    ) -> mpsc::Receiver<Result<(Vec<f32>, RunTimes), EngineError>> {
        let (tx, rx) = mpsc::channel();
        let runner = self.runner.clone();
        let ticket = caller.ticket();
        std::thread::spawn(move || {
            let input: Arc<[f32]> = vec![n; shape[0] * shape[1]].into();
            tx.send(runner.run(input, 1, shape, vec![0.0; k], k, &ticket))
                .unwrap();
        });
        rx
    }

    /// Submits image `n` and waits until it is queued: jobs queued this way are in submission order.
    fn queue(
        &self,
        n: f32,
        k: usize,
        caller: &Caller,
    ) -> mpsc::Receiver<Result<(Vec<f32>, RunTimes), EngineError>> {
        let depth = self.runner.queue_depth();
        let answer = self.submit(n, k, caller);
        self.wait_for_queue(depth + 1);
        answer
    }

    fn wait_for_queue(&self, depth: usize) {
        while self.runner.queue_depth() != depth {
            std::thread::yield_now();
        }
    }

    fn next_run(&self) -> Ran {
        self.started
            .recv_timeout(Duration::from_secs(10))
            .expect("a Run starts")
    }
}

#[test]
fn waiting_jobs_of_one_k_share_a_run_up_to_max_batch() {
    let h = harness(&[(1, Role::Always)], 1, 64, 3);
    let caller = Caller::default();
    let first = h.submit(0.0, 1, &caller);
    assert_eq!(h.next_run().firsts, [0.0]);
    // While the session is busy, five jobs of K=1 and one of K=2 queue up, in this order.
    let mut answers: Vec<_> = [1.0, 2.0].iter().map(|&n| h.queue(n, 1, &caller)).collect();
    let other_k = h.queue(9.0, 2, &caller);
    answers.extend([3.0, 4.0, 5.0].iter().map(|&n| h.queue(n, 1, &caller)));
    h.finish.send(()).unwrap();
    assert_eq!(first.recv().unwrap().unwrap().0, [0.0]);
    // The next Run takes what waits with the first job's K, in order, and stops at the job of another K.
    assert_eq!(
        h.next_run(),
        Ran {
            worker: 0,
            images: 2,
            shape: SHAPE,
            k: 1,
            firsts: vec![1.0, 2.0]
        }
    );
    h.finish.send(()).unwrap();
    assert_eq!(
        h.next_run(),
        Ran {
            worker: 0,
            images: 1,
            shape: SHAPE,
            k: 2,
            firsts: vec![9.0]
        }
    );
    h.finish.send(()).unwrap();
    // Then at most max_batch images.
    assert_eq!(h.next_run().firsts, [3.0, 4.0, 5.0]);
    h.finish.send(()).unwrap();
    for (answer, n) in answers.iter().zip([1.0, 2.0, 3.0, 4.0, 5.0]) {
        let (outputs, times) = answer.recv().unwrap().unwrap();
        assert_eq!(outputs, [n], "each job gets its own image's output");
        assert!(times.batch_size >= 2);
    }
    assert_eq!(other_k.recv().unwrap().unwrap().0, [9.0]);
}

#[test]
fn a_full_queue_is_refused_at_once() {
    let h = harness(&[(1, Role::Always)], 1, 2, 1);
    let caller = Caller::default();
    let running = h.submit(0.0, 1, &caller);
    h.next_run();
    let queued: Vec<_> = [1.0, 2.0].iter().map(|&n| h.queue(n, 1, &caller)).collect();
    let refused = h.submit(3.0, 1, &caller).recv().unwrap();
    assert!(
        matches!(refused, Err(EngineError::Overloaded)),
        "{refused:?}"
    );
    for _ in 0..3 {
        h.finish.send(()).unwrap();
    }
    assert!(running.recv().unwrap().is_ok());
    for answer in queued {
        assert!(answer.recv().unwrap().is_ok());
    }
}

#[test]
fn jobs_of_callers_gone_cost_no_run() {
    let h = harness(&[(1, Role::Always)], 1, 64, 1);
    let caller = Caller::default();
    let running = h.submit(0.0, 1, &caller);
    h.next_run();
    let gone = Caller::default();
    let abandoned = h.queue(1.0, 1, &gone);
    drop(gone);
    let kept = h.queue(2.0, 1, &caller);
    h.finish.send(()).unwrap();
    assert!(running.recv().unwrap().is_ok());
    assert!(matches!(
        abandoned.recv().unwrap(),
        Err(EngineError::Abandoned)
    ));
    // The next Run is the kept job's: the abandoned one was skipped.
    assert_eq!(h.next_run().firsts, [2.0]);
    h.finish.send(()).unwrap();
    assert!(kept.recv().unwrap().is_ok());
}

#[test]
fn alone_takes_a_lone_job_and_one_thread_sessions_take_the_load() {
    // One session of 2 threads for a lone request, two one-thread sessions on the same 2 cores.
    let h = harness(
        &[(2, Role::Alone), (1, Role::UnderLoad), (1, Role::UnderLoad)],
        2,
        64,
        8,
    );
    let caller = Caller::default();
    let lone = h.submit(0.0, 1, &caller);
    assert_eq!(
        h.next_run().worker,
        0,
        "a job that arrives alone runs on every thread"
    );
    // While it holds both cores, nothing else starts.
    let waiting: Vec<_> = [1.0, 2.0, 3.0]
        .iter()
        .map(|&n| h.queue(n, 1, &caller))
        .collect();
    assert!(h.started.recv_timeout(Duration::from_millis(50)).is_err());
    h.finish.send(()).unwrap();
    assert_eq!(lone.recv().unwrap().unwrap().1.threads, 2);
    // Under load, the one-thread sessions take one job each, whatever max_batch allows.
    let (a, b) = (h.next_run(), h.next_run());
    assert!(
        a.worker > 0 && b.worker > 0 && a.worker != b.worker,
        "{a:?} {b:?}"
    );
    assert_eq!((a.images, b.images), (1, 1));
    for _ in 0..3 {
        h.finish.send(()).unwrap();
    }
    let third = h.next_run();
    assert_eq!(third.images, 1);
    for answer in waiting {
        let (_, times) = answer.recv().unwrap().unwrap();
        assert!(times.threads <= 2);
    }
}

#[test]
fn a_failed_run_fails_every_job_in_it_and_the_session_goes_on() {
    let (started_tx, started) = mpsc::channel();
    let (finish, finish_rx) = mpsc::channel();
    let worker = Worker {
        backend: Fake {
            worker: 0,
            started: started_tx,
            finish: Arc::new(Mutex::new(finish_rx)),
            fail: true,
        },
        threads: 1,
        role: Role::Always,
    };
    let batching = Batching {
        max_batch: 4,
        max_wait: Duration::ZERO,
    };
    let h = Harness {
        runner: Arc::new(Runner::start("fake", vec![worker], 1, 64, batching)),
        started,
        finish,
    };
    let caller = Caller::default();
    for n in 0..2 {
        let answer = h.submit(n as f32, 1, &caller);
        h.next_run();
        h.finish.send(()).unwrap();
        let answer = answer.recv().unwrap();
        assert!(
            matches!(&answer, Err(EngineError::Failed(m)) if m == "the fake failed"),
            "{answer:?}"
        );
    }
}

#[test]
fn dropping_the_runner_serves_what_waits() {
    let h = harness(&[(1, Role::Always)], 1, 64, 1);
    let caller = Caller::default();
    let mut answers = vec![h.submit(0.0, 1, &caller)];
    h.next_run();
    answers.push(h.queue(1.0, 1, &caller));
    let Harness {
        runner,
        started,
        finish,
    } = h;
    // The submitting threads hold clones of the runner; the last drop closes the queue.
    drop(runner);
    finish.send(()).unwrap();
    started.recv_timeout(Duration::from_secs(10)).unwrap();
    finish.send(()).unwrap();
    for answer in answers {
        assert!(answer.recv().unwrap().is_ok());
    }
}

#[test]
fn jobs_of_another_shape_wait_for_a_run_of_their_own() {
    let h = harness(&[(1, Role::Always)], 1, 64, 8);
    let caller = Caller::default();
    let first = h.submit(0.0, 1, &caller);
    h.next_run();
    let small = h.queue(1.0, 1, &caller);
    let wide = h.submit_shaped(2.0, [2, 3], 1, &caller);
    h.wait_for_queue(2);
    let small_again = h.queue(3.0, 1, &caller);
    h.finish.send(()).unwrap();
    assert!(first.recv().unwrap().is_ok());
    let runs: Vec<Ran> = (0..3)
        .map(|_| {
            let ran = h.next_run();
            h.finish.send(()).unwrap();
            ran
        })
        .collect();
    let ran = |images, shape, firsts: &[f32]| Ran {
        worker: 0,
        images,
        shape,
        k: 1,
        firsts: firsts.to_vec(),
    };
    assert_eq!(
        runs[0],
        ran(1, SHAPE, &[1.0]),
        "the job of another shape ends the batch"
    );
    assert_eq!(runs[1], ran(1, [2, 3], &[2.0]));
    assert_eq!(runs[2], ran(1, SHAPE, &[3.0]));
    for answer in [small, wide, small_again] {
        assert!(answer.recv().unwrap().is_ok());
    }
}
