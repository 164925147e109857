//! camserve: Grad-CAM explanations for ONNX image classifiers, over HTTP.
//!
//! The layers, from the bottom up; each module uses only those below it (docs/architecture.md draws them):
//!
//! - `pipeline`: the stages of one explanation on plain arrays: decode and preprocess, class activation maps,
//!   boxes, rendering. No ONNX, no HTTP.
//! - `config`: the typed configuration, loaded once.
//! - `onnx`: ONNX Runtime, camserve's contract, checking and running a model file, and `plain`, which adds the
//!   gradients to a plain classifier.
//! - `engine`: queues, batching and backpressure in front of sessions, generic over what runs a batch.
//! - `registry`: the served models by name, each a checked model behind its engine.
//! - `explain`: one request through the pipeline: validation against the model, the Runs, the maps.
//! - `http`: the REST API, the labeling formats, Label Studio, metrics.

pub mod config;
pub mod engine;
pub mod explain;
pub mod http;
pub mod onnx;
pub mod pipeline;
pub mod registry;
