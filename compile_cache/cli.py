"""The cache CLI: ``python -m compile_cache COMMAND ...`` (``--help`` on each command shows an example).

Importing this module imports neither torch nor boto3: S3 comes through ``open_store`` when an ``s3://`` store is
used, torch only inside ``warm`` (and ``inspect --diff-env``). Defaults come from the settings model, so
``--store`` defaults to ``COMPILE_CACHE_URL`` exactly as a booting predictor would see it.

Exit status: 0 ok, 1 failure (store trouble, verify problems, warm upload failed), 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from .config import Settings, env_table
from .errors import CacheError, ConfigError, StoreError
from .key import CacheKey, diff_factors
from .manifest import Manifest, manifest_name
from .predictors import DEFAULT_PREDICTOR, load_predictor
from .stores import open_store
from .stores.base import Store

__all__ = ["main", "build_parser", "parse_duration"]

_URL = Settings.model_fields["url"]
_URL_ENV = _URL.alias or "COMPILE_CACHE_URL"
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
DEFAULT_GRACE = "1h"


class _Failure(Exception):
    """A command failed in a way the user should hear about in one line (exit 1)."""


# -- small helpers ---------------------------------------------------------------------------------------------------
def parse_duration(text: str) -> float:
    """``30s``, ``15m``, ``1.5h``, ``7d``, ``2w`` → seconds."""
    m = _DURATION.match(text)
    if not m:
        raise argparse.ArgumentTypeError(
            f"invalid duration {text!r}: use a number and one unit of s, m, h, d, w (e.g. 90m, 7d)"
        )
    return float(m.group(1)) * _UNITS[m.group(2)]


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"invalid count {text!r}: a whole number >= 1")
    return n


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    raise AssertionError


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ") if ts else "-"


def _age(seconds: float) -> str:
    for unit in ("w", "d", "h", "m"):
        if seconds >= _UNITS[unit]:
            return f"{seconds / _UNITS[unit]:.0f}{unit}"
    return f"{seconds:.0f}s"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def _say(text: str = "") -> None:
    """The CLI's own output (tables, reports) goes to stdout."""
    sys.stdout.write(text + "\n")


# -- settings and store, resolved only by the commands that need them ----------------------------------------------
class _Context:
    def __init__(self, store_url: str | None) -> None:
        self.store_flag = store_url
        self._settings: Settings | None = None
        self._store: Store | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            env = dict(os.environ)
            if self.store_flag is not None:
                env[_URL_ENV] = self.store_flag  # validated like the variable it overrides
            self._settings = Settings.from_env(env)
        return self._settings

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = open_store(self.settings.url, self.settings)
        return self._store

    def close(self) -> None:
        if self._store is not None:
            self._store.close()


def _resolve_key(store: Store, key: str) -> str:
    """``key`` itself if it names an entry, else the one entry key starting with it (so a version is enough)."""
    try:
        if store.exists(manifest_name(key)):
            return key
    except StoreError as e:
        if "invalid object name" in str(e):
            raise ConfigError(f"{key!r} is not a valid cache key") from e
        raise
    from .prune import list_entries

    matches = sorted(e.key for e in list_entries(store) if e.key.startswith(key))
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise _Failure(f"no entry {key!r} in {store.url} (see `python -m compile_cache ls`)")
    raise ConfigError(f"{key!r} matches {len(matches)} entries; give more of the key: " + ", ".join(matches))


