"""`dskd <stage>`: one entry point for every stage; also `python -m dskd` and `deepspeed --module dskd`.

    dskd teacher  --config RECIPE [key.sub=value ...]   fine-tune the teacher on the labeled set
    dskd generate --config RECIPE [...]                 teacher pseudo-targets (K per input), resumable
    dskd distill  --config RECIPE [--resume auto]       train the student
    dskd distill|teacher ... --plan auto                first plan the job for this machine and apply the best plan
    dskd evaluate --config RECIPE [...]                 ROUGE/BLEU + efficiency, teacher vs students
    dskd demo [--quick]                                 all of the above on the embedded docstring task
    dskd study [--config RECIPE] [--quick]              the paper's comparison: variants x seeds, one report
    dskd serve-teacher --model DIR [--port P ...]       a local model as an OpenAI-compatible endpoint
    dskd plan --config RECIPE --nodes N --gpus-per-node G --gpu-memory 80GiB   placements, memory, time (no weights)
    dskd ui [OUTPUT_DIR] [--port P] [--host H]          the MLflow UI on a run directory, until Ctrl-C

Every user error is one line on stderr, `dskd: error: <what, where (file:line / recipe key), what to do>`, and
exit code 2: recipe errors, missing paths, bad data (`DataError` is a `ConfigError`). The recipe, the paths the
stage reads and the fields in the first rows of each data file are checked before torch, transformers or DeepSpeed
load (`_preflight`), so those errors take a fraction of a second. An output directory that cannot be written is
one of them: `dskd: error: cannot write <path>: <reason>; <what to do>`, exit 2, whether the preflight's write
probe finds it (read-only, no permission, full) or a write fails during the run (a disk that fills up: the stage's
MLflow run is ended FAILED; a finished stage is reused, `--resume auto` continues from the last complete
checkpoint). Other exit codes: 3 training diverged (`TrainingDiverged`, the last healthy state kept), 4 the PT
endpoint could not be reached, refused the API key or stopped answering, at the first request or later (one line
naming the URL and what to do; finished PTs kept, a rerun continues; an endpoint URL with user:password@ in it is
a recipe error, 2), 75 stopped by SIGUSR1/SIGTERM/Ctrl-C with the state saved (the message says how to continue:
`--resume auto` for teacher/distill, rerunning the same command for study, demo and generate), 130 Ctrl-C with
nothing saved: a second Ctrl-C, or any Ctrl-C outside the stage's stop handler (while the command starts: `dskd:
interrupted before anything started; nothing to save`; `serve-teacher` stopped; after the work ended), one line,
never a traceback. `dskd serve-teacher` exits 2 on a port in use or a host it cannot bind, before the model loads.
`--plan auto` (teacher, distill) plans after the preflight and before the heavy imports (`_auto_plan`): a job that
fits nowhere on this machine is exit 2, one line, then the plan's lines on what would fit.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from functools import partial
from importlib import resources
from pathlib import Path

from dskd import preemption
from dskd.config import ConfigError, Recipe, load_recipe, to_yaml
from dskd.gguf import check_model_source  # GGUF-aware; no torch
from dskd.data.sources import check_data_files
from dskd.layout import clear_done_markers, student_dir, teacher_model_path
from dskd.serve.options import add_arguments as add_serve_arguments
from dskd.study import describe, study_cells

STAGES = ("teacher", "generate", "distill", "evaluate", "demo", "study")
# How a stopped command continues (exit 75): only teacher/distill take --resume.
HOW_TO_CONTINUE = {
    "teacher": "continue with --resume auto", "distill": "continue with --resume auto",
    "generate": "rerun the same command to continue (stored PTs are kept)",
    "study": "rerun the same `dskd study` command to continue (finished cells are reused; the interrupted cell "
             "resumes from its checkpoint)",
    "demo": "rerun `dskd demo` to continue (finished stages are reused; the interrupted one starts over)",
    "evaluate": "rerun the same command",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dskd", description="Knowledge distillation for text generation "
                                     "(logits KD, pseudo-targets, Joint-Teaching) on DeepSpeed.")
    # The deepspeed launcher passes --local_rank=N before the stage; torch.distributed sets LOCAL_RANK instead.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    helps = {"teacher": "fine-tune the teacher on the labeled set",
             "generate": "generate teacher pseudo-targets for labeled and unlabeled inputs",
             "distill": "distill the student (objective from the recipe)",
             "evaluate": "task metrics and efficiency of teacher and students",
             "demo": "the whole pipeline on the embedded docstring-generation task",
             "study": "compare distillation objectives: variants x seeds, one teacher, a report with statistics"}
    for stage in STAGES:
        p = sub.add_parser(stage, help=helps[stage], description=helps[stage])
        if stage == "study":
            p.add_argument("--config", help="a recipe with a study section, or a shipped one by name: study_smollm2, "
                                            "study_cross_tokenizer (default: the embedded study recipe)")
            p.add_argument("--quick", action="store_true", help="the embedded toy study: 2 variants x 2 seeds")
            p.add_argument("--print-recipe", action="store_true", help="print the resolved recipe and exit")
            p.add_argument("--list-cells", action="store_true", help="print the grid, one cell per line, and exit")
            p.add_argument("--step", choices=["all", "prepare", "cells", "report"], default="all",
                           help="prepare: shared teacher + PTs; cells: train and evaluate; report: tables + "
                                "pictures (default: all three)")
            p.add_argument("--cell", type=int, action="append", metavar="I",
                           help="only cell I (repeatable; e.g. $SLURM_ARRAY_TASK_ID); implies --step cells")
        elif stage == "demo":
            p.add_argument("--quick", action="store_true", help="a tiny version that finishes in ~3 minutes")
            p.add_argument("--config", help="a recipe to use instead of the built-in demo recipe")
            p.add_argument("--print-recipe", action="store_true", help="print the demo recipe and exit")
            p.add_argument("--blackbox", action="store_true",
                           help="the black-box demo: the demo's teacher served over HTTP, students without labels")
        else:
            p.add_argument("--config", required=True, help="YAML recipe (see configs/)")
        p.add_argument("--output-dir", help="overrides run.output_dir")
        if stage in ("teacher", "distill", "demo", "study"):
            p.add_argument("--force", action="store_true", help="retrain even if a finished result matches")
        if stage in ("teacher", "distill"):
            p.add_argument("--resume", choices=["auto", "never"], default="never",
                           help="auto: continue from the latest complete checkpoint in the output dir")
            _add_auto_plan_arguments(p)
        if stage in ("generate", "distill"):
            p.add_argument("--teacher-endpoint", metavar="URL",
                           help="the teacher's OpenAI-compatible server (sets generate.endpoint.url), e.g. "
                                "http://127.0.0.1:8000/v1: generate takes the PTs from it; with teacher.signal=served "
                                "distill takes the teacher's scores from it")
        p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="recipe overrides")
    serve_help = "serve a local Hugging Face model as an OpenAI-compatible endpoint (black-box teacher)"
    add_serve_arguments(sub.add_parser("serve-teacher", help=serve_help, description=serve_help))
    _add_plan_arguments(sub)
    _add_ui_arguments(sub)
    return parser


def _add_auto_plan_arguments(p) -> None:
    p.add_argument("--plan", choices=["auto", "never"], default="never",
                   help="auto: before anything loads, plan this job for the machine it runs on (as `dskd plan` "
                        "does) and apply the best plan's recipe overrides; key=value overrides given here win")
    p.add_argument("--plan-gpu-memory", metavar="SIZE",
                   help="memory per rank to plan for, e.g. 80GiB (default: torch.cuda's total_memory; on CPU the "
                        "host's memory divided by the ranks per node)")
    p.add_argument("--plan-nodes", type=int, metavar="N", help="nodes to plan for (default: from the launcher)")
    p.add_argument("--plan-gpus-per-node", type=int, metavar="G",
                   help="ranks per node to plan for (default: from the launcher, else 1)")


def _add_ui_arguments(sub) -> None:
    ui_help = "the MLflow UI on a run directory (its store opened where it is now), until Ctrl-C"
    p = sub.add_parser("ui", help=ui_help, description=ui_help)
    p.add_argument("output_dir", nargs="?", metavar="OUTPUT_DIR",
                   help="a run's run.output_dir (default: the one under ./dskd-runs written last)")
    p.add_argument("--port", type=int, default=5000, help="default 5000; 0 takes a free port")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")


def _add_plan_arguments(sub) -> None:
    plan_help = "per-rank GPU memory and step time of every placement of `dskd distill`, from configs only"
    p = sub.add_parser("plan", help=plan_help, description=plan_help)
    p.add_argument("--config", required=True, help="YAML recipe (model directories may hold only config.json)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=1)
    p.add_argument("--gpu-memory", required=True, help="per GPU, e.g. 80GiB")
    p.add_argument("--cpu-memory", help="per node, e.g. 1TiB (default: not checked)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilization (default 0.4)")
    p.add_argument("--gpu-tflops", type=float, default=989.0, help="peak dense TFLOP/s per GPU (989: H100 bf16)")
    p.add_argument("--all", action="store_true", help="list every placement, not only the useful ones")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="recipe overrides")


def _quiet_libraries(rank: int) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not _cuda() else "cuda")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    logging.basicConfig(level=logging.WARNING if rank == 0 else logging.ERROR,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("DeepSpeed", "deepspeed", "transformers", "datasets", "mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING if rank == 0 else logging.ERROR)
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # our own bars show stage progress
    datasets.disable_progress_bars()


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def _user_error(exc: Exception) -> int:
    print(f"dskd: error: {exc}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    from dskd.atomic import Unwritable, cannot_write, write_failure

    args = _parser().parse_args(argv)
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    if args.stage == "serve-teacher":
        _quiet_libraries(rank)
        from dskd.serve.cli import serve_main  # heavy (torch, transformers): loaded only for this command

        preemption.say_on_interrupt("serve-teacher stopped by Ctrl-C")  # uvicorn stops, then re-raises it
        try:
            return serve_main(args)
        except ConfigError as exc:
            return _user_error(exc)
    if args.stage == "ui":  # an mlflow server child process: no recipe, torch or DeepSpeed
        from dskd.stages.ui import run_ui

        try:
            return run_ui(args.output_dir, host=args.host, port=args.port)
        except ConfigError as exc:
            return _user_error(exc)
    if args.stage == "plan":  # configs only: no torch, DeepSpeed or weights
        from dskd.plan import run_plan

        try:
            return run_plan(args)
        except ConfigError as exc:
            return _user_error(exc)

    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"run.output_dir={args.output_dir}")
    if getattr(args, "teacher_endpoint", None):
        overrides.append(f"generate.endpoint.url={args.teacher_endpoint}")
    try:
        recipe = _recipe(args, overrides)
        recipe = _auto_plan(args, recipe, overrides, rank)
        if args.stage == "study" and args.list_cells:
            print(describe(study_cells(recipe)))
            return 0
    except ConfigError as exc:
        return _user_error(exc)
    except Unwritable as exc:  # the preflight's write probe: a read-only or full output directory, no permission
        return _user_error(cannot_write(exc, Path(exc.filename)))

    _quiet_libraries(rank)
    preemption.set_how_to_continue(HOW_TO_CONTINUE[args.stage])
    # The stages and their errors import torch and DeepSpeed: loaded only once the recipe passed the preflight.
    from dskd.blackbox.client import EndpointError
    from dskd.blackbox.generate import EndpointGenerationStopped
    from dskd.trainer import TrainingDiverged

    try:
        with preemption.handling():  # SIGUSR1/SIGTERM/Ctrl-C: stop at the next safe point, state saved, exit 75
            return _dispatch(args, recipe, overrides, rank)
    except ConfigError as exc:  # includes DataError
        return _user_error(exc)
    except preemption.Preempted as exc:
        print(f"dskd: {exc}", file=sys.stderr)
        return preemption.EXIT_CODE
    except TrainingDiverged as exc:
        print(f"dskd: error: {exc}", file=sys.stderr)
        return 3
    except (EndpointGenerationStopped, EndpointError) as exc:  # unreachable / key refused / budget spent
        print(f"dskd: error: {exc}", file=sys.stderr)  # finished PTs are saved; messages are redacted, one line
        return 4
    except KeyboardInterrupt:  # the second Ctrl-C (see dskd.preemption)
        print("dskd: aborted by a second Ctrl-C; nothing saved since the last checkpoint", file=sys.stderr)
        return preemption.EXIT_INTERRUPTED
    except Exception as exc:  # a write that failed where the stage writes (a disk that filled up): one line, exit 2
        output_dir = Path(recipe.run.output_dir) if recipe is not None else None
        if (failure := write_failure(exc, output_dir)) is None:
            raise
        return _user_error(cannot_write(failure, output_dir or Path(".")))
    finally:
        from dskd.engines import shutdown_distributed  # DeepSpeed: heavy, and loaded by then if it matters

        try:
            shutdown_distributed()
        except Exception:  # a broken group at exit must not mask the real error
            pass


def _recipe(args, overrides: list[str]) -> Recipe | None:
    """The stage's recipe, validated and preflighted (None: `dskd demo` builds its own). A study's cells are all
    validated here, so an unknown key in any variant fails before anything loads, naming the variant."""
    if args.stage == "study" and not args.config:
        recipe = load_recipe(packaged_recipe_path("study_quick.yaml" if args.quick else "study.yaml"), overrides)
    elif args.stage == "demo" and not args.config:
        return None
    else:
        recipe = load_recipe(config_path(args.config), overrides)
    if args.stage == "study":
        study_cells(recipe)
    if not (getattr(args, "print_recipe", False) or getattr(args, "list_cells", False)):
        _preflight(recipe, args.stage)  # printing the recipe or the grid reads no model or data file
    return recipe


def _auto_plan(args, recipe: Recipe | None, overrides: list[str], rank: int) -> Recipe | None:
    """`--plan auto` (teacher, distill): plan the job for this machine (dskd.plan.machine_cluster, auto_plan), print
    the block on rank 0, and return the recipe with the best plan's overrides under the command line's. Every rank
    plans the same (same recipe, same environment). `--plan never` (the default): the recipe unchanged."""
    flags = [f for f in ("plan_gpu_memory", "plan_nodes", "plan_gpus_per_node") if getattr(args, f, None) is not None]
    if getattr(args, "plan", "never") != "auto":
        if flags:
            raise ConfigError(f"--{flags[0].replace('_', '-')} sizes the plan of --plan auto; add --plan auto (or "
                              "drop it)")
        return recipe
    for flag in ("plan_nodes", "plan_gpus_per_node"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: need at least 1")
    from dskd.plan import auto_plan, machine_cluster

    machine = machine_cluster(args.plan_gpu_memory, args.plan_nodes, args.plan_gpus_per_node)
    planned = auto_plan(recipe, args.stage, machine, list(args.overrides))
    if rank == 0:
        print(planned.text, flush=True)
    return load_recipe(config_path(args.config), planned.applied + overrides)


def packaged_recipe_path(name: str) -> Path:
    """A recipe shipped in dskd/recipes/ (a regular file inside the installed package)."""
    return Path(str(resources.files("dskd") / "recipes" / name))


def config_path(config: str) -> str | Path:
    """--config: a recipe file, or the name of one shipped in dskd/recipes/ (`study_smollm2`), for a file that
    does not exist; anything else is left to load_recipe's error."""
    if Path(config).exists() or "/" in config or "\\" in config:
        return config
    shipped = packaged_recipe_path(config if config.endswith((".yaml", ".yml")) else f"{config}.yaml")
    return shipped if shipped.is_file() else config


