"""Character-level text data for `lmc train` and the demo: the corpus shipped in `lmc/data/`
(public-domain Shakespeare), its character vocabulary, a train/validation split and seeded
random batches of (inputs, next-character targets)."""
from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from lmc.errors import LmcError

CORPUS = "corpus.txt"


def shipped_corpus() -> str:
    """The text of `lmc/data/corpus.txt` without its header line (what it is, where from)."""
    text = resources.files("lmc").joinpath("data", CORPUS).read_text(encoding="utf-8")
    return strip_header(text)


def strip_header(text: str) -> str:
    """Drops a first line starting with '#': the corpus's description, not text to learn."""
    return text.split("\n", 1)[1] if text.startswith("#") and "\n" in text else text


def read_text(path: str | Path) -> str:
    """A user's corpus (--text FILE): UTF-8 text; a missing or binary file is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise LmcError(f"--text {path}: no such file; give a UTF-8 text file, or leave "
                         "--text out to train on the shipped corpus")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise LmcError(f"--text {path}: not UTF-8 text ({exc.reason} at byte {exc.start}); "
                         "give a plain text file") from None


@dataclass(frozen=True)
class CharCorpus:
    """A text as integer ids over its sorted set of characters, split into a training part and
    a validation tail (the last `val_fraction` of the text, so the two never overlap)."""

    text: str
    val_fraction: float = 0.1
    chars: tuple[str, ...] = field(init=False)
    ids: np.ndarray = field(init=False, repr=False)

    def __post_init__(self):
        if not 0.0 <= self.val_fraction < 1.0:
            raise LmcError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        chars = tuple(sorted(set(self.text)))
        object.__setattr__(self, "chars", chars)
        object.__setattr__(self, "ids", self.encode(self.text))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    @property
    def _index(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.chars)}

    def encode(self, text: str) -> np.ndarray:
        index = self._index
        unknown = sorted(set(text) - index.keys())
        if unknown:
            raise LmcError(f"characters {unknown[:10]} are not in the corpus vocabulary "
                             f"({self.vocab_size} characters)")
        return np.fromiter((index[c] for c in text), dtype=np.int64, count=len(text))

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def split(self, part: str) -> np.ndarray:
        """The ids of the 'train' or 'val' part."""
        cut = len(self.ids) - int(len(self.ids) * self.val_fraction)
        if part == "train":
            return self.ids[:cut]
        if part == "val":
            return self.ids[cut:]
        raise ValueError(f"part must be 'train' or 'val', got {part!r}")

    def check_fits(self, seq: int) -> None:
        """Both parts must hold at least one window of seq + 1 characters (input + target)."""
        for part in ("train", "val") if self.val_fraction else ("train",):
            n = len(self.split(part))
            if n <= seq:
                raise LmcError(f"the corpus's {part} part has {n} characters, too few for "
                                 f"--seq {seq} (needs more than {seq}); use a longer text or a "
                                 "shorter --seq")

    def batch(self, rng: np.random.Generator, batch: int, seq: int, part: str = "train"):
        """(x, y) int64 arrays [batch, seq] from random windows of `part`; y is x shifted by one
        character (the next-character targets)."""
        data = self.split(part)
        starts = rng.integers(0, len(data) - seq, size=batch)
        window = starts[:, None] + np.arange(seq + 1)[None, :]
        chunk = data[window]
        return chunk[:, :-1], chunk[:, 1:]
