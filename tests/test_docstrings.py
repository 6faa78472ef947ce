"""The public API (``outlier_jebm.__all__``) is documented numpy-style, and the documented parameters are the real ones."""

from __future__ import annotations

import dataclasses
import inspect
import re

import pytest

import outlier_jebm

PUBLIC = [n for n in outlier_jebm.__all__ if n != "__version__"]


def _documented_parameters(doc: str) -> list[str] | None:
    """Names listed under a numpy ``Parameters`` section (None if there is no such section)."""
    m = re.search(r"^Parameters\n-{10,}\n(.*?)(?=^\w[\w ]*\n-{3,}\n|\Z)", doc, flags=re.S | re.M)
    if m is None:
        return None
    names = []
    for line in m.group(1).splitlines():
        if line and not line[0].isspace():  # an entry's first line: "name : type" or "a, b : types"
            names += [n.strip().lstrip("*") for n in line.split(" : ")[0].split(",")]
    return names


def _callables(name: str):
    obj = getattr(outlier_jebm, name)
    if inspect.isfunction(obj):
        yield name, obj
    elif inspect.isclass(obj) and not issubclass(obj, Exception):
        if not dataclasses.is_dataclass(obj):
            yield name, obj  # its constructor: documented on the class
        for attr, member in vars(obj).items():
            func = member.__func__ if isinstance(member, (classmethod, staticmethod)) else member
            if not attr.startswith("_") and inspect.isfunction(func):
                yield f"{name}.{attr}", func


def test_the_public_api_resolves_and_has_docstrings():
    for name in PUBLIC:
        obj = getattr(outlier_jebm, name)
        assert obj.__name__ == name and (inspect.getdoc(obj) or "").strip(), name
    assert "JEBMDetector" in dir(outlier_jebm)
    with pytest.raises(AttributeError):
        outlier_jebm.not_a_name  # noqa: B018


@pytest.mark.parametrize("name", PUBLIC)
def test_each_public_callable_documents_exactly_its_parameters(name):
    problems = []
    for where, func in _callables(name):
        doc = inspect.getdoc(func) or ""
        target = func.__init__ if inspect.isclass(func) else func
        params = [p for p in inspect.signature(target).parameters if p not in ("self", "cls")]
        if not doc.strip():
            problems.append(f"{where}: no docstring")
            continue
        if not params:
            continue
        documented = _documented_parameters(doc)
        if documented is None:
            problems.append(f"{where}: no numpy 'Parameters' section for {params}")
        elif sorted(documented) != sorted(params):
            problems.append(f"{where}: documents {documented}, takes {params}")
    assert problems == []
