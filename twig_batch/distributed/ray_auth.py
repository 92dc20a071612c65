"""Running in the token-authentication mode of the Ray cluster a run joins (Ray 2.60).

Ray turns token authentication on for a `ray start` cluster when a token exists in
`~/.ray/auth_token` (the first local `ray.init()` on a machine writes one), and a driver that finds
a cluster by itself turns it on whenever that file exists, whatever the cluster does. A driver in
the other mode than its cluster either cannot connect (no token for a cluster that wants one) or
connects and then loses every actor: actors started without a token cannot reach a driver that
wants one (`InvalidAuthToken` in raylet.out, `ActorDiedError` on the driver). So before joining we
ask the cluster's GCS, without a token, whether it answers, and then run in the cluster's mode or
say in one line why we cannot.
"""
from __future__ import annotations

import contextlib
import os
import socket

from twig_batch.errors import TwigBatchError

MODE_VAR = "RAY_AUTH_MODE"
_TOKEN_PLACES = "~/.ray/auth_token, $RAY_AUTH_TOKEN or the file named by $RAY_AUTH_TOKEN_PATH"


class ClusterAuthError(TwigBatchError):
    """This driver cannot authenticate to the Ray cluster it was pointed at."""


def match_cluster_auth(gcs_address: str) -> str | None:
    """Set this process to the cluster's authentication mode before `ray.init(address=...)`.

    Returns the mode the run uses ("token" or "disabled"), or None when the cluster did not answer
    (then `ray.init` reports it). A mode the user set in RAY_AUTH_MODE is kept, and a mismatch
    with the cluster raises `ClusterAuthError`."""
    wants_token = cluster_wants_token(gcs_address)
    if wants_token is None:
        return None
    asked = os.environ.get(MODE_VAR)
    asked = asked.strip().lower() if asked else None
    if wants_token:
        if asked is not None and asked != "token":
            raise ClusterAuthError(
                f"the Ray cluster at {gcs_address} has token authentication on, but {MODE_VAR}={asked} here: "
                f"unset {MODE_VAR} (twig-batch then uses the cluster's token from {_TOKEN_PLACES}) or set it to token")
        use_mode("token")
        if not _token_available():
            raise ClusterAuthError(
                f"the Ray cluster at {gcs_address} has token authentication on and this machine has no token: "
                f"copy ~/.ray/auth_token from the head node here, or set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH")
        if _gcs_refuses(gcs_address):
            raise ClusterAuthError(
                f"the Ray cluster at {gcs_address} refused this machine's token (from {_TOKEN_PLACES}): it was "
                "started with another one; copy ~/.ray/auth_token from the head node here")
        return "token"
    if asked is not None and asked != "disabled":
        raise ClusterAuthError(
            f"the Ray cluster at {gcs_address} has token authentication off, but {MODE_VAR}={asked} here, so its "
            f"actors could not reach this driver: unset {MODE_VAR} or set it to disabled")
    use_mode("disabled")  # and never the token a stale ~/.ray/auth_token would switch on
    return "disabled"


def cluster_wants_token(gcs_address: str) -> bool | None:
    """True when the cluster's GCS refuses a request without a token, False when it answers one,
    None when nothing listens there (a stale address: left to `ray.init`)."""
    if not _listening(gcs_address):
        return None
    previous = os.environ.get(MODE_VAR)
    use_mode("disabled")
    try:
        return _gcs_refuses(gcs_address)
    finally:
        use_mode(previous)


def _gcs_refuses(gcs_address: str) -> bool:
    """One small request to the GCS in this process's current mode: True when it is refused for
    its token. Ray's client logs each refusal on stderr; the answer here says it better."""
    from ray._raylet import GcsClient
    from ray.exceptions import AuthenticationError

    with stderr_silenced():
        try:
            GcsClient(address=gcs_address).internal_kv_get(b"twig-batch-auth-probe", b"twig-batch", timeout=10)
        except AuthenticationError:
            return True
    return False


def use_mode(mode: str | None) -> None:
    """Put RAY_AUTH_MODE (None: unset) in effect in this process, as Ray itself does on `ray start`."""
    from ray._raylet import AuthenticationTokenLoader, Config

    if mode is None:
        os.environ.pop(MODE_VAR, None)
    else:
        os.environ[MODE_VAR] = mode
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def _token_available() -> bool:
    from ray._raylet import AuthenticationTokenLoader

    return bool(AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True))


def _listening(gcs_address: str) -> bool:
    host, _, port = gcs_address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=3).close()
        return True
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def stderr_silenced():
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
