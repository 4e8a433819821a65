"""Users' task data -> a validated `datasets.Dataset` with columns id, input[, target].

Sources: a .jsonl / .json / .csv / .parquet file, a directory written by `Dataset.save_to_disk`, a local
dataset directory or a hub name for `datasets.load_dataset`. Every row is checked the same way: a
missing field or a malformed line is an error (`DataError`, a `ConfigError`: the CLI reports it as one line,
exit 2) that names the file, line, the recipe key (`data.input_field`, ...) and what to change; an empty
input or target is skipped and counted in the `LoadReport` (which the pipeline prints and logs), never
dropped silently. JSONL is parsed line by line so that errors can point at the exact line.

Text files (JSONL, JSON, CSV) are UTF-8, with or without a byte-order mark (Excel's "CSV UTF-8" writes one; it is
not part of the first column's name). A byte that is not UTF-8 is a `DataError` naming the file, the line and
column it is on and what to do (re-save as UTF-8), never a decoder traceback with a byte offset. Lines are
counted as an editor shows them, from 1 (a CRLF or a lone CR ends a line too). CSV is read with the standard
`csv` module, all fields as text, the first non-blank line naming the columns; blank lines are not records; a
record may span lines (a quoted newline), and its errors name the line where it starts; malformed quoting
(a quote never closed), a record with more fields than the header and a column named twice are errors, a
record with fewer fields has the missing ones empty.

`check_data_files` is the preflight: every file the recipe's data section names exists and its first rows
have the recipe's fields. It reads a few rows with the standard library (pyarrow for Parquet), so the CLI runs
it before torch, datasets or pandas load; those are imported inside the functions that load whole splits.
"""

from __future__ import annotations

import codecs
import csv
import itertools
import json
import math
import numbers
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from dskd.config import ConfigError, DataConfig

if TYPE_CHECKING:  # heavy (datasets ~3 s): imported where whole splits are loaded
    import datasets

FILE_FORMATS = (".jsonl", ".json", ".csv", ".parquet")
SPLITS = ("labeled", "unlabeled", "dev", "test")
PEEK_ROWS = 5  # rows the preflight reads from each file
TEXT_ENCODING = "utf-8-sig"  # UTF-8; a leading byte-order mark is dropped, not read as text
CSV_FIELD_LIMIT = 2**31 - 1  # characters: the csv module's default (128 KiB) would reject long documents
_KEYS = {"input": "data.input_field", "target": "data.target_field", "id": "data.id_field"}


class DataError(ConfigError):
    """Bad task data; the message says where (file:line or dataset/key) and what to do. A user error like a
    bad recipe (a `ConfigError`, hence also a `ValueError`)."""


@dataclass
class LoadReport:
    split: str
    source: str
    read: int = 0
    kept: int = 0
    skipped_empty_target: int = 0
    skipped_empty_input: int = 0

    def as_metrics(self) -> dict[str, int]:
        prefix = f"data/{self.split}"
        return {f"{prefix}/read": self.read, f"{prefix}/kept": self.kept,
                f"{prefix}/skipped_empty_target": self.skipped_empty_target,
                f"{prefix}/skipped_empty_input": self.skipped_empty_input}


@dataclass(frozen=True)
class _Fields:
    input: str
    target: str | None
    id: str | None

    def named(self) -> list[tuple[str, str]]:
        """(role, field name) of the fields every row must have."""
        return [(role, name) for role, name in (("input", self.input), ("target", self.target), ("id", self.id))
                if name is not None]

    def example(self) -> str:
        """One JSON line with these fields, for messages."""
        return "{" + ", ".join(f'"{name}": ...' for _, name in self.named()) + "}"


