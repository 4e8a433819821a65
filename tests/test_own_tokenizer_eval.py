"""Each model is evaluated with its own tokenizer (issue 18, point 4): `dskd evaluate` and a study cell
(`dskd.evaluation.Evaluator`) encode a student's prompts and decode its generations with the tokenizer saved
next to it, not the teacher's; the MLflow model a buffered record logs is logged with the export's tokenizer.

The teacher and the student here are tiny random Llamas with two byte-level BPE tokenizers of other
vocabularies and merges, chosen so that the student's generated ids read as other text in the teacher's
tokenizer: a path that decodes the student with the teacher's tokenizer fails these tests.
"""

from __future__ import annotations

import pytest

from dskd.config import load_recipe
from dskd.data.collate import Encoder, Formatting
from dskd.generation import generate_ids
from dskd.models import load_model
from dskd.stages.evaluate import run_evaluate
from tests.conftest import bpe_tokenizer, save_peaked_llama, tiny_config_kwargs, tiny_pairs, tiny_recipe

STUDENT = "own_tok"


@pytest.fixture(scope="module")
def setup(tiny_task, tiny_tokenizer, tmp_path_factory):
    """A recipe whose teacher (task tokenizer, 300 tokens) and exported student (its own ~420-token tokenizer,
    saved next to its weights only) are on disk; tracking off."""
    rows = tiny_pairs(64) + tiny_pairs(32, offset=100)
    student_tok = bpe_tokenizer([text for r in rows for text in (r["target"], r["input"])] * 3, 420)
    assert student_tok.get_vocab() != tiny_tokenizer.get_vocab()
    root = tmp_path_factory.mktemp("own_tok")
    tok_dir = root / "student_tokenizer"
    student_tok.save_pretrained(tok_dir)
    teacher_dir = save_peaked_llama(root / "teacher", tiny_task / "tokenizer")
    out = root / "out"
    model_dir = out / "students" / STUDENT / "model"
    save_peaked_llama(model_dir, tok_dir, vocab_size=len(student_tok), num_hidden_layers=1)
    student_cfg = {k: v for k, v in tiny_config_kwargs("llama", 0, layers=1).items() if k != "vocab_size"}
    recipe = load_recipe(base=tiny_recipe(
        tiny_task, out, "llama", tracking={"enabled": False},
        teacher={"init": "pretrained", "path": str(teacher_dir), "tokenizer": None, "finetune": False, "config": {}},
        student={"name": STUDENT, "init": "config", "model_type": "llama", "config": student_cfg,
                 "tokenizer": str(tok_dir)},
        evaluate={"splits": ["dev"], "max_examples": 6, "efficiency_batch_size": 2, "efficiency_repeats": 1,
                  "decoding": {"max_new_tokens": 8, "batch_size": 8}}))
    return recipe, {"teacher": (recipe.teacher, teacher_dir, tiny_tokenizer),
                    f"student:{STUDENT}": (recipe.student, model_dir, student_tok)}


def _generated(recipe, spec, path, tokenizer, inputs: list[str]) -> list[list[int]]:
    """The ids the model at `path` generates for `inputs` encoded with `tokenizer` (the recipe's decoding)."""
    model = load_model(spec, path=str(path)).eval()
    encoder = Encoder(tokenizer, Formatting.from_data(recipe.data, "causal"))
    ids = generate_ids(model, encoder, encoder.prompt_ids_batch(inputs), recipe.evaluate.decoding, seed=0)
    return [group[0] for group in ids]


def _decoded(tokenizer, ids: list[list[int]]) -> list[str]:
    return [text.strip() for text in tokenizer.batch_decode(ids, skip_special_tokens=True)]


def _dev_inputs(recipe) -> list[str]:
    import json

    with open(recipe.data.dev) as fh:
        return [json.loads(line)["input"] for line in fh][: recipe.evaluate.max_examples]


def _check(recipe, models, predictions_of) -> None:
    """Every model's predictions are its own generations decoded with its own tokenizer; the student's read
    otherwise in the teacher's tokenizer (so a path using the teacher's tokenizer would be caught)."""
    inputs = _dev_inputs(recipe)
    teacher_tok = models["teacher"][2]
    for name, (spec, path, tokenizer) in models.items():
        ids = _generated(recipe, spec, path, tokenizer, inputs)
        assert any(len(g) > 2 for g in ids), f"{name} generates (almost) nothing: the test would prove nothing"
        own = _decoded(tokenizer, ids)
        assert predictions_of(name) == own, name
        if name.startswith("student:"):
            assert own != _decoded(teacher_tok, ids), "the student's ids read the same in the teacher's tokenizer"
            assert predictions_of(name) != _decoded(teacher_tok, ids)


def _one(predictions: dict[str, list[str]], name: str) -> list[str]:
    """The predictions of model `name` on the only evaluation set ('dev_subset6/<name>', or 'dev/<name>')."""
    found = [v for k, v in predictions.items() if k.split("/", 1)[1] == name]
    assert len(found) == 1, sorted(predictions)
    return found[0]


def test_dskd_evaluate_decodes_each_model_with_its_own_tokenizer(setup):
    recipe, models = setup
    report = run_evaluate(recipe)
    _check(recipe, models, lambda name: _one(report.predictions, name))


def test_a_study_cell_scores_its_student_with_its_own_tokenizer(setup):
    """As `dskd study` does: one Evaluator with the task's (teacher's) tokenizer; the teacher scored by default,
    each cell's student with `own_tokenizer=True`."""
    from dskd.data.task import load_task
    from dskd.evaluation import Evaluator
    from dskd.teachers import teacher_for

    recipe, models = setup
    task = load_task(recipe, True, needed=("labeled", "dev"))
    evaluator = Evaluator.from_recipe(recipe, task, teacher_for(recipe).tokenizer(recipe, task), _cpu())
    scored = {"teacher": evaluator.evaluate(recipe.teacher, models["teacher"][1]),
              f"student:{STUDENT}": evaluator.evaluate(recipe.student, models[f"student:{STUDENT}"][1],
                                                       own_tokenizer=True)}
    _check(recipe, models, lambda name: scored[name].sets["dev"].scores.predictions)


def test_the_logged_mlflow_model_carries_the_exports_tokenizer(setup, monkeypatch):
    """A buffered model record is logged with the tokenizer saved in its export directory (the student's)."""
    from dskd.tracking import models as tracking_models

    _, models = setup
    _, model_dir, student_tok = models[f"student:{STUDENT}"]
    logged = {}
    monkeypatch.setattr(tracking_models, "log_hf_model",
                        lambda uri, run_id, record, model, tokenizer: logged.update(tokenizer=tokenizer))
    tracking_models.log_model_record("sqlite:///unused.db", "run", {
        "flavor": "transformers", "model_dir": str(model_dir), "task": "text-generation", "name": "student",
        "registered_name": None})
    assert logged["tokenizer"].get_vocab() == student_tok.get_vocab()


def _cpu():
    import torch

    return torch.device("cpu")
