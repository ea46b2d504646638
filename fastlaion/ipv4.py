"""IPv4 addresses as WHATWG's URL parser reads a host (URL Standard, "IPv4 parser" and "ends in
a number"), shared by extraction's URL fold (extract.py) and the download guard (download.py).

A host whose last label is a number (decimal, "0x" hex, or "0"-prefixed octal; one trailing dot
aside) is an IPv4 address to browsers, in any of the legacy spellings BSD's inet_aton takes:
`0x7f.1`, `2130706433`, `0177.0.0.1`, `127.1` and `127.0.0.1.` are all 127.0.0.1, and one that
is no valid address (`1.2.3.4.5`, `999.1.1.1`, `0x100000000`, `1..2`) is no host at all
(`1.0x` is one: "0x" alone is 0, so 1.0.0.0).

>>> ends_in_number("0x7f.1"), ends_in_number("example.com"), ends_in_number("a.0x")
(True, False, True)
>>> [ipv4_number(h) for h in ("0x7f.1", "127.0.0.1.", "1.2.3.4.5")]
[2130706433, 2130706433, None]
>>> dotted(ipv4_number("0251.0376.0251.0376"))
'169.254.169.254'
"""

from __future__ import annotations

import re

_NUMBER = re.compile(r"[0-9]+|0[Xx][0-9A-Fa-f]*")  # what "ends in a number" takes for a last label
_DIGITS = {8: re.compile("[0-7]*"), 10: re.compile("[0-9]*"), 16: re.compile("[0-9A-Fa-f]*")}
_TOO_BIG = 1 << 40  # any number with more digits than _DIGITS_CAP: over every limit below
_DIGITS_CAP = 12  # (int() of a 5,000-digit label would raise: Python's int max str digits)
# the last character of a host that may end in a number (or be one): most host names end in a
# letter no number holds, and are answered by this test alone
MAY_END_IN_NUMBER = frozenset("0123456789abcdefABCDEFxX.")


def ends_in_number(host: str) -> bool:
    """WHATWG's "ends in a number" on an ASCII host (after its domain-to-ASCII): the last label,
    after one trailing empty one, is ASCII digits or parses as an IPv4 number ("0x" and hex
    digits, none included). Most hosts are answered by their last character alone."""
    if host[-1:] not in MAY_END_IN_NUMBER:
        return False
    parts = host.split(".")
    if parts[-1] == "":
        if len(parts) == 1:
            return False
        parts.pop()
    return _NUMBER.fullmatch(parts[-1]) is not None


def _number(part: str) -> int | None:
    """WHATWG's IPv4 number parser: None where it fails."""
    if not part:
        return None
    radix = 10
    if len(part) >= 2 and part[:2] in ("0x", "0X"):
        part, radix = part[2:], 16
    elif len(part) >= 2 and part[0] == "0":
        part, radix = part[1:], 8
    if _DIGITS[radix].fullmatch(part) is None:  # (an empty rest is 0)
        return None
    part = part.lstrip("0")
    return _TOO_BIG if len(part) > _DIGITS_CAP else int(part or "0", radix)


def ipv4_number(host: str) -> int | None:
    """WHATWG's IPv4 parser on a host that ends in a number: the address as a 32-bit number,
    or None where the parser fails (then no browser fetches the URL)."""
    parts = host.split(".")
    if parts[-1] == "" and len(parts) > 1:
        parts.pop()
    if len(parts) > 4:
        return None
    numbers = []
    for part in parts:
        number = _number(part)
        if number is None:
            return None
        numbers.append(number)
    last = numbers.pop()
    if any(n > 255 for n in numbers) or last >= 256 ** (4 - len(numbers)):
        return None
    for i, n in enumerate(numbers):
        last += n << (8 * (3 - i))
    return last


def dotted(number: int) -> str:
    """A 32-bit address in dotted decimal, as WHATWG serialises an IPv4 host."""
    return ".".join(str(number >> shift & 255) for shift in (24, 16, 8, 0))
