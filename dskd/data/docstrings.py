"""The embedded demo task: docstring generation from the running interpreter's own Python sources.

Real text generation that needs no download: every machine with Python has its standard library.
- input:  "# <qualified name as words>" (e.g. "# tar file getnames"), then the function's source with its
          docstring removed: signature first on one line (decorators dropped), then the body, dedented,
          blank lines dropped. The name line comes first because a tiny model trained for minutes
          summarizes mostly from the name and signature; it makes the task learnable (measured: see the
          data-layer report), and the line is a comment, so the input stays Python source;
- target: the first sentence of its docstring (first paragraph, field lists like "Args:" cut off),
          whitespace-normalized; 3-16 words; boilerplate ("TODO ...", "See ...", signatures) skipped.
Labeled = functions with a usable docstring, unlabeled = functions without one. Module-level functions
and methods (of classes at any depth) count; functions nested inside functions do not (closures are
mostly anonymous plumbing). Test directories are skipped by default: their thousands of undocumented
`test_*` methods are not inputs a user would summarize. Functions whose code (without the name line)
repeats an earlier one are dropped so that copies cannot leak dev/test into train. Every skip is
counted in `TaskBuild.stats`.

Split: sha256("module:qualname") mod 10_000 puts a labeled function in dev (< dev_fraction), test (next
test_fraction) or labeled-train; it depends on nothing but the name, so it is stable across runs,
machines and Python versions. Unlabeled functions are all train. Files are parsed once with `ast`;
sources are sliced by the nodes' line numbers. The result is cached under `cache_dir` (keyed by the
config, this module's code, the interpreter and the scanned files' sizes/mtimes) and fingerprinted
(sha256 over the four JSONL files, records sorted by id).
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
import os
import re
import shutil
import sys
import sysconfig
import tempfile
import textwrap
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

SPLITS = ("labeled", "unlabeled", "dev", "test")
EXCLUDED_DIRS = ("site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test", "testing")
BOILERPLATE_FIRST_WORDS = frozenset({
    "todo", "xxx", "fixme", "hack", "deprecated", "note", "see", "same", "override", "overrides",
    "overridden", "implements", "undocumented", "docstring", "internal", "private", "stub", "placeholder",
})
SENTENCE_END = re.compile(r"(?<!\be\.g)(?<!\bi\.e)(?<!\betc)[.!?](?=\s|$)")
# Google/NumPy/Sphinx field lists glued to the summary line ("Compute x. Args: ...", "Do y :param a:")
SECTION_START = re.compile(r"\s(?:(?:Args|Arguments|Parameters|Params|Returns|Return|Raises|Yields|Examples?|Notes?)"
                           r"\s*:|:param\b|:return\b|:rtype\b|@param\b)")
HASH_BUCKETS = 10_000


@dataclass(frozen=True)
class DocstringTaskConfig:
    """What to scan and how to shape examples. Every field is part of the cache key."""

    roots: tuple[str, ...] = ()            # directories to scan; empty = the interpreter's stdlib
    include_site_packages: bool = False    # also scan installed packages: ~10x the data, minutes to build
    exclude_dirs: tuple[str, ...] = EXCLUDED_DIRS
    max_function_lines: int = 40           # longer functions are skipped: short ones are learnable
    name_hint: bool = True                 # first input line "# <qualified name in words>" (see _name_words)
    max_input_lines: int = 16              # rendered input cut to this many lines ...
    max_input_chars: int = 600             # ... and characters (at a line boundary where possible)
    min_target_words: int = 3
    max_target_words: int = 16             # longer first sentences are skipped, not cut mid-sentence
    dev_fraction: float = 0.05
    test_fraction: float = 0.05
    max_labeled: int | None = None         # caps keep the functions with the smallest split hash
    max_unlabeled: int | None = None
    max_dev: int | None = None
    max_test: int | None = None
    version: str = "1"                     # part of the cache key (edits to this module already are)

    def scan_roots(self) -> list[Path]:
        if self.roots:
            return [Path(r) for r in self.roots]
        roots = [Path(sysconfig.get_paths()["stdlib"])]
        if self.include_site_packages:
            roots += sorted({Path(sysconfig.get_paths()[k]) for k in ("purelib", "platlib")})
        return roots


@dataclass
class TaskBuild:
    files: dict[str, Path]    # split name -> JSONL file with fields id, input[, target]
    fingerprint: str          # sha256 over the four files' contents (records sorted by id)
    stats: dict[str, int]     # examples per split, files scanned/unparseable, skips by reason
    cache_hit: bool = False
    build_seconds: float = 0.0


@dataclass
class _Example:
    id: str
    input: str
    target: str | None
    bucket: int        # split hash in [0, HASH_BUCKETS)
    input_cut: bool    # the rendered input hit max_input_lines/max_input_chars


@dataclass
class _Scan:
    examples: list[_Example] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)


def build_docstring_task(cache_dir: Path, config: DocstringTaskConfig | None = None) -> TaskBuild:
    """Build (or reuse from `cache_dir`) the docstring task's labeled/unlabeled/dev/test JSONL files."""
    config = config or DocstringTaskConfig()
    start = time.perf_counter()
    for root in config.scan_roots():
        if not root.is_dir():
            raise FileNotFoundError(f"docstring task root {root} is not a directory; fix DocstringTaskConfig.roots")
    task_dir = Path(cache_dir) / "docstring-task" / _cache_key(config)
    if (task_dir / "manifest.json").exists():
        return _cached(task_dir, start)

    scan = _scan(config)
    splits = _split(scan.examples, config, scan.counts)

    task_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=".tmp-", dir=task_dir.parent))
    digest = hashlib.sha256()
    for name in SPLITS:
        lines = [json.dumps(_record(e), ensure_ascii=False) + "\n" for e in splits[name]]
        content = "".join(lines).encode()
        digest.update(f"{name}\n".encode() + content)
        (tmp_dir / f"{name}.jsonl").write_bytes(content)
    stats = {**{name: len(splits[name]) for name in SPLITS}, **dict(sorted(scan.counts.items()))}
    manifest = {"fingerprint": digest.hexdigest(), "stats": stats, "config": asdict(config),
                "python": sys.version, "roots": [str(r) for r in config.scan_roots()]}
    (tmp_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    try:
        os.rename(tmp_dir, task_dir)  # atomic: readers see all files or none
    except OSError:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        if (task_dir / "manifest.json").exists():  # another process finished the same build first
            return _cached(task_dir, start)
        raise
    return TaskBuild(files={s: task_dir / f"{s}.jsonl" for s in SPLITS}, fingerprint=manifest["fingerprint"],
                     stats=stats, cache_hit=False, build_seconds=time.perf_counter() - start)


def _cached(task_dir: Path, start: float) -> TaskBuild:
    manifest = json.loads((task_dir / "manifest.json").read_text())
    return TaskBuild(files={s: task_dir / f"{s}.jsonl" for s in SPLITS}, fingerprint=manifest["fingerprint"],
                     stats=manifest["stats"], cache_hit=True, build_seconds=time.perf_counter() - start)


def first_sentence(docstring: str) -> str:
    """First sentence of a docstring's first paragraph, on one line."""
    paragraph = inspect.cleandoc(docstring).split("\n\n")[0]
    text = " ".join(paragraph.split())
    text = SECTION_START.split(text, maxsplit=1)[0]
    end = SENTENCE_END.search(text)
    return text[: end.end()] if end else text


def split_of(example_id: str, config: DocstringTaskConfig) -> str:
    """Which labeled split a function goes to, from its id ("module:qualname") alone."""
    return _split_name(_bucket(example_id), config)


def _cache_key(config: DocstringTaskConfig) -> str:
    """Config + this extraction code + interpreter + the scanned files' names, sizes and mtimes (a stat walk)."""
    digest = hashlib.sha256(json.dumps({"config": asdict(config), "python": sys.version}, sort_keys=True).encode())
    digest.update(Path(__file__).read_bytes())
    for root in config.scan_roots():
        digest.update(str(root.resolve()).encode())
        for path in _python_files(root, tuple(config.exclude_dirs)):
            stat = path.stat()
            digest.update(f"{path.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _bucket(example_id: str) -> int:
    return int.from_bytes(hashlib.sha256(example_id.encode()).digest()[:8], "big") % HASH_BUCKETS


def _split_name(bucket: int, config: DocstringTaskConfig) -> str:
    dev_end = round(config.dev_fraction * HASH_BUCKETS)
    test_end = dev_end + round(config.test_fraction * HASH_BUCKETS)
    return "dev" if bucket < dev_end else "test" if bucket < test_end else "labeled"


def _record(example: _Example) -> dict[str, str]:
    record = {"id": example.id, "input": example.input}
    if example.target is not None:
        record["target"] = example.target
    return record


def _python_files(root: Path, excluded: tuple[str, ...]) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in excluded and not d.startswith("."))
        for name in sorted(filenames):
            if name.endswith(".py"):
                yield Path(dirpath) / name


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if (root / "__init__.py").exists():  # the root is itself a package, e.g. .../json
        parts.insert(0, root.name)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts) or root.name


