"""Stage 2: choose the safety tokens S that the distillation loss will touch.

The teacher (base model + steering hook) samples short continuations of harmless prompts.
Teacher-forcing them through teacher and base gives, at every position ``j``, the contrastive
log-probability over the whole vocabulary::

    delta_j(v) = log p_teacher(v | prefix_j) - log p_base(v | prefix_j)

Each valid position votes for its top ``K'`` tokens by ``delta``; ``S`` is the ``set_size``
tokens with most votes. Voting rather than the largest mean ``delta`` keeps one extreme value
from dominating (``method="mean-delta"`` is there to compare). Positions stop counting once
the base model's argmax is an end-of-turn token; special tokens are banned, and so are tokens
whose mean teacher probability over valid positions is below ``prob_floor`` (rare sub-word
pieces otherwise win votes on tiny probability ratios).
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from safesteer_lens.atomic import write_text_atomic
from safesteer_lens.data import check_reply_budget, load_builtin_prompts, prompt_texts, prompts_hash
from safesteer_lens.directions import Direction
from safesteer_lens.errors import SafeSteerError
from safesteer_lens.generation import Completions, generate
from safesteer_lens.models import ChatModel
from safesteer_lens.rundir import artifact_error, read_json
from safesteer_lens.scoring import teacher_forced_log_probs

TOKENS_JSON = "safety_tokens.json"
SATURATION_FACTOR = 4  # fewer than 4 K' eligible tokens: votes stop telling tokens apart


class SaturationWarning(UserWarning):
    """The probability floor leaves so few eligible tokens that K' votes per position saturate."""


def votes_per_position(top_k_votes: int | float, n_allowed: int) -> int:
    """K' as a count: a count is used as given (at most the eligible tokens), a share of them is rounded."""
    k = max(1, round(top_k_votes * n_allowed)) if isinstance(top_k_votes, float) else top_k_votes
    return min(k, n_allowed)


