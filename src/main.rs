use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

use camserve::config::{Config, LayoutKind, ModelConfig, Overrides, PlainModel};
use camserve::engine::Caller;
use camserve::explain::{self, ExplainOptions, Targets};
use camserve::http::{self, AppState};
use camserve::onnx::runtime::{self, OnnxRuntime};
use camserve::pipeline::render;
use camserve::registry::Registry;

#[derive(Parser)]
#[command(
    version,
    about = "Grad-CAM explanations for ONNX image classifiers, over HTTP"
)]
struct Cli {
    /// Log format: plain text, or one JSON object per line.
    #[arg(
        long,
        global = true,
        env = "CAMSERVE_LOG_FORMAT",
        default_value = "plain"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Plain,
    Json,
}

#[derive(clap::Args)]
struct Setup {
    /// A config file; without one, the built-in defaults (config/default.toml as shipped).
    #[arg(long, env = "CAMSERVE_CONFIG")]
    config: Option<PathBuf>,
    /// Overrides `runtime.library` of the config.
    #[arg(long, env = "CAMSERVE_ORT_LIBRARY")]
    ort_library: Option<PathBuf>,
}

impl Setup {
    fn config(&self, overrides: Overrides) -> anyhow::Result<Config> {
        let overrides = Overrides {
            ort_library: self.ort_library.clone(),
            ..overrides
        };
        Ok(Config::load(self.config.as_deref(), overrides)?)
    }
}

#[derive(clap::Args)]
struct PlainArgs {
    /// The class scores, when they are not the graph's first output.
    #[arg(long)]
    output: Option<String>,
    /// Differentiate a final Softmax instead of stripping it.
    #[arg(long)]
    keep_softmax: bool,
    /// HEIGHT,WIDTH of the input, when the file leaves them open.
    #[arg(long, value_parser = parse_size)]
    input_size: Option<[usize; 2]>,
}

/// Overrides of the target's layout, for models camserve cannot read it from.
#[derive(clap::Args)]
struct LayoutArgs {
    /// The target's layout: tokens ([N,T,D]), nhwc or nchw (default: inferred).
    #[arg(long)]
    layout: Option<LayoutKind>,
    /// Tokens before the patch tokens (class, distillation, registers) of a token target.
    #[arg(long)]
    prefix_tokens: Option<usize>,
    /// The patch grid HxW of a token target (default: from the patch embedding).
    #[arg(long, value_parser = parse_grid)]
    grid: Option<[usize; 2]>,
}

fn parse_grid(text: &str) -> Result<[usize; 2], String> {
    let parts: Vec<usize> = text
        .split(['x', 'X'])
        .map(|p| p.trim().parse::<usize>())
        .collect::<Result<_, _>>()
        .map_err(|_| format!("`{text}` is not HxW"))?;
    match parts[..] {
        [h, w] if h > 0 && w > 0 => Ok([h, w]),
        _ => Err(format!("`{text}` is not HxW")),
    }
}

fn parse_size(text: &str) -> Result<[usize; 2], String> {
    let parts: Vec<usize> = text
        .split(',')
        .map(|p| p.trim().parse())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{e}"))?;
    match parts.as_slice() {
        &[height, width] => Ok([height, width]),
        _ => Err("expected HEIGHT,WIDTH".into()),
    }
}

