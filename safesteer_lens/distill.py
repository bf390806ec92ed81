"""Stage 3: localized on-policy distillation, one training loop you can read in one sitting.

Each optimizer step:

1. the student samples ``samples_per_prompt`` replies to each of a few harmful training
   prompts (on-policy; no hooks, plain cached generation);
2. the teacher (the frozen base model with the stage-1 steering hook) scores those replies
   teacher-forced, without gradients;
3. the student scores them too, with gradients, and the loss (by default the reverse KL over
   the safety tokens S only) is averaged per reply over its completion tokens, then over
   replies; gradients accumulate over micro-batches, are clipped, and AdamW steps on a cosine
   schedule with warm-up.

Every step appends a line to ``metrics.jsonl``; every ``checkpoint_every`` steps the student,
optimizer and schedule are written atomically to ``checkpoint.pt``, and ``resume=True`` picks
up from there with the same results as an uninterrupted run (rollouts are seeded per step).
At the end the student is exported as a plain Hugging Face model directory.
"""

from __future__ import annotations

import math
import random
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from safesteer_lens.model_card import build_model_card
from safesteer_lens.rundir import holds_lock
from safesteer_lens.tracking import check_report_to, open_tracker
from safesteer_lens.adapters import DEFAULT_TARGETS, LoraSpec, add_lora, base_fingerprint, is_adapter, lora_spec, merge_lora
from safesteer_lens.checkpoints import (
    CHECKPOINT, CHECKPOINT_FORMAT, METRICS, STUDENT_DIR, append_metrics, check_student_dir, export_student, load_checkpoint,
    read_metrics, save_checkpoint, write_metrics,
)
from safesteer_lens.data import (
    check_prompt_lengths, first_prompts, load_builtin_prompts, load_study_set, prompt_texts, prompts_from_texts,
)
from safesteer_lens.directions import Direction, load_direction
from safesteer_lens.errors import SafeSteerError, first_line
from safesteer_lens.generation import Completions, generate
from safesteer_lens.fused_loss import fused_distillation_loss, fused_monitors, unembedding
from safesteer_lens.losses import LOSS_REGISTRY, LossOptions, distillation_loss, get_loss, safety_mass, sequence_mean
from safesteer_lens.models import DTYPES, ChatModel, load_model, resolve_device
from safesteer_lens.parallel import World, current_world, rank_device
from safesteer_lens.precision import autocast, check_precision, compute_dtype, dtype_name, finite_score_hooks, model_dtype
from safesteer_lens.refusal import refusal_rate
from safesteer_lens.rollouts import RolloutSampler
from safesteer_lens.scoring import teacher_forced_logits
from safesteer_lens.sharding import check_sharding, full_state, is_sharded, load_full_state, load_sharded, local, to_float
from safesteer_lens.tokens import SafetyTokens, load_safety_tokens
from safesteer_lens.steering import hook_name

_MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

ROLLOUT_ENGINES = ("fast", "plain")
TEACHER_LOGITS_BUDGET = 256 * 2**20  # bytes of float32 teacher logits held at once
# TrainConfig fields a checkpoint may lack: it was written before they existed, at their defaults
PREDATED_SETTINGS = ("anchor_weight", "anchor_loss", "anchor_prompts", "lora_rank", "lora_alpha", "lora_targets",
                     "mix_categories", "teacher_coeff", "anchor_lookalikes", "task_prompts", "unembed_chunk")


