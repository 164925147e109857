//! Every error a client can cause: its status, its stable code, and the request id in body and header.

use std::time::Duration;

use camserve::config::Limits;
use reqwest::Method;
use serde_json::Value;

use crate::support::{TestServer, fixture, png_bytes};

/// A request that must fail, and how.
struct Bad {
    method: Method,
    path: String,
    content_type: Option<&'static str>,
    body: Vec<u8>,
    status: u16,
    code: &'static str,
}

const EXPLAIN: &str = "/v1/models/tiny/explain";

fn png() -> Vec<u8> {
    png_bytes(&image::RgbImage::from_pixel(
        32,
        32,
        image::Rgb([200, 10, 10]),
    ))
}

/// A small real JPEG whose frame header (SOF0) is edited to claim another size; JPEG headers carry no checksum.
fn jpeg_claiming(width: u16, height: u16) -> Vec<u8> {
    let mut jpeg = Vec::new();
    let image = image::RgbImage::from_pixel(16, 16, image::Rgb([90, 90, 90]));
    image
        .write_to(
            &mut std::io::Cursor::new(&mut jpeg),
            image::ImageFormat::Jpeg,
        )
        .unwrap();
    let sof = jpeg
        .windows(2)
        .position(|w| w == [0xFF, 0xC0])
        .expect("baseline JPEG");
    jpeg[sof + 5..sof + 7].copy_from_slice(&height.to_be_bytes());
    jpeg[sof + 7..sof + 9].copy_from_slice(&width.to_be_bytes());
    jpeg
}

impl Bad {
    /// A request without a body.
    fn bodiless(method: Method, path: &str, status: u16, code: &'static str) -> Self {
        Bad {
            method,
            path: path.into(),
            content_type: None,
            body: vec![],
            status,
            code,
        }
    }

    /// A POST to the tiny model's explanations.
    fn explain(
        content_type: Option<&'static str>,
        body: Vec<u8>,
        status: u16,
        code: &'static str,
    ) -> Self {
        Bad {
            method: Method::POST,
            path: EXPLAIN.into(),
            content_type,
            body,
            status,
            code,
        }
    }

    /// A good PNG POSTed to `path` (a route and its query).
    fn query(path: &str, status: u16, code: &'static str) -> Self {
        Bad {
            method: Method::POST,
            path: path.into(),
            content_type: Some("image/png"),
            body: png(),
            status,
            code,
        }
    }
}

/// Unknown models and routes, methods a route does not have, the admin API while it is off.
fn routing_errors() -> Vec<Bad> {
    vec![
        Bad::query("/v1/models/nope/explain", 404, "model_not_found"),
        Bad::bodiless(Method::GET, "/v1/models/nope", 404, "model_not_found"),
        Bad::bodiless(Method::GET, "/v2/anything", 404, "route_not_found"),
        Bad::bodiless(Method::PATCH, "/v1/models/tiny", 405, "method_not_allowed"),
        Bad::bodiless(Method::DELETE, "/v1/models/tiny", 403, "admin_disabled"),
    ]
}

/// Bodies that are no image camserve takes, or too large (the server's limits: 64 KiB, 1 megapixel).
fn body_errors() -> Vec<Bad> {
    let png_type = Some("image/png");
    let gif = b"GIF89a\x01\x00\x01\x00\x80\x00\x00\xff\xff\xff\x00\x00\x00!\xf9\x04\x00\x00\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;".to_vec();
    // A JPEG whose header claims 60000 x 60000 pixels: refused from the header, before any pixel is decoded.
    let bomb = jpeg_claiming(60_000, 60_000);
    let mut truncated = png();
    truncated.truncate(truncated.len() / 2);
    let multipart = Some("multipart/form-data; boundary=XYZ");
    let no_image_field =
        b"--XYZ\r\nContent-Disposition: form-data; name=\"other\"\r\n\r\nhello\r\n--XYZ--\r\n"
            .to_vec();
    vec![
        Bad::explain(png_type, vec![], 400, "empty_image"),
        Bad::explain(
            png_type,
            b"definitely not an image".to_vec(),
            400,
            "undecodable_image",
        ),
        Bad::explain(png_type, truncated, 400, "undecodable_image"),
        Bad::explain(
            Some("application/octet-stream"),
            gif,
            415,
            "unsupported_media_type",
        ),
        Bad::explain(Some("text/plain"), png(), 415, "unsupported_media_type"),
        Bad::explain(None, png(), 415, "unsupported_media_type"),
        Bad::explain(png_type, vec![0u8; 65 * 1024], 413, "payload_too_large"),
        Bad::explain(png_type, bomb, 413, "image_too_large"),
        Bad::explain(multipart, no_image_field, 400, "missing_image_field"),
        Bad::explain(multipart, b"garbage".to_vec(), 400, "malformed_body"),
    ]
}

