//! A model file checked against camserve's contract (DESIGN.md §1), its metadata, and one Run of it.
//!
//! Contract v1: inputs `input` f32 [N,3,H,W] and `class_weights` f32 [N,K,C]; outputs `logits` f32 [N,C],
//! `activations` f32 [N,Ch,h,w], `gradients` f32 [N,K,Ch,h,w] and `target_class` i64 [N,K]. An all-zero seed row
//! k asks for the model's k-th best class.
//!
//! Optional outputs (the exporter's `--guided` and `--extra-layer`): `input_gradients` f32 [N,K,3,H,W], guided
//! backpropagation to the input, for Guided Grad-CAM; `activations_i` f32 [N,Ch,h,w] and `gradients_i` f32
//! [N,K,Ch,h,w] for extra target layers i = 1, 2, ..., named by the metadata `camserve.target_layers`.

use std::path::{Path, PathBuf};

use ort::session::Session;
use ort::value::{Outlet, TensorElementType, TensorRef, ValueType};
use serde::Deserialize;

use crate::config::{ExecutionProvider, ModelConfig, ModelOverrides};
use crate::engine::{Role, Worker};
use crate::plain::PlainModel;
use crate::preprocess::{ChannelOrder, Preprocess};
use crate::runtime::Runtime;

pub const CONTRACT_VERSION: &str = "1";

/// (name, element type, rank) of every input and output the contract requires.
const INPUTS: [(&str, TensorElementType, usize); 2] = [
    ("input", TensorElementType::Float32, 4),
    ("class_weights", TensorElementType::Float32, 3),
];
const OUTPUTS: [(&str, TensorElementType, usize); 4] = [
    ("logits", TensorElementType::Float32, 2),
    ("activations", TensorElementType::Float32, 4),
    ("gradients", TensorElementType::Float32, 5),
    ("target_class", TensorElementType::Int64, 2),
];
const INPUT_GRADIENTS: &str = "input_gradients";

/// What the service knows about a loaded model; immutable once loaded.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub name: String,
    pub file: PathBuf,
    pub labels: Vec<String>,
    pub target_layer: String,
    /// Extra target layers: outputs `activations_i` / `gradients_i` for `extra_layers[i - 1]`.
    pub extra_layers: Vec<String>,
    /// Whether the model has `input_gradients` (guided backpropagation), which Guided Grad-CAM needs.
    pub guided: bool,
    pub preprocess: Preprocess,
    /// [channels, height, width] of the target layer at the model's input size.
    pub activation_shape: [usize; 3],
    /// The execution provider the sessions really run on.
    pub device: ExecutionProvider,
    pub source: Option<String>,
}

impl ModelInfo {
    pub fn num_classes(&self) -> usize {
        self.labels.len()
    }

    /// Every target layer `layers=` can combine, by index: the target layer first, then the extra ones.
    pub fn layer_names(&self) -> Vec<&str> {
        std::iter::once(self.target_layer.as_str())
            .chain(self.extra_layers.iter().map(String::as_str))
            .collect()
    }

