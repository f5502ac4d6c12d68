"""Inductor's CPU ISA decision, recorded in the entry and replayed where this host's CPU confirms it.

Before it builds C++ kernels, Inductor picks the vector ISA to build them for (``pick_vec_isa``): for each candidate
(AVX-512 with VNNI, AVX-512, AVX2, ...) it builds a test program and loads it in a subprocess
(``VecISA.check_build``), the bf16 and VNNI variants too. The answers are cached for the process only, so every warm
boot asked them again, though the entry restored the very programs (docs/benchmarks.md, "The CPU ISA decision").

Here each answer ``check_build`` gives is recorded (which ISA, with which compiler flags, for which test program) in
``<Inductor cache dir>/cpu_isa/decision.json``, which the snapshot ships with the entry. A later boot feeds the
recorded answers back to ``check_build`` while Inductor picks, so Inductor makes its own decision, with its own flags
and caches, from answers it did not have to build and load. Nothing of Inductor's config changes (``config.cpp.
vec_isa_ok`` would: it is hashed into the FX-graph key), so its cache keys are those of a probing boot.

A replay is refused, and Inductor probes as it always did, unless: the record was made by this torch, this machine
type and this C++ compiler; every compiler flag of every recorded answer names a CPU feature this module knows; and
this host's ``/proc/cpuinfo`` lists exactly the recorded host's features among those (every feature a "yes" needs,
so no kernel is built for an instruction this CPU lacks; and none a "no" lacked, so no better ISA is given up). A
question the record does not hold is put to the real ``check_build``. Where torch lacks the hooks, it probes too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .metrics import write_json_atomic

__all__ = ["RECORD", "CPUINFO", "IsaStep", "begin", "import_inductor", "cpu_flags", "features_of", "needed_by"]

log = logging.getLogger("compile_cache")

RECORD = Path("cpu_isa") / "decision.json"  # under the Inductor cache dir (a root the snapshot ships)
CPUINFO = Path("/proc/cpuinfo")  # module-level so a test can point it at a fake CPU
_FORMAT = 1
# gcc/clang's -m<name> spelling -> /proc/cpuinfo's flag, where they differ beyond "-" -> "_"
_RENAMED = {"avx512vnni": "avx512_vnni", "avx512bf16": "avx512_bf16", "avx512fp16": "avx512_fp16",
            "avxvnni": "avx_vnni", "avx512vbmi2": "avx512_vbmi2", "avx512bitalg": "avx512_bitalg"}
# -m options that are not CPU features
_NOT_FEATURES = ("-mtune=", "-march=", "-msve-vector-bits=")

@dataclass
class IsaStep:
    """What the compile step's ISA step did, for the metrics: ``source`` is "recorded" (the entry's answers
    replayed), "probed" (Inductor asked ``check_build`` for real) or "none" (no kernel needed a decision yet);
    ``reason`` says why a record was not replayed."""

    source: str = "none"
    decision: str = ""  # the ISA Inductor picked, and its compiler flags
    probes: int = 0
    reason: str = ""
    import_s: float = 0.0
    isa_s: float = 0.0
    _answers: dict[str, bool] = field(default_factory=dict, repr=False)
    _asked: dict[str, bool] = field(default_factory=dict, repr=False)
    _hooked: list[Any] = field(default_factory=list, repr=False)
    _spans: list[tuple[float, float]] = field(default_factory=list, repr=False)  # each probe's (start, end)
    _settled: float = field(default=0.0, repr=False)  # when begin() returned
    _cache_dir: Path | None = field(default=None, repr=False)
    _write: bool = field(default=False, repr=False)

    def probe_s(self, start: float, end: float) -> float:
        """Seconds of probing between two ``time.monotonic()`` values (a cold decision happens inside the first
        compile, wherever Inductor first needs it)."""
        return sum(max(0.0, min(b, end) - max(a, start)) for a, b in self._spans)

    def metrics(self) -> dict[str, Any]:
        """The metrics' ``isa`` object; ``isa_s`` counts the probes Inductor ran later, inside a compile, too."""
        d = {k: v for k, v in asdict(self).items() if not k.startswith("_")}
        d["isa_s"] = self.isa_s + self.probe_s(self._settled, float("inf"))
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in d.items()}

    def split(self, start: float, end: float, first_calls: tuple[float, float] | None, *,
              first: bool) -> dict[str, float]:
        """A jit part's compile step, prepared from ``start`` to ``end`` with its warm-up calls in ``first_calls``,
        as import, ISA, load and first calls (in seconds; they add up to the part's ``compile_s``). The ``first``
        part that needs the decision carries the import and the decision made before it; a probe inside the part
        counts as ISA, not as the load or the call it happened in."""
        calls_from, calls_to = first_calls or (end, end)
        calls = (calls_to - calls_from) - self.probe_s(calls_from, calls_to)
        probed = self.probe_s(start, end)
        return {
            "import_s": round(self.import_s if first else 0.0, 4),
            "isa_s": round(probed + (self.isa_s if first else 0.0), 4),
            "load_s": round(max(0.0, (end - start) - probed - calls), 4),
            "first_calls_s": round(calls, 4),
        }

    def end(self) -> None:
        """Unhook ``check_build`` (the answers are in Inductor's caches by now) and record what was probed, when the
        cache dir had no usable record."""
        if not self._hooked:
            return
        if self.probes and not self.decision:
            self.decision = _picked()  # hooked still: a question Inductor did not ask yet is answered and recorded
        for isa in self._hooked:
            vars(isa).pop("check_build", None)
        self._hooked = []
        if self._asked and self.probes and self._write and self._cache_dir is not None:
            try:
                _write_record(self._cache_dir / RECORD, self._asked, self.decision)
            except OSError as e:  # an unwritable dir costs the next boot a probe, nothing else
                log.warning("cannot record the CPU ISA decision (%s): the next boot probes again", e)


