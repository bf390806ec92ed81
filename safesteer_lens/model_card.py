"""``student/README.md``: a Hugging Face model card that says how the student was made.

The card is written with ``huggingface_hub.ModelCard``, so the hub, ``ModelCard.load`` and
any tool that reads model-card metadata see the usual fields (``base_model``, ``tags``,
``library_name``, ``model-index`` results). SafeSteer's own settings go under a ``safesteer``
key in the metadata: the loss, the teacher's direction (method, layer, coefficient), the
safety tokens S, and the training settings with the seed. Training writes the card with the
export; the pipeline's evaluation rewrites it with the results table and its intervals.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from safesteer_lens.atomic import write_text_atomic
from safesteer_lens.directions import Direction
from safesteer_lens.tokens import SafetyTokens
from safesteer_lens.steering import hook_name

CARD = "README.md"

# Where the embedded default's weights come from: a Q4_1 GGUF of this hub model.
EMBEDDED_ORIGINS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}

# The results table's rates that become model-index entries, with their metric names.
CARD_RATES = {
    "harmful_refusal": ("refusal_rate", "held-out harmful requests (built-in, request only)"),
    "harmless_refusal": ("refusal_rate", "held-out harmless requests (built-in)"),
    "harmless_degenerate": ("degenerate_rate", "held-out harmless requests (built-in)"),
    "harmful_full_refusal": ("full_refusal_rate", "held-out harmful requests (built-in, request only)"),
    "harmless_apology": ("apology_opener_rate", "held-out harmless requests (built-in)"),
    "lookalike_refusal": ("refusal_rate", "look-alike harmless requests (built-in)"),
    "lookalike_apology": ("apology_opener_rate", "look-alike harmless requests (built-in)"),
    "tasks_refusal": ("refusal_rate", "harmful requests in benchmark phrasing (built-in, request only)"),
    "mcq_acc": ("accuracy", "shipped multiple-choice questions"),
}


def base_model_id(name: str) -> str | None:
    """The hub id the card names as ``base_model``, or None for a local file or directory."""
    if name in EMBEDDED_ORIGINS:
        return EMBEDDED_ORIGINS[name]
    if "/" in name and not Path(name).exists() and not name.endswith(".gguf"):
        return name
    return None


def _results_markdown(table: Any, row: str) -> list[str]:
    """The student's and the base's rates with 95% intervals, as markdown lines."""
    from safesteer_lens.report import is_rate, rate_text

    columns = [c for c in CARD_RATES if c in table.columns and is_rate(table, c)]
    names = [n for n in ("base", row) if n in table.index]
    lines = ["| model | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    lines += [f"| {n} | " + " | ".join(rate_text(table.loc[n], c) for c in columns) + " |" for n in names]
    return lines


def build_model_card(model_name: str, config: Any, direction: Direction, tokens: SafetyTokens,
                     table: Any | None = None, row: str = "SafeSteer student", split: str = "test") -> ModelCard:
    """The student's model card.

    Args:
        model_name: The base model as the run named it (hub id, path or embedded name).
        config: The student's :class:`~safesteer_lens.distill.TrainConfig`.
        direction: The teacher's direction.
        tokens: The safety tokens S.
        table: The results table (rows ``base`` and ``row``), once evaluated.
        row: The student's row in ``table``.
        split: The built-in split the table was measured on.
    """
    settings = asdict(config)
    safesteer = {
        "loss": config.loss,
        "direction": {"method": direction.method, "layer": direction.layer, "coefficient": direction.coeff,
                      "hook": hook_name(direction.layer)},
        "safety_tokens": {"size": len(tokens), "top": tokens.texts[:20]},
        "training": settings,
        "seed": config.seed,
    }
    eval_results = []
    base_id = base_model_id(model_name)
    if table is not None and row in table.index:
        for column, (metric, dataset) in CARD_RATES.items():
            if column in table.columns:
                eval_results.append(EvalResult(
                    task_type="text-generation", dataset_type="safesteer-lens-builtin", dataset_name=dataset,
                    dataset_split=split, metric_type=metric, metric_name=column, metric_value=float(table.loc[row, column]),
                ))
    data = ModelCardData(
        base_model=base_id, library_name="transformers", pipeline_tag="text-generation",
        tags=["safesteer", "safety", "refusal", "on-policy-distillation", "steering"],
        model_name=f"SafeSteer student of {model_name}", eval_results=eval_results or None, safesteer=safesteer,
    )
    lora = f"rank-{config.lora_rank} LoRA adapters (merged into the weights)" if config.lora_rank else "every weight"
    anchor = (f" A harmless anchor (weight {config.anchor_weight:g}, loss `{config.anchor_loss}`) held it to the base "
              "model on its own replies to harmless prompts." if config.anchor_weight else "")
    body = [
        f"# SafeSteer student of {model_name}",
        "",
        "Trained with safesteer-lens (SafeSteer: localized on-policy distillation for safety "
        "alignment). The student sampled its own replies to harmful requests and was trained by the "
        f"`{config.loss}` loss to match, over {len(tokens)} safety tokens only, a teacher made by steering the frozen "
        f"base model with a {direction.method} refusal direction added at `{hook_name(direction.layer)}` "
        f"with coefficient {direction.coeff:g}. It trained {lora}.{anchor}",
        "",
        f"- Base model: {model_name}" + (f" (`{base_id}`)" if base_id and base_id != model_name else ""),
        f"- Safety tokens (top of {len(tokens)}): " + ", ".join(f"`{t!r}`" for t in tokens.texts[:20]),
        f"- Training: lr {config.lr:g}, {config.epochs} epoch(s) of {config.harmful_prompts} prompts x "
        f"{config.samples_per_prompt} rollouts of up to {config.max_new_tokens} tokens, "
        f"{config.sequences_per_step} rollouts per step, seed {config.seed}",
        "",
        "## Evaluation",
        "",
    ]
    if table is not None and row in table.index:
        body += [f"Greedy replies to held-out prompts of the built-in {split} split; rates with 95% Wilson intervals "
                 "and n. Refusal is the marker rule of `safesteer_lens.refusal`; full refusal and apology openers are its "
                 "three-class measure (`classify_reply`).", "", *_results_markdown(table, row)]
    else:
        body.append("Not evaluated yet: `safesteer evaluate` or `safesteer run` adds the results here.")
    body += ["", "## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
             "model = AutoModelForCausalLM.from_pretrained('PATH_TO_THIS_DIRECTORY')",
             "tokenizer = AutoTokenizer.from_pretrained('PATH_TO_THIS_DIRECTORY')", "```", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))


def write_model_card(student_dir: str | Path, card: ModelCard) -> Path:
    """Write ``student_dir/README.md`` atomically."""
    return write_text_atomic(Path(student_dir) / CARD, str(card))
