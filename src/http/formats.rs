//! `explain?format=...`: the explanation as the pre-annotation formats of labeling tools.
//!
//! - `labelstudio`: one Label Studio prediction: `rectanglelabels` in percent of the image and the thresholded
//!   map as `brushlabels` in Label Studio's RLE.
//! - `cvat`: CVAT's serverless detector answer, rectangles in pixels.
//! - `coco`: COCO results (`bbox` [x, y, w, h], `segmentation` as compressed RLE) with the categories.
//! - `fiftyone`: FiftyOne `Detections` (relative [x, y, w, h]) and each map as a grayscale PNG with its range.
//!
//! Every score is the class's probability. Masks are the map the boxes were cut from, at the same level
//! (`explain::Localization`).

use base64::Engine as _;
use serde_json::{Value, json};

use crate::explain::{Explanation, TargetMap};
use crate::http::canvas::Canvas;
use crate::http::params::{Format, HeatmapEncoding};
use crate::onnx::model::ModelInfo;
use crate::pipeline::boxes::Region;
use crate::pipeline::cam::Map;
use crate::pipeline::render::ImageFormat;

/// A Label Studio control tag (`from_name`) and what its regions say: per target of the explanation (by index),
/// the label they carry.
#[derive(Debug, Clone)]
pub struct LabelStudioControl {
    pub name: String,
    pub labels: Vec<(usize, String)>,
}

/// The tags a Label Studio prediction refers to: the image (`to_name`) and the two kinds of control.
#[derive(Debug, Clone)]
pub struct LabelStudioTags {
    pub image: String,
    pub rectangles: Option<LabelStudioControl>,
    pub brush: Option<LabelStudioControl>,
}

impl LabelStudioTags {
    /// The labeling config in the README (`<Image name="image">`, `<RectangleLabels name="label">`,
    /// `<BrushLabels name="mask">`), every target under the model's own label.
    fn readme(info: &ModelInfo, explanation: &Explanation) -> Self {
        let control = |name: &str| LabelStudioControl {
            name: name.into(),
            labels: (explanation.targets.iter().enumerate())
                .map(|(t, target)| (t, label(info, target).to_owned()))
                .collect(),
        };
        Self {
            image: "image".into(),
            rectangles: Some(control("label")),
            brush: Some(control("mask")),
        }
    }
}

/// What the formats need besides the explanation.
pub struct FormatOptions<'a> {
    pub model_version: &'a str,
    /// Longest side of FiftyOne's heatmap PNGs.
    pub max_side: usize,
    /// FiftyOne heatmaps: 16-bit unless 8 is asked for.
    pub gray8: bool,
}

pub fn encode(
    format: Format,
    info: &ModelInfo,
    explanation: &Explanation,
    options: &FormatOptions,
) -> Value {
    match format {
        Format::LabelStudio => label_studio(
            explanation,
            options,
            &LabelStudioTags::readme(info, explanation),
        ),
        Format::Cvat => cvat(info, explanation),
        Format::Coco => coco(info, explanation),
        Format::FiftyOne => fiftyone(info, explanation, options),
    }
}

/// A target's binarized map at image size, read from the analysis-size map by nearest neighbour: for photos
/// up to `explain::ANALYSIS_SIDE` that is the map the boxes were found on, pixel for pixel, and larger photos
/// cost no full-size map.
pub struct Mask<'a> {
    heat: &'a Map,
    cut: f32,
    pub width: usize,
    pub height: usize,
    /// Which map column each run of image columns reads, and how many columns read it ([`spans`]); rows likewise.
    columns: Vec<(usize, usize)>,
    rows: Vec<(usize, usize)>,
}

impl<'a> Mask<'a> {
    /// The pixels at or above `level`; none when there is no level (a map without a positive maximum has no
    /// region, as in `boxes::regions`).
    pub fn at_level(heat: &'a Map, level: Option<f32>, width: usize, height: usize) -> Self {
        let cut = level.unwrap_or(f32::INFINITY);
        Self {
            heat,
            cut,
            width,
            height,
            columns: spans(heat.width, width),
            rows: spans(heat.height, height),
        }
    }

