//! A request's Runs: decoding into the model's input tensor, the Run of the target classes (with `aug_smooth`'s
//! copies), Score-CAM's masked Runs and the trust score's perturbed Run.

use std::sync::Arc;
use std::time::{Duration, Instant};

use image::RgbImage;

use crate::config::Limits;
use crate::engine::{RunTimes, Ticket};
use crate::explain::maps::{ScoreCamLogits, display, fit};
use crate::explain::{
    AUGMENTATIONS, ExplainError, ExplainOptions, TargetMap, Targets, Timings, Trust, softmax,
};
use crate::onnx::session::RunOutput;
use crate::pipeline::cam::{self, Map};
use crate::pipeline::preprocess::{self, Preprocess};
use crate::registry::ServedModel;

/// A drawn JPEG of at least this many pixels is decoded a second time, at the tensors' scale, beside the drawing's
/// decode; a smaller one is resized to the model's input, which costs less than a second decode and a thread
/// (unless it is boxed too, see [`prepare`]).
const DECODE_TWICE_FROM: u64 = 1 << 20;

/// Masked inputs per Run for Score-CAM: a Run's memory grows with its batch.
const SCORE_CAM_IMAGES_PER_RUN: usize = 32;

/// A decoded photo and the model's input tensor made from it.
pub struct Prepared {
    /// The photo, decoded at least as finely as `drawn_side` needs, for drawing (overlays).
    pub photo: preprocess::Decoded,
    /// The pixels the tensors are made from, when they are not `photo`'s: a JPEG decoded at the scale that the
    /// model's input and the localization Run need, whatever an output draws, so that every output's classes,
    /// maps and boxes are the same (a finer DCT scale gives slightly other pixels, and Otsu's level follows them).
    pub analysis: Option<RgbImage>,
    pub tensor: Arc<[f32]>,
    pub took: Duration,
}

impl Prepared {
    /// The pixels the tensors are made from.
    pub fn analysis(&self) -> &RgbImage {
        self.analysis.as_ref().unwrap_or(&self.photo.image)
    }
}

/// Decodes (no finer than the model's input, `drawn_side` and the localization Run, given as its (side, stride),
/// need) and makes the model's input tensor. A JPEG that is drawn and boxed, or drawn and large, is decoded twice,
/// side by side on two threads: for drawing, and at the scale the tensors need. The tensors then do not depend on
/// the drawing's size (every output gets the same boxes), and a 12-megapixel overlay's tensor comes from a decode
/// at 1/8 scale (11 ms, beside the 48 ms full decode) instead of resizing 12 million pixels (about 20 ms, after
/// it).
pub fn prepare(
    model: &ServedModel,
    bytes: &[u8],
    limits: &Limits,
    drawn_side: Option<usize>,
    localization: Option<(usize, usize)>,
) -> Result<Prepared, ExplainError> {
    let started = Instant::now();
    let p = &model.info.preprocess;
    let limits = limits.decode_limits();
    let analysis_size = |width, height| {
        let located = localization.map_or((0, 0), |(side, stride)| {
            localization_size((width, height), (p.width, p.height), side, stride)
        });
        (p.width.max(located.0), p.height.max(located.1))
    };
    let drawn_size = |width, height| {
        let drawn = drawn_side.map_or((0, 0), |side| fit(width, height, side));
        let analysis = analysis_size(width, height);
        (analysis.0.max(drawn.0), analysis.1.max(drawn.1))
    };
    // With a localization Run too, always: every output must get the same boxes.
    // The JPEG's header is read only for answers that draw.
    let scaled_twice = drawn_side.is_some() && {
        let pixels = preprocess::jpeg_pixels(bytes);
        pixels > 0 && (localization.is_some() || pixels >= DECODE_TWICE_FROM)
    };
    let (photo, analysis) = std::thread::scope(|scope| {
        let analysis = scaled_twice
            .then(|| scope.spawn(|| preprocess::decode_at_least(bytes, &limits, analysis_size)));
        let photo = preprocess::decode_at_least(bytes, &limits, drawn_size);
        let analysis = analysis.map(|decoding| decoding.join().expect("decoding does not panic"));
        (photo, analysis)
    });
    let photo = photo?;
    let analysis = analysis
        .transpose()?
        .filter(|analysis| analysis.image.dimensions() != photo.image.dimensions())
        .map(|analysis| analysis.image);
    let mut prepared = Prepared {
        photo,
        analysis,
        tensor: Arc::from([]),
        took: Duration::ZERO,
    };
    // Made in place where the Runs read it (an exact-size `collect` allocates once), not copied there afterwards.
    let mut tensor: Arc<[f32]> = std::iter::repeat_n(0.0, p.tensor_len()).collect();
    p.write_tensor(
        prepared.analysis(),
        Arc::get_mut(&mut tensor).expect("a new tensor has one owner"),
    );
    prepared.tensor = tensor;
    prepared.took = started.elapsed();
    Ok(prepared)
}

