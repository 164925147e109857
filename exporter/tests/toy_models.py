"""Small models for the CLI tests, importable as toy_models:FUNCTION (the tests run from this directory)."""

import torch
import torch.nn as nn

from camserve_export.fixtures import TinyCNN


def tiny():
    return TinyCNN()


class _Unused(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.ReLU())
        self.unused = nn.Conv2d(4, 4, 1)  # defined, never called
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


def unused_branch():
    return _Unused()


class _FlattenHead(nn.Module):
    """No pooling: the linear layer needs exactly 4x4 features, so only one input size works."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, stride=8, padding=1), nn.ReLU())
        self.fc = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(self.features(x).flatten(1))


def flatten_head():
    return _FlattenHead()


class _Noisy(TinyCNN):
    """Random noise in the forward: ONNX Runtime can't match PyTorch, so the parity check must fail."""

    def forward(self, x):
        return super().forward(x) + torch.randn(x.shape[0], 10)


def noisy():
    return _Noisy()


class _ConvHead(nn.Module):
    """A head that starts with padded, strided, dilated and grouped convs: exercises the convolution_backward
    decomposition at odd and even feature-map sizes."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.Conv2d(8, 12, 3, stride=2, padding=1), nn.ReLU(),
                                  nn.Conv2d(12, 12, 3, stride=3, padding=2, dilation=2, groups=4), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 6))

    def forward(self, x):
        return self.head(self.features(x))


def conv_head():
    return _ConvHead()


class _BakedPool(nn.Module):
    """Global pooling written with a kernel size read off the tensor: eager code accepts any size, but the traced
    graph has the kernel baked in, so H and W can't stay symbolic."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, stride=4, padding=1), nn.ReLU())
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        a = self.features(x)
        return self.fc(torch.nn.functional.avg_pool2d(a, kernel_size=int(a.shape[-1])).flatten(1))


def baked_pool():
    return _BakedPool()


class _AvgPoolHead(nn.Module):
    """AvgPool2d(3, stride 2, padding 1) in the head: exercises the avg_pool2d_backward decomposition."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1), nn.Conv2d(6, 6, 1), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))

    def forward(self, x):
        return self.head(self.features(x))


def avgpool_head():
    return _AvgPoolHead()
