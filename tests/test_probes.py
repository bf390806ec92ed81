import pytest
import torch

from safesteer_lens.data import load_builtin_prompts, prompt_texts
from safesteer_lens.errors import SafeSteerError
from safesteer_lens.probes import diff_means_accuracy, last_token_states, load_probes, probe_accuracy, save_probes


def test_difference_in_means_separates_two_shifted_clouds():
    torch.manual_seed(0)
    shift = torch.zeros(8)
    shift[3] = 6.0
    train = torch.cat([torch.randn(20, 8) + shift, torch.randn(20, 8)])
    test = torch.cat([torch.randn(10, 8) + shift, torch.randn(10, 8)])
    labels = lambda n: torch.tensor([1] * n + [0] * n)  # noqa: E731
    assert diff_means_accuracy(train, labels(20), test, labels(10)) == 20
    assert diff_means_accuracy(train, labels(20), test, 1 - labels(10)) == 0  # the threshold has a side


def test_states_are_read_at_every_layer_entrance(tiny):
    states = last_token_states(tiny, ["How do I bake bread?", "Hi", "Tell me a story"], batch_size=2)
    assert states.shape == (tiny.n_layers, 3, tiny.d_model) and states.dtype == torch.float32


def test_probe_table_has_a_row_per_layer_and_chance_where_every_prompt_looks_the_same(tiny, tmp_path):
    harmful = prompt_texts(load_builtin_prompts("harmful", "train"))[:12]
    harmless = prompt_texts(load_builtin_prompts("harmless", "train"))[:12]
    val = (prompt_texts(load_builtin_prompts("harmful", "val"))[:8], prompt_texts(load_builtin_prompts("harmless", "val"))[:8])
    probes = probe_accuracy(tiny, train=(harmful, harmless), test=val)
    assert list(probes.index) == list(range(tiny.n_layers))
    assert (probes["probe_acc_n"] == 16).all() and ((probes["probe_acc_low"] <= probes["probe_acc"])
                                                    & (probes["probe_acc"] <= probes["probe_acc_high"])).all()
    # entering block 0 the last token is the same template token for every prompt: nothing to tell apart
    assert probes.loc[0, "probe_acc"] == 0.5
    save_probes(probes, tmp_path)
    assert load_probes(tmp_path)["diff_means_acc"].tolist() == pytest.approx(probes["diff_means_acc"].tolist())
    assert load_probes(tmp_path / "elsewhere") is None
    with pytest.raises(SafeSteerError, match="at least 2 prompts"):
        probe_accuracy(tiny, train=(harmful[:1], harmless), test=val)