    /// A class given as an index or as a label (exact, else case-insensitive when that is unambiguous).
    pub fn class_index(&self, class: &str) -> Option<usize> {
        if let Ok(index) = class.parse::<usize>() {
            return (index < self.num_classes()).then_some(index);
        }
        if let Some(index) = self.labels.iter().position(|l| l == class) {
            return Some(index);
        }
        let mut matches = self
            .labels
            .iter()
            .enumerate()
            .filter(|(_, l)| l.eq_ignore_ascii_case(class));
        match (matches.next(), matches.next()) {
            (Some((index, _)), None) => Some(index),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("model `{name}` ({file}) refused: {reason}")]
pub struct ModelError {
    pub name: String,
    pub file: PathBuf,
    pub reason: String,
}

/// The outputs of one Run for one image: logits [C], activations [Ch,h,w], gradients [K,Ch,h,w], classes [K].
#[derive(Debug, Clone)]
pub struct RunOutput {
    pub logits: Vec<f32>,
    pub activations: Vec<f32>,
    pub activation_shape: [usize; 3],
    pub gradients: Vec<f32>,
    pub target_class: Vec<usize>,
    /// The extra target layers, when the model has them, in its order.
    pub extra_layers: Vec<Layer>,
    /// `input_gradients` [K,3,H,W], when the model has them.
    pub input_gradients: Option<Vec<f32>>,
}

/// One extra target layer's outputs for one image: activations [Ch,h,w], gradients [K,Ch,h,w].
#[derive(Debug, Clone)]
pub struct Layer {
    pub activations: Vec<f32>,
    pub activation_shape: [usize; 3],
    pub gradients: Vec<f32>,
}

impl RunOutput {
    /// The gradient block of the k-th seed, [Ch,h,w].
    pub fn gradient(&self, k: usize) -> &[f32] {
        let len = self.activations.len();
        &self.gradients[k * len..(k + 1) * len]
    }
}

impl Layer {
    /// The gradient block of the k-th seed, [Ch,h,w].
    pub fn gradient(&self, k: usize) -> &[f32] {
        let len = self.activations.len();
        &self.gradients[k * len..(k + 1) * len]
    }
}

/// One Run over a batch: `inputs` holds N preprocessed images [N,3,H,W], `seeds` N x K rows of C class
/// weights. Returns one output per image, with the optional outputs the model has: ONNX Runtime runs the whole
/// graph whatever outputs are fetched, so a model exported with them pays for them on every Run.
pub fn run(
    session: &mut Session,
    inputs: &[f32],
    size: [usize; 2],
    seeds: &[f32],
    k: usize,
) -> ort::Result<Vec<RunOutput>> {
    let n = inputs.len() / (3 * size[0] * size[1]);
    let classes = seeds.len() / (n * k);
    let extra_layers = extra_layer_count(session);
    let guided = has_output(session, INPUT_GRADIENTS);
    let outputs = session.run(ort::inputs![
        "input" => TensorRef::from_array_view(([n, 3, size[0], size[1]], inputs))?,
        "class_weights" => TensorRef::from_array_view(([n, k, classes], seeds))?,
    ])?;
    let (_, logits) = outputs["logits"].try_extract_tensor::<f32>()?;
    let (act_shape, activations) = outputs["activations"].try_extract_tensor::<f32>()?;
    let (_, gradients) = outputs["gradients"].try_extract_tensor::<f32>()?;
    let (_, target_class) = outputs["target_class"].try_extract_tensor::<i64>()?;
    let activation_shape = [
        act_shape[1] as usize,
        act_shape[2] as usize,
        act_shape[3] as usize,
    ];
    let shape_error =
        |what: &str| ort::Error::new(format!("the model returned {what} of an unexpected size"));
    if logits.len() != n * classes || activations.len() % n != 0 {
        return Err(shape_error("logits or activations"));
    }
    if gradients.len() != k * activations.len() {
        return Err(shape_error("gradients"));
    }
    if target_class.len() != n * k || target_class.iter().any(|&c| c < 0 || c as usize >= classes) {
        return Err(shape_error("target_class"));
    }
    let mut layers = Vec::with_capacity(extra_layers);
    for i in 1..=extra_layers {
        let (shape, activations) =
            outputs[format!("activations_{i}").as_str()].try_extract_tensor::<f32>()?;
        let (_, gradients) =
            outputs[format!("gradients_{i}").as_str()].try_extract_tensor::<f32>()?;
        if shape.len() != 4
            || activations.len() % n != 0
            || gradients.len() != k * activations.len()
        {
            return Err(shape_error(&format!("activations_{i} or gradients_{i}")));
        }
        let shape = [shape[1] as usize, shape[2] as usize, shape[3] as usize];
        layers.push((shape, activations, gradients));
    }
    let input_gradients = if guided {
        let (_, values) = outputs[INPUT_GRADIENTS].try_extract_tensor::<f32>()?;
        if values.len() != k * inputs.len() {
            return Err(shape_error(INPUT_GRADIENTS));
        }
        Some(values)
    } else {
        None
    };
    let per_image = activations.len() / n;
    // Image i's block of an output whose rows are images (`per_row` values each).
    let block = |values: &[f32], i: usize| {
        let per_row = values.len() / n;
        values[i * per_row..(i + 1) * per_row].to_vec()
    };
    Ok((0..n)
        .map(|i| RunOutput {
            logits: logits[i * classes..(i + 1) * classes].to_vec(),
            activations: activations[i * per_image..(i + 1) * per_image].to_vec(),
            activation_shape,
            gradients: gradients[i * k * per_image..(i + 1) * k * per_image].to_vec(),
            target_class: target_class[i * k..(i + 1) * k]
                .iter()
                .map(|&c| c as usize)
                .collect(),
            extra_layers: layers
                .iter()
                .map(|(shape, a, g)| Layer {
                    activations: block(a, i),
                    activation_shape: *shape,
                    gradients: block(g, i),
                })
                .collect(),
            input_gradients: input_gradients.map(|values| block(values, i)),
        })
        .collect())
}

/// How many `activations_i` outputs the model has (i = 1, 2, ... without gaps; the contract check ensures it).
fn extra_layer_count(session: &Session) -> usize {
    (1..)
        .take_while(|i| has_output(session, &format!("activations_{i}")))
        .count()
}

fn has_output(session: &Session, name: &str) -> bool {
    session.outputs().iter().any(|o| o.name() == name)
}

/// Opens `config.sessions` sessions, checks the contract and the metadata, and probes the model once. With
/// `split_under_load` and several threads on the CPU, each session also gets that many one-thread sessions for
/// the same cores, which serve under load.
pub fn load(
    runtime: &Runtime,
    config: &ModelConfig,
) -> Result<(ModelInfo, Vec<Worker>), ModelError> {
    let refuse = |reason: String| ModelError {
        name: config.name.clone(),
        file: config.file.clone(),
        reason,
    };
    if !config.file.is_file() {
        return Err(refuse("the file does not exist".into()));
    }
    let augmented = match &config.plain {
        Some(plain) => Some(augment(runtime, config, plain).map_err(refuse)?),
        None => None,
    };
    let augmented = augmented.as_deref();
    let (mut first, device) =
        open_session(runtime, config, augmented, config.threads).map_err(refuse)?;

    let problems = signature_problems(&first);
    if !problems.is_empty() {
        return Err(refuse(format!(
            "it does not meet camserve contract v{CONTRACT_VERSION}: {}",
            problems.join("; ")
        )));
    }
    let meta = read_metadata(&first, &config.overrides).map_err(refuse)?;
    let classes_in_graph = [
        static_dim(&first, true, "logits", 1),
        static_dim(&first, false, "class_weights", 2),
    ];
    for (what, dim) in ["logits", "class_weights"].iter().zip(classes_in_graph) {
        if let Some(dim) = dim.filter(|&d| d != meta.labels.len()) {
            return Err(refuse(format!(
                "{what} has {dim} classes but there are {} labels",
                meta.labels.len()
            )));
        }
    }
    let extra_layers = extra_layer_names(&first, &meta).map_err(refuse)?;
    let guided = has_output(&first, INPUT_GRADIENTS);
    let activation_shape = probe(&mut first, &meta).map_err(refuse)?;

    let split = config.split_under_load && config.threads > 1 && device == ExecutionProvider::Cpu;
    let worker = |session, threads, role| Worker {
        session,
        threads,
        role,
    };
    let role = if split { Role::Alone } else { Role::Always };
    let mut workers = vec![worker(first, config.threads, role)];
    for _ in 1..config.sessions {
        let session = open_session(runtime, config, augmented, config.threads).map_err(refuse)?;
        workers.push(worker(session.0, config.threads, role));
    }
    if split {
        for _ in 0..config.sessions * config.threads {
            let session = open_session(runtime, config, augmented, 1).map_err(refuse)?;
            workers.push(worker(session.0, 1, Role::UnderLoad));
        }
    }
    let info = ModelInfo {
        name: config.name.clone(),
        file: config.file.clone(),
        labels: meta.labels,
        target_layer: meta.target_layer,
        extra_layers,
        guided,
        preprocess: meta.preprocess,
        activation_shape,
        device,
        source: meta.source,
    };
    Ok((info, workers))
}

/// The extra layers' names from `camserve.target_layers`, which must name the primary and every extra layer.
fn extra_layer_names(session: &Session, meta: &Metadata) -> Result<Vec<String>, String> {
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

/// A plain classifier in contract form (`crate::plain`), in memory.
fn augment(runtime: &Runtime, config: &ModelConfig, plain: &PlainModel) -> Result<Vec<u8>, String> {
    let augmented =
        crate::plain::augment(runtime, &config.file, plain, config.overrides.input_size)
            .map_err(|e| format!("as a plain classifier with target `{}`: {e}", plain.target))?;
    tracing::info!(
        model = %config.name,
        target = %plain.target,
        head = %augmented.head_ops.join(" "),
        backward_nodes = augmented.backward_nodes,
        probe_ms = augmented.probe_time.as_secs_f64() * 1e3,
        edit_ms = augmented.edit_time.as_secs_f64() * 1e3,
        notes = ?augmented.notes,
        "plain classifier augmented"
    );
    Ok(augmented.model)
}

/// Builds a session (from `augmented` when given, else the file) on the first execution provider that registers; ONNX Runtime would otherwise fall back to CPU
/// without a word, so each failure is logged and the device that was really obtained is returned.
fn open_session(
    runtime: &Runtime,
    config: &ModelConfig,
    augmented: Option<&[u8]>,
    threads: usize,
) -> Result<(Session, ExecutionProvider), String> {
    let ort_error = |e: ort::Error| format!("ONNX Runtime cannot open it: {e}");
    let mut builder = Session::builder(&runtime.environment)
        .and_then(|b| Ok(b.with_intra_threads(threads)?.with_inter_threads(1)?))
        .map_err(ort_error)?;
    let mut device = ExecutionProvider::Cpu;
    for provider in &config.execution_providers {
        match provider {
            ExecutionProvider::Cpu => break,
            ExecutionProvider::Cuda => {
                // TF32 trades float32 precision for speed; on an H200 it moved logits past the batch probe's 1e-4 and
                // maps by 5e-4. Explanations must match the CPU's.
                let cuda = ort::ep::CUDA::default()
                    .with_tf32(false)
                    .build()
                    .error_on_failure();
                match builder.with_execution_providers([cuda]) {
                    Ok(b) => {
                        builder = b;
                        device = ExecutionProvider::Cuda;
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(model = %config.name, error = %e, "CUDA execution provider unavailable");
                        builder = e.recover();
                    }
                }
            }
        }
    }
    if !config.execution_providers.contains(&device) {
        return Err(format!(
            "none of the execution providers {:?} is available",
            config.execution_providers
        ));
    }
    let session = match augmented {
        Some(bytes) => builder.commit_from_memory(bytes),
        None => builder.commit_from_file(&config.file),
    }
    .map_err(ort_error)?;
    Ok((session, device))
}

/// Every way the session's inputs and outputs differ from the contract, in words.
fn signature_problems(session: &Session) -> Vec<String> {
    let mut problems = Vec::new();
    let mut check =
        |kind: &str, outlets: &[Outlet], (name, ty, rank): (&str, TensorElementType, usize)| {
            let Some(outlet) = outlets.iter().find(|o| o.name() == name) else {
                problems.push(format!(
                    "missing {kind} `{name}` ({} rank {rank})",
                    type_name(ty)
                ));
                return;
            };
            match outlet.dtype() {
                ValueType::Tensor {
                    ty: actual, shape, ..
                } => {
                    if *actual != ty {
                        problems.push(format!(
                            "{kind} `{name}` is {}, expected {}",
                            type_name(*actual),
                            type_name(ty)
                        ));
                    }
                    if shape.len() != rank {
                        problems.push(format!(
                            "{kind} `{name}` has rank {}, expected {rank}",
                            shape.len()
                        ));
                    }
                }
                _ => problems.push(format!("{kind} `{name}` is not a tensor")),
            }
        };
    for spec in INPUTS {
        check("input", session.inputs(), spec);
    }
    for spec in OUTPUTS {
        check("output", session.outputs(), spec);
    }
    // The optional outputs, where present.
    if has_output(session, INPUT_GRADIENTS) {
        check(
            "output",
            session.outputs(),
            (INPUT_GRADIENTS, TensorElementType::Float32, 5),
        );
    }
    let extra = extra_layer_count(session);
    for i in 1..=extra {
        let activations = format!("activations_{i}");
        let gradients = format!("gradients_{i}");
        check(
            "output",
            session.outputs(),
            (&activations, TensorElementType::Float32, 4),
        );
        check(
            "output",
            session.outputs(),
            (&gradients, TensorElementType::Float32, 5),
        );
    }
    let stray = session.outputs().iter().map(|o| o.name()).find(|name| {
        let numbered = |prefix: &str| {
            name.strip_prefix(prefix)
                .and_then(|i| i.parse::<usize>().ok())
                .is_some_and(|i| i > extra)
        };
        numbered("activations_") || numbered("gradients_")
    });
    if let Some(name) = stray {
        problems.push(format!(
            "output `{name}` does not follow activations_1..activations_{extra} (extra layers are numbered from 1, \
             each with its gradients_i)"
        ));
    }
    problems
}

fn type_name(ty: TensorElementType) -> String {
    match ty {
        TensorElementType::Float32 => "float32".into(),
        TensorElementType::Int64 => "int64".into(),
        other => format!("{other:?}").to_lowercase(),
    }
}

fn static_dim(session: &Session, output: bool, name: &str, axis: usize) -> Option<usize> {
    let outlets = if output {
        session.outputs()
    } else {
        session.inputs()
    };
    let ValueType::Tensor { shape, .. } = outlets.iter().find(|o| o.name() == name)?.dtype() else {
        return None;
    };
    usize::try_from(*shape.get(axis)?).ok()
}

struct Metadata {
    labels: Vec<String>,
    target_layer: String,
    /// `camserve.target_layers`: every target layer, the primary first (only models with extra layers have it).
    target_layers: Option<Vec<String>>,
    preprocess: Preprocess,
    source: Option<String>,
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
fn read_metadata(session: &Session, overrides: &ModelOverrides) -> Result<Metadata, String> {
    let metadata = session
        .metadata()
        .map_err(|e| format!("cannot read its metadata: {e}"))?;
    let get = |key: &str| metadata.custom(&format!("camserve.{key}"));
    let mut problems = Vec::new();

    if let Some(version) = get("contract_version").filter(|v| v != CONTRACT_VERSION) {
        problems.push(format!("metadata `camserve.contract_version` is {version:?}, this server speaks {CONTRACT_VERSION:?}"));
    }
    let labels = match &overrides.labels_file {
        Some(path) => read_labels_file(path).map_err(|e| problems.push(e)).ok(),
        None => parse_key(
            get("labels"),
            "labels",
            "a JSON array of class names",
            &mut problems,
        ),
    };
    let target_layer = overrides
        .target_layer
        .clone()
        .or_else(|| get("target_layer"))
        .unwrap_or_default();
    let input_size = overrides.input_size.or_else(|| {
        parse_key::<[usize; 2]>(
            get("input_size"),
            "input_size",
            "JSON [height, width]",
            &mut problems,
        )
    });
    let meta = if [overrides.mean, overrides.std].iter().all(Option::is_some)
        && overrides.channel_order.is_some()
    {
        None
    } else {
        parse_key::<PreprocessMetadata>(
            get("preprocess"),
            "preprocess",
            "a JSON object",
            &mut problems,
        )
    };
    if let Some(meta) = &meta
        && meta.resize != "stretch"
    {
        problems.push(format!(
            "metadata `camserve.preprocess.resize` is {:?}; only \"stretch\" is supported",
            meta.resize
        ));
    }
    let channel_order = overrides
        .channel_order
        .clone()
        .or(meta.as_ref().map(|m| m.channel_order.clone()));
    let channel_order = match channel_order.as_deref() {
        Some("RGB") | None => ChannelOrder::Rgb,
        Some("BGR") => ChannelOrder::Bgr,
        Some(other) => {
            problems.push(format!(
                "channel_order {other:?} is neither \"RGB\" nor \"BGR\""
            ));
            ChannelOrder::Rgb
        }
    };
    if let Some(labels) = &labels
        && labels.is_empty()
    {
        problems.push("the label list is empty".into());
    }
    match (labels, input_size) {
        (Some(labels), Some([height, width])) if problems.is_empty() => {
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
                return Err("std must be non-zero and input_size positive".into());
            }
            Ok(Metadata {
                labels,
                target_layer,
                target_layers: get("target_layers")
                    .and_then(|v| serde_json::from_str::<Vec<String>>(&v).ok()),
                preprocess: Preprocess {
                    width,
                    height,
                    mean,
                    std,
                    channel_order,
                    value_range: (lo, hi),
                },
                source: get("source"),
            })
        }
        _ => Err(format!(
            "{} (export it with camserve-export, or set the values under [models.overrides])",
            problems.join("; ")
        )),
    }
}

fn parse_key<T: for<'de> Deserialize<'de>>(
    value: Option<String>,
    key: &str,
    expected: &str,
    problems: &mut Vec<String>,
) -> Option<T> {
    let Some(value) = value else {
        problems.push(format!("metadata `camserve.{key}` is missing"));
        return None;
    };
    serde_json::from_str(&value)
        .map_err(|e| problems.push(format!("metadata `camserve.{key}` is not {expected}: {e}")))
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

/// Runs the model once on a fixed pattern and checks what the contract promises: the shapes, that seeds pick the
/// classes they name, that an all-zero row picks the k-th best class, and that gradients change with the class
/// (a gradient that ignores the seed is the signature of a broken export). Doubles as the warm-up Run.
fn probe(session: &mut Session, meta: &Metadata) -> Result<[usize; 3], String> {
    let (height, width) = (meta.preprocess.height, meta.preprocess.width);
    let classes = meta.labels.len();
    let input: Vec<f32> = (0..3 * height * width)
        .map(|i| ((i % 251) as f32 / 125.0 - 1.0) * 0.7)
        .collect();
    // Seeds: class 0, class 1, then an all-zero row (k = 2: the third best class).
    let k = classes.min(3);
    let mut seeds = vec![0.0f32; k * classes];
    for (row, class) in (0..k.min(2)).enumerate() {
        seeds[row * classes + class] = 1.0;
    }
    let single = run(session, &input, [height, width], &seeds, k)
        .map_err(|e| format!("the probe Run failed: {e}"))?
        .remove(0);
    // The same image twice in one Run: batching needs a dynamic batch dimension and must not mix images.
    let twice = [input.as_slice(), &input].concat();
    let out = run(
        session,
        &twice,
        [height, width],
        &[seeds.as_slice(), &seeds].concat(),
        k,
    )
    .map_err(|e| format!("a Run on a batch of 2 failed (is the batch dimension dynamic?): {e}"))?
    .remove(1);
    let differs = crate::cam::relative_difference(&out.logits, &single.logits);
    if differs > 1e-4 {
        return Err(format!(
            "the second image of a batch of 2 gets logits {differs:.1e} (relative) away from the same image alone"
        ));
    }
    if out.logits.len() != classes {
        return Err(format!(
            "logits has {} classes but there are {classes} labels",
            out.logits.len()
        ));
    }
    let extra_values = out
        .extra_layers
        .iter()
        .flat_map(|l| l.activations.iter().chain(&l.gradients))
        .chain(out.input_gradients.iter().flatten());
    if out
        .logits
        .iter()
        .chain(&out.gradients)
        .chain(extra_values)
        .any(|v| !v.is_finite())
    {
        return Err("the probe Run returned NaN or infinite values".into());
    }
    let explicit: Vec<usize> = (0..k.min(2)).collect();
    if out.target_class[..explicit.len()] != explicit[..] {
        return Err(format!(
            "target_class is {:?} for one-hot seeds of classes {explicit:?}",
            out.target_class
        ));
    }
    if k == 3 {
        let third_best = crate::explain::ranked(&out.logits)[2];
        if out.target_class[2] != third_best {
            return Err(format!(
                "an all-zero seed in row 2 resolved to class {} instead of the 3rd best class {third_best}",
                out.target_class[2]
            ));
        }
    }
    if k >= 2 {
        let (g0, g1) = (out.gradient(0), out.gradient(1));
        let scale = g0.iter().chain(g1).fold(0.0f32, |m, v| m.max(v.abs()));
        let diff = g0
            .iter()
            .zip(g1)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        if scale == 0.0 || diff <= 1e-6 * scale {
            return Err("gradients do not change with the chosen class (a broken export)".into());
        }
    }
    Ok(out.activation_shape)
}
