"""Builtin preference datasets, built at run time from text that ships inside installed packages.

Nothing here is copied into the repository: the text is read from the package
on every call, so the data stays the package's (and its licence's).

``pang-lee-polarity``: the 200 labelled movie-review sentences of Pang & Lee's
sentence polarity data set that gensim ships as test data (100 positive,
100 negative). Each positive sentence is paired with a negative one under an
instruction to write a positive review: the chosen response is positive, the
rejected negative - the controlled-sentiment task of the DPO and TDPO papers
in miniature. ``pang-lee-polarity`` is conversational (TRL format);
``pang-lee-polarity-text`` is the same pairs in the standard format.

``movie-reviews``: those 200 sentences and the 10 IMDb reviews gensim ships
(``alldata-id-10.txt``) as ``{"text": ...}`` rows, for supervised fine-tuning.

``movie-prefixes`` (prompts, :func:`movie_prefixes`): the first 3 to 6 words of each of
those 210 texts, the DPO paper's IMDb protocol (a review prefix the policy continues).
Every fifth prefix is held out for evaluation (``split="eval"``); the rest is ``train``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pipeline.errors import DataError

_PROMPTS = (
    "Write a one-sentence review of a movie you liked.",
    "In one sentence, tell me what was good about a film you saw recently.",
    "Give a short, positive movie review.",
    "Describe a movie you would recommend, in a single sentence.",
)


def package_file(package: str, relative: str, install_hint: str) -> Path:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"package '{package}' is not installed; {install_hint}")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise DataError(f"package '{package}' is installed but lacks {relative}; {install_hint}")
    return path


def pang_lee_sentences() -> tuple[list[str], list[str]]:
    """(positive, negative) sentences, in the file's order."""
    path = package_file(
        "gensim", "test/test_data/pang_lee_polarity.cor", "install it with `pip install --no-deps gensim`"
    )
    corpus = path.read_bytes().decode("cp1252")  # the corpus predates UTF-8: Windows-1252
    positive, negative = [], []
    for line in corpus.splitlines():
        label, _, text = line.partition(" ")
        text = _detokenize(text.strip())
        if label == "__label__pos":
            positive.append(text)
        elif label == "__label__neg":
            negative.append(text)
    return positive, negative


def imdb_reviews() -> list[str]:
    """The 10 IMDb reviews of gensim's doc2vec test data (lower-cased, tokenized text, id-prefixed lines)."""
    path = package_file("gensim", "test/test_data/alldata-id-10.txt", "install it with `pip install --no-deps gensim`")
    reviews = []
    for line in path.read_text(encoding="utf-8").splitlines():
        _, _, text = line.partition(" ")
        if text.strip():
            reviews.append(_detokenize(" ".join(text.split())))
    return reviews


def movie_texts() -> list[str]:
    """Positive and negative sentences interleaved, then the IMDb reviews."""
    positive, negative = pang_lee_sentences()
    mixed = [text for pair in zip(positive, negative, strict=True) for text in pair]
    return mixed + imdb_reviews()


def movie_prefixes(split: str = "all") -> list[str]:
    """Review prefixes of 3-6 words; every fifth one is in the ``eval`` split, the others in ``train``."""
    if split not in ("train", "eval", "all"):
        raise DataError(f"unknown split {split!r} of builtin:movie-prefixes; use train, eval or all")
    prefixes = []
    for i, text in enumerate(movie_texts()):
        if split == "all" or (i % 5 == 0) == (split == "eval"):
            prefixes.append(" ".join(text.split()[: 3 + i % 4]))
    return prefixes


def _detokenize(text: str) -> str:
    """Undo the corpus' space-before-punctuation tokenization and capitalise the first letter."""
    for mark in (" ,", " .", " !", " ?", " ;", " :", " 's", " 're", " n't", " )"):
        text = text.replace(mark, mark[1:])
    text = text.replace("( ", "(")
    return text[:1].upper() + text[1:]


def _pang_lee_pairs(conversational: bool) -> Iterator[dict[str, Any]]:
    positive, negative = pang_lee_sentences()
    for i, (good, bad) in enumerate(zip(positive, negative, strict=False)):
        prompt = _PROMPTS[i % len(_PROMPTS)]
        if conversational:
            yield {
                "prompt": [{"role": "user", "content": prompt}],
                "chosen": [{"role": "assistant", "content": good}],
                "rejected": [{"role": "assistant", "content": bad}],
            }
        else:
            yield {"prompt": f"{prompt}\n", "chosen": good, "rejected": bad}


BUILTIN_DATASETS: dict[str, Callable[[], Iterator[dict[str, Any]]]] = {
    "pang-lee-polarity": lambda: _pang_lee_pairs(conversational=True),
    "pang-lee-polarity-text": lambda: _pang_lee_pairs(conversational=False),
    "movie-reviews": lambda: ({"text": text} for text in movie_texts()),
}


def builtin_records(name: str) -> Iterator[dict[str, Any]]:
    try:
        make = BUILTIN_DATASETS[name]
    except KeyError:
        known = ", ".join(f"builtin:{k}" for k in BUILTIN_DATASETS)
        raise DataError(f"unknown builtin dataset 'builtin:{name}'; known: {known}") from None
    return make()
