//! Reading a plain classifier: the file decoded with its weights inlined, then its opset, its one image input,
//! the input size and the scores to differentiate found and checked.

use std::collections::{HashMap, HashSet};
use std::path::{Component, Path};

use super::graph::graph;
use super::hugging_face::{self, HuggingFace};
use super::proto::{
    DimensionValue, GraphProto, ModelProto, TensorProto, ValueInfoProto, data_type,
};

/// The file read and checked: the parts every step needs.
pub struct Plain {
    pub model: ModelProto,
    pub opset: i64,
    /// The image input's name.
    pub input: String,
    /// The scores: the graph's output (or the one named), before a final softmax unless it is kept.
    pub output: String,
    pub input_size: [usize; 2],
    /// What Hugging Face's files beside it say (input size, normalization, class names).
    pub hugging_face: HuggingFace,
    pub notes: Vec<String>,
}

/// Reads the file (weights in external files included) and finds its image input, its scores, and the input
/// size (`input_size`, else the size the file declares, else the one Hugging Face's files beside it give).
pub fn read(
    file: &Path,
    output: Option<&str>,
    keep_softmax: bool,
    input_size: Option<[usize; 2]>,
) -> Result<Plain, String> {
    let model = load(file)?;
    let opset = standard_opset(&model)?;
    let graph = graph(&model);
    let image = image_input(graph)?;
    let declared = declared_dims(image)?;
    let hugging_face = hugging_face::beside(file)?;
    let input_size = match input_size
        .or(declared_size(&declared))
        .or(hugging_face.input_size)
    {
        Some(size) => size,
        None => {
            return Err(format!(
                "the image input `{}` has no fixed height and width: give the input size (--input-size H,W, \
                 or overrides.input_size in the config)",
                image.name
            ));
        }
    };
    let input = image.name.clone();
    let (output, note) = scores(graph, output, keep_softmax)?;
    let mut notes: Vec<String> = note.into_iter().collect();
    if hugging_face.preprocess.is_some() {
        notes.push("input size and normalization from preprocessor_config.json beside it".into());
    }
    Ok(Plain {
        model,
        opset,
        input,
        output,
        input_size,
        hugging_face,
        notes,
    })
}

/// The decoded model, with a graph and with its external weights read into it.
fn load(file: &Path) -> Result<ModelProto, String> {
    let bytes = std::fs::read(file).map_err(|e| format!("cannot read it: {e}"))?;
    let mut model = ModelProto::decode_bytes(&bytes)?;
    let graph = model.graph.as_mut().ok_or("the file has no graph")?;
    inline_external_data(graph, file.parent().unwrap_or(Path::new(".")))?;
    Ok(model)
}

/// The version of the standard ONNX opset the file imports; the rules assume 11 or later.
fn standard_opset(model: &ModelProto) -> Result<i64, String> {
    let opset = model
        .opset_import
        .iter()
        .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map(|o| o.version)
        .ok_or("the file imports no standard ONNX opset")?;
    if opset < 11 {
        return Err(format!(
            "opset {opset} is older than 11: convert it with onnx.version_converter first"
        ));
    }
    Ok(opset)
}

/// The graph's one input that is not an initializer (older exporters list weights as inputs too).
fn image_input(graph: &GraphProto) -> Result<&ValueInfoProto, String> {
    let initializers: HashSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let inputs: Vec<&ValueInfoProto> = graph
        .input
        .iter()
        .filter(|i| !initializers.contains(i.name.as_str()))
        .collect();
    match inputs.as_slice() {
        [image] => Ok(image),
        _ => {
            let names: Vec<&str> = inputs.iter().map(|i| i.name.as_str()).collect();
            Err(format!(
                "a plain classifier has one image input; this one has {names:?}"
            ))
        }
    }
}

