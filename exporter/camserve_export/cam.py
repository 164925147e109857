"""Grad-CAM from contract outputs, in numpy: the reference the tests and fixtures compare maps with."""

import cv2
import numpy as np


def gradcam_lowres(activations: np.ndarray, gradients: np.ndarray) -> np.ndarray:
    """One image, one seed: A [Ch,h,w], dY/dA [Ch,h,w] -> relu(sum_c mean_hw(dY/dA_c) * A_c), [h,w], not normalized."""
    weights = gradients.mean(axis=(1, 2), dtype=np.float64)
    return np.maximum((weights[:, None, None] * activations).sum(axis=0), 0).astype(np.float32)


def _minmax(cam: np.ndarray) -> np.ndarray:
    cam = cam - cam.min()
    return cam / (1e-7 + cam.max())


def like_pytorch_grad_cam(lowres: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """What pytorch-grad-cam 1.5.7's GradCAM returns for one target layer: min-max normalize, cv2.resize
    (bilinear) to the input size, then normalize again (its aggregate_multi_layers step)."""
    up = cv2.resize(_minmax(lowres.astype(np.float32)).astype(np.float32), (size_hw[1], size_hw[0]))
    return _minmax(np.maximum(up, 0)).astype(np.float32)
