//! Class activation maps from one image's target-layer activations and gradients.
//!
//! Formulas follow pytorch-grad-cam (jacobgil/pytorch-grad-cam), so maps can be compared with it.

use crate::pipeline::bands;

/// A single-channel map, row-major: `data[y * width + x]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Map {
    pub width: usize,
    pub height: usize,
    pub data: Vec<f32>,
}

impl Map {
    /// # Panics
    /// If `data.len() != width * height`.
    pub fn new(width: usize, height: usize, data: Vec<f32>) -> Map {
        assert_eq!(
            data.len(),
            width * height,
            "map data is not {width}x{height}"
        );
        Map {
            width,
            height,
            data,
        }
    }

    /// Smallest and largest value, ignoring NaN; `None` when there is no such value.
    pub fn min_max(&self) -> Option<(f32, f32)> {
        // min and max ignore NaN and are associative: the bands' ranges combine to the whole map's.
        let (min, max) = bands::map(&self.data, 1, range_of)
            .into_iter()
            .fold(EMPTY_RANGE, union);
        (min <= max).then_some((min, max))
    }

    /// Min-max scaled to [0, 1] as pytorch-grad-cam's `scale_cam_image`:
    /// `(x - min) / (1e-7 + max - min)`, so a constant map becomes all zeros.
    pub fn normalized(mut self) -> Map {
        if let Some((min, max)) = self.min_max() {
            let scale = 1e-7 + (max - min);
            bands::for_each_mut(&mut self.data, self.width, |_, band| {
                band.iter_mut().for_each(|v| *v = (*v - min) / scale);
            });
        }
        self
    }

    /// Negative values set to zero (NaN stays NaN).
    pub fn relu(mut self) -> Map {
        self.data
            .iter_mut()
            .for_each(|v| *v = if *v < 0.0 { 0.0 } else { *v });
        self
    }

    /// Bilinear resize with OpenCV's `cv2.resize(..., INTER_LINEAR)` conventions on float32:
    /// pixel centres at +0.5, `src = (dst + 0.5) * scale - 0.5`, clamped to the border pixels;
    /// rows are interpolated first, then columns, in f32 as OpenCV does.
    ///
    /// # Panics
    /// If the map is empty and the target is not.
    pub fn resize_bilinear(&self, width: usize, height: usize) -> Map {
        if width == self.width && height == self.height {
            return self.clone();
        }
        if width == 0 || height == 0 {
            return Map::new(width, height, Vec::new());
        }
        assert!(!self.data.is_empty(), "cannot resize an empty map");
        let xs = taps(self.width, width);
        let ys = taps(self.height, height);

        let mut rows = Vec::with_capacity(self.height * width);
        for row in self.data.chunks_exact(self.width) {
            rows.extend(
                xs.iter()
                    .map(|t| row[t.first] * t.first_weight + row[t.second] * t.second_weight),
            );
        }
        let mut data = vec![0.0; width * height];
        bands::for_each_mut(&mut data, width, |first_row, band| {
            for (out, t) in band.chunks_exact_mut(width).zip(&ys[first_row..]) {
                t.mix_rows(&rows, width, out);
            }
        });
        Map::new(width, height, data)
    }
}

impl Map {
    /// Bilinear resize with aligned corners, as torch's `UpsamplingBilinear2d` (`align_corners=True`): the
    /// corner pixels of source and target coincide, `src = dst * (src_size - 1) / (dst_size - 1)`, in f32.
    pub fn resize_bilinear_aligned(&self, width: usize, height: usize) -> Map {
        if width == 0 || height == 0 || self.data.is_empty() {
            return Map::new(width, height, vec![0.0; width * height]);
        }
        let taps = |src: usize, dst: usize| -> Vec<Tap> {
            let scale = if dst > 1 {
                (src - 1) as f32 / (dst - 1) as f32
            } else {
                0.0
            };
            (0..dst)
                .map(|d| {
                    let pos = scale * d as f32;
                    let first = (pos as usize).min(src - 1);
                    let frac = pos - first as f32;
                    Tap {
                        first,
                        second: (first + 1).min(src - 1),
                        first_weight: 1.0 - frac,
                        second_weight: frac,
                    }
                })
                .collect()
        };
        let (xs, ys) = (taps(self.width, width), taps(self.height, height));
        let mut data = Vec::with_capacity(width * height);
        for ty in &ys {
            let (r0, r1) = (
                &self.data[ty.first * self.width..][..self.width],
                &self.data[ty.second * self.width..][..self.width],
            );
            data.extend(xs.iter().map(|tx| {
                ty.first_weight
                    * (tx.first_weight * r0[tx.first] + tx.second_weight * r0[tx.second])
                    + ty.second_weight
                        * (tx.first_weight * r1[tx.first] + tx.second_weight * r1[tx.second])
            }));
        }
        Map::new(width, height, data)
    }

    /// Mirrored left to right.
    pub fn flipped_horizontally(&self) -> Map {
        let data = self
            .data
            .chunks_exact(self.width.max(1))
            .flat_map(|row| row.iter().rev().copied())
            .collect();
        Map::new(self.width, self.height, data)
    }

    /// The pixel-wise mean of maps of one size.
    ///
    /// # Panics
    /// If `maps` is empty or their sizes differ.
    pub fn mean(maps: &[Map]) -> Map {
        let first = &maps[0];
        let mut data = vec![0.0f32; first.data.len()];
        for map in maps {
            assert_eq!(
                (map.width, map.height),
                (first.width, first.height),
                "maps differ in size"
            );
            data.iter_mut().zip(&map.data).for_each(|(d, v)| *d += v);
        }
        let n = maps.len() as f32;
        data.iter_mut().for_each(|d| *d /= n);
        Map::new(first.width, first.height, data)
    }
}

/// The two source samples, and their weights, behind one destination sample.
struct Tap {
    first: usize,
    second: usize,
    first_weight: f32,
    second_weight: f32,
}

