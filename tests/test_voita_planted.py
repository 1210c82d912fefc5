"""Planted ground truth for token-detecting and positional neurons (METHODS.md §3, §4).

Small random GPT-2 and Mamba models (``conftest``) are edited by hand so that chosen neurons
fire exactly on one token (detectors) or exactly on a range of window positions
(positional). The real pipeline then runs on random token windows — ``collect_stats`` →
``ngram_layer_from_stats`` / ``positional_layer_from_stats`` — and must report exactly the
planted neurons, with their token or position range, and none of the ordinary ones.

How an indicator is planted exactly. A *pair* of residual dimensions (r, r') that no
embedding, attention, MLP or mixer writes except as described holds (+M, −M) where the
neuron should fire and (−M, +M) everywhere else; the neuron reads r − r' and nothing else,
with bias 0. GPT-2's LayerNorm subtracts the same mean from both dims and divides both by the
same σ > 0, with gain 1 and bias 0 on both, so the neuron's ``mlp_pre`` is ±2M/σ: its sign
is the indicator. Mamba's RMSNorm only divides by a positive scale, so the gate z is ±2M·s.
Ordinary neurons read no reserved dimension, so their sign (bias 0) is not affected by the
planting. Every test first checks on the captured site values that the planted neurons fire
exactly where planted, before asking the analyses.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from builders import VOCAB, make_gpt2, make_mamba, wrap

from neuronspec.analyses.ngram import ngram_layer_from_stats
from neuronspec.analyses.positional import positional_layer_from_stats
from neuronspec.capture.runner import collect_stats

BOS = 0
N_WINDOWS, WINDOW = 128, 16
M = 1.0  # magnitude of a planted indicator pair
WIDTH = 64  # neurons per layer of both test models (GPT-2 n_inner, Mamba d_inner)


def _windows(seed: int = 1) -> torch.Tensor:
    """Random windows; half start with BOS and ~4% of the other positions are BOS too."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (N_WINDOWS, WINDOW), generator=gen)
    ids[::2, 0] = BOS
    ids[torch.rand(ids.shape, generator=gen) < 0.04] = BOS
    return ids


def _stats(loaded, windows):
    return collect_stats(loaded, windows, bos_id=BOS, batch_size=64)


def _fires(loaded, windows, layers=(0, 1)) -> dict[int, torch.Tensor]:
    """``{layer: (n, T, W) bool}``: ``mlp_pre > 0`` captured directly from the site (one pass)."""
    sites = loaded.adapter.capture(windows, [("mlp_pre", layer) for layer in layers])
    return {layer: sites[("mlp_pre", layer)] > 0 for layer in layers}


def _dense_detectors(fires: torch.Tensor, windows: torch.Tensor) -> dict[int, list[int]]:
    """Oracle for the three 95% rules, by brute force on dense firings (METHODS §3).

    Counted positions: not the window start, not BOS. A token is covered when the neuron
    fires on ≥95% of its occurrences; the neuron is a detector when the fewest covered
    tokens (by descending count) reaching ≥95% of its firings number 1–5.
    """
    counted = torch.ones_like(windows, dtype=torch.bool)
    counted[:, 0] = False
    counted &= windows != BOS
    tokens = windows[counted].numpy()  # (K,)
    occurrences = np.bincount(tokens, minlength=VOCAB)
    detectors = {}
    for neuron in range(fires.shape[-1]):
        hits = fires[..., neuron][counted].numpy()  # (K,)
        per_token = np.bincount(tokens[hits], minlength=VOCAB)
        total = int(per_token.sum())
        if total == 0:
            continue
        covered = [
            t for t in range(VOCAB) if per_token[t] and 20 * per_token[t] >= 19 * occurrences[t]
        ]
        covered.sort(key=lambda t: (-per_token[t], t))
        running = 0
        for size, token in enumerate(covered, start=1):
            running += int(per_token[token])
            if 20 * running >= 19 * total:
                if size <= 5:
                    detectors[neuron] = covered[:size]
                break
    return detectors


