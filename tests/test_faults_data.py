"""Data files as users' tools write them ("Reliability, third round", points 6, 12, 13).

   6  a byte that is not UTF-8 (a file saved as Windows-1252/Latin-1): one `dskd: error: FILE:LINE: ...` line,
      exit 2, naming the line (not a byte offset) and what to do, from the preflight and from the full read
  12  UTF-8 with a byte-order mark (Excel's "CSV UTF-8", some editors' JSON): read as the text it is
  13  a CSV record with quoted newlines: errors name the line where the record starts, not its record number

The CLI runs are fresh interpreters, as a user's: the preflight ones return before torch loads (about a second);
the full-read ones run the `teacher` stage up to loading its data.
"""

from __future__ import annotations

import codecs
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dskd.config import DataConfig
from dskd.data.sources import DataError, check_data_files, load_split
from tests.conftest import launch_env

FIELDS = {"input_field": "src", "target_field": "tgt"}


def _recipe(tmp_path: Path, tiny_task: Path, **data: str) -> dict:
    """A recipe on the user's files (`data`), with tiny models built from configs."""
    return {"run": {"output_dir": str(tmp_path / "out")}, "tracking": {"experiment": "tests"},
            "data": {**FIELDS, **data},
            "teacher": {"init": "config", "model_type": "t5", "tokenizer": str(tiny_task / "tokenizer"),
                        "finetune": True},
            "student": {"init": "config", "model_type": "t5"}, "distill": {"sources": ["gold"]}}


def _dskd(tmp_path: Path, stage: str, recipe: dict) -> tuple[int, list[str]]:
    """`dskd STAGE --config R` in a fresh interpreter: (exit code, the non-blank lines of stderr)."""
    config = tmp_path / f"{stage}.yaml"
    config.write_text(yaml.safe_dump(recipe))
    proc = subprocess.run([sys.executable, "-m", "dskd", stage, "--config", str(config)], check=False,
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, env=launch_env())
    return proc.returncode, [line for line in proc.stderr.splitlines() if line.strip()]


