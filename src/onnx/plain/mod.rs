//! Plain ONNX classifiers (image in, class scores out, from any exporter) made to meet camserve's contract:
//! camserve finds the head (the nodes from a target tensor to the scores), appends its reverse-mode derivative
//! as ONNX nodes, adds the `class_weights` input and the contract's outputs, and hands the result to ONNX Runtime
//! from memory. The forward graph stays as it is; the backward for one seed runs inside a Loop over the seeds,
//! so no batch-dependent shape logic of the original graph runs twice.
//!
//! The steps, by module: `read` (the file and its image input and scores; `hugging_face`, the files Hugging Face
//! writes beside it), `graph` (the head, renames and other edits), `shapes` (the head's shapes, from ONNX
//! Runtime), `backward` (the Loop body, from the op `rules`), `outputs` (the contract's inputs, outputs and
//! metadata); `emit` writes new nodes, `proto` is ONNX's messages.

pub mod proto;

mod backward;
mod emit;
mod graph;
mod hugging_face;
mod layout;
mod outputs;
mod read;
mod rules;
mod shapes;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::config::PlainModel;
use crate::onnx::runtime::OnnxRuntime;
use emit::{Emitter, Writer};
use graph::{Head, graph, graph_mut};
pub use layout::Layout;
use read::Plain;
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
    /// How its positions are laid out (what `augment` would map to NCHW).
    pub layout: Layout,
    pub head_ops: Vec<String>,
    /// Ops of its head without a backward rule: choosing it would be refused.
    pub unsupported: Vec<String>,
    /// Why it is the one to use by default; None for the others.
    pub default: Option<String>,
}

/// The name of the batch dimension in the graphs camserve writes.
const BATCH: &str = "N";

/// Lists the tensors that could be the target, spatial ones only, on the path to the scores: NCHW and NHWC maps
/// larger than 1x1, and token sequences [N,T,D] with T = P + h*w for the patch embedding's grid. In a transformer
/// (one with such token sequences or an attention), a 4-D tensor must be on a stage's grid: [N,heads,T,d] inside
/// attention and Swin's windows are not maps. One is marked as the default: for a transformer the input of the
/// last block's attention, else the last map.
pub fn candidates(
    runtime: &OnnxRuntime,
    file: &Path,
    input_size: Option<[usize; 2]>,
    output: Option<&str>,
    keep_softmax: bool,
) -> Result<Vec<Candidate>, String> {
    let plain = read::read(file, output, keep_softmax, input_size)?;
    let graph = graph(&plain.model);
    let names = graph::leading_to(graph, &plain.output);
    let (shapes, first_axes) = shapes::probe_with_first_axes(runtime, &plain, &names)?;
    let image = layout::depending_on(graph, &plain.input);
    let patch = layout::patch_embedding(graph, &plain.input, plain.input_size);
    let tokens: HashMap<&str, Layout> = names
        .iter()
        .filter_map(|n| Some((n.as_str(), token_layout(shapes.get(n)?, patch.as_ref())?)))
        .collect();
    // In a transformer, a map must lie on one of the stages' grids (the patch grid, halved by each patch
    // merging): the tensors of windowed or multi-head attention are 4-D too, but no image grid.
    let transformer = !tokens.is_empty() || layout::has_attention(graph, &image);
    let grids = patch
        .as_ref()
        .filter(|_| transformer)
        .map(|p| layout::stage_grids(p.grid));
    let mut found: Vec<Candidate> = names
        .iter()
        .filter(|name| image.contains(name.as_str()))
        .filter_map(|name| {
            let layout = match tokens.get(name.as_str()) {
                Some(layout) => layout.clone(),
                None => map_layout(
                    graph,
                    &image,
                    name,
                    shapes.get(name)?,
                    grids.as_deref(),
                    first_axes.get(name).copied(),
                )?,
            };
            Some(candidate(&plain, name, &shapes, layout))
        })
        .collect();
    let default = if !transformer {
        found
            .iter()
            .rposition(|c| c.unsupported.is_empty())
            .map(|i| {
                (
                    i,
                    "the last spatial map on the path to the scores".to_owned(),
                )
            })
    } else {
        found
            .iter()
            .rposition(|c| {
                c.unsupported.is_empty()
                    && !is_copy(graph, &c.name)
                    && feeds_attention(graph, &image, &c.name)
            })
            .map(|i| {
                let why = match found[i].layout {
                    Layout::Tokens { .. } => {
                        "after the last attention only the prefix tokens reach the scores, so later token \
                         tensors give empty maps"
                    }
                    _ => "for windowed attention (Swin), the target pytorch-grad-cam recommends",
                };
                (
                    i,
                    format!(
                        "the input of the last block's attention (in a pre-norm block, the output of its first \
                         norm): {why}"
                    ),
                )
            })
    };
    if let Some((i, reason)) = default {
        found[i].default = Some(reason);
    }
    Ok(found)
}

