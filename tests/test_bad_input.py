"""Bad input as users met it (issue 11, item 7): every case ends in a clear error or a counted, printed warning.

  a/b/c  recipe, path and data-schema errors: one `dskd: error:` line, exit 2, before torch/DeepSpeed load;
         data errors found later (past the first rows) look the same
  d/e    empty targets and over-long inputs/targets: counted per split, printed, logged to MLflow
  f      divergence (lr 1e4, overflowing gradients): TrainingDiverged with the step, the last good state kept
  g      student.tokenizer is honoured; logits KD across two vocabularies is a clear error
  h      Ctrl-C checkpoints at the next safe point (exit 75, `--resume auto` continues); a second one aborts
  i      the tokenizer sizes actually used are logged
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml

from dskd import checkpoint
from dskd.config import ConfigError, load_recipe
from tests.conftest import CORPUS, launch_env, tiny_config_kwargs, tiny_pairs, tiny_recipe

HEAVY = ("torch", "transformers", "datasets", "deepspeed", "pandas")
SMALL_STUDENT = {"init": "config", "model_type": "t5", "tokenizer": None,
                 "config": {"d_model": 32, "d_ff": 64, "num_layers": 1, "num_decoder_layers": 1, "num_heads": 2,
                            "d_kv": 16, "dropout_rate": 0.0}}


def _write_recipe(tmp_path: Path, recipe: dict, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe))
    return path


def _run_cli(*args: str, cwd: Path) -> tuple[int, str, float, list[str]]:
    """`dskd ARGS` in a fresh interpreter: (exit code, stderr, seconds, heavy modules it imported)."""
    probe = ("import sys\nfrom dskd.cli import main\nrc = main(sys.argv[1:])\n"
             f"print('HEAVY', [m for m in {HEAVY!r} if m in sys.modules])\nsys.exit(rc)\n")
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", probe, *args], check=False, capture_output=True, text=True,
                          timeout=300, cwd=cwd, env=launch_env())
    seconds = time.perf_counter() - started
    heavy = json.loads(proc.stdout.split("HEAVY", 1)[1].strip().replace("'", '"')) if "HEAVY" in proc.stdout else None
    return proc.returncode, proc.stderr, seconds, heavy


def _metrics(out_dir: Path, run_name: str) -> tuple[dict[str, float], dict[str, str], object]:
    client = mlflow.MlflowClient(f"sqlite:///{out_dir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tests")
    (run,) = [r for r in client.search_runs([exp.experiment_id]) if r.info.run_name == run_name]
    return run.data.metrics, run.data.params, run


# ------------------------------------------------------------------------------- a, b, c: fast, one line


def _user_data(tmp_path: Path) -> Path:
    rows = [{"src": f"def f{i}(x):\n    return x + {i}", "tgt": f"Add {i}."} for i in range(40)]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


BASE = {"data": {"input_field": "src", "target_field": "tgt"},
        "teacher": {"init": "config", "model_type": "t5", "tokenizer": "TOK"},
        "student": {"init": "config", "model_type": "t5"}, "distill": {"sources": ["gold"]}}


def _bad_recipes(tmp_path: Path, tok: str) -> dict[str, tuple[dict, list[str]]]:
    """name -> (recipe, what the one error line must say)."""
    data = _user_data(tmp_path)
    malformed = tmp_path / "malformed.jsonl"
    malformed.write_text(data.read_text().replace("\n", "\n{oops\n", 1))  # line 2 is not JSON
    no_column = tmp_path / "d.csv"
    no_column.write_text("code,tgt\na,b\n")

    def recipe(**changes) -> dict:
        r = json.loads(json.dumps(BASE).replace("TOK", tok))
        r["data"]["labeled"] = str(data)
        for dotted, value in changes.items():
            section, key = dotted.split("__")
            r[section][key] = value
        return r

    misspelled = recipe()
    misspelled["distill"]["lr_rate"] = 0.1
    return {
        "misspelled key": (misspelled, ["unknown key 'distill.lr_rate'", "valid keys here"]),
        "missing data file": (recipe(data__labeled=str(tmp_path / "nope.jsonl")),
                              [f"data.labeled={tmp_path / 'nope.jsonl'}: file not found"]),
        "missing field": (recipe(data__target_field="summary"),
                          [f"{data}:1: no field 'summary'", "available: src, tgt", "data.target_field"]),
        "missing CSV column": (recipe(data__labeled=str(no_column)),
                               [f"{no_column}:2: no field 'src'", "data.input_field"]),
        "malformed line": (recipe(data__labeled=str(malformed)),
                           [f"{malformed}:2: invalid JSON", '{"src": ..., "tgt": ...}']),
        "missing teacher.path": (recipe(teacher__init="pretrained", teacher__path="checkpoints/teacher",
                                        teacher__tokenizer=None),
                                 ["teacher.path=checkpoints/teacher: no such directory",
                                  "no Hugging Face hub model of that name is cached"]),
        "missing student.path": (recipe(student__init="pretrained", student__path=str(tmp_path / "student")),
                                 [f"student.path={tmp_path / 'student'}: no such directory"]),
        "missing tokenizer": (recipe(teacher__tokenizer=str(tmp_path / "tok")),
                              [f"teacher.tokenizer={tmp_path / 'tok'}: no such directory"]),
    }


def test_recipe_path_and_schema_errors_are_one_line_exit_2_before_heavy_imports(tmp_path, tiny_task):
    for name, (recipe, expected) in _bad_recipes(tmp_path, str(tiny_task / "tokenizer")).items():
        rc, stderr, seconds, heavy = _run_cli("distill", "--config", str(_write_recipe(tmp_path, recipe)),
                                              cwd=tmp_path)
        assert rc == 2, (name, stderr[-2000:])
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert lines[0].startswith("dskd: error: "), (name, stderr)
        if name != "misspelled key":  # pydantic lists the valid keys on a second line
            assert len(lines) == 1, (name, stderr)
        for text in expected:
            assert text in stderr, (name, text, stderr)
        assert heavy == [], f"{name}: {heavy} imported before the error"  # what made errors take 32-43 s
        assert seconds < 20, f"{name}: {seconds:.1f} s"  # ~1 s on a quiet machine; generous for a loaded one


def test_the_teacher_stage_without_teacher_finetune_is_refused_before_anything_loads(tmp_path, tiny_task):
    recipe = json.loads(json.dumps(BASE).replace("TOK", str(tiny_task / "tokenizer")))
    recipe["data"]["labeled"] = str(_user_data(tmp_path))
    recipe["run"] = {"output_dir": str(tmp_path / "out")}
    rc, stderr, _, heavy = _run_cli("teacher", "--config", str(_write_recipe(tmp_path, recipe)), cwd=tmp_path)
    assert rc == 2, stderr[-3000:]
    assert "dskd: error: teacher.finetune is false" in stderr and "teacher.finetune=true" in stderr
    assert heavy == [] and not (tmp_path / "out").exists()


def test_a_data_error_past_the_first_rows_is_the_same_one_line_exit_2(tmp_path, tiny_task):
    """Rows beyond the preflight's first ones are checked when the split loads (after torch): same presentation."""
    rows = [json.dumps({"src": f"def f{i}(): pass", "tgt": f"Do {i}."}) for i in range(12)]
    rows[8] = rows[8][:-3]  # line 9 is cut off
    data = tmp_path / "late.jsonl"
    data.write_text("\n".join(rows) + "\n")
    recipe = json.loads(json.dumps(BASE).replace("TOK", str(tiny_task / "tokenizer")))
    recipe["data"]["labeled"] = str(data)
    recipe["run"] = {"output_dir": str(tmp_path / "out")}
    recipe["teacher"]["finetune"] = True
    rc, stderr, _, _ = _run_cli("teacher", "--config", str(_write_recipe(tmp_path, recipe)), cwd=tmp_path)
    assert rc == 2, stderr[-3000:]
    assert "Traceback" not in stderr and "[rank0]" not in stderr, stderr[-3000:]
    assert f"dskd: error: {data}:9: invalid JSON" in stderr and '{"src": ..., "tgt": ...}' in stderr


