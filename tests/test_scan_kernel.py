"""The C scan kernel equals an exact sequential scan; building and choosing it is explicit.

Reference: :func:`tests.test_scan._exact_reference_scan`, transformers' loop in the
inputs' own dtype. Shapes straddle the kernel's channel blocks (16 float32 / 8 float64
lanes) and its N = 16 specialisation.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_scan import _close, _exact_reference_scan

from neuronspec import native
from neuronspec.models.kernel import kernel_conv_silu, kernel_scan
from neuronspec.models.scan import UnsupportedScanInputError, _scan_bl, selective_scan
from neuronspec.native import KernelUnavailableError, load_library

TOL = {torch.float32: 1e-6, torch.float64: 1e-13}


def _inputs(b, d, L, N, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    A = -torch.exp(r(d, N) + 0.5)  # (d, N)
    return r(b, d, L), r(b, d, L), A, r(b, N, L), r(b, N, L), r(d), r(b, d, L), r(d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 37, 23, 16), (3, 17, 9, 5), (2, 40, 64, 16)])
def test_kernel_matches_exact_scan(dtype, shape):
    b, d, L, N = shape
    x, dt, A, B, C, D, z, bias = _inputs(b, d, L, N, dtype)
    for skip, gate in ((D, z), (None, None)):
        out, last = selective_scan(
            x, dt, A, B, C, skip, gate, bias, return_last_state=True, backend="kernel"
        )
        ref, ref_last = _exact_reference_scan(
            x, dt, A, B, C, skip, gate, bias, delta_softplus=True, return_last_state=True
        )
        _close(out, ref, TOL[dtype], f"out {shape} D/z {skip is not None}")
        _close(last, ref_last, TOL[dtype], f"last state {shape}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_equals_chunked_scan_and_splits_over_threads(dtype):
    # 100 channels: full blocks of 32 (float32) or 8 (float64) lanes and a partial one
    x, dt, A, B, C, D, z, bias = _inputs(2, 100, 30, 16, dtype, seed=1)
    chunked = selective_scan(x, dt, A, B, C, D, z, bias, backend="chunked")
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            out = selective_scan(x, dt, A, B, C, D, z, bias, backend="kernel")
            _close(out, chunked, {torch.float32: 1e-5, torch.float64: 1e-13}[dtype], threads)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", ["kernel", "chunked"])
def test_scan_sums_delta_over_positions(dtype, backend):
    """``delta_sum`` (B, d) = Σ_t Δ_t, Δ = softplus(dt + bias) or dt as given, in float64."""
    x, dt, A, B, C, D, z, bias = _inputs(3, 100, 29, 16, dtype, seed=2)
    bl = lambda t: t.transpose(1, 2)  # noqa: E731  (B, d, L) -> (B, L, d)
    before = torch.get_num_threads()
    try:
        for threads, delta_bias, softplus in ((1, bias, True), (3, None, True), (2, None, False)):
            torch.set_num_threads(threads)
            sums = torch.full((3, 100), float("nan"), dtype=torch.float64)
            _scan_bl(
                bl(x), bl(dt), A, bl(B), bl(C), D, bl(z), delta_bias, softplus, 8, dtype,
                backend, sums,
            )  # fmt: skip
            delta = dt.double() + (0 if delta_bias is None else delta_bias.double()[:, None])
            expected = (F.softplus(delta) if softplus else delta).sum(2)  # (B, d)
            _close(sums, expected, {torch.float32: 1e-6, torch.float64: 1e-13}[dtype], threads)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_conv_kernel_matches_causal_conv1d(dtype):
    g = torch.Generator().manual_seed(5)
    xz = torch.randn(3, 11, 2 * 21, generator=g, dtype=dtype)  # (B, L, 2d), x = first half
    weight = torch.randn(21, 1, 4, generator=g, dtype=dtype)
    bias = torch.randn(21, generator=g, dtype=dtype)
    x = xz[..., :21]
    for b in (bias, None):
        out = kernel_conv_silu(x, weight, b)
        ref = F.silu(F.conv1d(x.transpose(1, 2), weight, b, padding=3, groups=21)[..., :11])
        _close(out, ref.transpose(1, 2), TOL[dtype], f"conv bias={b is not None}")


def test_kernel_softplus_matches_torch_across_its_range():
    """Δ = softplus(dt + bias) inside the kernel: tiny, moderate, threshold and large dt."""
    dt = torch.tensor([-120.0, -30.0, -5.0, -1e-3, 0.0, 1e-3, 3.0, 19.99, 20.0, 20.01, 60.0])
    for dtype in (torch.float32, torch.float64):
        x = torch.ones(1, 1, len(dt), dtype=dtype)
        A = -torch.ones(1, 1, dtype=dtype)
        B = torch.ones(1, 1, len(dt), dtype=dtype)
        C = torch.zeros(1, 1, len(dt), dtype=dtype)
        D = torch.zeros(1, dtype=dtype)
        # with C = 0 and D = 0 the output is 0; read Δ off h instead: one step, h = Δ·x·B
        for t, value in enumerate(dt.tolist()):
            step = torch.full((1, 1, 1), value, dtype=dtype)
            _, last = selective_scan(
                x[..., :1], step, A, B[..., :1], C[..., :1], D, return_last_state=True,
                backend="kernel",
            )  # fmt: skip
            expected = F.softplus(step.double()).item()
            assert last.item() == pytest.approx(expected, rel=TOL[dtype], abs=1e-40), (dtype, t)


def test_kernel_handles_extreme_step_sizes_and_gates():
    """exp clamps: Δ·A far below -87 decays to exactly 0, huge |z| gives a finite gate."""
    x, dt, A, B, C, D, z, _ = _inputs(1, 16, 12, 16, torch.float32, seed=2)
    dt = dt * 200  # softplus(Δ) up to ~500: decays exp(ΔA) underflow
    z = z * 200
    out = selective_scan(x, dt, A, B, C, D, z, backend="kernel")
    ref = _exact_reference_scan(x, dt, A, B, C, D, z, delta_softplus=True)
    assert torch.isfinite(out).all()
    _close(out, ref, 1e-5, "extreme inputs")


def test_kernels_share_torchs_openmp_runtime():
    """One libgomp in the process: the kernels run on torch's thread pool (Linux)."""
    load_library()
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("no /proc/self/maps on this platform")
    libgomp = {line.split()[-1] for line in maps.read_text().splitlines() if "libgomp" in line}
    assert len(libgomp) <= 1, libgomp