# -- ls --------------------------------------------------------------------------------------------------------------
def cmd_ls(args: argparse.Namespace, ctx: _Context) -> int:
    from .prune import list_entries

    entries = sorted(
        list_entries(ctx.store),
        key=lambda e: (e.manifest.model_version, -e.manifest.updated_at) if e.manifest else ("~", 0.0),
    )
    rows: list[dict[str, Any]] = []
    for e in entries:
        m = e.manifest
        if m is None:
            rows.append({"key": e.key, "error": e.error})
            continue
        labels = sorted(m.labels().items(), key=lambda kv: kv[1])
        rows.append(
            {
                "key": e.key,
                "model_version": m.model_version,
                "versions": [v for v, _ in labels],  # every label that used the entry, oldest first
                "latest_version": labels[-1][0],
                "lineage": m.lineage,
                "seeded_from": m.seeded_from,
                "summary": CacheKey(m.model_version, m.factors).summary,
                "fingerprint": m.fingerprint,
                "bytes": m.total_bytes,
                "unpacked_bytes": sum(s.unpacked_bytes for s in m.segments),
                "objects": len(m.segments),
                "files": len(m.files()),
                "signed": m.signature is not None,
                "created_at": m.created_at,
                "updated_at": m.updated_at,
            }
        )
    if args.json:
        _say(json.dumps(rows, indent=1))
        return 0
    if not rows:
        _say(f"no entries in {ctx.store.url}")
        return 0
    table = [["VERSION", "ENVIRONMENT", "FINGERPRINT", "SIZE", "OBJECTS", "FILES", "UPDATED", "KEY"]]
    for r in rows:
        if "error" in r:
            table.append(["?", f"unreadable: {r['error']}", "", "", "", "", "", r["key"]])
            continue
        table.append(
            [
                r["latest_version"] + (f" (+{len(r['versions']) - 1})" if len(r["versions"]) > 1 else ""),
                r["summary"],
                r["fingerprint"],
                _size(r["bytes"]),
                str(r["objects"]),
                str(r["files"]),
                _when(r["updated_at"]),
                r["key"],
            ]
        )
    _say(_table(table))
    _say(f"{len(rows)} entries in {ctx.store.url}")
    return 0


# -- inspect ---------------------------------------------------------------------------------------------------------
def cmd_inspect(args: argparse.Namespace, ctx: _Context) -> int:
    from .lease import describe as describe_lease
    from .lease import summary as lease_summary
    from .trust import TrustPolicy

    m = Manifest.from_bytes(ctx.store.read(manifest_name(_resolve_key(ctx.store, args.key))))
    verdict = TrustPolicy.from_settings(ctx.settings).judge(m)  # as a boot with this environment would judge it
    diff: list[str] | None = None
    if args.diff_env:
        diff = _diff_env(m)
    failures = _failures(ctx.store, m)
    lease = describe_lease(ctx.store, m.key, TrustPolicy.from_settings(ctx.settings))
    if args.json:
        body = m.model_dump(mode="json")
        body["signed"] = m.signature is not None
        body["trust"] = {"loads": verdict.loads, "signer": verdict.signer, "reason": verdict.reason}
        body.pop("signature", None)  # a MAC is not a secret, but nobody needs it printed
        body["failures"] = failures
        body["export_failures"] = failures  # the key's earlier name, kept for scripts that read it
        body["lease"] = lease
        if diff is not None:
            body["diff_env"] = diff
        _say(json.dumps(body, indent=1, sort_keys=True))
        return 0
    files = m.files()
    _say(f"key            {m.key}")
    _say(f"model version  {m.model_version}")
    if m.versions:
        _say(f"versions       {', '.join(sorted(m.labels(), key=lambda v: m.labels()[v]))}")
    _say(f"lineage        {m.lineage or '-'}")
    if m.seeded_from:
        _say(f"seeded from    {m.seeded_from}")
    for k in sorted(m.model_factors):
        _say(f"  {k}  {m.model_factors[k]}")
    _say(f"environment    {CacheKey(m.model_version, m.factors).summary}")
    _say(f"fingerprint    {m.fingerprint} (from {len(m.factors)} factors)")
    _say(f"signed         {'yes (HMAC-SHA256)' if m.signature else 'no'}")
    loads = "yes" if verdict.loads else "NO, a restore refuses it"
    _say(f"loads here     {loads}{f': {verdict.reason}' if verdict.reason else ' (signed with COMPILE_CACHE_SIGNING_KEY)'}")
    _say(f"build lease    {lease_summary(lease)}")
    covered = ", ".join(f"{n} ({how})" for n, how in sorted(m.parts.items()))
    _say(f"parts covered  {covered or '(not listed: an entry written before manifests listed parts)'}")
    _say(f"created        {_when(m.created_at)}")
    _say(f"updated        {_when(m.updated_at)}")
    _say(
        f"size           {_size(m.total_bytes)} in {len(m.segments)} objects; "
        f"{len(files)} files, {_size(sum(f.size for f in files.values()))} unpacked"
    )
    _say("factors")
    width = max((len(k) for k in m.factors), default=0)
    for k in sorted(m.factors):
        _say(f"  {k.ljust(width)}  {m.factors[k]}")
    for f in failures:
        what = f"{f['stage']} failed: {f['error']}: {f['reason']}" if "reason" in f else f"unreadable: {f['unreadable']}"
        skipped = ("precompiling new shapes: they go through the jit function" if f["failed"] == "precompile"
                   else "the export")
        _say(f"{f['failed']} FAILED  {what}")
        _say(f"               recorded {_when(f.get('at', 0))} under torch {f.get('torch', '?')} in {f['path']};"
             f" boots of this key skip {skipped} (a new key tries again)")
    _say("segments (objects)")
    for s in m.segments:
        who = f"written by {s.written_by or '?'} at {_when(s.written_at)}"
        _say(f"  {s.object}  {_size(s.size)}  {len(s.files)} files  {who}")
        if args.files:
            for f in s.files:
                _say(f"      {f.path}  {_size(f.size)}")
    if diff is not None:
        _say("this machine vs the entry (environment factors only: config, export spec and parts are the runner's)")
        for line in diff or ["same environment: this machine computes the same environment factors"]:
            _say(f"  {line}")
    return 0


