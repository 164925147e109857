//! ReduceSum, ReduceMean and ReduceL2: `g` spread back over the reduced axes.

use super::{Context, InputGradients, Step, normalize_axis};
use crate::onnx::plain::emit::Writer;
use crate::onnx::plain::proto::Attr;

/// ReduceMean and ReduceSum, with their axes as an attribute or a constant input.
pub fn reduce(c: &Context, w: &mut Writer, s: &Step) -> Result<InputGradients, String> {
    let Some((axes, keepdims)) = reduction(c, s)? else {
        return s.only(s.g().to_owned());
    };
    let g = kept(w, s.g(), &axes, keepdims);
    s.only(spread_over(c, w, &g, s.x(), &axes, s.op() == "ReduceMean")?)
}

/// ReduceL2, y = sqrt(sum x^2) (Swin v2's cosine attention normalizes with it): dx = x * g / y. Where y = 0, x is
/// 0 and so is its gradient, as in torch.
pub fn reduce_l2(c: &Context, w: &mut Writer, s: &Step) -> Result<InputGradients, String> {
    let Some((axes, keepdims)) = reduction(c, s)? else {
        return s.only(s.g().to_owned());
    };
    let g = kept(w, s.g(), &axes, keepdims);
    let y = kept(w, s.y(), &axes, keepdims);
    let smallest = w.float(f32::MIN_POSITIVE);
    let y = w.op("Max", &[&y, &smallest], vec![]);
    let g_over_y = w.op("Div", &[&g, &y], vec![]);
    s.only(w.op("Mul", &[s.x(), &g_over_y], vec![]))
}

/// The reduced axes, sorted and non-negative, and keepdims; None where the op copies its input (no axes and
/// `noop_with_empty_axes`).
fn reduction(c: &Context, s: &Step) -> Result<Option<(Vec<i64>, bool)>, String> {
    let rank = c.rank(s.x())?;
    let mut axes = reduced_axes(c, s)?;
    if axes.is_empty() {
        if s.node.int("noop_with_empty_axes").unwrap_or(0) != 0 {
            return Ok(None);
        }
        axes = (0..rank).collect();
    }
    let mut axes: Vec<i64> = axes.iter().map(|&a| normalize_axis(a, rank)).collect();
    axes.sort_unstable();
    Ok(Some((axes, s.node.int("keepdims").unwrap_or(1) != 0)))
}

/// A reduction's output (or its gradient) with the reduced axes kept, as size 1.
fn kept(w: &mut Writer, x: &str, axes: &[i64], keepdims: bool) -> String {
    if keepdims {
        x.to_owned()
    } else {
        w.unsqueeze(x, axes)
    }
}

/// The axes as written (empty: none given).
fn reduced_axes(c: &Context, s: &Step) -> Result<Vec<i64>, String> {
    Ok(
        match (
            s.node.ints("axes"),
            s.node.input.get(1).filter(|i| !i.is_empty()),
        ) {
            (Some(axes), _) => axes,
            (None, Some(input)) => c
                .constant(input, "the axes")?
                .iter()
                .map(|&v| v as i64)
                .collect(),
            (None, None) => Vec::new(),
        },
    )
}

/// The backward of a sum or mean over `axes`: `g` (size 1 on those axes) spread back over them, divided by their
/// size for a mean. With the sizes fixed this is one broadcast Mul by a constant; else Expand (and a Div).
pub(super) fn spread_over(
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
