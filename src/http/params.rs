//! Query parameters of `predict` and `explain`, parsed by hand: `class` repeats, and every mistake gets a message
//! that names the parameter. Unknown parameters are refused so that a typo never silently falls back to a default.

use crate::config::Limits;
use crate::explain::{
    BOX_SIDE, DEFAULT_SCORE_CAM_CHANNELS, ExplainOptions, Targets, resolve_class, resolve_layers,
};
use crate::http::error::{ApiError, ErrorCode};
use crate::onnx::model::ModelInfo;
use crate::pipeline::boxes::Threshold;
use crate::pipeline::cam::CamMethod;
use crate::pipeline::render::ImageFormat;

/// What `explain` returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Json,
    Overlay,
    Heatmap,
    Raw,
    Npy,
    Boxes,
    /// Guided Grad-CAM as a PNG, drawn as pytorch-grad-cam's `deprocess_image` draws it.
    Guided,
    /// Guided Grad-CAM's float values [K,H,W,3] before that drawing.
    GuidedNpy,
}

/// A labeling tool's format (`format`), answered in place of `output`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    LabelStudio,
    Cvat,
    Coco,
    FiftyOne,
}

impl Format {
    pub const ALL: [(&'static str, Format); 4] = [
        ("labelstudio", Format::LabelStudio),
        ("cvat", Format::Cvat),
        ("coco", Format::Coco),
        ("fiftyone", Format::FiftyOne),
    ];
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeatmapEncoding {
    Color,
    Gray8,
    Gray16,
}

/// The grid a raw map is returned on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapSize {
    /// The target layer's own grid, e.g. 7x7.
    Activation,
    /// The model's input size, as pytorch-grad-cam returns maps.
    Input,
    /// The uploaded image's size.
    Image,
}

#[derive(Debug, Clone)]
pub struct ExplainParams {
    pub options: ExplainOptions,
    pub output: Output,
    pub alpha: f32,
    pub heatmap: HeatmapEncoding,
    pub map_size: MapSize,
    /// Maps (`raw`, `npy`, `json`) after ReLU (the default), or before it, with their sign.
    pub relu: bool,
    /// Longest side of image outputs and of image-sized maps.
    pub max_side: usize,
    /// A labeling tool's format, in place of `output`.
    pub format: Option<Format>,
    /// How `overlay` and `heatmap` answers are encoded.
    pub image_format: ImageFormat,
}

const EXPLAIN_KEYS: &[&str] = &[
    "class",
    "top_k",
    "method",
    "output",
    "alpha",
    "heatmap",
    "threshold",
    "max_boxes",
    "map_size",
    "max_side",
    "format",
    "eigen_smooth",
    "aug_smooth",
    "max_channels",
    "trust",
    "relu",
    "layers",
    "image_format",
    "quality",
    "box_side",
];

/// JPEG quality when `image_format=jpeg` comes without `quality`: Pillow's and OpenCV's usual choice for photos.
pub const DEFAULT_JPEG_QUALITY: u8 = 90;

/// `image_format` and `quality`: PNG unless an overlay or heatmap answer asks for JPEG or WebP.
fn image_format(
    pairs: &[(String, String)],
    output: Output,
    heatmap: HeatmapEncoding,
) -> Result<ImageFormat, ApiError> {
    let format = choice(
        pairs,
        "image_format",
        &[
            ("png", ImageFormat::Png),
            (
                "jpeg",
                ImageFormat::Jpeg {
                    quality: DEFAULT_JPEG_QUALITY,
                },
            ),
            ("webp", ImageFormat::WebP),
        ],
        ImageFormat::Png,
    )?;
    let format = match (
        format,
        single::<u8>(pairs, "quality", "an integer from 1 to 100")?,
    ) {
        (ImageFormat::Jpeg { .. }, Some(quality)) if (1..=100).contains(&quality) => {
            ImageFormat::Jpeg { quality }
        }
        (ImageFormat::Jpeg { .. }, Some(quality)) => {
            return Err(invalid(format!(
                "`quality` must be from 1 to 100, got {quality}"
            )));
        }
        (_, Some(_)) => {
            return Err(invalid(
                "`quality` applies to image_format=jpeg only".into(),
            ));
        }
        (format, None) => format,
    };
    if format != ImageFormat::Png && !matches!(output, Output::Overlay | Output::Heatmap) {
        return Err(invalid(
            "`image_format` applies to output=overlay and output=heatmap; JSON answers embed PNGs"
                .into(),
        ));
    }
    if format != ImageFormat::Png && heatmap == HeatmapEncoding::Gray16 {
        return Err(invalid(
            "heatmap=gray16 has 16-bit samples, which only image_format=png holds".into(),
        ));
    }
    Ok(format)
}

fn pairs(query: Option<&str>, allowed: &[&str]) -> Result<Vec<(String, String)>, ApiError> {
    let pairs: Vec<(String, String)> = form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    if let Some((key, _)) = pairs.iter().find(|(k, _)| !allowed.contains(&k.as_str())) {
        return Err(ApiError::new(
            ErrorCode::UnknownParameter,
            format!(
                "unknown query parameter `{key}`; this route takes {}",
                allowed.join(", ")
            ),
        ));
    }
    Ok(pairs)
}

/// The single value of `key`, parsed; a parameter given twice is an error rather than a guess.
fn single<T: std::str::FromStr>(
    pairs: &[(String, String)],
    key: &str,
    expected: &str,
) -> Result<Option<T>, ApiError> {
    let mut values = pairs.iter().filter(|(k, _)| k == key).map(|(_, v)| v);
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(invalid(format!("`{key}` is given more than once")));
    }
    value
        .parse()
        .map(Some)
        .map_err(|_| invalid(format!("`{key}` must be {expected}, got `{value}`")))
}

