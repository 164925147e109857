//! The HTTP API end to end: real server on a real socket, real ONNX Runtime, real model files.

use image::{Rgb, RgbImage};
use serde_json::Value;

use crate::support::reference::{self, Case};
use crate::support::{
    TestServer, fixture, max_relative_error, model_config, png_bytes, read_npy, read_npy_file,
    served_name, status_and_json,
};

/// The cases of the tiny fixture model.
fn cases() -> Vec<Case> {
    reference::cases()
        .into_iter()
        .filter(|c| c.model == "tiny_cnn.onnx")
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn health_readiness_and_model_listing() {
    let server = TestServer::start().await;
    let (status, body) = server.get_json("/healthz").await;
    assert_eq!((status, body["status"].as_str()), (200, Some("ok")));
    let (status, body) = server.get_json("/readyz").await;
    assert_eq!((status, body["status"].as_str()), (200, Some("ready")));
    assert_eq!(body["models"], serde_json::json!(["red", "tiny"]));

    let (status, body) = server.get_json("/v1/models").await;
    assert_eq!(status, 200);
    let names: Vec<&str> = body["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["red", "tiny"]);

    let (status, tiny) = server.get_json("/v1/models/tiny").await;
    assert_eq!(status, 200);
    assert_eq!(tiny["num_classes"], 10);
    assert_eq!(tiny["labels"].as_array().unwrap().len(), 10);
    assert_eq!(tiny["device"], "cpu");
    assert_eq!(
        tiny["methods"],
        serde_json::json!([
            "gradcam",
            "gradcampp",
            "xgradcam",
            "hirescam",
            "gradcam_elementwise",
            "layercam",
            "eigencam",
            "eigengradcam",
            "scorecam"
        ])
    );
    let size = &tiny["input_size"];
    assert!(size["width"].as_u64().unwrap() > 0 && size["height"].as_u64().unwrap() > 0);
    assert!(tiny["activation"]["channels"].as_u64().unwrap() > 0);
    assert!(!tiny["target_layer"].as_str().unwrap().is_empty());
}

/// The served Grad-CAM equals pytorch-grad-cam's map for the same model, image and class (fixtures made by
/// the exporter's tests), and the raw map equals the one computed with PyTorch autograd.
#[tokio::test(flavor = "multi_thread")]
async fn gradcam_matches_pytorch_grad_cam() {
    let cases = reference::cases();
    let mut models: Vec<_> = cases
        .iter()
        .map(|c| model_config(&served_name(&c.model), &fixture(&c.model)))
        .collect();
    models.sort_by(|a, b| a.name.cmp(&b.name));
    models.dedup_by(|a, b| a.name == b.name);
    assert!(
        models.len() >= 3 && cases.len() >= 8,
        "fixture cases missing"
    );
    let server = TestServer::builder().models(models).start().await;
    for case in cases {
        let image = std::fs::read(fixture(&case.image)).unwrap();
        let query = format!(
            "/v1/models/{}/explain?class={}&output=raw",
            served_name(&case.model),
            case.class
        );
        let (status, body) =
            status_and_json(server.post_image(&query, "image/png", image.clone()).await).await;
        assert_eq!(status, 200, "{body}");
        let map = &body["explanations"][0]["map"];
        let data: Vec<f32> = serde_json::from_value(map["data"].clone()).unwrap();
        let (shape, lowres) = read_npy_file(&fixture(&case.lowres));
        assert_eq!(map["shape"], serde_json::json!(shape));
        let error = max_relative_error(&data, &lowres);
        assert!(
            error < 1e-4,
            "{}: raw map differs from autograd's by {error}",
            case.image
        );

        let (status, body) = status_and_json(
            server
                .post_image(&format!("{query}&map_size=input"), "image/png", image)
                .await,
        )
        .await;
        assert_eq!(status, 200);
        let map = &body["explanations"][0]["map"];
        let (min, max) = (
            map["min"].as_f64().unwrap() as f32,
            map["max"].as_f64().unwrap() as f32,
        );
        let data: Vec<f32> = serde_json::from_value(map["data"].clone()).unwrap();
        // pytorch-grad-cam: scale_cam_image ((x - min) / (1e-7 + max - min)) on the low-resolution map, which
        // the upsampling keeps within [0, 1], then once more on the upsampled map.
        let once: Vec<f32> = data
            .iter()
            .map(|v| (v - min) / (1e-7 + max - min))
            .collect();
        let (lo, hi) = once
            .iter()
            .fold((f32::MAX, f32::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        let normalized: Vec<f32> = once.iter().map(|v| (v - lo) / (1e-7 + hi - lo)).collect();
        let (shape, reference) = read_npy_file(&fixture(&case.gradcam));
        assert_eq!(map["shape"], serde_json::json!(shape));
        let error = normalized
            .iter()
            .zip(&reference)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            error < 1e-4,
            "{}: map differs from pytorch-grad-cam's by {error}",
            case.image
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn predict_matches_pytorch_logits() {
    let server = TestServer::start().await;
    for case in cases() {
        let image = std::fs::read(fixture(&case.image)).unwrap();
        let (status, body) = status_and_json(
            server
                .post_image("/v1/models/tiny/predict?top_k=10", "image/png", image)
                .await,
        )
        .await;
        assert_eq!(status, 200, "{body}");
        let predictions = body["predictions"].as_array().unwrap();
        assert_eq!(predictions.len(), 10);
        let mut expected: Vec<usize> = (0..case.logits.len()).collect();
        expected.sort_by(|&a, &b| case.logits[b].total_cmp(&case.logits[a]));
        let classes: Vec<usize> = predictions
            .iter()
            .map(|p| p["class"].as_u64().unwrap() as usize)
            .collect();
        assert_eq!(classes, expected);
        for p in predictions {
            let class = p["class"].as_u64().unwrap() as usize;
            let logit = p["logit"].as_f64().unwrap() as f32;
            assert!((logit - case.logits[class]).abs() <= 1e-4 * case.logits[class].abs().max(1.0));
        }
        let total: f64 = predictions
            .iter()
            .map(|p| p["probability"].as_f64().unwrap())
            .sum();
        assert!((total - 1.0).abs() < 1e-5, "probabilities sum to {total}");
    }
}

/// Several classes in one request give the same maps as one request per class; top_k picks the best classes.
#[tokio::test(flavor = "multi_thread")]
async fn several_classes_in_one_request() {
    let server = TestServer::start().await;
    let case = &cases()[0];
    let image = std::fs::read(fixture(&case.image)).unwrap();
    let raw_map = |body: &Value, i: usize| -> Vec<f32> {
        serde_json::from_value(body["explanations"][i]["map"]["data"].clone()).unwrap()
    };
    let (_, both) = status_and_json(
        server
            .post_image(
                "/v1/models/tiny/explain?class=2&class=7&output=raw",
                "image/png",
                image.clone(),
            )
            .await,
    )
    .await;
    for (i, class) in [2, 7].into_iter().enumerate() {
        let query = format!("/v1/models/tiny/explain?class={class}&output=raw");
        let (_, single) =
            status_and_json(server.post_image(&query, "image/png", image.clone()).await).await;
        assert_eq!(both["explanations"][i]["class"], class);
        assert!(max_relative_error(&raw_map(&both, i), &raw_map(&single, 0)) < 1e-5);
    }

    let (status, top) = status_and_json(
        server
            .post_image("/v1/models/tiny/explain?top_k=3", "image/png", image)
            .await,
    )
    .await;
    assert_eq!(status, 200);
    let mut ranked: Vec<usize> = (0..case.logits.len()).collect();
    ranked.sort_by(|&a, &b| case.logits[b].total_cmp(&case.logits[a]));
    let classes: Vec<usize> = top["explanations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["class"].as_u64().unwrap() as usize)
        .collect();
    assert_eq!(classes, ranked[..3]);
    let predicted: Vec<usize> = top["predictions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["class"].as_u64().unwrap() as usize)
        .collect();
    assert_eq!(predicted, ranked[..5]);
}

/// A grey image with red squares at known places, in a size other than the model's input.
fn red_squares(width: u32, height: u32, squares: &[(u32, u32, u32)]) -> RgbImage {
    RgbImage::from_fn(width, height, |x, y| {
        let inside = squares
            .iter()
            .any(|&(sx, sy, side)| x >= sx && x < sx + side && y >= sy && y < sy + side);
        if inside {
            Rgb([230, 20, 20])
        } else {
            Rgb([128, 128, 128])
        }
    })
}

fn box_of(value: &Value) -> [f64; 4] {
    ["x_min", "y_min", "x_max", "y_max"].map(|k| value[k].as_f64().unwrap())
}

/// Each edge of `found` lies within one activation cell of the square's edge: the map's own resolution.
fn assert_box_near(found: [f64; 4], truth: [f64; 4], cell: (f64, f64)) {
    let tolerance = [cell.0, cell.1, cell.0, cell.1];
    let ok = (0..4).all(|i| (found[i] - truth[i]).abs() <= tolerance[i]);
    assert!(
        ok,
        "box {found:?} is not within one cell {cell:?} of {truth:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn boxes_find_objects_at_known_positions() {
    let server = TestServer::start().await;
    let info = &server.state.registry.get("red").unwrap().info;
    let grid = (
        info.activation_shape[2] as f64,
        info.activation_shape[1] as f64,
    );
    let cell = (400.0 / grid.0, 300.0 / grid.1);

    // The Grad-CAM paper's protocol (threshold=0.15). One square: the box of the largest segment surrounds it, in
    // original-image pixels.
    let image = red_squares(400, 300, &[(220, 60, 110)]);
    let (status, body) = status_and_json(
        server
            .post_image(
                "/v1/models/red/explain?class=red&output=boxes&threshold=0.15",
                "image/png",
                png_bytes(&image),
            )
            .await,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["image"],
        serde_json::json!({"width": 400, "height": 300})
    );
    let boxes = body["explanations"][0]["boxes"].as_array().unwrap();
    assert_eq!(boxes.len(), 1);
    assert_box_near(box_of(&boxes[0]), [220.0, 60.0, 330.0, 170.0], cell);
    assert!(boxes[0]["peak"].as_f64().unwrap() > 0.9);

    // Two squares, max_boxes=3: the two segments, larger first; nothing else crosses the threshold.
    let image = red_squares(400, 300, &[(30, 40, 120), (280, 200, 60)]);
    let (_, body) = status_and_json(
        server
            .post_image(
                "/v1/models/red/explain?class=0&output=boxes&max_boxes=3&threshold=0.15",
                "image/png",
                png_bytes(&image),
            )
            .await,
    )
    .await;
    let boxes = body["explanations"][0]["boxes"].as_array().unwrap();
    assert_eq!(boxes.len(), 2, "{body}");
    assert_box_near(box_of(&boxes[0]), [30.0, 40.0, 150.0, 160.0], cell);
    assert_box_near(box_of(&boxes[1]), [280.0, 200.0, 340.0, 260.0], cell);
    assert!(boxes[0]["area"].as_u64() > boxes[1]["area"].as_u64());

    // A square on the model's own 8-pixel grid, in an image of the input size: red_blue_128.png's red square, whose
    // upsampled map tests/it/dashboards.rs works out by hand, boxed on the target Run's map (`box_side=input`). At 15%
    // of the maximum the box grows 3 px on every side; at half the maximum it is the square exactly.
    let size = (info.preprocess.width as u32, info.preprocess.height as u32);
    let image = png_bytes(&red_squares(size.0, size.1, &[(16, 32, 32)]));
    let square_box = |query: &'static str| {
        let server = &server;
        let image = image.clone();
        async move {
            let url =
                format!("/v1/models/red/explain?class=red&output=boxes&box_side=input{query}");
            let (status, body) =
                status_and_json(server.post_image(url, "image/png", image).await).await;
            assert_eq!(status, 200, "{body}");
            box_of(&body["explanations"][0]["boxes"][0])
        }
    };
    assert_eq!(
        square_box("&threshold=0.15").await,
        [13.0, 29.0, 51.0, 67.0]
    );
    assert_eq!(square_box("&threshold=0.5").await, [16.0, 32.0, 48.0, 64.0]);
    // Otsu's level lies between the grey (0) and the square's plateau (1), so its box is within the ramp too.
    let otsu = square_box("&threshold=otsu").await;
    assert!(
        otsu.iter()
            .zip([16.0, 32.0, 48.0, 64.0])
            .all(|(f, t)| (f - t).abs() <= 4.0),
        "{otsu:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn image_outputs_are_pixel_exact() {
    let server = TestServer::start().await;
    let image = red_squares(160, 120, &[(40, 30, 50)]);
    let bytes = png_bytes(&image);
    let explain = |query: &str| {
        server.post_image(
            format!("/v1/models/red/explain?class=red&{query}"),
            "image/png",
            bytes.clone(),
        )
    };

    // alpha=0 leaves the photo untouched; alpha=1 is exactly the coloured heatmap.
    let response = explain("output=overlay&alpha=0").await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "image/png");
    assert_eq!(response.headers()["x-cam-class"], "0");
    let overlay = image::load_from_memory(&response.bytes().await.unwrap())
        .unwrap()
        .to_rgb8();
    assert_eq!(overlay, image);
    let full = image::load_from_memory(
        &explain("output=overlay&alpha=1")
            .await
            .bytes()
            .await
            .unwrap(),
    )
    .unwrap()
    .to_rgb8();
    let heat = image::load_from_memory(&explain("output=heatmap").await.bytes().await.unwrap())
        .unwrap()
        .to_rgb8();
    assert_eq!(full, heat);
    // Jet: the square's centre is hot (red dominates), the far corner cold (blue dominates).
    let hot = heat.get_pixel(65, 55);
    let cold = heat.get_pixel(150, 110);
    assert!(hot[0] >= 128 && hot[1] < 60 && hot[2] < 60, "{hot:?}");
    assert!(cold[2] > 100 && cold[0] < 60, "{cold:?}");

    // 16-bit grey: the range header and the pixel values agree with the raw map.
    let response = explain("output=heatmap&heatmap=gray16").await;
    let range: Vec<f32> = response.headers()["x-cam-range"]
        .to_str()
        .unwrap()
        .split(',')
        .map(|v| v.parse().unwrap())
        .collect();
    assert!(range[0] >= 0.0 && range[1] > range[0], "{range:?}");
    let gray = image::load_from_memory(&response.bytes().await.unwrap())
        .unwrap()
        .to_luma16();
    assert_eq!(gray.dimensions(), (160, 120));
    assert!(gray.get_pixel(65, 55)[0] > 60_000 && gray.get_pixel(150, 110)[0] < 3_000);

    // .npy and JSON carry the same raw map.
    let npy = explain("output=npy").await;
    assert_eq!(npy.headers()["content-type"], "application/x-npy");
    let (shape, data) = read_npy(&npy.bytes().await.unwrap());
    let (_, raw) = status_and_json(explain("output=raw").await).await;
    let map = &raw["explanations"][0]["map"];
    assert_eq!(serde_json::json!([shape[1], shape[2]]), map["shape"]);
    assert_eq!(shape[0], 1);
    let json_data: Vec<f32> = serde_json::from_value(map["data"].clone()).unwrap();
    assert_eq!(data, json_data);
    assert_eq!(map["max"].as_f64().unwrap() as f32, range[1]);

    // The default JSON carries predictions, boxes and both images in one round trip.
    let (status, body) = status_and_json(explain("").await).await;
    assert_eq!(status, 200);
    let target = &body["explanations"][0];
    assert_eq!(target["label"], "red");
    use base64::Engine as _;
    let overlay_png = base64::engine::general_purpose::STANDARD
        .decode(target["overlay_png"].as_str().unwrap())
        .unwrap();
    assert_eq!(
        image::load_from_memory(&overlay_png)
            .unwrap()
            .to_rgb8()
            .dimensions(),
        (160, 120)
    );
    assert_eq!(body["predictions"][0]["label"], "red");
    assert_eq!(target["boxes"].as_array().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn multipart_upload_equals_raw_body() {
    let server = TestServer::start().await;
    let bytes = png_bytes(&red_squares(100, 100, &[(10, 10, 40)]));
    let form = reqwest::multipart::Form::new()
        .text("note", "ignored")
        .part(
            "image",
            reqwest::multipart::Part::bytes(bytes.clone()).file_name("x.png"),
        );
    let response = server
        .client
        .post(server.url("/v1/models/red/explain?output=raw"))
        .multipart(form)
        .send()
        .await
        .unwrap();
    let (status, multipart) = status_and_json(response).await;
    assert_eq!(status, 200, "{multipart}");
    let (_, raw) = status_and_json(
        server
            .post_image("/v1/models/red/explain?output=raw", "image/png", bytes)
            .await,
    )
    .await;
    assert_eq!(multipart["explanations"], raw["explanations"]);
}

/// Concurrent requests batched into one Run get the same answers as alone, and say so in x-batch-size.
#[tokio::test(flavor = "multi_thread")]
async fn batched_requests_equal_single_ones() {
    let mut batched = model_config("tiny", &fixture("tiny_cnn.onnx"));
    batched.max_batch = 8;
    batched.max_batch_wait_ms = 200;
    let server = TestServer::builder().models([batched]).start().await;
    let mut alone = model_config("tiny", &fixture("tiny_cnn.onnx"));
    alone.max_batch = 1;
    let reference = TestServer::builder().models([alone]).start().await;

    let images: Vec<Vec<u8>> = cases()
        .iter()
        .map(|c| std::fs::read(fixture(&c.image)).unwrap())
        .collect();
    let query = "/v1/models/tiny/explain?top_k=2&output=raw";
    // All at once, from tasks of their own, so that they queue together.
    let sends: Vec<_> = images
        .iter()
        .map(|image| {
            let request = server
                .client
                .post(server.url(query))
                .header("content-type", "image/png")
                .body(image.clone());
            tokio::spawn(request.send())
        })
        .collect();
    let mut answers = Vec::new();
    for send in sends {
        answers.push(send.await.unwrap().unwrap());
    }
    let mut largest_batch = 0;
    for (image, response) in images.iter().zip(answers) {
        assert_eq!(response.status(), 200);
        largest_batch = largest_batch.max(
            response.headers()["x-batch-size"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap(),
        );
        let (_, batched) = status_and_json(response).await;
        let (_, single) = status_and_json(
            reference
                .post_image(query, "image/png", image.clone())
                .await,
        )
        .await;
        assert_eq!(batched["explanations"].as_array().unwrap().len(), 2);
        for i in 0..2 {
            let (b, s) = (&batched["explanations"][i], &single["explanations"][i]);
            assert_eq!(b["class"], s["class"]);
            let data =
                |v: &Value| serde_json::from_value::<Vec<f32>>(v["map"]["data"].clone()).unwrap();
            assert!(max_relative_error(&data(b), &data(s)) < 1e-5);
        }
    }
    assert!(
        largest_batch > 1,
        "no batch formed within 200 ms of waiting"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn responses_carry_stage_timings() {
    let server = TestServer::start().await;
    let image = std::fs::read(fixture(&cases()[0].image)).unwrap();
    for path in [
        "/v1/models/tiny/explain?output=overlay",
        "/v1/models/tiny/predict",
    ] {
        let response = server.post_image(path, "image/png", image.clone()).await;
        assert_eq!(response.status(), 200);
        let ms =
            |name: &str| -> f64 { response.headers()[name].to_str().unwrap().parse().unwrap() };
        let total = ms("x-total-time");
        for stage in [
            "x-decode-time",
            "x-queue-time",
            "x-inference-time",
            "x-render-time",
        ] {
            assert!(
                ms(stage) >= 0.0 && ms(stage) <= total,
                "{path}: {stage} {} > total {total}",
                ms(stage)
            );
        }
        assert!(ms("x-inference-time") > 0.0);
        assert_eq!(response.headers()["x-batch-size"], "1");
    }
}

/// A photo larger than the analysis grid: boxes still come back in its own pixels, and `max_side` shrinks the
/// images drawn for it.
#[tokio::test(flavor = "multi_thread")]
async fn large_photos_keep_pixel_coordinates_and_max_side_shrinks_outputs() {
    let server = TestServer::start().await;
    let info = &server.state.registry.get("red").unwrap().info;
    let cell = (
        3000.0 / info.activation_shape[2] as f64,
        2000.0 / info.activation_shape[1] as f64,
    );
    let image = png_bytes(&red_squares(3000, 2000, &[(1700, 300, 800)]));
    let (status, body) = status_and_json(
        server
            .post_image(
                "/v1/models/red/explain?output=boxes",
                "image/png",
                image.clone(),
            )
            .await,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_box_near(
        box_of(&body["explanations"][0]["boxes"][0]),
        [1700.0, 300.0, 2500.0, 1100.0],
        cell,
    );

    let response = server
        .post_image(
            "/v1/models/red/explain?output=overlay&max_side=600",
            "image/png",
            image.clone(),
        )
        .await;
    let overlay = image::load_from_memory(&response.bytes().await.unwrap()).unwrap();
    assert_eq!((overlay.width(), overlay.height()), (600, 400));
    let response = server
        .post_image(
            "/v1/models/red/explain?output=heatmap&heatmap=gray8",
            "image/png",
            image,
        )
        .await;
    let heat = image::load_from_memory(&response.bytes().await.unwrap())
        .unwrap()
        .to_luma8();
    assert_eq!(heat.dimensions(), (3000, 2000));
    assert!(heat.get_pixel(2100, 700)[0] > 200 && heat.get_pixel(200, 1800)[0] < 20);

    let too_big = server
        .post_image(
            "/v1/models/red/explain?max_side=100000",
            "image/png",
            vec![1],
        )
        .await;
    assert_eq!(too_big.status(), 400);
}

/// red_blue_128.png's red square (x 16..48, y 32..64) blown up ten times to a 1280 x 960 JPEG: x 160..480,
/// y 320..640.
fn large_red_blue_jpeg() -> Vec<u8> {
    let photo = image::open(fixture("images/red_blue_128.png"))
        .unwrap()
        .to_rgb8();
    let large = image::imageops::resize(&photo, 1280, 1280, image::imageops::FilterType::Nearest);
    let large = image::imageops::crop_imm(&large, 0, 0, 1280, 960).to_image();
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 90)
        .encode_image(&large)
        .unwrap();
    jpeg
}

#[tokio::test(flavor = "multi_thread")]
async fn a_large_jpeg_decoded_at_the_model_scale_gives_the_boxes_of_the_full_decode() {
    let server = TestServer::start().await;
    let jpeg = large_red_blue_jpeg();
    let explain = |query: &'static str| {
        let jpeg = jpeg.clone();
        let server = &server;
        async move {
            status_and_json(
                server
                    .post_image(
                        format!("/v1/models/red/explain?{query}"),
                        "image/jpeg",
                        jpeg,
                    )
                    .await,
            )
            .await
        }
    };
    // output=boxes needs the model's 128 px: decoded at 2/8 (320 x 240). output=json draws the overlay at full size.
    let (status, scaled) = explain("class=red&output=boxes&threshold=0.5").await;
    assert_eq!(status, 200, "{scaled}");
    let (status, full) = explain("class=red&output=json&threshold=0.5").await;
    assert_eq!(status, 200);
    for answer in [&scaled, &full] {
        assert_eq!(
            (&answer["image"]["width"], &answer["image"]["height"]),
            (&Value::from(1280), &Value::from(960))
        );
    }
    let first_box = |answer: &Value| box_of(&answer["explanations"][0]["boxes"][0]);
    // One analysis pixel (1024 px across the photo) is 1.25 photo pixels.
    assert_box_near(first_box(&scaled), first_box(&full), (3.0, 3.0));
    // And on the square, within one pixel of the model's 128 px input (10 x 7.5 photo pixels).
    assert_box_near(
        first_box(&scaled),
        [160.0, 320.0, 480.0, 640.0],
        (10.0, 7.5),
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn every_image_format_decodes_to_the_drawn_size() {
    let server = TestServer::start().await;
    let jpeg = large_red_blue_jpeg();
    let fetch = |query: String| {
        let jpeg = jpeg.clone();
        let server = &server;
        async move {
            let response = server
                .post_image(
                    format!("/v1/models/red/explain?class=red&{query}"),
                    "image/jpeg",
                    jpeg,
                )
                .await;
            let status = response.status().as_u16();
            let media_type = response.headers()["content-type"]
                .to_str()
                .unwrap()
                .to_owned();
            (status, media_type, response.bytes().await.unwrap().to_vec())
        }
    };
    let mut overlays = Vec::new();
    for (format, media_type) in [
        ("png", "image/png"),
        ("jpeg", "image/jpeg"),
        ("webp", "image/webp"),
    ] {
        for (max_side, size) in [(4096, (1280, 960)), (400, (400, 300))] {
            for output in ["overlay", "heatmap"] {
                let query = format!("output={output}&image_format={format}&max_side={max_side}");
                let (status, got_type, bytes) = fetch(query.clone()).await;
                assert_eq!((status, got_type.as_str()), (200, media_type), "{query}");
                let image = image::load_from_memory(&bytes).unwrap().to_rgb8();
                assert_eq!(image.dimensions(), size, "{query}");
                if output == "overlay" && max_side == 400 {
                    overlays.push(image);
                }
            }
        }
    }
    // The lossy JPEG stays close to the lossless pictures; WebP is lossless, so it equals the PNG.
    assert_eq!(overlays[0], overlays[2]);
    let mean_difference = overlays[0]
        .as_raw()
        .iter()
        .zip(overlays[1].as_raw())
        .map(|(a, b)| f64::from(a.abs_diff(*b)))
        .sum::<f64>()
        / overlays[0].as_raw().len() as f64;
    assert!(
        mean_difference < 2.0,
        "JPEG is {mean_difference} levels off"
    );

    // A gray heatmap as an 8-bit gray JPEG; a higher quality is a bigger file.
    let (status, _, gray) = fetch("output=heatmap&heatmap=gray8&image_format=jpeg".into()).await;
    assert_eq!(status, 200);
    assert_eq!(
        image::load_from_memory(&gray).unwrap().color(),
        image::ColorType::L8
    );
    let (_, _, low) = fetch("output=overlay&image_format=jpeg&quality=20".into()).await;
    let (_, _, high) = fetch("output=overlay&image_format=jpeg&quality=95".into()).await;
    assert!(low.len() < high.len(), "{} vs {}", low.len(), high.len());

    for query in [
        "output=overlay&quality=80",
        "output=overlay&image_format=jpeg&quality=0",
        "output=overlay&image_format=jpeg&quality=101",
        "output=json&image_format=jpeg",
        "output=heatmap&heatmap=gray16&image_format=webp",
        "output=overlay&image_format=gif",
    ] {
        let (status, _, body) = fetch(query.into()).await;
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (400, Some("invalid_parameter")),
            "{query}: {body}"
        );
    }
}