def _one_error_line(rc: int, lines: list[str], *, only: bool = True) -> str:
    """The `dskd: error:` line of a run that ended in a user error; `only`: nothing else on stderr (the
    preflight). After the stage started, library warnings may come first; the error is still one line, last."""
    assert rc == 2, "\n".join(lines[-30:])
    assert not any("Traceback" in line for line in lines), "\n".join(lines[-30:])
    errors = [line for line in lines if line.startswith("dskd: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], "\n".join(lines[-30:])
    if only:
        assert len(lines) == 1, "\n".join(lines)
    return errors[0]


def _pairs(n: int) -> list[dict[str, str]]:
    return [{"src": f"def f{i}(x):\n    return x + {i}", "tgt": f"Add {i}."} for i in range(n)]


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def _csv(rows: list[dict]) -> str:
    """A CSV as Excel writes it: CRLF, every field quoted (so the inputs' newlines are quoted newlines)."""
    quoted = ['"' + value.replace('"', '""') + '"' for row in rows for value in row.values()]
    width = len(rows[0])
    return "src,tgt\r\n" + "".join(",".join(quoted[i:i + width]) + "\r\n" for i in range(0, len(quoted), width))


def test_a_byte_that_is_not_utf8_is_one_line_naming_file_and_line_and_what_to_do(tmp_path, tiny_task):
    """Point 6: "café" saved as Windows-1252 (b'caf\\xe9') used to end in a 22-line UnicodeDecodeError with a
    byte position. Now: FILE:LINE, the byte and its column, and "re-save as UTF-8"."""
    rows = _pairs(400)
    rows[1]["tgt"] = "Add to the café."
    # The line each format puts row 1's target on: JSONL line 2; CSV line 5 (header, then two lines per row: the
    # inputs hold a quoted newline); a JSON array, one item per line, line 3.
    files = {"bad.jsonl": (_jsonl(rows), 2), "bad.csv": (_csv(rows), 5),
             "bad.json": ("[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n]\n", 3)}
    for name, (text, line) in files.items():
        path = tmp_path / name
        path.write_bytes(text.encode("cp1252"))
        rc, lines = _dskd(tmp_path, "distill", _recipe(tmp_path, tiny_task, labeled=str(path)))  # the preflight
        column = text.splitlines()[line - 1].index("é") + 1  # in characters, as an editor counts
        error = _one_error_line(rc, lines)
        assert error.startswith(f"dskd: error: {path}:{line}: byte 0xe9 at column {column} is not valid UTF-8"), error
        assert "re-save" in error and "position" not in error, error
        with pytest.raises(DataError, match=rf"^{path}:{line}: byte 0xe9 at column {column} is not valid UTF-8"):
            load_split(str(path), split="labeled", **FIELDS)  # the full read

    # Past the bytes the preflight reads (its first rows): only the full read in the stage meets it.
    rows = _pairs(1000)
    rows[900]["tgt"] = "Add to the café."
    late = tmp_path / "late.csv"
    late.write_bytes(_csv(rows).encode("cp1252"))
    assert late.read_bytes().index(b"\xe9") > 4 * 8192  # several of the text layer's read chunks before it
    check_data_files(DataConfig(labeled=str(late), **FIELDS))  # the preflight passes: its rows are fine
    rc, lines = _dskd(tmp_path, "teacher", _recipe(tmp_path, tiny_task, labeled=str(late)))
    error = _one_error_line(rc, lines, only=False)
    line = 2 + 2 * 900 + 1  # header; two lines per row (the quoted newline); the target is on the second
    column = len('    return x + 900","Add to the caf') + 1
    assert error.startswith(f"dskd: error: {late}:{line}: byte 0xe9 at column {column} is not valid UTF-8"), error


def test_utf8_with_a_byte_order_mark_is_read_in_the_preflight_and_the_full_read(tmp_path, tiny_task):
    """Point 12: Excel's "CSV UTF-8" starts with a BOM; it used to become part of the first column's name
    (`no field 'src' (available: \\ufeffsrc, tgt)`). JSONL and JSON arrays with a BOM were "invalid JSON"."""
    rows = _pairs(6)
    rows[2]["tgt"] = "Größe zurückgeben, naïvely."
    bom = codecs.BOM_UTF8
    csv_file, jsonl_file, json_file = tmp_path / "excel.csv", tmp_path / "bom.jsonl", tmp_path / "bom.json"
    csv_file.write_bytes(bom + _csv(rows).encode("utf-8"))
    jsonl_file.write_bytes(bom + _jsonl(rows).encode("utf-8"))
    json_file.write_bytes(bom + json.dumps(rows, ensure_ascii=False).encode("utf-8"))

    # The CLI: the data files pass the preflight, which goes on to the next thing it checks (a student path
    # that is not there, so that the run stops here, before torch).
    recipe = _recipe(tmp_path, tiny_task, labeled=str(csv_file), dev=str(jsonl_file), test=str(json_file))
    recipe["student"] = {"init": "pretrained", "path": str(tmp_path / "no-student")}
    rc, lines = _dskd(tmp_path, "distill", recipe)
    error = _one_error_line(rc, lines)
    assert error.startswith(f"dskd: error: student.path={tmp_path / 'no-student'}: no such directory"), error

    # The full read: every row, with the first column's values and the non-ASCII text as written.
    for path in (csv_file, jsonl_file, json_file):
        ds, report = load_split(str(path), split="labeled", **FIELDS)
        assert (report.read, report.kept) == (6, 6), path
        assert ds["input"] == [r["src"] for r in rows], path
        assert ds["target"] == [r["tgt"] for r in rows], path
        assert ds["target"][2] == "Größe zurückgeben, naïvely."
    ds, _ = load_split(str(csv_file), split="labeled", input_field="src", target_field="tgt", id_field="src")
    assert ds["id"][0] == "def f0(x):\n    return x + 0"  # the BOM is not part of the first value either


def test_csv_errors_name_the_line_where_the_record_starts(tmp_path, tiny_task):
    """Point 13: with quoted newlines a record spans lines, so record number + 2 is not its line. Every CSV
    error names the line where its record starts (csv.reader's line count), as an editor shows it."""
    rows = [{"key": f"k{i}", **row} for i, row in enumerate(_pairs(8))]  # each record spans 2 lines
    rows[6]["key"] = "k2"  # record 6 starts on line 2 + 2 * 6 = 14; record 2 on line 6
    path = tmp_path / "multiline.csv"
    path.write_text(_csv(rows).replace("src,tgt", "key,src,tgt", 1), newline="")
    dup = rf"{path}:14: duplicate id 'k2' \(first seen at {path}:6\)"

    # The stage (the preflight checks fields, not ids, so this is the full read after torch loaded).
    recipe = _recipe(tmp_path, tiny_task, labeled=str(path), id_field="key")
    rc, lines = _dskd(tmp_path, "teacher", recipe)
    error = _one_error_line(rc, lines, only=False)
    assert error.startswith(f"dskd: error: {path}:14: duplicate id 'k2' (first seen at {path}:6)"), error
    with pytest.raises(DataError, match=dup):
        load_split(str(path), split="labeled", id_field="key", **FIELDS)

    # A blank line between records, and an empty id in the record that starts on line 17 (record 7).
    rows[6]["key"], rows[7]["key"] = "k6", " "
    records = _csv(rows).replace("src,tgt", "key,src,tgt", 1).split("\r\n")  # header, then one per record
    path.write_text("\r\n".join(records[:8] + [""] + records[8:]), newline="")  # a blank line before record 7
    with pytest.raises(DataError, match=rf"{path}:17: empty id in field 'key'"):
        load_split(str(path), split="labeled", id_field="key", **FIELDS)

    # A record with more fields than the header (an unquoted comma): the preflight names its first line.
    bad = tmp_path / "extra.csv"
    bad.write_text('src,tgt\n"def f(x):\n    return x",Return x.\n"def g(y):\n    return y",Return y, or not.\n',
                   newline="")
    rc, lines = _dskd(tmp_path, "distill", _recipe(tmp_path, tiny_task, labeled=str(bad)))
    error = _one_error_line(rc, lines)
    assert error.startswith(f"dskd: error: {bad}:4: 3 fields, but the header (line 1) names 2"), error
