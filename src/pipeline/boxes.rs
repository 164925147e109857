//! Boxes around the regions of a map: binarize it (at a fraction of its maximum, as the Grad-CAM paper's
//! localization protocol does with 15%, or at Otsu's threshold), then take connected segments, largest first.

use crate::pipeline::cam::Map;

/// Where a map is binarized: pixels at or above the level are in.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Threshold {
    /// This fraction of the map's maximum, in (0, 1].
    Fraction(f32),
    /// Otsu's threshold of the map's values (see [`otsu`]): adapts to each map.
    Otsu,
}

impl Threshold {
    /// The Grad-CAM paper's protocol: 15% of the maximum.
    pub const PAPER: Threshold = Threshold::Fraction(0.15);
    /// Otsu's threshold: with the localization Run, what localized best on both of camserve's localization sets
    /// (docs/localization.md).
    pub const DEFAULT: Threshold = Threshold::Otsu;

    /// `otsu`, or a fraction above 0 and at most 1.
    pub fn parse(text: &str) -> Option<Threshold> {
        if text == "otsu" {
            return Some(Threshold::Otsu);
        }
        // Checked as given (f64): rounding to f32 first would let 1.0000000000000002 in.
        let fraction: f64 = text.parse().ok()?;
        (fraction > 0.0 && fraction <= 1.0).then_some(Threshold::Fraction(fraction as f32))
    }

    /// The map value at and above which pixels are in; `None` when the map's maximum is not a positive finite
    /// number (such a map has no region).
    pub fn level(self, map: &Map) -> Option<f32> {
        let (_, max) = map.min_max()?;
        if !(max > 0.0 && max.is_finite()) {
            return None;
        }
        match self {
            Threshold::Fraction(fraction) => Some(fraction * max),
            Threshold::Otsu => otsu(map),
        }
    }
}

impl std::fmt::Display for Threshold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Threshold::Fraction(fraction) => write!(f, "{fraction}"),
            Threshold::Otsu => f.write_str("otsu"),
        }
    }
}

/// Otsu's threshold as scikit-image's `threshold_otsu(map)` computes it for a float32 image, step for step and
/// in float32 as it does, so that both pick the same bin: a 256-bin histogram over the map's [min, max] (NumPy's
/// bin edges), then the centre of the bin that maximizes the between-class variance. A constant map gives its
/// value. NaN pixels are left out (scikit-image refuses them); `None` when no other pixel is left.
pub fn otsu(map: &Map) -> Option<f32> {
    const BINS: usize = 256;
    let (min, max) = map.min_max()?;
    if !(min.is_finite() && max.is_finite()) {
        return None;
    }
    if min == max {
        return Some(min);
    }
    // np.linspace(min, max, 257) in float32, its last edge exactly max.
    let step = (max - min) / BINS as f32;
    let mut edges: Vec<f32> = (0..=BINS).map(|i| i as f32 * step + min).collect();
    edges[BINS] = max;
    // np.histogram: an index by scaling, corrected against the edges so each value lands in [edge i, edge i+1).
    let mut counts = [0f32; BINS];
    for &v in map.data.iter().filter(|v| !v.is_nan()) {
        let mut i = (((v - min) / (max - min) * BINS as f32) as usize).min(BINS - 1);
        if v < edges[i] {
            i -= 1;
        } else if i != BINS - 1 && v >= edges[i + 1] {
            i += 1;
        }
        counts[i] += 1.0;
    }
    let centres: Vec<f32> = edges.windows(2).map(|e| (e[0] + e[1]) / 2.0).collect();
    // Cumulative pixel counts and means from the low end (bins 0..=i) and from the high end (bins i..).
    let cumulative = |order: &mut dyn Iterator<Item = usize>| {
        let (mut weight, mut sum) = (0f32, 0f32);
        let mut out = vec![(0f32, 0f32); BINS];
        for i in order {
            weight += counts[i];
            sum += counts[i] * centres[i];
            out[i] = (weight, sum / weight);
        }
        out
    };
    let low = cumulative(&mut (0..BINS));
    let high = cumulative(&mut (0..BINS).rev());
    let mut best = (0, f32::NEG_INFINITY);
    for i in 0..BINS - 1 {
        let ((weight1, mean1), (weight2, mean2)) = (low[i], high[i + 1]);
        let difference = mean1 - mean2;
        let variance = weight1 * weight2 * (difference * difference);
        if variance > best.1 {
            best = (i, variance);
        }
    }
    Some(centres[best.0])
}