def test_auto_uses_kernel_without_grad_and_chunked_with_grad(monkeypatch):
    calls = []
    monkeypatch.setattr(
        "neuronspec.models.scan.kernel_scan", lambda *a: calls.append(1) or kernel_scan(*a)
    )
    x, dt, A, B, C, D, z, bias = _inputs(1, 8, 5, 3, torch.float64)
    selective_scan(x, dt, A, B, C, D, z, bias)
    assert calls == [1]
    selective_scan(x.requires_grad_(), dt, A, B, C, D, z, bias).sum().backward()
    assert calls == [1] and x.grad is not None


def test_kernel_backend_refuses_grad_and_unknown_backend():
    x, dt, A, B, C, D, z, bias = _inputs(1, 8, 5, 3, torch.float64)
    with pytest.raises(UnsupportedScanInputError, match="no backward"):
        selective_scan(x.requires_grad_(), dt, A, B, C, backend="kernel")
    with pytest.raises(UnsupportedScanInputError, match="backend must be one of"):
        selective_scan(x.detach(), dt, A, B, C, backend="cuda")


@pytest.fixture
def fresh_kernel(tmp_path, monkeypatch):
    """An empty kernel directory and no loaded library (restored afterwards)."""
    monkeypatch.setenv("NEURONSPEC_KERNEL_DIR", str(tmp_path))
    native.forget()
    yield tmp_path
    native.forget()


def test_missing_compiler_is_a_clear_error_and_auto_falls_back(fresh_kernel, monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with pytest.raises(KernelUnavailableError, match="no C compiler found"):
        load_library()
    x, dt, A, B, C, D, z, bias = _inputs(1, 8, 5, 3, torch.float64)
    with pytest.raises(KernelUnavailableError, match="no C compiler"):
        selective_scan(x, dt, A, B, C, backend="kernel")
    with pytest.warns(RuntimeWarning, match="no C compiler found"):
        out = selective_scan(x, dt, A, B, C, D, z, bias)
    assert torch.equal(out, selective_scan(x, dt, A, B, C, D, z, bias, backend="chunked"))


def test_failed_build_reports_the_compiler_output(fresh_kernel, monkeypatch):
    monkeypatch.setattr(native, "FLAGS", (*native.FLAGS, "--no-such-option-neuronspec"))
    with pytest.raises(KernelUnavailableError, match="failed"):
        load_library()
    assert not list(fresh_kernel.glob("*.so")), "a failed build left a library behind"


REBUILD_CHECK = """
import torch
from neuronspec.models.scan import selective_scan
g = torch.Generator().manual_seed(0)
x, dt, z = (torch.randn(1, 9, 5, generator=g, dtype=torch.float64) for _ in range(3))
A = -torch.rand(9, 4, generator=g, dtype=torch.float64)
B, C = (torch.randn(1, 4, 5, generator=g, dtype=torch.float64) for _ in range(2))
kernel = selective_scan(x, dt, A, B, C, None, z, backend="kernel")
chunked = selective_scan(x, dt, A, B, C, None, z, backend="chunked")
assert (kernel - chunked).abs().max() < 1e-13
"""


def test_build_is_cached_and_a_damaged_library_is_rebuilt(fresh_kernel):
    load_library()
    (library,) = fresh_kernel.glob("neuronspec-*.so")
    built = library.stat().st_mtime_ns
    native.forget()
    load_library()
    assert library.stat().st_mtime_ns == built  # reused, not rebuilt
    # A damaged file under the final name, as a new file: writing into the loaded one in
    # place would corrupt this process's mapping, and dlopen in this process would return
    # the mapping it already has, so the damaged file is loaded by a fresh interpreter.
    damaged = fresh_kernel / "damaged"
    damaged.write_bytes(b"truncated")
    damaged.replace(library)
    env = {**os.environ, "NEURONSPEC_KERNEL_DIR": str(fresh_kernel)}
    result = subprocess.run(
        [sys.executable, "-c", REBUILD_CHECK], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "rebuilding it" in result.stderr
    assert library.stat().st_size > 1000
