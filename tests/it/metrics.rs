//! `/metrics`: Prometheus text with requests by route pattern, model and status, stage histograms, batch sizes,
//! queue depth and the device of each loaded model.

use crate::support::{TestServer, fixture};

fn value(text: &str, series: &str) -> f64 {
    let line = text
        .lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '));
    line.unwrap_or_else(|| panic!("no `{series}` in:\n{text}"))
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn counts_requests_stages_batches_and_models() {
    let server = TestServer::start().await;
    let image = std::fs::read(fixture("images/chelsea_64.png")).unwrap();
    for _ in 0..3 {
        let response = server
            .post_image(
                "/v1/models/tiny/explain?output=boxes",
                "image/png",
                image.clone(),
            )
            .await;
        assert_eq!(response.status(), 200);
    }
    let bad = server
        .post_image(
            "/v1/models/tiny/explain?top_k=x",
            "image/png",
            image.clone(),
        )
        .await;
    assert_eq!(bad.status(), 400);
    // An unknown model is counted without its name: clients must not grow the label space.
    let missing = server
        .post_image("/v1/models/no-such-model/explain", "image/png", image)
        .await;
    assert_eq!(missing.status(), 404);

    let response = server
        .client
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = response.text().await.unwrap();
    let explain = r#"route="/v1/models/{model}/explain""#;
    assert_eq!(
        value(
            &text,
            &format!(r#"camserve_requests_total{{{explain},model="tiny",status="200"}}"#)
        ),
        3.0
    );
    assert_eq!(
        value(
            &text,
            &format!(r#"camserve_requests_total{{{explain},model="tiny",status="400"}}"#)
        ),
        1.0
    );
    assert_eq!(
        value(
            &text,
            &format!(r#"camserve_requests_total{{{explain},model="",status="404"}}"#)
        ),
        1.0
    );
    assert!(!text.contains("no-such-model"));
    for stage in ["decode", "queue", "inference", "render", "total"] {
        let count = value(
            &text,
            &format!(r#"camserve_stage_seconds_count{{stage="{stage}",model="tiny"}}"#),
        );
        assert_eq!(count, 3.0, "{stage}");
    }
    let inference = value(
        &text,
        r#"camserve_stage_seconds_sum{stage="inference",model="tiny"}"#,
    );
    let total = value(
        &text,
        r#"camserve_stage_seconds_sum{stage="total",model="tiny"}"#,
    );
    assert!(inference > 0.0 && inference < total, "{inference} {total}");
    assert_eq!(
        value(&text, r#"camserve_batch_size_bucket{model="tiny",le="1"}"#),
        3.0
    );
    assert_eq!(value(&text, r#"camserve_queue_depth{model="tiny"}"#), 0.0);
    assert_eq!(
        value(&text, r#"camserve_model_loaded{model="red",device="cpu"}"#),
        1.0
    );
}
