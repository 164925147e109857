//! Work on a large picture split into bands of whole rows, one per core. A 12-megapixel map or overlay is tens of
//! milliseconds on one core; pictures of a model's size stay on the calling thread, where a spawn would cost more
//! than the work.

/// Pictures with fewer values than this are done on the calling thread: at 2^18, a 640 x 480 overlay's render
/// took 4.0 ms in two bands against 2.5 ms on one thread (waking an idle core costs more than half the work).
const PARALLEL_FROM: usize = 1 << 20;

fn bands(rows: usize, len: usize) -> usize {
    if len < PARALLEL_FROM {
        return 1;
    }
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    cores.min(rows).max(1)
}

/// Calls `work(first row, band)` on bands of `data`, whose rows are `row_len` long.
pub fn for_each_mut<T: Send>(
    data: &mut [T],
    row_len: usize,
    work: impl Fn(usize, &mut [T]) + Sync,
) {
    let rows = data.len() / row_len.max(1);
    let count = bands(rows, data.len());
    if count == 1 {
        return work(0, data);
    }
    let rows_per_band = rows.div_ceil(count);
    std::thread::scope(|scope| {
        for (i, band) in data.chunks_mut(rows_per_band * row_len).enumerate() {
            let work = &work;
            scope.spawn(move || work(i * rows_per_band, band));
        }
    });
}

/// `work` on bands of `data` (read only), its results in band order; an item of `data` stands for `values_per_item`
/// values of the picture (a row's width, when `data` are rows).
pub fn map<T: Sync, R: Send>(
    data: &[T],
    values_per_item: usize,
    work: impl Fn(&[T]) -> R + Sync,
) -> Vec<R> {
    let count = bands(data.len(), data.len() * values_per_item);
    if count == 1 {
        return vec![work(data)];
    }
    std::thread::scope(|scope| {
        let handles: Vec<_> = data
            .chunks(data.len().div_ceil(count))
            .map(|band| {
                let work = &work;
                scope.spawn(move || work(band))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a band's work does not panic"))
            .collect()
    })
}

/// `(first(), second())`, side by side when a picture of `len` values makes it worth a thread.
pub fn both<A: Send, B: Send>(
    len: usize,
    first: impl FnOnce() -> A + Send,
    second: impl FnOnce() -> B + Send,
) -> (A, B) {
    if len < PARALLEL_FROM {
        return (first(), second());
    }
    std::thread::scope(|scope| {
        let second = scope.spawn(second);
        (first(), second.join().expect("the work does not panic"))
    })
}
