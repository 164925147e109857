//! The models the service serves, by name.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::config::ModelConfig;
use crate::engine::{Batching, Runner};
use crate::model::{self, ModelError, ModelInfo};
use crate::runtime::Runtime;

pub struct Model {
    pub info: ModelInfo,
    pub runner: Runner,
}

#[derive(Default)]
pub struct Registry {
    models: BTreeMap<String, Arc<Model>>,
}

impl Registry {
    /// Loads, checks and warms up every model; the first that fails stops the whole load.
    pub fn load(runtime: &Runtime, configs: &[ModelConfig]) -> Result<Self, ModelError> {
        let mut registry = Self::default();
        for config in configs {
            let started = std::time::Instant::now();
            let (info, sessions) = model::load(runtime, config)?;
            tracing::info!(
                model = %info.name,
                device = %info.device,
                classes = info.num_classes(),
                sessions = sessions.len(),
                load_ms = started.elapsed().as_millis() as u64,
                "model loaded"
            );
            let input_size = [info.preprocess.height, info.preprocess.width];
            let batching = Batching {
                max_batch: config.max_batch,
                max_wait: std::time::Duration::from_millis(config.max_batch_wait_ms),
            };
            let runner = Runner::start(
                &info.name,
                sessions,
                input_size,
                config.queue_capacity,
                batching,
            );
            registry
                .models
                .insert(info.name.clone(), Arc::new(Model { info, runner }));
        }
        Ok(registry)
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Model>> {
        self.models.get(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Model>> {
        self.models.values()
    }
}