impl Tap {
    /// Row `out` of a resize down the columns: rows `first` and `second` of `rows` (each `width` long), weighed.
    fn mix_rows(&self, rows: &[f32], width: usize, out: &mut [f32]) {
        let first = &rows[self.first * width..][..width];
        let second = &rows[self.second * width..][..width];
        for ((o, a), b) in out.iter_mut().zip(first).zip(second) {
            *o = a * self.first_weight + b * self.second_weight;
        }
    }
}

/// (min, max) of `values`, ignoring NaN; [`EMPTY_RANGE`] for none.
fn range_of(values: &[f32]) -> (f32, f32) {
    values
        .iter()
        .fold(EMPTY_RANGE, |(lo, hi), &v| (lo.min(v), hi.max(v)))
}

/// The range of no values: `min > max`.
const EMPTY_RANGE: (f32, f32) = (f32::INFINITY, f32::NEG_INFINITY);

fn union((lo, hi): (f32, f32), (other_lo, other_hi): (f32, f32)) -> (f32, f32) {
    (lo.min(other_lo), hi.max(other_hi))
}

fn taps(src: usize, dst: usize) -> Vec<Tap> {
    // OpenCV derives the scale as 1 / (dst / src); kept so that rounding matches.
    let scale = 1.0 / (dst as f64 / src as f64);
    (0..dst)
        .map(|d| {
            let pos = ((d as f64 + 0.5) * scale - 0.5) as f32;
            let floor = pos.floor();
            let (first, frac) = if floor < 0.0 {
                (0, 0.0)
            } else if floor as usize >= src - 1 {
                (src - 1, 0.0)
            } else {
                (floor as usize, pos - floor)
            };
            Tap {
                first,
                second: (first + 1).min(src - 1),
                first_weight: 1.0 - frac,
                second_weight: frac,
            }
        })
        .collect()
}

/// max |actual - expected| / max |expected|: how far two maps (or score vectors) are apart, relative to the
/// expected one's scale. Infinite when the lengths differ or `actual` holds NaN or infinity.
pub fn relative_difference(actual: &[f32], expected: &[f32]) -> f32 {
    if actual.len() != expected.len() || actual.iter().any(|v| !v.is_finite()) {
        return f32::INFINITY;
    }
    let scale = expected
        .iter()
        .fold(0.0f32, |m, v| m.max(v.abs()))
        .max(1e-12);
    actual
        .iter()
        .zip(expected)
        .fold(0.0f32, |m, (a, e)| m.max((a - e).abs()))
        / scale
}

/// A CAM method. Names and formulas are pytorch-grad-cam's. All but Score-CAM need only one Run's activations
/// and gradients; Score-CAM scores masked copies of the input with more Runs (see [`score_cam`]).
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CamMethod {
    /// Channel weights are the spatial mean of the gradients.
    GradCam,
    /// Channel weights from second- and third-order gradient terms (Chattopadhyay et al.).
    GradCamPlusPlus,
    /// Channel weights are the gradients averaged with the activations as weights.
    XGradCam,
    /// No channel weights: the sum over channels of gradient times activation, per pixel.
    HiResCam,
    /// As HiResCAM, with negative products of gradient and activation set to zero.
    GradCamElementWise,
    /// As HiResCAM, with negative gradients set to zero.
    LayerCam,
    /// The first principal component of the activations (no gradients).
    EigenCam,
    /// The first principal component of gradient times activation.
    EigenGradCam,
    /// Channel weights are the softmax of the target's logits on the input masked by each channel.
    ScoreCam,
}

impl CamMethod {
    pub const ALL: [CamMethod; 9] = [
        Self::GradCam,
        Self::GradCamPlusPlus,
        Self::XGradCam,
        Self::HiResCam,
        Self::GradCamElementWise,
        Self::LayerCam,
        Self::EigenCam,
        Self::EigenGradCam,
        Self::ScoreCam,
    ];

    /// The name clients use, as in pytorch-grad-cam.
    pub fn name(self) -> &'static str {
        match self {
            Self::GradCam => "gradcam",
            Self::GradCamPlusPlus => "gradcampp",
            Self::XGradCam => "xgradcam",
            Self::HiResCam => "hirescam",
            Self::GradCamElementWise => "gradcam_elementwise",
            Self::LayerCam => "layercam",
            Self::EigenCam => "eigencam",
            Self::EigenGradCam => "eigengradcam",
            Self::ScoreCam => "scorecam",
        }
    }
}

/// The map of one image for one target, BEFORE ReLU: raw maps (with their sign and range) are
/// part of the API; see [`compute_relu`] for the usual picture.
///
/// `activations` and `gradients` are `[channels, height, width]`, row-major. With `eigen_smooth`, the map is
/// the first principal component of the method's weighted activations instead of their sum over channels, as
/// pytorch-grad-cam's `eigen_smooth=True` (Eigen-CAM and Eigen-Grad-CAM always take it).
///
/// # Panics
/// If a slice's length is not `channels * height * width`, or for [`CamMethod::ScoreCam`], whose channel
/// weights come from more Runs: use [`score_cam`].
pub fn compute(
    method: CamMethod,
    activations: &[f32],
    gradients: &[f32],
    shape: [usize; 3],
    eigen_smooth: bool,
) -> Map {
    let [channels, height, width] = shape;
    let plane = height * width;
    assert_eq!(
        activations.len(),
        channels * plane,
        "activations are not [{channels},{height},{width}]"
    );
    assert_eq!(
        gradients.len(),
        channels * plane,
        "gradients are not [{channels},{height},{width}]"
    );
    if plane == 0 {
        return Map::new(width, height, Vec::new());
    }
    let mut weighted = Vec::with_capacity(activations.len());
    for (a, g) in activations
        .chunks_exact(plane)
        .zip(gradients.chunks_exact(plane))
    {
        match method {
            CamMethod::GradCam => scale(&mut weighted, a, mean(g)),
            CamMethod::GradCamPlusPlus => scale(&mut weighted, a, grad_cam_plus_plus_weight(a, g)),
            CamMethod::XGradCam => scale(&mut weighted, a, x_grad_cam_weight(a, g)),
            CamMethod::HiResCam | CamMethod::EigenGradCam => {
                weighted.extend(a.iter().zip(g).map(|(a, g)| a * g))
            }
            CamMethod::GradCamElementWise => {
                weighted.extend(a.iter().zip(g).map(|(a, g)| (a * g).max(0.0)))
            }
            CamMethod::LayerCam => weighted.extend(a.iter().zip(g).map(|(a, g)| g.max(0.0) * a)),
            CamMethod::EigenCam => weighted.extend_from_slice(a),
            CamMethod::ScoreCam => {
                panic!("Score-CAM's weights come from masked Runs: use cam::score_cam")
            }
        }
    }
    let project = eigen_smooth || matches!(method, CamMethod::EigenCam | CamMethod::EigenGradCam);
    reduce(&weighted, shape, project)
}