/// Query parameters: out of the model's range, malformed, unknown, or in combinations that do not go together.
fn parameter_errors() -> Vec<Bad> {
    let explain =
        |query: &str, status, code| Bad::query(&format!("{EXPLAIN}?{query}"), status, code);
    vec![
        explain("class=10", 422, "class_out_of_range"),
        explain("class=zebra", 422, "class_out_of_range"),
        explain("top_k=11", 422, "class_out_of_range"),
        explain("top_k=abc", 400, "invalid_parameter"),
        explain("top_k=0", 400, "invalid_parameter"),
        explain("class=1&top_k=2", 400, "invalid_parameter"),
        explain("method=magic", 400, "invalid_parameter"),
        explain("alpha=2", 400, "invalid_parameter"),
        // Over 1, though it rounds to 1.0 as f32 (schemathesis found it).
        explain("alpha=1.0000000000000002", 400, "invalid_parameter"),
        explain("threshold=0", 400, "invalid_parameter"),
        explain("threshold=mean", 400, "invalid_parameter"),
        explain("output=pdf", 400, "invalid_parameter"),
        explain("alpha=0.1&alpha=0.2", 400, "invalid_parameter"),
        explain("methd=gradcam", 400, "unknown_parameter"),
        explain("top_k=2&output=overlay", 422, "single_target_required"),
        Bad::query("/v1/models/tiny/predict?top_k=-1", 400, "invalid_parameter"),
    ]
}

/// Sends `case`: its status, its code, a JSON body with a message, the request id in body and header alike.
async fn assert_refused(server: &TestServer, case: Bad) {
    let mut request = server
        .client
        .request(case.method.clone(), server.url(&case.path))
        .body(case.body);
    if let Some(content_type) = case.content_type {
        request = request.header("content-type", content_type);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let header_id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        response.headers()["content-type"],
        "application/json",
        "{} {}",
        case.method,
        case.path
    );
    let body: Value = response.json().await.unwrap();
    let what = format!("{} {} -> {body}", case.method, case.path);
    assert_eq!(status, case.status, "{what}");
    assert_eq!(body["error"]["code"], case.code, "{what}");
    assert_eq!(body["error"]["request_id"], header_id.as_str(), "{what}");
    assert!(
        body["error"]["message"].as_str().unwrap().len() > 5,
        "{what}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn every_error_has_its_status_code_and_request_id() {
    let limits = Limits {
        max_body_bytes: 64 * 1024,
        max_image_side: 4096,
        max_image_pixels: 1_000_000,
        ..Limits::default()
    };
    let server = TestServer::builder()
        .model("tiny", &fixture("tiny_cnn.onnx"))
        .limits(limits)
        .start()
        .await;
    let cases = routing_errors()
        .into_iter()
        .chain(body_errors())
        .chain(parameter_errors());
    for case in cases {
        assert_refused(&server, case).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn request_ids_are_echoed_or_made() {
    let server = TestServer::builder()
        .model("tiny", &fixture("tiny_cnn.onnx"))
        .start()
        .await;
    let response = server
        .client
        .get(server.url("/v1/models/nope"))
        .header("x-request-id", "abc-123")
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-request-id"], "abc-123");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["request_id"], "abc-123");

    let a = server
        .client
        .get(server.url("/healthz"))
        .send()
        .await
        .unwrap();
    let b = server
        .client
        .get(server.url("/healthz"))
        .send()
        .await
        .unwrap();
    let (a, b) = (&a.headers()["x-request-id"], &b.headers()["x-request-id"]);
    assert!(!a.is_empty() && a != b, "{a:?} {b:?}");
    // Ids with control characters or absurd length are replaced, not echoed into logs.
    let response = server
        .client
        .get(server.url("/healthz"))
        .header("x-request-id", "x".repeat(300))
        .send()
        .await
        .unwrap();
    assert_ne!(response.headers()["x-request-id"], "x".repeat(300).as_str());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_past_the_timeout_gets_503_and_retry_after() {
    let server = TestServer::builder()
        .model("tiny", &fixture("tiny_cnn.onnx"))
        .request_timeout(Duration::from_millis(1))
        .start()
        .await;
    // Decoding and resizing a 2000 x 2000 photo takes far longer than 1 ms.
    let big = png_bytes(&image::RgbImage::from_fn(2000, 2000, |x, y| {
        image::Rgb([x as u8, y as u8, 7])
    }));
    let response = server
        .post_image("/v1/models/tiny/explain", "image/png", big)
        .await;
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "1");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "timeout");
}
