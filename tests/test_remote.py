"""Remote management from the controller (swarm.backend(name)): free, interrupt and the
worker's recent log lines work with the worker's admin token and are refused with a guest's,
from the API and the Backends panel, against a real worker process."""

from __future__ import annotations

import asyncio

import pytest

from colabswarm.errors import ErrorKind, Forbidden
from colabswarm.protocol import LogLine
from colabswarm.swarm import Swarm
from colabswarm.widgets import BackendsPanel
from tests.conftest import wait_until

SIZE = {"width": 64, "height": 64, "steps": 2}


@pytest.fixture
def owned(spawn):
    proc = spawn("--model", "tiny", "--guest", "gina", name="remote")
    wait_until(lambda: any(ln.startswith("guest gina") for ln in proc.lines), 10, "gina")
    guest = next(ln for ln in proc.lines if ln.startswith("guest gina")).rsplit(" ", 1)[1]
    owner = Swarm(output_dir=None, health_every=0.5)
    friend = Swarm(output_dir=None, health_every=0.5)
    owner.add(proc.share, name="gpu")
    friend.add(guest, name="gpu")
    yield proc, owner, friend, guest.split("#token=")[1]
    owner.close()
    friend.close()


def test_the_owner_reads_the_log_frees_and_interrupts_from_the_controller(owned):
    proc, owner, friend, guest_token = owned
    friend.generate("made by gina", images=2, seed=3, **SIZE)
    remote = owner.backend("gpu")
    lines = remote.logs(50)
    assert lines and all(isinstance(ln, LogLine) for ln in lines) and len(lines) <= 50
    text = remote.log_text()
    assert "guest 'gina' added" in text and "for gina" in text
    assert guest_token not in text and proc.token not in text  # masked or never there
    remote.free()
    assert "the owner freed memory" in remote.log_text(5)
    # a long job of the friend's, interrupted by the owner; the friend's swarm makes it again
    future = friend.submit_generate("long", images=1, seed=9, width=256, height=256, steps=60,
                                    save=False)
    wait_until(lambda: any(f["backend"] == "gpu" and f["step"] > 0
                           for f in friend.flights()), 60, "the long job to run")
    assert remote.interrupt() >= 1
    assert "the owner interrupted every job" in remote.log_text(5)
    wait_until(lambda: any("failed a job" in m and "interrupted" in m
                           for _, _, m in friend.logs), 30, "the friend to see it")
    assert [g.seed for g in future.result(timeout=120).images] == [9]  # nothing lost

    async def twins() -> None:
        assert await remote.alogs(3)
        await remote.afree()
        assert await remote.ainterrupt() == 0
        assert [u.name for u in await remote.ausage()] == ["owner", "gina"]

    asyncio.run(twins())


def test_a_guest_token_is_refused_the_owners_actions_and_its_backend_stays_usable(owned):
    proc, owner, friend, _ = owned
    remote = friend.backend("gpu")
    for action in (remote.logs, remote.free, remote.interrupt, remote.usage,
                   lambda: remote.add_guest("mallory"), lambda: remote.revoke("gina")):
        with pytest.raises(Forbidden) as err:
            action()
        assert err.value.kind is ErrorKind.FORBIDDEN
        assert "Only the worker's owner may" in str(err.value) and "'gina'" in str(err.value)
    assert friend.backends[0]["status"] == "running" and friend.backends[0]["role"] == "guest"
    assert len(friend.generate("still fine", images=1, seed=1, **SIZE).images) == 1
    with pytest.raises(KeyError):
        friend.backend("nope")


def test_the_backends_panel_offers_the_owners_controls_only_with_the_admin_token(owned):
    proc, owner, friend, guest_token = owned
    mine, theirs = BackendsPanel(owner), BackendsPanel(friend)
    try:
        row, guest_row = mine.rows["gpu"], theirs.rows["gpu"]
        assert row.remote.widget.layout.display == ""
        assert guest_row.remote.widget.layout.display == "none"
        row.remote.logs_button.click()
        assert "guest &#x27;gina&#x27; added" in row.remote.output.value
        assert guest_token not in row.remote.output.value
        row.remote.free_button.click()
        assert "freed its memory" in row.remote.output.value
        row.remote.interrupt_button.click()
        assert "0 job(s) interrupted" in row.remote.output.value
        guest_row.remote.free_button.click()  # hidden, but even so: the worker refuses
        assert "Only the worker" in guest_row.remote.output.value
    finally:
        mine.close()
        theirs.close()


@pytest.mark.parametrize("name", ["logs", "log_text", "free", "interrupt", "usage",
                                  "add_guest", "revoke"])
def test_every_remote_call_has_an_async_twin_with_the_same_signature(name):
    import inspect

    from colabswarm.swarm.remote import BackendRemote

    sync, twin = getattr(BackendRemote, name), getattr(BackendRemote, f"a{name}")
    assert inspect.iscoroutinefunction(twin)
    assert inspect.signature(sync).parameters.keys() == inspect.signature(twin).parameters.keys()
    assert [p.default for p in inspect.signature(sync).parameters.values()] == \
        [p.default for p in inspect.signature(twin).parameters.values()]
    kinds = {p.kind for p in inspect.signature(sync).parameters.values()}
    assert inspect.Parameter.VAR_KEYWORD not in kinds
