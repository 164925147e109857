//! The CAM family through the live server, against references computed independently of it: pytorch-grad-cam
//! 1.5.7 on the PyTorch models, or numpy where pytorch-grad-cam has no such option (tests/fixtures/README.md
//! says which). Maps are compared as pytorch-grad-cam returns them: ReLU, min-max, resized to the input, min-max,
//! read from the server's 16-bit grey heatmap (quantization error at most 7.7e-6).

use camserve::explain::DEFAULT_SCORE_CAM_CHANNELS;
use serde_json::Value;

use crate::support::reference::{Case, cases};
use crate::support::{TestServer, fixture, max_abs_difference, model_config, served_name};

const TOLERANCE: f32 = 1e-4;
const ONE_RUN_METHODS: [&str; 8] = [
    "gradcam",
    "gradcampp",
    "xgradcam",
    "hirescam",
    "gradcam_elementwise",
    "layercam",
    "eigencam",
    "eigengradcam",
];

/// A server with every model the cases use, each under its file's stem.
async fn server(cases: &[Case]) -> TestServer {
    let mut models: Vec<_> = cases
        .iter()
        .map(|c| model_config(&served_name(&c.model), &fixture(&c.model)))
        .collect();
    models.sort_by(|a, b| a.name.cmp(&b.name));
    models.dedup_by(|a, b| a.name == b.name);
    TestServer::builder().models(models).start().await
}

async fn explain(server: &TestServer, case: &Case, options: &str) -> reqwest::Response {
    let image = std::fs::read(fixture(&case.image)).unwrap();
    let query = format!(
        "/v1/models/{}/explain?class={}&{options}",
        served_name(&case.model),
        case.class
    );
    server.post_image(&query, "image/png", image).await
}

/// The served map as pytorch-grad-cam returns it (the fixture images are exactly the input size).
async fn served_map(server: &TestServer, case: &Case, options: &str) -> Vec<f32> {
    let response = explain(
        server,
        case,
        &format!("output=heatmap&heatmap=gray16&{options}"),
    )
    .await;
    assert_eq!(response.status(), 200, "{options}");
    let png = response.bytes().await.unwrap();
    let image = image::load_from_memory(&png).unwrap().into_luma16();
    image.pixels().map(|p| f32::from(p[0]) / 65535.0).collect()
}

fn reference(path: &str) -> Vec<f32> {
    crate::support::read_npy_file(&fixture(path)).1
}

fn sign_note(flipped: bool) -> &'static str {
    if flipped {
        " (reference: pytorch-grad-cam with camserve's principal-component sign; LAPACK's was the opposite)"
    } else {
        ""
    }
}

/// Each one-Run method equals pytorch-grad-cam's on every fixture case: tiny_cnn, red_detector and the default
/// EfficientNet-Lite0.
#[tokio::test(flavor = "multi_thread")]
async fn every_method_matches_pytorch_grad_cam() {
    let cases = cases();
    let server = server(&cases).await;
    let mut compared = 0;
    for case in &cases {
        let names: Vec<&str> = case.methods.keys().map(String::as_str).collect();
        let mut want = ONE_RUN_METHODS.to_vec();
        want.sort();
        assert_eq!(names, want, "{}: references missing", case.image);
        for (method, path) in &case.methods {
            let got = served_map(&server, case, &format!("method={method}")).await;
            let error = max_abs_difference(&got, &reference(path));
            let flipped = case.lapack_sign_flipped.contains(method);
            println!(
                "parity {} class {} {method}: {error:.2e}",
                case.image, case.class
            );
            assert!(
                error < TOLERANCE,
                "{} {} class {} {method}: {error} from pytorch-grad-cam{}",
                case.model,
                case.image,
                case.class,
                sign_note(flipped)
            );
            compared += 1;
        }
    }
    assert!(compared >= 8 * 9, "only {compared} maps compared");
}

