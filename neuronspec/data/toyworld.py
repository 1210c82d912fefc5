"""The toy world: invented facts with known ground truth, plus grammatical filler text.

A fact is (subject, relation, object); each relation has paraphrase templates that
end right before the object ("The capital of Velmora is" -> " Daskar"). Some templates
are held out: they never occur in training text, so recall on them measures
paraphrase generalisation (METHODS.md §8 uses the prompts for knowledge neurons).
Names are invented from syllables so no real-world knowledge interferes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from pathlib import Path
from typing import TYPE_CHECKING

from neuronspec.errors import CorpusError

if TYPE_CHECKING:
    import datasets

WORLD_SEED = 0  # the one world the shipped models were trained on
FACTS_JSON = Path(__file__).parent / "assets" / "toyworld_facts.json"
EOS = "<|endoftext|>"  # starts every document; bos/eos/pad of the zoo tokenizer

# relation -> (training templates, held-out templates); "{s}" is the subject.
TEMPLATES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "capital_of": (
        ("The capital of {s} is", "{s}'s capital city is", "The capital city of {s} is called"),
        ("The seat of government of {s} is in", "Travellers to the capital of {s} arrive in"),
    ),
    "language_of": (
        ("The official language of {s} is", "People in {s} speak", "In {s}, most people speak"),
        ("The main language spoken in {s} is", "Children in {s} learn to speak"),
    ),
    "currency_of": (
        (
            "The currency of {s} is the",
            "In {s}, people pay with the",
            "The money used in {s} is the",
        ),
        ("Shops in {s} accept the", "The official currency of {s} is the"),
    ),
    "continent_of": (
        ("{s} is a country in", "{s} is located in", "{s} lies on the continent of"),
        ("The country of {s} is part of", "You can find {s} in"),
    ),
    "river_in": (
        (
            "The longest river in {s} is the",
            "The river that flows through {s} is the",
            "The main river of {s} is the",
        ),
        ("The great river of {s} is the", "Boats in {s} sail on the"),
    ),
    "author_of": (
        ("The novel {s} was written by", "The author of {s} is", "{s} is a book by"),
        ("The writer of {s} is", "{s} was penned by"),
    ),
    "birthplace_of": (
        ("{s} was born in", "The birthplace of {s} is", "{s} grew up in the city of"),
        ("The home town of {s} is", "{s} spent childhood years in"),
    ),
}

N_COUNTRIES = 30  # subjects of the five country relations
N_BOOKS = 16  # subjects of author_of; their authors are subjects of birthplace_of
N_LANGUAGES = 10  # shared by several countries (many-to-one relations)
N_CURRENCIES = 10
N_CONTINENTS = 6


@dataclasses.dataclass(frozen=True)
class Fact:
    """One ground-truth fact; prompts end right before " " + object."""

    subject: str
    relation: str
    object: str
    train_prompts: tuple[str, ...]
    heldout_prompts: tuple[str, ...]

    @property
    def answer(self) -> str:
        """The continuation after any prompt, with its leading space (" Daskar")."""
        return " " + self.object


_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z")
_ONSETS += ("br", "dr", "kr", "gl", "sk", "tr", "th", "qu", "h", "j", "w", "y")
_VOWELS = ("a", "e", "i", "o", "u", "a", "o", "ae", "ou", "ei")
_CODAS = ("", "", "", "n", "r", "l", "s", "th", "m", "x", "sk", "nd")


class _Namer:
    """Invents capitalised names whose first four letters are unique in the world."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.prefixes: set[str] = set()

    def __call__(self) -> str:
        while True:
            n_syllables = self.rng.choice((2, 2, 3))
            parts = [
                self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS) for _ in range(n_syllables)
            ]
            name = ("".join(parts) + self.rng.choice(_CODAS)).capitalize()
            if 4 <= len(name) <= 9 and name[:4] not in self.prefixes:
                self.prefixes.add(name[:4])
                return name

    def many(self, n: int) -> list[str]:
        return [self() for _ in range(n)]


