//! One typed configuration, loaded once: the built-in defaults, else a TOML file, then the environment and the
//! command line ([`Overrides`]), validated in one place ([`Config::load`]).
//!
//! Relative paths in a file are resolved against the file's own directory, so the service starts the same from
//! any working directory. The built-in defaults are `config/default.toml`, compiled in, with its paths resolved
//! against the checkout the binary was built from: the default model and ONNX Runtime of `make run`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::pipeline::boxes::Threshold;
use crate::pipeline::preprocess::DecodeLimits;

/// The built-in defaults: the shipped config file, compiled in.
const DEFAULTS: &str = include_str!("../config/default.toml");
/// Where the built-in defaults' relative paths point from.
const DEFAULTS_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config");

/// What the environment and the command line override (the command line wins; clap reads both).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `runtime.library`; CAMSERVE_ORT_LIBRARY.
    pub ort_library: Option<PathBuf>,
    /// `server.bind`; CAMSERVE_BIND.
    pub bind: Option<SocketAddr>,
    /// `admin.token`; CAMSERVE_ADMIN_TOKEN.
    pub admin_token: Option<String>,
    /// `label_studio.api_key`; CAMSERVE_LABEL_STUDIO_API_KEY.
    pub label_studio_api_key: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    pub runtime: RuntimeConfig,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub models: Vec<ModelConfig>,
    #[serde(default)]
    pub cors: CorsConfig,
    /// Absent: no Label Studio routes.
    pub label_studio: Option<LabelStudioConfig>,
}

/// Browser origins allowed to call the API from their pages; none by default.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CorsConfig {
    /// Exact origins such as `"https://labelstudio.example.com"`, or `"*"` for any.
    pub allowed_origins: Vec<String>,
}

/// camserve as a Label Studio ML backend: `{prefix}/health`, `/setup`, `/predict`, `/webhook`, `/versions`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelStudioConfig {
    #[serde(default = "default_label_studio_prefix")]
    pub prefix: String,
    /// The model that answers; it must be one of `[[models]]`.
    pub model: String,
    /// Label Studio's own address (`http://host:port`): uploads (`/data/upload/...`) and its storage proxy are
    /// fetched from there when `/setup` gave no address on an allowed host. Its host is allowed implicitly.
    pub url: Option<String>,
    /// Label Studio's API token (a personal access token, or a legacy token), sent to its host only, when the
    /// token `/setup` gave is missing or refused. Also from CAMSERVE_LABEL_STUDIO_API_KEY; prefer the
    /// environment: config files get shared.
    pub api_key: Option<String>,
    /// More hosts (`name` or `name:port`) that task image URLs may point to, over http or https. Nothing else
    /// is fetched, so camserve is no open proxy; `data:` URIs need no host.
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
    /// A PEM file of certificate authorities trusted for https, besides the public (webpki) roots.
    pub ca_file: Option<PathBuf>,
    #[serde(default = "default_fetch_max_bytes")]
    pub fetch_max_bytes: usize,
    #[serde(default = "default_fetch_timeout_secs")]
    pub fetch_timeout_secs: u64,
    /// Time a `/predict` request may take per task; the request's budget is this times its tasks (it is not
    /// bound by `server.request_timeout_secs`).
    #[serde(default = "default_task_timeout_secs")]
    pub task_timeout_secs: u64,
    /// The most tasks one `/predict` may carry; a larger batch is refused whole (413 `too_many_tasks`).
    #[serde(default = "default_max_batch_tasks")]
    pub max_batch_tasks: usize,
    /// Project label -> model class names, for labels whose name (or `predicted_values` / `alias`) is no class
    /// of the model: `labels = { Cat = ["tabby", "Egyptian cat"], Coffee = ["espresso"] }`.
    #[serde(default)]
    pub labels: BTreeMap<String, Vec<String>>,
    /// Classes predicted per task: the best-scoring among those the project's labels map to.
    #[serde(default = "one")]
    pub top_k: usize,
    /// Boxes and brush masks: a fraction of the map's maximum, or `"otsu"`.
    #[serde(default = "default_threshold", deserialize_with = "threshold")]
    pub threshold: Threshold,
    #[serde(default = "one")]
    pub max_boxes: usize,
}

