//! SIGTERM on the real binary: readiness turns false first, the request in flight finishes, the process exits 0.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{TempFile, fixture, ort_library, png_bytes};

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_turns_readiness_false_then_drains_and_exits_zero() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = TempFile::new("shutdown.toml");
    std::fs::write(
        &*config,
        format!(
            "[server]\nshutdown_delay_secs = 1\nshutdown_grace_secs = 20\n[runtime]\nlibrary = \"{}\"\n\
             [[models]]\nname = \"tiny\"\nfile = \"{}\"\n",
            ort_library().display(),
            fixture("tiny_cnn.onnx").display()
        ),
    )
    .unwrap();
    let mut server = Command::new(env!("CARGO_BIN_EXE_camserve"))
        .args([
            "serve",
            "--config",
            config.to_str().unwrap(),
            "--bind",
            &format!("127.0.0.1:{port}"),
        ])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let started = Instant::now();
    let ready = async || {
        client
            .get(format!("{base}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    };
    while !ready().await {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the server did not become ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A slow request (a large photo to decode) is in flight when SIGTERM arrives.
    let big = png_bytes(&image::RgbImage::from_fn(3000, 2000, |x, y| {
        image::Rgb([x as u8, y as u8, 90])
    }));
    let in_flight = tokio::spawn(
        client
            .post(format!("{base}/v1/models/tiny/explain?output=boxes"))
            .header("content-type", "image/png")
            .body(big)
            .send(),
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    let killed = Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());

    tokio::time::sleep(Duration::from_millis(300)).await;
    let readiness = client.get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(
        readiness.status(),
        503,
        "readiness must turn false while the server still answers"
    );
    let body: serde_json::Value = readiness.json().await.unwrap();
    assert_eq!(body["status"], "shutting_down");

    let response = in_flight.await.unwrap().unwrap();
    assert_eq!(response.status(), 200, "the request in flight must finish");
    let status = tokio::task::spawn_blocking(move || server.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(
        client.get(format!("{base}/healthz")).send().await.is_err(),
        "the listener must be closed"
    );
}