def _bernoulli_entropy(q: float) -> float:
    return -q * math.log(q) - (1 - q) * math.log(1 - q)


# --------------------------------------------------------------------------- GPT-2 surgery


def _gpt2_reserve(model, dims: list[int]) -> None:
    """No embedding, position embedding, attention, MLP or neuron reads or writes ``dims``."""
    with torch.no_grad():
        model.transformer.wte.weight[:, dims] = 0
        model.transformer.wpe.weight[:, dims] = 0
        for block in model.transformer.h:
            block.attn.c_attn.weight[dims, :] = 0  # Conv1D: (in, out)
            block.attn.c_proj.weight[:, dims] = 0
            block.attn.c_proj.bias[dims] = 0
            block.mlp.c_fc.weight[dims, :] = 0
            block.mlp.c_proj.weight[:, dims] = 0
            block.mlp.c_proj.bias[dims] = 0
            for norm in (block.ln_1, block.ln_2):
                norm.weight[dims] = 1
                norm.bias[dims] = 0


def _gpt2_reader(model, layer: int, neuron: int, pair: tuple[int, int]) -> None:
    """Neuron ``(layer, neuron)`` reads LN(h)_r − LN(h)_r' and nothing else, bias 0.

    Its output row of ``c_proj`` is zeroed: it writes nothing, so later layers do not inherit
    the planted signal (a neuron that reads a positional neuron is itself positional).
    """
    mlp = model.transformer.h[layer].mlp
    c_fc = mlp.c_fc
    with torch.no_grad():
        mlp.c_proj.weight[neuron, :] = 0  # Conv1D: (4d, d)
        c_fc.weight[:, neuron] = 0
        c_fc.weight[pair[0], neuron] = 1
        c_fc.weight[pair[1], neuron] = -1
        c_fc.bias[neuron] = 0


def _set_pair(table: torch.Tensor, pair: tuple[int, int], on: torch.Tensor) -> None:
    """Rows ``on`` of ``table`` get (+M, −M) on ``pair``, all other rows (−M, +M)."""
    value = torch.where(on, M, -M).to(table.dtype)
    with torch.no_grad():
        table[:, pair[0]] = value
        table[:, pair[1]] = -value


# --------------------------------------------------------------------------- Mamba surgery


def _mamba_reserve(model, dims: list[int]) -> None:
    """No mixer reads or writes ``dims``; RMSNorm gain 1 there. Embeddings are set by callers."""
    with torch.no_grad():
        for block in model.backbone.layers:
            block.mixer.in_proj.weight[:, dims] = 0  # (2·d_inner, d)
            block.mixer.out_proj.weight[dims, :] = 0  # (d, d_inner)
            block.norm.weight[dims] = 1


def _mamba_gate_row(model, layer: int, neuron: int) -> torch.Tensor:
    """The row of ``in_proj`` that computes gate z of ``neuron`` (a view), zeroed.

    The channel's ``out_proj`` column is zeroed too: it writes nothing, so later layers do
    not inherit the planted signal.
    """
    mixer = model.backbone.layers[layer].mixer
    with torch.no_grad():
        mixer.out_proj.weight[:, neuron] = 0
        mixer.in_proj.weight[mixer.intermediate_size + neuron] = 0
    return mixer.in_proj.weight[mixer.intermediate_size + neuron]


# --------------------------------------------------------------------------- token detectors


def _assert_planted_detectors(loaded, windows, planted: dict, masks: dict) -> None:
    """Planted ``(layer, neuron) -> token`` fire exactly on ``masks[(layer, neuron)]`` (checked on
    the captured site), and the analysis of every layer reports exactly them, each detecting
    its token alone; the dense oracle agrees (so no ordinary neuron qualifies)."""
    expected: dict[int, dict[int, list[int]]] = {0: {}, 1: {}}
    for (layer, neuron), token in planted.items():
        expected[layer][neuron] = [token]
    stats = _stats(loaded, windows)
    for layer, fires in _fires(loaded, windows).items():
        for neuron in expected[layer]:
            assert torch.equal(fires[..., neuron], masks[(layer, neuron)]), (layer, neuron)
        assert _dense_detectors(fires, windows) == expected[layer]
        finding = ngram_layer_from_stats(stats, layer, model=loaded.model_id)
        assert finding.detector_tokens == expected[layer]
        assert finding.n_token_detectors == len(expected[layer])
        assert finding.detected_tokens == sorted(t for [t] in expected[layer].values())
        assert finding.n_alive == WIDTH  # every neuron fires at some counted position


