"""The kernel command line as a value: :mod:`pyrovm.loader.cmdline` (and :func:`pyrovm.host.pvm_cmdline`)."""

from __future__ import annotations

import pytest

from pyrovm.errors import ConfigError
from pyrovm.host import PVM_CMDLINE_OPTIONS, pvm_cmdline
from pyrovm.loader.cmdline import Cmdline, split_words, word_key


# -- split_words / word_key ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", []),
        ("   ", []),
        ("a", ["a"]),
        ("console=ttyS0 reboot=k panic=-1", ["console=ttyS0", "reboot=k", "panic=-1"]),
        ("  a \t b\n\nc  ", ["a", "b", "c"]),
        ('foo="a b" bar', ['foo="a b"', "bar"]),
        ('"a b c"', ['"a b c"']),
        ('x="a  b"y z', ['x="a  b"y', "z"]),  # quotes toggle anywhere in a word, as in next_arg()
        ('a="" b', ['a=""', "b"]),
        ('init=/bin/sh -- "arg one" two', ["init=/bin/sh", "--", '"arg one"', "two"]),
    ],
)
def test_split_words(text: str, words: list[str]) -> None:
    assert split_words(text) == words


@pytest.mark.parametrize("text", ['"', 'foo="a b', 'a b="c d" e="f', 'x" y'])
def test_split_words_unterminated_quote(text: str) -> None:
    with pytest.raises(ConfigError, match="unterminated double quote"):
        split_words(text)


@pytest.mark.parametrize(
    ("word", "key"),
    [("root=/dev/vda", "root"), ("nopti", "nopti"), ("a=b=c", "a"), ("=x", ""), ('k="v w"', "k")],
)
def test_word_key(word: str, key: str) -> None:
    assert word_key(word) == key


# -- construction -----------------------------------------------------------------------------------
def test_construct_from_string_and_iterable() -> None:
    c = Cmdline("console=ttyS0  quiet")
    assert c.words == ["console=ttyS0", "quiet"]
    assert list(c) == ["console=ttyS0", "quiet"]
    # an iterable of strings: each is split too
    assert Cmdline(["console=ttyS0 quiet", "root=/dev/vda"]).words == [
        "console=ttyS0",
        "quiet",
        "root=/dev/vda",
    ]
    assert Cmdline().words == []
    assert str(Cmdline()) == ""


def test_words_is_a_copy() -> None:
    c = Cmdline("a b")
    c.words.append("c")
    assert c.words == ["a", "b"]


def test_unterminated_quote_refused() -> None:
    with pytest.raises(ConfigError, match="unterminated"):
        Cmdline('foo="a b')
    with pytest.raises(ConfigError, match="unterminated"):
        Cmdline(["ok", 'foo="a'])


def test_nul_refused() -> None:
    with pytest.raises(ConfigError, match="NUL"):
        Cmdline("console=ttyS0 a\0b")
    c = Cmdline("console=ttyS0")
    with pytest.raises(ConfigError, match="NUL"):
        c.add("x\0")
    assert c.words == ["console=ttyS0"]


def test_non_utf8_refused() -> None:
    with pytest.raises(ConfigError, match="UTF-8"):
        Cmdline("root=/dev/vda x=\udcff")
    c = Cmdline("a")
    with pytest.raises(ConfigError, match="UTF-8"):
        c.add("\udcff")
    assert c.words == ["a"]


def test_non_ascii_utf8_accepted() -> None:
    c = Cmdline("name=caf\u00e9")
    assert c.encode() == "name=caf\u00e9".encode()
    assert len(c.encode()) == len("name=caf\u00e9") + 1


# -- has / get ----------------------------------------------------------------------------------------
def test_has() -> None:
    c = Cmdline('console=ttyS0 nopti root=/dev/vda foo="a b"')
    assert c.has("console")
    assert c.has("nopti")
    assert c.has("root")
    assert c.has("foo")
    assert not c.has("roo")
    assert not c.has("ttyS0")
    assert not c.has("console=ttyS0")
    assert not Cmdline().has("x")


def test_get() -> None:
    c = Cmdline("console=tty0 quiet console=ttyS0 a=b=c empty=")
    assert c.get("console") == "ttyS0"  # the last one wins
    assert c.get("quiet") == ""  # a bare flag
    assert c.get("a") == "b=c"
    assert c.get("empty") == ""
    assert c.get("missing") is None
    assert Cmdline('x="a b"').get("x") == '"a b"'
    # a flag after a value: the flag is the last
    assert Cmdline("v=1 v").get("v") == ""
    assert Cmdline("v v=2").get("v") == "2"


# -- add / add_missing -------------------------------------------------------------------------------------
def test_add_several_words_in_one_string() -> None:
    c = Cmdline("console=ttyS0")
    ret = c.add("root=/dev/vda rw", "init=/sbin/init")
    assert ret is c
    assert c.words == ["console=ttyS0", "root=/dev/vda", "rw", "init=/sbin/init"]
    c.add('x="a b" y')
    assert c.words[-2:] == ['x="a b"', "y"]


