//! Plain ONNX classifiers (image in, class scores out, from any exporter) made to meet camserve's contract:
//! camserve finds the head (the nodes from a target tensor to the scores), appends its reverse-mode derivative
//! as ONNX nodes, adds the `class_weights` input and the contract's outputs, and hands the result to ONNX Runtime
//! from memory. The forward graph stays as it is; the backward for one seed runs inside a Loop over the seeds,
//! so no batch-dependent shape logic of the original graph runs twice.

pub mod proto;

mod emit;
mod rules;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::{TensorElementType, TensorRef, ValueType};

use crate::config::PlainModel;
use crate::onnx::runtime::OnnxRuntime;
use emit::{Emitter, Writer};
use proto::{
    Attr, Dim, GraphProto, ModelProto, NodeProto, StringStringEntryProto, ValueInfoProto, data_type,
};
pub use rules::{SUPPORTED, TensorInfo};

/// The augmented model, and what was done to make it.
pub struct Augmented {
    pub model: Vec<u8>,
    /// The op types of the head, in graph order.
    pub head_ops: Vec<String>,
    pub backward_nodes: usize,
    pub notes: Vec<String>,
    /// Finding the head's shapes (ONNX Runtime's inference, else probe Runs), and editing the graph.
    pub probe_time: Duration,
    pub edit_time: Duration,
}

/// A tensor `camserve targets` proposes.
pub struct Candidate {
    pub name: String,
    pub shape: Vec<i64>,
    pub head_ops: Vec<String>,
    /// Ops of its head without a backward rule: choosing it would be refused.
    pub unsupported: Vec<String>,
}

/// The name of the batch dimension in the graphs camserve writes.
const BATCH: &str = "N";
const CONTRACT_NAMES: [&str; 6] = [
    "input",
    "class_weights",
    "logits",
    "activations",
    "gradients",
    "target_class",
];
const IMAGENET_PREPROCESS: &str = r#"{"resize": "stretch", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "channel_order": "RGB", "value_range": [0.0, 1.0]}"#;

/// The file read and checked: the parts every step needs.
struct Plain {
    model: ModelProto,
    opset: i64,
    input: String,
    output: String,
    input_size: [usize; 2],
    notes: Vec<String>,
}

fn graph(model: &ModelProto) -> &GraphProto {
    model.graph.as_ref().expect("checked in read")
}

fn graph_mut(model: &mut ModelProto) -> &mut GraphProto {
    model.graph.as_mut().expect("checked in read")
}

