#!/usr/bin/env python3
"""Restore throughput vs a raw boto3 GET of the same bytes, side by side in one run, on a real S3 server.

    scripts/bench_restore.py [--mb 48] [--rounds 9]          # starts a SeaweedFS server on 127.0.0.1 itself
    scripts/bench_restore.py --url s3://bucket/prefix        # or uses yours (AWS_* env for endpoint/credentials)
    scripts/bench_restore.py --dest /dev/shm                 # restore into another filesystem (default: $TMPDIR)
    scripts/bench_restore.py --compressible --mb 400         # .so files that compress like CPU kernels (~24x)
    scripts/bench_restore.py --link 2gbit                    # a network link to the server (Linux, as root)
    scripts/bench_restore.py --entry DIR_OR_URL [--key KEY]  # an existing entry, copied into the bench's store
    scripts/bench_restore.py --llm jit                       # the LLM example's entry: it boots cold first (minutes)
    scripts/bench_restore.py --segment-files-mb 8 --parallel 2   # another segment cut, segments restored at a time

It writes an entry shaped like a cache dir (--mb of kernel-like files, see make_entry, packed into segments by the
real upload path), then alternates, --rounds times: (a) a plain boto3 get_object().read() of every segment object,
the baseline (`ratio`); (b) the same GETs streamed in 1 MiB reads into one file per object in --dest, a
stronger baseline that also writes to disk (`ratio_to_file`); (c) a full restore (manifest read, segments streamed
through their sha256 check and the decompressor straight into staging files, several at a time, then moved into
place) into an empty dir. Prints the median throughputs and the ratios (the target: restore >= 0.8x raw).

The raw GETs only read bytes (into memory, or into a few files); a restore also hashes them, decompresses them and
creates every file and directory of the entry. The ratios compare times to fetch the same objects; with
--compressible a restore writes about 30 times the bytes it downloads, so they are far lower there, and
`restore_unpacked_mb_s` (files written per second) says more.

Both sides write into memory in the same state. The raw GET reads into heap memory the process reused from the
round before; a restore writes into new page cache. On a VM whose host takes back free guest memory (virtio-balloon
free page reporting, as on the 2-core VM this was written on), the first write to a page the host took back costs a
host fault: writing 45 MB into new files took 135-145 ms there instead of 11-16 ms (a one-off measurement). So
after each timed step that wrote files, the files are written back (os.sync) and their page cache is dropped
(POSIX_FADV_DONTNEED; on tmpfs, where the pages are the files, the files are removed): the next step's writes land
in pages just freed, as the raw GET's reads do. --keep-pages skips that, to see the effect.

The files themselves stay until the run ends: journal-less ext4 scans past inodes freed in the last minutes
(recently_deleted() in fs/ext4/ialloc.c), so deleting them between rounds would slow the next round's file
creation; a run right after another one, or after a test suite, on the same journal-less ext4 directory still pays
for their deletions. --dest on a tmpfs measures the restore pipeline without the filesystem.

Over loopback, the server and the client share this machine's CPU, and nothing else limits either side: the ratios
then compare how much CPU each side needs (a restore also hashes, decompresses and creates files). A container
reaches its store over a network. --link RATE puts one between them: the server's S3 responses (its port only) go
through an HTB class limited to RATE (tc's syntax: 500mbit, 2gbit) on the loopback device, for the whole run; it
needs Linux, root and tc, refuses a loopback device that already has a queueing discipline of someone else's, and
removes its own when the bench ends. `link_bytes` is what went through the limited class, as tc counted it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from compile_cache import restore as restore_module  # noqa: E402
from compile_cache import segments  # noqa: E402
from compile_cache.entry import Entry  # noqa: E402
from compile_cache.manifest import Manifest, manifest_name  # noqa: E402
from compile_cache.restore import restore  # noqa: E402
from compile_cache.stores import open_store  # noqa: E402
from compile_cache.trust import TrustPolicy  # noqa: E402
from compile_cache.upload import Uploader  # noqa: E402

FACTORS = {"bench": "restore"}


def make_entry(base: Path, mb: int, compressible: bool = False) -> Path:
    """``mb`` MB of files shaped like an Inductor cache: kernel sources and larger .so files, spread over 256
    directories. By default the .so files, two thirds of the bytes, are random: incompressible, so a restore writes
    about what it downloads. With ``compressible``, each .so is 8 KB of random bytes and then zeros, which zstd
    level 3 shrinks about as much as the CPU kernels' .so files of this machine's Inductor cache (48 of them, 2.86
    MB, took 120 KB, 24x, in a one-off check): a restore then writes about 30 times what it downloads."""
    src = base / "cache"
    i = 0
    total = 0
    while total < mb << 20:
        d = src / f"{i % 256:02x}"
        d.mkdir(parents=True, exist_ok=True)
        if i % 3 == 0:
            data = (f"// kernel {i}\n" + "out[i] = a[i] * b[i] + c;\n" * 2000).encode()
        else:
            n = 200_000 + (i % 50) * 1000
            data = os.urandom(8_000) + bytes(n - 8_000) if compressible else os.urandom(n)
        (d / f"c{i:05d}.so").write_bytes(data)
        total += len(data)
        i += 1
    return src


def _fs_type(path: Path) -> str:
    """The filesystem type of the mount holding ``path`` (Linux), e.g. "ext4 at /" or "tmpfs at /dev/shm"."""
    best = ("", "unknown")
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                _, mnt, fstype, *_ = line.split()
                if str(path.resolve()).startswith(mnt.rstrip("/") + "/") or str(path.resolve()) == mnt:
                    best = max(best, (mnt, fstype), key=lambda x: len(x[0]))
    except OSError:
        pass
    return f"{best[1]} at {best[0] or '?'}"


_LINK_HANDLE = "cc:"  # the root qdisc --link adds to the loopback device (a leftover of a killed run is replaced)


def _tc(*args: str) -> str:
    try:
        p = subprocess.run(["tc", *args], capture_output=True, text=True)
    except FileNotFoundError:
        raise SystemExit("--link needs tc (iproute2)") from None
    if p.returncode != 0:
        raise SystemExit(f"--link: tc {' '.join(args)} failed: {p.stderr.strip()} (it needs root and the htb and u32 "
                         "kernel modules)")
    return p.stdout


def _link_check() -> None:
    """Refuse --link before anything starts unless the loopback device is ours to shape; drop a leftover qdisc of
    a bench that was killed."""
    if sys.platform != "linux":
        raise SystemExit("--link is Linux only (tc)")
    root = _tc("qdisc", "show", "dev", "lo").splitlines()[0].split()  # e.g. qdisc noqueue 0: root refcnt 2
    if root[1:3] == ["htb", _LINK_HANDLE]:
        _tc("qdisc", "del", "dev", "lo", "root")
    elif root[1] != "noqueue":
        raise SystemExit(f"--link: the loopback device already has a queueing discipline ({' '.join(root[:3])}); "
                         "not touching it")


def _link_up(port: int, rate: str) -> None:
    """Limit what leaves 127.0.0.1:``port`` (the server's responses) to ``rate``; everything else on the loopback
    device goes through an unlimited class."""
    _tc("qdisc", "add", "dev", "lo", "root", "handle", _LINK_HANDLE, "htb", "default", "1")
    try:
        _tc("class", "add", "dev", "lo", "parent", _LINK_HANDLE, "classid", f"{_LINK_HANDLE}1", "htb",
            "rate", "100gbit", "quantum", "200000")
        _tc("class", "add", "dev", "lo", "parent", _LINK_HANDLE, "classid", f"{_LINK_HANDLE}2", "htb",
            "rate", rate, "ceil", rate, "quantum", "200000")
        _tc("filter", "add", "dev", "lo", "parent", _LINK_HANDLE, "protocol", "ip", "prio", "1", "u32",
            "match", "ip", "sport", str(port), "0xffff", "flowid", f"{_LINK_HANDLE}2")
    except BaseException:
        _link_down()
        raise


def _link_bytes() -> int:
    """Bytes sent through the limited class so far, as tc counts them."""
    out = _tc("-s", "class", "show", "dev", "lo", "classid", f"{_LINK_HANDLE}2")
    m = re.search(r"Sent (\d+) bytes", out)
    if m is None:
        raise SystemExit(f"--link: no byte count in tc's statistics: {out!r}")
    return int(m.group(1))


def _link_down() -> None:
    subprocess.run(["tc", "qdisc", "del", "dev", "lo", "root", "handle", _LINK_HANDLE], capture_output=True)


def _release(written: Path, keep: bool, tmpfs: bool) -> None:
    """Write back what a timed step wrote, then (unless ``keep``) give its page cache back to the kernel, as the
    raw GET's buffers go back to the heap: the next step writes into pages just freed, not into pages the host took
    back (see the docstring). The files stay (deleting them slows journal-less ext4's next file creations); on
    tmpfs, where the pages are the files, they go."""
    os.sync()
    if keep:
        return
    if tmpfs:
        shutil.rmtree(written)
        return
    if not hasattr(os, "posix_fadvise"):  # macOS, Windows: no way to drop one file's pages; measure as they are
        return
    for dirpath, _, names in os.walk(written):
        for name in names:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def only_key(store: Any) -> str:
    """The key of the one entry ``store`` holds."""
    keys = sorted({o.name.split("/")[1] for o in store.list("entries/") if o.name.endswith("/manifest.json")})
    if len(keys) != 1:
        raise SystemExit(f"{store.url} holds {len(keys)} entries ({', '.join(keys) or 'none'}): name one with --key")
    return keys[0]


def copy_entry(src_url: str, key: str | None, store: Any) -> str:
    """Copy an entry (its manifest and segment objects) from the store at ``src_url`` into ``store``; return its
    key (without ``key``, the source's only entry)."""
    src = open_store(src_url)
    key = key or only_key(src)
    data = src.read(manifest_name(key))
    with tempfile.TemporaryDirectory() as tmp:
        for seg in Manifest.from_bytes(data).segments:
            src.download(seg.object, Path(tmp) / seg.sha256)
            store.put_immutable(seg.object, Path(tmp) / seg.sha256)
    store.put_conditional(manifest_name(key), data, None)
    return key


def boot_llm(strategy: str, url: str) -> None:
    """Boot the LLM example once, cold, in the real Cog runtime (scripts/predict) with its entry going to ``url``."""
    env = {**os.environ, "COMPILE_CACHE_URL": url, "COMPILE_CACHE_STRATEGY": strategy}
    cmd = [sys.executable, str(ROOT / "scripts" / "predict"), "--predictor", "examples/llm/predict.py:Runner",
           "-i", "prompt=Once upon a time"]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"the LLM example's cold boot failed ({p.returncode}):\n{p.stderr[-4000:]}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="an s3:// URL to use instead of a local SeaweedFS server")
    ap.add_argument("--mb", type=int, default=48, help="the entry's files, in MB (default 48)")
    ap.add_argument(
        "--compressible",
        action="store_true",
        help="make the .so files compress like CPU kernels (about 24x) instead of random bytes (see make_entry)",
    )
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--dest", type=Path, help="directory to restore into (default: the system temp dir)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    ap.add_argument(
        "--keep-pages",
        action="store_true",
        help="keep every round's files in the page cache (see the docstring: on a VM whose host takes back free "
        "guest memory, each round then writes into pages the host must fault in again)",
    )
    ap.add_argument(
        "--link",
        metavar="RATE",
        help="limit the server's responses to RATE (tc syntax: 500mbit, 2gbit), a network link between client and "
        "server instead of loopback with nothing in the way (Linux, root, tc; see the docstring)",
    )
    src = ap.add_mutually_exclusive_group()
    src.add_argument(
        "--entry",
        metavar="URL",
        help="restore an existing entry, copied from this store (a local dir or s3:// URL), instead of a made one",
    )
    src.add_argument(
        "--llm",
        choices=["jit", "export"],
        help="restore the LLM example's entry for this strategy: the example boots once, cold, in the real Cog "
        "runtime (scripts/predict) against the bench's store first, which uploads it (minutes)",
    )
    ap.add_argument("--key", help="with --entry: the entry's key, where the store holds several")
    ap.add_argument(
        "--segment-files-mb",
        type=int,
        help="cut the entry's segments at this many MiB of files (default: segments.SEGMENT_MAX_UNPACKED_BYTES)",
    )
    ap.add_argument(
        "--parallel", type=int, help="segments restored at a time (default: restore._PARALLEL_SEGMENTS, per core)"
    )
    args = ap.parse_args()
    if args.segment_files_mb:
        segments.SEGMENT_MAX_UNPACKED_BYTES = args.segment_files_mb * 2**20
    if args.parallel:
        restore_module._PARALLEL_SEGMENTS = args.parallel
    if args.link and args.url:
        ap.error("--link limits the server this bench starts; it cannot shape the way to --url")
    if args.link and not re.fullmatch(r"\d+(\.\d+)?[kmg]?(bit|bps)", args.link):
        ap.error(f"--link {args.link!r}: give a rate as tc spells it, e.g. 500mbit or 2gbit")
    if args.link:
        _link_check()

    server = None
    linked = False
    work = Path(tempfile.mkdtemp(prefix="bench-restore-"))
    cleanup = [work]
    try:
        if args.url:
            url = args.url
        else:
            from tests.s3server import _start, _stop, _wait_ready  # the same launcher the tests use

            server = _start(work / "seaweed")
            _wait_ready(server)
            if args.link:
                _link_up(server.ports["s3"], args.link)
                linked = True
            bucket = server.make_bucket(f"bench-{uuid.uuid4().hex[:8]}")
            os.environ.update(
                AWS_ACCESS_KEY_ID=server.access_key,
                AWS_SECRET_ACCESS_KEY=server.secret_key,
                AWS_ENDPOINT_URL_S3=server.endpoint,
                AWS_DEFAULT_REGION=server.region,
            )
            url = f"s3://{bucket}/bench"
        store = open_store(url)
        if args.entry:
            key = copy_entry(args.entry, args.key, store)
        elif args.llm:
            url = f"{url}/llm-{args.llm}-{uuid.uuid4().hex[:8]}"
            boot_llm(args.llm, url)
            store = open_store(url)
            key = only_key(store)  # the one entry the boot wrote
        else:
            key = f"bench-{uuid.uuid4().hex[:8]}"
            src = make_entry(work, args.mb, args.compressible)
            up = Uploader(Entry(store, key, {"inductor": src}, FACTORS, TrustPolicy()), "bench").upload()
            assert up is not None and not up.error, up
        m = Manifest.from_bytes(store.read(manifest_name(key)))
        labels = sorted({f.path.split("/", 1)[0] for f in m.files().values()})
        nbytes = m.total_bytes  # the objects' bytes: what both sides download
        unpacked = sum(f.size for f in m.files().values())  # what a restore writes

        import boto3  # the raw baseline: the same client settings a user would have by default

        client = boto3.client("s3")
        bucket, _, prefix = url[len("s3://") :].partition("/")
        keys = [f"{prefix}/{seg.object}" if prefix else seg.object for seg in m.segments]

        def raw() -> float:
            t = time.perf_counter()
            for k in keys:
                client.get_object(Bucket=bucket, Key=k)["Body"].read()
            return time.perf_counter() - t

        def raw_to_file(dest: Path) -> float:
            t = time.perf_counter()
            for k in keys:
                body = client.get_object(Bucket=bucket, Key=k)["Body"]
                with open(dest / k.replace("/", "_"), "wb") as f:
                    shutil.copyfileobj(body, f, 1 << 20)
            return time.perf_counter() - t

        # Every round's files stay until the end (their page cache does not, see _release): journal-less ext4
        # avoids reusing an inode freed in the last few minutes (its allocator reads past each one,
        # recently_deleted() in ialloc.c), so deleting a round's 558 files and directories before the next round
        # made that round pay for them (creating such a tree took 2.5x as long right after deletions, in a one-off
        # measurement). A container restores into a cache dir where nothing was just deleted.
        out_dir = Path(tempfile.mkdtemp(prefix="bench-restore-dest-", dir=args.dest))
        cleanup.append(out_dir)
        dest_fs = _fs_type(out_dir)
        tmpfs = dest_fs.startswith("tmpfs ")
        raw_s, ours_s, file_s = [], [], []
        for i in range(args.rounds):
            raw_s.append(raw())
            (out_dir / f"get-{i}").mkdir()
            file_s.append(raw_to_file(out_dir / f"get-{i}"))
            _release(out_dir / f"get-{i}", args.keep_pages, tmpfs)
            dest = out_dir / f"restore-{i}"
            res = restore(Entry(store, key, {label: dest / label for label in labels}, m.factors, TrustPolicy()))
            assert res.status == "hit", res.reason
            ours_s.append(res.seconds)  # the whole restore() call: manifest, segments, commit
            _release(dest, args.keep_pages, tmpfs)
        link_bytes = _link_bytes() if linked else None
        raw_mb_s = nbytes / 1e6 / statistics.median(raw_s)
        ours_mb_s = nbytes / 1e6 / statistics.median(ours_s)
        file_mb_s = nbytes / 1e6 / statistics.median(file_s)
        out = {
            "entry_bytes": nbytes,
            "unpacked_bytes": unpacked,
            "files": len(m.files()),
            "segments": len(m.segments),
            "raw_get_mb_s": round(raw_mb_s, 1),
            "restore_mb_s": round(ours_mb_s, 1),
            "ratio": round(ours_mb_s / raw_mb_s, 2),
            "restore_unpacked_mb_s": round(unpacked / 1e6 / statistics.median(ours_s), 1),
            "raw_get_to_file_mb_s": round(file_mb_s, 1),
            "ratio_to_file": round(ours_mb_s / file_mb_s, 2),
            "rounds": args.rounds,
            "compressible": args.compressible,
            "dest_fs": dest_fs,
            "pages_released": not args.keep_pages and (tmpfs or hasattr(os, "posix_fadvise")),
            "link": args.link,
            "link_bytes": link_bytes,
            "tar_reader": "tarfile",
            "entry": args.entry or (f"llm {args.llm}" if args.llm else "made"),
            "restore_s": round(statistics.median(ours_s), 4),
        }
        if args.json:
            print(json.dumps(out))
        else:
            print(
                f"entry {nbytes / 1e6:.1f} MB in {out['segments']} segments, {out['files']} files of "
                f"{unpacked / 1e6:.1f} MB\n"
                f"raw boto3 GET   {raw_mb_s:7.1f} MB/s  (get_object().read(), median of {args.rounds})\n"
                f"GET to file     {file_mb_s:7.1f} MB/s  (the same GETs streamed into one file per object)\n"
                f"restore         {ours_mb_s:7.1f} MB/s  (manifest, streamed sha256/unpack to disk, move into place;"
                f" {out['restore_unpacked_mb_s']:.1f} MB/s of files written)\n"
                f"ratio           {out['ratio']:.2f}x  (restored into {out['dest_fs']}; "
                f"{out['ratio_to_file']:.2f}x of the GET to file; page cache "
                f"{'dropped' if out['pages_released'] else 'kept'} between steps"
                + (f"; server's responses limited to {args.link}, {link_bytes / 1e6:.0f} MB through it)" if linked
                   else "; loopback, no link)")
            )
            print(f"restore         {out['restore_s'] * 1e3:7.1f} ms  (median of {args.rounds}; "
                  f"{min(ours_s) * 1e3:.1f}-{max(ours_s) * 1e3:.1f})")
        return 0
    finally:
        if linked:
            _link_down()
        if server is not None:
            _stop(server)
        for d in cleanup:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
