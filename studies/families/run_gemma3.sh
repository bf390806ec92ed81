#!/usr/bin/env bash
# Gemma 3 270M (a base model, the `gemma` extra) through the direction and token stages, with the
# demo preset's stage settings. Both direction methods, each in its own run directory; S from each.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-runs/gemma3}
for method in diff-means contrastive; do
    .venv/bin/safesteer direction --model gemma3-270m --out "$OUT/$method" --method "$method" \
        --n-train 48 --n-val 16 --n-test 24
    .venv/bin/safesteer tokens --run "$OUT/$method" --n-prompts 24 --openers 1
done
