//! Pictures of maps: the JET colormap, overlays, grayscale heatmaps, and their encodings.

use crate::pipeline::bands;
use crate::pipeline::cam::Map;
use image::codecs::png::{CompressionType, FilterType, PngEncoder};
use image::codecs::webp::WebPEncoder;
use image::error::{UnsupportedError, UnsupportedErrorKind};
use image::{
    EncodableLayout, ExtendedColorType, GrayImage, ImageBuffer, ImageError, Luma,
    PixelWithColorType, RgbImage,
};
use std::sync::{Arc, Mutex, PoisonError};

/// A 16-bit grayscale image.
pub type Gray16Image = ImageBuffer<Luma<u16>, Vec<u16>>;

/// OpenCV's `COLORMAP_JET`, as RGB (OpenCV returns BGR).
pub static JET: [[u8; 3]; 256] = jet_table();

const fn jet_table() -> [[u8; 3]; 256] {
    let mut table = [[0u8; 3]; 256];
    let mut i = 0;
    while i < 256 {
        // Each channel rises and falls by 4 levels per entry, blue first, then green, then red.
        let x = i as i32;
        table[i] = [
            ramp(4 * x - 382, 1148 - 4 * x),
            ramp(4 * x - 128, 892 - 4 * x),
            ramp(4 * x + 128, 638 - 4 * x),
        ];
        i += 1;
    }
    // OpenCV builds its table by float interpolation, which rounds this one entry down.
    table[159][2] = 1;
    table
}

const fn ramp(rising: i32, falling: i32) -> u8 {
    let level = if rising < falling { rising } else { falling };
    if level < 0 {
        0
    } else if level > 255 {
        255
    } else {
        level as u8
    }
}

/// The 8-bit level of a normalized value, truncated as pytorch-grad-cam's `np.uint8(255 * mask)`.
fn level(value: f32) -> u8 {
    // `as` saturates and sends NaN to 0.
    (255.0 * value) as u8
}

/// `(1 - alpha) * image + alpha * jet(heat)`, rounded, per pixel: alpha is the heatmap's weight.
/// `heat` is normalized to [0, 1] and has the image's size.
///
/// # Panics
/// If `heat` and `image` differ in size.
pub fn overlay(image: &RgbImage, heat: &Map, alpha: f32) -> RgbImage {
    assert_same_size(image, heat);
    overlay_rows(image, alpha, |y, row| {
        row.copy_from_slice(&heat.data[y * heat.width..][..heat.width]);
    })
}

/// [`overlay`] with the heat's rows from `heat_row(y, row)`, so that a photo-sized heatmap need not be held.
pub fn overlay_rows(
    image: &RgbImage,
    alpha: f32,
    heat_row: impl Fn(usize, &mut [f32]) + Sync,
) -> RgbImage {
    let blend = Blend::for_alpha(alpha.clamp(0.0, 1.0));
    let mut out = image.clone();
    let width = image.width() as usize;
    bands::for_each_mut(&mut out, 3 * width, |first_row, band| {
        blend.rows(first_row, band, width, &heat_row);
    });
    out
}

/// Rows an overlay is blended in before libjpeg takes them ([`overlay_jpeg`]).
const JPEG_CHUNK_ROWS: usize = 16;