def load_split(source: str, *, split: str, input_field: str = "input", target_field: str | None = "target",
               hf_split: str | None = None, hf_config: str | None = None, max_examples: int | None = None,
               id_field: str | None = None) -> tuple[datasets.Dataset, LoadReport]:
    """Load one split (`split` names it in ids, errors and metrics; `hf_split` picks it from a DatasetDict).

    Unlabeled splits pass target_field=None. Ids come from `id_field`, else f"{split}-{row}" (row counted
    from 0 over all rows read, so ids stay the same when empty rows are skipped).
    """
    import datasets

    fields = _Fields(input_field, target_field, id_field)
    report = LoadReport(split=split, source=str(source))
    ids: list[str] = []
    inputs: list[str] = []
    targets: list[str] = []
    first_row_of_id: dict[str, str] = {}
    for where, row_number, row in _rows(str(source), split, hf_split, hf_config, fields):
        if max_examples is not None and report.kept >= max_examples:
            break
        report.read += 1
        text_in, text_out = _check_row(row, fields, where)
        if not text_in.strip():
            report.skipped_empty_input += 1
            continue
        if target_field is not None and not text_out.strip():
            report.skipped_empty_target += 1
            continue
        example_id = _text(row[id_field], id_field, where).strip() if id_field else f"{split}-{row_number}"
        if not example_id:
            raise DataError(f"{where}: empty id in field '{id_field}'; every example needs an id")
        if example_id in first_row_of_id:
            raise DataError(f"{where}: duplicate id {example_id!r} (first seen at {first_row_of_id[example_id]}); "
                            f"ids in '{id_field}' must be unique because pseudo-targets are joined on them")
        first_row_of_id[example_id] = where
        ids.append(example_id)
        inputs.append(text_in)
        if target_field is not None:
            targets.append(text_out)
        report.kept += 1
    if report.kept == 0:
        raise DataError(f"{source}: no usable examples for split '{split}' ({report.read} read, "
                        f"{report.skipped_empty_input} with empty input, {report.skipped_empty_target} with "
                        f"empty target); check the file and the field names")
    columns: dict[str, list[str]] = {"id": ids, "input": inputs}
    if target_field is not None:
        columns["target"] = targets
    features = datasets.Features({name: datasets.Value("string") for name in columns})
    return datasets.Dataset.from_dict(columns, features=features), report


def _check_row(row: Any, fields: _Fields, where: str) -> tuple[str, str]:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object with fields, got {type(row).__name__}")
    for role, name in fields.named():
        if name not in row:
            raise DataError(f"{where}: no field '{name}' (available: {', '.join(map(str, row)) or 'none'}); "
                            f"{_KEYS[role]}={name!r} names the {role} field: set {_KEYS[role]} to the field that "
                            f"holds the {role}s, or rename the field in the data")
    text_in = _text(row[fields.input], fields.input, where)
    text_out = _text(row[fields.target], fields.target, where) if fields.target is not None else ""
    return text_in, text_out


def _text(value: Any, name: str, where: str) -> str:
    """Field value as text: None/NaN count as empty; numbers are stringified; containers are errors."""
    if isinstance(value, str):
        return value
    pandas = sys.modules.get("pandas")  # pd.NA comes only from a pandas frame, so pandas is loaded then
    if value is None or (pandas is not None and value is pandas.NA) or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, numbers.Number):
        return str(value)
    raise DataError(f"{where}: field '{name}' must be text, got {type(value).__name__} ({str(value)[:60]!r})")


def _rows(source: str, split: str, hf_split: str | None, hf_config: str | None,
          fields: _Fields) -> Iterator[tuple[str, int, Any]]:
    """(location for messages, row number from 0, row dict) for every row of the source."""
    path = Path(source)
    if path.is_file():
        suffix = _file_type(path)
        if suffix == ".jsonl" or (suffix == ".json" and not _is_json_array(path)):
            return _jsonl_rows(path, fields)
        if suffix == ".json":
            return _json_array_rows(path)
        if suffix == ".csv":
            return ((f"{path}:{line}", i, row) for i, (line, row) in enumerate(_csv_records(path)))
        import pandas as pd

        frame = pd.read_parquet(path)
        return ((f"{path} row {i}", i, row) for i, row in enumerate(frame.to_dict(orient="records")))
    if _missing_file(path):
        raise DataError(f"{source}: file not found; check the path in the recipe")
    dataset = _load_dataset(source, split, hf_split, hf_config)
    name = f"{source}[{hf_split or split}]"
    return ((f"{name} row {i}", i, row) for i, row in enumerate(dataset))