@dataclass(frozen=True)
class TokenConfig:
    """Settings of :func:`select_safety_tokens` (paper defaults where the paper has one).

    Attributes:
        horizon: Tokens per teacher rollout (H; paper: 7 for Qwen, 5 for Llama).
        samples_per_prompt: Rollouts per prompt (M; paper: 8).
        n_prompts: Harmless prompts used (from the built-in train split by default).
        temperature: Sampling temperature of the teacher rollouts (paper: 1).
        top_k_votes: Tokens each position votes for (K'; paper: 200). A float strictly between
            0 and 1 is a share of the eligible tokens (those past the floor and the bans), so
            K' keeps its meaning on a small vocabulary where the floor leaves few eligible.
        set_size: Size of S (paper: 50).
        prob_floor: Minimum mean teacher probability (paper: 1e-8 / 1e-7 on 150k vocabularies;
            1e-4 keeps junk sub-words out of SmolLM2's 49k vocabulary).
        method: ``"vote"`` (the paper) or ``"mean-delta"`` (largest mean delta, for comparison).
        ban_special: Exclude the tokenizer's special tokens.
        seed: Seeds the rollouts; the same seed gives the same S.
        batch_size: Sequences per forward pass.
        openers: Also add to S the ``openers`` tokens whose probability the teacher raises most
            at the reply's first position (:func:`opener_tokens`; 0: none, the paper's S).
            A reply becomes a refusal at its first token ("I" of "I'm sorry"), but that
            token carries the shift at one position of the horizon only, so it never wins
            the votes; without it in S neither the loss nor the harmless anchor sees the
            choice between refusing and answering.
    """

    horizon: int = 7
    samples_per_prompt: int = 8
    n_prompts: int = 32
    temperature: float = 1.0
    top_k_votes: int | float = 200
    set_size: int = 50
    prob_floor: float = 1e-4
    method: str = "vote"
    ban_special: bool = True
    seed: int = 0
    batch_size: int = 32
    openers: int = 0

    def __post_init__(self) -> None:
        """Reject settings that cannot work on any model (:func:`validate_config` adds the vocabulary's)."""
        for name in ("horizon", "samples_per_prompt", "n_prompts", "batch_size"):
            if getattr(self, name) < 1:
                raise SafeSteerError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.openers < 0:
            raise SafeSteerError(f"openers must be 0 (none) or a count of first-position tokens, got {self.openers}")
        if self.method not in ("vote", "mean-delta"):
            raise SafeSteerError(f"unknown selection method {self.method!r}: use 'vote' or 'mean-delta'")
        if not 0 <= self.prob_floor < 1:
            raise SafeSteerError(f"prob_floor is a probability below 1 (e.g. 1e-4), got {self.prob_floor}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise SafeSteerError(f"temperature must be a positive number, got {self.temperature}")


@dataclass
class SafetyTokens:
    """The stage-2 artifact: S, most votes first, and how it was chosen.

    Attributes:
        tokens: One dict per token: ``id``, ``text``, ``votes``, ``mean_delta``.
        settings: The :class:`TokenConfig` used plus bookkeeping (positions counted, hashes).
    """

    tokens: list[dict[str, Any]]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def ids(self) -> list[int]:
        return [t["id"] for t in self.tokens]

    @property
    def texts(self) -> list[str]:
        return [t["text"] for t in self.tokens]

    def __len__(self) -> int:
        return len(self.tokens)

    def to_frame(self) -> "Any":
        """A pandas table, one row per token."""
        import pandas

        return pandas.DataFrame(self.tokens)

    def save(self, run_dir: str | Path) -> Path:
        """Write ``safety_tokens.json`` atomically."""
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        return write_text_atomic(run_dir / TOKENS_JSON, json.dumps({"tokens": self.tokens, "settings": self.settings}, indent=2))

    @classmethod
    def load(cls, run_dir: str | Path) -> "SafetyTokens":
        path = Path(run_dir) / TOKENS_JSON
        if not path.is_file():
            raise SafeSteerError(f"{run_dir} has no {TOKENS_JSON}; run `safesteer tokens --run {run_dir}` first")
        remake = f"safesteer tokens --run {run_dir}"
        data = read_json(path, remake)
        tokens = data.get("tokens") if isinstance(data, dict) else None
        if not isinstance(tokens, list) or not tokens:
            raise artifact_error(path, "holds no tokens (an empty or missing 'tokens' list)", remake)
        for number, token in enumerate(tokens):
            if not isinstance(token, dict) or not {"id", "text"} <= set(token):
                raise artifact_error(path, f"token {number} lacks 'id' or 'text'", remake)
            if not isinstance(token["id"], int) or isinstance(token["id"], bool) or token["id"] < 0:
                raise artifact_error(path, f"token {number} has id {token['id']!r}; ids are integers >= 0", remake)
        if len({t["id"] for t in tokens}) != len(tokens):
            raise artifact_error(path, "lists a token id twice", remake)
        settings = data.get("settings", {})
        return cls(tokens, settings if isinstance(settings, dict) else {})


def load_safety_tokens(run_dir: str | Path) -> SafetyTokens:
    """One-call loader for the stage-2 artifact."""
    return SafetyTokens.load(run_dir)


# --------------------------------------------------------------------- core maths
def valid_positions(
    completion_mask: Bool[Tensor, "batch horizon"],
    base_argmax: Int[Tensor, "batch horizon"],
    eot_ids: Sequence[int],
) -> Bool[Tensor, "batch horizon"]:
    """Positions that vote: real rollout tokens, until the base model's argmax ends the turn.

    From the first position where the base model would itself end the turn, the teacher's
    distribution describes text the base would never write, so those positions are dropped.
    """
    base_ends = torch.isin(base_argmax, torch.tensor(list(eot_ids), device=base_argmax.device))
    ended = torch.cumsum(base_ends.long(), dim=1) > 0
    return completion_mask & ~ended


def vote(
    delta: Float[Tensor, "position vocab"],
    top_k: int,
    allowed: Bool[Tensor, "vocab"] | None = None,
) -> Int[Tensor, "vocab"]:
    """Each row votes once for each of its ``top_k`` largest entries among ``allowed`` ids."""
    if allowed is not None:
        delta = delta.masked_fill(~allowed, float("-inf"))
    k = min(top_k, int(allowed.sum()) if allowed is not None else delta.shape[-1])
    top = delta.topk(k, dim=-1).indices
    votes = torch.zeros(delta.shape[-1], dtype=torch.long, device=delta.device)
    votes.scatter_add_(0, top.reshape(-1), torch.ones_like(top.reshape(-1)))
    return votes


def rank_tokens(
    votes: Int[Tensor, "vocab"],
    mean_delta: Float[Tensor, "vocab"],
    set_size: int,
    method: str,
    allowed: Bool[Tensor, "vocab"],
) -> list[int]:
    """The ``set_size`` best ids: most votes (ties by mean delta), or largest mean delta."""
    if method == "vote":
        order = sorted(
            (i for i in torch.nonzero((votes > 0) & allowed).flatten().tolist()),
            key=lambda i: (-int(votes[i]), -float(mean_delta[i])),
        )
        return order[:set_size]
    if method == "mean-delta":
        masked = mean_delta.masked_fill(~allowed, float("-inf"))
        k = min(set_size, int(allowed.sum()))
        return masked.topk(k).indices.tolist()
    raise SafeSteerError(f"unknown selection method {method!r}: use 'vote' or 'mean-delta'")


def opener_tokens(
    delta: Float[Tensor, "position vocab"],
    teacher_probs: Float[Tensor, "position vocab"],
    n: int,
    allowed: Bool[Tensor, "vocab"],
) -> list[int]:
    """The ``n`` allowed ids with the largest mean probability gain, teacher over base, at these positions.

    Given the first positions of the rollouts, this finds the token a refusal opens with. The
    gain is in probability, not log-probability: the votes' log-ratio favours rare tokens
    that grow from almost nothing, while the opener is a common token ("I") that the teacher
    makes the likeliest first word. Ids that the teacher makes less likely are never returned.

    Args:
        delta: Teacher minus base log-probabilities, one row per position.
        teacher_probs: The teacher's probabilities at the same positions.
        n: How many ids at most.
        allowed: Ids that may be chosen (the floor and the bans).
    """
    if n == 0 or delta.shape[0] == 0:
        return []
    gain = (teacher_probs * -torch.expm1(-delta)).mean(0).masked_fill(~allowed, float("-inf"))
    top = gain.topk(min(n, int(allowed.sum())))
    return [i for i, g in zip(top.indices.tolist(), top.values.tolist()) if g > 0]


def special_token_mask(model: ChatModel) -> Bool[Tensor, "vocab"]:
    """True for ids that are the tokenizer's special or added control tokens."""
    banned = torch.zeros(model.d_vocab, dtype=torch.bool)
    special = set(model.tokenizer.all_special_ids) | set(model.eot_token_ids)
    for token_id, added in getattr(model.tokenizer, "added_tokens_decoder", {}).items():
        if getattr(added, "special", False):
            special.add(int(token_id))
    banned[[i for i in special if i < model.d_vocab]] = True
    return banned


# --------------------------------------------------------------------- the stage
def teacher_rollouts(
    model: ChatModel,
    direction: Direction,
    prompts: Sequence[str],
    config: TokenConfig,
) -> Completions:
    """M sampled teacher continuations of length H per prompt (seeded)."""
    repeated = [p for p in prompts for _ in range(config.samples_per_prompt)]
    return generate(
        model, repeated, max_new_tokens=config.horizon, do_sample=True,
        temperature=config.temperature, seed=config.seed,
        fwd_hooks=direction.hooks(model),
        batch_size=config.batch_size,
    )


def select_safety_tokens(
    model: ChatModel,
    direction: Direction,
    config: TokenConfig | None = None,
    prompts: Sequence[str] | None = None,
    progress: bool = True,
) -> SafetyTokens:
    """Run stage 2: teacher rollouts on harmless prompts, contrastive log-probs, voting.

    Args:
        model: The base model (the teacher is this model plus the direction's hook).
        direction: The stage-1 artifact.
        config: Settings; defaults to :class:`TokenConfig`.
        prompts: Harmless prompts; default: the first ``n_prompts`` of the built-in train split.
        progress: Show a progress bar.

    Returns:
        :class:`SafetyTokens` with up to ``set_size`` tokens, most votes first.
    """
    config = config or TokenConfig()
    return safety_token_sets(model, direction, config, (config.horizon,), prompts, progress)[config.horizon]


def safety_token_sets(
    model: ChatModel,
    direction: Direction,
    config: TokenConfig,
    horizons: Sequence[int],
    prompts: Sequence[str] | None = None,
    progress: bool = True,
) -> dict[int, SafetyTokens]:
    """S at several horizons from one set of rollouts: the set at ``h`` votes over the first ``h`` positions.

    The first ``h`` tokens of an ``H``-token rollout are themselves an ``h``-token rollout, so
    one pass serves every horizon up to ``config.horizon``: S at ``config.horizon`` is what
    :func:`select_safety_tokens` returns, and S at ``h = 1`` is exactly what a separate run at
    H = 1 would choose (the first position's distributions depend only on the prompt). The
    tokens page's H = 1 comparison costs no second pass this way.

    Args:
        model: The base model.
        direction: The stage-1 artifact.
        config: Settings; each set takes them with its own ``horizon``.
        horizons: Horizons from 1 to ``config.horizon``.
        prompts: As for :func:`select_safety_tokens`.
        progress: Show a progress bar.
    """
    validate_config(config, model)
    if not horizons or not all(1 <= h <= config.horizon for h in horizons):
        raise SafeSteerError(f"horizons must lie between 1 and the rollouts' horizon {config.horizon}, got {list(horizons)}")
    if prompts is None:
        builtin = prompt_texts(load_builtin_prompts("harmless", "train"))
        if config.n_prompts > len(builtin):
            raise SafeSteerError(f"n_prompts = {config.n_prompts} but the built-in harmless train split has {len(builtin)} "
                                 f"prompts; ask for {len(builtin)} or fewer (tokens --n-prompts)")
        prompts = builtin[: config.n_prompts]
    prompts = list(prompts)
    if not prompts:
        raise SafeSteerError("no prompts to build safety tokens from; pass at least one harmless prompt")
    teacher_hooks = direction.hooks(model)
    n_rows = len(prompts) * config.samples_per_prompt
    bar = tqdm(total=n_rows, desc="safety tokens", disable=not progress)
    deltas, teacher_probs, positions, n_rollouts = [], [], [], 0
    step = max(1, config.batch_size // config.samples_per_prompt)
    for start in range(0, len(prompts), step):
        rollouts = teacher_rollouts(model, direction, prompts[start : start + step], replace(config, seed=config.seed + start))
        teacher = teacher_forced_log_probs(model, rollouts, teacher_hooks, config.batch_size)
        base = teacher_forced_log_probs(model, rollouts, (), config.batch_size)
        valid = valid_positions(rollouts.completion_mask.cpu(), base.argmax(-1), model.eot_token_ids)
        deltas.append((teacher - base)[valid])
        teacher_probs.append(teacher[valid].exp())
        positions.append(valid.nonzero()[:, 1])  # which completion position each kept row is
        n_rollouts += len(rollouts.texts)
        bar.update(len(rollouts.texts))
    bar.close()
    delta, probs, position = torch.cat(deltas), torch.cat(teacher_probs), torch.cat(positions)
    sets = {}
    for horizon in horizons:
        rows = position < horizon
        run = {"model": model.name, "n_rollouts": n_rollouts, "prompts_hash": prompts_hash(prompts),
               "direction": {"layer": direction.layer, "coeff": direction.coeff, "prompts_hash": direction.prompts_hash}}
        sets[horizon] = _vote_for_tokens(model, delta[rows], probs[rows], position[rows] == 0,
                                         replace(config, horizon=horizon), run)
    return sets


def select_with_comparison(
    model: ChatModel,
    direction: Direction,
    config: TokenConfig,
    compare_horizon: int = 1,
    progress: bool = True,
) -> tuple[SafetyTokens, SafetyTokens | None]:
    """S, and S at ``compare_horizon`` for the tokens page (None when 0 or S's own horizon).

    A comparison horizon up to S's comes from the same rollouts (:func:`safety_token_sets`);
    a longer one needs rollouts of its own.
    """
    if compare_horizon < 0:
        raise SafeSteerError(f"compare_horizon must be 0 (skip) or a horizon >= 1, got {compare_horizon}")
    if compare_horizon in (0, config.horizon):
        return select_safety_tokens(model, direction, config, progress=progress), None
    if compare_horizon < config.horizon:
        sets = safety_token_sets(model, direction, config, (config.horizon, compare_horizon), progress=progress)
        return sets[config.horizon], sets[compare_horizon]
    tokens = select_safety_tokens(model, direction, config, progress=progress)
    return tokens, select_safety_tokens(model, direction, replace(config, horizon=compare_horizon), progress=False)


def _vote_for_tokens(
    model: ChatModel,
    delta: Float[Tensor, "position vocab"],
    teacher_probs: Float[Tensor, "position vocab"],
    first: Bool[Tensor, "position"],
    config: TokenConfig,
    run: dict[str, Any],
) -> SafetyTokens:
    """S from the voting positions' log-prob shifts: the eligible tokens, the votes, the ranking.

    ``first`` marks the rows at a reply's first position (for ``config.openers``). ``run``
    describes the rollouts (model, direction, counts, prompts' hash) for the settings.
    """
    if delta.shape[0] == 0:
        raise SafeSteerError("no valid positions: every rollout ended at once; raise the horizon")
    allowed = teacher_probs.mean(0) >= config.prob_floor
    if config.ban_special:
        allowed &= ~special_token_mask(model)
    n_allowed = int(allowed.sum())
    if n_allowed == 0:
        raise SafeSteerError(f"no token passes prob_floor={config.prob_floor:g}; lower --prob-floor (e.g. 1e-4)")
    top_k = votes_per_position(config.top_k_votes, n_allowed)
    saturated = n_allowed < SATURATION_FACTOR * top_k
    if saturated and config.method == "vote":
        warnings.warn(
            f"only {n_allowed} tokens pass prob_floor={config.prob_floor:g}, and each position votes for K'={top_k} "
            f"of them, so most eligible tokens get a vote at every position and S is decided by ties; "
            f"lower --prob-floor or give --top-k as a share of the eligible tokens (e.g. 0.05)",
            SaturationWarning, stacklevel=3,
        )
    votes = vote(delta, top_k, allowed)
    mean_delta = delta.mean(0)
    chosen = rank_tokens(votes, mean_delta, config.set_size, config.method, allowed)
    openers = [i for i in opener_tokens(delta[first], teacher_probs[first], config.openers, allowed) if i not in chosen]
    tokens = [
        {"id": i, "text": model.tokenizer.decode([i]), "votes": int(votes[i]), "mean_delta": round(float(mean_delta[i]), 4),
         **({"opener": True} if i in openers else {})}
        for i in chosen + openers
    ]
    settings = {**asdict(config), "model": run["model"], "direction": run["direction"], "n_rollouts": run["n_rollouts"],
                "n_valid_positions": int(delta.shape[0]), "n_allowed": n_allowed, "top_k_votes_used": top_k,
                "saturated": saturated, "prompts_hash": run["prompts_hash"]}
    return SafetyTokens(tokens, settings)


def validate_config(config: TokenConfig, model: ChatModel) -> None:
    """Reject settings that cannot work on this model's vocabulary, before any compute."""
    if not 1 <= config.set_size <= model.d_vocab:
        raise SafeSteerError(f"set_size must be between 1 and the vocabulary size {model.d_vocab}, got {config.set_size}")
    k = config.top_k_votes
    if isinstance(k, bool) or not ((isinstance(k, int) and 1 <= k <= model.d_vocab) or (isinstance(k, float) and 0 < k < 1)):
        raise SafeSteerError(f"top_k_votes must be a count between 1 and {model.d_vocab} or a share strictly between 0 and 1 "
                             f"of the eligible tokens, got {k!r}")
    check_reply_budget(model, config.horizon)  # a horizon past the context is an error, not a run off the end