fn invalid(message: String) -> ApiError {
    ApiError::new(ErrorCode::InvalidParameter, message)
}

fn choice<T: Copy>(
    pairs: &[(String, String)],
    key: &str,
    choices: &[(&str, T)],
    default: T,
) -> Result<T, ApiError> {
    let names: Vec<&str> = choices.iter().map(|(n, _)| *n).collect();
    match single::<String>(pairs, key, "")? {
        None => Ok(default),
        Some(value) => choices
            .iter()
            .find(|(name, _)| *name == value)
            .map(|(_, v)| *v)
            .ok_or_else(|| {
                invalid(format!(
                    "`{key}` must be one of {}, got `{value}`",
                    names.join(", ")
                ))
            }),
    }
}

/// `top_k` for `predict` (default 5, clipped to the class count).
pub fn predict_top_k(query: Option<&str>, model: &ModelInfo) -> Result<usize, ApiError> {
    let pairs = pairs(query, &["top_k"])?;
    let top_k = single::<usize>(&pairs, "top_k", "a positive integer")?.unwrap_or(5);
    if top_k == 0 {
        return Err(invalid("`top_k` must be at least 1".into()));
    }
    Ok(top_k.min(model.num_classes()))
}

/// The query of `explain`: parsed, then checked against the model and the limits (`ExplainOptions::check`).
pub fn parse_explain(
    query: Option<&str>,
    model: &ModelInfo,
    limits: &Limits,
) -> Result<ExplainParams, ApiError> {
    let pairs = pairs(query, EXPLAIN_KEYS)?;
    let targets = parse_targets(&pairs, model)?;
    let (method, eigen_smooth, aug_smooth, trust, max_channels) = parse_method(&pairs)?;
    let layers = resolve_layers(model, single::<String>(&pairs, "layers", "")?.as_deref())?;
    let (output, format) = parse_output(&pairs)?;
    let (heatmap, map_size, alpha, relu) = parse_drawing(&pairs)?;
    let (threshold, max_boxes, box_side) = parse_boxes(&pairs)?;
    let max_side = single::<usize>(&pairs, "max_side", "a positive integer")?
        .unwrap_or(limits.max_output_side);
    if max_side == 0 || max_side > limits.max_output_side {
        return Err(invalid(format!(
            "`max_side` must be from 1 to {}, got {max_side}",
            limits.max_output_side
        )));
    }
    if trust && (format.is_some() || !matches!(output, Output::Json | Output::Raw | Output::Boxes))
    {
        return Err(invalid(
            "`trust` figures are part of JSON answers: use output=json, raw or boxes".into(),
        ));
    }
    let image_format = image_format(&pairs, output, heatmap)?;
    let options = ExplainOptions {
        targets,
        method,
        eigen_smooth,
        aug_smooth,
        max_channels,
        trust,
        threshold,
        // Outputs without boxes don't pay for finding them.
        max_boxes: if format.is_some() || matches!(output, Output::Json | Output::Boxes) {
            max_boxes
        } else {
            0
        },
        layers,
        guided: matches!(output, Output::Guided | Output::GuidedNpy),
        box_side,
        // Only overlays draw the photo's pixels; everything else needs the model's input and the photo's size.
        drawn_side: (format.is_none() && matches!(output, Output::Overlay | Output::Json))
            .then_some(max_side),
    };
    options.check(model, limits)?;
    let count = options.target_count();
    if matches!(output, Output::Overlay | Output::Heatmap | Output::Guided) && count != 1 {
        return Err(ApiError::new(
            ErrorCode::SingleTargetRequired,
            format!(
                "output={} draws one class, {count} were asked for; use output=json for several",
                output_name(output)
            ),
        ));
    }
    Ok(ExplainParams {
        options,
        output,
        alpha,
        heatmap,
        map_size,
        relu,
        max_side,
        format,
        image_format,
    })
}

