//! What labeling dashboards use: the `format` answers, the Label Studio ML backend, CORS and the viewer page.
//! Real server on a real socket; expected numbers derived by hand from the red detector fixture.
//!
//! `red_blue_128.png` has a pure red square at rows 32-63, cols 16-47; `red_detector.onnx`'s Grad-CAM for `red`
//! is 10/256 on the 16x16 grid's red cells and 0 elsewhere. Upsampled bilinearly (half-pixel centres) to 128 px,
//! a column's weight on the square is 1 inside cols 20-43 and falls off by 1/8 per pixel outside them:
//! cols 16..=19 weigh 0.5625, 0.6875, 0.8125, 0.9375 (and mirrored on the right); col 15 weighs 0.4375 and
//! col 13 0.1875. So at threshold 0.5 the box is the square exactly, and at 0.15 it grows 3 px on every side.

use std::time::Duration;

use axum::Router;
use axum::routing::get;
use camserve::config::CorsConfig;
use serde_json::{Value, json};

use crate::support::{
    TestServer, TestServerBuilder, fixture, label_studio_config, status_and_json,
};

const SQUARE: [u64; 4] = [16, 32, 48, 64]; // x_min, y_min, x_max, y_max (exclusive)

fn red_blue() -> Vec<u8> {
    std::fs::read(fixture("images/red_blue_128.png")).unwrap()
}

/// A server of the red detector alone, as `red`.
fn red() -> TestServerBuilder {
    TestServer::builder().model("red", &fixture("red_detector.onnx"))
}

async fn explain(server: &TestServer, query: &str) -> (u16, Value) {
    status_and_json(
        server
            .post_image(
                format!("/v1/models/red/explain?{query}"),
                "image/png",
                red_blue(),
            )
            .await,
    )
    .await
}

/// The 1-D weight of a column (or row) on the square, from the comment at the top.
fn edge_weights() -> Vec<f64> {
    let mut weights = vec![0.5625, 0.6875, 0.8125, 0.9375];
    weights.extend([1.0; 24]);
    weights.extend([0.9375, 0.8125, 0.6875, 0.5625]);
    weights
}

