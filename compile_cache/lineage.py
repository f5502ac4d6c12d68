"""Versions (docs/versions.md): on a miss, explain it by the entries of the same lineage and seed from the newest of
the same environment; and tell which seeded files this process read since.

Store-agnostic and torch-free.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .entry import Entry
from .errors import CacheError
from .key import diff_factors, split_key
from .manifest import Manifest
from .restore import RestoreOptions, RestoreResult, read_manifest, restore
from .stores.base import Store

__all__ = ["lineage_entries", "restore_or_seed", "mark_unread", "was_read"]

# Entries of one lineage looked at on a miss: one S3 list page. A lineage holds one entry per (what compiles,
# environment), not one per version (weights-only versions share an entry), so this bounds a rare case.
MAX_LISTED = 1000
_ENTRIES = "entries/"
_MANIFEST_SUFFIX = "/manifest.json"


@dataclass
class _Listed:
    key: str
    part: str
    fingerprint: str
    modified: float


def lineage_entries(store: Store, lineage: str, limit: int = MAX_LISTED) -> list[_Listed]:
    """The entries of ``lineage`` (by key name: ``<lineage>.<model part>.<summary>.<fingerprint>``), newest manifest
    write first; one bounded listing, no manifest read."""
    out: list[_Listed] = []
    for o in store.list(f"{_ENTRIES}{lineage}."):
        if not o.name.endswith(_MANIFEST_SUFFIX):
            continue
        key = o.name[len(_ENTRIES) : -len(_MANIFEST_SUFFIX)]
        lin, part, fp = split_key(key)
        if "/" in key or lin != lineage:
            continue
        out.append(_Listed(key, part, fp, o.modified))
        if len(out) >= limit:
            break
    return sorted(out, key=lambda e: -e.modified)


def _short(value: str, n: int = 24) -> str:
    return value if len(value) <= n else value[: n - 1] + "…"


def _changes(a: Mapping[str, str], b: Mapping[str, str]) -> list[str]:
    """``factor old → new`` for each factor that differs between an entry (a) and this process (b)."""
    out = []
    for line in diff_factors(a, b):
        k = line.split(":", 1)[0]
        out.append(f"{k} {_short(str(a.get(k, '<absent>')))} → {_short(str(b.get(k, '<absent>')))}")
    return out


def _explain(store: Store, key: str, factors: Mapping[str, str], model_factors: Mapping[str, str]) -> str:
    """``<key>: <factor> <theirs> → <ours>, ...`` for one nearby entry (one manifest read)."""
    try:
        m, _ = read_manifest(store, key)
    except (CacheError, OSError) as e:
        return f"{key}: unreadable ({e})"
    if m is None:
        return f"{key}: deleted meanwhile"
    diffs = _changes(m.factors, factors) + (_changes(m.model_factors, model_factors) if m.model_factors else [])
    label = f" (version {m.model_version})" if m.model_version else ""
    return f"{key}{label}: " + (", ".join(diffs[:4]) + (f" and {len(diffs) - 4} more" if len(diffs) > 4 else "")
                                if diffs else "no factor differs")


def restore_or_seed(entry: Entry, options: RestoreOptions | None = None, *, seed: bool = True) -> RestoreResult:
    """:func:`restore` ``entry``; on a miss, name the nearest entries of its lineage and what differs
    (``cache_reason``), and with ``seed`` restore the newest entry of the same lineage *and* the same environment
    fingerprint instead (status ``"seeded"``, ``seeded_from``). Inductor's content-addressed keys then decide what
    of it hits; the export strategy reuses only what it can show is valid (see lifecycle).

    A hit costs what :func:`restore` costs: the lineage is listed only on a miss (one bounded listing, at most two
    manifest reads to explain it), on a helper thread, within what is left of ``options.timeout_s``. The seed must
    pass every check an entry of this key would (fingerprint, signature, caps): :func:`restore` runs on it."""
    options = options or RestoreOptions()
    store, key, lineage = entry.store, entry.key, entry.lineage
    t0 = time.monotonic()
    r = restore(entry, options)
    if r.status != "miss" or not lineage:
        return r
    _, part, fp = split_key(key)
    survey: dict[str, Any] = {}

    def work() -> None:
        try:
            listed = [e for e in lineage_entries(store, lineage) if e.key != key]
            seeds = [e for e in listed if e.fingerprint == fp]
            # Nearest: the newest entry of the same environment (what compiles differs), and the newest of the same
            # model part (the environment differs) or, lacking one, the newest other entry of the lineage.
            others = [e for e in listed if e.fingerprint != fp]
            nearest = seeds[:1] + ([e for e in others if e.part == part] or others)[:1]
            survey["seeds"] = seeds
            survey["notes"] = [_explain(store, e.key, entry.factors, entry.model_factors) for e in nearest]
        except Exception as e:  # a cache problem must never fail a boot
            survey["error"] = e

    th = threading.Thread(target=work, name="compile-cache-lineage", daemon=True)
    th.start()
    th.join(max(0.0, options.timeout_s - (time.monotonic() - t0)))
    if th.is_alive() or "error" in survey:
        why = (f"exceeded COMPILE_CACHE_RESTORE_TIMEOUT_S={options.timeout_s:g}s" if th.is_alive()
               else f"{type(survey['error']).__name__}: {survey['error']}")
        r.reason = f"no entry; could not list lineage {lineage}: {why}"
        r.seconds = time.monotonic() - t0
        return r
    seeds, notes = survey["seeds"], survey["notes"]
    r.reason = "no entry; " + ("nearest " + "; ".join(notes) if notes else f"no other entry of lineage {lineage}")
    if not seed or not seeds:
        return r
    left = replace(options, timeout_s=max(1.0, options.timeout_s - (time.monotonic() - t0)))
    s = restore(entry.sibling(seeds[0].key), left)
    if s.status != "hit":
        r.reason += f"; seeding from {seeds[0].key} failed ({s.status}: {s.reason})"
        r.seconds = time.monotonic() - t0
        return r
    assert s.manifest is not None
    s.status, s.seeded_from, s.reason, s.token = "seeded", seeds[0].key, r.reason, None
    s.usage_tracked = mark_unread(s.manifest, entry.roots)
    s.seconds = time.monotonic() - t0
    return s


def _local(roots: Mapping[str, Path], path: str) -> Path | None:
    label, _, rel = path.partition("/")
    root = roots.get(label)
    return root / rel if root is not None and rel else None


def mark_unread(manifest: Manifest, roots: Mapping[str, Path]) -> bool:
    """Set the access time of every restored file of ``manifest`` to 0 (its modification time stays), so the next
    read shows: Linux updates an access time older than the change time on the next read even under ``relatime``
    (the default mount option). Returns False where reads cannot be seen (``noatime``), found with a probe file."""
    probe_root = next((r for r in roots.values() if r.is_dir()), None)
    if probe_root is None:
        return False
    probe = probe_root / ".compile_cache-atime-probe"
    try:
        probe.write_bytes(b"probe")
        os.utime(probe, ns=(0, probe.stat().st_mtime_ns))
        probe.read_bytes()
        tracked = probe.stat().st_atime_ns > 0
    except OSError:
        tracked = False
    finally:
        probe.unlink(missing_ok=True)
    if not tracked:
        return False
    for path in manifest.files():
        p = _local(roots, path)
        try:
            if p is not None:
                os.utime(p, ns=(0, p.stat().st_mtime_ns))
        except OSError:
            pass
    return True


def was_read(roots: Mapping[str, Path], path: str) -> bool:
    """Whether the restored file ``path`` (as the manifest names it) was read since :func:`mark_unread`."""
    p = _local(roots, path)
    try:
        return p is not None and p.stat().st_atime_ns > 0
    except OSError:
        return False
