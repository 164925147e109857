//! The one pipeline behind `POST /explain`, `POST /predict` and `camserve explain`: bytes -> image -> tensor ->
//! one Run -> a map and boxes per target class. Options add Runs, each one batch: `aug_smooth` puts its augmented
//! copies into the first Run; Score-CAM scores masked inputs, and the trust score perturbed ones, in Runs of their
//! own. It blocks: callers run it on a blocking thread, never on the async runtime.

use std::sync::Arc;
use std::time::{Duration, Instant};

use image::RgbImage;

use crate::config::Limits;
use crate::engine::{EngineError, RunTimes, Ticket};
use crate::onnx::session::RunOutput;
use crate::pipeline::boxes::{self, Region, Threshold};
use crate::pipeline::cam::{self, CamMethod, Map};
use crate::pipeline::preprocess::{self, ChannelOrder, DecodeError};
use crate::registry::ServedModel;

/// Which classes to explain.
#[derive(Debug, Clone, PartialEq)]
pub enum Targets {
    /// The model's k best classes.
    TopK(usize),
    /// These class indices, in this order.
    Classes(Vec<usize>),
    /// The `k` best-scoring of these classes, best first: all are scored and get their gradients in the one Run,
    /// only those `k` get maps (Label Studio: a project's labels).
    BestOf(Vec<usize>, usize),
}

#[derive(Debug, Clone)]
pub struct ExplainOptions {
    pub targets: Targets,
    pub method: CamMethod,
    /// The first principal component of the weighted activations instead of their channel sum.
    pub eigen_smooth: bool,
    /// The mean over [`AUGMENTATIONS`] of the de-augmented maps.
    pub aug_smooth: bool,
    /// Score-CAM: how many channels (those of largest mean activation) are scored; the others weigh 0.
    pub max_channels: usize,
    /// Adds a [`Trust`] figure to each target.
    pub trust: bool,
    /// Where the map is binarized for boxes and masks.
    pub threshold: Threshold,
    pub max_boxes: usize,
    /// The target layers whose maps are combined: 0 is the model's target layer, i its `extra_layers[i - 1]`.
    pub layers: Vec<usize>,
    /// Also compute Guided Grad-CAM (the model must have `input_gradients`).
    pub guided: bool,
    /// Where an output draws the photo (an overlay), the longest side it is drawn at; `None` where no output shows
    /// the photo's pixels. A JPEG is decoded only as finely as this and the model's input need.
    pub drawn_side: Option<usize>,
}

/// Score-CAM's default channel budget: on the default model (1280 channels) the smallest tried whose picture is
/// within about 0.06 of all channels', for 64 masked images' worth of Runs (docs/methods.md has the measurement).
pub const DEFAULT_SCORE_CAM_CHANNELS: usize = 64;

/// Masked inputs per Run for Score-CAM: a Run's memory grows with its batch.
const SCORE_CAM_IMAGES_PER_RUN: usize = 32;

impl Default for ExplainOptions {
    fn default() -> Self {
        Self {
            targets: Targets::TopK(1),
            method: CamMethod::GradCam,
            eigen_smooth: false,
            aug_smooth: false,
            max_channels: DEFAULT_SCORE_CAM_CHANNELS,
            trust: false,
            threshold: Threshold::DEFAULT,
            max_boxes: 1,
            layers: vec![0],
            guided: false,
            drawn_side: None,
        }
    }
}

/// pytorch-grad-cam's `aug_smooth` (ttach: `HorizontalFlip()` x `Multiply([0.9, 1, 1.1])` on the preprocessed
/// tensor): (mirrored, factor). The identity comes first: its Run gives the scores and the classes.
pub const AUGMENTATIONS: [(bool, f32); 6] = [
    (false, 1.0),
    (false, 0.9),
    (false, 1.1),
    (true, 0.9),
    (true, 1.0),
    (true, 1.1),
];

/// How far the map can be trusted: the target's probability on the image, on the image with only the map's
/// salient part kept (input x map, the rest pulled to the preprocessing mean, as pytorch-grad-cam's
/// `CamMultImageConfidenceChange` perturbs), and with that part removed (input x (1 - map)).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Trust {
    pub probability: f32,
    pub kept_probability: f32,
    pub removed_probability: f32,
}

