//! From request bytes to the model's input tensor: decoding with size limits, resizing, scaling.

use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, RgbImage};
use std::fmt;
use std::io::Cursor;

/// Largest image `decode` accepts, checked against the header before decoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeLimits {
    pub max_width: u32,
    pub max_height: u32,
    pub max_pixels: u64,
}

impl Default for DecodeLimits {
    /// Room for 48-megapixel phone photos (8064x6048) in either orientation.
    fn default() -> Self {
        DecodeLimits {
            max_width: 8192,
            max_height: 8192,
            max_pixels: 50_000_000,
        }
    }
}

impl fmt::Display for DecodeLimits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "at most {}x{} and {} pixels",
            self.max_width, self.max_height, self.max_pixels
        )
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DecodeError {
    #[error("the image is empty")]
    Empty,
    #[error("the image is not PNG, JPEG or WebP")]
    UnsupportedFormat,
    #[error("the image cannot be decoded: {0}")]
    Undecodable(String),
    #[error("the image is {width}x{height}, over the limit ({limit})")]
    TooLarge {
        width: u32,
        height: u32,
        limit: DecodeLimits,
    },
}

/// A decoded photo: its pixels, perhaps at a fraction of its size, and the size of the photo itself.
#[derive(Debug, PartialEq)]
pub struct Decoded {
    /// Upright RGB pixels; at least the size asked of [`decode_at_least`], at most the photo's.
    pub image: RgbImage,
    /// The upright photo's size, `(width, height)`: what boxes, masks and image outputs are measured in.
    pub size: (usize, usize),
}

/// Decodes PNG, JPEG or WebP (told apart by their bytes) to RGB at full size, turned upright by its EXIF
/// orientation as browsers and `cv2.imread` do. Alpha is dropped, 16-bit samples are scaled to 8.
pub fn decode(bytes: &[u8], limits: &DecodeLimits) -> Result<RgbImage, DecodeError> {
    decode_at_least(bytes, limits, |width, height| (width, height)).map(|decoded| decoded.image)
}

/// As [`decode`], but a JPEG is decoded at the smallest scale M/8 (M = 1..8) whose upright size is at least
/// `needed(photo width, photo height)` in both sides: libjpeg-turbo scales in the DCT domain, so a 12-megapixel
/// photo wanted at 224 px costs little more than reading its bytes. PNG and WebP are always decoded whole.
pub fn decode_at_least(
    bytes: &[u8],
    limits: &DecodeLimits,
    needed: impl FnOnce(usize, usize) -> (usize, usize),
) -> Result<Decoded, DecodeError> {
    if bytes.is_empty() {
        return Err(DecodeError::Empty);
    }
    // Bytes of a known format we don't take (GIF, BMP...) are a media type error; unknown bytes are not an image.
    let format = match image::guess_format(bytes) {
        Ok(ImageFormat::Jpeg) => match jpeg::decode(bytes, limits, needed)? {
            Some(decoded) => return Ok(decoded),
            None => ImageFormat::Jpeg,
        },
        Ok(format @ (ImageFormat::Png | ImageFormat::WebP)) => format,
        Ok(_) => return Err(DecodeError::UnsupportedFormat),
        Err(_) => {
            return Err(DecodeError::Undecodable(
                "the bytes are not a PNG, JPEG or WebP image".into(),
            ));
        }
    };
    let image = decode_whole(bytes, format, limits)?;
    let size = (image.width() as usize, image.height() as usize);
    Ok(Decoded { image, size })
}

/// The pixels of a JPEG, from its header alone; 0 for other bytes.
pub fn jpeg_pixels(bytes: &[u8]) -> u64 {
    ImageReader::with_format(Cursor::new(bytes), ImageFormat::Jpeg)
        .into_dimensions()
        .map_or(0, |(width, height)| u64::from(width) * u64::from(height))
}

/// Any format the `image` crate reads, whole: PNG, WebP, and the JPEGs libjpeg-turbo does not turn into RGB
/// (CMYK).
fn decode_whole(
    bytes: &[u8],
    format: ImageFormat,
    limits: &DecodeLimits,
) -> Result<RgbImage, DecodeError> {
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    // Our own limits are checked below from the header alone, so that the error can give the size.
    reader.no_limits();
    let mut decoder = reader.into_decoder().map_err(undecodable)?;
    let (width, height) = decoder.dimensions();
    limits.check(width as usize, height as usize)?;
    let orientation = decoder.orientation().map_err(undecodable)?;
    let mut image = DynamicImage::from_decoder(decoder).map_err(undecodable)?;
    image.apply_orientation(orientation);
    Ok(image.into_rgb8())
}

