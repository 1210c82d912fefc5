"""Neuron cards (neuronspec/cards.py, report/cards.py): the evidence of a planted detector
neuron, the card's numbers against the statistics, and links both ways in the report."""

from __future__ import annotations

import re

import pytest
import torch

from neuronspec.capture.config import StatsConfig
from neuronspec.capture.stats import NeuronStats
from neuronspec.cards import BEFORE, cards_for_run, neuron_card
from neuronspec.errors import NeuronSpecError
from neuronspec.report.html import render_html

DETECTED = 7  # the token neuron 1 detects
WINDOWS, LENGTH, VOCAB = 40, 16, 20


@pytest.fixture(scope="module")
def planted():
    """Neuron 1 fires (and is active) exactly on token 7; neurons 0 and 2 are noise."""
    generator = torch.Generator().manual_seed(5)
    windows = torch.randint(1, VOCAB, (WINDOWS, LENGTH), generator=generator)
    stats = NeuronStats.empty([3], LENGTH, VOCAB, StatsConfig(top_contexts=16), backend="torch")
    for start in range(0, WINDOWS, 8):
        ids = windows[start : start + 8]
        act = torch.rand(8, LENGTH, 3, generator=generator)
        act[:, :, 1] = torch.where(ids == DETECTED, 1.0 + act[:, :, 1], -0.1 * act[:, :, 1])
        stats.add_layer(0, act - 0.5, act, ids, stats.add_tokens(ids, bos_id=None))
    return stats, windows


def test_a_planted_detector_card_shows_its_token_everywhere(planted):
    stats, windows = planted
    card = neuron_card("planted", stats, windows, 0, 1, named_by=["token_detecting"])
    assert len(card.contexts) == stats.config.top_contexts
    for context in card.contexts:
        assert context["context_tokens"][context["at"]] == DETECTED  # highlighted token
        assert windows[context["window"], context["position"]] == DETECTED
        assert context["at"] == min(context["position"], BEFORE)
    occurrences = int((windows[:, 1:] == DETECTED).sum())  # counted positions: not position 0
    (coverage,) = card.token_coverage
    assert coverage == {
        "token": DETECTED,
        "count": occurrences,
        "share_of_firings": 1.0,
        "share_of_occurrences": 1.0,
    }
    low, high = card.firing_frequency_interval
    assert low < card.firing_frequency < high
    assert card.firing_frequency == int((windows == DETECTED).sum()) / windows.numel()
    by_position = (windows == DETECTED).double().mean(0)  # fr_n(p)
    assert card.firing_by_position == pytest.approx(by_position.tolist(), abs=0)


def test_a_card_refuses_a_neuron_out_of_range_and_other_windows(planted):
    stats, windows = planted
    with pytest.raises(NeuronSpecError, match="neuron 3 is out of range"):
        neuron_card("planted", stats, windows, 0, 3)
    with pytest.raises(NeuronSpecError, match="not the ones the statistics cover"):
        neuron_card("planted", stats, windows[:10], 0, 1)


def test_the_report_links_neuron_ids_to_cards_and_cards_back_to_findings(planted):
    stats, windows = planted
    sets = {
        "0": {
            "token_detecting": {"site": "mlp", "neurons": [1]},
            "dead": {"site": "mlp", "neurons": []},
        }
    }
    cards = cards_for_run("planted", stats, windows, sets)
    assert list(cards) == ["0:1"]
    results = {
        "models": {
            "planted": {
                "analyses": {
                    "neuron_sets": sets,
                    "ngram": {"0": {"layer": 0, "n_token_detectors": 1}},
                },
                "cards": cards,
                "tokens": {str(i): f"t{i}" for i in range(VOCAB)},
            }
        }
    }
    page = render_html(results, [])
    anchors = set(re.findall(r'id="([^"]+)"', page))
    links = re.findall(r'href="#([^"]+)"', page)
    card_links = [link for link in links if link.startswith("card-")]
    assert card_links and all(link in anchors for link in links)
    assert 'href="#planted-ngram"' in page  # the card links back to the finding naming it
    assert page.count('<mark class="fire">t7</mark>') == stats.config.top_contexts


def test_neuron_ids_in_finding_tables_link_to_cards_of_their_layer_and_site(planted):
    """Per-layer tables, records with their own ``layer`` (causal candidates) and the
    card's evidence: an mlp neuron id with a card is a link; a ``dt`` channel id, an id
    without a card and a count (``n_neurons``) are not."""
    stats, windows = planted
    sets = {
        "0": {
            "causal": {
                "site": "mlp",
                "neurons": [1],
                "evidence": {"1": {"kl": 0.25, "p_value": 0.01}},
            },
            "token_detecting": {
                "site": "mlp",
                "neurons": [1],
                "evidence": {"1": {"detected_tokens": [DETECTED]}},
            },
        }
    }
    cards = cards_for_run("planted", stats, windows, sets)
    assert cards["0:1"]["evidence"] == {
        "causal": {"kl": 0.25, "p_value": 0.01},
        "token_detecting": {"detected_tokens": [DETECTED]},
    }
    link = 'href="#card-planted-L0-N1"'
    causal = {
        "site": "mlp",
        "layers": [
            {
                "layer": 0,
                "candidates": [{"layer": 0, "neuron": 1, "kl": 0.25}, {"layer": 0, "neuron": 2}],
                "causal_neurons": [1],
            }
        ],
    }
    delta = {"layer": 0, "site": "dt", "top_by_variance": [1, 2], "top_variance": [3.0, 2.0]}
    results = {
        "models": {
            "planted": {
                "analyses": {
                    "neuron_sets": sets,
                    "causal": {"all": causal},
                    "delta_sensitive": {"0": delta},
                    "positional": {"0": {"layer": 0, "n_neurons": 1, "top_neurons": [2, 1]}},
                },
                "cards": cards,
                "tokens": {str(i): f"t{i}" for i in range(VOCAB)},
            }
        }
    }

    def section(name: str) -> str:
        page = render_html(results, [])
        start = page.index(f'id="planted-{name}"')
        return page[start : page.index("</section>", start)]

    assert link in section("causal")  # the candidates' and the causal set's neuron 1
    assert section("causal").count('class="neuron"') == 2  # neuron 2 has no card
    assert link in section("positional")
    assert link not in section("delta_sensitive")  # dt channel 1 is not mlp neuron 1
    card = section("cards")
    assert "kl = 0.25" in card and "p_value = 0.01" in card
    assert f'data-token="{DETECTED}" title="token id {DETECTED}">' in card  # shown as text