impl Trust {
    /// pytorch-grad-cam's `DropInConfidence`: max(0, probability - kept_probability).
    pub fn drop_in_confidence(&self) -> f32 {
        (self.probability - self.kept_probability).max(0.0)
    }

    /// pytorch-grad-cam's `IncreaseInConfidence`: the kept part alone is more convincing than the image.
    pub fn increase_in_confidence(&self) -> bool {
        self.kept_probability > self.probability
    }

    /// How much the probability falls when the salient part is removed (negative: it rises).
    pub fn removal_drop(&self) -> f32 {
        self.probability - self.removed_probability
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// Everything one request computed: the scores, and per target class its map and boxes.
pub struct Explanation {
    /// The photo's pixels, upright, decoded at a fraction of its size when no output needs more
    /// ([`ExplainOptions::drawn_side`]).
    pub image: RgbImage,
    /// The upright photo's `(width, height)`: boxes and image-sized maps are in its pixels.
    pub photo_size: (usize, usize),
    pub logits: Vec<f32>,
    pub probabilities: Vec<f32>,
    pub targets: Vec<TargetMap>,
    pub timings: Timings,
}

/// Where a request's time went, stage by stage.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timings {
    /// Decoding and preprocessing the image.
    pub decode: Duration,
    /// Waiting for a session.
    pub queue: Duration,
    /// The ONNX Runtime Run (shared by every request of its batch).
    pub inference: Duration,
    pub batch_size: usize,
    /// Maps, upsampling and boxes.
    pub maps: Duration,
}

pub struct TargetMap {
    pub class: usize,
    /// The method's map on the target layer's grid, before ReLU and normalization; with `aug_smooth`, the mean of
    /// the augmented copies' maps (de-augmented). With several layers: their combined map at the model's input
    /// size, pytorch-grad-cam's output (after ReLU, in [0, 1]).
    pub raw: Map,
    /// With `aug_smooth`, each augmented copy's raw map, de-augmented (mirrored back); else empty.
    pub variants: Vec<Map>,
    /// pytorch-grad-cam's display map (ReLU, min-max normalized, upsampled) at the analysis size.
    pub heat: Map,
    /// In original-image pixels.
    pub boxes: Vec<Region>,
    pub trust: Option<Trust>,
    /// Guided Grad-CAM when asked for: guided backpropagation times the Grad-CAM map, at the model's input size,
    /// RGB pixels interleaved (HWC), as pytorch-grad-cam computes `cam_mask * gb`.
    pub guided: Option<Vec<f32>>,
}

/// Boxes are found on the display map at most this many pixels on its longer side, then scaled to image pixels:
/// the map (7x7 for most models) holds no finer detail, and a 40-megapixel photo then costs what a 1-megapixel
/// one does, in time and in memory.
pub const ANALYSIS_SIDE: usize = 1024;

/// `width x height` scaled down, keeping its aspect, so that its longer side is at most `max_side`.
pub fn fit(width: usize, height: usize, max_side: usize) -> (usize, usize) {
    let longer = width.max(height);
    if longer <= max_side {
        return (width, height);
    }
    let scale = max_side as f64 / longer as f64;
    let shrink = |side: usize| ((side as f64 * scale).round() as usize).max(1);
    (shrink(width), shrink(height))
}

impl TargetMap {
    /// (min, max) of Grad-CAM's map (the raw map after ReLU) on the target layer's grid: the range that
    /// normalized heatmaps span. Upsampled values stay within it.
    pub fn cam_range(&self) -> (f32, f32) {
        self.raw.clone().relu().min_max().unwrap_or((0.0, 0.0))
    }

    /// The display map at `width x height`: the stored one when the size matches, else made from the raw map.
    pub fn heat_at(&self, width: usize, height: usize) -> std::borrow::Cow<'_, Map> {
        if (self.heat.width, self.heat.height) == (width, height) {
            std::borrow::Cow::Borrowed(&self.heat)
        } else {
            std::borrow::Cow::Owned(display(&self.raw, &self.variants, width, height))
        }
    }

