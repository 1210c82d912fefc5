"""Hidden attention α̃ at scale: time and peak memory against the naive temporary.

A randomly initialised Mamba of mamba-130m's shape (24 layers, d_model 768, d_inner 1536,
N 16) on one 1×256-token prompt (``quick``: 4 layers, 1×64): the channel-mean α̃ of every
layer (:func:`~neuronspec.analyses.hidden_attention.channel_mean_attention`, chunked over
channels within :data:`~neuronspec.analyses.hidden_attention.DEFAULT_MEMORY_BYTES`), timed
side by side with one forward of the same model on the same tokens, float32. Peak memory is
measured in a fresh process that loads only the captured scan inputs: its resident set
size, sampled every millisecond during the computation, minus the size before it (the
model's own memory is not counted; Linux ``/proc/self/statm``), and printed next to the bytes that one layer's naive ``[b, d, L, L, N]`` float32
temporary would take. One round: the section runs once, near the end of a change.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import tempfile
import threading
import time

import torch
from transformers import MambaConfig, MambaForCausalLM

from neuronspec.bench import row as _row
from neuronspec.bench import time_side_by_side
from neuronspec.fixture_costs import rss_bytes

SHAPE = dict(vocab_size=50280, hidden_size=768, num_hidden_layers=24, state_size=16, expand=2)


def _setup(quick: bool):
    from neuronspec.models.mamba_internals import capture_scan_inputs
    from neuronspec.models.scan import use_fast_scan

    torch.manual_seed(0)
    shape = dict(SHAPE, num_hidden_layers=4, vocab_size=1024) if quick else SHAPE
    length = 64 if quick else 256
    model = use_fast_scan(MambaForCausalLM(MambaConfig(**shape)).eval())
    ids = torch.randint(0, shape["vocab_size"], (1, length))
    layers = range(shape["num_hidden_layers"])
    inputs = capture_scan_inputs(model, ids, layers)
    return model, ids, inputs, shape, length


def _all_layers(inputs):
    from neuronspec.analyses.hidden_attention import channel_mean_attention

    return [channel_mean_attention(inputs[layer]) for layer in sorted(inputs)]


def _peak_child(path: str, queue) -> None:
    from neuronspec.models.mamba_internals import ScanInputs

    saved = torch.load(path)
    inputs = {layer: ScanInputs(**fields) for layer, fields in saved.items()}
    before = rss_bytes()
    peak = [before]
    done = threading.Event()

    def sample() -> None:  # torch ops release the GIL, so this runs during them
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    t0 = time.perf_counter()
    _all_layers(inputs)
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    queue.put((seconds, max(peak[0], rss_bytes()) - before))


def peak_bytes(inputs) -> tuple[float, int]:
    """(seconds, peak bytes above the inputs' high-water mark) of all layers' α̃, in a fresh
    process that holds only ``inputs``."""
    with tempfile.TemporaryDirectory() as directory:
        path = f"{directory}/inputs.pt"
        torch.save({layer: dataclasses.asdict(s) for layer, s in inputs.items()}, path)
        context = multiprocessing.get_context("spawn")
        queue = context.Queue()
        process = context.Process(target=_peak_child, args=(path, queue))
        process.start()
        result = queue.get()
        process.join()
    return result


def run(quick: bool = False) -> list[dict]:
    model, ids, inputs, shape, length = _setup(quick)

    def forward():
        with torch.no_grad():
            model(ids, use_cache=False)

    t = time_side_by_side({"forward": forward, "alpha": lambda: _all_layers(inputs)}, repeats=1)
    layers = shape["num_hidden_layers"]
    d_inner = shape["expand"] * shape["hidden_size"]
    naive = 1 * d_inner * length * length * shape["state_size"] * 4  # one layer, float32
    seconds, peak = peak_bytes(inputs)
    tag = f"{layers}L d_model {shape['hidden_size']}, 1x{length}"
    forward_name = f"mamba forward, {tag}"
    return [
        _row(forward_name, t["forward"]),
        _row(f"channel-mean α̃ of all layers, {tag}", t["alpha"], forward_name, t["forward"]),
        {
            "name": (
                f"α̃ peak memory {peak / 2**20:.0f} MiB (fresh process, {seconds:.1f} s); "
                f"naive [b,d,L,L,N] float32 temporary: {naive / 2**30:.2f} GiB per layer"
            ),
            "seconds": seconds,
            "rounds": (seconds,),
            "ratio_vs": None,
            "ratio": None,
            "ratio_range": None,
            "peak_bytes": peak,
            "naive_bytes": naive,
        },
    ]
