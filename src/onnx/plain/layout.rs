//! The target's layout: NCHW maps, channels-last maps [N,h,w,C], and token sequences [N,T,D] (P prefix tokens,
//! then the h*w patch tokens row by row). Whatever it is, the contract's `activations` and `gradients` are NCHW:
//! the mapping is written into the graph (forward, and for each seed's gradient inside the backward Loop), so
//! clients and the server see the same tensors as for a CNN.

use std::collections::{HashMap, HashSet};

use super::emit::Writer;
use super::proto::{Attr, GraphProto, NodeProto};
use super::rules::TensorInfo;
use crate::config::{LayoutKind, PlainModel};
use crate::onnx::metadata::TargetLayout;

/// The most prefix tokens a token sequence is taken to have when its grid is inferred (class, distillation and
/// register tokens; ViTs with registers have 1 + 4, some 1 + 8 or 1 + 16).
pub const MAX_PREFIX: i64 = 17;

/// A target's layout, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    Nchw,
    Nhwc,
    Tokens { prefix: i64, grid: [i64; 2] },
}

impl Layout {
    /// The metadata `camserve.target_layout`, as the server reads it.
    pub fn metadata(&self) -> String {
        let layout = match self {
            Layout::Nchw => TargetLayout::Nchw,
            Layout::Nhwc => TargetLayout::Nhwc,
            Layout::Tokens { prefix, grid } => TargetLayout::Tokens {
                prefix_tokens: *prefix as usize,
                grid: grid.map(|side| side as usize),
            },
        };
        serde_json::to_string(&layout).expect("a layout serializes")
    }

    /// A short description for listings: `tokens (1 prefix, 4x4 grid)`.
    pub fn describe(&self) -> String {
        match self {
            Layout::Nchw => "NCHW".into(),
            Layout::Nhwc => "NHWC".into(),
            Layout::Tokens { prefix, grid } => {
                format!("tokens ({prefix} prefix, {}x{} grid)", grid[0], grid[1])
            }
        }
    }

    /// The dims of the target mapped to NCHW.
    pub fn nchw_dims(&self, dims: &[Option<i64>]) -> Vec<Option<i64>> {
        match self {
            Layout::Nchw => dims.to_vec(),
            Layout::Nhwc => vec![dims[0], dims[3], dims[1], dims[2]],
            Layout::Tokens { grid, .. } => vec![dims[0], dims[2], Some(grid[0]), Some(grid[1])],
        }
    }

    /// Writes the nodes that map `x` (the target, or its gradient) to NCHW; returns the mapped tensor (`x` itself
    /// for NCHW).
    pub fn emit(&self, w: &mut Writer, x: &str, dims: &[Option<i64>]) -> String {
        match self {
            Layout::Nchw => x.to_owned(),
            Layout::Nhwc => w.op(
                "Transpose",
                &[x],
                vec![("perm", Attr::Ints(vec![0, 3, 1, 2]))],
            ),
            Layout::Tokens { prefix, grid } => {
                let channels = dims[2].expect("checked in resolve");
                let (start, end) = (w.ints(&[*prefix]), w.ints(&[prefix + grid[0] * grid[1]]));
                let axis = w.ints(&[1]);
                let patches = w.op("Slice", &[x, &start, &end, &axis], vec![]);
                let channels_first = w.op(
                    "Transpose",
                    &[&patches],
                    vec![("perm", Attr::Ints(vec![0, 2, 1]))],
                );
                // 0: the batch, copied from the input
                let shape = w.ints(&[0, channels, grid[0], grid[1]]);
                w.op("Reshape", &[&channels_first, &shape], vec![])
            }
        }
    }
}

/// The patch embedding: the first Conv on the image's path whose kernel equals its stride (larger than 1), its
/// output channels and the grid it makes of the input.
#[derive(Debug, Clone, PartialEq)]
pub struct PatchEmbedding {
    pub node: String,
    pub channels: i64,
    pub grid: [i64; 2],
}