/// Reads the file (weights in external files included) and finds its image input, its scores, and the input
/// size.
fn read(
    file: &Path,
    output: Option<&str>,
    keep_softmax: bool,
    input_size: Option<[usize; 2]>,
) -> Result<Plain, String> {
    let bytes = std::fs::read(file).map_err(|e| format!("cannot read it: {e}"))?;
    let mut model = ModelProto::decode_bytes(&bytes)?;
    let graph = model.graph.as_mut().ok_or("the file has no graph")?;
    inline_external_data(graph, file.parent().unwrap_or(Path::new(".")))?;
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
    let initializers: HashSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let inputs: Vec<&ValueInfoProto> = graph
        .input
        .iter()
        .filter(|i| !initializers.contains(i.name.as_str()))
        .collect();
    let [image] = inputs.as_slice() else {
        let names: Vec<&str> = inputs.iter().map(|i| i.name.as_str()).collect();
        return Err(format!(
            "a plain classifier has one image input; this one has {names:?}"
        ));
    };
    let declared = image.tensor_type();
    if declared.is_some_and(|t| t.elem_type != data_type::FLOAT) {
        return Err(format!("the image input `{}` is not float32", image.name));
    }
    let declared_dims: Vec<Option<i64>> = declared
        .and_then(|t| t.shape.as_ref())
        .map(|s| {
            s.dim
                .iter()
                .map(|d| match d.value {
                    Some(proto::DimensionValue::DimValue(v)) if v > 0 => Some(v),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    if !declared_dims.is_empty() && declared_dims.len() != 4 {
        return Err(format!(
            "the image input `{}` has rank {}, expected 4 [N,3,H,W]",
            image.name,
            declared_dims.len()
        ));
    }
    let input_size = match (input_size, declared_dims.get(2..4)) {
        (Some(size), _) => size,
        (None, Some(&[Some(h), Some(w)])) => [h as usize, w as usize],
        _ => {
            return Err(format!(
                "the image input `{}` has no fixed height and width: set the input size (overrides.input_size)",
                image.name
            ));
        }
    };
    let input = image.name.clone();
    let mut notes = Vec::new();
    let mut output = match output {
        Some(o) => o.to_owned(),
        None => graph
            .output
            .first()
            .ok_or("the graph has no output")?
            .name
            .clone(),
    };
    let producer = |name: &str| {
        graph
            .node
            .iter()
            .find(|n| n.output.iter().any(|o| o == name))
    };
    if producer(&output).is_none() {
        return Err(format!("no node computes the output `{output}`"));
    }
    if !keep_softmax
        && let Some(softmax) =
            producer(&output).filter(|n| matches!(n.op_type.as_str(), "Softmax" | "LogSoftmax"))
    {
        notes.push(format!(
            "differentiating the scores before the final {}",
            softmax.op_type
        ));
        output = softmax.input[0].clone();
    }
    Ok(Plain {
        model,
        opset,
        input,
        output,
        input_size,
        notes,
    })
}

/// Reads weights stored beside the model (ONNX external data, as the dynamo exporter writes them) into the
/// graph: the augmented model is handed to ONNX Runtime from memory, where relative locations mean nothing.
/// Locations must name files in the model's own folder.
fn inline_external_data(graph: &mut GraphProto, dir: &Path) -> Result<(), String> {
    let mut files: HashMap<String, Vec<u8>> = HashMap::new();
    for tensor in graph
        .initializer
        .iter_mut()
        .filter(|t| t.data_location == 1)
    {
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
            entry(key).map(|v| {
                v.parse::<usize>()
                    .map_err(|_| format!("weight `{}`: bad {key}", tensor.name))
            })
        };
        let offset = number("offset").transpose()?.unwrap_or(0);
        let length = number("length").transpose()?;
        let relative = Path::new(&location);
        if !relative
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)))
        {
            return Err(format!(
                "weight `{}` is stored at `{location}`, outside the model's folder",
                tensor.name
            ));
        }
        if !files.contains_key(&location) {
            let data = std::fs::read(dir.join(relative))
                .map_err(|e| format!("cannot read its weights file `{location}`: {e}"))?;
            files.insert(location.clone(), data);
        }
        let data = &files[&location];
        let end = length.map_or(data.len(), |l| offset + l);
        let bytes = data
            .get(offset..end)
            .ok_or_else(|| format!("weight `{}` lies past the end of `{location}`", tensor.name))?;
        tensor.raw_data = bytes.to_vec();
        tensor.external_data.clear();
        tensor.data_location = 0;
    }
    Ok(())
}

/// Renames a tensor everywhere it appears, subgraphs included.
fn rename(graph: &mut GraphProto, old: &str, new: &str) {
    let swap = |s: &mut String| {
        if s == old {
            *s = new.to_owned();
        }
    };
    for node in &mut graph.node {
        node.input
            .iter_mut()
            .chain(node.output.iter_mut())
            .for_each(swap);
        for attribute in &mut node.attribute {
            attribute
                .g
                .iter_mut()
                .chain(attribute.graphs.iter_mut())
                .for_each(|g| rename(g, old, new));
        }
    }
    for info in graph
        .input
        .iter_mut()
        .chain(&mut graph.output)
        .chain(&mut graph.value_info)
    {
        swap(&mut info.name);
    }
    for tensor in &mut graph.initializer {
        swap(&mut tensor.name);
    }
}

fn all_names(graph: &GraphProto) -> HashSet<String> {
    graph
        .node
        .iter()
        .flat_map(|n| n.input.iter().chain(&n.output))
        .chain(graph.input.iter().map(|i| &i.name))
        .chain(graph.initializer.iter().map(|t| &t.name))
        .filter(|n| !n.is_empty())
        .cloned()
        .collect()
}

