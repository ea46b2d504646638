"""When ftfy.fix_text leaves a caption as it is, without running it.

open_clip cleans every caption with `ftfy.fix_text` before tokenizing. That is ~150 us per
non-ASCII caption, the tokenizer's main cost on multilingual text, and it changes nothing on
almost all of them. `fix_text_is_identity(text)` says, in a few microseconds, that fix_text
(ftfy 6, default settings) returns `text` unchanged; False means "run it" (it may or may not
change the text).

Why it holds, for printable text (no control, format, surrogate or line-separator characters;
space separators such as the no-break space are allowed) without '&', in NFC, holding none of the
characters in `TOUCHED`:

* HTML unescaping needs '&'; line breaks, surrogates, terminal escapes and control characters are
  not printable; ligatures, full/half-width forms, curly quotes and C1 controls are in TOUCHED;
  NFC is checked: so no fixer changes the text.
* The mojibake repair runs only where `badness.BADNESS_RE` matches, and each of that pattern's
  alternatives needs at least one character from TOUCHED at some position (the anchors below).
  tests/test_textfix.py proves this from the pattern's parse for the pattern this module was written
  against (`PATTERN_SHA256`); with any other ftfy pattern the shortcut is off.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from functools import lru_cache

# What the reasoning above was checked against (ftfy 6.3): the SHA-256 of its mojibake pattern,
# and its settings and fixers (a release that adds a fixer turns the shortcut off too).
PATTERN_SHA256 = "9dcc0f2ac90d9ae3c85eb7b9b2c0b8a8e8126153847c2b30c91a0bb263f3b8c4"
FIXERS = ("decode_inconsistent_utf8", "fix_c1_controls", "fix_character_width", "fix_latin_ligatures",
          "fix_line_breaks", "fix_surrogates", "remove_control_chars", "remove_terminal_escapes",
          "replace_lossy_sequences", "restore_byte_a0", "uncurl_quotes", "unescape_html")
SETTINGS = ("unescape_html", "remove_terminal_escapes", "fix_encoding", "restore_byte_a0", "replace_lossy_sequences",
            "decode_inconsistent_utf8", "fix_c1_controls", "fix_latin_ligatures", "fix_character_width",
            "uncurl_quotes", "fix_line_breaks", "fix_surrogates", "remove_control_chars", "normalization",
            "max_decode_length", "explain")
MAX_LENGTH = 1_000_000  # fix_text's max_decode_length: longer text is fixed in pieces


def _touched() -> str:
    """A regex character class body: the characters some ftfy fixer changes, plus one anchor
    class for each alternative of BADNESS_RE."""
    from ftfy import chardata
    from ftfy.badness import MOJIBAKE_CATEGORIES as cat

    anchors = "".join(cat[k] for k in ("c1", "bad", "upper_accented", "box", "start_punctuation", "end_punctuation",
                                       "currency", "numeric"))
    anchors += "\N{LATIN CAPITAL LIGATURE OE}\N{LATIN SMALL LIGATURE OE}\u00d8\u00d9\u0402\N{DEGREE SIGN}"
    changed = {*chardata.LIGATURES, *chardata.WIDTH_MAP, *chardata.CONTROL_CHARS}
    quotes = "\u02bc\u2018-\u201f"  # uncurl_quotes
    return anchors + quotes + "".join(re.escape(chr(c)) for c in sorted(changed) if c >= 0x80)


@lru_cache(maxsize=1)
def _touched_re() -> re.Pattern[str] | None:
    """The compiled TOUCHED class; None where ftfy is not the one it was proven for."""
    try:
        import ftfy
        from ftfy.badness import BADNESS_RE
    except ImportError:
        return None
    if (hashlib.sha256(BADNESS_RE.pattern.encode()).hexdigest() != PATTERN_SHA256
            or tuple(sorted(getattr(ftfy, "FIXERS", ()))) != FIXERS
            or tuple(getattr(ftfy.TextFixerConfig, "_fields", ())) != SETTINGS
            or ftfy.TextFixerConfig().normalization != "NFC"):
        return None
    return re.compile(f"[{_touched()}]")


@lru_cache(maxsize=1)
def _spaces() -> dict[int, str]:
    """The space separators (Zs: no-break space, en space, ...) as ' ': str.isprintable() refuses
    them, yet no ftfy fixer changes them (the ideographic space, which the width fix changes, is in
    TOUCHED), and the whitespace folding after ftfy treats them as the space they are."""
    return {c: " " for c in range(0x80, 0x10000) if unicodedata.category(chr(c)) == "Zs"}  # all in the BMP


def printable(text: str) -> bool:
    """str.isprintable(), space separators allowed."""
    return text.isprintable() or text.translate(_spaces()).isprintable()


# uncurl_quotes' characters and what it makes of them
QUOTES = {0x02BC: "'", 0x2018: "'", 0x2019: "'", 0x201A: "'", 0x201B: "'", 0x201C: '"', 0x201D: '"', 0x201E: '"',
          0x201F: '"'}


# A character neither ASCII nor one of QUOTES: such a text is no case for uncurled_ascii, found
# without translating it first (a translate of an accented caption costs ~6 us)
_OTHER_NON_ASCII = re.compile("[^\x00-\x7f\u02bc\u2018-\u201f]")
assert {c for c in range(0x80, 0x2100) if not _OTHER_NON_ASCII.match(chr(c))} == set(QUOTES)


def uncurled_ascii(text: str) -> str | None:
    """ftfy.fix_text(text) where curly quotes are its only non-ASCII characters and the rest is
    printable ASCII without '&' (English captions often hold ’): the text with straight quotes,
    which is what fix_text returns there, since no alternative of its mojibake pattern can match
    printable ASCII and curly quotes alone (tests/test_textfix.py proves it) and no other fixer
    touches them. None for any other text."""
    if text.isascii() or "&" in text or _OTHER_NON_ASCII.search(text) or _touched_re() is None:
        return None
    out = text.translate(QUOTES)
    return out if out.isascii() and out.isprintable() else None


def fix_text_is_identity(text: str) -> bool:
    """True when ftfy.fix_text(text) == text for sure (see the module's docstring)."""
    touched = _touched_re()
    return (touched is not None and len(text) < MAX_LENGTH and "&" not in text and printable(text)
            and touched.search(text) is None and unicodedata.is_normalized("NFC", text))
