"""The embedded docstring task: extraction, deterministic split, fingerprint and cache."""

import json
import os
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import pytest

from dskd.data.docstrings import SPLITS, DocstringTaskConfig, build_docstring_task, first_sentence, split_of

SHAPES = textwrap.dedent('''\
    """Module docstring: not a function."""
    import functools


    @functools.lru_cache(maxsize=None)
    def parse_header_line(line,
                          strict=False):
        """Split one header line into name and value.

        The second paragraph is not part of the target.
        """
        name, _, value = line.partition(":")  # keep comments
        return name.strip(), value.strip()


    def undocumented(x):

        return x * 2


    class HTTPThing:
        def get_status_code(self):
            """Return the status code, e.g. 404.  Second sentence."""
            return self.code

        def close(self):
            """TODO: write this."""
            self.sock = None

        def inline(self): "Inline docstring shares the def line."

        def outer(self):
            """Return a closure that adds one to its argument."""
            def inner(y):
                """Nested functions are not examples of their own."""
                return y + 1
            return inner


    if True:
        def platform_specific():
            return 1
    else:
        def platform_specific():
            return 2


    def long_one():
        """Too long to keep."""
    ''') + "    x = 1\n" * 50

COPY = textwrap.dedent('''\
    def undocumented(x):
        return x * 2
    ''')


def make_root(path: Path) -> Path:
    (path / "pkg" / "tests").mkdir(parents=True)
    (path / "pkg" / "__init__.py").write_text("")
    (path / "pkg" / "shapes.py").write_text(SHAPES)
    (path / "pkg" / "zz_copy.py").write_text(COPY)  # same input as shapes.undocumented: dropped
    (path / "pkg" / "broken.py").write_text("def broken(:\n    pass\n")
    (path / "pkg" / "tests" / "test_x.py").write_text("def test_x():\n    assert 1\n")  # excluded dir
    return path


def small_config(root: Path, **overrides) -> DocstringTaskConfig:
    json_package = Path(json.__file__).parent  # a small stdlib package, to exercise real code too
    return DocstringTaskConfig(roots=(str(root), str(json_package)), **overrides)


def read_split(build, name):
    return [json.loads(line) for line in build.files[name].read_text().splitlines()]


def all_examples(build):
    return {r["id"]: (name, r) for name in SPLITS for r in read_split(build, name)}


def test_inputs_have_no_docstring_and_targets_are_first_sentences(tmp_path):
    build = build_docstring_task(tmp_path / "cache", small_config(make_root(tmp_path / "src")))
    examples = all_examples(build)

    _, parse = examples["pkg.shapes:parse_header_line"]
    assert parse["input"] == ("# parse header line\n"
                              "def parse_header_line(line, strict=False):\n"
                              "    name, _, value = line.partition(\":\")  # keep comments\n"
                              "    return name.strip(), value.strip()")
    assert parse["target"] == "Split one header line into name and value."

    _, status = examples["pkg.shapes:HTTPThing.get_status_code"]
    assert status["input"] == "# http thing get status code\ndef get_status_code(self):\n    return self.code"
    assert status["target"] == "Return the status code, e.g. 404."

    _, outer = examples["pkg.shapes:HTTPThing.outer"]  # the nested function's docstring stays: it is code
    assert outer["target"] == "Return a closure that adds one to its argument."
    assert '"""Return a closure' not in outer["input"] and "Nested functions" in outer["input"]

    name, plain = examples["pkg.shapes:undocumented"]
    assert name == "unlabeled" and "target" not in plain
    assert plain["input"] == "# undocumented\ndef undocumented(x):\n    return x * 2"

    for split in SPLITS:
        for record in read_split(build, split):
            assert '"""' not in record["input"].split("\n")[1], record  # no docstring right after the def
            assert ("target" in record) == (split != "unlabeled")


def test_skips_are_counted_and_counts_add_up(tmp_path):
    build = build_docstring_task(tmp_path / "cache", small_config(make_root(tmp_path / "src")))
    stats, examples = build.stats, all_examples(build)
    assert stats["files_unparseable"] == 1
    assert stats["skipped_boilerplate_target"] >= 1 and "pkg.shapes:HTTPThing.close" not in examples
    assert stats["skipped_inline_docstring"] >= 1 and "pkg.shapes:HTTPThing.inline" not in examples
    assert stats["skipped_long_function"] >= 1 and "pkg.shapes:long_one" not in examples
    assert stats["skipped_duplicate_input"] >= 1 and "pkg.zz_copy:undocumented" not in examples
    assert stats["skipped_duplicate_name"] >= 1 and "pkg.shapes:platform_specific" in examples
    assert not any(i.startswith("pkg.tests") for i in examples)
    assert not any("inner" in i for i in examples)
    assert any(i.startswith("json.decoder:") for i in examples)

    kept = sum(stats[name] for name in SPLITS)
    assert kept == len(examples)
    dropped = sum(v for k, v in stats.items() if k.startswith(("skipped_", "capped_")))
    assert stats["functions_seen"] == kept + dropped


