"""tunnel='ngrok': an ngrok endpoint through pyngrok (needs a free ngrok authtoken).

pyngrok keeps one ngrok agent per binary path and adds tunnels to it through the agent's local
API; a free account allows one agent at a time, so tunnels in one process share it and the
last one closed stops it. pyngrok's startup only checks its timeout between log lines (a silent
binary blocks it forever), so the call runs under our deadline and the agent is killed if the
deadline passes.
"""

from __future__ import annotations

import atexit
import collections
import logging
import math
import os
import threading
from typing import Any

from ..errors import TunnelError
from ..protocol import mask_token
from .base import Tunnel, _alternatives, _call_with_deadline, _Deadline, _tail, _tunnel_target

__all__ = ["ENV_AUTHTOKEN", "NgrokTunnel", "open_ngrok"]

log = logging.getLogger("colabswarm.tunnel.ngrok")

#: Environment variable, and Colab secret name, holding the ngrok authtoken.
ENV_AUTHTOKEN = "NGROK_AUTHTOKEN"
_HINT = _alternatives("ngrok")
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
        log.info("ngrok tunnel %s closed", self.public_url)


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


def _config_has_authtoken(config_path: str) -> bool:
    """Whether `ngrok config add-authtoken` already stored one (ngrok then uses it itself)."""
    if not os.path.isfile(config_path):
        return False
    try:
        import yaml

        with open(config_path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except Exception:  # unreadable or not YAML: ngrok will say so itself
        return False
    if not isinstance(data, dict):
        return False
    agent = data.get("agent") if isinstance(data.get("agent"), dict) else {}
    return bool(data.get("authtoken") or agent.get("authtoken"))


def _resolve_authtoken(explicit: str | None, config_path: str) -> str | None:
    """The authtoken from the argument, NGROK_AUTHTOKEN, or Colab secrets, in that order.

    None means ngrok's own config file holds one. Without any, fail before starting ngrok:
    ngrok would only fail later with a less helpful message.
    """
    candidates = (
        ("argument", lambda: explicit),
        (f"${ENV_AUTHTOKEN}", lambda: os.environ.get(ENV_AUTHTOKEN)),
        ("Colab secrets", lambda: _colab_secret(ENV_AUTHTOKEN)),
    )
    for source, get in candidates:
        value = (get() or "").strip()
        if value:
            log.info("ngrok authtoken from %s: %s", source, mask_token(value))
            return value
    if _config_has_authtoken(config_path):
        log.info("ngrok authtoken from ngrok's config file %s", config_path)
        return None
    raise TunnelError(
        f"tunnel='ngrok' needs an ngrok authtoken and none was found. Get a free one at "
        f"https://dashboard.ngrok.com/get-started/your-authtoken, then either set the "
        f"{ENV_AUTHTOKEN} environment variable, add a Colab secret named {ENV_AUTHTOKEN} (key "
        f"icon in Colab's left bar, with notebook access on), or pass authtoken=... . Or use "
        f"tunnel='cloudflare', which needs no account."
    )


def _kill_unused_agent(ngrok_path: str) -> None:
    """Kill the agent for ngrok_path unless one of our open tunnels uses it.

    Called when opening failed or ran out of time: this makes pyngrok's blocking readline
    return, and stops an agent that started but got no tunnel. We read pyngrok's private
    registry because it holds the process before start-up finishes and offers no other handle.
    """
    from pyngrok import process

    agent = getattr(process, "_current_processes", {}).get(ngrok_path)
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


def _logs_text(exc: Exception) -> str:
    logs = [getattr(entry, "line", str(entry)) for entry in getattr(exc, "ngrok_logs", [])]
    return _tail(logs)


def _start(config: Any, target: str, deadline: _Deadline) -> tuple[Any, Any]:
    """pyngrok's connect under our deadline; returns (pyngrok endpoint, pyngrok agent)."""
    from pyngrok import ngrok

    def _connect() -> tuple[Any, Any]:
        endpoint = ngrok.connect(addr=target, pyngrok_config=config)
        return endpoint, ngrok.get_ngrok_process(config)

    path = config.ngrok_path
    try:
        return _call_with_deadline(_connect, deadline, name="colabswarm-ngrok-start",
                                   on_timeout=lambda: _kill_unused_agent(path))
    except BaseException:
        _kill_unused_agent(path)
        raise


def open_ngrok(port: int, *, host: str = "127.0.0.1", deadline_s: float = 60.0,
               authtoken: str | None = None) -> NgrokTunnel:
    """Open an ngrok endpoint to host:port within deadline_s.

    The binary is pyngrok's (PYNGROK_NGROK_PATH, else its default path, downloaded if missing).
    """
    deadline = _Deadline(deadline_s)
    try:
        from pyngrok import conf
        from pyngrok.exception import PyngrokError, PyngrokNgrokError, PyngrokNgrokInstallError
    except ImportError as exc:
        raise TunnelError("tunnel='ngrok' needs pyngrok: pip install pyngrok (or "
                          "colabswarm[tunnel]). " + _HINT) from exc

    token = _resolve_authtoken(authtoken, conf.get_config_path(conf.PyngrokConfig()))
    config = conf.PyngrokConfig(
        auth_token=token,
        startup_timeout=max(1, math.ceil(deadline.remaining())),
        request_timeout=max(1.0, min(10.0, deadline.remaining())),
    )
    target = f"http://{_tunnel_target(host, port)}"
    path = config.ngrok_path
    try:
        endpoint, agent = _start(config, target, deadline)
    except TimeoutError as exc:
        raise TunnelError(f"ngrok ({path}) did not open a tunnel within {deadline.total:.0f} s "
                          "(killed it). " + _HINT) from exc
    except PyngrokNgrokInstallError as exc:
        raise TunnelError(f"ngrok is not installed at {path} and could not be downloaded ({exc})."
                          " This machine may have no internet access. " + _HINT) from exc
    except PyngrokNgrokError as exc:
        reason = str(getattr(exc, "ngrok_error", None) or exc).rstrip(".")
        auth = ""
        if "authentication" in reason.lower() or "authtoken" in reason.lower():
            auth = f" Check the authtoken (${ENV_AUTHTOKEN} or the Colab secret)."
        raise TunnelError(f"ngrok failed to start: {reason}.{auth} Its last lines:\n"
                          f"{_logs_text(exc)}\n" + _HINT) from exc
    except (PyngrokError, OSError) as exc:
        raise TunnelError(f"ngrok failed: {exc}. " + _HINT) from exc

    url = str(endpoint.public_url).rstrip("/")
    log.info("ngrok tunnel %s -> %s (agent pid %d)", url, target, agent.proc.pid)
    return NgrokTunnel(url, config, agent)
