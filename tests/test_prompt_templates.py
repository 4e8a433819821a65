"""Prompt formats for instruct teachers (issue 18, point 1): data.prompt_template and data.chat_template.

  a  a prompt template: the prompt is the tokenizer's encoding of the rendered text; a training pair is that
     prompt + target + EOS, and the loss mask covers the target only
  b  a chat template renders through apply_chat_template, and generation and evaluation feed those same ids
  c  bad input: no {input}, both keys, a tokenizer without a chat template, a template that raises: each a
     ConfigError naming the key, before any model is built
"""

from __future__ import annotations

import copy

import pytest

from dskd.config import ConfigError, DecodingConfig, load_recipe
from dskd.data.collate import Encoder, Formatting, check_prompt_format, collate_training
from tests.conftest import tiny_recipe

CHAT = ("{% for m in messages %}<s>[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}")
RAISES = "{{ raise_exception('this template takes no user messages') }}"


@pytest.fixture
def chat_tokenizer(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)  # the session's tokenizer stays without one
    tok.chat_template = CHAT
    return tok


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_a_prompt_template_is_the_rendered_text_and_the_loss_covers_the_target_only(tiny_tokenizer):
    data = load_recipe(base={"data": {"prompt_template": "Summarize:\n{input}\nSummary: "}}).data
    encoder = Encoder(tiny_tokenizer, Formatting.from_data(data, "causal"))
    source, target = "def add(a, b): return a + b", "Add two numbers."
    rendered = f"Summarize:\n{source}\nSummary: "
    prompt = encoder.prompt_ids(source)
    bos = [tiny_tokenizer.bos_token_id]
    assert prompt == bos + _ids(tiny_tokenizer, rendered)  # no separator: the target follows the rendered text
    target_ids = encoder.target_ids(target)
    assert target_ids == _ids(tiny_tokenizer, target) + [tiny_tokenizer.eos_token_id]
    batch = collate_training([(prompt, target_ids)], "causal", tiny_tokenizer.pad_token_id)
    assert batch["input_ids"][0].tolist() == prompt + target_ids
    mask = batch["target_mask"][0].tolist()
    assert sum(mask) == len(target_ids)
    predicted = batch["targets"][0][batch["target_mask"][0]].tolist()
    assert predicted == target_ids  # exactly the target tokens (EOS included) are learned, no prompt token
    assert encoder.prompt_source(prompt) == _ids(tiny_tokenizer, source)  # what another tokenizer re-encodes
    # seq2seq: the template formats the encoder input
    seq2seq = Encoder(tiny_tokenizer, Formatting.from_data(data, "seq2seq"))
    assert seq2seq.prompt_ids(source) == _ids(tiny_tokenizer, rendered) + [tiny_tokenizer.eos_token_id]
    # an over-long input is cut, the template kept whole
    short = Encoder(tiny_tokenizer, Formatting("causal", 24, 8, prompt_template="Summarize:\n{input}\nSummary: "))
    cut = short.prompt_ids(source * 10)
    assert len(cut) <= 24 and tiny_tokenizer.decode(cut).endswith("\nSummary: ")
    assert short.truncated.inputs == 1


def test_a_chat_template_renders_through_the_tokenizer_in_generation_and_evaluation(chat_tokenizer, monkeypatch):
    import datasets
    from transformers import LlamaConfig, LlamaForCausalLM

    from dskd import generation
    from dskd.evaluate import evaluate_generations
    from tests.conftest import tiny_config_kwargs

    data = load_recipe(overrides=["data.chat_template=true"]).data
    encoder = Encoder(chat_tokenizer, Formatting.from_data(data, "causal"))
    inputs = ["def add(a, b): return a + b", "x = 1"]
    rendered = [chat_tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                   tokenize=False) for text in inputs]
    assert rendered[1] == "<s>[user] x = 1\n[assistant] "
    expected = [_ids(chat_tokenizer, text) for text in rendered]
    assert expected[1][0] == chat_tokenizer.bos_token_id  # the template's BOS, not a second one
    assert encoder.prompt_ids_batch(inputs) == expected
    assert encoder.prompt_source(expected[0]) == _ids(chat_tokenizer, inputs[0])

    seen = []

    def fake_batches(model, enc, config, jobs, on_result, **_):
        for index, (prompts, _) in enumerate(jobs):
            seen.extend(prompts)
            on_result(index, [[[enc.tokenizer.eos_token_id]] for _ in prompts])

    monkeypatch.setattr(generation, "_run_batches", fake_batches)
    model = LlamaForCausalLM(LlamaConfig(**tiny_config_kwargs("llama", 300)))
    rows = [{"input": text, "target": "t"} for text in inputs]
    evaluate_generations(model, encoder, rows, DecodingConfig(max_new_tokens=4))
    assert sorted(seen) == sorted(expected)  # evaluation's prompts
    seen.clear()

    class Store:
        def read_meta(self):
            return {"generator": generation.GENERATOR_VERSION, "decoding": decoding.as_dict(), "seed": 0}

        def completed_ids(self):
            return set()

        def write_shard(self, rank, rows):
            pass

    decoding = DecodingConfig(max_new_tokens=4)
    monkeypatch.setattr(generation, "_merge_when_all_done", lambda *a: None)
    pt_rows = datasets.Dataset.from_list([{"id": str(i), "input": t, "split": "labeled"} for i, t in enumerate(inputs)])
    generation.generate_pseudo_targets(model, encoder, pt_rows, decoding, Store(), progress=False)
    assert sorted(seen) == sorted(expected)  # PT generation's prompts


