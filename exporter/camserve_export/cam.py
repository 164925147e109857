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
    return like_pytorch_grad_cam_layers([lowres], size_hw)


def like_pytorch_grad_cam_layers(lowres: list[np.ndarray], size_hw: tuple[int, int]) -> np.ndarray:
    """pytorch-grad-cam's map for several target layers (compute_cam_per_layer, aggregate_multi_layers): per
    layer relu, min-max, cv2.resize to the input size; then max(0), the mean over layers, min-max."""
    up = [cv2.resize(_minmax(np.maximum(m, 0).astype(np.float32)).astype(np.float32), (size_hw[1], size_hw[0]))
          for m in lowres]
    return _minmax(np.maximum(np.stack(up), 0).mean(axis=0)).astype(np.float32)
