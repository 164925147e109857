//! The exporter's reference numbers for the contract fixtures (tests/fixtures/reference/cases.json, made by
//! `make fixtures`): per model and image, the target class, the logits, pytorch-grad-cam's maps.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::fixture;

/// One model and image of cases.json; the paths are relative to tests/fixtures.
#[derive(Deserialize)]
pub struct Case {
    pub model: String,
    pub image: String,
    pub class: usize,
    /// The Grad-CAM map at the target layer's resolution (.npy).
    pub lowres: String,
    /// The Grad-CAM map at the input's resolution (.npy).
    pub gradcam: String,
    pub logits: Vec<f32>,
    /// Method name to its map (.npy).
    pub methods: BTreeMap<String, String>,
    /// The methods whose map LAPACK returned with the opposite sign.
    pub lapack_sign_flipped: Vec<String>,
    #[serde(default)]
    pub smoothed: Vec<Smoothed>,
    #[serde(default)]
    pub scorecam: Vec<ScoreCamReference>,
    #[serde(default)]
    pub trust: Vec<TrustReference>,
}

#[derive(Deserialize)]
pub struct Smoothed {
    pub method: String,
    pub aug_smooth: bool,
    pub eigen_smooth: bool,
    pub map: String,
    pub lapack_sign_flipped: bool,
}

#[derive(Deserialize)]
pub struct ScoreCamReference {
    pub max_channels: usize,
    pub source: String,
    pub map: String,
}

#[derive(Deserialize)]
pub struct TrustReference {
    pub method: String,
    pub probability: f32,
    pub kept_probability: f32,
    pub removed_probability: f32,
    pub drop_in_confidence: f32,
    pub increase_in_confidence: bool,
}

/// Every case of cases.json.
pub fn cases() -> Vec<Case> {
    serde_json::from_str(&std::fs::read_to_string(fixture("reference/cases.json")).unwrap())
        .unwrap()
}