def _failures(store: Store, m: Manifest) -> list[dict[str, Any]]:
    """The export and precompile failures recorded in the entry (see failures.py), each read from its segment and
    named by what failed ("failed": "export" or "precompile"): the record is a few hundred bytes, and the segment is
    read only up to it."""
    from .failures import Failure, describe, failed_step
    from .snapshot import read_member

    out: list[dict[str, Any]] = []
    for seg in m.segments:
        for f in seg.files:
            step = failed_step(f.path)
            if step is None or any(o["path"] == f.path for o in out):
                continue
            try:
                with store.open_read(seg.object) as stream:
                    rec = Failure.from_bytes(read_member(stream, f.path, seg.files))
                out.append({"path": f.path, "failed": step, **describe(rec)})
            except (CacheError, ValueError) as e:  # StoreError, IntegrityError, a malformed record
                out.append({"path": f.path, "failed": step, "unreadable": str(e)})
    return out


def _diff_env(m: Manifest) -> list[str]:
    """How this machine's environment factors differ from the entry's (imports torch). Only the environment is
    compared: the config, the export spec and the parts are the runner's, and this machine has no runner."""
    from .factors import environment_factors, is_environment

    def env_only(f: dict[str, str]) -> dict[str, str]:
        return {k: v for k, v in f.items() if is_environment(k)}

    return diff_factors(env_only(m.factors), env_only(environment_factors()))


# -- prune -----------------------------------------------------------------------------------------------------------
def cmd_prune(args: argparse.Namespace, ctx: _Context) -> int:
    from .prune import apply_prune, plan_prune

    now = time.time()
    plan = plan_prune(ctx.store, keep=args.keep, older_than_s=args.older_than, grace_s=args.grace, now=now)
    verb = "delete" if args.yes else "would delete"
    for e in plan.entries:
        m = e.manifest
        what = f"version {m.model_version}, updated {_when(m.updated_at)}" if m else f"unreadable: {e.error}"
        _say(f"{verb} entry   {e.key}  ({what})")
    for o in plan.objects:
        _say(f"{verb} object  {o.name}  ({_size(o.size)}, listed only by deleted entries)")
    for o in plan.orphans:
        _say(f"{verb} orphan  {o.name}  ({_size(o.size)}, {_age(now - o.modified)} old, listed by no entry)")
    for o in plan.leases:
        _say(f"{verb} lease   {o.name}  (unchanged for {_age(now - o.modified)}: no build holds it)")
    if plan.gc_blocked:
        _say(f"objects kept: {plan.gc_blocked}")
    total = f"{len(plan.entries)} entries, {len(plan.objects) + len(plan.orphans)} objects, {_size(plan.bytes)}"
    kept = f"keeping {plan.kept_entries} entries and {plan.kept_objects} objects"
    if not args.yes:
        _say(f"dry run: {total} would go, {kept}. Nothing deleted; run again with --yes to delete.")
        return 0
    r = apply_prune(ctx.store, plan)
    for k in r.entries_skipped:
        _say(f"kept entry     {k}  (changed while pruning)")
    _say(
        f"deleted {len(r.entries_deleted)} entries and {len(r.objects_deleted)} objects "
        f"({_size(r.bytes_deleted)}); {kept}"
    )
    return 0


