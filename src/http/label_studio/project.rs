//! The project's labeling config, read as far as predictions need it: the image tag and its task field, the
//! rectangle and brush controls, and which model classes each of their labels maps to.

use std::collections::BTreeMap;

use crate::explain::{self, Targets};
use crate::http::error::ApiError;
use crate::http::formats::{LabelStudioControl, LabelStudioTags};
use crate::registry::ServedModel;

/// What the project's labeling config names: the image tag and its task field, and the two kinds of control
/// tag with their labels.
#[derive(Debug, Default)]
pub(super) struct Project {
    pub(super) image: Option<String>,
    pub(super) data_key: Option<String>,
    pub(super) rectangles: Option<Control>,
    pub(super) brush: Option<Control>,
}

#[derive(Debug)]
pub(super) struct Control {
    pub(super) name: String,
    pub(super) labels: Vec<LabelTag>,
}

/// A `<Label>`: the name results carry (its `alias`, else its `value`) and the model class names it may stand
/// for (`value`, `alias`, `predicted_values`).
#[derive(Debug, PartialEq)]
pub(super) struct LabelTag {
    pub(super) name: String,
    pub(super) candidates: Vec<String>,
}

/// A project mapped onto the model: the classes any control can show, and per control class -> label name.
#[derive(Debug)]
pub(super) struct Plan {
    pub(super) data_key: String,
    pub(super) image: String,
    pub(super) classes: Vec<usize>,
    pub(super) rectangles: Option<(String, BTreeMap<usize, String>)>,
    pub(super) brush: Option<(String, BTreeMap<usize, String>)>,
}

impl Project {
    /// Reads `<Image name value="$key">`, `<RectangleLabels name toName>` and `<BrushLabels name toName>` with
    /// their `<Label>`s. A config without one of the two control tags gets no results of that kind.
    pub(super) fn from_label_config(xml: &str) -> Self {
        let control = |tag: &str| {
            let (attributes, inner) = elements(xml, tag).into_iter().next()?;
            let labels = elements(inner, "Label")
                .iter()
                .filter_map(|(label, _)| LabelTag::from_attributes(label))
                .collect();
            Some((
                Control {
                    name: find(&attributes, "name")?,
                    labels,
                },
                find(&attributes, "toName"),
            ))
        };
        let image = elements(xml, "Image").into_iter().next().map(|(a, _)| a);
        let rectangles = control("RectangleLabels");
        let brush = control("BrushLabels");
        let image_name = image
            .as_deref()
            .and_then(|a| find(a, "name"))
            .or_else(|| rectangles.as_ref().and_then(|(_, to)| to.clone()))
            .or_else(|| brush.as_ref().and_then(|(_, to)| to.clone()));
        Self {
            data_key: image
                .as_deref()
                .and_then(|a| find(a, "value"))
                .map(|v| v.trim_start_matches('$').to_owned()),
            image: image_name,
            rectangles: rectangles.map(|(c, _)| c),
            brush: brush.map(|(c, _)| c),
        }
    }

    /// Maps each control's labels to model classes: a candidate name that is a class label, or a class named for
    /// the label in the config's `labels` table. The first label that maps a class keeps it.
    pub(super) fn plan(
        &self,
        model_labels: &[String],
        mapping: &BTreeMap<String, Vec<String>>,
    ) -> Plan {
        let class_of = |name: &str| model_labels.iter().position(|l| l == name);
        let map = |control: &Control| {
            let mut classes = BTreeMap::new();
            for label in &control.labels {
                let configured = mapping.get(&label.name).into_iter().flatten();
                for class in label
                    .candidates
                    .iter()
                    .chain(configured)
                    .filter_map(|n| class_of(n))
                {
                    classes.entry(class).or_insert_with(|| label.name.clone());
                }
            }
            (control.name.clone(), classes)
        };
        let rectangles = self.rectangles.as_ref().map(map);
        let brush = self.brush.as_ref().map(map);
        let mut classes: Vec<usize> = [&rectangles, &brush]
            .into_iter()
            .flatten()
            .flat_map(|(_, m)| m.keys().copied())
            .collect();
        classes.sort_unstable();
        classes.dedup();
        Plan {
            data_key: self.data_key.clone().unwrap_or_else(|| "image".into()),
            image: self.image.clone().unwrap_or_else(|| "image".into()),
            classes,
            rectangles,
            brush,
        }
    }
}

impl Plan {
    /// No labeling config (a caller other than Label Studio): every class under its model label, and the
    /// README config's tag names.
    pub(super) fn model_labels(labels: &[String]) -> Self {
        let all: BTreeMap<usize, String> = labels.iter().cloned().enumerate().collect();
        Self {
            data_key: "image".into(),
            image: "image".into(),
            classes: (0..labels.len()).collect(),
            rectangles: Some(("label".into(), all.clone())),
            brush: Some(("mask".into(), all)),
        }
    }

