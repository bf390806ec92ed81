"""Fast student rollouts: on-policy sampling through the quickest engine on the device.

Sampling the student's replies is most of a SafeSteer training step (benchmarks/README.md),
and the student needs no hooks while it samples. So
instead of generating through the bridge, which switches the Hugging Face model to eager
attention and dispatches hooks in every module, :class:`RolloutSampler` samples with a plain
Hugging Face *twin* of the student:

* the twin is built on the meta device and then given the student's own parameter tensors,
  so it costs no memory and sees every optimizer update with no copy;
* it uses sdpa attention;
* each prompt is prefilled once and its KV cache repeated for its M samples (all prompt
  tokens but the last; ``generate`` reads that one and decodes from there);
* on CUDA the cache is a ``StaticCache``, which makes ``generate`` compile the decode step
  (``torch.compile`` in "reduce-overhead" mode, i.e. CUDA graphs). Cache lengths are rounded
  up to a bucket so that steps with different prompt lengths reuse the compiled graphs. If
  compilation fails, the sampler warns once and goes on with the dynamic cache.

A sharded student (:mod:`safesteer_lens.sharding`) has no whole parameter tensors to share, so
it samples through its own Hugging Face model instead (the bridge's eager attention), with the
same shared prefill and per-row noise. By default its layers stay gathered for the whole call
(:func:`~safesteer_lens.sharding.gathered`), which is several times faster than gathering
each layer at every token; ``low_memory=True`` gathers per token and never holds the whole
model. Its ranks decode in lock-step, because each forward is a collective, until every
rank's rows are done.

Each row draws its randomness from its own stream, seeded by ``(seed, row index)``: the
sampler adds Gumbel noise from that stream to the tempered logits and decodes greedily, which
is an exact sample from ``softmax(logits / temperature)`` (the Gumbel-max trick). So a row's
tokens do not depend on which other rows share its batch: a step split over several processes
(:mod:`safesteer_lens.parallel`) samples the rollouts one process would, up to floating point
(a different batch shape can round a logit differently, and a near-tie can then flip).
Everything else is Hugging Face ``generate`` with the policy's own distribution (no top-k,
top-p or repetition penalty from the model's shipped config; stop at the end-of-turn token;
the masks of :func:`safesteer_lens.generation.generate`). ``tests/test_rollouts.py`` checks
that greedy tokens are equal and that sampled token frequencies agree with the plain path and
with the model's probabilities.
"""

from __future__ import annotations

import copy
import math
import warnings
from contextlib import nullcontext
from typing import Any, Sequence

import torch

from safesteer_lens.errors import SafeSteerError
from safesteer_lens.generation import Completions, check_decoding, decoding_with, policy_generation_config, split_output
from safesteer_lens.models import ChatModel
from safesteer_lens.precision import autocast, finite_score_hooks
from safesteer_lens.sharding import gathered, is_sharded

CACHE_BUCKET = 64


def row_seed(seed: int, row: int) -> int:
    """The seed of one row's noise stream (distinct rows and seeds give distinct streams)."""
    return (seed * 1_000_003 + row * 7_919 + 12_345) % 2**63


def _all_full_attention(config: Any) -> bool:
    """Whether every layer attends to the whole sequence (the static-cache path assumes it)."""
    layer_types = getattr(config, "layer_types", None) or []
    return getattr(config, "sliding_window", None) is None and all(t == "full_attention" for t in layer_types)


class RowSeededGumbel:
    """A logits processor that makes greedy decoding sample, row by row, from its own stream.

    ``argmax(logits / T + g)`` with ``g`` standard Gumbel noise is distributed as
    ``softmax(logits / T)``. Drawing ``g`` for row ``i`` from a generator seeded with
    ``seeds[i]`` makes that row's sample independent of the batch it is decoded in.
    """

    def __init__(self, seeds: Sequence[int], temperature: float, device: torch.device):
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        self.temperature = temperature

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        uniform = torch.stack([
            torch.rand(scores.shape[-1], generator=g, device=scores.device) for g in self.generators
        ])
        tiny = torch.finfo(uniform.dtype).tiny
        gumbel = -torch.log(-torch.log(uniform.clamp(tiny, 1 - 1e-7)))
        return scores.float() / self.temperature + gumbel