def test_build_is_deterministic_and_split_follows_the_id_hash(tmp_path):
    root = make_root(tmp_path / "src")
    config = small_config(root)
    first = build_docstring_task(tmp_path / "cache1", config)
    second = build_docstring_task(tmp_path / "cache2", config)
    assert first.fingerprint == second.fingerprint and len(first.fingerprint) == 64
    for name in SPLITS:
        assert first.files[name].read_bytes() == second.files[name].read_bytes()

    for example_id, (name, _) in all_examples(first).items():
        if name != "unlabeled":
            assert split_of(example_id, config) == name
    # The split of a function depends on its id alone: adding a module moves nothing.
    (root / "pkg" / "extra.py").write_text('def extra_fn(a):\n    """Do one extra thing."""\n    return a\n')
    fresh = build_docstring_task(tmp_path / "cache1", config)  # a changed source tree is a new cache entry
    assert not fresh.cache_hit and fresh.fingerprint != first.fingerprint
    before, after = all_examples(first), all_examples(fresh)
    assert set(after) - set(before) == {"pkg.extra:extra_fn"}
    assert all(after[i][0] == before[i][0] for i in before)


def test_split_fractions_are_roughly_respected():
    ids = [f"mod{i}:fn{i}" for i in range(4000)]
    config = DocstringTaskConfig(dev_fraction=0.1, test_fraction=0.2)
    names = [split_of(i, config) for i in ids]
    assert abs(names.count("dev") / 4000 - 0.1) < 0.02 and abs(names.count("test") / 4000 - 0.2) < 0.02


def test_cache_is_reused_without_rewriting(tmp_path):
    config = small_config(make_root(tmp_path / "src"))
    built = build_docstring_task(tmp_path / "cache", config)
    mtimes = {name: os.stat(path).st_mtime_ns for name, path in built.files.items()}
    start = time.perf_counter()
    reused = build_docstring_task(tmp_path / "cache", config)
    assert time.perf_counter() - start < 0.5  # a stat walk, no parsing
    assert reused.cache_hit and not built.cache_hit
    assert (reused.fingerprint, reused.stats, reused.files) == (built.fingerprint, built.stats, built.files)
    assert {name: os.stat(path).st_mtime_ns for name, path in reused.files.items()} == mtimes
    assert [p.name for p in (tmp_path / "cache" / "docstring-task").iterdir()] == [built.files["dev"].parent.name]

    other = build_docstring_task(tmp_path / "cache", replace(config, max_input_lines=3))  # new key, new build
    assert not other.cache_hit and other.files["dev"].parent != built.files["dev"].parent
    assert all(len(r["input"].split("\n")) <= 3 for r in read_split(other, "labeled"))
    assert other.stats["inputs_cut"] > built.stats.get("inputs_cut", 0)


def test_caps_keep_the_smallest_hashes_and_are_counted(tmp_path):
    config = small_config(make_root(tmp_path / "src"))
    full = build_docstring_task(tmp_path / "cache", config)
    capped = build_docstring_task(tmp_path / "cache", replace(config, max_labeled=5, max_unlabeled=7))
    assert (capped.stats["labeled"], capped.stats["unlabeled"]) == (5, 7)
    assert capped.stats["capped_labeled"] == full.stats["labeled"] - 5
    kept = [r["id"] for r in read_split(capped, "labeled")]
    assert set(kept) <= {r["id"] for r in read_split(full, "labeled")}
    assert kept == sorted(kept)


def test_missing_root_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere is not a directory"):
        build_docstring_task(tmp_path / "cache", DocstringTaskConfig(roots=(str(tmp_path / "nowhere"),)))


@pytest.mark.parametrize("docstring, expected", [
    ("Return x.", "Return x."),
    ("\n    Return the value\n    of x.  More here.\n", "Return the value of x."),
    ("Compare values, i.e. a and b! Then more.", "Compare values, i.e. a and b!"),
    ("No final period\n\nSecond paragraph.", "No final period"),
    ("Compute the inverse frequencies\nArgs:\n    config: the config.", "Compute the inverse frequencies"),
    ("Send it :param x: the thing", "Send it"),
])
def test_first_sentence(docstring, expected):
    assert first_sentence(docstring) == expected
