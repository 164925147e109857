//! The stages of one explanation, on plain arrays: decode and preprocess the photo, compute class activation maps,
//! box them, render them. Nothing here knows about ONNX Runtime or HTTP.

pub(crate) mod bands;
pub mod boxes;
pub mod cam;
pub mod preprocess;
pub mod render;