GPT2_DETECTORS = {(0, 5): 17, (0, 20): 42, (0, 33): 60, (1, 7): 88}  # (layer, neuron) -> token
GPT2_PAIRS = {(0, 5): (24, 25), (0, 20): (26, 27), (0, 33): (28, 29), (1, 7): (30, 31)}
GPT2_ALSO_BOS_AND_START = (0, 33)  # also fires on BOS and at every window start


def _planted_gpt2_detectors():
    model = make_gpt2(seed=0)
    _gpt2_reserve(model, [d for pair in GPT2_PAIRS.values() for d in pair])
    wte, wpe = model.transformer.wte.weight, model.transformer.wpe.weight
    for (layer, neuron), token in GPT2_DETECTORS.items():
        pair = GPT2_PAIRS[(layer, neuron)]
        on = torch.arange(VOCAB) == token
        if (layer, neuron) == GPT2_ALSO_BOS_AND_START:
            on |= torch.arange(VOCAB) == BOS
            with torch.no_grad():  # position 0 adds (+2M, −2M): fires there whatever the token
                wpe[0, pair[0]], wpe[0, pair[1]] = 2 * M, -2 * M
        _set_pair(wte, pair, on)
        _gpt2_reader(model, layer, neuron, pair)
    return wrap(model, "planted-gpt2-detectors")


def test_gpt2_planted_token_detectors_are_found_exactly():
    """GPT-2: three layer-0 neurons and one layer-1 neuron each detect one token.

    Planted: neuron n reads its reserved pair, which only the token embedding writes: (+M, −M)
    for its token, (−M, +M) for every other token (module docstring), so mlp_pre > 0 exactly
    at that token, in either layer (nothing else writes the pair). Neuron 33 of layer 0 also
    fires on BOS (its embedding gets the same +M) and at window position 0 (``wpe[0]`` adds
    (+2M, −2M) on its pair): both are excluded from the n-gram counts (METHODS §3), so it is
    still a detector of its token alone. Counting window starts would add ~64 firings on
    random tokens (the windows that do not start with BOS), and counting BOS would add ~140
    firings on a token it always fires on, listing BOS; either fails the assertion. Ordinary neurons fire on about
    half of the tokens and are no detectors; the dense oracle re-derives the whole set.
    """
    windows = _windows()
    start = torch.arange(WINDOW).expand_as(windows) == 0
    masks = {unit: windows == token for unit, token in GPT2_DETECTORS.items()}
    masks[GPT2_ALSO_BOS_AND_START] |= (windows == BOS) | start
    _assert_planted_detectors(_planted_gpt2_detectors(), windows, GPT2_DETECTORS, masks)


MAMBA_DETECTORS = {(0, 3): 11, (0, 40): 57, (1, 21): 88}  # (layer, neuron) -> token
MAMBA_PAIRS = {(0, 3): (26, 27), (0, 40): (28, 29), (1, 21): (30, 31)}
MAMBA_ALSO_BOS = (0, 40)  # also fires on BOS


def _planted_mamba_detectors():
    model = make_mamba(seed=0)
    _mamba_reserve(model, [d for pair in MAMBA_PAIRS.values() for d in pair])
    emb = model.backbone.embeddings.weight
    for (layer, neuron), token in MAMBA_DETECTORS.items():
        pair = MAMBA_PAIRS[(layer, neuron)]
        on = torch.arange(VOCAB) == token
        if (layer, neuron) == MAMBA_ALSO_BOS:
            on |= torch.arange(VOCAB) == BOS
        _set_pair(emb, pair, on)
        row = _mamba_gate_row(model, layer, neuron)
        with torch.no_grad():
            row[pair[0]], row[pair[1]] = 1.0, -1.0
    return wrap(model, "planted-mamba-detectors")


