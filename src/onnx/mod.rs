//! ONNX Runtime and camserve's contract: loading the runtime, checking a model file against the contract, running
//! it, and `plain`, which appends the gradients to a plain classifier's graph.

pub mod contract;
pub mod metadata;
pub mod model;
pub mod plain;
pub mod runtime;
pub mod session;