@pytest.mark.parametrize("overrides, match", [
    (["data.prompt_template='Summarize: '"], r"data.prompt_template: must contain \{input\} exactly once"),
    (["data.prompt_template='{input} and {input}'"], r"data.prompt_template: must contain \{input\} exactly once"),
    (["data.prompt_template='{input} {title}'"], r"data.prompt_template: refers to \{title\}"),
    (["data.prompt_template='{input}'", "data.chat_template=true"],
     r"data.prompt_template and data.chat_template exclude each other"),
    (["data.chat_template=true", "data.causal_separator=' => '"], r"data.causal_separator=.* is not used with "
                                                                    r"data.chat_template"),
])
def test_a_bad_prompt_format_in_the_recipe_names_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_recipe(overrides=overrides)


def test_a_chat_template_that_cannot_render_names_the_key_and_the_tokenizer(tiny_tokenizer, chat_tokenizer):
    data = load_recipe(overrides=["data.chat_template=true"]).data
    with pytest.raises(ConfigError, match=r"data.chat_template=true, but tokenizer .* has no chat template"):
        check_prompt_format(data, tiny_tokenizer)
    broken = copy.deepcopy(tiny_tokenizer)
    broken.chat_template = RAISES
    with pytest.raises(ConfigError, match=r"data.chat_template=true: the chat template of tokenizer .* fails to "
                                          r"render .*takes no user messages"):
        check_prompt_format(data, broken)
    with pytest.raises(ConfigError, match=r"data.chat_template=true: .*encoder-decoder"):
        Encoder(chat_tokenizer, Formatting.from_data(data, "seq2seq"))
    check_prompt_format(data, chat_tokenizer)  # renders: no error
    tight = load_recipe(overrides=["data.max_input_tokens=16", "data.prompt_template='{input}" + " word" * 40 + "'"]).data
    with pytest.raises(ConfigError, match=r"data.prompt_template: the prompt format alone takes .*max_input_tokens"):
        Encoder(tiny_tokenizer, Formatting.from_data(tight, "causal"))


def _no_model(*args, **kwargs):
    raise AssertionError("a model was built before the prompt format was checked")


@pytest.mark.parametrize("template", [None, RAISES])
def test_a_chat_template_that_cannot_render_stops_the_stages_before_any_model(template, tiny_task, tiny_tokenizer,
                                                                              tmp_path, monkeypatch):
    import dskd.models
    import dskd.pt_sources
    import dskd.stages.train
    from dskd.stages.generate import run_generate
    from dskd.stages.train import train_stage

    for module in (dskd.models, dskd.pt_sources, dskd.stages.train):
        monkeypatch.setattr(module, "build_model", _no_model)
    tokenizer_dir = tmp_path / "tokenizer"
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = template
    tok.save_pretrained(tokenizer_dir)
    base = tiny_recipe(tiny_task, tmp_path / "run", family="llama", data={"chat_template": True},
                       teacher={"tokenizer": str(tokenizer_dir)}, student={"tokenizer": str(tokenizer_dir)})
    recipe = load_recipe(base=base)
    what = "has no chat template" if template is None else "fails to render"
    with pytest.raises(ConfigError, match=rf"data.chat_template=true.*tokenizer {tokenizer_dir}.*{what}"):
        train_stage(recipe, "teacher")
    with pytest.raises(ConfigError, match=rf"data.chat_template=true.*{what}"):
        run_generate(load_recipe(base=base, overrides=["teacher.finetune=false"]))  # a config-built teacher
