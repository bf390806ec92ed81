"""What differs between model families, in one table the loader reads.

SafeSteer's stages are the same for every decoder-only chat model; what changes from family to
family is a handful of facts about the chat format and the weight names:

* the tokens that end an assistant turn (Llama 3's ``<|eot_id|>``, Gemma's ``<end_of_turn>``,
  Phi-3's ``<|end|>``), which generation stops at and safety-token selection masks;
* the *post-instruction* text between the user's message and the reply, where refusal
  directions are read (Arditi et al. 2024);
* template switches: Qwen3 and SmolLM3 think before answering unless ``enable_thinking=False``
  is passed to the template; Gemma 2 has no system role, so a system message goes in front of
  the user's;
* the linear layers LoRA adapts (Phi-3 fuses ``q, k, v`` into ``qkv_proj`` and ``gate, up``
  into ``gate_up_proj``, which the TransformerLens bridge runs as separate views of the fused
  weight: an adapter cannot sit on one layer that both the bridge and plain ``transformers``
  run, so a Phi-3 LoRA student adapts ``o_proj`` and ``down_proj``; full fine-tuning trains
  every weight);
* how each family's instruct models open a refusal (their first tokens join the logit refusal
  score's set; the text markers stay one pinned list in :mod:`safesteer_lens.refusal`, so a
  rate means the same for every family, and a test checks that they catch each family's
  openings), and its llama.cpp architecture name (the ``model_hint`` of an exported control
  vector).

:func:`family_of` picks the row from a model's config (``model_type``) and vocabulary (Llama 3
and SmolLM2 share ``model_type="llama"``; the ``<|eot_id|>`` token tells them apart). A model
of an unknown family gets :data:`GENERIC`: every stage still runs, with the template as written
and LoRA on the usual projection names. ``tests/test_families.py`` runs every row end to end on
a tiny random model built from the family's real ``transformers`` config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

DEFAULT_LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


@dataclass(frozen=True)
class Family:
    """One model family's chat-format and weight-name facts.

    Attributes:
        name: Short key (``"qwen3"``).
        title: For tables and the README (``"Qwen3"``).
        model_types: ``config.model_type`` values of the family.
        examples: Hub ids of instruct models of the family (documentation only).
        end_of_turn: Tokens that end an assistant turn, besides the tokenizer's eos.
        post_instruction: The template text between the user's message and the reply, as the
            family's own template renders it; None where it varies between models.
        lora_targets: The linear layers a LoRA student adapts (last name component).
        template_kwargs: Extra arguments to ``apply_chat_template`` (the no-thinking switch).
        system_role: False when the template rejects a system message; it is then put in front
            of the user's message.
        refusal_openings: How the family's instruct models begin a refusal; their first tokens
            join the refusal score's token set.
        gguf_arch: llama.cpp's ``general.architecture`` for the family.
        vocab_marker: A token only this family's tokenizer has, to tell it from another family
            with the same ``model_type``.
        attention: The attention kernel for plain ``transformers`` copies of the model (the
            rollout sampler): ``sdpa``, or ``eager`` where the family's attention needs it
            (Gemma 2's logit soft-capping).
    """

    name: str
    title: str
    model_types: tuple[str, ...]
    examples: tuple[str, ...]
    end_of_turn: tuple[str, ...]
    post_instruction: str | None
    lora_targets: str = DEFAULT_LORA_TARGETS
    template_kwargs: tuple[tuple[str, Any], ...] = ()
    system_role: bool = True
    refusal_openings: tuple[str, ...] = ()
    gguf_arch: str = "llama"
    vocab_marker: str | None = None
    attention: str = "sdpa"

    @property
    def template_arguments(self) -> Mapping[str, Any]:
        return dict(self.template_kwargs)


_CHATML_POST = "<|im_end|>\n<|im_start|>assistant\n"
_NO_THINKING = (("enable_thinking", False),)
_GEMMA_POST = "<end_of_turn>\n<start_of_turn>model\n"

FAMILIES: tuple[Family, ...] = (
    Family("llama3", "Llama 3", ("llama",), ("meta-llama/Llama-3.2-3B-Instruct", "meta-llama/Meta-Llama-3-8B-Instruct"),
           ("<|eot_id|>", "<|eom_id|>"), "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
           refusal_openings=("I can't", "I can\u2019t"), vocab_marker="<|eot_id|>"),
    Family("llama", "Llama (other chat formats, e.g. SmolLM2)", ("llama",), ("HuggingFaceTB/SmolLM2-135M-Instruct",),
           ("<|im_end|>",), None),
    Family("qwen2", "Qwen2.5", ("qwen2",), ("Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct"), ("<|im_end|>",),
           _CHATML_POST, refusal_openings=("I'm sorry, but I can't",), gguf_arch="qwen2"),
    Family("qwen3", "Qwen3", ("qwen3",), ("Qwen/Qwen3-4B-Instruct-2507", "Qwen/Qwen3-0.6B"), ("<|im_end|>",),
           _CHATML_POST + "<think>\n\n</think>\n\n", template_kwargs=_NO_THINKING,
           refusal_openings=("I'm sorry, but I can't",), gguf_arch="qwen3"),
    # The experts are fused tensors, not linear layers: LoRA adapts the attention.
    Family("qwen3_moe", "Qwen3-MoE", ("qwen3_moe",), ("Qwen/Qwen3-30B-A3B-Instruct-2507",), ("<|im_end|>",),
           _CHATML_POST + "<think>\n\n</think>\n\n", lora_targets="q_proj,k_proj,v_proj,o_proj", template_kwargs=_NO_THINKING,
           refusal_openings=("I'm sorry, but I can't",), gguf_arch="qwen3moe"),
    Family("gemma2", "Gemma 2", ("gemma2",), ("google/gemma-2-2b-it", "google/gemma-2-9b-it"), ("<end_of_turn>",),
           _GEMMA_POST, system_role=False, refusal_openings=("I cannot", "I understand"), gguf_arch="gemma2",
           attention="eager"),
    Family("gemma3", "Gemma 3", ("gemma3_text", "gemma3"), ("google/gemma-3-1b-it", "google/gemma-3-270m-it"),
           ("<end_of_turn>",), _GEMMA_POST, refusal_openings=("I cannot", "I understand"), gguf_arch="gemma3"),
    Family("mistral", "Mistral", ("mistral",), ("mistralai/Mistral-7B-Instruct-v0.3",), (), "[/INST]",
           refusal_openings=("I'm unable", "I cannot")),
    Family("phi3", "Phi-3", ("phi3",), ("microsoft/Phi-3-mini-4k-instruct", "microsoft/Phi-3.5-mini-instruct"),
           ("<|end|>",), "<|end|>\n<|assistant|>\n", lora_targets="o_proj,down_proj",
           gguf_arch="phi3"),
    Family("olmo2", "OLMo 2", ("olmo2",), ("allenai/OLMo-2-1124-7B-Instruct", "allenai/OLMo-2-0425-1B-Instruct"),
           ("<|endoftext|>",), "\n<|assistant|>\n", gguf_arch="olmo2"),
    Family("smollm3", "SmolLM3", ("smollm3",), ("HuggingFaceTB/SmolLM3-3B",), ("<|im_end|>",),
           _CHATML_POST + "<think>\n\n</think>\n", template_kwargs=_NO_THINKING, gguf_arch="smollm3"),
)
GENERIC = Family("generic", "other", (), (), (), None)
BY_NAME: dict[str, Family] = {family.name: family for family in FAMILIES}


def family_of(model_type: str, vocab: Mapping[str, int] | None = None) -> Family:
    """The table's row for a model.

    Args:
        model_type: ``config.model_type`` (a GGUF file's ``general.architecture`` works for the
            families whose names agree).
        vocab: The tokenizer's vocabulary (token -> id), to tell apart families that share a
            ``model_type``; None takes the first candidate without a marker.

    Returns:
        The family, or :data:`GENERIC` for a model type the table does not list.
    """
    candidates = [family for family in FAMILIES if model_type in family.model_types]
    for family in candidates:
        if family.vocab_marker is not None and vocab is not None and family.vocab_marker in vocab:
            return family
    plain = [family for family in candidates if family.vocab_marker is None]
    return plain[0] if plain else GENERIC


def gguf_architecture(model_type: str) -> str:
    """llama.cpp's architecture name for a ``model_type`` (the control vector's ``model_hint``)."""
    family = family_of(model_type)
    return family.gguf_arch if family is not GENERIC else model_type


# Each family's turn format as a chat template, written for this project: for one system, user
# and assistant turn it renders the text the family's published instruct template renders (turn
# tokens, default system prompt, thinking switch, where a system message goes), which is all
# the toolkit reads from a template. The tiny test models carry them, and a base model that
# ships no template can borrow its family's (``load_model(..., chat_template=...)``).
_CHATML_TURNS = ("{%- for message in messages %}{%- if message['role'] != 'system' %}"
                 "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
                 "{%- endif %}{%- endfor %}")
TEMPLATES: dict[str, str] = {
    "llama3": (
        "{%- for message in messages %}{%- set text = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
        " + message['content'] | trim + '<|eot_id|>' %}{%- if loop.index0 == 0 %}{%- set text = bos_token + text %}"
        "{%- endif %}{{- text }}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
    ),
    "qwen2": (
        "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
        "{%- else %}{{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}"
        "{%- endif %}" + _CHATML_TURNS + "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
    ),
    "qwen3": (
        "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
        "{%- endif %}{%- for message in messages %}{%- if message['role'] == 'user' %}"
        "{{- '<|im_start|>user\n' + message['content'] + '<|im_end|>\n' }}{%- elif message['role'] == 'assistant' %}"
        "{{- '<|im_start|>assistant\n<think>\n\n</think>\n\n' + message['content'] + '<|im_end|>\n' }}{%- endif %}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
        "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}"
        "{%- endif %}"
    ),
    "gemma2": (
        "{{ bos_token }}{%- if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{%- endif %}"
        "{%- for message in messages %}{%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
        "{{- '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<start_of_turn>model\n' }}{%- endif %}"
    ),
    "gemma3": (
        "{{ bos_token }}{%- set ns = namespace(prefix='') %}{%- if messages[0]['role'] == 'system' %}"
        "{%- set ns.prefix = messages[0]['content'] + '\n\n' %}{%- set messages = messages[1:] %}{%- endif %}"
        "{%- for message in messages %}{%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
        "{{- '<start_of_turn>' + role + '\n' + (ns.prefix if loop.first else '') + message['content'] | trim"
        " + '<end_of_turn>\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<start_of_turn>model\n' }}{%- endif %}"
    ),
    "mistral": (
        "{%- set ns = namespace(system='') %}{%- if messages[0]['role'] == 'system' %}"
        "{%- set ns.system = messages[0]['content'] + '\n\n' %}{%- set messages = messages[1:] %}{%- endif %}"
        "{{- bos_token }}{%- for message in messages %}{%- if message['role'] == 'user' %}"
        "{{- '[INST] ' + (ns.system if loop.last or loop.revindex == 2 else '') + message['content'] + '[/INST]' }}"
        "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}{%- endif %}{%- endfor %}"
    ),
    "phi3": (
        "{%- for message in messages %}{{- '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|assistant|>\n' }}{%- else %}{{- eos_token }}{%- endif %}"
    ),
    "olmo2": (
        "{{- bos_token }}{%- for message in messages %}{{- '<|' + message['role'] + '|>\n' + message['content'] }}"
        "{%- if message['role'] == 'assistant' %}{{- eos_token }}{%- endif %}{{- '\n' if not loop.last or message['role'] != 'assistant' }}"
        "{%- endfor %}{%- if add_generation_prompt %}{{- '<|assistant|>\n' }}{%- endif %}"
    ),
    "smollm3": (
        "{%- set think = not (enable_thinking is defined and enable_thinking is false) %}"
        "{{- '<|im_start|>system\n## Metadata\n\nKnowledge Cutoff Date: June 2025\n' }}"
        "{{- 'Reasoning Mode: ' + ('/think' if think else '/no_think') + '\n\n## Custom Instructions\n\n' }}"
        "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}"
        "{%- else %}{{- 'You are a helpful AI assistant named SmolLM, trained by Hugging Face.' }}{%- endif %}"
        "{{- '\n\n<|im_end|>\n' }}" + _CHATML_TURNS.replace("+ message['content'] +", "+ message['content'] +", 1) +
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- if not think %}{{- '<think>\n\n</think>\n' }}"
        "{%- endif %}{%- endif %}"
    ),
}
TEMPLATES["qwen3_moe"] = TEMPLATES["qwen3"]
