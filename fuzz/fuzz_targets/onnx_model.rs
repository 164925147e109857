//! ONNX model files on arbitrary bytes (plain classifiers are read by camserve's own protobuf code): never a
//! panic, and whatever decodes is written back unchanged.
#![no_main]

use camserve::onnx::plain::proto::ModelProto;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    if let Ok(model) = ModelProto::decode_bytes(bytes) {
        let again = ModelProto::decode_bytes(&model.encode_bytes()).expect("a written model reads back");
        assert_eq!(model, again);
    }
});
