//! camserve: Grad-CAM explanations for ONNX image classifiers, over HTTP.
//!
//! Data flows one way: bytes -> `preprocess` -> `engine` (one ONNX Runtime Run) -> `cam` -> `boxes` and `render`,
//! orchestrated by `explain` and served by `http`.

mod bands;
pub mod boxes;
pub mod cam;
pub mod config;
pub mod engine;
pub mod explain;
pub mod http;
pub mod metrics;
pub mod model;
pub mod plain;
pub mod preprocess;
pub mod registry;
pub mod render;
pub mod runtime;
