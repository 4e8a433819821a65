"""load_split: every supported format, and every error path names the file/line/field and what to do."""

import json

import datasets
import pandas as pd
import pytest

from dskd.data.sources import DataError, load_split

ROWS = [
    {"code": "def add(a, b): return a + b", "doc": "Add two numbers.", "key": "k0"},
    {"code": "def neg(a): return -a", "doc": "   ", "key": "k1"},          # whitespace target: skipped
    {"code": "", "doc": "Nothing.", "key": "k2"},                        # empty input: skipped
    {"code": "def one(): return 1", "doc": "Return one.", "key": "k3"},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def check_loaded(ds, report):
    assert ds.column_names == ["id", "input", "target"]
    assert ds["input"] == ["def add(a, b): return a + b", "def one(): return 1"]
    assert ds["target"] == ["Add two numbers.", "Return one."]
    assert (report.read, report.kept, report.skipped_empty_target, report.skipped_empty_input) == (4, 2, 1, 1)


def test_jsonl_labeled_with_skips_and_default_ids(tmp_path):
    ds, report = load_split(str(write_jsonl(tmp_path / "d.jsonl", ROWS)), split="labeled",
                            input_field="code", target_field="doc")
    check_loaded(ds, report)
    assert ds["id"] == ["labeled-0", "labeled-3"]  # row numbers of the kept rows, stable under skipping
    assert report.as_metrics() == {"data/labeled/read": 4, "data/labeled/kept": 2,
                                   "data/labeled/skipped_empty_target": 1, "data/labeled/skipped_empty_input": 1}


def test_jsonl_unlabeled_keeps_empty_targets_and_uses_id_field(tmp_path):
    rows = [{"code": r["code"], "key": r["key"]} for r in ROWS]  # no target field at all
    ds, report = load_split(str(write_jsonl(tmp_path / "u.jsonl", rows)), split="unlabeled",
                            input_field="code", target_field=None, id_field="key")
    assert ds.column_names == ["id", "input"]
    assert ds["id"] == ["k0", "k1", "k3"]
    assert (report.kept, report.skipped_empty_input, report.skipped_empty_target) == (3, 1, 0)


def test_csv_parquet_and_json_array_give_the_same_dataset(tmp_path):
    frame = pd.DataFrame(ROWS)
    frame.to_csv(tmp_path / "d.csv", index=False)
    frame.to_parquet(tmp_path / "d.parquet")
    (tmp_path / "d.json").write_text(json.dumps(ROWS))
    for name in ("d.csv", "d.parquet", "d.json"):
        ds, report = load_split(str(tmp_path / name), split="dev", input_field="code", target_field="doc")
        check_loaded(ds, report)


def test_csv_keeps_na_like_text(tmp_path):
    (tmp_path / "d.csv").write_text("input,target\nNA,null\n")
    ds, _ = load_split(str(tmp_path / "d.csv"), split="dev")
    assert (ds["input"], ds["target"]) == (["NA"], ["null"])


def test_save_to_disk_dir_and_load_dataset_dir(tmp_path):
    frame = pd.DataFrame(ROWS)
    datasets.DatasetDict({"train": datasets.Dataset.from_pandas(frame)}).save_to_disk(tmp_path / "saved")
    ds, report = load_split(str(tmp_path / "saved"), split="labeled", hf_split="train",
                            input_field="code", target_field="doc")
    check_loaded(ds, report)

    raw = tmp_path / "raw"
    raw.mkdir()
    write_jsonl(raw / "train.jsonl", ROWS)
    write_jsonl(raw / "validation.jsonl", ROWS[:1])
    ds, report = load_split(str(raw), split="labeled", hf_split="train", input_field="code", target_field="doc")
    check_loaded(ds, report)
    ds, _ = load_split(str(raw), split="validation", input_field="code", target_field="doc")
    assert ds["target"] == ["Add two numbers."]


def test_max_examples_caps_kept_rows(tmp_path):
    ds, report = load_split(str(write_jsonl(tmp_path / "d.jsonl", ROWS)), split="labeled",
                            input_field="code", target_field="doc", max_examples=1)
    assert ds["input"] == ["def add(a, b): return a + b"] and report.read == 1


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"input": "a", "target": "b"}\n\n{"input": "c", "target": \n')
    with pytest.raises(DataError, match=rf"{path}:3: invalid JSON \(Expecting value"):
        load_split(str(path), split="labeled")


def test_non_object_line_is_an_error(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text('["a", "b"]\n')
    with pytest.raises(DataError, match=rf"{path}:1: expected a JSON object"):
        load_split(str(path), split="labeled")


@pytest.mark.parametrize("missing", ["input", "target"])
def test_missing_field_names_field_file_line_and_available_keys(tmp_path, missing):
    row = {"input": "x", "target": "y", "other": 1}
    del row[missing]
    path = write_jsonl(tmp_path / "d.jsonl", [{"input": "a", "target": "b"}, row])
    with pytest.raises(DataError, match=rf"{path}:2: no field '{missing}' \(available: .*other\)"):
        load_split(str(path), split="labeled")


def test_missing_column_in_csv_names_line(tmp_path):
    (tmp_path / "d.csv").write_text("text,summary\na,b\n")
    with pytest.raises(DataError, match=r"d.csv:2: no field 'input' \(available: text, summary\)"):
        load_split(str(tmp_path / "d.csv"), split="labeled")


def test_non_text_field_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"input": ["a"], "target": "b"}])
    with pytest.raises(DataError, match=r"d.jsonl:1: field 'input' must be text, got list"):
        load_split(str(path), split="labeled")


def test_duplicate_and_empty_ids_are_errors(tmp_path):
    dup = write_jsonl(tmp_path / "dup.jsonl", [{"input": "a", "target": "b", "id": 7}] * 2)
    with pytest.raises(DataError, match=r"dup.jsonl:2: duplicate id '7' \(first seen at .*dup.jsonl:1\)"):
        load_split(str(dup), split="labeled", id_field="id")
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"input": "a", "target": "b", "id": " "}])
    with pytest.raises(DataError, match=r"empty.jsonl:1: empty id in field 'id'"):
        load_split(str(empty), split="labeled", id_field="id")


def test_all_rows_skipped_is_an_error_with_counts(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"input": "a", "target": ""}])
    with pytest.raises(DataError, match=r"no usable examples for split 'labeled' \(1 read, 0 with empty input, "
                                        r"1 with empty target\)"):
        load_split(str(path), split="labeled")


def test_missing_file_unknown_type_and_unknown_split(tmp_path):
    with pytest.raises(DataError, match=r"nope.jsonl: file not found"):
        load_split(str(tmp_path / "nope.jsonl"), split="labeled")
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataError, match=r"unsupported file type '.txt'"):
        load_split(str(tmp_path / "d.txt"), split="labeled")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"input": ["a"], "target": ["b"]})}).save_to_disk(
        tmp_path / "saved")
    with pytest.raises(DataError, match=r"no split 'test' \(available: train\)"):
        load_split(str(tmp_path / "saved"), split="test")