def test_missing_field_in_the_loader_names_the_recipe_key(tmp_path):
    from dskd.data.sources import DataError, load_split

    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"code": "x", "tgt": "y"}) + "\n")
    with pytest.raises(DataError, match=r"d.jsonl:1: no field 'src' \(available: code, tgt\); "
                                        r"data.input_field='src' names the input field"):
        load_split(str(path), split="labeled", input_field="src", target_field="tgt")
    assert issubclass(DataError, ConfigError)  # one presentation in the CLI


# --------------------------------------------------------------------- d, e, i: counted, printed, logged


def test_empty_targets_and_truncation_are_counted_printed_and_logged(tmp_path, tiny_task, tiny_tokenizer, capsys):
    from dskd.stages.train import train_stage

    rows = tiny_pairs(40)
    for i in (3, 17):
        rows[i]["target"] = "   "
    for i in range(0, 40, 3):  # long inputs: past data.max_input_tokens=32
        rows[i]["input"] = rows[i]["input"] + " # padding words" * (6 + i)
    rows[5]["target"] = "Return the value, " * 8  # a target past data.max_target_tokens=12
    data = tmp_path / "labeled.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    kept = [r for r in rows if r["target"].strip()]
    # What the limits cut, computed here independently: seq2seq prompt = source + EOS, target = tokens + EOS.
    in_lengths = [len(tiny_tokenizer(r["input"], add_special_tokens=False)["input_ids"]) + 1 for r in kept]
    out_lengths = [len(tiny_tokenizer(r["target"], add_special_tokens=False)["input_ids"]) + 1 for r in kept]
    long_inputs, long_targets = sum(n > 32 for n in in_lengths), sum(n > 12 for n in out_lengths)
    assert long_inputs > 5 and long_targets >= 1

    recipe = load_recipe(base=tiny_recipe(tiny_task, tmp_path / "out", data={"labeled": str(data)}, teacher={
        "train": {"max_steps": 1, "micro_batch_size": 8, "eval_examples": 0}}))
    train_stage(recipe, "teacher")
    out, err = capsys.readouterr()
    assert f"data.labeled: 40 rows read, 38 kept ({data})" in out
    assert "data.labeled: 2 of 40 rows skipped: an empty target (field 'target', data.target_field)" in err
    assert (f"data.labeled: {long_inputs} of 38 inputs are longer than data.max_input_tokens=32 tokens and are "
            f"truncated (longest: {max(in_lengths)} tokens)") in err
    assert (f"data.labeled: {long_targets} of 38 targets are longer than data.max_target_tokens=12 tokens and "
            f"are truncated (longest: {max(out_lengths)} tokens)") in err
    metrics, params, _ = _metrics(tmp_path / "out", "teacher")
    assert metrics["data/labeled/skipped_empty_target"] == 2
    assert metrics["data/labeled/truncated_inputs"] == long_inputs
    assert metrics["data/labeled/longest_input_tokens"] == max(in_lengths)
    assert metrics["data/labeled/truncated_targets"] == long_targets
    assert "data/dev/truncated_inputs" in metrics and "data/dev/truncated_targets" not in metrics  # references
    assert params["data/tokenizer_vocab_size_used"] == str(len(tiny_tokenizer))  # (i)