/// The head: nodes on a path from `target` to `output`, in graph order, and the tensors of it that need a gradient.
fn head(graph: &GraphProto, target: &str, output: &str) -> (Vec<usize>, HashSet<String>) {
    let mut depends: HashSet<&str> = HashSet::from([target]);
    let mut forward = Vec::new();
    for (i, node) in graph.node.iter().enumerate() {
        if node.input.iter().any(|x| depends.contains(x.as_str())) {
            forward.push(i);
            depends.extend(node.output.iter().map(String::as_str));
        }
    }
    let mut need: HashSet<String> = HashSet::from([output.to_owned()]);
    let mut head = Vec::new();
    for &i in forward.iter().rev() {
        let node = &graph.node[i];
        if node.output.iter().any(|o| need.contains(o)) {
            head.push(i);
            need.extend(
                node.input
                    .iter()
                    .filter(|x| depends.contains(x.as_str()))
                    .cloned(),
            );
        }
    }
    head.reverse();
    (head, need)
}

/// The head's nodes that compute float tensors: the ones that carry gradients (the rest is shape arithmetic).
fn differentiable<'a>(
    graph: &'a GraphProto,
    head: &[usize],
    shapes: &HashMap<String, TensorInfo>,
) -> Vec<&'a NodeProto> {
    head.iter()
        .map(|&i| &graph.node[i])
        .filter(|n| shapes.get(&n.output[0]).is_none_or(TensorInfo::is_float))
        .collect()
}

/// The op types of the head, shape arithmetic included, in graph order.
fn op_list(graph: &GraphProto, head: &[usize]) -> Vec<String> {
    let mut ops: Vec<String> = Vec::new();
    for node in head.iter().map(|&i| &graph.node[i]) {
        if !ops.contains(&node.op_type) {
            ops.push(node.op_type.clone());
        }
    }
    ops
}

fn unsupported(nodes: &[&NodeProto]) -> Vec<String> {
    nodes
        .iter()
        .filter(|n| rules::rule(n).is_none())
        .map(|n| format!("{} (node `{}`)", n.op_type, n.label()))
        .collect()
}

/// Shapes and element types of `names` (None: a dimension that follows the batch size), from the model with those
/// tensors exposed as outputs: as ONNX Runtime infers them when it opens it, or where inference leaves a
/// dimension open, from Runs at batch sizes 1 and 2 (a dimension that differs between the two follows the batch).
fn probe(
    runtime: &OnnxRuntime,
    plain: &Plain,
    names: &[String],
) -> Result<HashMap<String, TensorInfo>, String> {
    let mut model = plain.model.clone();
    let graph = graph_mut(&mut model);
    free_batch(graph, &plain.input);
    declare_input_size(graph, &plain.input, plain.input_size);
    graph.output = names
        .iter()
        .map(|n| ValueInfoProto {
            name: n.clone(),
            ..Default::default()
        })
        .collect();
    let error = |e: ort::Error| format!("ONNX Runtime cannot run it: {e}");
    // Without graph optimizations the session opens several times faster; shapes are inferred all the same.
    let mut session = Session::builder(&runtime.environment)
        .and_then(|b| Ok(b.with_optimization_level(GraphOptimizationLevel::Disable)?))
        .and_then(|mut b| b.commit_from_memory(&model.encode_bytes()))
        .map_err(error)?;
    if let Some(shapes) = inferred(&session) {
        return Ok(shapes);
    }
    let [height, width] = plain.input_size;
    let mut runs: Vec<HashMap<String, (Vec<i64>, i32)>> = Vec::new();
    for batch in [1, 2] {
        let image = vec![0.5f32; batch * 3 * height * width];
        let outputs = session
            .run(ort::inputs![plain.input.as_str() => TensorRef::from_array_view(([batch, 3, height, width], &image[..])).map_err(error)?])
            .map_err(|e| format!("a Run at batch size {batch} failed (is the batch dimension dynamic?): {e}"))?;
        runs.push(
            outputs
                .iter()
                .filter_map(|(name, value)| match value.dtype() {
                    ValueType::Tensor { ty, shape, .. } => {
                        Some((name.to_owned(), (shape.to_vec(), onnx_type(ty))))
                    }
                    _ => None,
                })
                .collect(),
        );
    }
    Ok(runs[0]
        .iter()
        .map(|(name, (one, elem_type))| {
            let two = runs[1]
                .get(name)
                .map(|t| t.0.as_slice())
                .unwrap_or_default();
            let dims = one
                .iter()
                .enumerate()
                .map(|(i, &d)| (two.get(i) == Some(&d)).then_some(d))
                .collect();
            (
                name.clone(),
                TensorInfo {
                    dims,
                    elem_type: *elem_type,
                },
            )
        })
        .collect())
}

