//! Shapes and element types of the head's tensors. Rust has no ONNX shape inference, so ONNX Runtime is asked:
//! the model with those tensors exposed as outputs is opened, and where its inference leaves a dimension open,
//! run at batch sizes 1 and 2.

use std::collections::HashMap;

use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::{TensorElementType, TensorRef, ValueType};

use super::graph::{self, graph, graph_mut};
use super::read::Plain;
use super::rules::TensorInfo;
use super::{BATCH, proto::ValueInfoProto, proto::data_type};
use crate::onnx::runtime::OnnxRuntime;

/// Shapes and types of every tensor the head reads or writes: initializers from the file, the rest probed.
pub fn of_head(
    runtime: &OnnxRuntime,
    plain: &Plain,
    head: &graph::Head,
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
    let mut probed: Vec<String> = head
        .nodes
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

/// Shapes and element types of `names` (None: a dimension that follows the batch size), from the model with those
/// tensors exposed as outputs: as ONNX Runtime infers them when it opens it, or where inference leaves a
/// dimension open, from Runs at batch sizes 1 and 2 (a dimension that differs between the two follows the batch).
pub fn probe(
    runtime: &OnnxRuntime,
    plain: &Plain,
    names: &[String],
) -> Result<HashMap<String, TensorInfo>, String> {
    let mut session = open_exposing(runtime, plain, names)?;
    shapes_of(&mut session, plain, None)
}

type Shapes = HashMap<String, TensorInfo>;

/// [`probe`]'s shapes, and the first axis of each of `names` in a Run at batch size 1: 1 where it is the batch,
/// more where the batch is folded with something else (Swin's windows, [N*windows,...]). One session serves both.
pub fn probe_with_first_axes(
    runtime: &OnnxRuntime,
    plain: &Plain,
    names: &[String],
) -> Result<(Shapes, HashMap<String, i64>), String> {
    let mut session = open_exposing(runtime, plain, names)?;
    let one = run_at(&mut session, plain, 1)?;
    let first_axes = one
        .iter()
        .filter_map(|(name, (dims, _))| Some((name.clone(), *dims.first()?)))
        .collect();
    Ok((shapes_of(&mut session, plain, Some(one))?, first_axes))
}

/// The shapes ONNX Runtime inferred, else those of Runs at batch sizes 1 (`one`, where already run) and 2.
fn shapes_of(
    session: &mut Session,
    plain: &Plain,
    one: Option<Observed>,
) -> Result<HashMap<String, TensorInfo>, String> {
    if let Some(shapes) = inferred(session) {
        return Ok(shapes);
    }
    let one = match one {
        Some(one) => one,
        None => run_at(session, plain, 1)?,
    };
    let two = run_at(session, plain, 2)?;
    Ok(batch_dims(&one, &two))
}

/// A session of the model with `names` as its outputs, at camserve's input size and a free batch size.
fn open_exposing(
    runtime: &OnnxRuntime,
    plain: &Plain,
    names: &[String],
) -> Result<Session, String> {
    let mut model = plain.model.clone();
    let graph = graph_mut(&mut model);
    graph::free_batch(graph, &plain.input);
    graph::declare_input_size(graph, &plain.input, plain.input_size);
    graph.output = names
        .iter()
        .map(|n| ValueInfoProto {
            name: n.clone(),
            ..Default::default()
        })
        .collect();
    // Without graph optimizations the session opens several times faster; shapes are inferred all the same.
    Session::builder(&runtime.environment)
        .and_then(|b| Ok(b.with_optimization_level(GraphOptimizationLevel::Disable)?))
        .and_then(|mut b| b.commit_from_memory(&model.encode_bytes()))
        .map_err(cannot_run)
}

fn cannot_run(e: ort::Error) -> String {
    format!("ONNX Runtime cannot run it: {e}")
}

/// The shapes ONNX Runtime inferred for the session's outputs, if every rank is known and every dimension is known
/// or is the batch: named so, or open in the first axis (inference loses the batch's name at a Flatten, say; a
/// head's first axis is the batch, and where that assumption could go wrong the backward refuses rather than
/// guesses).
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

/// Shape and ONNX element type of every output, from a Run on a grey image of `batch` rows.
type Observed = HashMap<String, (Vec<i64>, i32)>;

fn run_at(session: &mut Session, plain: &Plain, batch: usize) -> Result<Observed, String> {
    let [height, width] = plain.input_size;
    let image = vec![0.5f32; batch * 3 * height * width];
    let image =
        TensorRef::from_array_view(([batch, 3, height, width], &image[..])).map_err(cannot_run)?;
    let outputs = session
        .run(ort::inputs![plain.input.as_str() => image])
        .map_err(|e| {
            format!("a Run at batch size {batch} failed (is the batch dimension dynamic?): {e}")
        })?;
    Ok(outputs
        .iter()
        .filter_map(|(name, value)| match value.dtype() {
            ValueType::Tensor { ty, shape, .. } => {
                Some((name.to_owned(), (shape.to_vec(), onnx_type(ty))))
            }
            _ => None,
        })
        .collect())
}

/// The shapes of Runs at batch sizes 1 and 2, a dimension that differs between them marked as the batch's.
fn batch_dims(one: &Observed, two: &Observed) -> HashMap<String, TensorInfo> {
    one.iter()
        .map(|(name, (dims_one, elem_type))| {
            let dims_two = two.get(name).map(|t| t.0.as_slice()).unwrap_or_default();
            let dims = dims_one
                .iter()
                .enumerate()
                .map(|(i, &d)| (dims_two.get(i) == Some(&d)).then_some(d))
                .collect();
            (
                name.clone(),
                TensorInfo {
                    dims,
                    elem_type: *elem_type,
                },
            )
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