def _file_type(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in FILE_FORMATS:
        raise DataError(f"{path}: unsupported file type '{suffix}'; use one of {', '.join(FILE_FORMATS)} "
                        f"or a datasets directory/name")
    return suffix


def _missing_file(path: Path) -> bool:
    """A path that names a data file (by its suffix, or absolute) that is not there; anything else may be a
    `datasets` directory or hub name."""
    return path.suffix.lower() in FILE_FORMATS or (not path.exists() and path.is_absolute())


def _load_dataset(source: str, split: str, hf_split: str | None, hf_config: str | None) -> datasets.Dataset:
    import datasets

    wanted = hf_split or split
    path = Path(source)
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        loaded = datasets.load_from_disk(str(path))  # written by save_to_disk
        if isinstance(loaded, datasets.DatasetDict):
            if wanted not in loaded:
                raise DataError(f"{source}: no split '{wanted}' (available: {', '.join(loaded)}); "
                                f"set hf_split for the '{split}' split in the recipe")
            return loaded[wanted]
        return loaded
    try:
        return datasets.load_dataset(source, hf_config, split=wanted)
    except (FileNotFoundError, ValueError, ConnectionError) as error:  # unknown name/split/config, offline
        raise DataError(f"{source}: cannot load split '{wanted}' as a file, a saved dataset or a `datasets` "
                        f"name ({type(error).__name__}: {error}); check the source and hf_split/hf_config "
                        f"in the recipe") from error


def _is_json_array(path: Path) -> bool:
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(64), b""):
            stripped = chunk.removeprefix(codecs.BOM_UTF8).lstrip()  # a BOM can only be first
            if stripped:
                return stripped.startswith(b"[")
    return False


def _jsonl_rows(path: Path, fields: _Fields) -> Iterator[tuple[str, int, Any]]:
    row_number = 0
    with path.open(encoding=TEXT_ENCODING) as handle:
        for line_number, line in enumerate(_decoded(path, handle), start=1):
            if not line.strip():
                continue  # blank lines are not records
            where = f"{path}:{line_number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{where}: invalid JSON ({error.msg} at column {error.colno}); each line must "
                                f"be one JSON object like {fields.example()}; fix or remove the line") from None
            yield where, row_number, row
            row_number += 1


def _json_array_rows(path: Path) -> Iterator[tuple[str, int, Any]]:
    try:
        rows = json.loads(path.read_text(encoding=TEXT_ENCODING))
    except UnicodeDecodeError:
        raise _not_utf8(path) from None
    except json.JSONDecodeError as error:
        raise DataError(f"{path}:{error.lineno}: invalid JSON ({error.msg} at column {error.colno})") from error
    for i, row in enumerate(rows):
        yield f"{path} item {i}", i, row


def _csv_records(path: Path) -> Iterator[tuple[int, dict[str, str | None]]]:
    """(line where the record starts, {column: text}) for every record after the header. A field the record
    lacks is None (read as empty); a non-empty field past the header's columns is an error (an unquoted comma
    would otherwise shift the record's fields silently), and so is a column named twice."""
    rows = _csv_rows(path)
    header_line, header = next(rows, (0, []))
    named = [name for name in header if name]  # Excel writes empty names for trailing empty columns
    if len(set(named)) < len(named):
        twice = sorted({name for name in named if named.count(name) > 1})
        raise DataError(f"{path}:{header_line}: the header names column(s) {', '.join(map(repr, twice))} more "
                        f"than once; rename them so that each column has its own name")
    for line, values in rows:
        if any(value.strip() for value in values[len(header):]):
            raise DataError(f"{path}:{line}: {len(values)} fields, but the header (line {header_line}) names "
                            f"{len(header)} ({', '.join(header)}); a field that holds a comma must be quoted "
                            f"(\"a, b\"): fix the record or the header")
        yield line, dict(zip(header, itertools.chain(values, itertools.repeat(None))))


def _csv_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(line where the row starts, its fields) for every non-blank row of a CSV file, the header included.

    A row's first line is one past the lines csv.reader had consumed before it: a quoted newline makes a row
    span lines, so the row's number says nothing about its line."""
    csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))
    with path.open(encoding=TEXT_ENCODING, newline="") as handle:  # newline="": quoted newlines stay in fields
        # strict: a quote never closed is an error, not one field that swallows the rest of the file
        reader = csv.reader(_decoded(path, handle), strict=True)
        while True:
            start = reader.line_num + 1
            try:
                values = next(reader, None)
            except csv.Error as error:  # e.g. a quote opened and never closed
                raise DataError(f"{path}:{start}: malformed CSV record ({error}); check the quoting from this "
                                f"line on (a field with a quote, comma or newline is quoted, its quotes "
                                f"doubled: \"say \"\"hi\"\"\")") from None
            if values is None:
                return
            if values:  # a blank line reads as []: not a record
                yield start, values


