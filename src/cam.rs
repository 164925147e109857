//! Class activation maps from one image's target-layer activations and gradients.
//!
//! Formulas follow pytorch-grad-cam (jacobgil/pytorch-grad-cam), so maps can be compared with it.

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
        let (min, max) = self
            .data
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
                (lo.min(v), hi.max(v))
            });
        (min <= max).then_some((min, max))
    }

    /// Min-max scaled to [0, 1] as pytorch-grad-cam's `scale_cam_image`:
    /// `(x - min) / (1e-7 + max - min)`, so a constant map becomes all zeros.
    pub fn normalized(mut self) -> Map {
        if let Some((min, max)) = self.min_max() {
            let scale = 1e-7 + (max - min);
            self.data.iter_mut().for_each(|v| *v = (*v - min) / scale);
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
        let mut data = Vec::with_capacity(width * height);
        for t in &ys {
            let first = &rows[t.first * width..][..width];
            let second = &rows[t.second * width..][..width];
            data.extend(
                first
                    .iter()
                    .zip(second)
                    .map(|(a, b)| a * t.first_weight + b * t.second_weight),
            );
        }
        Map::new(width, height, data)
    }
}

/// The two source samples, and their weights, behind one destination sample.
struct Tap {
    first: usize,
    second: usize,
    first_weight: f32,
    second_weight: f32,
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

/// A CAM method computable from one Run's activations and gradients.
/// Names and formulas are pytorch-grad-cam's.
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
    /// As HiResCAM, with negative gradients set to zero.
    LayerCam,
}

impl CamMethod {
    pub const ALL: [CamMethod; 5] = [
        Self::GradCam,
        Self::GradCamPlusPlus,
        Self::XGradCam,
        Self::HiResCam,
        Self::LayerCam,
    ];

    /// The name clients use, as in pytorch-grad-cam.
    pub fn name(self) -> &'static str {
        match self {
            Self::GradCam => "gradcam",
            Self::GradCamPlusPlus => "gradcampp",
            Self::XGradCam => "xgradcam",
            Self::HiResCam => "hirescam",
            Self::LayerCam => "layercam",
        }
    }
}

/// The map of one image for one target, BEFORE ReLU: raw maps (with their sign and range) are
/// part of the API; see [`compute_relu`] for the usual picture.
///
/// `activations` and `gradients` are `[channels, height, width]`, row-major.
///
/// # Panics
/// If a slice's length is not `channels * height * width`.
pub fn compute(
    method: CamMethod,
    activations: &[f32],
    gradients: &[f32],
    channels: usize,
    height: usize,
    width: usize,
) -> Map {
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
    let mut data = vec![0.0f32; plane];
    if plane == 0 {
        return Map::new(width, height, data);
    }
    for (a, g) in activations
        .chunks_exact(plane)
        .zip(gradients.chunks_exact(plane))
    {
        let channel_weight = |weight| std::iter::repeat_n(weight, plane);
        match method {
            CamMethod::GradCam => add_weighted(&mut data, a, channel_weight(mean(g))),
            CamMethod::GradCamPlusPlus => add_weighted(
                &mut data,
                a,
                channel_weight(grad_cam_plus_plus_weight(a, g)),
            ),
            CamMethod::XGradCam => {
                add_weighted(&mut data, a, channel_weight(x_grad_cam_weight(a, g)))
            }
            CamMethod::HiResCam => add_weighted(&mut data, a, g.iter().copied()),
            CamMethod::LayerCam => add_weighted(&mut data, a, g.iter().map(|g| g.max(0.0))),
        }
    }
    Map::new(width, height, data)
}

/// [`compute`] followed by ReLU, as pytorch-grad-cam does before scaling.
pub fn compute_relu(
    method: CamMethod,
    activations: &[f32],
    gradients: &[f32],
    channels: usize,
    height: usize,
    width: usize,
) -> Map {
    compute(method, activations, gradients, channels, height, width).relu()
}

/// The map pytorch-grad-cam returns for one target layer, at image size: ReLU, min-max,
/// bilinear resize, then min-max again (resizing can lower the peak below 1).
pub fn display_map(raw: &Map, width: usize, height: usize) -> Map {
    raw.clone()
        .relu()
        .normalized()
        .resize_bilinear(width, height)
        .relu()
        .normalized()
}

/// Several target layers' raw maps combined as pytorch-grad-cam combines several `target_layers`: per layer ReLU,
/// min-max and a bilinear resize to `width x height` (the model's input size); then max(0), the mean over the
/// layers, and min-max again.
///
/// # Panics
/// If `raws` is empty.
pub fn combine_layers(raws: &[Map], width: usize, height: usize) -> Map {
    assert!(!raws.is_empty(), "no layer to combine");
    let mut sum = vec![0.0f32; width * height];
    for raw in raws {
        let up = raw
            .clone()
            .relu()
            .normalized()
            .resize_bilinear(width, height)
            .relu();
        sum.iter_mut().zip(&up.data).for_each(|(s, v)| *s += v);
    }
    let count = raws.len() as f32;
    Map::new(width, height, sum.into_iter().map(|s| s / count).collect()).normalized()
}

/// `map += weights * activations`, pixel by pixel.
fn add_weighted(map: &mut [f32], activations: &[f32], weights: impl Iterator<Item = f32>) {
    map.iter_mut()
        .zip(activations)
        .zip(weights)
        .for_each(|((m, a), w)| *m += w * a);
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

    #[test]
    fn grad_cam_by_hand() {
        let map = compute(CamMethod::GradCam, &ACTIVATIONS, &GRADIENTS, 2, 2, 3);
        assert_eq!((map.width, map.height), (3, 2));
        assert_close(&map.data, &[0.5, 2.0, -1.5, 4.0, 2.5, -2.0], 1e-6);
        let positive = compute_relu(CamMethod::GradCam, &ACTIVATIONS, &GRADIENTS, 2, 2, 3);
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
        ];
        for (method, want) in cases {
            let map = compute(method, &ACTIVATIONS, &GRADIENTS, 2, 2, 3);
            let close = map
                .data
                .iter()
                .zip(want)
                .all(|(g, w)| (g - w).abs() <= 1e-5 * w.abs().max(1.0));
            assert!(close, "{method:?}: got {:?}, want {want:?}", map.data);
        }
    }

    #[test]
    #[should_panic(expected = "gradients are not [2,2,3]")]
    fn compute_refuses_mismatched_shapes() {
        compute(CamMethod::GradCam, &ACTIVATIONS, &GRADIENTS[..11], 2, 2, 3);
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
