"""Export PyTorch image classifiers to camserve's ONNX model contract v1 (see exporter/README.md)."""

__version__ = "0.1.0"

from .errors import CheckFailed, UserError  # noqa: E402
from .export import ExportResult, export_contract  # noqa: E402
from .split import ExplicitSplit, HookSplit  # noqa: E402

__all__ = ["CheckFailed", "ExplicitSplit", "ExportResult", "HookSplit", "UserError", "export_contract", "__version__"]
