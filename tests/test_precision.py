from __future__ import annotations

import pytest
import torch

from safesteer_lens.errors import SafeSteerError
from safesteer_lens.precision import PRECISIONS, autocast, compute_dtype, model_dtype, native_bf16

CPU = torch.device("cpu")


def test_explicit_precisions_resolve_to_their_dtype():
    assert compute_dtype("float32", CPU) == torch.float32
    assert compute_dtype("bfloat16", CPU) == torch.bfloat16


def test_auto_follows_the_hardware():
    expected = torch.bfloat16 if native_bf16(CPU) else torch.float32
    assert compute_dtype("auto", CPU) == expected
    assert compute_dtype("auto", torch.device("meta")) == torch.float32  # no fast bf16 known there


def test_unknown_precision_is_a_one_line_error():
    with pytest.raises(SafeSteerError, match="unknown precision 'fp8': use one of " + ", ".join(PRECISIONS)):
        compute_dtype("fp8", CPU)


def test_autocast_runs_matmuls_in_bfloat16_and_float32_leaves_them_alone():
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with autocast(torch.float32, CPU):
        assert (a @ b).dtype == torch.float32
    with autocast(torch.bfloat16, CPU):
        out = a @ b
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), a @ b, atol=0.1)


def test_a_model_multiplies_in_its_gather_dtype_or_its_narrower_weights_whatever_the_precision(tiny_dir):
    from safesteer_lens.models import load_model

    whole = load_model(str(tiny_dir))
    assert model_dtype("float32", whole) == torch.float32
    assert model_dtype("bfloat16", whole) == torch.bfloat16
    assert model_dtype("float32", load_model(str(tiny_dir), dtype="bfloat16")) == torch.bfloat16
    whole.gather_dtype = torch.bfloat16  # as sharding.shard_model records it
    assert model_dtype("float32", whole) == torch.bfloat16