/// The layout of a token sequence [N,T,D] on the patch grid: D the patch embedding's channels, T = P + h*w.
fn token_layout(info: &TensorInfo, patch: Option<&layout::PatchEmbedding>) -> Option<Layout> {
    let patch = patch?;
    let [None, Some(tokens), Some(channels)] = info.dims[..] else {
        return None;
    };
    let prefix = tokens - patch.grid[0] * patch.grid[1];
    (info.is_float() && channels == patch.channels && (0..=layout::MAX_PREFIX).contains(&prefix))
        .then_some(Layout::Tokens {
            prefix,
            grid: patch.grid,
        })
}

/// The layout of a 4-D float map [N,C,h,w] or [N,h,w,C] larger than 1x1. In a transformer (`grids` given) it
/// must lie on one of the stages' grids, with its first axis the batch itself: 1 in the Run at batch size 1, where
/// Swin's windows [N*windows,...] have more.
fn map_layout(
    graph: &proto::GraphProto,
    image: &HashSet<&str>,
    name: &str,
    info: &TensorInfo,
    grids: Option<&[[i64; 2]]>,
    first_axis_at_one: Option<i64>,
) -> Option<Layout> {
    // The first axis follows the batch: a [1,h,w,1] mask built from shapes is no map of the image.
    let [None, Some(_), Some(_), Some(_)] = info.dims[..] else {
        return None;
    };
    if !info.is_float() {
        return None;
    }
    let layout = layout::map_layout(graph, image, name, &info.dims, grids);
    let dims = layout.nchw_dims(&info.dims);
    let spatial = [dims[2]?, dims[3]?];
    match grids {
        Some(grids) => (grids.contains(&spatial) && first_axis_at_one == Some(1)).then_some(layout),
        None => (spatial[0] * spatial[1] > 1).then_some(layout),
    }
}

/// Whether the target `name` is an attention's input: both operands of a MatMul of two image-dependent tensors
/// (the queries and the keys) are computed from it. A query, key or value projection reaches one operand only.
fn feeds_attention(graph: &proto::GraphProto, image: &HashSet<&str>, name: &str) -> bool {
    let mut reached: HashSet<&str> = HashSet::from([name]);
    // ONNX lists nodes in topological order
    for node in &graph.node {
        if !node.input.iter().any(|i| reached.contains(i.as_str())) {
            continue;
        }
        if layout::is_attention_matmul(node, image)
            && node.input.iter().all(|i| reached.contains(i.as_str()))
        {
            return true;
        }
        reached.extend(node.output.iter().map(String::as_str));
    }
    false
}

/// Whether `name` is a copy of one tensor, the target being that tensor: made by Identity, Dropout, a Pad (Swin
/// pads its windows even where the padding is zero), or a Concat of Slices of one tensor (a cyclic shift,
/// torch.roll, as timm's Swin shifts its windows; a map of it would be shifted too).
fn is_copy(graph: &proto::GraphProto, name: &str) -> bool {
    let producer = |name: &str| {
        graph
            .node
            .iter()
            .find(|n| n.output.iter().any(|o| o == name))
    };
    let Some(node) = producer(name) else {
        return false;
    };
    match node.op_type.as_str() {
        "Identity" | "Dropout" | "Pad" => true,
        "Concat" => {
            let sources: Option<HashSet<&str>> = node
                .input
                .iter()
                .map(|i| {
                    producer(i)
                        .filter(|p| p.op_type == "Slice")
                        .map(|p| p.input[0].as_str())
                })
                .collect();
            sources.is_some_and(|s| s.len() == 1)
        }
        _ => false,
    }
}

