"""GGUF checkpoints (llama.cpp's single-file format) as teachers and students.

`teacher.path` / `student.path` (and `.tokenizer`) may name a GGUF file, or a directory with `gguf_file` naming
the file in it. `converted()` dequantizes it ONCE, with transformers' own GGUF loader (the `gguf` package), into a
plain Hugging Face directory (float32 safetensors + config + tokenizer) in a cache shared by every later load, so
the rest of dskd only ever sees a normal model directory:

    ${DSKD_GGUF_CACHE:-~/.cache/dskd/gguf}/
      <stem>-<digest>/        config.json, generation_config.json, model.safetensors, tokenizer files, DONE.json
      <stem>-<digest>.lock    held (fcntl.flock) by the process converting it; a second one waits, then reuses
      digests/<k>.json        its digest, reused while the file's path, size, mtime, ctime, inode stay

<digest> is the first 16 hex digits of the blake2b of the whole file (~0.8 GB/s, computed once per version of the
file): the same GGUF copied elsewhere maps to the same directory, and a changed file to a new one. A directory is
built under a temporary name and renamed into place with DONE.json already in it, so a directory that exists is
complete. `fingerprint()` is the digest to put in stage keys.

What can be checked without loading anything heavy is checked first, each as a ConfigError naming the file: it
exists, starts with the GGUF magic, the `gguf` package is installed, transformers' loader handles its architecture
and every tensor type in it (`check()`).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from dskd.atomic import atomic_write_text
from dskd.config import ConfigError, ModelConfig, check_tokenizer_source
from dskd.config import check_model_source as check_hf_model_source

MAGIC = b"GGUF"
DONE = "DONE.json"
CACHE_ENV = "DSKD_GGUF_CACHE"
FORMAT = 1  # bump when the conversion's output changes: older cache directories are then not reused
_FLOAT_TYPES = {"F32", "F16"}  # what every transformers GGUF loader reads (and BF16 where the new one runs)


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "dskd" / "gguf").expanduser()


# ------------------------------------------------------------------------------------------ naming a GGUF


def has_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(4) == MAGIC
    except OSError:
        return False


def gguf_path(path: str | os.PathLike | None, gguf_file: str | None = None, key: str = "path") -> Path | None:
    """The GGUF file a model source names, or None when it names something else (a Hugging Face directory, a
    hub name). `path` is the file itself (`*.gguf`, or any file that starts with the GGUF magic), or with
    `gguf_file` the directory holding it. `key` names the recipe key in errors (e.g. `teacher.path`)."""
    if gguf_file:
        if path is None:
            raise ConfigError(f"{_sibling(key, 'gguf_file')}={gguf_file} needs {key} (the directory holding it)")
        directory = Path(path).expanduser()
        if directory.is_file():
            raise ConfigError(f"{key}={path} is a file, but {_sibling(key, 'gguf_file')}={gguf_file} names a file "
                              f"inside {key}: set {key} to the directory, or to the GGUF file and unset gguf_file")
        return directory / gguf_file
    if path is None:
        return None
    candidate = Path(path).expanduser()
    if candidate.suffix.lower() == ".gguf" or (candidate.is_file() and has_magic(candidate)):
        return candidate
    return None


def _sibling(key: str, name: str) -> str:
    """`teacher.path` -> `teacher.gguf_file` (the key next to the one an error is about)."""
    return f"{key.rpartition('.')[0]}.{name}" if "." in key else name


def _basic_checks(file: Path, key: str) -> None:
    """Cheap: the file exists and is a GGUF. No package import, nothing read past 4 bytes."""
    label = f"{key}={file}"
    if not file.exists():
        where = "" if file.is_absolute() else f" (relative to {Path.cwd()})"
        raise ConfigError(f"{label}: no such GGUF file{where}")
    if not file.is_file():
        raise ConfigError(f"{label} is not a file; a GGUF model is one .gguf file")
    if not has_magic(file):
        with open(file, "rb") as handle:
            head = handle.read(4)
        raise ConfigError(f"{label} is not a GGUF file (it starts with {head!r}, not {MAGIC!r}); give a .gguf file "
                          "written by llama.cpp (or a Hugging Face model directory)")


def _need_gguf_package(file: Path) -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(f"{file} is a GGUF model; reading it needs the `gguf` package: pip install gguf")


# ----------------------------------------------------------------------------------- what is in the file


@dataclass
class GGUFInfo:
    file: Path
    architecture: str
    name: str | None
    parameters: int
    types: dict[str, int] = field(default_factory=dict)  # tensor type -> elements stored in it
    has_tokenizer: bool = False
    vocab: int | None = None  # tokens in its tokenizer (tokenizer.ggml.tokens)

    @property
    def main_type(self) -> str:
        """The type most weights are stored in (Q4_1 for a Q4_1 file, whose norms are F32)."""
        return max(self.types, key=self.types.get) if self.types else "?"

    def describe(self) -> str:
        return f"{self.main_type}, {_count(self.parameters)} params"


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}" if n < 100 * size else f"{n / size:.0f}{unit}"
    return str(n)


def read_info(file: Path) -> GGUFInfo:
    """Architecture, tensor types and sizes from the file's header (the `gguf` package's reader; it maps the
    file, reads no tensor data; ~2 s for a 50k-token vocabulary)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(file))
    except Exception as exc:  # noqa: BLE001 - a truncated or corrupt file: any parse error
        raise ConfigError(f"{file}: cannot read its GGUF header ({type(exc).__name__}: {exc})") from None

    def text(key: str) -> str | None:
        entry = reader.fields.get(key)
        if entry is None:
            return None
        value = entry.contents()
        return value if isinstance(value, str) else None

    types: collections.Counter = collections.Counter()
    for tensor in reader.tensors:
        types[tensor.tensor_type.name] += int(tensor.n_elements)
    architecture = text("general.architecture")
    if architecture is None:
        raise ConfigError(f"{file}: its GGUF header names no architecture (general.architecture)")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    return GGUFInfo(file=file, architecture=architecture, name=text("general.name"), parameters=sum(types.values()),
                    types=dict(types), has_tokenizer="tokenizer.ggml.model" in reader.fields,
                    vocab=len(tokens.data) if tokens is not None else None)


