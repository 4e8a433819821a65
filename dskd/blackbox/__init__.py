"""Black-box teachers: pseudo-targets and top-k log-probabilities from an OpenAI-compatible endpoint.

  prompts.py   prompt templates (+ few-shot examples), checked before any request
  client.py    the HTTP client: concurrency-safe retries with backoff, request budget, token/cost counters
  align.py     the endpoint's tokens + top-k log-probs -> sparse teacher targets on the student's tokens
  generate.py  EndpointPTSource: the PT source of `dskd generate` with generate.endpoint (resumable)
  targets.py   the training side: PT pairs with their sparse targets, batched for the sparse KD loss

Token ids <-> text pieces for any tokenizer (shared with the server) are `dskd.tokens`. The server side
(`dskd serve-teacher`) is `dskd.serve`; the sparse KD loss is `dskd.losses.sparse`; the teacher signal that
reads the stored top-k during training is `dskd.teachers.StoredTopKTeacher`; `dskd demo --blackbox` is in
`dskd.stages.demo`.
"""