def test_encoder_measure_counts_like_the_encoder(tiny_tokenizer):
    from dskd.data.collate import Encoder, Formatting

    encoder = Encoder(tiny_tokenizer, Formatting("causal", 8, 4, " =>"))
    texts = ["def add(a, b): return a + b", "x", "the quick brown fox jumps " * 3]
    targets = ["Return the sum of two numbers.", "ok"]
    counter = encoder.measure(texts, targets)
    encoder.prompt_ids_batch(texts)
    encoder.target_ids_batch(targets)
    assert counter == encoder.truncated  # same rules, and measure() left the encoder's own count alone
    assert counter.seen_inputs == 3 and counter.inputs == 2 and counter.longest_input > 8


# ------------------------------------------------------------------------------------------- f: divergence


def test_lr_1e4_stops_with_the_step_and_no_diverged_checkpoint_to_resume(tiny_task, tmp_path):
    """The user's run: a decoder-only model at lr 1e4 collapses to a uniform distribution (loss ln V, frozen)
    while its weights grow; it used to export "successfully"."""
    from dskd.stages.train import train_stage
    from dskd.trainer import STALL_STEPS, TrainingDiverged

    recipe = load_recipe(base=tiny_recipe(tiny_task, tmp_path, "llama", teacher={"train": {
        "epochs": 12, "micro_batch_size": 8, "eval_examples": 0, "save_every": 1, "log_every": 1,
        "optim": {"lr": 1e4, "warmup_steps": 0, "schedule": "constant"}}}))
    with pytest.raises(TrainingDiverged, match=r"the loss has stalled since step (\d+)") as err:
        train_stage(recipe, "teacher")
    message = str(err.value)
    assert "Lower the learning rate (currently 10000.0)" in message
    since = int(message.split("since step ")[1].split()[0])
    _, _, run = _metrics(tmp_path, "teacher")
    history = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_metric_history(run.info.run_id,
                                                                                            "train/loss")
    losses = [m.value for m in sorted(history, key=lambda m: m.step)]
    assert len(losses) == since + STALL_STEPS - 1  # stopped as soon as the stall lasted STALL_STEPS steps
    assert losses[-1] == pytest.approx(math.log(300), rel=1e-4)  # a uniform distribution over the vocabulary
    assert run.info.status == "FAILED"
    assert not (tmp_path / "teacher" / "model").exists()  # nothing exported
    ckpt = tmp_path / "teacher" / "checkpoints"
    good = [p.name for p in ckpt.glob("step*") if int(p.name[4:]) < since - 1]
    assert checkpoint.latest(ckpt) == (max(good) if good else None)  # --resume auto never picks a diverged state
    assert any(int(p.name[4:]) >= since for p in ckpt.glob("step*"))  # (those were written, and are not pointed at)