/// One 8-connected segment of the binarized map.
#[derive(Clone, Debug, PartialEq)]
pub struct Region {
    /// Pixel coordinates; `x_max` and `y_max` are exclusive, so the width is `x_max - x_min`.
    pub x_min: usize,
    pub y_min: usize,
    pub x_max: usize,
    pub y_max: usize,
    /// Pixels in the segment (not the box's area).
    pub area: usize,
    /// Mean and largest map value over the segment's pixels.
    pub mean: f32,
    pub peak: f32,
}

/// Up to `max_boxes` segments where the map is at or above `threshold`'s level, largest area first
/// (equal areas keep the raster order of their first pixel). A map whose maximum is not a
/// positive finite number has no regions; NaN pixels are never in a segment.
pub fn regions(map: &Map, threshold: Threshold, max_boxes: usize) -> Vec<Region> {
    match threshold.level(map) {
        Some(level) => regions_at(map, level, max_boxes),
        None => Vec::new(),
    }
}

/// [`regions`] at a level already found with [`Threshold::level`].
pub fn regions_at(map: &Map, threshold: f32, max_boxes: usize) -> Vec<Region> {
    if max_boxes == 0 {
        return Vec::new();
    }
    // Segments are built from horizontal runs of pixels that are in, joined with union-find:
    // one pass over the pixels, no recursion, and work per run rather than per pixel.
    let runs = runs_above(map, threshold);
    let mut parent: Vec<usize> = (0..runs.len()).collect();
    let mut above = 0..0; // the previous row's runs
    let mut row_start = 0;
    for (i, run) in runs.iter().enumerate() {
        if run.y != runs[row_start].y {
            above = if runs[row_start].y + 1 == run.y {
                row_start..i
            } else {
                i..i
            };
            row_start = i;
        }
        // 8-connected: a run above touches this one if their columns overlap or meet at a corner.
        while above.start < above.end && runs[above.start].end < run.start {
            above.start += 1;
        }
        for j in above.clone().take_while(|&j| runs[j].start <= run.end) {
            union(&mut parent, i, j);
        }
    }

    let mut segment_of_root = vec![usize::MAX; runs.len()];
    let mut found: Vec<Region> = Vec::new();
    let mut sums: Vec<f64> = Vec::new();
    for (i, run) in runs.iter().enumerate() {
        let root = find(&mut parent, i);
        if segment_of_root[root] == usize::MAX {
            segment_of_root[root] = found.len();
            found.push(Region {
                x_min: run.start,
                y_min: run.y,
                x_max: run.end,
                y_max: run.y + 1,
                area: 0,
                mean: 0.0,
                peak: f32::NEG_INFINITY,
            });
            sums.push(0.0);
        }
        let segment = segment_of_root[root];
        let region = &mut found[segment];
        let values = &map.data[run.y * map.width..][run.start..run.end];
        region.x_min = region.x_min.min(run.start);
        region.x_max = region.x_max.max(run.end);
        region.y_max = run.y + 1;
        region.area += values.len();
        region.peak = values.iter().fold(region.peak, |peak, &v| peak.max(v));
        sums[segment] += values.iter().map(|&v| f64::from(v)).sum::<f64>();
    }
    for (region, sum) in found.iter_mut().zip(sums) {
        region.mean = (sum / region.area as f64) as f32;
    }
    found.sort_by_key(|region| std::cmp::Reverse(region.area));
    found.truncate(max_boxes);
    found
}

/// A horizontal run of pixels at or above the threshold: columns `start..end` of row `y`.
struct Run {
    y: usize,
    start: usize,
    end: usize,
}

fn runs_above(map: &Map, threshold: f32) -> Vec<Run> {
    let mut runs = Vec::new();
    for (y, row) in map.data.chunks_exact(map.width).enumerate() {
        let mut x = 0;
        while let Some(offset) = row[x..].iter().position(|&v| v >= threshold) {
            let start = x + offset;
            let end = row[start..]
                .iter()
                .position(|&v| v.is_nan() || v < threshold)
                .map_or(row.len(), |n| start + n);
            runs.push(Run { y, start, end });
            x = end;
        }
    }
    runs
}