    /// Whether the map's pixel `(mx, my)` is set.
    fn at(&self, mx: usize, my: usize) -> bool {
        self.heat.data[my * self.heat.width + mx] >= self.cut
    }

    /// The mask's rows, top to bottom, as `(runs of the row, how many equal rows in a row)`: the rows that read
    /// one map row are equal, so a photo-sized mask costs the map's size, not the photo's.
    fn rows(&self) -> impl Iterator<Item = (Vec<(bool, usize)>, usize)> + '_ {
        self.rows.iter().map(|&(my, count)| {
            let mut runs = Runs::default();
            for &(mx, length) in &self.columns {
                runs.push(self.at(mx, my), length);
            }
            (runs.runs, count)
        })
    }

    /// Every map column's runs `(set, length)` from image row `from` up to row `to`, as the image columns that read
    /// it see them; read row by row, as the map lies in memory.
    fn column_runs(&self, from: usize, to: usize) -> Vec<Vec<(bool, usize)>> {
        let mut columns: Vec<Runs> = (0..self.heat.width).map(|_| Runs::default()).collect();
        let mut start = 0;
        for &(my, length) in &self.rows {
            let (first, end) = (start.max(from), (start + length).min(to));
            start += length;
            if first < end {
                let row = &self.heat.data[my * self.heat.width..][..self.heat.width];
                for (runs, &value) in columns.iter_mut().zip(row) {
                    runs.push(value >= self.cut, end - first);
                }
            }
        }
        columns.into_iter().map(|runs| runs.runs).collect()
    }
}

/// Nearest-neighbour reading of `source` values over `target` pixels (pixel `t` reads `t * source / target`), as
/// `(source index, how many pixels in a row read it)`, leaving out the indices no pixel reads.
fn spans(source: usize, target: usize) -> Vec<(usize, usize)> {
    // The first pixel that reads index i is ceil(i * target / source).
    let first = |i: usize| (i * target).div_ceil(source);
    (0..source)
        .map(|i| (i, first(i + 1) - first(i)))
        .filter(|&(_, length)| length > 0)
        .collect()
}

/// The target's mask at the photo's size: where its boxes were cut; empty where none were asked (`max_boxes=0`).
fn mask_of<'a>(target: &'a TargetMap, explanation: &Explanation) -> Mask<'a> {
    static NO_MAP: std::sync::LazyLock<Map> =
        std::sync::LazyLock::new(|| Map::new(1, 1, vec![0.0]));
    let (width, height) = explanation.photo_size;
    match &target.localization.map {
        Some(map) => Mask::at_level(map, target.localization.level, width, height),
        None => Mask::at_level(&NO_MAP, None, width, height),
    }
}

fn label<'a>(info: &'a ModelInfo, target: &TargetMap) -> &'a str {
    &info.labels[target.class]
}

fn probability(explanation: &Explanation, target: &TargetMap) -> f32 {
    explanation.probabilities[target.class]
}

/// Percent of `whole`, as Label Studio places regions.
fn percent(part: usize, whole: usize) -> f64 {
    100.0 * part as f64 / whole as f64
}

