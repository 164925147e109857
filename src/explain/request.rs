//! Whether a model can answer a request, checked before any work: the one place that the HTTP routes, the Label
//! Studio backend and `camserve explain` share. Parsing (query strings, command-line flags) happens at the edges;
//! what depends on the model and the limits is here.

use crate::config::Limits;
use crate::explain::{ExplainOptions, Targets};
use crate::onnx::model::ModelInfo;
use crate::pipeline::cam::CamMethod;

/// Why a model cannot answer a request; each kind has its own error code at the HTTP edge.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("{0}")]
    ClassOutOfRange(String),
    #[error("{0}")]
    TooManyClasses(String),
    #[error("{0}")]
    TooManyChannels(String),
    #[error("{0}")]
    MissingInputGradients(String),
    #[error("{0}")]
    MissingLayer(String),
    /// Options that do not go together.
    #[error("{0}")]
    Invalid(String),
}

/// A class given as an index or a label (see [`ModelInfo::class_index`]).
pub fn resolve_class(info: &ModelInfo, class: &str) -> Result<usize, RequestError> {
    info.class_index(class).ok_or_else(|| {
        RequestError::ClassOutOfRange(if class.parse::<usize>().is_ok() {
            format!(
                "class {class} is out of range: the model has classes 0 to {}",
                info.num_classes() - 1
            )
        } else {
            format!(
                "no class is labelled `{class}`; GET /v1/models/{} lists the labels",
                info.name
            )
        })
    })
}

/// `layers`: `all`, or a comma-separated list of layer names or indices (0 is the model's target layer, i its
/// i-th extra layer); absent: the target layer alone.
pub fn resolve_layers(info: &ModelInfo, value: Option<&str>) -> Result<Vec<usize>, RequestError> {
    let names = info.layer_names();
    let list = match value {
        None => return Ok(vec![0]),
        Some("all") => return Ok((0..names.len()).collect()),
        Some(list) => list,
    };
    let mut chosen = Vec::new();
    for item in list.split(',') {
        let index = names
            .iter()
            .position(|n| *n == item)
            .or_else(|| item.parse::<usize>().ok().filter(|&i| i < names.len()));
        let Some(index) = index else {
            let known: Vec<String> = names.iter().map(|n| format!("`{n}`")).collect();
            return Err(RequestError::MissingLayer(format!(
                "model `{}` has no target layer `{item}`; it has {} (by name or index), or `all`",
                info.name,
                known.join(", ")
            )));
        };
        if chosen.contains(&index) {
            return Err(RequestError::Invalid(format!(
                "`layers` names layer `{}` twice",
                names[index]
            )));
        }
        chosen.push(index);
    }
    Ok(chosen)
}

impl ExplainOptions {
    /// How many targets get a seed row in the Run.
    pub fn target_count(&self) -> usize {
        match &self.targets {
            Targets::TopK(k) => *k,
            Targets::Classes(list) | Targets::BestOf(list, _) => list.len(),
        }
    }

    /// Everything about these options that depends on the model and the server's limits.
    pub fn check(&self, info: &ModelInfo, limits: &Limits) -> Result<(), RequestError> {
        let classes = info.num_classes();
        if let Targets::Classes(list) | Targets::BestOf(list, _) = &self.targets
            && let Some(class) = list.iter().find(|&&c| c >= classes)
        {
            return Err(resolve_class(info, &class.to_string()).expect_err("out of range"));
        }
        let count = self.target_count();
        if count == 0 {
            return Err(RequestError::Invalid("no class to explain".into()));
        }
        if count > classes {
            return Err(RequestError::ClassOutOfRange(format!(
                "{count} classes asked for, the model has {classes}"
            )));
        }
        let max_classes = limits.max_classes_per_request;
        if count > max_classes {
            return Err(RequestError::TooManyClasses(format!(
                "{count} classes asked for; at most {max_classes} per request"
            )));
        }
        self.check_method(limits)?;
        self.check_model_outputs(info)
    }

    fn check_method(&self, limits: &Limits) -> Result<(), RequestError> {
        if self.max_channels == 0 {
            return Err(RequestError::Invalid(
                "`max_channels` must be at least 1".into(),
            ));
        }
        if self.max_channels > limits.max_score_cam_channels {
            return Err(RequestError::TooManyChannels(format!(
                "`max_channels` {} is over this server's limit of {} Score-CAM channels",
                self.max_channels, limits.max_score_cam_channels
            )));
        }
        if self.method == CamMethod::ScoreCam && self.layers != [0] {
            return Err(RequestError::Invalid(
                "`layers` combines the gradient methods' maps; method=scorecam uses the target layer only".into(),
            ));
        }
        Ok(())
    }

    /// Guided backpropagation and extra layers need outputs that not every model has.
    fn check_model_outputs(&self, info: &ModelInfo) -> Result<(), RequestError> {
        if self.guided && !info.guided {
            return Err(RequestError::MissingInputGradients(format!(
                "Guided Grad-CAM (output=guided, guided_npy) needs guided backpropagation, and model `{}` has no \
                 `input_gradients` output (export it with camserve-export --guided)",
                info.name
            )));
        }
        let layers = info.layer_names().len();
        if let Some(layer) = self.layers.iter().find(|&&l| l >= layers) {
            return Err(RequestError::MissingLayer(format!(
                "model `{}` has no target layer `{layer}`",
                info.name
            )));
        }
        if self.layers.is_empty() {
            return Err(RequestError::Invalid("`layers` is empty".into()));
        }
        Ok(())
    }
}
