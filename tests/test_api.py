"""The public API's twins: every sync call has an async twin with the same explicit signature,
so a misspelt keyword is a TypeError at once rather than a setting silently ignored."""

from __future__ import annotations

import inspect

import pytest

from colabswarm import Swarm

PAIRS = [("add", "aadd"), ("add_many", "aadd_many"), ("remove", "aremove"), ("move", "amove"),
         ("set", "aset"), ("enable", "aenable"), ("disable", "adisable"),
         ("check_now", "acheck_now"), ("generate", "agenerate"), ("upscale", "aupscale"),
         ("interrupt", "ainterrupt"), ("status", "astatus"), ("status_line", "astatus_line"),
         ("models", "amodels"), ("upscalers", "aupscalers"), ("close", "aclose"),
         ("grid", "agrid"), ("retry", "aretry"),
         ("samplers", "asamplers"), ("loras", "aloras")]


def _params(fn) -> list[tuple[str, object, object]]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


@pytest.mark.parametrize("sync, async_", PAIRS)
def test_every_sync_call_has_an_async_twin_with_the_same_signature(sync, async_):
    a, b = getattr(Swarm, sync), getattr(Swarm, async_)
    assert inspect.iscoroutinefunction(b), f"{async_} is async"
    assert _params(a) == _params(b)


@pytest.mark.parametrize("name", ["generate", "upscale", "grid"])
def test_submit_twins_match_too(name):
    assert _params(getattr(Swarm, name)) == _params(getattr(Swarm, f"submit_{name}"))


@pytest.mark.parametrize("name", ["generate", "agenerate", "submit_generate", "upscale",
                                  "aupscale", "submit_upscale"])
def test_no_call_takes_arbitrary_keywords(name):
    kinds = {p.kind for p in inspect.signature(getattr(Swarm, name)).parameters.values()}
    assert inspect.Parameter.VAR_KEYWORD not in kinds


async def test_a_misspelt_keyword_is_a_type_error():
    swarm = Swarm(output_dir=None)
    try:
        with pytest.raises(TypeError, match="stepz"):
            await swarm.agenerate("fox", stepz=3)
        with pytest.raises(TypeError, match="stepz"):
            swarm.submit_generate("fox", stepz=3)
    finally:
        await swarm.aclose()
