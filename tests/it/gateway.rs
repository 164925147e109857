//! camserve behind a real nginx, configured by deploy/gateway/camserve.conf.template (the file the compose
//! setup uses): the path prefix, the body limit, request ids, X-Forwarded-* and errors from either side.
//! nginx comes from Debian (`apt-get install nginx`, which .ci/run does); without it the test is skipped,
//! except in CI, where it must run.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{fixture, ort_library, root, scratch_dir};

/// A child process that is stopped when the test ends, however it ends.
struct Process {
    child: Child,
    /// How to stop it with its children; None: SIGKILL.
    stop: Option<Command>,
}

impl Drop for Process {
    fn drop(&mut self) {
        match self.stop.as_mut().map(Command::status) {
            Some(Ok(status)) if status.success() => {}
            _ => {
                let _ = self.child.kill();
            }
        }
        let _ = self.child.wait();
    }
}

fn find_nginx() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/local/sbin".into()])
        .map(|dir| dir.join("nginx"))
        .find(|p| p.is_file())
}

/// The real binary with JSON logs on a port the OS picks; its log lines are kept for the assertions.
fn start_camserve(dir: &Path) -> (Process, SocketAddr, Arc<Mutex<Vec<Value>>>) {
    let config = dir.join("camserve.toml");
    std::fs::write(
        &config,
        format!(
            "[runtime]\nlibrary = \"{}\"\n[[models]]\nname = \"tiny\"\nfile = \"{}\"\n",
            ort_library().display(),
            fixture("tiny_cnn.onnx").display()
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_camserve"))
        .args(["serve", "--config", config.to_str().unwrap()])
        .args(["--bind", "127.0.0.1:0", "--log-format", "json"])
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let process = Process { child, stop: None };
    let logs = Arc::new(Mutex::new(Vec::new()));
    let (address_tx, address_rx) = std::sync::mpsc::channel();
    let kept = logs.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let Ok(event) = serde_json::from_str::<Value>(&line) else {
                eprintln!("camserve: {line}");
                continue;
            };
            if event["message"] == "serving" {
                let _ = address_tx.send(event["address"].as_str().unwrap().to_owned());
            }
            kept.lock().unwrap().push(event);
        }
    });
    let address = address_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("camserve did not start serving");
    (process, address.parse().unwrap(), logs)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_nginx(nginx: &Path, dir: &Path, upstream: SocketAddr) -> (Process, SocketAddr) {
    let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let template =
        std::fs::read_to_string(root().join("deploy/gateway/camserve.conf.template")).unwrap();
    let server = template
        .replace("${CAMSERVE_UPSTREAM}", &upstream.to_string())
        .replace("${GATEWAY_LISTEN}", &listen.to_string());
    std::fs::write(dir.join("camserve.conf"), server).unwrap();
    // Run as root (CI), nginx's workers drop to `nobody`: they must be able to spool bodies here.
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let main = format!(
        "daemon off;\npid {d}/nginx.pid;\nerror_log stderr warn;\nevents {{}}\nhttp {{\n  access_log off;\n  \
         client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  \
         uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  include {d}/camserve.conf;\n}}\n",
        d = dir.display()
    );
    std::fs::write(dir.join("nginx.conf"), main).unwrap();
    let nginx_command = |extra: &[&str]| {
        let mut command = Command::new(nginx);
        command
            .args(["-e", "stderr", "-p"])
            .arg(dir)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .args(extra);
        command
    };
    let child = nginx_command(&[]).spawn().unwrap();
    // Killing the master alone would leave its workers running: ask it to stop them.
    let mut process = Process {
        child,
        stop: Some(nginx_command(&["-s", "stop"])),
    };
    let started = Instant::now();
    while TcpStream::connect(listen).is_err() {
        if let Some(status) = process.child.try_wait().unwrap() {
            panic!("nginx exited with {status}");
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "nginx did not listen"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (process, listen)
}

/// A JPEG of several MB: a real photo carrying about 6 MB of comment segments, as camera metadata can. Its
/// pixels stay few, so that the unoptimised test build decodes it in milliseconds.
fn large_jpeg() -> Vec<u8> {
    let photo = image::open(fixture("images/chelsea_224.png"))
        .unwrap()
        .to_rgb8();
    let mut encoded = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut encoded, 90)
        .encode_image(&photo)
        .unwrap();
    // After SOI (FF D8): COM segments (FF FE, 2-byte length that counts itself), the largest allowed.
    let mut jpeg = encoded[..2].to_vec();
    let chunk = vec![b'x'; 65_533];
    for _ in 0..96 {
        jpeg.extend_from_slice(&[0xFF, 0xFE, 0xFF, 0xFF]);
        jpeg.extend_from_slice(&chunk);
    }
    jpeg.extend_from_slice(&encoded[2..]);
    jpeg
}

async fn error_of(response: reqwest::Response) -> (u16, String, Value) {
    let status = response.status().as_u16();
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    let id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        content_type.starts_with("application/json"),
        "{status}: {content_type}"
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["request_id"], id.as_str(), "{body}");
    (status, id, body["error"].clone())
}

