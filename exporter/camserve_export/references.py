"""Reference maps and figures for the CAM family, computed independently of the server: pytorch-grad-cam 1.5.7's
own classes on the PyTorch model, and, where pytorch-grad-cam has no such option, a direct numpy/PyTorch
computation of the definition. tests/fixtures/README.md says which is which."""

from contextlib import ExitStack
from unittest import mock

import numpy as np
import torch

from .cam import like_pytorch_grad_cam

# The one-Run methods, by the name the server uses, and pytorch-grad-cam's class for each.
METHODS = ("gradcam", "gradcampp", "xgradcam", "hirescam", "gradcam_elementwise", "layercam", "eigencam",
           "eigengradcam")
# Methods whose map ignores eigen_smooth in pytorch-grad-cam: they always take the principal component.
ALWAYS_PROJECTED = ("eigencam", "eigengradcam")
# Modules that call get_2d_projection through their own imported name.
_PROJECTING_MODULES = ("base_cam", "eigen_cam", "eigen_grad_cam", "grad_cam_elementwise", "hirescam", "layer_cam")


def _cam_class(method: str):
    import pytorch_grad_cam as pgc

    return {"gradcam": pgc.GradCAM, "gradcampp": pgc.GradCAMPlusPlus, "xgradcam": pgc.XGradCAM,
            "hirescam": pgc.HiResCAM, "gradcam_elementwise": pgc.GradCAMElementWise, "layercam": pgc.LayerCAM,
            "eigencam": pgc.EigenCAM, "eigengradcam": pgc.EigenGradCAM, "scorecam": pgc.ScoreCAM}[method]


def orient(projection: np.ndarray, weighted: np.ndarray) -> tuple[np.ndarray, bool]:
    """camserve's sign for a principal-component map (an SVD's sign is arbitrary; LAPACK's is whatever it is):
    the one whose projection correlates positively with the channel sum of the projected tensor `weighted`
    [Ch,h,w]; on a tie, or where that sum is flat (its range within 1e-5 x channels x the largest |value|, as
    for a LayerNorm's output), the one whose entry of largest magnitude (first such) is positive.
    Returns the oriented projection and whether it was flipped."""
    weighted = np.nan_to_num(weighted)
    total = weighted.sum(axis=0)
    flat = float(total.max() - total.min()) <= 1e-5 * weighted.shape[0] * float(np.abs(weighted).max())
    score = 0.0 if flat else float((projection.astype(np.float64) * total).sum())
    if score == 0.0:
        flat = projection.ravel()
        score = float(flat[np.argmax(np.abs(flat))])
    return (-projection, True) if score < 0 else (projection, False)


def pytorch_grad_cam_map(split, x: torch.Tensor, cls: int, method: str, aug_smooth=False,
                         eigen_smooth=False, reshape_transform=None) -> tuple[np.ndarray, int]:
    """pytorch-grad-cam's map [H,W] for one image and class, with its principal components oriented as camserve
    orients them (see `orient`), through `reshape_transform` for a target that is not NCHW. Returns the map and
    how many projections had LAPACK's sign flipped."""
    from pytorch_grad_cam.utils import svd_on_activations
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    flips = []
    original = svd_on_activations.get_2d_projection

    def oriented(batch):
        projections = original(batch)
        for i, weighted in enumerate(batch):
            projections[i], flipped = orient(projections[i], weighted)
            flips.append(flipped)
        return projections

    for p in split.root.parameters():
        p.requires_grad_(True)  # pytorch-grad-cam needs a gradient to flow through the target layer
    with ExitStack() as stack:
        for module in _PROJECTING_MODULES:
            stack.enter_context(mock.patch(f"pytorch_grad_cam.{module}.get_2d_projection", oriented))
        cam = stack.enter_context(_cam_class(method)(model=split.root, target_layers=[split.target_module],
                                                     reshape_transform=reshape_transform))
        result = cam(input_tensor=x, targets=[ClassifierOutputTarget(cls)], aug_smooth=aug_smooth,
                     eigen_smooth=eigen_smooth)[0]
    return result.astype(np.float32), sum(flips)


