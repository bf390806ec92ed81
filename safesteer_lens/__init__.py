"""safesteer-lens: SafeSteer (localized on-policy distillation for safety alignment) on
TransformerLens, built to be explored in Jupyter.

Typical use::

    from safesteer_lens import load_model
    model = load_model()                      # embedded SmolLM2-135M-Instruct, offline
    model.bridge                              # the TransformerLens TransformerBridge
"""

from safesteer_lens.data import Prompt, load_builtin_prompts, load_prompt_file, load_public_prompts
from safesteer_lens.errors import SafeSteerError
from safesteer_lens.generation import Completions, generate
from safesteer_lens.models import DEFAULT_MODEL, ChatBatch, ChatModel, load_model

__all__ = [
    "DEFAULT_MODEL",
    "ChatBatch",
    "ChatModel",
    "Completions",
    "Prompt",
    "SafeSteerError",
    "generate",
    "load_builtin_prompts",
    "load_model",
    "load_prompt_file",
    "load_public_prompts",
]
__version__ = "0.1.0"
