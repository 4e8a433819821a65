"""The stages a user runs (`dskd teacher|distill|generate|evaluate|demo`); each composes components below it.

  train.py     `dskd teacher` / `dskd distill`: setup -> dskd.trainer.Trainer -> export
  generate.py  `dskd generate`: one skeleton, PTs from a local teacher or an HTTP endpoint
  evaluate.py  `dskd evaluate`: ROUGE/BLEU + efficiency, teacher vs students
  demo.py      `dskd demo [--blackbox]`: the whole pipeline on the embedded task, one parent MLflow run
  ui.py        `dskd ui [OUTPUT_DIR]`: `mlflow server` on a run directory's store, until Ctrl-C
Nothing outside this package imports from it (except the CLI).
"""
