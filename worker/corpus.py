"""A fact corpus with ground truth built in (in the style of FTRACE, arXiv 2205.11482), and the byte
tokenizer of the demo language model.

Invented entities have facts (city, job, pet), each stated by a few paraphrases; distractor sentences
name the entity and its true value without stating the fact ("X visited C once"): lexical near misses.
Values are shared by many entities ("Y lives in C" states another fact). A query
is a prompt and its completion ("X lives in" + " C."); its ground-truth proponents are the training
sentences stating that fact. Deterministic for a seed; nothing is downloaded.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

PAD = 0  # byte 0 never occurs in text: it pads sequences (and is masked out of every loss)

SYLLABLES = ["ka", "lo", "mi", "ren", "tas", "vo", "zu", "bel", "dor", "fi", "gan", "hu", "jor", "ne", "pim", "qua"]
VALUES = {
    "city": ["Varno", "Teslin", "Ombrak", "Quell", "Durnis", "Palva", "Seret", "Kivu", "Lomar", "Brisk"],
    "job": ["baker", "pilot", "tailor", "miner", "judge", "nurse", "poet", "smith", "clerk", "farmer"],
    "pet": ["cat", "heron", "goat", "ferret", "toad", "parrot", "mule", "newt", "lynx", "carp"],
}
TEMPLATES = {
    "city": ["{e} lives in {v}.", "{e} has a home in {v}.", "The home of {e} is in {v}.", "{e} resides in {v}."],
    "job": ["{e} works as a {v}.", "{e} earns a living as a {v}.", "By trade, {e} is a {v}.", "{e} is a {v} by trade."],
    "pet": ["{e} owns a {v}.", "{e} keeps a pet {v}.", "The pet of {e} is a {v}.", "{e} cares for a {v}."],
}
PROMPTS = {"city": ("{e} lives in", " {v}."), "job": ("{e} works as a", " {v}."), "pet": ("{e} owns a", " {v}.")}
# near misses: the entity and its true value in a sentence that does not state the fact
DISTRACTORS = {"city": "{e} visited {v} once.", "job": "{e} once met a {v}.", "pet": "A friend of {e} saw a {v}."}


@dataclass
class Corpus:
    sentences: list[str]
    facts: list[tuple[str, str, str]]  # (entity, relation, value)
    states: list[int]  # per sentence: the index of the fact it states, or -1 (a distractor)

    def query(self, fact: int) -> tuple[str, str]:
        entity, relation, value = self.facts[fact]
        prompt, completion = PROMPTS[relation]
        return prompt.format(e=entity), completion.format(v=value)

    def proponents(self, fact: int) -> list[int]:
        return [i for i, f in enumerate(self.states) if f == fact]


def fact_corpus(entities: int = 200, paraphrases: int = 3, distractors: int = 2, seed: int = 0) -> Corpus:
    """`entities` invented names with one fact per relation, each stated by `paraphrases` of the
    templates, plus `distractors` near-miss sentences per entity."""
    rng = random.Random(seed)
    names: set[str] = set()
    while len(names) < entities:
        names.add("".join(rng.choice(SYLLABLES) for _ in range(rng.choice((2, 3)))).capitalize())
    sentences, facts, states = [], [], []
    for entity in sorted(names):
        own = {}
        for relation, values in VALUES.items():
            own[relation] = rng.choice(values)
            facts.append((entity, relation, own[relation]))
            for template in rng.sample(TEMPLATES[relation], paraphrases):
                sentences.append(template.format(e=entity, v=own[relation]))
                states.append(len(facts) - 1)
        for relation in rng.sample(list(DISTRACTORS), distractors):
            sentences.append(DISTRACTORS[relation].format(e=entity, v=own[relation]))
            states.append(-1)
    order = list(range(len(sentences)))
    rng.shuffle(order)
    return Corpus([sentences[i] for i in order], facts, [states[i] for i in order])


def encode(texts: list[str], completions: list[str] | None = None, length: int | None = None):
    """UTF-8 bytes, padded with PAD to `length` (default: the longest); returns (tokens, mask), lists of
    int lists. mask marks the tokens whose prediction counts: the completion's when given, else every
    real token."""
    completions = completions or [""] * len(texts)
    tokens, masks = [], []
    for text, completion in zip(texts, completions, strict=True):
        head, tail = list(text.encode()), list(completion.encode())
        tokens.append(head + tail)
        masks.append([0] * len(head) + [1] * len(tail) if completion else [1] * len(head))
    width = length or max(len(t) for t in tokens)
    if any(len(t) > width for t in tokens):
        raise ValueError(f"a text is longer than {width} bytes")
    return [t + [PAD] * (width - len(t)) for t in tokens], [m + [0] * (width - len(m)) for m in masks]
