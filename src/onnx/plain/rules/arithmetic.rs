//! Elementwise arithmetic. Operands may broadcast: each input's gradient is summed back to its own shape.

use super::{Context, InputGradients, Step, unbroadcast};
use crate::onnx::plain::emit::Writer;

/// Add, Sub and Sum: `g` to every input (negated for Sub's second).
pub fn sum(c: &Context, w: &mut Writer, s: &Step) -> Result<InputGradients, String> {
    let mut grads = Vec::new();
    for (i, input) in s.node.input.iter().enumerate() {
        if s.needs(input) {
            let signed = if s.op() == "Sub" && i == 1 {
                w.op("Neg", &[s.g()], vec![])
            } else {
                s.g().to_owned()
            };
            grads.push((input.clone(), unbroadcast(c, w, &signed, input, s.y())?));
        }
    }
    Ok(grads)
}

pub fn mul(c: &Context, w: &mut Writer, s: &Step) -> Result<InputGradients, String> {
    let (a, b) = (s.input(0), s.input(1));
    let mut grads = Vec::new();
    for (this, other) in [(a, b), (b, a)] {
        if s.needs(this) {
            let product = w.op("Mul", &[s.g(), other], vec![]);
            grads.push((this.to_owned(), unbroadcast(c, w, &product, this, s.y())?));
        }
    }
    Ok(grads)
}

pub fn div(c: &Context, w: &mut Writer, s: &Step) -> Result<InputGradients, String> {
    let (a, b, g, y) = (s.input(0), s.input(1), s.g(), s.y());
    let mut grads = Vec::new();
    if s.needs(a) {
        let quotient = w.op("Div", &[g, b], vec![]);
        grads.push((a.to_owned(), unbroadcast(c, w, &quotient, a, y)?));
    }
    if s.needs(b) {
        // d(a/b)/db = -y/b
        let gy = w.op("Mul", &[g, y], vec![]);
        let quotient = w.op("Div", &[&gy, b], vec![]);
        let negated = w.op("Neg", &[&quotient], vec![]);
        grads.push((b.to_owned(), unbroadcast(c, w, &negated, b, y)?));
    }
    Ok(grads)
}

/// Max and Min: the gradient goes to the input that gave the result (to each of equal ones, as ties are rare).
pub fn max_min(c: &Context, w: &mut Writer, s: &Step) -> Result<InputGradients, String> {
    let mut grads = Vec::new();
    let zero = w.float(0.0);
    for input in s.node.input.iter().filter(|i| s.needs(i)) {
        let chosen = w.op("Equal", &[input, s.y()], vec![]);
        let masked = w.op("Where", &[&chosen, s.g(), &zero], vec![]);
        grads.push((input.clone(), unbroadcast(c, w, &masked, input, s.y())?));
    }
    Ok(grads)
}

/// Pow with an exponent that does not depend on the target: p x^(p-1).
pub fn pow(c: &Context, w: &mut Writer, s: &Step) -> Result<InputGradients, String> {
    let (x, p) = (s.x(), s.input(1));
    if s.needs(p) {
        return Err("Pow with an exponent that depends on the target".into());
    }
    let one = w.float(1.0);
    // The exponent may be an integer tensor; CastLike (opset 15) matches it.
    let one = if w.opset() >= 15 {
        w.op("CastLike", &[&one, p], vec![])
    } else {
        one
    };
    let lower = w.op("Sub", &[p, &one], vec![]);
    let power = w.op("Pow", &[x, &lower], vec![]);
    let d = w.op("Mul", &[p, &power], vec![]);
    let gd = w.op("Mul", &[s.g(), &d], vec![]);
    s.only(unbroadcast(c, w, &gd, x, s.y())?)
}

pub fn exp(_: &Context, w: &mut Writer, s: &Step) -> Result<InputGradients, String> {
    s.only(w.op("Mul", &[s.g(), s.y()], vec![]))
}

pub fn neg(_: &Context, w: &mut Writer, s: &Step) -> Result<InputGradients, String> {
    s.only(w.op("Neg", &[s.g()], vec![]))
}

pub fn abs(_: &Context, w: &mut Writer, s: &Step) -> Result<InputGradients, String> {
    let sign = w.op("Sign", &[s.x()], vec![]);
    s.only(w.op("Mul", &[s.g(), &sign], vec![]))
}

pub fn sqrt(_: &Context, w: &mut Writer, s: &Step) -> Result<InputGradients, String> {
    // 1 / (2 y)
    let two = w.float(2.0);
    let twice = w.op("Mul", &[s.y(), &two], vec![]);
    s.only(w.op("Div", &[s.g(), &twice], vec![]))
}

/// Where(cond, a, b): `g` goes to `a` where `cond` holds and to `b` elsewhere, each summed back to its own shape.
pub fn select(c: &Context, w: &mut Writer, s: &Step) -> Result<InputGradients, String> {
    let (cond, g) = (s.input(0), s.g());
    let zero = w.float(0.0);
    let mut grads = Vec::new();
    for (i, input) in s.node.input.iter().enumerate().skip(1) {
        if s.needs(input) {
            let (then, otherwise) = if i == 1 {
                (g, zero.as_str())
            } else {
                (zero.as_str(), g)
            };
            let picked = w.op("Where", &[cond, then, otherwise], vec![]);
            grads.push((input.clone(), unbroadcast(c, w, &picked, input, s.y())?));
        }
    }
    Ok(grads)
}