def _new_loader_archs() -> set[str]:
    """Architectures transformers' newer GGUF loader (transformers.integrations.gguf) handles, if it has one."""
    try:
        from transformers.integrations.gguf.gguf_conversion_mapping import GGUF_ARCHS
    except ImportError:
        return set()
    return set(GGUF_ARCHS)


# How transformers' legacy loader renames llama.cpp architectures before it looks them up
# (modeling_gguf_pytorch_utils.load_gguf_checkpoint).
_ARCH_RENAMES = {"t5encoder": "t5", "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss",
                 "minimax-m2": "minimax_m2"}


def supported_architectures() -> set[str]:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return set(GGUF_SUPPORTED_ARCHITECTURES) | _new_loader_archs()


def architecture_supported(architecture: str) -> bool:
    names = supported_architectures()
    return architecture in names or _ARCH_RENAMES.get(architecture, architecture) in names


@functools.lru_cache(maxsize=None)
def _gguf_dequantizable() -> frozenset[str]:
    """The types the `gguf` package dequantizes: tried on one zero block each (its public API says no more)."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    names = set(_FLOAT_TYPES)
    for qtype in GGMLQuantizationType:
        block, size = GGML_QUANT_SIZES.get(qtype, (0, 0))
        if not block or qtype.name in names:
            continue
        try:
            dequantize(np.zeros(size, dtype=np.uint8), qtype)
        except NotImplementedError:
            continue
        except Exception:  # noqa: BLE001 - implemented; a zero block is just an odd input for it
            pass
        names.add(qtype.name)
    return frozenset(names)


def _new_loader_types() -> set[str]:
    from gguf import GGMLQuantizationType
    from transformers.integrations.gguf.dequant import GGML_BLOCK

    return {"F32", "F16", "BF16"} | {GGMLQuantizationType(t).name for t in GGML_BLOCK}


def supported_types(architecture: str) -> set[str]:
    """Tensor types transformers can dequantize for a file of `architecture`: its newer loader's own kernels
    (integrations.gguf.dequant) for the architectures it handles, else the `gguf` package's dequantize, which
    the legacy loader (modeling_gguf_pytorch_utils) calls for every tensor."""
    if architecture in _new_loader_archs():
        return _new_loader_types()
    return set(_gguf_dequantizable())


def check(file: Path | str, key: str = "path", tokenizer: bool = False) -> GGUFInfo | None:
    """Every check that needs no weights loaded, each a ConfigError naming the file (see the module docstring).
    tokenizer: the tokenizer is to come from this file. A file already converted passes at once (None)."""
    file = Path(file).expanduser()
    _basic_checks(file, key)
    target = _cached(file)
    if target is not None and (not tokenizer or _has_tokenizer_files(target)):
        return None
    _need_gguf_package(file)
    info = read_info(file)
    if not architecture_supported(info.architecture):
        raise ConfigError(f"{key}={file}: GGUF architecture {info.architecture!r} is not supported by the installed "
                          f"transformers' GGUF loader (it supports: {', '.join(sorted(supported_architectures()))}); "
                          "use a Hugging Face checkpoint of this model instead, or a newer transformers")
    bad = sorted(set(info.types) - supported_types(info.architecture))
    if bad:
        raise ConfigError(f"{key}={file}: tensor type {', '.join(bad)} cannot be dequantized by the installed "
                          f"transformers/gguf (supported: {', '.join(sorted(supported_types(info.architecture)))}); "
                          "use a GGUF of this model in another quantization (e.g. Q8_0, Q4_K_M, F16)")
    if tokenizer and not info.has_tokenizer:
        raise ConfigError(f"{key}={file}: the GGUF file has no tokenizer (no tokenizer.ggml.model); set "
                          f"{_sibling(key, 'tokenizer')} to a tokenizer directory")
    return info


def check_model_source(spec: ModelConfig, role: str, *, weights: bool = True, tokenizer: bool = False) -> None:
    """dskd.config.check_model_source for GGUF sources too (the stages' and the CLI's preflight): a GGUF
    `{role}.path` (or `{role}.path` + `{role}.gguf_file`) or `{role}.tokenizer` gets `check()`, nothing converted;
    anything else the Hugging Face checks. Imports neither torch nor transformers for a non-GGUF recipe."""
    model_file = gguf_path(spec.path, spec.gguf_file, f"{role}.path")
    tok_file = gguf_path(spec.tokenizer, None, f"{role}.tokenizer") if spec.tokenizer else None
    if model_file is None and tok_file is None:
        check_hf_model_source(spec, role, weights=weights, tokenizer=tokenizer)
        return
    if weights:
        if spec.init == "pretrained" and model_file is not None:
            check(model_file, f"{role}.path")
        else:
            check_hf_model_source(spec, role, weights=True)
    if tokenizer:
        if tok_file is not None:
            check(tok_file, f"{role}.tokenizer", tokenizer=True)
        elif spec.tokenizer or model_file is None:
            check_tokenizer_source(spec, role)
        else:
            check(model_file, f"{role}.path", tokenizer=True)


def hf_config(path: str | os.PathLike, gguf_file: str | None = None, *, key: str = "path"):
    """The transformers config of a GGUF model without converting it (e.g. for `dskd plan`): the cached
    conversion's config.json, else the one transformers derives from the file's header."""
    file = gguf_path(path, gguf_file, key)
    if file is None:
        raise ConfigError(f"{key}={path}: not a GGUF file")
    check(file, key)
    from transformers import AutoConfig

    target = _cached(file)
    if target is not None:
        return AutoConfig.from_pretrained(str(target))
    config = AutoConfig.from_pretrained(str(file.parent), gguf_file=file.name)
    for attr in ("quantization_config", "_pre_quantization_dtype", "_model_name_or_path"):
        if hasattr(config, attr):
            delattr(config, attr)
    return config


# ------------------------------------------------------------------------------------------------ digest


def digest(file: Path | str) -> str:
    """blake2b (32 hex digits) of the whole file, memoized in the cache by (path, size, mtime, ctime, inode)."""
    file = Path(file).expanduser().resolve()
    stat = file.stat()
    stamp = {"path": str(file), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns,
             "inode": stat.st_ino}
    memo = cache_root() / "digests" / f"{hashlib.sha256(str(file).encode()).hexdigest()[:24]}.json"
    try:
        known = json.loads(memo.read_text())
        if {k: known.get(k) for k in stamp} == stamp and known.get("blake2b"):
            return known["blake2b"]
    except (OSError, ValueError):
        pass
    hasher = hashlib.blake2b(digest_size=16)
    with open(file, "rb") as handle:
        while chunk := handle.read(1 << 22):
            hasher.update(chunk)
    value = hasher.hexdigest()
    try:
        atomic_write_text(memo, json.dumps({**stamp, "blake2b": value}))
    except OSError:
        pass  # an unwritable cache only costs hashing again
    return value


def fingerprint(path: str | None, gguf_file: str | None = None) -> str | None:
    """What a stage key should record for a model source: '<file name>:<digest>' of the GGUF it names, None
    when it names no GGUF (or a missing one: the stage's own check reports that)."""
    file = gguf_path(path, gguf_file)
    if file is None or not file.is_file():
        return None
    return f"{file.name}:{digest(file)}"


def cache_dir_for(file: Path) -> Path:
    stem = "".join(c if c.isalnum() or c in "._-" else "_" for c in file.stem)[:80] or "model"
    return cache_root() / f"{stem}-{digest(file)[:16]}"


def _done(target: Path) -> bool:
    try:
        return json.loads((target / DONE).read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def _cached(file: Path) -> Path | None:
    target = cache_dir_for(file)
    return target if _done(target) else None


def _has_tokenizer_files(directory: Path) -> bool:
    return any((directory / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))


# -------------------------------------------------------------------------------------------- conversion


def converted(path_or_dir: str | os.PathLike, gguf_file: str | None = None, *, key: str = "path") -> Path:
    """The Hugging Face directory a GGUF model is converted to, converting it now if no process did before."""
    file = gguf_path(path_or_dir, gguf_file, key)
    if file is None:
        raise ConfigError(f"{key}={path_or_dir}: not a GGUF file (set {_sibling(key, 'gguf_file')} to the .gguf file "
                          "in that directory)")
    _basic_checks(file, key)
    target = cache_dir_for(file)
    if _done(target):
        return target
    info = check(file, key)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot write the GGUF cache {target.parent} ({exc.strerror}); point {CACHE_ENV} at a "
                          "writable directory") from None
    with _conversion_lock(target.with_name(target.name + ".lock"), file):
        if _done(target):  # another process converted it while this one waited
            return target
        _convert(file, target, info or read_info(file))
    return target


@contextlib.contextmanager
def _conversion_lock(path: Path, file: Path):
    """An exclusive flock on `path` for the block: a second process converting the same file waits here."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):  # held by another process
                holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
                print(f"[dskd] waiting for {holder} to finish converting {file.name} ...", file=sys.stderr, flush=True)
                fcntl.flock(fd, fcntl.LOCK_EX)
            else:  # a file system without locks: convert unlocked; the rename into place stays atomic
                print(f"[dskd] warning: cannot lock {path} ({exc.strerror}); converting without a lock",
                      file=sys.stderr)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host {socket.gethostname()} PID {os.getpid()}".encode(), 0)
        yield
    finally:
        os.close(fd)


def _estimate_seconds(parameters: int) -> int:
    # SmolLM2-135M Q4_1 on a 2-core CPU: ~17 s (dequantize 12, tokenizer 3, write 2); scales with the weights.
    return max(5, round(5 + parameters / 1.1e7))


def _convert(file: Path, target: Path, info: GGUFInfo) -> None:
    eta = _estimate_seconds(info.parameters)
    print(f"[dskd] converting {file.name} ({info.describe()}) to safetensors once: ~{eta} s -> {target}",
          file=sys.stderr, flush=True)
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would hide a shared cache from other users
        _write_hf_directory(file, tmp, info)
        atomic_write_text(tmp / DONE, json.dumps({
            "format": FORMAT, "source": str(file.resolve()), "blake2b": digest(file), "size": file.stat().st_size,
            "architecture": info.architecture, "name": info.name, "types": info.types, "parameters": info.parameters,
            "transformers": _version("transformers"), "gguf": _version("gguf"),
            "seconds": round(time.monotonic() - started, 1), "written": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        }, indent=2))
        if target.exists():  # left without DONE.json (a crash before the format check, or an older format)
            shutil.rmtree(target)
        try:
            os.rename(tmp, target)
        except OSError:
            if not _done(target):  # not a concurrent unlocked converter that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"[dskd] converted {file.name} in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def load_direct(file: Path, **kwargs):
    """The model as transformers loads the GGUF itself, dequantized to float32 (what the cache must equal)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    directory, name = str(file.parent), file.name
    config = AutoConfig.from_pretrained(directory, gguf_file=name)
    auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    try:  # transformers' newer loader may keep weights packed for its kernels; dskd needs them dense
        from transformers import GgufConfig

        kwargs.setdefault("quantization_config", GgufConfig(dequantize=True))
    except ImportError:
        pass
    return auto.from_pretrained(directory, gguf_file=name, dtype=torch.float32, **kwargs), auto


def _write_hf_directory(file: Path, out: Path, info: GGUFInfo) -> None:
    """Dequantize `file` with transformers and save it as a plain checkpoint: save_pretrained refuses a model
    flagged as GGUF-quantized, so its weights move (no copy) into an unflagged model built from its config."""
    import torch
    from transformers import AutoTokenizer

    try:
        model, auto = load_direct(file)
    except Exception as exc:  # noqa: BLE001 - transformers' own message, with the file named
        raise ConfigError(f"{file}: transformers could not load this GGUF ({type(exc).__name__}: {exc})") from exc
    config = model.config
    for attr in ("quantization_config", "_pre_quantization_dtype", "_model_name_or_path"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.name_or_path = ""  # the GGUF's display name otherwise (e.g. "Smollm2 135M 8k Lc100K Mix1 Ep2")
    with torch.device("meta"):
        plain = auto.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), strict=True, assign=True)
    if getattr(model, "generation_config", None) is not None:
        plain.generation_config = model.generation_config
    plain.save_pretrained(out)
    del plain, model
    if info.has_tokenizer:
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
        except Exception as exc:  # noqa: BLE001
            raise ConfigError(f"{file}: transformers could not build the tokenizer of this GGUF "
                              f"({type(exc).__name__}: {exc}); set the model's `tokenizer` key to a tokenizer "
                              "directory") from exc
        tokenizer.save_pretrained(out)
        if info.vocab:
            _drop_invented_tokens(out, info.vocab, file)


def _drop_invented_tokens(out: Path, vocab: int, file: Path) -> None:
    """transformers' byte-level GGUF tokenizer adds GPT-2's default `<|endoftext|>` when the file's vocabulary has
    no such token: one token more than the model's embeddings, which dskd refuses. Keep the file's tokens only."""
    path = out / "tokenizer.json"
    if not path.is_file():
        return
    data = json.loads(path.read_text())
    added = data.get("added_tokens") or []
    invented = {t["content"] for t in added if t["id"] >= vocab}
    if not invented:
        return
    data["added_tokens"] = [t for t in added if t["id"] < vocab]
    atomic_write_text(path, json.dumps(data, ensure_ascii=False, indent=2))
    config_path = out / "tokenizer_config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        for key, value in list(config.items()):
            if key.endswith("_token") and value in invented:
                config[key] = None
        atomic_write_text(config_path, json.dumps(config, ensure_ascii=False, indent=2))
    print(f"[dskd] {file.name}: dropped {sorted(invented)} (added by transformers, not in the GGUF's "
          f"{vocab}-token vocabulary)", file=sys.stderr)