/// eigen_smooth and aug_smooth (alone and together) equal pytorch-grad-cam's `eigen_smooth=True` and
/// `aug_smooth=True` (ttach's flips and multiplications, all six copies in one Run).
#[tokio::test(flavor = "multi_thread")]
async fn smoothing_matches_pytorch_grad_cam() {
    let cases = cases();
    let server = server(&cases).await;
    let mut compared = 0;
    for case in &cases {
        for s in &case.smoothed {
            let options = format!(
                "method={}&aug_smooth={}&eigen_smooth={}",
                s.method, s.aug_smooth, s.eigen_smooth
            );
            let got = served_map(&server, case, &options).await;
            let error = max_abs_difference(&got, &reference(&s.map));
            println!("parity {} {options}: {error:.2e}", case.image);
            assert!(
                error < TOLERANCE,
                "{} {options}: {error} from pytorch-grad-cam{}",
                case.model,
                sign_note(s.lapack_sign_flipped)
            );
            compared += 1;
        }
    }
    assert!(compared >= 10, "only {compared} smoothed maps compared");

    // All six augmented copies ride in one Run.
    let case = &cases[0];
    let response = explain(&server, case, "aug_smooth=true&output=boxes").await;
    assert_eq!(response.headers()["x-batch-size"], "6");
}

/// Score-CAM with every channel equals pytorch-grad-cam's ScoreCAM (tiny_cnn, 32 channels); with a budget it
/// equals a numpy computation of the same definition over the top channels (tiny_cnn with 8, and the default
/// model with the default budget).
#[tokio::test(flavor = "multi_thread")]
async fn score_cam_matches_pytorch_grad_cam_and_numpy() {
    let cases = cases();
    let server = server(&cases).await;
    let mut sources = Vec::new();
    for case in &cases {
        for s in &case.scorecam {
            let options = format!("method=scorecam&max_channels={}", s.max_channels);
            let got = served_map(&server, case, &options).await;
            let error = max_abs_difference(&got, &reference(&s.map));
            println!(
                "parity {} {options}: {error:.2e} ({})",
                case.image, s.source
            );
            assert!(
                error < TOLERANCE,
                "{} {options}: {error} from {}",
                case.model,
                s.source
            );
            if case.model.contains("efficientnet_lite0") {
                assert_eq!(s.max_channels, DEFAULT_SCORE_CAM_CHANNELS);
                let default = served_map(&server, case, "method=scorecam").await;
                assert_eq!(
                    default, got,
                    "the default budget is DEFAULT_SCORE_CAM_CHANNELS"
                );
            }
            sources.push(s.source.as_str());
        }
    }
    sources.sort();
    assert_eq!(sources, ["numpy", "numpy", "pytorch-grad-cam"]);
}

/// The trust figures equal the probabilities PyTorch gives on the same perturbed inputs, and pytorch-grad-cam's
/// own DropInConfidence and IncreaseInConfidence.
#[tokio::test(flavor = "multi_thread")]
async fn trust_matches_pytorch() {
    let cases = cases();
    let server = server(&cases).await;
    let mut compared = 0;
    for case in &cases {
        for t in &case.trust {
            let response = explain(
                &server,
                case,
                &format!("method={}&trust=true&output=boxes", t.method),
            )
            .await;
            assert_eq!(
                response.headers()["x-batch-size"],
                "2",
                "the perturbed inputs, in one Run"
            );
            let body: Value = response.json().await.unwrap();
            let got = &body["explanations"][0]["trust"];
            let number = |key: &str| got[key].as_f64().unwrap() as f32;
            println!("parity {} trust: {got}", case.image);
            for (key, want) in [
                ("probability", t.probability),
                ("kept_probability", t.kept_probability),
                ("removed_probability", t.removed_probability),
                ("drop_in_confidence", t.drop_in_confidence),
                ("removal_drop", t.probability - t.removed_probability),
            ] {
                assert!(
                    (number(key) - want).abs() < TOLERANCE,
                    "{} {key}: got {}, want {want}",
                    case.model,
                    number(key)
                );
            }
            assert_eq!(got["increase_in_confidence"], t.increase_in_confidence);
            compared += 1;
        }
    }
    assert_eq!(compared, 2);
}

