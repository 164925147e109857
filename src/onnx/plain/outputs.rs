//! The contract's side of the augmented graph: its input and output names claimed, the `class_weights` input and
//! the seeds, `target_class` and `gradients` computed from it, the graph's signature, and the `camserve.*`
//! metadata.

use super::BATCH;
use super::emit::Writer;
use super::graph::{all_names, free_batch, graph_mut, rename};
use super::layout::Layout;
use super::proto::{Attr, Dim, GraphProto, StringStringEntryProto, ValueInfoProto, data_type};
use super::read::Plain;
use crate::onnx::contract::{
    ACTIVATIONS, CLASS_WEIGHTS, CONTRACT_VERSION, GRADIENTS, INPUT, LOGITS, TARGET_CLASS,
    metadata_key,
};

/// The names the contract gives the graph's tensors.
const CONTRACT_NAMES: [&str; 6] = [
    INPUT,
    CLASS_WEIGHTS,
    LOGITS,
    ACTIVATIONS,
    GRADIENTS,
    TARGET_CLASS,
];

/// A plain file says nothing of its preprocessing: torchvision's ImageNet normalization is assumed.
const IMAGENET_PREPROCESS: &str = r#"{"resize": "stretch", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "channel_order": "RGB", "value_range": [0.0, 1.0]}"#;

/// Moves tensors named like the contract's inputs and outputs out of the way, names the image input `input`,
/// and returns the target's (possibly new) name.
pub fn claim_names(plain: &mut Plain, target: &str) -> Result<String, String> {
    if target == plain.input {
        return Err(
            "the target is the image input; choose a layer (`camserve targets` lists them)".into(),
        );
    }
    let graph = graph_mut(&mut plain.model);
    if !graph
        .node
        .iter()
        .any(|n| n.output.iter().any(|o| o == target))
    {
        return Err(format!(
            "no tensor is named `{target}` (`camserve targets` lists the candidates)"
        ));
    }
    let mut target = target.to_owned();
    let taken = all_names(graph);
    for name in CONTRACT_NAMES {
        if taken.contains(name) && !(name == INPUT && plain.input == INPUT) {
            let new = (0..)
                .map(|i| format!("{name}_original{i}"))
                .find(|n| !taken.contains(n))
                .expect("a free name");
            rename(graph, name, &new);
            for s in [&mut target, &mut plain.output, &mut plain.input] {
                if s == name {
                    *s = new.clone();
                }
            }
        }
    }
    rename(graph, &plain.input, INPUT);
    plain.input = INPUT.into();
    Ok(target)
}

/// Appends the seeds from `class_weights` (an all-zero row is the k-th best class), `target_class`, and the Loop
/// of the backward `body` over the seeds, stacked into `gradients` [N,K,...].
pub fn append(w: &mut Writer, scores: &str, seeds: &str, class_count: i64, body: GraphProto) {
    let (k, best) = best_classes(w, scores);
    let row_sums = w.reduce("ReduceL1", CLASS_WEIGHTS, &[2], false);
    let zero = w.float(0.0);
    let empty = w.op("Equal", &[&row_sums, &zero], vec![]);
    write_seeds(w, &best, &empty, class_count, seeds);
    write_target_class(w, &best, &empty);
    write_gradients(w, &k, body);
}

/// K (the seed count, [1]) and the K best classes of each row, [N,K].
fn best_classes(w: &mut Writer, scores: &str) -> (String, String) {
    let weights_shape = w.shape(CLASS_WEIGHTS);
    let (one, two) = (w.ints(&[1]), w.ints(&[2]));
    let k = w.op("Slice", &[&weights_shape, &one, &two], vec![]);
    let ranking = vec![
        ("axis", Attr::Int(-1)),
        ("largest", Attr::Int(1)),
        ("sorted", Attr::Int(1)),
    ];
    let best = w.op_n("TopK", &[scores, &k], 2, ranking).remove(1);
    (k, best)
}

/// The seeds [N,K,C]: the `class_weights` row, or where it is all zero (`empty`), the one-hot row of the best
/// class of that rank.
fn write_seeds(w: &mut Writer, best: &str, empty: &str, class_count: i64, seeds: &str) {
    let classes = w.ints(&[class_count]);
    let one_hot_values = w.floats(&[2], &[0.0, 1.0]);
    let one_hot = w.op(
        "OneHot",
        &[best, &classes, &one_hot_values],
        vec![("axis", Attr::Int(-1))],
    );
    let empty_rows = w.unsqueeze(empty, &[2]);
    w.node(
        "Where",
        &[&empty_rows, &one_hot, CLASS_WEIGHTS],
        &[seeds.to_owned()],
        vec![],
    );
}