/// The shapes ONNX Runtime inferred for the session's outputs, if every rank is known and every dimension is known
/// or is the batch: named
/// so, or open in the first axis (inference loses the batch's name at a Flatten, say; a head's first axis is the
/// batch, and where that assumption could go wrong the backward refuses rather than guesses).
fn inferred(session: &Session) -> Option<HashMap<String, TensorInfo>> {
    session
        .outputs()
        .iter()
        .map(|output| {
            let ValueType::Tensor {
                ty,
                shape,
                dimension_symbols,
            } = output.dtype()
            else {
                return None;
            };
            if shape.is_empty() {
                return None; // an unknown rank reads as a scalar's
            }
            let dims = shape
                .iter()
                .zip(dimension_symbols.iter())
                .enumerate()
                .map(|(axis, (&size, symbol))| match size {
                    0.. => Some(Some(size)),
                    _ if symbol == BATCH || axis == 0 => Some(None),
                    _ => None,
                })
                .collect::<Option<Vec<_>>>()?;
            let info = TensorInfo {
                dims,
                elem_type: onnx_type(ty),
            };
            Some((output.name().to_owned(), info))
        })
        .collect()
}

fn onnx_type(ty: &TensorElementType) -> i32 {
    match ty {
        TensorElementType::Float32 => data_type::FLOAT,
        TensorElementType::Float64 => data_type::DOUBLE,
        TensorElementType::Float16 => data_type::FLOAT16,
        TensorElementType::Bfloat16 => data_type::BFLOAT16,
        TensorElementType::Int64 => data_type::INT64,
        TensorElementType::Int32 => data_type::INT32,
        TensorElementType::Bool => data_type::BOOL,
        _ => 0,
    }
}

/// Fixes the image input's channels, height and width at what camserve feeds, for shape inference.
fn declare_input_size(graph: &mut GraphProto, input: &str, [height, width]: [usize; 2]) {
    if let Some(info) = graph.input.iter_mut().find(|i| i.name == input) {
        let batch = Dim::Named(BATCH.into());
        *info = ValueInfoProto::tensor(
            input,
            data_type::FLOAT,
            Some(&[
                batch,
                Dim::Fixed(3),
                Dim::Fixed(height as i64),
                Dim::Fixed(width as i64),
            ]),
        );
    }
}