/// The access log line camserve wrote for one request id.
fn served_log(logs: &Mutex<Vec<Value>>, request_id: &str) -> Option<Value> {
    let started = Instant::now();
    loop {
        let found = logs
            .lock()
            .unwrap()
            .iter()
            .find(|e| e["message"] == "served" && e["span"]["request_id"] == request_id)
            .cloned();
        if found.is_some() || started.elapsed() > Duration::from_secs(2) {
            return found;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn camserve_behind_nginx() {
    let Some(nginx) = find_nginx() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "nginx is not installed; .ci/run installs it with apt-get"
        );
        eprintln!("SKIPPED camserve_behind_nginx: nginx is not installed (apt-get install nginx)");
        return;
    };
    let dir = scratch_dir("gateway");
    let (camserve, upstream, logs) = start_camserve(&dir);
    let (nginx_process, gateway) = start_nginx(&nginx, &dir, upstream);
    let url = |path: &str| format!("http://{gateway}/camserve{path}");
    let client = reqwest::Client::new();

    // The prefix is stripped: /camserve/readyz is camserve's /readyz.
    let ready = client.get(url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    assert_eq!(ready.json::<Value>().await.unwrap()["status"], "ready");

    // A photo of several MB goes through; the client's request id and X-Forwarded-* reach camserve and back.
    let photo = large_jpeg();
    assert!(
        (4 << 20..16 << 20).contains(&photo.len()),
        "{} bytes",
        photo.len()
    );
    let response = client
        .post(url("/v1/models/tiny/predict"))
        .header("content-type", "image/jpeg")
        .header("x-request-id", "gateway-large-photo")
        .header("x-forwarded-for", "203.0.113.7")
        .body(photo)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-request-id"], "gateway-large-photo");
    let body: Value = response.json().await.unwrap();
    assert!(
        !body["predictions"].as_array().unwrap().is_empty(),
        "{body}"
    );
    let log = served_log(&logs, "gateway-large-photo").expect("camserve logged the request");
    assert_eq!(log["status"], 200);
    assert_eq!(log["span"]["route"], "/v1/models/{model}/predict");
    assert_eq!(log["span"]["forwarded_for"], "203.0.113.7, 127.0.0.1");
    assert_eq!(log["span"]["forwarded_proto"], "http");
    assert_eq!(log["span"]["forwarded_host"], "127.0.0.1");

    // Without a request id, nginx makes one and camserve uses it: one id in both logs and in the answer.
    let response = client.get(url("/v1/models")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "{id}"
    );
    assert!(
        served_log(&logs, &id).is_some(),
        "camserve did not see {id}"
    );

    // Over nginx's 16 MiB limit: nginx refuses with the JSON envelope, and camserve never sees the body.
    let response = client
        .post(url("/v1/models/tiny/predict"))
        .header("content-type", "image/jpeg")
        .header("x-request-id", "gateway-too-big")
        .body(vec![0u8; 17 << 20])
        .send()
        .await
        .unwrap();
    let (status, id, error) = error_of(response).await;
    assert_eq!((status, id.as_str()), (413, "gateway-too-big"));
    assert_eq!(error["code"], "payload_too_large");
    assert!(served_log(&logs, "gateway-too-big").is_none());

    // camserve's own errors arrive intact.
    let response = client
        .post(url("/v1/models/nope/predict"))
        .header("content-type", "image/png")
        .header("x-request-id", "gateway-no-model")
        .body(std::fs::read(fixture("images/chelsea_224.png")).unwrap())
        .send()
        .await
        .unwrap();
    let (status, id, error) = error_of(response).await;
    assert_eq!((status, id.as_str()), (404, "gateway-no-model"));
    assert_eq!(error["code"], "model_not_found");
    assert!(
        error["message"].as_str().unwrap().contains("nope"),
        "{error}"
    );
    // Its access log line says why, as the client was told.
    let log = served_log(&logs, "gateway-no-model").expect("camserve logged the request");
    assert_eq!(
        (&log["status"], &log["code"]),
        (&json!(404), &json!("model_not_found"))
    );
    assert_eq!(log["reason"], error["message"]);

    // A request id that is not safe to echo in JSON is replaced, not passed on.
    let response = client
        .get(url("/v1/models/nope"))
        .header("x-request-id", "bad\"id")
        .send()
        .await
        .unwrap();
    let (status, id, error) = error_of(response).await;
    assert_eq!((status, id.len()), (404, 32));
    assert_eq!(error["code"], "model_not_found");

    // Outside the prefix, nginx answers in the same envelope.
    let response = client
        .get(format!("http://{gateway}/v1/models"))
        .header("x-request-id", "gateway-outside")
        .send()
        .await
        .unwrap();
    let (status, id, error) = error_of(response).await;
    assert_eq!((status, id.as_str()), (404, "gateway-outside"));
    assert_eq!(error["code"], "route_not_found");

    // camserve gone: 502 with a code and Retry-After, still JSON.
    drop(camserve);
    let response = client
        .get(url("/readyz"))
        .header("x-request-id", "gateway-down")
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["retry-after"], "1");
    let (status, id, error) = error_of(response).await;
    assert_eq!((status, id.as_str()), (502, "gateway-down"));
    assert_eq!(error["code"], "upstream_unavailable");
    drop(nginx_process); // its stop command reads the config and pid file in `dir`
    let _ = std::fs::remove_dir_all(&dir);
}