def test_mamba_planted_token_detectors_are_found_exactly():
    """Mamba: gate z of two layer-0 channels and one layer-1 channel detects one token.

    Planted: z_n = s·(x_r − x_r') with s > 0 the RMSNorm scale and (x_r, x_r') the neuron's
    reserved pair, (+M, −M) in its token's embedding and (−M, +M) in all others; no mixer
    writes the pair (``out_proj`` rows zeroed), so at layer 1 the residual still carries the
    embedding's values there. Hence z_n = ±2M·s, > 0 exactly at the token (never 0, so the
    strict ``> 0`` firing rule is not at its edge). Channel 40 also fires on BOS, which the
    counts exclude: it must be a detector of its token alone. Ordinary layer-0 gates are a
    function of the current token that is positive on about half the vocabulary.
    """
    windows = _windows()
    masks = {unit: windows == token for unit, token in MAMBA_DETECTORS.items()}
    masks[MAMBA_ALSO_BOS] |= windows == BOS
    _assert_planted_detectors(_planted_mamba_detectors(), windows, MAMBA_DETECTORS, masks)


# --------------------------------------------------------------------------- positional, GPT-2

GPT2_POS_PAIR = (30, 31)


@pytest.mark.parametrize(
    ("layer", "neuron", "first", "last"),
    [(0, 9, 0, 3), (0, 50, 8, 11), (0, 2, 5, 15), (1, 44, 12, 15)],
)
def test_gpt2_planted_positional_neuron(layer, neuron, first, last):
    """GPT-2: one neuron fires exactly at window positions first..last.

    Planted: ``wpe`` rows first..last hold (+M, −M) on the reserved pair, all other rows
    (−M, +M); the token embeddings are 0 there, so mlp_pre = ±2M/σ with the sign of "in
    range" at any layer. Every position carries the pair with the same magnitude, so the
    LayerNorm scale does not single out the range for the other neurons.

    The rest of ``wpe`` is zeroed: at initialisation it has the same scale (std 0.02) as
    ``wte``, which makes nearly every random neuron positional
    (:func:`test_unmodified_models_positional_control`). With it gone, an ordinary neuron's
    firing depends on the current token and (through attention) on the context, not on the
    position, so its I(act; pos) is only sampling noise (≤ 0.02 nats here, measured).

    Exact answer: fr(p) = 1 in range, 0 outside, so I = H(k/T) (binary entropy, k = range
    length) and the only run above fr = k/T is [first, last].
    """
    model = make_gpt2(seed=0)
    with torch.no_grad():
        model.transformer.wpe.weight.zero_()
    _gpt2_reserve(model, list(GPT2_POS_PAIR))
    in_range = (torch.arange(model.config.n_positions) >= first) & (
        torch.arange(model.config.n_positions) <= last
    )
    _set_pair(model.transformer.wpe.weight, GPT2_POS_PAIR, in_range)
    _gpt2_reader(model, layer, neuron, GPT2_POS_PAIR)
    loaded = wrap(model, "planted-gpt2-positional")
    windows = _windows()

    fires = _fires(loaded, windows, [layer])[layer]
    assert torch.equal(fires[..., neuron], in_range[:WINDOW].expand_as(windows))

    stats = _stats(loaded, windows)
    finding = positional_layer_from_stats(stats, layer, model="planted-gpt2")
    assert finding.positional_neurons == [neuron]
    assert finding.main_ranges == [[first, last]]
    assert finding.above_rate_ranges == {neuron: [[first, last]]}
    k = last - first + 1
    assert finding.mutual_information == pytest.approx([_bernoulli_entropy(k / WINDOW)], abs=1e-12)
    other = positional_layer_from_stats(stats, 1 - layer, model="planted-gpt2")
    assert other.positional_neurons == []


# --------------------------------------------------------------------------- positional, Mamba

