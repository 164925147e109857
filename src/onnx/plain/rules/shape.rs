//! Ops that move values without changing them: the gradient goes back to where each value came from.

use super::{Context, InputGradients, Step, normalize_axis, unbroadcast};
use crate::onnx::plain::emit::Writer;
use crate::onnx::plain::proto::Attr;

/// Identity and Dropout (at inference, an identity).
pub fn identity(_: &Context, _: &mut Writer, s: &Step) -> Result<InputGradients, String> {
    s.only(s.g().to_owned())
}

/// Flatten, Reshape, Squeeze, Unsqueeze.
pub fn reshape(_: &Context, w: &mut Writer, s: &Step) -> Result<InputGradients, String> {
    s.only(w.reshape_like(s.g(), s.x()))
}

pub fn cast(c: &Context, w: &mut Writer, s: &Step) -> Result<InputGradients, String> {
    let to = c.info(s.x())?.elem_type as i64;
    s.only(w.op("Cast", &[s.g()], vec![("to", Attr::Int(to))]))
}

pub fn expand(c: &Context, w: &mut Writer, s: &Step) -> Result<InputGradients, String> {
    s.only(unbroadcast(c, w, s.g(), s.x(), s.y())?)
}

pub fn transpose(c: &Context, w: &mut Writer, s: &Step) -> Result<InputGradients, String> {
    let rank = c.rank(s.x())?;
    let perm = s
        .node
        .ints("perm")
        .unwrap_or_else(|| (0..rank).rev().collect());
    let mut inverse = vec![0; perm.len()];
    for (i, &p) in perm.iter().enumerate() {
        inverse[p as usize] = i as i64;
    }
    s.only(w.op("Transpose", &[s.g()], vec![("perm", Attr::Ints(inverse))]))
}

/// Each input's gradient is its slice of `g` along the axis.
pub fn concat(c: &Context, w: &mut Writer, s: &Step) -> Result<InputGradients, String> {
    let axis = normalize_axis(s.node.int("axis").unwrap_or(0), c.rank(s.y())?);
    let axes = w.ints(&[axis]);
    let mut start = w.ints(&[0]);
    let mut grads = Vec::new();
    for input in &s.node.input {
        let shape = w.shape(input);
        let at = w.ints(&[axis]);
        let size = w.op("Gather", &[&shape, &at], vec![("axis", Attr::Int(0))]);
        let end = w.op("Add", &[&start, &size], vec![]);
        if s.needs(input) {
            grads.push((
                input.clone(),
                w.op("Slice", &[s.g(), &start, &end, &axes], vec![]),
            ));
        }
        start = end;
    }
    Ok(grads)
}

/// The pieces' gradients side by side again; a piece that does not reach the scores contributes zeros.
pub fn split(c: &Context, w: &mut Writer, s: &Step) -> Result<InputGradients, String> {
    let axis = normalize_axis(s.node.int("axis").unwrap_or(0), c.rank(s.x())?);
    let mut pieces = Vec::new();
    for (output, grad) in s.node.output.iter().zip(s.output_grads) {
        pieces.push(match grad {
            Some(g) => g.clone(),
            None => {
                let shape = w.shape(output);
                w.op("ConstantOfShape", &[&shape], vec![])
            }
        });
    }
    let pieces: Vec<&str> = pieces.iter().map(String::as_str).collect();
    s.only(w.op("Concat", &pieces, vec![("axis", Attr::Int(axis))]))
}

/// Slices of `g` added back where they were gathered from (repeated indices add up), on any axis: the axis is
/// moved to the front (of `x`'s shape, and of `g`'s the index dims), scattered along it, and moved back.
pub fn gather(c: &Context, w: &mut Writer, s: &Step) -> Result<InputGradients, String> {
    let (x, g, indices) = (s.x(), s.g(), s.input(1));
    let rank = c.rank(x)?;
    let axis = normalize_axis(s.node.int("axis").unwrap_or(0), rank);
    let index_rank = c.rank(indices)?;
    let shape = w.shape(x);
    let (shape, g, back) = if axis == 0 {
        (shape, g.to_owned(), None)
    } else {
        let perm_x: Vec<i64> = std::iter::once(axis)
            .chain(0..axis)
            .chain(axis + 1..rank)
            .collect();
        let perm_g: Vec<i64> = (axis..axis + index_rank)
            .chain(0..axis)
            .chain(axis + index_rank..rank - 1 + index_rank)
            .collect();
        let picked = w.ints(&perm_x);
        let front = w.op("Gather", &[&shape, &picked], vec![("axis", Attr::Int(0))]);
        let g = w.op("Transpose", &[g], vec![("perm", Attr::Ints(perm_g))]);
        let mut inverse = vec![0; perm_x.len()];
        for (i, &p) in perm_x.iter().enumerate() {
            inverse[p as usize] = i as i64;
        }
        (front, g, Some(inverse))
    };
    // A scalar, so that the wrapped indices keep the indices' rank.
    let zero = w.int(0);
    let rows = w.op("Gather", &[&shape, &zero], vec![("axis", Attr::Int(0))]);
    let negative = w.op("Less", &[indices, &zero], vec![]);
    let wrapped = w.op("Add", &[indices, &rows], vec![]);
    let indices = w.op("Where", &[&negative, &wrapped, indices], vec![]);
    let scattered = if w.opset() < 16 {
        gather_by_one_hot(w, &g, &shape, &indices, &rows)
    } else {
        let indices = w.unsqueeze(&indices, &[-1]);
        let zeros = w.op("ConstantOfShape", &[&shape], vec![]);
        let reduction = vec![("reduction", Attr::Str("add"))];
        w.op("ScatterND", &[&zeros, &indices, &g], reduction)
    };
    s.only(match back {
        Some(perm) => w.op("Transpose", &[&scattered], vec![("perm", Attr::Ints(perm))]),
        None => scattered,
    })
}

