//! The `camserve.*` metadata of a contract model, with the config's overrides taking precedence.

use std::path::Path;

use ort::session::Session;
use serde::Deserialize;

use crate::config::ModelOverrides;
use crate::onnx::contract::{CONTRACT_VERSION, metadata_key};
use crate::onnx::session::extra_layer_count;
use crate::pipeline::preprocess::{ChannelOrder, Preprocess};

pub struct Metadata {
    pub labels: Vec<String>,
    pub target_layer: String,
    pub target_layout: TargetLayout,
    /// `camserve.target_layers`: every target layer, the primary first (only models with extra layers have it).
    pub target_layers: Option<Vec<String>>,
    pub preprocess: Preprocess,
    pub source: Option<String>,
}

/// The target layer's own layout, which the model maps to the contract's [N,Ch,h,w] inside its graph
/// (`camserve.target_layout`; absent: `nchw`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(tag = "layout", rename_all = "lowercase", try_from = "LayoutFields")]
pub enum TargetLayout {
    Nchw,
    /// Channels last, [N,h,w,C] (Swin).
    Nhwc,
    /// A transformer's [N,T,D] token sequence: `prefix_tokens` (class, distillation, registers), then the patch
    /// grid, [height, width].
    Tokens {
        prefix_tokens: usize,
        grid: [usize; 2],
    },
}

/// `camserve.target_layout` as written, checked whole: a layout takes exactly the fields it needs.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LayoutFields {
    layout: String,
    prefix_tokens: Option<usize>,
    grid: Option<[usize; 2]>,
}

impl TryFrom<LayoutFields> for TargetLayout {
    type Error = String;

