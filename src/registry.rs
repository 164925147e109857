//! The models the service serves, by name. Models can be added, replaced and removed while serving: a request
//! holds an `Arc<Model>` for its whole life, so it finishes on the model it started with.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crate::config::ModelConfig;
use crate::engine::{Batching, Runner};
use crate::model::{self, ModelError, ModelInfo};
use crate::runtime::Runtime;

pub struct Model {
    pub info: ModelInfo,
    pub runner: Runner,
    /// What it was loaded from, for reloads.
    pub config: ModelConfig,
}

impl Model {
    /// Loads, checks and warms up one model, and starts its sessions.
    pub fn load(runtime: &Runtime, config: &ModelConfig) -> Result<Self, ModelError> {
        let started = Instant::now();
        let (info, workers) = model::load(runtime, config)?;
        tracing::info!(
            model = %info.name,
            device = %info.device,
            classes = info.num_classes(),
            sessions = workers.len(),
            load_ms = started.elapsed().as_millis() as u64,
            "model loaded"
        );
        let input_size = [info.preprocess.height, info.preprocess.width];
        let batching = Batching {
            max_batch: config.max_batch,
            max_wait: Duration::from_millis(config.max_batch_wait_ms),
        };
        let runner = Runner::start(
            &info.name,
            workers,
            config.sessions * config.threads,
            input_size,
            config.queue_capacity,
            batching,
        );
        Ok(Self {
            info,
            runner,
            config: config.clone(),
        })
    }
}

#[derive(Default)]
pub struct Registry {
    models: RwLock<BTreeMap<String, Arc<Model>>>,
}

impl Registry {
    /// Loads every model; the first that fails stops the whole load.
    pub fn load(runtime: &Runtime, configs: &[ModelConfig]) -> Result<Self, ModelError> {
        let registry = Self::default();
        for config in configs {
            registry.insert(Model::load(runtime, config)?);
        }
        Ok(registry)
    }

    pub fn get(&self, name: &str) -> Option<Arc<Model>> {
        self.models
            .read()
            .expect("registry lock")
            .get(name)
            .cloned()
    }

    /// Every model, by name.
    pub fn models(&self) -> Vec<Arc<Model>> {
        self.models
            .read()
            .expect("registry lock")
            .values()
            .cloned()
            .collect()
    }

    /// Serves `model` under its name from now on; returns the one it replaced.
    pub fn insert(&self, model: Model) -> Option<Arc<Model>> {
        let name = model.info.name.clone();
        self.models
            .write()
            .expect("registry lock")
            .insert(name, Arc::new(model))
    }

    pub fn remove(&self, name: &str) -> Option<Arc<Model>> {
        self.models.write().expect("registry lock").remove(name)
    }
}