def _scan(config: DocstringTaskConfig) -> _Scan:
    scan = _Scan()
    seen_ids: set[str] = set()
    seen_inputs: set[str] = set()
    for root in config.scan_roots():
        for path in _python_files(root, tuple(config.exclude_dirs)):
            source = path.read_bytes()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # old escape sequences etc. in third-party code
                    tree = ast.parse(source)
                lines = source.decode("utf-8").splitlines()
            except (SyntaxError, ValueError, UnicodeDecodeError):  # py2 files, templates, non-UTF-8
                scan.counts["files_unparseable"] += 1
                continue
            scan.counts["files_scanned"] += 1
            module = _module_name(path, root)
            for qualname, node in _functions(tree.body, prefix=""):
                scan.counts["functions_seen"] += 1
                example_id = f"{module}:{qualname}"
                if example_id in seen_ids:  # e.g. `if sys.platform == ...: def f` twice
                    scan.counts["skipped_duplicate_name"] += 1
                    continue
                seen_ids.add(example_id)
                example, reason = _make_example(example_id, node, lines, config)
                if example is None:
                    scan.counts[f"skipped_{reason}"] += 1
                    continue
                code = example.input.partition("\n")[2] if config.name_hint else example.input
                if code in seen_inputs:  # copies across modules/classes would leak dev into train
                    scan.counts["skipped_duplicate_input"] += 1
                else:
                    seen_inputs.add(code)
                    scan.examples.append(example)
                    scan.counts["inputs_cut"] += example.input_cut
    return scan


