"""Cross-tokenizer KD (dskd.cross_tokenizer, CrossTokenizerTeacher): a local teacher with another tokenizer.

  - identical tokenizers, k = the whole vocabulary: the dense same-tokenizer loss and gradients exactly
  - two real BPE tokenizers: where boundaries coincide the teacher's probabilities carry exactly; a student token
    spanning teacher tokens gets their chain-rule product, one inside a teacher token the conditioned distribution
  - `dskd distill` with a teacher and a student of different tokenizers trains; Joint-Teaching's samples reach the
    teacher in its own tokens; teacher.signal=cached stores the carried signal (the same losses as live)
  - a slow tokenizer is refused naming its key before any model loads; texts the teacher cannot reproduce, and
    objectives that need one tokenizer, are refused
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from dskd.config import ConfigError, load_recipe
from dskd.cross_tokenizer import Carrier, TeacherView, check_alignable
from dskd.tokens import token_pieces
from tests.conftest import CORPUS, bpe_tokenizer, save_peaked_llama, tiny_config_kwargs, tiny_pairs, tiny_recipe

TEXT = "Return the header of the socket."


@pytest.fixture(scope="module")
def student_tokenizer(tmp_path_factory):
    """Another vocabulary (~390 tokens) and other merges than `tiny_tokenizer`, learned on the task's own texts."""
    rows = tiny_pairs(64) + tiny_pairs(32, offset=100)
    tok = bpe_tokenizer([text for r in rows for text in (r["target"], r["input"])] * 3, 420)
    path = tmp_path_factory.mktemp("student_tok")
    tok.save_pretrained(path)
    tok.name_or_path = str(path)
    return tok


def _target(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def _view(teacher, target: list[int], support: list[int] | None = None, peak: float | None = None, seed: int = 0):
    """A teacher's whole distribution at each target position: random over `support` (+ the actual token), or
    `peak` on the actual token and the rest spread evenly."""
    vocab = len(teacher)
    g = torch.Generator().manual_seed(seed)
    if peak is not None:
        logp = torch.full((len(target), vocab), math.log((1 - peak) / (vocab - 1)))
        logp[torch.arange(len(target)), torch.tensor(target)] = math.log(peak)
    else:
        logits = torch.full((len(target), vocab), -math.inf)
        for j, actual in enumerate(target):
            allowed = torch.tensor(sorted({*support, actual}))
            logits[j, allowed] = torch.randn(len(allowed), generator=g) * 2
        logp = torch.log_softmax(logits, -1)
    top = logp.topk(vocab, -1)
    return TeacherView(target, top.indices.numpy(), top.values.numpy())


def _carried(ids: np.ndarray, logprobs: np.ndarray) -> dict[int, float]:
    return {int(i): float(math.exp(v)) for i, v in zip(ids, logprobs) if v > -math.inf}


def _spans(tokenizer, ids: list[int]) -> list[tuple[int, int]]:
    out, offset = [], 0
    for piece in token_pieces(tokenizer, ids):
        out.append((offset, offset + len(piece)))
        offset += len(piece)
    return out


# -- (a) identical tokenizers ------------------------------------------------------------------------------------


def test_identical_tokenizers_and_the_whole_vocabulary_give_the_dense_loss_and_gradients(tiny_tokenizer):
    import datasets
    from transformers import LlamaConfig, LlamaForCausalLM

    from dskd.data.collate import Encoder, Formatting, collate_training
    from dskd.engines import DistInfo
    from dskd.losses import KDLossConfig
    from dskd.models import HiddenStateLM
    from dskd.objectives import Pair, TrainingPool
    from dskd.student import StudentHead
    from dskd.teacher_cache import SparseSpec
    from dskd.teachers import CrossTokenizerTeacher, LocalTeacher, TeacherNeeds

    vocab = len(tiny_tokenizer)
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(**tiny_config_kwargs("llama", vocab))).eval()
    with torch.no_grad():
        teacher.lm_head.weight.mul_(8.0)  # a peaked teacher: the loss is not near zero
    student = LlamaForCausalLM(LlamaConfig(**tiny_config_kwargs("llama", vocab, layers=1)))
    encoder = Encoder(tiny_tokenizer, Formatting("causal", 32, 12))
    rows = tiny_pairs(6)
    pairs = [Pair(encoder.prompt_ids(r["input"]), encoder.target_ids(r["target"])) for r in rows]
    batch = collate_training([(p.prompt, p.target) for p in pairs], "causal", tiny_tokenizer.pad_token_id)

    local = LocalTeacher()
    local.module = local.runner = HiddenStateLM(teacher)
    cross = CrossTokenizerTeacher(tiny_tokenizer, SparseSpec(vocab, 0), "teacher.tokenizer=tiny")
    cross.module = cross.runner = local.module
    pool = TrainingPool(encoder, datasets.Dataset.from_list(rows), None, ["gold"])
    cpu = torch.device("cpu")
    cross.ready(pool, TeacherNeeds(encoder, DistInfo(0, 1, 0, cpu), epochs=1, vocab_size=vocab, batch_size=6,
                                   device=cpu))
    sparse = dict(batch)
    assert cross.prepare(pool, pairs, sparse) == pytest.approx(0.0, abs=1e-4)  # the whole vocabulary: no tail
    assert sparse["teacher_top_ids"].shape[-1] == vocab

    config = KDLossConfig(ce_weight=0.5)

    def loss_and_grads(teacher_signal, b):
        student.zero_grad()
        lm = HiddenStateLM(student)
        weight, bias = lm.head()
        with teacher_signal.signal(b) as signal:
            out = signal.loss(StudentHead(lm(b), weight, bias, vocab), b, config, b["target_mask"].sum())
        out.loss.backward()
        return out.loss.detach(), [p.grad.clone() for p in student.parameters() if p.grad is not None]

    dense_loss, dense_grads = loss_and_grads(local, batch)
    carried_loss, carried_grads = loss_and_grads(cross, sparse)
    assert dense_loss > 0.1
    torch.testing.assert_close(carried_loss, dense_loss, rtol=1e-5, atol=1e-6)
    assert len(carried_grads) == len(dense_grads)
    for mine, theirs in zip(carried_grads, dense_grads):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-6)
    assert cross.carrier.stats.aligned == cross.carrier.stats.positions  # every position coincided


