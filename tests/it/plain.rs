//! Plain ONNX classifiers: camserve differentiates the head itself. Every model of the zoo in
//! tests/fixtures/plain (torchvision families from both torch exporters and older opsets, graphs written with
//! `onnx.helper` the way other frameworks write them) against PyTorch autograd on the same model and input, and
//! the served Grad-CAM map against pytorch-grad-cam's.

use camserve::config::PlainModel;
use camserve::config::{Config, ModelConfig};
use camserve::onnx::plain;
use ort::session::Session;
use ort::value::TensorRef;
use serde::Deserialize;

use crate::support::{TestServer, fixture, read_npy_file, runtime, scratch_dir};

const TOLERANCE: f32 = 1e-4;

#[derive(Deserialize)]
struct Zoo {
    #[serde(rename = "models")]
    cases: Vec<Case>,
    refused: Vec<Refused>,
}

#[derive(Deserialize)]
struct Case {
    model: String,
    exporter: String,
    opset: i64,
    target: String,
    target_shape: Vec<usize>,
    softmax: bool,
    head_ops: Vec<String>,
    input_size: [usize; 2],
    input: String,
    seeds: String,
    gradients: String,
    #[serde(default)]
    gradients_keep_softmax: Option<String>,
    logits: Vec<f32>,
    class: usize,
    #[serde(default)]
    gradcam: Option<String>,
    #[serde(default)]
    target_layout: Option<TargetLayout>,
}

/// How a zoo target maps to NCHW (`camserve.target_layout`).
#[derive(Deserialize, Debug)]
struct TargetLayout {
    layout: String,
    #[serde(default)]
    prefix_tokens: usize,
    #[serde(default)]
    grid: [usize; 2],
}

impl Case {
    /// The target's own shape after the batch: the tokens [T,D] of a token target, [h,w,C] of a channels-last one,
    /// else `target_shape`'s.
    fn raw_shape(&self) -> Vec<i64> {
        let [_, channels, h, w] = self.target_shape[..] else {
            panic!("{}", self.model)
        };
        match &self.target_layout {
            Some(l) if l.layout == "tokens" => {
                vec![
                    (l.prefix_tokens + l.grid[0] * l.grid[1]) as i64,
                    channels as i64,
                ]
            }
            Some(l) if l.layout == "nhwc" => vec![h as i64, w as i64, channels as i64],
            _ => vec![channels as i64, h as i64, w as i64],
        }
    }
}

#[derive(Deserialize)]
struct Refused {
    model: String,
    target: String,
    op: String,
    node: String,
}

impl Zoo {
    fn case(&self, model: &str) -> &Case {
        self.cases.iter().find(|c| c.model == model).unwrap()
    }
}

fn zoo() -> Zoo {
    serde_json::from_str(&std::fs::read_to_string(fixture("plain/cases.json")).unwrap()).unwrap()
}

fn file(path: &str) -> std::path::PathBuf {
    fixture(&format!("plain/{path}"))
}

fn npy(path: &str) -> (Vec<usize>, Vec<f32>) {
    read_npy_file(&fixture(&format!("plain/{path}")))
}

/// A zoo model augmented as the server would (at its input size).
fn augment_case(case: &Case, keep_softmax: bool) -> plain::Augmented {
    plain::augment(
        runtime(),
        &file(&case.model),
        &spec(case, keep_softmax),
        Some(case.input_size),
    )
    .unwrap_or_else(|e| panic!("{}: {e}", case.model))
}

fn spec(case: &Case, keep_softmax: bool) -> PlainModel {
    PlainModel {
        target: case.target.clone(),
        keep_softmax,
        ..Default::default()
    }
}

/// The contract's outputs of one Run of an augmented model: logits, activations, gradients, target_class.
fn run(
    model: &[u8],
    input: &[f32],
    size: [usize; 2],
    seeds: &[f32],
    k: usize,
) -> (Vec<f32>, Vec<usize>, Vec<f32>, Vec<i64>) {
    let mut session = Session::builder(&runtime().environment)
        .unwrap()
        .commit_from_memory(model)
        .unwrap();
    let n = input.len() / (3 * size[0] * size[1]);
    let classes = seeds.len() / (n * k);
    let outputs = session
        .run(ort::inputs![
            "input" => TensorRef::from_array_view(([n, 3, size[0], size[1]], input)).unwrap(),
            "class_weights" => TensorRef::from_array_view(([n, k, classes], seeds)).unwrap(),
        ])
        .unwrap();
    let tensor = |name: &str| {
        outputs[name]
            .try_extract_tensor::<f32>()
            .unwrap()
            .1
            .to_vec()
    };
    let (shape, _) = outputs["activations"].try_extract_tensor::<f32>().unwrap();
    let shape = shape.iter().map(|&d| d as usize).collect();
    let classes = outputs["target_class"]
        .try_extract_tensor::<i64>()
        .unwrap()
        .1
        .to_vec();
    (tensor("logits"), shape, tensor("gradients"), classes)
}