fn default_label_studio_prefix() -> String {
    "/label-studio".into()
}
fn default_fetch_max_bytes() -> usize {
    16 * 1024 * 1024
}
fn default_fetch_timeout_secs() -> u64 {
    10
}
fn default_task_timeout_secs() -> u64 {
    2
}
fn default_max_batch_tasks() -> usize {
    5000
}
fn default_threshold() -> Threshold {
    Threshold::DEFAULT
}

/// A number or `"otsu"`, as the `threshold` query parameter takes it.
fn threshold<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Threshold, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Given {
        Number(f32),
        Name(String),
    }
    let text = match Given::deserialize(deserializer)? {
        Given::Number(n) => n.to_string(),
        Given::Name(name) => name,
    };
    Threshold::parse(&text).ok_or_else(|| {
        serde::de::Error::custom(format!(
            "threshold must be `otsu` or a number above 0 and at most 1, got {text}"
        ))
    })
}

/// The admin API (register, replace, remove and reload models) is on only when a token is set.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Bearer token; also from CAMSERVE_ADMIN_TOKEN. Prefer the environment: config files get shared.
    pub token: Option<String>,
    /// The only folder model files may be registered from at run time.
    pub models_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub bind: SocketAddr,
    /// Seconds a request may take end to end before it is answered with 503 `timeout`.
    pub request_timeout_secs: u64,
    /// On SIGTERM: seconds of answering with /readyz false while still serving, so that load balancers stop
    /// sending first (Kubernetes needs a few).
    pub shutdown_delay_secs: u64,
    /// Then: seconds that requests in flight get to finish before the process exits anyway.
    pub shutdown_grace_secs: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 8080)),
            request_timeout_secs: 30,
            shutdown_delay_secs: 0,
            shutdown_grace_secs: 30,
        }
    }
}

/// How the server stops: readiness turns false, `delay` later it stops accepting, then in-flight requests get
/// up to `grace` to finish.
#[derive(Debug, Clone, Copy)]
pub struct Shutdown {
    pub delay: Duration,
    pub grace: Duration,
}

impl ServerConfig {
    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_secs)
    }

    pub fn shutdown(&self) -> Shutdown {
        Shutdown {
            delay: Duration::from_secs(self.shutdown_delay_secs),
            grace: Duration::from_secs(self.shutdown_grace_secs),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Path of `libonnxruntime.so.1.31.x` (from the PyPI wheel; `make ort` installs it).
    pub library: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub max_body_bytes: usize,
    /// Checked from the image header, before the pixels are decoded.
    pub max_image_side: u32,
    pub max_image_pixels: u64,
    pub max_classes_per_request: usize,
    /// Longest side of image outputs (overlay, heatmap, image-sized maps); larger photos are drawn smaller.
    pub max_output_side: usize,
    /// The largest Score-CAM `max_channels` a request may ask for: each channel is one masked input to Run
    /// (six with `aug_smooth`).
    pub max_score_cam_channels: usize,
}

impl Limits {
    pub fn decode_limits(&self) -> DecodeLimits {
        DecodeLimits {
            max_width: self.max_image_side,
            max_height: self.max_image_side,
            max_pixels: self.max_image_pixels,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 32 * 1024 * 1024,
            max_image_side: 16_384,
            max_image_pixels: 40_000_000,
            max_classes_per_request: 32,
            max_output_side: 4096,
            max_score_cam_channels: 2048,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ExecutionProvider {
    Cpu,
    Cuda,
}

impl std::fmt::Display for ExecutionProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Cpu => "cpu",
            Self::Cuda => "cuda",
        })
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub name: String,
    pub file: PathBuf,
    #[serde(default = "default_providers")]
    pub execution_providers: Vec<ExecutionProvider>,
    /// ONNX Runtime sessions, each serving one Run at a time on its own thread.
    #[serde(default = "one")]
    pub sessions: usize,
    /// Intra-op threads per session.
    #[serde(default = "one")]
    pub threads: usize,
    /// With several threads on the CPU: under load, the same cores serve as one-thread sessions, one Run per
    /// core, while a request that arrives alone still gets all the threads (see `engine::Role`).
    #[serde(default = "yes")]
    pub split_under_load: bool,
    /// Requests that may wait for a session; past it the service answers 503 at once.
    #[serde(default = "default_queue")]
    pub queue_capacity: usize,
    /// Most images in one Run. Requests already waiting are batched together, except on the one-thread sessions
    /// of `split_under_load`, which run one request each.
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
    /// How long a session waits for more requests to fill a batch (0: take only what is waiting).
    #[serde(default)]
    pub max_batch_wait_ms: u64,
    /// Overrides of what the model's own metadata says.
    #[serde(default)]
    pub overrides: ModelOverrides,
    /// A plain ONNX classifier (no gradients in the graph): camserve differentiates its head at load.
    #[serde(default)]
    pub plain: Option<PlainModel>,
}

/// A model entry's `plain` table: which tensor to explain, and which scores to differentiate.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlainModel {
    /// The tensor whose activations and gradients the maps are made of: 4-D [N,C,h,w].
    pub target: String,
    /// The class scores; default the graph's first output.
    #[serde(default)]
    pub output: Option<String>,
    /// Differentiate a final Softmax/LogSoftmax instead of the scores before it (Grad-CAM wants the scores).
    #[serde(default)]
    pub keep_softmax: bool,
    /// How the target lays out its positions, when camserve's guess is wrong (default: inferred: a 3-D target
    /// [N,T,D] is tokens, a 4-D one NCHW unless a Transpose made it channels-last).
    #[serde(default)]
    pub layout: Option<LayoutKind>,
    /// Tokens before the patch tokens (class, distillation, register tokens), for a token target; default
    /// T - h*w for the grid.
    #[serde(default)]
    pub prefix_tokens: Option<usize>,
    /// The patch grid [h, w] of a token target; default from the input size and the patch embedding (the Conv
    /// whose kernel equals its stride).
    #[serde(default)]
    pub grid: Option<[usize; 2]>,
}