# -- (b) two real tokenizers: what is carried where --------------------------------------------------------------


def test_where_boundaries_coincide_the_teacher_probabilities_carry_exactly(tiny_tokenizer, student_tokenizer):
    teacher, student = tiny_tokenizer, student_tokenizer
    assert teacher.get_vocab() != student.get_vocab()
    carrier = Carrier(teacher, student)
    s_target, t_target = _target(student, TEXT), _target(teacher, TEXT)
    s_spans, t_spans = _spans(student, s_target), _spans(teacher, t_target)
    coinciding = [i for i, span in enumerate(s_spans) if span in t_spans]
    assert 0 < len(coinciding) < len(s_target)  # the two tokenizations agree in places, not everywhere
    # the teacher's mass on vocabulary entries both tokenizers have (each is its own student token)
    s_vocab = student.get_vocab()
    shared = [t for entry, t in teacher.get_vocab().items() if entry in s_vocab and t >= 4]
    view = _view(teacher, t_target, support=shared)
    ids, logprobs = carrier.carry(s_target, view)
    for i in coinciding:
        j = t_spans.index(s_spans[i])
        expected = {}
        for t, value in zip(view.alt_ids[j], view.alt_logprobs[j]):
            if value > -math.inf:
                entry = student.convert_tokens_to_ids(teacher.convert_ids_to_tokens(int(t)))
                expected[entry] = expected.get(entry, 0.0) + math.exp(value)
        carried = _carried(ids[i], logprobs[i])
        assert carried.keys() == expected.keys(), i
        for token, p in expected.items():
            assert carried[token] == pytest.approx(p, rel=1e-5, abs=1e-7)


def test_a_student_token_over_several_teacher_tokens_gets_their_product_and_one_inside_a_token_is_conditioned(
        tiny_tokenizer, student_tokenizer):
    """With the teacher 90% sure of each of its tokens: a student token spanning n of them gets 0.9^n (the chain
    rule along the teacher's path); with the roles swapped, a student token starting inside a teacher token gets
    the teacher's distribution given what is written of that token (its own token, nearly surely)."""
    chains = inside = 0
    for teacher, student in ((tiny_tokenizer, student_tokenizer), (student_tokenizer, tiny_tokenizer)):
        carrier = Carrier(teacher, student)
        s_target, t_target = _target(student, TEXT), _target(teacher, TEXT)
        s_spans, t_spans = _spans(student, s_target), _spans(teacher, t_target)
        ids, logprobs = carrier.carry(s_target, _view(teacher, t_target, peak=0.9))
        starts = [a for a, _ in t_spans]
        for i, (start, end) in enumerate(s_spans):
            p = _carried(ids[i], logprobs[i]).get(s_target[i], 0.0)
            if start in starts:  # a teacher token starts here: the teacher tokens the student token spans multiply
                spanned = max(1, sum(1 for a, _ in t_spans if start <= a < end))
                chains += spanned > 1
                # the teacher's path, plus what its other tokens (a few 1e-4 each) carry to the same token
                assert 0.9 ** spanned - 1e-6 <= p <= 0.9 ** spanned + 0.01, (i, spanned, p)
            else:
                inside += 1
                assert p > 0.95, (i, p)  # 0.9 renormalized over the few teacher tokens that fit what is written
        assert carrier.stats.inside == sum(1 for start, _ in s_spans if start not in starts)
    assert chains > 0 and inside > 0


