"""Data: task sources, the embedded demo task, tokenization and the pseudo-target store."""
