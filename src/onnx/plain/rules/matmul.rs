//! Gemm and MatMul: each operand's gradient is `g` times the other operand, transposed.

use super::{Context, InputGradients, Step, unbroadcast, unbroadcast_dims};
use crate::onnx::plain::emit::Writer;
use crate::onnx::plain::proto::Attr;

/// Y = alpha A' B' + beta C (primes: the optional transposes), each product written as a Gemm again.
pub fn gemm(c: &Context, w: &mut Writer, s: &Step) -> Result<InputGradients, String> {
    let node = s.node;
    let alpha = node.float("alpha").unwrap_or(1.0);
    let beta = node.float("beta").unwrap_or(1.0);
    let trans_a = node.int("transA").unwrap_or(0);
    let trans_b = node.int("transB").unwrap_or(0);
    let (a, b, g) = (s.input(0), s.input(1), s.g());
    let attrs = |ta: i64, tb: i64| {
        vec![
            ("alpha", Attr::Float(alpha)),
            ("transA", Attr::Int(ta)),
            ("transB", Attr::Int(tb)),
        ]
    };
    let mut grads = Vec::new();
    if s.needs(a) {
        // dA' = g B'^T
        let grad = if trans_a == 0 {
            w.op("Gemm", &[g, b], attrs(0, 1 - trans_b))
        } else {
            w.op("Gemm", &[b, g], attrs(trans_b, 1))
        };
        grads.push((a.to_owned(), grad));
    }
    if s.needs(b) {
        let grad = if trans_b == 0 {
            w.op("Gemm", &[a, g], attrs(1 - trans_a, 0))
        } else {
            w.op("Gemm", &[g, a], attrs(1, trans_a))
        };
        grads.push((b.to_owned(), grad));
    }
    if let Some(bias) = node.input.get(2).filter(|i| s.needs(i)) {
        let scaled = if beta == 1.0 {
            g.to_owned()
        } else {
            let k = w.float(beta);
            w.op("Mul", &[g, &k], vec![])
        };
        grads.push((bias.clone(), unbroadcast(c, w, &scaled, bias, s.y())?));
    }
    Ok(grads)
}

/// Batched MatMul of operands of rank 2 or more.
pub fn matmul(c: &Context, w: &mut Writer, s: &Step) -> Result<InputGradients, String> {
    let (a, b, g, y) = (s.input(0), s.input(1), s.g(), s.y());
    let (rank_a, rank_b) = (c.rank(a)?, c.rank(b)?);
    if rank_a < 2 || rank_b < 2 {
        return Err("MatMul with a 1-D operand".into());
    }
    // Each product has the result's batch dims and the operand's matrix dims; only batch dims are summed.
    let dy = c.dims(y)?;
    let product_dims = |operand: &[Option<i64>]| {
        let mut dims = dy[..dy.len() - 2].to_vec();
        dims.extend_from_slice(&operand[operand.len() - 2..]);
        dims
    };
    let mut grads = Vec::new();
    if s.needs(a) {
        let bt = swap_last_two(w, b, rank_b);
        let product = w.op("MatMul", &[g, &bt], vec![]);
        let dims = product_dims(c.dims(a)?);
        grads.push((a.to_owned(), unbroadcast_dims(c, w, &product, a, &dims, y)?));
    }
    if s.needs(b) {
        let at = swap_last_two(w, a, rank_a);
        let product = w.op("MatMul", &[&at, g], vec![]);
        let dims = product_dims(c.dims(b)?);
        grads.push((b.to_owned(), unbroadcast_dims(c, w, &product, b, &dims, y)?));
    }
    Ok(grads)
}

/// The matrix transpose of each matrix of `t`.
fn swap_last_two(w: &mut Writer, t: &str, rank: i64) -> String {
    let mut perm: Vec<i64> = (0..rank).collect();
    perm.swap(rank as usize - 1, rank as usize - 2);
    w.op("Transpose", &[t], vec![("perm", Attr::Ints(perm))])
}