/// Which layout a plain model's target has, as a user names it (`layout`, `--layout`); camserve maps it to the
/// contract's NCHW inside the graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LayoutKind {
    /// [N,T,D]: P prefix tokens, then h*w patch tokens row by row.
    Tokens,
    /// [N,h,w,C], channels last.
    Nhwc,
    /// [N,C,h,w].
    Nchw,
}

impl std::str::FromStr for LayoutKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tokens" => Ok(LayoutKind::Tokens),
            "nhwc" => Ok(LayoutKind::Nhwc),
            "nchw" => Ok(LayoutKind::Nchw),
            other => Err(format!("`{other}` is not a layout: tokens, nhwc or nchw")),
        }
    }
}

/// Anything here replaces the value from the ONNX file's `camserve.*` metadata.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelOverrides {
    /// A text file with one label per line.
    pub labels_file: Option<PathBuf>,
    pub target_layer: Option<String>,
    /// [height, width]
    pub input_size: Option<[usize; 2]>,
    pub mean: Option<[f32; 3]>,
    pub std: Option<[f32; 3]>,
    pub channel_order: Option<String>,
    pub value_range: Option<[f32; 2]>,
}

fn default_providers() -> Vec<ExecutionProvider> {
    vec![ExecutionProvider::Cpu]
}
fn yes() -> bool {
    true
}

fn one() -> usize {
    1
}
fn default_queue() -> usize {
    64
}
fn default_max_batch() -> usize {
    8
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("invalid config: {0}")]
    Invalid(String),
}

impl Config {
    /// The configuration the service runs with: `file` (else the built-in defaults), then `overrides`, validated.
    pub fn load(file: Option<&Path>, overrides: Overrides) -> Result<Self, ConfigError> {
        let mut config = match file {
            Some(path) => Self::read(path)?,
            None => Self::parse(DEFAULTS, Path::new(DEFAULTS_DIR))?,
        };
        let Overrides {
            ort_library,
            bind,
            admin_token,
            label_studio_api_key,
        } = overrides;
        if let Some(library) = ort_library {
            config.runtime.library = library;
        }
        if let Some(bind) = bind {
            config.server.bind = bind;
        }
        if admin_token.is_some() {
            config.admin.token = admin_token;
        }
        if let Some(ls) = &mut config.label_studio
            && label_studio_api_key.is_some()
        {
            ls.api_key = label_studio_api_key;
        }
        config.validate()?;
        Ok(config)
    }