# -- verify ----------------------------------------------------------------------------------------------------------
def cmd_verify(args: argparse.Namespace, ctx: _Context) -> int:
    import dataclasses

    from .progress import bars_enabled, progress_bar
    from .restore import RestoreOptions
    from .trust import TrustPolicy

    try:
        from .verify import verify_entry
    except ModuleNotFoundError as e:
        if e.name != f"{__package__}.verify":
            raise
        raise _Failure("verify is not available: compile_cache.verify is missing from this installation") from e
    s = ctx.settings
    trust = TrustPolicy.from_settings(s)  # the runtime's rules: signing key, earlier keys, signed-only
    if args.require_signed is not None:
        trust = dataclasses.replace(
            trust, require_signed=args.require_signed, allow_unsigned=trust.allow_unsigned and not args.require_signed
        )
    with progress_bar(None, "verify", enabled=bars_enabled(s.progress)) as bar:
        report = verify_entry(
            ctx.store,
            _resolve_key(ctx.store, args.key),
            trust,
            options=RestoreOptions.from_settings(s),
            progress=bar,
        )
    if args.json:
        _say(json.dumps({**dataclasses.asdict(report), "ok": report.ok}, indent=1))
    else:
        _say(str(report))
    return 0 if report.ok else 1


# -- warm ------------------------------------------------------------------------------------------------------------
def cmd_warm(args: argparse.Namespace, ctx: _Context) -> int:
    import signal
    import tempfile

    s = ctx.settings
    if s.disable:
        raise ConfigError("warm needs a store, but COMPILE_CACHE_DISABLE is on")
    # The predictor reads its settings from the environment, exactly as in a container.
    os.environ[_URL_ENV] = s.url
    os.environ["COMPILE_CACHE_ON_MISS"] = "wait"  # warm is the build: in this process, whatever the container's policy
    tmp = None
    if not os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        tmp = tempfile.mkdtemp(prefix="compile-cache-warm-")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tmp  # a fresh, empty cache dir: what a new container has
    try:
        p = load_predictor(args.predictor)
        from .lifecycle import CompiledRunner  # torch (the predictor's module has imported it already)

        if not isinstance(p, CompiledRunner):
            raise ConfigError(f"--predictor {args.predictor!r} is not a CompiledRunner: nothing to pre-seed")
        handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
        weights = os.environ.get("COG_WEIGHTS")  # what Cog would pass to setup()
        if weights:
            p.setup(weights)
        else:
            p.setup()
        for sig, h in handlers.items():  # the CLI flushes itself below; Ctrl-C should just stop it
            signal.signal(sig, h)
        m = p.metrics
        if getattr(p, "uploader", None) is None:
            raise _Failure(f"warm could not use the store {s.url}: {m.cache_reason or m.cache}")
        p.finish_uploads()  # the background upload, then the flush, now
        _say(f"key       {m.key}")
        _say(f"version   {m.version} (lineage {m.lineage})")
        _say(f"store     {m.store}")
        _say(f"restore   {m.cache}" + (f" ({m.cache_reason})" if m.cache_reason else "")
             + (f", seeded from {m.seeded_from}" if m.seeded_from else ""))
        _say(f"compile   {m.compile_s:.1f}s, {m.compiles} graphs, fx graph hits {m.fxgraph_hits}")
        up = f"{m.bytes_uploaded} bytes ({_size(m.bytes_uploaded)}), {m.files_uploaded} files"
        _say(f"uploaded  {up}: {m.upload_state}")
        if m.eager_fallback:
            raise _Failure(f"warm compiled nothing (serving eager: {m.eager_fallback})")
        if m.upload_state not in ("done", "none"):
            raise _Failure(f"upload {m.upload_state}: {m.upload_error or 'not everything was published'}")
        return 0
    finally:
        if tmp is not None:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)


# -- bench, profile, env --------------------------------------------------------------------------------------------
_FORWARDED = {"bench": "bench", "profile": "profile"}  # commands whose arguments belong to another module's main()


def cmd_forward(args: argparse.Namespace, ctx: _Context) -> int:
    name = _FORWARDED[args.command]
    try:
        mod = importlib.import_module(f"{__package__}.tools.{name}")
    except ModuleNotFoundError as e:
        if e.name not in (f"{__package__}.tools", f"{__package__}.tools.{name}"):
            raise
        raise _Failure(f"{name} is not available: compile_cache.tools.{name} is missing from this installation") from e
    # No --store here: the benchmark always measures against a fresh store of its own, the profiler uses none.
    return int(mod.main(list(args.rest)) or 0)