    /// What to explain for one image, in one Run where it can be: every mapped class is scored and gets its
    /// gradient (a seed row each), and when both controls show the same classes only the `top_k` best get maps
    /// (when they differ, every mapped class does). When more classes map than a request may name, a first Run
    /// scores the image and only each control's `top_k` best are explained.
    pub(super) fn targets(
        &self,
        model: &ServedModel,
        bytes: &[u8],
        limits: &crate::config::Limits,
        top_k: usize,
        ticket: &crate::engine::Ticket,
    ) -> Result<Targets, ApiError> {
        let same = match (&self.rectangles, &self.brush) {
            (Some((_, a)), Some((_, b))) => a.keys().eq(b.keys()),
            _ => true,
        };
        if same && self.classes.len() == model.info.num_classes() {
            return Ok(Targets::TopK(top_k));
        }
        if self.classes.len() <= limits.max_classes_per_request {
            return Ok(if same {
                Targets::BestOf(self.classes.clone(), top_k)
            } else {
                Targets::Classes(self.classes.clone())
            });
        }
        let (logits, _) = explain::predict(model, bytes, limits, ticket)?;
        let mut best: Vec<usize> = [&self.rectangles, &self.brush]
            .into_iter()
            .flatten()
            .flat_map(|(_, m)| top(m.keys().copied(), &logits, top_k))
            .collect();
        best.sort_unstable();
        best.dedup();
        Ok(Targets::Classes(best))
    }

    /// Per control, its `top_k` best-scoring classes among those explained, with their label names.
    pub(super) fn tags(&self, explanation: &explain::Explanation, top_k: usize) -> LabelStudioTags {
        let control = |(name, classes): &(String, BTreeMap<usize, String>)| {
            let explained = explanation.targets.iter().map(|t| t.class);
            let best = top(
                explained.filter(|c| classes.contains_key(c)),
                &explanation.logits,
                top_k,
            );
            LabelStudioControl {
                name: name.clone(),
                labels: best
                    .into_iter()
                    .map(|class| {
                        let t = explanation.targets.iter().position(|t| t.class == class);
                        (t.expect("explained"), classes[&class].clone())
                    })
                    .collect(),
            }
        };
        LabelStudioTags {
            image: self.image.clone(),
            rectangles: self.rectangles.as_ref().map(control),
            brush: self.brush.as_ref().map(control),
        }
    }
}

/// The `k` classes of `classes` with the largest logits, best first.
pub(super) fn top(classes: impl Iterator<Item = usize>, logits: &[f32], k: usize) -> Vec<usize> {
    let mut classes: Vec<usize> = classes.collect();
    classes.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    classes.truncate(k);
    classes
}

impl LabelTag {
    pub(super) fn from_attributes(attributes: &[(String, String)]) -> Option<Self> {
        let value = find(attributes, "value");
        let alias = find(attributes, "alias");
        // Label Studio writes the alias into results when there is one.
        let name = alias.clone().or_else(|| value.clone())?;
        let predicted = find(attributes, "predicted_values").unwrap_or_default();
        let candidates = [value, alias]
            .into_iter()
            .flatten()
            .chain(predicted.split(',').map(|v| v.trim().to_owned()))
            .filter(|v| !v.is_empty())
            .collect();
        Some(Self { name, candidates })
    }
}

pub(super) fn find(attributes: &[(String, String)], key: &str) -> Option<String> {
    attributes
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.clone())
}

/// Every `<tag ...>` element of `xml`: its attributes, and the text up to its closing tag (empty when it closes
/// itself). Label configs are small XML written by hand; this reads `key="value"` pairs and needs no XML parser.
pub(super) fn elements<'a>(xml: &'a str, tag: &str) -> Vec<(Vec<(String, String)>, &'a str)> {
    let open = format!("<{tag}");
    let close = format!("</{tag}>");
    let mut found = Vec::new();
    for (i, _) in xml.match_indices(&open) {
        let after = &xml[i + open.len()..];
        if !after.starts_with(|c: char| c.is_whitespace() || c == '/' || c == '>') {
            continue;
        }
        let Some(end) = after.find('>') else { break };
        let (inside, rest) = (&after[..end], &after[end + 1..]);
        let inner = if inside.ends_with('/') {
            ""
        } else {
            rest.find(&close).map_or(rest, |e| &rest[..e])
        };
        found.push((attributes(inside.trim_end_matches('/')), inner));
    }
    found
}

pub(super) fn attributes(inside: &str) -> Vec<(String, String)> {
    let mut pairs = Vec::new();
    let mut rest = inside;
    while let Some(eq) = rest.find('=') {
        let key = rest[..eq]
            .split_whitespace()
            .last()
            .unwrap_or("")
            .to_owned();
        let value_part = rest[eq + 1..].trim_start();
        let Some(quote) = value_part
            .chars()
            .next()
            .filter(|q| *q == '"' || *q == '\'')
        else {
            break;
        };
        let Some(end) = value_part[1..].find(quote) else {
            break;
        };
        pairs.push((key, unescape(&value_part[1..=end])));
        rest = &value_part[end + 2..];
    }
    pairs
}