pub fn patch_embedding(
    graph: &GraphProto,
    input: &str,
    [height, width]: [usize; 2],
) -> Option<PatchEmbedding> {
    let image = depending_on(graph, input);
    let node = graph
        .node
        .iter()
        .find(|n| n.op_type == "Conv" && image.contains(n.input[0].as_str()))?;
    let weight = graph.initializer.iter().find(|t| t.name == node.input[1])?;
    let kernel = node
        .ints("kernel_shape")
        .unwrap_or_else(|| weight.dims.get(2..).unwrap_or_default().to_vec());
    let strides = node
        .ints("strides")
        .unwrap_or_else(|| vec![1; kernel.len()]);
    if kernel.len() != 2 || kernel != strides || kernel.iter().any(|&k| k < 2) {
        return None;
    }
    if node
        .ints("dilations")
        .is_some_and(|d| d.iter().any(|&d| d != 1))
    {
        return None;
    }
    let pads = node.ints("pads").unwrap_or_else(|| vec![0; 4]);
    let same = node
        .string("auto_pad")
        .is_some_and(|p| p.starts_with("SAME"));
    let side = |size: usize, axis: usize| -> i64 {
        let size = size as i64;
        if same {
            (size + kernel[axis] - 1) / kernel[axis]
        } else {
            (size + pads[axis] + pads[axis + 2] - kernel[axis]) / kernel[axis] + 1
        }
    };
    Some(PatchEmbedding {
        node: node.label().to_owned(),
        channels: *weight.dims.first()?,
        grid: [side(height, 0), side(width, 1)],
    })
}

/// The tensors computed from `input`.
pub fn depending_on<'a>(graph: &'a GraphProto, input: &'a str) -> HashSet<&'a str> {
    let mut depends: HashSet<&str> = HashSet::from([input]);
    for node in &graph.node {
        if node.input.iter().any(|x| depends.contains(x.as_str())) {
            depends.extend(node.output.iter().map(String::as_str));
        }
    }
    depends
}

/// Ops that keep a channels-last tensor channels-last (they act elementwise or on the last axis).
const KEEP_LAYOUT: &[&str] = &[
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Erf",
    "Gelu",
    "Relu",
    "Sigmoid",
    "Tanh",
    "HardSwish",
    "Identity",
    "Dropout",
    "LayerNormalization",
    "MatMul",
    "Softmax",
    "Clip",
    "Pow",
    "Sqrt",
    "ReduceMean",
    // Swin's patch merging: the 2x2 neighbours sliced out on h and w, joined on C (and padded to even sides)
    "Slice",
    "Concat",
    "Pad",
];

/// Whether a 4-D tensor is channels-last by the way it was made: a Transpose [0,2,3,1], then only ops that act
/// elementwise or on the last axis (a LayerNorm, a Linear as MatMul).
pub fn made_channels_last(graph: &GraphProto, image: &HashSet<&str>, name: &str) -> bool {
    let producers: HashMap<&str, &NodeProto> = graph
        .node
        .iter()
        .flat_map(|n| n.output.iter().map(move |o| (o.as_str(), n)))
        .collect();
    let mut current = name;
    for _ in 0..64 {
        let Some(node) = producers.get(current) else {
            return false;
        };
        if node.op_type == "Transpose" {
            return node.ints("perm").as_deref() == Some(&[0, 2, 3, 1][..]);
        }
        if !KEEP_LAYOUT.contains(&node.op_type.as_str()) {
            return false;
        }
        match node.input.iter().find(|i| image.contains(i.as_str())) {
            Some(next) => current = next,
            None => return false,
        }
    }
    false
}

/// The layout of a 4-D map of `dims`: channels-last where a Transpose [0,2,3,1] made it so. In a transformer
/// (`grids`: its stages' grids) also where its axes 1 and 2 hold a grid and axes 2 and 3 don't: timm's Swin
/// merges patches with a 6-D Reshape and Transpose, which hides how the map was made.
pub fn map_layout(
    graph: &GraphProto,
    image: &HashSet<&str>,
    name: &str,
    dims: &[Option<i64>],
    grids: Option<&[[i64; 2]]>,
) -> Layout {
    let on_grid = |axes: &[Option<i64>]| {
        grids.is_some_and(|grids| matches!(axes, &[Some(h), Some(w)] if grids.contains(&[h, w])))
    };
    if made_channels_last(graph, image, name) || (on_grid(&dims[1..3]) && !on_grid(&dims[2..4])) {
        Layout::Nhwc
    } else {
        Layout::Nchw
    }
}

/// The grids of a hierarchical transformer's stages: the patch grid, then each side halved (rounded up, as
/// patch merging pads odd sides) down to 2x2.
pub fn stage_grids(patch: [i64; 2]) -> Vec<[i64; 2]> {
    let mut grids = vec![patch];
    while let Some(&[h, w]) = grids.last().filter(|g| g[0] * g[1] > 4) {
        grids.push([(h + 1) / 2, (w + 1) / 2]);
    }
    grids
}

