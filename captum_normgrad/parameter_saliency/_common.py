"""Argument checks shared by the parameter-saliency modules."""

from __future__ import annotations

from typing import Any, Sequence

__all__: list = []


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