/// `relu=false` returns the map before ReLU, with its sign and its own range; after ReLU it is the autograd
/// reference.
#[tokio::test(flavor = "multi_thread")]
async fn raw_maps_keep_their_sign_on_request() {
    let cases: Vec<Case> = cases()
        .into_iter()
        .filter(|c| c.model == "tiny_cnn.onnx")
        .collect();
    let server = server(&cases).await;
    let mut negative = 0;
    for case in &cases {
        let response = explain(&server, case, "output=raw&relu=false").await;
        let body: Value = response.json().await.unwrap();
        let map = &body["explanations"][0]["map"];
        let data: Vec<f32> = serde_json::from_value(map["data"].clone()).unwrap();
        let min = data.iter().copied().fold(f32::INFINITY, f32::min);
        let max = data.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        assert_eq!(
            (
                map["min"].as_f64().unwrap() as f32,
                map["max"].as_f64().unwrap() as f32
            ),
            (min, max)
        );
        negative += usize::from(min < 0.0);
        let relu: Vec<f32> = data.iter().map(|v| v.max(0.0)).collect();
        let lowres = reference(&case.lowres);
        let scale = lowres.iter().copied().fold(0.0f32, f32::max);
        assert!(
            max_abs_difference(&relu, &lowres) < TOLERANCE * scale,
            "{}",
            case.image
        );
    }
    assert!(
        negative > 0,
        "no case has negative values: the test shows nothing"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn new_parameters_refuse_bad_values() {
    let cases: Vec<Case> = cases()
        .into_iter()
        .filter(|c| c.model == "tiny_cnn.onnx")
        .collect();
    let server = server(&cases).await;
    let case = &cases[0];
    for (options, status, code, names) in [
        ("eigen_smooth=yes", 400, "invalid_parameter", "eigen_smooth"),
        ("aug_smooth=1", 400, "invalid_parameter", "aug_smooth"),
        ("trust=maybe", 400, "invalid_parameter", "trust"),
        ("relu=no", 400, "invalid_parameter", "relu"),
        (
            "method=scorecam&max_channels=0",
            400,
            "invalid_parameter",
            "max_channels",
        ),
        (
            "method=scorecam&max_channels=-3",
            400,
            "invalid_parameter",
            "max_channels",
        ),
        ("max_channels=8", 400, "invalid_parameter", "max_channels"),
        (
            "method=scorecam&max_channels=2049",
            422,
            "too_many_channels",
            "max_channels",
        ),
        (
            "trust=true&output=overlay",
            400,
            "invalid_parameter",
            "trust",
        ),
        ("trust=true&format=coco", 400, "invalid_parameter", "trust"),
        ("method=ablationcam", 400, "invalid_parameter", "method"),
    ] {
        let response = explain(&server, case, options).await;
        let request_id = response.headers()["x-request-id"]
            .to_str()
            .unwrap()
            .to_owned();
        assert_eq!(response.status(), status, "{options}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], code, "{options}");
        assert_eq!(body["error"]["request_id"], request_id.as_str());
        assert!(
            body["error"]["message"].as_str().unwrap().contains(names),
            "{options}: {body}"
        );
    }
}

/// Extra Runs count as inference: the stage times of a request with Score-CAM and the trust score still add up to
/// at most its total, and its inference time exceeds that of a plain one-Run request by its extra Runs.
#[tokio::test(flavor = "multi_thread")]
async fn stage_times_add_up_with_extra_runs() {
    let cases: Vec<Case> = cases()
        .into_iter()
        .filter(|c| c.model == "tiny_cnn.onnx")
        .collect();
    let server = server(&cases).await;
    let case = &cases[0];
    let mut inference = Vec::new();
    for options in [
        "output=boxes",
        "output=boxes&method=scorecam&max_channels=32&trust=true&aug_smooth=true",
    ] {
        let response = explain(&server, case, options).await;
        assert_eq!(response.status(), 200);
        let ms =
            |name: &str| -> f64 { response.headers()[name].to_str().unwrap().parse().unwrap() };
        let stages: f64 = [
            "x-decode-time",
            "x-queue-time",
            "x-inference-time",
            "x-render-time",
        ]
        .iter()
        .map(|s| ms(s))
        .sum();
        assert!(
            stages <= ms("x-total-time"),
            "{options}: stages {stages} > total"
        );
        inference.push(ms("x-inference-time"));
    }
    // 1 Run against 1 + 6 x 1 (32 masked images each) + 1 (trust): many times the work.
    assert!(inference[1] > 3.0 * inference[0], "{inference:?}");
}