#[tokio::test(flavor = "multi_thread")]
async fn formats_carry_the_known_square() {
    let server = red().start().await;
    let (status, plain) = explain(&server, "class=red&output=boxes&threshold=0.5").await;
    assert_eq!(status, 200, "{plain}");
    let probability = plain["explanations"][0]["probability"].as_f64().unwrap();
    assert!(probability > 0.0 && probability < 1.0);
    let b = &plain["explanations"][0]["boxes"][0];
    assert_eq!(
        ["x_min", "y_min", "x_max", "y_max"].map(|k| b[k].as_u64().unwrap()),
        SQUARE
    );

    // Label Studio: percent of the 128 px image; the brush RLE covers 128 x 128 RGBA values.
    let (status, ls) = explain(&server, "class=red&format=labelstudio&threshold=0.5").await;
    assert_eq!(status, 200, "{ls}");
    assert_eq!(ls["model_version"], "red");
    let result = ls["result"].as_array().unwrap();
    assert_eq!(result.len(), 2, "{ls}");
    let rect = &result[0];
    assert_eq!(
        (&rect["type"], &rect["from_name"], &rect["to_name"]),
        (&json!("rectanglelabels"), &json!("label"), &json!("image"))
    );
    assert_eq!(
        (&rect["original_width"], &rect["original_height"]),
        (&json!(128), &json!(128))
    );
    assert_eq!(
        rect["value"],
        json!({"x": 12.5, "y": 25.0, "width": 25.0, "height": 25.0, "rotation": 0, "rectanglelabels": ["red"]})
    );
    assert!((rect["score"].as_f64().unwrap() - probability).abs() < 1e-6);
    let brush = &result[1];
    assert_eq!(
        (
            &brush["type"],
            &brush["from_name"],
            &brush["value"]["format"]
        ),
        (&json!("brushlabels"), &json!("mask"), &json!("rle"))
    );
    let rle: Vec<u8> = serde_json::from_value(brush["value"]["rle"].clone()).unwrap();
    assert_eq!(
        u32::from_be_bytes(rle[..4].try_into().unwrap()),
        128 * 128 * 4
    );

    // CVAT: pixels, x2 and y2 exclusive.
    let (status, cvat) = explain(&server, "class=red&format=cvat&threshold=0.5").await;
    assert_eq!(status, 200);
    assert_eq!(cvat.as_array().unwrap().len(), 1);
    let shape = &cvat[0];
    assert_eq!(
        (&shape["label"], &shape["points"], &shape["type"]),
        (&json!("red"), &json!(SQUARE), &json!("rectangle"))
    );
    assert!((shape["confidence"].as_f64().unwrap() - probability).abs() < 1e-6);

    // COCO: [x, y, w, h]; the area is the pixels where the two edge weights multiply to at least 0.5.
    let (status, coco) = explain(&server, "class=red&format=coco&threshold=0.5").await;
    assert_eq!(status, 200);
    let weights = edge_weights();
    let area = weights
        .iter()
        .flat_map(|wy| weights.iter().map(move |wx| wx * wy))
        .filter(|&w| w >= 0.5)
        .count();
    let annotation = &coco["annotations"][0];
    assert_eq!(annotation["bbox"], json!([16, 32, 32, 32]));
    assert_eq!(annotation["area"], json!(area));
    assert_eq!(
        (&annotation["category_id"], &annotation["image_id"]),
        (&json!(1), &json!(1))
    );
    assert_eq!(annotation["segmentation"]["size"], json!([128, 128]));
    assert_eq!(
        coco["categories"],
        json!([{"id": 1, "name": "red"}, {"id": 2, "name": "blue"}])
    );
    assert_eq!(
        coco["images"],
        json!([{"id": 1, "width": 128, "height": 128}])
    );

    // FiftyOne: relative box; the 16-bit heatmap is 65535 inside the square and 0 on the blue square.
    let (status, fo) = explain(&server, "class=red&format=fiftyone&threshold=0.5").await;
    assert_eq!(status, 200);
    assert_eq!(
        fo["detections"]["detections"][0]["bounding_box"],
        json!([0.125, 0.25, 0.25, 0.25])
    );
    let heat = &fo["heatmaps"][0];
    assert_eq!(heat["range"], json!([0, 65535]));
    let map_max = heat["map_range"][1].as_f64().unwrap();
    assert!((map_max - 10.0 / 256.0).abs() < 1e-6, "{map_max}");
    let png = base64::Engine::decode(
        &base64::engine::general_purpose::STANDARD,
        heat["png"].as_str().unwrap(),
    )
    .unwrap();
    let gray = image::load_from_memory(&png).unwrap().into_luma16();
    assert_eq!(gray.dimensions(), (128, 128));
    assert_eq!(gray.get_pixel(32, 48).0[0], 65535);
    assert_eq!(gray.get_pixel(96, 96).0[0], 0);
    let (_, fo8) = explain(&server, "class=red&format=fiftyone&heatmap=gray8").await;
    assert_eq!(fo8["heatmaps"][0]["range"], json!([0, 255]));

    // At the paper's 15% the box grows to where the weight is still 0.1875: 3 px on each side.
    let (_, cvat) = explain(&server, "class=red&format=cvat&threshold=0.15").await;
    assert_eq!(cvat[0]["points"], json!([13, 29, 51, 67]));
    // The default threshold is Otsu's: its level falls between the grey and the plateau, here between col 14's
    // weight (0.3125) and col 15's (0.4375), so the box grows 1 px on every side.
    let (_, cvat) = explain(&server, "class=red&format=cvat").await;
    let (_, otsu) = explain(&server, "class=red&format=cvat&threshold=otsu").await;
    assert_eq!(cvat[0]["points"], otsu[0]["points"]);
    assert_eq!(cvat[0]["points"], json!([15, 31, 49, 65]));
}

