"""`dskd serve-teacher`: any local Hugging Face model as an OpenAI-compatible HTTP endpoint.

    dskd serve-teacher --model DIR [--host 127.0.0.1] [--port 8000] [--max-batch 64] [--url-file PATH]

Routes: POST /v1/completions and /v1/chat/completions (n samples per prompt, temperature, top_p, top_k,
max_tokens, seed, stop, and `logprobs` / `top_logprobs`: the log-probabilities of each generated token and
of its top-k alternatives, with token text, UTF-8 bytes and text offsets), GET /v1/models, GET /health.
Errors use OpenAI's {"error": {...}} shape; a full queue answers 429 with Retry-After so clients back off.

It also scores given tokens the way vLLM does, for a training job that uses it as a served teacher: on
/v1/completions `prompt` may be token ids (list[int], or a batch list[list[int]]), used exactly as sent, and
`prompt_logprobs: K` (decoder-only models; K <= --max-logprobs, default 20 as in vLLM) returns, per prompt
token i >= 1, the top-K of the model's next-token distribution after tokens[:i] plus token i itself with its
rank, as vLLM's `prompt_logprobs` ({"<id>": {"logprob", "rank", "decoded_token"}}, null for token 0);
`return_tokens_as_token_ids` turns the tokens of `logprobs` into "token_id:<id>" (as vLLM: not decoded_token).
The scores come from one batched, right-padded forward pass on the worker thread, after the rows' generate()
call (vLLM needs max_tokens >= 1: scoring clients send max_tokens=1).

It exists so a big teacher can live on its own nodes while students are distilled elsewhere (`dskd generate`
with generate.endpoint), and it is the real server the black-box tests talk to. For maximum throughput on
GPUs, any OpenAI-compatible server (e.g. vLLM) works with the same client.

How a request is served: the HTTP handler turns it into one row per sample (prompt x n) and puts it on a
queue; one worker thread takes whatever is waiting (up to --max-batch rows, after at most --batch-wait-ms)
and runs one `generate()` call for all of it. Every row keeps its own temperature / top_p / top_k /
max_tokens and its own random generator (seeded from the request's seed and the sample's index), because
the model only proposes logits and `RowSampler` picks each row's token. So a seeded request gets the same
samples whether it was batched with others or not (up to the float noise of padding), and requests with
different settings share one batch.

Log-probabilities are those of the model's next-token distribution at temperature 1 (what KD needs), not
of the tempered sampling distribution. The prompt text is tokenized as-is (seq2seq: EOS appended, causal:
BOS prepended, as in training); for a causal teacher trained by dskd pass --causal-separator to reproduce
its training prompts. Bound to 127.0.0.1 by default; --api-key-env VAR requires `Authorization: Bearer $VAR`.

  runner.py    ServeConfig, the model side: TeacherRunner (prompts -> ids, rows -> samples in one batched
               generate() call), RowSampler (each row's own sampling settings and generator), apply_stop
  batching.py  Batcher: the queue and the one worker thread that runs whatever is waiting as one batch
  api.py       OpenAI request schemas, Service (requests -> rows -> OpenAI responses), build_app (FastAPI)
  cli.py       the flags, serve() (load, bind, serve), serve_main, serve_in_subprocess (tests, demo)

Token text pieces and offsets come from `dskd.tokens`, shared with the black-box client side.
  options.py   ServeConfig and the flags (no torch: the `dskd` parser imports it)
Outside code imports `dskd.serve.cli` (serve_main, serve_in_subprocess) and `dskd.serve.options`.
"""
