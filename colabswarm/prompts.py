"""A1111's LoRA prompt syntax, ``<lora:name:0.8>``: parsed out of prompts, written back in.

Pure and torch-free: the controller parses a user's prompt into the text the text encoder gets
(tags removed, whitespace tidied) and the LoRAs with their weights, and the PNG writer puts the
tags back so A1111 and other readers see the LoRAs where A1111 writes them.

Rules:
- ``<lora:name>`` is weight 1, ``<lora:name:w>`` weight w (a number, -4..4). ``lora`` may be
  written in any case. A1111's other forms (``<lora:name:te:unet>``, named ``te=``/``unet=``
  arguments) set separate text-encoder and UNet weights, which the workers do not do: they are
  refused with a message, not misread.
- A LoRA named twice in one prompt is refused (it is unclear which weight was meant).
- ``merge_loras(tags, explicit)``: an explicit ``loras={"name": w}`` wins over a tag for the
  same name (a function argument or an X/Y grid's "LoRA weight" axis overrides the prompt
  text); the order is the prompt's tags first, then the explicit ones not in the prompt.
- Cleaning removes the tags and nothing else, as A1111 does: a run of tags with the spaces and
  tabs around it becomes one space between words, or nothing at the start or end of a line.
  Commas stay (A1111's text encoder sees "a fox, " for "a fox, <lora:x:1>", and so do ours);
  text away from the tags is untouched, and a prompt without tags comes back unchanged.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping

from .errors import InvalidRequest
from .protocol import LORA_NAME_PATTERN, MAX_LORA_NAME, MAX_LORA_WEIGHT, MAX_LORAS_PER_JOB

__all__ = [
    "format_lora_tags",
    "format_weight",
    "merge_loras",
    "parse_lora_tags",
    "prompt_with_loras",
    "split_prompt",
]

_MAX_PROMPT = 20_000  # a bound on the text this parses; workers take 4000 characters
# bounded inner text and runs that start only where blanks start: linear time on any input
_TAG_TEXT = r"<\s*lora\s*:([^<>]{0,400})>"
_TAG = re.compile(_TAG_TEXT, re.IGNORECASE)
_TAG_RUN = re.compile(rf"(?<![ \t])[ \t]*(?:{_TAG_TEXT}[ \t]*)+", re.IGNORECASE)
_NAME = re.compile(LORA_NAME_PATTERN)
_NUMBER = re.compile(r"^[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?$")


def _weight(text: str, tag: str) -> float:
    text = text.strip()
    if not _NUMBER.match(text):
        raise InvalidRequest(f"In {tag!r}, the weight {text!r} is not a number; write e.g. "
                             "<lora:name:0.8>.")
    w = float(text)
    if not math.isfinite(w) or abs(w) > MAX_LORA_WEIGHT:
        raise InvalidRequest(f"In {tag!r}, the weight must be between -{MAX_LORA_WEIGHT:g} and "
                             f"{MAX_LORA_WEIGHT:g}.")
    return w


def _check_name(name: str, where: str) -> str:
    if not isinstance(name, str) or len(name) > MAX_LORA_NAME or not _NAME.match(name):
        raise InvalidRequest(
            f"{where}: {name!r} is not a LoRA name (1-{MAX_LORA_NAME} characters, no ':', ',', "
            "'<', '>', quotes, slashes, and no space at either end)."
        )
    return name


def _drop_run(m: re.Match[str]) -> str:
    """A run of tags and the blanks around it: one space between words, none at a line end."""
    text, start, end = m.string, m.start(), m.end()
    at_line_start = start == 0 or text[start - 1] == "\n"
    at_line_end = end == len(text) or text[end] == "\n"
    return "" if at_line_start or at_line_end else " "


def parse_lora_tags(prompt: str) -> tuple[str, dict[str, float]]:
    """(the prompt without its <lora:...> tags, {name: weight} in the order of the tags)."""
    if not isinstance(prompt, str):
        raise InvalidRequest(f"A prompt is text, not {type(prompt).__name__}.")
    if len(prompt) > _MAX_PROMPT:
        raise InvalidRequest(f"Prompts are limited to {_MAX_PROMPT} characters here.")
    loras: dict[str, float] = {}

    def take(m: re.Match[str]) -> str:
        tag = m.group(0)
        parts = m.group(1).split(":")
        name = parts[0].strip()
        _check_name(name, f"In {tag!r}")
        if len(parts) > 2 or any("=" in p for p in parts[1:]):
            raise InvalidRequest(
                f"{tag!r} sets separate text-encoder/UNet weights, which this swarm does not "
                f"do; write one weight, e.g. <lora:{name}:0.8>."
            )
        weight = _weight(parts[1], tag) if len(parts) == 2 else 1.0
        if name in loras:
            raise InvalidRequest(
                f"The prompt names LoRA {name!r} twice (weights {format_weight(loras[name])} "
                f"and {format_weight(weight)}); write it once."
            )
        loras[name] = weight
        if len(loras) > MAX_LORAS_PER_JOB:
            raise InvalidRequest(f"At most {MAX_LORAS_PER_JOB} LoRAs per image.")
        return tag

    _TAG.sub(take, prompt)  # checks every tag, in order
    if not loras:
        return prompt, {}
    return _TAG_RUN.sub(_drop_run, prompt), loras


def merge_loras(tags: Mapping[str, float], explicit: Mapping[str, float] | None
                ) -> dict[str, float]:
    """The LoRAs of a job: the prompt's tags, with ``explicit`` (``loras=``) winning for a
    name both give; checked names and weights, at most MAX_LORAS_PER_JOB."""
    merged: dict[str, float] = dict(tags)
    for name, weight in (explicit or {}).items():
        _check_name(name, "loras=")
        if (isinstance(weight, bool) or not isinstance(weight, int | float)
                or not math.isfinite(weight) or abs(weight) > MAX_LORA_WEIGHT):
            raise InvalidRequest(f"loras={{{name!r}: {weight!r}}}: a weight is a number between "
                                 f"-{MAX_LORA_WEIGHT:g} and {MAX_LORA_WEIGHT:g}.")
        merged[name] = float(weight)
    if len(merged) > MAX_LORAS_PER_JOB:
        raise InvalidRequest(f"At most {MAX_LORAS_PER_JOB} LoRAs per image; got {len(merged)}.")
    return merged


def split_prompt(prompt: str, loras: Mapping[str, float] | None = None
                 ) -> tuple[str, dict[str, float]]:
    """What the controller does with a user's prompt and ``loras=``: (the text for the text
    encoder, the job's {name: weight})."""
    cleaned, tags = parse_lora_tags(prompt)
    return cleaned, merge_loras(tags, loras)


def format_weight(weight: float) -> str:
    """A weight as people write it: 1, 0.8, -0.25 (shortest form that reads back equal)."""
    text = repr(float(weight))
    if text.endswith(".0"):
        text = text[:-2]
    return "0" if text == "-0" else text


def format_lora_tags(loras: Iterable[tuple[str, float]]) -> str:
    """' '-joined <lora:name:w> tags."""
    return " ".join(f"<lora:{name}:{format_weight(w)}>" for name, w in loras)


def prompt_with_loras(prompt: str, loras: Mapping[str, float] | None) -> str:
    """The prompt as A1111 writes it into a PNG: the text, then one tag per LoRA. Tags already
    in ``prompt`` are taken out first (``loras`` wins for a name both give), so this is safe on
    either the user's prompt or the cleaned one, and ``split_prompt`` of the result gives back
    the same LoRAs and the same text (less blanks at its very end)."""
    cleaned, merged = split_prompt(prompt, loras)
    if not merged:
        return cleaned
    tags = format_lora_tags(merged.items())
    text = cleaned.rstrip(" \t")
    return f"{text} {tags}" if text and not text.endswith("\n") else text + tags
