//! From one seed row's Run outputs to a target's maps and boxes: the method's raw map (per layer, per augmented
//! copy), pytorch-grad-cam's display map, Guided Grad-CAM, and boxes in the photo's pixels.

use std::borrow::Cow;

use crate::explain::{AUGMENTATIONS, ExplainOptions, Localization, TargetMap};
use crate::onnx::model::ModelInfo;
use crate::onnx::session::RunOutput;
use crate::pipeline::boxes::{self, Region};
use crate::pipeline::cam::{self, Map};
use crate::pipeline::preprocess::ChannelOrder;

/// Boxes are found on the display map at most this many pixels on its longer side, then scaled to image pixels:
/// the map (7x7 for most models) holds no finer detail, and a 40-megapixel photo then costs what a small one
/// does, in time and in memory. At 512 a box edge on a 4000 px photo is placed to within 8 px (0.2%); at 1024
/// finding the boxes of a 12-megapixel photo took 8 ms instead of 2.
pub const ANALYSIS_SIDE: usize = 512;

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

/// Score-CAM's scored channels and the logits of the input masked by each, for one image (copy).
pub type ScoreCamLogits = (Vec<usize>, Vec<Vec<f32>>);

/// The target map of seed row `row`: its class, raw map (the mean of the augmented copies' with `aug_smooth`),
/// Guided Grad-CAM when asked and, where the request wants boxes and no localization Run will give them
/// (`own_boxes`), its boxes in the photo's pixels, cut on its display map at the analysis size.
pub fn target_map(
    info: &ModelInfo,
    options: &ExplainOptions,
    outputs: &[RunOutput],
    scored: &[ScoreCamLogits],
    row: usize,
    photo_size: (usize, usize),
    own_boxes: bool,
) -> TargetMap {
    let class = outputs[0].target_class[row];
    let input_size = (info.preprocess.width, info.preprocess.height);
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
                        output.activation_shape,
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
            .expect("ExplainOptions::check allows guided outputs only for guided models");
        let block = 3 * input_size.0 * input_size.1;
        let mask = match options.layers.len() {
            1 => cam::display_map(&raw, input_size.0, input_size.1),
            _ => raw.clone(),
        };
        guided_grad_cam(
            &gradients[row * block..(row + 1) * block],
            &mask,
            info.preprocess.channel_order,
        )
    });
    let mut target = TargetMap {
        class,
        raw,
        variants,
        boxes: Vec::new(),
        localization: Localization {
            map: None,
            level: None,
            input_size,
            own_run: false,
        },
        trust: None,
        guided,
    };
    if own_boxes && options.max_boxes > 0 {
        let analysis_size = fit(photo_size.0, photo_size.1, ANALYSIS_SIDE);
        let heat = display(
            &target.raw,
            &target.variants,
            analysis_size.0,
            analysis_size.1,
        );
        let (boxes, level) = locate(&heat, options, photo_size);
        target.boxes = boxes;
        target.localization.map = Some(heat);
        target.localization.level = level;
    }
    target
}

/// Boxes from the localization Run's outputs (seed row `row` is the target's class), which ran at `input_size`.
pub fn relocate(
    target: &mut TargetMap,
    options: &ExplainOptions,
    output: &RunOutput,
    row: usize,
    input_size: (usize, usize),
    photo_size: (usize, usize),
) {
    let raw = gradient_map(options, output, row, input_size);
    let analysis_size = fit(photo_size.0, photo_size.1, ANALYSIS_SIDE);
    let map = cam::display_map(&raw, analysis_size.0, analysis_size.1);
    let (boxes, level) = locate(&map, options, photo_size);
    target.boxes = boxes;
    target.localization = Localization {
        map: Some(map),
        level,
        input_size,
        own_run: true,
    };
}

/// The boxes of a display map at the analysis size, in the photo's pixels, and the level they were cut at.
fn locate(
    map: &Map,
    options: &ExplainOptions,
    photo_size: (usize, usize),
) -> (Vec<Region>, Option<f32>) {
    let level = options.threshold.level(map);
    let boxes = match level {
        Some(level) => boxes::regions_at(map, level, options.max_boxes),
        None => Vec::new(),
    };
    let analysis_size = (map.width, map.height);
    let boxes = boxes
        .into_iter()
        .map(|region| scale_region(region, analysis_size, photo_size))
        .collect();
    (boxes, level)
}

impl TargetMap {
    /// (min, max) of Grad-CAM's map (the raw map after ReLU) on the target layer's grid: the range that
    /// normalized heatmaps span. Upsampled values stay within it.
    pub fn cam_range(&self) -> (f32, f32) {
        self.raw.clone().relu().min_max().unwrap_or((0.0, 0.0))
    }

    /// The display map at `width x height`: the one the boxes were cut on when it is the target's own and of that
    /// size, else made from the raw map.
    pub fn heat_at(&self, width: usize, height: usize) -> Cow<'_, Map> {
        match self.own_heat(width, height) {
            Some(heat) => Cow::Borrowed(heat),
            None => Cow::Owned(display(&self.raw, &self.variants, width, height)),
        }
    }

    /// The same values as [`Self::heat_at`], made a row at a time where that saves holding a large map (one
    /// layer's map without `aug_smooth`, none held at that size).
    pub fn heat_rows(&self, width: usize, height: usize) -> HeatRows<'_> {
        if self.variants.is_empty() && self.own_heat(width, height).is_none() {
            HeatRows::Made(cam::DisplayRows::new(&self.raw, width, height))
        } else {
            HeatRows::Held(self.heat_at(width, height))
        }
    }

    /// The target's own display map at `width x height`, if its boxes were cut on one of that size.
    fn own_heat(&self, width: usize, height: usize) -> Option<&Map> {
        let localization = &self.localization;
        localization
            .map
            .as_ref()
            .filter(|map| !localization.own_run && (map.width, map.height) == (width, height))
    }
}

/// A display map to be read row by row: held whole, or made a row at a time.
pub enum HeatRows<'a> {
    Held(Cow<'a, Map>),
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
pub fn display(raw: &Map, variants: &[Map], width: usize, height: usize) -> Map {
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