    /// A file alone, validated: what `load` starts from.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        Self::load(Some(path), Overrides::default())
    }

    /// Parses `text`, resolving relative paths against `base`, and validates the result.
    pub fn from_toml(text: &str, base: &Path) -> Result<Self, ConfigError> {
        let config = Self::parse(text, base)?;
        config.validate()?;
        Ok(config)
    }

    fn read(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, base).map_err(|e| match e {
            ConfigError::Parse { source, .. } => ConfigError::Parse {
                path: path.to_owned(),
                source,
            },
            other => other,
        })
    }

    /// Parses `text`, resolving relative paths against `base`; not yet validated.
    fn parse(text: &str, base: &Path) -> Result<Self, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: PathBuf::new(),
            source,
        })?;
        config.runtime.library = resolve(base, &config.runtime.library);
        if let Some(dir) = &config.admin.models_dir {
            config.admin.models_dir = Some(resolve(base, dir));
        }
        if let Some(ls) = &mut config.label_studio
            && let Some(ca) = &ls.ca_file
        {
            ls.ca_file = Some(resolve(base, ca));
        }
        for model in &mut config.models {
            model.file = resolve(base, &model.file);
            if let Some(labels) = &model.overrides.labels_file {
                model.overrides.labels_file = Some(resolve(base, labels));
            }
        }
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |msg: String| Err(ConfigError::Invalid(msg));
        if self.models.is_empty() {
            return invalid("no models: add at least one [[models]] entry".into());
        }
        for (i, model) in self.models.iter().enumerate() {
            model.validate()?;
            if self.models[..i].iter().any(|m| m.name == model.name) {
                return invalid(format!("model `{}` is listed twice", model.name));
            }
        }
        let limits = &self.limits;
        if [
            limits.max_classes_per_request,
            limits.max_body_bytes,
            limits.max_output_side,
            limits.max_score_cam_channels,
        ]
        .contains(&0)
        {
            return invalid(
                "limits.max_classes_per_request, max_body_bytes, max_output_side and max_score_cam_channels \
                 must be >= 1"
                    .into(),
            );
        }
        if self.server.request_timeout_secs == 0 {
            return invalid("server.request_timeout_secs must be >= 1".into());
        }
        match (&self.admin.token, &self.admin.models_dir) {
            (None, _) => {}
            (Some(_), None) => {
                return invalid(
                    "an admin token is set but [admin] models_dir is not: say where model files may come from".into(),
                );
            }
            (Some(token), Some(_)) if token.len() < 16 => {
                return invalid("the admin token must be at least 16 characters".into());
            }
            (Some(_), Some(_)) => {}
        }
        for origin in &self.cors.allowed_origins {
            let valid = origin == "*"
                || ((origin.starts_with("http://") || origin.starts_with("https://"))
                    && !origin.ends_with('/')
                    && axum::http::HeaderValue::from_str(origin).is_ok());
            if !valid {
                return invalid(format!(
                    "cors.allowed_origins: `{origin}` is not an origin such as `https://host:port` (no path) or `*`"
                ));
            }
        }
        if let Some(ls) = &self.label_studio {
            if !ls.prefix.starts_with('/') || ls.prefix.ends_with('/') || ls.prefix.contains("//") {
                return invalid(format!(
                    "label_studio.prefix `{}` must start with `/` and not end with one",
                    ls.prefix
                ));
            }
            if !self.models.iter().any(|m| m.name == ls.model) {
                return invalid(format!(
                    "label_studio.model `{}` is not one of [[models]]",
                    ls.model
                ));
            }
            if [
                ls.top_k,
                ls.fetch_max_bytes,
                ls.fetch_timeout_secs as usize,
                ls.task_timeout_secs as usize,
                ls.max_batch_tasks,
            ]
            .contains(&0)
            {
                return invalid(
                    "label_studio.top_k, fetch_max_bytes, fetch_timeout_secs, task_timeout_secs and \
                     max_batch_tasks must be >= 1"
                        .into(),
                );
            }
            if let Some(url) = &ls.url {
                let parsed = reqwest::Url::parse(url).ok();
                let valid = parsed.as_ref().is_some_and(|u| {
                    matches!(u.scheme(), "http" | "https")
                        && u.host_str().is_some()
                        && u.path() == "/"
                });
                if !valid {
                    return invalid(format!(
                        "label_studio.url `{url}` is not an address such as `http://host:port`"
                    ));
                }
            }
            if let Some(host) = ls
                .allowed_hosts
                .iter()
                .find(|h| h.is_empty() || h.contains(['/', '@', ' ']))
            {
                return invalid(format!(
                    "label_studio.allowed_hosts: `{host}` is not a host or host:port"
                ));
            }
        }
        Ok(())
    }
}