def cmd_env(args: argparse.Namespace, ctx: _Context) -> int:
    def cell(text: str) -> str:  # a pipe ends a cell; "<dir>" would be read as an HTML tag
        return text.replace("|", "\\|").replace("<", "&lt;")

    _say("| Variable | Default | Meaning |")
    _say("|---|---|---|")
    for name, default, meaning in env_table():
        _say(f"| `{name}` | {f'`{cell(default)}`' if default else ''} | {cell(meaning)} |")
    return 0


# -- the parser ------------------------------------------------------------------------------------------------------
_COMMANDS: list[tuple[str, str, str, Callable[[argparse.Namespace, _Context], int]]] = [
    (
        "ls",
        "list the entries in the store",
        "One line per cache entry: model version (the newest label that used it, +N others: versions that\n"
        "compile the same share an entry), environment (torch, python, device, ISA, strategy), fingerprint,\n"
        "size in the store, objects (segments), files and the last update.\n\n"
        "example:\n  python -m compile_cache ls\n  python -m compile_cache --store s3://my-bucket/cache ls --json",
        cmd_ls,
    ),
    (
        "inspect",
        "show one entry: factors, signature, objects, who wrote what when",
        "Show the manifest of one entry: key, model version, every fingerprint factor (sorted), whether it is\n"
        "signed, and each segment (object) with its size, file count, writer and time. KEY may be any unique\n"
        "prefix of a key.\n\n"
        "example:\n  python -m compile_cache inspect v3a1f.torch2.13.0-py311-cpu-avx512-jit.0c1d2e3f4a5b\n"
        "  python -m compile_cache inspect v3a1f --diff-env   # why would it not load here?",
        cmd_inspect,
    ),
    (
        "prune",
        "delete old entries and unreferenced objects (dry run unless --yes)",
        "Keep the N newest model versions and/or drop entries not updated for a duration. With both, an entry\n"
        "goes only if it is outside the newest versions AND old. Manifests are deleted first, then the objects no\n"
        "remaining entry lists (objects are shared between entries); objects listed by no entry at all (crashed\n"
        "uploads) go once older than --grace. Prints what would go and deletes nothing unless --yes.\n\n"
        "example:\n  python -m compile_cache prune --keep 3 --older-than 14d          # dry run\n"
        "  python -m compile_cache prune --keep 3 --older-than 14d --yes",
        cmd_prune,
    ),
    (
        "warm",
        "pre-seed the store: run the predictor's setup headless (CI, after cog push)",
        "Run the predictor's setup() in this process, in a fresh empty TORCHINDUCTOR_CACHE_DIR (a temp dir unless the\n"
        "variable is set), wait for the upload to finish and print the key and bytes uploaded. Run it right after\n"
        "`cog push` with the production store and environment, so the first production boot is warm.\n"
        "Exit status 1 if the upload failed or the model could not be compiled.\n\n"
        "example:\n  python -m compile_cache --store s3://my-bucket/cache warm --predictor predict.py:Runner\n"
        "  COMPILE_CACHE_URL=s3://my-bucket/cache python -m compile_cache warm",
        cmd_warm,
    ),
    (
        "verify",
        "check an entry: signature, fingerprint, object hashes, unpack safety",
        "Download and check every object of one entry without unpacking it anywhere. The signature is judged as a\n"
        "boot with this environment would: keys from COMPILE_CACHE_SIGNING_KEY and COMPILE_CACHE_VERIFY_KEYS only\n"
        "(never a command-line argument); with a key, an unsigned entry fails unless COMPILE_CACHE_ALLOW_UNSIGNED is\n"
        "on. Exit status 1 if anything is wrong (a restore would refuse the entry).\n\n"
        "example:\n  COMPILE_CACHE_SIGNING_KEY=... python -m compile_cache verify v3a1f --require-signed",
        cmd_verify,
    ),
    (
        "bench",
        "benchmarks: eager / cold / warm boots and latency (args go to the benchmark)",
        "Everything after `bench` is passed to the benchmark; `python -m compile_cache bench --help` shows its options."
        "\n\nexample:\n  python -m compile_cache bench --out bench-out",
        cmd_forward,
    ),
    (
        "profile",
        "torch.profiler view: top operators eager vs compiled, Chrome traces (args go to the profiler)",
        "Everything after `profile` is passed to the profiler; `python -m compile_cache profile --help` shows its"
        " options.\n\nexample:\n  python -m compile_cache profile --out profile-out --rows 15",
        cmd_forward,
    ),
    (
        "env",
        "print the environment-variable reference as a Markdown table",
        "Every variable the framework reads, its default and what it accepts (the README's table is generated from\n"
        "this).\n\nexample:\n  python -m compile_cache env > docs/env.md",
        cmd_env,
    ),
]