def test_add_keeps_duplicates() -> None:
    c = Cmdline("console=tty0").add("console=ttyS0")
    assert c.words == ["console=tty0", "console=ttyS0"]
    assert c.get("console") == "ttyS0"


def test_add_unterminated_quote() -> None:
    c = Cmdline("a")
    with pytest.raises(ConfigError, match="unterminated"):
        c.add('b="c')
    assert c.words == ["a"]


def test_add_missing_keeps_user_value() -> None:
    c = Cmdline("console=ttyS0 clearcpuid=1 nopti")
    ret = c.add_missing("clearcpuid=308,295", "nopti", "noxsave", "console=hvc0", "root=/dev/vda")
    assert ret is c
    assert c.words == ["console=ttyS0", "clearcpuid=1", "nopti", "noxsave", "root=/dev/vda"]
    assert c.get("clearcpuid") == "1"
    assert c.get("console") == "ttyS0"


def test_add_missing_flag_vs_value() -> None:
    # a bare flag given by the user counts as present for key=value, and the other way round
    assert Cmdline("quiet").add_missing("quiet=1").words == ["quiet"]
    assert Cmdline("nopv=1").add_missing("nopv").words == ["nopv=1"]
    # a key that is only a prefix of another is not the same key
    assert Cmdline("nopvspin").add_missing("nopv").words == ["nopvspin", "nopv"]


def test_add_missing_twice_is_idempotent() -> None:
    c = Cmdline("a").add_missing("b", "c=1")
    c.add_missing("b", "c=2")
    assert c.words == ["a", "b", "c=1"]


def test_add_missing_checks_words() -> None:
    with pytest.raises(ConfigError, match="NUL"):
        Cmdline("a").add_missing("b\0")


# -- encode -----------------------------------------------------------------------------------------------
def test_encode() -> None:
    c = Cmdline("  console=ttyS0   reboot=k ")
    assert c.encode() == b"console=ttyS0 reboot=k"
    assert c.encode(None) == b"console=ttyS0 reboot=k"
    assert Cmdline().encode() == b""


def test_encode_limit() -> None:
    c = Cmdline("a" * 100)
    assert c.encode(100) == b"a" * 100  # exactly at the limit is fine
    with pytest.raises(ConfigError, match=r"101 bytes.*at most 100"):
        Cmdline("a" * 101).encode(100)
    # the limit is in bytes, not characters
    wide = Cmdline("\u00e9" * 50)
    assert len(str(wide)) == 50
    with pytest.raises(ConfigError, match="at most 99"):
        wide.encode(99)
    assert wide.encode(100) == ("\u00e9" * 50).encode()
    with pytest.raises(ConfigError):
        Cmdline("a").encode(0)
    assert Cmdline().encode(0) == b""


# -- value behaviour -----------------------------------------------------------------------------------
def test_equality_and_hash() -> None:
    a = Cmdline("console=ttyS0 quiet")
    b = Cmdline("  console=ttyS0\tquiet ")
    assert a == b
    assert hash(a) == hash(b)
    assert a != Cmdline("quiet console=ttyS0")  # order matters
    assert a != Cmdline("console=ttyS0")
    assert a != "console=ttyS0 quiet"  # not equal to a plain string
    assert len({a, b}) == 1


def test_copy_is_independent() -> None:
    a = Cmdline('console=ttyS0 foo="a b"')
    b = a.copy()
    assert a == b and a is not b
    b.add("quiet")
    assert a.words == ["console=ttyS0", 'foo="a b"']
    assert b.words == ["console=ttyS0", 'foo="a b"', "quiet"]
    assert a != b


@pytest.mark.parametrize("text", ["", "a", 'console=ttyS0 foo="a b" panic=-1', "x=\u00e9 -- init arg"])
def test_str_round_trip(text: str) -> None:
    c = Cmdline(text)
    assert Cmdline(str(c)) == c
    assert str(Cmdline(str(c))) == str(c)


def test_repr() -> None:
    assert repr(Cmdline("a  b")) == "Cmdline('a b')"


# -- pyrovm.host.pvm_cmdline, which uses Cmdline ----------------------------------------------------------
def test_pvm_cmdline_adds_missing_options() -> None:
    out = pvm_cmdline("console=ttyS0")
    assert out.split() == ["console=ttyS0", *PVM_CMDLINE_OPTIONS]


def test_pvm_cmdline_keeps_user_values() -> None:
    out = pvm_cmdline("console=ttyS0 clearcpuid=1 nopti")
    words = out.split()
    assert words[:3] == ["console=ttyS0", "clearcpuid=1", "nopti"]
    assert sum(w.startswith("clearcpuid") for w in words) == 1
    assert words.count("nopti") == 1
    assert "noxsave" in words and "nopv" in words


def test_pvm_cmdline_idempotent_and_quotes() -> None:
    once = pvm_cmdline('console=ttyS0 foo="a b"')
    assert pvm_cmdline(once) == once
    assert 'foo="a b"' in Cmdline(once).words
    full = " ".join(PVM_CMDLINE_OPTIONS)
    assert pvm_cmdline(full) == full


def test_pvm_cmdline_refuses_bad_cmdline() -> None:
    with pytest.raises(ConfigError):
        pvm_cmdline('foo="a')
