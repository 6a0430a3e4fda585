"""Dataset config: schema validation with defaults filled in, naming the key at fault."""

from __future__ import annotations

from copy import deepcopy
from functools import lru_cache
from pathlib import Path

import yaml

from ..errors import CiderError
from ..restore_config import FLUORESCENCE, RestoreConfig

# Inside the package, so validation works from an installed wheel, not only a checkout.
SCHEMA = Path(__file__).resolve().parents[1] / "schemas" / "config.schema.yaml"
# restore.modality → the restore settings it fills (the schema's defaults suit brightfield).
MODALITY_SETTINGS = {"fluorescence": FLUORESCENCE, "brightfield": {}}
# PSF models of fluorescence optics: with restore.modality auto they mean fluorescence.
FLUORESCENCE_PSF_MODELS = ("widefield", "lightsheet")
# Keys that change no output (a check that refuses or passes): flipping one keeps the plan
# and reruns no rule.
NEUTRAL = {"input": ("check_voxel_size",)}


def output_settings(config: dict, key: str):
    """``config[key]`` less its keys that change no output (:data:`NEUTRAL`): what the plan
    and the rules' ``params`` compare between runs."""
    value = config.get(key)
    neutral = NEUTRAL.get(key)
    if not neutral or not isinstance(value, dict):
        return value
    return {k: v for k, v in value.items() if k not in neutral}


def restore_config(config: dict, device: str | None = None) -> RestoreConfig:
    """The restoration settings of a validated config (``restore`` section, its modality
    already applied), with ``device`` in place of ``restore.device`` when given."""
    settings = dict(config["restore"])
    settings.pop("modality", None)  # already applied to the settings by validate_config
    settings["device"] = device or settings["device"]
    return RestoreConfig(normalize=True, **settings)


def background_map(config: dict) -> bool:
    """Whether the background job writes a background array per image (wavelet removal on),
    not only records (no removal, or one flat level per image, kept in the record)."""
    background = config["background"]
    return bool(background["enabled"]) and background.get("method", "wavelet") == "wavelet"


def _fill_defaults(schema: dict, data: dict) -> dict:
    for key, sub in schema.get("properties", {}).items():
        if key not in data and "default" in sub:
            data[key] = deepcopy(sub["default"])
        if isinstance(data.get(key), dict) and sub.get("type") == "object":
            _fill_defaults(sub, data[key])
    return data


def _apply_modality(config: dict) -> dict:
    """Resolve ``restore.modality`` (``auto`` from ``psf.model``) and fill the settings it
    implies that the config does not give. Malformed sections are left to the schema."""
    restore, psf = config.get("restore", {}), config.get("psf", {})
    if not isinstance(restore, dict) or not isinstance(psf, dict):
        return config
    modality = restore.get("modality", "auto")
    if modality == "auto":
        modality = "fluorescence" if psf.get("model") in FLUORESCENCE_PSF_MODELS else "brightfield"
    config["restore"] = {**MODALITY_SETTINGS.get(modality, {}), **restore, "modality": modality}
    return config


@lru_cache(maxsize=1)
def _schema() -> dict:
    return yaml.safe_load(SCHEMA.read_text())


def validate_config(config: dict, source: str = "config") -> dict:
    """Validate ``config`` against the schema, fill defaults, and return it.

    ``restore.modality`` is resolved first (:func:`_apply_modality`), so that its settings
    come before the schema's defaults and after the keys the config gives.

    Raises
    ------
    CiderError
        Naming the key (dotted path), the value and the rule it broke.
    """
    import jsonschema

    schema = _schema()
    config = _fill_defaults(schema, _apply_modality(deepcopy(dict(config))))
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(config), key=lambda e: list(e.path))
    if errors:
        lines = []
        for err in errors:
            key = ".".join(str(p) for p in err.path) or "(top level)"
            lines.append(f"  key '{key}': {err.message}")
        raise CiderError(
            f"{source}: invalid configuration\n" + "\n".join(lines) + "\nsee config/README.md for every key"
        )
    return config


def load_config(path: str | Path) -> dict:
    """Read a YAML config file and validate it (see :func:`validate_config`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config: no such file {path}")
    return validate_config(yaml.safe_load(path.read_text()) or {}, source=str(path))
