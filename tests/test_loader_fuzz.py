"""Fuzz every loader of a file someone else may have written: it returns, or raises SafeSteerError, nothing else.

Hand-picked damage (tests/test_bad_input.py) covers what we thought of; Hypothesis generates the
rest: JSON of any shape where an artifact expects a schema, tensors of any dtype and shape,
checkpoint dicts with missing and mistyped entries, control vectors with odd tensors and
metadata, grid and prompt files of arbitrary text and bytes. A loader that lets a ``KeyError``,
``TypeError`` or a library's own exception through would show the user a traceback.

The example counts are fixed (``derandomize``: the same examples on every run) and small enough
for the suite's time budget; ``pytest --hypothesis-show-statistics`` prints how many ran.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from safesteer_lens.errors import SafeSteerError

FUZZ = settings(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))

json_scalars = st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=True) | st.text(max_size=12)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


def field_dicts(fields: dict[str, st.SearchStrategy]) -> st.SearchStrategy[dict[str, Any]]:
    """Dicts holding a random subset of an artifact's fields, each well-formed or any JSON at all, plus stray keys."""
    entries = {name: strategy | json_values for name, strategy in fields.items()}
    return st.fixed_dictionaries({}, optional=entries).flatmap(
        lambda known: st.dictionaries(st.text(max_size=6), json_values, max_size=2).map(lambda extra: {**extra, **known}))


@st.composite
def mutated(draw: st.DrawFn, valid: dict[str, Any], fields: dict[str, st.SearchStrategy]) -> dict[str, Any]:
    """A well-formed artifact with one to three fields dropped or replaced (well-formed, odd, or any value).

    Random dicts rarely get past a loader's first check; a valid one with a few fields broken
    reaches every later check, one at a time.
    """
    out = dict(valid)
    for key in draw(st.lists(st.sampled_from(sorted(set(valid) | set(fields))), min_size=1, max_size=3, unique=True)):
        if draw(st.booleans()):
            out.pop(key, None)
        else:
            out[key] = draw(fields.get(key, json_values) | json_values)
    return out


