//! The session layout on real sessions of the default model: a request that arrives alone runs on the session of
//! all the threads, one-thread sessions run one request each, and every session gives the same answers. The
//! engine's queueing, batching and backpressure rules are unit-tested with a fake backend (src/engine/tests.rs).

use std::sync::Arc;

use camserve::engine::{Caller, EngineError, RunTimes, Runner};
use camserve::onnx::session::RunOutput;
use camserve::registry::{OnnxSession, ServedModel};

use crate::support::{max_relative_error, model_config, root, runtime};

const SIZE: [usize; 2] = [224, 224];

/// The default model with one session of `threads` threads (batches of up to 8 images), and a made-up image
/// with the seeds of its top-1.
fn model(threads: usize, split_under_load: bool) -> (ServedModel, Arc<[f32]>, Vec<f32>) {
    let mut config = model_config("default", &root().join("models/efficientnet_lite0.onnx"));
    config.threads = threads;
    config.split_under_load = split_under_load;
    let model = ServedModel::load(runtime(), &config).unwrap();
    let image: Arc<[f32]> = (0..3 * SIZE[0] * SIZE[1])
        .map(|i| ((i % 251) as f32 / 125.0) - 1.0)
        .collect();
    let seeds = vec![0.0; model.info.num_classes()];
    (model, image, seeds)
}

fn explain(
    runner: &Runner<OnnxSession>,
    image: &Arc<[f32]>,
    seeds: &[f32],
) -> (RunOutput, RunTimes) {
    let caller = Caller::default();
    let (mut outputs, times) = runner
        .run(image.clone(), 1, SIZE, seeds.to_vec(), 1, &caller.ticket())
        .unwrap();
    (outputs.remove(0), times)
}

/// `n` requests at once, each on a thread of its own.
fn concurrently(
    runner: &Runner<OnnxSession>,
    image: &Arc<[f32]>,
    seeds: &[f32],
    n: usize,
) -> Vec<(RunOutput, RunTimes)> {
    std::thread::scope(|scope| {
        let threads: Vec<_> = (0..n)
            .map(|_| scope.spawn(|| explain(runner, image, seeds)))
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    })
}

#[test]
fn a_lone_request_gets_every_thread_and_every_session_answers_alike() {
    let (model, image, seeds) = model(2, true);
    let runner = &model.runner;
    let (alone, times) = explain(runner, &image, &seeds);
    assert_eq!(
        times.threads, 2,
        "a request that arrives alone runs across both threads"
    );

    let answers = concurrently(runner, &image, &seeds, 16);
    // One-thread Runs take one request each, whatever max_batch allows.
    for (_, times) in answers.iter().filter(|(_, t)| t.threads == 1) {
        assert_eq!(times.batch_size, 1);
    }
    for (output, _) in &answers {
        // Any session, the same answer (ONNX Runtime's kernels split work differently across threads).
        assert!(max_relative_error(&output.logits, &alone.logits) < 1e-5);
        assert!(max_relative_error(&output.gradients, &alone.gradients) < 1e-5);
        assert_eq!(output.target_class, alone.target_class);
    }
}

#[test]
fn without_the_split_every_run_uses_every_thread() {
    let (model, image, seeds) = model(2, false);
    let answers = concurrently(&model.runner, &image, &seeds, 16);
    assert!(answers.iter().all(|(_, times)| times.threads == 2));
}

#[test]
fn a_job_whose_caller_went_away_costs_no_run() {
    let (model, image, seeds) = model(2, true);
    let runner = &model.runner;
    // The caller is dropped at once, as when a client disconnects or its request times out.
    let ticket = Caller::default().ticket();
    let answer = runner.run(image.clone(), 1, SIZE, seeds.clone(), 1, &ticket);
    assert!(
        matches!(answer, Err(EngineError::Abandoned)),
        "{:?}",
        answer.err()
    );
    // The sessions serve the next caller as usual.
    let (output, _) = explain(runner, &image, &seeds);
    assert_eq!(output.logits.len(), 1000);
}