/// `class` (repeated) or `top_k`; neither: the top class.
fn parse_targets(pairs: &[(String, String)], model: &ModelInfo) -> Result<Targets, ApiError> {
    let classes: Vec<&str> = pairs
        .iter()
        .filter(|(k, _)| k == "class")
        .map(|(_, v)| v.as_str())
        .collect();
    let top_k = single::<usize>(pairs, "top_k", "a positive integer")?;
    Ok(match (classes.is_empty(), top_k) {
        (false, Some(_)) => return Err(invalid("give either `class` or `top_k`, not both".into())),
        (true, None) => Targets::TopK(1),
        (true, Some(0)) => return Err(invalid("`top_k` must be at least 1".into())),
        (true, Some(k)) => Targets::TopK(k),
        (false, None) => Targets::Classes(
            classes
                .iter()
                .map(|c| resolve_class(model, c))
                .collect::<Result<_, _>>()?,
        ),
    })
}

/// `method`, `eigen_smooth`, `aug_smooth`, `trust` and Score-CAM's `max_channels`.
fn parse_method(
    pairs: &[(String, String)],
) -> Result<(CamMethod, bool, bool, bool, usize), ApiError> {
    let methods: Vec<(&str, CamMethod)> = CamMethod::ALL.iter().map(|m| (m.name(), *m)).collect();
    let method = choice(pairs, "method", &methods, CamMethod::GradCam)?;
    let flag = |key| single::<bool>(pairs, key, "true or false").map(|v| v.unwrap_or(false));
    let (eigen_smooth, aug_smooth, trust) =
        (flag("eigen_smooth")?, flag("aug_smooth")?, flag("trust")?);
    let max_channels = single::<usize>(pairs, "max_channels", "a positive integer")?;
    if max_channels.is_some() && method != CamMethod::ScoreCam {
        return Err(invalid(
            "`max_channels` is Score-CAM's budget: it needs method=scorecam".into(),
        ));
    }
    let max_channels = max_channels.unwrap_or(DEFAULT_SCORE_CAM_CHANNELS);
    Ok((method, eigen_smooth, aug_smooth, trust, max_channels))
}