/// [`compute`] followed by ReLU, as pytorch-grad-cam does before scaling.
pub fn compute_relu(
    method: CamMethod,
    activations: &[f32],
    gradients: &[f32],
    shape: [usize; 3],
    eigen_smooth: bool,
) -> Map {
    compute(method, activations, gradients, shape, eigen_smooth).relu()
}

/// Score-CAM's map from the target's logits on the masked inputs of the `scored` channels (see
/// [`score_cam_masks`]): channel weights are the softmax of those logits, 0 for channels not scored.
///
/// # Panics
/// If `activations` is not `shape`, or `scored` and `logits` differ in length.
pub fn score_cam(
    activations: &[f32],
    shape: [usize; 3],
    scored: &[usize],
    logits: &[f32],
    eigen_smooth: bool,
) -> Map {
    let [channels, height, width] = shape;
    let plane = height * width;
    assert_eq!(
        activations.len(),
        channels * plane,
        "activations are not {shape:?}"
    );
    assert_eq!(scored.len(), logits.len(), "one logit per scored channel");
    let mut weights = vec![0.0f32; channels];
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f64> = logits.iter().map(|&l| f64::from(l - max).exp()).collect();
    let total: f64 = exp.iter().sum();
    for (&channel, e) in scored.iter().zip(&exp) {
        weights[channel] = (e / total) as f32;
    }
    let mut weighted = Vec::with_capacity(activations.len());
    for (a, &w) in activations.chunks_exact(plane.max(1)).zip(&weights) {
        scale(&mut weighted, a, w);
    }
    reduce(&weighted, shape, eigen_smooth)
}

/// The channels Score-CAM scores with a budget of `max_channels`: those of largest mean activation, in
/// descending order (ties: the lower index first); every channel when the budget covers them all.
pub fn score_cam_channels(
    activations: &[f32],
    shape: [usize; 3],
    max_channels: usize,
) -> Vec<usize> {
    let plane = (shape[1] * shape[2]).max(1);
    let means: Vec<f64> = activations
        .chunks_exact(plane)
        .map(|a| a.iter().map(|&v| f64::from(v)).sum::<f64>() / plane as f64)
        .collect();
    let mut order: Vec<usize> = (0..means.len()).collect();
    order.sort_by(|&a, &b| means[b].total_cmp(&means[a]).then(a.cmp(&b)));
    order.truncate(max_channels);
    order
}

/// Score-CAM's mask of one channel, `[height, width]` of the input: the channel upsampled bilinearly with
/// aligned corners (torch's `UpsamplingBilinear2d`, as pytorch-grad-cam does) and min-max scaled,
/// `(x - min) / (max - min + 1e-8)`.
pub fn score_cam_mask(channel: &Map, width: usize, height: usize) -> Map {
    let up = channel.resize_bilinear_aligned(width, height);
    let (min, max) = up.min_max().unwrap_or((0.0, 0.0));
    let scale = max - min + 1e-8;
    Map::new(
        width,
        height,
        up.data.iter().map(|v| (v - min) / scale).collect(),
    )
}

/// `out += a * weight`, one channel.
fn scale(out: &mut Vec<f32>, activations: &[f32], weight: f32) {
    out.extend(activations.iter().map(|a| a * weight));
}

/// A [channels, h, w] tensor to one map: the sum over channels, or its first principal component.
fn reduce(weighted: &[f32], shape: [usize; 3], project: bool) -> Map {
    let [channels, height, width] = shape;
    let plane = height * width;
    let sum_over_channels = || {
        let mut map = vec![0.0f32; plane];
        for channel in weighted.chunks_exact(plane) {
            map.iter_mut().zip(channel).for_each(|(m, v)| *m += v);
        }
        map
    };
    let data = if project {
        principal_projection(weighted, channels, plane, &sum_over_channels())
    } else {
        sum_over_channels()
    };
    Map::new(width, height, data)
}

