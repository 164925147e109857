//! The baseline for `make bench`: the bare ONNX Runtime Run of a contract model from Rust, through the same
//! library, session options and thread count the service uses, with no decoding, maps or HTTP.
//!
//! bench_ort run ORT_LIBRARY MODEL THREADS ITERATIONS
//!     one image, top-1 then top-5: one JSON object per line {"batch", "k", "median_ms", "p99_ms", "images_per_s"}
//! bench_ort throughput ORT_LIBRARY MODEL THREADS BATCH SECONDS
//!     Runs of BATCH images (top-1) back to back for SECONDS: one JSON object {"batch", "images_per_s",
//!     "median_ms"}; the benchmark starts several at once to measure sessions side by side
//! bench_ort plain ORT_LIBRARY PLAIN_MODEL TARGET THREADS ITERATIONS
//!     a plain classifier (`camserve::onnx::plain`): how long augmenting takes, and its Run against the augmented
//!     model's (batch 1, top-1), in alternating blocks: one JSON object
//! bench_ort conditions ORT_LIBRARY MODEL PHOTO.jpg THREADS ITERATIONS
//!     whether what camserve does around a Run slows the Run. Runs go to a session thread through a channel, as
//!     in camserve, and each follows one of four conditions, taken in turn Run by Run so that the machine's
//!     drift hits them alike: back to back; after 2.5 ms idle; after the caller decoded the photo and encoded two
//!     PNGs of it; on the photo's tensor instead of made-up values. One JSON object per condition
//!     {"condition", "median_ms", "p25_ms", "p75_ms"}
//! bench_ort inputs PHOTO.png DIR
//!     writes the benchmark's request bodies: photo_224.jpg, photo_640x480.jpg and photo_4000x3000.jpg

use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use camserve::config::Config;
use camserve::pipeline::preprocess::{DecodeLimits, Preprocess};
use ort::session::Session;
use ort::value::TensorRef;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["run", library, model, threads, iterations] => {
            bare_runs(library, model, threads.parse()?, iterations.parse()?)
        }
        ["throughput", library, model, threads, batch, seconds] => throughput(
            library,
            model,
            threads.parse()?,
            batch.parse()?,
            seconds.parse()?,
        ),
        ["plain", library, model, target, threads, iterations] => plain_runs(
            library,
            model,
            target,
            threads.parse()?,
            iterations.parse()?,
        ),
        ["conditions", library, model, photo, threads, iterations] => conditions(
            library,
            model,
            Path::new(photo),
            threads.parse()?,
            iterations.parse()?,
        ),
        ["inputs", photo, dir] => write_inputs(Path::new(photo), Path::new(dir)),
        _ => anyhow::bail!(
            "usage: bench_ort run ORT_LIBRARY MODEL THREADS ITERATIONS | \
             throughput ORT_LIBRARY MODEL THREADS BATCH SECONDS | \
             plain ORT_LIBRARY PLAIN_MODEL TARGET THREADS ITERATIONS | \
             conditions ORT_LIBRARY MODEL PHOTO.jpg THREADS ITERATIONS | inputs PHOTO.png DIR"
        ),
    }
}

/// A 224 px JPEG of the photo, and a 640 x 480 (a COCO image's size) and a 4000 x 3000 (12 MP, a phone's) one with
/// fine noise so that they encode like real photos.
fn write_inputs(photo: &Path, dir: &Path) -> anyhow::Result<()> {
    let photo = image::open(photo)?.to_rgb8();
    let small = camserve::pipeline::preprocess::resize(&photo, 224, 224);
    small.save_with_format(dir.join("photo_224.jpg"), image::ImageFormat::Jpeg)?;
    for (width, height) in [(640, 480), (4000, 3000)] {
        let mut large = camserve::pipeline::preprocess::resize(&photo, width, height);
        for (i, pixel) in large.pixels_mut().enumerate() {
            let noise = ((i as u32).wrapping_mul(2_654_435_761) >> 29) as u8;
            pixel.0 = pixel.0.map(|v| v.saturating_add(noise));
        }
        large.save_with_format(
            dir.join(format!("photo_{width}x{height}.jpg")),
            image::ImageFormat::Jpeg,
        )?;
    }
    Ok(())
}

/// The model's session as camserve opens it, its input height, width and class count, and its preprocessing.
fn open(
    library: &str,
    model: &str,
    threads: usize,
) -> anyhow::Result<(Session, [usize; 3], Preprocess)> {
    let runtime = camserve::onnx::runtime::init(Path::new(library))?;
    let toml = format!(
        "[runtime]\nlibrary = \"{library}\"\n[[models]]\nname = \"m\"\nfile = \"{model}\"\nthreads = {threads}\n\
         split_under_load = false\n"
    );
    let config = Config::from_toml(&toml, &std::env::current_dir()?)?
        .models
        .remove(0);
    let model = camserve::onnx::model::CheckedModel::open(&runtime, &config)?;
    let info = &model.info;
    let dims = [
        info.preprocess.height,
        info.preprocess.width,
        info.num_classes(),
    ];
    Ok((model.session, dims, info.preprocess.clone()))
}

