"""The secrets prefalign must never show (the Hugging Face token, a judge's API key, the W&B key), taken out of the
texts it emits: ``redact`` for a text, ``get_logger`` for its log records (``redact_every_log_record`` for every
record of a process, as the ``prefalign`` command does), ``scrubbing`` for the errors it raises.

A secret is known by its value, read when a text is redacted: the environment variables named in ``SECRET_ENV`` or
registered with :func:`watch_env` (a judge registers its ``api_key_env``), any variable named like a credential
(``*_API_KEY``, ``*_TOKEN``, ``*_SECRET``, ``*_PASSWORD``...), and the tokens of huggingface_hub's login cache. Values
shorter than ``MIN_LENGTH`` are no keys (flags such as ``1`` or ``true``) and are left alone. Besides the known values,
``Bearer <credential>``, ``Basic <credential>`` and Hub-token-shaped words (``hf_`` and 10 or more letters and digits)
are masked wherever they appear: a server that echoes a header shows a key prefalign may not know of.
"""

from __future__ import annotations

import configparser
import functools
import logging
import os
import re
from typing import Callable, Iterable, TypeVar

MASK = "***"
#: Environment variables whose values are secrets (more: any named like a credential, and :func:`watch_env`).
SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY", "OPENAI_API_KEY", "JUDGE_API_KEY")
#: The shortest value taken as a secret: shorter ones would garble every text they occur in, and are no real keys.
MIN_LENGTH = 8
_CREDENTIAL_NAME = re.compile(r"(?:^|_)(?:API_?KEY|TOKEN|SECRET|SECRET_KEY|ACCESS_KEY|PASSWORD|PASSWD)$", re.I)
PATTERNS = (
    (re.compile(r"(?i)\b(bearer)\s+[^\s'\",;)}\]]+"), r"\1 " + MASK),
    (re.compile(r"(?i)\b(basic)\s+[A-Za-z0-9+/=]{8,}"), r"\1 " + MASK),
    (re.compile(r"hf_[A-Za-z0-9]{10,}"), "hf_" + MASK),
)
_watched: set[str] = set()


def watch_env(name: str) -> None:
    """Treat the value of the environment variable ``name`` as a secret (from now on, in this process)."""
    _watched.add(name)


def known_secrets(extra: Iterable[str | None] = ()) -> list[str]:
    """The secret values known now, and the non-empty ones of ``extra`` (named secrets, whatever their length),
    longest first (so that a key containing another is masked whole)."""
    names = set(SECRET_ENV) | _watched | {name for name in os.environ if _CREDENTIAL_NAME.search(name)}
    values = {os.environ.get(name) for name in names} | _hub_login_tokens()
    found = {v.strip() for v in values if isinstance(v, str) and len(v.strip()) >= MIN_LENGTH}
    found |= {v.strip() for v in extra if isinstance(v, str) and v.strip()}
    return sorted(found, key=len, reverse=True)


def _hub_login_tokens() -> set[str]:
    """The tokens of huggingface_hub's login cache (``hf auth login``): the active one and every stored one."""
    try:
        from huggingface_hub import constants
    except ImportError:
        return set()
    stamps = []
    for path in (constants.HF_TOKEN_PATH, constants.HF_STORED_TOKENS_PATH):
        try:
            stat = os.stat(path)
            stamps.append((path, stat.st_mtime_ns, stat.st_size))
        except OSError:
            stamps.append((path, None, None))
    return set(_read_login_tokens(tuple(stamps)))


@functools.lru_cache(maxsize=4)
def _read_login_tokens(stamps: tuple) -> frozenset[str]:
    """The login cache's tokens (``stamps``: its two files, with their modification time and size), read again
    only when a file changes: every log record asks."""
    (token_path, *_), (stored_path, *_) = stamps
    tokens = set()
    try:
        with open(token_path, encoding="utf-8", errors="replace") as handle:
            tokens.add(handle.read(4096))
    except OSError:
        pass
    stored = configparser.ConfigParser(interpolation=None)
    try:
        stored.read(stored_path, encoding="utf-8")
        tokens |= {stored[section].get("hf_token", "") for section in stored.sections()}
    except (OSError, configparser.Error, UnicodeDecodeError):
        pass
    return frozenset(tokens)


def redact(text: object, extra: Iterable[str | None] = ()) -> str:
    """``text`` (made a str) with every known secret, the values in ``extra``, and every credential-shaped word
    (``Bearer ...``, ``Basic ...``, ``hf_...``) replaced by ``***``."""
    text = text if isinstance(text, str) else str(text)
    for secret in known_secrets(extra):
        text = text.replace(secret, MASK)
    for pattern, replacement in PATTERNS:
        text = pattern.sub(replacement, text)
    return text


