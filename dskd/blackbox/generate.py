"""`dskd generate` with generate.endpoint: pseudo-targets from an OpenAI-compatible endpoint, resumably.

`EndpointPTSource` is the stage's PT source for an endpoint (the stage skeleton is `dskd.stages.generate`).

For every labeled/unlabeled input (labels are never sent): render the prompt template, ask for K samples
(n, temperature, top_p, max_tokens, a per-input seed) and, for logits KD, the top-k log-probabilities; turn
the texts into student targets and align the log-probs to the student's tokens (`dskd.blackbox.align`).

Requests run on `concurrency` threads through one `EndpointClient` (retries, budget, counters). Finished
inputs are buffered and written to the PT store as one shard every `flush_every` inputs, so a crash loses
at most the buffer (those inputs are requested again), and a rerun skips every input already in a shard:
nothing is lost and nothing doubles. SIGTERM / SIGUSR1 (Slurm's warning; `dskd.preemption`) stop the loop at
its next turn, flush the buffer and exit with the requeue code; Ctrl-C flushes it too. An endpoint that stays
unreachable or refuses the key (or a used-up request budget) stops the run with the same guarantee, as
`EndpointGenerationStopped` (the CLI's exit 4), also when that happens at the first contact (`prepare`, before
the MLflow run opens); inputs the endpoint never answers usably are listed in `failures.json` in the store and
retried by the next run. A URL with user:password@ in it is refused by `check` (`client.check_url`). Tokens,
requests and cost are logged to MLflow as they accrue.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from dskd import preemption
from dskd.atomic import atomic_write_text
from dskd.blackbox.align import Aligner, AlignmentStats
from dskd.blackbox.client import (
    BudgetExhausted,
    Completion,
    EndpointClient,
    EndpointError,
    EndpointUnavailable,
    InputFailed,
    SamplingParams,
    check_url,
    public_url,
)
from dskd.blackbox.prompts import PromptBuilder
from dskd.config import ConfigError, EndpointConfig, Recipe
from dskd.data.collate import Encoder, Formatting
from dskd.data.pt_store import PTStore
from dskd.data.task import TaskData
from dskd.pt_sources import Outcome
from dskd.tracking import Tracker

FLUSH_SECONDS = 10.0  # a shard at least this often while results come in
WAKE_S = 0.25  # the main loop looks for a stop request at least this often
INVALID_CHARACTER = "\ufffd"


class EndpointGenerationStopped(RuntimeError):
    """The endpoint stayed unreachable or the request budget ran out; every finished input is saved."""


def top_logprobs_wanted(recipe: Recipe) -> int:
    """Top-k log-probs to ask for: the recipe's value, else 5 when the student trains with logits KD on them (a
    served teacher that scores only its own samples; one that scores any target, or a local teacher, needs none)."""
    endpoint = recipe.generate.endpoint
    if endpoint.top_logprobs is not None:
        return endpoint.top_logprobs
    on_samples = recipe.teacher.signal == "served" and not endpoint.prompt_logprobs
    return 5 if recipe.distill.loss == "kd" and on_samples else 0


def sampling_params(recipe: Recipe) -> SamplingParams:
    decoding, endpoint = recipe.generate.decoding, recipe.generate.endpoint
    greedy = decoding.strategy == "greedy"
    return SamplingParams(n=decoding.num_return_sequences, temperature=0.0 if greedy else decoding.temperature,
                          top_p=decoding.top_p, max_tokens=decoding.max_new_tokens, top_k=decoding.top_k,
                          stop=tuple(endpoint.stop))


def input_seed(seed: int, example_id: str) -> int:
    """The seed sent with one input's request: fixed by (run seed, id), so a rerun asks the same question."""
    return int.from_bytes(hashlib.sha256(f"dskd-endpoint:{seed}:{example_id}".encode()).digest()[:4], "big") >> 1


def read_api_key(cfg: EndpointConfig) -> str | None:
    if cfg.api_key_env is None:
        return None
    key = os.environ.get(cfg.api_key_env)
    if not key:
        raise ConfigError(f"generate.endpoint.api_key_env={cfg.api_key_env}: that environment variable is not set "
                          "or empty; export the API key under that name")
    return key


def tokenizer_fingerprint(tokenizer) -> str:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), separators=(",", ":"))
    return hashlib.sha256(vocab.encode()).hexdigest()[:16]


