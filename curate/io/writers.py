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

import os
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
        for stale in self.path.parent.glob(f".{self.path.name}.parts.*"):  # left by a killed run (one run per folder)
            shutil.rmtree(stale, ignore_errors=True)
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

#: LLaMA-Factory `dataset_info.json` entries (its data/README.md): without `system` and `history` in
#: `columns`, LLaMA-Factory reads an Alpaca file as single-turn with no system prompt.
_LF_ROLE_TAGS = {"user_tag": "user", "assistant_tag": "assistant", "system_tag": "system"}
LLAMAFACTORY_ENTRIES: dict[str, dict[str, Any]] = {
    "parquet": {"formatting": "sharegpt", "columns": {"messages": "messages"},
                "tags": {"role_tag": "role", "content_tag": "content", **_LF_ROLE_TAGS}},
    "alpaca": {"formatting": "alpaca", "columns": {"prompt": "instruction", "query": "input", "response": "output",
                                                   "system": "system", "history": "history"}},
    "sharegpt": {"formatting": "sharegpt", "columns": {"messages": "conversations"},
                 "tags": {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                          "system_tag": "system"}},
}
CARD_MARK = "<!-- dataset card written by `curate export`; it rewrites this file, so edit a copy -->"


def _pairs(turns: list[dict[str, str]]) -> list[tuple[str, str]]:
    """(user, assistant) pairs; consecutive turns of one role are joined (Alpaca has no other way to hold them)."""
    blocks: list[list[str]] = []
    for m in turns:
        if blocks and blocks[-1][0] == m["role"]:
            blocks[-1][1] += "\n\n" + m["content"]
        else:
            blocks.append([m["role"], m["content"]])
    if blocks and blocks[0][0] == "assistant":
        blocks.insert(0, ["user", ""])
    return [(blocks[i][1], blocks[i + 1][1]) for i in range(0, len(blocks) - 1, 2)]


def _alpaca(messages: list[dict[str, str]]) -> dict:
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else ""
    pairs = _pairs([m for m in messages if m["role"] != "system"])
    last_user, last_answer = pairs[-1]
    # system and history always present, so every row has the same keys (one schema for `datasets`)
    return {"instruction": last_user, "input": "", "output": last_answer, "system": system,
            "history": [list(p) for p in pairs[:-1]]}


def _sharegpt(messages: list[dict[str, str]]) -> dict:
    return {"conversations": [{"from": _SHAREGPT_FROM[m["role"]], "value": m["content"]} for m in messages]}


def export(parquet: str | Path, fmt: str, out: str | Path, *, handoff: bool = True) -> Path:
    """Write `parquet`'s `messages` (plus curate's `id` and the user's `meta`) as `fmt` JSONL to `out`, atomically.

    handoff: also write `dataset_info.json` and the dataset card next to `out` (see `write_handoff`).
    """
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose from {EXPORT_FORMATS}")
    convert = _alpaca if fmt == "alpaca" else _sharegpt
    out = Path(out)
    # glob=False (and pyarrow's schema): a '[' in a folder name is not a file pattern
    cols = ["id", "messages", *([META] if META in pq.read_schema(parquet).names else [])]
    df = pl.read_parquet(parquet, columns=cols, glob=False)
    with atomic_path(out) as tmp, open(tmp, "wb") as fh:
        for row in df.iter_rows(named=True):
            rec = {"id": row["id"], **convert(row["messages"])}
            if row.get(META) is not None:
                rec[META] = row[META]
            fh.write(orjson.dumps(rec, default=str) + b"\n")
    if handoff:
        write_handoff(parquet, out.parent, exports={fmt: out})
    return out


def _rel(path: Path, base: Path) -> str:
    return Path(os.path.relpath(path.resolve(), base.resolve())).as_posix()


def _exports_in(folder: Path, parquet: Path, exports: dict[str, Path] | None = None) -> dict[str, Path]:
    """The files a trainer can read: the Parquet, the JSONL exports just written (`exports`), and exports with
    the default names already in `folder`."""
    found = {"parquet": parquet}
    stem = parquet.name.removesuffix(".parquet")
    for fmt in EXPORT_FORMATS:
        if exports and fmt in exports:
            found[fmt] = Path(exports[fmt])
        elif (folder / f"{stem}.{fmt}.jsonl").exists():
            found[fmt] = folder / f"{stem}.{fmt}.jsonl"
    return found


