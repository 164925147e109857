//! The localization study's CI subset (docs/localization.md): a few cases of the set made by
//! bench/localization_set.py, committed with their ground-truth boxes and the IoUs that `make localization-fixtures`
//! measured. The default model, the real server: each case's IoU must stay where it was, and the default threshold
//! must localize better than the Grad-CAM paper's protocol (15% of the maximum).

use serde_json::Value;

use crate::support::{TestServer, fixture, root};

/// IoUs may move this much (a pixel or two of box edge) before the figures count as changed.
const TOLERANCE: f64 = 0.02;

fn iou(a: [f64; 4], b: [f64; 4]) -> f64 {
    let w = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let h = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let area = |r: [f64; 4]| (r[2] - r[0]) * (r[3] - r[1]);
    w * h / (area(a) + area(b) - w * h)
}

fn read_json(relative: &str) -> Value {
    serde_json::from_slice(&std::fs::read(fixture(relative)).unwrap()).unwrap()
}

/// The box of `class` for `image` with these extra query parameters, as [x_min, y_min, x_max, y_max].
async fn largest_box(
    server: &TestServer,
    image: &[u8],
    class: &str,
    extra: &[(&str, &str)],
) -> [f64; 4] {
    let mut query = vec![("class", class), ("output", "boxes"), ("max_boxes", "1")];
    query.extend_from_slice(extra);
    let url =
        reqwest::Url::parse_with_params(&server.url("/v1/models/default/explain"), &query).unwrap();
    let path = format!("{}?{}", url.path(), url.query().unwrap());
    let response = server.post_image(path, "image/jpeg", image.to_vec()).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    let found = &body["explanations"][0]["boxes"][0];
    ["x_min", "y_min", "x_max", "y_max"]
        .map(|k| found[k].as_f64().unwrap_or_else(|| panic!("{body}")))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_default_threshold_localizes_better_than_the_papers() {
    let server = TestServer::builder()
        .model("default", &root().join("models/efficientnet_lite0.onnx"))
        .start()
        .await;
    let cases = read_json("localization/cases.json");
    let expected = read_json("localization/expected.json");
    let default_name = camserve::pipeline::boxes::Threshold::DEFAULT.to_string();
    let (mut paper_sum, mut default_sum, mut changed) = (0.0, 0.0, Vec::new());
    let cases = cases.as_array().unwrap();
    assert!(cases.len() >= 5, "the CI subset has {} cases", cases.len());
    for case in cases {
        let file = case["file"].as_str().unwrap();
        let class = case["label"].as_str().unwrap();
        let truth: [f64; 4] = serde_json::from_value(case["box"].clone()).unwrap();
        let image = std::fs::read(fixture(&format!("localization/{file}"))).unwrap();

        let paper = iou(
            largest_box(&server, &image, class, &[("threshold", "0.15")]).await,
            truth,
        );
        let by_default = largest_box(&server, &image, class, &[]).await;
        // The default is the threshold of that name, nothing else.
        let named = largest_box(&server, &image, class, &[("threshold", &default_name)]).await;
        assert_eq!(by_default, named, "{file}");
        let by_default = iou(by_default, truth);

        for (name, measured) in [("0.15", paper), ("default", by_default)] {
            let committed = expected[file][name].as_f64().unwrap();
            if (measured - committed).abs() > TOLERANCE {
                changed.push(format!(
                    "{file} at {name}: IoU {measured:.4}, committed {committed:.4}"
                ));
            }
        }
        paper_sum += paper;
        default_sum += by_default;
    }
    assert!(
        changed.is_empty(),
        "IoUs moved (if on purpose, `make localization-fixtures` and docs/localization.md):\n{}",
        changed.join("\n")
    );
    let n = cases.len() as f64;
    assert!(
        default_sum / n > paper_sum / n,
        "mean IoU: default ({default_name}) {:.3}, paper's 0.15 {:.3}",
        default_sum / n,
        paper_sum / n
    );
}