#[derive(Subcommand)]
enum Command {
    /// Serve the configured models over HTTP.
    Serve {
        #[command(flatten)]
        setup: Setup,
        /// Overrides `server.bind` of the config.
        #[arg(long, env = "CAMSERVE_BIND")]
        bind: Option<SocketAddr>,
        /// Turns the admin API on; overrides `admin.token` of the config.
        #[arg(long, env = "CAMSERVE_ADMIN_TOKEN", hide_env_values = true)]
        admin_token: Option<String>,
        /// Label Studio's API token; overrides `label_studio.api_key` of the config.
        #[arg(long, env = "CAMSERVE_LABEL_STUDIO_API_KEY", hide_env_values = true)]
        label_studio_api_key: Option<String>,
    },
    /// Explain one image with one model, without HTTP: writes the overlay PNG, prints the JSON summary.
    Explain {
        #[command(flatten)]
        setup: Setup,
        /// A model of the config, or a contract model's file (camserve-export's, or `camserve augment`'s).
        #[arg(long)]
        model: String,
        image: PathBuf,
        #[arg(short, long)]
        output: PathBuf,
        /// A class index or label; repeatable. Default: the top class.
        #[arg(long)]
        class: Vec<String>,
        #[arg(long, default_value_t = 0.5)]
        alpha: f32,
    },
    /// Lists the tensors of a plain ONNX classifier that can be its target, on the path to the scores: maps
    /// [N,C,h,w] or [N,h,w,C] larger than 1x1 and token sequences [N,T,D] on the patch grid, each with its shape,
    /// the ops of its head and its layout; the one to use by default is marked, with the reason.
    Targets {
        #[command(flatten)]
        setup: Setup,
        /// A plain ONNX classifier: image in, class scores out.
        model: PathBuf,
        #[command(flatten)]
        plain: PlainArgs,
    },
    /// Writes a plain ONNX classifier in contract form: the head's gradients appended as ONNX nodes, the same
    /// augmentation a `[models.plain]` entry gets at load. The original file is not modified.
    Augment {
        #[command(flatten)]
        setup: Setup,
        model: PathBuf,
        /// The target tensor (see `camserve targets`).
        #[arg(long)]
        target: String,
        /// Where to write the augmented model.
        #[arg(short = 'o', long = "out")]
        out: PathBuf,
        #[command(flatten)]
        plain: PlainArgs,
        #[command(flatten)]
        layout: LayoutArgs,
    },
    /// Exits 0 if the server answers 200 on its readiness URL: the container's HEALTHCHECK, which has no curl.
    Healthcheck {
        /// A plain-HTTP URL; the default matches the container's bind address.
        #[arg(
            long,
            env = "CAMSERVE_HEALTHCHECK_URL",
            default_value = "http://127.0.0.1:8080/readyz"
        )]
        url: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let result = match cli.command {
        Command::Serve {
            setup,
            bind,
            admin_token,
            label_studio_api_key,
        } => serve(
            setup,
            Overrides {
                bind,
                admin_token,
                label_studio_api_key,
                ..Overrides::default()
            },
        ),
        Command::Explain {
            setup,
            model,
            image,
            output,
            class,
            alpha,
        } => explain_file(setup, &model, &image, &output, &class, alpha),
        Command::Targets {
            setup,
            model,
            plain,
        } => list_targets(&setup, &model, &plain),
        Command::Augment {
            setup,
            model,
            target,
            out,
            plain,
            layout,
        } => augment_file(&setup, &model, target, &out, plain, layout),
        Command::Healthcheck { url } => healthcheck(&url),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("camserve: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    // ONNX Runtime's own log is verbose; keep its warnings only.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,ort=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Plain => builder.init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init(),
    }
}

fn load_runtime(config: &Config) -> anyhow::Result<OnnxRuntime> {
    let runtime = runtime::init(&config.runtime.library)?;
    tracing::info!(version = %runtime.version, library = %config.runtime.library.display(), "ONNX Runtime loaded");
    Ok(runtime)
}

/// Loads ONNX Runtime and the config's models (only `only` when given).
fn load_models(config: &Config, only: Option<&str>) -> anyhow::Result<(OnnxRuntime, Registry)> {
    let runtime = load_runtime(config)?;
    let models: Vec<_> = config
        .models
        .iter()
        .filter(|m| only.is_none_or(|name| m.name == name))
        .cloned()
        .collect();
    if let Some(name) = only
        && models.is_empty()
    {
        bail!("no model named `{name}` in the config");
    }
    let registry = Registry::load(&runtime, &models)?;
    Ok((runtime, registry))
}

fn serve(setup: Setup, overrides: Overrides) -> anyhow::Result<()> {
    let config = setup.config(overrides)?;
    let (runtime, registry) = load_models(&config, None)?;
    let state = Arc::new(AppState::new(&config, runtime, registry)?);
    tracing::info!(
        admin_api = state.admin.is_some(),
        "admin API {}",
        if state.admin.is_some() { "on" } else { "off" }
    );
    let bind = config.server.bind;
    let tokio_runtime = tokio::runtime::Runtime::new()?;
    tokio_runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(bind)
            .await
            .with_context(|| format!("cannot bind {bind}"))?;
        tracing::info!(address = %listener.local_addr()?, "serving");
        http::serve(listener, state, shutdown_signal(), config.server.shutdown()).await?;
        tracing::info!("stopped");
        Ok(())
    })
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing SIGTERM handler");
    tokio::select! {
        _ = interrupt => {},
        _ = terminate.recv() => {},
    }
    tracing::info!("shutdown requested: finishing requests in flight");
}

