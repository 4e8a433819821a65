"""`dskd serve-teacher`'s settings and flags; light on purpose (no torch), so `dskd --help` stays fast."""

from __future__ import annotations

import argparse
from dataclasses import dataclass


@dataclass(frozen=True)
class ServeConfig:
    model: str
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (see url_file)
    served_name: str | None = None  # the model id clients use; default: the directory's name
    max_batch: int = 64  # sequences (prompts x n) per generate() call
    batch_wait_ms: float = 5.0  # how long the worker waits for more requests to fill a batch
    max_queue: int = 256  # pending requests beyond this get 429
    max_input_tokens: int = 512
    max_tokens_cap: int = 256  # largest max_tokens a request may ask for
    max_logprobs: int = 20  # largest logprobs / top_logprobs / prompt_logprobs a request may ask for (as vLLM)
    causal_separator: str = ""
    dtype: str = "fp32"
    device: str = "auto"
    threads: int | None = None
    api_key_env: str | None = None
    url_file: str | None = None  # written once the server accepts requests
    trust_remote_code: bool = False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = ServeConfig(model="")
    parser.add_argument("--model", required=True, help="local Hugging Face model directory (e.g. a dskd teacher)")
    parser.add_argument("--host", default=d.host, help="interface to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=d.port, help="port (0: any free port; see --url-file)")
    parser.add_argument("--served-name", "--served-model-name", dest="served_name",
                        help="model id that /v1/models lists and clients send (default: the model directory's "
                             "name; the path itself is never shown)")
    parser.add_argument("--max-batch", type=int, default=d.max_batch, help="sequences per generate() call")
    parser.add_argument("--batch-wait-ms", type=float, default=d.batch_wait_ms,
                        help="how long to wait for more requests to fill a batch")
    parser.add_argument("--max-queue", type=int, default=d.max_queue, help="pending requests before answering 429")
    parser.add_argument("--max-input-tokens", type=int, default=d.max_input_tokens,
                        help="prompts are truncated to this many tokens (use the recipe's data.max_input_tokens)")
    parser.add_argument("--max-tokens-cap", type=int, default=d.max_tokens_cap, help="largest max_tokens allowed")
    parser.add_argument("--max-logprobs", type=int, default=d.max_logprobs,
                        help="largest top-k a request may ask for in logprobs, top_logprobs and prompt_logprobs "
                             f"(vLLM's flag and default: {d.max_logprobs}); prompt_logprobs=K returns the model's "
                             "top-K log-probs at every prompt position (decoder-only models)")
    parser.add_argument("--causal-separator", default=d.causal_separator,
                        help="appended to causal prompts (a dskd causal teacher: the recipe's data.causal_separator)")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=d.dtype)
    parser.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--api-key-env", help="require Authorization: Bearer $VAR (VAR names an env variable)")
    parser.add_argument("--url-file", help="write the base URL (http://host:port/v1) here once ready")
    parser.add_argument("--trust-remote-code", action="store_true")


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    return ServeConfig(model=args.model, host=args.host, port=args.port, served_name=args.served_name,
                       max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms, max_queue=args.max_queue,
                       max_input_tokens=args.max_input_tokens, max_tokens_cap=args.max_tokens_cap,
                       max_logprobs=args.max_logprobs,
                       causal_separator=args.causal_separator, dtype=args.dtype, device=args.device,
                       threads=args.threads, api_key_env=args.api_key_env, url_file=args.url_file,
                       trust_remote_code=args.trust_remote_code)
