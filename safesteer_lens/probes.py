"""Where does the model know? Layer-by-layer probes of harmful vs harmless requests.

A selective student needs a model that tells harmful from harmless requests apart somewhere in
its residual stream; a teacher steered at a layer where it does not can only over-refuse. For
every layer this module reads the residual stream entering the block
(``blocks.{L}.hook_resid_pre``, where the teacher's vector is added) at the last prompt token,
and measures on held-out prompts:

* ``probe_acc``: a logistic-regression probe (scikit-learn, on standardised states) trained on
  the train split;
* ``diff_means_acc``: the 1-D difference-in-means direction of the train split, thresholded
  halfway between the two class means: how much a single direction carries.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from safesteer_lens.atomic import write_atomic
from safesteer_lens.data import load_builtin_prompts, prompt_texts
from safesteer_lens.errors import SafeSteerError
from safesteer_lens.models import ChatModel
from safesteer_lens.stats import Rate
from safesteer_lens.steering import hook_name

PROBES_CSV = "probes.csv"


@torch.no_grad()
def last_token_states(
    model: ChatModel, prompts: Sequence[str], batch_size: int = 16
) -> Float[Tensor, "layer batch d_model"]:
    """``resid_pre`` of every block at the last token of each chat-formatted prompt (float32, CPU)."""
    per_batch = []
    for start in range(0, len(prompts), batch_size):
        batch = model.tokenize(list(prompts[start : start + batch_size]))
        store: dict[int, Tensor] = {}

        def grab(resid: Tensor, hook: Any, layer: int) -> Tensor:
            store[layer] = resid[:, -1].float().cpu()  # left padding: the last column is every row's last token
            return resid

        hooks = [(hook_name(layer), lambda r, hook, layer=layer: grab(r, hook, layer))
                 for layer in range(model.n_layers)]
        with model.bridge.hooks(fwd_hooks=hooks):
            model.bridge(batch.input_ids, attention_mask=batch.attention_mask, logits_to_keep=1)
        per_batch.append(torch.stack([store[layer] for layer in range(model.n_layers)]))
    return torch.cat(per_batch, dim=1)


def diff_means_accuracy(
    train: Float[Tensor, "n d_model"], train_y: Tensor, test: Float[Tensor, "m d_model"], test_y: Tensor
) -> int:
    """Correct held-out labels of the difference-in-means direction, thresholded at the class means' midpoint."""
    direction = train[train_y == 1].mean(0) - train[train_y == 0].mean(0)
    projected = train @ direction
    threshold = (projected[train_y == 1].mean() + projected[train_y == 0].mean()) / 2
    return int(((test @ direction > threshold).long() == test_y).sum())


def probe_accuracy(
    model: ChatModel,
    n_train: int = 64,
    n_test: int = 65,
    train: tuple[Sequence[str], Sequence[str]] | None = None,
    test: tuple[Sequence[str], Sequence[str]] | None = None,
) -> Any:
    """Per layer, held-out accuracy of a linear probe and of the difference-in-means direction.

    Args:
        model: The base model.
        n_train: Prompts per class from the built-in train split (when ``train`` is not given).
        n_test: Prompts per class from the built-in validation split (when ``test`` is not given).
        train: ``(harmful, harmless)`` prompts to fit on, instead of the built-in ones.
        test: ``(harmful, harmless)`` prompts to score on.

    Returns:
        A pandas table, one row per layer: ``probe_acc`` and ``diff_means_acc``, each with
        ``_low``, ``_high`` and ``_n`` (95% Wilson interval over the held-out prompts).
    """
    import pandas
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train = train or (prompt_texts(load_builtin_prompts("harmful", "train"))[:n_train],
                      prompt_texts(load_builtin_prompts("harmless", "train"))[:n_train])
    test = test or (prompt_texts(load_builtin_prompts("harmful", "val"))[:n_test],
                    prompt_texts(load_builtin_prompts("harmless", "val"))[:n_test])
    if min(map(len, (*train, *test))) < 2:
        raise SafeSteerError("probes need at least 2 prompts of each class to fit and to score on")
    x_train = last_token_states(model, [*train[0], *train[1]])
    x_test = last_token_states(model, [*test[0], *test[1]])
    y_train = torch.tensor([1] * len(train[0]) + [0] * len(train[1]))
    y_test = torch.tensor([1] * len(test[0]) + [0] * len(test[1]))
    rows = []
    for layer in range(model.n_layers):
        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        probe.fit(x_train[layer].numpy(), y_train.numpy())
        correct = int((probe.predict(x_test[layer].numpy()) == y_test.numpy()).sum())
        rows.append({"layer": layer, **Rate(correct, len(y_test)).columns("probe_acc"),
                     **Rate(diff_means_accuracy(x_train[layer], y_train, x_test[layer], y_test), len(y_test)).columns("diff_means_acc")})
    return pandas.DataFrame(rows).set_index("layer")


def save_probes(probes: Any, run_dir: str | Path) -> Path:
    """Write ``probes.csv`` into the run directory (moved into place whole)."""
    return write_atomic(Path(run_dir) / PROBES_CSV, probes.to_csv)


def load_probes(run_dir: str | Path) -> Any | None:
    """The run's ``probes.csv`` as a table, or None when the direction stage did not write one."""
    import pandas

    path = Path(run_dir) / PROBES_CSV
    return pandas.read_csv(path, index_col="layer") if path.is_file() else None
