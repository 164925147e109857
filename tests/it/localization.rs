//! The localization study's CI subset (docs/localization.md): a few cases of each set, the synthetic ones made by
//! bench/localization_set.py (tests/fixtures/localization/) and a few objects of the real-photo set
//! (tests/fixtures/localization_real/), with the IoUs that `make localization-fixtures` measured with the release
//! binary (`expected.json` in each folder). The default model, the real server: each case's IoU must
//! stay where it was, the default must be the protocol it names, and on each subset the default must localize
//! better than the Grad-CAM paper's protocol (15% of the maximum on the target Run's map).

use serde_json::Value;

use crate::support::{TestServer, fixture, root};

/// IoUs may move this much (a pixel or two of box edge) before the figures count as changed.
const TOLERANCE: f64 = 0.02;

/// The Grad-CAM paper's protocol: 15% of the maximum, on the map of the target Run (224 px stretched).
const PAPER: &[(&str, &str)] = &[("threshold", "0.15"), ("box_side", "input")];
/// camserve's default, named: Otsu's threshold on a localization Run whose longer side is 320.
const NAMED_DEFAULT: &[(&str, &str)] = &[("threshold", "otsu"), ("box_side", "320")];

fn iou(a: [f64; 4], b: [f64; 4]) -> f64 {
    let w = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let h = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let area = |r: [f64; 4]| (r[2] - r[0]) * (r[3] - r[1]);
    w * h / (area(a) + area(b) - w * h)
}

fn read_json(relative: &str) -> Value {
    serde_json::from_slice(&std::fs::read(fixture(relative)).unwrap()).unwrap()
}

/// One object of a subset: its name in expected.json, photo, class and ground-truth box.
struct Case {
    name: String,
    image: Vec<u8>,
    class: String,
    truth: [f64; 4],
}

impl Case {
    fn from(name: &str, folder: &str, case: &Value) -> Self {
        let file = case["file"].as_str().unwrap();
        Self {
            name: name.to_owned(),
            image: std::fs::read(fixture(&format!("{folder}/{file}"))).unwrap(),
            class: case["label"].as_str().unwrap().to_owned(),
            truth: serde_json::from_value(case["box"].clone()).unwrap(),
        }
    }
}

/// The subset of `set` and its committed figures: the cases of `{folder}/expected.json`, each named as it names
/// them (the synthetic file, the real set's `object`), looked up in the folder's `cases.json`.
fn subset(set: &str) -> (Vec<Case>, Value) {
    let (folder, key) = match set {
        "synthetic" => ("localization", "file"),
        _ => ("localization_real", "object"),
    };
    let listed = read_json(&format!("{folder}/cases.json"));
    let expected = read_json(&format!("{folder}/expected.json"));
    let cases = expected
        .as_object()
        .unwrap()
        .keys()
        .map(|name| {
            let case = listed
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c[key] == name.as_str())
                .unwrap_or_else(|| panic!("{set}: no case {name} in {folder}/cases.json"));
            Case::from(name, folder, case)
        })
        .collect();
    (cases, expected)
}

