"""Prompt sets: the project's own harmful/harmless requests and loaders for public benchmarks.

Everything becomes a list of :class:`Prompt` (one schema), so direction discovery, token
selection, training and evaluation never care where prompts came from.

The built-in sets (``safesteer_lens/prompts/*.jsonl``) were written for this project: 260
harmful requests in 13 harm categories and 260 harmless requests of matching form and length,
20 of them benign requests that only sound alarming ("How do I kill a stuck Python
process?"). They hold requests only, never answers. Splits are fixed in the files (per
category: 10 train, 5 validation, 5 test).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Iterable, Literal, Sequence, TypeVar

from safesteer_lens.errors import SafeSteerError, first_line

Label = Literal["harmful", "harmless"]
Split = Literal["train", "val", "test"]
SPLITS: tuple[str, ...] = ("train", "val", "test")
LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
T = TypeVar("T")


@dataclass(frozen=True)
class Prompt:
    """One user request.

    Attributes:
        id: Stable identifier (``harmful-0001``, ``advbench-17``...).
        prompt: The request text.
        label: ``"harmful"`` (a safe assistant refuses) or ``"harmless"``.
        category: Harm or topic category; ``"unknown"`` when the source has none.
        split: ``"train"``, ``"val"`` or ``"test"``.
        source: Where it came from (``builtin``, ``advbench``, a file name...).
    """

    id: str
    prompt: str
    label: str
    category: str = "unknown"
    split: str = "test"
    source: str = "builtin"


def load_builtin_prompts(label: Label | None = None, split: Split | None = None) -> list[Prompt]:
    """The project's own prompts, optionally filtered by label and split.

    Args:
        label: ``"harmful"``, ``"harmless"`` or None for both.
        split: ``"train"``, ``"val"``, ``"test"`` or None for all.
    """
    if label not in (None, "harmful", "harmless"):
        raise SafeSteerError(f"unknown label {label!r}: use 'harmful' or 'harmless'")
    if split not in (None, *SPLITS):
        raise SafeSteerError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    labels = [label] if label else ["harmful", "harmless"]
    out: list[Prompt] = []
    for name in labels:
        text = resources.files("safesteer_lens").joinpath(f"prompts/{name}.jsonl").read_text()
        for line in text.splitlines():
            row = json.loads(line)
            if split is None or row["split"] == split:
                out.append(Prompt(row["id"], row["prompt"], name, row["category"], row["split"]))
    return out


# Sets the project wrote for the look-alike study, beside the harmful/harmless sets: each row
# carries its own label, a category (the kind of trap, or the harm) and a split of its own.
STUDY_SETS: dict[str, str] = {"lookalike": "lookalike.jsonl", "tasks": "harmful_tasks.jsonl"}


def load_study_set(name: str, split: Split | None = None) -> list[Prompt]:
    """A look-alike study set, optionally one split of it.

    Args:
        name: ``"lookalike"`` (300 harmless requests that borrow a harmful request's words, in
            ten kinds of trap after XSTest's: homonyms, figurative language, safe targets, safe
            contexts, definitions, history, public figures' public facts, fictional characters'
            "private" facts, nonsense questions about groups, and twins of harmful requests) or
            ``"tasks"`` (156 harmful requests phrased as public benchmarks phrase them:
            imperative tasks, role-play, hypothetical and fictional framings; 12 per harm
            category). Each kind or category is split in equal thirds, worded alike
            (``studies/lookalike/build_sets.py``).
        split: ``"train"``, ``"val"``, ``"test"`` or None for all.
    """
    if name not in STUDY_SETS:
        raise SafeSteerError(f"unknown prompt set {name!r}: use one of {', '.join(STUDY_SETS)}")
    if split not in (None, *SPLITS):
        raise SafeSteerError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    text = resources.files("safesteer_lens").joinpath(f"prompts/{STUDY_SETS[name]}").read_text()
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [Prompt(r["id"], r["prompt"], r["label"], r["category"], r["split"], name)
            for r in rows if split is None or r["split"] == split]


def groups_in_turn(items: Sequence[T], key: Callable[[T], str], n: int | None = None) -> list[T]:
    """The first ``n`` items taking their groups in turn (first group's first item, second's, ...).

    The built-in files hold each category's prompts together, so their first ``n`` cover only
    the first few categories: 40 of 65 held-out prompts would never ask about five of the 13.
    Taking groups in turn makes a short selection cover every group, while each group keeps
    its own order (so a longer selection extends a shorter one).

    Args:
        items: In file order.
        key: An item's group (a prompt's category, a question's subject).
        n: How many to keep; None keeps all, reordered.
    """
    groups: dict[str, list[T]] = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    out = [g[i] for i in range(max(map(len, groups.values()), default=0)) for g in groups.values() if i < len(g)]
    return out[:n] if n is not None else out


def categories_in_turn(prompts: Sequence[Prompt], n: int | None = None) -> list[Prompt]:
    """The first ``n`` prompts taking categories in turn (see :func:`groups_in_turn`)."""
    return groups_in_turn(prompts, lambda p: p.category, n)


def first_prompts(prompts: Sequence[Prompt], n: int, in_turn: bool) -> list[Prompt]:
    """The first ``n`` prompts, categories in turn or in the file's order (the configs' ``mix_categories``)."""
    return categories_in_turn(prompts, n) if in_turn else list(prompts[:n])


def prompt_texts(prompts: Iterable[Prompt]) -> list[str]:
    """Just the request strings."""
    return [p.prompt for p in prompts]


def prompts_hash(*groups: Sequence[str]) -> str:
    """A short SHA-256 of prompt lists, stored in artifacts to tell whether inputs changed."""
    digest = hashlib.sha256()
    for group in groups:
        digest.update(json.dumps(list(group)).encode())
        digest.update(b"\x00")
    return digest.hexdigest()[:16]


BUILTIN_DATA = ("harmful.jsonl", "harmless.jsonl", "mcq.jsonl", "general_text.txt")
EVALUATION_DATA = (*BUILTIN_DATA, "lookalike.jsonl", "harmful_tasks.jsonl")  # what an evaluation may read


def builtin_data_digest(names: Sequence[str] = BUILTIN_DATA) -> str:
    """A short SHA-256 of the shipped prompt, question and text files.

    The pipeline's stage keys include it: a run directory made before the shipped data changed
    (a re-split, a prompt mended) finds its direction stale instead of mixing old and new splits.
    """
    digest = hashlib.sha256()
    for name in names:
        digest.update(name.encode() + b"\x00")
        digest.update(resources.files("safesteer_lens").joinpath(f"prompts/{name}").read_bytes())
    return digest.hexdigest()[:16]


# --------------------------------------------------------------- local files
def load_prompt_file(
    path: str | Path,
    label: Label = "harmful",
    prompt_column: str | None = None,
    category_column: str | None = None,
) -> list[Prompt]:
    """Read prompts from a json, jsonl, csv or parquet file through ``datasets``.

    Args:
        path: The file.
        label: Label for every row (files of requests to refuse are ``"harmful"``).
        prompt_column: Column with the request; default: the first of ``prompt``,
            ``instruction``, ``goal``, ``behavior``, ``text`` that exists (any case).
        category_column: Optional column with a category.

    Returns:
        The prompts. A ``split`` column with ``train``/``val``/``test`` values is kept;
        otherwise every prompt is in ``"test"`` (outside data is for evaluation).
    """
    rows = read_rows(Path(path))
    column = prompt_column or _find_column(rows, ("prompt", "instruction", "goal", "behavior", "text"))
    if column is None or column not in rows[0]:
        raise SafeSteerError(
            f"{path} has no prompt column (columns: {', '.join(rows[0])}); pass prompt_column="
        )
    out = []
    for i, row in enumerate(rows):
        text = row.get(column)
        if not isinstance(text, str) or not text.strip():
            continue
        category = str(row.get(category_column, "unknown")) if category_column else "unknown"
        split = str(row.get("split", "test"))
        out.append(
            Prompt(f"{Path(path).stem}-{i}", text.strip(), label, category, split if split in SPLITS else "test", Path(path).name)
        )
    if not out:
        raise SafeSteerError(f"{path} has no non-empty prompts in column {column!r}")
    return out


def prompts_from_texts(texts: Sequence[str], source: str) -> list[Prompt]:
    """Plain request strings as :class:`Prompt` rows from ``source`` (for messages that name where a prompt came from)."""
    return [Prompt(f"{source}-{i}", text, "harmless", source=source) for i, text in enumerate(texts)]


def check_reply_budget(model: "ChatModel", max_new_tokens: int) -> None:  # noqa: F821
    """Fail in one line when a reply budget is not a count or leaves no room for a prompt in the model's context."""
    if max_new_tokens < 1:
        raise SafeSteerError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    limit = model.context_length
    if limit is not None and max_new_tokens >= limit:
        raise SafeSteerError(f"max_new_tokens = {max_new_tokens} leaves no room for a prompt in {model.name}'s context "
                             f"of {limit} tokens; ask for fewer (--max-new-tokens)")


