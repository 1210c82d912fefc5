"""Evaluation of an embedded model: held-out perplexity and top-1 fact recall.

Recall: a prompt counts when the argmax next token after ``[bos] + prompt`` is the
first token of ``" " + object`` (METHODS.md §8 scores the same token's probability).
Perplexity: exp(mean next-token NLL) over the "heldout" split packed into
non-overlapping blocks of 64 tokens, each document starting with ``<|endoftext|>``.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from neuronspec.data.toyworld import Fact, load_facts, toyworld_documents
from neuronspec.zoo.tokenizer import answer_token, encode_prompt
from neuronspec.zoo.train import SEQ_LEN, token_blocks

EVAL_BATCH = 64


def load(directory: Path) -> tuple[PreTrainedModel, object]:
    """Model (eval mode, float32) and tokenizer from an HF directory, offline."""
    model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    return model.eval(), tokenizer


@torch.no_grad()
def top1_hits(
    model: PreTrainedModel, tokenizer, prompts: list[str], answers: list[str]
) -> list[bool]:
    """For each prompt, whether argmax next token == first token of its answer."""
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    gold = [answer_token(tokenizer, a) for a in answers]
    by_length: dict[int, list[int]] = defaultdict(list)  # equal lengths batch without padding
    for i, ids in enumerate(encoded):
        by_length[len(ids)].append(i)
    hits = [False] * len(prompts)
    for idx in by_length.values():
        for start in range(0, len(idx), EVAL_BATCH):
            chunk = idx[start : start + EVAL_BATCH]
            ids = torch.tensor([encoded[i] for i in chunk])  # (b, T)
            pred = model(input_ids=ids).logits[:, -1].argmax(-1)  # (b,)
            for i, p in zip(chunk, pred.tolist(), strict=True):
                hits[i] = p == gold[i]
    return hits


def fact_recall(model: PreTrainedModel, tokenizer, facts: Iterable[Fact], *, heldout: bool) -> dict:
    """Top-1 recall over every prompt of ``facts``: overall, per relation, and counts."""
    rows = [
        (f.relation, p, f.answer)
        for f in facts
        for p in (f.heldout_prompts if heldout else f.train_prompts)
    ]
    hits = top1_hits(model, tokenizer, [r[1] for r in rows], [r[2] for r in rows])
    per: dict[str, list[bool]] = defaultdict(list)
    for (relation, _, _), hit in zip(rows, hits, strict=True):
        per[relation].append(hit)
    return {
        "recall": sum(hits) / len(hits),
        "n_prompts": len(hits),
        "per_relation": {r: sum(h) / len(h) for r, h in sorted(per.items())},
    }


@torch.no_grad()
def heldout_perplexity(model: PreTrainedModel, tokenizer, n_docs: int | None = None) -> dict:
    """exp(mean NLL) on the heldout split: {"perplexity", "n_tokens"} (predicted tokens)."""
    blocks = token_blocks(tokenizer, toyworld_documents("heldout", n_docs=n_docs), SEQ_LEN)
    total, count = 0.0, 0
    for start in range(0, len(blocks), EVAL_BATCH):
        batch = blocks[start : start + EVAL_BATCH]  # (b, T)
        logits = model(input_ids=batch).logits[:, :-1]  # (b, T-1, V)
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total += nll.item()
        count += batch[:, 1:].numel()
    return {"perplexity": math.exp(total / count), "n_tokens": count}


def evaluate(directory: Path) -> dict:
    """All numbers of a model card: held-out perplexity, recall on train/held-out templates."""
    model, tokenizer = load(directory)
    facts = load_facts()
    return {
        "heldout_perplexity": heldout_perplexity(model, tokenizer),
        "recall_train_templates": fact_recall(model, tokenizer, facts, heldout=False),
        "recall_heldout_templates": fact_recall(model, tokenizer, facts, heldout=True),
    }


_CARD = """# {name}

A tiny {arch_name} trained from scratch on the neuronspec toy world
(`neuronspec/data/toyworld.py`, fact table in `neuronspec/data/assets/toyworld_facts.json`).
Part of the embedded default of neuronspec; not a general language model.

## Recipe

```
HF_HUB_OFFLINE=1 python -m neuronspec.zoo train {name}
HF_HUB_OFFLINE=1 python -m neuronspec.zoo eval {name} --write
```

Training took {seconds} s on {threads} CPU thread(s) of a {cpus}-CPU machine
(torch {torch_version}, transformers {transformers_version}){scan_note}.
Training config: `{train_config}`

Architecture: `{arch}` ({n_params} parameters, vocabulary {vocab_size}, byte-level BPE
trained on the toy-world training split, `<|endoftext|>` = bos/eos/pad).

## Evaluation (`eval.json`)

- held-out perplexity: {ppl:.3f} over {n_tokens} predicted tokens
- top-1 fact recall, training templates: {rt:.3f} ({nt} prompts)
- top-1 fact recall, held-out templates: {rh:.3f} ({nh} prompts)

| relation | training templates | held-out templates |
| --- | --- | --- |
{rows}

Prompts are read as `[<|endoftext|>] + prompt`; a hit is argmax next token == first
token of `" " + object`. Loss curve: `train_log.json`.
"""


def write_card(name: str, directory: Path, result: dict) -> None:
    """Write ``eval.json`` and the model card ``README.md`` into ``directory``."""
    log = json.loads((directory / "train_log.json").read_text(encoding="utf-8"))
    (directory / "eval.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    train, held = result["recall_train_templates"], result["recall_heldout_templates"]
    rows = "\n".join(
        f"| {r} | {train['per_relation'][r]:.3f} | {held['per_relation'][r]:.3f} |"
        for r in train["per_relation"]
    )
    card = _CARD.format(
        name=name,
        arch_name="GPT-2 (GPT2LMHeadModel)" if "gpt2" in name else "Mamba (MambaForCausalLM)",
        seconds=log["seconds"],
        threads=log["torch_threads"],
        cpus=log["machine_cpus"],
        torch_version=log["torch_version"],
        transformers_version=log["transformers_version"],
        scan_note=", Mamba scan: neuronspec.models.scan fast exact scan"
        if log["fast_scan"]
        else "",
        train_config=json.dumps(log["train_config"]),
        arch=json.dumps(log["arch"]),
        n_params=log["n_params"],
        vocab_size=log["vocab_size"],
        ppl=result["heldout_perplexity"]["perplexity"],
        n_tokens=result["heldout_perplexity"]["n_tokens"],
        rt=train["recall"],
        nt=train["n_prompts"],
        rh=held["recall"],
        nh=held["n_prompts"],
        rows=rows,
    )
    (directory / "README.md").write_text(card, encoding="utf-8")
