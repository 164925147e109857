//! One Run of a contract model over a batch of images, and its outputs split per image.

use ort::session::Session;
use ort::value::TensorRef;

use crate::onnx::contract::{
    ACTIVATIONS, CLASS_WEIGHTS, GRADIENTS, INPUT, INPUT_GRADIENTS, LOGITS, TARGET_CLASS,
    extra_activations, extra_gradients,
};

/// The outputs of one Run for one image: logits [C], activations [Ch,h,w], gradients [K,Ch,h,w], classes [K].
#[derive(Debug, Clone)]
pub struct RunOutput {
    pub logits: Vec<f32>,
    pub activations: Vec<f32>,
    pub activation_shape: [usize; 3],
    pub gradients: Vec<f32>,
    pub target_class: Vec<usize>,
    /// The extra target layers, when the model has them, in its order.
    pub extra_layers: Vec<Layer>,
    /// `input_gradients` [K,3,H,W], when the model has them.
    pub input_gradients: Option<Vec<f32>>,
}

/// One extra target layer's outputs for one image: activations [Ch,h,w], gradients [K,Ch,h,w].
#[derive(Debug, Clone)]
pub struct Layer {
    pub activations: Vec<f32>,
    pub activation_shape: [usize; 3],
    pub gradients: Vec<f32>,
}

impl RunOutput {
    /// The gradient block of the k-th seed, [Ch,h,w].
    pub fn gradient(&self, k: usize) -> &[f32] {
        let len = self.activations.len();
        &self.gradients[k * len..(k + 1) * len]
    }
}

impl Layer {
    /// The gradient block of the k-th seed, [Ch,h,w].
    pub fn gradient(&self, k: usize) -> &[f32] {
        let len = self.activations.len();
        &self.gradients[k * len..(k + 1) * len]
    }
}

/// One Run over a batch: `inputs` holds N preprocessed images [N,3,H,W], `seeds` N x K rows of C class
/// weights. Returns one output per image, with the optional outputs the model has: ONNX Runtime runs the whole
/// graph whatever outputs are fetched, so a model exported with them pays for them on every Run.
pub fn run(
    session: &mut Session,
    inputs: &[f32],
    size: [usize; 2],
    seeds: &[f32],
    k: usize,
) -> ort::Result<Vec<RunOutput>> {
    let n = inputs.len() / (3 * size[0] * size[1]);
    let classes = seeds.len() / (n * k);
    let extra_layers = extra_layer_count(session);
    let guided = has_output(session, INPUT_GRADIENTS);
    let outputs = session.run(ort::inputs![
        INPUT => TensorRef::from_array_view(([n, 3, size[0], size[1]], inputs))?,
        CLASS_WEIGHTS => TensorRef::from_array_view(([n, k, classes], seeds))?,
    ])?;
    let (_, logits) = outputs[LOGITS].try_extract_tensor::<f32>()?;
    let (act_shape, activations) = outputs[ACTIVATIONS].try_extract_tensor::<f32>()?;
    let (_, gradients) = outputs[GRADIENTS].try_extract_tensor::<f32>()?;
    let (_, target_class) = outputs[TARGET_CLASS].try_extract_tensor::<i64>()?;
    let activation_shape = [
        act_shape[1] as usize,
        act_shape[2] as usize,
        act_shape[3] as usize,
    ];
    let shape_error =
        |what: &str| ort::Error::new(format!("the model returned {what} of an unexpected size"));
    if logits.len() != n * classes || activations.len() % n != 0 {
        return Err(shape_error("logits or activations"));
    }
    if gradients.len() != k * activations.len() {
        return Err(shape_error("gradients"));
    }
    if target_class.len() != n * k || target_class.iter().any(|&c| c < 0 || c as usize >= classes) {
        return Err(shape_error("target_class"));
    }
    let mut layers = Vec::with_capacity(extra_layers);
    for i in 1..=extra_layers {
        let (shape, activations) =
            outputs[extra_activations(i).as_str()].try_extract_tensor::<f32>()?;
        let (_, gradients) = outputs[extra_gradients(i).as_str()].try_extract_tensor::<f32>()?;
        if shape.len() != 4
            || activations.len() % n != 0
            || gradients.len() != k * activations.len()
        {
            return Err(shape_error(&format!("activations_{i} or gradients_{i}")));
        }
        let shape = [shape[1] as usize, shape[2] as usize, shape[3] as usize];
        layers.push((shape, activations, gradients));
    }
    let input_gradients = if guided {
        let (_, values) = outputs[INPUT_GRADIENTS].try_extract_tensor::<f32>()?;
        if values.len() != k * inputs.len() {
            return Err(shape_error(INPUT_GRADIENTS));
        }
        Some(values)
    } else {
        None
    };
    let per_image = activations.len() / n;
    // Image i's block of an output whose rows are images (`per_row` values each).
    let block = |values: &[f32], i: usize| {
        let per_row = values.len() / n;
        values[i * per_row..(i + 1) * per_row].to_vec()
    };
    Ok((0..n)
        .map(|i| RunOutput {
            logits: logits[i * classes..(i + 1) * classes].to_vec(),
            activations: activations[i * per_image..(i + 1) * per_image].to_vec(),
            activation_shape,
            gradients: gradients[i * k * per_image..(i + 1) * k * per_image].to_vec(),
            target_class: target_class[i * k..(i + 1) * k]
                .iter()
                .map(|&c| c as usize)
                .collect(),
            extra_layers: layers
                .iter()
                .map(|(shape, a, g)| Layer {
                    activations: block(a, i),
                    activation_shape: *shape,
                    gradients: block(g, i),
                })
                .collect(),
            input_gradients: input_gradients.map(|values| block(values, i)),
        })
        .collect())
}

/// How many `activations_i` outputs the model has (i = 1, 2, ... without gaps; the contract check ensures it).
pub fn extra_layer_count(session: &Session) -> usize {
    (1..)
        .take_while(|i| has_output(session, &extra_activations(*i)))
        .count()
}

pub fn has_output(session: &Session, name: &str) -> bool {
    session.outputs().iter().any(|o| o.name() == name)
}