# --- log records ---------------------------------------------------------------------------------------------------
class RedactingFilter(logging.Filter):
    """Redacts a log record's message, its exception text and its stack before any handler formats it."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record: the handler reports it, as without the filter
            return True
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_info[1] is not None:
            text = record.exc_text or logging.Formatter().formatException(record.exc_info)
            clean = redact(text)
            if clean != text:
                # The exception itself must go too: some handlers (rich's) render it from exc_info.
                record.exc_info, record.exc_text = None, clean
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


FILTER = RedactingFilter()


def redact_every_log_record() -> None:
    """Redact every log record this process makes, whatever its logger (prefalign's command does this): a
    library's debug log may show what a hostile server sent back, e.g. httpx's the response headers. Installs a
    log record factory around the current one, once."""
    previous = logging.getLogRecordFactory()
    if getattr(previous, "redacting", False):
        return

    def factory(*args, **kwargs) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        FILTER.filter(record)
        return record

    factory.redacting = True
    logging.setLogRecordFactory(factory)


def get_logger(name: str) -> logging.Logger:
    """``logging.getLogger(name)`` with the redacting filter (a logger's filters do not apply to its children's
    records, so each prefalign module takes its logger from here)."""
    logger = logging.getLogger(name)
    if FILTER not in logger.filters:
        logger.addFilter(FILTER)
    return logger


# --- exceptions ----------------------------------------------------------------------------------------------------
def _text(error: BaseException) -> str:
    try:
        text = str(error)
    except Exception:  # noqa: BLE001 - an exception whose str fails still has a type
        text = ""
    notes = getattr(error, "__notes__", None)
    return "\n".join([text, *map(str, notes)]) if isinstance(notes, list) and notes else text


def _chain(error: BaseException) -> list[BaseException]:
    """The exceptions a traceback of ``error`` shows besides it: its causes and contexts, outermost first."""
    seen, chain, current = {id(error)}, [], error
    while True:
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
        if current is None or id(current) in seen:
            return chain
        seen.add(id(current))
        chain.append(current)


def _carries_credentials(error: BaseException) -> bool:
    """Whether the error holds an HTTP exchange (huggingface_hub's and httpx's errors keep the request they failed
    on, Authorization header included) or headers with a secret."""
    for owner in (error, getattr(error, "response", None)):
        for attribute in ("request", "headers"):
            try:
                value = getattr(owner, attribute, None)
            except Exception:  # noqa: BLE001 - httpx raises when a response has no request
                continue
            headers = getattr(value, "headers", value)
            if hasattr(headers, "items"):
                for key, item in headers.items():
                    if str(key).lower() in ("authorization", "proxy-authorization", "cookie"):
                        return True
                    if redact(item) != str(item):
                        return True
    return False


def scrub(error: BaseException) -> BaseException:
    """``error`` itself when neither its text, nor its causes' and contexts', nor the HTTP exchange it holds has a
    secret; else a new error without them: the same type where it can be built from the redacted text alone
    (``RuntimeError`` naming the type otherwise), with the redacted text of the chain and no cause or context."""
    text, chain = _text(error), _chain(error)
    clean = redact(text)
    leaked = clean != text or _carries_credentials(error)
    for link in chain:
        link_text = _text(link)
        leaked = leaked or redact(link_text) != link_text or _carries_credentials(link)
    if not leaked:
        return error
    causes = [f"{type(link).__name__}: {redact(_text(link))[:1000]}" for link in chain[:3]]
    message = clean + "".join(f"\n(caused by {cause})" for cause in causes)
    return _rebuild(error, message)


def _rebuild(error: BaseException, message: str) -> BaseException:
    new = _rebuild_hub_error(error, message)
    if new is None:
        try:
            new = type(error)(message)
        except Exception:  # noqa: BLE001 - a type that needs more than a message
            new = None
        if new is not None and (type(new) is not type(error) or redact(_text(new)) != _text(new)):
            new = None
    if new is None:
        new = RuntimeError(f"{type(error).__name__}: {message}")
    return new.with_traceback(error.__traceback__)


def _rebuild_hub_error(error: BaseException, message: str) -> BaseException | None:
    """A huggingface_hub HTTP error of the same type with a bare copy of its response: status and redacted headers,
    and a request that has the method and URL only (no Authorization header)."""
    try:
        from huggingface_hub.errors import HfHubHTTPError
    except ImportError:
        return None
    if not isinstance(error, HfHubHTTPError):
        return None
    try:
        response, request = error.response, error.response.request
        bare_request = type(request)(request.method, redact(str(request.url)))
        headers = [(key, redact(value)) for key, value in response.headers.items()
                   if key.lower() not in ("set-cookie", "authorization", "www-authenticate")]  # fmt: skip
        bare = type(response)(response.status_code, headers=headers, request=bare_request)
        server_message = redact(error.server_message) if error.server_message else error.server_message
        for kind in (type(error), HfHubHTTPError):
            try:
                return kind(message, response=bare, server_message=server_message)
            except TypeError:
                continue
    except Exception:  # noqa: BLE001 - an unexpected httpx: RuntimeError instead
        return None
    return None


F = TypeVar("F", bound=Callable)


def scrubbing(function: F) -> F:
    """Decorate ``function`` so that an exception it raises leaves it through :func:`scrub`: a leaking one is
    replaced, raised outside the handler so that the new error has neither a cause nor a context."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except (Exception, SystemExit) as error:
            clean = scrub(error)
            if clean is error:
                raise
        raise clean from None

    return wrapper  # type: ignore[return-value]


__all__ = ["MASK", "RedactingFilter", "get_logger", "known_secrets", "redact", "redact_every_log_record", "scrub",
           "scrubbing", "watch_env"]