/// `target_class` [N,K]: the best class of that rank for an all-zero row, else the row's largest weight.
fn write_target_class(w: &mut Writer, best: &str, empty: &str) {
    let weighted = w.op(
        "ArgMax",
        &[CLASS_WEIGHTS],
        vec![("axis", Attr::Int(2)), ("keepdims", Attr::Int(0))],
    );
    w.node(
        "Where",
        &[empty, best, &weighted],
        &[TARGET_CLASS.into()],
        vec![],
    );
}

/// `gradients`: the Loop's K scan outputs [K,N,...], transposed to [N,K,...].
fn write_gradients(w: &mut Writer, k: &str, body: GraphProto) {
    let trips = w.op("Squeeze", &[k], vec![]);
    let stacked = w.op(
        "Loop",
        &[&trips, ""],
        vec![("body", Attr::Graph(Box::new(body)))],
    );
    let perm = Attr::Ints(vec![1, 0, 2, 3, 4]);
    w.node(
        "Transpose",
        &[&stacked],
        &[GRADIENTS.into()],
        vec![("perm", perm)],
    );
}

/// Gives the graph the contract's signature: the `class_weights` input, the four outputs, the scores and the
/// target renamed to `logits` and `activations` (no copies), a free batch size.
pub fn declare(
    graph: &mut GraphProto,
    scores: &str,
    target: &str,
    class_count: i64,
    target_dims: &[Option<i64>],
) {
    let (n, k) = (Dim::Named(BATCH.into()), Dim::Named("K".into()));
    let layer: Vec<Dim> = target_dims[1..]
        .iter()
        .map(|d| d.map_or(Dim::Named("batch".into()), Dim::Fixed))
        .collect();
    let with =
        |lead: &[Dim]| -> Vec<Dim> { lead.iter().cloned().chain(layer.iter().cloned()).collect() };
    let classes = Dim::Fixed(class_count);
    graph.input.push(ValueInfoProto::tensor(
        CLASS_WEIGHTS,
        data_type::FLOAT,
        Some(&[n.clone(), k.clone(), classes.clone()]),
    ));
    graph.output = vec![
        ValueInfoProto::tensor(LOGITS, data_type::FLOAT, Some(&[n.clone(), classes])),
        ValueInfoProto::tensor(
            ACTIVATIONS,
            data_type::FLOAT,
            Some(&with(std::slice::from_ref(&n))),
        ),
        ValueInfoProto::tensor(
            GRADIENTS,
            data_type::FLOAT,
            Some(&with(&[n.clone(), k.clone()])),
        ),
        ValueInfoProto::tensor(TARGET_CLASS, data_type::INT64, Some(&[n, k])),
    ];
    rename(graph, scores, LOGITS);
    rename(graph, target, ACTIVATIONS);
    free_batch(graph, INPUT);
}

/// The `camserve.*` metadata a plain file lacks (keys it has are kept): the class names of Hugging Face's
/// config.json beside it, else class indices, as labels; its preprocessor_config.json's preprocessing, else
/// ImageNet's; the input size, the target's name and its layout (how it was mapped to NCHW).
pub fn write_metadata(
    plain: &mut Plain,
    class_count: i64,
    target: &str,
    head_ops: &[String],
    layout: &Layout,
) {
    let [height, width] = plain.input_size;
    let labels: Vec<String> = match &plain.hugging_face.labels {
        Some(names) if names.len() as i64 == class_count => {
            plain
                .notes
                .push("class names from config.json beside it".into());
            names.clone()
        }
        Some(names) => {
            plain.notes.push(format!(
                "config.json beside it names {} classes, the scores have {class_count}: numbered labels",
                names.len()
            ));
            (0..class_count).map(|c| c.to_string()).collect()
        }
        None => (0..class_count).map(|c| c.to_string()).collect(),
    };
    let preprocess = plain
        .hugging_face
        .preprocess
        .as_deref()
        .unwrap_or(IMAGENET_PREPROCESS);
    let metadata = [
        ("contract_version", CONTRACT_VERSION.to_owned()),
        (
            "labels",
            serde_json::to_string(&labels).expect("strings serialize"),
        ),
        ("input_size", format!("[{height}, {width}]")),
        ("preprocess", preprocess.to_owned()),
        ("target_layer", target.to_owned()),
        ("target_layout", layout.metadata()),
        (
            "source",
            format!(
                "plain ONNX classifier; head {} differentiated by camserve",
                head_ops.join(" ")
            ),
        ),
    ];
    for (key, value) in metadata {
        let key = metadata_key(key);
        if !plain.model.metadata_props.iter().any(|p| p.key == key) {
            plain
                .model
                .metadata_props
                .push(StringStringEntryProto { key, value });
        }
    }
}