def only_our_error(load: Callable[[], Any]) -> Any:
    """Call a loader: its result, or None when it raised SafeSteerError (anything else fails the test)."""
    try:
        return load()
    except SafeSteerError as exc:
        assert "\n" not in str(exc), f"a multi-line message: {exc!r}"
        return None


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One directory the examples overwrite in turn (Hypothesis runs them one after another)."""
    return tmp_path_factory.mktemp("fuzz")


def _clear(folder: Path) -> Path:
    for path in folder.iterdir():
        path.unlink()
    return folder


# ---------------------------------------------------------------- direction.json + direction.safetensors
DIRECTION_FIELDS = {"model": st.text(max_size=10), "method": st.sampled_from(["diff-means", "contrastive"]),
                    "layer": st.integers(-3, 40), "position": st.integers(-5, 2), "coeff": st.floats(),
                    "d_model": st.integers(0, 80), "norm": st.floats(), "scores": json_values, "settings": json_values}
VALID_DIRECTION = {"model": "tiny", "method": "diff-means", "layer": 2, "position": -1, "coeff": 1.0, "d_model": 64}
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int64, torch.bool, torch.uint8]


@st.composite
def tensors(draw: st.DrawFn, max_dims: int = 3) -> torch.Tensor:
    """Any small tensor: any dtype, 0-3 dimensions, zeros, NaN and infinities among the values."""
    shape = draw(st.lists(st.integers(0, 70), max_size=max_dims))
    fill = draw(st.sampled_from([0.0, 1.0, -2.5, float("nan"), float("inf"), 3e38]))
    dtype = draw(st.sampled_from(DTYPES))
    values = torch.full(shape, fill) if draw(st.booleans()) else torch.randn(shape) * fill
    return values.nan_to_num().to(dtype) if not dtype.is_floating_point else values.to(dtype)


@settings(FUZZ, max_examples=150)
@given(meta=mutated(VALID_DIRECTION, DIRECTION_FIELDS) | field_dicts(DIRECTION_FIELDS) | json_values,
       vector=st.just(torch.ones(64)) | tensors(), name=st.sampled_from(["direction", "direction", "other"]))
def test_fuzz_direction(folder: Path, meta: Any, vector: torch.Tensor, name: str) -> None:
    from safetensors.torch import save_file

    from safesteer_lens.directions import load_direction

    run = _clear(folder)
    (run / "direction.json").write_text(json.dumps(meta))
    save_file({name: vector.contiguous()}, str(run / "direction.safetensors"))
    direction = only_our_error(lambda: load_direction(run))
    if direction is not None:  # a loaded direction can always be checked against a model's shape, in one line or silently
        only_our_error(lambda: direction.check_fits(4, 64, "tiny"))


@settings(FUZZ, max_examples=60)
@given(raw=st.binary(max_size=300), json_bytes=st.binary(max_size=80))
def test_fuzz_direction_bytes(folder: Path, raw: bytes, json_bytes: bytes) -> None:
    from safesteer_lens.directions import load_direction

    run = _clear(folder)
    (run / "direction.json").write_bytes(json_bytes)
    (run / "direction.safetensors").write_bytes(raw)
    only_our_error(lambda: load_direction(run))


# ---------------------------------------------------------------- safety_tokens.json
TOKEN_FIELDS = {"id": st.integers(-5, 600), "text": st.text(max_size=5), "votes": st.integers(0, 9), "mean_delta": st.floats()}


@settings(FUZZ, max_examples=150)
@given(data=st.fixed_dictionaries({}, optional={"tokens": st.lists(
    mutated({"id": 3, "text": "a", "votes": 1, "mean_delta": 0.1}, TOKEN_FIELDS) | field_dicts(TOKEN_FIELDS) | json_values,
    max_size=5), "settings": json_values}) | json_values)
def test_fuzz_safety_tokens(folder: Path, data: Any) -> None:
    from safesteer_lens.tokens import load_safety_tokens

    run = _clear(folder)
    (run / "safety_tokens.json").write_text(json.dumps(data))
    tokens = only_our_error(lambda: load_safety_tokens(run))
    if tokens is not None:
        assert all(isinstance(i, int) and i >= 0 for i in tokens.ids)


# ---------------------------------------------------------------- metrics.jsonl
@settings(FUZZ, max_examples=100)
@given(lines=st.lists(st.text(max_size=30) | json_values.map(json.dumps), max_size=6), raw=st.binary(max_size=40))
def test_fuzz_metrics(folder: Path, lines: list[str], raw: bytes) -> None:
    from safesteer_lens.checkpoints import read_metrics

    run = _clear(folder)
    (run / "metrics.jsonl").write_bytes("\n".join(lines).encode("utf-8", "surrogatepass") + raw)
    rows = only_our_error(lambda: read_metrics(run / "metrics.jsonl"))
    if rows is not None:
        assert all(isinstance(row, dict) for row in rows)


# ---------------------------------------------------------------- checkpoint.pt
plain = st.none() | st.booleans() | st.integers(-2**31, 2**62) | st.floats() | st.text(max_size=6)
CHECKPOINT_FIELDS = {
    "format": st.sampled_from([2, 1, "2"]), "step": st.integers(-3, 10**6),
    "student": st.dictionaries(st.text(max_size=6) | st.integers(), tensors(2) | plain, max_size=3),
    "optimizer": st.dictionaries(st.text(max_size=6), plain, max_size=3),
    "scheduler": st.dictionaries(st.text(max_size=6), plain, max_size=3),
    "config": st.dictionaries(st.text(max_size=8) | st.integers(), plain, max_size=4), "matmul_dtype": plain,
}


VALID_CHECKPOINT = {"format": 2, "step": 1, "student": {"w": torch.zeros(2)}, "optimizer": {}, "scheduler": {},
                    "config": {}, "matmul_dtype": "float32"}


@settings(FUZZ, max_examples=120)
@given(state=mutated(VALID_CHECKPOINT, CHECKPOINT_FIELDS) | st.fixed_dictionaries(
    {}, optional={k: v | plain for k, v in CHECKPOINT_FIELDS.items()}) | plain)
def test_fuzz_checkpoint(folder: Path, state: Any) -> None:
    from safesteer_lens.checkpoints import load_checkpoint
    from safesteer_lens.distill import TrainConfig, _check_resumable

    run = _clear(folder)
    torch.save(state, run / "checkpoint.pt")
    loaded = only_our_error(lambda: load_checkpoint(run))
    if loaded is not None:  # what resuming checks next
        only_our_error(lambda: _check_resumable(loaded, TrainConfig(), torch.float32))


@settings(FUZZ, max_examples=40)
@given(raw=st.binary(max_size=400))
def test_fuzz_checkpoint_bytes(folder: Path, raw: bytes) -> None:
    from safesteer_lens.checkpoints import load_checkpoint

    run = _clear(folder)
    (run / "checkpoint.pt").write_bytes(raw)
    only_our_error(lambda: load_checkpoint(run))


# ---------------------------------------------------------------- control vectors (GGUF)
gguf_values = (st.text(max_size=8).map(lambda v: ("string", v)) | st.integers(0, 2**31).map(lambda v: ("uint32", v))
               | st.floats(width=32).map(lambda v: ("float32", v)) | st.booleans().map(lambda v: ("bool", v)))
tensor_names = st.sampled_from(["direction.0", "direction.1", "direction.2", "direction.999", "direction.x", "other"])


@settings(FUZZ, max_examples=80)
@given(arch=st.sampled_from(["controlvector", "llama", ""]), fields=st.dictionaries(
    st.sampled_from(["safesteer.layer", "safesteer.coeff", "safesteer.method", "controlvector.model_hint", "x.y"]),
    gguf_values, max_size=4), vectors=st.dictionaries(tensor_names, tensors(2).filter(lambda t: t.numel() > 0), max_size=3),
    layer=st.none() | st.integers(-1, 5))
def test_fuzz_control_vector(folder: Path, arch: str, fields: dict[str, tuple[str, Any]], vectors: dict[str, torch.Tensor],
                             layer: int | None) -> None:
    import gguf

    from safesteer_lens.control_vectors import load_control_vector

    path = _clear(folder) / "cv.gguf"
    writer = gguf.GGUFWriter(str(path), arch)
    for key, (kind, value) in fields.items():
        getattr(writer, f"add_{kind}")(key, value)
    for name, values in vectors.items():
        writer.add_tensor(name, values.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    direction = only_our_error(lambda: load_control_vector(path, layer))
    if direction is not None:
        only_our_error(lambda: direction.check_fits(4, 64, "tiny"))


@settings(FUZZ, max_examples=40)
@given(raw=st.binary(max_size=200))
def test_fuzz_control_vector_bytes(folder: Path, raw: bytes) -> None:
    from safesteer_lens.control_vectors import load_control_vector

    path = _clear(folder) / "cv.gguf"
    path.write_bytes(b"GGUF" + raw)
    only_our_error(lambda: load_control_vector(path))


# ---------------------------------------------------------------- sweep grids
@settings(FUZZ, max_examples=150)
@given(grid=st.dictionaries(st.sampled_from(["lr", "seed", "loss", "lora_targets", "anchor_weight", "mix_categories",
                                             "epochs", "nope", "max-new-tokens"]), json_values, max_size=3) | json_values,
       raw=st.none() | st.binary(max_size=60))
def test_fuzz_grid_file(folder: Path, grid: Any, raw: bytes | None) -> None:
    from safesteer_lens.distill import TrainConfig
    from safesteer_lens.sweep import load_grid_file, trials

    path = _clear(folder) / "grid.json"
    path.write_bytes(raw if raw is not None else json.dumps(grid).encode())
    parsed = only_our_error(lambda: load_grid_file(path))
    if parsed is not None:
        for trial in trials(parsed):
            assert "/" not in trial.dir_name and trial.dir_name not in (".", "..")
            only_our_error(lambda: trial.config(TrainConfig()))


@settings(FUZZ, max_examples=150)
@given(specs=st.lists(st.text(max_size=24), max_size=3))
def test_fuzz_grid_flags(specs: list[str]) -> None:
    from safesteer_lens.sweep import parse_grid, trials

    grid = only_our_error(lambda: parse_grid(specs))
    if grid is not None:
        assert all(Path(t.dir_name).name == t.dir_name for t in trials(grid))


# ---------------------------------------------------------------- prompt files (read through `datasets`, so fewer examples)
@settings(FUZZ, max_examples=25)
@given(suffix=st.sampled_from([".jsonl", ".csv", ".json"]),
       body=st.lists(st.dictionaries(st.sampled_from(["prompt", "text", "goal", "split", "x"]), json_scalars, max_size=3)
                     .map(json.dumps) | st.text(max_size=20), max_size=4),
       raw=st.binary(max_size=12))
def test_fuzz_prompt_file(folder: Path, suffix: str, body: list[str], raw: bytes) -> None:
    from safesteer_lens.data import load_prompt_file

    path = _clear(folder) / f"prompts{suffix}"
    path.write_bytes("\n".join(body).encode("utf-8", "surrogatepass") + raw)
    prompts = only_our_error(lambda: load_prompt_file(path))
    if prompts is not None:
        assert prompts and all(isinstance(p.prompt, str) and p.prompt for p in prompts)