    fn try_from(f: LayoutFields) -> Result<Self, String> {
        match (f.layout.as_str(), f.prefix_tokens, f.grid) {
            ("nchw", None, None) => Ok(Self::Nchw),
            ("nhwc", None, None) => Ok(Self::Nhwc),
            ("tokens", Some(prefix_tokens), Some(grid)) => Ok(Self::Tokens { prefix_tokens, grid }),
            _ => Err(
                "expected {\"layout\": \"nchw\"}, {\"layout\": \"nhwc\"} or {\"layout\": \"tokens\", \
                 \"prefix_tokens\": P, \"grid\": [h, w]}"
                    .into(),
            ),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PreprocessMetadata {
    resize: String,
    mean: [f32; 3],
    std: [f32; 3],
    channel_order: String,
    value_range: [f32; 2],
}

/// The `camserve.*` metadata, with config overrides taking precedence; names every missing or malformed key.
pub fn read_metadata(session: &Session, overrides: &ModelOverrides) -> Result<Metadata, String> {
    let metadata = session
        .metadata()
        .map_err(|e| format!("cannot read its metadata: {e}"))?;
    let get = |key: &str| metadata.custom(&metadata_key(key));
    let mut problems = Vec::new();
    if let Some(version) = get("contract_version").filter(|v| v != CONTRACT_VERSION) {
        problems.push(format!(
            "metadata `camserve.contract_version` is {version:?}, this server speaks {CONTRACT_VERSION:?}"
        ));
    }
    let labels = read_labels(&get, overrides, &mut problems);
    let target_layout = match get("target_layout") {
        None => Some(TargetLayout::Nchw),
        value => parse_key(value, "target_layout", "a layout object", &mut problems),
    };
    let preprocess = read_preprocess(&get, overrides, &mut problems);
    match (labels, preprocess, target_layout) {
        (Some(labels), Some(preprocess), Some(target_layout)) if problems.is_empty() => {
            Ok(Metadata {
                labels,
                target_layout,
                target_layer: overrides
                    .target_layer
                    .clone()
                    .or_else(|| get("target_layer"))
                    .unwrap_or_default(),
                target_layers: get("target_layers")
                    .and_then(|v| serde_json::from_str::<Vec<String>>(&v).ok()),
                preprocess,
                source: get("source"),
            })
        }
        _ => Err(format!(
            "{} (export it with camserve-export, or set the values under [models.overrides])",
            problems.join("; ")
        )),
    }
}

/// The class names: the overrides' labels file, else `camserve.labels`.
fn read_labels(
    get: &impl Fn(&str) -> Option<String>,
    overrides: &ModelOverrides,
    problems: &mut Vec<String>,
) -> Option<Vec<String>> {
    let labels = match &overrides.labels_file {
        Some(path) => read_labels_file(path).map_err(|e| problems.push(e)).ok(),
        None => parse_key(
            get("labels"),
            "labels",
            "a JSON array of class names",
            problems,
        ),
    }?;
    if labels.is_empty() {
        problems.push("the label list is empty".into());
    }
    Some(labels)
}

/// Input size and normalization: each value from the overrides, else `camserve.input_size` and
/// `camserve.preprocess` (which may be left out when the overrides give mean, std and channel order).
fn read_preprocess(
    get: &impl Fn(&str) -> Option<String>,
    overrides: &ModelOverrides,
    problems: &mut Vec<String>,
) -> Option<Preprocess> {
    let input_size = overrides.input_size.or_else(|| {
        parse_key::<[usize; 2]>(
            get("input_size"),
            "input_size",
            "JSON [height, width]",
            problems,
        )
    });
    let all_overridden =
        overrides.mean.is_some() && overrides.std.is_some() && overrides.channel_order.is_some();
    let meta = if all_overridden {
        None
    } else {
        parse_key::<PreprocessMetadata>(get("preprocess"), "preprocess", "a JSON object", problems)
    };
    if let Some(meta) = &meta
        && meta.resize != "stretch"
    {
        problems.push(format!(
            "metadata `camserve.preprocess.resize` is {:?}; only \"stretch\" is supported",
            meta.resize
        ));
    }
    let channel_order = match overrides
        .channel_order
        .as_deref()
        .or(meta.as_ref().map(|m| m.channel_order.as_str()))
    {
        Some("RGB") | None => ChannelOrder::Rgb,
        Some("BGR") => ChannelOrder::Bgr,
        Some(other) => {
            problems.push(format!(
                "channel_order {other:?} is neither \"RGB\" nor \"BGR\""
            ));
            ChannelOrder::Rgb
        }
    };
    let [height, width] = input_size?;
    let mean = overrides
        .mean
        .or(meta.as_ref().map(|m| m.mean))
        .unwrap_or_default();
    let std = overrides
        .std
        .or(meta.as_ref().map(|m| m.std))
        .unwrap_or([1.0; 3]);
    let [lo, hi] = overrides
        .value_range
        .or(meta.as_ref().map(|m| m.value_range))
        .unwrap_or([0.0, 1.0]);
    if std.contains(&0.0) || height == 0 || width == 0 {
        problems.push("std must be non-zero and input_size positive".into());
    }
    Some(Preprocess {
        width,
        height,
        mean,
        std,
        channel_order,
        value_range: (lo, hi),
    })
}

fn parse_key<T: for<'de> Deserialize<'de>>(
    value: Option<String>,
    key: &str,
    expected: &str,
    problems: &mut Vec<String>,
) -> Option<T> {
    let Some(value) = value else {
        problems.push(format!("metadata `{}` is missing", metadata_key(key)));
        return None;
    };
    serde_json::from_str(&value)
        .map_err(|e| {
            problems.push(format!(
                "metadata `{}` is not {expected}: {e}",
                metadata_key(key)
            ))
        })
        .ok()
}

fn read_labels_file(path: &Path) -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read labels file {}: {e}", path.display()))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect())
}

/// The extra layers' names from `camserve.target_layers`, which must name the primary and every extra layer.
pub fn extra_layer_names(session: &Session, meta: &Metadata) -> Result<Vec<String>, String> {
    let count = extra_layer_count(session);
    match &meta.target_layers {
        None if count == 0 => Ok(Vec::new()),
        Some(names)
            if names.len() == count + 1
                && names.iter().all(|n| !n.is_empty() && !n.contains(','))
                && (1..names.len()).all(|i| !names[..i].contains(&names[i])) =>
        {
            Ok(names[1..].to_vec())
        }
        _ => Err(format!(
            "metadata `camserve.target_layers` must be a JSON array of {} distinct layer names without commas, \
             the primary target first, then one per activations_i output",
            count + 1
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_layouts_read_as_the_exporter_writes_them() {
        let read = |text: &str| serde_json::from_str::<TargetLayout>(text);
        assert_eq!(read(r#"{"layout": "nchw"}"#).unwrap(), TargetLayout::Nchw);
        assert_eq!(read(r#"{"layout": "nhwc"}"#).unwrap(), TargetLayout::Nhwc);
        assert_eq!(
            read(r#"{"layout": "tokens", "prefix_tokens": 5, "grid": [4, 6]}"#).unwrap(),
            TargetLayout::Tokens {
                prefix_tokens: 5,
                grid: [4, 6]
            }
        );
        for bad in [
            r#"{"layout": "tokens"}"#,
            r#"{"layout": "nchw", "grid": [1, 1]}"#,
            r#"{"layout": "hwc"}"#,
        ] {
            assert!(read(bad).is_err(), "{bad}");
        }
        // And back: /v1/models shows it in the same shape.
        let tokens = TargetLayout::Tokens {
            prefix_tokens: 1,
            grid: [7, 7],
        };
        assert_eq!(
            serde_json::to_value(&tokens).unwrap(),
            serde_json::json!({"layout": "tokens", "prefix_tokens": 1, "grid": [7, 7]})
        );
    }
}
