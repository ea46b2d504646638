"""X-Robots-Tag's directives, read as Google documents them: what the downloader checks on each
image's response (download.py) and `fastlaion extract` on each page's (extract.py). Standard
library only, so that extract's processes load no HTTP client for it."""

from __future__ import annotations

import re
from collections.abc import Iterable

# Directives that carry a value after a colon, so "name: value" is not an agent prefix.
_VALUED_DIRECTIVES = frozenset({"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"})
# Google's shorthand: "none" is "noindex, nofollow", so it opts out wherever either of them does.
_SHORTHANDS = {"none": frozenset({"noindex", "nofollow"})}


def agent_token(user_agent: str) -> str:
    """The product name a user agent goes by in robots.txt and X-Robots-Tag.

    >>> agent_token("fastlaion/0.1 (+https://github.com/fastlaion/fastlaion)")
    'fastlaion'
    """
    return re.split(r"[/\s]", user_agent.strip(), maxsplit=1)[0].lower()


def opt_out_directive(values: Iterable[str], tags: Iterable[str], agents: Iterable[str]) -> str | None:
    """The first of `tags` that X-Robots-Tag header `values` address to every agent or to one of
    `agents` (lower-case names), as 'directive' or 'agent: directive'; None if there is none.

    Each header value is a comma-separated list; `name: directive` starts the directives meant
    for agent `name` only, up to the next such prefix or the end of the value (Google's syntax).

    >>> opt_out_directive(["noindex, nofollow"], ["noindex"], ["fastlaion"])
    'noindex'
    >>> opt_out_directive(["googlebot: noindex"], ["noindex"], ["fastlaion"]) is None
    True
    >>> opt_out_directive(["googlebot: noarchive, fastlaion: noai"], ["noai"], ["fastlaion"])
    'fastlaion: noai'
    >>> opt_out_directive(["none"], ["noindex"], ["fastlaion"])  # "noindex, nofollow"
    'none'
    """
    tags, agents = frozenset(tags), frozenset(agents)
    if not tags:
        return None
    for value in values:
        agent: str | None = None  # directives before any prefix apply to every agent
        for part in value.lower().split(","):
            name, colon, rest = part.partition(":")
            name = name.strip()
            if colon and name and name not in _VALUED_DIRECTIVES and not any(c.isspace() for c in name):
                agent, part = name, rest
            directive = part.split(":", 1)[0].strip()
            if (directive in tags or not tags.isdisjoint(_SHORTHANDS.get(directive, ()))) and (
                    agent is None or agent in agents):
                return f"{agent}: {directive}" if agent else directive
    return None