/// The inputs of one Run: `batch` made-up images with `k` all-zero seed rows each (the top-k classes).
struct Inputs {
    shape: [usize; 4],
    input: Vec<f32>,
    seeds_shape: [usize; 3],
    seeds: Vec<f32>,
}

impl Inputs {
    fn new(dims: [usize; 3], batch: usize, k: usize) -> Self {
        let [height, width, classes] = dims;
        Inputs {
            shape: [batch, 3, height, width],
            input: (0..batch * 3 * height * width)
                .map(|i| ((i % 97) as f32 / 48.0) - 1.0)
                .collect(),
            seeds_shape: [batch, k, classes],
            seeds: vec![0.0; batch * k * classes],
        }
    }

    fn run(&self, session: &mut Session) -> anyhow::Result<()> {
        drop(session.run(ort::inputs![
            "input" => TensorRef::from_array_view((self.shape, self.input.as_slice()))?,
            "class_weights" => TensorRef::from_array_view((self.seeds_shape, self.seeds.as_slice()))?,
        ])?);
        Ok(())
    }
}

fn throughput(
    library: &str,
    model: &str,
    threads: usize,
    batch: usize,
    seconds: f64,
) -> anyhow::Result<()> {
    let (mut session, dims, _) = open(library, model, threads)?;
    let inputs = Inputs::new(dims, batch, 1);
    for _ in 0..3 {
        inputs.run(&mut session)?;
    }
    let started = Instant::now();
    let mut times = Vec::new();
    while started.elapsed().as_secs_f64() < seconds {
        let run = Instant::now();
        inputs.run(&mut session)?;
        times.push(run.elapsed().as_secs_f64() * 1e3);
    }
    let images_per_s = (times.len() * batch) as f64 / started.elapsed().as_secs_f64();
    times.sort_by(f64::total_cmp);
    let median_ms = times[times.len() / 2];
    println!(
        "{}",
        serde_json::json!({"batch": batch, "images_per_s": images_per_s, "median_ms": median_ms})
    );
    Ok(())
}

fn bare_runs(library: &str, model: &str, threads: usize, iterations: usize) -> anyhow::Result<()> {
    let (mut session, dims, _) = open(library, model, threads)?;
    // Top-1 against top-5 for one image; throughput over batch sizes is `throughput`'s.
    for (batch, k) in [(1, 1), (1, 5)] {
        let inputs = Inputs::new(dims, batch, k);
        let mut times = Vec::with_capacity(iterations);
        for i in 0..iterations + 5 {
            let started = Instant::now();
            inputs.run(&mut session)?;
            if i >= 5 {
                times.push(started.elapsed().as_secs_f64() * 1e3);
            }
        }
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        let p99 = times[(times.len() * 99 / 100).min(times.len() - 1)];
        println!(
            "{}",
            serde_json::json!({
                "batch": batch, "k": k, "median_ms": median, "p99_ms": p99,
                "images_per_s": batch as f64 * 1e3 / median,
            })
        );
    }
    Ok(())
}

fn conditions(
    library: &str,
    model: &str,
    photo: &Path,
    threads: usize,
    iterations: usize,
) -> anyhow::Result<()> {
    const CONDITIONS: [&str; 4] = [
        "back to back",
        "after 2.5 ms idle",
        "after decode and encode",
        "photo",
    ];
    let (mut session, dims, preprocess) = open(library, model, threads)?;
    let jpeg = std::fs::read(photo)?;
    let decode = || camserve::pipeline::preprocess::decode(&jpeg, &DecodeLimits::default());
    let made_up = Inputs::new(dims, 1, 1);
    let mut photo_input = Inputs::new(dims, 1, 1);
    preprocess.write_tensor(&decode()?, &mut photo_input.input);
    let (jobs, received) = mpsc::channel::<(&Inputs, mpsc::Sender<f64>)>();
    let mut times = vec![Vec::with_capacity(iterations); CONDITIONS.len()];
    std::thread::scope(|scope| -> anyhow::Result<()> {
        scope.spawn(move || {
            for (inputs, reply) in received {
                let started = Instant::now();
                let ran = inputs.run(&mut session);
                let _ =
                    reply.send(ran.map_or(f64::NAN, |()| started.elapsed().as_secs_f64() * 1e3));
            }
        });
        let run = |inputs| -> anyhow::Result<f64> {
            let (reply, answer) = mpsc::channel();
            jobs.send((inputs, reply))
                .map_err(|_| anyhow::anyhow!("the session thread stopped"))?;
            let ms = answer.recv()?;
            anyhow::ensure!(ms.is_finite(), "a Run failed");
            Ok(ms)
        };
        for _ in 0..5 {
            run(&made_up)?;
        }
        for i in 0..iterations * CONDITIONS.len() {
            let condition = i % CONDITIONS.len();
            match condition {
                1 => std::thread::sleep(Duration::from_micros(2500)),
                2 => {
                    let image = decode()?;
                    for _ in 0..2 {
                        camserve::pipeline::render::encode_png(&image)?;
                    }
                }
                _ => {}
            }
            let inputs = if condition == 3 {
                &photo_input
            } else {
                &made_up
            };
            times[condition].push(run(inputs)?);
        }
        drop(jobs);
        Ok(())
    })?;
    for (condition, mut times) in CONDITIONS.into_iter().zip(times) {
        times.sort_by(f64::total_cmp);
        let at = |q: usize| times[times.len() * q / 4];
        println!(
            "{}",
            serde_json::json!({"condition": condition, "median_ms": at(2), "p25_ms": at(1), "p75_ms": at(3)})
        );
    }
    Ok(())
}

