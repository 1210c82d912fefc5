"""``python -m neuronspec collect``: one process and two gloo ranks (torchrun, loopback)
give the statistics of the in-process pass, and ``pytest specs/`` afterwards runs warm."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from neuronspec.capture.cache import TensorCache
from neuronspec.capture.collect import entry_key, merge_across_ranks
from neuronspec.capture.format import merge_rules, merge_tensor_dicts
from neuronspec.capture.packed_rows import packed_layout
from neuronspec.capture.stats import NeuronStats
from neuronspec.cli.collect import parse_run_config
from neuronspec.errors import NeuronSpecError
from neuronspec.session import SpecSession

REPO = Path(__file__).resolve().parents[1]
MODELS = "tiny-gpt2,tiny-mamba"
OPTIONS = ["--models", MODELS, "--text-limit", "100", "--batch-size", "4", "--top-contexts", "4"]

SENTINEL = """
import torch

def _no_forward(module, args):
    raise AssertionError(f"forward of {type(module).__name__} in a warm run")

def pytest_configure(config):
    torch.nn.modules.module.register_module_forward_pre_hook(_no_forward)
    import neuronspec.capture.runner as runner

    def no_pass(*args, **kwargs):
        raise AssertionError("statistics pass in a warm run")

    runner.collect_stats = no_pass
"""


def _env() -> dict[str, str]:
    """This checkout first on the path (not the editable install), one thread, offline."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def _stats_entries(cache_dir: Path) -> dict[str, NeuronStats]:
    """The statistics entries of a cache directory by key (windows entries left out)."""
    cache, found = TensorCache(cache_dir), {}
    for path in cache_dir.glob("*.safetensors"):
        tensors, meta = cache.load(path.stem)
        if "widths" in meta:
            found[path.stem] = NeuronStats.from_tensors(tensors, meta)
    return found


@pytest.fixture(scope="module")
def collected(tmp_path_factory):
    """Cache directories filled by one process and by two torchrun ranks."""
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    work = tmp_path_factory.mktemp("work")
    _run(
        [sys.executable, "-m", "neuronspec", "collect", *OPTIONS, f"--neuronspec-cache={one}"], work
    )
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    result = _run(
        [*torchrun, "-m", "neuronspec", "collect", *OPTIONS, f"--neuronspec-cache={two}"], work
    )
    assert "on 2 rank(s)" in result.stdout
    return one, two


def _assert_equal(a: NeuronStats, b: NeuronStats) -> None:
    ta, tb = a.to_tensors(table_only=True), b.to_tensors(table_only=True)
    assert ta.keys() == tb.keys()
    for name in ta:
        x, y = ta[name], tb[name]
        assert x.dtype == y.dtype and x.shape == y.shape, name
        if x.dtype.is_floating_point:
            torch.testing.assert_close(x, y, rtol=1e-6, atol=0, msg=name)
        else:
            assert torch.equal(x, y), name


def test_two_gloo_ranks_equal_one_process_and_the_pytest_pass(collected):
    one, two = _stats_entries(collected[0]), _stats_entries(collected[1])
    assert len(one) == 2 and one.keys() == two.keys()  # same keys: the pytest run's keys
    run = parse_run_config([*OPTIONS, "--neuronspec-cache=none"])
    session = SpecSession(run)
    for model_id in run.models:  # the pytest pass, in this process, no cache
        key = entry_key(session, model_id)
        reference = session.stats(model_id)
        _assert_equal(one[key], two[key])
        _assert_equal(one[key], reference)
        stored, _ = TensorCache(collected[1]).load(key)  # merged as packed rows, not a table
        assert stored["layer0.pair_dense"].numel() and not stored["layer0.pair_key"].numel()
        assert one[key].n_tokens == reference.n_tokens > 0


