//! `openapi.yaml` describes exactly what the server does: every documented response of every operation is
//! produced by a real request to the live server, and what comes back conforms to the documented schema
//! (`additionalProperties: false` everywhere, so undocumented fields fail too).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use camserve::config::{LabelStudioConfig, Limits};
use camserve::http::Admin;
use reqwest::Method;
use serde_json::Value;

use crate::support::{
    TestServer, fixture, label_studio_config, model_config, png_bytes, scratch_dir,
};

fn spec() -> Value {
    let text = std::fs::read_to_string(crate::support::root().join("openapi.yaml")).unwrap();
    serde_norway::from_str(&text).unwrap()
}

fn resolve<'a>(spec: &'a Value, node: &'a Value) -> &'a Value {
    match node.get("$ref").and_then(Value::as_str) {
        Some(reference) => {
            let target = reference
                .trim_start_matches("#/")
                .split('/')
                .fold(spec, |n, key| &n[key]);
            resolve(spec, target)
        }
        None => node,
    }
}

/// Checks `value` against the subset of JSON Schema that openapi.yaml uses; returns what does not conform.
fn conform(spec: &Value, schema: &Value, value: &Value, at: &str, problems: &mut Vec<String>) {
    let schema = resolve(spec, schema);
    if let Some(alternatives) = schema["oneOf"].as_array() {
        let matching = alternatives
            .iter()
            .filter(|alternative| {
                let mut found = Vec::new();
                conform(spec, alternative, value, at, &mut found);
                found.is_empty()
            })
            .count();
        if matching != 1 {
            problems.push(format!(
                "{at}: matches {matching} of the oneOf alternatives, not exactly 1"
            ));
        }
        return;
    }
    if value.is_null() && schema["nullable"] == true {
        return;
    }
    if let Some(allowed) = schema["enum"].as_array()
        && !allowed.contains(value)
    {
        problems.push(format!("{at}: {value} is not one of {allowed:?}"));
    }
    let type_ok = match schema["type"].as_str() {
        Some("object") => value.is_object(),
        Some("array") => value.is_array(),
        Some("string") => value.is_string(),
        Some("integer") => value.is_u64() || value.is_i64(),
        Some("number") => value.is_number(),
        Some("boolean") => value.is_boolean(),
        _ => true,
    };
    if !type_ok {
        problems.push(format!("{at}: {value} is not of type {}", schema["type"]));
        return;
    }
    if let Some(object) = value.as_object() {
        let properties = schema["properties"].as_object();
        for required in schema["required"].as_array().into_iter().flatten() {
            if !object.contains_key(required.as_str().unwrap()) {
                problems.push(format!("{at}: required property {required} is missing"));
            }
        }
        for (key, item) in object {
            match properties.and_then(|p| p.get(key)) {
                Some(sub) => conform(spec, sub, item, &format!("{at}.{key}"), problems),
                None if schema["additionalProperties"] == false => {
                    problems.push(format!("{at}: undocumented property `{key}`"))
                }
                None => {}
            }
        }
    }
    if let Some(items) = value.as_array() {
        for (i, item) in items.iter().enumerate() {
            conform(
                spec,
                &schema["items"],
                item,
                &format!("{at}[{i}]"),
                problems,
            );
        }
    }
}

/// One request of the walk through the spec.
struct Example {
    method: Method,
    /// The path template in openapi.yaml.
    operation: &'static str,
    url: String,
    content_type: Option<&'static str>,
    body: Vec<u8>,
    /// The admin token to send, if any.
    token: Option<&'static str>,
}

const TOKEN: &str = "openapi-token-0123456789";
const MODEL: &str = "/v1/models/{model}";
const RELOAD: &str = "/v1/models/{model}/reload";
const EXPLAIN: &str = "/v1/models/{model}/explain";
const PREDICT: &str = "/v1/models/{model}/predict";
const LS_PREDICT: &str = "/label-studio/predict";

impl Example {
    fn get(operation: &'static str, url: &str) -> Self {
        Example {
            method: Method::GET,
            operation,
            url: url.into(),
            content_type: None,
            body: vec![],
            token: None,
        }
    }

    fn post(operation: &'static str, url: &str, content_type: &'static str, body: &[u8]) -> Self {
        Example {
            method: Method::POST,
            operation,
            url: url.into(),
            content_type: Some(content_type),
            body: body.to_vec(),
            token: None,
        }
    }

    /// A POST of a PNG (or of bytes sent as one).
    fn png(operation: &'static str, url: &str, body: &[u8]) -> Self {
        Self::post(operation, url, "image/png", body)
    }

    /// A JSON POST to a Label Studio route that is its own path template.
    fn label_studio(path: &'static str, body: &[u8]) -> Self {
        Self::post(path, path, "application/json", body)
    }

