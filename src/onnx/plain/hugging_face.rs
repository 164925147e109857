//! The files Hugging Face writes beside a model (`save_pretrained`, and optimum's ONNX export):
//! `preprocessor_config.json` gives the input size and normalization, `config.json` the class names. A plain
//! classifier in such a folder takes them where nothing more specific says otherwise (the config's overrides,
//! the size the file declares).

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

/// What the folder's Hugging Face files say; all None where there are none.
#[derive(Debug, Default)]
pub struct HuggingFace {
    /// [height, width]: the crop where the processor crops, else its resize.
    pub input_size: Option<[usize; 2]>,
    /// The `camserve.preprocess` metadata (JSON).
    pub preprocess: Option<String>,
    /// `id2label` in id order, unless it holds only the placeholder names `LABEL_i`.
    pub labels: Option<Vec<String>>,
}

/// The keys of an image processor's `preprocessor_config.json` that decide the model's input.
#[derive(Deserialize)]
struct ImageProcessor {
    size: Option<Size>,
    crop_size: Option<Size>,
    do_center_crop: Option<bool>,
    do_rescale: Option<bool>,
    rescale_factor: Option<f32>,
    do_normalize: Option<bool>,
    image_mean: Option<[f32; 3]>,
    image_std: Option<[f32; 3]>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Size {
    HeightWidth { height: usize, width: usize },
    ShortestEdge { shortest_edge: usize },
    Side(usize),
}

impl Size {
    /// As camserve resizes (stretching to a fixed size): a shortest edge of s is s x s.
    fn height_width(&self) -> [usize; 2] {
        match *self {
            Size::HeightWidth { height, width } => [height, width],
            Size::ShortestEdge {
                shortest_edge: side,
            }
            | Size::Side(side) => [side, side],
        }
    }
}

#[derive(Deserialize)]
struct ModelConfig {
    id2label: Option<BTreeMap<String, String>>,
}

/// Reads the Hugging Face files in the folder of `file`, if any; a file that is there but unreadable is an
/// error that names it.
pub fn beside(file: &Path) -> Result<HuggingFace, String> {
    let folder = file.parent().unwrap_or(Path::new("."));
    let processor: Option<ImageProcessor> = read_json(&folder.join("preprocessor_config.json"))?;
    let config: Option<ModelConfig> = read_json(&folder.join("config.json"))?;
    let Some(processor) = processor else {
        return Ok(HuggingFace {
            labels: config.and_then(labels),
            ..Default::default()
        });
    };
    let size = match (processor.do_center_crop, &processor.crop_size) {
        (Some(true), Some(crop)) => Some(crop),
        _ => processor.size.as_ref(),
    };
    let normalize = processor.do_normalize.unwrap_or(true);
    let mean = normalize.then_some(processor.image_mean).flatten();
    let std = normalize.then_some(processor.image_std).flatten();
    let top = match processor.do_rescale.unwrap_or(true) {
        true => 255.0 * processor.rescale_factor.unwrap_or(1.0 / 255.0),
        false => 255.0,
    };
    let preprocess = serde_json::json!({
        "resize": "stretch",
        "mean": mean.unwrap_or([0.0; 3]),
        "std": std.unwrap_or([1.0; 3]),
        "channel_order": "RGB",
        "value_range": [0.0, top],
    });
    Ok(HuggingFace {
        input_size: size.map(Size::height_width),
        preprocess: Some(preprocess.to_string()),
        labels: config.and_then(labels),
    })
}

/// The class names in id order, where the ids are 0..n and not every name is the placeholder `LABEL_i`.
fn labels(config: ModelConfig) -> Option<Vec<String>> {
    let id2label = config.id2label?;
    let mut by_id: Vec<(usize, String)> = id2label
        .into_iter()
        .map(|(id, label)| Some((id.parse().ok()?, label)))
        .collect::<Option<_>>()?;
    by_id.sort();
    let in_order = by_id.iter().enumerate().all(|(i, (id, _))| i == *id);
    let placeholders = by_id
        .iter()
        .all(|(id, label)| *label == format!("LABEL_{id}"));
    (in_order && !placeholders).then(|| by_id.into_iter().map(|(_, label)| label).collect())
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, String> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            format!(
                "{} beside it is not what Hugging Face writes: {e}",
                path.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh folder under the system's temporary one holding `files`.
    fn folder_with(test: &str, files: &[(&str, &str)]) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("camserve-hf-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for (name, text) in files {
            std::fs::write(dir.join(name), text).unwrap();
        }
        dir
    }

    #[test]
    fn a_vit_processor_gives_its_size_normalization_and_names() {
        let dir = folder_with(
            "vit",
            &[
                (
                    "preprocessor_config.json",
                    r#"{"do_normalize": true, "do_rescale": true, "image_mean": [0.5, 0.5, 0.5],
                    "image_std": [0.5, 0.5, 0.5], "rescale_factor": 0.00392156862745098,
                    "size": {"height": 64, "width": 48}}"#,
                ),
                ("config.json", r#"{"id2label": {"1": "dog", "0": "cat"}}"#),
            ],
        );
        let hf = beside(&dir.join("model.onnx")).unwrap();
        assert_eq!(hf.input_size, Some([64, 48]));
        let preprocess: serde_json::Value =
            serde_json::from_str(hf.preprocess.as_deref().unwrap()).unwrap();
        assert_eq!(preprocess["mean"], serde_json::json!([0.5, 0.5, 0.5]));
        assert_eq!(preprocess["value_range"][1].as_f64().unwrap(), 1.0);
        assert_eq!(hf.labels, Some(vec!["cat".to_owned(), "dog".to_owned()]));
    }

    #[test]
    fn a_crop_wins_over_the_resize_and_placeholder_names_are_no_names() {
        let dir = folder_with(
            "crop",
            &[
                (
                    "preprocessor_config.json",
                    r#"{"size": {"shortest_edge": 256}, "do_center_crop": true, "crop_size": 224,
                    "do_normalize": false}"#,
                ),
                (
                    "config.json",
                    r#"{"id2label": {"0": "LABEL_0", "1": "LABEL_1"}}"#,
                ),
            ],
        );
        let hf = beside(&dir.join("model.onnx")).unwrap();
        assert_eq!(hf.input_size, Some([224, 224]));
        let preprocess: serde_json::Value =
            serde_json::from_str(hf.preprocess.as_deref().unwrap()).unwrap();
        assert_eq!(preprocess["std"], serde_json::json!([1.0, 1.0, 1.0]));
        assert_eq!(hf.labels, None);
    }

    #[test]
    fn no_files_say_nothing_and_a_broken_one_is_named() {
        let empty = folder_with("empty", &[]);
        let hf = beside(&empty.join("model.onnx")).unwrap();
        assert!(hf.input_size.is_none() && hf.preprocess.is_none() && hf.labels.is_none());
        let broken = folder_with("broken", &[("preprocessor_config.json", "{")]);
        let error = beside(&broken.join("model.onnx")).unwrap_err();
        assert!(error.contains("preprocessor_config.json"), "{error}");
    }
}
