"""The PT store: atomic shards, refusal of foreign stores, dedup-checked merge, crash + resume without loss."""

from __future__ import annotations

import json

import datasets
import pyarrow.parquet as pq
import pytest
import torch

from dskd import sampling
from dskd.data.pt_store import PTStore, StoreMismatchError, weights_fingerprint
from dskd.generation import DecodingConfig, generate_pseudo_targets, length_sorted_batches, pt_store_meta
from tests.workers.gen_tiny import PROMPTS, tiny_encoder, tiny_model

SAMPLING = DecodingConfig(strategy="sampling", num_return_sequences=2, top_p=0.95, batch_size=2)


def meta(decoding=SAMPLING, seed=0, fingerprint="params-sha256:abc", path="/models/teacher", data="data-1"):
    return pt_store_meta(decoding, seed=seed, teacher={"path": path, "fingerprint": fingerprint},
                         data_fingerprint=data)


def row(example_id, pts=("a b", "c"), pt_ids=((5, 6, 1), (7, 1))):
    return {"id": example_id, "split": "labeled", "input": f"input {example_id}", "pts": list(pts),
            "pt_ids": [list(ids) for ids in pt_ids]}


def test_shards_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    store = PTStore(tmp_path)
    store.write_meta(meta())
    first = store.write_shard(0, [row("a"), row("b")])
    second = store.write_shard(1, [row("c")])
    assert first != second and pq.read_table(first).num_rows == 2
    assert store.completed_ids() == {"a", "b", "c"}

    def crash_midway(table, where, **kwargs):
        where.write(b"PAR1 half a parquet file")
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(pq, "write_table", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        store.write_shard(0, [row("d")])
    monkeypatch.undo()
    assert store.completed_ids() == {"a", "b", "c"}, "a half-written shard must never count as complete"
    assert not any(p.name.startswith(".tmp-") for p in store.shard_dir.iterdir())  # a failed write cleans up
    (store.shard_dir / ".tmp-999-shard.parquet").write_bytes(b"PAR1 half")  # what a SIGKILL mid-write leaves
    assert store.completed_ids() == {"a", "b", "c"}
    store.merge()
    assert not any(p.name.startswith(".tmp-") for p in store.shard_dir.iterdir())  # ...swept by merge


def test_resuming_into_a_store_for_other_pts_is_refused(tmp_path):
    store = PTStore(tmp_path)
    store.write_meta(meta())
    store.write_meta(meta(path="/moved/teacher"))  # same weights elsewhere: fine
    assert json.loads(store.meta_path.read_text())["decoding"]["top_p"] == 0.95
    for changed in (meta(decoding=DecodingConfig(strategy="beam", num_return_sequences=2)),
                    meta(fingerprint="params-sha256:other"), meta(data="data-2"), meta(seed=1)):
        with pytest.raises(StoreMismatchError, match="use a new PT directory"):
            store.write_meta(changed)
    with pytest.raises(ValueError, match="teacher.fingerprint"):
        PTStore(tmp_path / "other").write_meta({"decoding": {}, "seed": 0, "teacher": {}, "data_fingerprint": "x"})


def test_merge_drops_exact_duplicates_rejects_conflicts_and_checks_coverage(tmp_path):
    store = PTStore(tmp_path)
    store.write_meta(meta())
    store.write_shard(0, [row("b"), row("a")])
    store.write_shard(1, [row("a"), row("c")])  # "a" again, identical: a batch redone after a crash
    assert not store.is_complete()
    store.merge(expected_ids=["a", "b", "c"])
    assert store.is_complete()
    loaded = store.load()
    assert loaded.column_names == ["id", "split", "input", "pts", "pt_ids"]
    assert loaded["id"] == ["a", "b", "c"]
    assert loaded[0]["pts"] == ["a b", "c"] and loaded[0]["pt_ids"] == [[5, 6, 1], [7, 1]]
    store.write_shard(0, [row("d")])
    store.merge()
    assert store.load()["id"] == ["a", "b", "c", "d"], "a new merge must not be shadowed by an old cache"
    assert len(list(store.cache_dir.rglob("*.arrow"))) == 1

    with pytest.raises(ValueError, match=r"1 ids have no PTs \(e.g. \['e'\]\)"):
        store.merge(expected_ids=["a", "b", "c", "d", "e"])
    store.write_shard(0, [row("c", pts=("other", "c"))])
    with pytest.raises(ValueError, match="'c' has two different PT sets"):
        store.merge()


def test_load_before_generation_finished_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="has not finished"):
        PTStore(tmp_path).load()
    with pytest.raises(FileNotFoundError, match="write_meta"):
        PTStore(tmp_path).read_meta()


class CrashingStore(PTStore):
    """Dies (like a SIGKILL would) after writing `survive` shards."""

    def __init__(self, root, survive):
        super().__init__(root)
        self.survive = survive

    def write_shard(self, rank, rows):
        if self.survive == 0:
            raise RuntimeError("simulated crash")
        self.survive -= 1
        return super().write_shard(rank, rows)


def count_sampling_calls(monkeypatch):
    """Rows of every batch the sampler is asked for (dskd.sampling.sample: one call per generated batch)."""
    calls = []
    original = sampling.sample

    def counted(model, arch, input_ids, *args, **kwargs):
        calls.append(input_ids.shape[0])
        return original(model, arch, input_ids, *args, **kwargs)

    monkeypatch.setattr(sampling, "sample", counted)
    return calls