def _preflight(recipe: Recipe, stage: str) -> None:
    """Check, before the heavy imports, what the stage reads: the data files (present, first rows parse, the
    recipe's fields there) and the model and tokenizer paths (README: "Stages"). Reads a few rows and stats a
    few paths; without it the same errors came after ~30 s of imports and process-group start-up."""
    if stage == "teacher" and not recipe.teacher.finetune:
        raise ConfigError("teacher.finetune is false, so no later stage would read what `dskd teacher` trains (they "
                          "use teacher.path as it is). Set teacher.finetune=true to fine-tune the teacher on "
                          "data.labeled, or skip this stage")
    check_data_files(recipe.data)
    for role, weights, tokenizer in _model_inputs(recipe, stage):
        check_model_source(getattr(recipe, role), role, weights=weights, tokenizer=tokenizer)
    reads_teacher = ((stage == "generate" and not recipe.pts_from_server)
                     or (stage == "distill" and recipe.teacher_in_process))
    if reads_teacher or (stage == "evaluate" and recipe.evaluate.include_teacher):
        teacher_model_path(recipe)  # teacher.finetune: the fine-tuned teacher must exist by now
    if stage == "evaluate":
        for name in recipe.evaluate.students or [recipe.student.name]:
            if not (student_dir(recipe, name) / "model" / "config.json").is_file():
                raise ConfigError(f"evaluate.students: student '{name}' has no exported model in "
                                  f"{student_dir(recipe, name) / 'model'}; run `dskd distill` with "
                                  f"student.name={name} first")
    from dskd.atomic import check_writable

    check_writable(recipe.run.output_dir)  # read-only, full, no permission: one line now, not a traceback later