@dataclass
class Progress:
    """What the run has done so far (main thread only)."""

    written: int = 0
    failures: dict[str, str] = field(default_factory=dict)
    empty_pts: int = 0
    invalid_characters: int = 0  # U+FFFD removed from PT texts
    alignment: AlignmentStats = field(default_factory=AlignmentStats)


class EndpointGeneration:
    """One generation run: requests on threads, post-processing and shard writes on the calling thread."""

    def __init__(self, recipe: Recipe, client: EndpointClient, encoder: Encoder, store: PTStore,
                 aligner: Aligner | None, tracker: Tracker):
        self.recipe, self.client, self.encoder, self.store = recipe, client, encoder, store
        self.cfg = recipe.generate.endpoint
        self.prompts = PromptBuilder.from_config(self.cfg)
        self.sampling = sampling_params(recipe)
        self.top_logprobs = top_logprobs_wanted(recipe)
        self.aligner = aligner
        self.tracker = tracker
        self.progress = Progress()
        self._buffer: list[dict] = []
        self._last_flush = time.monotonic()

    def fetch(self, row: dict) -> Completion:
        """Runs on a worker thread: one HTTP round trip (with retries)."""
        return self.client.complete(self.prompts.render(row), self.sampling,
                                    seed=input_seed(self.recipe.run.seed, row["id"]), top_logprobs=self.top_logprobs)

    def store_row(self, row: dict, completion: Completion) -> dict:
        texts = [self.pt_text(sample.text) for sample in completion.samples]
        pt_ids = self.encoder.target_ids_batch(texts)
        self.progress.empty_pts += sum(not text for text in texts)
        out = {"id": row["id"], "split": row["split"], "input": row["input"], "pts": texts, "pt_ids": pt_ids}
        if self.aligner is not None:
            out["pt_top_ids"], out["pt_top_logprobs"] = [], []
            for sample, ids in zip(completion.samples, pt_ids):
                sparse, stats = self.aligner.align(sample.tokens or [], ids)
                self.progress.alignment.add(stats)
                out["pt_top_ids"].append(sparse.ids)
                out["pt_top_logprobs"].append(sparse.logprobs)
        return out

    def pt_text(self, text: str) -> str:
        """The completion as a training target: stripped, and without U+FFFD (what a teacher's invalid UTF-8 decodes
        to; a student must not learn to write it). Counted, never silent."""
        if INVALID_CHARACTER in text:
            self.progress.invalid_characters += text.count(INVALID_CHARACTER)
            text = text.replace(INVALID_CHARACTER, "")
        return text.strip()

    def flush(self, force: bool = False) -> None:
        due = len(self._buffer) >= self.cfg.flush_every or time.monotonic() - self._last_flush > FLUSH_SECONDS
        if self._buffer and (force or due):
            self.store.write_shard(0, self._buffer)
            self.progress.written += len(self._buffer)
            self._buffer = []
            self._last_flush = time.monotonic()
            self.tracker.log_metrics(self.metrics(), step=self.progress.written)

    def metrics(self) -> dict[str, float]:
        usage = self.client.stats.snapshot()
        cost = (usage["prompt_tokens"] * self.cfg.cost_per_1k_prompt_tokens
                + usage["completion_tokens"] * self.cfg.cost_per_1k_completion_tokens) / 1000
        out = {f"generate/{name}": value for name, value in usage.items()}
        out.update({"generate/cost": cost, "generate/new_inputs": self.progress.written,
                    "generate/failed_inputs": len(self.progress.failures),
                    "generate/empty_pts": self.progress.empty_pts,
                    "generate/invalid_characters_removed": self.progress.invalid_characters})
        if self.aligner is not None:
            out.update(self.progress.alignment.as_metrics())
        return out

    def run(self, rows: list[dict], bar) -> None:
        """Fetch every row; stop early (saving what finished) on a stop signal, when the endpoint is gone or when
        the budget is spent."""
        window = 2 * self.cfg.concurrency
        todo = iter(rows)
        in_flight: dict[Future, dict] = {}
        stop: Exception | None = None
        pool = ThreadPoolExecutor(self.cfg.concurrency, thread_name_prefix="dskd-endpoint")
        try:
            while True:
                while stop is None and len(in_flight) < window:
                    row = next(todo, None)
                    if row is None:
                        break
                    in_flight[pool.submit(self.fetch, row)] = row
                if not in_flight:
                    break
                done, _ = wait(in_flight, timeout=WAKE_S, return_when=FIRST_COMPLETED)
                for future in done:
                    row = in_flight.pop(future)
                    try:
                        self._buffer.append(self.store_row(row, future.result()))
                    except InputFailed as exc:
                        self.progress.failures[row["id"]] = str(exc)
                    except (EndpointUnavailable, BudgetExhausted) as exc:
                        stop = stop or exc
                    bar.update(1)
                self.flush()
                if preemption.agreed():  # SIGTERM / SIGUSR1: stop here, everything finished is saved below
                    raise preemption.Preempted("a stop signal arrived")
        finally:
            self.flush(force=True)
            if stop is None and in_flight:  # interrupted: requests in flight are abandoned, not retried
                self.client.cancel()
            pool.shutdown(wait=stop is not None, cancel_futures=True)
        if stop is not None:
            raise EndpointGenerationStopped(str(stop))