#[tokio::test(flavor = "multi_thread")]
async fn format_mistakes_are_named() {
    let server = red().start().await;
    for (query, code, needle) in [
        (
            "format=yolo",
            "invalid_parameter",
            "`format` must be one of labelstudio, cvat, coco, fiftyone",
        ),
        (
            "format=coco&output=boxes",
            "invalid_parameter",
            "either `output` or `format`",
        ),
        (
            "format=coco&format=cvat",
            "invalid_parameter",
            "more than once",
        ),
    ] {
        let (status, body) = explain(&server, query).await;
        assert_eq!(status, 400, "{query}: {body}");
        assert_eq!(body["error"]["code"], code, "{query}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(needle), "{query}: {message}");
    }
}

const LS_TOKEN: &str = "ls-token-0123";
/// A personal access token: a JWT refresh token (`{"alg":"HS256"}.{"token_type":"refresh"}.signature`), which
/// Label Studio exchanges for an access token.
const LS_PAT: &str = "eyJhbGciOiJIUzI1NiJ9.eyJ0b2tlbl90eXBlIjoicmVmcmVzaCJ9.c2ln";
const LS_ACCESS: &str = "ls-access-4567";

/// A loopback server standing in for where Label Studio keeps task images: its uploads need its token, which no
/// other host may receive.
async fn image_host() -> (String, tokio::task::JoinHandle<()>) {
    let png = red_blue();
    let upload = png.clone();
    let app = Router::new()
        .route(
            "/red_blue.png",
            get(move |headers: axum::http::HeaderMap| async move {
                assert!(
                    headers.get("authorization").is_none(),
                    "a token sent to another host"
                );
                png.clone()
            }),
        )
        .route(
            "/data/upload/1/red_blue.png",
            get(move |headers: axum::http::HeaderMap| async move {
                let accepted = [format!("Token {LS_TOKEN}"), format!("Bearer {LS_ACCESS}")];
                let given = headers.get("authorization").and_then(|v| v.to_str().ok());
                if given.is_some_and(|v| accepted.iter().any(|a| a == v)) {
                    Ok(upload.clone())
                } else {
                    Err(axum::http::StatusCode::UNAUTHORIZED)
                }
            }),
        )
        .route(
            "/api/token/refresh/",
            axum::routing::post(|body: axum::Json<Value>| async move {
                if body["refresh"] == LS_PAT {
                    Ok(axum::Json(json!({ "access": LS_ACCESS })))
                } else {
                    Err(axum::http::StatusCode::UNAUTHORIZED)
                }
            }),
        )
        .route(
            "/moved.png",
            get(|| async {
                (
                    axum::http::StatusCode::FOUND,
                    [("location", "/red_blue.png")],
                )
            }),
        )
        .route(
            "/missing.png",
            get(|| async { axum::http::StatusCode::NOT_FOUND }),
        )
        .route(
            "/slow.png",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(30)).await;
                "late"
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let handle = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (address, handle)
}

async fn ls_post(server: &TestServer, route: &str, body: Value) -> (u16, Value) {
    status_and_json(
        server
            .client
            .post(server.url(&format!("/label-studio/{route}")))
            .json(&body)
            .send()
            .await
            .unwrap(),
    )
    .await
}

async fn ls_predict(server: &TestServer, body: Value) -> (u16, Value) {
    ls_post(server, "predict", body).await
}

fn tasks(urls: &[&str]) -> Value {
    let tasks: Vec<Value> = (urls.iter().enumerate())
        .map(|(i, url)| json!({"id": i, "data": {"image": url}}))
        .collect();
    json!({"tasks": tasks, "project": "1.1", "params": {}})
}

/// `camserve_label_studio_task_errors_total{code}` as the server exposes it.
async fn task_errors(server: &TestServer, code: &str) -> u64 {
    let text = server
        .client
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let line = format!("camserve_label_studio_task_errors_total{{code=\"{code}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&line))
        .map_or(0, |n| n.parse().unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn label_studio_backend_fetches_only_from_allowed_hosts() {
    let (host, _image_server) = image_host().await;
    let mut config = label_studio_config("red", &[&host]);
    config.threshold = camserve::pipeline::boxes::Threshold::Fraction(0.5);
    config.top_k = 2;
    config.fetch_max_bytes = 100_000;
    config.fetch_timeout_secs = 1;
    let server = red().label_studio(config).start().await;

    let (status, health) = server.get_json("/label-studio/health").await;
    assert_eq!((status, &health["status"]), (200, &json!("UP")));
    let (status, setup) = ls_post(
        &server,
        "setup",
        json!({"project": "1.1", "schema": "<View/>", "hostname": "", "access_token": ""}),
    )
    .await;
    assert_eq!(
        (status, &setup["model_version"]),
        (200, &json!("camserve-red"))
    );

    // Allowed host, the project's own tag names and data key.
    let label_config = r#"<View><Image name="photo" value="$img"/>
        <RectangleLabels name="where" toName="photo"><Label value="red"/><Label value="blue"/></RectangleLabels></View>"#;
    let body = json!({
        "tasks": [{"id": 1, "data": {"img": format!("http://{host}/red_blue.png")}}],
        "label_config": label_config,
    });
    let (status, answer) = ls_predict(&server, body).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["model_version"], "camserve-red");
    // top_k = 2: blue (the larger square, so the larger logit) first, then red; rows 80-111, cols 72-119.
    let prediction = &answer["results"][0];
    let result = prediction["result"].as_array().unwrap();
    assert_eq!(
        result.len(),
        2,
        "no brush tag, no brush result: {prediction}"
    );
    for (region, label, xywh) in [
        (&result[0], "blue", [56.25, 62.5, 37.5, 25.0]),
        (&result[1], "red", [12.5, 25.0, 25.0, 25.0]),
    ] {
        assert_eq!(
            (&region["from_name"], &region["to_name"]),
            (&json!("where"), &json!("photo"))
        );
        assert_eq!(region["value"]["rectanglelabels"], json!([label]));
        assert_eq!(
            ["x", "y", "width", "height"].map(|k| region["value"][k].as_f64().unwrap()),
            xywh
        );
    }
    assert!(prediction["score"].as_f64().unwrap() > 0.5);

    // One request, one answer per task: those that work are predicted, each of the others gets an empty
    // prediction with its reason, counted by code. Refused before any connection: another host, another port,
    // a Label Studio path while Label Studio's address is unknown. Allowed, but no redirect is followed, errors
    // are named, and time and size are bounded: https to a plain http server, 302, 404, a host that stalls.
    let data_uri = format!(
        "data:image/png;base64,{}",
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, red_blue())
    );
    let port = host.rsplit(':').next().unwrap();
    let cases = [
        (format!("http://{host}/red_blue.png"), None),
        (data_uri, None),
        (
            format!("http://localhost:{port}/red_blue.png"),
            Some((
                "image_url_not_allowed",
                format!("host `localhost:{port}` is neither"),
            )),
        ),
        (
            "http://127.0.0.1:9/red_blue.png".into(),
            Some((
                "image_url_not_allowed",
                "host `127.0.0.1:9` is neither".into(),
            )),
        ),
        (
            "/data/upload/1/red_blue.png".into(),
            Some((
                "image_url_not_allowed",
                "Label Studio's address is unknown".into(),
            )),
        ),
        (
            format!("https://{host}/red_blue.png"),
            Some((
                "image_fetch_failed",
                "fetching the task image failed".into(),
            )),
        ),
        (
            format!("http://{host}/moved.png"),
            Some(("image_fetch_failed", "answered 302".into())),
        ),
        (
            format!("http://{host}/missing.png"),
            Some(("image_fetch_failed", "answered 404".into())),
        ),
        (
            format!("http://{host}/slow.png"),
            Some(("image_fetch_failed", "timed out after 1s".into())),
        ),
    ];
    let urls: Vec<&str> = cases.iter().map(|(url, _)| url.as_str()).collect();
    let (status, answer) = ls_predict(&server, tasks(&urls)).await;
    assert_eq!(status, 200, "{answer}");
    let results = answer["results"].as_array().unwrap();
    assert_eq!(results.len(), cases.len());
    for ((url, failure), prediction) in cases.iter().zip(results) {
        let regions = prediction["result"].as_array().unwrap().len();
        match failure {
            None => assert_eq!(regions, 4, "{url}: {prediction}"),
            Some((code, needle)) => {
                assert_eq!(regions, 0, "{url}: {prediction}");
                assert_eq!(prediction["error"]["code"], *code, "{url}");
                let message = prediction["error"]["message"].as_str().unwrap();
                assert!(message.contains(needle.as_str()), "{url}: {message}");
            }
        }
    }
    assert_eq!(task_errors(&server, "image_url_not_allowed").await, 3);
    assert_eq!(task_errors(&server, "image_fetch_failed").await, 4);

    let mut small = label_studio_config("red", &[&host]);
    small.fetch_max_bytes = 100;
    let tight = red().label_studio(small).start().await;
    let (status, body) = ls_predict(&tight, tasks(&[&format!("http://{host}/red_blue.png")])).await;
    assert_eq!(status, 200);
    let message = body["results"][0]["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("larger than label_studio.fetch_max_bytes (100 bytes)"),
        "{message}"
    );

    // A task without the image field is that task's failure too.
    let (status, body) = ls_predict(&server, json!({"tasks": [{"id": 1, "data": {}}]})).await;
    assert_eq!(status, 200);
    assert_eq!(body["results"][0]["error"]["code"], "malformed_body");
    assert!(
        body["results"][0]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("data.image")
    );
    // A task that is not `{"data": {...}}` makes the request malformed.
    for body in [
        json!({"tasks": [{"id": 1}]}),
        json!({"tasks": [{"data": [null]}]}),
    ] {
        let (status, body) = ls_predict(&server, body).await;
        assert_eq!(
            (status, &body["error"]["code"]),
            (400, &json!("malformed_body")),
            "{body}"
        );
    }
    // A labeling config that is not a string is refused, even with no tasks to predict.
    for label_config in [json!(5), json!(null)] {
        let body = json!({"tasks": [], "label_config": label_config});
        let (status, body) = ls_predict(&server, body).await;
        assert_eq!(
            (status, &body["error"]["code"]),
            (400, &json!("malformed_body")),
            "{body}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn label_studio_uploads_are_fetched_from_label_studio_with_its_token() {
    let (host, _label_studio) = image_host().await;
    let (other, _image_server) = image_host().await;
    let mut config = label_studio_config("red", &[&other]);
    config.url = Some(format!("http://{host}"));
    let server = red().label_studio(config).start().await;
    let upload = tasks(&["/data/upload/1/red_blue.png"]);

    // No token yet: Label Studio refuses, and so that task is empty.
    let (status, body) = ls_predict(&server, upload.clone()).await;
    assert_eq!(status, 200);
    assert!(
        body["results"][0]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("answered 401"),
        "{body}"
    );

    // `/setup` brings the token; the hostname it names is kept only when allowed, here Label Studio's own url.
    let setup =
        json!({"project": "1.1", "hostname": format!("http://{host}"), "access_token": LS_TOKEN});
    assert_eq!(ls_post(&server, "setup", setup).await.0, 200);
    let (status, body) = ls_predict(&server, upload.clone()).await;
    assert_eq!(status, 200);
    assert_eq!(
        body["results"][0]["result"].as_array().unwrap().len(),
        2,
        "{body}"
    );
    // Its own host by absolute URL: allowed implicitly, and the token goes there only (an image host fails the
    // request if `/red_blue.png` gets one).
    let both = tasks(&[
        &format!("http://{host}/data/upload/1/red_blue.png"),
        &format!("http://{other}/red_blue.png"),
    ]);
    let (_, body) = ls_predict(&server, both).await;
    for prediction in body["results"].as_array().unwrap() {
        assert_eq!(prediction["result"].as_array().unwrap().len(), 2, "{body}");
    }

    // Label Studio with legacy tokens off (its default) refuses the token it sent to `/setup`; a personal access
    // token as `api_key` is exchanged for an access token and used instead.
    let mut config = label_studio_config("red", &[]);
    config.url = Some(format!("http://{host}"));
    config.api_key = Some(LS_PAT.into());
    let with_pat = red().label_studio(config).start().await;
    let setup = json!({"hostname": format!("http://{host}"), "access_token": "legacy-but-off"});
    assert_eq!(ls_post(&with_pat, "setup", setup).await.0, 200);
    let (_, body) = ls_predict(&with_pat, upload.clone()).await;
    assert_eq!(
        body["results"][0]["result"].as_array().unwrap().len(),
        2,
        "{body}"
    );

    // A `/setup` naming some other host does not move where Label Studio paths are fetched from.
    let elsewhere = json!({"hostname": "http://192.0.2.1:8080", "access_token": LS_TOKEN});
    assert_eq!(ls_post(&server, "setup", elsewhere).await.0, 200);
    let (_, body) = ls_predict(&server, upload).await;
    assert_eq!(
        body["results"][0]["result"].as_array().unwrap().len(),
        2,
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn label_studio_batches_have_their_own_budget_and_bound() {
    let (host, _image_server) = image_host().await;
    let slow = format!("http://{host}/slow.png");
    let mut config = label_studio_config("red", &[&host]);
    config.fetch_timeout_secs = 2;
    config.task_timeout_secs = 4;
    config.max_batch_tasks = 3;
    // The server's request timeout is 1 s; a predict whose task takes 2 s (within its 4) still gets its answer.
    let server = red()
        .request_timeout(Duration::from_secs(1))
        .label_studio(config.clone())
        .start()
        .await;
    let (status, body) = ls_predict(&server, tasks(&[&slow])).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["results"][0]["error"]["code"], "image_fetch_failed");

    // Over the bound: refused whole, with a message saying what to do.
    let (status, body) = ls_predict(&server, tasks(&[slow.as_str(); 4])).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (413, &json!("too_many_tasks"))
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("at most label_studio.max_batch_tasks (3)")
    );

    // Over the budget (1 s a task, 2 s for two) while the images would take 10 s to give up on: nothing is
    // reported as predicted. (A fetch that gave up at the budget's own end would race it.)
    config.task_timeout_secs = 1;
    config.fetch_timeout_secs = 10;
    let server = red().label_studio(config).start().await;
    let (status, body) = ls_predict(&server, tasks(&[&slow, &slow])).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (503, &json!("timeout")),
        "{body}"
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("nothing was predicted")
    );

    // The routes of a backend that does not train.
    let (status, body) = ls_post(
        &server,
        "webhook",
        json!({"action": "START_TRAINING", "project": {"id": 1}}),
    )
    .await;
    assert_eq!((status, body), (200, json!({"status": "ok"})));
    let (status, body) = server.get_json("/label-studio/versions").await;
    assert_eq!((status, body), (200, json!({"versions": ["camserve-red"]})));
}

#[tokio::test(flavor = "multi_thread")]
async fn label_studio_routes_exist_only_when_configured_and_under_the_prefix() {
    let server = red().start().await;
    let status = server
        .client
        .get(server.url("/label-studio/health"))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 404);

    let mut config = label_studio_config("red", &[]);
    config.prefix = "/ml/ls".into();
    let server = red().label_studio(config).start().await;
    let response = server
        .client
        .get(server.url("/ml/ls/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn cors_answers_preflights_for_configured_origins_only() {
    let origin = "http://labeling.test:8081";
    let server = red()
        .cors(CorsConfig {
            allowed_origins: vec![origin.into()],
        })
        .start()
        .await;
    let preflight = |from: &'static str| {
        server
            .client
            .request(
                reqwest::Method::OPTIONS,
                server.url("/v1/models/red/explain"),
            )
            .header("origin", from)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "content-type")
            .send()
    };
    let response = preflight(origin).await.unwrap();
    assert_eq!(response.status(), 200);
    let headers = response.headers();
    assert_eq!(headers["access-control-allow-origin"], origin);
    let methods = headers["access-control-allow-methods"].to_str().unwrap();
    assert!(
        methods.contains("POST") && methods.contains("GET"),
        "{methods}"
    );
    assert!(
        headers["access-control-allow-headers"]
            .to_str()
            .unwrap()
            .contains("content-type")
    );

    // Another origin gets no grant, so its browser blocks the call.
    let response = preflight("http://elsewhere.test").await.unwrap();
    assert!(
        response
            .headers()
            .get("access-control-allow-origin")
            .is_none()
    );

    // The real request: granted, and the page may read the request id and the map's range.
    let response = server
        .client
        .post(server.url("/v1/models/red/explain?output=heatmap&class=red"))
        .header("origin", origin)
        .header("content-type", "image/png")
        .body(red_blue())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["access-control-allow-origin"], origin);
    let exposed = response.headers()["access-control-expose-headers"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        exposed.contains("x-request-id") && exposed.contains("x-cam-range"),
        "{exposed}"
    );
    // Errors carry the grant too, so pages can read the envelope.
    let response = server
        .client
        .get(server.url("/v1/models/nope"))
        .header("origin", origin)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    assert_eq!(response.headers()["access-control-allow-origin"], origin);

    // None by default.
    let plain = red().start().await;
    let response = plain
        .client
        .get(plain.url("/v1/models"))
        .header("origin", origin)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response
            .headers()
            .get("access-control-allow-origin")
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn viewer_page_is_served_from_the_binary() {
    let server = red().start().await;
    for (path, content_type, needle) in [
        (
            "/ui",
            "text/html; charset=utf-8",
            "<title>camserve viewer</title>",
        ),
        (
            "/ui/app.js",
            "text/javascript; charset=utf-8",
            "function boxesSvg",
        ),
        ("/ui/app.css", "text/css; charset=utf-8", ".drop-zone"),
    ] {
        let response = server.client.get(server.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
        assert_eq!(response.headers()["content-type"], content_type, "{path}");
        assert!(response.text().await.unwrap().contains(needle), "{path}");
    }
}