/// The image input's declared dims (None: open), after checking it is float32 and, where declared, 4-D.
fn declared_dims(image: &ValueInfoProto) -> Result<Vec<Option<i64>>, String> {
    let declared = image.tensor_type();
    if declared.is_some_and(|t| t.elem_type != data_type::FLOAT) {
        return Err(format!("the image input `{}` is not float32", image.name));
    }
    let dims: Vec<Option<i64>> = declared
        .and_then(|t| t.shape.as_ref())
        .map(|s| {
            s.dim
                .iter()
                .map(|d| match d.value {
                    Some(DimensionValue::DimValue(v)) if v > 0 => Some(v),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    if !dims.is_empty() && dims.len() != 4 {
        return Err(format!(
            "the image input `{}` has rank {}, expected 4 [N,3,H,W]",
            image.name,
            dims.len()
        ));
    }
    Ok(dims)
}

fn declared_size(declared: &[Option<i64>]) -> Option<[usize; 2]> {
    match declared.get(2..4) {
        Some(&[Some(h), Some(w)]) => Some([h as usize, w as usize]),
        _ => None,
    }
}

/// The tensor to differentiate (`output`, else the graph's first output), stepping back over a final Softmax or
/// LogSoftmax unless `keep_softmax` (through a softmax, a confident class's gradient vanishes). The note says
/// when it stepped back.
fn scores(
    graph: &GraphProto,
    output: Option<&str>,
    keep_softmax: bool,
) -> Result<(String, Option<String>), String> {
    let output = match output {
        Some(o) => o.to_owned(),
        None => graph
            .output
            .first()
            .ok_or("the graph has no output")?
            .name
            .clone(),
    };
    let producer = graph
        .node
        .iter()
        .find(|n| n.output.contains(&output))
        .ok_or_else(|| format!("no node computes the output `{output}`"))?;
    if keep_softmax || !matches!(producer.op_type.as_str(), "Softmax" | "LogSoftmax") {
        return Ok((output, None));
    }
    let note = format!(
        "differentiating the scores before the final {}",
        producer.op_type
    );
    Ok((producer.input[0].clone(), Some(note)))
}

/// Reads weights stored beside the model (ONNX external data, as the dynamo exporter writes them) into the
/// graph: the augmented model is handed to ONNX Runtime from memory, where relative locations mean nothing.
fn inline_external_data(graph: &mut GraphProto, dir: &Path) -> Result<(), String> {
    let mut files: HashMap<String, Vec<u8>> = HashMap::new();
    for tensor in graph
        .initializer
        .iter_mut()
        .filter(|t| t.data_location == 1)
    {
        let stored = Stored::of(tensor)?;
        if !files.contains_key(&stored.location) {
            let data = std::fs::read(dir.join(&stored.location))
                .map_err(|e| format!("cannot read its weights file `{}`: {e}", stored.location))?;
            files.insert(stored.location.clone(), data);
        }
        tensor.raw_data = stored
            .bytes(&files[&stored.location], &tensor.name)?
            .to_vec();
        tensor.external_data.clear();
        tensor.data_location = 0;
    }
    Ok(())
}

/// Where an external weight lies: a file in the model's own folder, and a byte range of it.
struct Stored {
    location: String,
    offset: usize,
    length: Option<usize>,
}

impl Stored {
    fn of(tensor: &TensorProto) -> Result<Stored, String> {
        let entry = |key: &str| {
            tensor
                .external_data
                .iter()
                .find(|e| e.key == key)
                .map(|e| e.value.clone())
        };
        let location = entry("location")
            .ok_or_else(|| format!("weight `{}` has no external location", tensor.name))?;
        let number = |key: &str| {
            entry(key)
                .map(|v| {
                    v.parse::<usize>()
                        .map_err(|_| format!("weight `{}`: bad {key}", tensor.name))
                })
                .transpose()
        };
        let offset = number("offset")?.unwrap_or(0);
        let length = number("length")?;
        // Only plain relative paths, so a model cannot make camserve read files elsewhere.
        if !Path::new(&location)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
        {
            return Err(format!(
                "weight `{}` is stored at `{location}`, outside the model's folder",
                tensor.name
            ));
        }
        Ok(Stored {
            location,
            offset,
            length,
        })
    }

    fn bytes<'a>(&self, data: &'a [u8], name: &str) -> Result<&'a [u8], String> {
        let end = self.length.map_or(data.len(), |l| self.offset + l);
        data.get(self.offset..end)
            .ok_or_else(|| format!("weight `{name}` lies past the end of `{}`", self.location))
    }
}
