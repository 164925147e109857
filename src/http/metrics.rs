//! Prometheus metrics, kept by hand: a few labelled counters and histograms need no framework.
//!
//! Labels are the route pattern (`/v1/models/{model}/explain`, never the raw path), a model name only when the
//! model exists, and the status: clients cannot grow the label space.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

use crate::registry::Registry;

/// Upper bounds, in seconds, of the latency buckets: 0.5 ms to 10 s.
const SECONDS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
const BATCH_SIZES: [f64; 7] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0];

#[derive(Default)]
struct Histogram {
    /// One count per bound, not cumulative; rendering accumulates.
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, bounds: &[f64], value: f64) {
        if self.counts.is_empty() {
            self.counts = vec![0; bounds.len()];
        }
        if let Some(i) = bounds.iter().position(|&b| value <= b) {
            self.counts[i] += 1;
        }
        self.sum += value;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, labels: &str, bounds: &[f64]) {
        let mut cumulative = 0;
        for (bound, count) in bounds.iter().zip(&self.counts) {
            cumulative += count;
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", self.sum);
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", self.count);
    }
}

/// One request's stage times, as handlers report them.
#[derive(Debug, Clone, Copy)]
pub struct StageTimes {
    pub decode: Duration,
    pub queue: Duration,
    pub inference: Duration,
    pub render: Duration,
    pub batch_size: usize,
}

#[derive(Default)]
struct State {
    /// (route, model, status) -> count
    requests: BTreeMap<(String, String, u16), u64>,
    /// (stage, model) -> seconds
    stages: BTreeMap<(&'static str, String), Histogram>,
    /// model -> images per Run
    batches: BTreeMap<String, Histogram>,
    /// error code -> Label Studio tasks answered with an empty prediction
    task_errors: BTreeMap<String, u64>,
}

#[derive(Default)]
pub struct Metrics {
    state: Mutex<State>,
}

impl Metrics {
    pub fn record(
        &self,
        route: &str,
        model: Option<&str>,
        status: u16,
        total: Duration,
        stages: Option<StageTimes>,
    ) {
        let model = model.unwrap_or("").to_owned();
        let mut state = self.state.lock().expect("metrics lock");
        *state
            .requests
            .entry((route.to_owned(), model.clone(), status))
            .or_default() += 1;
        let Some(stages) = stages else { return };
        for (stage, duration) in [
            ("decode", stages.decode),
            ("queue", stages.queue),
            ("inference", stages.inference),
            ("render", stages.render),
            ("total", total),
        ] {
            let histogram = state.stages.entry((stage, model.clone())).or_default();
            histogram.observe(&SECONDS, duration.as_secs_f64());
        }
        state
            .batches
            .entry(model)
            .or_default()
            .observe(&BATCH_SIZES, stages.batch_size as f64);
    }

    /// A Label Studio task that got an empty prediction, by the error code of why.
    pub fn label_studio_task_failed(&self, code: &str) {
        let mut state = self.state.lock().expect("metrics lock");
        *state.task_errors.entry(code.to_owned()).or_default() += 1;
    }

    /// The Prometheus text exposition of everything, with the registry's live gauges.
    pub fn render(&self, registry: &Registry) -> String {
        let mut out = String::new();
        let state = self.state.lock().expect("metrics lock");
        out.push_str("# HELP camserve_requests_total Requests answered, by route pattern, model and status.\n");
        out.push_str("# TYPE camserve_requests_total counter\n");
        for ((route, model, status), count) in &state.requests {
            let _ = writeln!(
                out,
                "camserve_requests_total{{route=\"{}\",model=\"{}\",status=\"{status}\"}} {count}",
                escape(route),
                escape(model)
            );
        }
        out.push_str("# HELP camserve_stage_seconds Time per request in each stage: decode, queue, inference, render, total.\n");
        out.push_str("# TYPE camserve_stage_seconds histogram\n");
        for ((stage, model), histogram) in &state.stages {
            let labels = format!("stage=\"{stage}\",model=\"{}\"", escape(model));
            histogram.render(&mut out, "camserve_stage_seconds", &labels, &SECONDS);
        }
        out.push_str("# HELP camserve_batch_size Images in the Run that served each request.\n");
        out.push_str("# TYPE camserve_batch_size histogram\n");
        for (model, histogram) in &state.batches {
            let labels = format!("model=\"{}\"", escape(model));
            histogram.render(&mut out, "camserve_batch_size", &labels, &BATCH_SIZES);
        }
        out.push_str("# HELP camserve_label_studio_task_errors_total Label Studio tasks answered with an empty prediction, by error code.\n");
        out.push_str("# TYPE camserve_label_studio_task_errors_total counter\n");
        for (code, count) in &state.task_errors {
            let _ = writeln!(
                out,
                "camserve_label_studio_task_errors_total{{code=\"{}\"}} {count}",
                escape(code)
            );
        }
        drop(state);
        let models = registry.models();
        out.push_str("# HELP camserve_queue_depth Requests waiting for a session.\n");
        out.push_str("# TYPE camserve_queue_depth gauge\n");
        for model in &models {
            let _ = writeln!(
                out,
                "camserve_queue_depth{{model=\"{}\"}} {}",
                escape(&model.info.name),
                model.runner.queue_depth()
            );
        }
        out.push_str(
            "# HELP camserve_model_loaded A loaded model and the device it really runs on.\n",
        );
        out.push_str("# TYPE camserve_model_loaded gauge\n");
        for model in &models {
            let _ = writeln!(
                out,
                "camserve_model_loaded{{model=\"{}\",device=\"{}\"}} 1",
                escape(&model.info.name),
                model.info.device
            );
        }
        out
    }
}

/// Prometheus label values escape backslash, double quote and newline.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_with_sum_and_count() {
        let mut h = Histogram::default();
        for v in [0.0004, 0.003, 0.003, 20.0] {
            h.observe(&SECONDS, v);
        }
        let mut out = String::new();
        h.render(&mut out, "x", "a=\"b\"", &SECONDS);
        assert!(out.contains("x_bucket{a=\"b\",le=\"0.0005\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{a=\"b\",le=\"0.0025\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{a=\"b\",le=\"0.005\"} 3\n"), "{out}");
        assert!(out.contains("x_bucket{a=\"b\",le=\"10\"} 3\n"), "{out}");
        assert!(out.contains("x_bucket{a=\"b\",le=\"+Inf\"} 4\n"), "{out}");
        assert!(out.contains("x_count{a=\"b\"} 4\n"), "{out}");
        let sum: f64 = out
            .lines()
            .find(|l| l.starts_with("x_sum"))
            .unwrap()
            .split(' ')
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        assert!((sum - 20.0064).abs() < 1e-9);
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
