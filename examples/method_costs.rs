//! What each method and option costs on the default model, through the whole pipeline minus HTTP (decode,
//! Runs, maps, boxes): `cargo run --release --example method_costs [-- runs]`. docs/methods.md has the table.

use std::path::Path;
use std::time::{Duration, Instant};

use camserve::config::{Config, Limits};
use camserve::engine::Caller;
use camserve::explain::{self, ExplainOptions, Targets};
use camserve::pipeline::cam::CamMethod;
use camserve::registry::ServedModel;

const MODEL: &str = "models/efficientnet_lite0.onnx";
const IMAGE: &str = "tests/fixtures/images/chelsea_224.png";

fn main() -> anyhow::Result<()> {
    let runs: usize = std::env::args().nth(1).map_or(Ok(15), |r| r.parse())?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let library = std::env::var("CAMSERVE_ORT_LIBRARY").unwrap_or_else(|_| {
        root.join(".ort/onnxruntime/capi/libonnxruntime.so.1.31.1")
            .display()
            .to_string()
    });
    let runtime = camserve::onnx::runtime::init(Path::new(&library))?;
    let toml = format!(
        "[runtime]\nlibrary = \"x\"\n[[models]]\nname = \"lite0\"\nfile = \"{}\"\nthreads = 2\n",
        root.join(MODEL).display()
    );
    let config = Config::from_toml(&toml, Path::new("/"))?;
    let model = std::sync::Arc::new(ServedModel::load(&runtime, &config.models[0])?);
    let bytes = std::fs::read(root.join(IMAGE))?;
    let limits = Limits::default();
    let caller = Caller::default();
    let ticket = caller.ticket();

    let plain = ExplainOptions {
        targets: Targets::TopK(1),
        max_boxes: 1,
        ..ExplainOptions::default()
    };
    let mut cases: Vec<(String, ExplainOptions)> = CamMethod::ALL
        .iter()
        .filter(|&&m| m != CamMethod::ScoreCam)
        .map(|&method| {
            (
                method.name().to_owned(),
                ExplainOptions {
                    method,
                    ..plain.clone()
                },
            )
        })
        .collect();
    cases.push((
        "gradcam eigen_smooth".into(),
        ExplainOptions {
            eigen_smooth: true,
            ..plain.clone()
        },
    ));
    cases.push((
        "gradcam aug_smooth".into(),
        ExplainOptions {
            aug_smooth: true,
            ..plain.clone()
        },
    ));
    cases.push((
        "gradcam trust".into(),
        ExplainOptions {
            trust: true,
            ..plain.clone()
        },
    ));
    for channels in [8, 16, 32, 64, 128, 256, 512] {
        cases.push((
            format!("scorecam max_channels={channels}"),
            ExplainOptions {
                method: CamMethod::ScoreCam,
                max_channels: channels,
                ..plain.clone()
            },
        ));
    }

    // Score-CAM with every channel, to see how far each budget's picture is from it.
    let all_channels = model.info.activation_shape[0];
    let full = ExplainOptions {
        method: CamMethod::ScoreCam,
        max_channels: all_channels,
        ..plain.clone()
    };
    let full = explain::explain_image(&model, &bytes, &limits, &full, &ticket)?;
    let (width, height) = full.photo_size;
    let full = full.targets[0].heat_at(width, height).into_owned();

    println!(
        "| what | median ms | inference ms | largest Run (images) | max abs difference from all {all_channels} channels |"
    );
    println!("|---|---|---|---|---|");
    for (name, options) in cases {
        let mut samples: Vec<(Duration, Duration, usize)> = Vec::new();
        let mut difference = String::new();
        for i in 0..runs + 1 {
            let started = Instant::now();
            let e = explain::explain_image(&model, &bytes, &limits, &options, &ticket)?;
            if i > 0 {
                samples.push((started.elapsed(), e.timings.inference, e.timings.batch_size));
            }
            if options.method == CamMethod::ScoreCam {
                let heat = e.targets[0].heat_at(width, height);
                let d = heat
                    .data
                    .iter()
                    .zip(&full.data)
                    .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
                difference = format!("{d:.3}");
            }
        }
        samples.sort();
        let (total, inference, batch) = samples[samples.len() / 2];
        println!(
            "| {name} | {:.1} | {:.1} | {batch} | {difference} |",
            total.as_secs_f64() * 1e3,
            inference.as_secs_f64() * 1e3
        );
    }
    Ok(())
}
