import dataclasses
import json
import string

import pytest

from twig_batch.errors import InputError
from twig_batch.prompts import DEFAULT_TEMPLATES, TEMPLATE_FIELDS, Templates, chat_ids, load_templates


def test_every_default_template_uses_only_its_fields_and_formats():
    for field in dataclasses.fields(Templates):
        text = getattr(DEFAULT_TEMPLATES, field.name)
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