/// pytorch-grad-cam's `get_2d_projection` for one image: the pixels x channels matrix X (NaN set to 0, each
/// channel centred on its mean over pixels) projected on its first right-singular vector, i.e. `U[:,0] * S[0]`.
/// That vector comes from the smaller of the two Gram matrices X Xᵀ (pixels) or Xᵀ X (channels), by Jacobi.
///
/// An SVD's sign is arbitrary (LAPACK returns either). camserve's is the one whose projection correlates
/// positively with `channel_sum`, the unsmoothed map; on a tie, or where the channel sum is flat (its range
/// within 1e-5 x channels x the largest |value|: a LayerNorm's output, whose channels sum to a constant, so that
/// the correlation's sign would be rounding noise), the one whose entry of largest magnitude is positive.
fn principal_projection(
    weighted: &[f32],
    channels: usize,
    plane: usize,
    channel_sum: &[f32],
) -> Vec<f32> {
    // x[c * plane + p], centred per channel, in f64.
    let mut x: Vec<f64> = weighted
        .iter()
        .map(|&v| if v.is_nan() { 0.0 } else { f64::from(v) })
        .collect();
    for channel in x.chunks_exact_mut(plane) {
        let mean = channel.iter().sum::<f64>() / plane as f64;
        channel.iter_mut().for_each(|v| *v -= mean);
    }
    let mut projection = vec![0.0f64; plane];
    if plane <= channels {
        // Gram X Xᵀ (pixels x pixels) = U S² Uᵀ: the projection is U[:,0] * S[0].
        let mut gram = vec![0.0f64; plane * plane];
        for channel in x.chunks_exact(plane) {
            for p in 0..plane {
                for q in p..plane {
                    gram[p * plane + q] += channel[p] * channel[q];
                }
            }
        }
        mirror(&mut gram, plane);
        let (value, vector) = top_eigenvector(gram, plane);
        let singular = value.max(0.0).sqrt();
        projection
            .iter_mut()
            .zip(&vector)
            .for_each(|(p, u)| *p = u * singular);
    } else {
        // Gram Xᵀ X (channels x channels) = V S² Vᵀ: the projection is X V[:,0].
        let mut gram = vec![0.0f64; channels * channels];
        for c in 0..channels {
            for d in c..channels {
                let (a, b) = (&x[c * plane..][..plane], &x[d * plane..][..plane]);
                gram[c * channels + d] = a.iter().zip(b).map(|(a, b)| a * b).sum();
            }
        }
        mirror(&mut gram, channels);
        let (_, vector) = top_eigenvector(gram, channels);
        for (channel, v) in x.chunks_exact(plane).zip(&vector) {
            projection
                .iter_mut()
                .zip(channel)
                .for_each(|(p, x)| *p += x * v);
        }
    }
    let (least, most) = range_of(weighted);
    let largest = f64::from(most.max(-least).max(0.0));
    let (low, high) = range_of(channel_sum);
    let flat = f64::from(high) - f64::from(low) <= 1e-5 * channels as f64 * largest;
    let mut score: f64 = if flat {
        0.0
    } else {
        projection
            .iter()
            .zip(channel_sum)
            .map(|(p, s)| p * f64::from(*s))
            .sum()
    };
    if score == 0.0 {
        score =
            projection.iter().copied().fold(
                0.0f64,
                |best, p| if p.abs() > best.abs() { p } else { best },
            );
    }
    let sign = if score < 0.0 { -1.0 } else { 1.0 };
    projection.iter().map(|p| (sign * p) as f32).collect()
}

/// Copies the upper triangle of an n x n matrix onto the lower one.
fn mirror(matrix: &mut [f64], n: usize) {
    for p in 0..n {
        for q in 0..p {
            matrix[p * n + q] = matrix[q * n + p];
        }
    }
}

/// The largest eigenvalue of a symmetric n x n matrix and a unit eigenvector for it, by cyclic Jacobi
/// rotations (Golub and Van Loan, Matrix Computations, 8.5): robust to close eigenvalues, where power
/// iteration is slow, and small enough for the matrices here (at most min(pixels, channels) on a side).
fn top_eigenvector(mut a: Vec<f64>, n: usize) -> (f64, Vec<f64>) {
    let mut v = vec![0.0f64; n * n];
    (0..n).for_each(|i| v[i * n + i] = 1.0);
    let total: f64 = a.iter().map(|x| x * x).sum();
    for _sweep in 0..64 {
        let off: f64 = (0..n)
            .flat_map(|p| (p + 1..n).map(move |q| (p, q)))
            .map(|(p, q)| a[p * n + q] * a[p * n + q])
            .sum();
        if off <= 1e-30 * total {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = a[p * n + q];
                if apq == 0.0 {
                    continue;
                }
                let theta = (a[q * n + q] - a[p * n + p]) / (2.0 * apq);
                let t = if theta >= 0.0 { 1.0 } else { -1.0 } / (theta.abs() + theta.hypot(1.0));
                let c = 1.0 / t.hypot(1.0);
                let s = t * c;
                // A <- Jᵀ A J and V <- V J, J the rotation in the (p, q) plane.
                for k in 0..n {
                    let (akp, akq) = (a[k * n + p], a[k * n + q]);
                    a[k * n + p] = c * akp - s * akq;
                    a[k * n + q] = s * akp + c * akq;
                }
                for k in 0..n {
                    let (apk, aqk) = (a[p * n + k], a[q * n + k]);
                    a[p * n + k] = c * apk - s * aqk;
                    a[q * n + k] = s * apk + c * aqk;
                }
                for k in 0..n {
                    let (vkp, vkq) = (v[k * n + p], v[k * n + q]);
                    v[k * n + p] = c * vkp - s * vkq;
                    v[k * n + q] = s * vkp + c * vkq;
                }
            }
        }
    }
    let top = (0..n)
        .max_by(|&i, &j| a[i * n + i].total_cmp(&a[j * n + j]))
        .unwrap_or(0);
    (a[top * n + top], (0..n).map(|k| v[k * n + top]).collect())
}

/// The map pytorch-grad-cam returns for one target layer, at image size: ReLU, min-max,
/// bilinear resize, then min-max again (resizing can lower the peak below 1).
pub fn display_map(raw: &Map, width: usize, height: usize) -> Map {
    DisplayRows::new(raw, width, height).map()
}

/// [`display_map`] a row at a time, with the same f32 arithmetic and so the same values, without holding the
/// picture: a photo-sized map is 48 MB of f32 for a 12-megapixel photo, which an overlay reads once.
pub struct DisplayRows {
    /// The normalized raw map resized across (its height x `width`); a row of the picture mixes two of these.
    across: Map,
    ys: Vec<Tap>,
    /// The resized map's min and `1e-7 + max - min`, as [`Map::normalized`] scales.
    min: f32,
    scale: f32,
}

impl DisplayRows {
    pub fn new(raw: &Map, width: usize, height: usize) -> DisplayRows {
        let small = raw.clone().relu().normalized();
        let across = small.resize_bilinear(width, small.height);
        let ys = taps(small.height, height);
        let mut rows = DisplayRows {
            across,
            ys,
            min: 0.0,
            scale: 1.0,
        };
        // pytorch-grad-cam's ReLU after the resize is left out: bilinear weights are non-negative, so the resized
        // map already is. Its min and max come from a pass that stores nothing.
        let (min, max) = bands::map(&rows.ys, width, |ys| {
            let mut row = vec![0.0; width];
            ys.iter().fold(EMPTY_RANGE, |range, t| {
                t.mix_rows(&rows.across.data, width, &mut row);
                union(range, range_of(&row))
            })
        })
        .into_iter()
        .fold(EMPTY_RANGE, union);
        if min <= max {
            (rows.min, rows.scale) = (min, 1e-7 + (max - min));
        }
        rows
    }

