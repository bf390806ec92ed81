"""Sharded training (FSDP2): the student's weights, gradients and AdamW states split over ranks.

Data parallelism (:mod:`safesteer_lens.parallel`) keeps a whole float32 student, its gradients
and AdamW's two states on every rank: 16 bytes per parameter, 128 GB for an 8B model. With
``shard="student"`` :func:`shard_model` hands the student to PyTorch's ``fully_shard`` (FSDP2),
so each of N ranks holds 16/N bytes per parameter and gathers one decoder layer at a time for
its forward and backward passes. ``shard="all"`` shards the frozen teacher the same way, for
models whose teacher does not fit one card either; the steering hook still fires, because FSDP
shards parameters, not the residual stream the hook reads and writes.

Sharded models multiply in the run's precision through FSDP's own ``MixedPrecisionPolicy``
rather than ``torch.autocast``: each layer is gathered in bfloat16 (half the bytes to send and
to hold), computes in bfloat16, and its gradient is reduce-scattered in float32 into the float32
shards. Autocast would instead keep a bfloat16 copy of every gathered layer for the backward,
and so the whole student on every rank.

Three things differ from a plain module and are handled here:

* The TransformerLens bridge wraps every Hugging Face module and exposes its parameters under a
  second (alias) path. ``fully_shard`` on the whole model would see the decoder layers' already
  sharded parameters through those aliases and fail, so each layer's original module is sharded
  first and the root is then sharded with those parameters ignored.
* FSDP averages gradients over ranks; SafeSteer weights each micro-batch by its share of the
  *global* rows, so the gradients must be summed (divide factor 1).
* Every forward is a collective: all ranks must run the same number of forwards and backwards.
  Rollouts therefore decode in lock-step (``synced_gpus``), and the teacher's chunking is
  agreed over ranks (:func:`~safesteer_lens.distill.teacher_micro_batches`).

Checkpoints and the exported student are built from full (unsharded) state dicts on rank 0, in
the same format as a single process writes, so a sharded run resumes unsharded and vice versa.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import Tensor

from safesteer_lens.errors import SafeSteerError
from safesteer_lens.models import ChatModel
from safesteer_lens.parallel import World

SHARDING = ("none", "student", "all")


def check_sharding(shard: str, world: World) -> None:
    """Reject a sharding mode that is unknown or cannot work in this world, before any load."""
    if shard not in SHARDING:
        raise SafeSteerError(f"unknown shard mode {shard!r}: use one of {', '.join(SHARDING)}")
    if shard != "none" and world.size == 1:
        raise SafeSteerError(
            f"--shard {shard} splits the models over processes, and this is one process; "
            "launch with `torchrun --nproc-per-node N` (N >= 2) or use --shard none"
        )


def is_sharded(model: ChatModel) -> bool:
    """Whether ``model``'s parameters are FSDP shards (``DTensor``) rather than whole tensors."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.hf_model.parameters())


