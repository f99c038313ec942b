"""Readers: stream raw rows out of any supported container, with their line or row number.

Containers: JSONL (also .gz), JSON arrays (also dicts of splits), Parquet, CSV/TSV, HF `datasets` folders
(save_to_disk; a DatasetDict is one source per split), folders of such files, and hub names via
`datasets.load_dataset` when a hub is reachable.

Memory is bounded whatever the input: rows are yielded one at a time (Parquet and HF in record batches), and no
row is ever held whole when it is over the row limit (4 MiB): JSONL and CSV lines are read with a length cap
and the rest of an oversized line is skipped in chunks; JSON arrays are cut into elements by a byte-level scanner
before any parsing. A file that cannot be read at all raises InputError naming the file and the cause; a bad row
is yielded as a RowError so ingest can reject it and go on. Integers outside 64 bits are kept exact, as text.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import re
import stat
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from curate.schema import RAW_PREVIEW, RowError

#: A single row (JSON line, CSV record, JSON element, ...) larger than this is rejected without parsing.
MAX_RECORD_BYTES = 4 * 1024 * 1024
_CHUNK = 1 << 16
_BOM = b"\xef\xbb\xbf"

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
#: separates a JSON file from one of its splits in a source name: `data.json#train`
SPLIT_SEP = "#"
#: keys of a one-row JSON object whose list value is that row's turns, not a list of rows
_ROW_LIST_KEYS = {"messages", "conversations", "conversation", "turns", "history"}


class InputError(ValueError):
    """An input that cannot be read at all; the message names the file and the cause."""


@dataclass
class RawRow:
    row: int  # 1-based line for line formats, 0-based index otherwise
    value: Any  # the parsed object, or a RowError
    raw: str  # raw text preview for the rejects table


def _preview(text: str | bytes) -> str:
    if isinstance(text, bytes | bytearray):
        text = bytes(text[: RAW_PREVIEW * 4]).decode("utf-8", errors="replace")
    return text[:RAW_PREVIEW]


def _too_large(size: int, what: str = "row") -> RowError:
    return RowError("too_large", f"{what} is {size:,}+ bytes (limit {MAX_RECORD_BYTES:,})")


# ---------------------------------------------------------------------------------------------- paths


def _kind_of_mode(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def check_path(path: str | Path) -> str:
    """'file' or 'dir' for a readable regular file or folder; InputError for anything else.

    A FIFO or a device would block or never end (`/dev/zero`), so it is refused before anything opens it.
    """
    p = Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except PermissionError:
        raise InputError(f"{path}: permission denied") from None
    except OSError as e:
        raise InputError(f"{path}: cannot be read ({e.strerror or e})") from None
    if stat.S_ISDIR(st.st_mode):
        if not os.access(p, os.R_OK | os.X_OK):
            raise InputError(f"{path}: permission denied (folder cannot be listed)")
        return "dir"
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{path}: {_kind_of_mode(st.st_mode)}, not a regular file or folder")
    if not os.access(p, os.R_OK):
        raise InputError(f"{path}: permission denied")
    return "file"


def split_source(source: str) -> tuple[str, str | None]:
    """`data.json#train` -> ("data.json", "train") when data.json is a file; any other source -> (source, None)."""
    if SPLIT_SEP in source and not os.path.lexists(source):
        base, _, split = source.rpartition(SPLIT_SEP)
        if base and os.path.isfile(base):
            return base, split
    return source, None


def source_path(source: str) -> Path | None:
    """The local file or folder a source reads (None for a hub name): what the input hash covers."""
    base, _ = split_source(source)
    return Path(base) if os.path.lexists(base) else None


def _is_hf_disk(path: Path) -> bool:
    """A `save_to_disk` folder: a Dataset (state.json + dataset_info.json) or a DatasetDict (dataset_dict.json)."""
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file())


def _hf_splits(path: Path, split: str | None) -> list[str]:
    """A DatasetDict folder -> one source per split (its split folders); a Dataset folder -> itself."""
    if not (path / "dataset_dict.json").is_file():
        return [str(path)]
    import datasets

    try:
        dd = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 - datasets raises many types for a broken folder
        raise InputError(f"{path}: not a readable datasets folder ({type(e).__name__}: {e})") from None
    if not isinstance(dd, datasets.DatasetDict):
        return [str(path)]
    names = list(dd.keys())
    if split is not None:
        if split not in names:
            raise InputError(f"{path}: no split {split!r} (splits: {', '.join(names)})")
        names = [split]
    return [str(path / n) for n in names]


def _container_of(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    return _EXT.get(Path(name).suffix)


#: compressions curate does not read (gzip only)
_OTHER_COMPRESSION = (".bz2", ".xz", ".zst", ".zstd", ".lz4", ".zip", ".7z", ".br")


def _refuse_other_compression(path: Path) -> None:
    """A data file under a compression other than gzip (`train.jsonl.zst`) is an error, never skipped: a folder
    walk used to leave it out without a word."""
    name = path.name.lower()
    for ext in _OTHER_COMPRESSION:
        if name.endswith(ext) and Path(name[: -len(ext)]).suffix in _EXT:
            raise InputError(f"{path}: {ext} compression is not read; decompress it, or gzip it (.gz)")


def _walk(folder: Path) -> Iterator[Path]:
    """Data files and HF dataset folders under `folder`, sorted; an unreadable sub-folder is an error.

    Linked sub-folders are followed (a pool of links to datasets kept elsewhere was skipped without a word); a
    folder reached a second time (a link back up the tree, a second link to it) is read once.
    """
    def fail(e: OSError) -> None:
        raise InputError(f"{e.filename or folder}: permission denied (folder cannot be listed)"
                         if isinstance(e, PermissionError) else f"{e.filename or folder}: cannot be listed ({e})")

    found: list[Path] = []
    seen = {os.path.realpath(folder)}
    for root, dirs, files in os.walk(folder, onerror=fail, followlinks=True):
        r = Path(root)
        keep = []
        for d in sorted(dirs):
            sub = r / d
            if not os.access(sub, os.R_OK | os.X_OK):
                raise InputError(f"{sub}: permission denied (folder cannot be listed)")
            if os.path.realpath(sub) in seen:
                continue
            seen.add(os.path.realpath(sub))
            if _is_hf_disk(sub):
                found.append(sub)
            else:
                keep.append(d)
        dirs[:] = keep
        for f in files:
            _refuse_other_compression(r / f)
        found += [r / f for f in files if _container_of(r / f) is not None]
    return iter(sorted(found))


def expand_inputs(paths: list[str], split: str | None = None) -> list[str]:
    """Inputs -> sources: folders become their data files (sorted), DatasetDict folders and dict-of-splits JSON
    files one source per split (or only `split`); a hub name passes through. Every local path is checked here,
    so nothing unreadable is skipped silently."""
    out: list[str] = []
    for p in paths:
        path = Path(p)
        if not os.path.lexists(p) and split_source(p)[1] is None and _looks_like_hub(p):
            out.append(p)
            continue
        base, sp = split_source(p)
        if sp is not None:  # an explicit `file.json#split`
            check_path(base)
            out.append(p)
            continue
        kind = check_path(path)
        if kind == "dir" and _is_hf_disk(path):
            out.extend(_hf_splits(path, split))
        elif kind == "dir":
            files = list(_walk(path))
            if not files:
                raise InputError(f"{p}: folder has no .jsonl/.json/.parquet/.csv files")
            for f in files:
                if f.is_dir():
                    out.extend(_hf_splits(f, split))
                else:
                    check_path(f)
                    out.extend(_json_sources(str(f), split) if _container_of(f) == "json" else [str(f)])
        elif _container_of(path) == "json":
            out.extend(_json_sources(p, split))
        else:
            out.append(p)
    return out


def _looks_like_hub(name: str) -> bool:
    return "/" in name and not name.startswith((".", "/")) and Path(name).suffix == ""


def detect_container(path: str) -> str:
    """Name the container of `path` from its extension (or, for hub names, that it is one)."""
    base, sp = split_source(path)
    if sp is not None:
        return "json"
    p = Path(path)
    if not os.path.lexists(path) and _looks_like_hub(path):
        return "hf_hub"
    if check_path(p) == "dir":
        if _is_hf_disk(p):
            return "hf_disk"
        raise InputError(f"{path}: is a folder, not a dataset file")
    kind = _container_of(p)
    if kind is None:
        _refuse_other_compression(p)
        raise InputError(
            f"{path}: unknown file type {p.suffix!r}; use .jsonl, .json, .parquet, .csv or --container"
        )
    return kind


def iter_rows(path: str, container: str | None = None, split: str | None = None) -> Iterator[RawRow]:
    """Yield every row of `path` with its position; raise InputError if the file is unreadable."""
    kind = container or detect_container(path)
    if kind not in CONTAINERS:
        raise InputError(f"{path}: unknown container {kind!r}; expected one of {', '.join(CONTAINERS)}")
    base, sp = split_source(path)
    if kind != "hf_hub":
        check_path(base)
    try:
        if kind in ("jsonl", "json", "csv", "tsv"):
            _refuse_utf16(base)
        if kind == "jsonl":
            yield from _jsonl(base)
        elif kind == "json":
            yield from _json(base, sp)
        elif kind == "parquet":
            yield from _parquet(base)
        elif kind in ("csv", "tsv"):
            yield from _csv(base, "\t" if kind == "tsv" else ",")
        elif kind == "hf_disk":
            yield from _hf_disk(base, split)
        else:
            yield from _hf_hub(base, split)
    except InputError:
        raise
    except PermissionError:
        raise InputError(f"{path}: permission denied") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder, not a file") from None
    except (zlib.error, gzip.BadGzipFile, EOFError) as e:
        what = "corrupt or truncated gzip stream" if _is_gzip(base) else "truncated file"
        raise InputError(f"{path}: {what} ({type(e).__name__}: {e})") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except (OSError, MemoryError) as e:
        raise InputError(f"{path}: cannot be read ({type(e).__name__}: {e})") from None


def _refuse_utf16(path: str) -> None:
    """A UTF-16 text file (PowerShell's `>` writes one) is unreadable as a whole, not a file of bad rows: each
    of its lines used to be rejected as malformed JSON, under a wrong row count, and a folder run went on."""
    with _open_binary(path) as fh:
        head = fh.read(2)
    if head in (b"\xff\xfe", b"\xfe\xff"):
        raise InputError(f"{path}: UTF-16 text (byte-order mark {head.hex(' ')}); save it as UTF-8")


def _is_gzip(path: str) -> bool:
    """gzip by its name, or by its first bytes: a download saved as `data.jsonl` that is really gzip was read as
    lines of binary rejects."""
    if path.lower().endswith(".gz"):
        return True
    try:
        with open(path, "rb") as fh:
            return fh.read(2) == b"\x1f\x8b"
    except OSError:
        return False


def _open_binary(path: str) -> io.BufferedIOBase:
    if _is_gzip(path):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")


# ---------------------------------------------------------------------------------------------- JSON values

#: a run of 19+ digits: possibly an integer outside 64 bits, which orjson would turn into a float
_LONG_INT = re.compile(rb"\d{19,}")


def _exact_int(text: str) -> int | str:
    v = int(text)
    return v if -(2**63) <= v < 2**63 else text


def loads(data: bytes | str) -> Any:
    """orjson.loads, except that integers outside signed 64 bits stay exact, as text (never a float)."""
    value = orjson.loads(data)  # validates (strict JSON: no NaN, no lone surrogates, depth <= 1024)
    raw = data.encode() if isinstance(data, str) else data
    if _LONG_INT.search(raw):
        value = json.loads(raw, parse_int=_exact_int)
    return value


def _parse(data: bytes) -> Any:
    try:
        return loads(data)
    except orjson.JSONDecodeError as e:
        return RowError("malformed_json", f"invalid JSON: {e}")
    except RecursionError:
        return RowError("malformed_json", "invalid JSON: nested too deeply")


# ---------------------------------------------------------------------------------------------- JSONL


def _capped_lines(fh: Any, limit: int = MAX_RECORD_BYTES) -> Iterator[tuple[int, bytes | None, int, bytes, int]]:
    """(line number, line or None when over `limit`, size, head, quote count) for each physical line.

    An oversized line is never held whole: its rest is read and dropped in chunks (only its size and its
    number of double quotes are kept, which a CSV reader needs to stay in step).
    """
    lineno = 0
    while True:
        line = fh.readline(limit + 1)
        if not line:
            return
        lineno += 1
        if len(line) <= limit or line.endswith(b"\n"):
            yield lineno, line, len(line), b"", 0
            continue
        size, quotes, head = len(line), line.count(b'"'), line[: RAW_PREVIEW * 4]
        del line
        while True:
            chunk = fh.readline(1 << 20)
            if not chunk:
                break
            size += len(chunk)
            quotes += chunk.count(b'"')
            if chunk.endswith(b"\n"):
                break
        yield lineno, None, size, head, quotes


def _decode(line: bytes, lineno: int) -> str | RowError:
    if lineno == 1 and line.startswith(_BOM):
        line = line[3:]
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as e:
        return RowError("undecodable_bytes", f"not UTF-8 at byte {e.start}")


def _json_array_file(path: str) -> bool:
    """Whether a .jsonl file is one JSON array (pretty-printed, or all on its only line), which HF `datasets`
    reads too. An array on the first line with more lines after it stays JSON Lines (a row of the wrong type)."""
    with _open_binary(path) as fh:
        lines = (x for x in _capped_lines(fh) if x[1] is None or x[1].strip(_WS))
        first = next(lines, None)
        if first is None or not (first[1] or first[3]).removeprefix(_BOM).lstrip(_WS).startswith(b"["):
            return False
        if first[1] is None:  # a first line over the row limit that opens an array: the file is the array
            return True
        try:
            orjson.loads(first[1].removeprefix(_BOM))
        except orjson.JSONDecodeError:
            return True  # the array goes on over the next lines
        return next(lines, None) is None


def _jsonl(path: str) -> Iterator[RawRow]:
    if _json_array_file(path):  # its elements are the rows, numbered from 0 as in a .json array
        yield from _items(path, None)
        return
    with _open_binary(path) as fh:
        for lineno, line, size, head, _ in _capped_lines(fh):
            if line is None:
                yield RawRow(lineno, _too_large(size, "line"), _preview(head))
                continue
            text = _decode(line, lineno)
            if isinstance(text, RowError):
                yield RawRow(lineno, text, _preview(line))
                continue
            if not text.strip():
                continue  # blank lines are not rows
            yield RawRow(lineno, _parse(line[3:] if lineno == 1 and line.startswith(_BOM) else line),
                         _preview(text))


# ---------------------------------------------------------------------------------------------- JSON

#: outside strings: a whole string (one match, in C), or a structural byte; a lone '"' opens a string that
#: continues in the next chunk
_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{},:"]', re.S)
#: inside a string: everything up to (not including) the closing quote or a backslash that ends the chunk
_STR_PART = re.compile(rb'(?:[^"\\]|\\.)*', re.S)
_WS = b" \t\r\n"
_SURVEY = object()


def _scan(fh: Any, path: str, target: Any) -> Iterator[tuple]:
    """Byte-level scan of one JSON document, without parsing it.

    target None: yields ("item", bytes | None, size, head) for each element of the top-level array;
    target "key": the same for the array under that top-level key; target _SURVEY: yields ("member", key,
    first byte of its value) for each top-level member. Always first ("top", first byte) and, if something
    follows the top-level value, ("trailing", its 1-based line) and stops. An element over the row limit is
    yielded as None with its size and never held whole: memory stays within the row limit plus one read chunk.
    """
    depth = 0
    in_str = esc_pending = False
    top: int | None = None
    done = await_value = expect_key = False
    key_buf: bytearray | None = None
    key: str | None = None
    active = False
    item_depth = 1 if target is None else 2
    survey = target is _SURVEY
    buf = bytearray()
    over = False
    size = 0
    head = b""
    item_start = 0

    def finish(piece: bytes) -> tuple | None:
        nonlocal buf, over, size, head
        if over:
            item: tuple | None = ("item", None, size + len(piece), head)
        else:
            data = (bytes(buf) + piece if buf else piece).strip(_WS)
            if len(data) > MAX_RECORD_BYTES:
                item = ("item", None, len(data), data[: RAW_PREVIEW * 4])
            else:
                item = ("item", data, len(data), b"") if data else None
        buf, over, size, head = bytearray(), False, 0, b""
        return item

    def carry(piece: bytes) -> None:
        nonlocal buf, over, size, head
        if over:
            size += len(piece)
            return
        buf += piece
        if len(buf) > MAX_RECORD_BYTES:
            over, size, head = True, len(buf), bytes(buf[: RAW_PREVIEW * 4]).lstrip()
            buf = bytearray()

    def set_key(raw: bytes) -> str | None:
        try:
            return orjson.loads(b'"' + raw + b'"') if len(raw) <= 4096 else None
        except orjson.JSONDecodeError:
            return None

    first = True
    lines = 0  # newlines in the chunks before this one: the line of trailing data, for the message
    while True:
        chunk = fh.read(_CHUNK)
        if not chunk:
            break
        if first:
            first = False
            if chunk.startswith(_BOM):
                chunk = chunk[3:]
        pos, n = 0, len(chunk)
        item_start = 0
        while pos < n:
            if in_str:
                if esc_pending:
                    esc_pending = False
                    if key_buf is not None:
                        key_buf += chunk[pos:pos + 1]
                    pos += 1
                    continue
                e = _STR_PART.match(chunk, pos).end()  # type: ignore[union-attr]
                if key_buf is not None and len(key_buf) <= 4096:
                    key_buf += chunk[pos:e]
                if e >= n:
                    pos = n
                elif chunk[e] == 0x22:
                    in_str, pos = False, e + 1
                    if key_buf is not None:
                        key, key_buf = set_key(bytes(key_buf)), None
                else:  # a backslash ending the chunk: the escaped byte is the next chunk's first
                    if key_buf is not None:
                        key_buf += b"\\"
                    esc_pending, pos = True, n
                continue
            m = _TOKEN.search(chunk, pos)
            end = m.start() if m else n
            if depth <= 1 and end > pos and (top is None or done or await_value):
                text = chunk[pos:end].strip(_WS)
                if text:
                    if done:
                        at = pos + len(chunk[pos:end]) - len(chunk[pos:end].lstrip(_WS))
                        yield ("trailing", lines + chunk.count(b"\n", 0, at) + 1)
                        return
                    if top is None:
                        top = text[0]
                        yield ("top", top)
                    if await_value:
                        await_value = False
                        if survey:
                            yield ("member", key, text[0])
            if m is None:
                break
            pos = m.end()
            c = chunk[end]
            if done:
                yield ("trailing", lines + chunk.count(b"\n", 0, end) + 1)
                return
            if top is None:
                top = c
                yield ("top", top)
            if await_value:
                await_value = False
                if survey:
                    yield ("member", key, c)
                elif c == 0x5B and depth == 1 and target is not None and key == target:
                    active, item_start = True, pos
                    depth += 1
                    continue
            if c == 0x22:
                if pos - end == 1:  # a lone quote: the string goes on in the next chunk
                    in_str = True
                    if depth == 1 and top == 0x7B and expect_key:
                        key_buf, expect_key = bytearray(), False
                elif depth == 1 and top == 0x7B and expect_key:
                    key, expect_key = set_key(chunk[end + 1:pos - 1]), False
            elif c == 0x5B or c == 0x7B:
                if depth == 0:
                    if c == 0x5B and target is None:
                        active, item_start = True, pos
                    elif c == 0x7B:
                        expect_key = True
                depth += 1
            elif c == 0x5D or c == 0x7D:
                depth -= 1
                if depth < 0:
                    raise InputError(f"{path}: not valid JSON (unbalanced '{chr(c)}')")
                if active and depth == item_depth - 1:
                    item = finish(chunk[item_start:end])
                    if item is not None:
                        yield item
                    active = False
                if depth == 0:
                    done = True
            elif c == 0x2C:
                if active and depth == item_depth:
                    item = finish(chunk[item_start:end])
                    if item is not None:
                        yield item
                    item_start = pos
                if depth == 1 and top == 0x7B:
                    expect_key = True
            elif depth == 1 and top == 0x7B:  # ':'
                await_value = True
        if active:
            carry(chunk[item_start:])
        lines += chunk.count(b"\n")
    if top is None:
        return
    if in_str or depth != 0:
        raise InputError(f"{path}: not valid JSON (the file ends inside {'a string' if in_str else 'a value'}; "
                         "truncated?)")


def _not_rows(path: str) -> None:
    """Raise the right InputError for a .json file whose top level is neither a list nor an object."""
    with _open_binary(path) as fh:
        data = fh.read(MAX_RECORD_BYTES + 1)
    try:
        value = orjson.loads(data.removeprefix(_BOM))
    except orjson.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None
    raise InputError(f"{path}: top-level JSON is a {type(value).__name__}, expected a list of rows")


def _json_layout(path: str) -> tuple[str, Any]:
    """How a .json file holds its rows, from one scan: ("array", None), ("splits", [keys]), ("wrapper", key),
    ("object", None) for a single row, ("jsonl", None) for JSON Lines named .json, ("empty", None)."""
    with _open_binary(path) as fh:
        members: list[tuple[str | None, int]] = []
        top = None
        for ev in _scan(fh, path, _SURVEY):
            if ev[0] == "top":
                top = ev[1]
                if top == 0x5B:
                    return "array", None
                if top != 0x7B:
                    _not_rows(path)
            elif ev[0] == "member":
                members.append((ev[1], ev[2]))
            elif ev[0] == "trailing":
                return "jsonl", None
    if top is None:
        return "empty", None
    from curate.io.formats import FORMATS

    keys = {k for k, _ in members}
    if any(all(k in keys for k in f.keys) for f in FORMATS):  # one row with a list field (tags, instances)
        return "object", None
    lists = [k for k, b in members if b == 0x5B]
    if len(members) >= 2 and len(lists) == len(members) and not (set(lists) & _ROW_LIST_KEYS) and \
            all(isinstance(k, str) for k in lists):
        return "splits", list(dict.fromkeys(lists))
    if len(lists) == 1 and lists[0] not in _ROW_LIST_KEYS and isinstance(lists[0], str):
        return "wrapper", lists[0]
    return "object", None


def _json_sources(path: str, split: str | None) -> list[str]:
    """A .json file -> its sources: itself, or `path#split` per split of a dict-of-splits file."""
    try:
        layout, keys = _json_layout(path)
    except InputError:
        return [path]  # reported when the file is read, with the rows before the error kept
    except (zlib.error, gzip.BadGzipFile, EOFError, OSError):
        return [path]
    if layout != "splits":
        return [path]
    if split is not None:
        if split not in keys:
            raise InputError(f"{path}: no split {split!r} (splits: {', '.join(keys)})")
        keys = [split]
    return [f"{path}{SPLIT_SEP}{k}" for k in keys]


def _items(path: str, target: Any) -> Iterator[RawRow]:
    i = 0
    with _open_binary(path) as fh:
        for ev in _scan(fh, path, target):
            if ev[0] == "trailing":  # e.g. a second array: its rows would be lost without a word
                raise InputError(f"{path}: not valid JSON (more data after the top-level value, at line {ev[1]}; "
                                 "a JSON file holds one document, JSON Lines one object per line)")
            if ev[0] != "item":
                continue
            _, data, size, head = ev
            if data is None:
                yield RawRow(i, _too_large(size), _preview(head))
            else:
                yield RawRow(i, _parse(data), _preview(data))
            i += 1


def _json(path: str, split: str | None = None) -> Iterator[RawRow]:
    if split is not None:
        yield from _items(path, split)
        return
    layout, key = _json_layout(path)
    if layout == "empty":
        return
    if layout == "array":
        yield from _items(path, None)
    elif layout == "jsonl":  # a .json file that is really JSON Lines is common
        yield from _jsonl(path)
    elif layout == "wrapper":  # {"data": [...]}: the single list-valued field holds the rows
        yield from _items(path, key)
    elif layout == "splits":  # read whole (sources normally name one split each: expand_inputs)
        for k in key:
            yield from _items(path, k)
    else:  # one object: one row
        with _open_binary(path) as fh:
            data = fh.read(MAX_RECORD_BYTES + 1)
            if len(data) > MAX_RECORD_BYTES:
                size = len(data)
                while chunk := fh.read(1 << 20):
                    size += len(chunk)
                yield RawRow(0, _too_large(size), _preview(data))
                return
        if data.startswith(_BOM):
            data = data[3:]
        yield RawRow(0, _parse(data), _preview(data))


# ---------------------------------------------------------------------------------------------- Parquet, HF


def _dumps(item: Any) -> bytes:
    return orjson.dumps(item, default=str, option=orjson.OPT_NON_STR_KEYS)


def _parquet(path: str) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        meta = pf.metadata
        biggest = max((meta.row_group(g).total_byte_size / max(meta.row_group(g).num_rows, 1)
                       for g in range(meta.num_row_groups)), default=1)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for corrupt files
        raise InputError(f"{path}: not a readable Parquet file ({e})") from None
    batch = int(max(1, min(10_000, (64 << 20) // max(biggest, 1))))  # ~64 MB of rows per batch
    i = 0
    batches = pf.iter_batches(batch_size=batch)
    while True:
        try:
            b = next(batches)
        except StopIteration:
            return
        except Exception as e:  # noqa: BLE001
            raise InputError(f"{path}: corrupt Parquet data after row {i} ({type(e).__name__}: {e})") from None
        try:
            items = b.to_pylist()
        except (UnicodeDecodeError, ValueError):  # damaged string data: find the rows, keep the others
            items = []
            for j in range(b.num_rows):
                try:
                    items.append(b.slice(j, 1).to_pylist()[0])
                except (UnicodeDecodeError, ValueError) as e:
                    items.append(RowError("undecodable_bytes", f"column data is not valid ({e})"))
        for item in items:
            if isinstance(item, RowError):
                yield RawRow(i, item, "")
            else:
                raw = _dumps(item)
                yield RawRow(i, _too_large(len(raw)) if len(raw) > MAX_RECORD_BYTES else item, _preview(raw))
            i += 1


def _iter_dataset(ds: Any) -> Iterator[RawRow]:
    for i, item in enumerate(ds):
        raw = _dumps(item)
        yield RawRow(i, _too_large(len(raw)) if len(raw) > MAX_RECORD_BYTES else dict(item), _preview(raw))


def _hf_disk(path: str, split: str | None = None) -> Iterator[RawRow]:
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except Exception as e:  # noqa: BLE001
        raise InputError(f"{path}: not a readable datasets folder ({type(e).__name__}: {e})") from None
    if isinstance(ds, datasets.DatasetDict):  # expand_inputs normally gives one source per split
        names = [split] if split is not None else list(ds.keys())
        for n in names:
            if n not in ds:
                raise InputError(f"{path}: no split {n!r} (splits: {', '.join(ds.keys())})")
        if len(names) > 1:
            raise InputError(f"{path}: a DatasetDict with splits {', '.join(names)}; give the folder of one "
                             "split, or --split")
        ds = ds[names[0]]
    yield from _iter_dataset(ds)


def _hf_hub(name: str, split: str | None = None) -> Iterator[RawRow]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split or "train", streaming=True)
    except Exception as e:  # noqa: BLE001
        raise InputError(f"{name}: not a local file, and the hub dataset could not be loaded ({e})") from None
    yield from _iter_dataset(ds)


# ---------------------------------------------------------------------------------------------- CSV


class _CsvLines:
    """Decoded lines for csv.reader, each record capped at the row limit.

    Lines beyond a record's limit (or one oversized line) are replaced by a line holding only their quote
    parity, so the csv parser stays in step while the content is dropped; the record is then flagged
    too_large. A line that is not UTF-8 is decoded with replacement and its record flagged undecodable_bytes.
    """

    def __init__(self, fh: Any) -> None:
        self._lines = _capped_lines(fh)
        self.line = 0
        self.record_bytes = 0
        self.flag: RowError | None = None
        self.head = b""

    def reset(self) -> None:
        self.record_bytes, self.flag, self.head = 0, None, b""

    def __iter__(self) -> _CsvLines:
        return self

    def __next__(self) -> str:
        lineno, line, size, head, quotes = next(self._lines)
        self.line = lineno
        if line is not None and lineno == 1 and line.startswith(_BOM):
            line = line[3:]
        if line is None or self.record_bytes + size > MAX_RECORD_BYTES:
            if line is not None:
                quotes, head = line.count(b'"'), line[: RAW_PREVIEW * 4]
            self.record_bytes += size
            if self.flag is None or self.flag.reason != "too_large":
                self.flag = _too_large(self.record_bytes)
                self.head = self.head or head
            return '"' * (quotes % 2) + "\n"
        self.record_bytes += size
        if not self.head:
            self.head = line[: RAW_PREVIEW * 4]
        try:
            return line.decode("utf-8")
        except UnicodeDecodeError as e:
            if self.flag is None:
                self.flag = RowError("undecodable_bytes", f"not UTF-8 at byte {e.start} of line {lineno}")
            return line.decode("utf-8", errors="replace")


def _csv(path: str, delimiter: str) -> Iterator[RawRow]:
    csv.field_size_limit(2 * MAX_RECORD_BYTES)  # never reached: _CsvLines caps every record first
    with _open_binary(path) as fb:
        lines = _CsvLines(fb)
        reader = csv.reader(lines, delimiter=delimiter, strict=True)
        try:
            header = next(reader, None)
            if header is None:
                return
            if lines.flag is not None:
                raise InputError(f"{path}: header line unusable ({lines.flag.detail})")
            lines.reset()
            start = lines.line + 1
            for fields in reader:
                lineno, flag, head = start, lines.flag, lines.head
                start = lines.line + 1
                lines.reset()
                if flag is not None:  # before the blank-line test: a dropped line reads as blank
                    yield RawRow(lineno, flag, _preview(head))
                elif not fields:
                    continue  # blank line
                elif len(fields) > len(header):
                    err = RowError("malformed_csv", "row has more fields than the header")
                    yield RawRow(lineno, err, _preview(str(fields)))
                else:
                    item = dict(zip(header, fields, strict=False))
                    for k in header[len(fields):]:
                        item[k] = None
                    yield RawRow(lineno, item, _preview(str(item)))
        except csv.Error as e:
            raise InputError(f"{path}: malformed CSV at line {lines.line} ({e})") from None