/// `output`, or a labeling tool's `format` in its place.
fn parse_output(pairs: &[(String, String)]) -> Result<(Output, Option<Format>), ApiError> {
    let output = choice(
        pairs,
        "output",
        &[
            ("json", Output::Json),
            ("overlay", Output::Overlay),
            ("heatmap", Output::Heatmap),
            ("raw", Output::Raw),
            ("npy", Output::Npy),
            ("boxes", Output::Boxes),
            ("guided", Output::Guided),
            ("guided_npy", Output::GuidedNpy),
        ],
        Output::Json,
    )?;
    let format = match single::<String>(pairs, "format", "")? {
        None => None,
        Some(_) => Some(choice(pairs, "format", &Format::ALL, Format::Coco)?),
    };
    if format.is_some() && pairs.iter().any(|(k, _)| k == "output") {
        return Err(invalid("give either `output` or `format`, not both".into()));
    }
    Ok((output, format))
}

/// How maps are drawn and returned: `heatmap`, `map_size`, `alpha`, `relu`.
fn parse_drawing(
    pairs: &[(String, String)],
) -> Result<(HeatmapEncoding, MapSize, f32, bool), ApiError> {
    let heatmap = choice(
        pairs,
        "heatmap",
        &[
            ("color", HeatmapEncoding::Color),
            ("gray8", HeatmapEncoding::Gray8),
            ("gray16", HeatmapEncoding::Gray16),
        ],
        HeatmapEncoding::Color,
    )?;
    let map_size = choice(
        pairs,
        "map_size",
        &[
            ("activation", MapSize::Activation),
            ("input", MapSize::Input),
            ("image", MapSize::Image),
        ],
        MapSize::Activation,
    )?;
    // Checked as given (f64), before rounding to f32 could pull 1.0000000000000002 into range.
    let alpha = single::<f64>(pairs, "alpha", "a number from 0 to 1")?.unwrap_or(0.5);
    if !(0.0..=1.0).contains(&alpha) {
        return Err(invalid(format!("`alpha` must be from 0 to 1, got {alpha}")));
    }
    let alpha = alpha as f32;
    let relu = single::<bool>(pairs, "relu", "true or false")?.unwrap_or(true);
    Ok((heatmap, map_size, alpha, relu))
}

/// The range of `box_side`: below it a map has too few cells to box anything, above it the Run costs more than
/// it localizes better (docs/localization.md).
const BOX_SIDES: std::ops::RangeInclusive<usize> = 64..=1024;

/// `threshold`, `max_boxes` and `box_side` (a number, or `input`: boxes from the target Run's map).
fn parse_boxes(pairs: &[(String, String)]) -> Result<(Threshold, usize, Option<usize>), ApiError> {
    let threshold = match single::<String>(pairs, "threshold", "")? {
        None => Threshold::DEFAULT,
        Some(text) => Threshold::parse(&text).ok_or_else(|| {
            invalid(format!(
                "`threshold` must be `otsu` or a number above 0 and at most 1, got `{text}`"
            ))
        })?,
    };
    let max_boxes = single::<usize>(pairs, "max_boxes", "an integer from 0 to 100")?.unwrap_or(1);
    if max_boxes > 100 {
        return Err(invalid(format!(
            "`max_boxes` must be from 0 to 100, got {max_boxes}"
        )));
    }
    let box_side = match single::<String>(pairs, "box_side", "")?.as_deref() {
        None => Some(BOX_SIDE),
        Some("input") => None,
        Some(text) => match text.parse::<usize>() {
            Ok(side) if BOX_SIDES.contains(&side) => Some(side),
            _ => {
                return Err(invalid(format!(
                    "`box_side` must be `input` or a number of pixels from {} to {}, got `{text}`",
                    BOX_SIDES.start(),
                    BOX_SIDES.end()
                )));
            }
        },
    };
    Ok((threshold, max_boxes, box_side))
}

fn output_name(output: Output) -> &'static str {
    match output {
        Output::Json => "json",
        Output::Overlay => "overlay",
        Output::Heatmap => "heatmap",
        Output::Raw => "raw",
        Output::Npy => "npy",
        Output::Boxes => "boxes",
        Output::Guided => "guided",
        Output::GuidedNpy => "guided_npy",
    }
}
