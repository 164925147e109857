//! Route handlers: parse, call the pipeline, encode the answer. No math here.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{FromRequest, Path, RawQuery, Request, State};
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde::Serialize;

use crate::engine::{Caller, Ticket};
use crate::explain::{self, Explanation, TargetMap, Timings, Trust};
use crate::http::SharedState;
use crate::http::error::{ApiError, ErrorCode};
use crate::http::image_body::ImageBody;
use crate::http::metrics::StageTimes;
use crate::http::params::{self, ExplainParams, HeatmapEncoding, MapSize, Output};
use crate::onnx::model::ModelInfo;
use crate::pipeline::bands;
use crate::pipeline::boxes::Region;
use crate::pipeline::cam::{CamMethod, Map};
use crate::pipeline::render::{self, ImageFormat};
use crate::registry::ServedModel;

pub async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

pub async fn readyz(State(state): State<SharedState>) -> Response {
    let models = state.registry.models();
    let models: Vec<&str> = models.iter().map(|m| m.info.name.as_str()).collect();
    if state.ready.load(Ordering::SeqCst) {
        Json(serde_json::json!({ "status": "ready", "models": models })).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "status": "shutting_down", "models": models })),
        )
            .into_response()
    }
}

pub async fn metrics(State(state): State<SharedState>) -> Response {
    let text = state.metrics.render(&state.registry);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

pub async fn route_not_found() -> ApiError {
    ApiError::new(ErrorCode::RouteNotFound, "no such route; see openapi.yaml")
}

#[derive(Serialize)]
pub struct ModelView<'a> {
    name: &'a str,
    input_size: Size,
    num_classes: usize,
    labels: &'a [String],
    target_layer: &'a str,
    /// Every target layer `layers=` can combine: the target layer first, then the extra ones.
    layers: Vec<&'a str>,
    /// Whether the model has guided backpropagation (`output=guided`).
    guided: bool,
    activation: ActivationShape,
    methods: Vec<&'static str>,
    device: crate::config::ExecutionProvider,
    preprocess: PreprocessView,
    source: Option<&'a str>,
}

#[derive(Serialize)]
struct Size {
    width: usize,
    height: usize,
}

#[derive(Serialize)]
struct ActivationShape {
    channels: usize,
    height: usize,
    width: usize,
}

#[derive(Serialize)]
struct PreprocessView {
    resize: &'static str,
    mean: [f32; 3],
    std: [f32; 3],
    channel_order: &'static str,
    value_range: [f32; 2],
}

impl<'a> From<&'a ModelInfo> for ModelView<'a> {
    fn from(info: &'a ModelInfo) -> Self {
        let p = &info.preprocess;
        let [channels, height, width] = info.activation_shape;
        Self {
            name: &info.name,
            input_size: Size {
                width: p.width,
                height: p.height,
            },
            num_classes: info.num_classes(),
            labels: &info.labels,
            target_layer: &info.target_layer,
            layers: info.layer_names(),
            guided: info.guided,
            activation: ActivationShape {
                channels,
                height,
                width,
            },
            methods: CamMethod::ALL.iter().map(|m| m.name()).collect(),
            device: info.device,
            preprocess: PreprocessView {
                resize: "stretch",
                mean: p.mean,
                std: p.std,
                channel_order: p.channel_order.name(),
                value_range: [p.value_range.0, p.value_range.1],
            },
            source: info.source.as_deref(),
        }
    }
}

pub async fn list_models(State(state): State<SharedState>) -> Response {
    let models = state.registry.models();
    let models: Vec<ModelView> = models.iter().map(|m| ModelView::from(&m.info)).collect();
    Json(serde_json::json!({ "models": models })).into_response()
}

pub(crate) fn find_model(state: &SharedState, name: &str) -> Result<Arc<ServedModel>, ApiError> {
    state.registry.get(name).ok_or_else(|| {
        ApiError::new(
            ErrorCode::ModelNotFound,
            format!("no model named `{name}`; GET /v1/models lists them"),
        )
    })
}

pub async fn get_model(
    State(state): State<SharedState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let model = find_model(&state, &name)?;
    Ok(Json(ModelView::from(&model.info)).into_response())
}

#[derive(Serialize)]
struct Prediction<'a> {
    class: usize,
    label: &'a str,
    probability: f32,
    logit: f32,
}

fn predictions<'a>(
    info: &'a ModelInfo,
    logits: &[f32],
    probabilities: &[f32],
    top_k: usize,
) -> Vec<Prediction<'a>> {
    crate::onnx::contract::ranked(logits)
        .into_iter()
        .take(top_k)
        .map(|class| Prediction {
            class,
            label: &info.labels[class],
            probability: probabilities[class],
            logit: logits[class],
        })
        .collect()
}

// The model and the query are checked before the body is read, so those errors come first and cost nothing.
pub async fn predict(
    State(state): State<SharedState>,
    Path(name): Path<String>,
    RawQuery(query): RawQuery,
    request: Request,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let model = find_model(&state, &name)?;
    let top_k = params::predict_top_k(query.as_deref(), &model.info)?;
    let ImageBody(bytes) = ImageBody::from_request(request, &()).await?;
    let (logits, timings) = {
        let (model, limits) = (model.clone(), state.limits.clone());
        on_blocking_thread(move |ticket| Ok(explain::predict(&model, &bytes, &limits, ticket)?))
            .await?
    };
    let probabilities = explain::softmax(&logits);
    let body = serde_json::json!({
        "model": model.info.name,
        "predictions": predictions(&model.info, &logits, &probabilities, top_k),
    });
    let mut response = Json(body).into_response();
    add_timing_headers(&mut response, &timings, Duration::ZERO, started.elapsed());
    Ok(response)
}

