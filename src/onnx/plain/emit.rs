//! Writing new ONNX nodes: fresh tensor names, deduplicated constants, and the helpers whose form depends on
//! the opset (axes as attributes before opsets 13/18, as inputs after).

use std::collections::{HashMap, HashSet};

use super::proto::{Attr, NodeProto, TensorProto};

pub struct Emitter {
    pub opset: i64,
    pub nodes: Vec<NodeProto>,
    /// Constants, added to the main graph's initializers (a Loop body reads them from the outer scope).
    pub constants: Vec<TensorProto>,
    counter: usize,
    constant_names: HashMap<(bool, Vec<i64>, Vec<u8>), String>,
}

impl Emitter {
    pub fn new(opset: i64) -> Self {
        Emitter {
            opset,
            nodes: Vec::new(),
            constants: Vec::new(),
            counter: 0,
            constant_names: HashMap::new(),
        }
    }

    /// A name no tensor of the model has (`taken` holds every name in use, and grows).
    pub fn fresh(&mut self, taken: &mut HashSet<String>, hint: &str) -> String {
        loop {
            self.counter += 1;
            let name = format!("camserve_{hint}_{}", self.counter);
            if taken.insert(name.clone()) {
                return name;
            }
        }
    }
}

/// An emitter together with the set of names in use: what the backward rules write through.
pub struct Writer<'a> {
    pub e: &'a mut Emitter,
    pub taken: &'a mut HashSet<String>,
}

impl Writer<'_> {
    pub fn opset(&self) -> i64 {
        self.e.opset
    }

    pub fn fresh(&mut self, hint: &str) -> String {
        self.e.fresh(self.taken, hint)
    }

    /// Appends a node with one output and returns the output's name.
    pub fn op(&mut self, op_type: &str, inputs: &[&str], attrs: Vec<(&str, Attr)>) -> String {
        self.op_n(op_type, inputs, 1, attrs).remove(0)
    }

    pub fn op_n(
        &mut self,
        op_type: &str,
        inputs: &[&str],
        outputs: usize,
        attrs: Vec<(&str, Attr)>,
    ) -> Vec<String> {
        let hint = op_type.to_lowercase();
        let outputs: Vec<String> = (0..outputs).map(|_| self.fresh(&hint)).collect();
        self.node(op_type, inputs, &outputs, attrs);
        outputs
    }

    /// Appends a node whose outputs are named by the caller.
    pub fn node(
        &mut self,
        op_type: &str,
        inputs: &[&str],
        outputs: &[String],
        attrs: Vec<(&str, Attr)>,
    ) {
        self.e.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.to_vec(),
            op_type: op_type.to_owned(),
            attribute: attrs.into_iter().map(|(n, a)| a.into_proto(n)).collect(),
            ..Default::default()
        });
    }

    pub fn float(&mut self, value: f32) -> String {
        self.floats(&[], &[value])
    }

    pub fn floats(&mut self, dims: &[i64], values: &[f32]) -> String {
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.constant((true, dims.to_vec(), bytes), |name| {
            TensorProto::floats(name, dims, values)
        })
    }

    /// A 1-D int64 constant.
    pub fn ints(&mut self, values: &[i64]) -> String {
        self.int_tensor(&[values.len() as i64], values)
    }

    pub fn int(&mut self, value: i64) -> String {
        self.int_tensor(&[], &[value])
    }

    fn int_tensor(&mut self, dims: &[i64], values: &[i64]) -> String {
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.constant((false, dims.to_vec(), bytes), |name| {
            TensorProto::int64s(name, dims, values)
        })
    }

    fn constant(
        &mut self,
        key: (bool, Vec<i64>, Vec<u8>),
        make: impl FnOnce(&str) -> TensorProto,
    ) -> String {
        if let Some(name) = self.e.constant_names.get(&key) {
            return name.clone();
        }
        let name = self.fresh("const");
        self.e.constants.push(make(&name));
        self.e.constant_names.insert(key, name.clone());
        name
    }

    /// ReduceSum / ReduceMean / ReduceProd over fixed axes, in the opset's form.
    pub fn reduce(&mut self, op_type: &str, x: &str, axes: &[i64], keepdims: bool) -> String {
        let axes_as_input = self.opset() >= if op_type == "ReduceSum" { 13 } else { 18 };
        let keep = ("keepdims", Attr::Int(keepdims as i64));
        if axes_as_input {
            let axes = self.ints(axes);
            self.op(op_type, &[x, &axes], vec![keep])
        } else {
            self.op(
                op_type,
                &[x],
                vec![("axes", Attr::Ints(axes.to_vec())), keep],
            )
        }
    }

    pub fn unsqueeze(&mut self, x: &str, axes: &[i64]) -> String {
        if self.opset() >= 13 {
            let axes = self.ints(axes);
            self.op("Unsqueeze", &[x, &axes], vec![])
        } else {
            self.op("Unsqueeze", &[x], vec![("axes", Attr::Ints(axes.to_vec()))])
        }
    }

    pub fn shape(&mut self, x: &str) -> String {
        self.op("Shape", &[x], vec![])
    }

    /// `g` reshaped to the shape of `x`.
    pub fn reshape_like(&mut self, g: &str, x: &str) -> String {
        let shape = self.shape(x);
        self.op("Reshape", &[g, &shape], vec![])
    }

    /// Dimensions `from..` of `x`'s shape, as a 1-D int64 tensor.
    pub fn shape_from(&mut self, x: &str, from: i64) -> String {
        let shape = self.shape(x);
        let (start, end) = (self.ints(&[from]), self.ints(&[i64::MAX]));
        self.op("Slice", &[&shape, &start, &end], vec![])
    }

    /// The product of a 1-D int64 shape, as a float32 [1].
    pub fn count(&mut self, shape: &str) -> String {
        let product = self.reduce("ReduceProd", shape, &[0], true);
        self.op(
            "Cast",
            &[&product],
            vec![("to", Attr::Int(super::proto::data_type::FLOAT as i64))],
        )
    }
}
