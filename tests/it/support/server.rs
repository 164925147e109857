//! The real server on 127.0.0.1:0, started with the real ONNX Runtime and real model files.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use camserve::config::{
    AdminConfig, Config, CorsConfig, LabelStudioConfig, Limits, ModelConfig, RuntimeConfig,
    ServerConfig, Shutdown,
};
use camserve::http::{self, Admin, AppState};
use camserve::registry::Registry;

use super::{fixture, model_config, ort_library, runtime, status_and_json};

/// A server on its own port, stopped when dropped.
pub struct TestServer {
    pub base: String,
    pub client: reqwest::Client,
    pub state: Arc<AppState>,
    _shutdown: tokio::sync::oneshot::Sender<()>,
}

/// What a test server is started with: without `model` or `models`, the two small fixture models (`tiny` and
/// `red`); otherwise the defaults of the config file, a 30 s request timeout, no admin API.
pub struct TestServerBuilder {
    models: Vec<ModelConfig>,
    limits: Limits,
    request_timeout: Duration,
    admin: Option<Admin>,
    cors: CorsConfig,
    label_studio: Option<LabelStudioConfig>,
}

impl TestServer {
    pub fn builder() -> TestServerBuilder {
        TestServerBuilder {
            models: Vec::new(),
            limits: Limits::default(),
            request_timeout: Duration::from_secs(30),
            admin: None,
            cors: CorsConfig::default(),
            label_studio: None,
        }
    }

    /// Serves the two small fixture models, `tiny` and `red`.
    pub async fn start() -> Self {
        Self::builder().start().await
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

impl TestServerBuilder {
    /// Serves `file` as `name` (the fixture pair is then left out).
    pub fn model(mut self, name: &str, file: &Path) -> Self {
        self.models.push(model_config(name, file));
        self
    }

    /// Serves these model entries (the fixture pair is then left out).
    pub fn models(mut self, models: impl IntoIterator<Item = ModelConfig>) -> Self {
        self.models.extend(models);
        self
    }

    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Finer than the config's whole seconds, for the timeout tests.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// With the admin API on.
    pub fn admin(mut self, admin: Admin) -> Self {
        self.admin = Some(admin);
        self
    }

    pub fn cors(mut self, cors: CorsConfig) -> Self {
        self.cors = cors;
        self
    }

    /// With the Label Studio backend on.
    pub fn label_studio(mut self, label_studio: LabelStudioConfig) -> Self {
        self.label_studio = Some(label_studio);
        self
    }

    pub async fn start(self) -> TestServer {
        let models = if self.models.is_empty() {
            vec![
                model_config("tiny", &fixture("tiny_cnn.onnx")),
                model_config("red", &fixture("red_detector.onnx")),
            ]
        } else {
            self.models
        };
        let registry = Registry::load(runtime(), &models).expect("fixture models load");
        let config = Config {
            server: ServerConfig::default(),
            runtime: RuntimeConfig {
                library: ort_library(),
            },
            limits: self.limits,
            admin: AdminConfig {
                token: self.admin.as_ref().map(|a| a.token.clone()),
                models_dir: self.admin.map(|a| a.models_dir),
            },
            models,
            cors: self.cors,
            label_studio: self.label_studio,
        };
        let mut state =
            AppState::new(&config, runtime().clone(), registry).expect("a valid config");
        state.request_timeout = self.request_timeout;
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
        TestServer {
            base,
            client: reqwest::Client::new(),
            state,
            _shutdown: shutdown,
        }
    }
}