    fn admin(
        method: Method,
        operation: &'static str,
        url: &str,
        body: &str,
        token: Option<&'static str>,
    ) -> Self {
        Example {
            method,
            operation,
            url: url.into(),
            content_type: Some("application/json"),
            body: body.as_bytes().to_vec(),
            token,
        }
    }
}

/// A Label Studio predict request of one task with this image.
fn task(image: &str) -> Vec<u8> {
    serde_json::json!({"tasks": [{"id": 1, "data": {"image": image}}]})
        .to_string()
        .into_bytes()
}

fn data_uri(png: &[u8]) -> String {
    format!(
        "data:image/png;base64,{}",
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, png)
    )
}

/// Register, replace, refuse, reload, remove: the admin API's answers, in this order (each leaves the registry as
/// the next expects).
fn admin_examples() -> Vec<Example> {
    let put = |url: &str, body: &str, token| Example::admin(Method::PUT, MODEL, url, body, token);
    let reload = |url: &str, token| Example::admin(Method::POST, RELOAD, url, "", token);
    let delete = |url: &str, token| Example::admin(Method::DELETE, MODEL, url, "", token);
    vec![
        put(
            "/v1/models/extra",
            r#"{"file": "tiny_cnn.onnx"}"#,
            Some(TOKEN),
        ),
        put(
            "/v1/models/extra",
            r#"{"file": "red_detector.onnx"}"#,
            Some(TOKEN),
        ),
        put("/v1/models/extra", r#"{"file": "../x.onnx"}"#, Some(TOKEN)),
        put(
            "/v1/models/extra",
            r#"{"file": "tiny_cnn.onnx"}"#,
            Some("wrong"),
        ),
        put(
            "/v1/models/extra",
            r#"{"file": "broken_no_gradients.onnx"}"#,
            Some(TOKEN),
        ),
        reload("/v1/models/extra/reload", Some(TOKEN)),
        reload("/v1/models/missing/reload", Some(TOKEN)),
        reload("/v1/models/extra/reload", None),
        delete("/v1/models/extra", Some(TOKEN)),
        delete("/v1/models/extra", Some(TOKEN)),
        delete("/v1/models/tiny", None),
        put(
            "/v1/models/spoiled",
            r#"{"file": "spoiled.onnx"}"#,
            Some(TOKEN),
        ),
    ]
}

/// The viewer, the Label Studio backend (whose fetches fail: see `servers`) and the labeling formats.
fn integration_examples(png: &[u8]) -> Vec<Example> {
    vec![
        Example::get("/ui", "/ui"),
        Example::get("/label-studio/health", "/label-studio/health"),
        Example::label_studio("/label-studio/setup", b"{\"project\": \"1\"}"),
        Example::label_studio("/label-studio/setup", b"[]"),
        Example::label_studio(LS_PREDICT, &task(&data_uri(png))),
        Example::label_studio(LS_PREDICT, b"{}"),
        Example::label_studio(
            LS_PREDICT,
            br#"{"tasks": [{"data": {}}, {"data": {}}, {"data": {}}]}"#,
        ),
        Example::label_studio(
            "/label-studio/webhook",
            br#"{"action": "START_TRAINING", "project": {"id": 1}}"#,
        ),
        Example::label_studio("/label-studio/webhook", b"null"),
        Example::get("/label-studio/versions", "/label-studio/versions"),
        Example::label_studio(LS_PREDICT, &task("http://192.0.2.1/a.png")),
        Example::label_studio(LS_PREDICT, &task("http://127.0.0.1:1/a.png")),
        Example::png(
            EXPLAIN,
            "/v1/models/tiny/explain?format=labelstudio&top_k=2",
            png,
        ),
        Example::png(EXPLAIN, "/v1/models/tiny/explain?format=cvat", png),
        Example::png(EXPLAIN, "/v1/models/tiny/explain?format=coco", png),
        Example::png(
            EXPLAIN,
            "/v1/models/tiny/explain?format=fiftyone&heatmap=gray8",
            png,
        ),
        Example::png(
            EXPLAIN,
            "/v1/models/tiny/explain?format=coco&output=json",
            png,
        ),
    ]
}

/// Health, the model listing, predictions and explanations in every output, and their errors.
fn api_examples(png: &[u8]) -> Vec<Example> {
    let too_large = [0; 70 * 1024];
    let explain =
        |query: &str| Example::png(EXPLAIN, &format!("/v1/models/tiny/explain{query}"), png);
    vec![
        Example::get("/healthz", "/healthz"),
        Example::get("/readyz", "/readyz"),
        Example::get("/metrics", "/metrics"),
        Example::get("/v1/models", "/v1/models"),
        Example::get(MODEL, "/v1/models/tiny"),
        Example::get(MODEL, "/v1/models/missing"),
        Example::png(PREDICT, "/v1/models/tiny/predict", png),
        Example::png(PREDICT, "/v1/models/tiny/predict?top_k=x", png),
        Example::png(PREDICT, "/v1/models/missing/predict", png),
        Example::png(PREDICT, "/v1/models/tiny/predict", &too_large),
        Example::post(PREDICT, "/v1/models/tiny/predict", "text/plain", png),
        explain("?top_k=2&max_boxes=2"),
        explain("?output=overlay"),
        explain("?output=heatmap&heatmap=gray8"),
        explain("?output=raw&map_size=image"),
        explain("?output=npy&class=1&class=2"),
        explain("?output=raw&method=scorecam&max_channels=4&aug_smooth=true&trust=true&relu=false"),
        explain("?output=boxes"),
        Example::png(
            EXPLAIN,
            "/v1/models/extras/explain?output=guided&layers=all",
            png,
        ),
        Example::png(
            EXPLAIN,
            "/v1/models/extras/explain?output=guided_npy&top_k=2",
            png,
        ),
        Example::png(EXPLAIN, "/v1/models/extras/explain?layers=all&top_k=2", png),
        explain("?output=guided"),
        Example::png(EXPLAIN, "/v1/models/tiny/explain", b"not an image"),
        Example::png(EXPLAIN, "/v1/models/missing/explain", png),
        Example::png(EXPLAIN, "/v1/models/tiny/explain", &too_large),
        Example::post(EXPLAIN, "/v1/models/tiny/explain", "image/gif", png),
        explain("?class=999"),
    ]
}

/// For the server with the admin API off.
fn admin_off_examples() -> Vec<Example> {
    vec![
        Example::admin(Method::DELETE, MODEL, "/v1/models/tiny", "", Some(TOKEN)),
        Example::admin(
            Method::PUT,
            MODEL,
            "/v1/models/x",
            r#"{"file": "tiny_cnn.onnx"}"#,
            Some(TOKEN),
        ),
        Example::admin(
            Method::POST,
            RELOAD,
            "/v1/models/tiny/reload",
            "",
            Some(TOKEN),
        ),
    ]
}

/// A models folder of its own, so that a model's file can be spoiled under it for a failing reload.
fn spoilable_models_dir() -> PathBuf {
    let models_dir = scratch_dir("openapi");
    for file in [
        "tiny_cnn.onnx",
        "red_detector.onnx",
        "broken_no_gradients.onnx",
    ] {
        std::fs::copy(fixture(file), models_dir.join(file)).unwrap();
    }
    std::fs::copy(fixture("tiny_cnn.onnx"), models_dir.join("spoiled.onnx")).unwrap();
    models_dir
}

/// The server with everything on (the admin API over `models_dir`, the Label Studio backend), and the same
/// without the admin API.
async fn servers(models_dir: &Path) -> (TestServer, TestServer) {
    let limits = Limits {
        max_body_bytes: 64 * 1024,
        ..Limits::default()
    };
    let models = vec![
        model_config("tiny", &fixture("tiny_cnn.onnx")),
        model_config("extras", &fixture("tiny_cnn_extras.onnx")),
    ];
    let admin = Admin {
        token: TOKEN.into(),
        models_dir: models_dir.to_owned(),
    };
    let server = TestServer::builder()
        .models(models.clone())
        .limits(limits.clone())
        .admin(admin)
        // Port 1 on loopback is allowed but refuses connections: the fetch fails (an empty prediction).
        .label_studio(LabelStudioConfig {
            max_batch_tasks: 2,
            ..label_studio_config("tiny", &["127.0.0.1:1"])
        })
        .start()
        .await;
    let admin_off = TestServer::builder()
        .models(models)
        .limits(limits)
        .start()
        .await;
    (server, admin_off)
}

/// The examples' answers held against the spec: what broke it, and which (path, method, status) came back.
struct Walk {
    spec: Value,
    seen: BTreeSet<(String, String, String)>,
    problems: Vec<String>,
}

impl Walk {
    fn new() -> Self {
        Walk {
            spec: spec(),
            seen: BTreeSet::new(),
            problems: Vec::new(),
        }
    }

    async fn send(&mut self, server: &TestServer, example: &Example) {
        let mut request = server
            .client
            .request(example.method.clone(), server.url(&example.url))
            .body(example.body.clone());
        if let Some(content_type) = example.content_type {
            request = request.header("content-type", content_type);
        }
        if let Some(token) = example.token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_str().to_owned();
        // The media type without parameters such as `charset`.
        let content_type = response.headers().get("content-type").map(|v| {
            v.to_str()
                .unwrap()
                .split(';')
                .next()
                .unwrap()
                .trim()
                .to_owned()
        });
        let bytes = response.bytes().await.unwrap();
        let method = example.method.as_str().to_lowercase();
        self.seen
            .insert((example.operation.to_owned(), method.clone(), status.clone()));
        let what = format!("{} {} -> {status}", example.method, example.url);
        let documented = &self.spec["paths"][example.operation][&method]["responses"][&status];
        let problems = self.problems_with(&what, documented, content_type, &bytes);
        self.problems.extend(problems);
    }

    /// How an answer differs from its documented response.
    fn problems_with(
        &self,
        what: &str,
        documented: &Value,
        content_type: Option<String>,
        bytes: &[u8],
    ) -> Vec<String> {
        let documented = resolve(&self.spec, documented);
        if documented.is_null() {
            return vec![format!("{what}: status not documented")];
        }
        let Some(content_type) = content_type else {
            return match documented.get("content") {
                None if bytes.is_empty() => vec![],
                _ => vec![format!(
                    "{what}: no content type, but content documented or sent"
                )],
            };
        };
        let media = &documented["content"][&content_type];
        if media.is_null() {
            return vec![format!(
                "{what}: content type {content_type} not documented"
            )];
        }
        let mut problems = Vec::new();
        if content_type == "application/json" {
            let body: Value = serde_json::from_slice(bytes).unwrap();
            conform(&self.spec, &media["schema"], &body, what, &mut problems);
        }
        problems
    }

    /// The reverse: the documented responses that no example produced. `overloaded` needs a saturated queue; the
    /// load tests produce it, so it is the one exception here.
    fn never_produced(&self) -> Vec<String> {
        let mut missing = Vec::new();
        for (path, item) in self.spec["paths"].as_object().unwrap() {
            for (method, operation) in item
                .as_object()
                .unwrap()
                .iter()
                .filter(|(m, _)| *m != "parameters")
            {
                for status in operation["responses"].as_object().unwrap().keys() {
                    let key = (path.clone(), method.clone(), status.clone());
                    let exempt = status == "503" && path != "/readyz";
                    if !exempt && !self.seen.contains(&key) {
                        missing.push(format!("{method} {path} {status}"));
                    }
                }
            }
        }
        missing
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_documented_response_is_what_the_server_sends() {
    let models_dir = spoilable_models_dir();
    let (server, admin_off) = servers(&models_dir).await;
    let png = png_bytes(&image::RgbImage::from_pixel(
        48,
        40,
        image::Rgb([10, 200, 30]),
    ));
    let mut walk = Walk::new();
    let examples = admin_examples()
        .into_iter()
        .chain(integration_examples(&png))
        .chain(api_examples(&png));
    for example in examples {
        walk.send(&server, &example).await;
    }
    for example in admin_off_examples() {
        walk.send(&admin_off, &example).await;
    }
    // A model whose file was replaced by a broken export: the reload is refused and the model keeps serving.
    std::fs::copy(
        fixture("broken_no_gradients.onnx"),
        models_dir.join("spoiled.onnx"),
    )
    .unwrap();
    let spoiled = Example::admin(
        Method::POST,
        RELOAD,
        "/v1/models/spoiled/reload",
        "",
        Some(TOKEN),
    );
    walk.send(&server, &spoiled).await;
    std::fs::remove_dir_all(&models_dir).unwrap();
    // The Label Studio backend's model removed through the admin API: its predictions answer 404.
    for example in [
        Example::admin(Method::DELETE, MODEL, "/v1/models/tiny", "", Some(TOKEN)),
        Example::label_studio(LS_PREDICT, &task(&data_uri(&png))),
    ] {
        walk.send(&server, &example).await;
    }
    // Readiness turns false at shutdown.
    server.state.ready.store(false, Ordering::SeqCst);
    walk.send(&server, &Example::get("/readyz", "/readyz"))
        .await;
    assert!(
        walk.problems.is_empty(),
        "responses that break openapi.yaml:\n{}",
        walk.problems.join("\n")
    );
    let missing = walk.never_produced();
    assert!(
        missing.is_empty(),
        "documented but never produced: {missing:?}"
    );
}

/// The error codes the spec lists are exactly the codes the server can send.
#[test]
fn documented_error_codes_are_the_servers() {
    let spec = spec();
    let documented: BTreeSet<String> =
        spec["components"]["schemas"]["Error"]["properties"]["error"]["properties"]["code"]["enum"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap().to_owned())
            .collect();
    let served: BTreeSet<String> = camserve::http::ErrorCode::ALL
        .iter()
        .map(|c| {
            serde_json::to_value(c)
                .unwrap()
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(documented, served);
}
