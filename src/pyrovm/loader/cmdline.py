"""The kernel command line as a value: words (``key`` or ``key=value``, double quotes as Linux parses
them), looked up by key, added to, and turned into the bytes the boot protocol carries.

It replaces string concatenation and regular-expression patching: ``Cmdline("console=ttyS0")`` then
``add("root=/dev/vda", "rw")``; ``has("root")``; ``add_missing("nopv", "noxsave")`` adds only options whose
key is not there already (whatever value the user gave); ``encode(limit)`` checks the size.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from pyrovm.errors import ConfigError


def split_words(text: str) -> list[str]:
    """Split like the kernel's ``next_arg()``: on blanks, except inside double quotes."""
    words: list[str] = []
    word: list[str] = []
    quoted = False
    for ch in text:
        if ch == '"':
            quoted = not quoted
            word.append(ch)
        elif ch.isspace() and not quoted:
            if word:
                words.append("".join(word))
                word = []
        else:
            word.append(ch)
    if quoted:
        raise ConfigError(f"kernel command line {text!r}: unterminated double quote")
    if word:
        words.append("".join(word))
    return words


def word_key(word: str) -> str:
    """The part of *word* before ``=`` (the whole word for a flag)."""
    return word.split("=", 1)[0]


class Cmdline:
    """An ordered list of kernel command-line words."""

    def __init__(self, text: str | Iterable[str] = "") -> None:
        words = split_words(text) if isinstance(text, str) else [w for t in text for w in split_words(t)]
        for w in words:
            _check_word(w)
        self._words = words

    @property
    def words(self) -> list[str]:
        return list(self._words)

    def __iter__(self) -> Iterator[str]:
        return iter(self._words)

    def __str__(self) -> str:
        return " ".join(self._words)

    def __repr__(self) -> str:
        return f"Cmdline({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Cmdline) and other._words == self._words

    def __hash__(self) -> int:
        return hash(tuple(self._words))

    def copy(self) -> Cmdline:
        return Cmdline(self._words)

    def has(self, key: str) -> bool:
        """True when some word has *key* (``root`` matches ``root=/dev/vda``)."""
        return any(word_key(w) == key for w in self._words)

    def get(self, key: str) -> str | None:
        """The value of the last ``key=value`` word (``""`` for a bare flag), or None."""
        found = None
        for w in self._words:
            k, sep, v = w.partition("=")
            if k == key:
                found = v if sep else ""
        return found

    def add(self, *words: str) -> Cmdline:
        """Append *words* (each may hold several, split as above); returns self."""
        for text in words:
            for w in split_words(text):
                _check_word(w)
                self._words.append(w)
        return self

    def add_missing(self, *words: str) -> Cmdline:
        """Append each word whose key is not present yet; returns self."""
        for w in words:
            if not self.has(word_key(w)):
                self.add(w)
        return self

    def encode(self, limit: int | None = None) -> bytes:
        """The bytes for guest memory (without the NUL); ConfigError past *limit* bytes."""
        data = str(self).encode()
        if limit is not None and len(data) > limit:
            raise ConfigError(f"kernel command line is {len(data)} bytes, the kernel accepts at most {limit}")
        return data


def _check_word(word: str) -> None:
    if "\0" in word:
        raise ConfigError(f"kernel command line word {word!r} contains a NUL byte")
    try:
        word.encode()
    except UnicodeEncodeError as exc:
        raise ConfigError(f"kernel command line word {word!r} is not valid UTF-8") from exc
