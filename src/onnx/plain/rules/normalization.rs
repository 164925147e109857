//! BatchNormalization (inference: a per-channel scale) and LayerNormalization.

use super::{Context, InputGradients, Step, normalize_axis};
use crate::onnx::plain::emit::Writer;

/// `g` times scale / sqrt(var + eps), per channel (axis 1).
pub fn batch_norm(c: &Context, w: &mut Writer, s: &Step) -> Result<InputGradients, String> {
    let node = s.node;
    if node.int("training_mode").unwrap_or(0) != 0 {
        return Err("BatchNormalization with training_mode=1".into());
    }
    let (scale, var) = (s.input(1), s.input(4));
    let eps = w.float(node.float("epsilon").unwrap_or(1e-5));
    let shifted = w.op("Add", &[var, &eps], vec![]);
    let root = w.op("Sqrt", &[&shifted], vec![]);
    let factor = w.op("Div", &[scale, &root], vec![]);
    let mut shape = vec![-1];
    shape.resize(c.rank(s.x())? as usize - 1, 1);
    let shape = w.ints(&shape);
    let factor = w.op("Reshape", &[&factor, &shape], vec![]);
    s.only(w.op("Mul", &[s.g(), &factor], vec![]))
}

/// Reads the Mean and InvStdDev outputs the forward node was made to write (`Statistics::layer_norm`).
pub fn layer_norm(c: &Context, w: &mut Writer, s: &Step) -> Result<InputGradients, String> {
    let (x, scale, g) = (s.x(), s.input(1), s.g());
    let rank = c.rank(x)?;
    let axis = normalize_axis(s.node.int("axis").unwrap_or(-1), rank);
    let axes: Vec<i64> = (axis..rank).collect();
    let (mean, inv_std) = c
        .statistics
        .layer_norm
        .get(s.y())
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
    s.only(w.op("Mul", &[inv_std, &inner], vec![]))
}
