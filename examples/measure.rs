//! Timings behind the choices in preprocess and render: `cargo run --release --example measure`.

use camserve::pipeline::boxes::Threshold;
use camserve::pipeline::cam::{self, CamMethod, Map, display_map};
use camserve::pipeline::preprocess::{ChannelOrder, DecodeLimits, Preprocess, decode};
use camserve::pipeline::{boxes, render};
use image::codecs::jpeg::JpegEncoder;
use image::codecs::png::{CompressionType, FilterType, PngEncoder};
use image::{Rgb, RgbImage, imageops};
use std::time::{Duration, Instant};

/// Median wall time of `runs` calls.
fn time<T>(runs: usize, mut f: impl FnMut() -> T) -> Duration {
    let mut times: Vec<Duration> = (0..runs)
        .map(|_| {
            let started = Instant::now();
            std::hint::black_box(f());
            started.elapsed()
        })
        .collect();
    times.sort();
    times[runs / 2]
}

/// Smooth shapes plus sensor-like noise, so that codecs see something like a photo.
fn photo(width: u32, height: u32) -> RgbImage {
    let mut seed = 12345u32;
    RgbImage::from_fn(width, height, |x, y| {
        seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        let noise = (seed >> 28) as f32;
        let (u, v) = (x as f32 / width as f32, y as f32 / height as f32);
        let wave = |a: f32, b: f32| 127.0 + 100.0 * (a * u * 6.3 + b * v * 6.3).sin() + noise;
        Rgb([
            wave(1.0, 2.0) as u8,
            wave(3.0, -1.0) as u8,
            wave(-2.0, 0.5) as u8,
        ])
    })
}

/// A 7x7 raw map with two bumps, brought to image size as pytorch-grad-cam does.
fn heat(width: u32, height: u32) -> Map {
    let raw = (0..49)
        .map(|i| {
            let (x, y) = ((i % 7) as f32, (i / 7) as f32);
            (-((x - 2.0).powi(2) + (y - 3.0).powi(2)) / 3.0).exp()
                + 0.6 * (-((x - 5.0).powi(2) + (y - 1.0).powi(2)) / 2.0).exp()
                - 0.2
        })
        .collect();
    display_map(&Map::new(7, 7, raw), width as usize, height as usize)
}