def listed_model(client: EndpointClient) -> dict:
    """The endpoint's /models entry of the model it is asked for ({} when unlisted); the first one listed becomes
    the client's model when none is configured."""
    models = client.list_models()
    if client.model is None:
        if not models:
            raise ConfigError(f"{client.public_base} does not list its models: set generate.endpoint.model")
        client.model = models[0]["id"]
    return next((m for m in models or [] if m.get("id") == client.model), {})


def teacher_identity(client: EndpointClient, entry: dict | None = None) -> dict:
    """Which teacher answers: the model id (asked from the endpoint when not configured) and a fingerprint
    (the weights' fingerprint when the endpoint is dskd serve-teacher, else the model id). `entry`: its /models
    entry, when the caller has listed it already."""
    entry = listed_model(client) if entry is None else entry
    fingerprint = entry.get("dskd_fingerprint") or f"endpoint-model:{client.model}"
    return {"endpoint": client.public_base, "model": client.model, "fingerprint": fingerprint}


def _store_meta(recipe: Recipe, teacher: dict, tokenizer, data_fingerprint: str) -> dict:
    """What the PTs depend on; two runs may share a store only if all of it matches."""
    cfg, sampling = recipe.generate.endpoint, sampling_params(recipe)
    request = {"kind": cfg.kind, "n": sampling.n, "temperature": sampling.temperature, "top_p": sampling.top_p,
               "top_k": sampling.top_k, "max_tokens": sampling.max_tokens, "stop": list(sampling.stop),
               "top_logprobs": top_logprobs_wanted(recipe), "prompt_template": cfg.prompt_template,
               "few_shot": cfg.few_shot, "few_shot_separator": cfg.few_shot_separator,
               "system_prompt": cfg.system_prompt, "student_tokenizer": tokenizer_fingerprint(tokenizer),
               "max_target_tokens": recipe.data.max_target_tokens}
    return {"decoding": request, "seed": recipe.run.seed, "teacher": teacher, "data_fingerprint": data_fingerprint,
            "num_return_sequences": sampling.n, "source": "endpoint"}


