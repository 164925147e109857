//! ReduceSum and ReduceMean: `g` spread back over the reduced axes.

use super::{Context, InputGradients, Step, normalize_axis};
use crate::onnx::plain::emit::Writer;
use crate::onnx::plain::proto::Attr;

/// ReduceMean and ReduceSum, with their axes as an attribute or a constant input.
pub fn reduce(c: &Context, w: &mut Writer, s: &Step) -> Result<InputGradients, String> {
    let x = s.x();
    let rank = c.rank(x)?;
    let mut axes = reduced_axes(c, s)?;
    if axes.is_empty() {
        if s.node.int("noop_with_empty_axes").unwrap_or(0) != 0 {
            return s.only(s.g().to_owned());
        }
        axes = (0..rank).collect();
    }
    let mut axes: Vec<i64> = axes.iter().map(|&a| normalize_axis(a, rank)).collect();
    axes.sort_unstable();
    let keepdims = s.node.int("keepdims").unwrap_or(1) != 0;
    let g = if keepdims {
        s.g().to_owned()
    } else {
        w.unsqueeze(s.g(), &axes)
    };
    s.only(spread_over(c, w, &g, x, &axes, s.op() == "ReduceMean")?)
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
