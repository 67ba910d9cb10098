"""Hypothesis fuzz of what a person pastes: share strings, addresses, tokens.

Whatever the text, parsing either succeeds or raises the documented BadShareString (never
another exception, never a client that cannot be used); a share string survives the trip
through encode_share/decode_share, even wrapped by a chat app or a notebook output.
"""

from __future__ import annotations

import asyncio
import ipaddress
import string

from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from colabswarm.backend.client import WorkerClient
from colabswarm.errors import BadShareString
from colabswarm.protocol import decode_share, encode_share, mask_token, new_token, normalize_url

FUZZ = settings(max_examples=1500, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))
ROUND = settings(max_examples=400, deadline=None, database=None,
                 suppress_health_check=list(HealthCheck))

TOKEN_CHARS = string.ascii_letters + string.digits + "-_"
tokens = st.one_of(
    st.text(alphabet=TOKEN_CHARS, min_size=16, max_size=256),
    st.builds(new_token),
)
# pieces that make parsers take their rarer branches
_PIECES = list("htps:/[]@#?%.0123456789abcdefXYZ-_~ \n\t\r!$&'\"`<>()*+,;=é\u3000\x00") + [
    "http://", "https://", "#token=", "token=", "xn--", "::1", "[::1]", "127.0.0.1", ":7801",
    "localhost", "a" * 24, "ftp://", "//", "%25", "%2F", "\u200b",
]
pasted = st.one_of(st.text(), st.lists(st.sampled_from(_PIECES), max_size=30).map("".join))

_label = st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?\Z")
hosts = st.one_of(
    st.lists(_label, min_size=1, max_size=4).map(".".join).filter(
        lambda h: not h.replace(".", "").isdigit()),
    st.sampled_from(["localhost", "example.trycloudflare.com", "abc-12.ngrok-free.app"]),
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(lambda ip: f"[{ip}]"),
)
paths = st.lists(st.text(alphabet=string.ascii_letters + string.digits + "._~-", min_size=1,
                         max_size=8), max_size=3).map(lambda segs: "".join("/" + s for s in segs))
urls = st.builds(
    lambda scheme, host, port, path, slash: f"{scheme}{host}{port}{path}{slash}",
    st.sampled_from(["http://", "https://", "", "HTTP://"]),
    hosts,
    st.one_of(st.just(""), st.integers(1, 65535).map(lambda p: f":{p}")),
    paths,
    st.sampled_from(["", "/"]),
)


def _sprinkle(text: str, data: st.DataObject) -> str:
    """Insert spaces, tabs and line breaks anywhere, as a chat app or a narrow cell would."""
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=8)))
    out, last = [], 0
    for c in cuts:
        out.append(text[last:c])
        out.append(data.draw(st.sampled_from([" ", "\n", "\r\n", "\t", "  \n  "])))
        last = c
    out.append(text[last:])
    return "".join(out)


def _close(client: WorkerClient) -> None:
    asyncio.run(client.aclose())


# ----- no crash but the documented one ------------------------------------------------------
@FUZZ
@given(pasted)
@example("http://[::1")  # unbalanced bracket
@example("http://host:99999#token=" + "a" * 20)  # port out of range
@example("u\u00bf")  # a host httpx cannot encode (IDNA)
@example("7127.0.0.1")  # all digits, not an IPv4 address
@example("http://[fe80::1%25eth0]")  # IPv6 zone
def test_normalize_url_returns_a_usable_url_or_bad_share_string(text):
    try:
        url = normalize_url(text)
    except BadShareString as exc:
        assert str(exc), "the error says what is wrong"
        return
    assert url.startswith(("http://", "https://")) and not url.endswith("/")
    assert not any(ch.isspace() for ch in url) and "#" not in url and "?" not in url
    assert normalize_url(url) == url, "normalizing twice changes nothing"


@FUZZ
@given(pasted, st.one_of(st.none(), st.text(max_size=40), tokens))
def test_decode_share_and_worker_client_raise_only_bad_share_string(text, token):
    try:
        url, tok = decode_share(text, token)
    except BadShareString:
        decoded = False
    else:
        decoded = True
        assert url == normalize_url(url)
        assert 16 <= len(tok) <= 256 and set(tok) <= set(TOKEN_CHARS)
    try:
        client = WorkerClient(text, token)
    except BadShareString:
        assert not decoded, "the client accepts exactly what decode_share accepts"
        return
    try:
        assert decoded and (client.url, client.token) == (url, tok)
        shown = repr(client).replace(repr(client.url), "")
        assert client.token not in shown, "a client's repr never shows the token"
    finally:
        _close(client)


@FUZZ
@given(st.one_of(st.none(), st.integers(), st.binary(), st.lists(st.text(max_size=3))))
def test_non_text_input_is_refused_with_bad_share_string(value):
    try:
        decode_share(value)  # type: ignore[arg-type]
    except BadShareString:
        return
    raise AssertionError(f"{value!r} decoded")


# ----- round trips ----------------------------------------------------------------------------
@ROUND
@given(urls, tokens, st.data())
def test_encode_share_decodes_back_even_when_wrapped(url, token, data):
    share = encode_share(url, token)
    expected = (normalize_url(url), token)
    assert decode_share(share) == expected
    assert decode_share(share, token) == expected, "the same token given twice is fine"
    wrapped = _sprinkle(share, data)
    quoted = data.draw(st.sampled_from(["{}", "'{}'", '"{}"', "`{}`", "<{}>", "\n{}\n"]))
    assert decode_share(quoted.format(wrapped)) == expected
    client = WorkerClient(wrapped)
    try:
        assert (client.url, client.token) == expected
        assert token not in repr(client).replace(repr(client.url), "")
    finally:
        _close(client)
    # the address alone plus the token apart, as the Backends panel's two fields
    assert decode_share(_sprinkle(normalize_url(url), data), token) == expected


@ROUND
@given(urls, tokens, tokens)
def test_a_different_token_beside_a_share_string_is_refused(url, token, other):
    assume(token != other)
    share = encode_share(url, token)
    try:
        decode_share(share, other)
    except BadShareString as exc:
        assert "different token" in str(exc)
    else:
        raise AssertionError("two different tokens were accepted")


@ROUND
@given(urls, st.text(max_size=300))
def test_encode_share_refuses_malformed_tokens(url, token):
    ok = 16 <= len(token) <= 256 and set(token) <= set(TOKEN_CHARS)
    try:
        share = encode_share(url, token)
    except BadShareString:
        assert not ok
        return
    assert ok and share.endswith("#token=" + token)


@ROUND
@given(st.one_of(st.none(), st.text(), tokens))
def test_mask_token_never_shows_enough_to_use(token):
    masked = mask_token(token)
    if token:
        assert masked.startswith(token[:4]) and len(masked) <= 5
        if len(token) >= 16:
            assert token not in masked
    else:
        assert masked == "<none>"


def test_new_tokens_are_192_bit_and_fit_a_share_string():
    seen = {new_token() for _ in range(200)}
    assert len(seen) == 200
    for tok in seen:
        assert len(tok) == 32  # 24 random bytes, base64url
        assert decode_share(encode_share("127.0.0.1:7801", tok)) == ("http://127.0.0.1:7801", tok)
    assert ipaddress.ip_address("127.0.0.1").is_loopback