fn main() {
    let big = photo(4000, 3000);
    let mut jpeg = Vec::new();
    big.write_with_encoder(JpegEncoder::new_with_quality(&mut jpeg, 90))
        .unwrap();
    let decode_time = time(5, || decode(&jpeg, &DecodeLimits::default()).unwrap());
    println!(
        "decode 4000x3000 JPEG ({} KiB): {decode_time:?}",
        jpeg.len() / 1024
    );

    let mut small_jpeg = Vec::new();
    photo(224, 224)
        .write_with_encoder(JpegEncoder::new_with_quality(&mut small_jpeg, 90))
        .unwrap();
    println!(
        "decode 224x224 JPEG ({} KiB): {:?}",
        small_jpeg.len() / 1024,
        time(101, || decode(&small_jpeg, &DecodeLimits::default())
            .unwrap())
    );

    println!("resize 4000x3000 -> 224x224:");
    let triangle = time(5, || {
        imageops::resize(&big, 224, 224, imageops::FilterType::Triangle)
    });
    println!("  image::imageops::resize Triangle:          {triangle:?}");
    for (name, algorithm) in [
        (
            "convolution bilinear",
            fast_image_resize::ResizeAlg::Convolution(fast_image_resize::FilterType::Bilinear),
        ),
        (
            "interpolation bilinear",
            fast_image_resize::ResizeAlg::Interpolation(fast_image_resize::FilterType::Bilinear),
        ),
    ] {
        let options = fast_image_resize::ResizeOptions::new().resize_alg(algorithm);
        let src = fast_image_resize::images::ImageRef::new(
            4000,
            3000,
            big.as_raw(),
            fast_image_resize::PixelType::U8x3,
        )
        .unwrap();
        let mut resizer = fast_image_resize::Resizer::new();
        let took = time(5, || {
            let mut dst =
                fast_image_resize::images::Image::new(224, 224, fast_image_resize::PixelType::U8x3);
            resizer.resize(&src, &mut dst, &options).unwrap();
            dst
        });
        println!("  fast_image_resize {name:<24} {took:?}");
    }
    let pre = Preprocess {
        width: 224,
        height: 224,
        mean: [0.485, 0.456, 0.406],
        std: [0.229, 0.224, 0.225],
        channel_order: ChannelOrder::Rgb,
        value_range: (0.0, 1.0),
    };
    let mut tensor = vec![0.0; pre.tensor_len()];
    println!(
        "write_tensor 4000x3000 -> 224x224: {:?}",
        time(5, || pre.write_tensor(&big, &mut tensor))
    );
    let small = photo(224, 224);
    println!(
        "write_tensor 224x224 (no resize): {:?}",
        time(51, || pre.write_tensor(&small, &mut tensor))
    );

    println!("PNG encode (median time, size):");
    let settings = [
        (
            "Fast, NoFilter",
            CompressionType::Fast,
            FilterType::NoFilter,
        ),
        (
            "Uncompressed",
            CompressionType::Uncompressed,
            FilterType::NoFilter,
        ),
        ("Fast, Sub", CompressionType::Fast, FilterType::Sub),
        ("Fast, Up", CompressionType::Fast, FilterType::Up),
        ("Fast, Paeth", CompressionType::Fast, FilterType::Paeth),
        (
            "Fast, Adaptive",
            CompressionType::Fast,
            FilterType::Adaptive,
        ),
        ("Level(1), Up", CompressionType::Level(1), FilterType::Up),
        (
            "Default, Adaptive",
            CompressionType::Default,
            FilterType::Adaptive,
        ),
    ];
    for (width, height) in [(224, 224), (1024, 768)] {
        let map = heat(width, height);
        let image = photo(width, height);
        let overlay = render::overlay(&image, &map, 0.5);
        let gray8 = render::gray8(&map);
        let gray16 = render::gray16(&map);
        println!(
            "  {width}x{height}: overlay {:?}, colormap+gray8+gray16 {:?}",
            time(21, || render::overlay(&image, &map, 0.5)),
            time(21, || (
                render::colormap(&map),
                render::gray8(&map),
                render::gray16(&map)
            ))
        );
        for (name, compression, filter) in settings {
            let encode = |image: &RgbImage| {
                let mut png = Vec::new();
                image
                    .write_with_encoder(PngEncoder::new_with_quality(&mut png, compression, filter))
                    .unwrap();
                png
            };
            let took = time(21, || encode(&overlay));
            println!(
                "    overlay RGB8 {name:<18} {took:>10.2?} {:>8} bytes",
                encode(&overlay).len()
            );
        }
        let took8 = time(21, || render::encode_png(&gray8).unwrap());
        let took16 = time(21, || render::encode_png(&gray16).unwrap());
        println!(
            "    encode_png gray8 {took8:.2?} {} bytes, gray16 {took16:.2?} {} bytes",
            render::encode_png(&gray8).unwrap().len(),
            render::encode_png(&gray16).unwrap().len()
        );
    }

    // What each class beyond the first costs a top-k request with output=boxes (EfficientNet-Lite0's layer).
    let (channels, side) = (1280, 7);
    let activations: Vec<f32> = (0..channels * side * side)
        .map(|i| ((i * 7919) % 1000) as f32 * 1e-3)
        .collect();
    let gradients: Vec<f32> = (0..channels * side * side)
        .map(|i| ((i * 104_729) % 1000) as f32 * 1e-6 - 4e-4)
        .collect();
    let shape = [channels, side, side];
    let raw = cam::compute(CamMethod::GradCam, &activations, &gradients, shape, false);
    let display = display_map(&raw, 224, 224);
    println!("one class of a top-k request, 1280x7x7 layer, 224x224 image:");
    println!(
        "  Grad-CAM map {:?}, display map {:?}, boxes {:?}",
        time(101, || cam::compute(
            CamMethod::GradCam,
            &activations,
            &gradients,
            shape,
            false
        )),
        time(101, || display_map(&raw, 224, 224)),
        time(101, || boxes::regions(&display, Threshold::PAPER, 5)),
    );

    println!("boxes::regions on 4000x3000:");
    let one = Map::new(4000, 3000, vec![1.0; 12_000_000]);
    println!(
        "  one segment covering the map: {:?}",
        time(5, || boxes::regions(&one, Threshold::PAPER, 5))
    );
    let big_heat = heat(4000, 3000);
    println!(
        "  upsampled 7x7 map (2 segments): {:?}",
        time(5, || boxes::regions(&big_heat, Threshold::PAPER, 5))
    );
    println!(
        "  the same at Otsu's level (its histogram included): {:?}",
        time(5, || boxes::regions(&big_heat, Threshold::Otsu, 5))
    );
    let mut seed = 7u32;
    let speckle = Map::new(
        4000,
        3000,
        (0..12_000_000)
            .map(|_| {
                seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (seed >> 31) as f32
            })
            .collect(),
    );
    println!(
        "  random half-on pixels: {:?}",
        time(5, || boxes::regions(&speckle, Threshold::PAPER, 5))
    );
    println!(
        "display_map 7x7 -> 4000x3000: {:?}",
        time(5, || heat(4000, 3000))
    );
}
