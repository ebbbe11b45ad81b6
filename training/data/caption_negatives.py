"""Hard negative captions for contrastive training: NegCLIP's "replace" negatives (Yuksekgonul et al. 2023,
"When and why vision-language models behave like bags-of-words").

In a batch of web or world captions, colour, count and background already tell almost every pair apart, so
the contrastive loss never asks the towers for the rest: the demo's CLIP learnt colour but scored chance on
shape, and its text embeddings of "a red triangle" and "a red star" coincided (bench/RESULTS.md, "Why the
contrastive CLIP never learns shape"). A negative caption that differs from the true one by one word of a
kind (a colour for another colour, a shape for another shape, left for right) is a sample the model can only
reject by reading that word and seeing the attribute in the image.

`WordSwap` makes one such caption per training sample: one word of the caption that belongs to a configured
group is replaced by another word of the same group; an English article before it is made to agree ("a red"
→ "an orange"), so that grammar never gives a negative away. A caption without any group word gets no
negative (the loss masks it). Groups hold words of one inflection each (singular shapes, plural shapes), so
that a swap keeps the sentence's number; words with a near synonym in the same group would make true
"negatives" and are left out (grey/gray, big/large).

`fit(captions)` keeps the words that the training captions use (in at least `min_count` of them): a negative
that names a word no true caption ever holds is rejected by that word alone, which teaches nothing about the
image. The CLIP recipe fits it once on the training captions before training.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from training.errors import UserError


class WordSwap:
    """caption, rng → `per_caption` copies of the caption, each with one word swapped for another of its
    group (a different group for each copy), or None where the caption has no more groups to swap."""

    def __init__(self, groups: Mapping[str, Sequence[str]], min_count: int = 5, per_caption: int = 1):
        self.min_count, self.per_caption = int(min_count), int(per_caption)
        if self.per_caption < 1:
            raise UserError(f"caption_negatives.per_caption={per_caption}: expected a whole number ≥ 1")
        self.groups: dict[str, tuple[str, ...]] = {}
        self._group_of: dict[str, str] = {}
        for name, words in dict(groups).items():
            words = tuple(dict.fromkeys(str(w).lower() for w in words))
            if len(words) < 2:
                raise UserError(f"caption_negatives.groups.{name}: a group needs at least two words, got {words}")
            for word in words:
                if word in self._group_of:
                    raise UserError(
                        f"caption_negatives.groups: {word!r} is in both {self._group_of[word]!r} and {name!r}"
                    )
                self._group_of[word] = name
            self.groups[name] = words
        if not self.groups:
            raise UserError("caption_negatives.groups is empty: name at least one group of interchangeable words")
        self._compile()

    def _compile(self) -> None:
        self._group_of = {word: name for name, words in self.groups.items() for word in words}
        # Longest first, so that a word never matches as the prefix of a longer one; whole words only.
        alternatives = "|".join(re.escape(w) for w in sorted(self._group_of, key=len, reverse=True))
        self._pattern = re.compile(rf"(?<![\w-])({alternatives})(?![\w-])", re.IGNORECASE) if alternatives else None

    def fit(self, captions: Iterable[str]) -> dict[str, int]:
        """Keep the words found in at least `min_count` of `captions` (groups left with fewer than two words
        are dropped); returns how many captions hold each word, for the run's log."""
        counts = dict.fromkeys(self._group_of, 0)
        for caption in captions:
            for word in {m.group(1).lower() for m in self._pattern.finditer(caption)}:
                counts[word] += 1
        kept = {name: tuple(w for w in words if counts[w] >= self.min_count) for name, words in self.groups.items()}
        self.groups = {name: words for name, words in kept.items() if len(words) >= 2}
        self._compile()
        return counts

    def describe(self) -> str:
        """One line: the groups and words in use."""
        if not self.groups:
            return "no group has two words that the captions use: no hard negatives"
        return "; ".join(f"{name}: {', '.join(words)}" for name, words in self.groups.items())

    def __call__(self, caption: str, rng: np.random.Generator) -> list[str | None]:
        """`per_caption` negatives, each swapping a word of a different group (groups drawn at random among
        those the caption holds, then a word of that group, then its replacement); None where the caption
        has fewer groups than that."""
        matches = list(self._pattern.finditer(caption)) if self._pattern is not None else []
        by_group: dict[str, list[re.Match]] = {}
        for match in matches:
            by_group.setdefault(self._group_of[match.group(1).lower()], []).append(match)
        groups = list(by_group)
        order = rng.permutation(len(groups))[: self.per_caption] if groups else []
        negatives: list[str | None] = []
        for g in order:
            options = by_group[groups[int(g)]]
            negatives.append(self._swap(caption, options[int(rng.integers(len(options)))], rng))
        return negatives + [None] * (self.per_caption - len(negatives))

    def _swap(self, caption: str, match: re.Match, rng: np.random.Generator) -> str:
        found = match.group(1)
        others = [w for w in self.groups[self._group_of[found.lower()]] if w != found.lower()]
        word = others[int(rng.integers(len(others)))]
        if found[:1].isupper():
            word = word[:1].upper() + word[1:]
        before = _agree_article(caption[: match.start()], word)
        return before + word + caption[match.end() :]


_ARTICLE = re.compile(r"(?<![\w-])(a|an)(\s+)$", re.IGNORECASE)


def _agree_article(before: str, word: str) -> str:
    """`before` with a trailing "a"/"an" made to agree with `word` (by its first letter: the usual rule)."""
    match = _ARTICLE.search(before)
    if match is None:
        return before
    article = "an" if word[:1].lower() in "aeiou" else "a"
    if match.group(1)[:1].isupper():
        article = article.capitalize()
    return before[: match.start()] + article + match.group(2)