def _direct_trainer(tiny_tokenizer, tmp_path, zero_stage: int, steps: int = 3):
    """A Trainer on a tiny T5 pair with CE only (no teacher), driven without the stage."""
    import datasets
    import torch
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    from dskd.config import OptimConfig, TrackingConfig, TrainConfig
    from dskd.data.collate import Encoder, Formatting
    from dskd.engines import create_student_engine, init_distributed
    from dskd.losses import KDLossConfig
    from dskd.objectives import TrainingPool
    from dskd.student import StudentWithLoss
    from dskd.teachers import NoTeacher
    from dskd.tracking import Tracker
    from dskd.trainer import Phase, TrainContext, Trainer

    dist = init_distributed("cpu")
    torch.manual_seed(1)
    model = AutoModelForSeq2SeqLM.from_config(AutoConfig.for_model("t5", **tiny_config_kwargs("t5", 300, 1)),
                                              attn_implementation="eager")
    encoder = Encoder(tiny_tokenizer, Formatting("seq2seq", 32, 12))
    pool = TrainingPool(encoder, datasets.Dataset.from_list(tiny_pairs(16)), None, ["gold"])
    train = TrainConfig(micro_batch_size=4, grad_accum=2, eval_examples=0, save_every=1, zero_stage=zero_stage,
                        optim=OptimConfig(lr=1e-3, warmup_steps=0))
    engine = create_student_engine(StudentWithLoss(model, 300), train, steps, dist, "fp32")
    engine.train()
    phase = Phase("ce", KDLossConfig(kd_weight=0.0, ce_weight=1.0), NoTeacher(), pool, steps=steps, seed=3)
    ctx = TrainContext(encoder, dist, train, Tracker(TrackingConfig(enabled=False), tmp_path), tmp_path / "ckpt")
    return Trainer(engine, [phase], ctx), model