/// One Label Studio prediction (`{"model_version", "score", "result": [...]}`) for the image; its score is the
/// best of its regions'.
pub fn label_studio(
    explanation: &Explanation,
    options: &FormatOptions,
    tags: &LabelStudioTags,
) -> Value {
    let (width, height) = explanation.photo_size;
    let mut result = Vec::new();
    let mut best = 0.0f32;
    let mut region = |id: String, from_name: &str, kind: &str, score: f32, value: Value| {
        best = best.max(score);
        result.push(json!({
            "id": id,
            "from_name": from_name,
            "to_name": tags.image,
            "type": kind,
            "original_width": width,
            "original_height": height,
            "image_rotation": 0,
            "value": value,
            "score": score,
        }));
    };
    if let Some(control) = &tags.rectangles {
        for (t, name) in &control.labels {
            let target = &explanation.targets[*t];
            for (b, r) in target.boxes.iter().enumerate() {
                let value = json!({
                    "x": percent(r.x_min, width),
                    "y": percent(r.y_min, height),
                    "width": percent(r.x_max - r.x_min, width),
                    "height": percent(r.y_max - r.y_min, height),
                    "rotation": 0,
                    "rectanglelabels": [name],
                });
                let score = probability(explanation, target);
                region(
                    format!("c{t}b{b}"),
                    &control.name,
                    "rectanglelabels",
                    score,
                    value,
                );
            }
        }
    }
    if let Some(control) = &tags.brush {
        for (t, name) in &control.labels {
            let target = &explanation.targets[*t];
            let mask = mask_of(target, explanation);
            let value = json!({ "format": "rle", "rle": brush_rle(&mask), "brushlabels": [name] });
            let score = probability(explanation, target);
            region(format!("c{t}m"), &control.name, "brushlabels", score, value);
        }
    }
    json!({ "model_version": options.model_version, "score": best, "result": result })
}

/// CVAT's serverless detector answer: `[{"label", "confidence", "points": [x1, y1, x2, y2], "type"}]`.
pub fn cvat(info: &ModelInfo, explanation: &Explanation) -> Value {
    let shapes: Vec<Value> = explanation
        .targets
        .iter()
        .flat_map(|target| {
            target.boxes.iter().map(move |r| {
                json!({
                    "label": label(info, target),
                    "confidence": probability(explanation, target),
                    "points": [r.x_min, r.y_min, r.x_max, r.y_max],
                    "type": "rectangle",
                })
            })
        })
        .collect();
    Value::Array(shapes)
}

/// COCO results for one image: an annotation per box, with the mask pixels inside that box as its segmentation.
/// Category ids are class index + 1 (COCO keeps 0 for "no category").
pub fn coco(info: &ModelInfo, explanation: &Explanation) -> Value {
    let (width, height) = explanation.photo_size;
    let mut annotations = Vec::new();
    for target in &explanation.targets {
        let mask = mask_of(target, explanation);
        for region in &target.boxes {
            let (counts, area) = coco_counts(&mask, region);
            annotations.push(json!({
                "id": annotations.len() + 1,
                "image_id": 1,
                "category_id": target.class + 1,
                "bbox": [region.x_min, region.y_min, region.x_max - region.x_min, region.y_max - region.y_min],
                "area": area,
                "segmentation": { "size": [height, width], "counts": coco_string(&counts) },
                "score": probability(explanation, target),
                "iscrowd": 0,
            }));
        }
    }
    let categories: Vec<Value> = info
        .labels
        .iter()
        .enumerate()
        .map(|(i, name)| json!({ "id": i + 1, "name": name }))
        .collect();
    json!({
        "images": [{ "id": 1, "width": width, "height": height }],
        "annotations": annotations,
        "categories": categories,
    })
}

