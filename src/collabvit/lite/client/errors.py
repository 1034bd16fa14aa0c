"""What stops a run: the client's errors, each one-line reason that more than one exchange
gives written once here, and what the chain of causes behind a network failure tells (a
TLS failure, a refused connection)."""

from __future__ import annotations

import json
import reprlib
import ssl

import httpx


class ClientError(ValueError):
    """The run cannot start or continue (a one-line reason): e.g. a server whose model does
    not fit the edge's, or a records file of another run."""


class ServerUnavailable(ClientError):
    """No server answers at the URL now (refused, unreachable, silent): unlike a wrong
    server, token or certificate, --allow-edge-only runs on without it."""

    HINT = "--wait S waits for it, --allow-edge-only runs without it"


_SHOWN = reprlib.Repr()
_SHOWN.maxstring = _SHOWN.maxother = 160


def shown(value, quoted: bool = False) -> str:
    """Something a server sent, for a one-line message: a string's text (in quotes when
    `quoted`), anything else as Python writes it, escaped (no line breaks or control
    characters) and cut short."""
    text = _SHOWN.repr(value)
    return text[1:-1] if isinstance(value, str) and not quoted else text


def first_line(error: BaseException) -> str:
    """The first line of an error's text, or its type's name when it has none."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def json_or_none(content: bytes):
    """The JSON value of a body, or None for one that is not JSON."""
    try:
        return json.loads(content)
    except (ValueError, RecursionError):  # not JSON, or nested deeper than Python goes
        return None


def _causes(error: BaseException):
    """The error and the chain of errors behind it."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def tls_failure(error: BaseException) -> str | None:
    """A one-line reason when a connection failed in TLS (verification, wrong protocol)."""
    for cause in _causes(error):
        if isinstance(cause, ssl.SSLCertVerificationError):
            return f"TLS certificate verification failed ({cause.verify_message})"
        if isinstance(cause, ssl.SSLError):
            return f"TLS failed ({cause.reason or cause})"
    return None


def certificate_failure(reason: str | None) -> bool:
    """Whether a tls_failure reason is a certificate that did not verify (waiting or
    retrying will not fix it)."""
    return reason is not None and "verif" in reason


def connection_refused(error: BaseException) -> bool:
    return any(isinstance(cause, ConnectionRefusedError) for cause in _causes(error))


def tls_refused(url: str, reason: str) -> ClientError:
    """A TLS failure at `url`, with what usually fixes it: a private CA's certificate for
    one that does not verify, http:// for a server that does not speak HTTPS."""
    if certificate_failure(reason):
        return ClientError(f"{url}: {reason}; for a private CA pass --ca-file with its "
                           "certificate")  # fmt: skip
    return ClientError(f"{url}: {reason}: does the server speak HTTPS? for a plain HTTP "
                       "server use http://")  # fmt: skip


def token_refused(status: int) -> ClientError:
    """The server answered 401 or 403."""
    return ClientError(f"the server refused the token ({status}); pass --token or set "
                       "COLLABVIT_TOKEN")  # fmt: skip


def model_not_served(model_name: str, reason: str) -> ClientError:
    """The server answered 404 for the model."""
    return ClientError(f"the server does not serve {model_name!r}: {reason}")


def not_a_server(url: str, asked: str, response: httpx.Response,
                 content: bytes | None) -> ClientError:  # fmt: skip
    """`asked` (e.g. 'GET /v2/health/ready') got an answer (its body: `content`) no
    collabvit server gives, or the one a collabvit server gives a Host header it does not
    answer (Starlette's)."""
    if response.status_code == 400 and content == b"Invalid host header":
        try:
            host = response.request.headers.get("host", "")
        except RuntimeError:  # a response made without its request
            host = ""
        return ClientError(f"{url} refused the Host header {shown(host, quoted=True)}: give "
                           "the server that name in its --allowed-hosts")  # fmt: skip
    kind = response.headers.get("content-type", "no content type").split(";")[0]
    return ClientError(f"{url} is not a collabvit server: {asked} answered "
                       f"{response.status_code} ({shown(kind)})")  # fmt: skip
