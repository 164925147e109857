//! A model file checked against camserve's contract (`contract`): its sessions, its metadata, and the probe Run
//! that proves it computes what the contract promises.

use std::path::PathBuf;

use ort::session::Session;
use ort::value::{Outlet, TensorElementType, ValueType};

use crate::config::{ExecutionProvider, ModelConfig, PlainModel};
use crate::onnx::contract::{
    self, CLASS_WEIGHTS, CONTRACT_VERSION, INPUT_GRADIENTS, INPUTS, LOGITS, OUTPUTS,
    extra_activations, extra_gradients,
};
use crate::onnx::metadata::{Metadata, TargetLayout, extra_layer_names, read_metadata};
use crate::onnx::runtime::OnnxRuntime;
use crate::onnx::session::{extra_layer_count, has_output, run};
use crate::pipeline::preprocess::Preprocess;

/// What the service knows about a loaded model; immutable once loaded.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub name: String,
    pub file: PathBuf,
    pub labels: Vec<String>,
    pub target_layer: String,
    /// How the target layer's output is laid out before the graph maps it to [N,Ch,h,w].
    pub target_layout: TargetLayout,
    /// Extra target layers: outputs `activations_i` / `gradients_i` for `extra_layers[i - 1]`.
    pub extra_layers: Vec<String>,
    /// Whether the model has `input_gradients` (guided backpropagation), which Guided Grad-CAM needs.
    pub guided: bool,
    pub preprocess: Preprocess,
    /// [channels, height, width] of the target layer at the model's input size.
    pub activation_shape: [usize; 3],
    /// The input pixels per target-layer cell along each side (32 for most ImageNet CNNs), when the model runs at
    /// other input sizes too (symbolic height and width, proved by a Run at another size); `None` for a fixed
    /// input size.
    pub stride: Option<usize>,
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

/// A model file that passed every check, with the session that checked it. More sessions of the same model come
/// from [`CheckedModel::open_session`]; which sessions a model gets, and when each runs, is the registry's choice.
pub struct CheckedModel {
    pub info: ModelInfo,
    /// The session the checks ran on, warmed up by the probe; `config.threads` intra-op threads.
    pub session: Session,
    /// The graph in contract form, for a plain classifier (`None`: the file itself).
    augmented: Option<Vec<u8>>,
    config: ModelConfig,
}

impl CheckedModel {
    /// Opens one session, checks the contract and the metadata, and probes the model once.
    pub fn open(runtime: &OnnxRuntime, config: &ModelConfig) -> Result<Self, ModelError> {
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
        let (mut session, device) =
            open_session(runtime, config, augmented.as_deref(), config.threads).map_err(refuse)?;
        let info = check(&mut session, config, device).map_err(refuse)?;
        Ok(Self {
            info,
            session,
            augmented,
            config: config.clone(),
        })
    }

    /// Another session of the same model, with `threads` intra-op threads.
    pub fn open_session(
        &self,
        runtime: &OnnxRuntime,
        threads: usize,
    ) -> Result<Session, ModelError> {
        open_session(runtime, &self.config, self.augmented.as_deref(), threads)
            .map(|(session, _)| session)
            .map_err(|reason| ModelError {
                name: self.config.name.clone(),
                file: self.config.file.clone(),
                reason,
            })
    }
}

/// The contract's signature, the metadata, the class count and the probe Run, in that order.
fn check(
    session: &mut Session,
    config: &ModelConfig,
    device: ExecutionProvider,
) -> Result<ModelInfo, String> {
    let problems = signature_problems(session);
    if !problems.is_empty() {
        return Err(format!(
            "it does not meet camserve contract v{CONTRACT_VERSION}: {}",
            problems.join("; ")
        ));
    }
    let meta = read_metadata(session, &config.overrides)?;
    for (what, dim) in [
        (LOGITS, static_dim(session, true, LOGITS, 1)),
        (CLASS_WEIGHTS, static_dim(session, false, CLASS_WEIGHTS, 2)),
    ] {
        if let Some(dim) = dim.filter(|&d| d != meta.labels.len()) {
            return Err(format!(
                "{what} has {dim} classes but there are {} labels",
                meta.labels.len()
            ));
        }
    }
    let extra_layers = extra_layer_names(session, &meta)?;
    let guided = has_output(session, INPUT_GRADIENTS);
    let activation_shape = probe(session, &meta)?;
    let stride = probe_other_size(session, &meta, activation_shape);
    Ok(ModelInfo {
        name: config.name.clone(),
        file: config.file.clone(),
        labels: meta.labels,
        target_layer: meta.target_layer,
        target_layout: meta.target_layout,
        extra_layers,
        guided,
        preprocess: meta.preprocess,
        activation_shape,
        stride,
        device,
        source: meta.source,
    })
}

/// A plain classifier in contract form (`crate::onnx::plain`), in memory.
fn augment(
    runtime: &OnnxRuntime,
    config: &ModelConfig,
    plain: &PlainModel,
) -> Result<Vec<u8>, String> {
    let augmented =
        crate::onnx::plain::augment(runtime, &config.file, plain, config.overrides.input_size)
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
    runtime: &OnnxRuntime,
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
        let activations = extra_activations(i);
        let gradients = extra_gradients(i);
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

/// Whether the model also runs at another input size, and its stride: a Run at the input's height and 1.5 times
/// its width (a multiple of the stride) must give the target layer a grid as much wider. Models with a fixed size
/// fail the Run, which is not an error: they are explained at their own size only.
fn probe_other_size(
    session: &mut Session,
    meta: &Metadata,
    activation_shape: [usize; 3],
) -> Option<usize> {
    let (height, width) = (meta.preprocess.height, meta.preprocess.width);
    let [_, grid_h, grid_w] = activation_shape;
    let stride = width / grid_w;
    if stride == 0 || stride * grid_w != width || stride * grid_h != height {
        return None;
    }
    let wider = width + stride * (grid_w / 2).max(1);
    let classes = meta.labels.len();
    let input = vec![0.1f32; 3 * height * wider];
    let out = run(session, &input, [height, wider], &vec![0.0; classes], 1).ok()?;
    let grid = out.first()?.activation_shape;
    (grid[1..] == [grid_h, wider / stride]).then_some(stride)
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
    let differs = crate::pipeline::cam::relative_difference(&out.logits, &single.logits);
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
        let third_best = contract::ranked(&out.logits)[2];
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
