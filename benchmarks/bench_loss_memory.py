"""Peak memory and time of one loss step with whole logits against hidden states in chunks.

The model is Qwen3-4B cut to two decoder blocks: its width (2560), heads (32 query, 8
key/value, head dim 128), MLP (9728), tied embeddings and its padded vocabulary of 151,936
tokens, random weights (a tiny tokenizer with Qwen3's turn tokens; the vocabulary the
unembedding sees is the real one). One step is what ``accumulate_gradients`` does for one
micro-batch: the teacher's scoring forward under a steering hook (no gradient), the student's
scoring forward, the loss (``safesteer-bounded``, the demo's), its backward and the monitors.
``whole`` forms ``[rows, positions, vocab]`` logits for both models (``unembed_chunk=0``);
``chunked`` forms ``--chunk`` positions' logits at a time from the final hidden states and
recomputes them in the backward pass (``unembed_chunk=N``).

Each variant runs in its own subprocess. Once the model is loaded and its gradients are on,
the process's peak resident set is reset (``/proc/self/clear_refs``); the step's peak
(``VmHWM``) minus the resident set at that moment is the step's share. Variants
alternate (whole, chunked, chunked, whole, ...) over ``--rounds``::

    python benchmarks/bench_loss_memory.py [--rows 4] [--new-tokens 256] [--chunk 64] [--rounds 1]

The paper's shape (32 rows of 512 new tokens) needs about 10 GB per float32 logit tensor at
this vocabulary, more than this machine holds several times over for the whole-logit path; the
default is a slice of it, and the output gives the whole-logit tensor size at both shapes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QWEN3_4B = dict(hidden_size=2560, intermediate_size=9728, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                vocab_size=151936, max_position_embeddings=4096, rope_theta=1_000_000.0)


def _status_gib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 2**20  # kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def _variant(args: argparse.Namespace) -> dict[str, float]:
    import torch

    from safesteer_lens.fused_loss import fused_distillation_loss, fused_monitors, unembedding
    from safesteer_lens.generation import Completions
    from safesteer_lens.losses import distillation_loss, safety_mass, sequence_mean
    from safesteer_lens.models import load_model
    from safesteer_lens.scoring import teacher_forced_logits
    from safesteer_lens.steering import add_hooks

    model = load_model(args.model_dir, device="cpu")
    for p in model.hf_model.parameters():
        p.requires_grad_(True)
    generator = torch.Generator().manual_seed(0)
    n_prompt = 32
    completions = Completions(
        prompt_ids=torch.randint(0, 500, (args.rows, n_prompt), generator=generator),
        prompt_mask=torch.ones(args.rows, n_prompt, dtype=torch.long),
        completion_ids=torch.randint(0, 500, (args.rows, args.new_tokens), generator=generator),
        completion_mask=torch.ones(args.rows, args.new_tokens, dtype=torch.bool),
        texts=[""] * args.rows,
    )
    hooks = add_hooks(model, torch.randn(model.d_model, generator=generator), 1)
    safety_ids = torch.arange(100, 150)
    mask = completions.completion_mask
    chunked = args.variant == "chunked"
    _reset_peak()
    loaded = _status_gib("VmRSS")
    start = time.perf_counter()
    with torch.no_grad():
        teacher = teacher_forced_logits(model, completions, hooks, hidden=chunked)
    student = teacher_forced_logits(model, completions, hidden=chunked)
    if chunked:
        head = unembedding(model)
        loss = fused_distillation_loss("safesteer-bounded", student, teacher, head, head, mask, safety_ids, chunk=args.chunk)
        loss.backward()
        monitors = fused_monitors(student.detach(), teacher, head, head, mask, safety_ids, chunk=args.chunk)
    else:
        loss = distillation_loss("safesteer-bounded", student, teacher, mask, safety_ids)
        loss.backward()
        with torch.no_grad():
            monitors = {"kl_s": float(distillation_loss("safesteer", student, teacher, mask, safety_ids)),
                        "kl_full": float(distillation_loss("full-reverse", student, teacher, mask)),
                        "s_mass_student": float(sequence_mean(safety_mass(student, safety_ids), mask)),
                        "s_mass_teacher": float(sequence_mean(safety_mass(teacher, safety_ids), mask))}
    seconds = time.perf_counter() - start
    return {"variant": args.variant, "seconds": seconds, "loaded_gib": loaded, "peak_gib": _status_gib("VmHWM"),
            "loss": float(loss.detach()), **monitors}


def _build(directory: Path) -> None:
    from safesteer_lens.tiny import build_tiny_chat

    build_tiny_chat(directory, "qwen3", n_layers=2, **QWEN3_4B)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--variant", choices=["whole", "chunked"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(_variant(args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "qwen3-4b-2-layers"
        _build(model_dir)
        order = [v for r in range(args.rounds) for v in (("whole", "chunked") if r % 2 == 0 else ("chunked", "whole"))]
        results: dict[str, list[dict[str, float]]] = {"whole": [], "chunked": []}
        for variant in order:
            out = subprocess.run([sys.executable, __file__, "--variant", variant, "--model-dir", str(model_dir),
                                  "--rows", str(args.rows), "--new-tokens", str(args.new_tokens), "--chunk", str(args.chunk)],
                                 check=True, capture_output=True, text=True).stdout
            results[variant].append(json.loads(out.strip().splitlines()[-1]))
            print(results[variant][-1], flush=True)
    tensor_gib = args.rows * args.new_tokens * QWEN3_4B["vocab_size"] * 4 / 2**30
    paper_gib = 32 * 512 * QWEN3_4B["vocab_size"] * 4 / 2**30
    print(f"shape: {args.rows} rows x {args.new_tokens} new tokens, vocabulary {QWEN3_4B['vocab_size']}, chunk {args.chunk}; "
          f"one float32 logit tensor {tensor_gib:.2f} GiB here, {paper_gib:.1f} GiB at the paper's 32 x 512")
    for variant, runs in results.items():
        step = [r["peak_gib"] - r["loaded_gib"] for r in runs]
        print(f"{variant}: step time {min(r['seconds'] for r in runs):.1f} s, peak RSS {max(r['peak_gib'] for r in runs):.2f} GiB "
              f"(model loaded {runs[0]['loaded_gib']:.2f} GiB, the step's share {max(step):.2f} GiB), "
              f"loss {runs[0]['loss']:.6f}")
    whole, chunked = results["whole"][0], results["chunked"][0]
    print(f"memory_ratio={(whole['peak_gib'] - whole['loaded_gib']) / max(chunked['peak_gib'] - chunked['loaded_gib'], 1e-9):.1f} "
          f"time_ratio={min(r['seconds'] for r in results['chunked']) / min(r['seconds'] for r in results['whole']):.2f}")


if __name__ == "__main__":
    main()
