//! One request through the pipeline, behind `POST /explain`, `POST /predict`, the Label Studio backend and
//! `camserve explain`: check the request against the model (`request`), bytes -> image -> tensor -> one Run
//! (`runs`) -> a map and boxes per target class (`maps`). Options add Runs, each one batch: `aug_smooth` puts its
//! augmented copies into the first Run; Score-CAM scores masked inputs, and the trust score perturbed ones, in
//! Runs of their own. It blocks: callers run it on a blocking thread, never on the async runtime.

mod maps;
mod request;
mod runs;

pub use maps::{ANALYSIS_SIDE, HeatRows, fit};
pub use request::{RequestError, resolve_class, resolve_layers};
pub use runs::predict;

use std::time::Duration;

use image::RgbImage;

use crate::config::Limits;
use crate::engine::{EngineError, Ticket};
use crate::onnx::model::ModelInfo;
use crate::onnx::session::RunOutput;
use crate::pipeline::boxes::{Region, Threshold};
use crate::pipeline::cam::{CamMethod, Map};
use crate::pipeline::preprocess::DecodeError;
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
    /// The longer side of the localization Run that boxes and labeling masks come from: a second Run at the
    /// photo's aspect ratio (docs/localization.md). `None`, or a model of a fixed input size, Score-CAM,
    /// `aug_smooth` or several layers: they come from the target Run's maps.
    pub box_side: Option<usize>,
    /// Where an output draws the photo (an overlay), the longest side it is drawn at; `None` where no output shows
    /// the photo's pixels. A JPEG is decoded only as finely as this and the model's input need.
    pub drawn_side: Option<usize>,
}

/// The default longer side of the localization Run: on both localization sets the best of the sides measured
/// with Otsu's threshold (docs/localization.md).
pub const BOX_SIDE: usize = 320;

/// Score-CAM's default channel budget: on the default model (1280 channels) the smallest tried whose picture is
/// within about 0.06 of all channels', for 64 masked images' worth of Runs (docs/methods.md has the measurement).
pub const DEFAULT_SCORE_CAM_CHANNELS: usize = 64;

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
            box_side: Some(BOX_SIDE),
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
    #[error(transparent)]
    Request(#[from] RequestError),
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
    /// In original-image pixels.
    pub boxes: Vec<Region>,
    /// How the boxes were made.
    pub localization: Localization,
    pub trust: Option<Trust>,
    /// Guided Grad-CAM when asked for: guided backpropagation times the Grad-CAM map, at the model's input size,
    /// RGB pixels interleaved (HWC), as pytorch-grad-cam computes `cam_mask * gb`.
    pub guided: Option<Vec<f32>>,
}

/// Where a target's boxes (and labeling masks) were cut: which map, at which level.
pub struct Localization {
    /// The display map (pytorch-grad-cam's: ReLU, min-max normalized, upsampled) the boxes were cut on, at the
    /// analysis size: the localization Run's, or the target's own; `None` where the request wants no boxes.
    pub map: Option<Map>,
    /// Pixels at or above it are in a box; `None` when the map has no positive maximum.
    pub level: Option<f32>,
    /// (width, height) of the input of the Run whose map it is.
    pub input_size: (usize, usize),
    /// Whether that was the localization Run (else the target Run).
    pub own_run: bool,
}

/// Explains one photo: checks the request against the model, decodes, runs, and makes each target's maps and
/// boxes.
pub fn explain_image(
    model: &ServedModel,
    bytes: &[u8],
    limits: &Limits,
    options: &ExplainOptions,
    ticket: &Ticket,
) -> Result<Explanation, ExplainError> {
    options.check(&model.info, limits)?;
    let localization = localization_plan(&model.info, options);
    let prepared = runs::prepare(model, bytes, limits, options.drawn_side, localization)?;
    let (photo_size, tensor) = (prepared.photo.size, prepared.tensor.clone());
    let input_size = (model.info.preprocess.width, model.info.preprocess.height);
    let localization_size = localization
        .map(|(side, stride)| runs::localization_size(photo_size, input_size, side, stride))
        .filter(|&size| size != input_size);
    let runs::TargetRuns {
        inputs,
        mut outputs,
        mut spent,
    } = runs::target_runs(model, &tensor, options, ticket)?;
    let scored = match options.method {
        CamMethod::ScoreCam => runs::score_cam_runs(
            model,
            &inputs,
            &outputs,
            options.max_channels,
            &mut spent,
            ticket,
        )?,
        _ => Vec::new(),
    };
    let rows = mapped_rows(&options.targets, &outputs[0]);
    let own_boxes = localization_size.is_none();
    let mut targets = spent.cpu(|| {
        rows.iter()
            .map(|&row| {
                maps::target_map(
                    &model.info,
                    options,
                    &outputs,
                    &scored,
                    row,
                    photo_size,
                    own_boxes,
                )
            })
            .collect::<Vec<_>>()
    });
    if let Some(size) = localization_size {
        let classes: Vec<usize> = targets.iter().map(|t| t.class).collect();
        let located = runs::localization_run(
            model,
            prepared.analysis(),
            size,
            &classes,
            &mut spent,
            ticket,
        )?;
        spent.cpu(|| {
            for (row, target) in targets.iter_mut().enumerate() {
                maps::relocate(target, options, &located, row, size, photo_size);
            }
        });
    }
    let probabilities = softmax(&outputs[0].logits);
    if options.trust {
        runs::trust(
            model,
            &tensor,
            &probabilities,
            &mut targets,
            &mut spent,
            ticket,
        )?;
    }
    Ok(Explanation {
        image: prepared.photo.image,
        photo_size,
        logits: outputs.swap_remove(0).logits,
        probabilities,
        targets,
        timings: Timings {
            decode: prepared.took,
            queue: spent.runs.queue,
            inference: spent.runs.inference,
            batch_size: spent.runs.batch_size,
            maps: spent.cpu,
        },
    })
}

/// The localization Run's (longer side, model stride), when the request has one: it asks for boxes or masks
/// (`box_side`), the model runs at other sizes, and the method's map comes from one layer's gradients without
/// augmentation (Score-CAM's masked Runs and `aug_smooth`'s copies would multiply its cost).
fn localization_plan(info: &ModelInfo, options: &ExplainOptions) -> Option<(usize, usize)> {
    let plain_gradients =
        options.method != CamMethod::ScoreCam && !options.aug_smooth && options.layers == [0];
    match (options.box_side, info.stride) {
        (Some(side), Some(stride)) if plain_gradients && options.max_boxes > 0 => {
            Some((side, stride))
        }
        _ => None,
    }
}

/// The seed rows that get maps: all, or `BestOf`'s best-scoring.
fn mapped_rows(targets: &Targets, first: &RunOutput) -> Vec<usize> {
    let k = first.target_class.len();
    match targets {
        Targets::BestOf(_, best) => {
            let (logits, resolved) = (&first.logits, &first.target_class);
            let mut rows: Vec<usize> = (0..k).collect();
            rows.sort_by(|&a, &b| logits[resolved[b]].total_cmp(&logits[resolved[a]]));
            rows.truncate(*best);
            rows
        }
        _ => (0..k).collect(),
    }
}

pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f32> = logits.iter().map(|&l| (l - max).exp()).collect();
    let sum: f32 = exp.iter().sum();
    exp.into_iter().map(|e| e / sum).collect()
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