class EndpointPTSource:
    """The `dskd.pt_sources.PTSource` for generate.endpoint: rank 0 alone asks the endpoint (HTTP concurrency,
    not ranks, parallelizes it), so there is no process group."""

    def __init__(self, recipe: Recipe, store: PTStore):
        self.recipe, self.store, self.cfg = recipe, store, recipe.generate.endpoint
        self.active = int(os.environ.get("RANK", "0")) == 0

    def check(self) -> None:
        if not self.cfg.url:
            raise ConfigError("generate.endpoint.url is not set: give the endpoint's base URL in the recipe or with "
                              "`dskd generate --teacher-endpoint http://host:port/v1`")
        check_url(self.cfg.url, self.cfg.api_key_env)  # before any request: credentials never go in the URL
        PromptBuilder.from_config(self.cfg)  # a bad template fails before anything loads or any request goes out
        self.api_key = read_api_key(self.cfg)

    def start(self) -> bool:
        return True  # the only process that generates

    def prepare(self, task: TaskData, tokenizer) -> None:
        data = self.recipe.data  # the encoder writes the PTs' target ids only: the prompt format is the endpoint's
        self.encoder = Encoder(tokenizer, Formatting("seq2seq", data.max_input_tokens, data.max_target_tokens))
        self.rows = [{"id": f"{split}:{r['id']}", "split": split, "input": r["input"]}
                     for split in self.recipe.generate.splits
                     for r in task.require(split).select_columns(["id", "input"])]
        self.inputs = len(self.rows)
        self.client = EndpointClient(self.cfg, self.api_key)
        try:
            self.teacher = teacher_identity(self.client)  # the first request: down, wrong URL or key show here
        except EndpointError as exc:
            raise EndpointGenerationStopped(f"generate could not start: {exc}") from None
        self.meta = _store_meta(self.recipe, self.teacher, tokenizer, task.fingerprint)
        self.store.write_meta(self.meta)
        self.done = self.store.completed_ids()
        self.pending = [r for r in self.rows if r["id"] not in self.done]
        self.aligner = Aligner(tokenizer) if top_logprobs_wanted(self.recipe) else None

    def tags(self) -> dict[str, str]:
        return {"dskd.teacher": f"{self.teacher['model']} @ {self.teacher['endpoint']}",
                "dskd.teacher_fingerprint": self.teacher["fingerprint"]}

    def params(self) -> dict:
        cfg = self.cfg
        return {**{f"endpoint.{k}": v for k, v in self.meta["decoding"].items()},
                "endpoint.url": public_url(cfg.url), "endpoint.model": self.teacher["model"],
                "endpoint.api_key_env": cfg.api_key_env, "endpoint.concurrency": cfg.concurrency,
                "endpoint.max_retries": cfg.max_retries, "endpoint.request_budget": cfg.request_budget}

    def generate(self, run: Tracker) -> None:
        self.job = EndpointGeneration(self.recipe, self.client, self.encoder, self.store, self.aligner, run)
        progress, total = self.job.progress, len(self.rows)
        try:
            with tqdm(total=total, initial=total - len(self.pending), desc="PTs (endpoint)", unit="ex",
                      dynamic_ncols=True) as bar:
                self.job.run(self.pending, bar)
        except preemption.Preempted:
            _report_failures(self.store, progress.failures)
            raise preemption.Preempted(
                f"generate: stopped by a signal; {len(self.done) + progress.written} of {total} inputs are saved "
                f"in {self.store.root}; rerun to continue (exit {preemption.EXIT_CODE})") from None
        except EndpointGenerationStopped as exc:
            _report_failures(self.store, progress.failures)
            saved = len(self.done) + progress.written
            raise EndpointGenerationStopped(
                f"generate stopped: {exc}. {saved} of {total} inputs have PTs in {self.store.root} and are kept; "
                "rerun `dskd generate` to continue (finished inputs are skipped)") from None

    def finish(self) -> Outcome:
        progress = self.job.progress
        _report_failures(self.store, progress.failures)
        completed = self.store.completed_ids()
        self.store.merge(expected_ids=[r["id"] for r in self.rows if r["id"] in completed])
        return Outcome(inputs=len(completed), resumed=len(self.done), new=progress.written,
                       metrics=self.job.metrics(), step=progress.written,
                       artifacts=[self.store.root / "failures.json"] if progress.failures else [])

    def print_summary(self, metrics: dict) -> None:
        m, job, store = metrics, self.job, self.store
        line = (f"[dskd] generate (endpoint {job.client.public_base}, model {job.client.model}): "
                f"{int(m['generate/inputs'])}/{len(self.rows)} inputs x {job.sampling.n} PTs in {store.root} "
                f"({m['generate/seconds']:.0f}s); {int(m['generate/requests'])} requests "
                f"({int(m['generate/retries'])} retries), {int(m['generate/prompt_tokens'])} prompt + "
                f"{int(m['generate/completion_tokens'])} completion tokens, cost {m['generate/cost']:.4f}; "
                f"empty PTs {int(m['generate/empty_pts'])}")
        if job.aligner is not None:
            line += (f"; aligned positions {m['generate/aligned_fraction']:.1%}, mean teacher tail mass "
                     f"{m['generate/teacher_tail_mass_mean']:.3f}")
        print(line)
        failed = len(job.progress.failures)
        if failed:
            print(f"[dskd] generate: WARNING {failed} inputs failed (no usable answer; listed in "
                  f"{store.root / 'failures.json'}); the store holds the others. Rerun to retry the failed ones.")


def _report_failures(store: PTStore, failures: dict[str, str]) -> None:
    path = store.root / "failures.json"
    if failures:
        atomic_write_text(path, json.dumps(failures, indent=2, sort_keys=True))
    elif path.exists():
        path.unlink()
