"""teacher.signal=cached (dskd.teacher_cache, CachedTeacher): the teacher's top-k per target token, scored once.

  - with k >= the vocabulary the cached signal is the local teacher's exactly: the same losses, step by step
  - a second student reuses the cache (nothing scored again), Joint-Teaching mixes cached and live batches
  - a cache built for another teacher or k is refused naming what changed; a partial cache is completed
"""

from __future__ import annotations

import pytest

from dskd.config import ConfigError, load_recipe
from tests.conftest import tiny_recipe

STUDENT = {"init": "config", "model_type": "t5",
           "config": {"d_model": 32, "d_ff": 64, "num_layers": 1, "num_decoder_layers": 1, "num_heads": 2,
                      "d_kv": 16, "dropout_rate": 0.0}}


def _recipe(task, out, **distill):
    teacher = {"finetune": False, "config": {"dropout_rate": 0.0}}
    return tiny_recipe(task, out, "t5", teacher=teacher, student={**STUDENT, "name": distill.pop("name", "student")},
                       distill={"sources": ["gold"], "student_pt_ratio": 0.0, "eval_examples": 0, "max_steps": 4,
                                "grad_accum": 1, **distill})


def _train(task, out, *overrides, **distill):
    from dskd.stages.train import train_stage

    return train_stage(load_recipe(base=_recipe(task, out, **distill), overrides=list(overrides)), "distill")


def test_cached_top_k_of_the_whole_vocabulary_trains_exactly_like_the_local_teacher(tiny_task, tmp_path):
    local = _train(tiny_task, tmp_path / "local")
    cached = _train(tiny_task, tmp_path / "cached", "teacher.signal=cached", "teacher.cache_top_k=300")
    assert len(local.losses) == len(cached.losses) == 4
    assert cached.losses == pytest.approx(local.losses, rel=2e-5)
    assert (tmp_path / "cached" / "teacher_cache" / "meta.json").is_file()


def test_a_second_student_reuses_the_cache_and_joint_teaching_mixes_cached_and_live(tiny_task, tmp_path,
                                                                                    monkeypatch):
    from dskd.teacher_cache import TeacherCache
    from dskd.teachers import CachedTeacher

    _train(tiny_task, tmp_path, "teacher.signal=cached", "teacher.cache_top_k=16")
    cache = TeacherCache(tmp_path / "teacher_cache")
    shards = sorted((cache.shards).glob("*.parquet"))
    assert shards

    def no_scoring(self, batch, keys, needs):
        raise AssertionError("the cache already holds every pair this student trains on")

    monkeypatch.setattr(CachedTeacher, "_score", no_scoring)
    dense = {"calls": 0}
    original = CachedTeacher.signal

    def counting(self, batch):
        dense["calls"] += "teacher_top_ids" not in batch
        return original(self, batch)

    monkeypatch.setattr(CachedTeacher, "signal", counting)
    result = _train(tiny_task, tmp_path, "teacher.signal=cached", "teacher.cache_top_k=16", name="jt",
                    student_pt_ratio=0.5)
    assert len(result.losses) == 4 and sorted(cache.shards.glob("*.parquet")) == shards
    assert dense["calls"] == 2  # every second micro-batch: the student's samples, scored by the live teacher


def test_a_student_whose_pairs_are_all_cached_never_loads_the_teacher(tiny_task, tmp_path, monkeypatch):
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    from dskd.stages.train import TrainingStage
    from tests.conftest import tiny_config_kwargs

    torch.manual_seed(0)  # a teacher on disk: its files are its identity (one built from a config must be built)
    T5ForConditionalGeneration(T5Config(**tiny_config_kwargs("t5", 300))).save_pretrained(tmp_path / "teacher")
    on_disk = ["teacher.init=pretrained", f"teacher.path={tmp_path / 'teacher'}", "teacher.config={}",
               "teacher.signal=cached", "teacher.cache_top_k=16"]
    first = _train(tiny_task, tmp_path, *on_disk)
    built = []
    original = TrainingStage._build_teacher
    monkeypatch.setattr(TrainingStage, "_build_teacher", lambda self: built.append(1) or original(self))
    second = _train(tiny_task, tmp_path, *on_disk, name="second")
    assert built == [] and second.losses == pytest.approx(first.losses, rel=1e-6)  # same pairs, same signal
    _train(tiny_task, tmp_path, *on_disk, name="jt", student_pt_ratio=0.5)
    assert built == [1]  # Joint-Teaching's samples need the live teacher