def _model_inputs(recipe: Recipe, stage: str) -> list[tuple[str, bool, bool]]:
    """(role, whether its weights are read from the recipe's own keys, whether its tokenizer is) per model the
    stage reads. The embedded task brings the teacher's tokenizer; a fine-tuned teacher is read from the
    teacher stage's output (checked separately); a served teacher's targets are in the student's tokenizer."""
    teacher, embedded, in_process = recipe.teacher, recipe.data.task is not None, recipe.teacher_in_process
    own_teacher_tokenizer = not embedded and (not teacher.finetune or teacher.tokenizer is not None)
    student_tokenizer = recipe.student.tokenizer is not None or recipe.student.init == "pretrained"
    if stage == "study":
        return [("teacher", not teacher.finetune, not embedded), ("student", True, student_tokenizer)]
    if stage in ("teacher", "demo"):
        return [("teacher", True, not embedded)] + ([("student", True, student_tokenizer)] if stage == "demo" else [])
    if stage == "distill":
        weights = in_process and (recipe.distill.loss == "kd" or recipe.student.init == "prune")
        return [("student", True, student_tokenizer),
                ("teacher", weights and not teacher.finetune, in_process and own_teacher_tokenizer)]
    if stage == "generate" and recipe.pts_from_server:  # the PTs are written in the targets' tokenizer
        return [("teacher", False, own_teacher_tokenizer)] if in_process else [("student", False, not embedded)]
    if stage == "generate" or recipe.evaluate.include_teacher:
        return [("teacher", not teacher.finetune, own_teacher_tokenizer)]
    return []


