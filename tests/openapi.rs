//! `openapi.yaml` describes exactly what the server does: every documented response of every operation is
//! produced by a real request to the live server, and what comes back conforms to the documented schema
//! (`additionalProperties: false` everywhere, so undocumented fields fail too).

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;

use camserve::config::{CorsConfig, Limits};
use common::{TestServer, fixture, label_studio_config, model_config, png_bytes};
use serde_json::Value;

fn spec() -> Value {
    let text = std::fs::read_to_string(common::root().join("openapi.yaml")).unwrap();
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
}

#[tokio::test(flavor = "multi_thread")]
async fn every_documented_response_is_what_the_server_sends() {
    let spec = spec();
    let limits = Limits {
        max_body_bytes: 64 * 1024,
        ..Limits::default()
    };
    // Port 1 on loopback is allowed but refuses connections: the fetch fails (502).
    let server = TestServer::with_integrations(
        vec![model_config("tiny", &fixture("tiny_cnn.onnx"))],
        limits,
        std::time::Duration::from_secs(30),
        CorsConfig::default(),
        Some(label_studio_config("tiny", &["127.0.0.1:1"])),
    )
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
    };
    let post =
        |operation: &'static str, url: &str, content_type: &'static str, body: &[u8]| Example {
            method: reqwest::Method::POST,
            operation,
            url: url.into(),
            content_type: Some(content_type),
            body: body.to_vec(),
        };
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
            "/v1/models/tiny/explain?output=boxes",
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
    let mut seen = BTreeSet::new();
    let mut problems = Vec::new();
    let send = async |example: &Example, seen: &mut BTreeSet<(String, String, String)>| {
        let mut request = server
            .client
            .request(example.method.clone(), server.url(&example.url))
            .body(example.body.clone());
        if let Some(content_type) = example.content_type {
            request = request.header("content-type", content_type);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_str().to_owned();
        // The media type without parameters such as `charset`.
        let content_type = response.headers()["content-type"]
            .to_str()
            .unwrap()
            .split(';')
            .next()
            .unwrap()
            .to_owned();
        let bytes = response.bytes().await.unwrap();
        let what = format!("{} {} -> {status}", example.method, example.url);
        let method = example.method.as_str().to_lowercase();
        seen.insert((example.operation.to_owned(), method.clone(), status.clone()));
        let operation = &spec["paths"][example.operation][&method];
        let documented = resolve(&spec, &operation["responses"][&status]);
        if documented.is_null() {
            return vec![format!("{what}: status not documented")];
        }
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
        problems.extend(send(example, &mut seen).await);
    }
    // Readiness turns false at shutdown.
    server.state.ready.store(false, Ordering::SeqCst);
    examples.push(get("/readyz", "/readyz"));
    problems.extend(send(examples.last().unwrap(), &mut seen).await);
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