_HELP_FORMAT = argparse.RawDescriptionHelpFormatter  # keep the examples' line breaks


def build_parser() -> argparse.ArgumentParser:
    store_help = (
        f"{_URL.description} (default: ${_URL_ENV}, else {_URL.default}). "
        "S3 credentials and endpoint come from the usual AWS variables."
    )
    top = argparse.ArgumentParser(
        prog="python -m compile_cache",
        description="Manage a compile_cache store: list, inspect, prune, pre-seed (warm) and verify cache entries.",
        epilog="Run `python -m compile_cache COMMAND --help` for a command's options and an example.\n"
        "Exit status: 0 ok, 1 failure, 2 usage or configuration error.",
        formatter_class=_HELP_FORMAT,
    )
    top.add_argument("--store", metavar="URL", default=None, help=store_help)
    # Also accepted after the command (`ls --store URL`); the top-level value is the default.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--store", metavar="URL", default=argparse.SUPPRESS, help=store_help)
    sub = top.add_subparsers(dest="command", metavar="COMMAND", required=True)
    parsers = {}
    for name, short, long, fn in _COMMANDS:
        kw: dict[str, Any] = {"help": short, "description": long, "formatter_class": _HELP_FORMAT}
        if name in _FORWARDED:
            p = sub.add_parser(name, add_help=False, **kw)  # its own --help belongs to the forwarded module
        else:
            p = sub.add_parser(name, parents=[common], **kw)
        p.set_defaults(func=fn)
        parsers[name] = p
    parsers["ls"].add_argument("--json", action="store_true", help="one JSON array instead of the table")
    p = parsers["inspect"]
    p.add_argument("key", metavar="KEY", help="a cache key (as `ls` shows it), or a unique prefix of one")
    p.add_argument("--json", action="store_true", help="the manifest as JSON")
    p.add_argument("--files", action="store_true", help="also list every file of every segment")
    p.add_argument(
        "--diff-env", action="store_true", help="compare the entry's factors with this machine's (imports torch)"
    )
    p = parsers["prune"]
    p.add_argument("--keep", type=_positive_int, metavar="N", help="keep the entries of the N newest model versions")
    p.add_argument(
        "--older-than", type=parse_duration, metavar="AGE", help="drop entries not updated for AGE (e.g. 7d; s/m/h/d/w)"
    )
    p.add_argument(
        "--grace",
        type=parse_duration,
        default=parse_duration(DEFAULT_GRACE),
        metavar="AGE",
        help=f"delete objects no entry lists only when older than AGE (an upload in flight; default {DEFAULT_GRACE})",
    )
    p.add_argument("--yes", action="store_true", help="really delete (default: dry run, print what would go)")
    p = parsers["warm"]
    p.add_argument(
        "--predictor",
        default=DEFAULT_PREDICTOR,
        metavar="FILE.py:CLASS",
        help=f"the predictor, as in cog.yaml's `run:` (default {DEFAULT_PREDICTOR})",
    )
    p = parsers["verify"]
    p.add_argument("key", metavar="KEY", help="a cache key (as `ls` shows it), or a unique prefix of one")
    p.add_argument(
        "--require-signed",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="fail an unsigned entry even without a signing key, or with COMPILE_CACHE_ALLOW_UNSIGNED on "
        "(default: COMPILE_CACHE_REQUIRE_SIGNED)",
    )
    p.add_argument("--json", action="store_true", help="the report as JSON")
    return top


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command in _FORWARDED:
        args.rest = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    ctx = _Context(args.store)
    try:
        return args.func(args, ctx)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (_Failure, CacheError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        ctx.close()