def needed_by(cfg: Any) -> bool:
    """Whether a part with this config builds Inductor kernels through the jit strategy (an export part loads a
    package, which needs no decision on a warm boot; another backend builds no C++)."""
    return bool(cfg.enable and cfg.strategy == "jit" and cfg.backend == "inductor")


def import_inductor(*, jit: bool = True, packages: bool = False) -> None:
    """With ``jit``, what every jit part imports (compiling it, or loading a precompiled function:
    scripts/precompile_imports.py lists what that imports); with ``packages``, what loading an export package imports
    (Dynamo with it, not the compiler). Called in setup's thread, after load(): importing Dynamo from another thread
    while the model's packages import (or while a request runs eager) breaks its circular imports."""
    if jit:
        import torch._dynamo  # noqa: F401
        import torch._inductor.codecache  # noqa: F401
        import torch._inductor.compile_fx  # noqa: F401
    if packages:
        import torch._inductor.package  # noqa: F401


def begin(cache_dir: Path) -> IsaStep:
    """Import Dynamo and Inductor, then settle the ISA: replay the record in ``cache_dir`` where this host confirms
    it, else leave the probe to Inductor, recorded. Call :meth:`IsaStep.end` when the compile step is done."""
    step = IsaStep(_cache_dir=cache_dir)
    t = time.monotonic()
    try:
        import_inductor()
        from torch._inductor import cpu_vec_isa
    except Exception as e:  # an import that fails here fails the compile too, which falls back and says why
        step.reason = f"cannot import Inductor ({type(e).__name__}: {e})"
        step.import_s = time.monotonic() - t
        return step
    step.import_s = time.monotonic() - t
    t = time.monotonic()
    instances = getattr(cpu_vec_isa, "supported_vec_isa_list", None)
    if not isinstance(instances, list) or not all(callable(getattr(i, "check_build", None)) for i in instances):
        step.reason = f"torch {_torch_version()} has no VecISA.check_build to answer"
        step.isa_s = time.monotonic() - t
        return step
    answers, step.reason, step._write = _usable_record(cache_dir / RECORD)
    step._answers = answers
    for isa in instances:
        _hook(step, isa)
    if answers:
        step.decision = _picked()  # Inductor's own pick, from the recorded answers
        step.source = "probed" if step.probes else "recorded"
        step.end()
    step._settled = time.monotonic()
    step.isa_s = step._settled - t
    return step


def _picked() -> str:
    """``pick_vec_isa()``, asked as Inductor asks before it builds a kernel (the ISA, then whether it works)."""
    try:
        from torch._inductor.cpu_vec_isa import pick_vec_isa

        isa = pick_vec_isa()
        return f"{isa} ({isa.build_arch_flags()})" if isa else f"{isa} (no vector ISA)"
    except Exception as e:  # noqa: BLE001 - Inductor asks again when it compiles, and probes then
        log.info("pick_vec_isa() raised %s: %s; Inductor decides when it compiles", type(e).__name__, e)
        return ""


