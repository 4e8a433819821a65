"""The stages a user runs (`dskd teacher|distill|generate|evaluate|demo`); each composes components below it.

  train.py     `dskd teacher` / `dskd distill`: setup -> dskd.trainer.Trainer -> export
  generate.py  `dskd generate`: one skeleton, PTs from a local teacher or an HTTP endpoint
  evaluate.py  `dskd evaluate`: ROUGE/BLEU + efficiency, teacher vs students
  demo.py      `dskd demo [--blackbox]`: the whole pipeline on the embedded task, one parent MLflow run
Nothing outside this package imports from it (except the CLI).
"""
