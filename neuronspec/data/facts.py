"""Fact sets for knowledge neurons (METHODS.md §8): subject, relation, object, paraphrase prompts.

Every prompt ends right before the answer; the gold answer is ``" " + object`` (the leading
space BPE vocabularies need), scored by its first token.

- ``toyworld``: the toy world's fact table (:mod:`neuronspec.data.toyworld`), for the
  embedded models; prompts from the training templates, the held-out ones, or both.
- ``english``: the shipped English set ``data/assets/english_facts.json`` for real models
  (7 relations, ≥ 10 facts each, 3 paraphrases).
- a user's file (``--facts FILE``): JSON (a list of facts, or ``{"facts": [...]}``) or JSONL
  (one fact per line), each with ``subject``, ``relation``, ``object``, ``prompts``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from neuronspec.data import toyworld
from neuronspec.errors import CorpusError

ENGLISH_FACTS_JSON = Path(__file__).parent / "assets" / "english_facts.json"
TEMPLATE_CHOICES = ("train", "heldout", "all")
_FIELDS = ("subject", "relation", "object", "prompts")


class FactsError(CorpusError):
    """A fact file or selection that cannot be used (missing fields, too few prompts)."""


@dataclass(frozen=True)
class KnowledgeFact:
    """One fact with its paraphrase prompts; ``answer`` is ``" " + object``."""

    subject: str
    relation: str
    object: str
    prompts: tuple[str, ...]

    @property
    def answer(self) -> str:
        return " " + self.object

    @property
    def name(self) -> str:
        return f"{self.relation}({self.subject})"


def toyworld_knowledge_facts(templates: str = "train") -> list[KnowledgeFact]:
    """The toy world's 182 facts with the ``templates`` prompts (train: 3, heldout: 2, all: 5)."""
    if templates not in TEMPLATE_CHOICES:
        raise FactsError(
            f"templates must be one of {', '.join(TEMPLATE_CHOICES)}, got {templates!r}"
        )
    facts = []
    for fact in toyworld.load_facts():
        prompts = {
            "train": fact.train_prompts,
            "heldout": fact.heldout_prompts,
            "all": fact.train_prompts + fact.heldout_prompts,
        }[templates]
        facts.append(KnowledgeFact(fact.subject, fact.relation, fact.object, tuple(prompts)))
    return facts


def run_facts(facts_file: str | Path | None, *, embedded: bool, templates: str = "train"):
    """The facts a run uses (knowledge neurons, fact relevance): the ``--facts`` file if
    given, else the toy world's (``templates`` prompts) for an embedded model, trained on
    it, else the shipped English set. Returns ``list[KnowledgeFact]``."""
    if facts_file:
        return load_fact_file(facts_file)
    return toyworld_knowledge_facts(templates) if embedded else english_facts()


def english_facts() -> list[KnowledgeFact]:
    """The shipped English fact set (``data/assets/english_facts.json``)."""
    return load_fact_file(ENGLISH_FACTS_JSON)


def load_fact_file(path: str | Path) -> list[KnowledgeFact]:
    """Facts from a JSON or JSONL file (format in the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FactsError(f"fact file {path} does not exist; pass a JSON or JSONL file to --facts")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".jsonl":
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            data = json.loads(text)
            rows = data["facts"] if isinstance(data, dict) and "facts" in data else data
    except json.JSONDecodeError as error:
        raise FactsError(f"fact file {path} is not valid JSON: {error}") from None
    if not isinstance(rows, list) or not rows:
        raise FactsError(f"fact file {path} holds no facts: expected a non-empty list")
    facts = []
    for i, row in enumerate(rows):
        missing = [f for f in _FIELDS if not isinstance(row, dict) or f not in row]
        if missing:
            raise FactsError(
                f"fact {i} of {path} lacks {', '.join(missing)}; each fact needs {_FIELDS}"
            )
        prompts = row["prompts"]
        if isinstance(prompts, str) or not all(isinstance(p, str) and p for p in prompts):
            raise FactsError(f"fact {i} of {path}: prompts must be a list of non-empty strings")
        facts.append(
            KnowledgeFact(
                str(row["subject"]), str(row["relation"]), str(row["object"]), tuple(prompts)
            )
        )
    return facts


def select_per_relation(
    facts: list[KnowledgeFact], per_relation: int | None
) -> list[KnowledgeFact]:
    """The first ``per_relation`` facts of each relation, in table order (None: all)."""
    if per_relation is None:
        return list(facts)
    if per_relation < 1:
        raise FactsError(f"facts per relation must be >= 1, got {per_relation}")
    taken: dict[str, int] = {}
    chosen = []
    for fact in facts:
        if taken.get(fact.relation, 0) < per_relation:
            taken[fact.relation] = taken.get(fact.relation, 0) + 1
            chosen.append(fact)
    return chosen