    /// The same values as [`Self::heat_at`], made a row at a time where that saves holding a large map (one
    /// layer's map without `aug_smooth`, drawn larger than the stored one).
    pub fn heat_rows(&self, width: usize, height: usize) -> HeatRows<'_> {
        if self.variants.is_empty() && (self.heat.width, self.heat.height) != (width, height) {
            HeatRows::Made(cam::DisplayRows::new(&self.raw, width, height))
        } else {
            HeatRows::Held(self.heat_at(width, height))
        }
    }
}

/// A display map to be read row by row: held whole, or made a row at a time.
pub enum HeatRows<'a> {
    Held(std::borrow::Cow<'a, Map>),
    Made(cam::DisplayRows),
}

impl HeatRows<'_> {
    /// Row `y` into `out` (one value per pixel).
    pub fn row(&self, y: usize, out: &mut [f32]) {
        match self {
            Self::Held(map) => out.copy_from_slice(&map.data[y * map.width..][..map.width]),
            Self::Made(rows) => rows.row(y, out),
        }
    }
}

/// pytorch-grad-cam's picture of a map: [`cam::display_map`]; with `aug_smooth`, the mean of the copies' display
/// maps (not normalized again, as pytorch-grad-cam's `forward_augmentation_smoothing`).
fn display(raw: &Map, variants: &[Map], width: usize, height: usize) -> Map {
    if variants.is_empty() {
        cam::display_map(raw, width, height)
    } else {
        let maps: Vec<Map> = variants
            .iter()
            .map(|v| cam::display_map(v, width, height))
            .collect();
        Map::mean(&maps)
    }
}

/// A region found on a map of `map_size` moved to an image of `image_size` pixels.
fn scale_region(region: Region, map_size: (usize, usize), image_size: (usize, usize)) -> Region {
    if map_size == image_size {
        return region;
    }
    let (sx, sy) = (
        image_size.0 as f64 / map_size.0 as f64,
        image_size.1 as f64 / map_size.1 as f64,
    );
    Region {
        x_min: (region.x_min as f64 * sx).floor() as usize,
        y_min: (region.y_min as f64 * sy).floor() as usize,
        x_max: ((region.x_max as f64 * sx).ceil() as usize).min(image_size.0),
        y_max: ((region.y_max as f64 * sy).ceil() as usize).min(image_size.1),
        area: (region.area as f64 * sx * sy).round() as usize,
        ..region
    }
}

/// pytorch-grad-cam's Guided Grad-CAM before `deprocess_image`: the guided backpropagation `gradients` [3,H,W]
/// times the Grad-CAM map at the input size, per pixel; interleaved RGB (HWC) whatever the model's channel order.
fn guided_grad_cam(gradients: &[f32], mask: &Map, order: ChannelOrder) -> Vec<f32> {
    let plane = mask.data.len();
    let channels = match order {
        ChannelOrder::Rgb => [0, 1, 2],
        ChannelOrder::Bgr => [2, 1, 0],
    };
    mask.data
        .iter()
        .enumerate()
        .flat_map(|(i, m)| channels.map(|c| gradients[c * plane + i] * m))
        .collect()
}

/// The method's map for one seed row: of the model's target layer, or of the layers in `options.layers` combined
/// as pytorch-grad-cam combines several target layers (at the model's input size).
fn gradient_map(
    options: &ExplainOptions,
    output: &RunOutput,
    row: usize,
    input_size: (usize, usize),
) -> Map {
    let mut maps: Vec<Map> = options
        .layers
        .iter()
        .map(|&layer| {
            let (activations, gradients, shape) = match layer {
                0 => (
                    &output.activations,
                    output.gradient(row),
                    output.activation_shape,
                ),
                i => {
                    let extra = &output.extra_layers[i - 1];
                    (
                        &extra.activations,
                        extra.gradient(row),
                        extra.activation_shape,
                    )
                }
            };
            cam::compute(
                options.method,
                activations,
                gradients,
                shape,
                options.eigen_smooth,
            )
        })
        .collect();
    match maps.len() {
        1 => maps.remove(0),
        _ => cam::combine_layers(&maps, input_size.0, input_size.1),
    }
}

pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f32> = logits.iter().map(|&l| (l - max).exp()).collect();
    let sum: f32 = exp.iter().sum();
    exp.into_iter().map(|e| e / sum).collect()
}

/// Decodes (no finer than the model's input and `drawn_side` need) and preprocesses; returns the photo, its tensor
/// and how long that took.
fn prepare(
    model: &ServedModel,
    bytes: &[u8],
    limits: &Limits,
    drawn_side: Option<usize>,
) -> Result<(preprocess::Decoded, Arc<[f32]>, Duration), ExplainError> {
    let started = Instant::now();
    let p = &model.info.preprocess;
    let photo = preprocess::decode_at_least(bytes, &limits.decode_limits(), |width, height| {
        let drawn = drawn_side.map_or((0, 0), |side| fit(width, height, side));
        (p.width.max(drawn.0), p.height.max(drawn.1))
    })?;
    // Made in place where the Runs read it (an exact-size `collect` allocates once), not copied there afterwards.
    let mut tensor: Arc<[f32]> = std::iter::repeat_n(0.0, p.tensor_len()).collect();
    p.write_tensor(
        &photo.image,
        Arc::get_mut(&mut tensor).expect("a new tensor has one owner"),
    );
    Ok((photo, tensor, started.elapsed()))
}

/// What a request spent after decoding: its Runs (waits and inference, added up) and the CPU work around them.
struct Spent {
    runs: RunTimes,
    cpu: Duration,
}

impl Spent {
    fn add(&mut self, runs: RunTimes) {
        self.runs = self.runs.then(runs);
    }

    /// Does `work`, counting its time as CPU work.
    fn cpu<T>(&mut self, work: impl FnOnce() -> T) -> T {
        let started = Instant::now();
        let out = work();
        self.cpu += started.elapsed();
        out
    }
}

/// One Run of `images` images [images,3,H,W], each with the same K seed rows.
fn run(
    model: &ServedModel,
    inputs: Arc<[f32]>,
    images: usize,
    seeds: &[f32],
    k: usize,
    ticket: &Ticket,
) -> Result<(Vec<RunOutput>, RunTimes), ExplainError> {
    let (outputs, times) = model
        .runner
        .run(inputs, images, seeds.repeat(images), k, ticket)?;
    if outputs.len() != images {
        return Err(
            EngineError::Failed(format!("{} outputs for {images} images", outputs.len())).into(),
        );
    }
    Ok((outputs, times))
}

