"""A griffe extension for the API reference: Sphinx cross-reference roles as inline code.

The package's docstrings are Google style but cross-reference with Sphinx roles
(``:class:`~lightning_mbpa.EpisodicMemory```, ``:meth:`refresh```), which Markdown would show
literally. This turns each role into inline code naming its target (the last component for a
``~`` target), so the reference reads cleanly and cannot produce a broken link.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(
    r":(?:py:)?(?:class|meth|func|attr|mod|obj|exc|data|const):`(~?)([^`<]*?)\s*(?:<[^`]*>)?`"
)


def _replace(match: re.Match[str]) -> str:
    short, target = match.group(1), match.group(2).strip()
    return f"`{target.rsplit('.', 1)[-1] if short else target}`"


class SphinxRoles(griffe.Extension):
    """Rewrite Sphinx roles in every docstring as Markdown inline code."""

    def on_instance(self, *, obj: Any, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _ROLE.sub(_replace, obj.docstring.value)
