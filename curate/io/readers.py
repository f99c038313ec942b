"""Readers: stream raw rows out of any supported container, with their line or row number.

Containers: JSONL (also .gz), JSON arrays, Parquet, CSV/TSV, HF `datasets` folders (save_to_disk),
folders of such files, and hub names via `datasets.load_dataset` when a hub is reachable.
Rows are yielded one at a time (Parquet and HF in record batches), so memory does not grow with the file.
A file that cannot be read at all raises InputError naming the file and the cause; a bad row is yielded as
a RowError so ingest can reject it and go on.
"""

from __future__ import annotations

import csv
import gzip
import io
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from curate.schema import RAW_PREVIEW, RowError

#: A single row (JSON line, CSV row, ...) larger than this is rejected without parsing.
MAX_RECORD_BYTES = 4 * 1024 * 1024

CONTAINERS = ("jsonl", "json", "parquet", "csv", "tsv", "hf_disk", "hf_hub")
_EXT = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".tsv": "tsv",
}


class InputError(Exception):
    """An input that cannot be read at all; the message names the file and the cause."""


@dataclass
class RawRow:
    row: int  # 1-based line for line formats, 0-based index otherwise
    value: Any  # the parsed object, or a RowError
    raw: str  # raw text preview for the rejects table


def _preview(text: str | bytes) -> str:
    if isinstance(text, bytes):
        text = text[: RAW_PREVIEW * 4].decode("utf-8", errors="replace")
    return text[:RAW_PREVIEW]


def expand_inputs(paths: list[str]) -> list[str]:
    """Folders that are not HF datasets become their data files (sorted); other paths pass through."""
    out: list[str] = []
    for p in paths:
        path = Path(p)
        if path.is_dir() and not _is_hf_disk(path):
            files = sorted(
                f for f in path.rglob("*") if f.is_file() and _container_of(f) is not None
            )
            if not files:
                raise InputError(f"{p}: folder has no .jsonl/.json/.parquet/.csv files")
            out.extend(str(f) for f in files)
        else:
            out.append(p)
    return out


def _is_hf_disk(path: Path) -> bool:
    return (path / "dataset_info.json").exists() or (path / "state.json").exists()


