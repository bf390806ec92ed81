"""Training fewer parameters: LoRA adapters through ``peft``, merged back into plain weights.

A student trained with ``TrainConfig(lora_rank=r)`` keeps its base weights frozen and learns
a rank-``r`` update ``(alpha / r) * B @ A`` beside each targeted linear layer. ``B`` starts at
zero, so the student starts as the base model, exactly as in full fine-tuning.

The adapters are ``peft``'s own ``LoraLayer`` modules, put inside the modules the
TransformerLens bridge wraps (the bridge nests each original ``nn.Linear`` as
``_original_component``; the adapter replaces that ``nn.Linear``), so every hook still fires
and gradients reach the adapters through them. A plain Hugging Face model built from the same
:class:`LoraSpec` (the rollout sampler's twin, a checkpoint's name table) gets the same
adapters under the names a plain model gives them, so tensors can be shared and matched by
name. At the end of training :func:`merge_lora` folds each update into its base weight and
removes the adapters: the export is an ordinary model that plain ``transformers`` loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from safesteer_lens.errors import SafeSteerError
from safesteer_lens.families import DEFAULT_LORA_TARGETS as DEFAULT_TARGETS

LORA_ATTRIBUTE = "safesteer_lora"  # where a model carries the LoraSpec of its adapters


@dataclass(frozen=True)
class LoraSpec:
    """Which layers get adapters and how large.

    Attributes:
        rank: The update's rank r.
        alpha: Scale numerator: the update is ``(alpha / rank) * B @ A``.
        targets: Comma-separated names of the linear layers to adapt (last name component,
            e.g. ``q_proj,v_proj``).
    """

    rank: int
    alpha: float
    targets: str = DEFAULT_TARGETS

    def names(self) -> list[str]:
        return [t.strip() for t in self.targets.split(",") if t.strip()]

    def peft_config(self, model: torch.nn.Module) -> Any:
        """peft's ``LoraConfig`` naming exactly the linear layers of ``model`` to adapt.

        A layer is adapted when it is an ``nn.Linear`` and one of its names (the bridge's
        ``_original_component`` nesting removed; the bridge reaches a layer by several names)
        ends in one of :meth:`names`. Naming the layers one by one, rather than by a pattern,
        keeps out what a pattern would also catch: the bridge's wrappers around a linear layer
        and a mixture-of-experts block whose experts are not linear layers at all.
        """
        from peft import LoraConfig

        wanted = set(self.names())
        aliases: dict[int, list[str]] = {}
        for name, module in model.named_modules(remove_duplicate=False):
            if isinstance(module, torch.nn.Linear):
                aliases.setdefault(id(module), []).append(name)
        # peft replaces a layer under its first name, the one named_modules() reports
        chosen = [names[0] for names in aliases.values()
                  if any(n.replace("._original_component", "").rpartition(".")[2] in wanted for n in names)]
        if not chosen:
            raise SafeSteerError(f"no layer matches lora_targets {self.targets!r} (no linear layer of this model has "
                                 f"those names); name linear layers of this model, e.g. {DEFAULT_TARGETS}")
        # full names in a list: peft matches them exactly (a regex would be rewritten by its
        # mixture-of-experts conversion, which reads only the last name component)
        return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=0.0, bias="none", target_modules=chosen)


def is_adapter(name: str) -> bool:
    """Whether a weight name (Hugging Face or bridge path) is a LoRA adapter's."""
    return ".lora_" in name


def base_fingerprint(model: Any) -> list[float]:
    """A few numbers that change when the frozen base weights do: the sum and the sum of squares
    of the input embedding, in float64. A LoRA checkpoint keeps only the adapters, so resuming
    checks the base it is put back on with this."""
    weight = model.hf_model.get_input_embeddings().weight.detach().double()
    return [float(weight.sum()), float(weight.square().sum())]


def lora_spec(module: torch.nn.Module) -> LoraSpec | None:
    """The adapters a model carries, or None."""
    return getattr(module, LORA_ATTRIBUTE, None)


def _inject(module: torch.nn.Module, spec: LoraSpec) -> None:
    from peft import inject_adapter_in_model

    config = spec.peft_config(module)  # names the layers, or says that none matches
    try:
        inject_adapter_in_model(config, module)
    except ValueError as exc:  # peft refused a layer it was named
        raise SafeSteerError(f"no layer matches lora_targets {spec.targets!r} ({str(exc).splitlines()[0][:120]}); "
                             f"name linear layers of this model, e.g. {DEFAULT_TARGETS}") from exc
    setattr(module, LORA_ATTRIBUTE, spec)


def add_lora(model: Any, spec: LoraSpec, seed: int = 0) -> list[torch.nn.Parameter]:
    """Give a loaded :class:`~safesteer_lens.models.ChatModel` LoRA adapters; return their parameters.

    Only the adapters' parameters require gradients afterwards; the base weights are frozen.
    ``A`` is initialised at random from ``seed`` (without touching the global generator), so a
    run is reproducible; ``B`` is zero.
    """
    if spec.rank < 1:
        raise SafeSteerError(f"lora rank must be at least 1, got {spec.rank}")
    if lora_spec(model.hf_model) is not None:
        raise SafeSteerError("this model already has LoRA adapters; merge them (adapters.merge_lora) first")
    dtype = next(model.hf_model.parameters()).dtype
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _inject(model.hf_model, spec)
    model._hf_paths = None  # the name table now includes the adapters
    adapters = []
    for name, param in model.hf_model.named_parameters():
        is_adapter = ".lora_" in name
        param.requires_grad_(is_adapter)
        if is_adapter:
            param.data = param.data.to(dtype)
            adapters.append(param)
    return adapters


def add_lora_like(source: torch.nn.Module, plain: torch.nn.Module) -> None:
    """Give a plain Hugging Face model the adapters ``source`` carries (nothing if it has none)."""
    spec = lora_spec(source)
    if spec is not None:
        _inject(plain, spec)


def merge_lora(model: Any) -> None:
    """Fold every adapter into its base weight and remove the adapters, in place."""
    from peft.tuners.lora import LoraLayer

    if lora_spec(model.hf_model) is None:
        return
    with torch.no_grad():
        for name, module in list(model.hf_model.named_modules()):
            if isinstance(module, LoraLayer):
                module.merge()
                parent_name, _, child = name.rpartition(".")
                setattr(model.hf_model.get_submodule(parent_name), child, module.get_base_layer())
    delattr(model.hf_model, LORA_ATTRIBUTE)
    model._hf_paths = None
