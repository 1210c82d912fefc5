"""A kernel build that fails is tried once per process, warned about once with its cause,
and the statistics pass and the Mamba scan fall back to the torch forms."""

from __future__ import annotations

import warnings

import pytest
import torch
from builders import make_mamba, wrap

from neuronspec import native
from neuronspec.capture.runner import collect_stats
from neuronspec.native import KernelUnavailableError, load_library

FAILING_CC = """#!/bin/sh
echo run >> "{log}"
echo "cc: fatal error: simulated compiler failure" >&2
exit 1
"""


@pytest.fixture
def failing_compiler(tmp_path, monkeypatch):
    """``$CC`` is a compiler that logs each invocation and fails; an empty kernel directory."""
    log = tmp_path / "invocations.log"
    cc = tmp_path / "failing-cc"
    cc.write_text(FAILING_CC.format(log=log))
    cc.chmod(0o755)
    monkeypatch.setenv("CC", str(cc))
    monkeypatch.setenv("NEURONSPEC_KERNEL_DIR", str(tmp_path / "kernels"))
    native.forget()
    yield log
    native.forget()


def test_failed_build_runs_the_compiler_once_per_process(failing_compiler):
    log = failing_compiler
    with pytest.raises(KernelUnavailableError) as first:
        load_library()
    runs = log.read_text().count("run")  # `cc --version`, then the build
    assert runs == 2
    assert "simulated compiler failure" in str(first.value)
    for _ in range(5):
        with pytest.raises(KernelUnavailableError, match="simulated compiler failure"):
            load_library()
    assert log.read_text().count("run") == runs


def test_statistics_pass_falls_back_with_one_warning_naming_the_cause(failing_compiler):
    """A Mamba model (scan and stats kernels both wanted) over several batches and layers:
    the compiler runs once, one warning, and the numbers equal the torch forms'."""
    loaded = wrap(make_mamba(n_layer=3), "random-mamba")
    windows = torch.randint(1, 97, (6, 12), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stats = collect_stats(loaded, windows, bos_id=0, batch_size=2)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1, messages
    assert messages[0].startswith("neuronspec: the native kernels are unavailable (compiling")
    assert "simulated compiler failure" in messages[0]
    assert messages[0].endswith("using the torch forms instead (same definitions, slower)")
    assert failing_compiler.read_text().count("run") == 2
    reference = collect_stats(loaded, windows, bos_id=0, batch_size=2, backend="torch")
    for name, tensor in reference.to_tensors(table_only=True).items():
        torch.testing.assert_close(stats.to_tensors(table_only=True)[name], tensor, msg=name)


def test_unusable_kernel_directory_falls_back_to_torch(tmp_path, monkeypatch):
    """NEURONSPEC_KERNEL_DIR under a regular file: no directory can be made there."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("NEURONSPEC_KERNEL_DIR", str(blocker / "kernels"))
    native.forget()
    try:
        with pytest.raises(KernelUnavailableError) as error:
            load_library()
        assert str(error.value) == (
            f"the kernel directory {blocker / 'kernels'} is unusable (Not a directory); "
            "set NEURONSPEC_KERNEL_DIR to a writable directory"
        )
        with pytest.warns(RuntimeWarning, match="kernel directory .* is unusable"):
            assert native.kernels_available() is False
    finally:
        native.forget()
