"""Sparsity measures (METHODS §9) against a direct numpy computation on a stored activation
matrix, merge of halves, analytic FLOPs against torch's FLOP counter, neuron-type overlap."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from builders import make_gpt2, make_mamba
from torch.utils.flop_counter import FlopCounterMode

from neuronspec.analyses.efficiency import flops_per_token
from neuronspec.analyses.neuron_overlap import add_neuron_overlap, neuron_overlap_layer
from neuronspec.analyses.sparsity import (
    PERCENTILES,
    sketch_accuracy,
    sparsity_layer,
    threshold_sparsity,
)
from neuronspec.capture.config import StatsConfig
from neuronspec.capture.stats import NeuronStats
from neuronspec.models.scan import use_fast_scan
from neuronspec.session import merge_results

CONFIG = StatsConfig(unigrams=False)
B, T, W, VOCAB = 4, 24, 45, 11  # W: not a multiple of the kernel's lanes


def _activations(seed: int = 7) -> torch.Tensor:
    """A stored ``(B, T, W)`` float32 matrix: signs, |a| over ~8 decades, exact zeros, an
    all-zero token row, values just around the family thresholds 1e-5 and 0.01."""
    g = torch.Generator().manual_seed(seed)
    magnitude = torch.exp(torch.randn(B, T, W, generator=g) * 3 - 2)  # log-normal
    sign = torch.where(torch.rand(B, T, W, generator=g) < 0.5, -1.0, 1.0)
    act = (magnitude * sign).float()
    act[0, 3, ::5] = 0.0
    act[1, 7] = 0.0  # a token whose row is all zero: excluded from the per-token means
    act[2, 0, :4] = torch.tensor([0.0099, 0.0101, 0.99e-5, 1.01e-5])
    # near-ties (same top 20 float bits, left to the kernel's insertion sort) and exact ties
    act[3, 5, :12] = 0.5 + 1e-6 * torch.arange(12, 0, -1)
    act[3, 6, :12] = 0.25
    return act


def _stats(act: torch.Tensor, backend: str) -> NeuronStats:
    stats = NeuronStats.empty([W], T, VOCAB, CONFIG, backend=backend)
    ids = torch.randint(1, VOCAB, act.shape[:2], generator=torch.Generator().manual_seed(1))
    for rows in (slice(0, 3), slice(3, B)):  # two batches
        counted = stats.add_tokens(ids[rows], bos_id=None)
        stats.add_layer(0, act[rows], act[rows], ids[rows], counted)
    return stats


def _direct(act: np.ndarray) -> dict:
    """Per-token measures straight from their definitions, float64, rows with Σ|a| > 0."""
    m = np.abs(act.astype(np.float64)).reshape(-1, act.shape[-1])
    m = m[m.sum(1) > 0]
    n = m.shape[1]
    p = m / m.sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(p > 0, p * np.log(p), 0.0)
    entropy = -plogp.sum(1) / np.log(n)
    # Gini as the mean absolute difference (a peer of the sorted-rank formula)
    gini = np.abs(m[:, :, None] - m[:, None, :]).sum((1, 2)) / (2 * n * m.sum(1))
    hoyer = (np.sqrt(n) - m.sum(1) / np.sqrt((m**2).sum(1))) / (np.sqrt(n) - 1)
    return {"entropy": entropy.mean(), "gini": gini.mean(), "hoyer": hoyer.mean(), "rows": len(m)}


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_measures_equal_direct_numpy_computation(backend):
    act = _activations()
    stats = _stats(act, backend)
    values = np.abs(act.numpy()).ravel()
    direct = _direct(act.numpy())
    for tau in (0.01, 1e-5):
        finding = sparsity_layer(stats, 0, tau=tau)
        assert finding.threshold_exact
        assert finding.threshold_sparsity == pytest.approx((values < tau).mean(), abs=1e-6)
        assert finding.n_tokens_measured == direct["rows"] == B * T - 1
        for measure in ("entropy", "gini", "hoyer"):
            assert getattr(finding, measure) == pytest.approx(direct[measure], abs=1e-6), measure
    alpha = sketch_accuracy(stats.config)
    assert alpha <= 0.01
    for q in PERCENTILES:
        exact = np.percentile(values, q, method="inverted_cdf")
        got = finding.percentiles[f"P{q}"]
        assert abs(got - exact) <= alpha * exact * (1 + 1e-5), (q, got, exact)
    exact = np.percentile(values, 30, method="inverted_cdf")
    assert abs(finding.optimal_threshold - exact) <= alpha * exact * (1 + 1e-5)
    # at the optimal threshold the sparsity is the target, up to the sketch's bin there
    reached, _ = threshold_sparsity(stats, 0, finding.optimal_threshold * (1 + 2 * alpha))
    assert reached >= 0.3


def test_threshold_off_an_edge_is_interpolated_within_its_bin():
    stats = _stats(_activations(), "torch")
    values = np.abs(_activations().numpy()).ravel()
    tau = 0.0123  # not a sketch edge
    edges = stats.config.sketch_edges()
    k = np.searchsorted(edges, tau)
    low, high = (values < edges[k - 1]).mean(), (values < edges[k]).mean()
    sparsity, exact = threshold_sparsity(stats, 0, tau)
    assert not exact and low <= sparsity <= high
    assert low <= (values < tau).mean() <= high


def test_native_and_torch_forms_agree():
    act = _activations()
    native, reference = _stats(act, "native"), _stats(act, "torch")
    sums, reference_sums = native.layers[0].token_sparsity, reference.layers[0].token_sparsity
    assert sums[0] == reference_sums[0]
    # per-token means: the native log2 is a polynomial (about 1e-7 absolute error)
    torch.testing.assert_close(sums / sums[0], reference_sums / sums[0], rtol=0, atol=1e-7)
    differ = (native.layers[0].abs_sketch - reference.layers[0].abs_sketch).abs().sum()
    assert int(differ) <= 2  # a value within float32 rounding of an edge: either bin


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_merge_of_halves_equals_whole(backend):
    act = _activations()
    ids = torch.randint(1, VOCAB, act.shape[:2], generator=torch.Generator().manual_seed(1))
    parts = []
    for rows in (slice(0, 2), slice(2, B), slice(0, B)):
        stats = NeuronStats.empty([W], T, VOCAB, CONFIG, backend=backend)
        counted = stats.add_tokens(ids[rows], bos_id=None)
        stats.add_layer(0, act[rows], act[rows], ids[rows], counted)
        parts.append(stats)
    merged, whole = parts[0].merge(parts[1]), parts[2]
    assert torch.equal(merged.layers[0].abs_sketch, whole.layers[0].abs_sketch)
    torch.testing.assert_close(
        merged.layers[0].token_sparsity, whole.layers[0].token_sparsity, rtol=1e-12, atol=1e-12
    )
    for name in ("gini", "entropy", "hoyer", "percentiles", "threshold_sparsity"):
        a = getattr(sparsity_layer(merged, 0, tau=0.01), name)
        b = getattr(sparsity_layer(whole, 0, tau=0.01), name)
        assert a == pytest.approx(b, rel=1e-12), name


def _counted_flops(model: torch.nn.Module, length: int) -> float:
    ids = torch.randint(0, model.config.vocab_size, (2, length))
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(input_ids=ids, use_cache=False)
    return counter.get_total_flops() / ids.numel()


@pytest.mark.parametrize("family", ["gpt2", "mamba"])
def test_analytic_flops_match_torch_flop_counter(family):
    """FlopCounterMode counts the weight products (mm/addmm) and, with eager attention, the
    attention's QKᵀ and AV (bmm): GPT-2's analytic count equals it exactly, matmul and
    attention; Mamba's matmul part too (the fast scan's conv and scan are not counted)."""
    if family == "gpt2":
        model = make_gpt2(n_layer=3)
        model.set_attn_implementation("eager")
    else:
        model = use_fast_scan(make_mamba(n_layer=3))
    length = 16
    matmul, other = flops_per_token(model.config, length)
    counted = _counted_flops(model, length)
    if family == "gpt2":
        assert matmul + other == counted
        assert other == 3 * 4 * length * model.config.n_embd
    else:
        assert matmul == counted
        assert other == 3 * (2 * 4 * 64 + 7 * 64 * 8)  # conv K = 4, d_inner 64, N = 8


def test_one_flop_formula_for_efficiency_and_shapes():
    """The efficiency finding and the shipped shapes count the same FLOPs (gpt2 at T = 16)."""
    from transformers import AutoConfig

    from neuronspec.models.shapes import model_shape, shipped_config

    for model_id in ("gpt2", "mamba130m"):
        config = shipped_config(model_id)
        hf_config = AutoConfig.for_model(config.pop("model_type"), **config)
        matmul, other = flops_per_token(hf_config, 16)
        shape = model_shape(model_id, context=16)
        assert matmul + other == shape.layer_flops_per_token + shape.lm_head_flops_per_token
    assert model_shape("gpt2", context=16).layer_flops_per_token == 12 * (24 * 768**2 + 64 * 768)


def test_overlap_of_planted_sets():
    finding = neuron_overlap_layer(2, {"a": [1, 2, 3, 4], "b": [3, 4, 5], "c": [], "d": [9]})
    assert finding.sizes == {"a": 4, "b": 3, "c": 0, "d": 1}
    assert finding.intersections["a&b"] == 2 and finding.intersections["a&d"] == 0
    assert finding.jaccard["a&b"] == pytest.approx(2 / 5)
    assert finding.jaccard["a&c"] == 0.0 and finding.jaccard["c&d"] == 0.0
    assert finding.exclusive == {"a": 2, "a&b": 2, "b": 1, "d": 1}
    assert sum(finding.exclusive.values()) == len({1, 2, 3, 4, 5, 9})


def test_overlap_takes_every_kind_from_merged_worker_results():
    """Kinds of one layer recorded by different xdist workers are merged, then overlapped."""

    def part(kind, neurons):
        sets = {"0": {kind: {"site": "mlp", "neurons": neurons}}}
        return {"config": {}, "models": {"m": {"info": {}, "analyses": {"neuron_sets": sets}}}}

    merged = merge_results([part("dead", [1, 2]), part("knowledge", [2, 3]), part("dt_x", [7])])
    overlap = add_neuron_overlap(merged)["models"]["m"]["analyses"]["neuron_overlap"]["0"]
    assert overlap["kinds"] == ["dead", "dt_x", "knowledge"]
    assert overlap["intersections"]["dead&knowledge"] == 1
    assert math.isclose(overlap["jaccard"]["dead&knowledge"], 1 / 3)