fn candidate(
    plain: &Plain,
    name: &str,
    shapes: &HashMap<String, TensorInfo>,
    layout: Layout,
) -> Candidate {
    let info = &shapes[name];
    let graph = graph(&plain.model);
    let head = Head::find(graph, name, &plain.output);
    Candidate {
        name: name.to_owned(),
        shape: info.dims.iter().map(|d| d.unwrap_or(-1)).collect(),
        layout,
        head_ops: head.ops(graph),
        unsupported: backward::unsupported(graph, &head, shapes),
        default: None,
    }
}

/// Augments a plain classifier file so it meets the contract (the file is not modified); `input_size` is needed
/// when the file leaves it open.
pub fn augment(
    runtime: &OnnxRuntime,
    file: &Path,
    spec: &PlainModel,
    input_size: Option<[usize; 2]>,
) -> Result<Augmented, String> {
    let mut plain = read::read(file, spec.output.as_deref(), spec.keep_softmax, input_size)?;
    let target = outputs::claim_names(&mut plain, &spec.target)?;
    let head = find_head(&plain, &target)?;
    let started = Instant::now();
    let shapes = shapes::of_head(runtime, &plain, &head)?;
    let probe_time = started.elapsed();
    let started = Instant::now();
    let target_info = shapes
        .get(&target)
        .ok_or_else(|| format!("the shape of the target `{target}` is unknown"))?;
    let layout = layout::resolve(
        graph(&plain.model),
        &plain.input,
        plain.input_size,
        &target,
        target_info,
        spec,
    )?;
    let target_dims = layout.nchw_dims(&target_info.dims);
    backward::check_supported(graph(&plain.model), &head, &shapes)?;
    let class_count = shapes
        .get(&plain.output)
        .and_then(|i| *i.dims.last()?)
        .ok_or("the scores' class count is unknown")?;
    let head_ops = head.ops(graph(&plain.model));
    let (backward_nodes, mapped) =
        append_backward(&mut plain, &head, &shapes, class_count, &layout)?;
    outputs::declare(
        graph_mut(&mut plain.model),
        &plain.output,
        &mapped,
        class_count,
        &target_dims,
    );
    outputs::write_metadata(&mut plain, class_count, &spec.target, &head_ops, &layout);
    Ok(Augmented {
        model: plain.model.encode_bytes(),
        head_ops,
        backward_nodes,
        notes: plain.notes,
        probe_time,
        edit_time: started.elapsed(),
    })
}

fn find_head(plain: &Plain, target: &str) -> Result<Head, String> {
    let head = Head::find(graph(&plain.model), target, &plain.output);
    if head.nodes.is_empty() {
        return Err(format!(
            "the scores `{}` do not depend on the target `{target}`",
            plain.output
        ));
    }
    Ok(head)
}

/// Appends the target mapped to NCHW, the backward Loop and the contract's seeds and outputs around it to the
/// graph; returns the count of backward nodes and the mapped target (the target itself where it is NCHW).
fn append_backward(
    plain: &mut Plain,
    head: &Head,
    shapes: &HashMap<String, TensorInfo>,
    class_count: i64,
    layout: &Layout,
) -> Result<(usize, String), String> {
    let graph = graph_mut(&mut plain.model);
    let mut taken = graph::all_names(graph);
    let mut emitter = Emitter::new(plain.opset);
    let mut w = Writer {
        e: &mut emitter,
        taken: &mut taken,
    };
    let statistics = backward::switch_on_statistics(graph, head, &mut w);
    let values = graph::constants(graph);
    let context = rules::Context {
        shapes,
        constants: &values,
        statistics,
    };
    let mapped = layout.emit(&mut w, &head.target, &context.info(&head.target)?.dims);
    let seeds = w.fresh("seeds");
    let body = backward::body(&context, &mut w, graph, head, &seeds, layout)?;
    let backward_nodes = body.node.len();
    outputs::append(&mut w, &plain.output, &seeds, class_count, body);
    graph.node.append(&mut emitter.nodes);
    graph.initializer.append(&mut emitter.constants);
    Ok((backward_nodes, mapped))
}
