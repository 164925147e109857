//! `openapi.yaml` describes exactly what the server does: every documented response of every operation is
//! produced by a real request to the live server, and what comes back conforms to the documented schema
//! (`additionalProperties: false` everywhere, so undocumented fields fail too).

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;

use camserve::config::{LabelStudioConfig, Limits};
use camserve::http::Admin;
use serde_json::Value;

use crate::support::{TestServer, fixture, label_studio_config, model_config, png_bytes};

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

struct Example {
    method: reqwest::Method,
    /// The path template in openapi.yaml.
    operation: &'static str,
    url: String,
    content_type: Option<&'static str>,
    body: Vec<u8>,
    /// The admin token to send, if any.
    token: Option<&'static str>,
}

const TOKEN: &str = "openapi-token-0123456789";

#[tokio::test(flavor = "multi_thread")]
async fn every_documented_response_is_what_the_server_sends() {
    let spec = spec();
    let limits = Limits {
        max_body_bytes: 64 * 1024,
        ..Limits::default()
    };
    let models = vec![
        model_config("tiny", &fixture("tiny_cnn.onnx")),
        model_config("extras", &fixture("tiny_cnn_extras.onnx")),
    ];
    // A models folder of its own, so that a model's file can be spoiled under it for a failing reload.
    let models_dir = std::env::temp_dir().join(format!("camserve-openapi-{}", std::process::id()));
    std::fs::create_dir_all(&models_dir).unwrap();
    for file in [
        "tiny_cnn.onnx",
        "red_detector.onnx",
        "broken_no_gradients.onnx",
    ] {
        std::fs::copy(fixture(file), models_dir.join(file)).unwrap();
    }
    std::fs::copy(fixture("tiny_cnn.onnx"), models_dir.join("spoiled.onnx")).unwrap();
    let admin = Admin {
        token: TOKEN.into(),
        models_dir: models_dir.clone(),
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
    // The same, with the admin API off.
    let plain = TestServer::builder()
        .models(models)
        .limits(limits)
        .start()
        .await;
    let png = png_bytes(&image::RgbImage::from_pixel(
        48,
        40,
        image::Rgb([10, 200, 30]),
    ));
    let get = |operation: &'static str, url: &str| Example {
        method: reqwest::Method::GET,
        operation,
        url: url.into(),
        content_type: None,
        body: vec![],
        token: None,
    };
    let post =
        |operation: &'static str, url: &str, content_type: &'static str, body: &[u8]| Example {
            method: reqwest::Method::POST,
            operation,
            url: url.into(),
            content_type: Some(content_type),
            body: body.to_vec(),
            token: None,
        };
    let admin = |method: reqwest::Method,
                 operation: &'static str,
                 url: &str,
                 body: &str,
                 token: Option<&'static str>| {
        Example {
            method,
            operation,
            url: url.into(),
            content_type: Some("application/json"),
            body: body.as_bytes().to_vec(),
            token,
        }
    };
    let (put, delete) = (reqwest::Method::PUT, reqwest::Method::DELETE);
    let (model, reload) = ("/v1/models/{model}", "/v1/models/{model}/reload");
    let (explain, predict) = ("/v1/models/{model}/explain", "/v1/models/{model}/predict");
    let data_uri = format!(
        "data:image/png;base64,{}",
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &png)
    );
    let task = |image: &str| {
        serde_json::json!({"tasks": [{"id": 1, "data": {"image": image}}]}).to_string()
    };
    let ls_predict = "/label-studio/predict";
    let mut examples = vec![
        admin(
            put.clone(),
            model,
            "/v1/models/extra",
            r#"{"file": "tiny_cnn.onnx"}"#,
            Some(TOKEN),
        ),
        admin(
            put.clone(),
            model,
            "/v1/models/extra",
            r#"{"file": "red_detector.onnx"}"#,
            Some(TOKEN),
        ),
        admin(
            put.clone(),
            model,
            "/v1/models/extra",
            r#"{"file": "../x.onnx"}"#,
            Some(TOKEN),
        ),
        admin(
            put.clone(),
            model,
            "/v1/models/extra",
            r#"{"file": "tiny_cnn.onnx"}"#,
            Some("wrong"),
        ),
        admin(
            put.clone(),
            model,
            "/v1/models/extra",
            r#"{"file": "broken_no_gradients.onnx"}"#,
            Some(TOKEN),
        ),
        admin(
            reqwest::Method::POST,
            reload,
            "/v1/models/extra/reload",
            "",
            Some(TOKEN),
        ),
        admin(
            reqwest::Method::POST,
            reload,
            "/v1/models/missing/reload",
            "",
            Some(TOKEN),
        ),
        admin(
            reqwest::Method::POST,
            reload,
            "/v1/models/extra/reload",
            "",
            None,
        ),
        admin(delete.clone(), model, "/v1/models/extra", "", Some(TOKEN)),
        admin(delete.clone(), model, "/v1/models/extra", "", Some(TOKEN)),
        admin(delete.clone(), model, "/v1/models/tiny", "", None),
        admin(
            put.clone(),
            model,
            "/v1/models/spoiled",
            r#"{"file": "spoiled.onnx"}"#,
            Some(TOKEN),
        ),
        get("/ui", "/ui"),
        get("/label-studio/health", "/label-studio/health"),
        post(
            "/label-studio/setup",
            "/label-studio/setup",
            "application/json",
            b"{\"project\": \"1\"}",
        ),
        post(
            "/label-studio/setup",
            "/label-studio/setup",
            "application/json",
            b"[]",
        ),
        post(
            ls_predict,
            ls_predict,
            "application/json",
            task(&data_uri).as_bytes(),
        ),
        post(ls_predict, ls_predict, "application/json", b"{}"),
        post(
            ls_predict,
            ls_predict,
            "application/json",
            br#"{"tasks": [{"data": {}}, {"data": {}}, {"data": {}}]}"#,
        ),
        post(
            "/label-studio/webhook",
            "/label-studio/webhook",
            "application/json",
            br#"{"action": "START_TRAINING", "project": {"id": 1}}"#,
        ),
        post(
            "/label-studio/webhook",
            "/label-studio/webhook",
            "application/json",
            b"null",
        ),
        get("/label-studio/versions", "/label-studio/versions"),
        post(
            ls_predict,
            ls_predict,
            "application/json",
            task("http://192.0.2.1/a.png").as_bytes(),
        ),
        post(
            ls_predict,
            ls_predict,
            "application/json",
            task("http://127.0.0.1:1/a.png").as_bytes(),
        ),
        post(
            explain,
            "/v1/models/tiny/explain?format=labelstudio&top_k=2",
            "image/png",
            &png,
        ),
        post(
            explain,
            "/v1/models/tiny/explain?format=cvat",
            "image/png",
            &png,
        ),
        post(
            explain,
            "/v1/models/tiny/explain?format=coco",
            "image/png",
            &png,
        ),
        post(
            explain,
            "/v1/models/tiny/explain?format=fiftyone&heatmap=gray8",
            "image/png",
            &png,
        ),
        post(
            explain,
            "/v1/models/tiny/explain?format=coco&output=json",
            "image/png",
            &png,
        ),
        get("/healthz", "/healthz"),
        get("/readyz", "/readyz"),
        get("/metrics", "/metrics"),
        get("/v1/models", "/v1/models"),
        get("/v1/models/{model}", "/v1/models/tiny"),
        get("/v1/models/{model}", "/v1/models/missing"),
        post(predict, "/v1/models/tiny/predict", "image/png", &png),
        post(
            predict,
            "/v1/models/tiny/predict?top_k=x",
            "image/png",
            &png,
        ),
        post(predict, "/v1/models/missing/predict", "image/png", &png),
        post(
            predict,
            "/v1/models/tiny/predict",
            "image/png",
            &[0; 70 * 1024],
        ),
        post(predict, "/v1/models/tiny/predict", "text/plain", &png),
        post(
            explain,
            "/v1/models/tiny/explain?top_k=2&max_boxes=2",
            "image/png",
            &png,
        ),
        post(
            explain,
            "/v1/models/tiny/explain?output=overlay",
            "image/png",
            &png,
        ),
        post(
            explain,
            "/v1/models/tiny/explain?output=heatmap&heatmap=gray8",
            "image/png",
            &png,
        ),
        post(
            explain,
            "/v1/models/tiny/explain?output=raw&map_size=image",
            "image/png",
            &png,
        ),
        post(
            explain,
            "/v1/models/tiny/explain?output=npy&class=1&class=2",
            "image/png",
            &png,
        ),
        post(
            explain,
            "/v1/models/tiny/explain?output=raw&method=scorecam&max_channels=4&aug_smooth=true&trust=true&relu=false",
            "image/png",
            &png,
        ),
        post(
            explain,
            "/v1/models/tiny/explain?output=boxes",
            "image/png",
            &png,
        ),
        post(
            explain,
            "/v1/models/extras/explain?output=guided&layers=all",
            "image/png",
            &png,
        ),
        post(
            explain,
            "/v1/models/extras/explain?output=guided_npy&top_k=2",
            "image/png",
            &png,
        ),
        post(
            explain,
            "/v1/models/extras/explain?layers=all&top_k=2",
            "image/png",
            &png,
        ),
        post(
            explain,
            "/v1/models/tiny/explain?output=guided",
            "image/png",
            &png,
        ),
        post(
            explain,
            "/v1/models/tiny/explain",
            "image/png",
            b"not an image",
        ),
        post(explain, "/v1/models/missing/explain", "image/png", &png),
        post(
            explain,
            "/v1/models/tiny/explain",
            "image/png",
            &[0; 70 * 1024],
        ),
        post(explain, "/v1/models/tiny/explain", "image/gif", &png),
        post(
            explain,
            "/v1/models/tiny/explain?class=999",
            "image/png",
            &png,
        ),
    ];
    // For the server with the admin API off.
    let admin_off = [
        admin(delete.clone(), model, "/v1/models/tiny", "", Some(TOKEN)),
        admin(
            put.clone(),
            model,
            "/v1/models/x",
            r#"{"file": "tiny_cnn.onnx"}"#,
            Some(TOKEN),
        ),
        admin(
            reqwest::Method::POST,
            reload,
            "/v1/models/tiny/reload",
            "",
            Some(TOKEN),
        ),
    ];
    let mut seen = BTreeSet::new();
    let mut problems = Vec::new();
    let send = async |server: &TestServer,
                      example: &Example,
                      seen: &mut BTreeSet<(String, String, String)>| {
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
        let what = format!("{} {} -> {status}", example.method, example.url);
        let method = example.method.as_str().to_lowercase();
        seen.insert((example.operation.to_owned(), method.clone(), status.clone()));
        let operation = &spec["paths"][example.operation][&method];
        let documented = resolve(&spec, &operation["responses"][&status]);
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
            let body: Value = serde_json::from_slice(&bytes).unwrap();
            conform(&spec, &media["schema"], &body, &what, &mut problems);
        }
        problems
    };
    for example in &examples {
        problems.extend(send(&server, example, &mut seen).await);
    }
    for example in &admin_off {
        problems.extend(send(&plain, example, &mut seen).await);
    }
    // A model whose file was replaced by a broken export: the reload is refused and the model keeps serving.
    std::fs::copy(
        fixture("broken_no_gradients.onnx"),
        models_dir.join("spoiled.onnx"),
    )
    .unwrap();
    let spoiled = admin(
        reqwest::Method::POST,
        reload,
        "/v1/models/spoiled/reload",
        "",
        Some(TOKEN),
    );
    problems.extend(send(&server, &spoiled, &mut seen).await);
    std::fs::remove_dir_all(&models_dir).unwrap();
    // The Label Studio backend's model removed through the admin API: its predictions answer 404.
    for example in [
        admin(delete.clone(), model, "/v1/models/tiny", "", Some(TOKEN)),
        post(
            ls_predict,
            ls_predict,
            "application/json",
            task(&data_uri).as_bytes(),
        ),
    ] {
        problems.extend(send(&server, &example, &mut seen).await);
    }
    // Readiness turns false at shutdown.
    server.state.ready.store(false, Ordering::SeqCst);
    examples.push(get("/readyz", "/readyz"));
    problems.extend(send(&server, examples.last().unwrap(), &mut seen).await);
    assert!(
        problems.is_empty(),
        "responses that break openapi.yaml:\n{}",
        problems.join("\n")
    );

    // The reverse: every documented response was produced. `overloaded` needs a saturated queue; the load
    // tests produce it, so it is the one exception here.
    let mut missing = Vec::new();
    for (path, item) in spec["paths"].as_object().unwrap() {
        for (method, operation) in item
            .as_object()
            .unwrap()
            .iter()
            .filter(|(m, _)| *m != "parameters")
        {
            for status in operation["responses"].as_object().unwrap().keys() {
                let key = (path.clone(), method.clone(), status.clone());
                let exempt = status == "503" && path != "/readyz";
                if !exempt && !seen.contains(&key) {
                    missing.push(format!("{method} {path} {status}"));
                }
            }
        }
    }
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
