//! Image decoding on arbitrary bytes: never a panic, never an allocation beyond the configured limits.
#![no_main]

use camserve::pipeline::preprocess::{ChannelOrder, DecodeLimits, Preprocess, decode_at_least};
use libfuzzer_sys::fuzz_target;

const LIMITS: DecodeLimits = DecodeLimits {
    max_width: 2048,
    max_height: 2048,
    max_pixels: 4_000_000,
};

// JPEGs are decoded at the smallest DCT scale that covers 32 x 24, as for a model of that size.
fuzz_target!(|bytes: &[u8]| {
    if let Ok(decoded) = decode_at_least(bytes, &LIMITS, |w, h| (w.min(32), h.min(24))) {
        let image = decoded.image;
        let (width, height) = decoded.size;
        assert!(width <= LIMITS.max_width as usize && height <= LIMITS.max_height as usize);
        assert!(image.width() as usize <= width && image.height() as usize <= height);
        let preprocess = Preprocess {
            width: 32,
            height: 24,
            mean: [0.5; 3],
            std: [0.25; 3],
            channel_order: ChannelOrder::Rgb,
            value_range: (0.0, 1.0),
        };
        let mut tensor = vec![0.0; preprocess.tensor_len()];
        preprocess.write_tensor(&image, &mut tensor);
        assert!(tensor.iter().all(|v| v.is_finite()));
    }
});
