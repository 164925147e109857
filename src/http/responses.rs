//! The `explain` route's answers, one per `output`: images, maps, `.npy` arrays, JSON, or a labeling format.

use axum::Json;
use axum::http::{HeaderName, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde::Serialize;

use crate::explain::{ExplainOptions, Explanation, TargetMap, Trust};
use crate::http::canvas::{Canvas, encoded};
use crate::http::params::{ExplainParams, HeatmapEncoding, MapSize, Output};
use crate::http::views::{Prediction, Size, image_size, predictions};
use crate::onnx::model::ModelInfo;
use crate::pipeline::bands;
use crate::pipeline::boxes::{Region, Threshold};
use crate::pipeline::cam::Map;
use crate::pipeline::render::{self, ImageFormat};

#[derive(Serialize)]
struct ExplainBody<'a> {
    model: &'a str,
    method: &'static str,
    image: Size,
    #[serde(skip_serializing_if = "Option::is_none")]
    predictions: Option<Vec<Prediction<'a>>>,
    explanations: Vec<TargetBody<'a>>,
}

#[derive(Serialize)]
struct TargetBody<'a> {
    class: usize,
    label: &'a str,
    probability: f32,
    #[serde(skip_serializing_if = "Option::is_none")]
    boxes: Option<Vec<BoxBody>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    localization: Option<LocalizationBody>,
    #[serde(skip_serializing_if = "Option::is_none")]
    map: Option<MapBody>,
    #[serde(skip_serializing_if = "Option::is_none")]
    overlay_png: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    heatmap_png: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    trust: Option<TrustBody>,
}

#[derive(Serialize)]
struct LocalizationBody {
    method: &'static str,
    threshold: serde_json::Value,
    level: Option<f32>,
    input_size: [usize; 2],
    run: &'static str,
}

impl LocalizationBody {
    fn new(target: &TargetMap, options: &ExplainOptions) -> Self {
        let l = &target.localization;
        Self {
            method: options.method.name(),
            threshold: match options.threshold {
                Threshold::Fraction(fraction) => serde_json::json!(fraction),
                Threshold::Otsu => serde_json::json!("otsu"),
            },
            level: l.level,
            input_size: [l.input_size.0, l.input_size.1],
            run: if l.own_run { "localization" } else { "target" },
        }
    }
}

#[derive(Serialize)]
struct TrustBody {
    probability: f32,
    kept_probability: f32,
    removed_probability: f32,
    drop_in_confidence: f32,
    increase_in_confidence: bool,
    removal_drop: f32,
}

impl From<&Trust> for TrustBody {
    fn from(t: &Trust) -> Self {
        Self {
            probability: t.probability,
            kept_probability: t.kept_probability,
            removed_probability: t.removed_probability,
            drop_in_confidence: t.drop_in_confidence(),
            increase_in_confidence: t.increase_in_confidence(),
            removal_drop: t.removal_drop(),
        }
    }
}

#[derive(Serialize)]
struct BoxBody {
    x_min: usize,
    y_min: usize,
    x_max: usize,
    y_max: usize,
    width: usize,
    height: usize,
    area: usize,
    mean: f32,
    peak: f32,
}

impl From<&Region> for BoxBody {
    fn from(r: &Region) -> Self {
        Self {
            x_min: r.x_min,
            y_min: r.y_min,
            x_max: r.x_max,
            y_max: r.y_max,
            width: r.x_max - r.x_min,
            height: r.y_max - r.y_min,
            area: r.area,
            mean: r.mean,
            peak: r.peak,
        }
    }
}

/// A map with its shape and its range on the target layer's grid (upsampled values stay within that range).
#[derive(Serialize)]
struct MapBody {
    shape: [usize; 2],
    min: f32,
    max: f32,
    data: Vec<f32>,
}

/// The method's map on the grid `size` asks for: after ReLU (Grad-CAM's map, not normalized), or with `relu`
/// off the raw map with its sign. The range is the map's on the target layer's grid; upsampled values stay in it.
fn cam_map(
    target: &TargetMap,
    params: &ExplainParams,
    info: &ModelInfo,
    canvas: &Canvas,
) -> (Map, (f32, f32)) {
    let map = if params.relu {
        target.raw.clone().relu()
    } else {
        target.raw.clone()
    };
    let range = map.min_max().unwrap_or((0.0, 0.0));
    let map = match params.map_size {
        MapSize::Activation => map,
        MapSize::Input => map.resize_bilinear(info.preprocess.width, info.preprocess.height),
        MapSize::Image => map.resize_bilinear(canvas.width, canvas.height),
    };
    (map, range)
}