/// Gradients from camserve's augmented model equal PyTorch autograd's, for every model of the zoo, for one-hot
/// seeds, a weighted seed and an all-zero seed (the best class); logits and target shapes agree too.
#[test]
fn augmented_gradients_match_autograd_on_every_zoo_model() {
    let zoo = zoo();
    assert!(zoo.cases.len() >= 15, "only {} zoo models", zoo.cases.len());
    let mut exporters = std::collections::BTreeSet::new();
    for case in &zoo.cases {
        let augmented = augment_case(case, false);
        let (_, input) = npy(&case.input);
        let (seed_shape, reference_seeds) = npy(&case.seeds);
        let mut seeds = reference_seeds.clone();
        let (_, expected) = npy(&case.gradients);
        // An all-zero row first (row k of zeros is the k-th best class: here the best, the reference's first
        // row), then the reference's rows.
        let k = seed_shape[1];
        seeds.splice(0..0, vec![0.0; seed_shape[2]]);
        let (logits, shape, gradients, classes) =
            run(&augmented.model, &input, case.input_size, &seeds, k + 1);
        let block = expected.len() / k;
        assert_eq!(
            classes[0], case.class as i64,
            "{}: the all-zero row",
            case.model
        );
        let best = crate::support::max_relative_error(&gradients[..block], &expected[..block]);
        assert!(best < TOLERANCE, "{}: all-zero row {best}", case.model);
        let (gradients, classes) = (&gradients[block..], &classes[1..]);
        let logit_error = crate::support::max_relative_error(&logits, &case.logits);
        let error = crate::support::max_relative_error(gradients, &expected);
        println!(
            "{} ({} opset {}): head {:?}; logits {logit_error:.1e}, gradients {error:.1e} (relative)",
            case.model, case.exporter, case.opset, augmented.head_ops
        );
        assert_eq!(
            shape, case.target_shape,
            "{}: activations' shape",
            case.model
        );
        assert!(
            logit_error < TOLERANCE,
            "{}: logits {logit_error}",
            case.model
        );
        assert!(
            error < TOLERANCE,
            "{}: gradients {error} from autograd",
            case.model
        );
        // The reference's row 0 is the one-hot of `class`.
        assert_eq!(classes[0], case.class as i64, "{}", case.model);
        exporters.insert(case.exporter.clone());

        if let Some(path) = &case.gradients_keep_softmax {
            let kept = augment_case(case, true);
            let (_, _, gradients, _) =
                run(&kept.model, &input, case.input_size, &reference_seeds, k);
            let error = crate::support::max_relative_error(&gradients, &npy(path).1);
            println!("{} keep_softmax: gradients {error:.1e}", case.model);
            assert!(error < TOLERANCE, "{} keep_softmax: {error}", case.model);
        }
    }
    assert_eq!(exporters.len(), 3, "exporters covered: {exporters:?}");
}

/// A final Softmax is stripped by default (the gradients are of the scores, as Grad-CAM wants) and says so.
#[test]
fn a_final_softmax_is_stripped_unless_kept() {
    let zoo = zoo();
    let case = zoo
        .cases
        .iter()
        .find(|c| c.softmax)
        .expect("a zoo model that ends in Softmax");
    let stripped = augment_case(case, false);
    assert!(
        stripped.notes.iter().any(|n| n.contains("Softmax")),
        "{:?}",
        stripped.notes
    );
    let kept = augment_case(case, true);
    assert!(kept.notes.is_empty());
    let (_, input) = npy(&case.input);
    let (seed_shape, seeds) = npy(&case.seeds);
    let (logits, ..) = run(
        &stripped.model,
        &input,
        case.input_size,
        &seeds,
        seed_shape[1],
    );
    let (probabilities, ..) = run(&kept.model, &input, case.input_size, &seeds, seed_shape[1]);
    let sum: f32 = probabilities.iter().sum();
    assert!(
        (sum - 1.0).abs() < 1e-5,
        "kept: the outputs are probabilities (sum {sum})"
    );
    assert!(crate::support::max_relative_error(&logits, &case.logits) < TOLERANCE);
}

/// The tensors `camserve targets` proposes include each zoo model's target, with its shape and head.
#[test]
fn candidates_include_the_target_with_its_shape_and_head() {
    for case in zoo().cases.iter().filter(|c| c.exporter != "onnx-helper") {
        let candidates = plain::candidates(
            runtime(),
            &file(&case.model),
            Some(case.input_size),
            None,
            false,
        )
        .unwrap();
        let found = candidates
            .iter()
            .find(|c| c.name == case.target)
            .unwrap_or_else(|| panic!("{}: {} not among the candidates", case.model, case.target));
        assert_eq!(found.shape[1..], case.raw_shape()[..], "{}", case.model);
        assert_eq!(
            found.shape[0], -1,
            "{}: the batch dimension is dynamic",
            case.model
        );
        let mut got = found.head_ops.clone();
        let mut want = case.head_ops.clone();
        got.sort();
        want.sort();
        want.dedup();
        assert_eq!(got, want, "{}: head ops", case.model);
        assert!(
            found.unsupported.is_empty(),
            "{}: {:?}",
            case.model,
            found.unsupported
        );
        for c in &candidates {
            let dims: Vec<Option<i64>> = c.shape.iter().map(|&d| Some(d)).collect();
            let nchw = c.layout.nchw_dims(&dims);
            assert_eq!(nchw.len(), 4, "{}: {}", case.model, c.name);
            assert!(
                nchw[2].unwrap() * nchw[3].unwrap() > 1,
                "{}: {} is 1x1",
                case.model,
                c.name
            );
        }
        assert_eq!(
            candidates.iter().filter(|c| c.default.is_some()).count(),
            1,
            "{}: one default",
            case.model
        );
    }
}

