//! Reading and editing the graph: the head between the target and the scores, renames, the image input's
//! declared shape, constant values.

use std::collections::{HashMap, HashSet};

use super::BATCH;
use super::proto::{
    Dim, DimensionValue, GraphProto, ModelProto, TypeValue, ValueInfoProto, data_type,
};

pub fn graph(model: &ModelProto) -> &GraphProto {
    model.graph.as_ref().expect("checked in read")
}

pub fn graph_mut(model: &mut ModelProto) -> &mut GraphProto {
    model.graph.as_mut().expect("checked in read")
}

/// The nodes on a path from the target to the scores.
pub struct Head {
    pub target: String,
    pub scores: String,
    /// Indices into the graph's nodes, in graph order.
    pub nodes: Vec<usize>,
    /// The tensors of the head that need a gradient: those whose values depend on the target's and that lead to
    /// the scores.
    pub need: HashSet<String>,
}

impl Head {
    pub fn find(graph: &GraphProto, target: &str, scores: &str) -> Head {
        let mut depends: HashSet<&str> = HashSet::from([target]);
        // Shape and Size read a tensor's shape only: what is computed from them (Swin's attention mask, built
        // with ConstantOfShape and ScatterND by the legacy exporter) does not change with the target's values.
        let mut values: HashSet<&str> = HashSet::from([target]);
        let mut forward = Vec::new();
        for (i, node) in graph.node.iter().enumerate() {
            if node.input.iter().any(|x| depends.contains(x.as_str())) {
                forward.push(i);
                depends.extend(node.output.iter().map(String::as_str));
                let reads_values = !matches!(node.op_type.as_str(), "Shape" | "Size");
                if reads_values && node.input.iter().any(|x| values.contains(x.as_str())) {
                    values.extend(node.output.iter().map(String::as_str));
                }
            }
        }
        let mut leads: HashSet<String> = HashSet::from([scores.to_owned()]);
        let mut nodes = Vec::new();
        for &i in forward.iter().rev() {
            let node = &graph.node[i];
            if node.output.iter().any(|o| leads.contains(o)) {
                nodes.push(i);
                leads.extend(
                    node.input
                        .iter()
                        .filter(|x| depends.contains(x.as_str()))
                        .cloned(),
                );
            }
        }
        nodes.reverse();
        let need = leads
            .into_iter()
            .filter(|t| values.contains(t.as_str()))
            .collect();
        Head {
            target: target.to_owned(),
            scores: scores.to_owned(),
            nodes,
            need,
        }
    }

    /// The op types of the head, shape arithmetic included, each once, in graph order.
    pub fn ops(&self, graph: &GraphProto) -> Vec<String> {
        let mut ops: Vec<String> = Vec::new();
        for node in self.nodes.iter().map(|&i| &graph.node[i]) {
            if !ops.contains(&node.op_type) {
                ops.push(node.op_type.clone());
            }
        }
        ops
    }
}

/// The node outputs the scores depend on, in graph order, the scores left out.
pub fn leading_to(graph: &GraphProto, scores: &str) -> Vec<String> {
    let mut ancestors: HashSet<&str> = HashSet::from([scores]);
    for node in graph.node.iter().rev() {
        if node.output.iter().any(|o| ancestors.contains(o.as_str())) {
            ancestors.extend(node.input.iter().map(String::as_str));
        }
    }
    graph
        .node
        .iter()
        .flat_map(|n| &n.output)
        .filter(|o| ancestors.contains(o.as_str()) && o.as_str() != scores)
        .cloned()
        .collect()
}

/// Renames a tensor everywhere it appears, subgraphs included.
pub fn rename(graph: &mut GraphProto, old: &str, new: &str) {
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

/// Every tensor name in use in the main graph.
pub fn all_names(graph: &GraphProto) -> HashSet<String> {
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

/// Fixes the image input's channels, height and width at what camserve feeds, for shape inference.
pub fn declare_input_size(graph: &mut GraphProto, input: &str, [height, width]: [usize; 2]) {
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
pub fn free_batch(graph: &mut GraphProto, input: &str) {
    if let Some(TypeValue::TensorType(t)) = graph
        .input
        .iter_mut()
        .find(|i| i.name == input)
        .and_then(|i| i.r#type.as_mut())
        .and_then(|t| t.value.as_mut())
        && let Some(first) = t.shape.as_mut().and_then(|s| s.dim.first_mut())
    {
        first.value = Some(DimensionValue::DimParam(BATCH.into()));
    }
    // Declared intermediate shapes would contradict the new batch size.
    graph.value_info.clear();
}

/// Values of small initializers and Constant nodes: the axes some ops take as inputs (weights are not read).
pub fn constants(graph: &GraphProto) -> HashMap<String, Vec<f64>> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::plain::proto::{Attr, NodeProto};

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
        let head = Head::find(&graph, "t", "y");
        assert_eq!(head.nodes, vec![3, 4, 6]);
        let mut need: Vec<_> = head.need.into_iter().collect();
        need.sort();
        assert_eq!(need, ["f", "p", "t", "y"]);
        assert_eq!(leading_to(&graph, "y"), ["a", "t", "p", "f"]);
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
