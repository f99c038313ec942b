"""Fuzz: seeded random corruptions of every container through `curate ingest` (and a few through `curate select`),
in this process (typer's CliRunner), so a thousand cases take about a minute.

Each case must end with exit code 0 (ingested; rows read = records + rejects + duplicates) or 2 (one error line
naming the file: unreadable, or nothing left to select, with decisions.parquet holding every row), never a
traceback; and the process's peak memory must stay bounded although some cases carry a row of several MB.
`bench/bench_fuzz.py` runs the same engine and writes bench/results/fuzz.md.
"""

from __future__ import annotations

import gzip
import io
import json
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "sample"
CONTAINERS = ("jsonl", "jsonl.gz", "json", "csv", "parquet")


def base_rows() -> list[dict]:
    """Real rows (GSM8K and GPTeacher samples) plus one row of each other common format."""
    rows = [json.loads(x) for x in (SAMPLE / "gsm8k_train.jsonl").read_text().splitlines()[:8]]
    rows += [json.loads(x) for x in (SAMPLE / "gpteacher_codegen.jsonl").read_text().splitlines()[:6]]
    rows += [
        {"conversations": [{"from": "human", "value": "Salut, ça va ?"}, {"from": "gpt", "value": "Oui, merci."}]},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                      {"role": "assistant", "content": "4"}]},
        {"prompt": "Say hi in Greek", "response": "Γεια σου"},
    ]
    return rows


def _flat(row: dict) -> dict:
    """A CSV/Parquet-friendly row: nested fields as JSON text (Parquet keeps real lists for messages)."""
    return {k: v if isinstance(v, str) else json.dumps(v, ensure_ascii=False) for k, v in row.items()}


def encode(container: str, rows: list[dict]) -> bytes:
    if container in ("jsonl", "jsonl.gz"):
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
        return gzip.compress(data, compresslevel=1) if container == "jsonl.gz" else data
    if container == "json":
        return json.dumps(rows, ensure_ascii=False, indent=1).encode()
    if container == "csv":
        keys = ["instruction", "input", "output"]
        buf = io.StringIO()
        import csv

        w = csv.DictWriter(buf, keys)
        w.writeheader()
        for r in rows:
            w.writerow({"instruction": r.get("instruction") or r.get("question") or r.get("prompt") or "",
                        "input": r.get("input", ""),
                        "output": r.get("output") or r.get("answer") or r.get("response") or ""})
        return buf.getvalue().encode()
    alpaca = [{"instruction": r.get("instruction") or r.get("question") or r.get("prompt") or "",
               "input": r.get("input", ""), "output": r.get("output") or r.get("answer") or r.get("response") or ""}
              for r in rows]
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(alpaca), sink, row_group_size=5)
    return sink.getvalue()


_JUNK = [b"{", b"}", b"[", b"]", b'"', b",", b":", b"\n", b"\\", b"\r\n", b"\x00", b"\xff\xfe", b"\xef\xbb\xbf",
         b"123456789012345678901234567890", b"-1e999", b"NaN", b"null", b'\\ud800', "é".encode(), b"\t"]