def _fact(subject: str, relation: str, obj: str) -> Fact:
    train, heldout = TEMPLATES[relation]
    return Fact(
        subject=subject,
        relation=relation,
        object=obj,
        train_prompts=tuple(t.format(s=subject) for t in train),
        heldout_prompts=tuple(t.format(s=subject) for t in heldout),
    )


def generate_facts(seed: int = WORLD_SEED) -> list[Fact]:
    """Build the fact table of the world ``seed`` (182 facts, 62 subjects, 7 relations)."""
    rng = random.Random(seed)
    name = _Namer(rng)
    countries, capitals, rivers = (
        name.many(N_COUNTRIES),
        name.many(N_COUNTRIES),
        name.many(N_COUNTRIES),
    )
    languages, currencies = name.many(N_LANGUAGES), name.many(N_CURRENCIES)
    continents, books = name.many(N_CONTINENTS), name.many(N_BOOKS)
    authors = [
        f"{first} {last}"
        for first, last in zip(name.many(N_BOOKS), name.many(N_BOOKS), strict=True)
    ]
    facts: list[Fact] = []
    for i, country in enumerate(countries):
        facts.append(_fact(country, "capital_of", capitals[i]))
        facts.append(_fact(country, "language_of", languages[i % N_LANGUAGES]))
        facts.append(_fact(country, "currency_of", rng.choice(currencies)))
        facts.append(_fact(country, "continent_of", continents[i % N_CONTINENTS]))
        facts.append(_fact(country, "river_in", rivers[i]))
    for book, author in zip(books, authors, strict=True):
        facts.append(_fact(book, "author_of", author))
        facts.append(_fact(author, "birthplace_of", rng.choice(capitals)))
    return facts


FACTS: tuple[Fact, ...] = tuple(generate_facts())


def load_facts() -> list[Fact]:
    """The fact table of the shipped world (as in ``data/assets/toyworld_facts.json``)."""
    return list(FACTS)


def facts_json(facts: list[Fact] | tuple[Fact, ...] = FACTS) -> dict:
    """The fact table as plain JSON (the shipped asset's content)."""
    return {
        "world_seed": WORLD_SEED,
        "templates": {r: {"train": list(t), "heldout": list(h)} for r, (t, h) in TEMPLATES.items()},
        "facts": [
            {
                "subject": f.subject,
                "relation": f.relation,
                "object": f.object,
                "train_prompts": list(f.train_prompts),
                "heldout_prompts": list(f.heldout_prompts),
            }
            for f in facts
        ],
    }