def sampling_twin(model: ChatModel, attn_implementation: str | None = None) -> Any:
    """A plain Hugging Face model that shares ``model``'s parameter storage.

    Built on the meta device, then handed the live parameters (``assign=True``), so nothing is
    copied: an in-place optimizer update of the student is an update of the twin. Buffers that
    are not in the state dict (rotary frequencies) are taken from the wrapped model as well.

    Args:
        model: The student.
        attn_implementation: Attention kernel of the twin; None takes the model family's
            (``sdpa``, the fast one, unless the family needs ``eager``).
    """
    from transformers import AutoModelForCausalLM

    from safesteer_lens.adapters import add_lora_like

    with torch.device("meta"):
        twin = AutoModelForCausalLM.from_config(
            model.hf_model.config, attn_implementation=attn_implementation or model.family.attention
        )
        add_lora_like(model.hf_model, twin)  # a LoRA student's adapters are shared like any weight
    shared = model.hf_state_dict(copy=False)
    trainable = {name: t.requires_grad for name, t in shared.items()}
    twin.load_state_dict(shared, strict=False, assign=True)
    for name, tensor in shared.items():  # assign=True re-flags the student's own parameters
        tensor.requires_grad_(trainable[name])
    if getattr(twin.config, "tie_word_embeddings", False):
        twin.tie_weights()
    wrapped = {k.replace("._original_component", ""): b for k, b in model.hf_model.named_buffers()}
    for name, buffer in list(twin.named_buffers()):
        if buffer.is_meta:
            owner, _, attr = name.rpartition(".")
            if name not in wrapped:
                raise SafeSteerError(
                    f"cannot build a sampling twin of {model.name!r}: buffer {name} has no "
                    "counterpart; train with rollouts='plain'"
                )
            twin.get_submodule(owner)._buffers[attr] = wrapped[name]
    meta = [name for name, p in twin.named_parameters() if p.is_meta]
    if meta:
        raise SafeSteerError(
            f"cannot build a sampling twin of {model.name!r}: {meta[0]} was not shared; "
            "train with rollouts='plain'"
        )
    twin.generation_config = copy.deepcopy(model.hf_model.generation_config)
    return twin.eval()


def _static_cache(config: Any, length: int, dtype: torch.dtype) -> Any:
    """A ``StaticCache`` of ``length`` positions that stores keys and values in ``dtype``.

    Under bfloat16 autocast a Llama-style layer hands the cache float32 keys (rotary
    embeddings multiply them by float32 cos/sin) but bfloat16 values, and a static cache keeps
    one dtype for both. Casting both on the way in changes nothing downstream: attention
    casts its inputs to bfloat16 under autocast anyway. In float32 the cache is the plain one.
    """
    from transformers import StaticCache

    if dtype == torch.float32:
        return StaticCache(config=config, max_cache_len=length)

    class CastingStaticCache(StaticCache):
        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any) -> Any:
            return super().update(key_states.to(dtype), value_states.to(dtype), layer_idx, *args, **kwargs)

    return CastingStaticCache(config=config, max_cache_len=length)