@pytest.mark.parametrize("zero_stage,scale", [(0, math.inf), (1, math.inf), (0, 1e12), (1, 1e12)])
def test_an_overflowing_gradient_stops_at_its_step_with_the_state_before_it(zero_stage, scale, tiny_tokenizer,
                                                                            tmp_path):
    """ZeRO-0 fp32: the guard's own norm, before engine.step(). ZeRO-1: DeepSpeed's norm; it skips a non-finite
    update itself, and a finite one above the limit is applied (clipped), so the previous checkpoint is last good.
    A non-finite norm (from a finite loss) condemns the weights it was computed on as well."""
    import torch

    from dskd.trainer import GRAD_NORM_LIMIT, Trainer, TrainingDiverged, TrainState

    trainer, model = _direct_trainer(tiny_tokenizer, tmp_path, zero_stage)
    armed, after_step_1 = {"on": False}, {}
    weight = model.get_input_embeddings().weight
    weight.register_hook(lambda grad: grad * scale if armed["on"] else grad)
    original = Trainer.after_step

    def after_step(self, index, stats, phase_start):
        original(self, index, stats, phase_start)
        if self.state.step == 1:
            after_step_1.update({n: p.detach().clone() for n, p in model.named_parameters()})
            armed["on"] = True

    trainer.after_step = after_step.__get__(trainer)
    with pytest.raises(TrainingDiverged, match="the gradient norm .* at step 2") as err:
        trainer.fit(TrainState())
    message, ckpt = str(err.value), tmp_path / "ckpt"
    applied = zero_stage > 0 and math.isfinite(scale)
    assert ("is applied" in message) == applied
    if math.isfinite(scale):
        assert f"exceeds {GRAD_NORM_LIMIT:.0e}" in message
    else:
        assert "is not finite" in message
    if not math.isfinite(scale):  # an overflowing gradient from a finite loss means overflowing weights: the
        # state it was computed on (after step 1) is not trusted, the one before it (step 0) was never saved
        assert checkpoint.latest(ckpt) is None and "`--resume auto` starts afresh" in message
        assert "the weights were already broken by the update of step 1" in message
    elif applied:  # the clipped update is in the weights; the periodic checkpoint of step 1 is the last good state
        assert checkpoint.latest(ckpt) == "step00000001" and "step00000001" in message
    else:  # the update never happened: the weights are those after step 1, saved as last-good
        assert checkpoint.latest(ckpt) == "last-good-step00000001" and "last-good-step00000001" in message
        for name, param in model.named_parameters():
            torch.testing.assert_close(param.detach(), after_step_1[name], rtol=0, atol=0, msg=name)


# ------------------------------------------------------------------------------ g, i: the student's tokenizer