/// A head with an op camserve cannot differentiate is refused, naming the op and the node; so is a wrong name.
#[test]
fn unsupported_ops_and_wrong_targets_are_refused_by_name() {
    let zoo = zoo();
    assert!(!zoo.refused.is_empty());
    for refused in &zoo.refused {
        let spec = PlainModel {
            target: refused.target.clone(),
            ..Default::default()
        };
        let error = match plain::augment(runtime(), &file(&refused.model), &spec, None) {
            Ok(_) => panic!("{}: augmented", refused.model),
            Err(e) => e,
        };
        println!("{}: {error}", refused.model);
        assert!(
            error.contains(&refused.op) && error.contains(&refused.node),
            "{}: {error}",
            refused.model
        );
    }
    let case = &zoo.cases[0];
    let spec = PlainModel {
        target: "no/such/tensor".into(),
        ..Default::default()
    };
    let error = plain::augment(runtime(), &file(&case.model), &spec, Some(case.input_size))
        .err()
        .unwrap();
    assert!(
        error.contains("no tensor is named `no/such/tensor`") && error.contains("camserve targets"),
        "{error}"
    );
}

fn plain_config(case: &Case, name: &str) -> ModelConfig {
    let toml = format!(
        "[runtime]\nlibrary = \"x\"\n[[models]]\nname = \"{name}\"\nfile = \"{}\"\n[models.plain]\ntarget = \"{}\"\n\
         [models.overrides]\ninput_size = [{}, {}]\n",
        fixture(&format!("plain/{}", case.model)).display(),
        case.target,
        case.input_size[0],
        case.input_size[1]
    );
    Config::from_toml(&toml, std::path::Path::new("/"))
        .unwrap()
        .models
        .remove(0)
}

/// Through the live server, a plain model's Grad-CAM equals pytorch-grad-cam's on the PyTorch model (ImageNet
/// preprocessing of a 64 px photo, the server's default for plain models, which is how the references were made).
#[tokio::test(flavor = "multi_thread")]
async fn served_gradcam_of_plain_models_matches_pytorch_grad_cam() {
    let zoo = zoo();
    let cases: Vec<(&Case, String)> = zoo
        .cases
        .iter()
        .filter(|c| c.gradcam.is_some())
        .map(|c| (c, crate::support::served_name(&c.model)))
        .collect();
    assert!(
        cases.len() >= 10,
        "only {} Grad-CAM references",
        cases.len()
    );
    let server = TestServer::builder()
        .models(cases.iter().map(|(c, name)| plain_config(c, name)))
        .start()
        .await;
    let image = std::fs::read(fixture("images/chelsea_64.png")).unwrap();
    for (case, name) in &cases {
        let query = format!(
            "/v1/models/{name}/explain?class={}&output=heatmap&heatmap=gray16",
            case.class
        );
        let response = server.post_image(&query, "image/png", image.clone()).await;
        assert_eq!(response.status(), 200, "{name}");
        let png = response.bytes().await.unwrap();
        let map: Vec<f32> = image::load_from_memory(&png)
            .unwrap()
            .into_luma16()
            .pixels()
            .map(|p| f32::from(p[0]) / 65535.0)
            .collect();
        let (_, expected) = npy(case.gradcam.as_ref().unwrap());
        assert_eq!(map.len(), expected.len(), "{name}");
        let error = map
            .iter()
            .zip(&expected)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        println!("{name}: served Grad-CAM {error:.1e} from pytorch-grad-cam");
        assert!(error < TOLERANCE, "{name}: {error}");
    }
}