impl ModelConfig {
    /// A `[[models]]` entry with every setting at its default, as a file that names only these two would give.
    pub fn new(name: &str, file: PathBuf) -> Self {
        serde_json::from_value(serde_json::json!({ "name": name, "file": file }))
            .expect("name and file are the only required fields")
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |msg: String| Err(ConfigError::Invalid(msg));
        let valid_name = !self.name.is_empty()
            && self.name.len() <= 128
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !valid_name {
            return invalid(format!(
                "model name `{}`: use letters, digits, `-`, `_` and `.`",
                self.name
            ));
        }
        if [
            self.sessions,
            self.threads,
            self.queue_capacity,
            self.max_batch,
        ]
        .contains(&0)
        {
            return invalid(format!(
                "model `{}`: sessions, threads, queue_capacity and max_batch must be >= 1",
                self.name
            ));
        }
        if self.execution_providers.is_empty() {
            return invalid(format!(
                "model `{}`: execution_providers is empty",
                self.name
            ));
        }
        Ok(())
    }
}

fn resolve(base: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_owned()
    } else {
        base.join(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [runtime]
        library = "lib/libonnxruntime.so"
        [[models]]
        name = "m"
        file = "models/m.onnx"
    "#;

    #[test]
    fn defaults_and_relative_paths() {
        let config = Config::from_toml(MINIMAL, Path::new("/etc/camserve")).unwrap();
        assert_eq!(config.server.bind.to_string(), "127.0.0.1:8080");
        assert_eq!(
            config.runtime.library,
            Path::new("/etc/camserve/lib/libonnxruntime.so")
        );
        let model = &config.models[0];
        assert_eq!(model.file, Path::new("/etc/camserve/models/m.onnx"));
        assert_eq!(model.execution_providers, vec![ExecutionProvider::Cpu]);
        assert_eq!(
            (model.sessions, model.threads, model.queue_capacity),
            (1, 1, 64)
        );
    }

    #[test]
    fn rejects_duplicates_unknown_keys_and_bad_names() {
        let twice = format!("{MINIMAL}\n[[models]]\nname = \"m\"\nfile = \"x.onnx\"\n");
        let err = Config::from_toml(&twice, Path::new("."))
            .unwrap_err()
            .to_string();
        assert!(err.contains("model `m` is listed twice"), "{err}");

        let typo = MINIMAL.replace("file =", "fiel =");
        let err = Config::from_toml(&typo, Path::new("."))
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `fiel`"), "{err}");

        let bad_name = MINIMAL.replace("name = \"m\"", "name = \"a/b\"");
        let err = Config::from_toml(&bad_name, Path::new("."))
            .unwrap_err()
            .to_string();
        assert!(err.contains("model name `a/b`"), "{err}");
    }

    #[test]
    fn cors_and_label_studio_are_checked() {
        let config = Config::from_toml(MINIMAL, Path::new(".")).unwrap();
        assert!(config.cors.allowed_origins.is_empty() && config.label_studio.is_none());

        let with = format!(
            "{MINIMAL}\n[cors]\nallowed_origins = [\"http://a.test:8081\"]\n[label_studio]\nmodel = \"m\"\nallowed_hosts = [\"127.0.0.1:9000\"]\n"
        );
        let config = Config::from_toml(&with, Path::new(".")).unwrap();
        let ls = config.label_studio.unwrap();
        assert_eq!(
            (ls.prefix.as_str(), ls.top_k, ls.fetch_timeout_secs),
            ("/label-studio", 1, 10)
        );
        assert_eq!(ls.threshold, Threshold::DEFAULT);
        for (given, threshold) in [
            ("0.5", Threshold::Fraction(0.5)),
            ("\"otsu\"", Threshold::Otsu),
        ] {
            let config =
                Config::from_toml(&format!("{with}threshold = {given}\n"), Path::new(".")).unwrap();
            assert_eq!(config.label_studio.unwrap().threshold, threshold);
        }

        // Label Studio's address, a CA file relative to the config's folder, the label table.
        let full = format!(
            "{with}url = \"https://ls.test:8443\"\nca_file = \"certs/ca.pem\"\n\
             [label_studio.labels]\nCat = [\"tabby\", \"Egyptian cat\"]\n"
        );
        let ls = Config::from_toml(&full, Path::new("/etc/camserve"))
            .unwrap()
            .label_studio
            .unwrap();
        assert_eq!(ls.url.as_deref(), Some("https://ls.test:8443"));
        assert_eq!(ls.ca_file.unwrap(), Path::new("/etc/camserve/certs/ca.pem"));
        assert_eq!(ls.labels["Cat"], ["tabby", "Egyptian cat"]);
        assert_eq!((ls.task_timeout_secs, ls.max_batch_tasks), (2, 5000));

        for (bad, message) in [
            (
                "[cors]\nallowed_origins = [\"http://a.test/\"]",
                "not an origin",
            ),
            (
                "[label_studio]\nmodel = \"m\"\nurl = \"localhost:8081\"",
                "not an address such as `http://host:port`",
            ),
            (
                "[label_studio]\nmodel = \"m\"\nurl = \"http://ls.test/app\"",
                "not an address",
            ),
            (
                "[label_studio]\nmodel = \"m\"\nmax_batch_tasks = 0",
                "max_batch_tasks must be >= 1",
            ),
            (
                "[label_studio]\nmodel = \"m\"\n[label_studio.labels]\nCat = \"tabby\"",
                "invalid type",
            ),
            ("[label_studio]\nmodel = \"other\"", "not one of [[models]]"),
            (
                "[label_studio]\nmodel = \"m\"\nprefix = \"ls\"",
                "must start with `/`",
            ),
            (
                "[label_studio]\nmodel = \"m\"\nallowed_hosts = [\"http://x\"]",
                "not a host",
            ),
            (
                "[label_studio]\nmodel = \"m\"\nthreshold = 0",
                "threshold must be `otsu` or a number above 0",
            ),
            (
                "[label_studio]\nmodel = \"m\"\nthreshold = \"mean\"",
                "got mean",
            ),
        ] {
            let err = Config::from_toml(&format!("{MINIMAL}\n{bad}\n"), Path::new("."))
                .unwrap_err()
                .to_string();
            assert!(err.contains(message), "{bad}: {err}");
        }
    }

    #[test]
    fn the_shipped_default_config_is_valid() {
        let path = Path::new(DEFAULTS_DIR).join("default.toml");
        let from_file = Config::from_file(&path).unwrap();
        let built_in = Config::load(None, Overrides::default()).unwrap();
        for config in [from_file, built_in] {
            assert_eq!(
                config.models[0].file,
                Path::new(DEFAULTS_DIR).join("../models/efficientnet_lite0.onnx")
            );
        }
    }

    #[test]
    fn overrides_win_and_are_validated() {
        let overrides = Overrides {
            ort_library: Some("/opt/ort.so".into()),
            bind: Some("0.0.0.0:9000".parse().unwrap()),
            admin_token: Some("short".into()),
            label_studio_api_key: None,
        };
        let err = Config::load(None, overrides.clone())
            .unwrap_err()
            .to_string();
        assert!(err.contains("at least 16 characters"), "{err}");
        let config = Config::load(
            None,
            Overrides {
                admin_token: Some("a-token-of-16-chars".into()),
                ..overrides
            },
        )
        .unwrap();
        assert_eq!(config.runtime.library, Path::new("/opt/ort.so"));
        assert_eq!(config.server.bind.to_string(), "0.0.0.0:9000");
        assert_eq!(config.admin.token.as_deref(), Some("a-token-of-16-chars"));

        let model = ModelConfig::new("m", "m.onnx".into());
        assert_eq!(
            (model.sessions, model.queue_capacity, model.max_batch),
            (1, 64, 8)
        );
    }
}
