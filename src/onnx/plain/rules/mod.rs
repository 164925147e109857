//! The backward rule of every op a classifier's head may contain: given the gradient of a node's first output,
//! the nodes that compute the gradients of its inputs. Forward tensors are read as they are (the backward runs
//! after the forward, inside a Loop over the seeds); shapes come from a probe Run (`super::shapes`).

use std::collections::{HashMap, HashSet};

use super::emit::Writer;
use super::proto::{Attr, NodeProto, data_type};

/// Ops with a backward rule. Anything else in a head is refused at load, by name.
pub const SUPPORTED: [&str; 47] = [
    "Identity",
    "Dropout",
    "Flatten",
    "Reshape",
    "Squeeze",
    "Unsqueeze",
    "Cast",
    "Expand",
    "Transpose",
    "Concat",
    "Gather",
    "Relu",
    "LeakyRelu",
    "Clip",
    "Sigmoid",
    "Tanh",
    "HardSigmoid",
    "HardSwish",
    "Erf",
    "Gelu",
    "Exp",
    "Neg",
    "Sqrt",
    "Softmax",
    "LogSoftmax",
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Pow",
    "Gemm",
    "MatMul",
    "BatchNormalization",
    "LayerNormalization",
    "ReduceMean",
    "ReduceSum",
    "GlobalAveragePool",
    "GlobalMaxPool",
    "AveragePool",
    "MaxPool",
    "Conv",
    "Abs",
    "Max",
    "Min",
    "Sum",
    "Slice",
    "Split",
];

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
    /// MaxPool output -> its Indices output.
    pub maxpool_indices: HashMap<String, String>,
    /// LayerNormalization output -> its Mean and InvStdDev outputs.
    pub layer_norm_stats: HashMap<String, (String, String)>,
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