fn undecodable(error: impl fmt::Display) -> DecodeError {
    DecodeError::Undecodable(error.to_string())
}

/// The message libjpeg's error handler unwound with (the mozjpeg crate's errors are unwinds, not `Err`s).
pub(crate) fn unwound_message(unwound: Box<dyn std::any::Any + Send>) -> String {
    match unwound.downcast::<String>() {
        Ok(message) => *message,
        Err(unwound) => unwound
            .downcast_ref::<&str>()
            .map_or_else(|| "libjpeg failed".to_owned(), |m| (*m).to_owned()),
    }
}

impl DecodeLimits {
    fn check(&self, width: usize, height: usize) -> Result<(), DecodeError> {
        let pixels = width as u64 * height as u64;
        if width > self.max_width as usize
            || height > self.max_height as usize
            || pixels > self.max_pixels
        {
            return Err(DecodeError::TooLarge {
                width: width as u32,
                height: height as u32,
                limit: *self,
            });
        }
        Ok(())
    }
}

/// JPEG through libjpeg-turbo (the `mozjpeg` crate builds it from source; with `nasm` installed, with its SIMD).
mod jpeg {
    use super::{DecodeError, DecodeLimits, Decoded, undecodable};
    use image::metadata::Orientation;
    use image::{DynamicImage, RgbImage};
    use mozjpeg::{ColorSpace, Decompress, Marker};

    /// `Ok(None)`: a colour space libjpeg-turbo does not convert to RGB (CMYK, YCCK), for the `image` crate.
    pub(super) fn decode(
        bytes: &[u8],
        limits: &DecodeLimits,
        needed: impl FnOnce(usize, usize) -> (usize, usize),
    ) -> Result<Option<Decoded>, DecodeError> {
        // The mozjpeg crate reports libjpeg's fatal errors (a corrupt stream) by unwinding, without the panic hook.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            decode_or_unwind(bytes, limits, needed)
        }))
        .unwrap_or_else(|unwound| Err(undecodable(super::unwound_message(unwound))))
    }

    fn decode_or_unwind(
        bytes: &[u8],
        limits: &DecodeLimits,
        needed: impl FnOnce(usize, usize) -> (usize, usize),
    ) -> Result<Option<Decoded>, DecodeError> {
        let mut decompress = Decompress::with_markers(&[Marker::APP(1)])
            .from_mem(bytes)
            .map_err(undecodable)?;
        if matches!(
            decompress.color_space(),
            ColorSpace::JCS_CMYK | ColorSpace::JCS_YCCK
        ) {
            return Ok(None);
        }
        let (width, height) = decompress.size();
        limits.check(width, height)?;
        let orientation = decompress
            .markers()
            .find_map(|marker| exif_orientation(marker.data))
            .unwrap_or(Orientation::NoTransforms);
        let turned = matches!(
            orientation,
            Orientation::Rotate90
                | Orientation::Rotate270
                | Orientation::Rotate90FlipH
                | Orientation::Rotate270FlipH
        );
        let upright = |(w, h): (usize, usize)| if turned { (h, w) } else { (w, h) };
        let (photo_width, photo_height) = upright((width, height));
        let (need_width, need_height) = upright(needed(photo_width, photo_height));
        // libjpeg-turbo's output side at M/8 is ceil(side * M / 8).
        let scaled = |side: usize, m: usize| (side * m).div_ceil(8);
        let m = (1..=8)
            .find(|&m| scaled(width, m) >= need_width && scaled(height, m) >= need_height)
            .unwrap_or(8);
        decompress.scale(m as u8);
        let mut started = decompress.rgb().map_err(undecodable)?;
        let (out_width, out_height) = (started.width(), started.height());
        let pixels = started.read_scanlines::<u8>().map_err(undecodable)?;
        started.finish().map_err(undecodable)?;
        let image = RgbImage::from_raw(out_width as u32, out_height as u32, pixels)
            .ok_or_else(|| undecodable("libjpeg-turbo returned fewer rows than the image has"))?;
        let mut image = DynamicImage::ImageRgb8(image);
        image.apply_orientation(orientation);
        Ok(Some(Decoded {
            image: image.into_rgb8(),
            size: upright((width, height)),
        }))
    }

    /// The orientation in an APP1 segment (`Exif\0\0` and a TIFF block), if it is one and has the tag.
    fn exif_orientation(segment: &[u8]) -> Option<Orientation> {
        Orientation::from_exif_chunk(segment.strip_prefix(b"Exif\0\0")?)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChannelOrder {
    Rgb,
    Bgr,
}

impl ChannelOrder {
    pub fn name(self) -> &'static str {
        match self {
            Self::Rgb => "RGB",
            Self::Bgr => "BGR",
        }
    }
}

