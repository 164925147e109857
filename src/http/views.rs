//! The JSON shapes that describe a model and its predictions, shared by the routes that answer with them.

use serde::Serialize;

use crate::config::ExecutionProvider;
use crate::explain::Explanation;
use crate::onnx::metadata::TargetLayout;
use crate::onnx::model::ModelInfo;
use crate::pipeline::cam::CamMethod;

#[derive(Serialize)]
pub struct ModelView<'a> {
    name: &'a str,
    input_size: Size,
    num_classes: usize,
    labels: &'a [String],
    target_layer: &'a str,
    target_layout: &'a TargetLayout,
    /// Every target layer `layers=` can combine: the target layer first, then the extra ones.
    layers: Vec<&'a str>,
    /// Whether the model has guided backpropagation (`output=guided`).
    guided: bool,
    activation: ActivationShape,
    stride: Option<usize>,
    methods: Vec<&'static str>,
    device: ExecutionProvider,
    preprocess: PreprocessView,
    source: Option<&'a str>,
}

#[derive(Serialize)]
pub struct Size {
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
            target_layout: &info.target_layout,
            layers: info.layer_names(),
            guided: info.guided,
            activation: ActivationShape {
                channels,
                height,
                width,
            },
            stride: info.stride,
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

#[derive(Serialize)]
pub struct Prediction<'a> {
    class: usize,
    label: &'a str,
    probability: f32,
    logit: f32,
}

pub fn predictions<'a>(
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

pub fn image_size(explanation: &Explanation) -> Size {
    let (width, height) = explanation.photo_size;
    Size { width, height }
}
