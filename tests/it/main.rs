//! camserve's integration tests, one binary: the real ONNX Runtime, real model files, the real server on
//! 127.0.0.1:0, the real binary where a test needs a process of its own.
//!
//! `gateway` needs a real nginx and runs on its own (`make test-gateway`); `make test-rust` leaves it out with a
//! test-name filter (`-E 'not test(/^gateway::/)'` under nextest, `-- --skip gateway::` under `cargo test`).

mod support;

mod admin;
mod api;
mod dashboards;
mod engine;
mod errors;
mod extras;
mod gateway;
mod localization;
mod methods;
mod metrics;
mod openapi;
mod plain;
mod shutdown;
mod startup;
mod transformers;