def check_prompt_lengths(model: "ChatModel", prompts: Sequence[Prompt], max_new_tokens: int,  # noqa: F821
                         where: str | Path | None = None) -> None:
    """Fail in one line, naming the prompt's file and row, when a prompt and its reply exceed the model's context.

    One very long prompt in a benchmark file would otherwise be batched with the rest and
    take the whole batch to its length, which is how a 50,000-character prompt exhausts
    memory; a reply budget past the context would run the model where it was never trained.

    Args:
        model: The model that will read the prompts.
        prompts: As loaded (their ``source`` and ``id`` name the file and row).
        max_new_tokens: The reply budget after each prompt.
        where: The file the prompts were read from, for the message (default: their ``source``).
    """
    check_reply_budget(model, max_new_tokens)
    limit = model.context_length
    if limit is None:
        return
    budget = limit - max_new_tokens
    for prompt in prompts:
        if len(prompt.prompt) <= budget:  # a token holds at least one character: short prompts need no tokenizer
            continue
        n_tokens = len(model.tokenizer(model.format_chat(prompt.prompt), add_special_tokens=False)["input_ids"])
        if n_tokens > budget:
            raise SafeSteerError(f"prompt {prompt.id} of {where or prompt.source} is {n_tokens} tokens with its "
                                 f"chat template; with {max_new_tokens} reply tokens that exceeds {model.name}'s context of "
                                 f"{limit}; shorten or remove it")


