"""A syrupy extension that compares findings with a numeric tolerance.

Findings (plain JSON data, or objects with ``.to_json()``) are stored one snapshot per
file in ``__snapshots__/<test file>/<test name>.json`` next to the spec, as JSON with
sorted keys and floats written by ``repr`` (which round-trips exactly).

A snapshot matches when the structure is the same (same keys, same list lengths, same
JSON types), strings, bools and ints are equal (ints are counts: compared exactly) and
floats are close: ``|a - b| <= max(rel_tol * max(|a|, |b|), abs_tol)``. syrupy writes a
snapshot only when it does not match, so ``--snapshot-update`` leaves snapshots within
tolerance byte-identical, and a rewrite keeps each stored float that is still within
tolerance, so the file's diff shows only the findings that changed.

Values with a standard error are judged against measured noise. A number ``x`` of a
finding whose dict also holds ``x_se`` (a number in both the received and the stored
finding) is out of tolerance when ``|a - b| > max(k · sqrt(se_a² + se_b²), floor)``, the
floor being the fixed tolerance above (so a value whose SE is 0, or an identical rerun, is
still judged by it). ``k`` keeps the false alarms of a whole run at :data:`RUN_ALPHA`
(two-sided, normal): a run of ``S`` snapshots gives each ``RUN_ALPHA / S`` and a snapshot
with ``m`` such values divides that by ``m`` (Bonferroni), ``k = Φ⁻¹(1 − α / (2·S·m))``.
The plugin sets ``S`` (:attr:`FindingsSnapshotExtension.snapshots_in_run`) at collection;
``x_se`` itself is recorded, not compared (its structure is). ``python -m neuronspec diff``
uses the same rule with ``m`` counted over both results files (:func:`noise_k`).
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, ClassVar

from syrupy.data import Snapshot, SnapshotCollection
from syrupy.extensions.json import JSONSnapshotExtension
from syrupy.types import PropertyFilter, PropertyMatcher, SerializableData, SerializedData

from neuronspec.findings import to_plain

_MAX_REPORTED = 50  # differences listed in a failure; the rest are counted
RUN_ALPHA = 0.01
"""Family-wise false-alarm rate of the noise-judged values of one run (snapshots or diff)."""
SE_SUFFIX = "_se"


def noise_k(alpha: float, n_values: int) -> float:
    """Standard errors a noise-judged value may move: two-sided normal quantile at level
    ``alpha`` Bonferroni-corrected over ``n_values`` values."""
    return NormalDist().inv_cdf(1 - alpha / (2 * max(n_values, 1)))


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def se_pair(received: dict, stored: dict, key: str) -> tuple[float, float] | None:
    """The standard errors ``(received, stored)`` of ``key`` when both dicts hold a number
    at ``key`` and at ``key + "_se"``; else None."""
    name = key + SE_SUFFIX
    if name not in received or name not in stored:
        return None
    values = (received[key], stored[key], received[name], stored[name])
    if not all(_number(v) for v in values):
        return None
    return float(received[name]), float(stored[name])


def is_se_of_sibling(data: dict, key: str) -> bool:
    """``key`` is the standard error of a sibling value (``x_se`` beside ``x``)."""
    return key.endswith(SE_SUFFIX) and key[: -len(SE_SUFFIX)] in data


def count_noise_judged(received: Any, stored: Any) -> int:
    """How many values of the pair are judged against their standard errors."""
    if isinstance(received, dict) and isinstance(stored, dict):
        return sum(
            1
            if se_pair(received, stored, key) is not None
            else count_noise_judged(received[key], stored[key])
            for key in received.keys() & stored.keys()
        )
    if isinstance(received, list) and isinstance(stored, list) and len(received) == len(stored):
        return sum(count_noise_judged(a, b) for a, b in zip(received, stored, strict=True))
    return 0


@dataclass(frozen=True)
class Difference:
    """One place where the received findings differ from the stored snapshot."""

    path: str  # dotted key path, e.g. "layers.2.dead_fraction"; "<root>" for the top
    received: str
    stored: str
    note: str = ""

    def __str__(self) -> str:
        note = f" ({self.note})" if self.note else ""
        return f"{self.path}: received {self.received} != snapshot {self.stored}{note}"


def _plain(data: Any) -> Any:
    """Findings as plain JSON data; raise TypeError naming the first unsupported value."""
    if hasattr(data, "to_json") and callable(data.to_json):
        data = data.to_json()
    data = to_plain(data)
    _check_json(data, "<root>")
    return data


def _check_json(data: Any, path: str) -> None:
    if data is None or isinstance(data, (bool, int, str)):
        return
    if isinstance(data, float):
        if not math.isfinite(data):  # to_plain writes nan/inf as strings
            raise TypeError(f"{path}: non-finite float {data!r} cannot be snapshotted")
        return
    if isinstance(data, list):
        for index, item in enumerate(data):
            _check_json(item, _join(path, str(index)))
        return
    if isinstance(data, dict):
        for key, value in data.items():
            _check_json(value, _join(path, key))
        return
    raise TypeError(
        f"{path}: cannot snapshot a {type(data).__name__}; findings must be plain JSON data "
        "(dict, list, str, int, float, bool, None) or have a .to_json() method"
    )


def _join(path: str, key: str) -> str:
    return key if path == "<root>" else f"{path}.{key}"


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


class FindingsSnapshotExtension(JSONSnapshotExtension):
    """JSON snapshots of findings, compared by structure and with a float tolerance.

    Set ``rel_tol``/``abs_tol`` on a subclass, or use :func:`findings_extension`.
    """

    rel_tol: float = 1e-4  # float noise across machines/BLAS builds is well below this
    abs_tol: float = 1e-6  # values near zero (dead fractions, tiny means) need a floor
    run_alpha: ClassVar[float] = RUN_ALPHA
    snapshots_in_run: ClassVar[int] = 1  # set by the plugin at collection (module docstring)

    def k_for(self, received: Any, stored: Any) -> float:
        """``k`` of this snapshot comparison (module docstring)."""
        alpha = self.run_alpha / max(self.snapshots_in_run, 1)
        return noise_k(alpha, count_noise_judged(received, stored))

    def floor(self, a: float, b: float) -> float:
        """The fixed tolerance of a pair of numbers."""
        return max(self.rel_tol * max(abs(a), abs(b)), self.abs_tol)

    def noise_verdict(
        self, a: float, b: float, ses: tuple[float, float], k: float
    ) -> tuple[bool, float | None]:
        """(within tolerance, change in standard errors of the difference or None)."""
        spread = math.hypot(*ses)
        delta = abs(float(a) - float(b))
        z = delta / spread if spread > 0 else None
        return delta <= max(k * spread, self.floor(a, b)), z

    def serialize(
        self,
        data: SerializableData,
        *,
        exclude: PropertyFilter | None = None,
        include: PropertyFilter | None = None,
        matcher: PropertyMatcher | None = None,
    ) -> SerializedData:
        # syrupy's JSON filter applies include/exclude/matchers to the plain findings
        plain = self._filter(
            data=_plain(data), depth=0, path=(), exclude=exclude, include=include, matcher=matcher
        )
        return self._dumps(plain)

    @staticmethod
    def _dumps(data: Any) -> str:
        return json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"

    def matches(
        self, *, serialized_data: SerializableData, snapshot_data: SerializableData
    ) -> bool:
        parsed = _parse_pair(serialized_data, snapshot_data)
        if parsed is None:  # not JSON (e.g. syrupy's snapshot diff mode): compare exactly
            return serialized_data == snapshot_data
        received, stored = parsed
        return next(self.differences(received, stored), None) is None

    def differences(
        self, received: Any, stored: Any, path: str = "<root>", *, k: float | None = None
    ) -> Iterator[Difference]:
        """Yield every difference between two parsed findings, depth first, keys sorted.
        ``k``: standard errors a noise-judged value may move (default :meth:`k_for`)."""
        k = self.k_for(received, stored) if k is None else k
        kinds = (_kind(received), _kind(stored))
        if kinds[0] != kinds[1]:
            yield Difference(path, f"{received!r}", f"{stored!r}", f"{kinds[0]} vs {kinds[1]}")
        elif isinstance(received, dict):
            for key in sorted(received.keys() | stored.keys()):
                where = _join(path, key)
                if key not in stored:
                    yield Difference(where, "present", "missing", "new key")
                elif key not in received:
                    yield Difference(where, "missing", "present", "key removed")
                elif is_se_of_sibling(received, key) and is_se_of_sibling(stored, key):
                    if _kind(received[key]) != _kind(stored[key]):  # recorded, not compared
                        yield from self.differences(received[key], stored[key], where, k=k)
                elif (ses := se_pair(received, stored, key)) is not None:
                    a, b = received[key], stored[key]
                    within, z = self.noise_verdict(a, b, ses, k)
                    if not within:
                        note = (
                            f"{z:.1f} SE of the difference, > k = {k:.2f}"
                            if z is not None
                            else f"SE 0: rel tol {self.rel_tol:g}, abs tol {self.abs_tol:g}"
                        )
                        yield Difference(where, repr(a), repr(b), note)
                else:
                    yield from self.differences(received[key], stored[key], where, k=k)
        elif isinstance(received, list):
            if len(received) != len(stored):
                note = "list length changed"
                yield Difference(path, f"{len(received)} items", f"{len(stored)} items", note)
            else:
                for index, (a, b) in enumerate(zip(received, stored, strict=True)):
                    yield from self.differences(a, b, _join(path, str(index)), k=k)
        elif isinstance(received, float):
            if not self._close(received, stored):
                note = f"rel tol {self.rel_tol:g}, abs tol {self.abs_tol:g}"
                yield Difference(path, repr(received), repr(stored), note)
        elif received != stored:
            yield Difference(path, repr(received), repr(stored))

    def _close(self, a: float, b: float) -> bool:
        return math.isclose(a, b, rel_tol=self.rel_tol, abs_tol=self.abs_tol)

    def diff_lines(
        self, serialized_data: SerializedData, snapshot_data: SerializedData
    ) -> Iterator[str]:
        parsed = _parse_pair(serialized_data, snapshot_data)
        if parsed is None:
            yield from super().diff_lines(serialized_data, snapshot_data)
            return
        diffs = list(self.differences(*parsed))
        for diff in diffs[:_MAX_REPORTED]:
            yield str(diff)
        if len(diffs) > _MAX_REPORTED:
            yield f"... and {len(diffs) - _MAX_REPORTED} more differences"

    @classmethod
    def write_snapshot_collection(
        cls, *, snapshot_collection: SnapshotCollection, name_order: dict[str, int] | None = None
    ) -> None:
        """Write the snapshot, keeping stored floats that are still within tolerance."""
        location = snapshot_collection.location
        snapshot = next(iter(snapshot_collection))
        try:
            with open(location, encoding=cls.get_write_encoding()) as f:
                parsed = _parse_pair(snapshot.data, f.read())
        except FileNotFoundError:
            parsed = None
        if parsed is not None:
            merged = cls._dumps(cls()._keep_close(*parsed))
            snapshot_collection = SnapshotCollection(location=location)
            snapshot_collection.add(Snapshot(name=snapshot.name, data=merged))
        super().write_snapshot_collection(
            snapshot_collection=snapshot_collection, name_order=name_order
        )

    def _keep_close(self, received: Any, stored: Any, k: float | None = None) -> Any:
        """``received``, with each float replaced by the stored one where they are close (a
        noise-judged value together with its standard error)."""
        k = self.k_for(received, stored) if k is None else k
        if _kind(received) != _kind(stored):
            return received
        if isinstance(received, dict):
            out = {}
            for key, value in received.items():
                if key not in stored:
                    out[key] = value
                elif (ses := se_pair(received, stored, key)) is not None:
                    if self.noise_verdict(value, stored[key], ses, k)[0]:
                        out[key], out[key + SE_SUFFIX] = stored[key], stored[key + SE_SUFFIX]
                    else:
                        out[key], out[key + SE_SUFFIX] = value, received[key + SE_SUFFIX]
                elif key not in out:
                    out[key] = self._keep_close(value, stored[key], k)
            return {key: out[key] for key in received}
        if isinstance(received, list) and len(received) == len(stored):
            return [self._keep_close(a, b, k) for a, b in zip(received, stored, strict=True)]
        if isinstance(received, float) and self._close(received, stored):
            return stored
        return received


def stable_ranking(
    ids: list[int],
    values: list[float],
    k: int,
    *,
    rel_tol: float = FindingsSnapshotExtension.rel_tol,
    abs_tol: float = FindingsSnapshotExtension.abs_tol,
) -> list[dict[str, Any]]:
    """The top ``k`` of a ranking in a form a snapshot can hold without pinning noise.

    ``ids`` and ``values`` are ranked (``values`` descending); give more than ``k`` where
    there are, so the ``k``-th entry's lower neighbour is known. Neighbours whose values are
    close within the snapshot's tolerance (``|a - b| <= max(rel_tol·max(|a|, |b|),
    abs_tol)``) are chained into one tie group: their order is rounding noise (tiny-mamba
    layer 0's top positional neurons lie within 2e-7 of each other). Returns one entry per
    group: ``{"neurons": sorted ids, "values": the values in rank order}`` (values are then
    compared with tolerance); ``"neurons"`` is None for a group that continues past rank
    ``k``, whose members within the top ``k`` are not determined.
    """
    if len(ids) != len(values):
        raise ValueError(f"stable_ranking: {len(ids)} ids but {len(values)} values")
    groups: list[list[int]] = []  # positions, consecutive
    for position in range(min(k, len(values))):
        if groups and math.isclose(
            values[position - 1], values[position], rel_tol=rel_tol, abs_tol=abs_tol
        ):
            groups[-1].append(position)
        else:
            groups.append([position])
    out = []
    for group in groups:
        last = group[-1]
        open_ended = (
            last + 1 < len(values)
            and last + 1 >= k
            and math.isclose(values[last], values[last + 1], rel_tol=rel_tol, abs_tol=abs_tol)
        )
        out.append(
            {
                "neurons": None if open_ended else sorted(int(ids[i]) for i in group),
                "values": [float(values[i]) for i in group],
            }
        )
    return out


def _parse_pair(received: Any, stored: Any) -> tuple[Any, Any] | None:
    """Both sides parsed as JSON, or None when either is not a JSON string."""
    if not isinstance(received, str) or not isinstance(stored, str):
        return None
    try:
        return json.loads(received), json.loads(stored)
    except json.JSONDecodeError:
        return None


def findings_extension(
    *,
    rel: float = FindingsSnapshotExtension.rel_tol,
    abs: float = FindingsSnapshotExtension.abs_tol,
) -> type[FindingsSnapshotExtension]:
    """A :class:`FindingsSnapshotExtension` subclass with its own tolerances.

    The same tolerances give the same class. Its name encodes them, so syrupy's xdist
    controller can import it back as ``neuronspec.snapshot.<name>`` (see ``__getattr__``).
    """
    for label, value in (("rel", rel), ("abs", abs)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"findings_extension: {label} must be a number, got {value!r}")
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"findings_extension: {label} must be finite and >= 0, got {value!r}")
    return _make_extension(float(rel), float(abs))


@functools.cache
def _make_extension(rel: float, abs: float) -> type[FindingsSnapshotExtension]:
    name = f"FindingsSnapshotExtension__rel_{_encode(rel)}__abs_{_encode(abs)}"
    attrs = {"rel_tol": rel, "abs_tol": abs, "__module__": __name__, "__qualname__": name}
    return type(name, (FindingsSnapshotExtension,), attrs)


# repr of a finite float uses digits and ".e-+"; a module member name may not contain "."
_CODES = str.maketrans({".": "_", "-": "m", "+": "p"})
_DECODES = str.maketrans({"_": ".", "m": "-", "p": "+"})
_FACTORY_NAME = re.compile(r"FindingsSnapshotExtension__rel_([0-9e_mp]+)__abs_([0-9e_mp]+)")


def _encode(value: float) -> str:
    return repr(value).translate(_CODES)


def __getattr__(name: str) -> type[FindingsSnapshotExtension]:
    """Rebuild a class made by :func:`findings_extension` from its name."""
    match = _FACTORY_NAME.fullmatch(name)
    if match is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        rel, abs = (float(group.translate(_DECODES)) for group in match.groups())
    except ValueError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    return findings_extension(rel=rel, abs=abs)