/// The backward of `node` given the gradients of its outputs (None: the output does not reach the scores); only
/// inputs in `need` get one. Split is the one op whose every output matters; the rest use the first.
pub fn backward(
    c: &Context,
    w: &mut Writer,
    node: &NodeProto,
    output_grads: &[Option<String>],
    need: &HashSet<String>,
) -> Result<InputGradients, String> {
    if node.op_type == "Split" {
        return split(c, w, node, output_grads);
    }
    let Some(g) = output_grads[0].as_deref() else {
        return Ok(Vec::new());
    };
    let x = node.input[0].as_str();
    let y = node.output[0].as_str();
    let one = |grad: String| Ok(vec![(x.to_owned(), grad)]);
    match node.op_type.as_str() {
        "Identity" | "Dropout" => one(g.to_owned()),
        "Flatten" | "Reshape" | "Squeeze" | "Unsqueeze" => one(w.reshape_like(g, x)),
        "Cast" => {
            let to = c.info(x)?.elem_type as i64;
            one(w.op("Cast", &[g], vec![("to", Attr::Int(to))]))
        }
        "Expand" => one(unbroadcast(c, w, g, x, y)?),
        "Transpose" => {
            let rank = c.rank(x)?;
            let perm = node
                .ints("perm")
                .unwrap_or_else(|| (0..rank).rev().collect());
            let mut inverse = vec![0; perm.len()];
            for (i, &p) in perm.iter().enumerate() {
                inverse[p as usize] = i as i64;
            }
            one(w.op("Transpose", &[g], vec![("perm", Attr::Ints(inverse))]))
        }
        "Relu" => one(where_positive(w, g, x, None)),
        "LeakyRelu" => {
            let scaled = {
                let alpha = w.float(node.float("alpha").unwrap_or(0.01));
                w.op("Mul", &[g, &alpha], vec![])
            };
            one(where_positive(w, g, x, Some(&scaled)))
        }
        "Clip" => clip(w, node, g),
        "Sigmoid" => {
            // y (1 - y)
            let one_ = w.float(1.0);
            let rest = w.op("Sub", &[&one_, y], vec![]);
            let d = w.op("Mul", &[y, &rest], vec![]);
            one(w.op("Mul", &[g, &d], vec![]))
        }
        "Tanh" => {
            let one_ = w.float(1.0);
            let square = w.op("Mul", &[y, y], vec![]);
            let d = w.op("Sub", &[&one_, &square], vec![]);
            one(w.op("Mul", &[g, &d], vec![]))
        }
        "Exp" => one(w.op("Mul", &[g, y], vec![])),
        "Neg" => one(w.op("Neg", &[g], vec![])),
        "Abs" => {
            let sign = w.op("Sign", &[x], vec![]);
            one(w.op("Mul", &[g, &sign], vec![]))
        }
        "Sqrt" => {
            let two = w.float(2.0);
            let twice = w.op("Mul", &[y, &two], vec![]);
            one(w.op("Div", &[g, &twice], vec![]))
        }
        "Erf" => {
            // 2/sqrt(pi) exp(-x^2)
            let square = w.op("Mul", &[x, x], vec![]);
            let negated = w.op("Neg", &[&square], vec![]);
            let e = w.op("Exp", &[&negated], vec![]);
            let k = w.float(std::f32::consts::FRAC_2_SQRT_PI);
            let d = w.op("Mul", &[&e, &k], vec![]);
            one(w.op("Mul", &[g, &d], vec![]))
        }
        "Gelu" => gelu(w, node, g),
        "HardSigmoid" => {
            let alpha = node.float("alpha").unwrap_or(0.2);
            let beta = node.float("beta").unwrap_or(0.5);
            let (a, b) = (w.float(alpha), w.float(beta));
            let scaled = w.op("Mul", &[x, &a], vec![]);
            let z = w.op("Add", &[&scaled, &b], vec![]);
            let (zero, one_) = (w.float(0.0), w.float(1.0));
            let above = w.op("Greater", &[&z, &zero], vec![]);
            let below = w.op("Less", &[&z, &one_], vec![]);
            let inside = w.op("And", &[&above, &below], vec![]);
            let ga = w.op("Mul", &[g, &a], vec![]);
            one(w.op("Where", &[&inside, &ga, &zero], vec![]))
        }
        "HardSwish" => {
            // 0 below -3, 1 above 3, x/3 + 1/2 between
            let (three, minus_three, half) = (w.float(3.0), w.float(-3.0), w.float(0.5));
            let (zero, one_) = (w.float(0.0), w.float(1.0));
            let third = w.op("Div", &[x, &three], vec![]);
            let middle = w.op("Add", &[&third, &half], vec![]);
            let high = w.op("Greater", &[x, &three], vec![]);
            let upper = w.op("Where", &[&high, &one_, &middle], vec![]);
            let low = w.op("Less", &[x, &minus_three], vec![]);
            let d = w.op("Where", &[&low, &zero, &upper], vec![]);
            one(w.op("Mul", &[g, &d], vec![]))
        }
        "Add" | "Sub" | "Sum" => {
            let mut grads = Vec::new();
            for (i, input) in node.input.iter().enumerate() {
                if need.contains(input) {
                    let signed = if node.op_type == "Sub" && i == 1 {
                        w.op("Neg", &[g], vec![])
                    } else {
                        g.to_owned()
                    };
                    grads.push((input.clone(), unbroadcast(c, w, &signed, input, y)?));
                }
            }
            Ok(grads)
        }
        "Mul" => {
            let (a, b) = (node.input[0].as_str(), node.input[1].as_str());
            let mut grads = Vec::new();
            for (this, other) in [(a, b), (b, a)] {
                if need.contains(this) {
                    let product = w.op("Mul", &[g, other], vec![]);
                    grads.push((this.to_owned(), unbroadcast(c, w, &product, this, y)?));
                }
            }
            Ok(grads)
        }
        "Div" => {
            let (a, b) = (node.input[0].as_str(), node.input[1].as_str());
            let mut grads = Vec::new();
            if need.contains(a) {
                let quotient = w.op("Div", &[g, b], vec![]);
                grads.push((a.to_owned(), unbroadcast(c, w, &quotient, a, y)?));
            }
            if need.contains(b) {
                // d(a/b)/db = -y/b
                let gy = w.op("Mul", &[g, y], vec![]);
                let quotient = w.op("Div", &[&gy, b], vec![]);
                let negated = w.op("Neg", &[&quotient], vec![]);
                grads.push((b.to_owned(), unbroadcast(c, w, &negated, b, y)?));
            }
            Ok(grads)
        }
        "Max" | "Min" => {
            // The gradient goes to the input that gave the result (to each of equal ones, as ties are rare).
            let mut grads = Vec::new();
            let zero = w.float(0.0);
            for input in node.input.iter().filter(|i| need.contains(*i)) {
                let chosen = w.op("Equal", &[input, y], vec![]);
                let masked = w.op("Where", &[&chosen, g, &zero], vec![]);
                grads.push((input.clone(), unbroadcast(c, w, &masked, input, y)?));
            }
            Ok(grads)
        }
        "Pow" => {
            let p = node.input[1].as_str();
            if need.contains(p) {
                return Err("Pow with an exponent that depends on the target".into());
            }
            // p x^(p-1)
            let one_ = w.float(1.0);
            let one_ = if w.opset() >= 15 {
                w.op("CastLike", &[&one_, p], vec![])
            } else {
                one_
            };
            let lower = w.op("Sub", &[p, &one_], vec![]);
            let power = w.op("Pow", &[x, &lower], vec![]);
            let d = w.op("Mul", &[p, &power], vec![]);
            let gd = w.op("Mul", &[g, &d], vec![]);
            one(unbroadcast(c, w, &gd, x, y)?)
        }
        "Gemm" => gemm(c, w, node, g, need),
        "MatMul" => matmul(c, w, node, g, need),
        "BatchNormalization" => {
            if node.int("training_mode").unwrap_or(0) != 0 {
                return Err("BatchNormalization with training_mode=1".into());
            }
            // scale / sqrt(var + eps), per channel (axis 1)
            let (scale, var) = (node.input[1].as_str(), node.input[4].as_str());
            let eps = w.float(node.float("epsilon").unwrap_or(1e-5));
            let shifted = w.op("Add", &[var, &eps], vec![]);
            let root = w.op("Sqrt", &[&shifted], vec![]);
            let factor = w.op("Div", &[scale, &root], vec![]);
            let mut shape = vec![-1];
            shape.resize(c.rank(x)? as usize - 1, 1);
            let shape = w.ints(&shape);
            let factor = w.op("Reshape", &[&factor, &shape], vec![]);
            one(w.op("Mul", &[g, &factor], vec![]))
        }
        "LayerNormalization" => layer_norm(c, w, node, g),
        "Softmax" | "LogSoftmax" => {
            let axes = softmax_axes(c, w.opset(), node)?;
            if node.op_type == "Softmax" {
                // y (g - sum(g y))
                let gy = w.op("Mul", &[g, y], vec![]);
                let s = w.reduce("ReduceSum", &gy, &axes, true);
                let centred = w.op("Sub", &[g, &s], vec![]);
                one(w.op("Mul", &[y, &centred], vec![]))
            } else {
                // g - exp(y) sum(g)
                let s = w.reduce("ReduceSum", g, &axes, true);
                let p = w.op("Exp", &[y], vec![]);
                let ps = w.op("Mul", &[&p, &s], vec![]);
                one(w.op("Sub", &[g, &ps], vec![]))
            }
        }
        "ReduceMean" | "ReduceSum" => reduce(c, w, node, g),
        "GlobalAveragePool" => {
            let spatial: Vec<i64> = (2..c.rank(x)?).collect();
            one(spread_over(c, w, g, x, &spatial, true)?)
        }
        "GlobalMaxPool" => {
            // All of each plane's gradient goes to its first maximum, as PyTorch's does.
            let flat_shape = w.ints(&[0, 0, -1]);
            let flat = w.op("Reshape", &[x, &flat_shape], vec![]);
            let index = w.op(
                "ArgMax",
                &[&flat],
                vec![("axis", Attr::Int(2)), ("keepdims", Attr::Int(1))],
            );
            let shape = w.shape(&flat);
            let zeros = w.op("ConstantOfShape", &[&shape], vec![]);
            let g_flat = w.op("Reshape", &[g, &flat_shape], vec![]);
            let scattered = w.op(
                "ScatterElements",
                &[&zeros, &index, &g_flat],
                vec![("axis", Attr::Int(2))],
            );
            one(w.reshape_like(&scattered, x))
        }
        "Conv" => conv(c, w, node, g, need),
        "AveragePool" => average_pool(c, w, node, g),
        "MaxPool" => max_pool(c, w, node, g),
        "Concat" => {
            let rank = c.rank(y)?;
            let axis = node.int("axis").unwrap_or(0);
            let axis = if axis < 0 { axis + rank } else { axis };
            let axes = w.ints(&[axis]);
            let mut start = w.ints(&[0]);
            let mut grads = Vec::new();
            for input in &node.input {
                let shape = w.shape(input);
                let at = w.ints(&[axis]);
                let size = w.op("Gather", &[&shape, &at], vec![("axis", Attr::Int(0))]);
                let end = w.op("Add", &[&start, &size], vec![]);
                if need.contains(input) {
                    grads.push((
                        input.clone(),
                        w.op("Slice", &[g, &start, &end, &axes], vec![]),
                    ));
                }
                start = end;
            }
            Ok(grads)
        }
        "Gather" => {
            if node.int("axis").unwrap_or(0) != 0 {
                return Err("Gather on an axis other than 0".into());
            }
            let indices = node.input[1].as_str();
            let shape = w.shape(x);
            let first = w.ints(&[0]);
            let rows = w.op("Gather", &[&shape, &first], vec![("axis", Attr::Int(0))]);
            let zero = w.int(0);
            let negative = w.op("Less", &[indices, &zero], vec![]);
            let wrapped = w.op("Add", &[indices, &rows], vec![]);
            let indices = w.op("Where", &[&negative, &wrapped, indices], vec![]);
            if w.opset() < 16 {
                // No scatter-add before opset 16, and a plain ScatterND keeps only the last of repeated indices:
                // sum one-hot rows instead, [rows,K] x [K,rest].
                let flat = w.ints(&[-1]);
                let picked = w.op("Reshape", &[&indices, &flat], vec![]);
                let values = w.floats(&[2], &[0.0, 1.0]);
                let one_hot = w.op(
                    "OneHot",
                    &[&picked, &rows, &values],
                    vec![("axis", Attr::Int(0))],
                );
                let count = w.shape(&picked);
                let g_shape = w.op("Concat", &[&count, &flat], vec![("axis", Attr::Int(0))]);
                let g_rows = w.op("Reshape", &[g, &g_shape], vec![]);
                let summed = w.op("MatMul", &[&one_hot, &g_rows], vec![]);
                return one(w.reshape_like(&summed, x));
            }
            let indices = w.unsqueeze(&indices, &[-1]);
            let zeros = w.op("ConstantOfShape", &[&shape], vec![]);
            let reduction = vec![("reduction", Attr::Str("add"))];
            one(w.op("ScatterND", &[&zeros, &indices, g], reduction))
        }
        "Slice" => {
            // The positions the slice took, as indices into the flattened input: the same Slice of an iota.
            let shape = w.shape(x);
            let total = w.reduce("ReduceProd", &shape, &[0], false);
            let (zero, one_) = (w.int(0), w.int(1));
            let iota = w.op("Range", &[&zero, &total, &one_], vec![]);
            let positions = w.op("Reshape", &[&iota, &shape], vec![]);
            let mut inputs: Vec<&str> = node.input.iter().map(String::as_str).collect();
            inputs[0] = &positions;
            let taken = w.op("Slice", &inputs, vec![]);
            let flat = w.ints(&[-1]);
            let taken = w.op("Reshape", &[&taken, &flat], vec![]);
            let flat_g = w.op("Reshape", &[g, &flat], vec![]);
            let total = w.op("Reshape", &[&total, &flat], vec![]);
            let zeros = w.op("ConstantOfShape", &[&total], vec![]);
            let scattered = w.op(
                "ScatterElements",
                &[&zeros, &taken, &flat_g],
                vec![("axis", Attr::Int(0))],
            );
            one(w.op("Reshape", &[&scattered, &shape], vec![]))
        }
        other => Err(format!("no backward rule for {other}")),
    }
}