def _functions(body: list[ast.stmt], prefix: str) -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """Module-level functions and methods, with qualified names; not functions nested in functions."""
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield prefix + node.name, node
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node.body, prefix + node.name + ".")
        elif isinstance(node, ast.If):  # platform-dependent definitions
            yield from _functions(node.body + node.orelse, prefix)
        elif isinstance(node, ast.Try):  # `try: from _c import f` / `except ImportError: def f(...)`
            handlers = [stmt for handler in node.handlers for stmt in handler.body]
            yield from _functions(node.body + handlers + node.orelse + node.finalbody, prefix)


def _make_example(example_id: str, node, lines: list[str], config: DocstringTaskConfig):
    """(_Example, "") or (None, reason it was skipped)."""
    qualname = example_id.split(":", 1)[1]
    if node.end_lineno - node.lineno + 1 > config.max_function_lines:
        return None, "long_function"
    first = node.body[0]
    has_docstring = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
        and isinstance(first.value.value, str)
    if not has_docstring:
        text, cut = _render_input(qualname, lines[node.lineno - 1: first.lineno - 1],
                                  lines[first.lineno - 1: node.end_lineno], config)
        return _Example(example_id, text, None, _bucket(example_id), cut), ""
    if first.lineno == node.lineno or lines[first.lineno - 1].encode()[: first.col_offset].strip():
        return None, "inline_docstring"  # `def f(): "doc"`: the docstring shares a line with code
    if len(node.body) > 1 and node.body[1].lineno == first.end_lineno:
        return None, "inline_docstring"
    target = first_sentence(first.value.value)
    reason = _target_problem(target, config)
    if reason:
        return None, reason
    header = lines[node.lineno - 1: first.lineno - 1]
    body = lines[first.end_lineno: node.end_lineno]
    text, cut = _render_input(qualname, header, body, config)
    return _Example(example_id, text, target, _bucket(example_id), cut), ""


