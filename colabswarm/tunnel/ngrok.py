"""tunnel='ngrok': an ngrok endpoint through pyngrok (needs a free ngrok authtoken).

pyngrok keeps one ngrok agent per binary path and adds tunnels to it through the agent's local
API; a free account allows one agent at a time, so tunnels in one process share it and the
last one closed stops it. pyngrok's startup only checks its timeout between log lines (a silent
binary blocks it forever), so the call runs under our deadline and the agent is killed if the
deadline passes; an agent that keeps retrying (no DNS, a TLS-intercepting proxy) is reported
with its own last error.

ngrok's errors arrive as logfmt values that pyngrok does not unescape (literal ``\\r\\n``) or, for
the agent API, as JSON bodies; ``clean_ngrok_error`` turns both into plain text and
``classify_ngrok`` maps ngrok's codes (https://ngrok.com/docs/errors/) to a TunnelProblem.
ERR_NGROK_105/107 print the authtoken itself: it is remembered as a secret before ngrok starts,
so no message or log line (pyngrok logs every ngrok line) ever shows it.
"""

from __future__ import annotations

import atexit
import collections
import json
import logging
import math
import os
import re
import shutil
import tempfile
import threading
from typing import Any

from ..protocol import mask_token
from .base import (
    Tunnel,
    TunnelFailure,
    TunnelProblem,
    _call_with_deadline,
    _Deadline,
    _quote,
    _seconds,
    _tail,
    _tunnel_target,
    remember_secret,
)

__all__ = ["ENV_AUTHTOKEN", "NgrokTunnel", "classify_ngrok", "clean_ngrok_error", "open_ngrok"]

log = logging.getLogger("colabswarm.tunnel.ngrok")

#: Environment variable, and Colab secret name, holding the ngrok authtoken.
ENV_AUTHTOKEN = "NGROK_AUTHTOKEN"
_TOKEN_PAGE = "https://dashboard.ngrok.com/get-started/your-authtoken"
_INSTEAD = ("use tunnel='cloudflare' (no account needed), or tunnel='none' when the controller "
            "can reach this machine directly (same machine, LAN, SSH port forwarding)")
_refs: collections.Counter[int] = collections.Counter()  # agent pid -> open tunnels on it
_refs_lock = threading.Lock()


class NgrokTunnel(Tunnel):
    """One endpoint on the (shared) ngrok agent of this process."""

    provider = "ngrok"

    def __init__(self, public_url: str, config: Any, agent: Any) -> None:
        self.public_url = public_url
        self._config = config
        self._agent = agent  # pyngrok NgrokProcess
        self._closed = False
        self._lock = threading.Lock()
        with _refs_lock:
            _refs[agent.proc.pid] += 1
        atexit.register(self.close)

    @property
    def pid(self) -> int | None:
        return int(self._agent.proc.pid)

    def alive(self) -> bool:
        return not self._closed and self._agent.proc.poll() is None

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        atexit.unregister(self.close)
        from pyngrok import ngrok, process
        from pyngrok.exception import PyngrokError

        proc = self._agent.proc
        with _refs_lock:
            _refs[proc.pid] -= 1
            last = _refs[proc.pid] <= 0
            if last:
                del _refs[proc.pid]
        try:
            if proc.poll() is not None:
                pass
            elif not last:
                ngrok.disconnect(self.public_url, pyngrok_config=self._config)
            elif process.is_process_running(self._config.ngrok_path) and \
                    process.get_process(self._config).proc is proc:
                ngrok.kill(pyngrok_config=self._config)
            else:  # pyngrok no longer tracks it, but it is ours
                proc.kill()
                proc.wait(5)
        except (PyngrokError, OSError) as exc:
            log.debug("closing ngrok tunnel %s: %s", self.public_url, exc)
        if last:  # the agent is gone: its private config (the authtoken) goes too
            agent_config = getattr(self._agent, "pyngrok_config", None)
            _remove_private_config(getattr(agent_config, "config_path", None))
        log.info("ngrok tunnel %s closed", self.public_url)


