//! camserve's model contract, v1: the names, types and ranks every served model's graph has, and the metadata
//! keys it carries. The one place these names are written; everything else refers to them.
//!
//! Inputs `input` f32 [N,3,H,W] and `class_weights` f32 [N,K,C]; outputs `logits` f32 [N,C], `activations` f32
//! [N,Ch,h,w], `gradients` f32 [N,K,Ch,h,w] and `target_class` i64 [N,K]. Row k of `class_weights` (a seed row)
//! weights the class scores whose gradient is taken; an all-zero seed row asks for the model's k-th best class.
//!
//! Optional outputs (the exporter's `--guided` and `--extra-layer`): `input_gradients` f32 [N,K,3,H,W], guided
//! backpropagation to the input, for Guided Grad-CAM; `activations_i` f32 [N,Ch,h,w] and `gradients_i` f32
//! [N,K,Ch,h,w] for extra target layers i = 1, 2, ..., named by the metadata `camserve.target_layers`.

use ort::value::TensorElementType;

pub const CONTRACT_VERSION: &str = "1";

pub const INPUT: &str = "input";
pub const CLASS_WEIGHTS: &str = "class_weights";
pub const LOGITS: &str = "logits";
pub const ACTIVATIONS: &str = "activations";
pub const GRADIENTS: &str = "gradients";
pub const TARGET_CLASS: &str = "target_class";
pub const INPUT_GRADIENTS: &str = "input_gradients";

/// (name, element type, rank) of every input and output the contract requires.
pub const INPUTS: [(&str, TensorElementType, usize); 2] = [
    (INPUT, TensorElementType::Float32, 4),
    (CLASS_WEIGHTS, TensorElementType::Float32, 3),
];
pub const OUTPUTS: [(&str, TensorElementType, usize); 4] = [
    (LOGITS, TensorElementType::Float32, 2),
    (ACTIVATIONS, TensorElementType::Float32, 4),
    (GRADIENTS, TensorElementType::Float32, 5),
    (TARGET_CLASS, TensorElementType::Int64, 2),
];

/// The outputs of extra target layer `i` (from 1).
pub fn extra_activations(i: usize) -> String {
    format!("{ACTIVATIONS}_{i}")
}
pub fn extra_gradients(i: usize) -> String {
    format!("{GRADIENTS}_{i}")
}

/// The metadata key `camserve.{key}`.
pub fn metadata_key(key: &str) -> String {
    format!("camserve.{key}")
}

/// Class indices by descending score: the order in which all-zero seed rows pick classes.
pub fn ranked(scores: &[f32]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranked_by_hand() {
        assert_eq!(ranked(&[0.5, 2.0, -1.0, 1.0]), vec![1, 3, 0, 2]);
    }
}