/// What a request spent after decoding: its Runs (waits and inference, added up) and the CPU work around them.
pub struct Spent {
    pub runs: RunTimes,
    pub cpu: Duration,
}

impl Spent {
    fn add(&mut self, runs: RunTimes) {
        self.runs = self.runs.then(runs);
    }

    /// Does `work`, counting its time as CPU work.
    pub fn cpu<T>(&mut self, work: impl FnOnce() -> T) -> T {
        let started = Instant::now();
        let out = work();
        self.cpu += started.elapsed();
        out
    }
}

/// One Run of `images` images at the model's input size [images,3,H,W], each with the same K seed rows.
fn run(
    model: &ServedModel,
    inputs: Arc<[f32]>,
    images: usize,
    seeds: &[f32],
    k: usize,
    ticket: &Ticket,
) -> Result<(Vec<RunOutput>, RunTimes), ExplainError> {
    let p = &model.info.preprocess;
    run_at(model, inputs, images, [p.height, p.width], seeds, k, ticket)
}

/// One Run of `images` images of `shape` ([height, width]), each with the same K seed rows.
fn run_at(
    model: &ServedModel,
    inputs: Arc<[f32]>,
    images: usize,
    shape: [usize; 2],
    seeds: &[f32],
    k: usize,
    ticket: &Ticket,
) -> Result<(Vec<RunOutput>, RunTimes), ExplainError> {
    Ok(model
        .runner
        .run(inputs, images, shape, seeds.repeat(images), k, ticket)?)
}

/// Class scores only: one Run with a single all-zero seed row.
pub fn predict(
    model: &ServedModel,
    bytes: &[u8],
    limits: &Limits,
    ticket: &Ticket,
) -> Result<(Vec<f32>, Timings), ExplainError> {
    let Prepared {
        tensor,
        took: decode,
        ..
    } = prepare(model, bytes, limits, None, None)?;
    let seeds = vec![0.0; model.info.num_classes()];
    let (mut outputs, run) = run(model, tensor, 1, &seeds, 1, ticket)?;
    let timings = Timings {
        decode,
        queue: run.queue,
        inference: run.inference,
        batch_size: run.batch_size,
        maps: Duration::ZERO,
    };
    Ok((outputs.swap_remove(0).logits, timings))
}

/// What the Run of the target classes gave.
pub struct TargetRuns {
    /// The inputs that ran: the tensor, or its `aug_smooth` copies side by side.
    pub inputs: Arc<[f32]>,
    /// One per input.
    pub outputs: Vec<RunOutput>,
    pub spent: Spent,
}

