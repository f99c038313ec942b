"""Writers: the ingest tables whose `meta` column varies with the input, and exports of a selected subset.

`PartedParquet` writes rows in chunks while each chunk's `meta` struct (the user's own columns) may have its
own fields and types; `close` merges the parts under one `meta` type from `unify_meta`, so no column and no
value is lost when files disagree (a field that is a number in one file and text in another becomes text).

Exports, for trainers that do not read Parquet with `messages`:

Alpaca JSONL: instruction/input/output (+ system) — single-turn only; a multi-turn row keeps its last turn and
folds earlier turns into `history` (LLaMA-Factory's alpaca `history` field: [[user, assistant], ...]).
ShareGPT JSONL: conversations [{from: human|gpt|system, value}], any number of turns.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any

import orjson
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from curate.run import atomic_path
from curate.schema import META

# ---------------------------------------------------------------- tables with the user's own columns


def _json_text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return orjson.dumps(value, default=str).decode()


def _writable(t: pa.DataType) -> bool:
    """Parquet cannot store a struct with no fields (e.g. a user column holding `{}`)."""
    if pa.types.is_struct(t):
        return t.num_fields > 0 and all(_writable(f.type) for f in t)
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return _writable(t.value_type)
    if pa.types.is_map(t):
        return _writable(t.key_type) and _writable(t.item_type)
    return True


def meta_array(metas: list[dict[str, Any] | None]) -> pa.StructArray | None:
    """One chunk's `meta` values as a struct array (None when no row has any); a field whose values Arrow
    cannot hold in one type (e.g. 1 and "a") is kept as JSON text."""
    if all(m is None for m in metas):
        return None
    try:
        arr = pa.array(metas)
        if _writable(arr.type):
            return arr
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError):
        pass
    keys = list(dict.fromkeys(k for m in metas if m for k in m))
    children, fields = [], []
    for k in keys:
        values = [m.get(k) if m else None for m in metas]
        try:
            child = pa.array(values)
            if not _writable(child.type):
                raise pa.ArrowInvalid("not writable")
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError):
            child = pa.array([_json_text(v) for v in values], pa.string())
        children.append(child)
        fields.append(pa.field(k, child.type))
    mask = pa.array([m is None for m in metas], pa.bool_())
    return pa.StructArray.from_arrays(children, fields=fields, mask=mask)


def _unify_type(types: list[pa.DataType]) -> pa.DataType:
    types = list(dict.fromkeys(t for t in types if not pa.types.is_null(t)))
    if not types:
        return pa.null()
    if len(types) == 1:
        return types[0]
    if all(pa.types.is_struct(t) for t in types):
        return unify_meta(types) or pa.null()
    if all(pa.types.is_integer(t) for t in types):
        return pa.int64()
    if all(pa.types.is_integer(t) or pa.types.is_floating(t) for t in types):
        return pa.float64()
    return pa.string()


def unify_meta(types: list[pa.DataType], only: list[pa.DataType] | None = None) -> pa.StructType | None:
    """One struct type holding every field of `types` (first-seen order); None when there is no field.

    `only`: keep just the fields that occur in these types (typed as unified over all `types`), so two tables
    (records and rejects) get types that agree on every field they share and can be concatenated.
    """
    by_name: dict[str, list[pa.DataType]] = {}
    for t in types:
        for f in t:
            by_name.setdefault(f.name, []).append(f.type)
    keep = None if only is None else {f.name for t in only for f in t}
    fields = [pa.field(name, _unify_type(ts)) for name, ts in by_name.items() if keep is None or name in keep]
    return pa.struct(fields) if fields else None


def _conform(arr: pa.Array, t: pa.DataType) -> pa.Array:
    if arr.type == t:
        return arr
    if pa.types.is_null(arr.type):
        return pa.nulls(len(arr), t)
    if pa.types.is_struct(t) and pa.types.is_struct(arr.type):
        return conform_meta(arr, t)
    nested = pa.types.is_nested(arr.type)
    if not nested and (pa.types.is_string(t) or pa.types.is_integer(t) or pa.types.is_floating(t)):
        try:
            return arr.cast(t)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            pass
    return pa.array([_json_text(v) for v in arr.to_pylist()], pa.string())


def conform_meta(arr: pa.StructArray | None, t: pa.StructType, n: int | None = None) -> pa.StructArray:
    """Cast one part's `meta` to the unified type: missing fields become nulls, clashing ones text."""
    if arr is None:
        return pa.nulls(n or 0, t)
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    children = dict(zip([f.name for f in arr.type], arr.flatten(), strict=True))
    out = [_conform(children[f.name], f.type) if f.name in children else pa.nulls(len(arr), f.type) for f in t]
    return pa.StructArray.from_arrays(out, fields=list(t), mask=arr.is_null())