    pub fn width(&self) -> usize {
        self.across.width
    }

    pub fn height(&self) -> usize {
        self.ys.len()
    }

    /// Row `y` of the display map into `out` (`width` values).
    pub fn row(&self, y: usize, out: &mut [f32]) {
        self.ys[y].mix_rows(&self.across.data, self.width(), out);
        out.iter_mut()
            .for_each(|v| *v = (*v - self.min) / self.scale);
    }

    /// The whole display map.
    pub fn map(&self) -> Map {
        let width = self.width();
        let mut data = vec![0.0; width * self.height()];
        bands::for_each_mut(&mut data, width, |first_row, band| {
            for (i, row) in band.chunks_exact_mut(width).enumerate() {
                self.row(first_row + i, row);
            }
        });
        Map::new(width, self.height(), data)
    }
}

/// Several target layers' raw maps combined as pytorch-grad-cam combines several `target_layers`: per layer ReLU,
/// min-max and a bilinear resize to `width x height` (the model's input size); then max(0), the mean over the
/// layers, and min-max again.
///
/// # Panics
/// If `raws` is empty.
pub fn combine_layers(raws: &[Map], width: usize, height: usize) -> Map {
    assert!(!raws.is_empty(), "no layer to combine");
    let upsampled: Vec<Map> = raws
        .iter()
        .map(|raw| {
            raw.clone()
                .relu()
                .normalized()
                .resize_bilinear(width, height)
                .relu()
        })
        .collect();
    Map::mean(&upsampled).normalized()
}

fn mean(values: &[f32]) -> f32 {
    sum(values.iter().copied()) / values.len() as f32
}

/// Sum in f64: maps are small, and the result then hardly depends on summation order.
fn sum(values: impl Iterator<Item = f32>) -> f32 {
    values.map(f64::from).sum::<f64>() as f32
}

/// pytorch-grad-cam's GradCAMPlusPlus weight: `sum(relu(g) * a_ij)` with
/// `a_ij = g^2 / (2 g^2 + sum(A) g^3 + 1e-6)`, and `a_ij = 0` where `g == 0`.
fn grad_cam_plus_plus_weight(activations: &[f32], gradients: &[f32]) -> f32 {
    let activation_sum = sum(activations.iter().copied());
    sum(gradients.iter().filter(|&&g| g != 0.0).map(|&g| {
        let g2 = g * g;
        g.max(0.0) * (g2 / (2.0 * g2 + activation_sum * g2 * g + 1e-6))
    }))
}

/// pytorch-grad-cam's XGradCAM weight: `sum(g * A / (sum(A) + 1e-7))`.
fn x_grad_cam_weight(activations: &[f32], gradients: &[f32]) -> f32 {
    let activation_sum = sum(activations.iter().copied());
    sum(activations
        .iter()
        .zip(gradients)
        .map(|(a, g)| g * a / (activation_sum + 1e-7)))
}

#[cfg(test)]
// Reference values are pasted as Python printed them (float64 repr of float32 results).
#[allow(clippy::excessive_precision)]
mod tests {
    use super::*;

    #[test]
    fn relative_difference_by_hand() {
        // max |[1, 2] - [1, 4]| = 2, max |[1, 4]| = 4.
        assert_eq!(relative_difference(&[1.0, 2.0], &[1.0, 4.0]), 0.5);
        assert_eq!(
            relative_difference(&[f32::NAN, 4.0], &[1.0, 4.0]),
            f32::INFINITY
        );
        assert_eq!(relative_difference(&[1.0], &[1.0, 4.0]), f32::INFINITY);
    }

