"""textfix.fix_text_is_identity: proven against ftfy's mojibake pattern, checked against ftfy."""

import random
import re

import ftfy
import pytest
import torch
from ftfy.badness import BADNESS_RE

from fastlaion import textfix
from fastlaion.score import CachedClipTokenizer

TOUCHED = re.compile(f"[{textfix._touched()}]")


def _allowed(ch: str) -> bool:
    """A character a caption may hold and still pass the check (NFC aside: a whole-text property)."""
    return textfix.printable(ch) and ch != "&" and TOUCHED.match(ch) is None


def _can_match_allowed(op, av, allowed=_allowed) -> bool:
    """Whether one position of the pattern (sre's parse) can match some allowed character.
    True where unsure: such a position is never taken as the one a match cannot get past."""
    if str(op) == "LITERAL":
        return allowed(chr(av))
    if str(op) != "IN" or any(str(sub) not in ("LITERAL", "RANGE") for sub, _ in av):
        return True  # negated classes, \s, \w, '.': all admit ASCII letters or spaces
    for sub, value in av:
        lo, hi = (value, value) if str(sub) == "LITERAL" else value
        if any(allowed(chr(c)) for c in range(lo, hi + 1)):
            return True
    return False


def _no_alternative_matches(allowed) -> None:
    """Each alternative of BADNESS_RE has a position no allowed character can fill."""
    parser = pytest.importorskip("re._parser")
    tree = parser.parse(BADNESS_RE.pattern, BADNESS_RE.flags)
    (branch_op, (_, alternatives)), = list(tree)
    assert str(branch_op) == "BRANCH" and len(alternatives) > 30
    for alt in alternatives:
        required = []
        for op, av in alt:
            if str(op) in ("LITERAL", "IN", "ANY"):
                required.append((op, av))
            else:  # an optional \s or ^: they never need a character
                assert str(op) == "AT" or (str(op) == "MAX_REPEAT" and av[0] == 0), (op, av)
        assert not all(_can_match_allowed(op, av, allowed) for op, av in required), f"no anchor in {alt}"


def test_the_shortcut_is_on_for_the_ftfy_it_was_proven_for(monkeypatch):
    assert textfix._touched_re() is not None, \
        "ftfy's pattern, fixers or settings changed: check textfix's reasoning again, then update its constants"
    # ... and off for any other: a new fixer, another pattern
    monkeypatch.setattr(ftfy, "FIXERS", {**ftfy.FIXERS, "fix_something_new": str})
    textfix._touched_re.cache_clear()
    assert textfix._touched_re() is None and not textfix.fix_text_is_identity("caf\u00e9")
    monkeypatch.undo()
    monkeypatch.setattr(textfix, "PATTERN_SHA256", "0" * 64)  # as if the mojibake pattern had changed
    textfix._touched_re.cache_clear()
    assert textfix._touched_re() is None
    monkeypatch.undo()
    textfix._touched_re.cache_clear()
    assert textfix._touched_re() is not None


def test_every_mojibake_alternative_needs_a_touched_character():
    """Each alternative of BADNESS_RE has a position no allowed character can fill, so the
    pattern cannot match a caption that passes the check: fix_text's encoding repair never runs."""
    _no_alternative_matches(_allowed)


def test_no_mojibake_alternative_matches_ascii_and_curly_quotes():
    """The same for printable ASCII without '&' plus curly quotes (uncurled_ascii's captions)."""
    _no_alternative_matches(lambda ch: (0x20 <= ord(ch) < 0x7F and ch != "&") or ord(ch) in textfix.QUOTES)


def test_curly_quotes_are_what_uncurl_quotes_changes():
    from ftfy import chardata, fixes

    quotes = {c for c in range(0x10000) if chardata.SINGLE_QUOTE_RE.match(chr(c)) or chardata.DOUBLE_QUOTE_RE.match(chr(c))}
    assert quotes == set(textfix.QUOTES)
    assert all(fixes.uncurl_quotes(chr(c)) == textfix.QUOTES[c] for c in quotes)


def test_uncurled_ascii_is_what_fix_text_returns():
    rng = random.Random(2)
    alphabet = [chr(c) for c in range(0x20, 0x7F)] + [chr(c) for c in textfix.QUOTES] * 8 + ["\u00e9", "\t", "\u00a0",
                                                                                               "\x07", "\x1b[1m"]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))) for _ in range(30_000)]
    texts += ["It\u2019s a \u201cgood\u201d day", "\u2018<start_of_text>\u2019", "\u02bcs"]
    assert textfix.uncurled_ascii("P&EACUTE;REZ\u2019s") is None  # ftfy's own entities: not this shortcut
    assert textfix.uncurled_ascii("plain ASCII") is None  # nothing to do
    done = [(t, textfix.uncurled_ascii(t)) for t in texts]
    said = [(t, u) for t, u in done if u is not None]
    assert len(said) > 3000 and any(u is None for _, u in done)
    assert [t for t, u in said if ftfy.fix_text(t) != u] == []
    # and the tokenizer, which takes that route, gives open_clip's ids
    import open_clip

    reference = open_clip.get_tokenizer("ViT-B-32")
    ours = CachedClipTokenizer.wrap(open_clip.get_tokenizer("ViT-B-32"))
    sample = texts[:3000] + texts[-3:]
    assert torch.equal(ours(sample), reference(sample))