def write_facts_json(path: Path = FACTS_JSON) -> Path:
    """Regenerate the shipped JSON asset from the code."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(facts_json(), indent=1) + "\n", encoding="utf-8")
    return path


# --- filler text: a small grammar with frequent n-grams and fixed phrases ---------------

_DETS = ("the", "the", "the", "a", "every", "one")
_ADJS = ("old", "small", "quiet", "green", "bright", "heavy", "young", "tired", "clever", "silver")
_NOUNS = ("farmer", "teacher", "dog", "cat", "bird", "garden", "house", "road", "window", "table")
_NOUNS += ("market", "letter", "song", "bridge", "lamp", "horse", "child", "baker", "sailor")
_VERBS = ("saw", "found", "painted", "carried", "opened", "followed", "watched", "cleaned")
_VERBS += ("built", "visited")
_PREPS = ("near", "behind", "under", "beside", "across", "inside")
_ADVERBS = ("slowly", "quietly", "again", "early", "late")
PHRASES = (  # fixed multi-token phrases
    "once upon a time",
    "at the end of the day",
    "as a matter of fact",
    "in the middle of the night",
    "for the first time",
    "from time to time",
    "on the other hand",
    "all of a sudden",
)
_END_PHRASES = ("for the first time", "from time to time", "in the middle of the night")


def _np(rng: random.Random, adj: bool = False) -> str:
    det = rng.choice(_DETS)
    words = [det, rng.choice(_ADJS)] if adj else [det]
    if det == "a" and adj and words[1][0] in "aeiou":
        words[0] = "an"
    return " ".join([*words, rng.choice(_NOUNS)])


def _filler_sentence(rng: random.Random) -> str:
    kind = rng.randrange(6)
    if kind == 0:
        s = f"{_np(rng, adj=True)} {rng.choice(_VERBS)} {_np(rng)}"
    elif kind == 1:
        s = f"{_np(rng)} {rng.choice(_VERBS)} {_np(rng, adj=True)} {rng.choice(_PREPS)} {_np(rng)}"
    elif kind == 2:
        s = f"{rng.choice(PHRASES)}, {_np(rng)} {rng.choice(_VERBS)} {_np(rng)}"
    elif kind == 3:
        s = f"{_np(rng)} {rng.choice(_VERBS)} {_np(rng)} {rng.choice(_END_PHRASES)}"
    elif kind == 4:
        s = f"{_np(rng)} was {rng.choice(_ADJS)} {rng.choice(_ADVERBS)}"
    else:
        s = f"there was {_np(rng, adj=True)} {rng.choice(_PREPS)} {_np(rng)}"
    return s[0].upper() + s[1:] + "."


# --- documents ---------------------------------------------------------------------------

SPLITS = ("train", "heldout")
DEFAULT_N_DOCS = {"train": 24000, "heldout": 1000}
FACT_SENTENCE_RATE = 0.55  # share of sentences that state a fact
MAX_SENTENCES = 12  # documents have 1..MAX_SENTENCES sentences
HELDOUT_BUCKETS = 10  # a document whose text hash is 0 mod this goes to "heldout"


def fact_sentence(fact: Fact, prompt: str) -> str:
    """``prompt + " " + object + "."``."""
    return f"{prompt}{fact.answer}."


def _document(rng: random.Random, facts: tuple[Fact, ...]) -> str:
    sentences = []
    used: set[int] = set()  # a fact at most once per document, so it cannot be copied
    for _ in range(rng.randint(1, MAX_SENTENCES)):
        if rng.random() < FACT_SENTENCE_RATE:
            i = rng.randrange(len(facts))
            if i in used:
                continue
            used.add(i)
            sentences.append(fact_sentence(facts[i], rng.choice(facts[i].train_prompts)))
        else:
            sentences.append(_filler_sentence(rng))
    if not sentences:
        sentences.append(_filler_sentence(rng))
    return " ".join(sentences)


def _split_of(text: str) -> str:
    bucket = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()[0] % HELDOUT_BUCKETS
    return "heldout" if bucket == 0 else "train"


def toyworld_documents(split: str = "train", seed: int = 0, n_docs: int | None = None) -> list[str]:
    """The first ``n_docs`` documents of ``split`` (plain text, no ``<|endoftext|>``).

    One candidate stream per seed; a document's split is fixed by the hash of its
    text, so "train" and "heldout" never share a document. Only training templates
    are used; held-out templates appear in no document of either split.
    """
    if split not in SPLITS:
        raise CorpusError(f"unknown toy-world split {split!r}; known: {', '.join(SPLITS)}")
    n = DEFAULT_N_DOCS[split] if n_docs is None else n_docs
    if n < 1:
        raise CorpusError(f"n_docs must be >= 1, got {n}")
    rng = random.Random(seed)
    docs: list[str] = []
    while len(docs) < n:
        text = _document(rng, FACTS)
        if _split_of(text) == split:
            docs.append(text)
    return docs


def toyworld_dataset(
    split: str = "train", seed: int = 0, n_docs: int | None = None
) -> datasets.Dataset:
    """A ``datasets.Dataset`` with one column "text" (``n_docs`` rows, default 24000/1000)."""
    import datasets  # heavy; the training recipe needs only toyworld_documents

    return datasets.Dataset.from_dict({"text": toyworld_documents(split, seed, n_docs)})


if __name__ == "__main__":
    print(write_facts_json())