def test_crash_and_resume_equals_an_uninterrupted_run(tiny_tokenizer, tmp_path, monkeypatch):
    rows = datasets.Dataset.from_dict({"id": [f"r{i}" for i in range(7)], "input": PROMPTS + PROMPTS[:2],
                                       "split": ["labeled"] * 4 + ["unlabeled"] * 3})
    model, enc = tiny_model("seq2seq", len(tiny_tokenizer)), tiny_encoder(tiny_tokenizer, "seq2seq")
    store_meta = meta(fingerprint=weights_fingerprint(model))

    clean = PTStore(tmp_path / "clean")
    clean.write_meta(store_meta)
    generate_pseudo_targets(model, enc, rows, SAMPLING, clean, progress=False)

    crashed = CrashingStore(tmp_path / "resumed", survive=2)
    crashed.write_meta(store_meta)
    with pytest.raises(RuntimeError, match="simulated crash"):
        generate_pseudo_targets(model, enc, rows, SAMPLING, crashed, progress=False)
    plan = length_sorted_batches([len(p) for p in enc.prompt_ids_batch(rows["input"])], SAMPLING.batch_size,
                                 min(SAMPLING.max_new_tokens, enc.formatting.max_target_tokens - 1))
    survived = {rows["id"][i] for batch in plan[:2] for i in batch}
    assert len(plan) > 3 and crashed.completed_ids() == survived and not crashed.is_complete()

    resumed = PTStore(tmp_path / "resumed")
    resumed.write_meta(store_meta)
    calls = count_sampling_calls(monkeypatch)
    torch.manual_seed(999)  # a restarted process has another global RNG state: PTs must not depend on it
    generate_pseudo_targets(model, enc, rows, SAMPLING, resumed, progress=False)
    assert calls == [len(batch) for batch in plan[2:]], "only the unfinished batches are generated again"
    shard_ids = [i for shard in resumed.shard_dir.glob("*.parquet") for i in pq.read_table(shard)["id"].to_pylist()]
    assert sorted(shard_ids) == sorted(rows["id"]), "no PT lost or duplicated on disk"
    assert resumed.load().to_list() == clean.load().to_list()
    assert all(len(r["pts"]) == 2 == len(r["pt_ids"]) for r in clean.load())


def test_generation_refuses_a_store_opened_for_another_decoding(tiny_tokenizer, tmp_path):
    store = PTStore(tmp_path)
    store.write_meta(meta())
    rows = datasets.Dataset.from_dict({"id": ["a"], "input": ["x"], "split": ["labeled"]})
    model, enc = tiny_model("seq2seq", len(tiny_tokenizer)), tiny_encoder(tiny_tokenizer, "seq2seq")
    with pytest.raises(ValueError, match="use a new PT directory"):
        generate_pseudo_targets(model, enc, rows, DecodingConfig(), store, progress=False)
    with pytest.raises(ValueError, match="must be unique"):
        twice = datasets.Dataset.from_dict({"id": ["a", "a"], "input": ["x", "y"], "split": ["labeled"] * 2})
        generate_pseudo_targets(model, enc, twice, SAMPLING, store, progress=False)


def test_weights_fingerprint_tracks_weights_not_objects(tiny_tokenizer, tmp_path):
    first, twin = tiny_model("causal", 300, seed=0), tiny_model("causal", 300, seed=0)
    assert weights_fingerprint(first) == weights_fingerprint(twin)
    assert weights_fingerprint(first).startswith("params-sha256:")
    with torch.no_grad():
        twin.model.layers[1].mlp.down_proj.weight[0, 0] += 1e-4
    assert weights_fingerprint(first) != weights_fingerprint(twin)

    first.save_pretrained(tmp_path / "a")
    twin.save_pretrained(tmp_path / "b")
    full_a, full_b = weights_fingerprint(tmp_path / "a"), weights_fingerprint(tmp_path / "b")
    assert full_a.startswith("files-sha256:") and full_a != full_b
    assert full_a == weights_fingerprint(tmp_path / "a" / "model.safetensors")
    sampled_a = weights_fingerprint(tmp_path / "a", full_hash_limit_bytes=0)
    assert sampled_a.startswith("files-sampled-sha256:")
    assert sampled_a != weights_fingerprint(tmp_path / "b", full_hash_limit_bytes=0)
    with pytest.raises(FileNotFoundError, match="no weight files"):
        weights_fingerprint(tmp_path)


def test_a_store_made_by_an_older_generator_is_never_mixed_with_new_pts(tiny_tokenizer, tmp_path):
    """Stores from before dskd.sampling (HF generate, input-order batches) have no "generator" in their meta:
    their PTs differ for the same seed, so both opening and generating into them fail with a clear message."""
    old = {k: v for k, v in meta().items() if k != "generator"}
    store = PTStore(tmp_path)
    store.write_meta(old)
    with pytest.raises(StoreMismatchError, match="generator"):
        PTStore(tmp_path).write_meta(meta())
    rows = datasets.Dataset.from_dict({"id": ["a"], "input": ["x"], "split": ["labeled"]})
    model, enc = tiny_model("seq2seq", len(tiny_tokenizer)), tiny_encoder(tiny_tokenizer, "seq2seq")
    with pytest.raises(ValueError, match="Regenerate into a new PT directory"):
        generate_pseudo_targets(model, enc, rows, SAMPLING, store, progress=False)
