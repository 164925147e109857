//! Shared test harness: the real ONNX Runtime, real model files, the real server on 127.0.0.1:0 ([`TestServer`]),
//! the exporter's reference numbers ([`reference`]).

pub mod reference;
mod server;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use camserve::config::{Config, LabelStudioConfig, ModelConfig};
use camserve::onnx::runtime::{self, OnnxRuntime};

pub use server::{TestServer, TestServerBuilder};

pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixture(relative: &str) -> PathBuf {
    root().join("tests/fixtures").join(relative)
}

/// A fresh, empty folder in the temporary folder, named after `tag` and this test process (remove it at the end).
pub fn scratch_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("camserve-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A file in the temporary folder, named after this test process, removed when dropped.
pub struct TempFile(PathBuf);

impl TempFile {
    pub fn new(name: &str) -> Self {
        TempFile(std::env::temp_dir().join(format!("camserve-{}-{name}", std::process::id())))
    }
}

impl std::ops::Deref for TempFile {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

pub fn ort_library() -> PathBuf {
    std::env::var_os("CAMSERVE_ORT_LIBRARY")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".ort/onnxruntime/capi/libonnxruntime.so.1.31.1"))
}

/// ONNX Runtime is loaded once per process.
pub fn runtime() -> &'static OnnxRuntime {
    static RUNTIME: OnceLock<OnnxRuntime> = OnceLock::new();
    RUNTIME.get_or_init(|| runtime::init(&ort_library()).expect("run `make ort` first"))
}

/// A model entry as a user would write it in the config file.
pub fn model_config(name: &str, file: &Path) -> ModelConfig {
    let toml = format!(
        "[runtime]\nlibrary = \"x\"\n[[models]]\nname = \"{name}\"\nfile = \"{}\"\n",
        file.display()
    );
    Config::from_toml(&toml, Path::new("/"))
        .unwrap()
        .models
        .remove(0)
}

/// A `[label_studio]` table for `model`, fetching from `allowed_hosts`, as a user would write it.
pub fn label_studio_config(model: &str, allowed_hosts: &[&str]) -> LabelStudioConfig {
    let hosts: Vec<String> = allowed_hosts.iter().map(|h| format!("\"{h}\"")).collect();
    let toml = format!(
        "[runtime]\nlibrary = \"x\"\n[[models]]\nname = \"{model}\"\nfile = \"m.onnx\"\n\
         [label_studio]\nmodel = \"{model}\"\nallowed_hosts = [{}]\nfetch_timeout_secs = 2\n",
        hosts.join(", ")
    );
    Config::from_toml(&toml, Path::new("/"))
        .unwrap()
        .label_studio
        .unwrap()
}

/// The name a fixture model is served under in the tests: its file stem.
pub fn served_name(model_file: &str) -> String {
    Path::new(model_file)
        .file_stem()
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned()
}

/// A response's status and JSON body.
pub async fn status_and_json(response: reqwest::Response) -> (u16, serde_json::Value) {
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

/// Reads a little-endian float32 .npy file (as NumPy writes them): (shape, data).
pub fn read_npy(bytes: &[u8]) -> (Vec<usize>, Vec<f32>) {
    assert_eq!(&bytes[..6], b"\x93NUMPY", "not an .npy file");
    let (header_len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        _ => (
            u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize,
            12,
        ),
    };
    let header = std::str::from_utf8(&bytes[start..start + header_len]).unwrap();
    assert!(
        header.contains("'descr': '<f4'") && header.contains("'fortran_order': False"),
        "{header}"
    );
    let shape_text = header
        .split("'shape': (")
        .nth(1)
        .unwrap()
        .split(')')
        .next()
        .unwrap();
    let shape = shape_text
        .split(',')
        .filter_map(|d| d.trim().parse().ok())
        .collect();
    let data = bytes[start + header_len..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (shape, data)
}

pub fn read_npy_file(path: &Path) -> (Vec<usize>, Vec<f32>) {
    read_npy(&std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
}

/// Largest absolute difference, element by element.
pub fn max_abs_difference(actual: &[f32], expected: &[f32]) -> f32 {
    assert_eq!(actual.len(), expected.len(), "lengths differ");
    actual
        .iter()
        .zip(expected)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()))
}

/// Largest absolute difference, relative to the largest absolute expected value.
pub fn max_relative_error(actual: &[f32], expected: &[f32]) -> f32 {
    assert_eq!(actual.len(), expected.len(), "lengths differ");
    camserve::pipeline::cam::relative_difference(actual, expected)
}

pub fn png_bytes(image: &image::RgbImage) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    image.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}