/// FiftyOne `Detections` as `fo.Detections.from_dict` reads them, and one grayscale heatmap per class:
/// `png` spans `range` (FiftyOne's `Heatmap.range`), `map_range` is the raw map's [min, max] after ReLU.
pub fn fiftyone(info: &ModelInfo, explanation: &Explanation, options: &FormatOptions) -> Value {
    let (width, height) = explanation.photo_size;
    let mut detections = Vec::new();
    let mut heatmaps = Vec::new();
    let canvas = Canvas::new(explanation, options.max_side);
    for target in &explanation.targets {
        for r in &target.boxes {
            detections.push(json!({
                "_cls": "Detection",
                "label": label(info, target),
                "bounding_box": [
                    r.x_min as f64 / width as f64,
                    r.y_min as f64 / height as f64,
                    (r.x_max - r.x_min) as f64 / width as f64,
                    (r.y_max - r.y_min) as f64 / height as f64,
                ],
                "confidence": probability(explanation, target),
            }));
        }
        let (encoding, top) = if options.gray8 {
            (HeatmapEncoding::Gray8, 255)
        } else {
            (HeatmapEncoding::Gray16, 65535)
        };
        let png = canvas.heatmap(target, encoding, ImageFormat::Png);
        let (min, max) = target.cam_range();
        heatmaps.push(json!({
            "class": target.class,
            "label": label(info, target),
            "png": base64::engine::general_purpose::STANDARD.encode(png),
            "range": [0, top],
            "map_range": [min, max],
        }));
    }
    json!({
        "image": { "width": width, "height": height },
        "detections": { "_cls": "Detections", "detections": detections },
        "heatmaps": heatmaps,
    })
}

/// pycocotools' uncompressed counts of the mask inside `region`, column-major, starting with a run of zeros;
/// and the number of pixels set.
pub fn coco_counts(mask: &Mask, region: &Region) -> (Vec<u32>, usize) {
    let mut runs = Runs::default();
    let mut area = 0;
    let mut x = 0;
    let columns = mask.column_runs(region.y_min, region.y_max);
    // The columns that read one map column are equal: each map column is read once, whatever the photo's width.
    for &(mx, count) in &mask.columns {
        let before = (x + count).min(region.x_min).saturating_sub(x);
        let within = (x + count)
            .min(region.x_max)
            .saturating_sub(x.max(region.x_min));
        runs.push(false, before * mask.height);
        if within > 0 {
            for _ in 0..within {
                runs.push(false, region.y_min);
                for &(on, length) in &columns[mx] {
                    runs.push(on, length);
                    area += if on { length } else { 0 };
                }
                runs.push(false, mask.height - region.y_max);
            }
        }
        runs.push(false, (count - before - within) * mask.height);
        x += count;
    }
    let counts = runs.finish().into_iter().map(|(_, n)| n as u32).collect();
    (counts, area)
}

/// Run lengths of a sequence of bits, given in pieces: equal neighbours merge, and the first run counts the
/// leading zeros (possibly none).
#[derive(Default)]
struct Runs {
    runs: Vec<(bool, usize)>,
}

impl Runs {
    fn push(&mut self, on: bool, length: usize) {
        match self.runs.last_mut() {
            _ if length == 0 => {}
            Some((last, n)) if *last == on => *n += length,
            None if on => self.runs.extend([(false, 0), (true, length)]),
            _ => self.runs.push((on, length)),
        }
    }

    fn finish(mut self) -> Vec<(bool, usize)> {
        if self.runs.is_empty() {
            self.runs.push((false, 0));
        }
        self.runs
    }
}

/// pycocotools' compressed RLE string (`rleToString` in maskApi.c): each count, from the third on, as the
/// difference to the count two before, in 5-bit groups with a continuation bit, offset by 48 into ASCII.
pub fn coco_string(counts: &[u32]) -> String {
    let mut out = String::new();
    for (i, &count) in counts.iter().enumerate() {
        let mut x = i64::from(count);
        if i > 2 {
            x -= i64::from(counts[i - 2]);
        }
        loop {
            let mut c = (x & 0x1f) as u8;
            x >>= 5; // arithmetic: negative differences end at -1
            let more = if c & 0x10 != 0 { x != -1 } else { x != 0 };
            if more {
                c |= 0x20;
            }
            out.push(char::from(c + 48));
            if !more {
                break;
            }
        }
    }
    out
}