/// XML's five predefined entities, as label names may hold them (`Salt &amp; pepper`).
pub(super) fn unescape(text: &str) -> String {
    text.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| (*n).to_owned()).collect()
    }

    #[test]

    fn label_config_names() {
        let xml = r#"<View>
            <Image name="img" value="$photo" zoom="true"/>
            <RectangleLabels name="boxes" toName="img"><Label value="red"/></RectangleLabels>
            <BrushLabels name='paint' toName='img'><Label value="red"/></BrushLabels>
        </View>"#;
        let project = Project::from_label_config(xml);
        assert_eq!(project.data_key.as_deref(), Some("photo"));
        assert_eq!(project.image.as_deref(), Some("img"));
        assert_eq!(project.rectangles.as_ref().unwrap().name, "boxes");
        assert_eq!(project.brush.as_ref().unwrap().name, "paint");

        // Only rectangles: no brush results. `<Image>` must not match `<ImageX>`.
        let project = Project::from_label_config(
            r#"<View><ImageX name="no"/><Image name="i" value="$u"/><RectangleLabels name="r" toName="i"/></View>"#,
        );
        assert_eq!(
            (project.data_key.as_deref(), project.image.as_deref()),
            (Some("u"), Some("i"))
        );
        assert!(project.brush.is_none());
        assert!(project.rectangles.unwrap().labels.is_empty());
    }

    #[test]

    fn labels_are_read_with_aliases_and_predicted_values() {
        let xml = r#"<View><Image name="i" value="$image"/>
            <RectangleLabels name="box" toName="i">
              <Label value="Cat" predicted_values="tabby, Egyptian cat" background="red"/>
              <Label value="space shuttle"/>
              <Label value="Salt &amp; pepper" alias="sp"></Label>
              <Labelx value="not a label"/>
            </RectangleLabels>
            <BrushLabels name="paint" toName="i"><Label value="Coffee"/></BrushLabels></View>"#;
        let project = Project::from_label_config(xml);
        let rectangles = project.rectangles.as_ref().unwrap();
        assert_eq!(
            rectangles.labels,
            vec![
                LabelTag {
                    name: "Cat".into(),
                    candidates: labels(&["Cat", "tabby", "Egyptian cat"])
                },
                LabelTag {
                    name: "space shuttle".into(),
                    candidates: labels(&["space shuttle"])
                },
                LabelTag {
                    name: "sp".into(),
                    candidates: labels(&["Salt & pepper", "sp"])
                },
            ]
        );
        assert_eq!(project.brush.as_ref().unwrap().labels.len(), 1);
    }

    #[test]

    fn labels_map_to_classes_by_name_predicted_values_and_config() {
        let model = labels(&["tabby", "Egyptian cat", "espresso", "space shuttle", "cup"]);
        let xml = r#"<View><Image name="photo" value="$img"/>
            <RectangleLabels name="box" toName="photo">
              <Label value="Cat" predicted_values="tabby,Egyptian cat"/>
              <Label value="space shuttle"/>
              <Label value="Coffee"/>
              <Label value="Dog"/>
            </RectangleLabels>
            <BrushLabels name="paint" toName="photo"><Label value="cup"/></BrushLabels></View>"#;
        let mapping =
            BTreeMap::from([("Coffee".to_owned(), labels(&["espresso", "no such class"]))]);
        let plan = Project::from_label_config(xml).plan(&model, &mapping);
        assert_eq!(
            (plan.data_key.as_str(), plan.image.as_str()),
            ("img", "photo")
        );
        assert_eq!(plan.classes, vec![0, 1, 2, 3, 4]);
        let (name, rectangles) = plan.rectangles.as_ref().unwrap();
        assert_eq!(name, "box");
        let expected: BTreeMap<usize, String> =
            [(0, "Cat"), (1, "Cat"), (2, "Coffee"), (3, "space shuttle")]
                .into_iter()
                .map(|(c, l)| (c, l.to_owned()))
                .collect();
        assert_eq!(rectangles, &expected);
        assert_eq!(
            plan.brush.as_ref().unwrap().1,
            BTreeMap::from([(4, "cup".to_owned())])
        );

        // Nothing maps: nothing to explain.
        let none = Project::from_label_config(
            r#"<View><Image name="i" value="$image"/><RectangleLabels name="r" toName="i"><Label value="Dog"/></RectangleLabels></View>"#,
        )
        .plan(&model, &BTreeMap::new());
        assert!(none.classes.is_empty());
    }

    #[test]
    fn top_picks_the_best_scoring_mapped_classes() {
        let logits = [0.5, 3.0, -1.0, 2.0];
        assert_eq!(top([0, 2, 3].into_iter(), &logits, 1), vec![3]);
        assert_eq!(top([0, 2, 3].into_iter(), &logits, 2), vec![3, 0]);
        assert_eq!(top(std::iter::empty(), &logits, 1), Vec::<usize>::new());
    }
}
