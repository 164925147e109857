//! The CUDA check (issue 7 item 4): the same models and images through the CPU and the CUDA execution providers,
//! compared map for map and timed. Needs onnxruntime-gpu 1.31.x and an NVIDIA GPU; `scripts/gpu-check` runs it.
//!
//! ```sh
//! cargo run --release --example gpu_check -- --ort-library PATH/libonnxruntime.so.1.31.1 [MODEL.onnx ...]
//! ```
//!
//! Exits 0 only if every model really runs on CUDA and every map and logit agrees with the CPU to 1e-3 of the
//! largest CPU value.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use camserve::config::{Config, ExecutionProvider, Limits, ModelConfig};
use camserve::engine::Caller;
use camserve::explain::{self, ExplainOptions, Explanation, Targets};
use camserve::onnx::runtime::{self, OnnxRuntime};
use camserve::registry::{Registry, ServedModel};
use clap::Parser;
use image::{Rgb, RgbImage};

/// Largest difference allowed, relative to the largest absolute CPU value.
const TOLERANCE: f32 = 1e-3;
const TOP_K: usize = 3;

#[derive(Parser)]
struct Args {
    /// libonnxruntime.so.1.31.x of onnxruntime-gpu; libonnxruntime_providers_cuda.so must sit beside it.
    #[arg(long, env = "CAMSERVE_ORT_LIBRARY")]
    ort_library: PathBuf,
    /// Timed calls per model and device (the median is reported), after warm-up calls.
    #[arg(long, default_value_t = 50)]
    runs: usize,
    #[arg(long, default_value_t = 5)]
    warmup: usize,
    /// Intra-op threads of each session (CPU and CUDA alike).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Model files meeting the camserve contract, or plain classifiers as FILE::TARGET (camserve differentiates
    /// their head at load).
    #[arg(default_values = ["models/efficientnet_lite0.onnx", "tests/fixtures/tiny_cnn.onnx"])]
    models: Vec<String>,
}

struct Row {
    model: String,
    /// The execution providers asked for, and the one obtained.
    asked: &'static str,
    device: ExecutionProvider,
    explain_ms: f64,
    run_ms: f64,
    map_error: Option<f32>,
    logits_error: Option<f32>,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,camserve=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let runtime = runtime::init(&args.ort_library)
        .with_context(|| format!("loading {}", args.ort_library.display()))?;
    println!(
        "ONNX Runtime {} from {}",
        runtime.version,
        args.ort_library.display()
    );
    if let Some(tf32) = std::env::var_os("NVIDIA_TF32_OVERRIDE") {
        // cuBLAS and cuDNN read it: 0 forbids TF32 tensor-core maths for float32.
        println!("NVIDIA_TF32_OVERRIDE={}", tf32.to_string_lossy());
    }

    let mut rows = Vec::new();
    let mut failures = Vec::new();
    for model in &args.models {
        let (file, target) = match model.split_once("::") {
            Some((file, target)) => (Path::new(file), Some(target)),
            None => (Path::new(model.as_str()), None),
        };
        match check_model(&runtime, &args, file, target, &mut rows) {
            Ok(problems) => failures.extend(problems),
            Err(e) => failures.push(format!("{model}: {e:#}")),
        }
    }

    println!();
    println!(
        "{:<20} {:<9} {:<6} {:>15} {:>12} {:>9} {:>9} {:>15} {:>13}",
        "model",
        "asked",
        "device",
        "explain median",
        "Run median",
        "speed-up",
        "(Run)",
        "max rel map err",
        "logits err"
    );
    for row in &rows {
        let cpu = rows
            .iter()
            .find(|r| r.model == row.model && r.asked == "cpu");
        let speedup = |ours: f64, theirs: Option<f64>| {
            theirs.map_or("-".into(), |t| format!("{:.2}x", t / ours))
        };
        let error = |e: Option<f32>| e.map_or("-".into(), |e| format!("{e:.2e}"));
        println!(
            "{:<20} {:<9} {:<6} {:>12.3} ms {:>9.3} ms {:>9} {:>9} {:>15} {:>13}",
            row.model,
            row.asked,
            row.device.to_string(),
            row.explain_ms,
            row.run_ms,
            speedup(row.explain_ms, cpu.map(|c| c.explain_ms)),
            speedup(row.run_ms, cpu.map(|c| c.run_ms)),
            error(row.map_error),
            error(row.logits_error),
        );
    }
    println!(
        "(explain: the whole pipeline, PNG bytes to maps and boxes, top_k={TOP_K}; Run: one bare model::run; \
         medians of {} calls after {} warm-up calls; {} intra-op threads; errors: max |cuda - cpu| / max |cpu|)",
        args.runs, args.warmup, args.threads
    );
    println!();
    if failures.is_empty() {
        println!("PASS: every model ran on CUDA and agreed with the CPU within {TOLERANCE:e}");
        Ok(())
    } else {
        for failure in &failures {
            println!("FAIL: {failure}");
        }
        std::process::exit(1);
    }
}

