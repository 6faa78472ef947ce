"""The ``jebm-od bench`` command line's little languages: detector lists, overrides, integer lists, time budgets.

``--detectors "knn,jebm:z_dims=[8,4][recon+neg_f],wide"`` becomes an ordered list of PyOD
detectors and jebm variants; each variant's overrides go through ``Config.override``
(``outlier_jebm.bench.apply_overrides``), so they are validated like every other override.
The library takes the parsed objects (``BenchSpec``); only this module reads strings.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from outlier_jebm.bench import (
    PYOD_DETECTORS,
    SHORTHANDS,
    BenchError,
    JEBMVariant,
    PyODDetector,
    apply_overrides,
    available_components,
    config_value,
)
from outlier_jebm.config import Config


def parse_overrides(text: str, sep: str = ",") -> dict[str, Any]:
    """``"prior=gaussian,train.prior_langevin.steps=60"`` -> {"model.prior": "gaussian", ...}.

    Keys are dotted config paths or a name in ``SHORTHANDS``; values are read as YAML scalars or
    lists (``z_dims=[8,4]``).
    """
    out: dict[str, Any] = {}
    for item in _split_top(text, sep):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise BenchError(f"override {item!r} is not key=value")
        try:
            parsed = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            raise BenchError(f"override {item!r}: value is not readable") from None
        out[SHORTHANDS.get(key, key)] = parsed
    return out


def parse_detectors(
    text: str,
    base: Config,
    *,
    variants: dict[str, str] | None = None,
    components: str = "all",
) -> list[PyODDetector | JEBMVariant]:
    """Turn ``--detectors`` (and ``--jebm-variant NAME=OVERRIDES``) into an ordered list of detectors.

    Tokens, separated by commas: a PyOD name (``PYOD_DETECTORS``); ``jebm`` (the base config);
    ``jebm:key=value:key=value`` (the base config with overrides); a name defined with
    ``variants``; any jebm token followed by ``[comp+comp]`` to report those components. Named
    variants that ``text`` does not mention run after the listed detectors. ``components`` is
    ``all``, ``none`` or a comma list reported for every jebm model.
    """
    variants = dict(variants or {})
    for name in variants:
        if not re.fullmatch(r"[A-Za-z0-9_.\-]+", name) or name in PYOD_DETECTORS or name == "jebm":
            raise BenchError(
                f"jebm variant name {name!r}: use letters, digits, '_', '-', '.', and not a detector's name"
            )
    tokens = [t.strip() for t in _split_top(text, ",") if t.strip()]
    mentioned = {_split_components(t)[0] for t in tokens}
    tokens += [name for name in variants if name not in mentioned]
    if not tokens:
        raise BenchError("no detectors given")

    if components.strip().lower() in ("all", ""):
        every: list[str] | None = None
    elif components.strip().lower() == "none":
        every = []
    else:
        every = [c.strip() for c in components.split(",") if c.strip()]

    entries: list[PyODDetector | JEBMVariant] = []
    by_name: dict[str, JEBMVariant] = {}
    for token in tokens:
        name, picked = _split_components(token)
        if name in PYOD_DETECTORS:
            if picked:
                raise BenchError(f"detector {token!r}: components belong to jebm models only")
            if name not in {e.name for e in entries}:
                entries.append(PYOD_DETECTORS[name])
            continue
        if name not in by_name:
            if name == "jebm":
                overrides: dict[str, Any] = {}
            elif name.startswith("jebm:"):
                overrides = parse_overrides(name[len("jebm:") :], sep=":")
            elif name in variants:
                overrides = parse_overrides(variants[name], sep=",")
            else:
                known = ", ".join(["jebm", "jebm:key=value", *PYOD_DETECTORS, *variants])
                raise BenchError(f"unknown detector {name!r}; known: {known}")
            config = apply_overrides(base, overrides)
            for path in ("model.image_size", "train.val_fraction"):
                if config_value(config, path) != config_value(base, path):
                    raise BenchError(
                        f"detector {name!r}: {path} must stay as in the base config (every detector shares one split)"
                    )
            variant = JEBMVariant(name, overrides, config, None if every is None else list(every))
            by_name[name] = variant
            entries.append(variant)
        variant = by_name[name]
        if variant.components is not None:
            variant.components += [c for c in picked if c not in variant.components]

    known_components = set()
    for entry in entries:
        if isinstance(entry, JEBMVariant):
            available = available_components(entry.config)
            known_components |= available
            if entry.components is not None:
                missing = [c for c in entry.components if c not in available and c not in (every or [])]
                if missing:
                    raise BenchError(f"{entry.name}: no component(s) {missing}; available: {sorted(available)}")
                entry.components = [c for c in entry.components if c in available]
    unknown = [c for c in (every or []) if c not in known_components]
    if unknown and known_components:
        raise BenchError(f"--components: unknown {unknown}; available: {sorted(known_components)}")
    return entries


def parse_int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise BenchError(f"{what}: expected comma-separated integers, got {text!r}") from None
    if not values:
        raise BenchError(f"{what}: nothing given")
    return list(dict.fromkeys(values))


def parse_seconds(text: str | None) -> float | None:
    """``"3600"``, ``"90s"``, ``"30m"``, ``"1.5h"`` -> seconds; None stays None."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([smh]?)\s*", str(text).lower())
    if m is None:
        raise BenchError(f"time budget {text!r}: expected seconds, or a number with s, m or h")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def _split_components(token: str) -> tuple[str, list[str]]:
    """``"jebm[latent_knn+recon]"`` -> ("jebm", ["latent_knn", "recon"]); a list value stays in the name:
    ``"jebm:z_dims=[8,4]"`` -> ("jebm:z_dims=[8,4]", [])."""
    m = re.fullmatch(r"(.*[^=\s])\[\s*([A-Za-z_]\w*(?:\s*\+\s*[A-Za-z_]\w*)*)\s*\]", token.strip())
    if m is None:
        return token.strip(), []
    return m.group(1).strip(), [c.strip() for c in m.group(2).split("+")]


def _split_top(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside brackets, so ``z_dims=[8,4]`` and ``jebm[a+b]`` stay whole."""
    parts, depth, current = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth = max(depth - 1, 0)
        if ch == sep and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return [p for p in (p.strip() for p in parts) if p]