# -- (b), (c) and caching: `dskd distill` across tokenizers -------------------------------------------------------


def _distill_recipe(task, out, tmp_path_factory, student_tokenizer, **distill):
    teacher_dir = tmp_path_factory.getbasetemp() / "peaked_llama_teacher"
    if not teacher_dir.exists():
        save_peaked_llama(teacher_dir, task / "tokenizer")
    student_dir = student_tokenizer.name_or_path
    student_config = {k: v for k, v in tiny_config_kwargs("llama", 0, layers=1).items() if k != "vocab_size"}
    return tiny_recipe(task, out, "llama",
                       teacher={"init": "pretrained", "path": str(teacher_dir), "tokenizer": None, "finetune": False,
                                "config": {}, "cache_top_k": 8, "cache_tail_samples": 8},
                       student={"init": "config", "model_type": "llama", "config": student_config,
                                "tokenizer": student_dir},
                       distill={"sources": ["gold"], "student_pt_ratio": 0.5, "eval_examples": 0, "epochs": 3,
                                "max_steps": 8, "optim": {"lr": 1e-2, "warmup_steps": 1}, **distill})


@pytest.fixture(scope="module")
def live_run(tiny_task, tmp_path_factory, student_tokenizer):
    """One `dskd distill` with a local teacher of another tokenizer and Joint-Teaching, recording what the teacher
    read on each Joint-Teaching micro-batch."""
    from dskd.joint_teaching import JointTeaching
    from dskd.stages.train import train_stage
    from dskd.teachers import CrossTokenizerTeacher

    out = tmp_path_factory.mktemp("live")
    seen = {"samples": [], "teacher_batches": []}
    original_targets, original_forward = JointTeaching.targets, CrossTokenizerTeacher._forward

    def targets(self, student, encoder, micro_index, pairs, *, synced_gpus):
        chosen, from_student = original_targets(self, student, encoder, micro_index, pairs, synced_gpus=synced_gpus)
        if from_student:
            seen["samples"].append(chosen)
        return chosen, from_student

    def forward(self, batch):
        seen["teacher_batches"].append(batch)
        return original_forward(self, batch)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(JointTeaching, "targets", targets)
        patch.setattr(CrossTokenizerTeacher, "_forward", forward)
        result = train_stage(load_recipe(base=_distill_recipe(tiny_task, out, tmp_path_factory, student_tokenizer)),
                             "distill")
    return result, seen, out


def test_distill_across_tokenizers_trains(live_run, student_tokenizer):
    from transformers import AutoTokenizer

    result, seen, out = live_run
    assert len(result.losses) == 8 and all(math.isfinite(loss) and loss > 0 for loss in result.losses)
    assert sum(result.losses[-3:]) < sum(result.losses[:3])  # decreasing-ish over 8 steps
    exported = AutoTokenizer.from_pretrained(out / "students" / "student" / "model")
    assert exported.get_vocab() == student_tokenizer.get_vocab()  # the student keeps its own tokenizer


def test_joint_teaching_samples_reach_the_teacher_in_its_own_tokens(live_run, tiny_tokenizer, student_tokenizer):
    """Every micro-batch of student samples was decoded and encoded again with the teacher's tokenizer: the rows
    the teacher read are its own ids for the samples' texts (prompt, separator, target, EOS)."""
    _, seen, _ = live_run
    assert seen["samples"]
    by_first_row = {tuple(b["input_ids"][0][b["attention_mask"][0].bool()].tolist()): b
                    for b in seen["teacher_batches"]}
    teacher, student = tiny_tokenizer, student_tokenizer
    separator = teacher("\n=> ", add_special_tokens=False)["input_ids"]
    checked = 0
    for pairs in seen["samples"]:
        expected = []
        student_separator = student("\n=> ", add_special_tokens=False)["input_ids"]
        for pair in pairs:
            assert pair.prompt[0] == student.bos_token_id and pair.prompt[-len(student_separator):] == student_separator
            source = student.decode(pair.prompt[1:-len(student_separator)], skip_special_tokens=True,
                                    clean_up_tokenization_spaces=False)
            text = "".join(token_pieces(student, pair.target))  # the sample's text (dskd.tokens)
            expected.append([teacher.bos_token_id, *teacher(source, add_special_tokens=False)["input_ids"],
                             *separator, *teacher(text, add_special_tokens=False)["input_ids"],
                             teacher.eos_token_id])
        batch = by_first_row.get(tuple(expected[0]))
        assert batch is not None, "no teacher batch holds the samples in the teacher's tokens"
        rows = [row[mask.bool()].tolist() for row, mask in zip(batch["input_ids"], batch["attention_mask"])]
        assert rows == expected
        checked += 1
    assert checked == len(seen["samples"])