def test_specs_after_collect_run_no_forward(collected, tmp_path):
    """The repo's Voita specs, copied (their snapshots are of the full corpus, so they are
    rewritten in the copy), on the cache filled by two ranks: no module's forward runs."""
    shutil.copytree(REPO / "specs", tmp_path / "specs")
    (tmp_path / "sentinel_plugin.py").write_text(SENTINEL)
    env_args = [sys.executable, "-m", "pytest", "specs", "-p", "sentinel_plugin"]
    env_args += [
        "-o",
        "neuronspec=true",  # the copy has no pyproject: opt in to the plugin
        "-p",
        "no:cacheprovider",
        "-q",
        "--snapshot-update",
        "-m",
        "dead or ngram or positional",
    ]
    env = _env()
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env["PYTHONPATH"]])
    result = subprocess.run(
        [*env_args, *OPTIONS, f"--neuronspec-cache={collected[1]}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert " passed" in result.stdout and "error" not in result.stdout.lower()


def test_sentinel_stops_a_forward(random_model):
    """The warm check can fail: the sentinel's hook stops any module's forward."""
    namespace: dict = {}
    exec(SENTINEL, namespace)
    handle = torch.nn.modules.module.register_module_forward_pre_hook(namespace["_no_forward"])
    try:
        with pytest.raises(AssertionError, match="in a warm run"):
            random_model.model(input_ids=torch.zeros(1, 4, dtype=torch.long))
    finally:
        handle.remove()


def test_merge_follows_the_rules_of_neuronstats_merge(random_model):
    """In a group of one, the distributed merge returns the statistics unchanged, with the
    (neuron, token) counts as packed rows in the corpus's layout; every field the stats hold
    has a rule (new fields default to a sum)."""
    from neuronspec.capture.collect import init_group
    from neuronspec.capture.runner import collect_stats

    ids = torch.randint(0, 97, (6, 16), generator=torch.Generator().manual_seed(0))
    stats = collect_stats(random_model, ids, bos_id=None, batch_size=3)
    group, created = init_group("cpu")
    try:
        merged = merge_across_ranks(stats, group)
    finally:
        if created:
            torch.distributed.destroy_process_group()
    assert merged["layer0.pair_dense"].numel() and not merged["layer0.pair_key"].numel()
    _assert_equal(NeuronStats.from_tensors(merged, stats.meta()), stats)
    rules = merge_rules(list(merged))
    assert rules["layer0.act_absmax"] == "max" and rules["layer0.pair_count"] == "counts"
    assert rules["layer0.fire_by_pos"] == "sum" and rules["tri_occ_key"] == "keys"
    assert rules["layer0.pair_dense"] == "packed" and rules["layer0.pair_dense_bits"] == "layout"
    assert merge_rules(["layer0.some_new_field"]) == {"layer0.some_new_field": "sum"}


def test_shards_in_one_layout_add_field_by_field(random_model):
    """Two shards laid out by the whole corpus's token counts merge (NeuronStats rules:
    packed rows added field by field, every width) into the whole corpus's statistics."""
    from neuronspec.capture.runner import collect_stats

    g = torch.Generator().manual_seed(1)
    draw = torch.randint(0, 97, (80, 16), generator=g)
    ids = draw.clone()  # counts set the widths: ~13 (4 bits) for most tokens, and
    ids[draw < 35] = 5  # ~450: 16 bits
    ids[(draw >= 35) & (draw < 45)] = 6  # ~130: 8 bits
    ids[draw >= 95] = 94
    ids[0, 3], ids[50, 3], ids[60, 3] = 95, 96, 96  # once (1 bit), twice (2 bits)
    parts = [
        collect_stats(random_model, ids[:40], bos_id=None),
        collect_stats(random_model, ids[40:], bos_id=None, window_offset=40),
    ]
    whole = collect_stats(random_model, ids, bos_id=None)
    layout = packed_layout(whole.token_count, sum(layer.width for layer in whole.layers))
    assert {int(b) for b in layout[1]} >= {1, 2, 4, 8, 16}
    merged = merge_tensor_dicts(*(part.to_tensors(layout=layout) for part in parts))
    _assert_equal(NeuronStats.from_tensors(merged, whole.meta()), whole)


def test_bad_options_are_usage_errors(capsys):
    from neuronspec.cli.collect import main

    with pytest.raises(NeuronSpecError, match="--batch-size"):
        parse_run_config(["--batch-size", "0"])
    assert main(["--models", "mamba13m"]) == 2
    assert "unknown model 'mamba13m'" in capsys.readouterr().err
    assert main(["--neuronspec-cache", "none"]) == 2