/// The Run of the target classes: one seed row per target, every `aug_smooth` copy in the same Run.
pub fn target_runs(
    model: &ServedModel,
    tensor: &Arc<[f32]>,
    options: &ExplainOptions,
    ticket: &Ticket,
) -> Result<TargetRuns, ExplainError> {
    let classes = model.info.num_classes();
    let (seeds, k) = seed_rows(&options.targets, classes);
    let (inputs, n): (Arc<[f32]>, usize) = if options.aug_smooth {
        (
            augmented(tensor, model.info.preprocess.width).into(),
            AUGMENTATIONS.len(),
        )
    } else {
        (tensor.clone(), 1)
    };
    let (mut outputs, mut run_times) = run(model, inputs.clone(), n, &seeds, k, ticket)?;
    // Every copy must explain the classes the image itself resolved to; rarely, a copy ranks them otherwise and
    // the copies run again with those classes named.
    if outputs
        .iter()
        .any(|o| o.target_class != outputs[0].target_class)
    {
        let named = Targets::Classes(outputs[0].target_class.clone());
        let (again, times) = run(
            model,
            inputs.clone(),
            n,
            &seed_rows(&named, classes).0,
            k,
            ticket,
        )?;
        (outputs, run_times) = (again, run_times.then(times));
    }
    let spent = Spent {
        runs: run_times,
        cpu: Duration::ZERO,
    };
    Ok(TargetRuns {
        inputs,
        outputs,
        spent,
    })
}

/// One seed row per target: one-hot for a class, all zero for "the k-th best class".
fn seed_rows(targets: &Targets, classes: usize) -> (Vec<f32>, usize) {
    match targets {
        Targets::TopK(k) => (vec![0.0; k * classes], *k),
        Targets::Classes(list) | Targets::BestOf(list, _) => {
            let mut seeds = vec![0.0; list.len() * classes];
            for (row, &class) in list.iter().enumerate() {
                seeds[row * classes + class] = 1.0;
            }
            (seeds, list.len())
        }
    }
}

/// The [`AUGMENTATIONS`] of a preprocessed tensor, side by side.
fn augmented(tensor: &[f32], width: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(tensor.len() * AUGMENTATIONS.len());
    for (mirrored, factor) in AUGMENTATIONS {
        for row in tensor.chunks_exact(width) {
            if mirrored {
                out.extend(row.iter().rev().map(|v| v * factor));
            } else {
                out.extend(row.iter().map(|v| v * factor));
            }
        }
    }
    out
}

/// `tensor` [3,H,W] times each mask [H,W], side by side.
fn masked(tensor: &[f32], masks: impl Iterator<Item = Map>) -> Vec<f32> {
    let mut out = Vec::new();
    for mask in masks {
        for plane in tensor.chunks_exact(mask.data.len()) {
            out.extend(plane.iter().zip(&mask.data).map(|(x, m)| x * m));
        }
    }
    out
}

/// Score-CAM's masked Runs for every input that ran (the image, or each `aug_smooth` copy).
pub fn score_cam_runs(
    model: &ServedModel,
    inputs: &[f32],
    outputs: &[RunOutput],
    max_channels: usize,
    spent: &mut Spent,
    ticket: &Ticket,
) -> Result<Vec<ScoreCamLogits>, ExplainError> {
    let per_image = inputs.len() / outputs.len();
    inputs
        .chunks_exact(per_image)
        .zip(outputs)
        .map(|(copy, output)| score_cam_logits(model, copy, output, max_channels, spent, ticket))
        .collect()
}

/// Score-CAM's masked Runs for one image: the scored channels and the logits of the input masked by each.
fn score_cam_logits(
    model: &ServedModel,
    tensor: &[f32],
    output: &RunOutput,
    max_channels: usize,
    spent: &mut Spent,
    ticket: &Ticket,
) -> Result<ScoreCamLogits, ExplainError> {
    let p = &model.info.preprocess;
    let (width, height) = (p.width, p.height);
    let shape = output.activation_shape;
    let channels = cam::score_cam_channels(&output.activations, shape, max_channels);
    let seeds = vec![0.0; model.info.num_classes()];
    let mut logits = Vec::with_capacity(channels.len());
    let plane = shape[1] * shape[2];
    for chunk in channels.chunks(SCORE_CAM_IMAGES_PER_RUN) {
        let inputs = spent.cpu(|| {
            let masks = chunk.iter().map(|&c| {
                let channel = Map::new(
                    shape[2],
                    shape[1],
                    output.activations[c * plane..][..plane].to_vec(),
                );
                cam::score_cam_mask(&channel, width, height)
            });
            masked(tensor, masks)
        });
        let images = inputs.len() / (3 * width * height);
        let (outputs, run_times) = run(model, inputs.into(), images, &seeds, 1, ticket)?;
        spent.add(run_times);
        logits.extend(outputs.into_iter().map(|o| o.logits));
    }
    Ok((channels, logits))
}