# -- what went wrong: ngrok's own words -------------------------------------------------------

_CODE_RE = re.compile(r"ERR_NGROK_(\d+)")


def clean_ngrok_error(raw: str) -> str:
    """ngrok's error text as a person should read it: the agent API's JSON body reduced to its
    ``details.err``, logfmt escapes (a literal backslash-r-backslash-n, as pyngrok leaves them)
    turned back into line breaks, and the trailing code and blank lines dropped (pure)."""
    text = raw.strip()
    start = text.find("{")
    if start >= 0:
        try:
            body = json.loads(text[start:])
        except ValueError:
            body = None
        if isinstance(body, dict):
            details = body.get("details") if isinstance(body.get("details"), dict) else {}
            text = str(details.get("err") or body.get("msg") or text)
    for escaped, plain in (("\\r\\n", "\n"), ("\\n", "\n"), ("\\r", ""), ('\\"', '"'),
                           ("\\t", " ")):
        text = text.replace(escaped, plain)
    lines = [line.strip() for line in text.replace("\r", "").split("\n")]
    kept = [line for line in lines if line and not _CODE_RE.fullmatch(line)]
    return "\n".join(kept).strip()


def classify_ngrok(text: str) -> TunnelProblem:
    """The TunnelProblem for an ngrok error (its code first, then Go's network errors; pure)."""
    code = _CODE_RE.search(text)
    by_code = {
        "105": TunnelProblem.AUTHTOKEN_INVALID, "107": TunnelProblem.AUTHTOKEN_INVALID,
        "4018": TunnelProblem.AUTHTOKEN_MISSING, "108": TunnelProblem.AGENT_SESSION_IN_USE,
        "324": TunnelProblem.ENDPOINT_LIMIT, "334": TunnelProblem.ENDPOINT_LIMIT,
    }
    if code and code.group(1) in by_code:
        return by_code[code.group(1)]
    low = text.lower()
    if "x509:" in low or "failed to verify certificate" in low or "tls: " in low:
        return TunnelProblem.TLS_INTERCEPTED
    if "no such host" in low or "lookup " in low or "has no records" in low:
        return TunnelProblem.NO_DNS
    if any(m in low for m in ("failed to dial", "i/o timeout", "connection refused",
                              "network is unreachable", "connection reset")):
        return TunnelProblem.NO_NETWORK
    return TunnelProblem.FAILED


def _advice(problem: TunnelProblem, code: str | None) -> str:
    if problem is TunnelProblem.AUTHTOKEN_INVALID:
        why = ("it does not look like an ngrok authtoken (ERR_NGROK_105)" if code == "105" else
               "it was reset or revoked (ERR_NGROK_107)")
        return (f"ngrok refused the authtoken: {why}. Copy the current one from {_TOKEN_PAGE} "
                f"into ${ENV_AUTHTOKEN} or the Colab secret {ENV_AUTHTOKEN} (the whole token, no "
                f"spaces or quotes), or " + _INSTEAD + ".")
    if problem is TunnelProblem.AUTHTOKEN_MISSING:
        return (f"ngrok needs a verified account's authtoken (ERR_NGROK_4018). Get one at "
                f"{_TOKEN_PAGE} and put it in ${ENV_AUTHTOKEN} or a Colab secret named "
                f"{ENV_AUTHTOKEN}, or " + _INSTEAD + ".")
    if problem is TunnelProblem.AGENT_SESSION_IN_USE:
        return ("A free ngrok account runs one agent at a time, and this authtoken's agent is "
                "already running elsewhere (another notebook or computer, or an earlier run that "
                "is still up) (ERR_NGROK_108). Stop that one (https://dashboard.ngrok.com/agents "
                "lists them), or " + _INSTEAD + ".")
    if problem is TunnelProblem.ENDPOINT_LIMIT:
        return ("This ngrok account already has its endpoint online (ERR_NGROK_" + (code or "334")
                + "): a free account serves one endpoint (one domain) at a time. Run one ngrok "
                "worker per free account: stop the other worker's tunnel first, or " + _INSTEAD
                + ".")
    if problem is TunnelProblem.NO_DNS:
        return ("This machine cannot resolve ngrok's server name: it has no working DNS or no "
                "internet access (ngrok keeps retrying). Check the network (on Colab: Runtime > "
                "Disconnect and delete runtime, then run again), or tunnel='none' when the "
                "controller can reach this machine directly.")
    if problem is TunnelProblem.TLS_INTERCEPTED:
        return ("Something between this machine and ngrok (a company proxy, firewall or "
                "antivirus that inspects TLS) shows its own certificate, and ngrok refuses it. "
                "Use a network without TLS inspection, or " + _INSTEAD + ".")
    if problem is TunnelProblem.NO_NETWORK:
        return ("The ngrok agent cannot connect to ngrok's servers (TCP port 443 blocked, or no "
                "internet). ngrok can use an HTTP proxy (http_proxy, or proxy_url in its config),"
                " but on ngrok's paid plans only (ERR_NGROK_9009). Or " + _INSTEAD + ".")
    return "Try again, or " + _INSTEAD + "."


