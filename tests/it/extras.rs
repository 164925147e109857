//! The optional model outputs end to end: Guided Grad-CAM (`input_gradients`) and maps combined over several target
//! layers (`activations_i` / `gradients_i`), served by the real server from `tiny_cnn_extras.onnx` and compared with
//! pytorch-grad-cam's numbers (tests/fixtures/reference/extras.json, made by the exporter).

use std::collections::BTreeMap;

use crate::support::{
    TestServer, fixture, max_abs_difference, read_npy, read_npy_file, status_and_json,
};

#[derive(serde::Deserialize)]
struct Case {
    image: String,
    class: usize,
    layers: Vec<String>,
    guided: String,
    guided_png: String,
    layers_maps: BTreeMap<String, String>,
}

fn cases() -> Vec<Case> {
    let cases: Vec<Case> =
        serde_json::from_str(&std::fs::read_to_string(fixture("reference/extras.json")).unwrap())
            .unwrap();
    assert!(cases.len() >= 2, "extras fixtures missing");
    cases
}

/// `extras`: the model with both optional outputs; `tiny`: the same weights without them.
async fn server() -> TestServer {
    TestServer::builder()
        .model("extras", &fixture("tiny_cnn_extras.onnx"))
        .model("tiny", &fixture("tiny_cnn.onnx"))
        .start()
        .await
}