def _name_words(qualname: str) -> str:
    """`HTTPServer.get_request_line` -> "http server get request line": the words a summary reuses."""
    words = re.sub(r"([a-z])([A-Z])|([A-Z])([A-Z][a-z])", r"\1\3 \2\4", qualname)
    return " ".join(re.split(r"[\W_]+", words)).strip().lower()


def _target_problem(target: str, config: DocstringTaskConfig) -> str:
    words = target.split()
    if not words:
        return "empty_target"
    if words[0].lower().strip(":.,!-") in BOILERPLATE_FIRST_WORDS or not words[0][0].isalpha():
        return "boilerplate_target"  # TODO/XXX/see-also, or a signature/doctest line like ">>> f()"
    if "->" in target or "(" in words[0]:
        return "boilerplate_target"  # "f(x) -> y": a signature line, not a summary
    if len(words) < config.min_target_words:
        return "short_target"
    if len(words) > config.max_target_words:
        return "long_target"
    return ""


def _render_input(qualname: str, header: list[str], body: list[str], config: DocstringTaskConfig) -> tuple[str, bool]:
    """[Name hint,] signature on one line, then the dedented body without blank lines; (text, was cut)."""
    header = [line for line in header if line.strip()]
    if len(header) > 1 and not any("#" in line for line in header):
        header = [header[0].rstrip() + " " + " ".join(h.strip() for h in header[1:])]
        header[0] = re.sub(r"\(\s+", "(", re.sub(r"\s+\)", ")", header[0]))
    lines = [line.rstrip().expandtabs(4) for line in header + body if line.strip()]
    lines = textwrap.dedent("\n".join(lines)).split("\n")
    if config.name_hint:
        lines.insert(0, f"# {_name_words(qualname)}")
    cut = len(lines) > config.max_input_lines
    text = ""
    for line in lines[: config.max_input_lines]:
        if len(text) + len(line) + 1 > config.max_input_chars:
            text, cut = text or line[: config.max_input_chars], True
            break
        text = f"{text}\n{line}" if text else line
    return text, cut


def _split(examples: list[_Example], config: DocstringTaskConfig, counts: Counter) -> dict[str, list[_Example]]:
    splits: dict[str, list[_Example]] = {name: [] for name in SPLITS}
    for example in examples:
        name = "unlabeled" if example.target is None else _split_name(example.bucket, config)
        splits[name].append(example)
    caps = {"labeled": config.max_labeled, "unlabeled": config.max_unlabeled,
            "dev": config.max_dev, "test": config.max_test}
    for name, cap in caps.items():
        ranked = sorted(splits[name], key=lambda e: (e.bucket, e.id))
        if cap is not None and len(ranked) > cap:
            counts[f"capped_{name}"] = len(ranked) - cap
            ranked = ranked[:cap]
        splits[name] = sorted(ranked, key=lambda e: e.id)
    return splits
