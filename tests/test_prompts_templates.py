import dataclasses
import json
import string

import pytest
import torch

from twig_batch.errors import InputError
from twig_batch.prompts import (DEFAULT_TEMPLATES, TEMPLATE_FIELDS, Templates, chat_ids, load_templates,
                                 t2i_prompt_ids)


def test_every_default_template_uses_only_its_fields_and_formats():
    for field in dataclasses.fields(Templates):
        text = getattr(DEFAULT_TEMPLATES, field.name)
        if text is None:  # the system text: the model's own unless a template file sets one
            continue
        used = {f for _, f, _, _ in string.Formatter().parse(text) if f is not None}
        assert used <= TEMPLATE_FIELDS[field.name], field.name
        text.format(**{name: "x" for name in TEMPLATE_FIELDS[field.name]})
    assert set(TEMPLATE_FIELDS) == {f.name for f in dataclasses.fields(Templates)}
    assert "{prompt}" in DEFAULT_TEMPLATES.think_first and "{thoughts}" in DEFAULT_TEMPLATES.think_next
    assert "Score:" in DEFAULT_TEMPLATES.reflect and "Better:" in DEFAULT_TEMPLATES.reflect
    assert DEFAULT_TEMPLATES.seed_stage.format(prompt="a cat", part="top part", guidance="g") == "a cat, top part"


def test_load_templates_overrides_only_what_the_file_names(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"seed_stage": "{prompt} ({part}) {guidance}", "part_top": "upper third"}))
    templates = load_templates(path)
    assert templates.seed_stage == "{prompt} ({part}) {guidance}" and templates.part_top == "upper third"
    assert templates.think_first == DEFAULT_TEMPLATES.think_first


@pytest.mark.parametrize("content, message", [
    ({"thinking": "x"}, "unknown template 'thinking'"),
    ({"seed_stage": 3}, "must be a string"),
    ({"seed_stage": "{prompt} {thought}"}, "{thought}"),
    ({"twig_condition": "{}"}, "allowed fields"),
    ({"reflect": "{prompt"}, "not a valid format string"),
    (["seed_stage"], "JSON object"),
])
def test_bad_template_files_are_input_errors(tmp_path, content, message):
    path = tmp_path / "t.json"
    path.write_text(json.dumps(content))
    with pytest.raises(InputError, match=message.replace("{", r"\{").replace("(", r"\(")):
        load_templates(path)


def test_missing_or_broken_file_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="cannot read"):
        load_templates(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        load_templates(tmp_path / "bad.json")


def test_chat_ids_lay_out_the_image_block_like_janus(tiny64):
    t = tiny64.tokens
    text_only = chat_ids(tiny64, "what is here?", "SYS ")
    assert text_only[0] == t.bos and t.image not in text_only and t.boi not in text_only
    with_image = chat_ids(tiny64, "what is here?", "SYS ", image_tokens=tiny64.understanding_tokens)
    start = with_image.index(t.boi)
    block = with_image[start + 1: start + 1 + tiny64.understanding_tokens]
    assert block == [t.image] * tiny64.understanding_tokens
    assert with_image[start + 1 + tiny64.understanding_tokens] == t.eoi
    assert with_image.count(t.image) == tiny64.understanding_tokens
    tail = with_image[start + 2 + tiny64.understanding_tokens:]
    assert tiny64.tokenizer.decode(tail, skip_special_tokens=False) == "\nwhat is here?\n\n<|Assistant|>:"
    assert tiny64.tokenizer.decode(text_only[1:], skip_special_tokens=False) == "SYS <|User|>: what is here?\n\n<|Assistant|>:"


@pytest.mark.parametrize("template, message", [
    ("{band:{prompt.__class__.__mro__}} {prompt}", "a field inside a format spec"),  # attribute access in a spec
    ("{prompt:{prompt}}", "a field inside a format spec"),  # each prompt would become a format spec
    ("{prompt:d} {part}", "cannot be filled in"),  # a spec that does not fit a text
])
def test_fields_and_bad_specs_inside_format_specs_are_refused(tmp_path, template, message):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"think_first": template}))
    with pytest.raises(InputError, match=f"'think_first'.*{message}"):
        load_templates(path)


def test_a_plain_format_spec_is_allowed(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"think_first": "{prompt!r:>20} band {band:02d} of {bands}"}))
    assert load_templates(path).think_first.startswith("{prompt!r")


def test_pictures_are_asked_about_with_the_models_own_system_prompt_and_text_only_turns_with_none(tiny64, tmp_path):
    from transformers.models.janus.processing_janus import DEFAULT_SYSTEM_PROMPT

    from twig_batch.pipeline.understanding import featured_prompts

    feature = torch.zeros(tiny64.understanding_tokens, 8)
    text_only, shown = featured_prompts(tiny64, ["what is here?"] * 2, [None, feature], DEFAULT_TEMPLATES)
    assert text_only.ids == chat_ids(tiny64, "what is here?", "")
    assert shown.ids == chat_ids(tiny64, "what is here?", DEFAULT_SYSTEM_PROMPT, image_tokens=tiny64.understanding_tokens)
    assert tiny64.tokenizer.decode(shown.ids[1:shown.ids.index(tiny64.tokens.boi)]) == DEFAULT_SYSTEM_PROMPT + "<|User|>: "
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"system": "SYS\n\n", "system_text_only": "PLAIN "}))
    templates = load_templates(path)
    text_only, shown = featured_prompts(tiny64, ["what is here?"] * 2, [None, feature], templates)
    assert text_only.ids == chat_ids(tiny64, "what is here?", "PLAIN ")
    assert shown.ids == chat_ids(tiny64, "what is here?", "SYS\n\n", image_tokens=tiny64.understanding_tokens)


def test_turns_are_stripped_and_tokenized_in_one_piece_as_deepseeks_processor_does(tiny64):
    # Between special tokens the conversation is one string to the tokenizer: the space after
    # "<|User|>:" belongs to the question's first word, not a token of its own.
    assert chat_ids(tiny64, "  what is here? \n") == [tiny64.tokens.bos, *tiny64.encode("<|User|>: what is here?\n\n<|Assistant|>:")]
    shown = chat_ids(tiny64, " what is here?\n", "S ", image_tokens=4)
    assert shown[shown.index(tiny64.tokens.eoi) + 1:] == tiny64.encode("\nwhat is here?\n\n<|Assistant|>:")
    assert t2i_prompt_ids(tiny64, "\t a red cube  \n") == t2i_prompt_ids(tiny64, "a red cube")


def test_the_reflection_shows_this_bands_description_and_the_earlier_bands_apart():
    from twig_batch.pipeline.reflection import ModelScorer, ReflectionRequest

    templates = dataclasses.replace(DEFAULT_TEMPLATES, reflect="{band}|{thought}|{earlier}|{thoughts}")
    ask = ReflectionRequest("a cat", 2, 3, "third", ("first", "second", "third"), canvas=None)
    assert ModelScorer(templates).question(ask) == "3|third|first second|first second third"
    assert ModelScorer(templates).question(dataclasses.replace(ask, band=0, thought="first", earlier=("first",))) == (
        "1|first||first")
    reflect = DEFAULT_TEMPLATES.reflect
    assert "{thoughts}" in reflect and "{thought}" in reflect and "Score:" in reflect and "Better:" in reflect
