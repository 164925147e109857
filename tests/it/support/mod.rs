//! Shared test harness: the real ONNX Runtime, real model files, the real server on 127.0.0.1:0.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use camserve::config::{
    AdminConfig, Config, CorsConfig, LabelStudioConfig, Limits, ModelConfig, RuntimeConfig,
    ServerConfig, Shutdown,
};
use camserve::http::{self, Admin, AppState};
use camserve::onnx::runtime::{self, OnnxRuntime};
use camserve::registry::Registry;

pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixture(relative: &str) -> PathBuf {
    root().join("tests/fixtures").join(relative)
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

/// What a test server is started with, besides its models.
pub struct Options {
    pub limits: Limits,
    pub request_timeout: Duration,
    pub admin: Option<Admin>,
    pub cors: CorsConfig,
    pub label_studio: Option<LabelStudioConfig>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            request_timeout: Duration::from_secs(30),
            admin: None,
            cors: CorsConfig::default(),
            label_studio: None,
        }
    }
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

pub struct TestServer {
    pub base: String,
    pub client: reqwest::Client,
    pub state: Arc<AppState>,
    _shutdown: tokio::sync::oneshot::Sender<()>,
}

impl TestServer {
    /// Serves the two small fixture models.
    pub async fn start() -> Self {
        Self::with(
            vec![
                model_config("tiny", &fixture("tiny_cnn.onnx")),
                model_config("red", &fixture("red_detector.onnx")),
            ],
            Limits::default(),
        )
        .await
    }

    pub async fn with(models: Vec<ModelConfig>, limits: Limits) -> Self {
        Self::with_options(
            models,
            Options {
                limits,
                ..Options::default()
            },
        )
        .await
    }

    /// With CORS origins and the Label Studio backend configured.
    pub async fn with_integrations(
        models: Vec<ModelConfig>,
        limits: Limits,
        request_timeout: Duration,
        cors: CorsConfig,
        label_studio: Option<LabelStudioConfig>,
    ) -> Self {
        let options = Options {
            limits,
            request_timeout,
            cors,
            label_studio,
            ..Options::default()
        };
        Self::with_options(models, options).await
    }

    pub async fn with_options(models: Vec<ModelConfig>, options: Options) -> Self {
        let Options {
            limits,
            request_timeout,
            admin,
            cors,
            label_studio,
        } = options;
        let registry = Registry::load(runtime(), &models).expect("fixture models load");
        let config = Config {
            server: ServerConfig::default(),
            runtime: RuntimeConfig {
                library: ort_library(),
            },
            limits,
            admin: AdminConfig {
                token: admin.as_ref().map(|a| a.token.clone()),
                models_dir: admin.map(|a| a.models_dir),
            },
            models,
            cors,
            label_studio,
        };
        let mut state =
            AppState::new(&config, runtime().clone(), registry).expect("a valid config");
        // Finer than the config's whole seconds, for the timeout tests.
        state.request_timeout = request_timeout;
        let state = Arc::new(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        // Dropping the server (its sender) is the shutdown signal.
        let (shutdown, stop) = tokio::sync::oneshot::channel::<()>();
        let timing = Shutdown {
            delay: Duration::ZERO,
            grace: Duration::from_secs(5),
        };
        let stopped = async move {
            let _ = stop.await;
        };
        tokio::spawn(http::serve(listener, state.clone(), stopped, timing));
        Self {
            base,
            client: reqwest::Client::new(),
            state,
            _shutdown: shutdown,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// POSTs `body` as a raw image.
    pub async fn post_image(
        &self,
        path: impl AsRef<str>,
        content_type: &str,
        body: Vec<u8>,
    ) -> reqwest::Response {
        self.client
            .post(self.url(path.as_ref()))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap()
    }

    /// GETs `path`: the status and the JSON body.
    pub async fn get_json(&self, path: &str) -> (u16, serde_json::Value) {
        status_and_json(self.client.get(self.url(path)).send().await.unwrap()).await
    }
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