fn plain_runs(
    library: &str,
    model: &str,
    target: &str,
    threads: usize,
    iterations: usize,
) -> anyhow::Result<()> {
    let runtime = camserve::onnx::runtime::init(Path::new(library))?;
    let spec = camserve::config::PlainModel {
        target: target.to_owned(),
        ..Default::default()
    };
    let started = Instant::now();
    let augmented = camserve::onnx::plain::augment(&runtime, Path::new(model), &spec, None)
        .map_err(anyhow::Error::msg)?;
    let augment_ms = started.elapsed().as_secs_f64() * 1e3;
    let session = |from: &[u8]| -> ort::Result<Session> {
        Session::builder(&runtime.environment)
            .and_then(|b| Ok(b.with_intra_threads(threads)?.with_inter_threads(1)?))?
            .commit_from_memory(from)
    };
    let mut plain = Session::builder(&runtime.environment)
        .and_then(|b| Ok(b.with_intra_threads(threads)?.with_inter_threads(1)?))?
        .commit_from_file(model)?;
    let mut contract = session(&augmented.model)?;
    let input_name = plain.inputs()[0].name().to_owned();
    let probe = |s: &Session, name: &str| match s
        .inputs()
        .iter()
        .find(|i| i.name() == name)
        .map(|i| i.dtype())
    {
        Some(ort::value::ValueType::Tensor { shape, .. }) => shape.to_vec(),
        _ => Vec::new(),
    };
    let dims = probe(&contract, "input");
    let classes = probe(&contract, "class_weights")[2] as usize;
    let (height, width) = (dims[2] as usize, dims[3] as usize);
    let input: Vec<f32> = (0..3 * height * width)
        .map(|i| ((i % 97) as f32 / 48.0) - 1.0)
        .collect();
    let seeds = vec![0.0f32; classes];
    // Blocks of 20 Runs of each, alternated: a session's idle threads spin for a while after a Run, and would
    // slow the other session's next Run if they took turns every Run (camserve has one session per model).
    let (mut plain_times, mut contract_times) = (Vec::new(), Vec::new());
    for block in 0..iterations.div_ceil(20) + 1 {
        for _ in 0..20 {
            let started = Instant::now();
            drop(plain.run(ort::inputs![
                input_name.as_str() => TensorRef::from_array_view(([1, 3, height, width], input.as_slice()))?,
            ])?);
            if block > 0 {
                plain_times.push(started.elapsed().as_secs_f64() * 1e3);
            }
        }
        for _ in 0..20 {
            let started = Instant::now();
            drop(contract.run(ort::inputs![
                "input" => TensorRef::from_array_view(([1, 3, height, width], input.as_slice()))?,
                "class_weights" => TensorRef::from_array_view(([1, 1, classes], seeds.as_slice()))?,
            ])?);
            if block > 0 {
                contract_times.push(started.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
    let median = |times: &mut Vec<f64>| {
        times.sort_by(f64::total_cmp);
        times[times.len() / 2]
    };
    let (plain_ms, augmented_ms) = (median(&mut plain_times), median(&mut contract_times));
    println!(
        "{}",
        serde_json::json!({
            "model": model, "head": augmented.head_ops, "augment_ms": augment_ms,
            "probe_ms": augmented.probe_time.as_secs_f64() * 1e3,
            "edit_ms": augmented.edit_time.as_secs_f64() * 1e3,
            "plain_ms": plain_ms, "augmented_ms": augmented_ms, "ratio": augmented_ms / plain_ms,
        })
    );
    Ok(())
}
