//! What labeling dashboards use: the `format` answers, the Label Studio ML backend, CORS and the viewer page.
//! Real server on a real socket; expected numbers derived by hand from the red detector fixture.
//!
//! `red_blue_128.png` has a pure red square at rows 32-63, cols 16-47; `red_detector.onnx`'s Grad-CAM for `red`
//! is 10/256 on the 16x16 grid's red cells and 0 elsewhere. Upsampled bilinearly (half-pixel centres) to 128 px,
//! a column's weight on the square is 1 inside cols 20-43 and falls off by 1/8 per pixel outside them:
//! cols 16..=19 weigh 0.5625, 0.6875, 0.8125, 0.9375 (and mirrored on the right); col 15 weighs 0.4375 and
//! col 13 0.1875. So at threshold 0.5 the box is the square exactly, and at 0.15 it grows 3 px on every side.

mod common;

use std::time::Duration;

use axum::Router;
use axum::routing::get;
use camserve::config::{CorsConfig, LabelStudioConfig, Limits};
use common::{TestServer, fixture, label_studio_config, model_config, status_and_json};
use serde_json::{Value, json};

const SQUARE: [u64; 4] = [16, 32, 48, 64]; // x_min, y_min, x_max, y_max (exclusive)

fn red_blue() -> Vec<u8> {
    std::fs::read(fixture("images/red_blue_128.png")).unwrap()
}

async fn red_server(cors: CorsConfig, label_studio: Option<LabelStudioConfig>) -> TestServer {
    TestServer::with_integrations(
        vec![model_config("red", &fixture("red_detector.onnx"))],
        Limits::default(),
        Duration::from_secs(30),
        cors,
        label_studio,
    )
    .await
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
    let server = red_server(CorsConfig::default(), None).await;
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
    // The default threshold is half the maximum: the square.
    let (_, cvat) = explain(&server, "class=red&format=cvat").await;
    assert_eq!(cvat[0]["points"], json!(SQUARE));
}

#[tokio::test(flavor = "multi_thread")]
async fn format_mistakes_are_named() {
    let server = red_server(CorsConfig::default(), None).await;
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

/// A loopback server standing in for where Label Studio keeps task images.
async fn image_host() -> (String, tokio::task::JoinHandle<()>) {
    let png = red_blue();
    let app = Router::new()
        .route("/red_blue.png", get(move || async move { png.clone() }))
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

async fn ls_predict(server: &TestServer, body: Value) -> (u16, Value) {
    status_and_json(
        server
            .client
            .post(server.url("/label-studio/predict"))
            .json(&body)
            .send()
            .await
            .unwrap(),
    )
    .await
}

fn tasks(url: &str) -> Value {
    json!({"tasks": [{"id": 7, "data": {"image": url}}], "project": "1.1", "params": {}})
}

#[tokio::test(flavor = "multi_thread")]
async fn label_studio_backend_fetches_only_from_allowed_hosts() {
    let (host, _image_server) = image_host().await;
    let mut config = label_studio_config("red", &[&host]);
    config.threshold = camserve::boxes::Threshold::Fraction(0.5);
    config.top_k = 2;
    config.fetch_max_bytes = 100_000;
    config.fetch_timeout_secs = 1;
    let server = red_server(CorsConfig::default(), Some(config)).await;

    let (status, health) = server.get_json("/label-studio/health").await;
    assert_eq!((status, &health["status"]), (200, &json!("UP")));
    let (status, setup) = status_and_json(
        server
            .client
            .post(server.url("/label-studio/setup"))
            .json(
                &json!({"project": "1.1", "schema": "<View/>", "hostname": "", "access_token": ""}),
            )
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, &setup["model_version"]),
        (200, &json!("camserve-red"))
    );

    // Allowed host, the project's own tag names and data key.
    let label_config = r#"<View><Image name="photo" value="$img"/>
        <RectangleLabels name="where" toName="photo"><Label value="red"/></RectangleLabels></View>"#;
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

    // A data: URI needs no host.
    let data_uri = format!(
        "data:image/png;base64,{}",
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, red_blue())
    );
    let (status, answer) = ls_predict(&server, tasks(&data_uri)).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["results"].as_array().unwrap().len(), 1);

    // Refused before any connection: another host, another port, https, a relative path.
    let port = host.rsplit(':').next().unwrap();
    for (url, needle) in [
        (
            format!("http://localhost:{port}/red_blue.png"),
            format!("host `localhost:{port}` is not in label_studio.allowed_hosts"),
        ),
        (
            "http://127.0.0.1:9/red_blue.png".to_owned(),
            "host `127.0.0.1:9` is not in".to_owned(),
        ),
        (
            format!("https://{host}/red_blue.png"),
            "scheme `https` is not fetched".to_owned(),
        ),
        (
            "/data/upload/1/red_blue.png".to_owned(),
            "relative Label Studio upload paths are not fetched".to_owned(),
        ),
    ] {
        let (status, body) = ls_predict(&server, tasks(&url)).await;
        assert_eq!(status, 403, "{url}: {body}");
        assert_eq!(body["error"]["code"], "image_url_not_allowed");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(&needle), "{url}: {message}");
    }

    // Allowed host, but no redirect is followed, errors are named, and time and size are bounded.
    for (path, needle) in [
        ("moved.png", "answered 302"),
        ("missing.png", "answered 404"),
        ("slow.png", "timed out after 1s"),
    ] {
        let (status, body) = ls_predict(&server, tasks(&format!("http://{host}/{path}"))).await;
        assert_eq!(status, 502, "{path}: {body}");
        assert_eq!(body["error"]["code"], "image_fetch_failed");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(needle), "{path}: {message}");
    }
    let mut small = label_studio_config("red", &[&host]);
    small.fetch_max_bytes = 100;
    let tight = red_server(CorsConfig::default(), Some(small)).await;
    let (status, body) = ls_predict(&tight, tasks(&format!("http://{host}/red_blue.png"))).await;
    assert_eq!(status, 502);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("larger than label_studio.fetch_max_bytes (100 bytes)"),
        "{body}"
    );

    // Malformed requests.
    let (status, body) = ls_predict(&server, json!({"tasks": [{"id": 1, "data": {}}]})).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (400, &json!("malformed_body"))
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("data.image")
    );
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
async fn label_studio_routes_exist_only_when_configured_and_under_the_prefix() {
    let server = red_server(CorsConfig::default(), None).await;
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
    let server = red_server(CorsConfig::default(), Some(config)).await;
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
    let server = red_server(
        CorsConfig {
            allowed_origins: vec![origin.into()],
        },
        None,
    )
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
    let plain = red_server(CorsConfig::default(), None).await;
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
    let server = red_server(CorsConfig::default(), None).await;
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