/// How a model wants its input: size, value range, per-channel mean and std.
#[derive(Clone, Debug, PartialEq)]
pub struct Preprocess {
    pub width: usize,
    pub height: usize,
    /// Per tensor channel, that is, in `channel_order`.
    pub mean: [f32; 3],
    pub std: [f32; 3],
    pub channel_order: ChannelOrder,
    /// What pixel values 0 and 255 map to before mean and std, e.g. (0, 1) or (0, 255).
    pub value_range: (f32, f32),
}

impl Preprocess {
    /// The length of one image's tensor, `3 * height * width`.
    pub fn tensor_len(&self) -> usize {
        3 * self.height * self.width
    }

    /// Writes one image as a CHW float32 tensor: the whole image stretched to `width x height`
    /// (bilinear with antialiasing, as PIL and torchvision resize; skipped when the size already
    /// matches), then `value = lo + pixel / 255 * (hi - lo)` and `(value - mean[c]) / std[c]`.
    ///
    /// # Panics
    /// If `out.len()` is not [`Self::tensor_len`].
    pub fn write_tensor(&self, image: &RgbImage, out: &mut [f32]) {
        assert_eq!(
            out.len(),
            self.tensor_len(),
            "tensor buffer is not [3,{},{}]",
            self.height,
            self.width
        );
        let resized;
        let image =
            if (image.width() as usize, image.height() as usize) == (self.width, self.height) {
                image
            } else {
                resized = resize(image, self.width, self.height);
                &resized
            };
        let tables = self.value_tables();
        let plane = self.width * self.height;
        let (first, rest) = out.split_at_mut(plane);
        let (second, third) = rest.split_at_mut(plane);
        // The planes that the image's red, green and blue go to; the tables are in RGB order too.
        let [red, green, blue] = match self.channel_order {
            ChannelOrder::Rgb => [first, second, third],
            ChannelOrder::Bgr => [third, second, first],
        };
        for (i, pixel) in image.pixels().enumerate() {
            red[i] = tables[0][usize::from(pixel[0])];
            green[i] = tables[1][usize::from(pixel[1])];
            blue[i] = tables[2][usize::from(pixel[2])];
        }
    }

    /// Tensor value for each 8-bit level, per RGB channel: 256 evaluations instead of one per pixel.
    fn value_tables(&self) -> [[f32; 256]; 3] {
        let (lo, hi) = self.value_range;
        let tensor_channel = |rgb: usize| match self.channel_order {
            ChannelOrder::Rgb => rgb,
            ChannelOrder::Bgr => 2 - rgb,
        };
        std::array::from_fn(|rgb| {
            let c = tensor_channel(rgb);
            std::array::from_fn(|level| {
                (lo + level as f32 / 255.0 * (hi - lo) - self.mean[c]) / self.std[c]
            })
        })
    }
}