/// Makes the image input's batch dimension dynamic: camserve batches requests, and many exporters fix it at 1.
fn free_batch(graph: &mut GraphProto, input: &str) {
    if let Some(proto::TypeValue::TensorType(t)) = graph
        .input
        .iter_mut()
        .find(|i| i.name == input)
        .and_then(|i| i.r#type.as_mut())
        .and_then(|t| t.value.as_mut())
        && let Some(first) = t.shape.as_mut().and_then(|s| s.dim.first_mut())
    {
        first.value = Some(proto::DimensionValue::DimParam(BATCH.into()));
    }
    // Declared intermediate shapes would contradict the new batch size.
    graph.value_info.clear();
}

/// Values of small initializers and Constant nodes: the axes some ops take as inputs (weights are not read).
fn constants(graph: &GraphProto) -> HashMap<String, Vec<f64>> {
    let mut values: HashMap<String, Vec<f64>> = graph
        .initializer
        .iter()
        .filter(|t| t.dims.iter().product::<i64>() <= 16)
        .filter_map(|t| Some((t.name.clone(), t.values()?)))
        .collect();
    for node in graph.node.iter().filter(|n| n.op_type == "Constant") {
        let value = node.attribute.first().and_then(|a| match a.name.as_str() {
            "value" => a.t.as_ref()?.values(),
            "value_ints" => Some(a.ints.iter().map(|&v| v as f64).collect()),
            "value_int" => Some(vec![a.i? as f64]),
            "value_floats" => Some(a.floats.iter().map(|&v| v as f64).collect()),
            "value_float" => Some(vec![a.f? as f64]),
            _ => None,
        });
        if let Some(value) = value {
            values.insert(node.output[0].clone(), value);
        }
    }
    values
}

/// Lists the tensors that could be the target: 4-D float tensors larger than 1x1 on the path to the scores.
pub fn candidates(
    runtime: &OnnxRuntime,
    file: &Path,
    input_size: Option<[usize; 2]>,
    output: Option<&str>,
    keep_softmax: bool,
) -> Result<Vec<Candidate>, String> {
    let plain = read(file, output, keep_softmax, input_size)?;
    let graph = graph(&plain.model);
    // Tensors the scores depend on.
    let mut ancestors: HashSet<&str> = HashSet::from([plain.output.as_str()]);
    for node in graph.node.iter().rev() {
        if node.output.iter().any(|o| ancestors.contains(o.as_str())) {
            ancestors.extend(node.input.iter().map(String::as_str));
        }
    }
    let names: Vec<String> = graph
        .node
        .iter()
        .flat_map(|n| &n.output)
        .filter(|o| ancestors.contains(o.as_str()) && o.as_str() != plain.output)
        .cloned()
        .collect();
    let shapes = probe(runtime, &plain, &names)?;
    Ok(names
        .iter()
        .filter_map(|name| {
            let info = shapes.get(name)?;
            let spatial: Option<i64> = info.dims.get(2..)?.iter().copied().product();
            (info.is_float() && info.dims.len() == 4 && spatial? > 1).then_some(())?;
            let (head, _) = head(graph, name, &plain.output);
            Some(Candidate {
                name: name.clone(),
                shape: info.dims.iter().map(|d| d.unwrap_or(-1)).collect(),
                head_ops: op_list(graph, &head),
                unsupported: unsupported(&differentiable(graph, &head, &shapes)),
            })
        })
        .collect())
}

/// Augments a plain classifier file so it meets the contract (the file is not modified); `input_size` is needed
/// when the file leaves it open.
pub fn augment(
    runtime: &OnnxRuntime,
    file: &Path,
    spec: &PlainModel,
    input_size: Option<[usize; 2]>,
) -> Result<Augmented, String> {
    let mut plain = read(file, spec.output.as_deref(), spec.keep_softmax, input_size)?;
    let target = claim_contract_names(&mut plain, &spec.target)?;
    let (head_nodes, need) = head(graph(&plain.model), &target, &plain.output);
    if head_nodes.is_empty() {
        return Err(format!(
            "the scores `{}` do not depend on the target `{target}`",
            plain.output
        ));
    }
    let started = Instant::now();
    let shapes = head_shapes(runtime, &plain, &head_nodes)?;
    let probe_time = started.elapsed();
    let started = Instant::now();
    let graph = graph_mut(&mut plain.model);
    let target_dims = match shapes.get(&target) {
        Some(info) if info.dims.len() == 4 && info.is_float() => info.dims.clone(),
        other => {
            return Err(format!(
                "the target `{target}` must be a 4-D float tensor [N,C,h,w]; it is {:?}",
                other.map(|i| &i.dims)
            ));
        }
    };
    let refused = unsupported(&differentiable(graph, &head_nodes, &shapes));
    if !refused.is_empty() {
        return Err(format!(
            "its head has ops camserve cannot differentiate: {} (supported: {})",
            refused.join(", "),
            SUPPORTED.join(", ")
        ));
    }
    let class_count = shapes
        .get(&plain.output)
        .and_then(|i| *i.dims.last()?)
        .ok_or("the scores' class count is unknown")?;
    let head_ops = op_list(graph, &head_nodes);

    let mut taken = all_names(graph);
    let mut emitter = Emitter::new(plain.opset);
    let mut w = Writer {
        e: &mut emitter,
        taken: &mut taken,
    };
    let (maxpool_indices, layer_norm_stats) = switch_on_statistics(graph, &head_nodes, &mut w);
    let values = constants(graph);
    let context = rules::Context {
        shapes: &shapes,
        constants: &values,
        maxpool_indices,
        layer_norm_stats,
    };
    let seeds = w.fresh("seeds");
    let body = backward_body(
        &context,
        &mut w,
        graph,
        &head_nodes,
        &need,
        &plain.output,
        &target,
        &seeds,
    )?;
    let backward_nodes = body.node.len();
    append_contract(&mut w, &plain.output, &seeds, class_count, body);
    graph.node.append(&mut emitter.nodes);
    graph.initializer.append(&mut emitter.constants);
    declare_contract(graph, class_count, &target_dims);
    // The scores and the target become the contract's outputs by name (no copies).
    rename(graph, &plain.output, "logits");
    rename(graph, &target, "activations");
    free_batch(graph, "input");
    write_metadata(&mut plain, class_count, &spec.target, &head_ops);
    Ok(Augmented {
        model: plain.model.encode_bytes(),
        head_ops,
        backward_nodes,
        notes: plain.notes,
        probe_time,
        edit_time: started.elapsed(),
    })
}

/// Moves tensors named like the contract's inputs and outputs out of the way, names the image input `input`,
/// and returns the target's (possibly new) name.
fn claim_contract_names(plain: &mut Plain, target: &str) -> Result<String, String> {
    if target == plain.input {
        return Err(
            "the target is the image input; choose a layer (`camserve targets` lists them)".into(),
        );
    }
    let graph = graph_mut(&mut plain.model);
    if !graph
        .node
        .iter()
        .any(|n| n.output.iter().any(|o| o == target))
    {
        return Err(format!(
            "no tensor is named `{target}` (`camserve targets` lists the candidates)"
        ));
    }
    let mut target = target.to_owned();
    let taken = all_names(graph);
    for name in CONTRACT_NAMES {
        if taken.contains(name) && !(name == "input" && plain.input == "input") {
            let new = (0..)
                .map(|i| format!("{name}_original{i}"))
                .find(|n| !taken.contains(n))
                .expect("a free name");
            rename(graph, name, &new);
            for s in [&mut target, &mut plain.output, &mut plain.input] {
                if s == name {
                    *s = new.clone();
                }
            }
        }
    }
    rename(graph, &plain.input, "input");
    plain.input = "input".into();
    Ok(target)
}

/// Shapes and types of every tensor the head reads or writes: initializers from the file, the rest probed.
fn head_shapes(
    runtime: &OnnxRuntime,
    plain: &Plain,
    head_nodes: &[usize],
) -> Result<HashMap<String, TensorInfo>, String> {
    let graph = graph(&plain.model);
    let initializers: HashMap<String, TensorInfo> = graph
        .initializer
        .iter()
        .map(|t| {
            let dims = t.dims.iter().map(|&d| Some(d)).collect();
            (
                t.name.clone(),
                TensorInfo {
                    dims,
                    elem_type: t.data_type,
                },
            )
        })
        .collect();
    let mut probed: Vec<String> = head_nodes
        .iter()
        .flat_map(|&i| graph.node[i].input.iter().chain(&graph.node[i].output))
        .filter(|n| !n.is_empty() && !initializers.contains_key(*n))
        .cloned()
        .collect();
    probed.sort();
    probed.dedup();
    let mut shapes = probe(runtime, plain, &probed)?;
    shapes.extend(initializers);
    Ok(shapes)
}

/// Switches on the forward outputs that backward rules read: MaxPool's Indices, LayerNormalization's Mean and
/// InvStdDev. Returns them by the node's first output.
#[allow(clippy::type_complexity)]
fn switch_on_statistics(
    graph: &mut GraphProto,
    head_nodes: &[usize],
    w: &mut Writer,
) -> (HashMap<String, String>, HashMap<String, (String, String)>) {
    let mut maxpool_indices = HashMap::new();
    let mut layer_norm_stats = HashMap::new();
    for &i in head_nodes {
        let node = &mut graph.node[i];
        let wanted = match node.op_type.as_str() {
            "MaxPool" => 2,
            "LayerNormalization" => 3,
            _ => continue,
        };
        node.output.resize(wanted, String::new());
        for slot in 1..wanted {
            if node.output[slot].is_empty() {
                node.output[slot] = w.fresh("statistic");
            }
        }
        let out = node.output.clone();
        if wanted == 2 {
            maxpool_indices.insert(out[0].clone(), out[1].clone());
        } else {
            layer_norm_stats.insert(out[0].clone(), (out[1].clone(), out[2].clone()));
        }
    }
    (maxpool_indices, layer_norm_stats)
}

/// The backward for one seed (row `iteration` of `seeds`, [N,C]) from the scores to the target, as a Loop body.
#[allow(clippy::too_many_arguments)]
fn backward_body(
    context: &rules::Context,
    w: &mut Writer,
    graph: &GraphProto,
    head_nodes: &[usize],
    need: &HashSet<String>,
    scores: &str,
    target: &str,
    seeds: &str,
) -> Result<GraphProto, String> {
    let first = w.e.nodes.len();
    let (iteration, condition) = (w.fresh("iteration"), w.fresh("condition"));
    let seed = w.op("Gather", &[seeds, &iteration], vec![("axis", Attr::Int(1))]);
    let mut grads: HashMap<String, String> = HashMap::from([(scores.to_owned(), seed)]);
    for &i in head_nodes.iter().rev() {
        let node = &graph.node[i];
        let output_grads: Vec<Option<String>> =
            node.output.iter().map(|o| grads.get(o).cloned()).collect();
        let float = context
            .shapes
            .get(&node.output[0])
            .is_none_or(TensorInfo::is_float);
        if output_grads.iter().all(Option::is_none) || !float {
            continue;
        }
        let inputs = rules::backward(context, w, node, &output_grads, need)
            .map_err(|e| format!("node `{}` ({}): {e}", node.label(), node.op_type))?;
        for (input, grad) in inputs {
            let total = match grads.remove(&input) {
                Some(earlier) => w.op("Add", &[&earlier, &grad], vec![]),
                None => grad,
            };
            grads.insert(input, total);
        }
    }
    let target_grad = grads.get(target).ok_or("no gradient reached the target")?;
    let condition_out = w.op("Identity", &[&condition], vec![]);
    Ok(GraphProto {
        name: "camserve_backward".into(),
        node: w.e.nodes.split_off(first),
        input: vec![
            ValueInfoProto::tensor(&iteration, data_type::INT64, Some(&[])),
            ValueInfoProto::tensor(&condition, data_type::BOOL, Some(&[])),
        ],
        output: vec![
            ValueInfoProto::tensor(&condition_out, data_type::BOOL, Some(&[])),
            ValueInfoProto::tensor(target_grad, data_type::FLOAT, None),
        ],
        ..Default::default()
    })
}

/// The seeds from `class_weights` (an all-zero row is the k-th best class), `target_class`, and the Loop of the
/// backward over the seeds, stacked into `gradients` [N,K,...].
fn append_contract(w: &mut Writer, scores: &str, seeds: &str, class_count: i64, body: GraphProto) {
    let weights_shape = w.shape("class_weights");
    let (one, two) = (w.ints(&[1]), w.ints(&[2]));
    let k = w.op("Slice", &[&weights_shape, &one, &two], vec![]);
    let ranking = vec![
        ("axis", Attr::Int(-1)),
        ("largest", Attr::Int(1)),
        ("sorted", Attr::Int(1)),
    ];
    let best = w.op_n("TopK", &[scores, &k], 2, ranking).remove(1);
    let row_sums = w.reduce("ReduceL1", "class_weights", &[2], false);
    let zero = w.float(0.0);
    let empty = w.op("Equal", &[&row_sums, &zero], vec![]);
    let classes = w.ints(&[class_count]);
    let one_hot_values = w.floats(&[2], &[0.0, 1.0]);
    let one_hot = w.op(
        "OneHot",
        &[&best, &classes, &one_hot_values],
        vec![("axis", Attr::Int(-1))],
    );
    let empty_rows = w.unsqueeze(&empty, &[2]);
    w.node(
        "Where",
        &[&empty_rows, &one_hot, "class_weights"],
        &[seeds.to_owned()],
        vec![],
    );
    let weighted = w.op(
        "ArgMax",
        &["class_weights"],
        vec![("axis", Attr::Int(2)), ("keepdims", Attr::Int(0))],
    );
    w.node(
        "Where",
        &[&empty, &best, &weighted],
        &["target_class".into()],
        vec![],
    );
    let trips = w.op("Squeeze", &[&k], vec![]);
    let stacked = w.op(
        "Loop",
        &[&trips, ""],
        vec![("body", Attr::Graph(Box::new(body)))],
    );
    let perm = Attr::Ints(vec![1, 0, 2, 3, 4]);
    w.node(
        "Transpose",
        &[&stacked],
        &["gradients".into()],
        vec![("perm", perm)],
    );
}

/// The contract's inputs and outputs in the graph's signature.
fn declare_contract(graph: &mut GraphProto, class_count: i64, target_dims: &[Option<i64>]) {
    let (n, k) = (Dim::Named(BATCH.into()), Dim::Named("K".into()));
    let layer: Vec<Dim> = target_dims[1..]
        .iter()
        .map(|d| d.map_or(Dim::Named("batch".into()), Dim::Fixed))
        .collect();
    let with =
        |lead: &[Dim]| -> Vec<Dim> { lead.iter().cloned().chain(layer.iter().cloned()).collect() };
    let classes = Dim::Fixed(class_count);
    graph.input.push(ValueInfoProto::tensor(
        "class_weights",
        data_type::FLOAT,
        Some(&[n.clone(), k.clone(), classes.clone()]),
    ));
    graph.output = vec![
        ValueInfoProto::tensor("logits", data_type::FLOAT, Some(&[n.clone(), classes])),
        ValueInfoProto::tensor(
            "activations",
            data_type::FLOAT,
            Some(&with(std::slice::from_ref(&n))),
        ),
        ValueInfoProto::tensor(
            "gradients",
            data_type::FLOAT,
            Some(&with(&[n.clone(), k.clone()])),
        ),
        ValueInfoProto::tensor("target_class", data_type::INT64, Some(&[n, k])),
    ];
}

/// The `camserve.*` metadata a plain file lacks (keys it has are kept): class indices as labels, ImageNet
/// preprocessing, the input size, the target's name.
fn write_metadata(plain: &mut Plain, class_count: i64, target: &str, head_ops: &[String]) {
    let [height, width] = plain.input_size;
    let labels: Vec<String> = (0..class_count).map(|c| c.to_string()).collect();
    let metadata = [
        (
            "contract_version",
            crate::onnx::contract::CONTRACT_VERSION.to_owned(),
        ),
        (
            "labels",
            serde_json::to_string(&labels).expect("strings serialize"),
        ),
        ("input_size", format!("[{height}, {width}]")),
        ("preprocess", IMAGENET_PREPROCESS.to_owned()),
        ("target_layer", target.to_owned()),
        (
            "source",
            format!(
                "plain ONNX classifier; head {} differentiated by camserve",
                head_ops.join(" ")
            ),
        ),
    ];
    for (key, value) in metadata {
        let key = format!("camserve.{key}");
        if !plain.model.metadata_props.iter().any(|p| p.key == key) {
            plain
                .model
                .metadata_props
                .push(StringStringEntryProto { key, value });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(op: &str, inputs: &[&str], outputs: &[&str]) -> NodeProto {
        NodeProto {
            op_type: op.into(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    /// The head holds exactly the nodes between the target and the scores; a branch that does not reach the
    /// scores and the nodes before the target are not part of it.
    #[test]
    fn head_is_the_path_from_target_to_scores() {
        let graph = GraphProto {
            node: vec![
                node("Conv", &["x", "w"], &["a"]),
                node("Relu", &["a"], &["t"]),
                node("Shape", &["t"], &["s"]),
                node("GlobalAveragePool", &["t"], &["p"]),
                node("Reshape", &["p", "s2"], &["f"]),
                node("Sigmoid", &["t"], &["unused"]),
                node("Gemm", &["f", "fc_w", "fc_b"], &["y"]),
            ],
            ..Default::default()
        };
        let (head, need) = head(&graph, "t", "y");
        assert_eq!(head, vec![3, 4, 6]);
        let mut need: Vec<_> = need.into_iter().collect();
        need.sort();
        assert_eq!(need, ["f", "p", "t", "y"]);
    }

    #[test]
    fn rename_reaches_subgraphs() {
        let mut inner = GraphProto {
            node: vec![node("Relu", &["x"], &["z"])],
            ..Default::default()
        };
        let mut outer = GraphProto {
            node: vec![node("Identity", &["x"], &["y"])],
            input: vec![ValueInfoProto::tensor("x", data_type::FLOAT, None)],
            ..Default::default()
        };
        outer.node[0]
            .attribute
            .push(Attr::Graph(Box::new(std::mem::take(&mut inner))).into_proto("body"));
        rename(&mut outer, "x", "input");
        assert_eq!(outer.node[0].input, ["input"]);
        assert_eq!(outer.input[0].name, "input");
        assert_eq!(
            outer.node[0].attribute[0].g.as_ref().unwrap().node[0].input,
            ["input"]
        );
    }
}
