"""The export mechanics on small models: which heads get dynamic H/W, and the backward ops we decompose
ourselves. export_contract itself fails unless ONNX Runtime matches autograd at unseen N, K and (for dynamic
H/W) at (size+32) x (size+16), so a passing export is the parity assertion."""

import onnx
import pytest
import toy_models

from camserve_export import export_contract
from camserve_export.split import hook_split


def _export(factory, tmp_path, size):
    return export_contract(hook_split(factory(), "features"), tmp_path / "m.onnx", input_size=size)


def _input_dims(path):
    return [d.dim_param or d.dim_value for d in onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim]


def test_flatten_head_stays_fixed(tmp_path):
    """A flatten+linear head takes one feature-map size only: H and W are fixed, and the export says so."""
    result = _export(toy_models.flatten_head, tmp_path, 32)
    assert not result.dynamic_hw and any("fixed at 32" in note for note in result.notes)
    assert _input_dims(result.path) == ["N", 3, 32, 32]


def test_size_baked_into_code_falls_back_to_fixed(tmp_path):
    """Eager code takes any size, the traced graph can't (kernel read off the tensor): fixed, with a note."""
    result = _export(toy_models.baked_pool, tmp_path, 32)
    assert not result.dynamic_hw and any("could not stay symbolic" in note for note in result.notes)
    assert _input_dims(result.path) == ["N", 3, 32, 32]


@pytest.mark.parametrize("size", [35, 40])
def test_head_with_strided_padded_convs(tmp_path, size):
    """convolution_backward (strided, padded, dilated, grouped) at odd and even feature-map sizes."""
    result = _export(toy_models.conv_head, tmp_path, size)
    assert result.dynamic_hw and _input_dims(result.path) == ["N", 3, "H", "W"]
    assert max(result.errors.values()) <= 1e-4 and result.errors["gradients"] > 0  # not a trivially exact head


def test_head_with_average_pooling(tmp_path):
    result = _export(toy_models.avgpool_head, tmp_path, 37)
    assert result.dynamic_hw and max(result.errors.values()) <= 1e-4