@dataclass(frozen=True)
class TrainConfig:
    """Settings of :func:`train` (TRL-style: one dataclass per method).

    Attributes:
        loss: ``safesteer`` (localized reverse KL over S), ``full-reverse``, ``forward``,
            ``jsd`` or ``renorm``; ``safesteer-bounded`` is the S-plus-rest reverse KL.
        n_prompts: Harmful training prompts (built-in train split).
        task_prompts: Harmful requests phrased as public benchmarks phrase them (the ``tasks``
            study set's train split, :func:`~safesteer_lens.data.load_study_set`, harm
            categories in turn) trained on besides the ``n_prompts``: the built-in harmful
            prompts are mostly questions, and a student trained on them alone refuses
            imperative tasks, role-play and fictional framings far less often (0: none; the
            train split has 52). Each adds to the steps like a harmful prompt.
        samples_per_prompt: Student rollouts per prompt (M).
        max_new_tokens: Rollout length cap.
        temperature: Rollout sampling temperature.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_fraction: Share of steps with linear warm-up before the cosine decay.
        max_grad_norm: Gradient-norm clip.
        sequences_per_step: Rollouts per optimizer step (a multiple of ``samples_per_prompt``).
        micro_batch: Rollouts per forward/backward (gradient accumulation in between).
        epochs: Passes over the prompts.
        jsd_beta: Teacher weight of the generalised JSD, strictly between 0 and 1 (at 0 or 1
            the divergence is zero whatever the student does).
        unembed_chunk: 0 scores the student and the teacher as whole logits; N >= 1 scores
            them from their final hidden states, N positions' logits at a time, recomputed in
            the backward pass (:mod:`safesteer_lens.fused_loss`): the loss's memory then no
            longer grows with the vocabulary (152k-262k tokens in Qwen and Gemma), for some
            extra unembedding work.
        checkpoint_every: Steps between checkpoints.
        seed: Seeds prompt order and rollouts.
        student_dtype: The student's weights, gradients and AdamW states. float32 by default
            even where the teacher loads in bfloat16 (CUDA): at lr 1e-5 an AdamW update is
            far below bfloat16's resolution for most weights and would round away. The
            frozen teacher keeps its own dtype.
        precision: Matmul dtype of sampling, student scoring and teacher scoring
            (:mod:`safesteer_lens.precision`): ``auto`` (bfloat16 under ``torch.autocast``
            where the device multiplies it natively, else float32), ``float32`` or
            ``bfloat16``. The weights, gradients and AdamW states stay in ``student_dtype``.
            A sharded model is gathered in this dtype by FSDP instead of autocast (see
            :mod:`safesteer_lens.sharding`), and a teacher loaded in bfloat16 (the CUDA
            default) computes in bfloat16 whatever this says.
        rollouts: ``fast`` samples with :class:`~safesteer_lens.rollouts.RolloutSampler` (an
            sdpa twin of the student, one prefill per prompt, compiled decoding on CUDA);
            ``plain`` generates through the bridge like every other stage. Both sample the
            same distribution.
        anchor_weight: Weight of the harmless anchor; 0 turns it off. With it, every step
            also samples the student's replies to as many harmless training prompts (built-in
            harmless train split) and adds ``anchor_weight`` times the ``anchor_loss`` between
            the student and the *unsteered* base on them. The harmful prompts alone never
            show the student where not to refuse; the anchor does, on the student's own
            replies, with no general data beyond the harmless prompts the method already uses.
        anchor_loss: The anchor's loss (one of the losses, ``safesteer-bounded`` by default):
            over S it holds the student to the base's own use of the refusal tokens.
        anchor_prompts: How many harmless train prompts the anchor cycles over (0: as many as
            ``n_prompts``). Each step still anchors on as many prompts as it trains on, so
            more prompts cost nothing per step; they cover more of the ways a harmless
            request is phrased.
        anchor_lookalikes: Look-alike harmless train prompts (harmless requests in a harmful
            request's words; :func:`~safesteer_lens.data.load_study_set`, kinds of trap in
            turn) the anchor cycles over besides its harmless ones, so the student is held to
            the base exactly where wording alone would make it refuse (0: none; the train split
            has 100).
        mix_categories: Take the harmful training prompts and the anchor's harmless prompts
            categories in turn (:func:`~safesteer_lens.data.categories_in_turn`). The files
            keep each category together, so the first 64 train prompts of a kind cover 7 of
            its 13 categories; in turn, they cover all 13. False takes the file's order.
        teacher_coeff: The teacher's steering coefficient while the student trains; 0 uses the
            direction's own (``direction.json``). A milder teacher over-refuses less, so it
            moves the targets the student is pulled to; S stays the set chosen with the
            direction's coefficient.
        lora_rank: 0 trains every weight; r >= 1 trains rank-r LoRA adapters through
            ``peft`` instead (:mod:`safesteer_lens.adapters`), merged into the weights at the
            end so the export is a plain model. Adapters want a larger ``lr`` (about 10x).
        lora_alpha: The adapters' scale numerator (update = alpha / r * B A).
        lora_targets: Comma-separated linear layers that get adapters; ``auto`` takes the
            model family's (:mod:`safesteer_lens.families`: every projection for most
            families).
    """

    loss: str = "safesteer"
    n_prompts: int = 100
    samples_per_prompt: int = 8
    max_new_tokens: int = 64
    temperature: float = 1.0
    lr: float = 1e-5
    weight_decay: float = 0.0
    warmup_fraction: float = 0.1
    max_grad_norm: float = 1.0
    sequences_per_step: int = 32
    micro_batch: int = 8
    epochs: int = 1
    jsd_beta: float = 0.5
    unembed_chunk: int = 0
    checkpoint_every: int = 5
    seed: int = 0
    student_dtype: str = "float32"
    precision: str = "auto"
    rollouts: str = "fast"
    anchor_weight: float = 0.0
    anchor_loss: str = "safesteer-bounded"
    anchor_prompts: int = 0
    anchor_lookalikes: int = 0
    task_prompts: int = 0
    mix_categories: bool = False
    teacher_coeff: float = 0.0
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: str = "auto"

    @property
    def prompts_per_step(self) -> int:
        return self.sequences_per_step // self.samples_per_prompt

    @property
    def harmful_prompts(self) -> int:
        """The harmful prompts of one epoch: the built-in ones and the benchmark-phrased ones."""
        return self.n_prompts + self.task_prompts

    @property
    def total_steps(self) -> int:
        return math.ceil(self.harmful_prompts / self.prompts_per_step) * self.epochs  # each epoch ends on a short step

    def teacher_direction(self, direction: Direction) -> Direction:
        """The direction as the teacher these settings distil: ``teacher_coeff`` replaces its coefficient.

        Training, the evaluation's teacher row, the report and the model card all take the
        teacher from here, so they describe the teacher the student was pulled to.
        """
        return replace(direction, coeff=self.teacher_coeff) if self.teacher_coeff else direction

    def __post_init__(self) -> None:
        """Reject settings that cannot work, before any compute: a config that exists is valid (it is frozen)."""
        get_loss(self.loss)
        for name in ("n_prompts", "samples_per_prompt", "max_new_tokens", "sequences_per_step", "micro_batch", "epochs", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise SafeSteerError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.sequences_per_step % self.samples_per_prompt:
            raise SafeSteerError(
                f"sequences_per_step ({self.sequences_per_step}) must be a multiple of "
                f"samples_per_prompt ({self.samples_per_prompt})"
            )
        if self.student_dtype not in DTYPES:
            raise SafeSteerError(f"unknown student_dtype {self.student_dtype!r}: use one of {', '.join(DTYPES)}")
        check_precision(self.precision)
        if self.rollouts not in ROLLOUT_ENGINES:
            raise SafeSteerError(f"unknown rollouts {self.rollouts!r}: use one of {', '.join(ROLLOUT_ENGINES)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise SafeSteerError(f"lr must be a positive number, got {self.lr}")
        in_range = {
            "temperature": self.temperature > 0, "max_grad_norm": self.max_grad_norm > 0,
            "weight_decay": self.weight_decay >= 0, "warmup_fraction": 0 <= self.warmup_fraction < 1,
            "lora_alpha": self.lora_alpha > 0,
        }
        for name, ok in in_range.items():
            if not (math.isfinite(getattr(self, name)) and ok):
                raise SafeSteerError(f"{name} = {getattr(self, name)} is out of range (see TrainConfig's attributes)")
        if not (math.isfinite(self.anchor_weight) and self.anchor_weight >= 0):
            raise SafeSteerError(f"anchor_weight must be 0 (off) or positive, got {self.anchor_weight}")
        if not (math.isfinite(self.teacher_coeff) and self.teacher_coeff >= 0):
            raise SafeSteerError(f"teacher_coeff must be 0 (the direction's own) or positive, got {self.teacher_coeff}")
        if self.anchor_prompts < 0:
            raise SafeSteerError(f"anchor_prompts must be 0 (as many as n_prompts) or a count, got {self.anchor_prompts}")
        if self.unembed_chunk < 0:
            raise SafeSteerError(f"unembed_chunk must be 0 (whole logits) or a number of positions, got {self.unembed_chunk}")
        if self.anchor_lookalikes < 0:
            raise SafeSteerError(f"anchor_lookalikes must be 0 (none) or a count, got {self.anchor_lookalikes}")
        if self.task_prompts < 0:
            raise SafeSteerError(f"task_prompts must be 0 (none) or a count, got {self.task_prompts}")
        if self.lora_rank < 0 or not self.lora_alpha > 0 or (self.lora_rank and not self.lora_targets.strip(",  ")):
            raise SafeSteerError(f"LoRA needs lora_rank >= 0 (0: off), lora_alpha > 0 and some lora_targets; got "
                                 f"{self.lora_rank}, {self.lora_alpha}, {self.lora_targets!r}")
        if self.anchor_loss not in LOSS_REGISTRY:
            raise SafeSteerError(f"unknown anchor_loss {self.anchor_loss!r}: use one of {', '.join(LOSS_REGISTRY)}")
        for kind in (self.loss, self.anchor_loss):  # each loss checks the options it reads
            get_loss(kind).check(LossOptions(beta=self.jsd_beta))
        # checked even with LoRA off: the value reaches file names (a sweep trial's directory) and model cards
        bad = [t for t in self.lora_targets.split(",") if t.strip() and not _MODULE_NAME.fullmatch(t.strip())]
        if bad:
            raise SafeSteerError(f"lora_targets {self.lora_targets!r} holds {bad[0]!r}, not a layer name; give "
                                 f"comma-separated names of linear layers such as {DEFAULT_TARGETS}")


PRESETS: dict[str, TrainConfig] = {
    # The recipe chosen on the validation splits for the embedded 135M model on 2 CPU cores
    # (studies/recipe/, then studies/lookalike/): the bounded loss (the paper's barely pulls on a
    # model whose S holds ~1% of its mass); the harmless anchor at weight 2 over the harmless
    # train prompts and the 100 look-alike ones (without it the student refuses everything, and
    # without the look-alikes it refuses a third of them); the 52 benchmark-phrased harmful train
    # prompts beside the 128 built-in ones (without them it refuses a third of such requests);
    # rank-8 LoRA adapters (full fine-tuning made replies loop); one pass over the prompts, and a
    # teacher at coefficient 1.5, milder than the direction stage's choice. Short rollouts put
    # the budget on the opening tokens, where a refusal starts. It expects S with the refusal's
    # opener (the pipeline's demo TokenConfig has openers=1).
    "demo": TrainConfig(
        loss="safesteer-bounded", anchor_weight=2.0, anchor_lookalikes=100, task_prompts=52, epochs=1, lora_rank=8,
        teacher_coeff=1.5, n_prompts=128, samples_per_prompt=4, max_new_tokens=12, lr=1e-3,
        sequences_per_step=16, micro_batch=8, checkpoint_every=8,
    ),
    # The paper's setting (docs/ARCHITECTURE.md, "The method"), for GPUs and hub models.
    "paper": TrainConfig(
        n_prompts=100, samples_per_prompt=8, max_new_tokens=512, lr=1e-5,
        sequences_per_step=32, micro_batch=8, checkpoint_every=10,
    ),
}


def preset(name: str, **overrides: Any) -> TrainConfig:
    """A named preset with optional field overrides."""
    if name not in PRESETS:
        raise SafeSteerError(f"unknown preset {name!r}: use one of {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides)


# --------------------------------------------------------------------- pieces
def build_optimizer(student: ChatModel, config: TrainConfig) -> tuple[torch.optim.Optimizer, Any]:
    """Unfreeze the student and return its AdamW optimizer and cosine schedule with warm-up.

    With ``config.lora_rank`` the student first gets its LoRA adapters, and only they train.
    """
    from transformers import get_cosine_schedule_with_warmup

    if config.lora_rank:
        targets = student.family.lora_targets if config.lora_targets == "auto" else config.lora_targets
        params = add_lora(student, LoraSpec(config.lora_rank, config.lora_alpha, targets), seed=config.seed)
    else:
        params = list(student.hf_model.parameters())
        for p in params:
            p.requires_grad_(True)
    # fused: one kernel for the whole update instead of a chain of per-tensor ops
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, fused=True)
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, round(config.warmup_fraction * config.total_steps), config.total_steps
    )
    return optimizer, scheduler


def teacher_micro_batches(
    teacher: ChatModel, hooks: list, rollouts: Completions, config: TrainConfig, device: torch.device,
    world: World = World(),
) -> Iterator[tuple[int, int, Float[Tensor, "micro time vocab"]]]:
    """The teacher's float32 logits for each micro-batch, as ``(start, stop, logits)``.

    With ``config.unembed_chunk`` it yields the teacher's final hidden states instead
    (``[micro, time, d_model]``), which the chunked loss unembeds a few positions at a time.

    The teacher needs no gradients, so it keeps no activations and can score several
    micro-batches in one forward: as many as keep the chunk's logits under
    ``TEACHER_LOGITS_BUDGET``. One wide forward is cheaper than several narrow ones
    (benchmarks/README.md). Under several
    processes (``world``) the chunk size comes from the widest rank's rollouts, so every rank
    runs the same number of teacher forwards. The teacher multiplies in the dtype
    :func:`~safesteer_lens.precision.model_dtype` gives it (``config.precision``, or its own
    narrower weights or gather dtype); its logits come back as float32.
    """
    n = len(rollouts.texts)
    # sized by the widest rank's rollouts, so every rank runs as many teacher forwards (each is
    # a collective when the teacher is sharded)
    width = int(world.max([rollouts.completion_ids.shape[1]])[0])
    hidden = config.unembed_chunk > 0
    per_micro_batch = config.micro_batch * width * (teacher.d_model if hidden else teacher.d_vocab) * 4
    chunk = config.micro_batch * max(1, TEACHER_LOGITS_BUDGET // per_micro_batch)
    dtype = model_dtype(config.precision, teacher)
    hooks = [*hooks, *finite_score_hooks(teacher, dtype)]
    for chunk_start in range(0, n, chunk):
        chunk_stop = min(chunk_start + chunk, n)
        with torch.no_grad(), autocast(dtype, teacher.device):
            logits = teacher_forced_logits(teacher, rollouts, hooks, chunk_start, chunk_stop, config.samples_per_prompt,
                                           hidden=hidden)
        logits = logits.to(device, torch.float32)
        for start in range(chunk_start, chunk_stop, config.micro_batch):
            stop = min(start + config.micro_batch, chunk_stop)
            yield start, stop, logits[start - chunk_start : stop - chunk_start]


def _projection_hook(direction: Direction, store: list[Tensor]) -> tuple[str, Callable[..., Tensor]]:
    """Record the student's ``resid_pre`` at the steering layer, projected on the unit direction."""
    unit = direction.unit

    def hook(resid: Float[Tensor, "batch pos d_model"], hook: Any) -> Tensor:
        store.append((resid.detach().float() @ unit.to(resid.device)).cpu())
        return resid

    return (hook_name(direction.layer), hook)


def _train_prompts(label: str, n: int, setting: str = "n_prompts", mix: bool = False) -> list[str]:
    """The first ``n`` built-in ``label`` train prompts (harmful for training, harmless for the anchor).

    With ``mix`` they are taken categories in turn (``TrainConfig.mix_categories``).
    """
    prompts = prompt_texts(first_prompts(load_builtin_prompts(label, "train"), n, mix))
    if len(prompts) < n:
        raise SafeSteerError(f"{setting} is {n} but the built-in {label} train split has {len(prompts)}; use at most "
                             f"{len(prompts)}")
    return prompts


def _study_train_prompts(name: str, n: int, setting: str, what: str) -> list[str]:
    """The first ``n`` train prompts of a look-alike study set, kinds in turn (``what`` names the set in errors)."""
    if not n:
        return []
    prompts = prompt_texts(first_prompts(load_study_set(name, "train"), n, True))
    if len(prompts) < n:
        raise SafeSteerError(f"{setting} is {n} but the {what} train split has {len(prompts)}; use at most {len(prompts)}")
    return prompts


def _harmful_prompts(config: TrainConfig) -> list[str]:
    """The harmful prompts the student trains on: built-in ones, then benchmark-phrased ones."""
    harmful = _train_prompts("harmful", config.n_prompts, mix=config.mix_categories)
    return harmful + _study_train_prompts("tasks", config.task_prompts, "task_prompts", "benchmark-phrased (tasks)")


def _anchor_prompts(config: TrainConfig) -> list[str]:
    """The harmless prompts the anchor cycles over (none without the anchor)."""
    if not config.anchor_weight:
        return []
    if config.anchor_prompts:
        harmless = _train_prompts("harmless", config.anchor_prompts, "anchor_prompts", mix=config.mix_categories)
    else:
        harmless = _train_prompts("harmless", config.n_prompts, mix=config.mix_categories)
    return harmless + _study_train_prompts("lookalike", config.anchor_lookalikes, "anchor_lookalikes", "look-alike")


def _step_prompts(prompts: list[str], config: TrainConfig, step: int) -> list[str]:
    """The prompts of one step: a per-epoch shuffle (seeded), cut into consecutive slices."""
    per_epoch = math.ceil(len(prompts) / config.prompts_per_step)
    epoch, index = divmod(step, per_epoch)
    order = list(range(len(prompts)))
    random.Random(config.seed * 7919 + epoch).shuffle(order)
    chosen = order[index * config.prompts_per_step : (index + 1) * config.prompts_per_step]
    return [prompts[i] for i in chosen]


def _training_teacher(
    teacher: ChatModel | None, name: str, shard: str, world: World, device: str | torch.device, compute: torch.dtype
) -> ChatModel:
    """The frozen teacher for :func:`train`: as given, loaded, or loaded and sharded (``shard="all"``)."""
    if shard != "all":
        return teacher or load_model(name)
    if teacher is not None:
        if not is_sharded(teacher):
            raise SafeSteerError(
                "shard='all' shards the teacher too: pass teacher=None (train loads and shards it) "
                "or a teacher loaded with safesteer_lens.sharding.load_sharded"
            )
        return teacher
    return load_sharded(name, world, device, frozen=True, compute=compute)


class NonFiniteLoss(SafeSteerError):
    """The loss became NaN or infinite; no update was applied."""


# --------------------------------------------------------------------- the loop
@dataclass
class TrainResult:
    """What :func:`train` returns: the trained student and the per-step metrics."""

    student: ChatModel
    metrics: list[dict[str, Any]]
    run_dir: Path


@dataclass
class TrainingRun:
    """What every step of one run needs, resolved once by :class:`Trainer` (a step's input).

    Attributes:
        config: The run's settings.
        world: This process's place among the ranks (``World()`` alone).
        student: The model being trained (its LoRA adapters, if any, already in place).
        teacher: The frozen base model; with ``teacher_hooks`` it is the steered teacher.
        teacher_hooks: The direction's hooks on the teacher.
        direction: The teacher's direction (the student's projection on it is logged).
        safety_ids: S, on the student's device.
        optimizer: AdamW over the trained parameters (only :func:`train_step` needs it).
        scheduler: Warm-up then cosine decay of the learning rate (likewise).
        sampler: The student's fast sampler (None for plain rollouts).
        prompts: The harmful training prompts.
        anchor_prompts: The harmless prompts of the anchor (empty without it).
    """

    config: TrainConfig
    world: World
    student: ChatModel
    teacher: ChatModel
    teacher_hooks: list
    direction: Direction
    safety_ids: Tensor
    optimizer: torch.optim.Optimizer | None = None
    scheduler: Any = None
    sampler: RolloutSampler | None = None
    prompts: list[str] = field(default_factory=list)
    anchor_prompts: list[str] = field(default_factory=list)

    @property
    def params(self) -> list[Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]


@dataclass
class GradientStats:
    """One loss term's sums over a step's rollouts on every rank (a step's output, with the metrics).

    The rates are weighted by each micro-batch's share of the step's rollouts, so they are
    means over the whole step; the counts are totals.
    """

    loss: float = 0.0
    kl_s: float = 0.0
    kl_full: float = 0.0
    s_mass_student: float = 0.0
    s_mass_teacher: float = 0.0
    projection_sum: float = 0.0
    projection_count: float = 0.0
    refusals: float = 0.0
    rows: float = 0.0
    completion_tokens: float = 0.0
    tokens: float = 0.0


@dataclass
class RunInputs:
    """What a run reads from its directory and the built-in prompts, read and checked once.

    Attributes:
        direction: The teacher's direction (``direction.*``).
        tokens: S (``safety_tokens.json``).
        prompts: The harmful training prompts.
        anchor_prompts: The harmless anchor prompts (empty without the anchor).
        resume: Whether the checkpoint was read to resume from it.
        checkpoint: ``checkpoint.pt``'s state when resuming from one, else None.
        metrics: ``metrics.jsonl``'s rows when resuming, else empty.
    """

    direction: Direction
    tokens: SafetyTokens
    prompts: list[str]
    anchor_prompts: list[str]
    resume: bool = False
    checkpoint: dict[str, Any] | None = None
    metrics: list[dict[str, Any]] = field(default_factory=list)


def preflight(run_dir: str | Path, config: TrainConfig, resume: bool = False) -> RunInputs:
    """Read and check everything a run takes from its directory, before any model loads.

    The direction, S, the prompt counts and, with ``resume``, the checkpoint and the metrics:
    a damaged file fails here in one line, not after a minute of loading. The :class:`Trainer`
    takes what this returns, so nothing is read twice.
    """
    run_dir = Path(run_dir)
    inputs = RunInputs(
        load_direction(run_dir), load_safety_tokens(run_dir), _harmful_prompts(config), _anchor_prompts(config), resume,
    )
    check_student_dir(run_dir / STUDENT_DIR)  # the export at the end must not meet files it may not replace
    if resume:
        if (run_dir / CHECKPOINT).exists():
            inputs.metrics = read_metrics(run_dir / METRICS)
            inputs.checkpoint = load_checkpoint(run_dir)
        # killed before its first checkpoint: nothing to continue from, so resuming starts again at step 0
    return inputs


class Trainer:
    """One training run: everything resolved in the constructor, the loop in :meth:`fit`.

    The constructor checks the settings against the world, takes the run's inputs (the
    direction, S, the prompts; :func:`preflight` reads them unless given), loads the teacher
    and the student, and builds the optimizer, schedule and sampler; nothing is written until
    :meth:`fit` has also read the checkpoint it resumes from. :func:`train` is the one-call form.
    """

    def __init__(self, run_dir: str | Path, config: TrainConfig | None = None, teacher: ChatModel | None = None,
                 device: str | None = None, shard: str = "none", low_memory_rollouts: bool = False,
                 report_to: str = "none", tracker_name: str = "train", inputs: RunInputs | None = None) -> None:
        self.run_dir, self.config = Path(run_dir), config or PRESETS["demo"]
        check_report_to(report_to)
        self.report_to, self.tracker_name, self.shard = report_to, tracker_name, shard
        world = current_world()
        self._check_world(world)
        self.inputs = inputs or preflight(self.run_dir, self.config)
        direction, self.tokens = self.config.teacher_direction(self.inputs.direction), self.inputs.tokens
        train_device = rank_device(device, world) or (teacher.device if teacher is not None else resolve_device(None))
        compute = compute_dtype(self.config.precision, torch.device(train_device))  # what sharded models are gathered in
        teacher = _training_teacher(teacher, direction.model, shard, world, train_device, compute)
        check_prompt_lengths(teacher, prompts_from_texts(self.inputs.prompts, "the train split"), self.config.max_new_tokens)
        if max(self.tokens.ids) >= teacher.d_vocab:
            raise SafeSteerError(
                f"safety token id {max(self.tokens.ids)} does not exist in {teacher.name}'s vocabulary of "
                f"{teacher.d_vocab}; rerun `safesteer tokens --run {self.run_dir}` for this model"
            )
        if shard != "none":
            student = load_sharded(teacher.name, world, train_device, self.config.student_dtype, compute=compute)
        else:
            student = load_model(teacher.name, device=train_device, dtype=self.config.student_dtype)
        optimizer, scheduler = build_optimizer(student, self.config)
        self.run = TrainingRun(
            self.config, world, student, teacher, direction.hooks(teacher), direction,
            torch.tensor(self.tokens.ids, device=student.device), optimizer, scheduler,
            rollout_sampler(student, self.config, low_memory_rollouts), self.inputs.prompts, self.inputs.anchor_prompts,
        )
        self.precision = dtype_name(model_dtype(self.config.precision, student))
        self.last_saved: int | None = None

    def _check_world(self, world: World) -> None:
        """Settings that cannot split over this world's ranks fail before anything loads."""
        check_sharding(self.shard, world)
        if self.config.lora_rank and self.shard != "none":
            raise SafeSteerError("LoRA students train whole on every process: use shard='none' (data parallel), or "
                                 "lora_rank=0 (--lora-rank 0; the demo preset has rank 8) to shard")
        if self.config.unembed_chunk and self.shard != "none":
            raise SafeSteerError("unembed_chunk reads the whole unembedding, which a sharded model splits over processes: "
                                 "use unembed_chunk=0 (--unembed-chunk 0) to shard")
        _check_rollout_engine(self.config, world)
        world.shard(self.config.prompts_per_step, "prompts")
        for count, what in ((self.config.harmful_prompts, "prompts"), (self.config.anchor_prompts, "anchor prompts")):
            if count % self.config.prompts_per_step:
                world.shard(count % self.config.prompts_per_step, f"{what} in the last step of a pass over them")

    def fit(self, resume: bool = False, max_steps: int | None = None, export: bool = True,
            progress: bool = True) -> TrainResult:
        """Train from the start or from ``checkpoint.pt`` (``resume``); export ``student/`` at the end.

        Each step samples the student's replies, scores them under student and teacher, takes the
        loss over S, backpropagates, clips, and steps AdamW and the schedule (:func:`train_step`);
        then the row is logged and, every ``checkpoint_every`` steps, the state is saved.
        """
        run, config = self.run, self.config
        metrics, start = self._restore(resume)
        end = config.total_steps if max_steps is None else min(config.total_steps, start + max_steps)
        tracker = open_tracker(self.report_to, self.run_dir, self._tracked_settings(), self.tracker_name, start,
                               run.world.is_main)
        bar = tqdm(range(start, end), desc=f"train ({config.loss}, {self.precision})", initial=start,
                   total=config.total_steps, disable=not (progress and run.world.is_main))
        try:
            for step in bar:
                row = self._step(step)
                metrics.append(row)
                if run.world.is_main:
                    append_metrics(self.run_dir / METRICS, row)
                tracker.log(row, step)
                bar.set_postfix(loss=f"{row['loss']:.4f}", refusal=f"{row['rollout_refusal']:.2f}")
                if (step + 1) % config.checkpoint_every == 0 or step + 1 == end:  # end: resumable after max_steps
                    self._checkpoint(step + 1)
        finally:
            tracker.close()
        for p in run.params:
            p.requires_grad_(False)
        if end == config.total_steps:
            merge_lora(run.student)  # a finished LoRA student is a plain model again
            if export:
                self._export()
        run.world.barrier()  # every rank returns once rank 0's files are complete
        return TrainResult(run.student, metrics, self.run_dir)

    def _restore(self, resume: bool) -> tuple[list[dict[str, Any]], int]:
        """The kept metrics and the first step; the old metrics go only now, with every input checked."""
        run, path = self.run, self.run_dir / METRICS
        metrics: list[dict[str, Any]] = []
        start = 0
        if resume and not self.inputs.resume:  # inputs read for a fresh start: read what resuming needs
            self.inputs = preflight(self.run_dir, self.config, resume=True)
        state = self.inputs.checkpoint if resume else None
        self.inputs.checkpoint = None  # loaded into the models below: no second copy is kept
        if state is not None:
            _check_resumable(state, self.config, model_dtype(self.config.precision, run.student))
            adapters_only = state.get("weights") == "adapters"
            if adapters_only and state.get("base") != base_fingerprint(run.student):
                raise SafeSteerError("checkpoint.pt holds LoRA adapters trained on other base weights than this model's; "
                                     "resume with the model it was trained from, or train without --resume")
            try:
                load_full_state(run.student, state["student"], run.optimizer, state["optimizer"], adapters_only=adapters_only)
                run.scheduler.load_state_dict(state["scheduler"])
            except (KeyError, ValueError, TypeError, RuntimeError) as exc:  # torch's words for a state of another shape
                raise SafeSteerError(f"checkpoint.pt does not fit this student ({first_line(exc, 100)}); train without "
                                     "--resume to start over") from exc
            start = state["step"]
            metrics = [m for m in self.inputs.metrics if m.get("step", start) < start]
            self.last_saved = start
            del state
        if run.world.is_main:
            write_metrics(path, metrics)
            if not resume:  # a fresh start: an older run's checkpoint must not be resumed into this one
                (self.run_dir / CHECKPOINT).unlink(missing_ok=True)
        return metrics, start

    def _step(self, step: int) -> dict[str, Any]:
        """:func:`train_step`, with what to do next in the error when the loss goes NaN."""
        try:
            return train_step(self.run, step)
        except NonFiniteLoss as exc:
            hint = " or train with --precision float32" if self.precision != "float32" else ""
            raise NonFiniteLoss(f"{exc}; {self._kept()}; lower the learning rate{hint} and rerun (with --resume to "
                                "continue)") from exc

    def _kept(self) -> str:
        return f"checkpoint.pt holds step {self.last_saved}" if self.last_saved is not None else "no checkpoint was written yet"

    def _checkpoint(self, next_step: int) -> None:
        """Save the state after ``next_step`` steps, unless the weights went non-finite."""
        run = self.run
        if run.world.sum([sum(float(not torch.isfinite(local(p)).all()) for p in run.params)])[0]:
            raise NonFiniteLoss(f"the weights became NaN or infinite at step {next_step - 1}; {self._kept()}; "
                                "lower the learning rate")
        if run.world.is_main or self.shard != "none":  # gathering shards takes every rank
            weights, optim = full_state(run.student, run.optimizer)
            kept = {}
            if lora_spec(run.student.hf_model) is not None:
                # the base weights stay frozen and are loaded again on resume: store only what trains
                weights = {name: tensor for name, tensor in weights.items() if is_adapter(name)}
                kept = {"weights": "adapters", "base": base_fingerprint(run.student)}
            if run.world.is_main:
                save_checkpoint(self.run_dir, {
                    "format": CHECKPOINT_FORMAT, "step": next_step, "student": weights, "optimizer": optim,
                    "scheduler": run.scheduler.state_dict(), "config": asdict(self.config), "matmul_dtype": self.precision,
                    **kept,
                })
            del weights, optim  # host copies of the whole student: not kept until the next checkpoint
        self.last_saved = next_step

    def _export(self) -> None:
        run = self.run
        if run.world.is_main or self.shard != "none":
            weights = full_state(run.student)[0]  # on the host, gathered if sharded
            if run.world.is_main:
                card = build_model_card(run.teacher.name, self.config, run.direction, self.tokens)
                export_student(run.student, self.run_dir / STUDENT_DIR, weights, card=card)

    def _tracked_settings(self) -> dict[str, Any]:
        run = self.run
        return {**asdict(self.config), "model": run.teacher.name, "direction_layer": run.direction.layer,
                "direction_coeff": run.direction.coeff, "n_safety_tokens": len(self.tokens)}


@holds_lock("safesteer train")
def train(
    run_dir: str | Path,
    config: TrainConfig | None = None,
    teacher: ChatModel | None = None,
    resume: bool = False,
    max_steps: int | None = None,
    export: bool = True,
    progress: bool = True,
    device: str | None = None,
    shard: str = "none",
    low_memory_rollouts: bool = False,
    report_to: str = "none",
    tracker_name: str = "train",
    inputs: RunInputs | None = None,
) -> TrainResult:
    """Train a student by localized on-policy distillation from the steered teacher.

    Args:
        run_dir: Holds ``direction.*`` and ``safety_tokens.json``; receives ``metrics.jsonl``,
            ``checkpoint.pt`` and ``student/``.
        config: Settings; defaults to the ``demo`` preset.
        teacher: The base model, already loaded (saves a load); default: the model named in
            ``direction.json``. It stays frozen; the student is a second copy.
        resume: Continue from ``checkpoint.pt``.
        max_steps: Stop after this many steps in this call (to step through training in a
            notebook); the run can continue with ``resume=True``.
        export: Write ``student/`` when the last step is done.
        progress: Show a progress bar.
        device: Where the student trains (default: the teacher's device). A teacher on a
            second device scores rollouts there; its logits are moved to the student.
        shard: Under torchrun: ``"none"`` (data parallel, whole models on every rank),
            ``"student"`` (the student's weights, gradients and AdamW states sharded with
            FSDP2; a whole teacher on every rank) or ``"all"`` (the teacher sharded too; leave
            ``teacher`` None, or pass one sharded with
            :func:`~safesteer_lens.sharding.load_sharded`). See :mod:`safesteer_lens.sharding`.
        low_memory_rollouts: With a sharded student, gather each layer at every decoded token
            rather than holding the whole student while sampling (slower, less memory).
        report_to: Where per-step metrics go besides ``metrics.jsonl``: ``none``,
            ``tensorboard`` or ``wandb`` (:mod:`safesteer_lens.tracking`; rank 0 only).
        tracker_name: This run's name in the tracker.
        inputs: What :func:`preflight` read from ``run_dir`` (with the same ``resume``), when
            the caller has read it already; read here otherwise.
    """
    inputs = inputs or preflight(run_dir, config or PRESETS["demo"], resume)  # before any model loads
    trainer = Trainer(run_dir, config, teacher, device=device, shard=shard, low_memory_rollouts=low_memory_rollouts,
                      report_to=report_to, tracker_name=tracker_name, inputs=inputs)
    return trainer.fit(resume=resume, max_steps=max_steps, export=export, progress=progress)


def train_step(run: TrainingRun, step: int) -> dict[str, Any]:
    """One optimizer step, in nanoGPT's order: sample, score, loss, backward, clip, step; returns its row.

    Under several processes (``run.world``) this rank handles its share of the step's prompts
    and the row describes the whole step. With ``anchor_weight`` > 0 the step also samples
    replies to as many harmless prompts and adds their weighted anchor loss against the
    unsteered base (the teacher model without its hooks); the gradients of both terms are
    summed over ranks once.
    """
    config = run.config
    anchored = config.anchor_weight > 0
    if anchored and not run.anchor_prompts:
        raise SafeSteerError("anchor_weight is set but no anchor prompts were given; pass the harmless train prompts")
    t0 = time.perf_counter()
    rollouts = sample_rollouts(run.student, run.prompts, config, step, run.sampler, run.world)
    anchor_rollouts = (sample_rollouts(run.student, run.anchor_prompts, config, step, run.sampler, run.world, stream=1)
                       if anchored else None)
    t1 = time.perf_counter()
    stats = accumulate_gradients(run, rollouts, step, reduce=not anchored)
    anchor = None
    if anchor_rollouts is not None:
        anchor = accumulate_gradients(run, anchor_rollouts, step, loss=config.anchor_loss, scale=config.anchor_weight,
                                      hooks=[])
    # the norm of the whole (summed) gradient, so the same on every rank, sharded or not
    grad_norm = to_float(torch.nn.utils.clip_grad_norm_(run.params, config.max_grad_norm))
    if not math.isfinite(grad_norm):
        run.optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLoss(f"the gradients became {grad_norm} at step {step}; training stopped before the update")
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    t2 = time.perf_counter()
    tokens = stats.completion_tokens + (anchor.completion_tokens if anchor else 0.0)
    return {
        "step": step,
        "lr": run.scheduler.get_last_lr()[0],
        **{k: round(getattr(stats, k), 6) for k in ("loss", "kl_s", "kl_full", "s_mass_student", "s_mass_teacher")},
        **({"anchor_loss": round(anchor.loss, 6), "anchor_kl_s": round(anchor.kl_s, 6),
            "anchor_refusal": anchor.refusals / anchor.rows} if anchor else {}),
        "grad_norm": round(grad_norm, 6),
        "rollout_refusal": stats.refusals / stats.rows,
        "projection": round(stats.projection_sum / stats.projection_count, 6),
        "completion_tokens": int(stats.completion_tokens),
        "rollout_tokens_per_s": round(tokens / (t1 - t0), 1),
        "update_tokens_per_s": round((stats.tokens + (anchor.tokens if anchor else 0.0)) / (t2 - t1), 1),
        "seconds": round(t2 - t0, 2),
        "precision": dtype_name(model_dtype(config.precision, run.student)),
        "example": rollouts.texts[0][:160],
    }


def sample_rollouts(
    student: ChatModel,
    prompts: list[str],
    config: TrainConfig,
    step: int,
    sampler: RolloutSampler | None = None,
    world: World = World(),
    stream: int = 0,
) -> Completions:
    """This rank's rollouts for ``step``: ``samples_per_prompt`` replies to each of its prompts.

    With the fast sampler every row is seeded by its index in the whole step, so the rollouts
    do not depend on how many processes share the step. ``stream`` tells apart the seeds of
    several prompt sets sampled in one step (1 for the harmless anchor).
    """
    step_prompts = _step_prompts(prompts, config, step)
    start, stop = world.shard(len(step_prompts), "prompts")
    seed = config.seed * 1_000_003 + step + stream * 7_777_777
    dtype = model_dtype(config.precision, student)
    if sampler is not None and sampler.dtype != dtype:
        raise SafeSteerError(
            f"the sampler samples in {sampler.dtype} but precision {config.precision!r} scores in {dtype}; "
            "build it with distill.rollout_sampler(student, config)"
        )
    try:
        if config.rollouts == "fast":
            sampler = sampler or rollout_sampler(student, config)
            return sampler.sample(
                step_prompts[start:stop], config.samples_per_prompt, max_new_tokens=config.max_new_tokens,
                temperature=config.temperature, seed=seed, first_row=start * config.samples_per_prompt,
            )
        _check_rollout_engine(config, world)
        with autocast(dtype, student.device), student.bridge.hooks(fwd_hooks=finite_score_hooks(student, dtype)):
            return generate(
                student, [p for p in step_prompts for _ in range(config.samples_per_prompt)],
                max_new_tokens=config.max_new_tokens, do_sample=True, temperature=config.temperature,
                seed=seed, batch_size=config.sequences_per_step,
            )
    except RuntimeError as exc:  # torch.multinomial on NaN/inf probabilities
        if "inf" in str(exc) or "nan" in str(exc):
            raise NonFiniteLoss(f"the student's probabilities became NaN or infinite at step {step} (while sampling)") from exc
        raise


def _check_resumable(state: dict[str, Any], config: TrainConfig, dtype: torch.dtype) -> None:
    """One-line errors for a checkpoint that this run cannot continue, naming what differs."""
    # settings a checkpoint may predate, at the values it was trained with: float32 matmuls,
    # and the defaults of the options added since (anchor off, no LoRA)
    defaults = asdict(TrainConfig())
    saved = {"precision": "float32", **{k: defaults[k] for k in PREDATED_SETTINGS}, **state["config"]}
    if not 0 <= state["step"] <= config.total_steps:
        raise SafeSteerError(f"checkpoint.pt is at step {state['step']} but this run has {config.total_steps} steps; "
                             "resume with the settings it was written with, or train without --resume")
    changed = [key for key in asdict(config) if saved.get(key) != getattr(config, key)]
    if changed:
        what = ", ".join(f"{key} ({saved.get(key)!r} there, {getattr(config, key)!r} now)" for key in changed)
        raise SafeSteerError(f"checkpoint.pt was written with other settings: {what}; resume with the same preset and flags")
    trained_in = state.get("matmul_dtype", "float32")
    now = dtype_name(dtype)
    if trained_in != now:
        raise SafeSteerError(
            f"checkpoint.pt was trained with {trained_in} matmuls, but precision {config.precision!r} means {now} "
            f"here; resume with --precision {trained_in}"
        )


def rollout_sampler(student: ChatModel, config: TrainConfig, low_memory: bool = False) -> RolloutSampler | None:
    """The student's sampler for ``config`` (None for plain rollouts): build it once per run.

    It samples in ``config.precision``, the precision the student is scored in, and it holds
    the sampling twin and, on CUDA, the compiled decode step, so building it every step
    would redo both.
    """
    if config.rollouts != "fast":
        return None
    return RolloutSampler(student, low_memory=low_memory, dtype=model_dtype(config.precision, student))


def _check_rollout_engine(config: TrainConfig, world: World) -> None:
    """The plain engine seeds torch's global generator, so its rollouts depend on the batch split."""
    if world.size > 1 and config.rollouts != "fast":
        raise SafeSteerError("rollouts='plain' runs in one process only; use the default fast rollouts under torchrun")


def accumulate_gradients(
    run: TrainingRun,
    rollouts: Completions,
    step: int,
    loss: str | None = None,
    scale: float = 1.0,
    hooks: list | None = None,
    reduce: bool = True,
) -> GradientStats:
    """Backpropagate one loss term over ``rollouts`` into the student's ``.grad``; return its sums.

    Args:
        run: The run's models, optimizer and settings.
        rollouts: This rank's rollouts of the step.
        step: The step (for error messages).
        loss: The loss's name (default ``config.loss``).
        scale: A factor on the term, such as the anchor's weight.
        hooks: The teacher's hooks (default the direction's; ``[]`` scores against the base).
        reduce: False leaves a whole student's gradients unsummed over ranks, for a later
            term's call to sum them once.

    Each micro-batch's loss is weighted by its share of the step's rollouts over *all* ranks,
    so after the gradients are summed over ranks they equal a single process's. A non-finite
    loss on any rank stops every rank before the update, all at the same micro-batch (no rank
    is left waiting in a collective). A sharded student's gradients are summed over the ranks
    by FSDP in each backward; a whole one's once, after the loop.
    """
    student, config, world, safety_ids = run.student, run.config, run.world, run.safety_ids
    hooks = run.teacher_hooks if hooks is None else hooks
    n_global = world.sum([len(rollouts.texts)])[0]  # the last step of an epoch may be short
    dtype = model_dtype(config.precision, student)
    guards = finite_score_hooks(student, dtype)
    sums = GradientStats()
    bad_loss = None
    mask_all = rollouts.completion_mask
    # a teacher on another device lends the chunked loss a copy of its unembedding: made once per call
    heads = (unembedding(student), unembedding(run.teacher).to(student.device)) if config.unembed_chunk else ()
    for start, stop, t_logits in teacher_micro_batches(run.teacher, hooks, rollouts, config, student.device, world):
        mask = mask_all[start:stop]
        captured: list[Tensor] = []
        with autocast(dtype, student.device):  # the forward only: backward follows the forward's dtypes
            s_logits = teacher_forced_logits(
                student, rollouts, [_projection_hook(run.direction, captured), *guards], start, stop, config.samples_per_prompt,
                hidden=config.unembed_chunk > 0,
            )
        kind = loss or config.loss
        if config.unembed_chunk:
            with autocast(dtype, student.device):
                value = fused_distillation_loss(kind, s_logits, t_logits, *heads, mask, safety_ids, beta=config.jsd_beta,
                                                chunk=config.unembed_chunk)
        else:
            value = distillation_loss(kind, s_logits, t_logits, mask, safety_ids, beta=config.jsd_beta)
        if world.sum([float(not torch.isfinite(value))])[0]:
            bad_loss = value.item()
            break
        weight = (stop - start) / n_global
        # a sharded student reduce-scatters in every backward: deferring it to the last
        # micro-batch would hold a whole unsharded gradient on every rank in between
        (value * (weight * scale)).backward()
        with torch.no_grad():
            sums.loss += value.item() * weight
            if config.unembed_chunk:
                with autocast(dtype, student.device):
                    monitors = fused_monitors(s_logits, t_logits, *heads, mask, safety_ids, chunk=config.unembed_chunk)
            else:
                monitors = {
                    "kl_s": distillation_loss("safesteer", s_logits, t_logits, mask, safety_ids).item(),
                    "kl_full": distillation_loss("full-reverse", s_logits, t_logits, mask).item(),
                    "s_mass_student": sequence_mean(safety_mass(s_logits, safety_ids), mask).item(),
                    "s_mass_teacher": sequence_mean(safety_mass(t_logits, safety_ids), mask).item(),
                }
            for name, monitor in monitors.items():
                setattr(sums, name, getattr(sums, name) + monitor * weight)
        proj = captured[-1][:, -mask.shape[1] :][mask.cpu()]  # the completion positions (last pass)
        sums.projection_sum += float(proj.sum())
        sums.projection_count += proj.numel()
    sums.refusals = refusal_rate(rollouts.texts) * len(rollouts.texts)
    sums.rows = float(len(rollouts.texts))
    sums.completion_tokens = float(mask_all.sum())
    sums.tokens = float(rollouts.attention_mask.sum())
    if bad_loss is not None:
        for p in student.hf_model.parameters():
            p.grad = None
        shown = bad_loss if not math.isfinite(bad_loss) else "NaN or infinite on another process"
        raise NonFiniteLoss(f"the loss became {shown} at step {step}; training stopped before the update")
    keys = list(asdict(sums))
    totals = GradientStats(**dict(zip(keys, world.sum([getattr(sums, k) for k in keys]))))
    if reduce and not is_sharded(student):
        world.all_reduce_gradients(student.hf_model.parameters())
    return totals