fn explain_file(
    setup: Setup,
    model_name: &str,
    image: &Path,
    output: &Path,
    classes: &[String],
    alpha: f32,
) -> anyhow::Result<()> {
    let mut config = setup.config(Overrides::default())?;
    // A file given instead of a configured name is served as a model of that name, at the defaults.
    if !config.models.iter().any(|m| m.name == model_name) && Path::new(model_name).is_file() {
        let file = std::path::absolute(model_name)?;
        config.models.push(ModelConfig::new(model_name, file));
    }
    let (_, registry) = load_models(&config, Some(model_name))?;
    let model = registry.get(model_name).expect("loaded above").clone();
    let targets = if classes.is_empty() {
        Targets::TopK(1)
    } else {
        Targets::Classes(
            classes
                .iter()
                .map(|c| explain::resolve_class(&model.info, c))
                .collect::<Result<_, _>>()?,
        )
    };
    let bytes = std::fs::read(image).with_context(|| format!("cannot read {}", image.display()))?;
    let options = ExplainOptions {
        targets,
        // The overlay is drawn at the photo's full size.
        drawn_side: Some(usize::MAX),
        ..ExplainOptions::default()
    };
    let caller = Caller::default();
    let explanation =
        explain::explain_image(&model, &bytes, &config.limits, &options, &caller.ticket())?;
    let target = &explanation.targets[0];
    let (width, height) = explanation.photo_size;
    let heat = target.heat_rows(width, height);
    let overlay = render::overlay_rows(&explanation.image, alpha, |y, row| heat.row(y, row));
    std::fs::write(output, render::encode_png(&overlay)?)
        .with_context(|| format!("cannot write {}", output.display()))?;
    let summary: Vec<_> = explanation
        .targets
        .iter()
        .map(|t| {
            serde_json::json!({
                "class": t.class,
                "label": model.info.labels[t.class],
                "probability": explanation.probabilities[t.class],
                "boxes": t.boxes.iter().map(|b| [b.x_min, b.y_min, b.x_max, b.y_max]).collect::<Vec<_>>(),
            })
        })
        .collect();
    println!(
        "{}",
        serde_json::to_string_pretty(
            &serde_json::json!({ "model": model_name, "explanations": summary })
        )?
    );
    Ok(())
}

fn list_targets(setup: &Setup, model: &Path, plain: &PlainArgs) -> anyhow::Result<()> {
    let runtime = load_runtime(&setup.config(Overrides::default())?)?;
    let candidates = camserve::onnx::plain::candidates(
        &runtime,
        model,
        plain.input_size,
        plain.output.as_deref(),
        plain.keep_softmax,
    )
    .map_err(|e| anyhow::anyhow!("{}: {e}", model.display()))?;
    if candidates.is_empty() {
        bail!(
            "{}: no spatial tensor (a map [N,C,h,w] or [N,h,w,C] larger than 1x1, or tokens [N,T,D] on the patch \
             grid) leads to the scores",
            model.display()
        );
    }
    for c in candidates {
        let shape: Vec<String> = c
            .shape
            .iter()
            .map(|d| if *d < 0 { "N".into() } else { d.to_string() })
            .collect();
        let refused = if c.unsupported.is_empty() {
            String::new()
        } else {
            format!("  (refused: {})", c.unsupported.join(", "))
        };
        let default = c
            .default
            .map(|why| format!("  <- default: {why}"))
            .unwrap_or_default();
        println!(
            "{}  [{}]  head: {}{refused}  layout: {}{default}",
            c.name,
            shape.join(","),
            c.head_ops.join(" "),
            c.layout.describe()
        );
    }
    Ok(())
}

fn augment_file(
    setup: &Setup,
    model: &Path,
    target: String,
    out: &Path,
    plain: PlainArgs,
    layout: LayoutArgs,
) -> anyhow::Result<()> {
    let runtime = load_runtime(&setup.config(Overrides::default())?)?;
    let spec = PlainModel {
        target,
        output: plain.output,
        keep_softmax: plain.keep_softmax,
        layout: layout.layout,
        prefix_tokens: layout.prefix_tokens,
        grid: layout.grid,
    };
    let augmented = camserve::onnx::plain::augment(&runtime, model, &spec, plain.input_size)
        .map_err(|e| anyhow::anyhow!("{}: {e}", model.display()))?;
    std::fs::write(out, &augmented.model)
        .with_context(|| format!("cannot write {}", out.display()))?;
    for note in &augmented.notes {
        eprintln!("note: {note}");
    }
    eprintln!(
        "head: {}; {} backward nodes; shapes probed in {:.1} ms, graph written in {:.1} ms",
        augmented.head_ops.join(" "),
        augmented.backward_nodes,
        augmented.probe_time.as_secs_f64() * 1e3,
        augmented.edit_time.as_secs_f64() * 1e3
    );
    Ok(())
}

/// One HTTP/1.1 GET over a plain socket, bounded in time: the probe must not hang the container runtime.
fn healthcheck(url: &str) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    use std::net::{TcpStream, ToSocketAddrs};
    use std::time::Duration;

    const TIMEOUT: Duration = Duration::from_secs(3);
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("`{url}`: only http:// URLs are supported"))?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = if path.is_empty() { "/" } else { path };
    let address = if authority.contains(':') {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    let socket = address
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve `{authority}`"))?
        .next()
        .with_context(|| format!("`{authority}` has no address"))?;
    let mut stream = TcpStream::connect_timeout(&socket, TIMEOUT)
        .with_context(|| format!("cannot connect to {socket}"))?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: camserve-healthcheck\r\nConnection: close\r\n\r\n"
    )?;
    // The status line is all we need; it fits in the first read of any real server's answer.
    let mut head = [0u8; 64];
    let read = stream.read(&mut head).context("no answer")?;
    let status_line = String::from_utf8_lossy(&head[..read]);
    let status = status_line
        .split_whitespace()
        .nth(1)
        .with_context(|| format!("not an HTTP answer: {status_line:?}"))?;
    if status != "200" {
        bail!("{url} answered {status}");
    }
    Ok(())
}