def upsample_align_corners(maps: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling with align_corners=True (torch.nn.UpsamplingBilinear2d), [Ch,h,w] -> [Ch,H,W], in
    float64: output pixel i samples the source at i * (h - 1) / (H - 1)."""

    def axis(src, dst):
        pos = np.arange(dst) * ((src - 1) / (dst - 1)) if dst > 1 else np.zeros(1)
        lo = np.minimum(np.floor(pos).astype(int), src - 1)
        return lo, np.minimum(lo + 1, src - 1), pos - lo

    y0, y1, fy = axis(maps.shape[1], size_hw[0])
    x0, x1, fx = axis(maps.shape[2], size_hw[1])
    m = maps.astype(np.float64)
    rows = m[:, y0] * (1 - fy)[None, :, None] + m[:, y1] * fy[None, :, None]
    return rows[:, :, x0] * (1 - fx) + rows[:, :, x1] * fx


def score_cam_numpy(split, x: torch.Tensor, cls: int, max_channels: int) -> tuple[np.ndarray, list[int]]:
    """Score-CAM as pytorch-grad-cam defines it, restricted to the `max_channels` channels of largest mean
    activation (ties: lower index first): each channel upsampled (align_corners=True) and min-max scaled is a
    mask on the input tensor; the masked inputs' target logits, softmaxed over the scored channels, weight the
    channels (the others weigh 0). Returns the map at input size (ReLU, min-max, resize, min-max, as
    pytorch-grad-cam returns maps) and the scored channels."""
    with torch.no_grad():
        A = split.activations(x)[0].numpy()
    means = A.mean(axis=(1, 2), dtype=np.float64)
    order = np.argsort(-means, kind="stable")[:max_channels]
    if max_channels < len(means):
        gap = means[order[-1]] - means[np.argsort(-means, kind="stable")[max_channels]]
        assert gap > 1e-6 * np.abs(means).max(), "the budget's last channel is a near-tie: choose another case"
    up = upsample_align_corners(A[order], tuple(x.shape[-2:]))
    lo, hi = up.min(axis=(1, 2), keepdims=True), up.max(axis=(1, 2), keepdims=True)
    masks = (up - lo) / (hi - lo + 1e-8)
    masked = torch.from_numpy((x[0].numpy()[None].astype(np.float64) * masks[:, None]).astype(np.float32))
    with torch.no_grad():
        scores = split.logits(masked)[:, cls].double().numpy()
    weights = np.exp(scores - scores.max())
    weights /= weights.sum()
    lowres = np.maximum((weights[:, None, None] * A[order].astype(np.float64)).sum(axis=0), 0)
    return like_pytorch_grad_cam(lowres.astype(np.float32), tuple(x.shape[-2:])), [int(c) for c in order]


def trust_figures(split, x: torch.Tensor, cls: int, cam: np.ndarray) -> dict:
    """The target's softmax probability on the input, on input x cam (the salient part kept, the rest pulled
    to the preprocessing mean, as pytorch-grad-cam's CamMultImageConfidenceChange perturbs) and on
    input x (1 - cam) (the salient part removed); drop and increase in confidence from pytorch-grad-cam's own
    DropInConfidence and IncreaseInConfidence with ClassifierOutputSoftmaxTarget."""
    from pytorch_grad_cam.metrics.cam_mult_image import DropInConfidence, IncreaseInConfidence
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    m = torch.from_numpy(cam)
    with torch.no_grad():
        p = torch.softmax(split.logits(torch.cat([x, x * m, x * (1 - m)])), dim=1)[:, cls].double().numpy()
    targets = [ClassifierOutputSoftmaxTarget(cls)]
    drop = float(DropInConfidence()(x, cam[None], targets, split.root)[0])
    increase = float(IncreaseInConfidence()(x, cam[None], targets, split.root)[0])
    assert abs(drop - max(p[0] - p[1], 0.0)) < 1e-6 and increase == float(p[1] > p[0])
    return {"probability": float(p[0]), "kept_probability": float(p[1]), "removed_probability": float(p[2]),
            "drop_in_confidence": drop, "increase_in_confidence": bool(increase)}
