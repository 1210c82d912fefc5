"""Top-activating contexts (capture/top_contexts.py): exact against a brute-force top-k of
densely captured activations, with the stated tie rule, and mergeable across shards."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from builders import VOCAB, make_gpt2, make_mamba, wrap

from neuronspec.capture.config import StatsConfig
from neuronspec.capture.format import merge_tensor_dicts
from neuronspec.capture.runner import collect_stats
from neuronspec.capture.stats import NeuronStats
from neuronspec.capture.top_contexts import batch_top, select_top

BOS, K = 0, 16
CONFIG = StatsConfig(unigrams=False, top_contexts=K)


def _brute_top(act: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top ``k`` per column of ``act (N, W)`` by value descending, ties by index ascending."""
    values, index = np.empty((k, act.shape[1]), np.float32), np.empty((k, act.shape[1]), int)
    for column in range(act.shape[1]):
        order = np.lexsort((np.arange(len(act)), -act[:, column]))[:k]
        values[:, column], index[:, column] = act[order, column], order
    return values, index


def _windows(n=24, length=16, seed=3):
    ids = torch.randint(1, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))
    ids[::3, 5] = BOS
    return ids


@pytest.mark.parametrize("family", ["gpt2", "mamba"])
def test_top_contexts_equal_a_brute_force_top_k_of_dense_activations(family):
    model = make_gpt2() if family == "gpt2" else make_mamba()
    loaded = wrap(model, f"random-{family}")
    windows = _windows()
    stats = collect_stats(loaded, windows, bos_id=BOS, config=CONFIG, batch_size=4)
    for layer in range(loaded.n_layers):
        dense = torch.cat(
            [
                loaded.adapter.capture(windows[start : start + 4], [("mlp", layer)])[("mlp", layer)]
                for start in range(0, len(windows), 4)
            ]
        )  # (n, T, W), batch by batch as the pass ran
        values, index = _brute_top(dense.reshape(-1, dense.shape[-1]).float().numpy(), K)
        np.testing.assert_array_equal(stats.layers[layer].top_value.numpy(), values)
        np.testing.assert_array_equal(stats.layers[layer].top_index.numpy(), index)


def test_ties_follow_the_stated_rule_and_shards_merge_to_the_whole():
    """Integer activations: many ties, also at the k-th place. Two shards (with their window
    offset) merged equal the whole corpus and the brute force."""
    generator = torch.Generator().manual_seed(11)
    windows = torch.randint(1, 50, (20, 8), generator=generator)
    act = torch.randint(0, 4, (20, 8, 6), generator=generator).float()  # (n, T, W)

    def stats_of(start, stop):
        stats = NeuronStats.empty([6], 8, 50, CONFIG, backend="torch", window_offset=start)
        for first in range(start, stop, 5):
            ids, a = windows[first : min(first + 5, stop)], act[first : min(first + 5, stop)]
            stats.add_layer(0, a - 1.5, a, ids, stats.add_tokens(ids, bos_id=None))
        return stats

    whole = stats_of(0, 20)
    values, index = _brute_top(act.reshape(-1, 6).numpy(), K)
    np.testing.assert_array_equal(whole.layers[0].top_value.numpy(), values)
    np.testing.assert_array_equal(whole.layers[0].top_index.numpy(), index)
    shards = [stats_of(0, 7), stats_of(7, 20)]  # uneven, not a multiple of the batch
    merged = shards[0].merge(shards[1])
    assert torch.equal(merged.layers[0].top_value, whole.layers[0].top_value)
    assert torch.equal(merged.layers[0].top_index, whole.layers[0].top_index)
    tensors = merge_tensor_dicts(*(s.to_tensors(table_only=True) for s in shards))
    assert torch.equal(tensors["layer0.top_index"], whole.layers[0].top_index)


def test_fewer_positions_than_slots_leave_empty_slots_last():
    act = torch.tensor([[[1.0, -2.0], [3.0, -1.0]]])  # (1, 2, 2)
    values, index = batch_top(act, 3, first_token=10)
    assert values[:, 0].tolist() == [3.0, 1.0, float("-inf")]
    assert index[:, 0].tolist() == [11, 10, -1]
    assert index[:, 1].tolist() == [11, 10, -1]


def test_select_top_orders_by_value_then_index():
    values = torch.tensor([[1.0], [2.0], [2.0], [1.0]])
    index = torch.tensor([[9], [7], [3], [1]])
    top_values, top_index = select_top(values, index, 3)
    assert top_values[:, 0].tolist() == [2.0, 2.0, 1.0]
    assert top_index[:, 0].tolist() == [3, 7, 1]


def test_a_planted_detector_has_every_top_context_on_its_token():
    """A neuron that is active only on token 7: all its top contexts sit on a 7."""
    generator = torch.Generator().manual_seed(5)
    windows = torch.randint(1, 20, (40, 16), generator=generator)
    stats = NeuronStats.empty([3], 16, 50, CONFIG, backend="torch")
    for start in range(0, 40, 8):
        ids = windows[start : start + 8]
        act = torch.rand(8, 16, 3, generator=generator) * 0.1
        act[:, :, 1] = torch.where(ids == 7, 1.0 + torch.rand(8, 16, generator=generator), 0.0)
        stats.add_layer(0, act - 0.05, act, ids, stats.add_tokens(ids, bos_id=None))
    flat = windows.flatten()
    assert int((flat == 7).sum()) >= K
    assert (flat[stats.layers[0].top_index[:, 1]] == 7).all()
