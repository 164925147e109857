//! The admin API: models registered, replaced, reloaded and removed while serving, behind a bearer token,
//! only from the models folder; a replacement that fails leaves the old model serving.

use camserve::http::Admin;
use reqwest::Method;
use serde_json::{Value, json};

use crate::support::{TestServer, fixture, png_bytes};

const TOKEN: &str = "test-token-0123456789";

async fn admin_server() -> TestServer {
    let admin = Admin {
        token: TOKEN.into(),
        models_dir: fixture(""),
    };
    TestServer::builder()
        .model("tiny", &fixture("tiny_cnn.onnx"))
        .admin(admin)
        .start()
        .await
}

async fn put(server: &TestServer, name: &str, token: Option<&str>, body: &str) -> (u16, Value) {
    let mut request = server
        .client
        .put(server.url(&format!("/v1/models/{name}")))
        .body(body.to_owned());
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn explain_labels(server: &TestServer, name: &str, image: Vec<u8>) -> (u16, Vec<String>) {
    let response = server
        .post_image(
            format!("/v1/models/{name}/explain?output=boxes"),
            "image/png",
            image,
        )
        .await;
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap();
    let labels = body["explanations"].as_array().map_or(vec![], |e| {
        e.iter()
            .map(|x| x["label"].as_str().unwrap().to_owned())
            .collect()
    });
    (status, labels)
}

#[tokio::test(flavor = "multi_thread")]
async fn register_replace_reload_and_remove() {
    let server = admin_server().await;
    let image = png_bytes(&image::RgbImage::from_pixel(
        64,
        64,
        image::Rgb([220, 30, 30]),
    ));

    let (status, body) = put(
        &server,
        "extra",
        Some(TOKEN),
        r#"{"file": "tiny_cnn.onnx"}"#,
    )
    .await;
    assert_eq!(
        (status, body["num_classes"].as_u64()),
        (201, Some(10)),
        "{body}"
    );
    let listed: Value = server
        .client
        .get(server.url("/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed["models"].as_array().unwrap().len(), 2);
    assert_eq!(explain_labels(&server, "extra", image.clone()).await.0, 200);

    // A broken replacement is refused with its reason; the old model keeps serving.
    let (status, body) = put(
        &server,
        "extra",
        Some(TOKEN),
        r#"{"file": "broken_no_gradients.onnx"}"#,
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (422, Some("model_refused")),
        "{body}"
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("missing output `gradients`"),
        "{body}"
    );
    let (status, labels) = explain_labels(&server, "extra", image.clone()).await;
    assert_eq!((status, labels[0].starts_with("class_")), (200, true));

    // A good replacement takes over.
    let (status, body) = put(
        &server,
        "extra",
        Some(TOKEN),
        r#"{"file": "red_detector.onnx", "sessions": 2, "threads": 1}"#,
    )
    .await;
    assert_eq!(
        (status, body["num_classes"].as_u64()),
        (200, Some(2)),
        "{body}"
    );
    assert_eq!(
        explain_labels(&server, "extra", image.clone()).await.1,
        ["red"]
    );

    let reload = server
        .client
        .post(server.url("/v1/models/extra/reload"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(reload.status(), 200);

    let delete = || {
        server
            .client
            .delete(server.url("/v1/models/extra"))
            .bearer_auth(TOKEN)
            .send()
    };
    assert_eq!(delete().await.unwrap().status(), 204);
    assert_eq!(explain_labels(&server, "extra", image).await.0, 404);
    let again = delete().await.unwrap();
    assert_eq!(again.status(), 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_in_flight_finishes_on_the_model_it_started_with() {
    let server = admin_server().await;
    put(&server, "swap", Some(TOKEN), r#"{"file": "tiny_cnn.onnx"}"#).await;
    // Decoding a large photo keeps the request busy while the model is replaced under it.
    let big = png_bytes(&image::RgbImage::from_fn(3000, 2000, |x, y| {
        image::Rgb([x as u8, y as u8, 200])
    }));
    let request = server
        .client
        .post(server.url("/v1/models/swap/explain?output=boxes"))
        .header("content-type", "image/png")
        .body(big)
        .send();
    let in_flight = tokio::spawn(request);
    tokio::time::sleep(std::time::Duration::from_millis(30)).await;
    let (status, _) = put(
        &server,
        "swap",
        Some(TOKEN),
        r#"{"file": "red_detector.onnx"}"#,
    )
    .await;
    assert_eq!(status, 200);
    let response = in_flight.await.unwrap().unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert!(
        body["explanations"][0]["label"]
            .as_str()
            .unwrap()
            .starts_with("class_"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_needs_the_token_and_the_models_folder() {
    let server = admin_server().await;
    let body = r#"{"file": "tiny_cnn.onnx"}"#;
    for token in [None, Some("wrong-token-0123456789")] {
        let response = server.client.put(server.url("/v1/models/x")).body(body);
        let response = match token {
            Some(t) => response.bearer_auth(t),
            None => response,
        }
        .send()
        .await
        .unwrap();
        assert_eq!(response.status(), 401);
        assert_eq!(response.headers()["www-authenticate"], "Bearer");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["code"], "unauthorized");
    }
    let cases = [
        (json!({"file": "../../Cargo.toml"}), "invalid_model_file"),
        (json!({"file": "/etc/passwd"}), "invalid_model_file"),
        (json!({"file": "missing.onnx"}), "invalid_model_file"),
        (
            json!({"file": "tiny_cnn.onnx", "overrides": {"labels_file": "../../README.md"}}),
            "invalid_model_file",
        ),
        (
            json!({"file": "tiny_cnn.onnx", "sesions": 2}),
            "invalid_model_config",
        ),
        (
            json!({"file": "tiny_cnn.onnx", "sessions": 0}),
            "invalid_model_config",
        ),
        (json!(["tiny_cnn.onnx"]), "invalid_model_config"),
    ];
    for (body, code) in cases {
        let (status, error) = put(&server, "x", Some(TOKEN), &body.to_string()).await;
        assert_eq!(
            (status, error["error"]["code"].as_str()),
            (400, Some(code)),
            "{body} -> {error}"
        );
    }
    let (status, error) = put(&server, "x", Some(TOKEN), "not json").await;
    assert_eq!(
        (status, error["error"]["code"].as_str()),
        (400, Some("invalid_model_config"))
    );
    // A bad name in the URL.
    let (status, _) = put(&server, "a%20b", Some(TOKEN), body).await;
    assert_eq!(status, 400);
}

/// PUT (register, then replace), reload and DELETE of one name, all at once, round after round: each answers as if it
/// had run alone (never a 500 or a dropped connection, whatever lands between a swap and its answer), and the
/// server serves on.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_admin_requests_on_one_name_never_fail() {
    let server = admin_server().await;
    let send = |method: Method, path: &str, body: &'static str| {
        let request = server
            .client
            .request(method.clone(), server.url(path))
            .bearer_auth(TOKEN)
            .body(body);
        let what = format!("{method} {path}");
        tokio::spawn(async move { (what, request.send().await) })
    };
    let tiny = r#"{"file": "tiny_cnn.onnx"}"#;
    for round in 0..20 {
        let requests = [
            (send(Method::PUT, "/v1/models/race", tiny), [200, 201]),
            (send(Method::DELETE, "/v1/models/race", ""), [204, 404]),
            (send(Method::PUT, "/v1/models/race", tiny), [200, 201]),
            (send(Method::POST, "/v1/models/race/reload", ""), [200, 404]),
            (send(Method::DELETE, "/v1/models/race", ""), [204, 404]),
            (send(Method::GET, "/v1/models/race", ""), [200, 404]),
        ];
        for (request, expected) in requests {
            let (what, answer) = request.await.unwrap();
            let response = answer.unwrap_or_else(|e| panic!("round {round}: {what}: {e}"));
            let status = response.status().as_u16();
            let body = response.text().await.unwrap_or_default();
            assert!(
                expected.contains(&status),
                "round {round}: {what} -> {status} {body}"
            );
        }
    }
    let (status, body) = server.get_json("/healthz").await;
    assert_eq!((status, body["status"].as_str()), (200, Some("ok")));
    // Whatever the last round left, the name can be registered again and serves.
    let (status, body) = put(&server, "race", Some(TOKEN), tiny).await;
    assert!([200, 201].contains(&status), "{status} {body}");
    let image = png_bytes(&image::RgbImage::from_pixel(
        64,
        64,
        image::Rgb([220, 30, 30]),
    ));
    assert_eq!(explain_labels(&server, "race", image).await.0, 200);
}

/// Resident memory of this process (nextest runs each test in a process of its own).
fn resident_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: f64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib / 1024.0
}

/// Before released memory was handed back, every replacement of EfficientNet-Lite0 left about 50 MiB resident.
#[tokio::test(flavor = "multi_thread")]
async fn replacing_a_model_gives_its_memory_back() {
    let models_dir = crate::support::root().join("models");
    let admin = Admin {
        token: TOKEN.into(),
        models_dir: models_dir.clone(),
    };
    let server = TestServer::builder()
        .model("lite", &models_dir.join("efficientnet_lite0.onnx"))
        .admin(admin)
        .start()
        .await;
    let image = std::fs::read(fixture("images/chelsea_224.png")).unwrap();
    let replace_and_explain = async || {
        let (status, body) = put(
            &server,
            "lite",
            Some(TOKEN),
            r#"{"file": "efficientnet_lite0.onnx"}"#,
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(explain_labels(&server, "lite", image.clone()).await.0, 200);
    };
    replace_and_explain().await;
    let after_one = resident_mib();
    for _ in 0..5 {
        replace_and_explain().await;
    }
    // The old model's session thread lets go of it shortly after the replacement has answered.
    let mut after_six = resident_mib();
    for _ in 0..50 {
        if after_six <= after_one + 30.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        after_six = resident_mib();
    }
    assert!(
        after_six <= after_one + 30.0,
        "resident memory grew from {after_one:.0} MiB after one replacement to {after_six:.0} MiB after six"
    );
}

/// A plain ONNX classifier is registered like any model, with its target; one whose head cannot be
/// differentiated is refused with 422 `model_refused` naming the op, and the server keeps serving.
#[tokio::test(flavor = "multi_thread")]
async fn a_plain_classifier_is_registered_with_its_target() {
    let server = admin_server().await;
    let body = json!({
        "file": "plain/resnet_legacy_op11.onnx",
        "plain": {"target": "/layer3/layer3.0/relu_1/Relu_output_0"},
    });
    let (status, answer) = put(&server, "plain", Some(TOKEN), &body.to_string()).await;
    assert_eq!(status, 201, "{answer}");
    let image = std::fs::read(fixture("images/chelsea_64.png")).unwrap();
    let (status, labels) = explain_labels(&server, "plain", image).await;
    // The plain file has no labels: class indices; the reference's top class is 9 (tests/fixtures/plain).
    assert_eq!((status, labels), (200, vec!["9".to_owned()]));

    let body = json!({"file": "plain/refused_lrn.onnx", "plain": {"target": "features"}});
    let (status, error) = put(&server, "lrn", Some(TOKEN), &body.to_string()).await;
    assert_eq!(
        (status, error["error"]["code"].as_str()),
        (422, Some("model_refused"))
    );
    let message = error["error"]["message"].as_str().unwrap();
    assert!(message.contains("LRN (node `norm1/LRN`)"), "{message}");
}
