//! Conv, and the window geometry it shares with the pooling ops: a window's backward is a ConvTranspose.

use super::{Context, InputGradients, Step};
use crate::onnx::plain::emit::Writer;
use crate::onnx::plain::proto::{Attr, NodeProto};

/// The gradient of a convolution with respect to its input is the transposed convolution with the same weights.
pub fn conv(c: &Context, w: &mut Writer, s: &Step) -> Result<InputGradients, String> {
    let weights = s.input(1);
    if s.needs(weights) {
        return Err("Conv whose weights depend on the target".into());
    }
    let kernel = match s.node.ints("kernel_shape") {
        Some(k) => k,
        None => c.spatial(weights)?,
    };
    let window = Window::of(c, s.node, kernel)?;
    let group = s.node.int("group").unwrap_or(1);
    s.only(window.transpose(w, s.g(), weights, group)?)
}

/// Kernel, strides, dilations and explicit pads [begins..., ends...] of a Conv or pooling node, and the spatial
/// sizes of its input and output.
#[derive(Clone)]
pub(super) struct Window {
    pub kernel: Vec<i64>,
    pub strides: Vec<i64>,
    pub dilations: Vec<i64>,
    pub pads: Vec<i64>,
    input: Vec<i64>,
    output: Vec<i64>,
}

impl Window {
    pub fn of(c: &Context, node: &NodeProto, kernel: Vec<i64>) -> Result<Window, String> {
        let nd = kernel.len();
        let wrong = || format!("a {nd}-D window over `{}`", node.input[0]);
        if nd == 0 {
            return Err(wrong());
        }
        let input = c.spatial(&node.input[0])?;
        if input.len() != nd {
            return Err(wrong());
        }
        let output = c.spatial(&node.output[0])?;
        if output.len() != nd {
            return Err(wrong());
        }
        let strides = node.ints("strides").unwrap_or_else(|| vec![1; nd]);
        let dilations = node.ints("dilations").unwrap_or_else(|| vec![1; nd]);
        let auto_pad = node.string("auto_pad").unwrap_or_default();
        let mut window = Window {
            kernel,
            strides,
            dilations,
            pads: Vec::new(),
            input,
            output,
        };
        window.pads = match auto_pad.as_str() {
            "" | "NOTSET" => node.ints("pads").unwrap_or_else(|| vec![0; 2 * nd]),
            "VALID" => vec![0; 2 * nd],
            "SAME_UPPER" => window.same_pads(true),
            "SAME_LOWER" => window.same_pads(false),
            other => return Err(format!("auto_pad {other}")),
        };
        Ok(window)
    }

    /// SAME padding: output size ceil(L / s); the padding that takes is split, the odd pixel at the end (UPPER)
    /// or the start.
    fn same_pads(&self, upper: bool) -> Vec<i64> {
        let (mut begins, mut ends) = (Vec::new(), Vec::new());
        for i in 0..self.kernel.len() {
            let (size, s) = (self.input[i], self.strides[i]);
            let (k, d) = (self.kernel[i], self.dilations[i]);
            let out = (size + s - 1) / s;
            let total = ((out - 1) * s + (k - 1) * d + 1 - size).max(0);
            let small = total / 2;
            let begin = if upper { small } else { total - small };
            begins.push(begin);
            ends.push(total - begin);
        }
        begins.extend(ends);
        begins
    }

    /// Whether windows overlap (an input pixel can be in more than one).
    pub fn overlapping(&self) -> bool {
        (0..self.kernel.len()).any(|i| self.kernel[i] * self.dilations[i] > self.strides[i])
    }

    /// ConvTranspose's output_padding that gives back the input's exact size (strided windows can skip pixels at
    /// the end, which the transpose must restore).
    fn output_padding(&self) -> Result<Vec<i64>, String> {
        let nd = self.kernel.len();
        let padding: Vec<i64> = (0..nd)
            .map(|i| {
                self.input[i]
                    - ((self.output[i] - 1) * self.strides[i] - self.pads[i] - self.pads[nd + i]
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

    /// ConvTranspose of `g` (on the window's output grid) with `weights`, back onto the input's grid.
    pub fn transpose(
        &self,
        w: &mut Writer,
        g: &str,
        weights: &str,
        group: i64,
    ) -> Result<String, String> {
        let nd = self.kernel.len();
        let (begins, ends) = self.pads.split_at(nd);
        if begins != ends {
            return Ok(self.transpose_uneven(w, g, weights, group));
        }
        let mut attrs = self.attrs(self.output_padding()?);
        attrs.push(("group", Attr::Int(group)));
        Ok(w.op("ConvTranspose", &[g, weights], attrs))
    }

    /// `transpose` for uneven padding (SAME_UPPER, SAME_LOWER): CUDA has no ConvTranspose for it, and ONNX
    /// Runtime 1.31 crashed running the node moved to the CPU inside the backward Loop. So: transpose without
    /// padding, which covers the padded grid from its start, then crop the input's place out of it, with zeros
    /// past the last window.
    fn transpose_uneven(&self, w: &mut Writer, g: &str, weights: &str, group: i64) -> String {
        let nd = self.kernel.len();
        let begins = &self.pads[..nd];
        let unpadded = Window {
            pads: vec![0; 2 * nd],
            ..self.clone()
        };
        let mut attrs = unpadded.attrs(vec![0; nd]);
        attrs.push(("group", Attr::Int(group)));
        let mut full = w.op("ConvTranspose", &[g, weights], attrs);
        let covered: Vec<i64> = (0..nd)
            .map(|i| {
                (self.output[i] - 1) * self.strides[i]
                    + self.dilations[i] * (self.kernel[i] - 1)
                    + 1
            })
            .collect();
        let stops: Vec<i64> = (0..nd).map(|i| begins[i] + self.input[i]).collect();
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
        w.op("Slice", &[&full, &starts, &stops, &axes], vec![])
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