def _container_of(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    return _EXT.get(Path(name).suffix)


def detect_container(path: str) -> str:
    """Name the container of `path` from its extension (or, for hub names, that it is one)."""
    p = Path(path)
    if p.is_dir():
        if _is_hf_disk(p):
            return "hf_disk"
        raise InputError(f"{path}: is a folder, not a dataset file")
    if not p.exists():
        if "/" in path and not path.startswith((".", "/")) and p.suffix == "":
            return "hf_hub"
        raise InputError(f"{path}: no such file")
    kind = _container_of(p)
    if kind is None:
        raise InputError(
            f"{path}: unknown file type {p.suffix!r}; use .jsonl, .json, .parquet, .csv or --container"
        )
    return kind


def iter_rows(path: str, container: str | None = None) -> Iterator[RawRow]:
    """Yield every row of `path` with its position; raise InputError if the file is unreadable."""
    kind = container or detect_container(path)
    try:
        if kind == "jsonl":
            yield from _jsonl(path)
        elif kind == "json":
            yield from _json(path)
        elif kind == "parquet":
            yield from _parquet(path)
        elif kind in ("csv", "tsv"):
            yield from _csv(path, "\t" if kind == "tsv" else ",")
        elif kind == "hf_disk":
            yield from _hf_disk(path)
        elif kind == "hf_hub":
            yield from _hf_hub(path)
        else:
            raise InputError(f"{path}: unknown container {kind!r}; expected one of {CONTAINERS}")
    except InputError:
        raise
    except PermissionError:
        raise InputError(f"{path}: permission denied") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder, not a file") from None
    except (OSError, EOFError) as e:
        raise InputError(f"{path}: cannot be read ({type(e).__name__}: {e})") from None


def _open_binary(path: str) -> io.BufferedIOBase:
    if path.endswith(".gz"):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")


def _decode(line: bytes, lineno: int) -> str | RowError:
    if lineno == 1 and line.startswith(b"\xef\xbb\xbf"):
        line = line[3:]
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as e:
        return RowError("undecodable_bytes", f"not UTF-8 at byte {e.start}")


def _jsonl(path: str) -> Iterator[RawRow]:
    with _open_binary(path) as fh:
        for lineno, line in enumerate(fh, start=1):
            if len(line) > MAX_RECORD_BYTES:
                err = RowError("too_large", f"line is {len(line):,} bytes (limit {MAX_RECORD_BYTES:,})")
                yield RawRow(lineno, err, _preview(line))
                continue
            text = _decode(line, lineno)
            if isinstance(text, RowError):
                yield RawRow(lineno, text, _preview(line))
                continue
            if not text.strip():
                continue  # blank lines are not rows
            try:
                value = orjson.loads(text)
            except orjson.JSONDecodeError as e:
                value = RowError("malformed_json", f"invalid JSON: {e}")
            yield RawRow(lineno, value, _preview(text))


def _json(path: str) -> Iterator[RawRow]:
    with _open_binary(path) as fh:
        data = fh.read()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    if not data.strip():
        return
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        # a .json file that is really JSON Lines is common: fall back to line mode
        if data.lstrip().startswith(b"{") and b"\n" in data.strip():
            yield from _jsonl(path)
            return
        raise InputError(f"{path}: not valid JSON ({e})") from None
    if isinstance(value, dict):
        # {"data": [...]} / {"train": [...]} wrappers: take the single list-valued field
        lists = [v for v in value.values() if isinstance(v, list)]
        value = lists[0] if len(lists) == 1 else [value]
    if not isinstance(value, list):
        raise InputError(f"{path}: top-level JSON is a {type(value).__name__}, expected a list of rows")
    for i, item in enumerate(value):
        raw = orjson.dumps(item)
        if len(raw) > MAX_RECORD_BYTES:
            yield RawRow(i, RowError("too_large", f"row is {len(raw):,} bytes"), _preview(raw))
        else:
            yield RawRow(i, item, _preview(raw))


def _parquet(path: str) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise InputError(f"{path}: not a readable Parquet file ({e})") from None
    i = 0
    for batch in pf.iter_batches(batch_size=10_000):
        for item in batch.to_pylist():
            yield RawRow(i, item, _preview(orjson.dumps(item, default=str)))
            i += 1


def _csv(path: str, delimiter: str) -> Iterator[RawRow]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with _open_binary(path) as fb:
        fh = io.TextIOWrapper(fb, encoding="utf-8-sig", errors="strict", newline="")
        try:
            reader = csv.DictReader(fh, delimiter=delimiter, strict=True)
            start = 2
            for item in reader:
                lineno = start
                start = reader.line_num + 1
                if None in item:
                    err = RowError("malformed_csv", "row has more fields than the header")
                    yield RawRow(lineno, err, _preview(str(item)))
                    continue
                yield RawRow(lineno, dict(item), _preview(str(item)))
        except UnicodeDecodeError as e:
            raise InputError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except csv.Error as e:
            raise InputError(f"{path}: malformed CSV ({e})") from None


def _iter_dataset(ds: Any) -> Iterator[RawRow]:
    for i, item in enumerate(ds):
        yield RawRow(i, dict(item), _preview(orjson.dumps(item, default=str)))


def _hf_disk(path: str) -> Iterator[RawRow]:
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except Exception as e:
        raise InputError(f"{path}: not a readable datasets folder ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        split = "train" if "train" in ds else next(iter(ds))
        ds = ds[split]
    yield from _iter_dataset(ds)


def _hf_hub(name: str) -> Iterator[RawRow]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split="train", streaming=True)
    except Exception as e:
        raise InputError(f"{name}: not a local file, and the hub dataset could not be loaded ({e})") from None
    yield from _iter_dataset(ds)