pub async fn explain(
    State(state): State<SharedState>,
    Path(name): Path<String>,
    RawQuery(query): RawQuery,
    request: Request,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let model = find_model(&state, &name)?;
    let params = params::explain(query.as_deref(), &model.info, &state.limits)?;
    let ImageBody(bytes) = ImageBody::from_request(request, &()).await?;
    let limits = state.limits.clone();
    let (mut response, timings, encoding) = on_blocking_thread(move |ticket| {
        let explanation = explain::explain(&model, &bytes, &limits, &params.options, ticket)?;
        let encoding = Instant::now();
        let response = encode(&model.info, &explanation, &params);
        Ok((response, explanation.timings, encoding.elapsed()))
    })
    .await?;
    add_timing_headers(
        &mut response,
        &timings,
        timings.maps + encoding,
        started.elapsed(),
    );
    Ok(response)
}

/// Runs a request's pipeline (decoding, Runs, maps, encoding) on one blocking thread: one hand-off there and one
/// back, instead of one around each stage. The [`Caller`] stays with this future: if it is dropped (the client
/// went away, the request timed out), the request's Runs still queued are skipped.
pub(crate) async fn on_blocking_thread<T: Send + 'static>(
    work: impl FnOnce(&Ticket) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let caller = Caller::default();
    let ticket = caller.ticket();
    let result = tokio::task::spawn_blocking(move || work(&ticket)).await;
    drop(caller);
    result.unwrap_or_else(|_| {
        tracing::error!("a request's pipeline panicked");
        Err(ApiError::new(ErrorCode::Internal, "the explanation failed"))
    })
}

/// Per-stage times in milliseconds, so clients and load tests see where the time goes.
fn add_timing_headers(
    response: &mut Response,
    timings: &Timings,
    render: Duration,
    total: Duration,
) {
    let headers = response.headers_mut();
    for (name, duration) in [
        ("x-decode-time", timings.decode),
        ("x-queue-time", timings.queue),
        ("x-inference-time", timings.inference),
        ("x-render-time", render),
        ("x-total-time", total),
    ] {
        let value = format!("{:.3}", duration.as_secs_f64() * 1e3);
        headers.insert(
            HeaderName::from_static(name),
            HeaderValue::from_str(&value).expect("ASCII"),
        );
    }
    response.extensions_mut().insert(StageTimes {
        decode: timings.decode,
        queue: timings.queue,
        inference: timings.inference,
        render,
        batch_size: timings.batch_size,
    });
    let headers = response.headers_mut();
    headers.insert(
        HeaderName::from_static("x-batch-size"),
        HeaderValue::from(timings.batch_size),
    );
}

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
    map: Option<MapBody>,
    #[serde(skip_serializing_if = "Option::is_none")]
    overlay_png: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    heatmap_png: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    trust: Option<TrustBody>,
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

fn image_size(explanation: &Explanation) -> Size {
    let (width, height) = explanation.photo_size;
    Size { width, height }
}

/// What image outputs are drawn on: the photo's size, capped by `max_side`. The decoded photo is resized only once,
/// and only when an overlay needs it (it was decoded at least this large: `ExplainOptions::drawn_side`).
pub(crate) struct Canvas<'a> {
    width: usize,
    height: usize,
    image: &'a image::RgbImage,
    resized: std::sync::OnceLock<image::RgbImage>,
}

impl<'a> Canvas<'a> {
    pub(crate) fn new(explanation: &'a Explanation, max_side: usize) -> Self {
        let (width, height) =
            explain::fit(explanation.photo_size.0, explanation.photo_size.1, max_side);
        Self {
            width,
            height,
            image: &explanation.image,
            resized: std::sync::OnceLock::new(),
        }
    }

    fn photo(&self) -> &image::RgbImage {
        if (self.image.width() as usize, self.image.height() as usize) == (self.width, self.height)
        {
            return self.image;
        }
        self.resized.get_or_init(|| {
            crate::pipeline::preprocess::resize(self.image, self.width, self.height)
        })
    }

    fn overlay(&self, target: &TargetMap, alpha: f32, format: ImageFormat) -> Vec<u8> {
        let heat = target.heat_rows(self.width, self.height);
        let overlay = render::overlay_rows(self.photo(), alpha, |y, row| heat.row(y, row));
        encoded(format.encode(&overlay))
    }

    /// `format` must be PNG for gray16 (params::explain checks).
    pub(crate) fn heatmap(
        &self,
        target: &TargetMap,
        encoding: HeatmapEncoding,
        format: ImageFormat,
    ) -> Vec<u8> {
        let heat = target.heat_at(self.width, self.height);
        encoded(match encoding {
            HeatmapEncoding::Color => format.encode(&render::colormap(&heat)),
            HeatmapEncoding::Gray8 => format.encode(&render::gray8(&heat)),
            HeatmapEncoding::Gray16 => render::encode_png(&render::gray16(&heat)),
        })
    }
}

fn encode(info: &ModelInfo, explanation: &Explanation, params: &ExplainParams) -> Response {
    if let Some(format) = params.format {
        return Json(crate::http::formats::encode(
            format,
            info,
            explanation,
            &crate::http::formats::FormatOptions {
                threshold: params.options.threshold,
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

/// Encoding into memory fails only on an internal bug (a zero-sized image), never on client input.
fn encoded(result: Result<Vec<u8>, image::ImageError>) -> Vec<u8> {
    result.expect("encoding an image into memory")
}

/// Guided Grad-CAM's values; params::explain asks the pipeline for them whenever the output shows them.
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