def _failure(what: str, raw_error: str | None, logs: list[str], *,
             problem: TunnelProblem | None = None, secrets: tuple[str | None, ...] = ()
             ) -> TunnelFailure:
    """The message: what happened, ngrok's own words (cleaned), what to do; the agent's last
    lines only when ngrok gave no error of its own."""
    said = clean_ngrok_error(raw_error) if raw_error else ""
    code = _CODE_RE.search(raw_error or "")
    problem = problem or classify_ngrok(raw_error or "")
    advice = _advice(problem, code.group(1) if code else None)
    text = (f"{what}. ngrok said:\n{_quote(said)}\n{advice}" if said else
            f"{what}. {advice}\nIts last lines:\n{_tail(logs)}")
    return TunnelFailure(text, problem=problem, provider="ngrok",
                         last_line=said.split("\n", 1)[0] if said else None, secrets=secrets)


# -- the authtoken ----------------------------------------------------------------------------


def _colab_secret(name: str) -> str | None:
    """A Colab secret, or None outside Colab or when it is missing or access was denied."""
    try:
        from google.colab import userdata  # type: ignore[import-not-found]
    except ImportError:
        return None
    try:
        value = userdata.get(name)
    except Exception as exc:  # SecretNotFoundError, NotebookAccessError, TimeoutException...
        log.debug("no %s from Colab secrets (%s)", name, type(exc).__name__)
        return None
    return value.strip() or None if isinstance(value, str) else None