def corrupt(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """One seeded corruption of `data`; returns the new bytes and what was done (for the report)."""
    b = bytearray(data)
    n = len(b)
    op = rng.choice(["flip", "truncate", "insert", "delete", "duplicate", "junk", "zeros", "swap", "long_line",
                     "many"])
    if op == "long_line" and rng.random() < 0.5:
        op = "junk"  # keep the multi-MB cases to about 5 %: they cost a few seconds each
    at = rng.randrange(max(n, 1))
    if op == "flip":
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(n)] ^= 1 << rng.randrange(8)
    elif op == "truncate":
        del b[at:]
    elif op == "insert":
        b[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    elif op == "delete":
        del b[at:at + rng.randint(1, 200)]
    elif op == "duplicate":
        ln = rng.randint(1, 300)
        b[at:at] = b[at:at + ln]
    elif op == "junk":
        b[at:at] = b"".join(rng.choice(_JUNK) for _ in range(rng.randint(1, 12)))
    elif op == "zeros":
        ln = rng.randint(1, 100)
        b[at:at + ln] = b"\x00" * ln
    elif op == "swap":
        i, j = sorted(rng.randrange(max(n, 1)) for _ in range(2))
        ln = min(rng.randint(1, 100), j - i)
        b[i:i + ln], b[j:j + ln] = b[j:j + ln], b[i:i + ln]
    elif op == "long_line":  # a row far over the 4 MiB limit, with or without a newline after it
        b[at:at] = b"a" * rng.choice([5 << 20, 6 << 20]) + (b"\n" if rng.random() < 0.5 else b"")
    else:
        for _ in range(rng.randint(2, 6)):
            b[rng.randrange(max(len(b), 1))] = rng.randrange(256)
    return bytes(b), op


def corrupt_case(container: str, rows: list[dict], rng: random.Random) -> tuple[bytes, str]:
    """For .gz, half the cases corrupt the compressed stream, half the text inside it."""
    if container == "jsonl.gz" and rng.random() < 0.5:
        inner, op = corrupt(encode("jsonl", rows), rng)
        return gzip.compress(inner, compresslevel=1), f"inner-{op}"
    return corrupt(encode(container, rows), rng)


def _rss_kb(field_name: str = "VmRSS") -> int:
    with open("/proc/self/status") as fh:
        return int(next(x for x in fh if x.startswith(field_name + ":")).split()[1])


@dataclass
class FuzzStats:
    cases: Counter = field(default_factory=Counter)  # per container
    exits: Counter = field(default_factory=Counter)  # (container, exit code)
    errors: Counter = field(default_factory=Counter)  # (container, kind of error)
    ops: Counter = field(default_factory=Counter)
    rows: Counter = field(default_factory=Counter)  # rows read / records / rejects / duplicates, all cases
    failures: list = field(default_factory=list)
    seconds: float = 0.0
    rss_start_mb: float = 0.0  # anonymous RSS after warm-up
    peak_mb: float = 0.0  # its peak while the cases ran (sampled every 5 ms)


def _error_kind(line: str) -> str:
    for key in ("no rows to select", "gzip", "not valid JSON", "malformed CSV", "Parquet", "not UTF-8", "header",
                "top-level", "truncated"):
        if key in line:
            return key
    return line.split(":", 2)[-1].strip()[:40]


def check_case(path: Path, out: Path, code: int, output: str) -> str | None:
    """The invariants of one `curate ingest` case; returns what broke (None when all hold)."""
    if code not in (0, 2):
        return f"exit code {code}"
    if "Traceback" in output:
        return "traceback in output"
    if code == 2:
        lines = [x for x in output.splitlines() if x.startswith("error:")]
        if len(lines) != 1 or path.name not in lines[0]:
            return f"error does not name the file: {output[-300:]!r}"
        if "no rows to select" in lines[0]:
            rows = sum(e["rows"] for e in json.loads((out / "manifest.json").read_text())["inputs"].values())
            if pl.read_parquet(out / "decisions.parquet").height != rows:
                return "decisions.parquet does not hold every row"
        return None
    m = json.loads((out / "manifest.json").read_text())
    rows = sum(e["rows"] for e in m["inputs"].values())
    kept = pl.scan_parquet(out / "records.parquet").select(pl.len()).collect().item()
    rej = pl.scan_parquet(out / "rejects.parquet").select(pl.len()).collect().item()
    dup = pl.scan_parquet(out / "duplicates.parquet").select(pl.len()).collect().item()
    if rows != kept + rej + dup:
        return f"not conserved: {rows} read != {kept} + {rej} + {dup}"
    return None


def fuzz_ingest(workdir: Path, per_container: int = 200, seed: int = 0,
                containers: tuple[str, ...] = CONTAINERS) -> FuzzStats:
    """Run per_container seeded corruptions of each container through `curate ingest`, in this process."""
    from typer.testing import CliRunner

    from curate.cli import app

    runner = CliRunner()
    rows = base_rows()
    stats = FuzzStats()
    warm = workdir / "warm.jsonl"
    warm.write_bytes(encode("jsonl", rows))
    runner.invoke(app, ["ingest", str(warm), "--out", str(workdir / "warm-run")])  # imports, thread pools
    stats.rss_start_mb = _rss_kb("RssAnon") / 1024
    peak, stop = [0], threading.Event()

    def sample() -> None:  # anonymous memory (file-backed pages come and go with the machine's load)
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_kb("RssAnon"))
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    for container in containers:
        rng = random.Random(f"{seed}:{container}")
        for i in range(per_container):
            data, op = corrupt_case(container, rows, rng)
            path = workdir / f"{container.replace('.', '_')}-{i:04d}.{container}"
            path.write_bytes(data)
            out = workdir / "runs" / path.name
            res = runner.invoke(app, ["ingest", str(path), "--out", str(out)])
            code, output = res.exit_code, res.output
            if res.exception is not None and not isinstance(res.exception, SystemExit):
                code, output = -1, f"{output}\nTraceback: {type(res.exception).__name__}: {res.exception}"
            stats.cases[container] += 1
            stats.exits[(container, code)] += 1
            stats.ops[op] += 1
            problem = check_case(path, out, code, output)
            if problem:
                stats.failures.append((path.name, op, problem))
            if code == 2:
                stats.errors[(container, _error_kind(output))] += 1
            elif code == 0:
                m = json.loads((out / "manifest.json").read_text())
                for e in m["inputs"].values():
                    stats.rows["read"] += e["rows"]
                    stats.rows["records"] += e["records"]
                    stats.rows["rejected"] += sum(e["rejected"].values())
            path.unlink()
    stats.seconds = time.perf_counter() - t0
    stop.set()
    sampler.join()
    stats.peak_mb = max(peak[0], _rss_kb("RssAnon")) / 1024
    return stats


