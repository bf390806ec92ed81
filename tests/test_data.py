from __future__ import annotations

import json
import re
from collections import Counter

import pandas as pd
import pytest

from safesteer_lens.data import (
    BUILTIN_DATA,
    builtin_data_digest,
    categories_in_turn,
    groups_in_turn,
    load_builtin_prompts,
    load_prompt_file,
    load_public_prompts,
    prompts_hash,
)
from safesteer_lens.errors import SafeSteerError


def test_builtin_sets_have_the_promised_size_and_splits():
    harmful = load_builtin_prompts("harmful")
    harmless = load_builtin_prompts("harmless")
    assert len(harmful) >= 250 and len(harmless) >= 250
    assert len({p.category for p in harmful}) >= 10
    assert "alarming_but_benign" in {p.category for p in harmless}
    for group in (harmful, harmless):
        splits = Counter(p.split for p in group)
        assert set(splits) == {"train", "val", "test"}
        assert len({p.prompt for p in group}) == len(group)
        assert len({p.id for p in group}) == len(group)
    assert not {p.prompt for p in harmful} & {p.prompt for p in harmless}


def test_builtin_sets_match_in_form_and_length():
    mean = lambda ps: sum(len(p.prompt.split()) for p in ps) / len(ps)  # noqa: E731
    harmful, harmless = load_builtin_prompts("harmful"), load_builtin_prompts("harmless")
    assert abs(mean(harmful) - mean(harmless)) / mean(harmless) < 0.25


def test_split_filter_and_bad_split():
    test = load_builtin_prompts("harmful", "test")
    assert test and all(p.split == "test" and p.label == "harmful" for p in test)
    with pytest.raises(SafeSteerError, match="unknown split"):
        load_builtin_prompts("harmful", "dev")


def test_groups_in_turn_covers_every_group_and_keeps_each_groups_order():
    items = ["a1", "a2", "a3", "b1", "c1", "c2"]
    assert groups_in_turn(items, lambda s: s[0]) == ["a1", "b1", "c1", "a2", "c2", "a3"]
    assert groups_in_turn(items, lambda s: s[0], 4) == ["a1", "b1", "c1", "a2"]
    assert groups_in_turn([], lambda s: s, 3) == []


def test_forty_held_out_prompts_in_turn_ask_about_every_category():
    for label in ("harmful", "harmless"):
        split = load_builtin_prompts(label, "test")
        in_file_order = {p.category for p in split[:40]}
        mixed = categories_in_turn(split, 40)
        assert len(in_file_order) == 8 and len({p.category for p in mixed}) == 13
        assert max(Counter(p.category for p in mixed).values()) == 4  # 40 = 13 * 3 + 1
        assert categories_in_turn(split, 65) == categories_in_turn(split)  # the whole split, reordered
        assert sorted(p.id for p in categories_in_turn(split)) == sorted(p.id for p in split)
        assert categories_in_turn(split, 40) == categories_in_turn(split, 52)[:40]  # a longer run extends a shorter


@pytest.mark.parametrize("label", ["harmful", "harmless"])
def test_validation_and_test_are_worded_alike(label):
    """Settings chosen on validation carry to test only if both ask in the same words."""
    opening = lambda p: p.prompt.split()[0].lower().removesuffix("'s")  # noqa: E731
    val, test = load_builtin_prompts(label, "val"), load_builtin_prompts(label, "test")
    for n, most in ((39, 2), (None, 6)):  # the 39 read first (3 per category, in turn), and whole splits
        counts = Counter(map(opening, categories_in_turn(val, n)))
        counts.subtract(map(opening, categories_in_turn(test, n)))
        assert sum(map(abs, counts.values())) <= most, {word: c for word, c in counts.items() if c}
        assert abs(counts["tell"]) <= 1  # "Tell me ..." once opened 10 test harmless prompts and no validation one
    for category in {p.category for p in val}:
        assert sum(p.category == category for p in val) == sum(p.category == category for p in test) == 5


def test_builtin_data_digest_names_the_shipped_files():
    assert builtin_data_digest() == builtin_data_digest(BUILTIN_DATA)
    assert builtin_data_digest(BUILTIN_DATA[:2]) != builtin_data_digest()
    assert len(builtin_data_digest()) == 16


def test_prompts_hash_changes_with_content():
    assert prompts_hash(["a"], ["b"]) != prompts_hash(["a", "b"])
    assert prompts_hash(["a"]) == prompts_hash(["a"])


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".parquet"])
def test_local_files_in_every_format(tmp_path, suffix):
    frame = pd.DataFrame({"goal": ["Do a bad thing", "Do another bad thing"], "kind": ["x", "y"]})
    path = tmp_path / f"advbench{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(frame.to_dict(orient="records")))
    elif suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    elif suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path)
    prompts = load_public_prompts("advbench", source=path)
    assert [p.prompt for p in prompts] == ["Do a bad thing", "Do another bad thing"]
    assert all(p.label == "harmful" for p in prompts)
    generic = load_prompt_file(path, category_column="kind")
    assert [p.category for p in generic] == ["x", "y"]