/// Whether the graph holds an attention: a MatMul of two tensors computed from the image (a Linear layer's
/// MatMul has a weight for one side).
pub fn has_attention(graph: &GraphProto, image: &HashSet<&str>) -> bool {
    graph.node.iter().any(|n| is_attention_matmul(n, image))
}

pub fn is_attention_matmul(node: &NodeProto, image: &HashSet<&str>) -> bool {
    node.op_type == "MatMul" && node.input.iter().all(|i| image.contains(i.as_str()))
}

/// The target's layout, from the overrides in `spec`, else inferred: a 3-D target is tokens on the patch grid, a
/// 4-D one as `map_layout` reads it. A guess that cannot be made is refused,
/// naming the override.
pub fn resolve(
    graph: &GraphProto,
    input: &str,
    input_size: [usize; 2],
    target: &str,
    info: &TensorInfo,
    spec: &PlainModel,
) -> Result<Layout, String> {
    if !info.is_float() {
        return Err(format!("the target `{target}` is not a float tensor"));
    }
    let dims = &info.dims;
    let fixed = |d: &[Option<i64>]| d.iter().all(Option::is_some);
    match (dims.len(), spec.layout) {
        (4, Some(LayoutKind::Tokens)) => Err(format!(
            "the target `{target}` is 4-D {dims:?}; tokens are [N,T,D]"
        )),
        (4, _) if !fixed(&dims[1..]) => Err(format!(
            "the target `{target}` has a size that changes with the batch: {dims:?}"
        )),
        (4, Some(LayoutKind::Nhwc)) => Ok(Layout::Nhwc),
        (4, Some(LayoutKind::Nchw)) => Ok(Layout::Nchw),
        (4, None) => {
            let image = depending_on(graph, input);
            let grids = patch_embedding(graph, input, input_size)
                .filter(|_| has_attention(graph, &image))
                .map(|p| stage_grids(p.grid));
            Ok(map_layout(graph, &image, target, dims, grids.as_deref()))
        }
        (3, Some(LayoutKind::Tokens) | None) => {
            let (Some(tokens), Some(_)) = (dims[1], dims[2]) else {
                return Err(format!(
                    "the target `{target}` has a size that changes with the batch: {dims:?}"
                ));
            };
            tokens_layout(graph, input, input_size, target, tokens, spec)
        }
        (3, Some(layout)) => Err(format!(
            "the target `{target}` is 3-D {dims:?}; --layout {layout:?} needs a 4-D tensor"
        )),
        _ => Err(format!(
            "the target `{target}` must be a map [N,C,h,w] or [N,h,w,C], or tokens [N,T,D]; it is {dims:?}"
        )),
    }
}

/// P and the grid of a token target of T tokens: the overrides, else the patch embedding's grid and
/// P = T - h*w.
fn tokens_layout(
    graph: &GraphProto,
    input: &str,
    input_size: [usize; 2],
    target: &str,
    tokens: i64,
    spec: &PlainModel,
) -> Result<Layout, String> {
    let grid = match spec.grid {
        Some([h, w]) => [h as i64, w as i64],
        None => match patch_embedding(graph, input, input_size) {
            Some(patch) => patch.grid,
            None => {
                // No patch embedding: a square grid of T - P tokens, if P is given.
                let prefix = spec.prefix_tokens.ok_or_else(|| {
                    format!(
                        "the target `{target}` is a sequence of {tokens} tokens, and no patch embedding (a Conv \
                         whose kernel equals its stride) gives its grid: give it with --grid HxW (`grid` in \
                         [models.plain]) and --prefix-tokens P"
                    )
                })? as i64;
                let side = ((tokens - prefix).max(0) as f64).sqrt().round() as i64;
                if side * side != tokens - prefix {
                    return Err(format!(
                        "the target `{target}` has {tokens} tokens; {} after {prefix} prefix tokens make no \
                         square grid: give it with --grid HxW (`grid` in [models.plain])",
                        tokens - prefix
                    ));
                }
                [side, side]
            }
        },
    };
    let patches = grid[0] * grid[1];
    let prefix = match spec.prefix_tokens {
        Some(p) => p as i64,
        None => tokens - patches,
    };
    if prefix < 0
        || prefix + patches > tokens
        || (spec.prefix_tokens.is_none() && prefix > MAX_PREFIX)
    {
        return Err(format!(
            "the target `{target}` has {tokens} tokens, which do not hold a {}x{} grid after {prefix} prefix \
             tokens: give the layout with --grid HxW and --prefix-tokens P (`grid`, `prefix_tokens` in \
             [models.plain])",
            grid[0], grid[1]
        ));
    }
    Ok(Layout::Tokens { prefix, grid })
}