class RolloutSampler:
    """Samples a model's chat replies with no hooks, as fast as the device allows.

    Build it once per student (it holds the twin) and call :meth:`sample` every step.

    Args:
        model: The student (its bridge is left untouched).
        compile: Static KV cache with a compiled decode step. None (default) means on CUDA
            only; True forces it on any device (on CPU this is slower and meant for tests).
        attn_implementation: Attention kernel of the twin; None: the model family's.
        low_memory: For a sharded student: gather each layer at every decoded token instead of
            holding the whole model while sampling (slower; for models whose whole copy, in
            the dtype the shards are gathered in, does not fit next to the shards).
        dtype: Matmul dtype while sampling (:mod:`safesteer_lens.precision`): bfloat16 runs
            the forwards under ``torch.autocast``, which samples from the policy the trainer
            scores in that precision. The default, float32, means no autocast: the weights' own dtype.
    """

    def __init__(
        self, model: ChatModel, compile: bool | None = None, attn_implementation: str | None = None, low_memory: bool = False,
        dtype: torch.dtype = torch.float32,
    ):
        self.model = model
        self.sharded = is_sharded(model)
        self.low_memory = low_memory
        self.dtype = dtype
        if self.sharded:
            if compile:
                raise SafeSteerError("a sharded student samples without compilation; use compile=None")
            self.twin, self.compile = model.hf_model, False
        else:
            self.twin = sampling_twin(model, attn_implementation)
            self.compile = (model.device.type == "cuda" and _all_full_attention(self.twin.config)) if compile is None else compile
        self._static_caches: dict[tuple[int, int], Any] = {}

    @torch.no_grad()
    def sample(
        self,
        prompts: Sequence[str],
        samples_per_prompt: int = 1,
        *,
        max_new_tokens: int = 64,
        do_sample: bool = True,
        temperature: float = 1.0,
        seed: int = 0,
        system: str | None = None,
        first_row: int = 0,
    ) -> Completions:
        """Sample ``samples_per_prompt`` replies to each prompt, all in one batch.

        Args:
            prompts: User messages; each is prefilled once.
            samples_per_prompt: Replies per prompt (M); the output rows are grouped by prompt,
                ``prompts[0]`` M times, then ``prompts[1]``...
            max_new_tokens: Upper bound on reply length.
            do_sample: Sample (True) or greedy (False).
            temperature: Sampling temperature (ignored when greedy).
            seed: With ``first_row``, seeds every row's noise stream (see :func:`row_seed`).
            system: Optional system message.
            first_row: Index of this call's first row in a larger batch that was split (over
                processes, say): row ``i`` here samples as row ``first_row + i`` would.

        Returns:
            :class:`~safesteer_lens.generation.Completions`, laid out like
            ``generate(model, [p for p in prompts for _ in range(M)])``.
        """
        check_decoding(max_new_tokens, do_sample, temperature)
        if samples_per_prompt < 1:
            raise SafeSteerError(f"samples_per_prompt must be at least 1, got {samples_per_prompt}")
        from transformers import LogitsProcessorList

        batch = self.model.tokenize(list(prompts), system=system)
        m = samples_per_prompt
        input_ids = batch.input_ids.repeat_interleave(m, 0)
        attention_mask = batch.attention_mask.repeat_interleave(m, 0)
        seeds = [row_seed(seed, first_row + i) for i in range(input_ids.shape[0])]

        def processors() -> LogitsProcessorList:  # fresh noise streams for each attempt
            return LogitsProcessorList([RowSeededGumbel(seeds, temperature, input_ids.device)] if do_sample else [])

        # greedy decoding of Gumbel-perturbed logits is sampling; nothing from the shipped config
        keep_whole = gathered(self.model) if self.sharded and not self.low_memory else nullcontext()
        precision = autocast(self.dtype, self.model.device)  # one context: each weight is cast once per call
        # a sharded student decodes through the bridge's eager attention: the same guard as its scoring
        guards = self.model.bridge.hooks(fwd_hooks=finite_score_hooks(self.model, self.dtype)) if self.sharded else nullcontext()
        with decoding_with(self.twin, policy_generation_config(self.model, max_new_tokens)), keep_whole, precision, guards:
            if self.compile:
                try:
                    cache = self._prefill(batch.input_ids, batch.attention_mask, m, static_length=input_ids.shape[1] + max_new_tokens)
                    out = self.twin.generate(
                        input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache,
                        compile_config=self._compile_config(), logits_processor=processors(),
                    )
                    return split_output(self.model, input_ids, attention_mask, out)
                except Exception as exc:  # noqa: BLE001 - any compiler failure falls back to eager decoding
                    warnings.warn(
                        f"compiled decoding failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                        "sampling with the dynamic cache from now on",
                        stacklevel=2,
                    )
                    self.compile = False
            cache = self._prefill(batch.input_ids, batch.attention_mask, m)
            out = self.twin.generate(
                input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, logits_processor=processors(),
                synced_gpus=self.sharded,  # a sharded forward is a collective: ranks decode in lock-step
            )
        return split_output(self.model, input_ids, attention_mask, out)

    def _prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, m: int, static_length: int | None = None) -> Any:
        """KV cache of every prompt token but the last, computed once per prompt, repeated M times.

        Position ids of real tokens follow ``generate``'s rule for left padding (count of real
        tokens so far), so the decode steps continue exactly where a full-prompt prefill would;
        padding gets position 1, which nothing reads (it is masked).
        """
        positions = (attention_mask.cumsum(1) - 1).masked_fill(attention_mask == 0, 1)
        out = self.twin(
            input_ids=input_ids[:, :-1], attention_mask=attention_mask[:, :-1],
            position_ids=positions[:, :-1], use_cache=True, logits_to_keep=1,
        )
        dynamic = out.past_key_values
        if static_length is None:
            dynamic.batch_repeat_interleave(m)
            return dynamic
        # One cache per (rows, length), reused: the compiled decode step's CUDA graphs are
        # recorded against the cache's tensors, and a new cache would mean new recordings.
        key = (input_ids.shape[0] * m, CACHE_BUCKET * math.ceil(static_length / CACHE_BUCKET))
        static = self._static_caches.get(key)
        if static is None:
            static = self._static_caches[key] = _static_cache(self.twin.config, key[1], self.dtype)
        else:
            static.reset()
        filled = torch.arange(input_ids.shape[1] - 1, device=input_ids.device)
        for index, layer in enumerate(dynamic.layers):
            static.update(
                layer.keys.repeat_interleave(m, 0), layer.values.repeat_interleave(m, 0), index,
                {"cache_position": filled},
            )
        return static

    def _compile_config(self) -> Any:
        from transformers import CompileConfig

        config = CompileConfig()
        if self.model.device.type != "cuda":
            # transformers' own switch for compiling generate off-GPU (used by its tests)
            config._compile_all_devices = True
            config.mode = "default"
        return config
