"""Leaf-by-leaf comparison of two findings with the snapshots' tolerance.

:class:`~neuronspec.snapshot.FindingsSnapshotExtension` decides whether two findings match;
this module also says *what moved*: every leaf whose value differs at all, with its
absolute and relative change, and whether the extension's tolerance still accepts it (the
verdict of one leaf comes from ``extension.differences`` itself, so a leaf is "within
tolerance" exactly when the snapshot comparison would accept it). A value with a standard
error (``x`` beside ``x_se``) is judged against noise and reports its change in standard
errors of the difference. The run diff (``python -m neuronspec diff``) and the snapshot
drift of a run (plugin, HTML report) use it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from neuronspec.findings import Finding
from neuronspec.snapshot import FindingsSnapshotExtension, is_se_of_sibling, se_pair


@dataclass(frozen=True)
class Change(Finding):
    """One leaf that differs between a stored (old) and a received (new) finding."""

    path: str  # dotted key path inside the finding, "" for the finding itself
    old: Any  # the stored value; a short description for structural changes
    new: Any
    within_tolerance: bool
    abs_change: float | None = None  # |new - old| for numbers
    rel_change: float | None = None  # |new - old| / max(|old|, |new|); None when both are 0
    note: str = ""  # structural changes: "new key", "key removed", "list length changed", ...
    se_change: float | None = None  # |new - old| / sqrt(se_old² + se_new²), noise-judged values


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _numeric_change(old: float, new: float) -> tuple[float, float | None]:
    delta = abs(float(new) - float(old))
    scale = max(abs(float(old)), abs(float(new)))
    return delta, (delta / scale if scale > 0 else None)


def _describe(value: Any) -> Any:
    if isinstance(value, dict):
        return f"{{{len(value)} keys}}"
    if isinstance(value, list):
        return f"[{len(value)} items]"
    return value


def changes(
    old: Any,
    new: Any,
    *,
    extension: FindingsSnapshotExtension | None = None,
    path: str = "",
    k: float | None = None,
) -> Iterator[Change]:
    """Every leaf of ``new`` that differs from ``old``, depth first, keys sorted.

    Leaves equal in value are not reported. ``within_tolerance`` is the snapshot
    extension's verdict on that leaf (floats within ``rel_tol``/``abs_tol``; a value with a
    standard error within ``k`` of them, default the extension's ``k_for`` the pair); ints,
    strings, bools and structure (keys, list lengths, JSON types) must be equal to be
    within it. A standard error itself is reported, never out of tolerance.
    """
    extension = extension if extension is not None else FindingsSnapshotExtension()
    k = extension.k_for(new, old) if k is None else k
    if type(old) is not type(new) and not (_is_number(old) and _is_number(new)):
        yield Change(path, _describe(old), _describe(new), False, note="type changed")
    elif isinstance(new, dict):
        for key in sorted(old.keys() | new.keys()):
            if key not in old:
                yield Change(_join(path, key), None, _describe(new[key]), False, note="new key")
            elif key not in new:
                yield Change(_join(path, key), _describe(old[key]), None, False, note="key removed")
            elif old[key] == new[key] and type(old[key]) is type(new[key]):
                continue
            elif (ses := se_pair(new, old, key)) is not None:
                within, z = extension.noise_verdict(new[key], old[key], ses, k)
                delta, relative = _numeric_change(old[key], new[key])
                yield Change(
                    _join(path, key), old[key], new[key], within, delta, relative, se_change=z
                )
            elif (
                is_se_of_sibling(new, key)
                and is_se_of_sibling(old, key)
                and _is_number(old[key])
                and _is_number(new[key])
            ):
                delta, relative = _numeric_change(old[key], new[key])
                note = "standard error: recorded, not compared"
                yield Change(_join(path, key), old[key], new[key], True, delta, relative, note)
            else:
                yield from changes(
                    old[key], new[key], extension=extension, path=_join(path, key), k=k
                )
    elif isinstance(new, list):
        if len(old) != len(new):
            yield Change(path, _describe(old), _describe(new), False, note="list length changed")
        else:
            for index, (a, b) in enumerate(zip(old, new, strict=True)):
                yield from changes(a, b, extension=extension, path=_join(path, str(index)), k=k)
    elif old != new or type(old) is not type(new):
        within = next(extension.differences(new, old, k=k), None) is None
        if _is_number(old) and _is_number(new):
            delta, relative = _numeric_change(old, new)
            note = "" if type(old) is type(new) else "type changed"
            yield Change(path, old, new, within, delta, relative, note)
        else:
            yield Change(path, old, new, within)