/// [`overlay_rows`] encoded as JPEG, blended on another thread a few rows at a time while libjpeg-turbo encodes
/// the rows before: the blend and the encoding then take one core each, at the same time, and the blended photo
/// is never held whole (a 12-megapixel overlay: 36 MB).
pub fn overlay_jpeg(
    image: &RgbImage,
    alpha: f32,
    heat_row: impl Fn(usize, &mut [f32]) + Sync,
    quality: u8,
) -> Result<Vec<u8>, ImageError> {
    let blend = Blend::for_alpha(alpha.clamp(0.0, 1.0));
    let (width, height) = (image.width() as usize, image.height() as usize);
    let heat_row = &heat_row;
    std::thread::scope(|scope| {
        let (send, blended) = std::sync::mpsc::sync_channel::<Vec<u8>>(4);
        scope.spawn(move || {
            for (i, rows) in image
                .as_raw()
                .chunks(JPEG_CHUNK_ROWS * 3 * width)
                .enumerate()
            {
                let mut chunk = rows.to_vec();
                blend.rows(i * JPEG_CHUNK_ROWS, &mut chunk, width, heat_row);
                if send.send(chunk).is_err() {
                    return; // the encoder failed
                }
            }
        });
        compress_jpeg(
            mozjpeg::ColorSpace::JCS_RGB,
            (width, height),
            quality,
            blended.iter(),
        )
    })
}

/// Every result of the blend for one alpha, `values[heat level][channel][photo value]`: a channel's blend depends
/// only on those two bytes, so a pixel is three lookups (twice as fast as the arithmetic) with the same f32
/// arithmetic, and so the same bytes, as computing each pixel.
struct Blend {
    alpha: f32,
    values: Vec<[[u8; 256]; 3]>,
}

impl Blend {
    /// Blends `rows` (RGB, `width` pixels each, the first being row `first_row`) in place with the heat of
    /// `heat_row(y, row)`.
    fn rows(
        &self,
        first_row: usize,
        rows: &mut [u8],
        width: usize,
        heat_row: impl Fn(usize, &mut [f32]),
    ) {
        let mut heat = vec![0.0; width];
        for (i, pixels) in rows.chunks_exact_mut(3 * width).enumerate() {
            heat_row(first_row + i, &mut heat);
            for (pixel, &value) in pixels.chunks_exact_mut(3).zip(&heat) {
                let channels = &self.values[usize::from(level(value))];
                for (channel, values) in pixel.iter_mut().zip(channels) {
                    *channel = values[usize::from(*channel)];
                }
            }
        }
    }

    /// The table of the last alpha asked for, shared: nearly every request uses the default one, and building a
    /// table (192 KiB) costs about as much as blending a 224 px image.
    fn for_alpha(alpha: f32) -> Arc<Blend> {
        static LAST: Mutex<Option<Arc<Blend>>> = Mutex::new(None);
        let mut last = LAST.lock().unwrap_or_else(PoisonError::into_inner);
        match &*last {
            Some(blend) if blend.alpha.to_bits() == alpha.to_bits() => blend.clone(),
            _ => last.insert(Arc::new(Blend::new(alpha))).clone(),
        }
    }

    fn new(alpha: f32) -> Blend {
        let photo_part: [f32; 256] = std::array::from_fn(|v| (1.0 - alpha) * v as f32);
        let mut values = vec![[[0u8; 256]; 3]; 256];
        for (channels, color) in values.iter_mut().zip(&JET) {
            for (table, &heat) in channels.iter_mut().zip(color) {
                let heat_part = alpha * f32::from(heat);
                for (value, photo) in table.iter_mut().zip(photo_part) {
                    // + 0.5 then truncation rounds these non-negative values, without a call to `round`.
                    *value = (photo + heat_part + 0.5) as u8;
                }
            }
        }
        Blend { alpha, values }
    }
}

fn assert_same_size(image: &RgbImage, heat: &Map) {
    let image_size = (image.width() as usize, image.height() as usize);
    assert_eq!(
        image_size,
        (heat.width, heat.height),
        "image and heatmap sizes differ"
    );
}