fn find(parent: &mut [usize], mut i: usize) -> usize {
    while parent[i] != i {
        parent[i] = parent[parent[i]]; // path halving keeps trees shallow
        i = parent[i];
    }
    i
}

/// Joins the trees of runs `a` and `b`.
fn union(parent: &mut [usize], a: usize, b: usize) {
    let (a, b) = (find(parent, a), find(parent, b));
    let (low, high) = if a < b { (a, b) } else { (b, a) };
    parent[high] = low;
}

/// The paper's single box: the largest segment, if any.
pub fn largest_segment(map: &Map, threshold: Threshold) -> Option<Region> {
    regions(map, threshold, 1).pop()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// A map from ASCII art: '.' is 0, a digit d is d / 10.
    fn drawn(rows: &[&str]) -> Map {
        let data = rows
            .iter()
            .flat_map(|row| {
                row.chars()
                    .map(|c| c.to_digit(10).map_or(0.0, |d| d as f32 / 10.0))
            })
            .collect();
        Map::new(rows[0].len(), rows.len(), data)
    }

    fn f(fraction: f32) -> Threshold {
        Threshold::Fraction(fraction)
    }

    fn bounds(region: &Region) -> (usize, usize, usize, usize) {
        (region.x_min, region.y_min, region.x_max, region.y_max)
    }

    #[test]
    fn two_blobs_largest_first() {
        let map = drawn(&["........", ".55.....", ".55..999", ".....999", ".....9.."]);
        // The 9-blob has 7 pixels in columns 5..8, rows 2..5; the 5-blob 4 pixels.
        let found = regions(&map, f(0.15), 5);
        assert_eq!(found.len(), 2);
        assert_eq!(bounds(&found[0]), (5, 2, 8, 5));
        assert_eq!((found[0].area, found[0].peak), (7, 0.9));
        assert!((found[0].mean - 0.9).abs() < 1e-6);
        assert_eq!(bounds(&found[1]), (1, 1, 3, 3));
        assert_eq!(found[1].area, 4);
        assert_eq!(regions(&map, f(0.15), 1), vec![found[0].clone()]);
        assert_eq!(largest_segment(&map, f(0.15)), Some(found[0].clone()));
    }

    #[test]
    fn diagonal_neighbours_join() {
        // Pixels touching only at corners form one 8-connected segment.
        let map = drawn(&["9...", ".9..", "..9.", ".9.9"]);
        let found = regions(&map, f(0.15), 5);
        assert_eq!(found.len(), 1);
        assert_eq!(bounds(&found[0]), (0, 0, 4, 4));
        assert_eq!(found[0].area, 5);
    }

    #[test]
    fn shapes_that_join_late_or_not_at_all() {
        // A U: its two arms are separate runs until the bottom row joins them.
        let u = regions(&drawn(&["9.9", "9.9", "999"]), f(0.15), 5);
        assert_eq!(
            u.iter().map(|r| (r.area, bounds(r))).collect::<Vec<_>>(),
            vec![(7, (0, 0, 3, 3))]
        );
        // An empty row in between, and a gap of two columns between rows, separate.
        assert_eq!(regions(&drawn(&["9..", "...", "9.."]), f(0.15), 5).len(), 2);
        assert_eq!(regions(&drawn(&["9...", "..9."]), f(0.15), 5).len(), 2);
        // An N: a left arm, a diagonal, and a right arm joined only through corners.
        let n = regions(&drawn(&["9..9", "99.9", "9.99", "9..9"]), f(0.15), 5);
        assert_eq!(n.iter().map(|r| r.area).collect::<Vec<_>>(), vec![10]);
    }

    /// Segment areas and boxes by a plain flood fill, for cross-checking.
    fn flood_fill_reference(
        inside: &[bool],
        width: usize,
    ) -> Vec<(usize, (usize, usize, usize, usize))> {
        let height = inside.len() / width;
        let mut seen = vec![false; inside.len()];
        let mut segments = Vec::new();
        for start in 0..inside.len() {
            if !inside[start] || seen[start] {
                continue;
            }
            seen[start] = true;
            let mut stack = vec![start];
            let (mut area, mut b) = (0, (width, height, 0, 0));
            while let Some(i) = stack.pop() {
                let (x, y) = (i % width, i / width);
                area += 1;
                b = (b.0.min(x), b.1.min(y), b.2.max(x + 1), b.3.max(y + 1));
                for (nx, ny) in (0..9).map(|k| (x as i64 + k % 3 - 1, y as i64 + k / 3 - 1)) {
                    let (nx, ny) = (nx as usize, ny as usize); // -1 wraps to usize::MAX, out of range
                    if nx < width
                        && ny < height
                        && inside[ny * width + nx]
                        && !seen[ny * width + nx]
                    {
                        seen[ny * width + nx] = true;
                        stack.push(ny * width + nx);
                    }
                }
            }
            segments.push((area, b));
        }
        segments.sort_by_key(|segment| std::cmp::Reverse(segment.0));
        segments
    }

    #[test]
    fn random_maps_agree_with_flood_fill() {
        let mut seed = 99u32;
        let mut next = || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            seed >> 8
        };
        for _ in 0..300 {
            let (width, height) = (1 + next() as usize % 17, 1 + next() as usize % 13);
            let density = 0.2 + (next() % 50) as f32 / 100.0;
            let data: Vec<f32> = (0..width * height)
                .map(|_| (next() % 1000) as f32 / 1000.0)
                .collect();
            let map = Map::new(width, height, data);
            let max = map.min_max().unwrap().1;
            let inside: Vec<bool> = map.data.iter().map(|&v| v >= density * max).collect();
            let got: Vec<_> = regions(&map, f(density), usize::MAX)
                .iter()
                .map(|r| (r.area, bounds(r)))
                .collect();
            assert_eq!(
                got,
                flood_fill_reference(&inside, width),
                "{width}x{height} at {density}"
            );
        }
    }

    #[test]
    fn threshold_is_inclusive() {
        // max 1.0 and fraction 0.5: the 5s (0.5 >= 0.5) are in, the 4s are out.
        let map = Map::new(4, 1, vec![1.0, 0.5, 0.0, 0.4]);
        let found = regions(&map, f(0.5), 5);
        assert_eq!(found.len(), 1);
        assert_eq!((bounds(&found[0]), found[0].area), ((0, 0, 2, 1), 2));
        assert!((found[0].mean - 0.75).abs() < 1e-6);
        assert_eq!(found[0].peak, 1.0);
    }

    #[test]
    fn fraction_zero_takes_every_pixel_and_one_takes_the_peaks() {
        let map = drawn(&["1..", "..9"]);
        assert_eq!(regions(&map, f(0.0), 5)[0].area, 6);
        let peaks = regions(&map, f(1.0), 5);
        assert_eq!(peaks.len(), 1);
        assert_eq!(bounds(&peaks[0]), (2, 1, 3, 2));
    }

    #[test]
    fn degenerate_maps_have_no_regions() {
        assert!(regions(&Map::new(0, 0, vec![]), f(0.15), 5).is_empty());
        assert!(regions(&drawn(&["...", "..."]), f(0.15), 5).is_empty());
        assert!(regions(&Map::new(2, 1, vec![-1.0, -0.5]), f(0.15), 5).is_empty());
        assert!(regions(&Map::new(2, 1, vec![f32::NAN, f32::NAN]), f(0.15), 5).is_empty());
        assert!(regions(&drawn(&["9"]), f(0.15), 0).is_empty());
        assert_eq!(largest_segment(&drawn(&["..."]), f(0.15)), None);
    }

    #[test]
    fn nan_pixels_split_nothing_and_join_nothing() {
        let map = Map::new(3, 1, vec![1.0, f32::NAN, 1.0]);
        let found = regions(&map, f(0.15), 5);
        assert_eq!(found.iter().map(|r| r.area).collect::<Vec<_>>(), vec![1, 1]);
        assert_eq!(bounds(&found[0]), (0, 0, 1, 1));
    }

    // Otsu's thresholds below are scikit-image 0.26's `threshold_otsu` on the same float32 maps (numpy 2.4):
    //   np.load(...gradcam.npy); np.float32(k - 300) / np.float32(37) and (k * k).astype(np.float32) /
    //   np.float32(994009) for k = (arange(5000) * 7919) % 997, shaped (50, 100).
    #[test]
    fn otsu_equals_scikit_image() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/reference/efficientnet_lite0.chelsea_224.class285.gradcam.npy"
        );
        let bytes = std::fs::read(path).unwrap();
        // A float32 [224, 224] .npy: its header ends with a newline at a multiple of 64 bytes.
        let start = bytes.iter().position(|&b| b == b'\n').unwrap() + 1;
        let data: Vec<f32> = bytes[start..]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let photo = Map::new(224, 224, data);
        assert_eq!(otsu(&photo), Some(0.486_328_07));

        let k = |i: usize| (i * 7919) % 997;
        let shifted = (0..5000).map(|i| (k(i) as f32 - 300.0) / 37.0).collect();
        assert_eq!(otsu(&Map::new(100, 50, shifted)), Some(5.298_774_7));
        let squared = (0..5000)
            .map(|i| (k(i) * k(i)) as f32 / 994_009.0)
            .collect();
        assert_eq!(otsu(&Map::new(100, 50, squared)), Some(0.407_384_66));
    }

    #[test]
    fn otsu_by_hand() {
        // Two values: every split between bin 0 and bin 255 separates them equally well; the first wins, and
        // its centre is half a bin width (the range / 512) above the minimum.
        assert_eq!(otsu(&drawn(&["...", "99."])), Some(0.9 / 512.0));
        assert_eq!(otsu(&Map::new(2, 1, vec![3.0, 3.0])), Some(3.0));
        assert_eq!(
            otsu(&Map::new(3, 1, vec![0.0, f32::NAN, 1.0])),
            Some(1.0 / 512.0)
        );
        assert_eq!(otsu(&Map::new(1, 1, vec![f32::NAN])), None);
        // A bright patch on a dim plateau: 15% of the maximum takes the whole map, Otsu's level (0.3011719 in
        // scikit-image) only the patch.
        let map = drawn(&["3333333", "3399933", "3399933", "3333333"]);
        assert_eq!(regions(&map, Threshold::PAPER, 5)[0].area, 28);
        let found = regions(&map, Threshold::Otsu, 5);
        assert_eq!(found.len(), 1);
        assert_eq!((bounds(&found[0]), found[0].area), ((2, 1, 5, 3), 6));
    }

    #[test]
    fn thresholds_parse_and_print() {
        assert_eq!(Threshold::parse("otsu"), Some(Threshold::Otsu));
        assert_eq!(Threshold::parse("0.15"), Some(Threshold::PAPER));
        assert_eq!(Threshold::parse("1"), Some(Threshold::Fraction(1.0)));
        // 1.0000000000000002 is over 1 though it rounds to 1.0 as f32 (schemathesis found it).
        for bad in [
            "0",
            "-0.1",
            "1.01",
            "1.0000000000000002",
            "NaN",
            "inf",
            "Otsu",
            "",
        ] {
            assert_eq!(Threshold::parse(bad), None, "{bad}");
        }
        assert_eq!(Threshold::PAPER.to_string(), "0.15");
        assert_eq!(Threshold::Otsu.to_string(), "otsu");
        let map = drawn(&["5.9"]);
        assert_eq!(Threshold::Fraction(0.5).level(&map), Some(0.45));
        assert_eq!(Threshold::Otsu.level(&drawn(&["..."])), None);
    }

    #[test]
    fn whole_4000x3000_map_is_one_segment() {
        // Also a timing sanity check: printed, not asserted (run with --nocapture to see it).
        let (width, height) = (4000, 3000);
        let data = (0..width * height)
            .map(|i| ((i % width) as f32 / width as f32) + 0.5)
            .collect();
        let map = Map::new(width, height, data);
        let started = Instant::now();
        let found = regions(&map, f(0.15), 5);
        println!(
            "boxes::regions on 4000x3000, one segment: {:?}",
            started.elapsed()
        );
        assert_eq!(found.len(), 1);
        assert_eq!(
            (bounds(&found[0]), found[0].area),
            ((0, 0, width, height), width * height)
        );
    }
}