def split_by_position(prompts: Sequence[Prompt]) -> dict[str, list[str]]:
    """Prompt texts per split: the file's own splits when it has all three, else 3:1:1 by position.

    Direction discovery needs train, validation and test prompts; a user's file often has no
    split column, so every fifth prompt goes to validation and the next to test.
    """
    own = {s: [p.prompt for p in prompts if p.split == s] for s in SPLITS}
    if all(own.values()):
        return own
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    for i, p in enumerate(prompts):
        out["val" if i % 5 == 3 else "test" if i % 5 == 4 else "train"].append(p.prompt)
    if not all(out.values()):
        raise SafeSteerError(f"need at least 5 prompts to make train/val/test splits, got {len(prompts)}")
    return out


def read_rows(path: Path) -> list[dict]:
    """The rows of a local json/jsonl/csv/parquet file, read through ``datasets`` without its progress bar."""
    if not path.is_file():
        raise SafeSteerError(f"no such file: {path}")
    if path.stat().st_size == 0:
        raise SafeSteerError(f"{path} is empty; it needs at least one row")
    fmt = LOCAL_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise SafeSteerError(
            f"unsupported prompt file {path.name}: use .json, .jsonl, .csv or .parquet"
        )
    if fmt in ("json", "csv"):
        try:
            path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SafeSteerError(f"{path} is not UTF-8 text (byte {exc.start}); save it as UTF-8 and try again") from exc
    import datasets

    shown = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        dataset = datasets.load_dataset(fmt, data_files=str(path), split="train")
    except Exception as exc:  # datasets raises many types for unreadable files
        reason = first_line(exc, None)
        raise SafeSteerError(f"cannot read {path} as {fmt}: {reason}") from exc
    finally:
        if shown:
            datasets.enable_progress_bars()
    rows = dataset.to_list()
    if not rows:
        raise SafeSteerError(f"{path} is empty; it needs at least one row")
    return rows


def _find_column(rows: list[dict], candidates: Sequence[str]) -> str | None:
    by_lower = {key.lower(): key for key in rows[0]}
    for name in candidates:
        if name in by_lower:
            return by_lower[name]
    return None


# --------------------------------------------------------------- public sets
@dataclass(frozen=True)
class PublicSet:
    """How one public benchmark maps onto :class:`Prompt`."""

    hub_id: str
    hub_config: str | None
    hub_split: str
    prompt_columns: tuple[str, ...]
    category_columns: tuple[str, ...]
    label: Label