/// The first box of `case`'s class with these extra query parameters, as [x_min, y_min, x_max, y_max], and the
/// answer's `localization` (how it was made).
async fn first_box(server: &TestServer, case: &Case, extra: &[(&str, &str)]) -> ([f64; 4], Value) {
    let mut query = vec![
        ("class", case.class.as_str()),
        ("output", "boxes"),
        ("max_boxes", "1"),
    ];
    query.extend_from_slice(extra);
    let url =
        reqwest::Url::parse_with_params(&server.url("/v1/models/default/explain"), &query).unwrap();
    let path = format!("{}?{}", url.path(), url.query().unwrap());
    let response = server
        .post_image(path, "image/jpeg", case.image.clone())
        .await;
    assert_eq!(response.status(), 200, "{}", case.name);
    let body: Value = response.json().await.unwrap();
    let target = &body["explanations"][0];
    let found = &target["boxes"][0];
    let corners = ["x_min", "y_min", "x_max", "y_max"]
        .map(|k| found[k].as_f64().unwrap_or_else(|| panic!("{body}")));
    (corners, target["localization"].clone())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_default_localizes_better_than_the_papers_protocol_on_both_sets() {
    let server = TestServer::builder()
        .model("default", &root().join("models/efficientnet_lite0.onnx"))
        .start()
        .await;
    let mut changed = Vec::new();
    for set in ["synthetic", "real"] {
        let (cases, expected) = subset(set);
        assert!(
            cases.len() >= 5,
            "the {set} subset has {} cases",
            cases.len()
        );
        let (mut paper_sum, mut default_sum) = (0.0, 0.0);
        for case in &cases {
            let name = &case.name;
            let (paper_box, paper_how) = first_box(&server, case, PAPER).await;
            // The paper's protocol: the target Run's 224 px map, cut at 15% of its maximum.
            assert_eq!(paper_how["run"], "target", "{name}: {paper_how}");
            assert_eq!(
                paper_how["input_size"],
                serde_json::json!([224, 224]),
                "{name}"
            );
            let paper_threshold = paper_how["threshold"].as_f64().unwrap();
            assert!((paper_threshold - 0.15).abs() < 1e-6, "{name}: {paper_how}");

            // The default is the protocol it names, nothing else: the same box, made the same way.
            let (default_box, default_how) = first_box(&server, case, &[]).await;
            let (named_box, named_how) = first_box(&server, case, NAMED_DEFAULT).await;
            assert_eq!(default_box, named_box, "{name}");
            assert_eq!(default_how, named_how, "{name}");
            assert_eq!(default_how["threshold"], "otsu", "{name}: {default_how}");

            let (paper, by_default) = (iou(paper_box, case.truth), iou(default_box, case.truth));
            for (protocol, measured) in [("paper", paper), ("default", by_default)] {
                let committed = expected[name][protocol].as_f64().unwrap();
                if (measured - committed).abs() > TOLERANCE {
                    changed.push(format!(
                        "{set} {name}, {protocol}: IoU {measured:.4}, committed {committed:.4}"
                    ));
                }
            }
            paper_sum += paper;
            default_sum += by_default;
        }
        let n = cases.len() as f64;
        assert!(
            default_sum / n > paper_sum / n,
            "{set}: mean IoU of the default {:.3}, of the paper's protocol {:.3}",
            default_sum / n,
            paper_sum / n
        );
    }
    assert!(
        changed.is_empty(),
        "IoUs moved (if on purpose, `make localization-fixtures` and docs/localization.md):\n{}",
        changed.join("\n")
    );
}

/// Every output's boxes are the default's: `output=json` (which decodes the photo finely enough to draw it),
/// `output=boxes` (which decodes a JPEG only as finely as its Runs need) and COCO's `bbox` give the same box for
/// each real photo of the subset.
#[tokio::test(flavor = "multi_thread")]
async fn every_output_gives_the_same_boxes() {
    let server = TestServer::builder()
        .model("default", &root().join("models/efficientnet_lite0.onnx"))
        .start()
        .await;
    let (cases, _) = subset("real");
    for case in &cases {
        let query = |output: &str| {
            let url = reqwest::Url::parse_with_params(
                &server.url("/v1/models/default/explain"),
                &[("class", case.class.as_str()), ("max_boxes", "1")],
            )
            .unwrap();
            format!("{}?{}&{output}", url.path(), url.query().unwrap())
        };
        let mut found = Vec::new();
        for output in ["output=boxes", "output=json", "format=coco"] {
            let response = server
                .post_image(query(output), "image/jpeg", case.image.clone())
                .await;
            assert_eq!(response.status(), 200, "{} {output}", case.name);
            let body: Value = response.json().await.unwrap();
            let corners = if output == "format=coco" {
                let [x, y, w, h] =
                    serde_json::from_value::<[f64; 4]>(body["annotations"][0]["bbox"].clone())
                        .unwrap_or_else(|e| panic!("{}: {e}: {body}", case.name));
                [x, y, x + w, y + h]
            } else {
                let b = &body["explanations"][0]["boxes"][0];
                ["x_min", "y_min", "x_max", "y_max"].map(|k| b[k].as_f64().unwrap())
            };
            found.push((output, corners));
        }
        assert!(
            found.iter().all(|(_, corners)| *corners == found[0].1),
            "{}: {found:?}",
            case.name
        );
    }
}
