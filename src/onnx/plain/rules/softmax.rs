//! Softmax and LogSoftmax over an axis (before opset 13, over every axis from it).

use super::{Context, InputGradients, Step, normalize_axis};
use crate::onnx::plain::emit::Writer;

pub fn softmax(c: &Context, w: &mut Writer, s: &Step) -> Result<InputGradients, String> {
    let axes = softmax_axes(c, w.opset(), s)?;
    // y (g - sum(g y))
    let (g, y) = (s.g(), s.y());
    let gy = w.op("Mul", &[g, y], vec![]);
    let sum = w.reduce("ReduceSum", &gy, &axes, true);
    let centred = w.op("Sub", &[g, &sum], vec![]);
    s.only(w.op("Mul", &[y, &centred], vec![]))
}

pub fn log_softmax(c: &Context, w: &mut Writer, s: &Step) -> Result<InputGradients, String> {
    let axes = softmax_axes(c, w.opset(), s)?;
    // g - exp(y) sum(g)
    let (g, y) = (s.g(), s.y());
    let sum = w.reduce("ReduceSum", g, &axes, true);
    let p = w.op("Exp", &[y], vec![]);
    let ps = w.op("Mul", &[&p, &sum], vec![]);
    s.only(w.op("Sub", &[g, &ps], vec![]))
}

fn softmax_axes(c: &Context, opset: i64, s: &Step) -> Result<Vec<i64>, String> {
    let rank = c.rank(s.x())?;
    if opset >= 13 {
        Ok(vec![normalize_axis(s.node.int("axis").unwrap_or(-1), rank)])
    } else {
        // Before opset 13 the input is coerced to 2-D at `axis`: the softmax runs over all axes from it.
        Ok((normalize_axis(s.node.int("axis").unwrap_or(1), rank)..rank).collect())
    }
}