PUBLIC_SETS: dict[str, PublicSet] = {
    "advbench": PublicSet("walledai/AdvBench", None, "train", ("prompt", "goal"), (), "harmful"),
    "harmbench": PublicSet(
        "walledai/HarmBench", "standard", "train", ("prompt", "behavior"),
        ("category", "semanticcategory"), "harmful",
    ),
    "jailbreakbench": PublicSet(
        "JailbreakBench/JBB-Behaviors", "behaviors", "harmful", ("goal", "prompt"),
        ("category",), "harmful",
    ),
    "xstest": PublicSet("walledai/XSTest", None, "test", ("prompt",), ("type", "focus"), "harmless"),
    "alpaca": PublicSet("tatsu-lab/alpaca", None, "train", ("instruction",), (), "harmless"),
    "pku-saferlhf": PublicSet(
        "PKU-Alignment/PKU-SafeRLHF", None, "test", ("prompt",), (), "harmful"
    ),
}


def load_public_prompts(name: str, source: str | Path | None = None, limit: int | None = None) -> list[Prompt]:
    """Load a public benchmark by hub id (default) or from a local file, as :class:`Prompt`.

    Args:
        name: One of ``advbench``, ``harmbench``, ``jailbreakbench``, ``xstest``, ``alpaca``,
            ``pku-saferlhf``.
        source: A local json/jsonl/csv/parquet file, or a hub id overriding the default one.
            None uses the default hub id (needs network).
        limit: Keep at most this many prompts (first rows).

    Returns:
        Prompts labelled per the benchmark. XSTest rows whose ``label``/``type`` marks them
        unsafe (the "contrast" prompts) become ``harmful``; the rest ``harmless``. Alpaca
        keeps only instructions without an extra ``input``.
    """
    key = name.lower()
    if key not in PUBLIC_SETS:
        raise SafeSteerError(f"unknown benchmark {name!r}: use one of {', '.join(PUBLIC_SETS)}")
    spec = PUBLIC_SETS[key]
    if source is not None and Path(source).suffix.lower() in LOCAL_FORMATS:
        rows = read_rows(Path(source))
    else:
        rows = read_hub_rows(str(source) if source else spec.hub_id, spec.hub_config, spec.hub_split, key,
                             f"load_public_prompts({key!r}, source='file.csv|jsonl|json|parquet')")
    prompt_col = _find_column(rows, spec.prompt_columns)
    if prompt_col is None:
        raise SafeSteerError(
            f"{name} data has no prompt column (looked for {', '.join(spec.prompt_columns)}; "
            f"found {', '.join(rows[0])})"
        )
    category_col = _find_column(rows, spec.category_columns)
    out: list[Prompt] = []
    for i, row in enumerate(rows):
        text = row.get(prompt_col)
        if not isinstance(text, str) or not text.strip():
            continue
        if key == "alpaca" and str(row.get("input") or "").strip():
            continue
        label = spec.label
        if key == "xstest":
            marker = f"{row.get('label', '')} {row.get('type', '')}".lower()
            label = "harmful" if ("unsafe" in marker or "contrast" in marker) else "harmless"
        category = str(row[category_col]) if category_col else "unknown"
        out.append(Prompt(f"{key}-{i}", text.strip(), label, category, "test", key))
        if limit is not None and len(out) >= limit:
            break
    return out


def read_hub_rows(hub_id: str, config: str | None, split: str, name: str, hint: str) -> list[dict]:
    """The rows of one split of a hub dataset, or a one-line error that says to pass a local file.

    Args:
        hub_id: The dataset's hub id.
        config: Its configuration name, if any.
        split: Which split.
        name: The set's name, for the message.
        hint: How to pass a local copy instead (the end of the message).
    """
    from datasets import load_dataset

    try:
        dataset = load_dataset(hub_id, config, split=split)
    except Exception as exc:  # offline, gated, renamed: all end the same way for the user
        first = first_line(exc, None)
        raise SafeSteerError(
            f"could not fetch {name} from the hub ({hub_id}: {first}); download it elsewhere and pass the local file: {hint}"
        ) from exc
    return dataset.to_list()


def prompts_to_frame(prompts: Sequence[Prompt]) -> "pandas.DataFrame":  # noqa: F821
    """A pandas table of prompts, for notebooks."""
    import pandas

    return pandas.DataFrame([asdict(p) for p in prompts])