def test_a_cache_of_another_teacher_or_k_is_refused_and_a_partial_one_is_completed(tiny_task, tmp_path):
    from dskd.teacher_cache import TeacherCache

    _train(tiny_task, tmp_path, "teacher.signal=cached", "teacher.cache_top_k=8")
    with pytest.raises(ConfigError, match=r"teacher cache .* was built for another teacher signal \(top_k 8 -> 9\)"):
        _train(tiny_task, tmp_path, "teacher.signal=cached", "teacher.cache_top_k=9", name="b")
    with pytest.raises(ConfigError, match=r"teacher_fingerprint 'params-sha256:\w+' -> 'params-sha256:\w+'"):
        _train(tiny_task, tmp_path, "teacher.signal=cached", "teacher.cache_top_k=8", "run.seed=8", name="c")

    cache = TeacherCache(tmp_path / "teacher_cache")
    shards = sorted(cache.shards.glob("*.parquet"))
    cache.refresh()
    complete = len(cache)
    for shard in shards[: len(shards) // 2 or 1]:
        shard.unlink()
    cache.refresh()
    assert len(cache) < complete
    _train(tiny_task, tmp_path, "teacher.signal=cached", "teacher.cache_top_k=8", name="d")
    cache.refresh()
    assert len(cache) == complete


def test_cached_needs_what_a_top_k_teacher_can_define(tiny_task, tmp_path):
    base = _recipe(tiny_task, tmp_path)
    for bad, named in (("distill.temperature=2.0", "forward_kl at temperature 1.0"),
                       ("distill.teacher_dropout=true", "noisy KD"),
                       ("distill.attention_relation_weight=0.5", "attention-relation KD")):
        with pytest.raises(ConfigError, match=f"teacher.signal=cached, distill.loss=kd: .*{named}"):
            load_recipe(base=base, overrides=["teacher.signal=cached", bad])


def test_study_cells_read_one_shared_cache_where_their_objective_allows_it(tmp_path):
    from pathlib import Path

    from dskd.study import study_cells

    full = Path(__file__).resolve().parents[1] / "dskd" / "recipes" / "study.yaml"
    recipe = load_recipe(full, [f"run.output_dir={tmp_path}", "study.seeds=[1]"])
    signals = {c.variant: (c.recipe.teacher.signal, c.recipe.teacher.cache_dir) for c in study_cells(recipe)}
    shared = str(tmp_path / "shared" / "teacher_cache")
    assert {v for v, (signal, _) in signals.items() if signal == "cached"} == {
        "logits_kd", "kd_pts_labeled", "kd_pts_all", "joint_teaching"}
    assert {d for signal, d in signals.values() if signal == "cached"} == {shared}
    off = load_recipe(full, [f"run.output_dir={tmp_path}", "study.teacher_cache=false"])
    assert {c.recipe.teacher.signal for c in study_cells(off)} == {"local"}
    own = load_recipe(full, [f"run.output_dir={tmp_path}", "study.variants.joint_teaching={distill.student_pt_ratio: "
                                                           "0.5, teacher.signal: local}"])
    assert {c.recipe.teacher.signal for c in study_cells(own) if c.variant == "joint_teaching"} == {"local"}
    with pytest.raises(ConfigError, match="'teacher.cache_top_k' cannot vary between cells"):
        study_cells(load_recipe(full, ["study.variants.joint_teaching={teacher.cache_top_k: 8}"]))


def test_the_sparse_distribution_keeps_the_top_k_exactly_and_is_unbiased_over_the_tail():
    """p^ = exact top-k + S tail draws worth t/S each: E[p^] = p (so the KD gradient q - p^ is unbiased), the
    slots of a row are distinct tokens (or padding with probability 0), and its mass is 1."""
    import torch

    from dskd.teacher_cache import SparseSpec, sparse_distribution

    gen = torch.Generator().manual_seed(0)
    log_p = torch.log_softmax(torch.randn(1, 50, generator=gen) * 1.5, dim=1)
    rows = 20000
    ids, values = sparse_distribution(log_p.expand(rows, -1).clone(), SparseSpec(top_k=5, tail_samples=8),
                                      [(rows, gen)])
    assert ids.shape == values.shape == (rows, 13)
    probs = values.exp()
    top = log_p[0].topk(5)
    assert torch.equal(ids[:, :5], top.indices.expand(rows, -1))
    torch.testing.assert_close(values[:, :5], top.values.expand(rows, -1))
    torch.testing.assert_close(probs.sum(1), torch.ones(rows), rtol=0, atol=1e-5)
    real = probs > 0
    for row in range(0, rows, 997):  # distinct real tokens per row; padding repeats the first id at p = 0
        assert len(set(ids[row][real[row]].tolist())) == int(real[row].sum())
        assert set(ids[row][~real[row]].tolist()) <= {int(top.indices[0])}
    dense = torch.zeros(rows, 50).scatter_add_(1, ids, probs).mean(0)
    torch.testing.assert_close(dense, log_p[0].exp(), rtol=0, atol=4e-3)  # E[p^] = p
    biased, _ = sparse_distribution(log_p, SparseSpec(top_k=5, tail_samples=0))
    assert biased.shape == (1, 5)  # S = 0: top-k alone, the tail left to the loss's single bucket


def test_a_pairs_cached_entry_does_not_depend_on_the_pairs_scored_beside_it():
    """Tail draws come from the pair's own stream (seeded by its key): alone or in any batch, the same entry."""
    import torch

    from dskd.teacher_cache import SparseSpec, draw_seed, pair_key, score_sparse

    torch.manual_seed(0)
    weight, spec = torch.randn(40, 8), SparseSpec(top_k=3, tail_samples=6)
    hidden = torch.randn(3, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    seeds = [draw_seed(pair_key([i], [i + 1])) for i in range(3)]
    together = score_sparse(hidden, weight, None, mask, spec, 40, seeds)
    alone = score_sparse(hidden[1:2], weight, None, mask[1:2], spec, 40, seeds[1:2])
    reordered = score_sparse(hidden[[1, 0]], weight, None, mask[[1, 0]], spec, 40, [seeds[1], seeds[0]])
    for got in (alone, reordered):
        torch.testing.assert_close(got[0][:5], together[0][3:8], rtol=0, atol=0)
        torch.testing.assert_close(got[1][:5], together[1][3:8])


def test_a_server_position_with_fewer_than_k_tokens_is_padded_as_the_sparse_loss_expects():
    """Padding repeats the position's best id with probability 0: the loss's tail (1 - the top-k's student
    mass) must still hold every token the server did not name, id 0 included."""
    import numpy as np

    from dskd.teacher_cache import top_k_arrays

    ids, values = top_k_arrays([{7: -0.1, 3: -2.5}, {5: -0.01}], 3)
    assert ids.tolist() == [[7, 3, 7], [5, 5, 5]]
    assert values[0, 2] == -np.inf and np.isneginf(values[1, 1:]).all()
    assert values[0, :2].tolist() == pytest.approx([-0.1, -2.5])
