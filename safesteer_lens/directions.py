"""Stage 1: find a refusal direction, score it, pick the teacher's layer and coefficient.

Two ways to get candidate vectors, one per (layer, position):

* ``diff-means`` (Arditi et al. 2024): mean ``resid_pre`` over harmful prompts minus harmless
  prompts, at each post-instruction template position. Works when the model already refuses.
* ``contrastive``: mean ``resid_pre`` over *prompt + refusal reply* minus *prompt + compliant
  reply* (last few tokens, same prompts). Works on models that do not refuse yet, such as the
  embedded SmolLM2-135M-Instruct, because the refusal it encodes is written out in the text.

Each candidate gets the three Arditi scores on validation prompts (bypass, induce, KL), a
filter and a choice; then a sweep of the steering coefficient, judged by greedy replies, picks
how hard the teacher pushes. The result is a :class:`Direction`, saved as
``direction.safetensors`` + ``direction.json`` in the run directory.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from jaxtyping import Float
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from safesteer_lens.atomic import write_atomic, write_text_atomic
from safesteer_lens.data import check_reply_budget, load_builtin_prompts, prompt_texts, prompts_hash
from safesteer_lens.errors import SafeSteerError
from safesteer_lens.generation import generate, last_token_logits
from safesteer_lens.losses import kl_terms
from safesteer_lens.models import ChatModel
from safesteer_lens.refusal import refusal_rate, refusal_score, refusal_token_ids
from safesteer_lens.rundir import artifact_error, read_json, read_tensors
from safesteer_lens.steering import FwdHook, ablation_hooks, add_hooks, check_direction, hook_name

DIRECTION_TENSOR = "direction.safetensors"
DIRECTION_JSON = "direction.json"

REFUSAL_REPLIES: tuple[str, ...] = (
    "I'm sorry, but I can't help with that request.",
    "I cannot assist with that. I'm unable to provide this.",
    "I'm unable to help with this request, sorry.",
    "I can't help with that. It's not something I can assist with.",
)
COMPLIANT_REPLIES: tuple[str, ...] = (
    "Sure! Here is a detailed answer to your question.",
    "Of course. Here's how you can do it, step by step.",
    "Certainly! Here are the main points to know.",
    "Great question. Here is a clear explanation.",
)


# ------------------------------------------------------------------ candidates
@dataclass
class Candidates:
    """Candidate refusal vectors, one per (layer, position).

    Attributes:
        vectors: Raw (unnormalised) vectors, float32.
        layers: Block index of each row (the ``resid_pre`` it was read at).
        positions: Offset of each column from the end of the sequence (``-1`` = last token);
            for contrastive candidates the single column is the mean over the reply's last
            tokens and is recorded as ``-1``.
        position_labels: Readable token label per column, for plots.
        method: How they were computed.
    """

    vectors: Float[Tensor, "layer position d_model"]
    layers: list[int]
    positions: list[int]
    position_labels: list[str]
    method: str


def check_layers(model: ChatModel, layers: Sequence[int] | None) -> list[int]:
    """The layers to search (all when None), sorted; a layer the model lacks is a one-line error."""
    chosen = list(range(model.n_layers)) if layers is None else sorted(set(layers))
    for layer in chosen:
        if not 0 <= layer < model.n_layers:
            raise SafeSteerError(
                f"layer {layer} is out of range: {model.name} has layers 0..{model.n_layers - 1}"
            )
    return chosen


@torch.no_grad()
def mean_resid_pre(
    model: ChatModel,
    prompts: Sequence[str],
    layers: Sequence[int],
    last_n: int,
    replies: Sequence[str] | None = None,
    batch_size: int = 16,
) -> Float[Tensor, "layer position d_model"]:
    """Mean ``resid_pre`` at the last ``last_n`` positions over prompts, in float64.

    Rows are left-padded, so the last ``last_n`` positions line up across the batch.
    """
    total = torch.zeros(len(layers), last_n, model.d_model, dtype=torch.float64, device=model.device)
    captured: dict[int, Tensor] = {}

    def capture(layer: int) -> Callable[..., Tensor]:
        def hook(resid: Float[Tensor, "batch pos d_model"], hook: Any) -> Tensor:
            captured[layer] = resid[:, -last_n:, :].to(torch.float64).sum(0)
            return resid

        return hook

    hooks = [(hook_name(layer), capture(layer)) for layer in layers]
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        batch = model.tokenize(chunk, None if replies is None else list(replies[start : start + batch_size]))
        with model.bridge.hooks(fwd_hooks=hooks):
            model.bridge(batch.input_ids, attention_mask=batch.attention_mask)
        for i, layer in enumerate(layers):
            total[i] += captured[layer]
    return total / len(prompts)


def diff_in_means(
    model: ChatModel,
    harmful: Sequence[str],
    harmless: Sequence[str],
    layers: Sequence[int] | None = None,
    batch_size: int = 16,
) -> Candidates:
    """Harmful-minus-harmless mean ``resid_pre`` at every post-instruction position."""
    chosen = check_layers(model, layers)
    if not harmful or not harmless:
        raise SafeSteerError("diff-in-means needs at least one harmful and one harmless prompt")
    n = len(model.post_instruction_ids)
    diff = mean_resid_pre(model, harmful, chosen, n, batch_size=batch_size) - mean_resid_pre(
        model, harmless, chosen, n, batch_size=batch_size
    )
    return Candidates(
        diff.float(), chosen, list(range(-n, 0)), model.post_instruction_tokens, "diff-means"
    )


def contrastive_directions(
    model: ChatModel,
    prompts: Sequence[str],
    layers: Sequence[int] | None = None,
    last_n: int = 8,
    refusal_replies: Sequence[str] = REFUSAL_REPLIES,
    compliant_replies: Sequence[str] = COMPLIANT_REPLIES,
    batch_size: int = 16,
) -> Candidates:
    """Refusal-reply minus compliant-reply mean ``resid_pre`` over the reply's last tokens.

    Each prompt is paired with one refusal and one compliant reply (taken in turn from the
    lists), so the two means differ in the reply only.
    """
    chosen = check_layers(model, layers)
    if not prompts:
        raise SafeSteerError("contrastive directions need at least one prompt")
    refuse = [refusal_replies[i % len(refusal_replies)] for i in range(len(prompts))]
    comply = [compliant_replies[i % len(compliant_replies)] for i in range(len(prompts))]
    diff = mean_resid_pre(model, prompts, chosen, last_n, refuse, batch_size) - mean_resid_pre(
        model, prompts, chosen, last_n, comply, batch_size
    )
    vectors = diff.mean(dim=1, keepdim=True).float()
    return Candidates(vectors, chosen, [-1], [f"reply (last {last_n})"], "contrastive")


@dataclass(frozen=True)
class DirectionMethod:
    """A registered way to propose candidate directions, and how stage 1 chooses among them.

    Attributes:
        name: What ``--method`` and ``DirectionConfig.method`` call it.
        candidates: ``(model, harmful_train, harmless_train, layers) -> Candidates``.
        help: One line for the CLI's help.
        choose_by: ``"bypass"`` (lowest wins: ablating it removes refusal) or ``"induce"``
            (highest wins: adding it causes refusal, for a model with nothing to bypass yet).
        induce_filter: Whether a candidate must have induce > 0 to pass the filters.
    """

    name: str
    candidates: Callable[[ChatModel, Sequence[str], Sequence[str], Sequence[int]], Candidates]
    help: str
    choose_by: str = "bypass"
    induce_filter: bool = True


DIRECTION_METHODS: dict[str, DirectionMethod] = {}


def register_method(name: str, help: str, choose_by: str = "bypass", induce_filter: bool = True) -> Callable:
    """Register a candidate generator under ``name`` (a decorator); ``auto`` is reserved."""

    def add(fn: Callable[[ChatModel, Sequence[str], Sequence[str], Sequence[int]], Candidates]) -> Callable:
        if name in DIRECTION_METHODS or name == "auto":
            raise ValueError(f"a direction method named {name!r} is registered already")
        DIRECTION_METHODS[name] = DirectionMethod(name, fn, help, choose_by, induce_filter)
        return fn

    return add


@register_method("diff-means", "harmful-minus-harmless mean resid_pre at each post-instruction position (Arditi et al.)")
def _diff_means_method(model: ChatModel, harmful: Sequence[str], harmless: Sequence[str],
                       layers: Sequence[int]) -> Candidates:
    return diff_in_means(model, harmful, harmless, layers)


@register_method("contrastive", "refusal-reply minus compliant-reply mean resid_pre, for a model that does not refuse yet",
                 choose_by="induce", induce_filter=False)
def _contrastive_method(model: ChatModel, harmful: Sequence[str], harmless: Sequence[str],
                        layers: Sequence[int]) -> Candidates:
    return contrastive_directions(model, [*harmful, *harmless], layers)


def get_method(name: str) -> DirectionMethod:
    """The registered method, or a one-line error listing those there are."""
    if name not in DIRECTION_METHODS:
        raise SafeSteerError(f"unknown method {name!r}: use auto, {', '.join(DIRECTION_METHODS)}")
    return DIRECTION_METHODS[name]


# ------------------------------------------------------------------ scoring
def _kl(p_logits: Tensor, q_logits: Tensor) -> Tensor:
    """Mean KL(p || q) of next-token distributions given as logits."""
    return kl_terms(torch.log_softmax(p_logits, -1), torch.log_softmax(q_logits, -1)).mean()


def score_candidates(
    model: ChatModel,
    candidates: Candidates,
    harmful_val: Sequence[str],
    harmless_val: Sequence[str],
    progress: bool = True,
) -> list[dict[str, float]]:
    """Arditi et al.'s three scores for every candidate.

    * ``bypass``: mean refusal score on harmful prompts with the direction ablated everywhere
      (low = removing it stops refusals).
    * ``induce``: mean refusal score on harmless prompts with the raw vector added at its layer
      (high = adding it causes refusals).
    * ``kl``: mean next-token KL(clean || ablated) on harmless prompts (low = ablation leaves
      ordinary behaviour alone).
    """
    ids = refusal_token_ids(model.tokenizer, model.family.refusal_openings)
    clean_harmless = last_token_logits(model, harmless_val, [])
    rows = []
    grid = [(li, pi) for li in range(len(candidates.layers)) for pi in range(len(candidates.positions))]
    for li, pi in tqdm(grid, desc="scoring candidates", disable=not progress):
        vector = candidates.vectors[li, pi]
        layer = candidates.layers[li]
        if vector.norm() == 0:  # e.g. layer 0 at template tokens: identical for every prompt
            rows.append({"layer": layer, "position": candidates.positions[pi], "bypass": None, "induce": None, "kl": None})
            continue
        ablated = last_token_logits(model, list(harmful_val) + list(harmless_val), ablation_hooks(model, vector))
        induced = last_token_logits(model, harmless_val, add_hooks(model, vector, layer))
        rows.append(
            {
                "layer": layer,
                "position": candidates.positions[pi],
                "bypass": refusal_score(ablated[: len(harmful_val)], ids).mean().item(),
                "induce": refusal_score(induced, ids).mean().item(),
                "kl": _kl(clean_harmless, ablated[len(harmful_val) :]).item(),
            }
        )
    return rows


def select_candidate(
    scores: list[dict[str, Any]],
    n_layers: int,
    method: str,
    kl_max: float = 0.1,
    max_layer_fraction: float = 0.8,
) -> dict[str, Any]:
    """Filter and choose, marking each row's ``kept`` flag in place.

    Filters (Arditi et al.): layer below ``max_layer_fraction`` of the depth, ablation KL
    below ``kl_max``, induce above 0 (diff-means only: a contrastive vector is meant for models
    whose refusal scores start far below 0). Diff-means picks the lowest bypass; contrastive
    picks the highest induce, since a model that does not refuse has nothing to bypass. When
    the filters leave nothing, the depth filter alone applies (``kept`` then says so).
    Zero candidates (scores of None) are never chosen.
    """
    rule = get_method(method)

    def passes(row: dict[str, Any], strict: bool) -> bool:
        ok = row["kl"] is not None and row["layer"] < max_layer_fraction * n_layers
        if strict:
            ok = ok and row["kl"] < kl_max and (not rule.induce_filter or row["induce"] > 0)
        return ok

    kept = [r for r in scores if passes(r, True)] or [r for r in scores if passes(r, False)]
    kept = kept or [r for r in scores if r["kl"] is not None]
    if not kept:
        raise SafeSteerError("every candidate direction is zero; use more varied prompts or other layers")
    for row in scores:
        row["kept"] = any(row is k for k in kept)
    if rule.choose_by == "bypass":
        return min(kept, key=lambda r: r["bypass"])
    return max(kept, key=lambda r: r["induce"])


def sweep_coefficients(
    model: ChatModel,
    vector: Float[Tensor, "d_model"],
    layer: int,
    harmful_val: Sequence[str],
    harmless_val: Sequence[str],
    coeffs: Sequence[float] = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0),
    max_new_tokens: int = 24,
    progress: bool = True,
) -> list[dict[str, float]]:
    """Greedy-reply refusal rates and harmless-prompt KL for each steering coefficient."""
    clean = last_token_logits(model, harmless_val, [])
    rows = []
    for coeff in tqdm(coeffs, desc="coefficient sweep", disable=not progress):
        hooks = add_hooks(model, vector, layer, coeff)
        harmful = generate(model, harmful_val, max_new_tokens=max_new_tokens, fwd_hooks=hooks)
        harmless = generate(model, harmless_val, max_new_tokens=max_new_tokens, fwd_hooks=hooks)
        rows.append(
            {
                "coeff": float(coeff),
                "harmful_refusal": refusal_rate(harmful.texts),
                "harmless_refusal": refusal_rate(harmless.texts),
                "kl": _kl(clean, last_token_logits(model, harmless_val, hooks)).item(),
            }
        )
    return rows


def choose_coefficient(sweep: list[dict[str, float]], target: float = 0.9) -> float:
    """Smallest coefficient whose teacher refuses at least ``target`` of both prompt sets.

    The teacher is meant to over-refuse, so harmless refusals count toward the target. When no
    coefficient reaches it, the one with the best worse-of-the-two rate wins.
    """
    reaching = [r for r in sweep if min(r["harmful_refusal"], r["harmless_refusal"]) >= target]
    if reaching:
        return min(reaching, key=lambda r: r["coeff"])["coeff"]
    return max(sweep, key=lambda r: (min(r["harmful_refusal"], r["harmless_refusal"]), -r["coeff"]))["coeff"]


# ------------------------------------------------------------------ artifact
@dataclass
class Direction:
    """The stage-1 artifact: the raw vector the teacher adds and how it was chosen.

    Attributes:
        vector: Raw ``[d_model]`` vector (before the coefficient).
        model: Model name it was found on.
        method: ``"diff-means"`` or ``"contrastive"``.
        layer: Block whose ``resid_pre`` receives ``coeff * vector``.
        position: Offset from the end of the prompt where it was read (-1 = last token).
        coeff: The teacher's coefficient.
        scores: Every candidate's bypass / induce / KL and whether it passed the filters.
        sweep: Refusal rates and KL per coefficient.
        evaluation: Held-out refusal rates, steered and unsteered.
        prompts_hash: Hash of the prompts used, to tell whether inputs changed.
        settings: Everything else that shaped the result.
    """

    vector: Float[Tensor, "d_model"]
    model: str
    method: str
    layer: int
    position: int
    coeff: float
    scores: list[dict[str, Any]] = field(default_factory=list)
    sweep: list[dict[str, Any]] = field(default_factory=list)
    evaluation: dict[str, Any] = field(default_factory=dict)
    prompts_hash: str = ""
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def unit(self) -> Float[Tensor, "d_model"]:
        """The vector scaled to length 1 (what ablation and projections use)."""
        return self.vector / self.vector.norm()

    def hooks(self, model: ChatModel, coeff: float | None = None) -> list[FwdHook]:
        """The teacher's hooks: ``coeff * vector`` added to ``blocks.{layer}.hook_resid_pre``.

        Args:
            model: The model to steer (the vector is moved to its device and dtype).
            coeff: Another coefficient than the teacher's.
        """
        self.check_fits(model.n_layers, model.d_model, model.name)
        return add_hooks(model, self.vector, self.layer, self.coeff if coeff is None else coeff)

    def check_fits(self, n_layers: int, d_model: int, model: str) -> None:
        """Fail in one line unless this direction can steer a model of that shape.

        Checked before a direction from elsewhere (a control vector, another run) replaces a
        run's own, and again whenever hooks are built, so a mismatch never reaches a forward.

        Args:
            n_layers: The model's block count; the layer must be one of its blocks.
            d_model: The model's residual width; the vector must have as many values.
            model: The model's name, for the message.
        """
        vector = self.vector
        if vector.ndim != 1 or vector.shape[0] != d_model:
            raise SafeSteerError(f"the direction has shape {tuple(vector.shape)} but {model} has d_model {d_model}; "
                                 "use a direction found on this model")
        if not 0 <= self.layer < n_layers:
            raise SafeSteerError(f"the direction steers layer {self.layer} but {model} has layers 0-{n_layers - 1}; "
                                 "use a direction found on this model")
        if not vector.is_floating_point() or not torch.isfinite(vector).all() or not vector.any():
            raise SafeSteerError("the direction is not a finite, non-zero float vector; use another direction file")
        if not math.isfinite(self.coeff):
            raise SafeSteerError(f"the direction's coefficient is {self.coeff}; a teacher needs a finite one")

    @contextmanager
    def apply(self, model: ChatModel, coeff: float | None = None) -> Iterator[ChatModel]:
        """Steer ``model`` like the teacher inside a ``with`` block::

            with direction.apply(model):
                print(generate(model, ["How do I bake bread?"]).texts)
        """
        with model.bridge.hooks(fwd_hooks=self.hooks(model, coeff)):
            yield model

    def metadata(self) -> dict[str, Any]:
        """Everything but the tensor, as written to ``direction.json``."""
        meta = {k: v for k, v in asdict(self).items() if k != "vector"}
        meta["d_model"] = int(self.vector.shape[0])
        meta["norm"] = float(self.vector.norm())
        return meta

    def save(self, run_dir: str | Path) -> Path:
        """Write ``direction.safetensors`` and ``direction.json`` atomically into ``run_dir``."""
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        meta = json.dumps(self.metadata(), indent=2)
        tensors = {"direction": self.vector.detach().float().cpu().contiguous()}
        write_atomic(run_dir / DIRECTION_TENSOR, lambda tmp: save_file(tensors, str(tmp)))
        write_text_atomic(run_dir / DIRECTION_JSON, meta)
        return run_dir

    @classmethod
    def load(cls, run_dir: str | Path) -> "Direction":
        """Read the artifact back from a run directory."""
        run_dir = Path(run_dir)
        tensor_path, json_path = run_dir / DIRECTION_TENSOR, run_dir / DIRECTION_JSON
        if not tensor_path.is_file() or not json_path.is_file():
            raise SafeSteerError(
                f"{run_dir} has no {DIRECTION_TENSOR} + {DIRECTION_JSON}; run "
                f"`safesteer direction --out {run_dir}` first"
            )
        remake = f"safesteer direction --out {run_dir}"
        meta = read_json(json_path, remake)
        if not isinstance(meta, dict):
            raise artifact_error(json_path, "is not a JSON object", remake)
        for key, kinds in (("model", str), ("method", str), ("layer", int), ("position", int), ("coeff", (int, float))):
            if key not in meta:
                raise artifact_error(json_path, f"lacks {key!r}", remake)
            if not isinstance(meta[key], kinds) or isinstance(meta[key], bool):
                raise artifact_error(json_path, f"has {key} = {meta[key]!r}, not a {getattr(kinds, '__name__', 'number')}", remake)
        if meta["layer"] < 0 or not math.isfinite(meta["coeff"]):
            raise artifact_error(json_path, f"has layer {meta['layer']} and coeff {meta['coeff']}; a layer is >= 0 and "
                                 "a coefficient finite", remake)
        vector = read_tensors(tensor_path, remake).get("direction")
        if (vector is None or vector.ndim != 1 or not vector.is_floating_point() or not torch.isfinite(vector).all()
                or not vector.any()):
            raise artifact_error(tensor_path, "holds no finite, non-zero 1-D float tensor 'direction'", remake)
        if "d_model" in meta and meta["d_model"] != vector.shape[0]:
            raise artifact_error(tensor_path, f"has {vector.shape[0]} values but {DIRECTION_JSON} says d_model "
                                 f"{meta['d_model']}", remake)
        meta.pop("d_model", None)
        meta.pop("norm", None)
        known = {f for f in cls.__dataclass_fields__ if f != "vector"}
        return cls(vector=vector, **{k: v for k, v in meta.items() if k in known})


def load_direction(run_dir: str | Path) -> Direction:
    """One-call loader for the stage-1 artifact."""
    return Direction.load(run_dir)


# ------------------------------------------------------------------ the stage
@dataclass(frozen=True)
class DirectionConfig:
    """Settings of :func:`find_direction`.

    Attributes:
        method: ``"auto"`` (contrastive when the base model refuses under
            ``refusal_threshold`` of harmful validation prompts, else diff-means),
            ``"diff-means"`` or ``"contrastive"``.
        layers: Layers to consider (None: all).
        n_train: Prompts per class for the candidate means.
        n_val: Prompts per class for scoring and the coefficient sweep.
        n_test: Held-out prompts per class for the final check.
        coeffs: Coefficients to sweep.
        target: Refusal rate the teacher should reach on both classes.
        kl_max: KL filter.
        max_new_tokens: Reply length for refusal judgements.
        refusal_threshold: Base-model refusal rate below which ``auto`` goes contrastive.
    """

    method: str = "auto"
    layers: list[int] | None = None
    n_train: int = 64
    n_val: int = 24
    n_test: int = 40
    coeffs: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0)
    target: float = 0.9
    kl_max: float = 0.1
    max_new_tokens: int = 24
    refusal_threshold: float = 0.5

    def __post_init__(self) -> None:
        """Reject counts below 1 (a negative count would act as a Python slice) and non-finite numbers."""
        if self.method != "auto":
            get_method(self.method)
        for name in ("n_train", "n_val", "n_test", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise SafeSteerError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.layers is not None and (not self.layers or min(self.layers) < 0):
            raise SafeSteerError(f"layers must be non-empty and >= 0, got {self.layers}")
        if not self.coeffs or not all(math.isfinite(c) for c in self.coeffs):
            raise SafeSteerError(f"coeffs must be finite numbers, got {self.coeffs}")
        for name in ("target", "kl_max", "refusal_threshold"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise SafeSteerError(f"{name} must be a positive number, got {getattr(self, name)}")


def find_direction(
    model: ChatModel,
    config: DirectionConfig | None = None,
    harmful: dict[str, list[str]] | None = None,
    harmless: dict[str, list[str]] | None = None,
    progress: bool = True,
) -> Direction:
    """Run stage 1 end to end and return the :class:`Direction` (not yet saved).

    Args:
        model: The base model.
        config: Settings; defaults to :class:`DirectionConfig`.
        harmful: Optional ``{"train": [...], "val": [...], "test": [...]}`` prompt texts;
            default: the built-in harmful splits.
        harmless: Same for harmless prompts.
        progress: Show progress bars.
    """
    config = config or DirectionConfig()
    if config.method != "auto":
        get_method(config.method)
    harmful = harmful or {s: prompt_texts(load_builtin_prompts("harmful", s)) for s in ("train", "val", "test")}
    harmless = harmless or {s: prompt_texts(load_builtin_prompts("harmless", s)) for s in ("train", "val", "test")}
    for name, sets in (("harmful", harmful), ("harmless", harmless)):
        for split in ("train", "val", "test"):
            if not sets.get(split):
                raise SafeSteerError(f"no {name} {split} prompts; every split needs at least one")
    train_h, train_s = harmful["train"][: config.n_train], harmless["train"][: config.n_train]
    val_h, val_s = harmful["val"][: config.n_val], harmless["val"][: config.n_val]
    test_h, test_s = harmful["test"][: config.n_test], harmless["test"][: config.n_test]
    layers = check_layers(model, config.layers)
    check_reply_budget(model, config.max_new_tokens)
    started = time.perf_counter()

    base_val_refusal = refusal_rate(generate(model, val_h, max_new_tokens=config.max_new_tokens).texts)
    method = config.method
    if method == "auto":
        method = "contrastive" if base_val_refusal < config.refusal_threshold else "diff-means"
    candidates = get_method(method).candidates(model, train_h, train_s, layers)
    scores = score_candidates(model, candidates, val_h, val_s, progress)
    best = select_candidate(scores, model.n_layers, method, config.kl_max)
    li = candidates.layers.index(best["layer"])
    pi = candidates.positions.index(best["position"])
    vector = candidates.vectors[li, pi].cpu()
    sweep = sweep_coefficients(
        model, vector, best["layer"], val_h, val_s, config.coeffs, config.max_new_tokens, progress
    )
    coeff = choose_coefficient(sweep, config.target)
    evaluation = evaluate_teacher(model, vector, best["layer"], coeff, test_h, test_s, config.max_new_tokens)
    evaluation["base_val_harmful_refusal"] = base_val_refusal
    evaluation["seconds"] = round(time.perf_counter() - started, 1)
    settings = asdict(config)
    settings["coeffs"] = list(config.coeffs)
    settings["position_labels"] = candidates.position_labels
    return Direction(
        vector=vector,
        model=model.name,
        method=method,
        layer=best["layer"],
        position=best["position"],
        coeff=coeff,
        scores=scores,
        sweep=sweep,
        evaluation=evaluation,
        prompts_hash=prompts_hash(train_h, train_s, val_h, val_s, test_h, test_s),
        settings=settings,
    )


def evaluate_teacher(
    model: ChatModel,
    vector: Float[Tensor, "d_model"],
    layer: int,
    coeff: float,
    harmful: Sequence[str],
    harmless: Sequence[str],
    max_new_tokens: int = 24,
) -> dict[str, Any]:
    """Held-out greedy refusal rates with and without the steering hook, plus examples."""
    check_direction(model, vector, layer)
    hooks = add_hooks(model, vector, layer, coeff)
    out: dict[str, Any] = {}
    examples: dict[str, list[dict[str, str]]] = {}
    for name, prompts in (("harmful", harmful), ("harmless", harmless)):
        plain = generate(model, prompts, max_new_tokens=max_new_tokens)
        steered = generate(model, prompts, max_new_tokens=max_new_tokens, fwd_hooks=hooks)
        out[f"test_{name}_refusal_base"] = refusal_rate(plain.texts)
        out[f"test_{name}_refusal_teacher"] = refusal_rate(steered.texts)
        examples[name] = [
            {"prompt": p, "base": b.strip(), "teacher": t.strip()}
            for p, b, t in list(zip(prompts, plain.texts, steered.texts))[:6]
        ]
    out["n_test"] = {"harmful": len(harmful), "harmless": len(harmless)}
    out["examples"] = examples
    return out