def fuzz_select(workdir: Path, cases: int = 10, seed: int = 0) -> tuple[Counter, list]:
    """A few corrupted JSONL pools through `curate select --no-prefect` (embed, cluster, heuristics, select)."""
    from typer.testing import CliRunner

    from curate.cli import app

    runner = CliRunner()
    rows = base_rows()
    cfg = workdir / "recipe.yaml"
    cfg.write_text("report: false\nscore: {scorers: [heuristics]}\nselect: {budget: 5}\n")
    rng = random.Random(f"{seed}:select")
    exits: Counter = Counter()
    failures = []
    for i in range(cases):
        container = CONTAINERS[i % len(CONTAINERS)]
        data, op = corrupt_case(container, rows, rng)
        path = workdir / f"sel-{i:03d}.{container}"
        path.write_bytes(data)
        out = workdir / "sel-runs" / path.name
        res = runner.invoke(app, ["select", str(path), "--config", str(cfg), "--out", str(out), "--no-prefect"])
        code, output = res.exit_code, res.output
        exits[code] += 1
        problem = check_case(path, out, code, output) if code != 0 else None
        if code == 0:
            read = sum(e["rows"] for e in json.loads((out / "manifest.json").read_text())["inputs"].values())
            if pl.read_parquet(out / "decisions.parquet").height != read:
                problem = "decisions.parquet does not hold one row per input row"
        if problem:
            failures.append((path.name, op, problem))
    return exits, failures


def test_fuzz_every_container_through_ingest(tmp_path):
    stats = fuzz_ingest(tmp_path, per_container=200, seed=0)
    assert sum(stats.cases.values()) == 200 * len(CONTAINERS)
    assert stats.failures == [], stats.failures[:10]
    for c in CONTAINERS:  # both outcomes occur: the corruptions reach the readers' error paths and rows
        assert stats.exits[(c, 0)] > 0, (c, stats.exits)
    assert stats.rows["rejected"] > 0 and stats.ops["long_line"] > 0
    assert stats.peak_mb - stats.rss_start_mb < 300, (stats.rss_start_mb, stats.peak_mb)  # 5-6 MB rows, bounded


def test_fuzz_select_without_prefect(tmp_path):
    exits, failures = fuzz_select(tmp_path, cases=10, seed=0)
    assert failures == [], failures
    assert set(exits) <= {0, 2} and exits[0] > 0, exits
