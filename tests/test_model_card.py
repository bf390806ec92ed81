"""The student's model card: a Hugging Face card that says how the student was made and how it did."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import ModelCard

from safesteer_lens.distill import TrainConfig, train
from safesteer_lens.model_card import base_model_id

TINY = TrainConfig(n_prompts=2, samples_per_prompt=2, max_new_tokens=3, sequences_per_step=4, micro_batch=2, lr=1e-3,
                   seed=7)


def test_training_writes_a_card_with_method_direction_tokens_and_settings(tiny, run_dir):
    train(run_dir, TINY, teacher=tiny, progress=False)
    card = ModelCard.load(run_dir / "student" / "README.md")
    meta = card.data.to_dict()["safesteer"]
    assert meta["loss"] == "safesteer" and meta["seed"] == 7
    assert meta["direction"] == {"method": "diff-means", "layer": 2, "coefficient": 1.0, "hook": "blocks.2.hook_resid_pre"}
    assert meta["safety_tokens"]["size"] == 40 and len(meta["safety_tokens"]["top"]) == 20
    assert meta["training"]["lr"] == 1e-3 and meta["training"]["n_prompts"] == 2
    assert "safesteer" in card.data.tags and card.data.library_name == "transformers"
    assert card.data.base_model is None  # a local directory is no hub id
    assert "Not evaluated yet" in card.text


def test_a_finished_run_cards_each_student_with_its_results_and_intervals(finished_run: Path):
    import pandas

    table = pandas.read_csv(finished_run / "results.csv", index_col="model")
    for directory, label in (("student", "SafeSteer student"), ("ablation-bounded/student", "bounded-loss student (no anchor)")):
        card = ModelCard.load(finished_run / directory / "README.md")
        results = {r.metric_name: r.metric_value for r in card.data.eval_results}
        assert results["harmful_refusal"] == table.loc[label, "harmful_refusal"]
        assert {r.dataset_split for r in card.data.eval_results} == {"test"}
        assert f"| {label} |" in card.text and "| base |" in card.text and "n=2" in card.text


def test_the_embedded_model_names_its_hub_origin():
    assert base_model_id("smollm2-135m-instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert base_model_id("meta-llama/Llama-3.2-1B-Instruct") == "meta-llama/Llama-3.2-1B-Instruct"
    assert base_model_id("/models/x.gguf") is None
