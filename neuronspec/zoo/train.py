"""Training recipe of the embedded models: from scratch on the toy world, CPU, deterministic.

Documents are packed into one token stream, each starting with ``<|endoftext|>``, and cut
into blocks of ``seq_len`` tokens; AdamW with linear warm-up and cosine decay, no dropout
(the models are meant to memorise the fact table).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path

import torch
import transformers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    MambaConfig,
    MambaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from neuronspec.data.toyworld import toyworld_documents
from neuronspec.errors import UnknownModelError
from neuronspec.models.scan import use_fast_scan
from neuronspec.zoo import EMBEDDED_MODELS
from neuronspec.zoo.tokenizer import train_tokenizer

SEQ_LEN = 64


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 2000  # ~3 epochs of the default 24000 training documents at batch 32
    batch_size: int = 32
    seq_len: int = SEQ_LEN
    lr: float = 3e-3  # tiny models tolerate a large step
    warmup: int = 100
    min_lr_ratio: float = 0.1  # cosine decays to lr * this
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    n_docs: int | None = None  # training documents; None = the toy world's default (24000)
    log_every: int = 50


# width/depth of each embedded model; tests shrink them with ``arch`` overrides
ARCHS: dict[str, dict] = {
    "tiny-gpt2": {"n_layer": 4, "n_embd": 128, "n_head": 4, "n_inner": 512},
    "tiny-mamba": {
        "num_hidden_layers": 4,
        "hidden_size": 128,
        "intermediate_size": 256,
        "state_size": 16,
        "conv_kernel": 4,
    },
}


# the shipped recipes (``python -m neuronspec.zoo train <name>``)
RECIPES: dict[str, TrainConfig] = {
    "tiny-gpt2": TrainConfig(),
    "tiny-mamba": TrainConfig(),
}


def model_config(name: str, vocab_size: int, **arch) -> GPT2Config | MambaConfig:
    """HF config of embedded model ``name`` for a tokenizer of ``vocab_size`` (ids 0 = eos)."""
    if name not in ARCHS:
        raise UnknownModelError(f"unknown embedded model {name!r}; known: {', '.join(ARCHS)}")
    kw = {**ARCHS[name], **arch}
    ids = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
    if name == "tiny-gpt2":
        no_dropout = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
        return GPT2Config(vocab_size=vocab_size, n_positions=SEQ_LEN, **no_dropout, **ids, **kw)
    expand = kw["intermediate_size"] // kw["hidden_size"]
    return MambaConfig(vocab_size=vocab_size, expand=expand, use_cache=False, **ids, **kw)


def token_blocks(
    tokenizer: PreTrainedTokenizerFast, texts: list[str], seq_len: int
) -> torch.Tensor:
    """Pack ``[eos] + doc`` for every doc and cut into blocks: (n_blocks, seq_len) int64."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream.append(eos)
        stream.extend(ids)
    n = len(stream) // seq_len
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


def _lr_factor(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _use_fast_scan(model: PreTrainedModel, enabled: bool) -> bool:
    """Train a Mamba with ``neuronspec.models.scan`` (exact, faster) unless disabled."""
    if not (enabled and isinstance(model, MambaForCausalLM)):
        return False
    use_fast_scan(model, enabled=True)
    return True


def train(
    name: str, out: Path, cfg: TrainConfig = TrainConfig(), *, fast_scan: bool = True, **arch
) -> dict:
    """Train embedded model ``name`` into ``out`` (model + tokenizer + ``train_log.json``).

    ``fast_scan=False`` trains a Mamba on transformers' reference scan. Returns the
    training log: config, seconds, loss every ``log_every`` steps.
    """
    if name not in EMBEDDED_MODELS:
        raise UnknownModelError(
            f"unknown embedded model {name!r}; known: {', '.join(EMBEDDED_MODELS)}"
        )
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        return _train(name, out, cfg, fast_scan, arch)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)


def _train(name: str, out: Path, cfg: TrainConfig, fast_scan: bool, arch: dict) -> dict:
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    texts = toyworld_documents("train", seed=cfg.seed, n_docs=cfg.n_docs)
    tokenizer = train_tokenizer(texts)
    blocks = token_blocks(tokenizer, texts, cfg.seq_len)  # (N, T)
    config = model_config(name, len(tokenizer), **arch)
    model = (GPT2LMHeadModel if name == "tiny-gpt2" else MambaForCausalLM)(config)
    fast_scan = _use_fast_scan(model, fast_scan)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg))
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(blocks), generator=gen)
    cursor, losses = 0, []
    model.train()
    for step in range(cfg.steps):
        if cursor + cfg.batch_size > len(order):
            order, cursor = torch.randperm(len(blocks), generator=gen), 0
        batch = blocks[order[cursor : cursor + cfg.batch_size]]  # (B, T)
        cursor += cfg.batch_size
        loss = model(input_ids=batch, labels=batch).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{name}: loss is {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            losses.append({"step": step, "loss": round(loss.item(), 4)})
            print(f"{name} step {step} loss {loss.item():.4f} {time.perf_counter() - start:.0f}s")
    if fast_scan:
        use_fast_scan(model, enabled=False)
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    log = {
        "model": name,
        "train_config": dataclasses.asdict(cfg),
        "arch": {**ARCHS[name], **arch},
        "n_params": sum(p.numel() for p in model.parameters()),
        "n_train_blocks": len(blocks),
        "vocab_size": len(tokenizer),
        "fast_scan": fast_scan,
        "torch_threads": torch.get_num_threads(),
        "machine_cpus": os.cpu_count(),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "seconds": round(time.perf_counter() - start, 1),
        "losses": losses,
    }
    (out / "train_log.json").write_text(json.dumps(log, indent=1) + "\n", encoding="utf-8")
    return log
