"""safesteer-lens: SafeSteer (localized on-policy distillation for safety alignment) on
TransformerLens, built to be explored in Jupyter.

The three stages and their artifacts, from one import::

    from safesteer_lens import load_model, find_direction, select_safety_tokens, preset, train

    model = load_model()                                # embedded SmolLM2-135M-Instruct, offline
    direction = find_direction(model)                   # stage 1: the teacher is model + direction
    tokens = select_safety_tokens(model, direction)     # stage 2: the safety tokens S
    direction.save("runs/mine"); tokens.save("runs/mine")
    result = train("runs/mine", preset("demo"), teacher=model)   # stage 3: the student

``run_pipeline`` runs every stage with stamps and skipping (``safesteer run``), ``run_sweep``
a grid of training settings, ``evaluate_models`` the comparison table. Everything else lives
in the submodules named in ``docs/ARCHITECTURE.md``.
"""

from safesteer_lens.control_vectors import export_control_vector, load_control_vector
from safesteer_lens.data import Prompt, load_builtin_prompts, load_prompt_file, load_public_prompts
from safesteer_lens.directions import Direction, DirectionConfig, find_direction, load_direction
from safesteer_lens.distill import PRESETS, TrainConfig, preset, train
from safesteer_lens.errors import SafeSteerError
from safesteer_lens.evaluate import EvalConfig, Evaluation, Subject, evaluate_models
from safesteer_lens.families import FAMILIES, Family, family_of
from safesteer_lens.generation import Completions, generate
from safesteer_lens.judges import Verdict, load_judge
from safesteer_lens.models import DEFAULT_MODEL, ChatBatch, ChatModel, load_model
from safesteer_lens.pipeline import PIPELINE_PRESETS, PipelineConfig, run_pipeline
from safesteer_lens.sweep import load_trials, run_sweep
from safesteer_lens.tokens import SafetyTokens, TokenConfig, select_safety_tokens

__all__ = [
    "DEFAULT_MODEL",
    "FAMILIES",
    "PIPELINE_PRESETS",
    "PRESETS",
    "ChatBatch",
    "ChatModel",
    "Completions",
    "Direction",
    "DirectionConfig",
    "EvalConfig",
    "Evaluation",
    "Family",
    "PipelineConfig",
    "Prompt",
    "SafeSteerError",
    "SafetyTokens",
    "Subject",
    "TokenConfig",
    "TrainConfig",
    "Verdict",
    "evaluate_models",
    "export_control_vector",
    "family_of",
    "find_direction",
    "generate",
    "load_builtin_prompts",
    "load_control_vector",
    "load_direction",
    "load_judge",
    "load_model",
    "load_prompt_file",
    "load_public_prompts",
    "load_trials",
    "preset",
    "run_pipeline",
    "run_sweep",
    "select_safety_tokens",
    "train",
]
__version__ = "0.1.0"
