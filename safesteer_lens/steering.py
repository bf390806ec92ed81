"""Steering operations on the residual stream: add a direction, ablate it, bake it into weights.

* **Add** (the SafeSteer teacher): ``resid_pre`` of one block gets ``coeff * direction`` at
  every position, prompt and generated tokens alike (with the KV cache each decode step sees
  ``[batch, 1, d_model]``, and the hook adds there too).
* **Directional ablation** (Arditi et al.): the component along the unit direction is removed
  from ``resid_pre``, ``attn_out`` and ``mlp_out`` of every block, so nothing downstream can
  read it.
* **Weight orthogonalisation**: the same ablation made permanent by projecting the direction
  out of every matrix that writes to the residual stream (embedding, attention output, MLP
  output). The model then behaves as ablated with no hooks at all.

:func:`steered` wraps the first two as a context manager for notebooks. This module works on
tensors; :meth:`safesteer_lens.directions.Direction.hooks` and ``.apply`` give a Direction
artifact the same in one call.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from safesteer_lens.errors import SafeSteerError
from safesteer_lens.models import ChatModel

FwdHook = tuple[str, Callable[..., Any]]


def hook_name(layer: int, point: str = "resid_pre") -> str:
    """The TransformerLens hook point of block ``layer``: ``blocks.{layer}.hook_{point}``.

    ``resid_pre`` (the default) is the residual stream entering the block, where the teacher
    adds its vector; ``resid_post``, ``attn_out`` and ``mlp_out`` are the other points used here.
    """
    return f"blocks.{layer}.hook_{point}"


def check_direction(model: ChatModel, direction: Tensor, layer: int | None = None) -> None:
    """Fail early, in one line, on a direction or layer that does not fit the model."""
    if direction.ndim != 1 or direction.shape[0] != model.d_model:
        raise SafeSteerError(
            f"direction has shape {tuple(direction.shape)} but {model.name} has d_model="
            f"{model.d_model}; use a direction found on this model"
        )
    if not torch.isfinite(direction).all() or direction.norm() == 0:
        raise SafeSteerError("direction is zero or not finite; recompute it")
    if layer is not None and not 0 <= layer < model.n_layers:
        raise SafeSteerError(
            f"layer {layer} is out of range: {model.name} has layers 0..{model.n_layers - 1}"
        )


def add_hooks(
    model: ChatModel, direction: Float[Tensor, "d_model"], layer: int, coeff: float = 1.0
) -> list[FwdHook]:
    """Hooks that add ``coeff * direction`` to ``blocks.{layer}.hook_resid_pre``."""
    check_direction(model, direction, layer)
    vector = (coeff * direction).to(model.device, model.dtype)

    def add(resid: Float[Tensor, "batch pos d_model"], hook: Any) -> Tensor:
        return resid + vector

    return [(hook_name(layer), add)]


def project_out(
    x: Float[Tensor, "... d_model"], unit: Float[Tensor, "d_model"]
) -> Float[Tensor, "... d_model"]:
    """Remove the component of ``x`` along the unit vector ``unit``."""
    return x - (x @ unit).unsqueeze(-1) * unit


def ablation_hooks(model: ChatModel, direction: Float[Tensor, "d_model"]) -> list[FwdHook]:
    """Hooks that ablate ``direction`` from resid_pre, attn_out and mlp_out of every block."""
    check_direction(model, direction)
    unit = (direction / direction.norm()).to(model.device, model.dtype)

    def ablate(act: Float[Tensor, "batch pos d_model"], hook: Any) -> Tensor:
        return project_out(act, unit)

    points = ("resid_pre", "attn_out", "mlp_out")
    return [(hook_name(layer, point), ablate) for layer in range(model.n_layers) for point in points]


@torch.no_grad()
def orthogonalize_weights(model: ChatModel, direction: Float[Tensor, "d_model"]) -> ChatModel:
    """Project ``direction`` out of every weight that writes to the residual stream, in place.

    Afterwards the model computes what :func:`ablation_hooks` computes, with no hooks. The
    change is permanent for this object: load the model again to get the original back. Tied
    input/output embeddings are untied first, because ablation leaves the unembedding alone.

    Returns:
        The same ``model``, for chaining.
    """
    check_direction(model, direction)
    unit = (direction / direction.norm()).to(model.device, torch.float32)
    bridge = model.bridge
    embed = bridge.embed.original_component
    unembed = bridge.unembed.original_component
    if unembed.weight is embed.weight:
        unembed.weight = torch.nn.Parameter(embed.weight.detach().clone(), requires_grad=False)
        model.hf_model.config.tie_word_embeddings = False

    def rows_out(weight: Tensor) -> None:  # [vocab, d_model]: remove along the last dim
        weight.copy_(project_out(weight.float(), unit).to(weight.dtype))

    def columns_out(weight: Tensor) -> None:  # nn.Linear [d_model, d_in]: outputs along dim 0
        w = weight.float()
        weight.copy_((w - unit.unsqueeze(1) * (unit @ w).unsqueeze(0)).to(weight.dtype))

    rows_out(embed.weight)
    for block in bridge.blocks:
        columns_out(block.attn.o.original_component.weight)
        columns_out(block.mlp.out.original_component.weight)
    return model


@contextmanager
def steered(
    model: ChatModel,
    vector: Float[Tensor, "d_model"],
    layer: int | None = None,
    coeff: float = 1.0,
    mode: Literal["add", "ablate"] = "add",
) -> Iterator[ChatModel]:
    """Run code with the model steered by a raw vector, for notebooks::

        with steered(model, vector, layer=11, coeff=1.5):
            print(generate(model, prompts).texts)

    A stage-1 :class:`~safesteer_lens.directions.Direction` steers itself, with its own layer
    and coefficient: ``with direction.apply(model):``.

    Args:
        model: The chat model.
        vector: A ``[d_model]`` tensor.
        layer: Block whose ``resid_pre`` receives the vector (``mode="add"``).
        coeff: Multiplier of the vector.
        mode: ``"add"`` the vector at one layer, or ``"ablate"`` it everywhere.

    Yields:
        The model, with hooks active until the block ends.
    """
    if not isinstance(vector, Tensor):
        raise SafeSteerError(f"steered() takes a [d_model] tensor, got {type(vector).__name__}; a Direction steers "
                             "itself: `with direction.apply(model):`")
    if mode == "add":
        if layer is None:
            raise SafeSteerError("steered(..., mode='add') needs layer=: the block whose resid_pre gets the vector")
        hooks = add_hooks(model, vector, layer, coeff)
    elif mode == "ablate":
        hooks = ablation_hooks(model, vector)
    else:
        raise SafeSteerError(f"unknown steering mode {mode!r}: use 'add' or 'ablate'")
    with model.bridge.hooks(fwd_hooks=hooks):
        yield model