/// Label Studio's brush RLE: the mask as RGBA bytes (255 where set, else 0), row-major, packed with
/// thi.ng's rle-pack as Label Studio's editor reads it: a 32-bit value count, a 5-bit word size - 1, four 4-bit
/// run-length widths - 1, then per run a repeat bit, a 2-bit width index, the run length - 1 and the value.
pub fn brush_rle(mask: &Mask) -> Vec<u8> {
    let mut bits = BitWriter::default();
    let values = mask.width * mask.height * 4;
    bits.write(values as u64, 32);
    bits.write(8 - 1, 5);
    for width in RUN_WIDTHS {
        bits.write(u64::from(width) - 1, 4);
    }
    let mut emit = |value: bool, mut length: usize| {
        while length > 0 {
            let take = length.min(1 << RUN_WIDTHS[3]);
            let index = RUN_WIDTHS
                .iter()
                .position(|&w| take - 1 < 1 << w)
                .expect("the widest run width fits");
            bits.write(1, 1);
            bits.write(index as u64, 2);
            bits.write((take - 1) as u64, RUN_WIDTHS[index]);
            bits.write(if value { 255 } else { 0 }, 8);
            length -= take;
        }
    };
    let mut runs = Runs::default();
    for (row, count) in mask.rows() {
        for _ in 0..count {
            for &(on, length) in &row {
                runs.push(on, length);
            }
        }
    }
    for (on, length) in runs.finish() {
        emit(on, length * 4);
    }
    bits.finish()
}

/// Bit widths of run lengths: short runs cost few bits, and no run is longer than 2^16 values.
const RUN_WIDTHS: [u32; 4] = [4, 8, 12, 16];

/// Bits, most significant first, into bytes; the last byte is padded with zeros.
#[derive(Default)]
struct BitWriter {
    bytes: Vec<u8>,
    /// The bits not yet in `bytes` are its lowest `pending`.
    bits: u64,
    pending: u32,
}