MAMBA_COUNTER_CHANNEL = 5  # layer-0 SSM channel that counts positions
MAMBA_COUNTER_STATE = 0  # its state dimension
MAMBA_COUNTER_DIM, MAMBA_CONST_DIM = 31, 30  # reserved residual dimensions
KAPPA = 1.0  # every embedding's value on the constant dimension
GATE_Z = 4.0  # the counter channel's (constant) gate pre-activation


def _planted_mamba_counter(model) -> float:
    """Layer 0 writes g·(i+1) into the counter dim at window position i; returns g.

    - Embeddings: counter dim 0, constant dim κ, the other 30 dims rescaled to unit norm, so
      every token has the same RMS and RMSNorm(x) is one fixed multiple of x at layer 0.
    - Channel k: conv weights 0 and conv bias 1, so its scan input is x_k = SiLU(1) at every
      position (the causal padding only meets zero weights). dt_proj row k is 0 with bias 0:
      Δ_k = softplus(0) = ln 2. A_log[k, n0] = −40, so exp(Δ·A) rounds to 1: no decay.
      D_k = 0. x_proj makes B[n0] = C[n0] = x_k for all channels, and C[n] = 0 for n ≠ n0,
      so y_k(i) = Σ_{j≤i} C·Δ·B·x_k = (i+1)·ln2·x_k³ exactly.
    - Its gate z_k reads only the constant dim (equal to GATE_Z for every token); out_proj
      sends channel k only to the counter dim, and nothing else writes the counter or the
      constant dim: residual_counter(i) = g·(i+1), g = ln2·x_k³·SiLU(z_k).
    """
    dims = [MAMBA_COUNTER_DIM, MAMBA_CONST_DIM]
    _mamba_reserve(model, dims)
    k, n0 = MAMBA_COUNTER_CHANNEL, MAMBA_COUNTER_STATE
    emb = model.backbone.embeddings.weight
    mixer = model.backbone.layers[0].mixer
    rank, state = mixer.time_step_rank, mixer.ssm_state_size
    hidden = emb.shape[1]
    with torch.no_grad():
        ordinary = [d for d in range(hidden) if d not in dims]
        emb[:, ordinary] /= emb[:, ordinary].norm(dim=1, keepdim=True)
        emb[:, MAMBA_COUNTER_DIM] = 0
        emb[:, MAMBA_CONST_DIM] = KAPPA
        rms = math.sqrt((1.0 + KAPPA**2) / hidden + model.config.layer_norm_epsilon)
        mixer.conv1d.weight[k] = 0
        mixer.conv1d.bias[k] = 1
        mixer.dt_proj.weight[k] = 0
        mixer.dt_proj.bias[k] = 0
        mixer.A_log[k, n0] = -40.0
        mixer.D[k] = 0
        mixer.x_proj.weight[rank + state : rank + 2 * state] = 0  # every C[n] = 0 ...
        mixer.x_proj.weight[rank + state + n0, k] = 1  # ... but C[n0] = x_k
        mixer.x_proj.weight[rank + n0] = 0
        mixer.x_proj.weight[rank + n0, k] = 1  # B[n0] = x_k
        gate = _mamba_gate_row(model, 0, k)
        gate[MAMBA_CONST_DIM] = GATE_Z * rms / KAPPA
        mixer.out_proj.weight[:, k] = 0
        mixer.out_proj.weight[MAMBA_COUNTER_DIM, k] = 1
    x_k = F.silu(torch.tensor(1.0, dtype=torch.float64)).item()
    z_k = F.silu(torch.tensor(GATE_Z, dtype=torch.float64)).item()
    return math.log(2.0) * x_k**3 * z_k