def _json_object(path: Path, fix: str) -> dict[str, Any]:
    """An existing JSON object file ({} when absent): dataset_info.json (often the user's own, e.g. LLaMA-Factory's
    `data/`) or the run's manifest. A file that is not one is named with the cause and `fix` (it used to be a bare
    parser message without the file, or an internal error)."""
    if not path.exists():
        return {}
    try:
        value = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); {fix}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: a JSON {type(value).__name__}, expected an object; {fix}")
    return value


def write_dataset_info(parquet: str | Path, folder: str | Path, exports: dict[str, Path] | None = None) -> Path:
    """Add (or refresh) LLaMA-Factory entries for the subset's files to `folder`/dataset_info.json.

    Entries are named after the Parquet's stem (`selected`, `selected_alpaca`, `selected_sharegpt`); other
    entries already in the file are kept. Use: `dataset_dir: <folder>`, `dataset: selected`.
    """
    parquet, folder = Path(parquet), Path(folder)
    path = folder / "dataset_info.json"
    info = _json_object(path, "fix or remove it (curate adds its entries to it)")
    stem = parquet.name.removesuffix(".parquet")
    for fmt, file in _exports_in(folder, parquet, exports).items():
        name = stem if fmt == "parquet" else f"{stem}_{fmt}"
        info[name] = {"file_name": _rel(file, folder), **LLAMAFACTORY_ENTRIES[fmt]}
    with atomic_path(path) as tmp:
        tmp.write_bytes(orjson.dumps(info, option=orjson.OPT_INDENT_2) + b"\n")
    return path