/// The pieces' gradients side by side again; a piece that does not reach the scores contributes zeros.
fn split(
    c: &Context,
    w: &mut Writer,
    node: &NodeProto,
    output_grads: &[Option<String>],
) -> Result<InputGradients, String> {
    let x = node.input[0].as_str();
    let rank = c.rank(x)?;
    let axis = node.int("axis").unwrap_or(0);
    let axis = if axis < 0 { axis + rank } else { axis };
    let mut pieces = Vec::new();
    for (output, grad) in node.output.iter().zip(output_grads) {
        pieces.push(match grad {
            Some(g) => g.clone(),
            None => {
                let shape = w.shape(output);
                w.op("ConstantOfShape", &[&shape], vec![])
            }
        });
    }
    let pieces: Vec<&str> = pieces.iter().map(String::as_str).collect();
    Ok(vec![(
        x.to_owned(),
        w.op("Concat", &pieces, vec![("axis", Attr::Int(axis))]),
    )])
}

/// `g` where x > 0, else `otherwise` (zero when None): ReLU's and LeakyReLU's backward.
fn where_positive(w: &mut Writer, g: &str, x: &str, otherwise: Option<&str>) -> String {
    let zero = w.float(0.0);
    let positive = w.op("Greater", &[x, &zero], vec![]);
    let otherwise = otherwise.unwrap_or(&zero);
    w.op("Where", &[&positive, g, otherwise], vec![])
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

fn clip(w: &mut Writer, node: &NodeProto, g: &str) -> Result<InputGradients, String> {
    let x = node.input[0].as_str();
    let bound = |i: usize| node.input.get(i).filter(|s| !s.is_empty()).cloned();
    let mut mask: Option<String> = None;
    for (bound, outside) in [(bound(1), "Less"), (bound(2), "Greater")] {
        let Some(bound) = bound else { continue };
        let out = w.op(outside, &[x, &bound], vec![]);
        let inside = w.op("Not", &[&out], vec![]);
        mask = Some(match mask {
            Some(m) => w.op("And", &[&m, &inside], vec![]),
            None => inside,
        });
    }
    let grad = match mask {
        Some(mask) => {
            let zero = w.float(0.0);
            w.op("Where", &[&mask, g, &zero], vec![])
        }
        None => g.to_owned(),
    };
    Ok(vec![(x.to_owned(), grad)])
}

fn gelu(w: &mut Writer, node: &NodeProto, g: &str) -> Result<InputGradients, String> {
    if node.string("approximate").is_some_and(|a| a != "none") {
        return Err("Gelu with approximate=tanh".into());
    }
    // Phi(x) + x phi(x)
    let x = node.input[0].as_str();
    let (half, one_) = (w.float(0.5), w.float(1.0));
    let r = w.float(std::f32::consts::FRAC_1_SQRT_2);
    let scaled = w.op("Mul", &[x, &r], vec![]);
    let erf = w.op("Erf", &[&scaled], vec![]);
    let shifted = w.op("Add", &[&one_, &erf], vec![]);
    let cdf = w.op("Mul", &[&half, &shifted], vec![]);
    let square = w.op("Mul", &[x, x], vec![]);
    let minus_half = w.float(-0.5);
    let exponent = w.op("Mul", &[&square, &minus_half], vec![]);
    let e = w.op("Exp", &[&exponent], vec![]);
    let k = w.float((0.5 / std::f64::consts::PI).sqrt() as f32);
    let pdf = w.op("Mul", &[&e, &k], vec![]);
    let x_pdf = w.op("Mul", &[x, &pdf], vec![]);
    let d = w.op("Add", &[&cdf, &x_pdf], vec![]);
    Ok(vec![(x.to_owned(), w.op("Mul", &[g, &d], vec![]))])
}

fn gemm(
    c: &Context,
    w: &mut Writer,
    node: &NodeProto,
    g: &str,
    need: &HashSet<String>,
) -> Result<InputGradients, String> {
    let alpha = node.float("alpha").unwrap_or(1.0);
    let beta = node.float("beta").unwrap_or(1.0);
    let trans_a = node.int("transA").unwrap_or(0);
    let trans_b = node.int("transB").unwrap_or(0);
    let (a, b) = (node.input[0].as_str(), node.input[1].as_str());
    let attrs = |ta: i64, tb: i64| {
        vec![
            ("alpha", Attr::Float(alpha)),
            ("transA", Attr::Int(ta)),
            ("transB", Attr::Int(tb)),
        ]
    };
    let mut grads = Vec::new();
    if need.contains(a) {
        // Y = A' B' (primes: the optional transposes); dA' = g B'^T
        let grad = if trans_a == 0 {
            w.op("Gemm", &[g, b], attrs(0, 1 - trans_b))
        } else {
            w.op("Gemm", &[b, g], attrs(trans_b, 1))
        };
        grads.push((a.to_owned(), grad));
    }
    if need.contains(b) {
        let grad = if trans_b == 0 {
            w.op("Gemm", &[a, g], attrs(1 - trans_a, 0))
        } else {
            w.op("Gemm", &[g, a], attrs(1, trans_a))
        };
        grads.push((b.to_owned(), grad));
    }
    if let Some(bias) = node.input.get(2).filter(|i| need.contains(*i)) {
        let scaled = if beta == 1.0 {
            g.to_owned()
        } else {
            let k = w.float(beta);
            w.op("Mul", &[g, &k], vec![])
        };
        grads.push((
            bias.clone(),
            unbroadcast(c, w, &scaled, bias, &node.output[0])?,
        ));
    }
    Ok(grads)
}

fn matmul(
    c: &Context,
    w: &mut Writer,
    node: &NodeProto,
    g: &str,
    need: &HashSet<String>,
) -> Result<InputGradients, String> {
    let (a, b) = (node.input[0].as_str(), node.input[1].as_str());
    let y = node.output[0].as_str();
    let (rank_a, rank_b) = (c.rank(a)?, c.rank(b)?);
    if rank_a < 2 || rank_b < 2 {
        return Err("MatMul with a 1-D operand".into());
    }
    let transpose = |w: &mut Writer, t: &str, rank: i64| {
        let mut perm: Vec<i64> = (0..rank).collect();
        perm.swap(rank as usize - 1, rank as usize - 2);
        w.op("Transpose", &[t], vec![("perm", Attr::Ints(perm))])
    };
    // Each product has the result's batch dims and the operand's matrix dims; only batch dims are summed.
    let dy = c.dims(y)?;
    let product_dims = |operand: &[Option<i64>]| {
        let mut dims = dy[..dy.len() - 2].to_vec();
        dims.extend_from_slice(&operand[operand.len() - 2..]);
        dims
    };
    let mut grads = Vec::new();
    if need.contains(a) {
        let bt = transpose(w, b, rank_b);
        let product = w.op("MatMul", &[g, &bt], vec![]);
        let dims = product_dims(c.dims(a)?);
        grads.push((a.to_owned(), unbroadcast_dims(c, w, &product, a, &dims, y)?));
    }
    if need.contains(b) {
        let at = transpose(w, a, rank_a);
        let product = w.op("MatMul", &[&at, g], vec![]);
        let dims = product_dims(c.dims(b)?);
        grads.push((b.to_owned(), unbroadcast_dims(c, w, &product, b, &dims, y)?));
    }
    Ok(grads)
}

fn layer_norm(
    c: &Context,
    w: &mut Writer,
    node: &NodeProto,
    g: &str,
) -> Result<InputGradients, String> {
    let (x, scale) = (node.input[0].as_str(), node.input[1].as_str());
    let rank = c.rank(x)?;
    let axis = node.int("axis").unwrap_or(-1);
    let axis = if axis < 0 { axis + rank } else { axis };
    let axes: Vec<i64> = (axis..rank).collect();
    let (mean, inv_std) = c
        .layer_norm_stats
        .get(&node.output[0])
        .ok_or("LayerNormalization statistics missing")?;
    // dx = inv_std (gs - mean(gs) - xhat mean(gs xhat)), gs = g scale, xhat = (x - mean) inv_std
    let centred = w.op("Sub", &[x, mean], vec![]);
    let xhat = w.op("Mul", &[&centred, inv_std], vec![]);
    let gs = w.op("Mul", &[g, scale], vec![]);
    let m1 = w.reduce("ReduceMean", &gs, &axes, true);
    let gs_xhat = w.op("Mul", &[&gs, &xhat], vec![]);
    let m2 = w.reduce("ReduceMean", &gs_xhat, &axes, true);
    let t1 = w.op("Sub", &[&gs, &m1], vec![]);
    let t2 = w.op("Mul", &[&xhat, &m2], vec![]);
    let inner = w.op("Sub", &[&t1, &t2], vec![]);
    Ok(vec![(
        x.to_owned(),
        w.op("Mul", &[inv_std, &inner], vec![]),
    )])
}

fn softmax_axes(c: &Context, opset: i64, node: &NodeProto) -> Result<Vec<i64>, String> {
    let rank = c.rank(&node.input[0])?;
    let normalize = |a: i64| if a < 0 { a + rank } else { a };
    if opset >= 13 {
        Ok(vec![normalize(node.int("axis").unwrap_or(-1))])
    } else {
        // Before opset 13 the input is coerced to 2-D at `axis`: the softmax runs over all axes from it.
        Ok((normalize(node.int("axis").unwrap_or(1))..rank).collect())
    }
}

fn reduce(
    c: &Context,
    w: &mut Writer,
    node: &NodeProto,
    g: &str,
) -> Result<InputGradients, String> {
    let x = node.input[0].as_str();
    let rank = c.rank(x)?;
    let keepdims = node.int("keepdims").unwrap_or(1) != 0;
    let mut axes: Vec<i64> = match (
        node.ints("axes"),
        node.input.get(1).filter(|i| !i.is_empty()),
    ) {
        (Some(axes), _) => axes,
        (None, Some(input)) => c
            .constant(input, "the axes")?
            .iter()
            .map(|&v| v as i64)
            .collect(),
        (None, None) => Vec::new(),
    };
    if axes.is_empty() {
        if node.int("noop_with_empty_axes").unwrap_or(0) != 0 {
            return Ok(vec![(x.to_owned(), g.to_owned())]);
        }
        axes = (0..rank).collect();
    }
    let mut axes: Vec<i64> = axes
        .iter()
        .map(|&a| if a < 0 { a + rank } else { a })
        .collect();
    axes.sort_unstable();
    let g = if keepdims {
        g.to_owned()
    } else {
        w.unsqueeze(g, &axes)
    };
    Ok(vec![(
        x.to_owned(),
        spread_over(c, w, &g, x, &axes, node.op_type == "ReduceMean")?,
    )])
}

/// The backward of a sum or mean over `axes`: `g` (size 1 on those axes) spread back over them, divided by their
/// size for a mean. With the sizes fixed this is one broadcast Mul by a constant; else Expand (and a Div).
fn spread_over(
    c: &Context,
    w: &mut Writer,
    g: &str,
    x: &str,
    axes: &[i64],
    mean: bool,
) -> Result<String, String> {
    let dims = c.dims(x)?;
    let sizes: Option<Vec<i64>> = axes.iter().map(|&a| dims[a as usize]).collect();
    if let Some(sizes) = sizes {
        let count: i64 = sizes.iter().product();
        let mut shape = vec![1; dims.len()];
        for (&a, &size) in axes.iter().zip(&sizes) {
            shape[a as usize] = size;
        }
        let value = if mean { 1.0 / count as f32 } else { 1.0 };
        let spread = w.floats(&shape, &vec![value; count as usize]);
        return Ok(w.op("Mul", &[g, &spread], vec![]));
    }
    let shape = w.shape(x);
    let spread = w.op("Expand", &[g, &shape], vec![]);
    if !mean {
        return Ok(spread);
    }
    let picked = w.ints(axes);
    let sizes = w.op("Gather", &[&shape, &picked], vec![("axis", Attr::Int(0))]);
    let count = w.count(&sizes);
    Ok(w.op("Div", &[&spread, &count], vec![]))
}

/// Kernel, strides, dilations and explicit pads [begins..., ends...] of a Conv or pooling node.
#[derive(Clone)]
struct Window {
    kernel: Vec<i64>,
    strides: Vec<i64>,
    dilations: Vec<i64>,
    pads: Vec<i64>,
}

fn window(c: &Context, node: &NodeProto, kernel: Vec<i64>) -> Result<Window, String> {
    let nd = kernel.len();
    if nd == 0 || c.spatial(&node.input[0])?.len() != nd || c.spatial(&node.output[0])?.len() != nd
    {
        return Err(format!("a {nd}-D window over `{}`", node.input[0]));
    }
    let strides = node.ints("strides").unwrap_or_else(|| vec![1; nd]);
    let dilations = node.ints("dilations").unwrap_or_else(|| vec![1; nd]);
    let auto_pad = node.string("auto_pad").unwrap_or_default();
    let pads = match auto_pad.as_str() {
        "" | "NOTSET" => node.ints("pads").unwrap_or_else(|| vec![0; 2 * nd]),
        "VALID" => vec![0; 2 * nd],
        "SAME_UPPER" | "SAME_LOWER" => {
            // Output size ceil(L / s); the padding it takes is split, the odd pixel at the end (UPPER) or start.
            let sizes = c.spatial(&node.input[0])?;
            let (mut begins, mut ends) = (Vec::new(), Vec::new());
            for i in 0..nd {
                let (size, s, k, d) = (sizes[i], strides[i], kernel[i], dilations[i]);
                let out = (size + s - 1) / s;
                let total = ((out - 1) * s + (k - 1) * d + 1 - size).max(0);
                let small = total / 2;
                let begin = if auto_pad == "SAME_UPPER" {
                    small
                } else {
                    total - small
                };
                begins.push(begin);
                ends.push(total - begin);
            }
            begins.extend(ends);
            begins
        }
        other => return Err(format!("auto_pad {other}")),
    };
    Ok(Window {
        kernel,
        strides,
        dilations,
        pads,
    })
}

impl Window {
    /// ConvTranspose's output_padding that gives back the input's exact size (strided windows can skip pixels at
    /// the end, which the transpose must restore).
    fn output_padding(&self, c: &Context, x: &str, y: &str) -> Result<Vec<i64>, String> {
        let (input, output) = (c.spatial(x)?, c.spatial(y)?);
        let nd = self.kernel.len();
        let padding: Vec<i64> = (0..nd)
            .map(|i| {
                input[i]
                    - ((output[i] - 1) * self.strides[i] - self.pads[i] - self.pads[nd + i]
                        + self.dilations[i] * (self.kernel[i] - 1)
                        + 1)
            })
            .collect();
        if padding
            .iter()
            .zip(self.strides.iter().zip(&self.dilations))
            .any(|(&p, (&s, &d))| p < 0 || p >= s.max(d))
        {
            return Err(format!(
                "a window whose transpose needs output_padding {padding:?}"
            ));
        }
        Ok(padding)
    }

    /// ConvTranspose of `g` (on the window's output grid, that of `y`) with `weights`, back onto the grid of `x`.
    #[allow(clippy::too_many_arguments)]
    fn transpose(
        &self,
        c: &Context,
        w: &mut Writer,
        g: &str,
        weights: &str,
        group: i64,
        x: &str,
        y: &str,
    ) -> Result<String, String> {
        let nd = self.kernel.len();
        let (begins, ends) = self.pads.split_at(nd);
        if begins == ends {
            let mut attrs = self.attrs(self.output_padding(c, x, y)?);
            attrs.push(("group", Attr::Int(group)));
            return Ok(w.op("ConvTranspose", &[g, weights], attrs));
        }
        // Uneven padding (SAME_UPPER, SAME_LOWER): CUDA has no ConvTranspose for it, and ONNX Runtime 1.31 crashed
        // running the node moved to the CPU inside the backward Loop. So: transpose without padding, which covers
        // the padded grid from its start, then crop the input's place out of it, with zeros past the last window.
        let (input, output) = (c.spatial(x)?, c.spatial(y)?);
        let unpadded = Window {
            pads: vec![0; 2 * nd],
            ..self.clone()
        };
        let mut attrs = unpadded.attrs(vec![0; nd]);
        attrs.push(("group", Attr::Int(group)));
        let mut full = w.op("ConvTranspose", &[g, weights], attrs);
        let covered: Vec<i64> = (0..nd)
            .map(|i| {
                (output[i] - 1) * self.strides[i] + self.dilations[i] * (self.kernel[i] - 1) + 1
            })
            .collect();
        let stops: Vec<i64> = (0..nd).map(|i| begins[i] + input[i]).collect();
        if (0..nd).any(|i| stops[i] > covered[i]) {
            // Pad's pads: the begins of every axis, then the ends; only spatial ends grow.
            let mut pads = vec![0; 2 * (nd + 2)];
            for i in 0..nd {
                pads[nd + 4 + i] = (stops[i] - covered[i]).max(0);
            }
            let pads = w.ints(&pads);
            full = w.op("Pad", &[&full, &pads], vec![]);
        }
        let starts = w.ints(begins);
        let stops = w.ints(&stops);
        let axes = w.ints(&(2..2 + nd as i64).collect::<Vec<_>>());
        Ok(w.op("Slice", &[&full, &starts, &stops, &axes], vec![]))
    }

    fn attrs(&self, output_padding: Vec<i64>) -> Vec<(&'static str, Attr)> {
        vec![
            ("kernel_shape", Attr::Ints(self.kernel.clone())),
            ("strides", Attr::Ints(self.strides.clone())),
            ("dilations", Attr::Ints(self.dilations.clone())),
            ("pads", Attr::Ints(self.pads.clone())),
            ("output_padding", Attr::Ints(output_padding)),
        ]
    }
}

/// The gradient of a convolution with respect to its input is the transposed convolution with the same weights.
fn conv(
    c: &Context,
    w: &mut Writer,
    node: &NodeProto,
    g: &str,
    need: &HashSet<String>,
) -> Result<InputGradients, String> {
    let (x, weights) = (node.input[0].as_str(), node.input[1].as_str());
    if need.contains(weights) {
        return Err("Conv whose weights depend on the target".into());
    }
    let kernel = match node.ints("kernel_shape") {
        Some(k) => k,
        None => c.spatial(weights)?,
    };
    let window = window(c, node, kernel)?;
    let group = node.int("group").unwrap_or(1);
    let grad = window.transpose(c, w, g, weights, group, x, &node.output[0])?;
    Ok(vec![(x.to_owned(), grad)])
}

fn average_pool(
    c: &Context,
    w: &mut Writer,
    node: &NodeProto,
    g: &str,
) -> Result<InputGradients, String> {
    let x = node.input[0].as_str();
    if node.int("ceil_mode").unwrap_or(0) != 0 {
        return Err("AveragePool with ceil_mode=1".into());
    }
    let window = window(c, node, node.ints("kernel_shape").unwrap_or_default())?;
    let ones_kernel: Vec<i64> = [1, 1]
        .into_iter()
        .chain(window.kernel.iter().copied())
        .collect();
    let kernel_size: i64 = window.kernel.iter().product();
    let ones = w.floats(&ones_kernel, &vec![1.0; kernel_size as usize]);
    let counted =
        if node.int("count_include_pad").unwrap_or(0) != 0 || window.pads.iter().all(|&p| p == 0) {
            let k = w.float(kernel_size as f32);
            w.op("Div", &[g, &k], vec![])
        } else {
            // Each window divides by its count of real (not padding) pixels: a sum-pool of an all-ones image.
            let sizes = c.spatial(x)?;
            let image_dims: Vec<i64> = [1, 1].into_iter().chain(sizes.iter().copied()).collect();
            let image = w.floats(
                &image_dims,
                &vec![1.0; sizes.iter().product::<i64>() as usize],
            );
            let attrs = vec![
                ("kernel_shape", Attr::Ints(window.kernel.clone())),
                ("strides", Attr::Ints(window.strides.clone())),
                ("pads", Attr::Ints(window.pads.clone())),
            ];
            let counts = w.op("Conv", &[&image, &ones], attrs);
            w.op("Div", &[g, &counts], vec![])
        };
    // One [1,1,k] kernel serves every channel: fold the channels into the batch.
    let spatial = w.shape_from(&counted, 2);
    let head = w.ints(&[-1, 1]);
    let shape = w.op("Concat", &[&head, &spatial], vec![("axis", Attr::Int(0))]);
    let folded = w.op("Reshape", &[&counted, &shape], vec![]);
    let spread = window.transpose(c, w, &folded, &ones, 1, x, &node.output[0])?;
    Ok(vec![(x.to_owned(), w.reshape_like(&spread, x))])
}

/// Each output's gradient goes to the input pixel its Indices output names (indices into the flattened input).
fn max_pool(
    c: &Context,
    w: &mut Writer,
    node: &NodeProto,
    g: &str,
) -> Result<InputGradients, String> {
    let x = node.input[0].as_str();
    let window = window(c, node, node.ints("kernel_shape").unwrap_or_default())?;
    let indices = c
        .maxpool_indices
        .get(&node.output[0])
        .ok_or("MaxPool indices missing")?;
    let flat = w.ints(&[-1]);
    let flat_indices = w.op("Reshape", &[indices, &flat], vec![]);
    let flat_g = w.op("Reshape", &[g, &flat], vec![]);
    let shape = w.shape(x);
    let total = w.reduce("ReduceProd", &shape, &[0], true);
    let zeros = w.op("ConstantOfShape", &[&total], vec![]);
    let overlapping = (0..window.kernel.len())
        .any(|i| window.kernel[i] * window.dilations[i] > window.strides[i]);
    let scattered = if w.opset() >= 16 {
        w.op(
            "ScatterElements",
            &[&zeros, &flat_indices, &flat_g],
            vec![("axis", Attr::Int(0)), ("reduction", Attr::Str("add"))],
        )
    } else if !overlapping {
        // Disjoint windows: every index appears once, so a plain scatter is exact.
        w.op(
            "ScatterElements",
            &[&zeros, &flat_indices, &flat_g],
            vec![("axis", Attr::Int(0))],
        )
    } else {
        // No scatter-add before opset 16: sum one-hot rows per (n, c) plane, [NC,1,P] x [NC,P,HW].
        let area = w.shape_from(x, 2);
        let area = w.reduce("ReduceProd", &area, &[0], true);
        let plane_shape = w.ints(&[0, 0, -1]);
        let planes = w.op("Reshape", &[indices, &plane_shape], vec![]);
        let local = w.op("Mod", &[&planes, &area], vec![]);
        let values = w.floats(&[2], &[0.0, 1.0]);
        let one_hot = w.op(
            "OneHot",
            &[&local, &area, &values],
            vec![("axis", Attr::Int(-1))],
        );
        let g_planes = w.op("Reshape", &[g, &plane_shape], vec![]);
        let g_rows = w.unsqueeze(&g_planes, &[2]);
        let summed = w.op("MatMul", &[&g_rows, &one_hot], vec![]);
        return Ok(vec![(x.to_owned(), w.reshape_like(&summed, x))]);
    };
    Ok(vec![(x.to_owned(), w.reshape_like(&scattered, x))])
}