/// Gather's backward without scatter-add (before opset 16), where a plain ScatterND keeps only the last of
/// repeated indices: one-hot rows summed by a MatMul, [rows,K] x [K,rest], reshaped to `shape`.
fn gather_by_one_hot(w: &mut Writer, g: &str, shape: &str, indices: &str, rows: &str) -> String {
    let flat = w.ints(&[-1]);
    let picked = w.op("Reshape", &[indices, &flat], vec![]);
    let values = w.floats(&[2], &[0.0, 1.0]);
    let one_hot = w.op(
        "OneHot",
        &[&picked, rows, &values],
        vec![("axis", Attr::Int(0))],
    );
    let count = w.shape(&picked);
    let g_shape = w.op("Concat", &[&count, &flat], vec![("axis", Attr::Int(0))]);
    let g_rows = w.op("Reshape", &[g, &g_shape], vec![]);
    let summed = w.op("MatMul", &[&one_hot, &g_rows], vec![]);
    w.op("Reshape", &[&summed, shape], vec![])
}

/// `g` scattered back to the positions the slice took: the same Slice of an iota names them, as indices into
/// the flattened input.
pub fn slice(_: &Context, w: &mut Writer, s: &Step) -> Result<InputGradients, String> {
    let shape = w.shape(s.x());
    let total = w.reduce("ReduceProd", &shape, &[0], false);
    let (zero, one) = (w.int(0), w.int(1));
    let iota = w.op("Range", &[&zero, &total, &one], vec![]);
    let positions = w.op("Reshape", &[&iota, &shape], vec![]);
    let mut inputs: Vec<&str> = s.node.input.iter().map(String::as_str).collect();
    inputs[0] = &positions;
    let taken = w.op("Slice", &inputs, vec![]);
    let flat = w.ints(&[-1]);
    let taken = w.op("Reshape", &[&taken, &flat], vec![]);
    let flat_g = w.op("Reshape", &[s.g(), &flat], vec![]);
    let total = w.op("Reshape", &[&total, &flat], vec![]);
    let zeros = w.op("ConstantOfShape", &[&total], vec![]);
    let scattered = w.op(
        "ScatterElements",
        &[&zeros, &taken, &flat_g],
        vec![("axis", Attr::Int(0))],
    );
    s.only(w.op("Reshape", &[&scattered, &shape], vec![]))
}

/// Constant-mode Pad: the gradient of the input is `g` with the pads taken off again, i.e. padded by the negated
/// pads (a negative pad crops). Edge and reflect modes repeat input values and are refused.
pub fn pad(_: &Context, w: &mut Writer, s: &Step) -> Result<InputGradients, String> {
    let mode = s.node.string("mode").unwrap_or_else(|| "constant".into());
    if mode != "constant" {
        return Err(format!(
            "Pad in mode `{mode}` has no backward rule (only `constant`)"
        ));
    }
    if w.opset() < 11 {
        let pads = s.node.ints("pads").ok_or("Pad has no `pads`")?;
        let negated = pads.iter().map(|p| -p).collect();
        return s.only(w.op("Pad", &[s.g()], vec![("pads", Attr::Ints(negated))]));
    }
    let negated = w.op("Neg", &[s.input(1)], vec![]);
    let mut inputs = vec![s.g(), negated.as_str()];
    if let Some(axes) = s.node.input.get(3).filter(|a| !a.is_empty()) {
        inputs.extend(["", axes.as_str()]);
    }
    s.only(w.op("Pad", &inputs, vec![]))
}