def _hook(step: IsaStep, isa: Any) -> None:
    """Answer ``isa.check_build`` from the record, or ask torch and note the answer (an instance attribute, so torch's
    own method stays as it is, and :meth:`IsaStep.end` takes it away)."""
    real: Callable[[str], bool] = isa.check_build

    def check_build(code: str) -> bool:
        question = _question(str(isa), isa.build_arch_flags(), code)
        if question in step._answers:
            ok = step._answers[question]
        else:
            t = time.monotonic()
            try:
                ok = bool(real(code))
            finally:
                step._spans.append((t, time.monotonic()))
                step.probes += 1
                step.source = "probed"
        step._asked[question] = ok
        return ok

    isa.check_build = check_build
    step._hooked.append(isa)


def _question(isa: str, flags: str, code: str) -> str:
    return json.dumps([isa, flags, hashlib.sha256(code.encode()).hexdigest()[:16]])


def _torch_version() -> str:
    import torch

    return torch.__version__


def _compiler() -> str:
    """The C++ compiler torch's own probe keys its test programs by (their file names hash it), "" if unknown."""
    try:
        from torch._inductor.cpu_vec_isa import _get_isa_dry_compile_fingerprint

        return hashlib.sha256(_get_isa_dry_compile_fingerprint("").encode()).hexdigest()[:16]
    except Exception:  # noqa: BLE001 - no fingerprint: no replay
        return ""


def features_of(flags: str) -> set[str] | None:
    """The /proc/cpuinfo features that compiler ``flags`` build for; None if one is not an x86 feature option this
    module can map (then nothing can confirm it, and the ISA is probed)."""
    out: set[str] = set()
    for opt in flags.split():
        if not opt.startswith("-m") or opt.startswith(_NOT_FEATURES) or "=" in opt:
            return None
        name = opt[2:]
        out.add(_RENAMED.get(name, name.replace("-", "_")))
    return out


def cpu_flags(path: Path | None = None) -> set[str] | None:
    """This host's CPU features (the ``flags`` line of /proc/cpuinfo), or None where there is none to read."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        text = (path or CPUINFO).read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            return set(value.split())
    return None


def _relevant(questions: Iterable[str]) -> set[str] | None:
    out: set[str] = set()
    for q in questions:
        f = features_of(json.loads(q)[1])
        if f is None:
            return None
        out |= f
    return out


def _write_record(path: Path, asked: dict[str, bool], decision: str) -> None:
    relevant = _relevant(asked)
    host = cpu_flags()
    if relevant is None or host is None:
        return  # a record no host could confirm: not worth shipping
    write_json_atomic(path, {
        "format": _FORMAT,
        "torch": _torch_version(),
        "machine": platform.machine(),
        "compiler": _compiler(),
        "decision": decision,
        "cpu_features": sorted(relevant & host),
        "answers": [{"question": json.loads(q), "ok": ok} for q, ok in sorted(asked.items())],
    })
    log.info("CPU ISA decision recorded for later boots: %s", decision)


def _usable_record(path: Path) -> tuple[dict[str, bool], str, bool]:
    """(the recorded answers, "") if this host confirms them, else ({}, why not, whether a probe here may write a
    record: only where there is none worth keeping, as a record another CPU made stays that CPU's)."""
    answers, why = _read_record(path)
    return answers, why, not answers and why.startswith(("no record", "unreadable", "malformed"))


def _read_record(path: Path) -> tuple[dict[str, bool], str]:
    try:
        rec = json.loads(path.read_text())
    except FileNotFoundError:
        return {}, "no record in the cache dir"
    except (OSError, ValueError) as e:
        return {}, f"unreadable record ({type(e).__name__})"
    try:
        answers = {json.dumps(a["question"]): bool(a["ok"]) for a in rec["answers"]}
        mismatch = [k for k, here in (("format", _FORMAT), ("torch", _torch_version()),
                                      ("machine", platform.machine())) if rec[k] != here]
        if mismatch:
            return {}, f"recorded under another {mismatch[0]} ({rec[mismatch[0]]})"
        recorded = set(rec["cpu_features"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        return {}, f"malformed record ({type(e).__name__}: {e})"
    relevant = _relevant(answers)
    if relevant is None or not answers:
        return {}, "the record holds flags no CPU feature confirms"
    host = cpu_flags()
    if host is None:
        return {}, "no /proc/cpuinfo flags to confirm it"
    here = relevant & host
    if here != recorded:
        lacks, gains = sorted(recorded - here), sorted(here - recorded)
        return {}, ("this CPU " + "; ".join(x for x in (f"lacks {' '.join(lacks)}" if lacks else "",
                                                         f"also has {' '.join(gains)}" if gains else "") if x))
    if rec["compiler"] != _compiler() or not rec["compiler"]:
        return {}, "recorded with another C++ compiler"
    return answers, ""
