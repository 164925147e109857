//! Request parsing on arbitrary input: the query of `explain` and `predict`, and the image body (raw or
//! multipart under any content type). Every outcome must be a value or an ApiError, never a panic.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use axum::body::Body;
use axum::extract::FromRequest;
use camserve::config::{ExecutionProvider, Limits};
use camserve::http::image_body::ImageBody;
use camserve::http::params;
use camserve::onnx::metadata::TargetLayout;
use camserve::onnx::model::ModelInfo;
use camserve::pipeline::preprocess::{ChannelOrder, Preprocess};
use libfuzzer_sys::fuzz_target;

fn model() -> &'static ModelInfo {
    static MODEL: OnceLock<ModelInfo> = OnceLock::new();
    MODEL.get_or_init(|| ModelInfo {
        name: "fuzz".into(),
        file: PathBuf::from("fuzz.onnx"),
        labels: vec!["red".into(), "Red".into(), "tiger cat".into(), "7".into()],
        target_layer: "features".into(),
        extra_layers: vec!["features.5".into()],
        guided: true,
        preprocess: Preprocess {
            width: 8,
            height: 8,
            mean: [0.0; 3],
            std: [1.0; 3],
            channel_order: ChannelOrder::Rgb,
            value_range: (0.0, 1.0),
        },
        target_layout: TargetLayout::Nchw,
        activation_shape: [4, 2, 2],
        stride: Some(4),
        device: ExecutionProvider::Cpu,
        source: None,
    })
}

fuzz_target!(|input: &[u8]| {
    // First line: the query; second: the content type; the rest: the body.
    let mut parts = input.splitn(3, |&b| b == b'\n');
    let query = String::from_utf8_lossy(parts.next().unwrap_or_default());
    let content_type = parts.next().unwrap_or_default().to_vec();
    let body = parts.next().unwrap_or_default().to_vec();

    let limits = Limits::default();
    let _ = params::parse_explain(Some(&query), model(), &limits);
    let _ = params::predict_top_k(Some(&query), model());

    let mut request = axum::http::Request::builder()
        .method("POST")
        .uri("/v1/models/fuzz/explain");
    if let Ok(value) = axum::http::HeaderValue::from_bytes(&content_type) {
        request = request.header("content-type", value);
    }
    let request = request.body(Body::from(body)).expect("a valid request");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime");
    let _ = runtime.block_on(ImageBody::from_request(request, &()));
});
