"""``--set KEY=VALUE`` items of the benches → ``RestoreConfig`` overrides, typed like the
field's default, so that a misspelt key or a bad value stops the bench at once (not after
an hour of fitting with the setting silently ignored)."""

from __future__ import annotations

import json
from dataclasses import fields

from cider import BackgroundConfig, RestoreConfig

TRUE, FALSE = ("1", "true", "yes"), ("0", "false", "no")


def parse_overrides(items: list[str], refused: tuple[str, ...] = ()) -> dict:
    """``["data_weight=100", "keep_best=false"]`` → ``{"data_weight": 100.0, "keep_best": False}``;
    ``background.KEY=VALUE`` items go into a ``background`` dict (``RestoreConfig.with_``).

    Each value takes the type of the field's default: booleans from ``true``/``false``
    (``1``/``0``, ``yes``/``no``), tuples from comma-separated numbers or a JSON list,
    ``feature_weights`` (default ``None``) from a name or ``none``, the rest by the default's
    type (``int``, ``float``, ``str``).

    Parameters
    ----------
    items : list of str
        ``KEY=VALUE`` strings.
    refused : tuple of str
        Fields the bench sets itself (e.g. ``iterations``), refused here.

    Raises
    ------
    SystemExit
        Naming the item, for an unknown or refused key, a missing ``=`` or a value that
        does not read as the field's type.
    """
    defaults = RestoreConfig()
    settable = [f.name for f in fields(RestoreConfig) if f.name not in (*refused, "background")]
    settable += [f"background.{f.name}" for f in fields(BackgroundConfig)]
    overrides: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in settable:
            raise SystemExit(f"--set {item}: give KEY=VALUE with KEY one of {', '.join(settable)}")
        section, _, name = key.rpartition(".")
        owner, target = (
            (defaults.background, overrides.setdefault("background", {}))
            if section
            else (defaults, overrides)
        )
        try:
            target[name] = _typed(value, getattr(owner, name))
        except ValueError as err:
            raise SystemExit(f"--set {item}: {err}") from None
    return overrides


def _typed(value: str, default):
    """``value`` read as the type of ``default``."""
    if isinstance(default, bool):
        if value.lower() not in TRUE + FALSE:
            raise ValueError(f"{value!r} is not true/false")
        return value.lower() in TRUE
    if isinstance(default, tuple):
        items = json.loads(value) if value.startswith("[") else value.split(",")
        return tuple(float(v) for v in items)
    if default is None:
        return None if value.lower() in ("none", "null") else value
    return type(default)(value)
