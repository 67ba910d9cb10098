"""The <lora:name:w> prompt syntax: parsed out as A1111 does, merged with loras=, written back."""

from __future__ import annotations

import re

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from colabswarm.errors import InvalidRequest
from colabswarm.prompts import (
    format_weight,
    merge_loras,
    parse_lora_tags,
    prompt_with_loras,
    split_prompt,
)
from colabswarm.protocol import LORA_NAME_PATTERN, MAX_LORA_WEIGHT, MAX_LORAS_PER_JOB

names = st.from_regex(LORA_NAME_PATTERN, fullmatch=True).filter(lambda n: len(n) <= 40)
weights = st.floats(-MAX_LORA_WEIGHT, MAX_LORA_WEIGHT, allow_nan=False).map(
    lambda w: round(w, 3))
# prompt text without tag syntax, with spaces, commas and line breaks in it
plain = st.text(st.characters(blacklist_characters="<>", blacklist_categories=("Cs",)),
                max_size=60)


@pytest.mark.parametrize("prompt, cleaned, loras", [
    ("a red fox <lora:fox:0.8>", "a red fox", {"fox": 0.8}),
    ("<lora:fox> a red fox", "a red fox", {"fox": 1.0}),
    ("a <lora:x:.5><LORA:y:-1>  red fox", "a red fox", {"x": 0.5, "y": -1.0}),
    ("a red fox, <lora:fox:1>", "a red fox,", {"fox": 1.0}),  # A1111 keeps the comma
    ("a red fox, <lora:fox:1>, snow", "a red fox, , snow", {"fox": 1.0}),
    ("line one <lora:a:2>\n<lora:b:1e-1>\nline three", "line one\n\nline three",
     {"a": 2.0, "b": 0.1}),
    ("<lora:my lora (v2):1.25>", "", {"my lora (v2)": 1.25}),
    ("no  tags ,here ", "no  tags ,here ", {}),
    ("<hypernet:h:1> stays", "<hypernet:h:1> stays", {}),
])
def test_examples(prompt, cleaned, loras):
    assert parse_lora_tags(prompt) == (cleaned, loras)


@pytest.mark.parametrize("prompt, says", [
    ("<lora:x:abc>", "not a number"), ("<lora:x:nan>", "not a number"),
    ("<lora:x:4.5>", "between"), ("<lora:x:0.5:0.8>", "separate"), ("<lora:x:te=1>", "separate"),
    ("<lora::1>", "not a LoRA name"), ("<lora: x :1> <lora:x:2>", "twice"),
    ("".join(f"<lora:n{i}>" for i in range(MAX_LORAS_PER_JOB + 1)), "At most"),
])
def test_bad_tags_are_refused_with_what_to_write(prompt, says):
    with pytest.raises(InvalidRequest, match=says):
        parse_lora_tags(prompt)


def test_explicit_loras_win_over_the_prompt():
    cleaned, loras = split_prompt("a fox <lora:a:0.3> <lora:b>", {"a": 0.9, "c": -0.5})
    assert cleaned == "a fox"
    assert loras == {"a": 0.9, "b": 1.0, "c": -0.5}
    assert list(loras) == ["a", "b", "c"], "the prompt's order, then the explicit ones"
    for bad in ({"a": 5}, {"a": float("inf")}, {"a": True}, {"a:b": 1}, {"a": "1"}):
        with pytest.raises(InvalidRequest):
            merge_loras({}, bad)
    with pytest.raises(InvalidRequest, match="At most"):
        merge_loras({f"t{i}": 1.0 for i in range(5)}, {f"e{i}": 1.0 for i in range(5)})


def test_weights_read_as_people_write_them():
    assert [format_weight(w) for w in (1.0, 0.8, -0.25, 0.0, -0.0, 2.5e-05)] == [
        "1", "0.8", "-0.25", "0", "0", "2.5e-05"]


@given(plain)
def test_a_prompt_without_tags_is_untouched(text):
    assert parse_lora_tags(text) == (text, {})


@given(st.lists(st.tuples(plain, names, st.one_of(st.none(), weights)), max_size=6), plain)
def test_tags_anywhere_come_out_and_leave_the_text(parts, tail):
    assume(len({n for _, n, _ in parts}) == len(parts))
    prompt = "".join(f"{text}<lora:{name}{'' if w is None else ':' + repr(w)}>"
                     for text, name, w in parts) + tail
    cleaned, loras = parse_lora_tags(prompt)
    assert loras == {n: (1.0 if w is None else w) for _, n, w in parts}
    assert "<" not in cleaned
    # only blanks next to the tags went: the words are all there, in order
    words = re.findall(r"\S+", "".join(t + " " for t, _, _ in parts) + tail)
    assert re.findall(r"\S+", cleaned) == words
    assert parse_lora_tags(cleaned) == (cleaned, {}), "cleaning is done in one go"


@given(plain, st.dictionaries(names, weights, max_size=MAX_LORAS_PER_JOB))
def test_the_png_prompt_reads_back_to_the_same_job(text, loras):
    cleaned, merged = split_prompt(text, loras)
    written = prompt_with_loras(text, loras)
    again, back = split_prompt(written)
    assert back == merged
    assert list(back) == list(merged)
    assert again == (cleaned.rstrip(" \t") if merged else cleaned)
    assert prompt_with_loras(written, None) == written, "writing twice changes nothing"