def _decoded(path: Path, lines: Iterable[str]) -> Iterator[str]:
    """The lines of a text file opened with TEXT_ENCODING; a byte that is not UTF-8 becomes a DataError that
    names its line (the decoder only knows its offset in the chunk it was decoding)."""
    try:
        yield from lines
    except UnicodeDecodeError:
        raise _not_utf8(path) from None


def _not_utf8(path: Path) -> DataError:
    """The error for the first byte of `path` that is not UTF-8: file:line, column and byte, and what to do.

    Reads the file again, one line at a time: as Latin-1 every byte is one character, so the lines split where
    the readers split them (CR, LF, CRLF are ASCII, never inside a UTF-8 sequence) and each encodes back to
    its bytes, which are then decoded as UTF-8."""
    with path.open(encoding="latin-1", newline="") as handle:
        for line_number, line in enumerate(handle, start=1):
            raw = line.encode("latin-1")
            if line_number == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as error:
                column = len(raw[:error.start].decode("utf-8")) + 1
                utf16 = line_number == 1 and raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE))
                source, iconv = ("UTF-16", "utf-16") if utf16 else ("another encoding (Windows-1252 or "
                                                                     "Latin-1, say)", "cp1252")
                return DataError(f"{path}:{line_number}: byte 0x{raw[error.start]:02x} at column {column} is not "
                                 f"valid UTF-8: the file was saved in {source}; re-save it as UTF-8 (Excel: "
                                 f"\"CSV UTF-8\"; or `iconv -f {iconv} -t utf-8 {path.name} > utf8-{path.name}`)")
    return DataError(f"{path}: not valid UTF-8; re-save the file as UTF-8")  # changed while being read


# ---------------------------------------------------------------------------------------------- preflight


def check_data_files(data: DataConfig, splits: Iterable[str] = SPLITS) -> None:
    """Each file the recipe's data section names exists, and its first PEEK_ROWS rows parse and have the
    recipe's fields (`data.input_field`, `data.target_field` except for unlabeled, `data.id_field`).

    Cheap and torch-free: the CLI calls it before the heavy imports. The embedded task (data.task) and
    `datasets` directories / hub names are checked when loaded.
    """
    if data.task:
        return
    for name in splits:
        source = getattr(data, name)
        if source:
            fields = _Fields(data.input_field, None if name == "unlabeled" else data.target_field, data.id_field)
            _check_first_rows(source, f"data.{name}", fields)


def _check_first_rows(source: str, key: str, fields: _Fields) -> None:
    path = Path(source)
    if not path.is_file():
        if _missing_file(path):
            raise DataError(f"{key}={source}: file not found; check the path in the recipe")
        return
    for where, row in itertools.islice(_first_rows(path, fields), PEEK_ROWS):
        _check_row(row, fields, where)


def _first_rows(path: Path, fields: _Fields) -> Iterator[tuple[str, Any]]:
    """(location, row) from the start of a file, reading no more of it than needed (JSON arrays: all of it).
    A CSV or Parquet file without rows yields its header as one empty row, so its columns are still checked."""
    suffix = _file_type(path)
    if suffix in (".jsonl", ".json"):
        rows = _jsonl_rows(path, fields) if suffix == ".jsonl" or not _is_json_array(path) else _json_array_rows(path)
        return ((where, row) for where, _, row in rows)
    if suffix == ".csv":  # as load_split reads it
        records = list(itertools.islice(_csv_records(path), PEEK_ROWS))
        if not records:
            header_line, header = next(_csv_rows(path), (0, []))
            records = [(header_line + 1, dict.fromkeys(header, ""))]
        return iter([(f"{path}:{line}", row) for line, row in records])
    import pyarrow.parquet as pq  # 0.3 s, only for Parquet files

    parquet = pq.ParquetFile(path)
    batch = next(parquet.iter_batches(batch_size=PEEK_ROWS), None)
    records = batch.to_pylist() if batch is not None else []
    return iter([(f"{path} row {i}", row)
                 for i, row in enumerate(records or [dict.fromkeys(parquet.schema_arrow.names, "")])])