    fn assert_close(got: &[f32], want: &[f32], tolerance: f32) {
        assert_eq!(got.len(), want.len(), "length");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= tolerance, "index {i}: got {g}, want {w}");
        }
    }

    // cv2.resize reference input, 3 rows x 4 columns.
    fn small() -> Map {
        Map::new(4, 3, vec![1., 5., 2., 8., 0., 3., 9., 4., 7., 2., 6., 1.])
    }

    // 5 rows x 7 columns.
    fn wide() -> Map {
        #[rustfmt::skip]
        let data = vec![
            3., 1., 4., 1., 5., 9., 2.,
            6., 5., 3., 5., 8., 9., 7.,
            9., 3., 2., 3., 8., 4., 6.,
            2., 6., 4., 3., 3., 8., 3.,
            2., 7., 9., 5., 0., 2., 8.,
        ];
        Map::new(7, 5, data)
    }

    #[test]
    fn resize_up_matches_opencv() {
        // cv2.resize(a, (7, 5), interpolation=cv2.INTER_LINEAR), a = small() as float32,
        // OpenCV 4 (opencv-python-headless), printed with .tolist().
        #[rustfmt::skip]
        let want = [
            1.0, 2.4285714626312256, 4.714285850524902, 3.5, 2.4285714626312256, 5.857142925262451, 8.0,
            0.6000000238418579, 1.8857142925262451, 3.942857265472412, 4.5, 4.914285659790039, 5.828571319580078, 6.400000095367432,
            0.0, 1.0714285373687744, 2.7857141494750977, 6.0, 8.642857551574707, 5.785714149475098, 4.0,
            4.200000286102295, 3.557143211364746, 2.528571367263794, 4.800000190734863, 6.842857360839844, 3.9857141971588135, 2.1999998092651367,
            7.0, 5.214285850524902, 2.357142925262451, 4.0, 5.642857074737549, 2.7857143878936768, 1.0,
        ];
        let got = small().resize_bilinear(7, 5);
        assert_eq!((got.width, got.height), (7, 5));
        assert_close(&got.data, &want, 1e-5);
    }

    #[test]
    fn resize_down_matches_opencv() {
        // cv2.resize(b, (3, 2)) and cv2.resize(b, (4, 3)), INTER_LINEAR, b = wide() as float32.
        let want_3x2 = [
            4.4166669845581055,
            4.0,
            7.916666507720947,
            4.833333492279053,
            3.5,
            5.75,
        ];
        assert_close(&wide().resize_bilinear(3, 2).data, &want_3x2, 1e-5);
        #[rustfmt::skip]
        let want_4x3 = [
            3.375, 3.5, 5.541666507720947, 5.666666507720947,
            6.75, 2.125, 7.375, 5.25,
            3.75, 6.958333492279053, 1.4166666269302368, 5.458333492279053,
        ];
        assert_close(&wide().resize_bilinear(4, 3).data, &want_4x3, 1e-5);
    }

    #[test]
    fn resize_by_half_matches_opencv() {
        // OpenCV switches to INTER_AREA for exact 2x reductions; bilinear at half-pixel centres
        // averages the same pixel pairs. cv2.resize(b[:4, :6], (3, 2)).
        let top_left = Map::new(
            6,
            4,
            (0..4)
                .flat_map(|y| wide().data[y * 7..y * 7 + 6].to_vec())
                .collect(),
        );
        assert_close(
            &top_left.resize_bilinear(3, 2).data,
            &[3.75, 3.25, 7.75, 5.0, 3.0, 5.75],
            1e-6,
        );
    }

    #[test]
    fn resize_to_same_size_and_to_empty() {
        assert_eq!(small().resize_bilinear(4, 3), small());
        assert_eq!(small().resize_bilinear(0, 3).data, Vec::<f32>::new());
    }

    #[test]
    fn min_max_ignores_nan_and_empty_has_none() {
        let map = Map::new(3, 1, vec![2.0, f32::NAN, -1.0]);
        assert_eq!(map.min_max(), Some((-1.0, 2.0)));
        assert_eq!(Map::new(0, 0, vec![]).min_max(), None);
        assert_eq!(Map::new(1, 1, vec![f32::NAN]).min_max(), None);
    }

    #[test]
    fn normalized_and_relu() {
        // (x - (-2)) / (1e-7 + 4): -2 -> 0, 0 -> 0.5, 2 -> 1 - 2.5e-8 (rounds to 1.0 in f32).
        let map = Map::new(3, 1, vec![-2.0, 0.0, 2.0]);
        assert_close(&map.clone().normalized().data, &[0.0, 0.5, 1.0], 1e-7);
        assert_eq!(map.relu().data, vec![0.0, 0.0, 2.0]);
        // A constant map has range 0: the 1e-7 keeps it finite (all zeros), as in pytorch-grad-cam.
        assert_eq!(
            Map::new(2, 1, vec![3.0, 3.0]).normalized().data,
            vec![0.0, 0.0]
        );
    }

    // Two channels of 2x3. By hand: Grad-CAM weights are the gradient means,
    // w0 = (0.5 - 1 + 0.5 + 1 + 0 + 2) / 6 = 0.5 and w1 = (2 + 0 + 1 - 1 + 3 + 1) / 6 = 1,
    // so the map is 0.5 * A0 + A1 = [[0.5, 2, -1.5], [4, 2.5, -2]].
    const ACTIVATIONS: [f32; 12] = [1., 2., 3., 4., 5., 6., 0., 1., -3., 2., 0., -5.];
    const GRADIENTS: [f32; 12] = [0.5, -1., 0.5, 1., 0., 2., 2., 0., 1., -1., 3., 1.];
    const SHAPE: [usize; 3] = [2, 2, 3];

    #[test]
    fn grad_cam_by_hand() {
        let map = compute(CamMethod::GradCam, &ACTIVATIONS, &GRADIENTS, SHAPE, false);
        assert_eq!((map.width, map.height), (3, 2));
        assert_close(&map.data, &[0.5, 2.0, -1.5, 4.0, 2.5, -2.0], 1e-6);
        let positive = compute_relu(CamMethod::GradCam, &ACTIVATIONS, &GRADIENTS, SHAPE, false);
        assert_close(&positive.data, &[0.5, 2.0, 0.0, 4.0, 2.5, 0.0], 1e-6);
    }

    #[test]
    fn other_methods_match_pytorch_grad_cam_formulas() {
        // Each method's formula from pytorch-grad-cam, applied in numpy (float32) to the arrays
        // above with shape [1, 2, 2, 3], e.g. HiResCAM: (G * A).sum(axis=1).
        // HiResCAM and LayerCAM by hand, pixel (0, 2): 0.5 * 3 + 1 * -3 = -1.5.
        #[rustfmt::skip]
        let cases = [
            (CamMethod::GradCamPlusPlus, [0.16893278062343597, -0.8095705509185791, 3.9491066932678223, -1.6191411018371582, 0.8446639180183411, 6.750777244567871]),
            (CamMethod::XGradCam, [0.761904776096344, 3.5238094329833984, -3.7142856121063232, 7.047618865966797, 3.809523820877075, -5.4285712242126465]),
            (CamMethod::HiResCam, [0.5, -2.0, -1.5, 2.0, 0.0, 7.0]),
            (CamMethod::LayerCam, [0.5, 0.0, -1.5, 4.0, 0.0, 7.0]),
            // relu(G * A).sum(axis=1); pixel (0, 2): relu(0.5 * 3) + relu(1 * -3) = 1.5.
            (CamMethod::GradCamElementWise, [0.5, 0.0, 1.5, 4.0, 0.0, 12.0]),
        ];
        for (method, want) in cases {
            let map = compute(method, &ACTIVATIONS, &GRADIENTS, SHAPE, false);
            let close = map
                .data
                .iter()
                .zip(want)
                .all(|(g, w)| (g - w).abs() <= 1e-5 * w.abs().max(1.0));
            assert!(close, "{method:?}: got {:?}, want {want:?}", map.data);
        }
    }

    fn assert_relative(got: &[f32], want: &[f32], what: &str) {
        let error = relative_difference(got, want);
        assert!(error < 1e-5, "{what}: got {got:?}, want {want:?} ({error})");
    }

    #[test]
    fn principal_components_match_pytorch_grad_cam() {
        // pytorch-grad-cam's get_2d_projection on [1, 2, 2, 3] arrays (numpy's LAPACK SVD), then camserve's
        // orientation (projection . channel sum > 0). LAPACK's sign was the opposite for Eigen-CAM and for
        // Grad-CAM with eigen_smooth; the values below have camserve's sign.
        // Eigen-CAM: the activations; Eigen-Grad-CAM: G * A; Grad-CAM smoothed: mean_hw(G) * A.
        #[rustfmt::skip]
        let cases = [
            (CamMethod::EigenCam, false, [1.8612319231033325, 2.309998035430908, -1.7159568071365356, 2.3125860691070557, 0.0765196904540062, -4.84437894821167]),
            (CamMethod::EigenGradCam, false, [-2.618717908859253, -4.954178333282471, -0.6141596436500549, 1.364509105682373, -3.0858099460601807, 9.908355712890625]),
            (CamMethod::GradCam, true, [1.0442063808441162, 1.938193678855896, -2.086581230163574, 2.7424161434173584, 0.685146152973175, -4.323380947113037]),
        ];
        for (method, eigen_smooth, want) in cases {
            let map = compute(method, &ACTIVATIONS, &GRADIENTS, SHAPE, eigen_smooth);
            assert_relative(&map.data, &want, &format!("{method:?}"));
        }
        // Eigen-CAM ignores eigen_smooth, as in pytorch-grad-cam.
        assert_eq!(
            compute(CamMethod::EigenCam, &ACTIVATIONS, &GRADIENTS, SHAPE, true),
            compute(CamMethod::EigenCam, &ACTIVATIONS, &GRADIENTS, SHAPE, false)
        );
    }

    #[test]
    fn principal_component_through_the_pixel_gram_matrix() {
        // 5 channels of 2x2 (more channels than pixels: the pixels x pixels Gram matrix is used).
        // rng = np.random.default_rng(1); B = rng.standard_normal((1, 5, 2, 2)).astype(np.float32);
        // get_2d_projection(B), oriented (LAPACK's sign was flipped).
        #[rustfmt::skip]
        let activations = [0.3455841839313507, 0.8216181397438049, 0.3304370641708374, -1.3031572103500366, 0.9053558707237244, 0.4463745653629303, -0.5369532108306885, 0.581118106842041, 0.3645724058151245, 0.2941325008869171, 0.028422242030501366, 0.5467129945755005, -0.7364540696144104, -0.16290995478630066, -0.4821193218231201, 0.5988461971282959, 0.03972210735082626, -0.2924567461013794, -0.7819084525108337, -0.2571922540664673];
        let want = [
            -0.36692655086517334,
            -0.6198797225952148,
            -0.6147297024726868,
            1.6015360355377197,
        ];
        let map = compute(
            CamMethod::EigenCam,
            &activations,
            &[0.0; 20],
            [5, 2, 2],
            false,
        );
        assert_relative(&map.data, &want, "5 channels, 4 pixels");
    }

    #[test]
    fn jacobi_finds_the_largest_eigenpair() {
        // [[2, 1], [1, 2]]: eigenvalues 3 and 1, the top eigenvector (1, 1) / sqrt(2).
        let (value, vector) = top_eigenvector(vec![2.0, 1.0, 1.0, 2.0], 2);
        assert!((value - 3.0).abs() < 1e-12, "{value}");
        assert!((vector[0].abs() - 0.5f64.sqrt()).abs() < 1e-12 && vector[0] == vector[1]);
        // rng = np.random.default_rng(1); M = rng.standard_normal((6, 6)); M = M + M.T;
        // np.linalg.eigh(M)[0][-1] = 5.097291051448011. And M v = value v.
        #[rustfmt::skip]
        let m = vec![0.016284361036687015, -0.45037499735453235, 0.9164588072712092, 1.1741890595285354, -2.8094324468181857, -1.568164941401109, -0.45037499735453235, -0.8443808231527071, 2.2564146049909413, 0.3263360188441111, 2.2133217825205027, -1.9302509900825884, 0.9164588072712092, 2.2564146049909413, 1.2934059924036938, -0.5642886818683125, -0.4784201346319772, -0.9164228870702119, 1.1741890595285354, 0.3263360188441111, -0.5642886818683125, -1.3664533235611245, -0.5783353380415422, -1.4461916415278298, -2.8094324468181857, 2.2133217825205027, -0.4784201346319772, -0.5783353380415422, 1.1874961435716456, 1.7703275725703138, -1.568164941401109, -1.9302509900825884, -0.9164228870702119, -1.4461916415278298, 1.7703275725703138, -2.1435748337548883];
        let (value, vector) = top_eigenvector(m.clone(), 6);
        assert!((value - 5.097291051448011).abs() < 1e-10, "{value}");
        for (row, v) in m.chunks_exact(6).zip(&vector) {
            let mv: f64 = row.iter().zip(&vector).map(|(a, b)| a * b).sum();
            assert!((mv - value * v).abs() < 1e-10);
        }
    }

    #[test]
    fn aligned_resize_matches_torch() {
        // torch.nn.UpsamplingBilinear2d(size=(5, 7))(small() as [1, 1, 3, 4]).
        #[rustfmt::skip]
        let want = [
            1.0, 3.0, 5.0, 3.5, 2.0, 5.0, 8.0,
            0.5, 2.25, 4.0, 4.75, 5.5, 5.75, 6.0,
            0.0, 1.5, 3.0, 6.0, 9.0, 6.5, 4.0,
            3.5, 3.0, 2.5, 5.0, 7.5, 5.0, 2.5,
            7.0, 4.5, 2.0, 4.0, 6.0, 3.5, 1.0,
        ];
        assert_close(&small().resize_bilinear_aligned(7, 5).data, &want, 1e-6);
        // The mask: min-max scaled, so its extremes are 0 and (almost) 1.
        let mask = score_cam_mask(&small(), 7, 5);
        assert_close(&mask.data[..3], &[1.0 / 9.0, 3.0 / 9.0, 5.0 / 9.0], 1e-6);
        assert_eq!(mask.min_max().map(|(lo, _)| lo), Some(0.0));
    }

    #[test]
    fn score_cam_by_hand() {
        // Channels by mean activation: A0 has mean 3.5, A1 mean -0.83: budget 1 scores channel 0 only.
        assert_eq!(score_cam_channels(&ACTIVATIONS, SHAPE, 1), vec![0]);
        assert_eq!(score_cam_channels(&ACTIVATIONS, SHAPE, 5), vec![0, 1]);
        // Weights softmax([0, ln 3]) = [1/4, 3/4]: the map is A0 / 4 + 3 A1 / 4.
        let map = score_cam(&ACTIVATIONS, SHAPE, &[0, 1], &[0.0, 3f32.ln()], false);
        let want: Vec<f32> = (0..6)
            .map(|i| ACTIVATIONS[i] / 4.0 + 3.0 * ACTIVATIONS[6 + i] / 4.0)
            .collect();
        assert_close(&map.data, &want, 1e-6);
        // One scored channel has weight 1; the other 0.
        let map = score_cam(&ACTIVATIONS, SHAPE, &[1], &[-7.0], false);
        assert_close(&map.data, &ACTIVATIONS[6..], 1e-6);
    }

    #[test]
    fn flips_and_means() {
        assert_eq!(
            small().flipped_horizontally().data,
            vec![8., 2., 5., 1., 4., 9., 3., 0., 1., 6., 2., 7.]
        );
        let mean = Map::mean(&[small(), small().flipped_horizontally()]);
        assert_eq!(mean.data[..4], [4.5, 3.5, 3.5, 4.5]);
    }

    #[test]
    #[should_panic(expected = "gradients are not [2,2,3]")]
    fn compute_refuses_mismatched_shapes() {
        compute(
            CamMethod::GradCam,
            &ACTIVATIONS,
            &GRADIENTS[..11],
            SHAPE,
            false,
        );
    }

    #[test]
    fn display_map_matches_pytorch_grad_cam() {
        // pytorch-grad-cam's per-layer steps in numpy/cv2:
        // scale(relu(scale(relu(raw), (7, 5)))) with scale(x, size) = cv2.resize((x - min) / (1e-7 + max - min), size).
        let raw = Map::new(
            4,
            3,
            vec![-1., 2., 0.5, 3., 4., -2., 1., 0., 0.25, 1.5, -3., 2.],
        );
        #[rustfmt::skip]
        let want = [
            0.0, 0.178571417927742, 0.46428564190864563, 0.3124999701976776, 0.1696428507566452, 0.526785671710968, 0.7499999403953552,
            0.3999999463558197, 0.3642856776714325, 0.30714282393455505, 0.23749996721744537, 0.1946428269147873, 0.35178568959236145, 0.44999992847442627,
            0.9999998807907104, 0.6428570747375488, 0.07142858952283859, 0.1249999850988388, 0.23214282095432281, 0.089285708963871, 0.0,
            0.43749991059303284, 0.3616071045398712, 0.24017855525016785, 0.16249997913837433, 0.11428569257259369, 0.22857140004634857, 0.29999998211860657,
            0.0624999925494194, 0.1741071343421936, 0.3526785373687744, 0.1874999850988388, 0.0357142835855484, 0.3214285373687744, 0.4999999403953552,
        ];
        assert_close(&display_map(&raw, 7, 5).data, &want, 1e-6);
    }

    #[test]
    fn large_maps_done_in_bands_equal_one_pass_on_one_thread() {
        // 1600 x 900 is split into a band per core (src/pipeline/bands.rs); the reference below is the same arithmetic, a
        // value at a time, on this thread.
        let raw = Map::new(
            7,
            5,
            (0..35).map(|i| ((i * 37) % 11) as f32 - 3.0).collect(),
        );
        let (width, height) = (1600, 900);
        let small = raw.clone().relu().normalized();
        let (xs, ys) = (taps(7, width), taps(5, height));
        let across = |row: usize, x: usize| {
            let t = &xs[x];
            small.data[row * 7 + t.first] * t.first_weight
                + small.data[row * 7 + t.second] * t.second_weight
        };
        let resized: Vec<f32> = ys
            .iter()
            .flat_map(|t| {
                (0..width).map(move |x| {
                    across(t.first, x) * t.first_weight + across(t.second, x) * t.second_weight
                })
            })
            .collect();
        let (min, max) = resized
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
                (lo.min(v), hi.max(v))
            });
        assert_eq!(small.resize_bilinear(width, height).data, resized);
        assert_eq!(
            Map::new(width, height, resized.clone()).min_max(),
            Some((min, max))
        );
        let want: Vec<f32> = resized
            .iter()
            .map(|v| (v - min) / (1e-7 + (max - min)))
            .collect();
        assert_eq!(display_map(&raw, width, height).data, want);
        let rows = DisplayRows::new(&raw, width, height);
        let mut row = vec![0.0; width];
        rows.row(450, &mut row);
        assert_eq!(row, want[450 * width..][..width]);
    }

    #[test]
    fn layers_combine_as_by_hand() {
        // A: relu -> [0, 1, 3], min-max -> [0, 1/3, 1]; B: min-max -> [1, 0, 1/2]. Mean [1/2, 1/6, 3/4];
        // min-max over [1/6, 3/4] -> [4/7, 0, 1].
        let a = Map::new(3, 1, vec![-1.0, 1.0, 3.0]);
        let b = Map::new(3, 1, vec![2.0, 0.0, 1.0]);
        assert_close(
            &combine_layers(&[a, b], 3, 1).data,
            &[4.0 / 7.0, 0.0, 1.0],
            1e-6,
        );
        // One layer: what pytorch-grad-cam returns for one target layer.
        let raw = Map::new(2, 2, vec![0.5, -1.0, 2.0, 1.0]);
        assert_eq!(
            combine_layers(std::slice::from_ref(&raw), 4, 3),
            display_map(&raw, 4, 3)
        );
    }
}
