//! The backward rule of every op a classifier's head may contain: given the gradient of a node's first output,
//! the nodes that compute the gradients of its inputs. Forward tensors are read as they are (the backward runs
//! after the forward, inside a Loop over the seeds); shapes come from `super::shapes`.
//!
//! `RULES` maps each op to its rule and is the one list of supported ops: `SUPPORTED`, the refusal messages
//! and `camserve targets` all read it.

mod activations;
mod arithmetic;
mod conv;
mod matmul;
mod normalization;
mod pooling;
mod reduce;
mod shape;
mod softmax;

use std::collections::{HashMap, HashSet};

use super::emit::Writer;
use super::proto::{NodeProto, data_type};

/// What a tensor of the head looks like at the model's input size: dims (None where it follows the batch
/// size) and ONNX element type.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub dims: Vec<Option<i64>>,
    pub elem_type: i32,
}

impl TensorInfo {
    pub fn is_float(&self) -> bool {
        matches!(
            self.elem_type,
            data_type::FLOAT | data_type::DOUBLE | data_type::FLOAT16 | data_type::BFLOAT16
        )
    }
}

/// What the rules read: shapes, constant values, and the forward outputs switched on for the backward.
pub struct Context<'a> {
    pub shapes: &'a HashMap<String, TensorInfo>,
    pub constants: &'a HashMap<String, Vec<f64>>,
    pub statistics: Statistics,
}

/// Forward outputs a plain graph leaves off that some rules read, by the node's first output.
#[derive(Default)]
pub struct Statistics {
    /// MaxPool output -> its Indices output.
    pub maxpool_indices: HashMap<String, String>,
    /// LayerNormalization output -> its Mean and InvStdDev outputs.
    pub layer_norm: HashMap<String, (String, String)>,
}

impl Context<'_> {
    pub fn info(&self, name: &str) -> Result<&TensorInfo, String> {
        self.shapes
            .get(name)
            .ok_or_else(|| format!("the shape of `{name}` is unknown"))
    }

    fn dims(&self, name: &str) -> Result<&[Option<i64>], String> {
        Ok(&self.info(name)?.dims)
    }

    fn rank(&self, name: &str) -> Result<i64, String> {
        Ok(self.dims(name)?.len() as i64)
    }

    /// The spatial dims (after N and C), which must not depend on the batch size.
    fn spatial(&self, name: &str) -> Result<Vec<i64>, String> {
        self.dims(name)?
            .get(2..)
            .filter(|spatial| !spatial.is_empty())
            .ok_or_else(|| format!("`{name}` has no spatial dimensions"))?
            .iter()
            .map(|d| {
                d.ok_or_else(|| format!("`{name}` has a spatial size that changes with the batch"))
            })
            .collect()
    }

    fn constant(&self, name: &str, what: &str) -> Result<&[f64], String> {
        self.constants
            .get(name)
            .map(Vec::as_slice)
            .ok_or_else(|| format!("{what} `{name}` must be a constant"))
    }
}

/// Gradients of a node's inputs, by input name.
pub type InputGradients = Vec<(String, String)>;

/// The node a rule differentiates, the gradients of its outputs, and which tensors need a gradient.
pub struct Step<'a> {
    pub node: &'a NodeProto,
    /// By output; None where the output does not reach the scores.
    pub output_grads: &'a [Option<String>],
    pub need: &'a HashSet<String>,
}

impl Step<'_> {
    fn op(&self) -> &str {
        &self.node.op_type
    }

    /// The first input, the one most rules differentiate for.
    fn x(&self) -> &str {
        &self.node.input[0]
    }

    fn input(&self, i: usize) -> &str {
        &self.node.input[i]
    }

    fn y(&self) -> &str {
        &self.node.output[0]
    }

    /// The gradient of the first output (`backward` calls first-output rules only when there is one).
    fn g(&self) -> &str {
        self.output_grads[0]
            .as_deref()
            .expect("backward checks the first output's gradient")
    }

    fn needs(&self, input: &str) -> bool {
        self.need.contains(input)
    }

    /// `grad` as the gradient of the first input, the whole answer of a one-input rule.
    fn only(&self, grad: String) -> Result<InputGradients, String> {
        Ok(vec![(self.x().to_owned(), grad)])
    }
}

type Backward = fn(&Context, &mut Writer, &Step) -> Result<InputGradients, String>;

/// One entry of the table: an op and its backward.
pub struct Rule {
    pub op: &'static str,
    /// Whether the rule reads every output's gradient (Split); the others read the first output's only, and a
    /// node whose first output does not reach the scores gets no input gradients from them.
    every_output: bool,
    backward: Backward,
}

const fn first(op: &'static str, backward: Backward) -> Rule {
    Rule {
        op,
        every_output: false,
        backward,
    }
}

const fn every(op: &'static str, backward: Backward) -> Rule {
    Rule {
        op,
        every_output: true,
        backward,
    }
}

