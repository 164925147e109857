//! Pooling: averages spread `g` back over their windows, maxima send it to the pixel that won.

use super::conv::Window;
use super::reduce::spread_over;
use super::{Context, InputGradients, Step};
use crate::onnx::plain::emit::Writer;
use crate::onnx::plain::proto::Attr;

pub fn global_average_pool(
    c: &Context,
    w: &mut Writer,
    s: &Step,
) -> Result<InputGradients, String> {
    let spatial: Vec<i64> = (2..c.rank(s.x())?).collect();
    s.only(spread_over(c, w, s.g(), s.x(), &spatial, true)?)
}

/// All of each plane's gradient goes to its first maximum, as PyTorch's does.
pub fn global_max_pool(_: &Context, w: &mut Writer, s: &Step) -> Result<InputGradients, String> {
    let x = s.x();
    let flat_shape = w.ints(&[0, 0, -1]);
    let flat = w.op("Reshape", &[x, &flat_shape], vec![]);
    let index = w.op(
        "ArgMax",
        &[&flat],
        vec![("axis", Attr::Int(2)), ("keepdims", Attr::Int(1))],
    );
    let shape = w.shape(&flat);
    let zeros = w.op("ConstantOfShape", &[&shape], vec![]);
    let g_flat = w.op("Reshape", &[s.g(), &flat_shape], vec![]);
    let scattered = w.op(
        "ScatterElements",
        &[&zeros, &index, &g_flat],
        vec![("axis", Attr::Int(2))],
    );
    s.only(w.reshape_like(&scattered, x))
}

/// `g` divided by each window's count, then spread over the window by a ConvTranspose with a kernel of ones.
pub fn average_pool(c: &Context, w: &mut Writer, s: &Step) -> Result<InputGradients, String> {
    let x = s.x();
    if s.node.int("ceil_mode").unwrap_or(0) != 0 {
        return Err("AveragePool with ceil_mode=1".into());
    }
    let kernel = s.node.ints("kernel_shape").unwrap_or_default();
    let window = Window::of(c, s.node, kernel)?;
    let ones_kernel: Vec<i64> = [1, 1]
        .into_iter()
        .chain(window.kernel.iter().copied())
        .collect();
    let kernel_size: i64 = window.kernel.iter().product();
    let ones = w.floats(&ones_kernel, &vec![1.0; kernel_size as usize]);
    let counted = if s.node.int("count_include_pad").unwrap_or(0) != 0
        || window.pads.iter().all(|&p| p == 0)
    {
        let k = w.float(kernel_size as f32);
        w.op("Div", &[s.g(), &k], vec![])
    } else {
        let counts = real_pixel_counts(c, w, x, &window, &ones)?;
        w.op("Div", &[s.g(), &counts], vec![])
    };
    // One [1,1,k] kernel serves every channel: fold the channels into the batch.
    let spatial = w.shape_from(&counted, 2);
    let head = w.ints(&[-1, 1]);
    let shape = w.op("Concat", &[&head, &spatial], vec![("axis", Attr::Int(0))]);
    let folded = w.op("Reshape", &[&counted, &shape], vec![]);
    let spread = window.transpose(w, &folded, &ones, 1)?;
    s.only(w.reshape_like(&spread, x))
}

/// How many real (not padding) pixels each window covers: a sum-pool of an all-ones image.
fn real_pixel_counts(
    c: &Context,
    w: &mut Writer,
    x: &str,
    window: &Window,
    ones: &str,
) -> Result<String, String> {
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
    Ok(w.op("Conv", &[&image, ones], attrs))
}

/// Each output's gradient goes to the input pixel its Indices output names (indices into the flattened input).
pub fn max_pool(c: &Context, w: &mut Writer, s: &Step) -> Result<InputGradients, String> {
    let (x, g) = (s.x(), s.g());
    let kernel = s.node.ints("kernel_shape").unwrap_or_default();
    let window = Window::of(c, s.node, kernel)?;
    let indices = c
        .statistics
        .maxpool_indices
        .get(s.y())
        .ok_or("MaxPool indices missing")?;
    let flat = w.ints(&[-1]);
    let flat_indices = w.op("Reshape", &[indices, &flat], vec![]);
    let flat_g = w.op("Reshape", &[g, &flat], vec![]);
    let shape = w.shape(x);
    let total = w.reduce("ReduceProd", &shape, &[0], true);
    let zeros = w.op("ConstantOfShape", &[&total], vec![]);
    let scattered = if w.opset() >= 16 {
        w.op(
            "ScatterElements",
            &[&zeros, &flat_indices, &flat_g],
            vec![("axis", Attr::Int(0)), ("reduction", Attr::Str("add"))],
        )
    } else if !window.overlapping() {
        // Disjoint windows: every index appears once, so a plain scatter is exact.
        w.op(
            "ScatterElements",
            &[&zeros, &flat_indices, &flat_g],
            vec![("axis", Attr::Int(0))],
        )
    } else {
        scatter_add_by_one_hot(w, g, x, indices)
    };
    s.only(w.reshape_like(&scattered, x))
}

/// MaxPool's scatter-add without ScatterElements' reduction (before opset 16): one-hot rows summed per (n, c)
/// plane, [NC,1,P] x [NC,P,HW].
fn scatter_add_by_one_hot(w: &mut Writer, g: &str, x: &str, indices: &str) -> String {
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
    w.op("MatMul", &[&g_rows, &one_hot], vec![])
}