/// A model entry as a user would write it in the config file.
fn model_config(
    name: &str,
    file: &Path,
    plain_target: Option<&str>,
    providers: &str,
    threads: usize,
) -> anyhow::Result<ModelConfig> {
    let plain = plain_target.map_or(String::new(), |t| {
        format!("[models.plain]\ntarget = \"{t}\"\n")
    });
    let toml = format!(
        "[runtime]\nlibrary = \"x\"\n[[models]]\nname = \"{name}\"\nfile = \"{}\"\nexecution_providers = {providers}\n\
         threads = {threads}\n{plain}",
        file.display()
    );
    Ok(Config::from_toml(&toml, &std::env::current_dir()?)?
        .models
        .remove(0))
}

/// Checks one model; returns the failed checks, in words.
fn check_model(
    runtime: &OnnxRuntime,
    args: &Args,
    file: &Path,
    plain_target: Option<&str>,
    rows: &mut Vec<Row>,
) -> anyhow::Result<Vec<String>> {
    let name = file
        .file_stem()
        .map_or("model".into(), |s| s.to_string_lossy().into_owned());
    let cpu_config = model_config(&name, file, plain_target, r#"["cpu"]"#, args.threads)?;
    let cuda_config = model_config(
        &name,
        file,
        plain_target,
        r#"["cuda", "cpu"]"#,
        args.threads,
    )?;
    let cpu = load(runtime, &cpu_config)?;
    let cuda = load(runtime, &cuda_config)?;
    println!(
        "{name}: {} classes, input {}x{}, target layer `{}`, devices: cpu -> {}, [cuda, cpu] -> {}",
        cpu.info.num_classes(),
        cpu.info.preprocess.width,
        cpu.info.preprocess.height,
        cpu.info.target_layer,
        cpu.info.device,
        cuda.info.device
    );
    let mut problems = Vec::new();
    if cuda.info.device != ExecutionProvider::Cuda {
        let problem = format!(
            "{name}: the CUDA execution provider did not register; the session FELL BACK TO {} (see the warning \
             above for ONNX Runtime's reason)",
            cuda.info.device
        );
        println!("{problem}");
        problems.push(problem);
    }

    // The same images through both devices: the fixture PNGs and synthetic ones at the model's input size.
    let images = images(
        cpu.info.preprocess.width as u32,
        cpu.info.preprocess.height as u32,
    )?;
    let options = ExplainOptions {
        targets: Targets::TopK(TOP_K),
        ..ExplainOptions::default()
    };
    let limits = Limits::default();
    let (mut map_error, mut logits_error) = (0.0f32, 0.0f32);
    let caller = Caller::default();
    let ticket = caller.ticket();
    for (label, bytes) in &images {
        let on_cpu = explain::explain_image(&cpu, bytes, &limits, &options, &ticket)?;
        let mut on_cuda = explain::explain_image(&cuda, bytes, &limits, &options, &ticket)?;
        let classes = |e: &Explanation| e.targets.iter().map(|t| t.class).collect::<Vec<_>>();
        if classes(&on_cpu) != classes(&on_cuda) {
            // Near-tied scores may rank differently; compare the maps of the CPU's classes then.
            println!(
                "  {label}: top-{TOP_K} classes differ (cpu {:?}, cuda {:?}); comparing the cpu's classes",
                classes(&on_cpu),
                classes(&on_cuda)
            );
            let same = ExplainOptions {
                targets: Targets::Classes(classes(&on_cpu)),
                ..options.clone()
            };
            on_cuda = explain::explain_image(&cuda, bytes, &limits, &same, &ticket)?;
        }
        let logits = camserve::pipeline::cam::relative_difference(&on_cuda.logits, &on_cpu.logits);
        let maps = on_cpu
            .targets
            .iter()
            .zip(&on_cuda.targets)
            .map(|(c, g)| camserve::pipeline::cam::relative_difference(&g.raw.data, &c.raw.data))
            .fold(0.0f32, f32::max);
        println!(
            "  {label:<24} classes {:?}: map error {maps:.2e}, logits error {logits:.2e}",
            classes(&on_cpu)
        );
        map_error = map_error.max(maps);
        logits_error = logits_error.max(logits);
    }
    if map_error > TOLERANCE {
        problems.push(format!(
            "{name}: map error {map_error:e} exceeds {TOLERANCE:e}"
        ));
    }
    if logits_error > TOLERANCE {
        problems.push(format!(
            "{name}: logits error {logits_error:e} exceeds {TOLERANCE:e}"
        ));
    }

    // Timings on the last synthetic image (already at the input size, so no resize).
    let timed = images.last().unwrap().1.clone();
    for (asked, config, model) in [
        ("cpu", &cpu_config, &cpu),
        ("cuda,cpu", &cuda_config, &cuda),
    ] {
        let explain_time = median(args.warmup, args.runs, || {
            explain::explain_image(model, &timed, &limits, &options, &ticket).map(drop)
        })?;
        let run_time = bare_run_median(runtime, config, &timed, args)?;
        let is_cuda = asked != "cpu";
        rows.push(Row {
            model: name.clone(),
            asked,
            device: model.info.device,
            explain_ms: explain_time.as_secs_f64() * 1e3,
            run_ms: run_time.as_secs_f64() * 1e3,
            map_error: is_cuda.then_some(map_error),
            logits_error: is_cuda.then_some(logits_error),
        });
    }
    Ok(problems)
}

fn load(runtime: &OnnxRuntime, config: &ModelConfig) -> anyhow::Result<Arc<ServedModel>> {
    let registry = Registry::load(runtime, std::slice::from_ref(config))?;
    Ok(registry
        .get(&config.name)
        .context("the model is registered")?
        .clone())
}

/// Median of one bare Run (no decoding, no maps) on a session of its own, with an all-zero seed row per target.
fn bare_run_median(
    runtime: &OnnxRuntime,
    config: &ModelConfig,
    png: &[u8],
    args: &Args,
) -> anyhow::Result<Duration> {
    let model = camserve::onnx::model::CheckedModel::open(runtime, config)?;
    let (info, mut session) = (model.info, model.session);
    let image = camserve::pipeline::preprocess::decode(png, &Limits::default().decode_limits())?;
    let p = &info.preprocess;
    let mut input = vec![0.0f32; 3 * p.height * p.width];
    p.write_tensor(&image, &mut input);
    let seeds = vec![0.0f32; TOP_K * info.num_classes()];
    let mut times = Vec::with_capacity(args.runs);
    for i in 0..args.warmup + args.runs {
        let started = Instant::now();
        std::hint::black_box(camserve::onnx::session::run(
            &mut session,
            &input,
            [p.height, p.width],
            &seeds,
            TOP_K,
        )?);
        if i >= args.warmup {
            times.push(started.elapsed());
        }
    }
    times.sort();
    Ok(times[times.len() / 2])
}

fn median<F: FnMut() -> Result<(), explain::ExplainError>>(
    warmup: usize,
    runs: usize,
    mut f: F,
) -> anyhow::Result<Duration> {
    let mut times = Vec::with_capacity(runs);
    for i in 0..warmup + runs {
        let started = Instant::now();
        f()?;
        if i >= warmup {
            times.push(started.elapsed());
        }
    }
    times.sort();
    Ok(times[times.len() / 2])
}

/// The fixture PNGs, then three synthetic images at the model's input size, as (label, PNG bytes).
fn images(width: u32, height: u32) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/images");
    let dir = if dir.is_dir() {
        dir
    } else {
        PathBuf::from("tests/fixtures/images")
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("no fixture images in {}", dir.display());
    }
    let mut images = Vec::new();
    for file in files {
        let label = file.file_name().unwrap().to_string_lossy().into_owned();
        images.push((label, std::fs::read(&file)?));
    }
    let mut seed = 2024u32;
    let mut noise = move || {
        seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        (seed >> 24) as u8
    };
    let (w, h) = (width as f32, height as f32);
    let synthetic = [
        (
            "synthetic gradient",
            RgbImage::from_fn(width, height, |x, y| {
                Rgb([
                    (255.0 * x as f32 / w) as u8,
                    (255.0 * y as f32 / h) as u8,
                    128,
                ])
            }),
        ),
        (
            "synthetic checkerboard",
            RgbImage::from_fn(width, height, |x, y| {
                let on = ((x * 8 / width) + (y * 8 / height)).is_multiple_of(2);
                if on {
                    Rgb([230, 40, 40])
                } else {
                    Rgb([20, 60, 200])
                }
            }),
        ),
        (
            "synthetic noise+disc",
            RgbImage::from_fn(width, height, |x, y| {
                let (dx, dy) = (x as f32 / w - 0.35, y as f32 / h - 0.6);
                let n = noise();
                if dx * dx + dy * dy < 0.04 {
                    Rgb([240, 200 / 2 + n / 4, 30])
                } else {
                    Rgb([n, n / 2, 255 - n])
                }
            }),
        ),
    ];
    for (label, image) in synthetic {
        let mut png = std::io::Cursor::new(Vec::new());
        image.write_to(&mut png, image::ImageFormat::Png)?;
        images.push((label.to_string(), png.into_inner()));
    }
    Ok(images)
}