/// Hugging Face classifiers exported by Hugging Face's own exporter (optimum-onnx, `make hf-export-fixture`): a
/// ViT, a DeiT with its distillation token and a Swin. The files leave height and width open: the size comes from
/// the preprocessor_config.json beside them, with its normalization, and the class names from config.json, with
/// no flag and no overrides. `targets` marks the last block's layernorm_before with its prefix tokens (Swin: its
/// view as a channels-last map, the same values), and the augmented gradients equal PyTorch autograd's for two
/// classes.
#[tokio::test(flavor = "multi_thread")]
async fn hugging_face_exports_are_read_with_the_files_beside_them() {
    #[derive(Deserialize)]
    struct Reference {
        target: String,
        layout: TargetLayout,
        shape: [usize; 3],
        classes: Vec<usize>,
        labels: Vec<String>,
        input_size: [usize; 2],
        logits: Vec<f32>,
    }
    for name in ["vit", "deit_distilled", "swin"] {
        let folder = fixture(&format!("hf_export/{name}"));
        let model = folder.join("model.onnx");
        let text = std::fs::read_to_string(folder.join("reference.json")).unwrap();
        let reference: Reference = serde_json::from_str(&text).unwrap();

        let candidates = plain::candidates(runtime(), &model, None, None, false).unwrap();
        let default = candidates.iter().find(|c| c.default.is_some()).unwrap();
        assert_eq!(default.name, reference.target, "{name}");
        let layout = match reference.layout.layout.as_str() {
            "nhwc" => plain::Layout::Nhwc,
            _ => plain::Layout::Tokens {
                prefix: reference.layout.prefix_tokens as i64,
                grid: reference.layout.grid.map(|side| side as i64),
            },
        };
        assert_eq!(default.layout, layout, "{name}");

        let spec = PlainModel {
            target: reference.target.clone(),
            ..Default::default()
        };
        let augmented = plain::augment(runtime(), &model, &spec, None).unwrap();
        let classes = reference.labels.len();
        let mut seeds = vec![0.0; 2 * classes];
        seeds[reference.classes[0]] = 1.0;
        seeds[classes + reference.classes[1]] = 1.0;
        let (_, input) = read_npy_file(&folder.join("input.npy"));
        let (logits, shape, gradients, _) =
            run(&augmented.model, &input, reference.input_size, &seeds, 2);
        assert_eq!(shape[1..], reference.shape, "{name}");
        let (_, expected) = read_npy_file(&folder.join("gradients.npy"));
        let error = crate::support::max_relative_error(&gradients, &expected);
        println!("optimum's {name}: gradients {error:.1e} from autograd");
        assert!(error < TOLERANCE, "{name}: gradients {error}");
        assert!(crate::support::max_relative_error(&logits, &reference.logits) < TOLERANCE);
    }

    // Served with nothing but the file and the target: the names, size and normalization of the files beside it.
    let folder = fixture("hf_export/vit");
    let reference: Reference =
        serde_json::from_str(&std::fs::read_to_string(folder.join("reference.json")).unwrap())
            .unwrap();
    let toml = format!(
        "[runtime]\nlibrary = \"x\"\n[[models]]\nname = \"vit\"\nfile = \"{}\"\n[models.plain]\ntarget = \"{}\"\n",
        folder.join("model.onnx").display(),
        reference.target
    );
    let config = Config::from_toml(&toml, std::path::Path::new("/")).unwrap();
    let server = TestServer::builder().models(config.models).start().await;
    let (status, info) = server.get_json("/v1/models/vit").await;
    assert_eq!(status, 200);
    assert_eq!(
        info["labels"],
        serde_json::json!(reference.labels),
        "{info}"
    );
    assert_eq!(
        info["input_size"],
        serde_json::json!({"width": 64, "height": 64}),
        "{info}"
    );
    assert_eq!(
        info["preprocess"]["mean"],
        serde_json::json!([0.5, 0.5, 0.5]),
        "{info}"
    );
    let image = std::fs::read(fixture("images/chelsea_64.png")).unwrap();
    let response = server
        .post_image("/v1/models/vit/explain?output=boxes", "image/png", image)
        .await;
    assert_eq!(response.status(), 200);
}

/// The server refuses a plain entry whose target is wrong at load, with the model's name and the reason.
#[test]
fn a_plain_entry_with_a_bad_target_is_refused_at_load() {
    let zoo = zoo();
    let mut config = plain_config(&zoo.cases[0], "bad");
    config.plain.as_mut().unwrap().target = "missing".into();
    let error = camserve::onnx::model::CheckedModel::open(runtime(), &config)
        .err()
        .unwrap()
        .to_string();
    assert!(
        error.starts_with("model `bad`") && error.contains("no tensor is named `missing`"),
        "{error}"
    );
}

