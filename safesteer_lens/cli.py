"""The ``safesteer`` command line.

Each subcommand is a thin shell over the Python API. Problems the user can fix raise
:class:`~safesteer_lens.errors.SafeSteerError`; :func:`main` prints them as one line and
exits with status 2 (argparse's own usage errors use 2 as well).
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from safesteer_lens.errors import SafeSteerError
from safesteer_lens.models import DEFAULT_MODEL


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"embedded name, local HF directory, .gguf file or hub id (default: {DEFAULT_MODEL})",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: bf16 on cuda)")


def cmd_info(args: argparse.Namespace) -> None:
    """Print the model's shape and how long it took to load."""
    from safesteer_lens.models import load_model

    model = load_model(args.model, device=args.device, dtype=args.dtype)
    rows = [
        ("model", model.name),
        ("source", model.source),
        ("architecture", type(model.hf_model).__name__),
        ("layers", model.n_layers),
        ("d_model", model.d_model),
        ("vocab", model.d_vocab),
        ("post-instruction tokens", " ".join(repr(t) for t in model.post_instruction_tokens)),
        ("end-of-turn ids", model.eot_token_ids),
        ("device", model.device),
        ("dtype", str(model.dtype).replace("torch.", "")),
        ("load time", f"{model.load_seconds:.1f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def cmd_chat(args: argparse.Namespace) -> None:
    """Greedy replies to prompts given on the command line."""
    from safesteer_lens.generation import generate
    from safesteer_lens.models import load_model

    model = load_model(args.model, device=args.device, dtype=args.dtype)
    out = generate(model, args.prompts, max_new_tokens=args.max_new_tokens)
    for prompt, text in zip(args.prompts, out.texts):
        print(f"user: {prompt}\nassistant: {text.strip()}\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="safesteer",
        description="SafeSteer on TransformerLens: steering directions, safety tokens and "
        "localized on-policy distillation.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = sub.add_parser("info", help="load a model and print its shape, device and load time")
    _add_model_args(info)
    info.set_defaults(func=cmd_info)

    chat = sub.add_parser("chat", help="greedy replies to prompts (a quick look at a model)")
    _add_model_args(chat)
    chat.add_argument("prompts", nargs="+", help="user messages")
    chat.add_argument("--max-new-tokens", type=int, default=48)
    chat.set_defaults(func=cmd_chat)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``safesteer`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        func(args)
    except SafeSteerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