impl BitWriter {
    /// The lowest `width` (at most 32) bits of `value`.
    fn write(&mut self, value: u64, width: u32) {
        debug_assert!(width <= 32);
        self.bits = (self.bits << width) | (value & ((1 << width) - 1));
        self.pending += width;
        while self.pending >= 8 {
            self.pending -= 8;
            self.bytes.push((self.bits >> self.pending) as u8);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        if self.pending > 0 {
            self.bytes.push((self.bits << (8 - self.pending)) as u8);
        }
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::boxes::Threshold;

    fn map(width: usize, height: usize, data: &[f32]) -> Map {
        Map::new(width, height, data.to_vec())
    }

    #[test]
    fn runs_read_by_span_equal_runs_read_pixel_by_pixel() {
        // A 7 x 5 map read over 23 x 17 pixels (enlarged) and over 5 x 3 (shrunk), each pixel reading map pixel
        // (x * 7 / width, y * 5 / height).
        let heat = map(
            7,
            5,
            &(0..35).map(|i| ((i * 13) % 7) as f32).collect::<Vec<_>>(),
        );
        for (width, height) in [(23, 17), (5, 3), (7, 5)] {
            let mask = Mask::at_level(&heat, Threshold::Fraction(0.5).level(&heat), width, height);
            let pixel = |x: usize, y: usize| mask.at(x * 7 / width, y * 5 / height);
            let mut rows = Runs::default();
            for (row, count) in mask.rows() {
                for _ in 0..count {
                    for &(on, length) in &row {
                        rows.push(on, length);
                    }
                }
            }
            let mut by_pixel = Runs::default();
            for y in 0..height {
                for x in 0..width {
                    by_pixel.push(pixel(x, y), 1);
                }
            }
            assert_eq!(rows.finish(), by_pixel.finish(), "{width} x {height}");

            let region = Region {
                x_min: 1,
                y_min: 1,
                x_max: width - 1,
                y_max: height - 1,
                area: 0,
                mean: 0.0,
                peak: 0.0,
            };
            let mut counts = Vec::new();
            let (mut current, mut run, mut area) = (false, 0u32, 0);
            for x in 0..width {
                for y in 0..height {
                    let on =
                        (1..width - 1).contains(&x) && (1..height - 1).contains(&y) && pixel(x, y);
                    area += usize::from(on);
                    if on != current {
                        counts.push(run);
                        (run, current) = (0, on);
                    }
                    run += 1;
                }
            }
            counts.push(run);
            assert_eq!(
                coco_counts(&mask, &region),
                (counts, area),
                "{width} x {height}"
            );
        }
    }

    #[test]
    fn brush_rle_bits_by_hand() {
        // One pixel off, one on: 8 RGBA values, two runs of 4.
        let heat = map(2, 1, &[0.0, 1.0]);
        let mask = Mask::at_level(&heat, Threshold::Fraction(0.5).level(&heat), 2, 1);
        let expected = concat!(
            "00000000000000000000000000001000", // 8 values
            "00111",                            // word size 8
            "0011",
            "0111",
            "1011",
            "1111", // run widths 4, 8, 12, 16
            "1",
            "00",
            "0011",
            "00000000", // repeat, width 4, 4 values, 0
            "1",
            "00",
            "0011",
            "11111111", // repeat, width 4, 4 values, 255
        );
        let mut padded = expected.to_owned();
        while !padded.len().is_multiple_of(8) {
            padded.push('0');
        }
        let bytes: Vec<u8> = padded
            .as_bytes()
            .chunks(8)
            .map(|c| u8::from_str_radix(std::str::from_utf8(c).unwrap(), 2).unwrap())
            .collect();
        assert_eq!(brush_rle(&mask), bytes);
    }

    #[test]
    fn brush_rle_splits_runs_longer_than_the_widest_width() {
        // 20000 pixels set = 80000 values: one run of 65536 and one of 14464, both with the 16-bit width.
        let heat = map(200, 100, &[1.0; 20_000]);
        let rle = brush_rle(&Mask::at_level(
            &heat,
            Threshold::Fraction(0.5).level(&heat),
            200,
            100,
        ));
        // 32 + 5 + 16 header bits, then 2 runs of 1 + 2 + 16 + 8 bits: 107 bits in 14 bytes.
        assert_eq!(rle.len(), 14);
        assert_eq!(u32::from_be_bytes(rle[..4].try_into().unwrap()), 80_000);
    }

    #[test]
    fn coco_rle_equals_pycocotools() {
        // A 4x3 mask (rows): 0110 / 0111 / 0000. pycocotools 2.0.11 `mask.encode(np.asfortranarray(m))` gives
        // counts b"32101OO" (column-major runs 3,2,1,2,2,1,1, zeros first), `area` 5.
        let heat = map(4, 3, &[0., 1., 1., 0., 0., 1., 1., 1., 0., 0., 0., 0.]);
        let mask = Mask::at_level(&heat, Threshold::Fraction(0.5).level(&heat), 4, 3);
        let everything = Region {
            x_min: 0,
            y_min: 0,
            x_max: 4,
            y_max: 3,
            area: 5,
            mean: 1.0,
            peak: 1.0,
        };
        let (counts, area) = coco_counts(&mask, &everything);
        assert_eq!((counts.as_slice(), area), (&[3, 2, 1, 2, 2, 1, 1][..], 5));
        assert_eq!(coco_string(&counts), "32101OO");
        // Only column 3 of the box: the pixel at (3, 1).
        let right = Region {
            x_min: 3,
            ..everything
        };
        assert_eq!(coco_counts(&mask, &right), (vec![10, 1, 1], 1));
    }

    #[test]
    fn coco_string_of_long_and_decreasing_runs() {
        // pycocotools 2.0.11 `mask.frPyObjects({"size": [1, n], "counts": c}, 1, n)["counts"]`.
        assert_eq!(coco_string(&[0, 31, 9]), "0o09");
        assert_eq!(coco_string(&[16, 70, 14]), "`0V2>");
    }
}
