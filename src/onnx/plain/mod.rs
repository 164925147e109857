//! Plain ONNX classifiers (image in, class scores out, from any exporter) made to meet camserve's contract:
//! camserve finds the head (the nodes from a target tensor to the scores), appends its reverse-mode derivative
//! as ONNX nodes, adds the `class_weights` input and the contract's outputs, and hands the result to ONNX Runtime
//! from memory. The forward graph stays as it is; the backward for one seed runs inside a Loop over the seeds,
//! so no batch-dependent shape logic of the original graph runs twice.
//!
//! The steps, by module: `read` (the file and its image input and scores), `graph` (the head, renames and other
//! edits), `shapes` (the head's shapes, from ONNX Runtime), `backward` (the Loop body, from the op `rules`),
//! `outputs` (the contract's inputs, outputs and metadata); `emit` writes new nodes, `proto` is ONNX's messages.

pub mod proto;

mod backward;
mod emit;
mod graph;
mod layout;
mod outputs;
mod read;
mod rules;
mod shapes;

use std::collections::HashMap;
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
    pub head_ops: Vec<String>,
    /// Ops of its head without a backward rule: choosing it would be refused.
    pub unsupported: Vec<String>,
}

/// The name of the batch dimension in the graphs camserve writes.
const BATCH: &str = "N";

/// Lists the tensors that could be the target: 4-D float tensors larger than 1x1 on the path to the scores.
pub fn candidates(
    runtime: &OnnxRuntime,
    file: &Path,
    input_size: Option<[usize; 2]>,
    output: Option<&str>,
    keep_softmax: bool,
) -> Result<Vec<Candidate>, String> {
    let plain = read::read(file, output, keep_softmax, input_size)?;
    let names = graph::leading_to(graph(&plain.model), &plain.output);
    let shapes = shapes::probe(runtime, &plain, &names)?;
    Ok(names
        .iter()
        .filter_map(|name| candidate(&plain, name, &shapes))
        .collect())
}

/// `name` as a candidate, if it is a 4-D float tensor larger than 1x1.
fn candidate(plain: &Plain, name: &str, shapes: &HashMap<String, TensorInfo>) -> Option<Candidate> {
    let info = shapes.get(name)?;
    let spatial: Option<i64> = info.dims.get(2..)?.iter().copied().product();
    (info.is_float() && info.dims.len() == 4 && spatial? > 1).then_some(())?;
    let graph = graph(&plain.model);
    let head = Head::find(graph, name, &plain.output);
    Some(Candidate {
        name: name.to_owned(),
        shape: info.dims.iter().map(|d| d.unwrap_or(-1)).collect(),
        head_ops: head.ops(graph),
        unsupported: backward::unsupported(graph, &head.nodes, shapes),
    })
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