#[tokio::test(flavor = "multi_thread")]
async fn guided_grad_cam_matches_pytorch_grad_cam() {
    let server = server().await;
    for case in cases() {
        let image = std::fs::read(fixture(&case.image)).unwrap();
        let query = format!(
            "/v1/models/extras/explain?class={}&output=guided_npy",
            case.class
        );
        let response = server.post_image(&query, "image/png", image.clone()).await;
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["content-type"], "application/x-npy");
        let (shape, values) = read_npy(&response.bytes().await.unwrap());
        let (reference_shape, reference) = read_npy_file(&fixture(&case.guided));
        assert_eq!(shape, [&[1][..], &reference_shape].concat());
        let scale = reference.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        assert!(scale > 0.0, "an all-zero reference would prove nothing");
        let error = max_abs_difference(&values, &reference) / scale;
        assert!(
            error <= 1e-4,
            "class {}: guided Grad-CAM is {error} (relative) off pytorch-grad-cam's",
            case.class
        );

        // The PNG: deprocess_image's picture, within one grey level (it rounds in float32, we in float64).
        let query = format!(
            "/v1/models/extras/explain?class={}&output=guided",
            case.class
        );
        let response = server.post_image(&query, "image/png", image).await;
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["content-type"], "image/png");
        assert_eq!(response.headers()["x-cam-class"], case.class.to_string());
        let served = image::load_from_memory(&response.bytes().await.unwrap())
            .unwrap()
            .to_rgb8();
        let reference = image::open(fixture(&case.guided_png)).unwrap().to_rgb8();
        assert_eq!(served.dimensions(), reference.dimensions());
        let worst = served
            .as_raw()
            .iter()
            .zip(reference.as_raw())
            .map(|(a, b)| a.abs_diff(*b))
            .max()
            .unwrap();
        assert!(
            worst <= 1,
            "class {}: PNG off by {worst} levels",
            case.class
        );
        let levels: std::collections::BTreeSet<u8> = reference.as_raw().iter().copied().collect();
        assert!(
            levels.len() > 20,
            "a flat reference picture would prove little"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn several_layers_match_pytorch_grad_cam() {
    let server = server().await;
    for case in cases() {
        let image = std::fs::read(fixture(&case.image)).unwrap();
        for (method, reference) in &case.layers_maps {
            let (shape, reference) = read_npy_file(&fixture(reference));
            for layers in ["all", &case.layers.join(","), "0,1"] {
                let query = format!(
                    "/v1/models/extras/explain?class={}&method={method}&layers={layers}&output=raw",
                    case.class
                );
                let (status, body) =
                    status_and_json(server.post_image(&query, "image/png", image.clone()).await)
                        .await;
                assert_eq!(status, 200, "{body}");
                let map = &body["explanations"][0]["map"];
                assert_eq!(map["shape"], serde_json::json!(shape), "{query}");
                let data: Vec<f32> = serde_json::from_value(map["data"].clone()).unwrap();
                let error = max_abs_difference(&data, &reference);
                assert!(error <= 1e-4, "{query}: {error} off pytorch-grad-cam");
            }
        }
        // The combination is not the primary layer's map alone (else the test could not tell them apart).
        let query = format!(
            "/v1/models/extras/explain?class={}&output=raw&map_size=input",
            case.class
        );
        let (_, body) = status_and_json(server.post_image(&query, "image/png", image).await).await;
        let single: Vec<f32> =
            serde_json::from_value(body["explanations"][0]["map"]["data"].clone()).unwrap();
        let (_, combined) = read_npy_file(&fixture(&case.layers_maps["gradcam"]));
        let max = single.iter().fold(0.0f32, |m, v| m.max(*v));
        let single: Vec<f32> = single.iter().map(|v| v / max).collect();
        assert!(max_abs_difference(&single, &combined) > 0.05);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_optional_outputs_change_nothing_else() {
    let server = server().await;
    let image = std::fs::read(fixture("images/chelsea_64.png")).unwrap();
    let query = "explain?top_k=2&output=raw";
    let (_, extras) = status_and_json(
        server
            .post_image(
                &format!("/v1/models/extras/{query}"),
                "image/png",
                image.clone(),
            )
            .await,
    )
    .await;
    let (_, tiny) = status_and_json(
        server
            .post_image(
                &format!("/v1/models/tiny/{query}"),
                "image/png",
                image.clone(),
            )
            .await,
    )
    .await;
    for (a, b) in extras["explanations"]
        .as_array()
        .unwrap()
        .iter()
        .zip(tiny["explanations"].as_array().unwrap())
    {
        assert_eq!(a["class"], b["class"]);
        let a: Vec<f32> = serde_json::from_value(a["map"]["data"].clone()).unwrap();
        let b: Vec<f32> = serde_json::from_value(b["map"]["data"].clone()).unwrap();
        assert!(crate::support::max_relative_error(&a, &b) < 1e-5);
    }
    // One extra layer alone: a map on its own 16x16 grid.
    let (status, body) = status_and_json(
        server
            .post_image(
                "/v1/models/extras/explain?layers=features.5&output=raw",
                "image/png",
                image,
            )
            .await,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        body["explanations"][0]["map"]["shape"],
        serde_json::json!([16, 16])
    );

    let (_, model) = server.get_json("/v1/models/extras").await;
    assert_eq!(
        model["layers"],
        serde_json::json!(["features", "features.5"])
    );
    assert_eq!(model["guided"], true);
    let (_, model) = server.get_json("/v1/models/tiny").await;
    assert_eq!(model["layers"], serde_json::json!(["features"]));
    assert_eq!(model["guided"], false);
}

#[tokio::test(flavor = "multi_thread")]
async fn what_a_model_lacks_is_a_422_naming_it() {
    let server = server().await;
    let image = std::fs::read(fixture("images/chelsea_64.png")).unwrap();
    for (query, status, code, names) in [
        (
            "tiny/explain?output=guided",
            422,
            "missing_input_gradients",
            "input_gradients",
        ),
        (
            "tiny/explain?output=guided_npy",
            422,
            "missing_input_gradients",
            "input_gradients",
        ),
        (
            "tiny/explain?layers=features.5",
            422,
            "missing_layer",
            "features.5",
        ),
        (
            "extras/explain?layers=all,nope",
            422,
            "missing_layer",
            "no target layer `all`",
        ),
        ("extras/explain?layers=2", 422, "missing_layer", "`2`"),
        (
            "extras/explain?layers=0,features",
            400,
            "invalid_parameter",
            "twice",
        ),
        (
            "extras/explain?layers=all&method=scorecam",
            400,
            "invalid_parameter",
            "scorecam",
        ),
        (
            "extras/explain?output=guided&top_k=2",
            422,
            "single_target_required",
            "guided",
        ),
    ] {
        let response = server
            .post_image(&format!("/v1/models/{query}"), "image/png", image.clone())
            .await;
        let request_id = response.headers()["x-request-id"]
            .to_str()
            .unwrap()
            .to_owned();
        let (got, body) = status_and_json(response).await;
        assert_eq!(
            (got, body["error"]["code"].as_str()),
            (status, Some(code)),
            "{query}: {body}"
        );
        assert_eq!(body["error"]["request_id"], request_id.as_str());
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(names), "{query}: {message}");
    }
}
