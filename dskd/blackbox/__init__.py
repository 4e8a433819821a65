"""Black-box teachers: pseudo-targets and top-k log-probabilities from an OpenAI-compatible endpoint.

  prompts.py   prompt templates (+ few-shot examples), checked before any request
  client.py    the HTTP client: concurrency-safe retries with backoff, request budget, token/cost counters
  tokens.py    token ids <-> text pieces for any tokenizer
  align.py     the endpoint's tokens + top-k log-probs -> sparse teacher targets on the student's tokens
  generate.py  `dskd generate` with generate.endpoint: resumable PT generation into the PT store
  targets.py   the training side: PT pairs with their sparse targets, batched for the sparse KD loss
  demo.py      `dskd demo --blackbox`: the demo's teacher served over HTTP, students without labels

The server side (`dskd serve-teacher`) is `dskd.serve`; the sparse KD loss is `dskd.losses.sparse`.
"""