def shard_model(
    model: ChatModel, world: World, device: torch.device | str, frozen: bool = False, compute: torch.dtype | None = None
) -> ChatModel:
    """Shard ``model`` in place over the ranks of ``world`` with ``fully_shard`` (FSDP2).

    Every rank must call this with the same model. Parameters on another device (load on CPU
    to keep the whole model off the card) move to ``device`` as shards.

    Args:
        model: A model loaded by :func:`~safesteer_lens.models.load_model`, not yet sharded.
        world: The processes to shard over (the whole process group).
        device: This rank's device; its type picks the mesh (``cuda`` with NCCL, ``cpu`` with gloo).
        frozen: The model never runs a backward (the teacher). FSDP keeps the root's parameters
            (embeddings, final norm, unembedding) whole after a forward, for the backward that
            follows; a frozen model has none, so its root is sharded again after every forward.
        compute: The dtype to gather the weights in and multiply in (bfloat16 for
            ``--precision auto`` on a bf16 card); gradients are still summed in the weights'
            own dtype. Default, or if it is no narrower than the weights: the weights' dtype.
            Recorded as ``model.gather_dtype``.

    Returns:
        The same model, now sharded: forwards gather one layer at a time on every rank.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import DTensor

    if is_sharded(model):
        raise SafeSteerError(f"{model.name} is already sharded; shard each model once")
    mesh = init_device_mesh(torch.device(device).type, (world.size,))
    hf_model = model.hf_model
    layers = getattr(getattr(hf_model, "model", None), "layers", None)
    if layers is None:
        raise SafeSteerError(
            f"cannot shard {model.name}: it has no model.layers list of decoder layers; "
            "train it with --shard none"
        )
    if compute is None or compute.itemsize >= model.dtype.itemsize:  # never gather wider than the weights
        compute = model.dtype
    mixed = compute != model.dtype
    policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=model.dtype) if mixed else MixedPrecisionPolicy()
    for layer in layers:
        # the bridge's BlockBridge wraps the Hugging Face decoder layer; shard the layer itself
        fully_shard(getattr(layer, "original_component", layer), mesh=mesh, mp_policy=policy)
    done = {p for p in hf_model.parameters() if isinstance(p, DTensor)}
    fully_shard(hf_model, mesh=mesh, ignored_params=done, reshard_after_forward=True if frozen else None,
                mp_policy=policy)
    model.gather_dtype = compute
    for module in hf_model.modules():
        if isinstance(module, FSDPModule):
            # a plain sum over ranks (the loss weights are global); SUM also works on gloo,
            # where the pre-multiplied sum FSDP would otherwise use does not exist
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    return model


def load_sharded(
    name: str, world: World, device: torch.device | str, dtype: str | torch.dtype | None = None, frozen: bool = False,
    compute: torch.dtype | None = None,
) -> ChatModel:
    """Load a model on CPU and shard it onto ``device``, one layer at a time.

    ``fully_shard`` moves a layer to the card whole and then keeps this rank's shard, so the
    card never holds more than one whole layer. Every rank loads the whole model on the host,
    much of it as pages of the memory-mapped checkpoint, which the ranks of a machine share
    (README, "Other notes on memory").

    Args:
        name: Embedded name, directory, .gguf or hub id (as for ``load_model``).
        world: The processes to shard over.
        device: This rank's device.
        dtype: Weight dtype; default: the one ``load_model`` picks for ``device`` (bfloat16 on CUDA).
        frozen: See :func:`shard_model` (True for the teacher).
        compute: See :func:`shard_model` (default: the weights' dtype).
    """
    from safesteer_lens.models import load_model, resolve_dtype

    dtype = resolve_dtype(dtype, torch.device(device))
    return shard_model(load_model(name, device="cpu", dtype=dtype), world, device, frozen=frozen, compute=compute)


@contextmanager
def gathered(model: ChatModel) -> Iterator[None]:
    """Keep each layer whole after its first forward in the block, then shard it again.

    Decoding runs one forward per token. Sharded as usual, every one of them gathers every
    layer from all ranks; kept whole, only the first does (benchmarks/README.md, "Measured
    elsewhere in the code", has the timing). The price is the whole model in memory while the
    block runs, in the gather dtype (2 bytes per parameter in bfloat16, 4 in float32).
    """
    from torch.distributed.fsdp import FSDPModule

    # the decoder layers; the root (embeddings, norm, unembedding) keeps its own setting
    modules = [m for m in model.hf_model.modules() if isinstance(m, FSDPModule) and m is not model.hf_model]
    for module in modules:
        module.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for module in modules:
            module.reshard()
            module.set_reshard_after_forward(True, recurse=False)


def local(tensor: Tensor) -> Tensor:
    """This rank's part of a sharded tensor; a whole tensor as it is."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def to_float(value: Tensor) -> float:
    """A scalar that may be a replicated ``DTensor`` (a grad norm over shards) as a float."""
    from torch.distributed.tensor import DTensor

    return float(value.full_tensor() if isinstance(value, DTensor) else value)


def full_state(model: ChatModel, optimizer: torch.optim.Optimizer | None = None) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Whole weights (Hugging Face names) and optimizer state, on CPU, on rank 0.

    Every rank calls it when the model is sharded (gathering the shards is a collective); ranks
    other than 0 get empty dicts. The weights are named as a fresh ``transformers`` model names
    them (:meth:`~safesteer_lens.models.ChatModel.hf_paths`) and the optimizer state is keyed by
    parameter path, not by position, so a checkpoint does not depend on how the run was sharded.
    A whole model's CPU tensors come back as they are, not copied: save them, do not edit them.

    The weights are walked name by name rather than through ``get_model_state_dict``: the
    bridge lists each tensor under about 3.5 names, and that function would copy (or gather)
    every one of them. Each tensor is gathered once, in the same order on every rank, and a
    tied tensor (the unembedding) is the same CPU tensor under both of its names.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    from torch.distributed.tensor import DTensor

    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    state = model.hf_model.state_dict(keep_vars=True)  # references only, no copies
    done: dict[int, Tensor | None] = {}  # rank 0: the CPU copy; other ranks keep nothing
    weights: dict[str, Tensor] = {}
    for name, path in model.hf_paths().items():
        tensor = state[path]
        if id(tensor) not in done:
            whole = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor  # a collective when sharded
            done[id(tensor)] = whole.detach().to("cpu") if rank0 else None
        if rank0:
            weights[name] = done[id(tensor)]
    optim: dict[str, Any] = {}
    if optimizer is not None:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        optim = get_optimizer_state_dict(model.hf_model, optimizer, options=options)
    return weights, optim


def load_full_state(
    model: ChatModel, weights: dict[str, Tensor], optimizer: torch.optim.Optimizer | None = None,
    optimizer_state: dict[str, Any] | None = None, adapters_only: bool = False,
) -> None:
    """Load what :func:`full_state` returned into a sharded or whole model (every rank calls it).

    With ``adapters_only`` the weights are a LoRA student's adapters alone (its base weights are
    the model's own, frozen), so only the adapters must be there.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    from safesteer_lens.adapters import is_adapter

    paths = {name: path for name, path in model.hf_paths().items() if is_adapter(name) or not adapters_only}
    missing = set(paths) - set(weights)
    if missing:
        raise SafeSteerError(
            f"the checkpoint has no weights for {sorted(missing)[:3]}; it was written for another model"
        )
    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model.hf_model, {paths[name]: weights[name] for name in paths}, options=options)
    if optimizer is not None and optimizer_state is not None:
        set_optimizer_state_dict(model.hf_model, optimizer, optimizer_state, options=options)
