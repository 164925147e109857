//! What image outputs are drawn on, shared by the `explain` route's answers and the labeling formats.

use std::sync::OnceLock;

use image::RgbImage;

use crate::explain::{self, Explanation, TargetMap};
use crate::http::params::HeatmapEncoding;
use crate::pipeline::render::{self, ImageFormat};

/// What image outputs are drawn on: the photo's size, capped by `max_side`. The decoded photo is resized only once,
/// and only when an overlay needs it (it was decoded at least this large: `ExplainOptions::drawn_side`).
pub struct Canvas<'a> {
    pub width: usize,
    pub height: usize,
    image: &'a RgbImage,
    resized: OnceLock<RgbImage>,
}

impl<'a> Canvas<'a> {
    pub fn new(explanation: &'a Explanation, max_side: usize) -> Self {
        let (width, height) =
            explain::fit(explanation.photo_size.0, explanation.photo_size.1, max_side);
        Self {
            width,
            height,
            image: &explanation.image,
            resized: OnceLock::new(),
        }
    }

    fn photo(&self) -> &RgbImage {
        if (self.image.width() as usize, self.image.height() as usize) == (self.width, self.height)
        {
            return self.image;
        }
        self.resized.get_or_init(|| {
            crate::pipeline::preprocess::resize(self.image, self.width, self.height)
        })
    }

    pub fn overlay(&self, target: &TargetMap, alpha: f32, format: ImageFormat) -> Vec<u8> {
        let heat = target.heat_rows(self.width, self.height);
        let heat_row = |y, row: &mut [f32]| heat.row(y, row);
        encoded(match format {
            ImageFormat::Jpeg { quality } => {
                render::overlay_jpeg(self.photo(), alpha, heat_row, quality)
            }
            _ => format.encode(&render::overlay_rows(self.photo(), alpha, heat_row)),
        })
    }

    /// `format` must be PNG for gray16 (params::parse_explain checks).
    pub fn heatmap(
        &self,
        target: &TargetMap,
        encoding: HeatmapEncoding,
        format: ImageFormat,
    ) -> Vec<u8> {
        let heat = target.heat_at(self.width, self.height);
        encoded(match encoding {
            HeatmapEncoding::Color => format.encode(&render::colormap(&heat)),
            HeatmapEncoding::Gray8 => format.encode(&render::gray8(&heat)),
            HeatmapEncoding::Gray16 => render::encode_png(&render::gray16(&heat)),
        })
    }
}

/// Encoding into memory fails only on an internal bug (a zero-sized image), never on client input.
pub fn encoded(result: Result<Vec<u8>, image::ImageError>) -> Vec<u8> {
    result.expect("encoding an image into memory")
}
