"""Label names and actor names: one normal form, one set of rules, one comparison.

A name is free Unicode text on one line, and what a person sees must be what is stored:

* NFKC-normalised (compatibility forms fold: ``ｓｈｏｅｓ`` is ``shoes``, ``e`` + combining
  accent is ``é``), trimmed;
* Unicode format characters (category Cf: zero-width space, byte-order mark, bidi marks...)
  removed, except a zero-width joiner between two symbols, which is part of an emoji
  sequence (👨‍👩‍👧);
* refused when nothing visible is left (empty, whitespace, a Braille blank, a Hangul filler,
  a lone combining mark), when it holds a control character (newline, tab, NUL) or a
  line/paragraph separator, when it is longer than `MAX_NAME_LENGTH`, and when it looks like
  an id (``#5``): the CLI names a label by ``#ID``, so such a name would be ambiguous there.

Names are unique within a session compared by `name_key` (the normal form, casefolded):
``Shoes`` = ``SHOES`` = ``ｓｈｏｅｓ``, and ``zero<ZWSP>width`` = ``zerowidth``.

`forbidden_character` is the control-character rule alone, for other modules that must
apply it to their own text (export's folder names).
"""

from __future__ import annotations

import re
import unicodedata

from imgcluster.errors import InvalidLabelName

__all__ = [
    "MAX_ACTOR_LENGTH",
    "MAX_NAME_LENGTH",
    "clean_actor",
    "forbidden_character",
    "looks_like_id",
    "name_key",
    "normal_form",
    "validate_name",
]

#: Longest label name, in characters (code points after normalisation).
MAX_NAME_LENGTH = 100
#: Longest actor (annotator) name kept in the audit log.
MAX_ACTOR_LENGTH = 64

_ID_SYNTAX = re.compile(r"#\d+")
_ZWJ = "\u200d"
#: Characters that draw nothing although their category says letter/symbol.
_BLANKS = frozenset("\u2800\u115f\u1160\u3164\uffa0\u180e")


def forbidden_character(text: str) -> str | None:
    """The first character that breaks "one line of text" (control characters, surrogates,
    line and paragraph separators), as a readable name; None when there is none."""
    for ch in text:
        if unicodedata.category(ch) in ("Cc", "Cs", "Zl", "Zp"):
            return unicodedata.name(ch, f"U+{ord(ch):04X}")
    return None


def normal_form(text: str) -> str:
    """NFKC, format characters removed (emoji joiners kept), trimmed. No validation."""
    text = unicodedata.normalize("NFKC", text)
    kept = [
        ch
        for i, ch in enumerate(text)
        if unicodedata.category(ch) != "Cf" or _emoji_joiner(text, i)
    ]
    return unicodedata.normalize("NFKC", "".join(kept)).strip()


def _emoji_joiner(text: str, i: int) -> bool:
    """A zero-width joiner between two symbols (or a variation selector and a symbol) is
    part of an emoji ZWJ sequence; anywhere else it is invisible noise."""
    if text[i] != _ZWJ or not 0 < i < len(text) - 1:
        return False
    before, after = unicodedata.category(text[i - 1]), unicodedata.category(text[i + 1])
    return before in ("So", "Sk", "Mn", "Me") and after in ("So", "Sk")


def _visible(text: str) -> bool:
    return any(unicodedata.category(ch)[0] in "LNPS" and ch not in _BLANKS for ch in text)


def validate_name(name: object) -> str:
    """Return the stored form of a label name, or raise `InvalidLabelName` saying why.

    Parameters
    ----------
    name : str
        The typed name.

    Returns
    -------
    str
        The normal form (see the module docstring).

    Raises
    ------
    InvalidLabelName
        Not text, nothing visible, a control character, too long, or ``#<digits>``.

    Examples
    --------
    >>> validate_name("  T-shirts ")
    'T-shirts'
    >>> validate_name("zero\\u200bwidth")
    'zerowidth'
    """
    if not isinstance(name, str):
        raise InvalidLabelName(f"a label name must be text, not {type(name).__name__}")
    bad = forbidden_character(name.strip())
    if bad is not None:
        raise InvalidLabelName(
            f"label name {name.strip()!r} contains a control character ({bad}); "
            "a name is one line of text"
        )
    text = normal_form(name)
    if not text or not _visible(text):
        raise InvalidLabelName(
            f"a label name cannot be empty, only whitespace or invisible characters (got {name!r})"
        )
    if len(text) > MAX_NAME_LENGTH:
        raise InvalidLabelName(
            f"label name is {len(text)} characters long; the limit is {MAX_NAME_LENGTH}"
        )
    if looks_like_id(text):
        raise InvalidLabelName(
            f"label name {text!r} looks like a label id (#ID names a label by id in the CLI); "
            "add a word, e.g. 'no. 5'"
        )
    return text


def looks_like_id(text: str) -> bool:
    """True for ``#<digits>``: the CLI's syntax for a label id."""
    return _ID_SYNTAX.fullmatch(text.strip()) is not None


def name_key(name: str) -> str:
    """The form names are compared in: the normal form, casefolded (caseless identifier
    match), so two names that look alike are the same name."""
    return unicodedata.normalize("NFKC", normal_form(name).casefold())


def clean_actor(actor: str | None, default: str = "unknown") -> str:
    """An annotator name fit for the audit log: the label-name normal form, control
    characters turned into spaces, runs of whitespace squeezed, capped; ``default`` when
    nothing is left (a ``?who=`` with a newline never splits a log line)."""
    text = "".join(
        " " if unicodedata.category(ch) in ("Cc", "Cs", "Zl", "Zp") else ch for ch in (actor or "")
    )
    text = " ".join(normal_form(text).split())[:MAX_ACTOR_LENGTH].strip()
    return text if text and _visible(text) else default