def test_space_separators_are_allowed_but_not_the_ideographic_space():
    import unicodedata

    assert not [c for c in range(0x10000, 0x110000) if unicodedata.category(chr(c)) == "Zs"]  # _spaces looks at the BMP
    assert textfix.fix_text_is_identity("caf\u00e9\u00a0au\u2009lait")
    assert ftfy.fix_text("caf\u00e9\u00a0au\u2009lait") == "caf\u00e9\u00a0au\u2009lait"
    assert not textfix.fix_text_is_identity("\u6771\u4eac\u3000tower")  # the width fix makes it a space
    assert not textfix.fix_text_is_identity("caf\u00e9\u00adau")  # soft hyphen: a format character


def test_a_touched_character_makes_it_say_run_ftfy():
    for text in ["Ã©t\u00e9", "caf\u00e9 \u2019", "\ufb01ne", "\uff21\uff22", "a\u0085b", "Tom & Jerry", "e\u0301",
                 "\u00c9cole", "5\u20ac", "\u00a9 2020", "na\u00efve\u00b0", "tab\there", "\u3000space"]:
        assert not textfix.fix_text_is_identity(text), text


def _random_captions(n: int, seed: int = 0) -> list[str]:
    """Mixtures of ASCII, scripts ftfy leaves alone, and the characters that make it act: mojibake
    pieces, curly quotes, ligatures, wide forms, combining marks, controls."""
    rng = random.Random(seed)
    calm = ("abc XYZ 123 .,!?'\"-()/ caf\u00e9 na\u00efve \u00fcber se\u00f1or \u00e7a \u00f6l \u00df "
            "\u043f\u0440\u0438\u0432\u0435\u0442 \u03b3\u03b5\u03b9\u03b1 \u6771\u4eac \u30bf\u30ef\u30fc "
            "\ud55c\uad6d \u0645\u0631\u062d\u0628\u0627 \u05e9\u05dc\u05d5\u05dd \u0928\u092e\u0938\u094d\u0924\u0947 "
            "\u0e2a\u0e27\u0e31\u0e2a\u0e14\u0e35 \U0001f600 \U0001f44d\U0001f3fd a\u00a0b \u2009\u202f")
    loud = ("\u00c3\u00a9 \u00c2\u00a0 \u00e2\u20ac\u2122 \u00e2\u20ac\u0153 \u2019 \u201c \u201d \ufb01 \uff21 \u3000 "
            "\u00e0\u00b2 \u00d8\u00a7 \u0432\u0402 \u00c9 \u00a9 \u00b0 \u00d7\u00b2 \u0301 \u0300 \u00a0 \x85 \x1b[31m "
            "& &amp; \t \n \u2028 \ufeff \u200d \u0153\u00e9 \u20ac \u00a3 \u00bd \u00e0\u00a4 \u00d8\u00b9\u00d8\u00a8")
    calm_parts, loud_parts = calm.split(" "), loud.split(" ")
    out = []
    for _ in range(n):
        pieces = [rng.choice(loud_parts if rng.random() < 0.15 else calm_parts) for _ in range(rng.randint(0, 12))]
        out.append(rng.choice(["", " "]).join(pieces))
    return out


def test_it_never_says_identity_where_ftfy_changes_the_text():
    texts = _random_captions(20_000)
    said = [t for t in texts if textfix.fix_text_is_identity(t)]
    assert 0.2 * len(texts) < len(said) < 0.9 * len(texts)  # both kinds were tried
    assert [t for t in said if ftfy.fix_text(t) != t] == []
    changed = [t for t in texts if ftfy.fix_text(t) != t]
    assert changed and not any(textfix.fix_text_is_identity(t) for t in changed)


def test_tokenizer_ids_on_multilingual_captions_equal_open_clip():
    import open_clip

    reference = open_clip.get_tokenizer("ViT-B-32")
    ours = CachedClipTokenizer.wrap(open_clip.get_tokenizer("ViT-B-32"))
    texts = _random_captions(3000, seed=1)
    assert torch.equal(ours(texts), reference(texts))
    assert torch.equal(ours(texts, context_length=8), reference(texts, context_length=8))