def _size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                        (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M")):
        if n < limit:
            return name
    return "10M<n<100M"


def _md(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def dataset_card(parquet: str | Path, folder: str | Path, *, exports: dict[str, Path] | None = None,
                 license: str | None = None, license_note: str | None = None) -> str:
    """A Hugging Face dataset card (README.md) for the subset: sources, recipe, counts, license, how to load."""
    import yaml

    parquet, folder = Path(parquet), Path(folder)
    manifest_path = parquet.parent / "manifest.json"
    m = _json_object(manifest_path, "the dataset card needs the run's counts: re-run `curate select`")
    sel = pl.read_parquet(parquet, columns=["source"], glob=False)
    files = _exports_in(folder, parquet, exports)
    # `datasets` (and the Hub viewer) picks one builder for every config, from the first config's files: a JSONL
    # export listed as a config fails to load (Parquet magic bytes not found), so only the Parquet is a config
    configs = [{"config_name": "default", "data_files": [{"split": "train", "path": _rel(parquet, folder)}]}]
    head = {"license": license or "unknown", **({"license_note": license_note} if license_note else {}),
            "task_categories": ["text-generation"],
            "tags": ["curate", "instruction-tuning", "sft"], "size_categories": [_size_category(sel.height)],
            "configs": configs}
    cfg = m.get("config", {})
    sel_cfg, score_cfg = cfg.get("select", {}), cfg.get("score", {})
    inputs = m.get("inputs", {})
    n_in = m.get("totals", {}).get("input_rows", sum(e.get("rows", 0) for e in inputs.values()))
    name = cfg.get("name") if cfg.get("name") not in (None, "run") else parquet.parent.name
    budget = next((f"{v} {unit}" for k, unit in (("budget", "rows"), ("fraction", "of the pool"),
                                                 ("budget_tokens", "tokens")) if (v := sel_cfg.get(k)) is not None),
                  "none")
    lines = ["---", yaml.safe_dump(head, sort_keys=False).rstrip(), "---", CARD_MARK, "",
             f"# {name}: a curated instruction-tuning subset", "",
             f"{sel.height:,} conversations selected by curate from {n_in:,} input rows "
             f"in {len(inputs)} source file(s): strategy `{sel_cfg.get('strategy', '?')}`, budget {budget}, "
             f"scorers {', '.join(f'`{s}`' for s in score_cfg.get('scorers', [])) or 'none'}.", "",
             "## License", ""]
    if license:
        lines.append(f"`{license}`." + (f" {license_note}" if license_note else ""))
    else:
        lines.append("Not stated. The subset inherits the terms of its source files below; set them with "
                     "`curate export RUN --license ID --license-note TEXT`." + (f" {license_note}" if license_note
                                                                                 else ""))
    per_source = dict(sel.group_by("source").len().iter_rows())
    lines += ["", "## Source files", "", "| file | sha256 | rows read | rejected | duplicates | selected |",
              "|---|---|---:|---:|---:|---:|"]
    for path, e in inputs.items():
        lines.append(f"| {_md(path)} | `{str(e.get('sha256', ''))[:16]}` | {e.get('rows', 0):,} | "
                     f"{sum(e.get('rejected', {}).values()):,} | {e.get('duplicates', 0):,} | "
                     f"{per_source.get(path, 0):,} |")
    lines += ["", "## Counts", "", "| outcome (reason) | rows |", "|---|---:|", f"| input rows | {n_in:,} |"]
    for reason, n in sorted(m.get("totals", {}).get("reasons", {}).items()):
        lines.append(f"| {_md(reason)} | {n:,} |")
    lines += ["", "Every input row has exactly one outcome with a reason in the run's `decisions.parquet`.",
              "", "## Files", "", "| file | format | load with |", "|---|---|---|"]
    how = {"parquet": "`datasets.load_dataset(\"parquet\", ...)`; TRL `SFTTrainer` reads `messages` as is",
           "alpaca": "LLaMA-Factory (`dataset_info.json` entry with `system` and `history`); "
                     "`datasets.load_dataset(\"json\", data_files=...)`",
           "sharegpt": "LLaMA-Factory, FastChat, axolotl (`conversations` with `from`/`value`); "
                       "`datasets.load_dataset(\"json\", data_files=...)`"}
    fmt_name = {"parquet": "Parquet, OpenAI `messages`", "alpaca": "Alpaca JSONL", "sharegpt": "ShareGPT JSONL"}
    for fmt, f in files.items():
        lines.append(f"| `{_rel(f, folder)}` | {fmt_name[fmt]} | {how[fmt]} |")
    lines += ["", "LLaMA-Factory: `dataset_dir: <this folder>` and `dataset: "
              f"{parquet.name.removesuffix('.parquet')}` (entries in `dataset_info.json`).", "",
              "Columns: `messages` (the conversation), `id` (curate's content hash), `meta` (each source row's own "
              "fields, e.g. its original `id`, when it had any), `source` and `row` (where it came from), "
              "scores and `cluster`.", "",
              "## Recipe", "", "```yaml",
              yaml.safe_dump({k: v for k, v in cfg.items() if k not in ("out",)}, sort_keys=False).rstrip(),
              "```", ""]
    versions = m.get("versions", {})
    if versions:
        lines += [f"Made with curate {versions.get('curate', '')} on {m.get('created', '?')}.", ""]
    return "\n".join(lines)


def _card_license(card: str) -> tuple[str | None, str | None]:
    import yaml

    try:
        head = yaml.safe_load(card.split("---")[1]) or {}
    except (IndexError, yaml.YAMLError):
        return None, None
    lic = head.get("license")
    note = head.get("license_note")
    return (lic if lic and lic != "unknown" else None), note


def write_handoff(parquet: str | Path, folder: str | Path, *, exports: dict[str, Path] | None = None,
                  license: str | None = None, license_note: str | None = None) -> tuple[list[Path], list[str]]:
    """dataset_info.json + README.md (dataset card) in `folder`; a README.md curate did not write is kept.

    Returns (files written, notes for the user).
    """
    folder = Path(folder)
    written, notes = [write_dataset_info(parquet, folder, exports)], []
    readme = folder / "README.md"
    old = readme.read_text(errors="replace") if readme.exists() else ""
    if old and CARD_MARK not in old:
        notes.append(f"{readme} exists and was not written by curate: dataset card not written")
    else:
        if license is None and old:  # a re-export without --license keeps the license given before
            license, license_note = _card_license(old)
        text = dataset_card(parquet, folder, exports=exports, license=license, license_note=license_note)
        with atomic_path(readme) as tmp:
            tmp.write_text(text)
        written.append(readme)
    return written, notes
