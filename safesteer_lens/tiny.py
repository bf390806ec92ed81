"""Tiny random Llama chat models built locally, for tests, benchmarks and quick experiments.

A real (random-weight) Llama with a real byte-level BPE tokenizer and a ChatML template,
saved as an ordinary Hugging Face directory, so it goes through exactly the same loading
path as any user model. Building one takes about a second and needs no network.
"""

from __future__ import annotations

from pathlib import Path

import torch

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _training_text() -> list[str]:
    """Text the tiny tokenizer learns merges from: the built-in prompts plus chat words."""
    from safesteer_lens.data import load_builtin_prompts

    prompts = [p.prompt for p in load_builtin_prompts()]
    replies = [
        "I'm sorry, but I can't help with that request.",
        "I cannot assist with that. It is illegal and harmful.",
        "Sure! Here is a step-by-step guide.",
        "system user assistant You are a helpful AI assistant.",
    ]
    return prompts + replies * 20


def build_tiny_tokenizer(vocab_size: int = 512) -> object:
    """Train a byte-level BPE tokenizer with ChatML special tokens and chat template.

    Its length is exactly ``vocab_size`` (padded with ``<extra_i>`` tokens when the corpus
    gives fewer merges), so benchmark shapes get a realistic unembedding.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(_training_text(), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    if len(tokenizer) < vocab_size:
        # The small training corpus runs out of merges long before a real model's vocabulary
        # size; filler tokens keep the embedding and unembedding at the requested shape.
        tokenizer.add_tokens([f"<extra_{i}>" for i in range(vocab_size - len(tokenizer))])
    return tokenizer


def build_tiny_llama(
    directory: str | Path,
    *,
    n_layers: int = 4,
    d_model: int = 64,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    d_mlp: int = 128,
    vocab_size: int = 512,
    seed: int = 0,
    init_std: float = 0.02,
) -> Path:
    """Save a random-weight Llama chat model (weights, config, tokenizer) to ``directory``.

    Args:
        directory: Where to write; created if missing.
        n_layers: Decoder blocks.
        d_model: Residual width.
        n_heads: Query heads.
        n_kv_heads: Key/value heads (grouped-query attention as in SmolLM2).
        d_mlp: MLP hidden width.
        vocab_size: BPE vocabulary size, special tokens included.
        seed: Seeds the weight initialisation.
        init_std: Standard deviation of the initial weights. The default gives near-uniform
            attention, so positions barely matter; about 0.2 gives a model whose outputs
            depend on where each token sits (what tests of positions and caches need).

    Returns:
        The directory, loadable by ``load_model`` and by ``AutoModelForCausalLM``.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer(vocab_size)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=d_model,
        intermediate_size=d_mlp,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        max_position_embeddings=512,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|im_start|>"),
        eos_token_id=eos,
        pad_token_id=eos,
        initializer_range=init_std,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = eos
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


LLAMA3_CHAT_TEMPLATE = (
    "{{ '<|begin_of_text|>' }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def build_tiny_guard(directory: str | Path, *, n_layers: int = 2, d_model: int = 32, seed: int = 0) -> Path:
    """Save a random-weight Llama with Llama 3's header tokens and chat template.

    It has Llama Guard 3's shape of interface (the ``<|begin_of_text|>``, ``<|start_header_id|>``,
    ``<|end_header_id|>`` and ``<|eot_id|>`` tokens), so the judge's loading, prompting and
    parsing run offline; its answers are random.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer(512)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|begin_of_text|>", "<|start_header_id|>",
                                                                "<|end_header_id|>", "<|eot_id|>"]})
    tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token = "<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>"
    tokenizer.chat_template = LLAMA3_CHAT_TEMPLATE
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=d_model, intermediate_size=2 * d_model,
                         num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, tie_word_embeddings=True,
                         bos_token_id=tokenizer.convert_tokens_to_ids("<|begin_of_text|>"), eos_token_id=eot, pad_token_id=eot)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
