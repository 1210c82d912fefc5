"""Fast selective scan vs transformers' reference scan (and GPT-2 for scale).

Forward: a randomly initialised model with mamba-130m's shape (24 layers, d_model 768,
d_inner 1536, N 16, vocab 50280) on a 4×256-token batch, HF reference scan vs
:func:`neuronspec.models.scan.use_fast_scan`, next to a random GPT-2-small-shaped
``GPT2LMHeadModel`` (12 layers, d 768) on the same tokens. Training: one AdamW step
(forward with labels, backward, update) of a 4-layer d_model 128 Mamba (vocab 4096) at
batch 32×64, reference vs fast. ``quick`` uses 1×64 tokens for the forward, 8×32 for
training, and fewer rounds. 5 rounds (3 for training) of :func:`~neuronspec.bench.time_side_by_side`;
ratios are medians of per-round ratios.
"""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel, MambaConfig, MambaForCausalLM

from neuronspec.bench import row as _row
from neuronspec.bench import time_side_by_side
from neuronspec.models.scan import use_fast_scan
from neuronspec.native import KernelUnavailableError, load_library

MAMBA_130M_SHAPE = dict(
    vocab_size=50280, hidden_size=768, num_hidden_layers=24, state_size=16, expand=2
)
TRAIN_SHAPE = dict(vocab_size=4096, hidden_size=128, num_hidden_layers=4, state_size=16, expand=2)


def _forward(model: torch.nn.Module, ids: torch.Tensor, fast: bool | None = None):
    def call():
        if fast is not None:
            use_fast_scan(model, fast)
        with torch.no_grad():
            return model(ids, use_cache=False).logits

    return call


def _train_step(model: MambaForCausalLM, opt: torch.optim.Optimizer, ids, fast: bool):
    def call():
        use_fast_scan(model, fast)
        opt.zero_grad(set_to_none=True)
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()

    return call


def _fast_backend() -> str:
    """Which fast path ran without gradients: the C kernels, or the chunked torch scan."""
    try:
        load_library()
    except KernelUnavailableError:
        return "chunked torch scan, no C compiler"
    return "C kernels"


def run(quick: bool = False) -> list[dict]:
    torch.manual_seed(0)
    batch, length, repeats = (1, 64, 2) if quick else (4, 256, 5)
    mamba = MambaForCausalLM(MambaConfig(**MAMBA_130M_SHAPE)).eval()
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=12, n_embd=768, n_head=12)).eval()
    ids = torch.randint(0, 50257, (batch, length))
    t = time_side_by_side(
        {
            "ref": _forward(mamba, ids, fast=False),
            "fast": _forward(mamba, ids, fast=True),
            "gpt2": _forward(gpt2, ids),
        },
        repeats,
    )
    del mamba, gpt2
    tokens = f"{batch}x{length}"
    ref_name = f"mamba-130m-shape forward {tokens}, HF reference scan"
    fast_name = f"mamba-130m-shape forward {tokens}, fast scan ({_fast_backend()})"
    gpt2_name = f"gpt2-small-shape forward {tokens}"
    rows = [
        _row(ref_name, t["ref"]),
        _row(fast_name, t["fast"], ref_name, t["ref"]),
        _row(gpt2_name, t["gpt2"]),
        _row(fast_name, t["fast"], gpt2_name, t["gpt2"]),
    ]

    torch.manual_seed(0)
    tb, tl, trepeats = (8, 32, 2) if quick else (32, 64, 3)
    model = MambaForCausalLM(MambaConfig(**TRAIN_SHAPE)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tids = torch.randint(0, TRAIN_SHAPE["vocab_size"], (tb, tl))
    tt = time_side_by_side(
        {
            "ref": _train_step(model, opt, tids, fast=False),
            "fast": _train_step(model, opt, tids, fast=True),
        },
        trepeats,
    )
    tref = f"mamba 4L d128 train step {tb}x{tl}, HF reference scan"
    rows += [
        _row(tref, tt["ref"]),
        _row(f"mamba 4L d128 train step {tb}x{tl}, fast scan", tt["fast"], tref, tt["ref"]),
    ]
    return rows