def _config_authtoken(config_path: str) -> str | None:
    """The authtoken `ngrok config add-authtoken` stored, if any (ngrok then uses it itself)."""
    if not os.path.isfile(config_path):
        return None
    try:
        import yaml

        with open(config_path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except Exception:  # unreadable or not YAML: ngrok will say so itself
        return None
    if not isinstance(data, dict):
        return None
    agent = data.get("agent") if isinstance(data.get("agent"), dict) else {}
    value = data.get("authtoken") or agent.get("authtoken")
    return str(value) if value else None


def _private_config(token: str) -> str:
    """An ngrok config file holding only the authtoken, readable by this user alone (a fresh
    0700 folder, the file created 0600 with O_EXCL); removed when the agent stops."""
    folder = tempfile.mkdtemp(prefix="colabswarm-ngrok-")
    path = os.path.join(folder, "ngrok.yml")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(f"version: 3\nagent:\n  authtoken: {token}\n")  # ngrok's v3 config format
    return path


def _remove_private_config(path: str | None) -> None:
    """Remove a config file _private_config made (pyngrok may have rewritten it meanwhile),
    and its folder; anything else is left alone."""
    if path is None or not os.path.basename(os.path.dirname(path)).startswith(
            "colabswarm-ngrok-"):
        return
    shutil.rmtree(os.path.dirname(path), ignore_errors=True)


def _resolve_authtoken(explicit: str | None, config_path: str) -> str | None:
    """The authtoken from the argument, NGROK_AUTHTOKEN, or Colab secrets, in that order.

    None means ngrok's own config file holds one. Without any, fail before starting ngrok:
    ngrok would only fail later with a less helpful message. Whatever is found is remembered
    as a secret (ngrok's own error messages print it).
    """
    candidates = (
        ("argument", lambda: explicit),
        (f"${ENV_AUTHTOKEN}", lambda: os.environ.get(ENV_AUTHTOKEN)),
        ("Colab secrets", lambda: _colab_secret(ENV_AUTHTOKEN)),
    )
    for source, get in candidates:
        value = (get() or "").strip()
        if value:
            remember_secret(value)
            log.info("ngrok authtoken from %s: %s", source, mask_token(value))
            return value
    stored = _config_authtoken(config_path)
    if stored:
        remember_secret(stored)
        log.info("ngrok authtoken from ngrok's config file %s", config_path)
        return None
    raise TunnelFailure(
        f"tunnel='ngrok' needs an ngrok authtoken and none was found. Get a free one at "
        f"{_TOKEN_PAGE}, then either set the {ENV_AUTHTOKEN} environment variable, add a Colab "
        f"secret named {ENV_AUTHTOKEN} (key icon in Colab's left bar, with notebook access on), "
        f"or pass authtoken=... . Or use tunnel='cloudflare', which needs no account.",
        problem=TunnelProblem.AUTHTOKEN_MISSING, provider="ngrok",
    )


# -- the agent --------------------------------------------------------------------------------


def _current_agent(ngrok_path: str) -> Any:
    """pyngrok's process record for ngrok_path, also while it is still starting. We read its
    private registry because it offers no other handle before start-up finishes."""
    from pyngrok import process

    return getattr(process, "_current_processes", {}).get(ngrok_path)


def _agent_logs(agent: Any) -> tuple[list[str], str | None]:
    """The agent's log lines so far, and its last error (pyngrok keeps both)."""
    entries = list(getattr(agent, "logs", None) or [])
    lines = [getattr(e, "line", str(e)) for e in entries]
    errors = [e.err for e in entries if getattr(e, "lvl", "") in ("ERROR", "CRITICAL")
              and getattr(e, "err", None)]
    return lines, (errors[-1] if errors else None)


def _kill_unused_agent(ngrok_path: str) -> None:
    """Kill the agent for ngrok_path unless one of our open tunnels uses it.

    Called when opening failed or ran out of time: this makes pyngrok's blocking readline
    return, and stops an agent that started but got no tunnel.
    """
    agent = _current_agent(ngrok_path)
    if agent is None or agent.proc.poll() is not None:
        return
    with _refs_lock:
        if _refs[agent.proc.pid] > 0:
            return
    log.debug("killing ngrok agent %d (no tunnel of ours on it)", agent.proc.pid)
    try:
        agent.proc.kill()
        agent.proc.wait(5)
    except Exception as exc:  # cleanup must not hide the original error
        log.debug("killing ngrok agent: %s", exc)


def _start(config: Any, target: str, deadline: _Deadline,
           seen: dict[str, Any]) -> tuple[Any, Any]:
    """pyngrok's connect under our deadline; returns (pyngrok endpoint, pyngrok agent). On a
    timeout, ``seen`` gets the agent's log lines and last error before the agent is killed."""
    from pyngrok import ngrok

    def _connect() -> tuple[Any, Any]:
        endpoint = ngrok.connect(addr=target, pyngrok_config=config)
        return endpoint, ngrok.get_ngrok_process(config)

    path = config.ngrok_path

    def _on_timeout() -> None:
        agent = _current_agent(path)
        if agent is not None:
            seen["lines"], seen["error"] = _agent_logs(agent)
        _kill_unused_agent(path)

    try:
        return _call_with_deadline(_connect, deadline, name="colabswarm-ngrok-start",
                                   on_timeout=_on_timeout)
    except BaseException:
        _kill_unused_agent(path)
        raise


def open_ngrok(port: int, *, host: str = "127.0.0.1", deadline_s: float = 60.0,
               authtoken: str | None = None) -> NgrokTunnel:
    """Open an ngrok endpoint to host:port within deadline_s, or raise TunnelFailure.

    The binary is pyngrok's (PYNGROK_NGROK_PATH, else its default path, downloaded if missing).
    """
    deadline = _Deadline(deadline_s)
    try:
        from pyngrok import conf
        from pyngrok.exception import (
            PyngrokError,
            PyngrokNgrokError,
            PyngrokNgrokHTTPError,
            PyngrokNgrokInstallError,
        )
    except ImportError:
        raise TunnelFailure(
            "tunnel='ngrok' needs pyngrok: pip install pyngrok (or colabswarm[tunnel]). Or "
            + _INSTEAD + ".", problem=TunnelProblem.MISSING_PACKAGE, provider="ngrok") from None

    token = _resolve_authtoken(authtoken, conf.get_config_path(conf.PyngrokConfig()))
    # pyngrok would put the authtoken on ngrok's command line (`--authtoken T`), which every
    # user of the machine can read in /proc; ngrok reads it from a private config file instead
    private = _private_config(token) if token else None
    config = conf.PyngrokConfig(
        config_path=private,
        # ours is the deadline that counts: pyngrok's own only runs between two log lines
        startup_timeout=max(1, math.ceil(deadline.remaining()) + 5),
        request_timeout=max(1.0, min(10.0, deadline.remaining())),
    )
    config.auth_token = None  # pyngrok takes $NGROK_AUTHTOKEN onto the command line itself
    target = f"http://{_tunnel_target(host, port)}"
    path = config.ngrok_path
    secrets = (token,)
    seen: dict[str, Any] = {}
    # Every pyngrok exception is re-raised "from None": their text can carry the authtoken
    # (ERR_NGROK_105/107), and a chained exception is printed in full by notebooks.
    try:
        try:
            endpoint, agent = _start(config, target, deadline, seen)
        except BaseException:
            _remove_private_config(private)
            raise
        agent_config = getattr(agent, "pyngrok_config", None)
        if getattr(agent_config, "config_path", None) != private:
            _remove_private_config(private)  # an agent already running took the endpoint
    except TimeoutError:
        error = seen.get("error")
        what = (f"ngrok ({path}) did not open a tunnel within {_seconds(deadline.total)} "
                "(killed it)")
        if error is None and not seen.get("lines"):
            raise _failure(what + "; it printed nothing", None, [],
                           problem=TunnelProblem.TIMEOUT, secrets=secrets) from None
        raise _failure(what + ("; it kept retrying" if error else ""), error,
                       seen.get("lines", []), problem=None if error else TunnelProblem.TIMEOUT,
                       secrets=secrets) from None
    except PyngrokNgrokInstallError as exc:
        raise TunnelFailure(
            f"ngrok is not installed at {path} and could not be downloaded ({exc}). This "
            "machine may have no internet access; install ngrok and set PYNGROK_NGROK_PATH to "
            "it, or " + _INSTEAD + ".", problem=TunnelProblem.BINARY_MISSING, provider="ngrok",
            secrets=secrets) from None
    except PyngrokNgrokHTTPError as exc:  # the agent's API refused the endpoint
        raise _failure("ngrok's agent started but refused to open the endpoint",
                       str(getattr(exc, "body", "") or exc), [], secrets=secrets) from None
    except PyngrokNgrokError as exc:  # the agent failed to start (it said why, or exited)
        logs = [getattr(e, "line", str(e)) for e in getattr(exc, "ngrok_logs", [])]
        reason = getattr(exc, "ngrok_error", None)
        raise _failure("ngrok failed to start", reason or str(exc), logs,
                       secrets=secrets) from None
    except (PyngrokError, OSError) as exc:
        raise _failure("ngrok failed", str(exc), [], secrets=secrets) from None

    url = str(endpoint.public_url).rstrip("/")
    log.info("ngrok tunnel %s -> %s (agent pid %d)", url, target, agent.proc.pid)
    return NgrokTunnel(url, config, agent)
