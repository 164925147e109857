"""The references the Rust tests trust for the CAM family are right: the numpy pieces against PyTorch and
pytorch-grad-cam, the sign rule against the SVD's own ambiguity."""

import numpy as np
import torch
from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection

from camserve_export.fixtures import tiny_cnn
from camserve_export.references import (orient, pytorch_grad_cam_map, score_cam_numpy,
                                        upsample_align_corners)
from camserve_export.split import hook_split


def test_numpy_upsampling_is_torchs_align_corners():
    maps = np.random.default_rng(0).standard_normal((3, 7, 5)).astype(np.float32)
    want = torch.nn.UpsamplingBilinear2d(size=(30, 17))(torch.from_numpy(maps)[None])[0].numpy()
    assert np.abs(upsample_align_corners(maps, (30, 17)) - want).max() < 1e-5


def test_numpy_score_cam_with_every_channel_is_pytorch_grad_cams():
    split = hook_split(tiny_cnn(), "features")
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((1, 3, 64, 64)).astype(np.float32))
    cls = 3
    want, _ = pytorch_grad_cam_map(split, x, cls, "scorecam")
    got, channels = score_cam_numpy(split, x, cls, 32)
    assert sorted(channels) == list(range(32))
    assert np.abs(got - want).max() < 1e-4


def test_orientation_picks_one_of_the_two_signs_by_the_channel_sum():
    rng = np.random.default_rng(2)
    for _ in range(20):
        weighted = rng.standard_normal((1, 6, 4, 5)).astype(np.float32)
        lapack = get_2d_projection(weighted)[0]
        oriented, flipped = orient(lapack, weighted[0])
        assert np.array_equal(oriented, -lapack if flipped else lapack)
        assert (oriented * weighted[0].sum(axis=0)).sum() >= 0
        # The other sign gives the same orientation.
        assert np.array_equal(orient(-lapack, weighted[0])[0], oriented)