/// Class scores only: one Run with a single all-zero seed row.
pub fn predict(
    model: &ServedModel,
    bytes: &[u8],
    limits: &Limits,
    ticket: &Ticket,
) -> Result<(Vec<f32>, Timings), ExplainError> {
    let (_, tensor, decode) = prepare(model, bytes, limits, None)?;
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

/// Score-CAM's masked Runs for one image: the scored channels and the logits of the input masked by each.
fn score_cam_logits(
    model: &ServedModel,
    tensor: &[f32],
    output: &RunOutput,
    max_channels: usize,
    spent: &mut Spent,
    ticket: &Ticket,
) -> Result<(Vec<usize>, Vec<Vec<f32>>), ExplainError> {
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

pub fn explain(
    model: &ServedModel,
    bytes: &[u8],
    limits: &Limits,
    options: &ExplainOptions,
    ticket: &Ticket,
) -> Result<Explanation, ExplainError> {
    let (photo, tensor, decode) = prepare(model, bytes, limits, options.drawn_side)?;
    let classes = model.info.num_classes();
    let width = model.info.preprocess.width;
    // All targets ride in one Run: one seed row each; an all-zero row k means "the k-th best class".
    let (seeds, k) = seed_rows(&options.targets, classes);
    let (inputs, n): (Arc<[f32]>, usize) = if options.aug_smooth {
        (augmented(&tensor, width).into(), AUGMENTATIONS.len())
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
    let mut spent = Spent {
        runs: run_times,
        cpu: Duration::ZERO,
    };

    let mut scored = Vec::new();
    if options.method == CamMethod::ScoreCam {
        for (copy, output) in inputs.chunks_exact(tensor.len()).zip(&outputs) {
            scored.push(score_cam_logits(
                model,
                copy,
                output,
                options.max_channels,
                &mut spent,
                ticket,
            )?);
        }
    }

    let image_size = photo.size;
    let input_size = (width, model.info.preprocess.height);
    let channel_order = model.info.preprocess.channel_order;
    // The seed rows that get maps: all, or `BestOf`'s best.
    let rows: Vec<usize> = match &options.targets {
        Targets::BestOf(_, best) => {
            let (logits, resolved) = (&outputs[0].logits, &outputs[0].target_class);
            let mut rows: Vec<usize> = (0..k).collect();
            rows.sort_by(|&a, &b| logits[resolved[b]].total_cmp(&logits[resolved[a]]));
            rows.truncate(*best);
            rows
        }
        _ => (0..k).collect(),
    };
    let mut targets = spent.cpu(|| {
        let shape = outputs[0].activation_shape;
        let analysis_size = fit(image_size.0, image_size.1, ANALYSIS_SIDE);
        rows.iter()
            .map(|&row| {
                let class = outputs[0].target_class[row];
                let variants: Vec<Map> = outputs
                    .iter()
                    .zip(AUGMENTATIONS)
                    .enumerate()
                    .map(|(i, (output, (mirrored, _)))| {
                        let raw = match scored.get(i) {
                            Some((channels, logits)) => {
                                let scores: Vec<f32> = logits.iter().map(|l| l[class]).collect();
                                cam::score_cam(
                                    &output.activations,
                                    shape,
                                    channels,
                                    &scores,
                                    options.eigen_smooth,
                                )
                            }
                            None => gradient_map(options, output, row, input_size),
                        };
                        if mirrored {
                            raw.flipped_horizontally()
                        } else {
                            raw
                        }
                    })
                    .collect();
                let (raw, variants) = if variants.len() == 1 {
                    (variants.into_iter().next().expect("one map"), Vec::new())
                } else {
                    (Map::mean(&variants), variants)
                };
                let guided = options.guided.then(|| {
                    let gradients = outputs[0]
                        .input_gradients
                        .as_deref()
                        .expect("params::explain allows guided outputs only for guided models");
                    let block = 3 * input_size.0 * input_size.1;
                    let mask = match options.layers.len() {
                        1 => cam::display_map(&raw, input_size.0, input_size.1),
                        _ => raw.clone(),
                    };
                    guided_grad_cam(
                        &gradients[row * block..(row + 1) * block],
                        &mask,
                        channel_order,
                    )
                });
                let heat = display(&raw, &variants, analysis_size.0, analysis_size.1);
                let boxes = if options.max_boxes == 0 {
                    Vec::new()
                } else {
                    boxes::regions(&heat, options.threshold, options.max_boxes)
                }
                .into_iter()
                .map(|region| scale_region(region, analysis_size, image_size))
                .collect();
                TargetMap {
                    class,
                    raw,
                    variants,
                    heat,
                    boxes,
                    trust: None,
                    guided,
                }
            })
            .collect::<Vec<_>>()
    });

    let probabilities = softmax(&outputs[0].logits);
    if options.trust {
        trust(
            model,
            &tensor,
            &probabilities,
            &mut targets,
            &mut spent,
            ticket,
        )?;
    }
    Ok(Explanation {
        image: photo.image,
        photo_size: photo.size,
        logits: outputs.swap_remove(0).logits,
        probabilities,
        targets,
        timings: Timings {
            decode,
            queue: spent.runs.queue,
            inference: spent.runs.inference,
            batch_size: spent.runs.batch_size,
            maps: spent.cpu,
        },
    })
}

/// The trust figures of every target, from one Run of the perturbed inputs (two per target).
fn trust(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_by_hand() {
        // softmax([0, ln 3]) = [1/4, 3/4]
        let p = softmax(&[0.0, 3f32.ln()]);
        assert!(
            (p[0] - 0.25).abs() < 1e-6 && (p[1] - 0.75).abs() < 1e-6,
            "{p:?}"
        );
        // Large logits must not overflow.
        let p = softmax(&[1000.0, 1000.0]);
        assert_eq!(p, vec![0.5, 0.5]);
    }
}