/// Stretches an image with fast_image_resize's bilinear convolution: it matches PIL's
/// antialiased bilinear and is several times faster than image's Triangle filter
/// (see `examples/measure.rs`).
pub fn resize(image: &RgbImage, width: usize, height: usize) -> RgbImage {
    let (width, height) = (width as u32, height as u32);
    let src = ImageRef::new(
        image.width(),
        image.height(),
        image.as_raw(),
        PixelType::U8x3,
    )
    .expect("an RgbImage buffer is width * height * 3 bytes");
    let mut dst = Image::new(width, height, PixelType::U8x3);
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear));
    Resizer::new()
        .resize(&src, &mut dst, &options)
        .expect("same pixel type, non-empty images");
    RgbImage::from_raw(width, height, dst.into_vec())
        .expect("resized buffer is width * height * 3 bytes")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::render::encode_png;
    use image::Rgb;
    use std::time::Instant;

    fn imagenet(width: usize, height: usize, channel_order: ChannelOrder) -> Preprocess {
        Preprocess {
            width,
            height,
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
            channel_order,
            value_range: (0.0, 1.0),
        }
    }

    #[test]
    fn tensor_values_by_hand() {
        // Pixel (255, 0, 51) with ImageNet statistics:
        // R (1 - 0.485) / 0.229 = 2.2489083, G (0 - 0.456) / 0.224 = -2.0357143,
        // B (0.2 - 0.406) / 0.225 = -0.9155556.
        let image = RgbImage::from_pixel(2, 1, Rgb([255, 0, 51]));
        let mut out = vec![0.0; 6];
        imagenet(2, 1, ChannelOrder::Rgb).write_tensor(&image, &mut out);
        let want = [
            2.2489083, 2.2489083, -2.0357143, -2.0357143, -0.9155556, -0.9155556,
        ];
        out.iter()
            .zip(want)
            .for_each(|(g, w)| assert!((g - w).abs() < 1e-6, "{g} vs {w}"));
    }

    #[test]
    fn bgr_with_0_255_range() {
        // Caffe style: BGR planes, values 0..255, mean per BGR channel, std 1.
        let pre = Preprocess {
            width: 1,
            height: 1,
            mean: [100.0, 110.0, 120.0],
            std: [1.0, 1.0, 2.0],
            channel_order: ChannelOrder::Bgr,
            value_range: (0.0, 255.0),
        };
        let mut out = vec![0.0; 3];
        pre.write_tensor(&RgbImage::from_pixel(1, 1, Rgb([200, 10, 30])), &mut out);
        // Planes are B, G, R: 30 - 100, 10 - 110, (200 - 120) / 2.
        assert_eq!(out, vec![-70.0, -100.0, 40.0]);
    }

    #[test]
    fn resizes_to_the_model_size() {
        // A uniform image stays uniform whatever the filter: every value is pixel 128's.
        let image = RgbImage::from_pixel(640, 480, Rgb([128, 128, 128]));
        let pre = imagenet(224, 224, ChannelOrder::Rgb);
        let mut out = vec![0.0; pre.tensor_len()];
        pre.write_tensor(&image, &mut out);
        let red = (128.0 / 255.0 - 0.485) / 0.229;
        assert!(out[..224 * 224].iter().all(|v| (v - red).abs() < 1e-6));
        // Black, black, white, white, halved in width. Antialiased bilinear (PIL's) spans two source
        // pixels each side: output 0 centred at x = 1.0 weighs pixels centred at 0.5, 1.5, 2.5 by
        // 0.75, 0.75, 0.25 (sum 1.75), so 255 * 0.25 / 1.75 = 36.4 -> 36, and 255 - 36 = 219.
        // (Plain bilinear, as cv2 INTER_LINEAR, would give 0 and 255.)
        let image = RgbImage::from_fn(4, 1, |x, _| {
            if x < 2 {
                Rgb([0, 0, 0])
            } else {
                Rgb([255, 255, 255])
            }
        });
        let pre = Preprocess {
            value_range: (0.0, 255.0),
            mean: [0.0; 3],
            std: [1.0; 3],
            ..imagenet(2, 1, ChannelOrder::Rgb)
        };
        let mut out = vec![0.0; 6];
        pre.write_tensor(&image, &mut out);
        assert_eq!(out, vec![36.0, 219.0, 36.0, 219.0, 36.0, 219.0]);
    }

    #[test]
    fn decodes_png() {
        let image = RgbImage::from_fn(5, 3, |x, y| Rgb([x as u8 * 40, y as u8 * 80, 7]));
        let png = encode_png(&image).unwrap();
        assert_eq!(decode(&png, &DecodeLimits::default()), Ok(image));
    }

    /// A JPEG of `image` by mozjpeg (progressive), with an EXIF orientation tag when `orientation` is given.
    fn jpeg(image: &RgbImage, orientation: Option<u16>) -> Vec<u8> {
        let mut compress = mozjpeg::Compress::new(mozjpeg::ColorSpace::JCS_RGB);
        compress.set_size(image.width() as usize, image.height() as usize);
        compress.set_quality(95.0);
        let mut started = compress.start_compress(Vec::new()).unwrap();
        if let Some(orientation) = orientation {
            // Exif header, a big-endian TIFF header, one IFD entry: tag 0x0112 (Orientation), SHORT, count 1.
            let mut exif = b"Exif\0\0MM\0\x2a\0\0\0\x08\0\x01\x01\x12\0\x03\0\0\0\x01".to_vec();
            exif.extend(orientation.to_be_bytes());
            exif.extend([0, 0, 0, 0, 0, 0]);
            started.write_marker(mozjpeg::Marker::APP(1), &exif);
        }
        started.write_scanlines(image.as_raw()).unwrap();
        started.finish().unwrap()
    }

    /// 64 x 32: red on the left half, blue on the right.
    fn red_left_blue_right() -> RgbImage {
        RgbImage::from_fn(64, 32, |x, _| {
            if x < 32 {
                Rgb([255, 0, 0])
            } else {
                Rgb([0, 0, 255])
            }
        })
    }

    fn is_red(pixel: &Rgb<u8>) -> bool {
        pixel[0] > 200 && pixel[2] < 60
    }

    #[test]
    fn a_corrupt_jpeg_is_undecodable_not_a_panic() {
        // libjpeg's fatal errors reach the mozjpeg crate as unwinds: a frame of 9-bit samples is one.
        let mut bytes = jpeg(&red_left_blue_right(), None);
        let frame = bytes
            .windows(2)
            .position(|w| w[0] == 0xFF && matches!(w[1], 0xC0 | 0xC2))
            .unwrap();
        bytes[frame + 4] = 9;
        let refused = decode(&bytes, &DecodeLimits::default());
        assert!(
            matches!(&refused, Err(DecodeError::Undecodable(m)) if m.contains("precision")),
            "{refused:?}"
        );
    }

    #[test]
    fn exif_orientation_is_applied_at_every_scale() {
        // Orientation 6: the stored image is shown turned 90 degrees clockwise, so its left half (red) is on top
        // of a 32 x 64 picture.
        let bytes = jpeg(&red_left_blue_right(), Some(6));
        for (needed, stored_scale) in [((32, 64), 8), ((16, 32), 4), ((8, 16), 2), ((4, 8), 1)] {
            let decoded = decode_at_least(&bytes, &DecodeLimits::default(), |w, h| {
                assert_eq!((w, h), (32, 64), "the photo's upright size");
                needed
            })
            .unwrap();
            assert_eq!(decoded.size, (32, 64));
            let (w, h) = (4 * stored_scale, 8 * stored_scale);
            assert_eq!(decoded.image.dimensions(), (w as u32, h as u32));
            let image = &decoded.image;
            let (top, bottom) = (
                image.get_pixel(w as u32 / 2, h as u32 / 4),
                image.get_pixel(w as u32 / 2, 3 * h as u32 / 4),
            );
            assert!(
                is_red(top) && !is_red(bottom),
                "scale {stored_scale}/8: {top:?} {bottom:?}"
            );
        }
        // Without the tag, the same bytes stay 64 x 32, red on the left.
        let plain = decode(
            &jpeg(&red_left_blue_right(), None),
            &DecodeLimits::default(),
        )
        .unwrap();
        assert_eq!(plain.dimensions(), (64, 32));
        assert!(is_red(plain.get_pixel(8, 16)) && !is_red(plain.get_pixel(56, 16)));
    }

    #[test]
    fn a_scaled_decode_gives_the_tensor_of_the_full_decode() {
        // A smooth 800 x 600 photo wanted at 224 px: decoded at 3/8 (300 x 225), the smallest scale that covers it.
        let photo = resize(
            &decode(
                &std::fs::read("tests/fixtures/images/chelsea_224.png").unwrap(),
                &DecodeLimits::default(),
            )
            .unwrap(),
            800,
            600,
        );
        let bytes = jpeg(&photo, None);
        let scaled = decode_at_least(&bytes, &DecodeLimits::default(), |_, _| (224, 224)).unwrap();
        assert_eq!(
            (scaled.image.dimensions(), scaled.size),
            ((300, 225), (800, 600))
        );
        let pre = imagenet(224, 224, ChannelOrder::Rgb);
        let tensor = |image: &RgbImage| {
            let mut out = vec![0.0; pre.tensor_len()];
            pre.write_tensor(image, &mut out);
            out
        };
        let (scaled, full) = (
            tensor(&scaled.image),
            tensor(&decode(&bytes, &DecodeLimits::default()).unwrap()),
        );
        // In 8-bit levels (a tensor unit is about 57 levels here).
        let mean_levels = scaled
            .iter()
            .zip(&full)
            .map(|(a, b)| (a - b).abs())
            .sum::<f32>()
            / full.len() as f32
            * 0.225
            * 255.0;
        assert!(mean_levels < 1.5, "{mean_levels} levels apart");
    }

    #[test]
    fn refuses_bad_input() {
        let limits = DecodeLimits::default();
        assert_eq!(decode(b"", &limits), Err(DecodeError::Empty));
        let noise: Vec<u8> = (0..200u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
            .collect();
        assert!(matches!(
            decode(&noise, &limits),
            Err(DecodeError::Undecodable(_))
        ));
        assert_eq!(
            decode(b"GIF89a\x01\x00\x01\x00", &limits),
            Err(DecodeError::UnsupportedFormat)
        );

        let png = encode_png(&RgbImage::from_pixel(64, 64, Rgb([1, 2, 3]))).unwrap();
        let truncated = decode(&png[..png.len() / 2], &limits);
        assert!(
            matches!(truncated, Err(DecodeError::Undecodable(_))),
            "{truncated:?}"
        );
    }

    /// A PNG whose IHDR claims `width x height` RGB pixels but whose IDAT holds almost nothing:
    /// a decoder that trusts the header would allocate for the claimed size.
    fn png_header(width: u32, height: u32) -> Vec<u8> {
        let mut header = width.to_be_bytes().to_vec();
        header.extend(height.to_be_bytes());
        header.extend([8, 2, 0, 0, 0]); // 8-bit, RGB, deflate, adaptive filters, no interlace
        let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
        for (kind, data) in [
            (b"IHDR", header),
            (b"IDAT", vec![0x78, 0x01]),
            (b"IEND", vec![]),
        ] {
            png.extend((data.len() as u32).to_be_bytes());
            let chunk = [kind.as_slice(), &data].concat();
            png.extend(&chunk);
            png.extend(crc32(&chunk).to_be_bytes());
        }
        png
    }

    // Bitwise CRC-32 (IEEE, reflected), as the PNG specification defines it.
    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &byte in bytes {
            crc ^= u32::from(byte);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    #[test]
    fn refuses_oversized_header_before_decoding() {
        let limits = DecodeLimits::default();
        let started = Instant::now();
        let refused = decode(&png_header(100_000, 100_000), &limits);
        assert_eq!(
            refused,
            Err(DecodeError::TooLarge {
                width: 100_000,
                height: 100_000,
                limit: limits
            })
        );
        assert!(
            started.elapsed().as_millis() < 100,
            "took {:?}",
            started.elapsed()
        );
        // Each limit on its own: within the width and height limits, over the pixel limit.
        let small = DecodeLimits {
            max_width: 100,
            max_height: 100,
            max_pixels: 5000,
        };
        assert!(matches!(
            decode(&png_header(100, 60), &small),
            Err(DecodeError::TooLarge { .. })
        ));
        assert!(matches!(
            decode(&png_header(101, 1), &small),
            Err(DecodeError::TooLarge { .. })
        ));
        // Within every limit, the header passes and the missing pixel data is what fails.
        assert!(matches!(
            decode(&png_header(50, 50), &small),
            Err(DecodeError::Undecodable(_))
        ));
    }

    #[test]
    fn too_large_message_names_size_and_limit() {
        let error = DecodeError::TooLarge {
            width: 9000,
            height: 10,
            limit: DecodeLimits::default(),
        };
        assert_eq!(
            error.to_string(),
            "the image is 9000x10, over the limit (at most 8192x8192 and 50000000 pixels)"
        );
    }
}
