"""`dskd <stage>`: one entry point for every stage; also `python -m dskd` and `deepspeed --module dskd`.

    dskd teacher  --config RECIPE [key.sub=value ...]   fine-tune the teacher on the labeled set
    dskd generate --config RECIPE [...]                 teacher pseudo-targets (K per input), resumable
    dskd distill  --config RECIPE [--resume auto]       train the student
    dskd evaluate --config RECIPE [...]                 ROUGE/BLEU + efficiency, teacher vs students
    dskd demo [--quick]                                 all of the above on the embedded docstring task
    dskd serve-teacher --model DIR [--port P ...]       a local model as an OpenAI-compatible endpoint
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from functools import partial

from dskd import preemption
from dskd.config import ConfigError, load_recipe, to_yaml
from dskd.layout import clear_done_markers
from dskd.serve.options import add_arguments as add_serve_arguments

STAGES = ("teacher", "generate", "distill", "evaluate", "demo")


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
             "demo": "the whole pipeline on the embedded docstring-generation task"}
    for stage in STAGES:
        p = sub.add_parser(stage, help=helps[stage], description=helps[stage])
        if stage == "demo":
            p.add_argument("--quick", action="store_true", help="a tiny version that finishes in ~3 minutes")
            p.add_argument("--config", help="a recipe to use instead of the built-in demo recipe")
            p.add_argument("--print-recipe", action="store_true", help="print the demo recipe and exit")
            p.add_argument("--blackbox", action="store_true",
                           help="the black-box demo: the demo's teacher served over HTTP, students without labels")
        else:
            p.add_argument("--config", required=True, help="YAML recipe (see configs/)")
        p.add_argument("--output-dir", help="overrides run.output_dir")
        if stage in ("teacher", "distill", "demo"):
            p.add_argument("--force", action="store_true", help="retrain even if a finished result matches")
        if stage in ("teacher", "distill"):
            p.add_argument("--resume", choices=["auto", "never"], default="never",
                           help="auto: continue from the latest complete checkpoint in the output dir")
        if stage == "generate":
            p.add_argument("--teacher-endpoint", metavar="URL",
                           help="PTs from an OpenAI-compatible endpoint (sets generate.endpoint.url), e.g. "
                                "http://127.0.0.1:8000/v1")
        p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="recipe overrides")
    serve_help = "serve a local Hugging Face model as an OpenAI-compatible endpoint (black-box teacher)"
    add_serve_arguments(sub.add_parser("serve-teacher", help=serve_help, description=serve_help))
    return parser


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


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    _quiet_libraries(rank)
    if args.stage == "serve-teacher":
        from dskd.serve.cli import serve_main  # heavy (torch, transformers): loaded only for this command

        try:
            return serve_main(args)
        except ConfigError as exc:
            print(f"dskd: error: {exc}", file=sys.stderr)
            return 2

    # The stages and their errors import torch and DeepSpeed: loaded only after the arguments parsed.
    from dskd.blackbox.generate import EndpointGenerationStopped
    from dskd.trainer import TrainingDiverged

    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"run.output_dir={args.output_dir}")
    if getattr(args, "teacher_endpoint", None):
        overrides.append(f"generate.endpoint.url={args.teacher_endpoint}")
    try:
        with preemption.handling():  # SIGUSR1/SIGTERM: stop at the next safe point, state saved, exit 75
            return _dispatch(args, overrides, rank)
    except ConfigError as exc:
        print(f"dskd: error: {exc}", file=sys.stderr)
        return 2
    except preemption.Preempted as exc:
        print(f"dskd: {exc}", file=sys.stderr)
        return preemption.EXIT_CODE
    except TrainingDiverged as exc:
        print(f"dskd: error: {exc}", file=sys.stderr)
        return 3
    except EndpointGenerationStopped as exc:  # endpoint unreachable / budget spent; finished PTs are saved
        print(f"dskd: error: {exc}", file=sys.stderr)
        return 4
    finally:
        from dskd.engines import shutdown_distributed  # DeepSpeed: heavy, and loaded by then if it matters

        try:
            shutdown_distributed()
        except Exception:  # a broken group at exit must not mask the real error
            pass


def _dispatch(args, overrides: list[str], rank: int) -> int:
    # Stage modules are heavy (torch, DeepSpeed, transformers): imported once the command is known.
    if args.stage == "demo":
        from dskd.stages import demo

        packaged = demo.blackbox_demo_recipe if args.blackbox else demo.demo_recipe
        run = partial(demo.run_blackbox_demo, quick=args.quick) if args.blackbox else demo.run_demo
        recipe = load_recipe(args.config, overrides) if args.config else packaged(args.quick, overrides)
        if args.print_recipe:
            print(to_yaml(recipe))
            return 0
        if args.force:
            clear_done_markers(recipe.run.output_dir)
        run(recipe)
        return 0
    recipe = load_recipe(args.config, overrides)
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