def test_the_cached_signal_across_tokenizers_is_the_carried_one(live_run, tiny_task, tmp_path_factory,
                                                                  student_tokenizer):
    """teacher.signal=cached stores the carried top-k (student ids, one row per student target token): a run
    reading it (its Joint-Teaching samples carried live) trains exactly like the live run."""
    from dskd.stages.train import train_stage
    from dskd.teacher_cache import TeacherCache

    live, _, _ = live_run
    out = tmp_path_factory.mktemp("cached")
    reads, original = [], TeacherCache.sparse_batch

    def counted(self, keys, target_mask):
        reads.append(len(keys))
        return original(self, keys, target_mask)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(TeacherCache, "sparse_batch", counted)
        cached = train_stage(load_recipe(base=_distill_recipe(tiny_task, out, tmp_path_factory, student_tokenizer),
                                         overrides=["teacher.signal=cached"]), "distill")
    assert len(reads) == 8  # 8 steps x 2 micro-batches: every gold one read from the cache, the samples live
    assert cached.losses == pytest.approx(live.losses, rel=1e-5)
    meta = json.loads((out / "teacher_cache" / "meta.json").read_text())
    assert meta["teacher_runtime"]["cross_tokenizer"]["carry"]
    cache = TeacherCache(out / "teacher_cache")
    cache.refresh()
    assert len(cache) == 48  # every gold pair, keyed by its student ids
    for key in list(cache._rows)[:5]:
        ids, _ = cache.entry(key)
        assert ids.shape[1] == 16 and int(ids.max()) < len(student_tokenizer)


# -- (d) bad input -----------------------------------------------------------------------------------------------


def test_a_slow_tokenizer_is_refused_naming_its_key_before_any_model_loads(tiny_task, tmp_path, monkeypatch):
    from transformers import ByT5Tokenizer

    from dskd.stages.train import train_stage

    ByT5Tokenizer().save_pretrained(tmp_path / "slow")  # a Python tokenizer: no offsets, no Rust backend
    student = {"init": "config", "model_type": "t5", "tokenizer": str(tmp_path / "slow"),
               "config": {"d_model": 32, "d_ff": 64, "num_layers": 1, "num_decoder_layers": 1, "num_heads": 2,
                          "d_kv": 16, "dropout_rate": 0.0}}
    recipe = load_recipe(base=tiny_recipe(tiny_task, tmp_path / "run", teacher={"finetune": False}, student=student,
                                          distill={"sources": ["gold"], "student_pt_ratio": 0.0}))

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built before the tokenizers were checked")

    monkeypatch.setattr("dskd.stages.train.build_model", no_model)
    with pytest.raises(ConfigError, match=r"student\.tokenizer=.*slow.*ByT5Tokenizer.*offset mapping"):
        train_stage(recipe, "distill")


def test_texts_the_teacher_cannot_reproduce_are_refused(tiny_tokenizer):
    from tokenizers import normalizers

    rows = tiny_pairs(8)
    targets = [_target(tiny_tokenizer, r["target"]) for r in rows]
    assert check_alignable(tiny_tokenizer, tiny_tokenizer, targets, "teacher.tokenizer=same") == 1.0
    mangling = bpe_tokenizer(CORPUS, 300, normalizer=normalizers.Replace(
        __import__("tokenizers").Regex("[A-Za-z]"), "#"))  # every letter becomes '#'
    with pytest.raises(ConfigError, match=r"teacher\.tokenizer=mangled.*does not reproduce.*distill\.loss=ce"):
        check_alignable(mangling, tiny_tokenizer, targets, "teacher.tokenizer=mangled")


@pytest.mark.parametrize("distill, match", [
    ({"attention_relation_weight": 0.5}, "attention-relation KD"),
    ({"divergence": "reverse_kl"}, "forward_kl at temperature 1.0 only"),
])
def test_objectives_that_need_one_tokenizer_are_refused_naming_the_key(tiny_task, tmp_path, tiny_tokenizer,
                                                                       student_tokenizer, distill, match):
    from dskd.teachers import teacher_for

    recipe = load_recipe(base=tiny_recipe(tiny_task, tmp_path, distill=distill))
    with pytest.raises(ConfigError, match=match):
        teacher_for(recipe, (tiny_tokenizer, student_tokenizer))
    assert type(teacher_for(recipe, (tiny_tokenizer, tiny_tokenizer))).__name__ != "CrossTokenizerTeacher"