/// `camserve targets` lists the target; `camserve augment` writes a file that is served like any exported contract model: the contract check and the
/// probe of the core accept it, and its maps equal the in-memory augmentation's.
#[test]
fn the_augment_command_writes_a_contract_model() {
    let zoo = zoo();
    let case = &zoo.cases[0];
    let dir = scratch_dir("augment");
    let out = dir.join("contract.onnx");
    let size = format!("{},{}", case.input_size[0], case.input_size[1]);
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_camserve"))
        .args(["augment", "--ort-library"])
        .arg(crate::support::ort_library())
        .arg(fixture(&format!("plain/{}", case.model)))
        .args(["--target", &case.target, "--input-size", &size, "-o"])
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    // `camserve targets` lists the target with its shape and head.
    let listing = targets_listing(&file(&case.model));
    let [_, channels, h, w] = case.target_shape[..] else {
        panic!()
    };
    let line = listing
        .lines()
        .find(|l| l.starts_with(&format!("{}  ", case.target)))
        .unwrap_or_else(|| panic!("{listing}"));
    assert!(
        line.contains(&format!("[N,{channels},{h},{w}]  head: ")),
        "{line}"
    );
    let config = crate::support::model_config("written", &out);
    let info = camserve::onnx::model::CheckedModel::open(runtime(), &config)
        .unwrap()
        .info;
    assert_eq!(info.target_layer, case.target);
    assert_eq!(info.activation_shape[..], case.target_shape[1..]);
    let written = std::fs::read(&out).unwrap();
    let in_memory = augment_case(case, false);
    assert_eq!(
        written, in_memory.model,
        "the command and the server augment alike"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A model read and written again by camserve's protobuf code runs exactly like the original file.
#[test]
fn a_model_read_and_written_again_runs_identically() {
    let path = fixture("tiny_cnn.onnx");
    let original = std::fs::read(&path).unwrap();
    let rewritten = plain::proto::ModelProto::decode_bytes(&original)
        .unwrap()
        .encode_bytes();
    let input: Vec<f32> = (0..3 * 64 * 64)
        .map(|i| (i % 13) as f32 / 6.0 - 1.0)
        .collect();
    let seeds = [vec![0.0; 10], {
        let mut v = vec![0.0; 10];
        v[4] = 1.0;
        v
    }]
    .concat();
    let a = run(&original, &input, [64, 64], &seeds, 2);
    let b = run(&rewritten, &input, [64, 64], &seeds, 2);
    assert_eq!(a, b);
    assert_eq!(a.3[1], 4);
}

/// Many exporters fix the batch dimension at 1; camserve frees it, so batched requests work on such a file too.
#[test]
fn a_file_with_a_fixed_batch_of_one_serves_batches() {
    use plain::proto::{DimensionValue, ModelProto, TypeValue};
    let zoo = zoo();
    let case = zoo.case("resnet_legacy_op11.onnx");
    let mut model = ModelProto::decode_bytes(&std::fs::read(file(&case.model)).unwrap()).unwrap();
    let graph = model.graph.as_mut().unwrap();
    for info in graph.input.iter_mut().chain(&mut graph.output) {
        let Some(TypeValue::TensorType(t)) = info.r#type.as_mut().unwrap().value.as_mut() else {
            panic!()
        };
        t.shape.as_mut().unwrap().dim[0].value = Some(DimensionValue::DimValue(1));
    }
    let dir = scratch_dir("fixed-batch");
    let fixed = dir.join("fixed.onnx");
    std::fs::write(&fixed, model.encode_bytes()).unwrap();
    // The file itself refuses a batch of 2 ...
    let mut session = Session::builder(&runtime().environment)
        .unwrap()
        .commit_from_file(&fixed)
        .unwrap();
    let (_, one) = npy(&case.input);
    let two = [one.clone(), one.clone()].concat();
    let input_name = session.inputs()[0].name().to_owned();
    let refused = session.run(ort::inputs![input_name.as_str() => TensorRef::from_array_view(([2, 3, 64, 64], two.as_slice())).unwrap()]);
    assert!(refused.is_err(), "the fixed file accepted a batch of 2");
    drop(refused);
    // ... the augmented one gives each image of a batch its own gradients.
    let augmented = plain::augment(runtime(), &fixed, &spec(case, false), None).unwrap();
    let (seed_shape, seeds) = npy(&case.seeds);
    let (_, _, gradients, _) = run(
        &augmented.model,
        &two,
        case.input_size,
        &[seeds.clone(), seeds].concat(),
        seed_shape[1],
    );
    let expected = npy(&case.gradients).1;
    let half = gradients.len() / 2;
    assert!(crate::support::max_relative_error(&gradients[..half], &expected) < TOLERANCE);
    assert!(crate::support::max_relative_error(&gradients[half..], &expected) < TOLERANCE);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Weights stored beside the model (ONNX external data, as the dynamo exporter writes large models) are read
/// from the model's folder; a location outside it is refused.
#[test]
fn external_weights_are_read_from_the_models_folder_only() {
    use plain::proto::{ModelProto, StringStringEntryProto};
    let zoo = zoo();
    let case = zoo.case("tf_like.onnx");
    let original = std::fs::read(file(&case.model)).unwrap();
    let dir = scratch_dir("external");
    let write = |location: &str| {
        let mut model = ModelProto::decode_bytes(&original).unwrap();
        let mut weights = Vec::new();
        for tensor in &mut model.graph.as_mut().unwrap().initializer {
            if tensor.raw_data.len() >= 1024 {
                let entry = |key: &str, value: String| StringStringEntryProto {
                    key: key.into(),
                    value,
                };
                tensor.external_data = vec![
                    entry("location", location.into()),
                    entry("offset", weights.len().to_string()),
                    entry("length", tensor.raw_data.len().to_string()),
                ];
                tensor.data_location = 1;
                weights.append(&mut tensor.raw_data);
            }
        }
        assert!(!weights.is_empty());
        std::fs::write(dir.join("weights.bin"), &weights).unwrap();
        let path = dir.join("model.onnx");
        std::fs::write(&path, model.encode_bytes()).unwrap();
        path
    };
    let inside = write("weights.bin");
    let augmented = plain::augment(
        runtime(),
        &inside,
        &spec(case, false),
        Some(case.input_size),
    )
    .unwrap();
    let (_, input) = npy(&case.input);
    let (seed_shape, seeds) = npy(&case.seeds);
    let (_, _, gradients, _) = run(
        &augmented.model,
        &input,
        case.input_size,
        &seeds,
        seed_shape[1],
    );
    assert!(crate::support::max_relative_error(&gradients, &npy(&case.gradients).1) < TOLERANCE);

    let outside = write("../weights.bin");
    let error = plain::augment(
        runtime(),
        &outside,
        &spec(case, false),
        Some(case.input_size),
    )
    .err()
    .unwrap();
    assert!(
        error.contains("`../weights.bin`, outside the model's folder"),
        "{error}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A Conv whose explicit padding is uneven and whose strided windows stop short of the input's end: the backward
/// then transposes without padding, pads and crops (what CUDA can run). Checked against central differences of the
/// plain model itself, which are exact here: the scores are quadratic in the input, and the target is a ReLU of an
/// all-positive input, so the target's gradient is the input's.
#[test]
fn uneven_padding_matches_finite_differences() {
    use plain::proto::{
        Attr, Dim, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto,
        ValueInfoProto,
    };
    const SIDE: usize = 65;
    let node = |op: &str, inputs: &[&str], output: &str, attrs: Vec<(&str, Attr)>| NodeProto {
        op_type: op.into(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        attribute: attrs.into_iter().map(|(n, a)| a.into_proto(n)).collect(),
        ..Default::default()
    };
    let values = |n: usize, seed: f32| -> Vec<f32> {
        (0..n)
            .map(|i| (i as f32 * 0.37 + seed).sin() * 0.5)
            .collect()
    };
    let n = Dim::Named("n".into());
    let graph = GraphProto {
        node: vec![
            node("Relu", &["x"], "t", vec![]),
            node(
                "Conv",
                &["t", "w"],
                "c",
                vec![
                    ("strides", Attr::Ints(vec![2, 2])),
                    ("pads", Attr::Ints(vec![1, 1, 0, 0])),
                ],
            ),
            node("Mul", &["c", "c"], "squares", vec![]),
            node("GlobalAveragePool", &["squares"], "pooled", vec![]),
            node("Flatten", &["pooled"], "flat", vec![]),
            node(
                "Gemm",
                &["flat", "fc"],
                "scores",
                vec![("transB", Attr::Int(1))],
            ),
        ],
        initializer: vec![
            TensorProto::floats("w", &[2, 3, 3, 3], &values(54, 1.0)),
            TensorProto::floats("fc", &[3, 2], &values(6, 2.0)),
        ],
        input: vec![ValueInfoProto::tensor(
            "x",
            plain::proto::data_type::FLOAT,
            Some(&[
                n.clone(),
                Dim::Fixed(3),
                Dim::Fixed(SIDE as i64),
                Dim::Fixed(SIDE as i64),
            ]),
        )],
        output: vec![ValueInfoProto::tensor(
            "scores",
            plain::proto::data_type::FLOAT,
            Some(&[n, Dim::Fixed(3)]),
        )],
        ..Default::default()
    };
    let model = ModelProto {
        ir_version: 8,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: 17,
        }],
        graph: Some(graph),
        ..Default::default()
    };
    let dir = scratch_dir("uneven-padding");
    let path = dir.join("uneven.onnx");
    std::fs::write(&path, model.encode_bytes()).unwrap();

    // The first channel's border pixels, where padding and cropping matter, are large; the rest small and
    // positive, so that the differences stay far above float32 rounding.
    let border: Vec<usize> = (0..SIDE)
        .flat_map(|i| [i, (SIDE - 1) * SIDE + i, i * SIDE, i * SIDE + SIDE - 1])
        .collect();
    let mut image: Vec<f32> = (0..3 * SIDE * SIDE)
        .map(|i| 0.01 + ((i * 7919) % 100) as f32 / 10000.0)
        .collect();
    for &pixel in &border {
        image[pixel] = 1.0 + (pixel % 7) as f32 / 10.0;
    }
    let seed = [1.0f32, -0.5, 0.25];
    let spec = PlainModel {
        target: "t".into(),
        ..Default::default()
    };
    let augmented = plain::augment(runtime(), &path, &spec, None).unwrap();
    let (_, _, gradients, _) = run(&augmented.model, &image, [SIDE, SIDE], &seed, 1);

    // +-h for each border pixel (it stays positive, so the ReLU is the identity), all in one Run.
    let h = 0.5f32;
    let mut batch = Vec::with_capacity(2 * border.len() * image.len());
    for &pixel in &border {
        for sign in [1.0, -1.0] {
            let mut nudged = image.clone();
            nudged[pixel] += sign * h;
            batch.extend(nudged);
        }
    }
    let mut session = Session::builder(&runtime().environment)
        .unwrap()
        .commit_from_file(&path)
        .unwrap();
    let outputs = session
        .run(ort::inputs!["x" => TensorRef::from_array_view(([2 * border.len(), 3, SIDE, SIDE], batch.as_slice())).unwrap()])
        .unwrap();
    let scores = outputs["scores"]
        .try_extract_tensor::<f32>()
        .unwrap()
        .1
        .to_vec();
    let weighted =
        |row: usize| -> f64 { (0..3).map(|c| (scores[row * 3 + c] * seed[c]) as f64).sum() };
    let differences: Vec<f32> = (0..border.len())
        .map(|p| ((weighted(2 * p) - weighted(2 * p + 1)) / (2.0 * h as f64)) as f32)
        .collect();
    let served: Vec<f32> = border.iter().map(|&pixel| gradients[pixel]).collect();
    let error = crate::support::max_relative_error(&served, &differences);
    println!(
        "uneven padding: {error:.1e} from central differences over {} border pixels",
        border.len()
    );
    assert!(error < 1e-3, "{error}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// On a ViT, `camserve targets` offers the token sequences [N,T,32] (1 class token, 2 with DeiT's distillation
/// token, 5 with 4 registers; a 4x4 grid) and maps on the grid only, never a tensor inside attention
/// ([N,heads,T,d], or [N*heads,T,d] from the legacy exporter); the default is the input of the last block's
/// attention, the target pytorch-grad-cam recommends (the zoo's), with the reason, and not Hugging Face's query,
/// key or value projections, which are token sequences too but reach one side of the attention only.
#[test]
fn targets_of_a_vit_are_its_token_sequences_with_the_last_attention_input_by_default() {
    let zoo = zoo();
    let vits: Vec<&Case> = zoo
        .cases
        .iter()
        .filter(|c| {
            c.target_layout
                .as_ref()
                .is_some_and(|l| l.layout == "tokens")
        })
        .collect();
    assert_eq!(vits.len(), 7);
    for case in vits {
        let layout = case.target_layout.as_ref().unwrap();
        let candidates =
            plain::candidates(runtime(), &file(&case.model), None, None, false).unwrap();
        let tokens = candidates
            .iter()
            .filter(|c| matches!(c.layout, plain::Layout::Tokens { .. }))
            .count();
        assert!(tokens >= 10, "{}: {tokens} token targets", case.model);
        for c in &candidates {
            match &c.layout {
                plain::Layout::Tokens { prefix, grid } => {
                    // [N,T,32]: never [N*heads,T,16], the heads' queries, keys or values
                    assert_eq!(c.shape[2], 32, "{}: {}", case.model, c.name);
                    assert_eq!(c.shape[1], prefix + grid[0] * grid[1]);
                    // the patch tokens before the prefix tokens are prepended have none
                    assert!(
                        *prefix == 0 || *prefix as usize == layout.prefix_tokens,
                        "{}: {prefix} prefix tokens",
                        c.name
                    );
                    assert_eq!(*grid, [4, 4]);
                }
                // never [N,2,17,16] or [N,2,17,17]
                plain::Layout::Nchw => assert_eq!(c.shape[2..], [4, 4], "{}", c.name),
                plain::Layout::Nhwc => assert_eq!(c.shape[1..3], [4, 4], "{}", c.name),
            }
        }
        let expected = plain::Layout::Tokens {
            prefix: layout.prefix_tokens as i64,
            grid: [4, 4],
        };
        assert_default_is_the_last_attention_input(case, &candidates, expected);
    }
    // The command line marks it.
    let case = zoo.case("vit_legacy_op17.onnx");
    let listing = targets_listing(&file(&case.model));
    let marked: Vec<&str> = listing
        .lines()
        .filter(|l| l.contains("<- default"))
        .collect();
    assert_eq!(marked.len(), 1, "{listing}");
    assert!(
        marked[0].starts_with(&format!("{}  [N,17,32]  head: ", case.target))
            && marked[0].contains("layout: tokens (1 prefix, 4x4 grid)"),
        "{}",
        marked[0]
    );
}

/// On a Swin (torchvision v1 and v2, timm), `camserve targets` offers the channels-last maps of the stages'
/// grids (16x16, 8x8), never the windows ([N*windows,w,w,C]), the padded maps, the attention's tensors (timm's
/// [N*16,heads,16,16] has a grid's shape: its first axis is 16 at batch size 1) or the position bias computed
/// from constants; the default is the last block's first norm, pytorch-grad-cam's Swin target (the zoo's),
/// channels-last, not the cyclic shift of it that timm computes next (Swin v2's blocks are post-norm: there it is
/// the last block's input). timm's later stages are NHWC by their shape alone: its patch merging hides the
/// Transpose.
#[test]
fn targets_of_a_swin_are_its_channels_last_stage_maps_with_the_last_attention_input_by_default() {
    let zoo = zoo();
    let swins: Vec<&Case> = zoo
        .cases
        .iter()
        .filter(|c| c.model.contains("swin_"))
        .collect();
    assert_eq!(swins.len(), 6);
    for case in swins {
        let candidates =
            plain::candidates(runtime(), &file(&case.model), None, None, false).unwrap();
        for c in &candidates {
            let dims: Vec<Option<i64>> = c.shape.iter().map(|&d| Some(d)).collect();
            let nchw = c.layout.nchw_dims(&dims);
            let grid = [nchw[2].unwrap(), nchw[3].unwrap()];
            assert!(
                grid == [16, 16] || grid == [8, 8],
                "{}: {} {:?} is on no stage's grid",
                case.model,
                c.name,
                c.shape
            );
            assert_eq!(
                c.shape[0], -1,
                "{}: {} is not per image",
                case.model, c.name
            );
            assert!(c.unsupported.is_empty(), "{}: {:?}", c.name, c.unsupported);
        }
        let last_stage = candidates
            .iter()
            .filter(|c| c.layout == plain::Layout::Nhwc && c.shape[1..3] == [8, 8])
            .count();
        assert!(
            last_stage >= 15,
            "{}: {last_stage} channels-last maps on 8x8",
            case.model
        );
        assert_default_is_the_last_attention_input(case, &candidates, plain::Layout::Nhwc);
    }
}

/// Exactly one candidate is the default: the zoo's target, in `layout`, marked as an attention's input.
fn assert_default_is_the_last_attention_input(
    case: &Case,
    candidates: &[plain::Candidate],
    layout: plain::Layout,
) {
    let default: Vec<_> = candidates.iter().filter(|c| c.default.is_some()).collect();
    assert_eq!(default.len(), 1, "{}", case.model);
    assert_eq!(default[0].name, case.target, "{}: the default", case.model);
    assert_eq!(default[0].layout, layout, "{}", case.model);
    assert!(default[0].default.as_ref().unwrap().contains("attention"));
}

/// A token target's layout is inferred with no flag and recorded in the metadata; overrides replace the guess;
/// a layout that does not fit is refused naming the override.
#[test]
fn token_layouts_are_inferred_recorded_and_overridable() {
    use plain::proto::ModelProto;
    let zoo = zoo();
    let case = zoo.case("vit_legacy_op17.onnx");
    let metadata = |model: &[u8]| -> String {
        ModelProto::decode_bytes(model)
            .unwrap()
            .metadata_props
            .iter()
            .find(|p| p.key == "camserve.target_layout")
            .unwrap()
            .value
            .clone()
    };
    let inferred = augment_case(case, false);
    assert_eq!(
        metadata(&inferred.model),
        r#"{"layout":"tokens","prefix_tokens":1,"grid":[4,4]}"#
    );
    // The same values given explicitly give the same model.
    let explicit = PlainModel {
        layout: Some(camserve::config::LayoutKind::Tokens),
        prefix_tokens: Some(1),
        grid: Some([4, 4]),
        ..spec(case, false)
    };
    let given = plain::augment(runtime(), &file(&case.model), &explicit, None).unwrap();
    assert_eq!(given.model, inferred.model);
    // A 2x8 grid holds the 16 patch tokens too: accepted as given.
    let wide = PlainModel {
        grid: Some([2, 8]),
        ..spec(case, false)
    };
    let wide = plain::augment(runtime(), &file(&case.model), &wide, None).unwrap();
    assert!(metadata(&wide.model).contains(r#""grid":[2,8]"#));
    // Refused: a grid larger than the tokens; a 4-D layout for tokens.
    let too_large = PlainModel {
        grid: Some([5, 5]),
        ..spec(case, false)
    };
    let channels_last = PlainModel {
        layout: Some(camserve::config::LayoutKind::Nhwc),
        ..spec(case, false)
    };
    for (bad, says) in [
        (too_large, "--grid HxW and --prefix-tokens P"),
        (channels_last, "needs a 4-D tensor"),
    ] {
        let error = plain::augment(runtime(), &file(&case.model), &bad, None)
            .err()
            .unwrap();
        assert!(error.contains(says), "{error}");
    }
    // A CNN's map is recorded as NCHW, a Swin's as channels-last.
    let cnn = augment_case(zoo.case("resnet_legacy_op11.onnx"), false);
    assert_eq!(metadata(&cnn.model), r#"{"layout":"nchw"}"#);
    let swin = augment_case(zoo.case("swin_legacy_op17.onnx"), false);
    assert_eq!(metadata(&swin.model), r#"{"layout":"nhwc"}"#);
    // timm's Swin: channels-last by its shape on the 8x8 grid (its patch merging hides the Transpose).
    let timm_swin = augment_case(zoo.case("timm_swin_dynamo_op18.onnx"), false);
    assert_eq!(metadata(&timm_swin.model), r#"{"layout":"nhwc"}"#);
}

/// What `camserve targets FILE` prints; it must succeed.
fn targets_listing(model: &std::path::Path) -> String {
    let listing = std::process::Command::new(env!("CARGO_BIN_EXE_camserve"))
        .args(["targets", "--ort-library"])
        .arg(crate::support::ort_library())
        .arg(model)
        .output()
        .unwrap();
    assert!(listing.status.success());
    String::from_utf8(listing.stdout).unwrap()
}