/// pytorch-grad-cam's `deprocess_image` (from keras-grad-cam), the picture of a guided backpropagation: centre the
/// values on their mean, divide by (std + 1e-5), scale by 0.1, shift by 0.5, clip to [0, 1], times 255 truncated.
/// `values` are `width x height` RGB pixels, interleaved (HWC).
///
/// # Panics
/// If `values.len() != 3 * width * height`.
pub fn deprocess(values: &[f32], width: usize, height: usize) -> RgbImage {
    assert_eq!(
        values.len(),
        3 * width * height,
        "values are not {height}x{width}x3"
    );
    let count = values.len().max(1) as f64;
    let mean = values.iter().map(|&v| f64::from(v)).sum::<f64>() / count;
    let variance = values
        .iter()
        .map(|&v| (f64::from(v) - mean).powi(2))
        .sum::<f64>()
        / count;
    let scale = 0.1 / (variance.sqrt() + 1e-5);
    let bytes = values
        .iter()
        .map(|&v| (((f64::from(v) - mean) * scale + 0.5).clamp(0.0, 1.0) * 255.0) as u8)
        .collect();
    RgbImage::from_raw(width as u32, height as u32, bytes).expect("the length was checked")
}

/// The normalized map in JET colours.
pub fn colormap(heat: &Map) -> RgbImage {
    let pixels = heat
        .data
        .iter()
        .flat_map(|&v| JET[usize::from(level(v))])
        .collect();
    RgbImage::from_raw(width_u32(heat), height_u32(heat), pixels)
        .expect("one RGB pixel per map value")
}

/// The normalized map as 8-bit gray, with the same levels as [`colormap`] indexes JET with.
pub fn gray8(heat: &Map) -> GrayImage {
    let pixels = heat.data.iter().map(|&v| level(v)).collect();
    GrayImage::from_raw(width_u32(heat), height_u32(heat), pixels).expect("one pixel per map value")
}

/// The normalized map as 16-bit gray, rounded to nearest so that `pixel / 65535` is within
/// 0.5 / 65535 of the value.
pub fn gray16(heat: &Map) -> Gray16Image {
    let pixels = heat
        .data
        .iter()
        .map(|&v| (65535.0 * v + 0.5) as u16)
        .collect();
    Gray16Image::from_raw(width_u32(heat), height_u32(heat), pixels)
        .expect("one pixel per map value")
}

fn width_u32(map: &Map) -> u32 {
    u32::try_from(map.width).expect("map width fits an image")
}

fn height_u32(map: &Map) -> u32 {
    u32::try_from(map.height).expect("map height fits an image")
}

/// PNG with fast settings: zlib's fastest level with the Up filter (see `examples/measure.rs`
/// for the numbers behind this choice). Works for RGB8, Luma8 and Luma16 images.
pub fn encode_png<P>(image: &ImageBuffer<P, Vec<P::Subpixel>>) -> Result<Vec<u8>, ImageError>
where
    P: PixelWithColorType,
    [P::Subpixel]: EncodableLayout,
{
    let mut png = Vec::new();
    image.write_with_encoder(PngEncoder::new_with_quality(
        &mut png,
        CompressionType::Fast,
        FilterType::Up,
    ))?;
    Ok(png)
}

/// How an overlay or heatmap is encoded (the `image_format` parameter).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageFormat {
    /// Lossless, [`encode_png`]'s fast settings.
    Png,
    /// Baseline JPEG by libjpeg-turbo at this quality (1-100), 4:2:0 chroma as Pillow and libjpeg default to:
    /// a 12-megapixel overlay encodes several times faster than as PNG, in a fraction of the bytes.
    Jpeg { quality: u8 },
    /// Lossless WebP (the `image` crate encodes no lossy WebP).
    WebP,
}

impl ImageFormat {
    pub fn media_type(self) -> &'static str {
        match self {
            Self::Png => "image/png",
            Self::Jpeg { .. } => "image/jpeg",
            Self::WebP => "image/webp",
        }
    }

    /// Encodes 8-bit RGB or gray pixels.
    pub fn encode<P>(self, image: &ImageBuffer<P, Vec<u8>>) -> Result<Vec<u8>, ImageError>
    where
        P: PixelWithColorType<Subpixel = u8>,
    {
        match self {
            Self::Png => encode_png(image),
            Self::Jpeg { quality } => encode_jpeg(image, quality),
            Self::WebP => {
                let mut webp = Vec::new();
                image.write_with_encoder(WebPEncoder::new_lossless(&mut webp))?;
                Ok(webp)
            }
        }
    }
}

