"""A direction as a llama.cpp control vector (GGUF), and back.

llama.cpp's server and CLI (``--control-vector FILE``, ``--control-vector-scaled FILE S``), and
the vLLM-based tools that import the same format, read a GGUF file whose
``general.architecture`` is ``controlvector`` and which holds one float32 tensor
``direction.N`` of ``n_embd`` values per steered layer.

Layer indexing (checked against llama.cpp's ``common_control_vector_load_one``,
``llama_adapter_cvec::apply`` and ``build_cvec`` in its llama graph). llama.cpp adds
``direction.N`` to the *output* of block N (0-based), after the block's feed-forward residual
add; its loader refuses ``direction.0``, so N >= 1. Our teacher adds ``coeff * vector`` to
``blocks.L.hook_resid_pre``, the residual stream *entering* block L, which is the output of
block L - 1. So the direction of a run at layer L is written as ``direction.{L-1}`` and needs
L >= 2; on import, ``direction.N`` becomes layer N + 1. Both add the vector at every position,
prompt and generated tokens alike.

Model. ``controlvector.model_hint`` holds the model's architecture as llama.cpp names it
(``llama``, ``qwen3``, ``gemma3``: :mod:`safesteer_lens.families`), which is what llama.cpp-side
tools compare with the model they load; the model's own name or path rides in
``safesteer.model``.

Scale. The tensor holds ``coeff * vector``, the exact vector the teacher adds, so
``--control-vector FILE`` reproduces the teacher at llama.cpp's default strength of 1, and
``--control-vector-scaled FILE S`` multiplies it by S (S = 2 doubles the coefficient). Our
layer, coefficient, method and model ride along as ``safesteer.*`` metadata, which llama.cpp
ignores and :func:`load_control_vector` uses to restore the raw vector and its coefficient.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from safesteer_lens.atomic import write_atomic
from safesteer_lens.directions import Direction
from safesteer_lens.errors import SafeSteerError, first_line
from safesteer_lens.steering import hook_name

ARCH = "controlvector"


def tensor_name(layer: int) -> str:
    """The GGUF tensor that carries a direction added at ``blocks.{layer}.hook_resid_pre``."""
    if layer < 2:
        raise SafeSteerError(f"llama.cpp steers block outputs from block 1 on, so it cannot add a direction at "
                             f"resid_pre of layer {layer}; find a direction at layer 2 or later to export it")
    return f"direction.{layer - 1}"


def export_control_vector(direction: Direction, path: str | Path, scale: float = 1.0,
                          architecture: str | None = None) -> Path:
    """Write ``direction`` as a llama.cpp control vector (atomically).

    Args:
        direction: The run's direction.
        path: The ``.gguf`` file to write.
        scale: A factor on top of the teacher's coefficient baked into the file (1: the
            teacher itself; llama.cpp's ``--control-vector-scaled`` scales it again).
        architecture: The ``model_hint``; None reads it from the config of ``direction.model``
            (:func:`~safesteer_lens.models.model_facts`).
    """
    import gguf

    from safesteer_lens.models import model_facts

    if not np.isfinite(scale) or scale == 0:
        raise SafeSteerError(f"--scale must be a finite, non-zero number, got {scale}")
    name = tensor_name(direction.layer)
    if architecture is None:
        try:
            architecture = model_facts(direction.model).architecture
        except SafeSteerError as exc:
            raise SafeSteerError(f"cannot tell the architecture of {direction.model!r} for the control vector's "
                                 f"model_hint ({exc}); pass --architecture (llama.cpp's name, e.g. llama, qwen3)") from None
    values = (scale * direction.coeff * direction.vector.detach().float().cpu()).numpy().astype(np.float32)

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(str(tmp), ARCH)
        writer.add_string(f"{ARCH}.model_hint", architecture)
        writer.add_string("safesteer.model", direction.model)
        writer.add_uint32(f"{ARCH}.layer_count", 1)
        writer.add_uint32("safesteer.layer", direction.layer)
        writer.add_float32("safesteer.coeff", float(scale * direction.coeff))
        writer.add_string("safesteer.method", direction.method)
        writer.add_string("safesteer.hook", hook_name(direction.layer))
        writer.add_tensor(name, values)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    return write_atomic(path, write)


def _field(reader: "object", key: str) -> object | None:
    field = reader.fields.get(key)  # type: ignore[attr-defined]
    try:
        return None if field is None else field.contents()
    except Exception:  # noqa: BLE001 - a field another tool wrote in a form gguf cannot decode counts as absent
        return None


def load_control_vector(path: str | Path, layer: int | None = None) -> Direction:
    """Read a llama.cpp control vector as a :class:`Direction`.

    Args:
        path: A ``.gguf`` control vector (ours, or another tool's).
        layer: With a file that steers several layers, the one to take (our indexing:
            ``blocks.{layer}.hook_resid_pre``); a one-layer file needs none.
    """
    import gguf

    path = Path(path)
    if not path.is_file():
        raise SafeSteerError(f"{path} does not exist; write one with `safesteer export-direction --format gguf`")
    try:
        reader = gguf.GGUFReader(str(path))
        arch = _field(reader, "general.architecture")
        tensors = {t.name: np.asarray(t.data, dtype=np.float32).reshape(-1).copy() for t in reader.tensors}
    except Exception as exc:  # truncated or not GGUF at all
        raise SafeSteerError(f"{path} cannot be read as a GGUF control vector ({first_line(exc)}); "
                             "export it again") from exc
    if arch != ARCH:
        raise SafeSteerError(f"{path} is a GGUF file of architecture {arch!r}, not a control vector ({ARCH!r})")
    layers = {int(name.split(".", 1)[1]) + 1: name for name in tensors
              if name.startswith("direction.") and name.split(".", 1)[1].isdigit() and name != "direction.0"}
    if not layers:
        raise SafeSteerError(f"{path} holds no direction.N tensor; it is not a llama.cpp control vector")
    if layer is None and len(layers) > 1:
        raise SafeSteerError(f"{path} steers layers {sorted(layers)} (resid_pre indexing); safesteer steers one: "
                             "pick it with load_control_vector(path, layer=L)")
    chosen = layer if layer is not None else next(iter(layers))
    if chosen not in layers:
        raise SafeSteerError(f"{path} has no vector for layer {chosen}; it has {sorted(layers)}")
    values = torch.from_numpy(tensors[layers[chosen]])
    saved_coeff = _field(reader, "safesteer.coeff")
    ours = _field(reader, "safesteer.layer") == chosen and isinstance(saved_coeff, (int, float)) and not isinstance(saved_coeff, bool)
    coeff = float(saved_coeff) if ours else 1.0
    if not np.isfinite(coeff) or coeff == 0 or not torch.isfinite(values).all() or not values.any():
        raise SafeSteerError(f"{path} holds a zero coefficient, a zero vector or non-finite values; export it again")
    hint, method, model = (_field(reader, key) for key in (f"{ARCH}.model_hint", "safesteer.method", "safesteer.model"))
    settings = {"source": str(path)} | ({"model_hint": hint} if isinstance(hint, str) and hint else {})
    return Direction(
        vector=values / coeff, model=model if ours and isinstance(model, str) and model else "unknown",
        method=method if ours and isinstance(method, str) and method else "control-vector",
        layer=chosen, position=-1, coeff=coeff, settings=settings,
    )
