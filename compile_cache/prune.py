"""Pruning a store: drop old entries, then garbage-collect the objects nobody lists any more.

Objects are content-addressed and shared between entries, so an object goes only when no remaining manifest lists
it. Order matters for readers: a manifest is deleted first, its objects after, so nobody is ever pointed at a
missing object by a manifest we left behind. Orphans (objects no manifest lists, e.g. left by a crashed upload) go
only past a grace period: an upload in flight puts its segment before it publishes the manifest that lists it.

Torch-free and store-agnostic; the CLI's ``prune`` command prints the plan and applies it with ``--yes``.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from .errors import IntegrityError, ObjectNotFound
from .lease import stale_leases
from .manifest import Manifest, object_name
from .stores.base import ObjectInfo, Store

__all__ = ["Entry", "PrunePlan", "PruneResult", "list_entries", "plan_prune", "apply_prune"]

log = logging.getLogger("compile_cache")

ENTRIES_PREFIX = "entries/"
OBJECTS_PREFIX = "objects/"
_MANIFEST_SUFFIX = "/manifest.json"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass
class Entry:
    """One manifest in the store. ``manifest`` is None when it does not parse (``error`` says why); ``objects`` is
    then what could still be read from it, or None when even that failed (such an entry blocks object GC)."""

    key: str
    token: str
    manifest: Manifest | None
    objects: set[str] | None
    error: str = ""


def _loose_objects(data: bytes) -> set[str] | None:
    """The objects an unparseable manifest (malformed, or a newer format) still names, read leniently."""
    try:
        body = json.loads(data)
        return {object_name(s["sha256"]) for s in body["segments"] if _SHA256.match(str(s.get("sha256", "")))}
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def list_entries(store: Store) -> Iterator[Entry]:
    """Every entry of the store, manifest read and parsed (an entry deleted while we list is skipped)."""
    for o in store.list(ENTRIES_PREFIX):
        if not o.name.endswith(_MANIFEST_SUFFIX):
            continue
        key = o.name[len(ENTRIES_PREFIX) : -len(_MANIFEST_SUFFIX)]
        if not key or "/" in key:
            continue
        try:
            data, token = store.read_versioned(o.name)
        except ObjectNotFound:
            continue
        try:
            m = Manifest.from_bytes(data)
        except IntegrityError as e:
            yield Entry(key, token, None, _loose_objects(data), str(e))
            continue
        yield Entry(key, token, m, {s.object for s in m.segments})


def _referenced(entries: list[Entry]) -> set[str] | None:
    """Objects listed by ``entries``; None if some entry cannot tell (then no object may be deleted)."""
    out: set[str] = set()
    for e in entries:
        if e.objects is None:
            return None
        out |= e.objects
    return out


@dataclass
class PrunePlan:
    entries: list[Entry]  # entries to delete
    objects: list[ObjectInfo]  # objects only the deleted entries list
    orphans: list[ObjectInfo]  # objects no manifest lists, older than the grace period
    kept_entries: int = 0
    kept_objects: int = 0
    gc_blocked: str = ""  # why no object may be deleted ("" when GC can run)
    leases: list[ObjectInfo] = field(default_factory=list)  # build leases unchanged for longer than the grace period

    @property
    def bytes(self) -> int:
        return sum(o.size for o in self.objects) + sum(o.size for o in self.orphans)


@dataclass
class PruneResult:
    entries_deleted: list[str] = field(default_factory=list)
    entries_skipped: list[str] = field(default_factory=list)  # changed since they were listed: kept
    objects_deleted: list[str] = field(default_factory=list)
    bytes_deleted: int = 0
    leases_deleted: list[str] = field(default_factory=list)


def plan_prune(
    store: Store,
    *,
    keep: int | None = None,
    older_than_s: float | None = None,
    grace_s: float = 3600.0,
    now: float | None = None,
) -> PrunePlan:
    """What a prune would delete. Nothing is changed.

    ``keep``: keep the entries of the ``keep`` newest model versions. Versions are labels (docs/versions.md): an
    entry serves every label its manifest lists (versions that compile the same share one), and is kept if any of
    them is kept; a version's age is when an entry first listed it (a shared entry's newer activity does not
    make its older labels new). ``older_than_s``: drop entries
    not updated for that long. With both, an entry goes only if both rules say so (outside the newest versions
    *and* old), so the newest versions survive however old they are. With neither, no entry goes and only orphans
    are collected. Objects go only when no remaining manifest lists them: a seeded entry lists the segments it
    shares with its seed, so deleting the seed's entry keeps them.
    """
    now = time.time() if now is None else now
    entries = list(list_entries(store))
    good = [e for e in entries if e.manifest is not None]
    rules: list[set[str]] = []
    if keep is not None:
        newest: dict[str, float] = {}
        for e in good:
            assert e.manifest is not None
            for v, first_used in e.manifest.labels().items():
                newest[v] = max(newest.get(v, 0.0), first_used)  # when that version was pushed, not the entry's
        kept_versions = set(sorted(newest, key=lambda v: newest[v], reverse=True)[:keep])
        rules.append({e.key for e in good if e.manifest and not set(e.manifest.labels()) & kept_versions})
    if older_than_s is not None:
        rules.append({e.key for e in good if e.manifest and e.manifest.updated_at < now - older_than_s})
    doomed = set.intersection(*rules) if rules else set()
    drop = [e for e in entries if e.key in doomed]
    remaining = [e for e in entries if e.key not in doomed]

    objects = {o.name: o for o in store.list(OBJECTS_PREFIX)}
    plan = PrunePlan(drop, [], [], kept_entries=len(remaining), leases=stale_leases(store, grace_s, now=now))
    referenced = _referenced(remaining)
    if referenced is None:
        bad = next(e for e in remaining if e.objects is None)
        plan.gc_blocked = f"entry {bad.key} is unreadable ({bad.error}): cannot tell which objects it uses"
        plan.kept_objects = len(objects)
        return plan
    dropped_objects = set().union(*(e.objects or set() for e in drop))
    for name, info in sorted(objects.items()):
        if name in referenced:
            continue
        if name in dropped_objects:
            plan.objects.append(info)
        elif info.modified < now - grace_s:
            plan.orphans.append(info)
    plan.kept_objects = len(objects) - len(plan.objects) - len(plan.orphans)
    return plan


def apply_prune(store: Store, plan: PrunePlan) -> PruneResult:
    """Delete what ``plan`` lists: manifests first, then objects that are still unreferenced *now*.

    The store has no conditional delete, so this narrows the races rather than closing them: a manifest that
    changed since it was planned is kept, and the references are read again after the manifests are gone.
    """
    from .manifest import manifest_name

    r = PruneResult()
    for o in plan.leases:  # a live lease is rewritten every few seconds, so none is this old
        store.delete(o.name)
        r.leases_deleted.append(o.name)
    for e in plan.entries:
        try:
            _, token = store.read_versioned(manifest_name(e.key))
        except ObjectNotFound:
            continue
        if token != e.token:
            log.warning("entry %s changed since it was listed: kept", e.key)
            r.entries_skipped.append(e.key)
            continue
        store.delete(manifest_name(e.key))
        r.entries_deleted.append(e.key)
    if plan.gc_blocked:
        return r
    referenced = _referenced(list(list_entries(store)))
    if referenced is None:
        log.warning("an entry became unreadable while pruning: no object deleted")
        return r
    for o in [*plan.objects, *plan.orphans]:
        if o.name in referenced:
            continue
        store.delete(o.name)
        r.objects_deleted.append(o.name)
        r.bytes_deleted += o.size
    return r