fn encode_jpeg<P>(image: &ImageBuffer<P, Vec<u8>>, quality: u8) -> Result<Vec<u8>, ImageError>
where
    P: PixelWithColorType<Subpixel = u8>,
{
    let color_space = match P::COLOR_TYPE {
        ExtendedColorType::Rgb8 => mozjpeg::ColorSpace::JCS_RGB,
        ExtendedColorType::L8 => mozjpeg::ColorSpace::JCS_GRAYSCALE,
        other => {
            return Err(ImageError::Unsupported(
                UnsupportedError::from_format_and_kind(
                    image::error::ImageFormatHint::Exact(image::ImageFormat::Jpeg),
                    UnsupportedErrorKind::Color(other),
                ),
            ));
        }
    };
    let size = (image.width() as usize, image.height() as usize);
    compress_jpeg(
        color_space,
        size,
        quality,
        std::iter::once(image.as_raw().as_slice()),
    )
}

/// Baseline JPEG of the rows `rows` hands over in order, (width, height) pixels in all.
fn compress_jpeg(
    color_space: mozjpeg::ColorSpace,
    (width, height): (usize, usize),
    quality: u8,
    rows: impl Iterator<Item = impl AsRef<[u8]>>,
) -> Result<Vec<u8>, ImageError> {
    // The mozjpeg crate reports libjpeg's fatal errors by unwinding.
    let encoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut compress = mozjpeg::Compress::new(color_space);
        // libjpeg-turbo's own settings (baseline, no trellis search): mozjpeg's defaults spend seconds on a photo.
        compress.set_fastest_defaults();
        compress.set_size(width, height);
        compress.set_quality(f32::from(quality));
        let mut started = compress.start_compress(Vec::new())?;
        for chunk in rows {
            started.write_scanlines(chunk.as_ref())?;
        }
        started.finish()
    }))
    .unwrap_or_else(|unwound| {
        Err(std::io::Error::other(
            crate::pipeline::preprocess::unwound_message(unwound),
        ))
    });
    encoded.map_err(ImageError::IoError)
}

