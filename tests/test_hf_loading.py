"""Loading from Hugging Face files never runs code that ships with them."""

from __future__ import annotations

import json
import shutil

import pytest

from safesteer_lens.errors import SafeSteerError
from safesteer_lens.hf_loading import from_pretrained, refuse_custom_code


@pytest.mark.parametrize("config, entry", [
    ("config.json", {"auto_map": {"AutoModelForCausalLM": "modeling_x.X"}}),
    ("tokenizer_config.json", {"auto_map": {"AutoTokenizer": ["tok.T", None]}}),
])
def test_a_folder_that_names_custom_code_is_refused_naming_the_field(tiny_dir, tmp_path, config, entry):
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    data = json.loads((model / config).read_text())
    (model / config).write_text(json.dumps({**data, **entry}))
    with pytest.raises(SafeSteerError, match=r"config.json names custom code under 'auto_map'") as info:
        refuse_custom_code(model)
    assert "\n" not in str(info.value)


def test_a_plain_folder_and_a_hub_id_pass_and_the_loader_is_told_not_to_trust_code(tiny_dir):
    refuse_custom_code(tiny_dir)
    refuse_custom_code("some-owner/some-model")  # not a folder here: left to the loader, which gets the flag
    calls = []
    assert from_pretrained(lambda source, **kwargs: calls.append((source, kwargs)) or "loaded", str(tiny_dir), dtype="x") == "loaded"
    assert calls == [(str(tiny_dir), {"trust_remote_code": False, "dtype": "x"})]
    with pytest.raises(TypeError, match="never trusts remote code"):
        from_pretrained(lambda source, **kwargs: None, str(tiny_dir), trust_remote_code=True)


def test_transformers_own_refusal_of_remote_code_becomes_one_line(tmp_path):
    def load(source, **kwargs):
        raise ValueError("The repository x contains custom code which must be executed.\nPlease pass the argument "
                         "`trust_remote_code=True` to allow custom code to be run.")

    with pytest.raises(SafeSteerError, match="needs custom code to load"):
        from_pretrained(load, "owner/model")
