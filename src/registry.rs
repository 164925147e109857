//! The models the service serves, by name: each a checked model behind its engine. Models can be added, replaced
//! and removed while serving: a request holds an `Arc<ServedModel>` for its whole life, so it finishes on the
//! model it started with.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use ort::session::Session;

use crate::config::{ExecutionProvider, ModelConfig};
use crate::engine::{Backend, Batching, Role, Runner, Worker};
use crate::onnx::model::{CheckedModel, ModelError, ModelInfo};
use crate::onnx::runtime::OnnxRuntime;
use crate::onnx::session::{self, RunOutput};

/// A model being served: what loading found, and the engine that runs its sessions.
pub struct ServedModel {
    pub info: ModelInfo,
    pub runner: Runner<OnnxSession>,
    /// What it was loaded from, for reloads.
    pub config: ModelConfig,
}

/// One ONNX Runtime session as the engine's backend.
pub struct OnnxSession(Session);

impl Backend for OnnxSession {
    type Output = RunOutput;

    fn run(
        &mut self,
        inputs: &[f32],
        _images: usize,
        shape: [usize; 2],
        seeds: &[f32],
        k: usize,
    ) -> Result<Vec<RunOutput>, String> {
        session::run(&mut self.0, inputs, shape, seeds, k).map_err(|e| e.to_string())
    }
}

impl ServedModel {
    /// Loads, checks and warms up one model, and starts its sessions.
    pub fn load(runtime: &OnnxRuntime, config: &ModelConfig) -> Result<Self, ModelError> {
        let started = Instant::now();
        let checked = CheckedModel::open(runtime, config)?;
        let mut roles = session_roles(config, checked.info.device).into_iter();
        let backend = OnnxSession;
        // The checked session is the first; the others are opened alike.
        let (threads, role) = roles.next().expect("a model has at least one session");
        let mut workers = Vec::new();
        for (threads, role) in roles {
            let session = checked.open_session(runtime, threads)?;
            workers.push(Worker {
                backend: backend(session),
                threads,
                role,
            });
        }
        let info = checked.info;
        workers.insert(
            0,
            Worker {
                backend: backend(checked.session),
                threads,
                role,
            },
        );
        tracing::info!(
            model = %info.name,
            device = %info.device,
            classes = info.num_classes(),
            sessions = workers.len(),
            load_ms = started.elapsed().as_millis() as u64,
            "model loaded"
        );
        let batching = Batching {
            max_batch: config.max_batch,
            max_wait: Duration::from_millis(config.max_batch_wait_ms),
        };
        let runner = Runner::start(
            &info.name,
            workers,
            config.sessions * config.threads,
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

/// The threads and role of each session a model gets: `sessions` sessions of `threads` threads; with
/// `split_under_load` and several threads on the CPU, also one one-thread session per core, which serve under
/// load while a request that arrives alone still gets all the threads.
fn session_roles(config: &ModelConfig, device: ExecutionProvider) -> Vec<(usize, Role)> {
    let split = config.split_under_load && config.threads > 1 && device == ExecutionProvider::Cpu;
    let role = if split { Role::Alone } else { Role::Always };
    let mut roles = vec![(config.threads, role); config.sessions];
    if split {
        roles.extend(std::iter::repeat_n(
            (1, Role::UnderLoad),
            config.sessions * config.threads,
        ));
    }
    roles
}

#[derive(Default)]
pub struct Registry {
    models: RwLock<BTreeMap<String, Arc<ServedModel>>>,
}

impl Registry {
    /// Loads every model; the first that fails stops the whole load.
    pub fn load(runtime: &OnnxRuntime, configs: &[ModelConfig]) -> Result<Self, ModelError> {
        let registry = Self::default();
        for config in configs {
            registry.insert(ServedModel::load(runtime, config)?);
        }
        Ok(registry)
    }

    pub fn get(&self, name: &str) -> Option<Arc<ServedModel>> {
        self.models
            .read()
            .expect("registry lock")
            .get(name)
            .cloned()
    }

    /// Every model, by name.
    pub fn models(&self) -> Vec<Arc<ServedModel>> {
        self.models
            .read()
            .expect("registry lock")
            .values()
            .cloned()
            .collect()
    }

    /// Serves `model` under its name from now on; returns it, and the one it replaced.
    pub fn insert(&self, model: ServedModel) -> (Arc<ServedModel>, Option<Arc<ServedModel>>) {
        let model = Arc::new(model);
        let replaced = self
            .models
            .write()
            .expect("registry lock")
            .insert(model.info.name.clone(), model.clone());
        (model, replaced)
    }

    pub fn remove(&self, name: &str) -> Option<Arc<ServedModel>> {
        self.models.write().expect("registry lock").remove(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_split_only_several_cpu_threads() {
        let config = |threads, split| ModelConfig {
            threads,
            split_under_load: split,
            ..ModelConfig::new("m", "m.onnx".into())
        };
        use Role::*;
        assert_eq!(
            session_roles(&config(2, true), ExecutionProvider::Cpu),
            [(2, Alone), (1, UnderLoad), (1, UnderLoad)]
        );
        assert_eq!(
            session_roles(&config(2, false), ExecutionProvider::Cpu),
            [(2, Always)]
        );
        assert_eq!(
            session_roles(&config(1, true), ExecutionProvider::Cpu),
            [(1, Always)]
        );
        assert_eq!(
            session_roles(&config(2, true), ExecutionProvider::Cuda),
            [(2, Always)]
        );
    }
}
