//! Elementwise activations: `g` times the activation's derivative at `x` (or from `y`, where that is cheaper).

use super::{Context, InputGradients, Step};
use crate::onnx::plain::emit::Writer;

pub fn relu(_: &Context, w: &mut Writer, s: &Step) -> Result<InputGradients, String> {
    s.only(where_positive(w, s.g(), s.x(), None))
}

pub fn leaky_relu(_: &Context, w: &mut Writer, s: &Step) -> Result<InputGradients, String> {
    let alpha = w.float(s.node.float("alpha").unwrap_or(0.01));
    let scaled = w.op("Mul", &[s.g(), &alpha], vec![]);
    s.only(where_positive(w, s.g(), s.x(), Some(&scaled)))
}

/// `g` where x > 0, else `otherwise` (zero when None): ReLU's and LeakyReLU's backward.
fn where_positive(w: &mut Writer, g: &str, x: &str, otherwise: Option<&str>) -> String {
    let zero = w.float(0.0);
    let positive = w.op("Greater", &[x, &zero], vec![]);
    let otherwise = otherwise.unwrap_or(&zero);
    w.op("Where", &[&positive, g, otherwise], vec![])
}

/// `g` where x lies within the bounds given (inputs 1 and 2, each optional), else zero.
pub fn clip(_: &Context, w: &mut Writer, s: &Step) -> Result<InputGradients, String> {
    let x = s.x();
    let bound = |i: usize| s.node.input.get(i).filter(|b| !b.is_empty()).cloned();
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
            w.op("Where", &[&mask, s.g(), &zero], vec![])
        }
        None => s.g().to_owned(),
    };
    s.only(grad)
}

pub fn sigmoid(_: &Context, w: &mut Writer, s: &Step) -> Result<InputGradients, String> {
    // y (1 - y)
    let y = s.y();
    let one = w.float(1.0);
    let rest = w.op("Sub", &[&one, y], vec![]);
    let d = w.op("Mul", &[y, &rest], vec![]);
    s.only(w.op("Mul", &[s.g(), &d], vec![]))
}

pub fn tanh(_: &Context, w: &mut Writer, s: &Step) -> Result<InputGradients, String> {
    // 1 - y^2
    let y = s.y();
    let one = w.float(1.0);
    let square = w.op("Mul", &[y, y], vec![]);
    let d = w.op("Sub", &[&one, &square], vec![]);
    s.only(w.op("Mul", &[s.g(), &d], vec![]))
}

/// alpha where 0 < alpha x + beta < 1, else zero.
pub fn hard_sigmoid(_: &Context, w: &mut Writer, s: &Step) -> Result<InputGradients, String> {
    let x = s.x();
    let alpha = s.node.float("alpha").unwrap_or(0.2);
    let beta = s.node.float("beta").unwrap_or(0.5);
    let (a, b) = (w.float(alpha), w.float(beta));
    let scaled = w.op("Mul", &[x, &a], vec![]);
    let z = w.op("Add", &[&scaled, &b], vec![]);
    let (zero, one) = (w.float(0.0), w.float(1.0));
    let above = w.op("Greater", &[&z, &zero], vec![]);
    let below = w.op("Less", &[&z, &one], vec![]);
    let inside = w.op("And", &[&above, &below], vec![]);
    let ga = w.op("Mul", &[s.g(), &a], vec![]);
    s.only(w.op("Where", &[&inside, &ga, &zero], vec![]))
}

pub fn hard_swish(_: &Context, w: &mut Writer, s: &Step) -> Result<InputGradients, String> {
    // 0 below -3, 1 above 3, x/3 + 1/2 between
    let x = s.x();
    let (three, minus_three, half) = (w.float(3.0), w.float(-3.0), w.float(0.5));
    let (zero, one) = (w.float(0.0), w.float(1.0));
    let third = w.op("Div", &[x, &three], vec![]);
    let middle = w.op("Add", &[&third, &half], vec![]);
    let high = w.op("Greater", &[x, &three], vec![]);
    let upper = w.op("Where", &[&high, &one, &middle], vec![]);
    let low = w.op("Less", &[x, &minus_three], vec![]);
    let d = w.op("Where", &[&low, &zero, &upper], vec![]);
    s.only(w.op("Mul", &[s.g(), &d], vec![]))
}

pub fn erf(_: &Context, w: &mut Writer, s: &Step) -> Result<InputGradients, String> {
    // 2/sqrt(pi) exp(-x^2)
    let x = s.x();
    let square = w.op("Mul", &[x, x], vec![]);
    let negated = w.op("Neg", &[&square], vec![]);
    let e = w.op("Exp", &[&negated], vec![]);
    let k = w.float(std::f32::consts::FRAC_2_SQRT_PI);
    let d = w.op("Mul", &[&e, &k], vec![]);
    s.only(w.op("Mul", &[s.g(), &d], vec![]))
}

/// The exact (erf) GELU only.
pub fn gelu(_: &Context, w: &mut Writer, s: &Step) -> Result<InputGradients, String> {
    if s.node.string("approximate").is_some_and(|a| a != "none") {
        return Err("Gelu with approximate=tanh".into());
    }
    // Phi(x) + x phi(x)
    let x = s.x();
    let (half, one) = (w.float(0.5), w.float(1.0));
    let r = w.float(std::f32::consts::FRAC_1_SQRT_2);
    let scaled = w.op("Mul", &[x, &r], vec![]);
    let erf = w.op("Erf", &[&scaled], vec![]);
    let shifted = w.op("Add", &[&one, &erf], vec![]);
    let cdf = w.op("Mul", &[&half, &shifted], vec![]);
    let square = w.op("Mul", &[x, x], vec![]);
    let minus_half = w.float(-0.5);
    let exponent = w.op("Mul", &[&square, &minus_half], vec![]);
    let e = w.op("Exp", &[&exponent], vec![]);
    let k = w.float((0.5 / std::f64::consts::PI).sqrt() as f32);
    let pdf = w.op("Mul", &[&e, &k], vec![]);
    let x_pdf = w.op("Mul", &[x, &pdf], vec![]);
    let d = w.op("Add", &[&cdf, &x_pdf], vec![]);
    s.only(w.op("Mul", &[s.g(), &d], vec![]))
}
