//! The one pipeline behind `POST /explain`, `POST /predict` and `camserve explain`: bytes -> image -> tensor ->
//! one Run -> a map and boxes per target class. CPU-heavy steps run on blocking threads, never on the async runtime.

use std::sync::Arc;
use std::time::{Duration, Instant};

use image::RgbImage;

use crate::boxes::{self, Region};
use crate::cam::{self, CamMethod, Map};
use crate::config::Limits;
use crate::engine::EngineError;
use crate::preprocess::{self, ChannelOrder, DecodeError};
use crate::registry::Model;

/// Which classes to explain.
#[derive(Debug, Clone, PartialEq)]
pub enum Targets {
    /// The model's k best classes.
    TopK(usize),
    /// These class indices, in this order.
    Classes(Vec<usize>),
}

#[derive(Debug, Clone)]
pub struct ExplainOptions {
    pub targets: Targets,
    pub method: CamMethod,
    /// Fraction of the map's maximum at which it is binarized for boxes (the Grad-CAM paper uses 0.15).
    pub threshold: f32,
    pub max_boxes: usize,
    /// The target layers whose maps are combined: 0 is the model's target layer, i its `extra_layers[i - 1]`.
    pub layers: Vec<usize>,
    /// Also compute Guided Grad-CAM (the model must have `input_gradients`).
    pub guided: bool,
}

impl Default for ExplainOptions {
    fn default() -> Self {
        Self {
            targets: Targets::TopK(1),
            method: CamMethod::GradCam,
            threshold: 0.15,
            max_boxes: 1,
            layers: vec![0],
            guided: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("{0} panicked")]
    Panicked(&'static str),
}

/// Everything one request computed: the scores, and per target class its map and boxes.
pub struct Explanation {
    pub image: RgbImage,
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
    /// The method's map on the target layer's grid, before ReLU and normalization. With several layers: their
    /// combined map at the model's input size, pytorch-grad-cam's output (after ReLU, in [0, 1]).
    pub raw: Map,
    /// pytorch-grad-cam's display map (ReLU, min-max normalized, upsampled) at the analysis size.
    pub heat: Map,
    /// In original-image pixels.
    pub boxes: Vec<Region>,
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
            std::borrow::Cow::Owned(cam::display_map(&self.raw, width, height))
        }
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

/// Class indices by descending score.
pub fn ranked(scores: &[f32]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    order
}

pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f32> = logits.iter().map(|&l| (l - max).exp()).collect();
    let sum: f32 = exp.iter().sum();
    exp.into_iter().map(|e| e / sum).collect()
}

/// Decodes and preprocesses on a blocking thread.
async fn prepare(
    model: &Arc<Model>,
    bytes: Vec<u8>,
    limits: &Limits,
) -> Result<(RgbImage, Vec<f32>, Duration), ExplainError> {
    let model = model.clone();
    let limits = limits.clone();
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let image = preprocess::decode(&bytes, &limits.decode_limits())?;
        let p = &model.info.preprocess;
        let mut tensor = vec![0.0f32; 3 * p.height * p.width];
        p.write_tensor(&image, &mut tensor);
        Ok((image, tensor, started.elapsed()))
    })
    .await
    .map_err(|_| ExplainError::Panicked("preprocessing"))?
}

/// Class scores only: one Run with a single all-zero seed row.
pub async fn predict(
    model: &Arc<Model>,
    bytes: Vec<u8>,
    limits: &Limits,
) -> Result<(Vec<f32>, Timings), ExplainError> {
    let (_, tensor, decode) = prepare(model, bytes, limits).await?;
    let seeds = vec![0.0; model.info.num_classes()];
    let (output, run) = model.runner.run(tensor, seeds, 1).await?;
    let timings = Timings {
        decode,
        queue: run.queue,
        inference: run.inference,
        batch_size: run.batch_size,
        maps: Duration::ZERO,
    };
    Ok((output.logits, timings))
}

pub async fn explain(
    model: &Arc<Model>,
    bytes: Vec<u8>,
    limits: &Limits,
    options: &ExplainOptions,
) -> Result<Explanation, ExplainError> {
    let (image, tensor, decode) = prepare(model, bytes, limits).await?;
    let classes = model.info.num_classes();
    // All targets ride in one Run: one seed row each; an all-zero row k means "the k-th best class".
    let (seeds, k) = match &options.targets {
        Targets::TopK(k) => (vec![0.0; k * classes], *k),
        Targets::Classes(list) => {
            let mut seeds = vec![0.0; list.len() * classes];
            for (row, &class) in list.iter().enumerate() {
                seeds[row * classes + class] = 1.0;
            }
            (seeds, list.len())
        }
    };
    let (output, run) = model.runner.run(tensor, seeds, k).await?;
    let options = options.clone();
    let preprocess = model.info.preprocess.clone();
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let input_size = (preprocess.width, preprocess.height);
        let targets = (0..k)
            .map(|row| {
                let mut maps: Vec<Map> = options
                    .layers
                    .iter()
                    .map(|&layer| {
                        let (activations, gradients, [channels, height, width]) = match layer {
                            0 => (
                                &output.activations,
                                output.gradient(row),
                                output.activation_shape,
                            ),
                            i => {
                                let l = &output.extra_layers[i - 1];
                                (&l.activations, l.gradient(row), l.activation_shape)
                            }
                        };
                        cam::compute(
                            options.method,
                            activations,
                            gradients,
                            channels,
                            height,
                            width,
                        )
                    })
                    .collect();
                let raw = match maps.len() {
                    1 => maps.remove(0),
                    _ => cam::combine_layers(&maps, input_size.0, input_size.1),
                };
                let guided = options.guided.then(|| {
                    let gradients = output
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
                        preprocess.channel_order,
                    )
                });
                let image_size = (image.width() as usize, image.height() as usize);
                let analysis_size = fit(image_size.0, image_size.1, ANALYSIS_SIDE);
                let heat = cam::display_map(&raw, analysis_size.0, analysis_size.1);
                let boxes = if options.max_boxes == 0 {
                    Vec::new()
                } else {
                    boxes::regions(&heat, options.threshold, options.max_boxes)
                }
                .into_iter()
                .map(|region| scale_region(region, analysis_size, image_size))
                .collect();
                TargetMap {
                    class: output.target_class[row],
                    raw,
                    heat,
                    boxes,
                    guided,
                }
            })
            .collect();
        let timings = Timings {
            decode,
            queue: run.queue,
            inference: run.inference,
            batch_size: run.batch_size,
            maps: started.elapsed(),
        };
        Explanation {
            image,
            probabilities: softmax(&output.logits),
            logits: output.logits,
            targets,
            timings,
        }
    })
    .await
    .map_err(|_| ExplainError::Panicked("mapping"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranking_and_softmax_by_hand() {
        assert_eq!(ranked(&[0.5, 2.0, -1.0, 1.0]), vec![1, 3, 0, 2]);
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