class PartedParquet:
    """Write `schema` rows (+ each row's optional `meta` dict) in chunks; `close(meta_type)` merges them."""

    def __init__(self, path: str | Path, schema: pa.Schema):
        self.path, self.schema = Path(path), schema
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(dir=self.path.parent, prefix=f".{self.path.name}.parts."))
        self.parts: list[Path] = []
        self.meta_types: list[pa.DataType] = []

    def write(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        table = pa.Table.from_pylist(rows, self.schema)
        meta = meta_array([r.get(META) for r in rows])
        if meta is not None:
            table = table.append_column(META, meta)
            self.meta_types.append(meta.type)
        part = self.dir / f"{len(self.parts):06d}.parquet"
        pq.write_table(table, part, compression="snappy")
        self.parts.append(part)

    def close(self, meta_type: pa.StructType | None) -> Path:
        """Write the final file (with `meta` only when some row has it), atomically; drop the parts."""
        schema = self.schema if meta_type is None else self.schema.append(pa.field(META, meta_type))
        with atomic_path(self.path) as tmp, pq.ParquetWriter(tmp, schema, compression="zstd") as w:
            for part in self.parts:
                t = pq.read_table(part)
                if meta_type is not None:
                    m = t.column(META) if META in t.column_names else None
                    t = t.select(self.schema.names).append_column(META, conform_meta(m, meta_type, t.num_rows))
                w.write_table(t)
        shutil.rmtree(self.dir, ignore_errors=True)
        return self.path

    def __enter__(self) -> PartedParquet:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


# ---------------------------------------------------------------- exports

EXPORT_FORMATS = ("alpaca", "sharegpt")
_SHAREGPT_FROM = {"user": "human", "assistant": "gpt", "system": "system"}


def _alpaca(messages: list[dict[str, str]]) -> dict:
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else ""
    turns = [m for m in messages if m["role"] != "system"]
    pairs = [(turns[i]["content"], turns[i + 1]["content"]) for i in range(0, len(turns) - 1, 2)]
    last_user, last_answer = pairs[-1]
    row = {"instruction": last_user, "input": "", "output": last_answer}
    if system:
        row["system"] = system
    if len(pairs) > 1:
        row["history"] = [list(p) for p in pairs[:-1]]
    return row


def _sharegpt(messages: list[dict[str, str]]) -> dict:
    return {"conversations": [{"from": _SHAREGPT_FROM[m["role"]], "value": m["content"]} for m in messages]}


def export(parquet: str | Path, fmt: str, out: str | Path) -> Path:
    """Write `parquet`'s `messages` (plus `id`) as `fmt` JSONL to `out`, atomically."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose from {EXPORT_FORMATS}")
    convert = _alpaca if fmt == "alpaca" else _sharegpt
    out = Path(out)
    df = pl.read_parquet(parquet, columns=["id", "messages"])
    with atomic_path(out) as tmp, open(tmp, "wb") as fh:
        for rid, messages in df.iter_rows():
            fh.write(orjson.dumps({"id": rid, **convert(messages)}) + b"\n")
    return out
