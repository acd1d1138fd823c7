"""Write the training text the tiny demo models are built from.

The text is generated from a small probabilistic grammar of short stories, so the
project ships its own corpus (no download) and a model trained on it has entropies
that mean something: the grammar has real, varied branching.

Two files are written into ``data/corpus/``:

* ``stories.txt``: the pre-training text of p0 (the wide grammar).
* ``update.txt``: the text of p1's update step, a narrow, more repetitive register
  (mostly one character, one place, one ending), so that a few optimizer steps on it
  lower the model's entropy measurably.

Usage::

    python scripts/make_corpus.py            # rewrites data/corpus/*.txt
"""

from __future__ import annotations

import random
from pathlib import Path

NAMES = ["Mia", "Tom", "Lily", "Ben", "Sara", "Max", "Anna", "Leo", "Zoe", "Sam"]
ANIMALS = ["cat", "dog", "bird", "fox", "frog", "rabbit", "bear", "duck", "mouse", "owl"]
PLACES = ["park", "forest", "garden", "river", "beach", "hill", "village", "field", "lake"]
THINGS = ["ball", "kite", "box", "hat", "book", "cake", "stone", "shell", "flower", "boat"]
COLOURS = ["red", "blue", "green", "yellow", "big", "small", "shiny", "old", "soft"]
FEELINGS = ["happy", "sad", "tired", "brave", "scared", "curious", "proud", "calm"]
VERBS = ["found", "saw", "lost", "liked", "made", "wanted", "took", "painted"]
ENDINGS = [
    "They went home and slept well.",
    "It was the best day of the year.",
    "From that day on, they were friends.",
    "Then it started to rain, so they ran home.",
    "The sun went down and the stars came out.",
    "Everyone laughed and had some cake.",
]


def _story(rng: random.Random) -> str:
    name, friend = rng.sample(NAMES, 2)
    animal, place = rng.choice(ANIMALS), rng.choice(PLACES)
    sentences = [
        rng.choice(["Once upon a time", "One day", "Long ago", "Last summer"])
        + f", {name} went to the {place}.",
        f"{name} {rng.choice(VERBS)} a {rng.choice(COLOURS)} {rng.choice(THINGS)}.",
    ]
    for _ in range(rng.randint(1, 3)):
        sentences.append(
            rng.choice(
                [
                    f"A {animal} came and looked at it.",
                    f"{name} felt {rng.choice(FEELINGS)}.",
                    f'{friend} said, "Can I see the {rng.choice(THINGS)}?"',
                    f"The {animal} was {rng.choice(FEELINGS)} and {rng.choice(FEELINGS)}.",
                    f"They played by the {rng.choice(PLACES)} for a long time.",
                    f"{friend} {rng.choice(VERBS)} a {rng.choice(THINGS)} too.",
                ]
            )
        )
    sentences.append(rng.choice(ENDINGS))
    return " ".join(sentences)


def _update_story(rng: random.Random) -> str:
    # The narrow register of the update: mostly Mia, the park and one ending.
    name = "Mia" if rng.random() < 0.8 else rng.choice(NAMES)
    thing = rng.choice(THINGS[:3])
    return (
        f"One day, {name} went to the park. {name} found a red {thing}. "
        f"{name} felt happy. They went home and slept well."
    )


def main() -> None:
    out_dir = Path(__file__).resolve().parent.parent / "data" / "corpus"
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(20261123)
    (out_dir / "stories.txt").write_text("\n".join(_story(rng) for _ in range(6000)) + "\n")
    (out_dir / "update.txt").write_text("\n".join(_update_story(rng) for _ in range(400)) + "\n")


if __name__ == "__main__":
    main()
