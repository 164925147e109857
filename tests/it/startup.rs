//! Start-up: models that break the contract are refused with a message that says what is wrong, ONNX Runtime
//! must be the right library, and the command line runs the same pipeline as the server.

use std::ffi::OsStr;
use std::path::Path;
use std::process::Command;

use camserve::registry::Registry;

use crate::support::{TempFile, fixture, model_config, root, runtime, scratch_dir};

fn refusal(file: &str) -> String {
    let config = model_config("broken", &fixture(file));
    match Registry::load(runtime(), &[config]) {
        Ok(_) => panic!("{file} was accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn models_that_break_the_contract_are_refused_with_the_reason() {
    let expectations = [
        ("broken_no_gradients.onnx", "missing output `gradients`"),
        (
            "broken_constant_gradients.onnx",
            "gradients do not change with the chosen class",
        ),
        ("broken_label_count.onnx", "labels"),
        ("broken_wrong_dtype.onnx", "expected float32"),
        (
            "broken_no_metadata.onnx",
            "metadata `camserve.labels` is missing",
        ),
        (
            "broken_extras_unnamed.onnx",
            "metadata `camserve.target_layers` must be",
        ),
        (
            "broken_extras_numbering.onnx",
            "missing output `gradients_1`",
        ),
        ("does_not_exist.onnx", "the file does not exist"),
    ];
    for (file, reason) in expectations {
        let message = refusal(file);
        assert!(message.starts_with("model `broken`"), "{message}");
        assert!(message.contains(file), "{message}");
        assert!(
            message.contains(reason),
            "{file}: expected `{reason}` in: {message}"
        );
    }
}

#[test]
fn metadata_can_be_supplied_by_the_config() {
    let labels = TempFile::new("labels.txt");
    let tiny = Registry::load(
        runtime(),
        &[model_config("tiny", &fixture("tiny_cnn.onnx"))],
    )
    .unwrap();
    let info = &tiny.get("tiny").unwrap().info;
    std::fs::write(
        &*labels,
        (0..info.num_classes())
            .map(|i| format!("thing {i}\n"))
            .collect::<String>(),
    )
    .unwrap();

    let mut config = model_config("bare", &fixture("broken_no_metadata.onnx"));
    config.overrides.labels_file = Some(labels.to_path_buf());
    config.overrides.input_size = Some([info.preprocess.height, info.preprocess.width]);
    config.overrides.mean = Some([0.5; 3]);
    config.overrides.std = Some([0.25; 3]);
    config.overrides.channel_order = Some("RGB".into());
    let registry = Registry::load(runtime(), &[config]).unwrap();
    let bare = &registry.get("bare").unwrap().info;
    assert_eq!(bare.labels[3], "thing 3");
    assert_eq!(bare.preprocess.std, [0.25; 3]);
}

fn camserve(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_camserve"))
        .args(args)
        .env_remove("CAMSERVE_ORT_LIBRARY")
        .output()
        .unwrap()
}

fn write_config(name: &str, library: &Path, model: &Path) -> TempFile {
    let path = TempFile::new(&format!("{name}.toml"));
    let text = format!(
        "[runtime]\nlibrary = \"{}\"\n[[models]]\nname = \"tiny\"\nfile = \"{}\"\n",
        library.display(),
        model.display()
    );
    std::fs::write(&*path, text).unwrap();
    path
}

#[test]
fn a_missing_or_wrong_onnx_runtime_stops_the_start_with_what_to_run() {
    let model = fixture("tiny_cnn.onnx");
    let missing = write_config(
        "missing",
        Path::new("/nonexistent/libonnxruntime.so"),
        &model,
    );
    let out = camserve(&[
        "serve",
        "--config",
        missing.to_str().unwrap(),
        "--bind",
        "127.0.0.1:0",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("ONNX Runtime library not found") && stderr.contains("make ort"),
        "{stderr}"
    );

    let old = root().join(".ort-1.30/onnxruntime/capi/libonnxruntime.so.1.30.0");
    assert!(
        old.is_file(),
        "`make test` installs onnxruntime 1.30.0 into .ort-1.30 for this test"
    );
    let wrong = write_config("wrong", &old, &model);
    let out = camserve(&[
        "serve",
        "--config",
        wrong.to_str().unwrap(),
        "--bind",
        "127.0.0.1:0",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("is version 1.30.0, camserve needs 1.31.x") && stderr.contains("make ort"),
        "{stderr}"
    );
}

#[test]
fn a_refused_model_stops_the_server_with_its_reason() {
    let config = write_config(
        "refused",
        &crate::support::ort_library(),
        &fixture("broken_no_gradients.onnx"),
    );
    let out = camserve(&[
        "serve",
        "--config",
        config.to_str().unwrap(),
        "--bind",
        "127.0.0.1:0",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("model `tiny`") && stderr.contains("missing output `gradients`"),
        "{stderr}"
    );
}

#[test]
fn explain_on_the_command_line_writes_the_overlay() {
    let config = write_config(
        "cli",
        &crate::support::ort_library(),
        &fixture("tiny_cnn.onnx"),
    );
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("reference/cases.json")).unwrap())
            .unwrap();
    let case = &cases[0];
    let image = fixture(case["image"].as_str().unwrap());
    let out_png = TempFile::new("cli.png");
    let class = case["class"].to_string();
    let out = camserve(&[
        "explain",
        "--config",
        config.to_str().unwrap(),
        "--model",
        "tiny",
        image.to_str().unwrap(),
        "-o",
        out_png.to_str().unwrap(),
        "--class",
        &class,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["explanations"][0]["class"].to_string(), class);
    let written = image::open(&*out_png).unwrap();
    let input = image::open(&image).unwrap();
    assert_eq!(
        (written.width(), written.height()),
        (input.width(), input.height())
    );
    assert_ne!(
        written.to_rgb8(),
        input.to_rgb8(),
        "the overlay must differ from the photo"
    );
}

/// The subcommands need no config file and no particular working directory: without `--config` (and without
/// CAMSERVE_CONFIG) they run on the built-in defaults, whose paths do not depend on the current folder.
#[test]
fn subcommands_work_from_any_folder_without_a_config_file() {
    let dir = scratch_dir("anywhere");
    let run = |args: &[&OsStr]| {
        Command::new(env!("CARGO_BIN_EXE_camserve"))
            .args(args)
            .current_dir(&dir)
            .env_remove("CAMSERVE_CONFIG")
            .output()
            .unwrap()
    };

    let plain = fixture("plain/resnet_legacy_op11.onnx");
    let listing = run(&["targets".as_ref(), plain.as_ref()]);
    let stdout = String::from_utf8_lossy(&listing.stdout);
    assert!(
        listing.status.success(),
        "{}",
        String::from_utf8_lossy(&listing.stderr)
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("/layer3/layer3.0/relu_1/Relu_output_0  ")
                && l.contains("head: ")),
        "{stdout}"
    );

    let photo = fixture("localization/cat_plain_0.55.jpg");
    let out_png = dir.join("out.png");
    let explained = run(&[
        "explain".as_ref(),
        "--model".as_ref(),
        "efficientnet_lite0".as_ref(),
        photo.as_ref(),
        "-o".as_ref(),
        out_png.as_ref(),
    ]);
    assert!(
        explained.status.success(),
        "{}",
        String::from_utf8_lossy(&explained.stderr)
    );
    let written = image::open(&out_png).unwrap();
    assert_eq!(
        (written.width(), written.height()),
        image::image_dimensions(&photo).unwrap()
    );

    // A contract model's file in this folder, named instead of a configured model.
    std::fs::copy(
        fixture("transformers/deit_distilled.onnx"),
        dir.join("deit.onnx"),
    )
    .unwrap();
    let from_file = run(&[
        "explain".as_ref(),
        "--model".as_ref(),
        "deit.onnx".as_ref(),
        photo.as_ref(),
        "-o".as_ref(),
        "deit.png".as_ref(),
    ]);
    assert!(
        from_file.status.success(),
        "{}",
        String::from_utf8_lossy(&from_file.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&from_file.stdout).unwrap();
    assert!(summary.to_string().contains("deit.onnx"), "{summary}");
    assert_eq!(
        image::image_dimensions(dir.join("deit.png")).unwrap(),
        image::image_dimensions(&photo).unwrap()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The default model, shipped in models/, explains a real photo: a tabby cat is seen as a cat.
#[test]
fn the_default_model_recognises_a_cat() {
    let config = camserve::config::Config::from_file(&root().join("config/default.toml")).unwrap();
    let registry = Registry::load(runtime(), &config.models).unwrap();
    let model = registry.get("efficientnet_lite0").unwrap().clone();
    assert_eq!(model.info.num_classes(), 1000);
    let bytes = std::fs::read(fixture("images/chelsea_224.png")).unwrap();
    let caller = camserve::engine::Caller::default();
    let (logits, _) =
        camserve::explain::predict(&model, &bytes, &config.limits, &caller.ticket()).unwrap();
    let top3: Vec<&str> = camserve::onnx::contract::ranked(&logits)[..3]
        .iter()
        .map(|&c| model.info.labels[c].as_str())
        .collect();
    assert!(
        top3.iter()
            .any(|l| ["tabby", "tiger cat", "Egyptian cat"].contains(l)),
        "top-3: {top3:?}"
    );
}

/// The container's HEALTHCHECK: 0 on a ready server, non-zero when it is not ready or nothing listens.
#[tokio::test(flavor = "multi_thread")]
async fn healthcheck_exits_zero_only_on_a_ready_server() {
    let server = crate::support::TestServer::start().await;
    let healthcheck = |url: String| async move {
        tokio::task::spawn_blocking(move || camserve(&["healthcheck", "--url", &url]))
            .await
            .unwrap()
    };

    let ready = healthcheck(server.url("/readyz")).await;
    assert!(
        ready.status.success(),
        "{}",
        String::from_utf8_lossy(&ready.stderr)
    );

    let missing = healthcheck(server.url("/nope")).await;
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("answered 404"));

    server
        .state
        .ready
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let draining = healthcheck(server.url("/readyz")).await;
    assert_eq!(draining.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&draining.stderr).contains("answered 503"));

    // A port that nothing listens on: bound, then released.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let refused = healthcheck(format!("http://{closed}/readyz")).await;
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("cannot connect"));
}