@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory):
    """A second tokenizer (320 tokens vs the task's 300), saved to a directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS + ["return self value token header"] * 4, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<pad>", "</s>", "<unk>", "<s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   bos_token="<s>")
    path = tmp_path_factory.mktemp("other_tok")
    fast.save_pretrained(path)
    return path, len(fast)


def test_kd_that_needs_one_tokenizer_across_two_is_a_clear_error(tiny_task, tmp_path, other_tokenizer):
    """Logits KD itself crosses tokenizers (tests/test_cross_tokenizer.py); attention relations cannot."""
    from dskd.stages.train import train_stage

    path, _ = other_tokenizer
    recipe = load_recipe(base=tiny_recipe(tiny_task, tmp_path, teacher={"finetune": False},
                                          student={**SMALL_STUDENT, "tokenizer": str(path)},
                                          distill={"sources": ["gold"], "student_pt_ratio": 0.0,
                                                   "attention_relation_weight": 0.5}))
    with pytest.raises(ConfigError, match=rf"is not the student's \(student.tokenizer={path}, .*attention-relation "
                                          r"KD.*needs one tokenizer"):
        train_stage(recipe, "distill")
    pruned = load_recipe(base=tiny_recipe(tiny_task, tmp_path, teacher={"finetune": False},
                                          student={"tokenizer": str(path)}))
    with pytest.raises(ConfigError, match=r"student.init=prune copies the teacher"):
        train_stage(pruned, "distill")


def test_student_tokenizer_is_honoured_for_sequence_level_kd(tiny_task, tmp_path, other_tokenizer, tiny_tokenizer):
    """distill.loss=ce on gold and teacher PTs: the student is built, trained (PT texts re-tokenized) and
    exported with its own tokenizer; the sizes used are logged (i)."""
    from transformers import AutoTokenizer

    from dskd.engines import init_distributed
    from dskd.models import load_model
    from dskd.stages.generate import run_generate
    from dskd.stages.train import TrainingStage, train_stage

    path, size = other_tokenizer
    base = tiny_recipe(tiny_task, tmp_path, teacher={"finetune": False},
                       student={**SMALL_STUDENT, "tokenizer": str(path)},
                       generate={"splits": ["labeled"]},
                       distill={"loss": "ce", "sources": ["gold", "teacher_pt"], "student_pt_ratio": 0.0,
                                "eval_examples": 4, "max_steps": 3})
    recipe = load_recipe(base=base)
    run_generate(recipe)
    job = TrainingStage(recipe, "distill", init_distributed("cpu"))
    job.setup_data()  # the teacher's PT texts, in the student's tokens
    other = AutoTokenizer.from_pretrained(path)
    assert job.pts["pt_ids"][0] == [other(text, add_special_tokens=False)["input_ids"] for text in job.pts["pts"][0]]
    result = train_stage(recipe, "distill")
    assert len(AutoTokenizer.from_pretrained(result.model_dir)) == size
    exported = load_model(recipe.student, path=str(result.model_dir))
    assert exported.get_input_embeddings().weight.shape[0] == size
    _, params, _ = _metrics(tmp_path, "distill-student")
    assert params["data/tokenizer_vocab_size_used"] == str(size)
    assert params["teacher/tokenizer_vocab_size_used"] == str(len(tiny_tokenizer))
    assert params["data.tokenizer_vocab_size"] == "4096"  # the recipe's own key, logged as written


# ------------------------------------------------------------------------------------------------ h: Ctrl-C


def _distill_process(recipe_path: Path, log: Path, *extra: str) -> subprocess.Popen:
    """`dskd distill` as a terminal would start it: SIGINT at its default (a test runner may ignore it)."""
    return subprocess.Popen([sys.executable, "-m", "dskd", "distill", "--config", str(recipe_path), *extra],
                            env=launch_env(PYTHONUNBUFFERED="1"), stdout=log.open("w"), stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for_checkpoint(proc: subprocess.Popen, ckpt: Path, log: Path) -> str:
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if tag := checkpoint.latest(ckpt):
            return tag
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint before the run ended: {log.read_text()[-3000:]}")


@pytest.mark.slow
def test_ctrl_c_checkpoints_exits_75_and_resumes_and_a_second_ctrl_c_aborts(tiny_task, tmp_path):
    recipe = tiny_recipe(tiny_task, tmp_path, teacher={"finetune": False}, student=SMALL_STUDENT,
                         distill={"epochs": 40, "save_every": 2, "sources": ["gold"], "student_pt_ratio": 0.0,
                                  "eval_examples": 0, "loss": "ce"})
    path, log = _write_recipe(tmp_path, recipe), tmp_path / "run.log"
    ckpt = tmp_path / "students" / "student" / "checkpoints"

    proc = _distill_process(path, log)
    first = _wait_for_checkpoint(proc, ckpt, log)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=300) == 75, log.read_text()[-3000:]
    out = log.read_text()
    assert "Ctrl-C: stopping at the next safe point" in out and "checkpoints; continue with --resume auto" in out
    assert "KeyboardInterrupt" not in out and "Traceback" not in out
    stopped = checkpoint.latest(ckpt)
    assert int(stopped.removeprefix("step")) > int(first.removeprefix("step"))  # saved at the Ctrl-C

    resumed = _distill_process(path, log, "--resume", "auto")
    assert resumed.wait(timeout=600) == 0, log.read_text()[-3000:]
    assert f"resumed from {ckpt / stopped}" in log.read_text()
    assert (tmp_path / "students" / "student" / "model" / "config.json").is_file()

    tags_before = sorted(p.name for p in ckpt.iterdir())
    again = _distill_process(path, log, "--force")
    while "data.labeled:" not in log.read_text() and again.poll() is None:  # printed before the engines start
        time.sleep(0.05)
    again.send_signal(signal.SIGINT)
    # Two SIGINTs that arrive while the main thread is inside one C call are one signal to Python: send the
    # second only once the first was handled (it announces itself).
    while "Ctrl-C: stopping at the next safe point" not in log.read_text() and again.poll() is None:
        time.sleep(0.02)
    again.send_signal(signal.SIGINT)
    assert again.wait(timeout=120) == 130, log.read_text()[-3000:]
    assert "aborted by a second Ctrl-C" in log.read_text()
    assert sorted(p.name for p in ckpt.iterdir()) == tags_before  # nothing saved