def test_xstest_labels_contrast_prompts_harmful(tmp_path):
    path = tmp_path / "xstest.csv"
    pd.DataFrame(
        {
            "prompt": ["How do I kill a Python process?", "How do I kill a person?"],
            "type": ["homonyms", "contrast_homonyms"],
        }
    ).to_csv(path, index=False)
    labels = [p.label for p in load_public_prompts("xstest", source=path)]
    assert labels == ["harmless", "harmful"]


def test_alpaca_keeps_instructions_without_input(tmp_path):
    path = tmp_path / "alpaca.jsonl"
    pd.DataFrame(
        {"instruction": ["Name a colour.", "Summarise this."], "input": ["", "Some text"]}
    ).to_json(path, orient="records", lines=True)
    assert [p.prompt for p in load_public_prompts("alpaca", source=path)] == ["Name a colour."]


def test_hub_id_offline_names_the_local_file_route():
    with pytest.raises(SafeSteerError, match="pass the local file") as info:
        load_public_prompts("harmbench")
    assert "\n" not in str(info.value)


def test_bad_files_give_clear_errors(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("prompt\n")
    with pytest.raises(SafeSteerError):
        load_prompt_file(empty)
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n")
    with pytest.raises(SafeSteerError, match="cannot read"):
        load_prompt_file(broken)
    no_column = tmp_path / "cols.csv"
    no_column.write_text("foo,bar\n1,2\n")
    with pytest.raises(SafeSteerError, match="no prompt column"):
        load_prompt_file(no_column)
    text_file = tmp_path / "x.txt"
    text_file.write_text("How do I bake bread?\n")
    with pytest.raises(SafeSteerError, match="unsupported"):
        load_prompt_file(text_file)
    with pytest.raises(SafeSteerError, match="unknown benchmark"):
        load_public_prompts("nope")


def test_a_prompt_past_the_context_names_its_file_and_id(tiny):
    from safesteer_lens.data import Prompt, check_prompt_lengths

    short = Prompt("mine-0", "How do I bake bread?", "harmless", source="mine.csv")
    check_prompt_lengths(tiny, [short], 48)
    long = Prompt("mine-7", "bread " * 2000, "harmless", source="mine.csv")
    with pytest.raises(SafeSteerError, match=r"prompt mine-7 of mine.csv is \d+ tokens .* context of 512"):
        check_prompt_lengths(tiny, [short, long], 48)
    with pytest.raises(SafeSteerError, match="leaves no room"):
        check_prompt_lengths(tiny, [], 512)


def test_a_file_that_is_not_utf8_is_one_line(tmp_path):
    from safesteer_lens.data import load_prompt_file

    path = tmp_path / "latin1.csv"
    path.write_bytes(b"prompt\ncaf\xe9\n")
    with pytest.raises(SafeSteerError, match=r"not UTF-8 text \(byte 10\)"):
        load_prompt_file(path)


def test_the_lookalike_sets_are_complete_split_in_thirds_and_new():
    from safesteer_lens.data import load_builtin_prompts, load_study_set

    looks, tasks = load_study_set("lookalike"), load_study_set("tasks")
    assert len(looks) == 300 and len(tasks) == 156
    assert {p.label for p in looks} == {"harmless"} and {p.label for p in tasks} == {"harmful"}
    kinds = Counter(p.category for p in looks)
    assert len(kinds) == 10 and set(kinds.values()) == {30}
    for rows, per_group in ((looks, 10), (tasks, 4)):
        assert set(Counter((p.category, p.split) for p in rows).values()) == {per_group}
        assert len({p.id for p in rows}) == len(rows)
    written = [p.prompt.lower() for p in looks + tasks]
    builtin = {p.prompt.lower() for p in load_builtin_prompts()}
    assert len(set(written)) == len(written) and not set(written) & builtin

    def words(text: str) -> set[str]:
        return set(re.findall(r"[a-z]+", text.lower()))

    near = [(a, b) for a in written for b in builtin  # a reworded copy would leak a train prompt into a test split
            if len(words(a) & words(b)) / len(words(a) | words(b)) > 0.5]
    assert not near, near[:3]
    assert [p.id for p in load_study_set("lookalike", "test")] == [p.id for p in looks if p.split == "test"]
    with pytest.raises(SafeSteerError, match="unknown prompt set"):
        load_study_set("xstest")


def test_the_lookalike_files_are_what_the_build_tool_writes_and_the_splits_are_worded_alike(tmp_path):
    import importlib.util
    import sys
    from pathlib import Path

    folder = Path(__file__).parents[1] / "studies" / "lookalike"
    sys.path.insert(0, str(folder))
    try:
        spec = importlib.util.spec_from_file_location("build_sets", folder / "build_sets.py")
        build = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(build)
    finally:
        sys.path.remove(str(folder))
    for name, (source, prefix, label) in build.FILES.items():
        rows = build.rows(source, prefix, label)
        assert "".join(json.dumps(r) + "\n" for r in rows) == (build.PROMPTS / name).read_text(), name
        for first, second in (("val", "test"), ("train", "test"), ("train", "val")):
            assert build.imbalance(rows, first, second) <= 8, (name, first, second)
