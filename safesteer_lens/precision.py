"""Compute precision of training: float32, or bfloat16 matmuls under ``torch.autocast``.

Training keeps the student's weights, gradients and AdamW states in ``student_dtype`` (float32
by default: a 1e-5 update rounds away in bfloat16). What :data:`PRECISIONS` choose is the
dtype the *matmuls* run in while the student samples, the student is scored and the teacher
scores: ``torch.autocast`` casts each weight to bfloat16 as an op needs it and keeps the
float32 master copy. The losses take the logits to float32 before any log-sum-exp.

The bridge's eager attention needs one guard under bfloat16 autocast: it casts Hugging Face's
float32 mask (whose masked entries are float32's minimum) to the scores' dtype, where that
minimum overflows to -inf. The leading pads of a left-padded row then see only -inf keys, softmax
gives NaN, and the NaN reaches every row through the next layer's values (and the gradients
through softmax's backward). :func:`finite_score_hooks` clamps the scores to bfloat16's finite
minimum, so such a row attends uniformly to its pads, as it does in float32, and nothing else
changes. A model whose embeddings are already bfloat16 (bfloat16 weights, or a sharded model
gathered in bfloat16) gets its mask built in bfloat16, with a finite minimum; the guard is
harmless there and applied all the same, keyed on the dtype the model multiplies in.

``"auto"`` picks bfloat16 where the hardware multiplies it natively: CUDA cards with bf16
(Ampere and later) and CPUs with AVX512-BF16 or AMX. There a bfloat16 matmul is 2-3 times as
fast as float32 (measured on 2 AMD EPYC cores with AVX512-BF16: 340-430 against 115-195
GFLOP/s). On other CPUs bfloat16 is emulated and slower, so ``"auto"`` stays in float32.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any, Callable

import torch
from jaxtyping import Float
from torch import Tensor

from safesteer_lens.errors import SafeSteerError
from safesteer_lens.models import ChatModel

PRECISIONS = ("auto", "float32", "bfloat16")


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices in hardware."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 0)  # Ampere on
    if device.type == "cpu":
        cpu = torch.cpu
        # private but stable: torch's own compiler asks the same questions
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(cpu, name, lambda: False)() for name in checks)
    return False


def check_precision(precision: str) -> None:
    """One-line error for a precision that is not one of :data:`PRECISIONS`."""
    if precision not in PRECISIONS:
        raise SafeSteerError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The matmul dtype that ``precision`` means on ``device`` (``auto`` resolved)."""
    check_precision(precision)
    if precision == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    return torch.bfloat16 if precision == "bfloat16" else torch.float32


def model_dtype(precision: str, model: ChatModel) -> torch.dtype:
    """The dtype ``model``'s matmuls run in under ``precision``.

    Usually what :func:`compute_dtype` says. Two kinds of model multiply in another dtype
    whatever the precision: a sharded one in the dtype FSDP gathers it in (chosen when it was
    sharded, :func:`~safesteer_lens.sharding.shard_model`), and one whose weights are
    narrower than float32 (the bfloat16 teacher on CUDA) in its weights' dtype. Callers ask
    here rather than the config, so that the sampler samples in the dtype the scoring
    multiplies in, and the metrics and checkpoints record what really ran.
    """
    if model.gather_dtype is not None:
        return model.gather_dtype
    if model.dtype != torch.float32:
        return model.dtype
    return compute_dtype(precision, model.device)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` as ``"bfloat16"``: the spelling of metrics, checkpoints and flags."""
    return str(dtype).removeprefix("torch.")


def autocast(dtype: torch.dtype, device: torch.device) -> AbstractContextManager[object]:
    """``torch.autocast`` to ``dtype`` on ``device``'s type; nothing at all for float32.

    Autocast casts a leaf weight that requires grad once per context and reuses the copy, so
    wrap a whole forward (or a whole sampling call) in one context, not each layer.
    """
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def finite_score_hooks(model: ChatModel, dtype: torch.dtype) -> list[tuple[str, Callable[..., Any]]]:
    """Bridge hooks that keep masked attention scores finite under ``dtype`` (none for float32)."""
    if dtype == torch.float32:
        return []

    def clamp(scores: Float[Tensor, "batch head query key"], hook: Any) -> Tensor:
        return scores.clamp(min=torch.finfo(scores.dtype).min)

    return [(f"blocks.{layer}.attn.hook_attn_scores", clamp) for layer in range(model.n_layers)]