/// Ops with a backward rule. Anything else in a head is refused at load, by name, listing these in this order.
pub const RULES: &[Rule] = &[
    first("Identity", shape::identity),
    first("Dropout", shape::identity),
    first("Flatten", shape::reshape),
    first("Reshape", shape::reshape),
    first("Squeeze", shape::reshape),
    first("Unsqueeze", shape::reshape),
    first("Cast", shape::cast),
    first("Expand", shape::expand),
    first("Transpose", shape::transpose),
    first("Concat", shape::concat),
    first("Gather", shape::gather),
    first("Relu", activations::relu),
    first("LeakyRelu", activations::leaky_relu),
    first("Clip", activations::clip),
    first("Sigmoid", activations::sigmoid),
    first("Tanh", activations::tanh),
    first("HardSigmoid", activations::hard_sigmoid),
    first("HardSwish", activations::hard_swish),
    first("Erf", activations::erf),
    first("Gelu", activations::gelu),
    first("Exp", arithmetic::exp),
    first("Neg", arithmetic::neg),
    first("Sqrt", arithmetic::sqrt),
    first("Softmax", softmax::softmax),
    first("LogSoftmax", softmax::log_softmax),
    first("Add", arithmetic::sum),
    first("Sub", arithmetic::sum),
    first("Mul", arithmetic::mul),
    first("Div", arithmetic::div),
    first("Pow", arithmetic::pow),
    first("Gemm", matmul::gemm),
    first("MatMul", matmul::matmul),
    first("BatchNormalization", normalization::batch_norm),
    first("LayerNormalization", normalization::layer_norm),
    first("ReduceMean", reduce::reduce),
    first("ReduceSum", reduce::reduce),
    first("ReduceL2", reduce::reduce_l2),
    first("GlobalAveragePool", pooling::global_average_pool),
    first("GlobalMaxPool", pooling::global_max_pool),
    first("AveragePool", pooling::average_pool),
    first("MaxPool", pooling::max_pool),
    first("Conv", conv::conv),
    first("Abs", arithmetic::abs),
    first("Max", arithmetic::max_min),
    first("Min", arithmetic::max_min),
    first("Sum", arithmetic::sum),
    first("Slice", shape::slice),
    every("Split", shape::split),
    first("Pad", shape::pad),
    first("Where", arithmetic::select),
];

/// The op names of `RULES`, in its order.
pub const SUPPORTED: [&str; RULES.len()] = {
    let mut names = [""; RULES.len()];
    let mut i = 0;
    while i < RULES.len() {
        names[i] = RULES[i].op;
        i += 1;
    }
    names
};

/// The rule for an op of the standard domain.
pub fn rule(node: &NodeProto) -> Option<&'static Rule> {
    let standard = node.domain.is_empty() || node.domain == "ai.onnx";
    standard
        .then(|| RULES.iter().find(|r| r.op == node.op_type))
        .flatten()
}

/// The backward of `node` given the gradients of its outputs (None: the output does not reach the scores); only
/// inputs in `need` get one.
pub fn backward(
    c: &Context,
    w: &mut Writer,
    node: &NodeProto,
    output_grads: &[Option<String>],
    need: &HashSet<String>,
) -> Result<InputGradients, String> {
    let rule = rule(node).ok_or_else(|| format!("no backward rule for {}", node.op_type))?;
    if !rule.every_output && output_grads[0].is_none() {
        return Ok(Vec::new());
    }
    let step = Step {
        node,
        output_grads,
        need,
    };
    (rule.backward)(c, w, &step)
}

/// An axis attribute, negative ones counted from the end.
fn normalize_axis(axis: i64, rank: i64) -> i64 {
    if axis < 0 { axis + rank } else { axis }
}

/// Sums `g` (shaped like the broadcast result `y`) back down to the shape of `x`.
fn unbroadcast(c: &Context, w: &mut Writer, g: &str, x: &str, y: &str) -> Result<String, String> {
    let dy = c.dims(y)?.to_vec();
    unbroadcast_dims(c, w, g, x, &dy, y)
}

/// `unbroadcast` for a `g` of dims `dy` (named `y` in messages).
fn unbroadcast_dims(
    c: &Context,
    w: &mut Writer,
    g: &str,
    x: &str,
    dy: &[Option<i64>],
    y: &str,
) -> Result<String, String> {
    let dx = c.dims(x)?;
    if dx == dy {
        return Ok(g.to_owned());
    }
    let lead = dy
        .len()
        .checked_sub(dx.len())
        .ok_or_else(|| format!("`{x}` has a higher rank than the result `{y}`"))?;
    let mut axes: Vec<i64> = (0..lead as i64).collect();
    for (i, (&a, &b)) in dx.iter().zip(&dy[lead..]).enumerate() {
        match (a, b) {
            _ if a == b => {}
            (Some(1), _) => axes.push((lead + i) as i64),
            _ => return Err(format!("cannot reduce `{y}` {dy:?} to `{x}` {dx:?}")),
        }
    }
    let summed = w.reduce("ReduceSum", g, &axes, true);
    Ok(w.reshape_like(&summed, x))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_names_each_op_once() {
        let mut ops: Vec<&str> = RULES.iter().map(|r| r.op).collect();
        ops.sort_unstable();
        let before = ops.len();
        ops.dedup();
        assert_eq!(ops.len(), before, "an op is in RULES twice");
    }

    #[test]
    fn every_supported_op_finds_its_rule() {
        assert_eq!(SUPPORTED.len(), RULES.len());
        for op in SUPPORTED {
            let node = NodeProto {
                op_type: op.into(),
                ..Default::default()
            };
            assert_eq!(rule(&node).map(|r| r.op), Some(op));
        }
        let foreign = NodeProto {
            op_type: "Relu".into(),
            domain: "com.microsoft".into(),
            ..Default::default()
        };
        assert!(rule(&foreign).is_none());
    }
}