/// The trust figures of every target, from one Run of the perturbed inputs (two per target).
pub fn trust(
    model: &ServedModel,
    tensor: &[f32],
    probabilities: &[f32],
    targets: &mut [TargetMap],
    spent: &mut Spent,
    ticket: &Ticket,
) -> Result<(), ExplainError> {
    let (width, height) = (model.info.preprocess.width, model.info.preprocess.height);
    let inputs = spent.cpu(|| {
        let perturbations = targets.iter().flat_map(|t| {
            let kept = display(&t.raw, &t.variants, width, height);
            let removed = Map::new(width, height, kept.data.iter().map(|m| 1.0 - m).collect());
            [kept, removed]
        });
        masked(tensor, perturbations)
    });
    let seeds = vec![0.0; model.info.num_classes()];
    let (outputs, run_times) = run(model, inputs.into(), 2 * targets.len(), &seeds, 1, ticket)?;
    spent.add(run_times);
    for (target, pair) in targets.iter_mut().zip(outputs.chunks_exact(2)) {
        target.trust = Some(Trust {
            probability: probabilities[target.class],
            kept_probability: softmax(&pair[0].logits)[target.class],
            removed_probability: softmax(&pair[1].logits)[target.class],
        });
    }
    Ok(())
}

/// The input size, (width, height), of the localization Run: the photo's aspect ratio kept, its longer side
/// `side` (but a photo smaller than that is not enlarged past the model's own input), each side rounded to a
/// multiple of the model's `stride` (half up) and at least one stride.
pub fn localization_size(
    photo: (usize, usize),
    input: (usize, usize),
    side: usize,
    stride: usize,
) -> (usize, usize) {
    let longer = photo.0.max(photo.1);
    let side = side.min(longer.max(input.0.max(input.1)));
    let scale = side as f64 / longer as f64;
    let round = |length: usize| {
        let cells = (length as f64 * scale / stride as f64 + 0.5).floor() as usize;
        cells.max(1) * stride
    };
    (round(photo.0), round(photo.1))
}

/// The localization Run: the photo at `size` (width, height), one one-hot seed row per class.
pub fn localization_run(
    model: &ServedModel,
    photo: &RgbImage,
    size: (usize, usize),
    classes: &[usize],
    spent: &mut Spent,
    ticket: &Ticket,
) -> Result<RunOutput, ExplainError> {
    let p = Preprocess {
        width: size.0,
        height: size.1,
        ..model.info.preprocess.clone()
    };
    let tensor = spent.cpu(|| {
        let mut tensor = vec![0.0; p.tensor_len()];
        p.write_tensor(photo, &mut tensor);
        tensor
    });
    let (seeds, k) = seed_rows(
        &Targets::Classes(classes.to_vec()),
        model.info.num_classes(),
    );
    let (mut outputs, times) =
        run_at(model, tensor.into(), 1, [size.1, size.0], &seeds, k, ticket)?;
    spent.add(times);
    Ok(outputs.swap_remove(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn localization_sizes_keep_the_aspect_in_whole_cells() {
        let size = |photo, side| localization_size(photo, (224, 224), side, 32);
        // docs/localization.md's examples: the longer side 320, each side rounded half up to a multiple of 32.
        assert_eq!(size((640, 427), 320), (320, 224));
        assert_eq!(size((480, 360), 320), (320, 256));
        assert_eq!(size((480, 640), 320), (256, 320));
        assert_eq!(size((4000, 3000), 320), (320, 256));
        // A very wide photo keeps one cell on its short side.
        assert_eq!(size((4000, 100), 320), (320, 32));
        // A photo smaller than the side is not enlarged past the model's input.
        assert_eq!(size((128, 128), 320), (224, 224));
        assert_eq!(size((300, 200), 320), (288, 192));
    }
}
