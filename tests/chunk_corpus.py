"""Documents for the chunking tests: seeded, varied (paragraphs, lines, sentences, long
words, unicode, empty), and a ~35 kB one for the re-chunk figures."""

from __future__ import annotations

import random
from pathlib import Path

_WORDS = ("the of and to in is that for it as with was on be by this are or from at an which"
          " vector index table column chunk row model swap migration postgres query search"
          " worker queue redis text embedding license software program covered work")
WORDS = tuple(_WORDS.split(" "))
UNICODE = ["naïve", "café", "Größe", "東京", "данные", "😀", "ﬁne", "e\u0301"]


def sentence(rng: random.Random) -> str:
    words = [rng.choice(WORDS) if rng.random() > 0.05 else rng.choice(UNICODE)
             for _ in range(rng.randint(3, 25))]
    if rng.random() < 0.03:
        words.append("x" * rng.randint(50, 900))  # a word longer than a chunk
    return " ".join(words).capitalize() + rng.choice([".", ".", ".", "?", "!", ";", ""])


def paragraph(rng: random.Random) -> str:
    joiner = "\n" if rng.random() < 0.2 else " "
    return joiner.join(sentence(rng) for _ in range(rng.randint(1, 12)))


def document(rng: random.Random) -> str:
    shape = rng.random()
    if shape < 0.02:
        return ""
    if shape < 0.05:
        return sentence(rng)
    gap = rng.choice(["\n\n", "\n\n", "\n\n\n", "\n \n", "\n"])
    return gap.join(paragraph(rng) for _ in range(rng.randint(1, 25)))


def documents(count: int, seed: int = 25) -> list[str]:
    """`count` documents; a few are real license texts (or slices) where the system has them."""
    rng = random.Random(seed)
    licenses = [p.read_text(errors="replace") for p in
                sorted(Path("/usr/share/common-licenses").glob("*-*")) if p.is_file()][:12]
    docs = []
    for i in range(count):
        if licenses and i % 20 == 0:
            text = licenses[(i // 20) % len(licenses)]
            start = rng.randint(0, max(0, len(text) - 1))
            docs.append(text[start:start + rng.randint(500, 20_000)])
        else:
            docs.append(document(rng))
    return docs


def long_document(seed: int = 35) -> str:
    """~35 kB of paragraphs (like GPL-3, the document of the issue's measurement)."""
    rng = random.Random(seed)
    paragraphs: list[str] = []
    while sum(len(p) + 2 for p in paragraphs) < 35_000:
        paragraphs.append(" ".join(sentence(rng).replace("x" * 3, "xy") for _ in
                                   range(rng.randint(2, 6))))
    return "\n\n".join(paragraphs)