/// A NumPy `.npy` file (format 1.0): little-endian float32 in C order, readable by `np.load`.
///
/// # Panics
/// If `data.len()` is not the product of `shape`.
pub fn encode_npy_f32(shape: &[usize], data: &[f32]) -> Vec<u8> {
    assert_eq!(
        data.len(),
        shape.iter().product::<usize>(),
        "data does not fill shape {shape:?}"
    );
    let dims = match shape {
        [single] => format!("{single},"),
        _ => shape
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join(", "),
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({dims}), }}");
    // Magic (6) + version (2) + length (2) + header + newline, padded with spaces to 64 bytes.
    let unpadded = 10 + header.len() + 1;
    header.extend(std::iter::repeat_n(
        ' ',
        unpadded.next_multiple_of(64) - unpadded,
    ));
    header.push('\n');

    let mut npy = Vec::with_capacity(10 + header.len() + 4 * data.len());
    npy.extend_from_slice(b"\x93NUMPY\x01\x00");
    let header_len = u16::try_from(header.len()).expect("npy v1 header fits 64 KiB");
    npy.extend_from_slice(&header_len.to_le_bytes());
    npy.extend_from_slice(header.as_bytes());
    npy.extend(data.iter().flat_map(|v| v.to_le_bytes()));
    npy
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    #[test]
    fn deprocess_as_by_hand() {
        // [0, 1, 2]: mean 1, std sqrt(2/3); 0.5 -+ 0.1 / (0.816497 + 1e-5) -> 0.377526, 0.5, 0.622474 -> x 255,
        // truncated: 96, 127, 158.
        assert_eq!(deprocess(&[0.0, 1.0, 2.0], 1, 1).as_raw(), &[96, 127, 158]);
        // 35 zeros and a one: mean 1/36, std sqrt(35)/36; zeros -> 0.483097 -> 123; the one -> 1.0916, clipped -> 255.
        let mut values = vec![0.0; 36];
        values[7] = 1.0;
        let image = deprocess(&values, 4, 3);
        assert_eq!(image.dimensions(), (4, 3));
        let mut want = vec![123u8; 36];
        want[7] = 255;
        assert_eq!(image.as_raw(), &want);
    }

    #[test]
    fn jet_matches_opencv() {
        // cv2.applyColorMap(np.arange(256, dtype=np.uint8).reshape(1, 256), cv2.COLORMAP_JET),
        // BGR reversed to RGB (opencv-python-headless 4.x). All 256 entries were compared once;
        // these are the ends of each linear piece and the one irregular entry (159).
        let cases: [(usize, [u8; 3]); 19] = [
            (0, [0, 0, 128]),
            (1, [0, 0, 132]),
            (31, [0, 0, 252]),
            (32, [0, 0, 255]),
            (63, [0, 124, 255]),
            (64, [0, 128, 255]),
            (95, [0, 252, 255]),
            (96, [2, 255, 254]),
            (127, [126, 255, 130]),
            (128, [130, 255, 126]),
            (158, [250, 255, 6]),
            (159, [254, 255, 1]),
            (160, [255, 252, 0]),
            (191, [255, 128, 0]),
            (192, [255, 124, 0]),
            (223, [255, 0, 0]),
            (224, [252, 0, 0]),
            (254, [132, 0, 0]),
            (255, [128, 0, 0]),
        ];
        for (index, rgb) in cases {
            assert_eq!(JET[index], rgb, "entry {index}");
        }
    }

    #[test]
    fn overlay_blends_and_rounds() {
        // Heat 1.0 is JET[255] = (128, 0, 0); heat 0.0 is JET[0] = (0, 0, 128).
        let image = RgbImage::from_fn(2, 1, |x, _| {
            if x == 0 {
                Rgb([101, 50, 200])
            } else {
                Rgb([10, 20, 30])
            }
        });
        let heat = Map::new(2, 1, vec![1.0, 0.0]);
        let out = overlay(&image, &heat, 0.5);
        // (101 + 128) / 2 = 114.5 -> 115 (half away from zero); 50 / 2 = 25; 200 / 2 = 100.
        assert_eq!(out.get_pixel(0, 0), &Rgb([115, 25, 100]));
        // 0.25 * (0, 0, 128) + 0.75 * (10, 20, 30) = (7.5, 15, 54.5) -> (8, 15, 55).
        assert_eq!(
            overlay(&image, &heat, 0.25).get_pixel(1, 0),
            &Rgb([8, 15, 55])
        );
        assert_eq!(overlay(&image, &heat, 0.0), image);
    }

    #[test]
    fn overlay_table_gives_the_per_pixel_blend() {
        // Every photo value (x) against every heat level (y), computed here one pixel at a time.
        let image = RgbImage::from_fn(256, 256, |x, y| {
            Rgb([x as u8, (x as u8) ^ (y as u8), 255 - x as u8])
        });
        let heat = Map::new(
            256,
            256,
            (0..256 * 256)
                .map(|i| ((i / 256) as f32 + 0.5) / 255.0)
                .collect(),
        );
        for alpha in [0.0, 0.3, 0.5, 0.77, 1.0] {
            let out = overlay(&image, &heat, alpha);
            for (x, y, pixel) in out.enumerate_pixels() {
                let color = JET[usize::from(level(heat.data[(y * 256 + x) as usize]))];
                let photo = image.get_pixel(x, y).0;
                let expected: [u8; 3] = std::array::from_fn(|c| {
                    ((1.0 - alpha) * f32::from(photo[c]) + alpha * f32::from(color[c]) + 0.5) as u8
                });
                assert_eq!(pixel.0, expected, "alpha {alpha} at ({x}, {y})");
            }
        }
    }

    #[test]
    fn levels_truncate_like_pytorch_grad_cam() {
        // np.uint8(255 * 0.5) = 127 (127.5 truncated); out-of-range and NaN saturate.
        let heat = Map::new(5, 1, vec![0.5, 1.0, 1.5, -0.2, f32::NAN]);
        assert_eq!(gray8(&heat).into_raw(), vec![127, 255, 255, 0, 0]);
        let colors = colormap(&heat);
        assert_eq!(colors.get_pixel(0, 0).0, JET[127]);
        assert_eq!(colors.get_pixel(1, 0).0, JET[255]);
        // 65535 * 0.5 = 32767.5 -> 32768.
        assert_eq!(gray16(&heat).into_raw(), vec![32768, 65535, 65535, 0, 0]);
    }

    #[test]
    fn a_streamed_jpeg_overlay_is_the_jpeg_of_the_blended_overlay() {
        // Taller than one chunk and not a multiple of it, so that the last chunk is short.
        let (width, height) = (37, 3 * JPEG_CHUNK_ROWS + 5);
        let image = RgbImage::from_fn(width as u32, height as u32, |x, y| {
            Rgb([(x * 7) as u8, (y * 5) as u8, ((x + y) * 3) as u8])
        });
        let heat = |y: usize, row: &mut [f32]| {
            for (x, value) in row.iter_mut().enumerate() {
                *value = ((x + 2 * y) % 50) as f32 / 49.0;
            }
        };
        let whole = ImageFormat::Jpeg { quality: 90 }
            .encode(&overlay_rows(&image, 0.4, heat))
            .unwrap();
        assert_eq!(overlay_jpeg(&image, 0.4, heat, 90).unwrap(), whole);
    }

    #[test]
    fn png_round_trips() {
        let heat = Map::new(3, 2, vec![0.0, 0.2, 0.4, 0.6, 0.8, 1.0]);
        let rgb = colormap(&heat);
        let decoded = image::load_from_memory(&encode_png(&rgb).unwrap()).unwrap();
        assert_eq!(decoded.to_rgb8(), rgb);
        let gray = gray8(&heat);
        assert_eq!(
            image::load_from_memory(&encode_png(&gray).unwrap())
                .unwrap()
                .to_luma8(),
            gray
        );
        let deep = gray16(&heat);
        assert_eq!(
            image::load_from_memory(&encode_png(&deep).unwrap())
                .unwrap()
                .to_luma16(),
            deep
        );
    }

    #[test]
    fn npy_bytes_match_numpy() {
        // io.BytesIO after np.save(f, np.array([1.5, -2], np.float32)) (numpy 2.x): the header
        // is padded to 128 bytes in all, then 1.5 and -2.0 as little-endian f32.
        let npy = encode_npy_f32(&[2], &[1.5, -2.0]);
        let mut want =
            b"\x93NUMPY\x01\x00v\x00{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }"
                .to_vec();
        want.extend(std::iter::repeat_n(b' ', 128 - 1 - want.len()));
        want.push(b'\n');
        want.extend_from_slice(b"\x00\x00\xc0?\x00\x00\x00\xc0");
        assert_eq!(npy, want);

        let matrix = encode_npy_f32(&[2, 3], &[0.0; 6]);
        assert!(matrix.starts_with(
            b"\x93NUMPY\x01\x00v\x00{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }"
        ));
        assert_eq!((matrix.len(), matrix[127]), (128 + 24, b'\n'));
        let scalar = encode_npy_f32(&[], &[7.0]);
        assert!(scalar.starts_with(
            b"\x93NUMPY\x01\x00v\x00{'descr': '<f4', 'fortran_order': False, 'shape': (), }"
        ));
    }
}