pub fn encode(info: &ModelInfo, explanation: &Explanation, params: &ExplainParams) -> Response {
    if let Some(format) = params.format {
        return Json(crate::http::formats::encode(
            format,
            info,
            explanation,
            &crate::http::formats::FormatOptions {
                model_version: &info.name,
                max_side: params.max_side,
                gray8: params.heatmap == HeatmapEncoding::Gray8,
            },
        ))
        .into_response();
    }
    let png = |bytes: Vec<u8>| ([(header::CONTENT_TYPE, "image/png")], bytes).into_response();
    let format = params.image_format;
    let image =
        |bytes: Vec<u8>| ([(header::CONTENT_TYPE, format.media_type())], bytes).into_response();
    let canvas = Canvas::new(explanation, params.max_side);
    let first = &explanation.targets[0];
    match params.output {
        Output::Overlay => {
            with_map_headers(image(canvas.overlay(first, params.alpha, format)), first)
        }
        Output::Heatmap => {
            with_map_headers(image(canvas.heatmap(first, params.heatmap, format)), first)
        }
        Output::Npy => {
            let maps: Vec<Map> = explanation
                .targets
                .iter()
                .map(|t| cam_map(t, params, info, &canvas).0)
                .collect();
            let data: Vec<f32> = maps.iter().flat_map(|m| m.data.iter().copied()).collect();
            let shape = [maps.len(), maps[0].height, maps[0].width];
            npy(&shape, &data)
        }
        Output::Guided => {
            let p = &info.preprocess;
            let values = guided_values(first);
            with_map_headers(
                png(encoded(render::encode_png(&render::deprocess(
                    values, p.width, p.height,
                )))),
                first,
            )
        }
        Output::GuidedNpy => {
            let p = &info.preprocess;
            let data: Vec<f32> = explanation
                .targets
                .iter()
                .flat_map(|t| guided_values(t).iter().copied())
                .collect();
            npy(&[explanation.targets.len(), p.height, p.width, 3], &data)
        }
        Output::Json | Output::Raw | Output::Boxes => {
            Json(json_body(info, explanation, params, &canvas)).into_response()
        }
    }
}

fn json_body<'a>(
    info: &'a ModelInfo,
    explanation: &Explanation,
    params: &ExplainParams,
    canvas: &Canvas,
) -> ExplainBody<'a> {
    let with_images = params.output == Output::Json;
    let with_boxes = matches!(params.output, Output::Json | Output::Boxes);
    let with_map = matches!(params.output, Output::Json | Output::Raw);
    let explanations = explanation
        .targets
        .iter()
        .map(|target| {
            // A large photo's two pictures are encoded side by side.
            let (overlay_png, heatmap_png) = if with_images {
                let (overlay, heatmap) = bands::both(
                    canvas.width * canvas.height,
                    || base64_png(canvas.overlay(target, params.alpha, ImageFormat::Png)),
                    || base64_png(canvas.heatmap(target, HeatmapEncoding::Color, ImageFormat::Png)),
                );
                (Some(overlay), Some(heatmap))
            } else {
                (None, None)
            };
            TargetBody {
                class: target.class,
                label: &info.labels[target.class],
                probability: explanation.probabilities[target.class],
                boxes: with_boxes.then(|| target.boxes.iter().map(BoxBody::from).collect()),
                localization: with_boxes.then(|| LocalizationBody::new(target, &params.options)),
                map: with_map.then(|| {
                    let (map, (min, max)) = cam_map(target, params, info, canvas);
                    MapBody {
                        shape: [map.height, map.width],
                        min,
                        max,
                        data: map.data,
                    }
                }),
                overlay_png,
                heatmap_png,
                trust: target.trust.as_ref().map(TrustBody::from),
            }
        })
        .collect();
    ExplainBody {
        model: &info.name,
        method: params.options.method.name(),
        image: image_size(explanation),
        predictions: (params.output == Output::Json)
            .then(|| predictions(info, &explanation.logits, &explanation.probabilities, 5)),
        explanations,
    }
}

/// Guided Grad-CAM's values; params::parse_explain asks the pipeline for them whenever the output shows them.
fn guided_values(target: &TargetMap) -> &[f32] {
    target
        .guided
        .as_deref()
        .expect("guided outputs are computed when asked for")
}

/// A float32 `.npy` answer.
fn npy(shape: &[usize], data: &[f32]) -> Response {
    (
        [(header::CONTENT_TYPE, "application/x-npy")],
        render::encode_npy_f32(shape, data),
    )
        .into_response()
}

fn base64_png(bytes: Vec<u8>) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Which class an image answer shows, and the range of the map its colours span.
fn with_map_headers(mut response: Response, target: &TargetMap) -> Response {
    let (min, max) = target.cam_range();
    let headers = response.headers_mut();
    headers.insert(
        HeaderName::from_static("x-cam-class"),
        HeaderValue::from(target.class),
    );
    if let Ok(range) = HeaderValue::from_str(&format!("{min},{max}")) {
        headers.insert(HeaderName::from_static("x-cam-range"), range);
    }
    response
}
