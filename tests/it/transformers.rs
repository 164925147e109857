//! Vision transformers exported by camserve-export (tests/fixtures/transformers, `make transformer-fixtures`):
//! token targets with 1, 2 and 5 prefix tokens, a non-square input and a channels-last Swin, mapped to NCHW inside
//! their graphs. Served by the real server, their maps equal the references computed in PyTorch: pytorch-grad-cam
//! 1.5.7 with the `reshape_transform` of each layout (Grad-CAM and every other method), and Grad-CAM from autograd
//! on the layer's grid.

use serde_json::Value;

use crate::support::{TestServer, fixture, max_abs_difference, max_relative_error, read_npy_file};

const TOLERANCE: f32 = 1e-4;

fn cases() -> Vec<Value> {
    let text = std::fs::read(fixture("transformers/cases.json")).unwrap();
    serde_json::from_slice::<Vec<Value>>(&text).unwrap()
}

fn name(case: &Value) -> &str {
    case["name"].as_str().unwrap()
}

async fn server() -> TestServer {
    let mut builder = TestServer::builder();
    for case in cases() {
        builder = builder.model(
            name(&case),
            &fixture(&format!("transformers/{}.onnx", name(&case))),
        );
    }
    builder.start().await
}

async fn explain(server: &TestServer, case: &Value, output: &str) -> reqwest::Response {
    let image = std::fs::read(fixture(&format!("transformers/{}.input.png", name(case)))).unwrap();
    let path = format!(
        "/v1/models/{}/explain?class={}&{output}",
        name(case),
        case["top_class"]
    );
    let response = server.post_image(&path, "image/png", image).await;
    assert_eq!(response.status(), 200, "{} {output}", name(case));
    response
}

/// The served map as pytorch-grad-cam returns it, read from the 16-bit grey heatmap (quantization 7.7e-6).
async fn served_map(server: &TestServer, case: &Value, options: &str) -> Vec<f32> {
    let png = explain(
        server,
        case,
        &format!("output=heatmap&heatmap=gray16{options}"),
    )
    .await
    .bytes()
    .await
    .unwrap();
    let heat = image::load_from_memory(&png).unwrap().into_luma16();
    heat.pixels().map(|p| f32::from(p[0]) / 65535.0).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn transformer_maps_equal_pytorch_grad_cam_with_its_reshape_transform() {
    let server = server().await;
    for case in cases() {
        let name = name(&case);
        // The layout the model was exported with, as /v1/models shows it.
        let (status, model) = server.get_json(&format!("/v1/models/{name}")).await;
        assert_eq!(status, 200);
        assert_eq!(model["target_layout"], case["target_layout"], "{name}");
        assert_eq!(model["target_layer"], case["target"], "{name}");

        // The raw map on the layer's grid: Grad-CAM from PyTorch autograd through the unmodified model.
        let raw: Value = explain(&server, &case, "output=raw")
            .await
            .json()
            .await
            .unwrap();
        let map = &raw["explanations"][0]["map"];
        let served: Vec<f32> = serde_json::from_value(map["data"].clone()).unwrap();
        let (shape, expected) = read_npy_file(&fixture(&format!("transformers/{name}.lowres.npy")));
        assert_eq!(map["shape"], serde_json::json!(shape), "{name}");
        let error = max_relative_error(&served, &expected);
        assert!(
            error < TOLERANCE,
            "{name}: raw map off by {error:.2e} (relative)"
        );

        // pytorch-grad-cam's picture at the input size.
        let served = served_map(&server, &case, "").await;
        let (_, expected) = read_npy_file(&fixture(&format!("transformers/{name}.gradcam.npy")));
        let worst = max_abs_difference(&served, &expected);
        assert!(
            worst < TOLERANCE,
            "{name}: pytorch-grad-cam's map off by {worst:.2e}"
        );
    }
}

/// Every other method of the CAM family, and Score-CAM over every channel, equals pytorch-grad-cam's with the
/// same `reshape_transform`: a transformer target is an ordinary NCHW target once the graph has mapped it.
#[tokio::test(flavor = "multi_thread")]
async fn every_method_equals_pytorch_grad_cam_on_transformer_targets() {
    let server = server().await;
    let mut compared = 0;
    for case in cases() {
        let name = name(&case);
        let channels = case["activations"][0].as_u64().unwrap();
        let methods = case["methods"].as_object().unwrap();
        assert_eq!(methods.len(), 9, "{name}: references missing");
        for (method, path) in methods {
            let budget = if method == "scorecam" {
                format!("&max_channels={channels}")
            } else {
                String::new()
            };
            let served = served_map(&server, &case, &format!("&method={method}{budget}")).await;
            let (_, expected) = read_npy_file(&fixture(&format!(
                "transformers/{}",
                path.as_str().unwrap()
            )));
            let worst = max_abs_difference(&served, &expected);
            println!("{name} {method}: {worst:.2e}");
            assert!(
                worst < TOLERANCE,
                "{name} {method}: {worst:.2e} from pytorch-grad-cam (LAPACK's sign flipped for {})",
                case["lapack_sign_flipped"]
            );
            compared += 1;
        }
    }
    assert_eq!(compared, 6 * 9);
}

/// Guided backpropagation is not defined through GELU: these models have no `input_gradients`, and asking for
/// Guided Grad-CAM is refused with 422 and says why.
#[tokio::test(flavor = "multi_thread")]
async fn guided_grad_cam_is_refused_for_transformers() {
    let server = server().await;
    let case = &cases()[0];
    let image = std::fs::read(fixture(&format!("transformers/{}.input.png", name(case)))).unwrap();
    let response = server
        .post_image(
            &format!("/v1/models/{}/explain?output=guided", name(case)),
            "image/png",
            image,
        )
        .await;
    assert_eq!(response.status(), 422);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "missing_input_gradients");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("input_gradients"),
        "{body}"
    );
}
