"""Griffe extension used by the docs build: read Captum-style docstrings as Google style.

The package follows Captum's docstring conventions (``Args:`` followed by a blank line,
``Examples::`` with ``>>>`` lines, reST ``.. math::`` blocks and ``:class:`` roles). mkdocstrings'
Google parser needs a little help with them; this extension rewrites each docstring before it
is parsed, without touching the source:

* a blank line right after a section title (``Args:``, ``Returns:`` ...) is removed;
* ``Examples::`` / ``Example::`` become ``Examples:``;
* ``.. math::`` blocks become ``$$ ... $$`` (rendered by MathJax through pymdownx.arithmatex);
* ``:class:`x```, ``:func:`x```, ``:meth:`x```, ``:data:`x```, ``:mod:`x``` become ``x`` in code.

Referenced from ``mkdocs.yml`` (``plugins.mkdocstrings.handlers.python.options.extensions``).
"""

from __future__ import annotations

import re
from typing import Any, List

import griffe

_SECTION = re.compile(
    r"^(\s*)(Args|Arguments|Parameters|Returns|Return|Yields|Raises|Examples?|Attributes|Note|Notes|Warning|Warnings)"
    r"(::|:)\s*$"
)
_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|data|mod|attr|obj|exc):`~?([^`]+)`")


def captum_to_google(text: str) -> str:
    """Rewrite one Captum-style docstring (already dedented) into Google style."""
    lines = text.splitlines()
    out: List[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        m = _SECTION.match(line)
        if m:
            indent, title, _ = m.groups()
            out.append(f"{indent}{'Examples' if title.startswith('Example') else title}:")
            i += 1
            while i < len(lines) and not lines[i].strip():  # drop blank lines below the title
                i += 1
            continue
        if line.strip() == ".. math::":
            indent = len(line) - len(line.lstrip())
            i += 1
            body: List[str] = []
            while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent):
                body.append(lines[i].strip())
                i += 1
            expr = " ".join(b for b in body if b)
            out.extend([" " * indent + "$$", " " * indent + expr, " " * indent + "$$", ""])
            continue
        out.append(_ROLE.sub(r"`\1`", line))
        i += 1
    return "\n".join(out)


class CaptumStyle(griffe.Extension):
    """Rewrite every docstring with :func:`captum_to_google` before it is parsed."""

    def on_instance(self, *, node: Any, obj: griffe.Object, agent: Any, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = captum_to_google(obj.docstring.value)
