//! The backward pass over the head, for one seed, as the body of a Loop over the seeds; and which head nodes it
//! needs rules for.

use std::collections::HashMap;

use super::emit::Writer;
use super::graph::Head;
use super::layout::Layout;
use super::proto::{Attr, GraphProto, NodeProto, ValueInfoProto, data_type};
use super::rules::{self, Context, SUPPORTED, Statistics, TensorInfo};

/// Whether the node carries gradients: it computes a float tensor from the target's values (the rest is shape
/// arithmetic). A tensor of unknown type counts as float, so that its node is refused rather than skipped if no
/// rule covers it.
fn carries_gradient(node: &NodeProto, head: &Head, shapes: &HashMap<String, TensorInfo>) -> bool {
    node.output.iter().any(|o| head.need.contains(o))
        && shapes.get(&node.output[0]).is_none_or(TensorInfo::is_float)
}

/// The head's nodes that carry gradients and have no rule, as "Op (node `name`)".
pub fn unsupported(
    graph: &GraphProto,
    head: &Head,
    shapes: &HashMap<String, TensorInfo>,
) -> Vec<String> {
    head.nodes
        .iter()
        .map(|&i| &graph.node[i])
        .filter(|n| carries_gradient(n, head, shapes) && rules::rule(n).is_none())
        .map(|n| format!("{} (node `{}`)", n.op_type, n.label()))
        .collect()
}

/// Refuses a head with an op that has no rule, naming it and listing the supported ones.
pub fn check_supported(
    graph: &GraphProto,
    head: &Head,
    shapes: &HashMap<String, TensorInfo>,
) -> Result<(), String> {
    let refused = unsupported(graph, head, shapes);
    if refused.is_empty() {
        return Ok(());
    }
    Err(format!(
        "its head has ops camserve cannot differentiate: {} (supported: {})",
        refused.join(", "),
        SUPPORTED.join(", ")
    ))
}

/// Switches on the forward outputs that backward rules read: MaxPool's Indices, LayerNormalization's Mean and
/// InvStdDev.
pub fn switch_on_statistics(graph: &mut GraphProto, head: &Head, w: &mut Writer) -> Statistics {
    let mut statistics = Statistics::default();
    for &i in &head.nodes {
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
            statistics
                .maxpool_indices
                .insert(out[0].clone(), out[1].clone());
        } else {
            statistics
                .layer_norm
                .insert(out[0].clone(), (out[1].clone(), out[2].clone()));
        }
    }
    statistics
}

/// The backward for one seed (row `iteration` of `seeds`, [N,C]) from the scores to the target, as a Loop body.
pub fn body(
    context: &Context,
    w: &mut Writer,
    graph: &GraphProto,
    head: &Head,
    seeds: &str,
    layout: &Layout,
) -> Result<GraphProto, String> {
    let first = w.e.nodes.len();
    let (iteration, condition) = (w.fresh("iteration"), w.fresh("condition"));
    let seed = w.op("Gather", &[seeds, &iteration], vec![("axis", Attr::Int(1))]);
    let target_grad = propagate(context, w, graph, head, seed)?;
    // The gradient mapped to NCHW as the activations are.
    let target_grad = layout.emit(w, &target_grad, &context.info(&head.target)?.dims);
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
            ValueInfoProto::tensor(&target_grad, data_type::FLOAT, None),
        ],
        ..Default::default()
    })
}

/// Runs the rules from the scores (whose gradient is `seed`) back to the target, in reverse graph order, adding
/// up the gradients of tensors read more than once. Returns the target's gradient.
fn propagate(
    context: &Context,
    w: &mut Writer,
    graph: &GraphProto,
    head: &Head,
    seed: String,
) -> Result<String, String> {
    let mut grads: HashMap<String, String> = HashMap::from([(head.scores.clone(), seed)]);
    for &i in head.nodes.iter().rev() {
        let node = &graph.node[i];
        let output_grads: Vec<Option<String>> =
            node.output.iter().map(|o| grads.get(o).cloned()).collect();
        if output_grads.iter().all(Option::is_none) || !carries_gradient(node, head, context.shapes)
        {
            continue;
        }
        let inputs = rules::backward(context, w, node, &output_grads, &head.need)
            .map_err(|e| format!("node `{}` ({}): {e}", node.label(), node.op_type))?;
        for (input, grad) in inputs {
            let total = match grads.remove(&input) {
                Some(earlier) => w.op("Add", &[&earlier, &grad], vec![]),
                None => grad,
            };
            grads.insert(input, total);
        }
    }
    grads
        .remove(&head.target)
        .ok_or_else(|| "no gradient reached the target".into())
}