@pytest.mark.parametrize(("neuron", "first", "last"), [(12, 4, 15), (37, 0, 9), (60, 11, 15)])
def test_mamba_planted_positional_neuron(neuron, first, last):
    """Mamba: a layer-1 gate fires exactly at window positions first..last.

    Mamba has no position embedding; layer 0 is built into a counter
    (:func:`_planted_mamba_counter`): residual dim c holds g·(i+1) at position i. The
    layer-1 gate of ``neuron`` reads z = s·(±(x_c) ∓ (θ/κ)·x_const) with s > 0 the RMSNorm
    scale and θ = g·(edge + ½) for the range's inner edge, so z > 0 exactly for i ≥ first
    (a range reaching the window end) or i ≤ last (a range from the window start); the
    margin is half a counter step, far above float error. Ordinary gates read neither
    reserved dim: at layer 0 they are functions of the current token, and at layer 1 they
    see only token and context, whose statistics do not depend on the position.

    Exact answer: I = H(k/T) and the only run above the overall rate is [first, last].
    """
    assert first == 0 or last == WINDOW - 1  # one threshold gives a prefix or a suffix
    model = make_mamba(seed=0)
    g = _planted_mamba_counter(model)
    row = _mamba_gate_row(model, 1, neuron)
    with torch.no_grad():
        if last == WINDOW - 1:  # fires once (i+1) > first + ½
            row[MAMBA_COUNTER_DIM], row[MAMBA_CONST_DIM] = 1.0, -g * (first + 0.5) / KAPPA
        else:  # fires while (i+1) < last + 1.5
            row[MAMBA_COUNTER_DIM], row[MAMBA_CONST_DIM] = -1.0, g * (last + 1.5) / KAPPA
    loaded = wrap(model, "planted-mamba-positional")
    windows = _windows()

    sites = loaded.adapter.capture(windows, [("resid", 0), ("mlp_pre", 1)])
    resid, gate = sites[("resid", 0)], sites[("mlp_pre", 1)]
    counter = torch.arange(1, WINDOW + 1, dtype=torch.float64) * g
    torch.testing.assert_close(
        resid[..., MAMBA_COUNTER_DIM].double(), counter.expand(N_WINDOWS, -1), rtol=1e-5, atol=0
    )
    in_range = (torch.arange(WINDOW) >= first) & (torch.arange(WINDOW) <= last)
    assert torch.equal(gate[..., neuron] > 0, in_range.expand_as(windows))

    stats = _stats(loaded, windows)
    finding = positional_layer_from_stats(stats, 1, model="planted-mamba")
    assert finding.positional_neurons == [neuron]
    assert finding.main_ranges == [[first, last]]
    assert finding.above_rate_ranges == {neuron: [[first, last]]}
    k = last - first + 1
    assert finding.mutual_information == pytest.approx([_bernoulli_entropy(k / WINDOW)], abs=1e-12)
    assert positional_layer_from_stats(stats, 0, model="planted-mamba").positional_neurons == []


# --------------------------------------------------------------------------- negative controls


def test_unmodified_models_positional_control(family):
    """Unmodified random models on the same windows: what is true, and why.

    - Mamba, layer 0: no positional neuron. The gate z = in_proj_z · RMSNorm(embedding) is a
      function of the current token only, and the windows are i.i.d. random tokens, so
      fr_n(p) differs from fr_n only by sampling noise.
    - GPT-2, layer 0: most neurons *are* positional, and correctly so. At initialisation
      ``wpe`` has the same scale as ``wte`` (std 0.02), so c_fc sees a per-position offset as
      large as the token signal and fr_n(p) swings far from fr_n. Zeroing ``wpe`` removes
      every positional neuron: the signal was the position embedding, not an artefact of
      the counts.
    - Neither reports a token detector: random neurons fire on about half of the tokens
      (confirmed by the dense oracle).
    """
    windows = _windows()
    model = make_gpt2(seed=0) if family == "gpt2" else make_mamba(seed=0)
    loaded = wrap(model, f"random-{family}")
    stats = _stats(loaded, windows)
    finding = positional_layer_from_stats(stats, 0, model=family)
    for layer, fires in _fires(loaded, windows).items():
        assert ngram_layer_from_stats(stats, layer, model=family).detector_tokens == {}
        assert _dense_detectors(fires, windows) == {}
    if family == "mamba":
        assert finding.positional_neurons == []
        return
    assert finding.n_positional > WIDTH // 2
    with torch.no_grad():
        model.transformer.wpe.weight.zero_()
    blind = positional_layer_from_stats(_stats(loaded, windows), 0, model=family)
    assert blind.positional_neurons == []