def _dispatch(args, recipe: Recipe | None, overrides: list[str], rank: int) -> int:
    # Stage modules are heavy (torch, DeepSpeed, transformers): imported once the command is known.
    if args.stage == "demo":
        from dskd.stages import demo

        packaged = demo.blackbox_demo_recipe if args.blackbox else demo.demo_recipe
        run = partial(demo.run_blackbox_demo, quick=args.quick) if args.blackbox else demo.run_demo
        recipe = recipe or packaged(args.quick, overrides)
        if args.print_recipe:
            print(to_yaml(recipe))
            return 0
        if args.force:
            clear_done_markers(recipe.run.output_dir)
        run(recipe)
        return 0
    if args.stage == "study":
        from dskd.stages.study import run_study

        if args.print_recipe:
            print(to_yaml(recipe))
            return 0
        if args.force:
            clear_done_markers(recipe.run.output_dir)
            for marker in Path(recipe.run.output_dir).glob("cells/*/cell.json"):
                marker.unlink()
        run_study(recipe, "cells" if args.cell else args.step, args.cell)
        return 0
    if args.stage in ("teacher", "distill"):
        from dskd.stages.train import train_stage

        result = train_stage(recipe, args.stage, resume=args.resume == "auto", force=args.force)
        if rank == 0 and not result.skipped:
            print(f"[dskd] {args.stage}: {result.steps} steps; model in {result.model_dir}")
    elif args.stage == "generate":
        from dskd.stages.generate import run_generate

        run_generate(recipe)
    else:
        from dskd.stages.evaluate import run_evaluate

        run_evaluate(recipe)
    return 0


if __name__ == "__main__":
    sys.exit(main())
