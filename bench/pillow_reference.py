#!/usr/bin/env python3
"""What libjpeg-turbo and zlib cost, through Pillow, for `make bench`'s photo rows: per JPEG, the median time to
decode it whole, to decode it in draft mode (DCT scaling, 1/2 to 1/8, the smallest that still covers 224 x 224),
and to encode the whole photo as JPEG at quality 90 and as PNG at zlib level 1. Prints one JSON line."""

import io
import json
import statistics
import sys
import time

from PIL import Image


def median_ms(work, iterations: int) -> float:
    times = []
    for _ in range(iterations):
        started = time.perf_counter()
        work()
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def measure(path: str, iterations: int) -> dict:
    data = open(path, "rb").read()

    def full():
        image = Image.open(io.BytesIO(data))
        image.load()
        return image

    def draft():
        image = Image.open(io.BytesIO(data))
        image.draft("RGB", (224, 224))
        image.load()
        return image

    photo = full()

    def encode(format: str, **options):
        return lambda: photo.save(io.BytesIO(), format, **options)

    return {
        "size": list(photo.size),
        "draft_size": list(draft().size),
        "full_decode_ms": median_ms(full, iterations),
        "draft_decode_ms": median_ms(draft, iterations),
        "jpeg_encode_ms": median_ms(encode("JPEG", quality=90), iterations),
        "png_encode_ms": median_ms(encode("PNG", compress_level=1), max(1, iterations // 2)),
    }


if __name__ == "__main__":
    *photos, iterations = sys.argv[1:]
    print(json.dumps({photo: measure(photo, int(iterations)) for photo in photos}))
