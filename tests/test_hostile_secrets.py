"""Hostile judge endpoints and leaking secrets.

Every misbehaviour of an OpenAI-compatible judge endpoint (dripping, endless or huge answers, redirects, echoed
credentials, unusable JSON) is a ``hostile.Case`` run in a child process under a watchdog and a memory cap: it must
end as a counted failure with its reason, never as a hang, a crash, an exhausted memory or a leaked key. Bad judge
options fail at construction, naming the option. A judge's ``on_failure: neutral`` keeps its videos inside a
``CompositeReward`` and GRPO. And a whole run (``prefalign fit`` with a redirecting judge and an echoing Hub, then
``prefalign push`` and a failing push) shows the Hugging Face token, the judge's key and the W&B key nowhere.
"""

from __future__ import annotations

import json
import logging
import math
import os
import importlib
import pkgutil
import socket
import socketserver
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from secrets import token_hex

import huggingface_hub.constants as hf_constants
import lightning as L
import pytest
import torch
import yaml
from huggingface_hub.errors import HfHubHTTPError

import prefalign
import prefalign.cli  # noqa: F401 - every module the command imports, so that every logger exists
from prefalign import checkpoints
from prefalign.algorithms.grpo import GRPO
from prefalign.data.datamodule import PortraitDataModule
from prefalign.hub import push
from prefalign.lora import LoraSettings
from prefalign.module import AlignmentModule
from prefalign.processes import FlowMatching
from prefalign.rewards import CompositeReward, MLLMJudge, OpenAIJudge, SyncExpert
from prefalign.rewards.base import Reward
from prefalign.rewards.judge import MAX_ANSWER_BYTES
from prefalign.secrets import FILTER, get_logger, redact, scrub, scrubbing

from conftest import TINY_WAN_RECIPE, quiet_trainer, tiny_wan
from hostile import Case, run
from hub_server import FakeHub

ROOT = Path(__file__).parents[1]
KEY_ENV = "PREFALIGN_HOSTILE_JUDGE_KEY"
KEY = f"sk-hostile-{token_hex(16)}"
GOOD = '{"lip_sync": 4, "expressiveness": 3, "motion_quality": 5}'


# --- a loopback endpoint that can misbehave at the socket level -----------------------------------------------------
class Endpoint:
    """``with Endpoint(behave) as endpoint:`` serves on ``endpoint.url`` (``.../v1``): each request is read (request
    line, headers, body), recorded in ``requests`` and answered by ``behave(out, request, endpoint)``, which writes
    raw bytes to ``out``, so that it can drip, never end, lie about lengths or break HTTP."""

    def __init__(self, behave):
        self.behave = behave
        self.requests: list[dict] = []
        self.stop = threading.Event()
        owner = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self):
                line = self.rfile.readline(65537)
                if not line.strip():
                    return
                method, path = line.decode("latin-1").split()[:2]
                headers = {}
                while (header := self.rfile.readline(65537)) not in (b"\r\n", b"\n", b""):
                    key, _, value = header.decode("latin-1").partition(":")
                    headers[key.strip().lower()] = value.strip()
                body = self.rfile.read(int(headers.get("content-length") or 0))
                request = {"method": method, "path": path, "headers": headers, "body": body,
                           "index": len(owner.requests)}  # fmt: skip
                owner.requests.append(request)
                try:
                    owner.behave(self.wfile, request, owner)
                except OSError:  # the client gave up (as it should on a hostile answer)
                    pass

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

            def handle_error(self, request, client_address):
                pass

        self.server = Server(("127.0.0.1", 0), Handler)
        self.origin = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.url = self.origin + "/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)

    def __enter__(self) -> "Endpoint":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()


def send(out, status: int = 200, body: bytes = b"", headers=(), length: bool = True) -> None:
    lines = [f"HTTP/1.1 {status} Status", *(f"{key}: {value}" for key, value in headers)]
    if length:
        lines.append(f"Content-Length: {len(body)}")
    out.write(("\r\n".join([*lines, "Connection: close"]) + "\r\n\r\n").encode() + body)


def completion(content) -> bytes:
    return json.dumps({"id": "x", "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}).encode()


def answers(content):
    return lambda out, request, endpoint: send(out, 200, completion(content), [("Content-Type", "application/json")])


def raw(status: int, body: bytes, headers=(), length: bool = True):
    return lambda out, request, endpoint: send(out, status, body, headers, length)


def script(*behaviours):
    """The n-th request gets the n-th behaviour; later ones the last."""
    return lambda out, request, endpoint: behaviours[min(request["index"], len(behaviours) - 1)](out, request, endpoint)


def silent(out, request, endpoint):
    endpoint.stop.wait(30)


def drip_body(out, request, endpoint):
    out.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n")
    while not endpoint.stop.wait(0.05):
        out.write(b" ")


def drip_headers(out, request, endpoint):
    out.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
    while not endpoint.stop.wait(0.05):
        out.write(b"a")


def endless(chunked: bool):
    def behave(out, request, endpoint):
        coding = b"Transfer-Encoding: chunked\r\n" if chunked else b""
        out.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + coding + b"Connection: close\r\n\r\n")
        out.write(b"1\r\n{\r\n" if chunked else b"{")
        block = b" " * 65536
        chunk = b"10000\r\n" + block + b"\r\n" if chunked else block
        while not endpoint.stop.is_set():
            out.write(chunk)

    return behave


def huge_length(out, request, endpoint):
    out.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000000000000000\r\n\r\n{")
    endpoint.stop.wait(30)


def echo(status: int):
    """An error that shows the request's headers (Authorization included), in its body and in a header."""

    def behave(out, request, endpoint):
        said = request["headers"].get("authorization")
        said = json.dumps({"error": {"message": f"rejected {said}; you sent {request['headers']}"}}).encode()
        send(out, status, said, [("Content-Type", "application/json"),
                                 ("WWW-Authenticate", request["headers"].get("authorization", ""))])  # fmt: skip

    return behave


def redirect(code: int, location):
    """A redirect to ``location`` (a string, or a function of the endpoint)."""

    def behave(out, request, endpoint):
        where = location(endpoint) if callable(location) else location
        send(out, code, b"", [("Location", where)])

    return behave


# --- judging through the public surface -----------------------------------------------------------------------------
class Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(self.format(record))


@dataclass
class Verdict:
    terms: dict
    stats: dict
    log: str
    seconds: float


def graded_videos(n: int) -> torch.Tensor:
    return (torch.arange(n, dtype=torch.float32) * 20 / 255).view(n, 1, 1, 1, 1).expand(n, 3, 3, 8, 8).clone()


def hostile_judge(url: str, **options) -> OpenAIJudge:
    settings = dict(model="judge", base_url=url, api_key_env=KEY_ENV, timeout=0.5, http_retries=0, backoff=0.01,
                    max_backoff=0.05, max_concurrency=1, num_frames=2, max_retries=0, inputs=["video"])  # fmt: skip
    settings.update(options)
    return OpenAIJudge(**settings)


def judged(url: str, n: int = 1, **options) -> Verdict:
    """``score`` ``n`` videos with a judge on ``url``, with its key set and every log record captured; the key
    must show nowhere (log, counts, terms)."""
    os.environ[KEY_ENV] = KEY
    judge = hostile_judge(url, **options)
    capture, logger = Capture(), logging.getLogger("prefalign")
    logger.addHandler(capture)
    logger.setLevel(logging.DEBUG)
    start = time.monotonic()
    try:
        terms = judge.score(graded_videos(n), {})
    finally:
        logger.removeHandler(capture)
    verdict = Verdict({k: v.tolist() for k, v in terms.items()}, dict(judge.stats), "\n".join(capture.lines),
                      time.monotonic() - start)  # fmt: skip
    assert KEY not in verdict.log and KEY not in repr(judge) and KEY not in json.dumps(vars(judge), default=repr)
    return verdict


def served(behave, n: int = 1, **options) -> tuple[Verdict, Endpoint]:
    with Endpoint(behave) as endpoint:
        verdict = judged(endpoint.url, n, **options)
    return verdict, endpoint


def failed(verdict: Verdict, *words: str, http: bool = True) -> None:
    """The video failed (an HTTP failure, or an unusable answer), was counted and scored neutral, and the warning
    gives the reason with ``words``."""
    assert verdict.stats["failures"] == 1 and verdict.stats["http_errors"] == int(http), verdict.stats
    assert verdict.terms["judge_valid"] == [0.0] and verdict.terms["judge/lip_sync"] == [0.5]
    warning = [line for line in verdict.log.splitlines() if line.startswith("WARNING") and "no usable answer" in line]
    assert warning, verdict.log
    for word in words:
        assert word.lower() in warning[0].lower(), warning[0]


def scored(verdict: Verdict, lip_sync: float = 4) -> None:
    assert verdict.stats["failures"] == 0 and verdict.terms["judge_valid"] == [1.0], (verdict.stats, verdict.log)
    assert verdict.terms["judge/lip_sync"] == [(lip_sync - 1) / 4]


def unusable(content=None, body: bytes | None = None):
    """A case body: the endpoint answers 200 with ``content`` (or the raw ``body``); an unusable answer, counted."""

    def case():
        behave = raw(200, body, [("Content-Type", "application/json")]) if body is not None else answers(content)
        verdict, endpoint = served(behave)
        failed(verdict, "unusable answer", http=False)
        assert len(endpoint.requests) == 1

    return case


CASES: list[Case] = []


def case(name: str, body, expect: str = "ok", must_name=(), errors=(ValueError,), timeout: float = 15.0,
         memory_mb: int = 768) -> None:  # fmt: skip
    CASES.append(Case(name, body, tuple(must_name), expect, errors=errors, timeout=timeout, memory_mb=memory_mb))


# --- item 6: the timeout bounds the whole request --------------------------------------------------------------------
def _dripped(behave):
    def case_body():
        verdict, _ = served(behave, timeout=0.5)
        failed(verdict, "timeout=0.5")
        assert verdict.seconds < 2.5, verdict.seconds

    return case_body


case("drip_body", _dripped(drip_body))
case("drip_headers", _dripped(drip_headers))
case("silent", _dripped(silent))


def _connect_never_completes():
    """A server whose accept queue is full: the kernel drops the connection attempt, connect() would wait on."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    fillers = []
    for _ in range(8):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(server.getsockname())
        fillers.append(filler)
    time.sleep(0.2)
    verdict = judged(f"http://127.0.0.1:{server.getsockname()[1]}/v1", timeout=0.5)
    failed(verdict, "timed out")
    assert verdict.seconds < 2.5, verdict.seconds


case("connect_never_completes", _connect_never_completes)


def _slow_then_fast(first):
    def case_body():
        verdict, endpoint = served(script(first, answers(GOOD)), timeout=0.5, http_retries=1)
        scored(verdict)
        assert verdict.stats["http_retries"] == 1 and len(endpoint.requests) == 2 and verdict.seconds < 2.5

    return case_body


case("silent_then_fast", _slow_then_fast(silent))
case("drip_then_fast", _slow_then_fast(drip_body))


# --- item 7: the answer's size is capped -----------------------------------------------------------------------------
def _too_big(behave, *words, **options):
    def case_body():
        verdict, endpoint = served(behave, timeout=5.0, http_retries=2, **options)
        failed(verdict, "max_answer_bytes", *words)
        assert len(endpoint.requests) == 1 and verdict.seconds < 4.0  # not re-sent, not waited for

    return case_body


case("endless_chunked_body", _too_big(endless(chunked=True), "not read further"), memory_mb=384)
case("endless_close_delimited_body", _too_big(endless(chunked=False), "not read further"), memory_mb=384)
case("huge_content_length", _too_big(huge_length, "Content-Length"), memory_mb=384)
padded = completion(GOOD)
case("one_byte_over_the_cap",
     _too_big(raw(200, padded + b" " * (4096 - len(padded) + 1)), "4096", max_answer_bytes=4096))
case("one_byte_over_the_cap_chunked",
     _too_big(raw(200, b"%x\r\n" % (4097) + padded + b" " * (4097 - len(padded)) + b"\r\n0\r\n\r\n",
                  [("Transfer-Encoding", "chunked")], length=False), "not read further", max_answer_bytes=4096))


def _at_the_cap():
    verdict, _ = served(raw(200, padded + b" " * (4096 - len(padded))), max_answer_bytes=4096)
    scored(verdict)


case("exactly_at_the_cap", _at_the_cap)


def _verbose_real_answer():
    """What a real server sends for 64 tokens with logprobs (top 20) and usage: ~75 KB, well under the default."""
    top = [{"token": f"t{i}", "logprob": -1.5, "bytes": [116, 49]} for i in range(20)]
    answer = {
        "id": "chatcmpl-0123", "object": "chat.completion", "created": 1, "model": "judge", "system_fingerprint": "fp",
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": GOOD, "refusal": None, "tool_calls": []},
                     "logprobs": {"content": [{"token": "t", "logprob": -0.1, "bytes": [116], "top_logprobs": top}
                                              for _ in range(64)]}}],
        "usage": {"prompt_tokens": 2000, "completion_tokens": 20, "total_tokens": 2020},
    }  # fmt: skip
    body = json.dumps(answer).encode()
    assert 50_000 < len(body) < MAX_ANSWER_BYTES // 10
    verdict, _ = served(raw(200, body))
    scored(verdict)


case("verbose_real_answer_under_the_default_cap", _verbose_real_answer)


# --- item 3: no redirect is followed, the key goes to base_url's server only ------------------------------------------
def _redirected(code: int, where: str):
    def case_body():
        with Endpoint(answers(GOOD)) as elsewhere:
            target = {"other_origin": elsewhere.url + "/chat/completions",
                      "same_origin": lambda endpoint: endpoint.url + "/chat/completions?again=1",
                      "relative": "/v2/chat/completions",
                      "file": "file:///etc/passwd",
                      "https_other_host": "https://judge.example.invalid/v1/chat/completions"}[where]  # fmt: skip
            verdict, endpoint = served(redirect(code, target), http_retries=2, max_retries=2)
        failed(verdict, f"HTTP {code}", "redirect", "not followed", "base_url")
        assert len(endpoint.requests) == 1 and not elsewhere.requests  # neither re-sent nor followed
        assert endpoint.requests[0]["headers"]["authorization"] == f"Bearer {KEY}"
        assert "root:" not in verdict.log

    return case_body


for code in (301, 302, 303, 307, 308):
    case(f"redirect_{code}_to_another_origin", _redirected(code, "other_origin"))
case("redirect_to_the_same_origin", _redirected(302, "same_origin"))
case("redirect_relative", _redirected(307, "relative"))
case("redirect_to_a_file_url", _redirected(302, "file"))
case("redirect_to_https_on_another_host", _redirected(308, "https_other_host"))


# --- item 2 (the judge's part): echoed credentials stay out of every log line ----------------------------------------
def _echoed(status: int, retries: int):
    def case_body():
        verdict, endpoint = served(echo(status), http_retries=retries)
        failed(verdict, f"HTTP {status}", "***")
        assert len(endpoint.requests) == retries + 1  # KEY nowhere: checked by judged()

    return case_body


case("unauthorized_echoes_the_key", _echoed(401, 0))
case("forbidden_echoes_the_key", _echoed(403, 0))
case("server_errors_echo_the_key_until_given_up", _echoed(500, 2))


def _echoes_an_unknown_hub_token():
    other = "hf_" + token_hex(16)  # a token prefalign does not know of: masked by its shape
    verdict, _ = served(raw(400, json.dumps({"error": f"Authorization: Bearer {other} is not {other}"}).encode()))
    failed(verdict, "HTTP 400", "Bearer ***")
    assert other not in verdict.log


case("bad_request_echoes_an_unknown_hub_token", _echoes_an_unknown_hub_token)


def _rate_limited(retry_after: str):
    def case_body():
        verdict, endpoint = served(script(raw(429, b"slow down", [("Retry-After", retry_after)]), answers(GOOD)),
                                   http_retries=1)  # fmt: skip
        scored(verdict)
        assert verdict.seconds < 2.0 and len(endpoint.requests) == 2  # waited max_backoff at most

    return case_body


case("rate_limited_retry_after_a_billion_seconds", _rate_limited("1000000000"))
case("rate_limited_retry_after_nan", _rate_limited("nan"))


# --- item 11: unusable answers are counted, never a crash -------------------------------------------------------------
DEEP = 100_000
case("not_json", unusable(body=b"<html><body>502 Bad Gateway</body></html>"))
case("json_nested_10^5_deep", unusable(body=b'{"choices": ' + b"[" * DEEP + b"]" * DEEP + b"}"))
case("content_nested_10^5_deep", unusable('{"a": ' * DEEP + "1" + "}" * DEEP))
case("content_parts_with_null_text", unusable([{"type": "text", "text": None}]))
case("content_parts_not_objects", unusable(["x", 5, None, [GOOD]]))
case("content_null", unusable(None))
case("content_a_number", unusable(42))
case("content_an_object", unusable({"lip_sync": 4}))
case("choices_empty", unusable(body=b'{"choices": []}'))
case("choices_an_object", unusable(body=b'{"choices": {"0": {"message": {"content": "x"}}}}'))
case("message_missing", unusable(body=b'{"choices": [{"index": 0}]}'))
case("body_a_json_string", unusable(body=b'"hello"'))
case("body_invalid_utf8", unusable(body=b'{"choices": [{"message": {"content": "\xff\xfe"}}]}'))
case("scores_nan", unusable('{"lip_sync": NaN, "expressiveness": 3, "motion_quality": 5}'))
case("scores_infinity", unusable('{"lip_sync": Infinity, "expressiveness": 3, "motion_quality": 5}'))
case("scores_out_of_range", unusable('{"lip_sync": 6, "expressiveness": 0, "motion_quality": -1}'))
case("score_an_integer_of_400_digits", unusable('{"lip_sync": 1' + "0" * 400 + ', "expressiveness": 3, '
                                                '"motion_quality": 5}'))  # fmt: skip
case("scores_booleans", unusable('{"lip_sync": true, "expressiveness": true, "motion_quality": false}'))
case("twenty_thousand_open_braces", unusable("{" * 20_000 + GOOD))


def _null_part_then_good_part():
    verdict, _ = served(answers([{"type": "text", "text": None}, {"type": "text", "text": GOOD}]))
    scored(verdict)


def _numbers_as_strings():
    verdict, _ = served(answers('{"lip_sync": "2", "expressiveness": " 5 ", "motion_quality": "1.5"}'))
    scored(verdict, lip_sync=2)


case("null_part_then_a_good_part", _null_part_then_good_part)
case("numbers_as_strings", _numbers_as_strings)


# --- broken HTTP: a failed request, re-sent as transient ---------------------------------------------------------------
def _broken(behave):
    def case_body():
        verdict, endpoint = served(behave, http_retries=1)
        failed(verdict, "after 1 re-sends")
        assert len(endpoint.requests) == 2

    return case_body


case("truncated_body", _broken(raw(200, b'{"choices": [', [("Content-Length", "1000")], length=False)))
case("connection_closed_without_answer", _broken(lambda out, request, endpoint: None))
case("garbage_status_line", _broken(lambda out, request, endpoint: out.write(b"HELLO THERE\r\n\r\n")))
case("two_hundred_headers", _broken(raw(200, completion(GOOD), [(f"X-{i}", "1") for i in range(200)])))
case("a_header_line_of_70000_bytes", _broken(raw(200, completion(GOOD), [("X-Long", "a" * 70_000)])))


# --- item 12: judge options are checked at construction -------------------------------------------------------------
def _option(cls, **options):
    def case_body():
        if cls is OpenAIJudge:
            OpenAIJudge(**{"model": "judge", **options})
        else:  # a folder that does not exist: the check must come before any loading
            MLLMJudge(**{"pretrained": "/nonexistent/judge", **options})

    return case_body


OPTION_CASES = [
    (OpenAIJudge, {"max_retries": -1}, ("max_retries", "at least 0")),
    (OpenAIJudge, {"timeout": 0}, ("timeout", "positive")),
    (OpenAIJudge, {"timeout": -1.0}, ("timeout", "positive")),
    (OpenAIJudge, {"timeout": math.nan}, ("timeout", "finite")),
    (OpenAIJudge, {"max_concurrency": 0}, ("max_concurrency", "at least 1")),
    (OpenAIJudge, {"base_url": "file:///etc/passwd"}, ("base_url", "http://", "https://")),
    (OpenAIJudge, {"base_url": "ftp://judge.example/v1"}, ("base_url", "http://")),
    (OpenAIJudge, {"base_url": "localhost:8000/v1"}, ("base_url", "http://")),
    (OpenAIJudge, {"base_url": "http:///v1"}, ("base_url", "host")),
    (OpenAIJudge, {"http_retries": -1}, ("http_retries", "at least 0")),
    (OpenAIJudge, {"backoff": -0.5}, ("backoff", "at least 0")),
    (OpenAIJudge, {"max_backoff": math.inf}, ("max_backoff", "finite")),
    (OpenAIJudge, {"max_tokens": 0}, ("max_tokens", "at least 1")),
    (OpenAIJudge, {"max_answer_bytes": 0}, ("max_answer_bytes", "at least 1")),
    (OpenAIJudge, {"num_frames": 0}, ("num_frames", "at least 1")),
    (OpenAIJudge, {"retry_temperature": -0.7}, ("retry_temperature", "at least 0")),
    (OpenAIJudge, {"on_failure": "zero"}, ("on_failure", "neutral", "drop")),
    (OpenAIJudge, {"aspects": "lip_sync"}, ("aspects", "list")),
    (OpenAIJudge, {"extra_body": {"model": "other", "seed": 1}}, ("extra_body", "model")),
    (OpenAIJudge, {"model": ""}, ("model",)),
    (MLLMJudge, {"max_retries": -1}, ("max_retries", "at least 0")),
    (MLLMJudge, {"max_new_tokens": 0}, ("max_new_tokens", "at least 1")),
    (MLLMJudge, {"batch_size": 0}, ("batch_size", "at least 1")),
    (MLLMJudge, {"torch_dtype": "float65"}, ("torch_dtype", "bfloat16", "float32")),
    (MLLMJudge, {"num_frames": -3}, ("num_frames", "at least 1")),
    (MLLMJudge, {"on_failure": "skip"}, ("on_failure", "neutral")),
]
for cls, options, words in OPTION_CASES:
    name = "_".join(f"{key}={value!r}" for key, value in options.items()).replace("/", "|")
    case(f"{cls.__name__}_{name}", _option(cls, **options), expect="error", must_name=words)


def _key_given_as_api_key_env():
    """A user who put the key itself in api_key_env gets an error that does not show it."""
    try:
        OpenAIJudge(model="judge", api_key_env=KEY)
    except ValueError as error:
        assert KEY not in str(error)
        raise


case("OpenAIJudge_the_key_itself_as_api_key_env", _key_given_as_api_key_env, expect="error",
     must_name=("api_key_env", "name of an environment variable"))


@pytest.mark.parametrize("hostile", CASES, ids=[c.name for c in CASES])
def test_hostile_judge_endpoint_or_option(hostile):
    result = run(hostile)
    assert result.passed, f"{hostile.name}: {result.outcome} (expected {hostile.expect}): {result.detail}"


# --- item 2: the secrets module -----------------------------------------------------------------------------------
@pytest.fixture
def login_cache(tmp_path, monkeypatch):
    """A huggingface_hub login cache holding a token not shaped like one (so only its value can mask it)."""
    token = f"cached-{token_hex(16)}"
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "token").write_text(token + "\n")
    (tmp_path / "hf" / "stored_tokens").write_text(f"[work]\nhf_token = stored-{token_hex(12)}\n")
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path / "hf" / "token"))
    monkeypatch.setattr(hf_constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf" / "stored_tokens"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    return token


def test_redact_masks_known_secrets_and_credential_shapes(login_cache, tmp_path, monkeypatch):
    wandb, judge = token_hex(20), f"sk-{token_hex(12)}"
    stored = (tmp_path / "hf" / "stored_tokens").read_text().split("= ")[1].strip()
    monkeypatch.setenv("WANDB_API_KEY", wandb)
    monkeypatch.setenv("MY_JUDGE_API_KEY", judge)  # named like a credential
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # not a credential, and short
    monkeypatch.setenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")  # named like one, but too short to be one
    text = (f"cache {login_cache} stored {stored} wandb {wandb} judge {judge} header Bearer abc.def-ghi "
            f"basic Basic dXNlcjpwYXNzd29yZA== hub hf_{'a1' * 10} 1 false")  # fmt: skip
    clean = redact(text)
    for secret in (login_cache, stored, wandb, judge, "abc.def-ghi", "dXNlcjpwYXNzd29yZA==", "a1" * 10):
        assert secret not in clean
    assert "Bearer ***" in clean and "Basic ***" in clean and "hf_***" in clean
    assert clean.endswith(" 1 false")  # short values and plain words are left alone
    assert redact("nothing to hide: hf_hub_download, a token with write access") == (
        "nothing to hide: hf_hub_download, a token with write access"
    )
    assert redact("key xyz", extra=["xyz"]) == "key ***"  # a named secret, whatever its length


def test_every_prefalign_logger_redacts_messages_arguments_and_tracebacks(login_cache, caplog):
    for module in pkgutil.walk_packages(prefalign.__path__, "prefalign."):
        importlib.import_module(module.name)
    loggers = {name: logger for name, logger in logging.Logger.manager.loggerDict.items()
               if name.startswith("prefalign.") and isinstance(logger, logging.Logger)}  # not parents' placeholders
    assert {"prefalign.hub", "prefalign.rewards.judge", "prefalign.module"} <= set(loggers)
    for name, logger in loggers.items():
        assert FILTER in logger.filters, f"{name} does not redact its records: take it from prefalign.secrets.get_logger"

    log = get_logger("prefalign.hub")
    caplog.set_level(logging.DEBUG)
    try:
        raise RuntimeError(f"the server said: Authorization: Bearer {login_cache}")
    except RuntimeError:
        log.exception("push failed with %s", f"token={login_cache}")
    log.warning("plain %d", 3)
    assert login_cache not in caplog.text and "token=***" in caplog.text and "Bearer ***" in caplog.text
    assert "plain 3" in caplog.text


def test_scrubbed_errors_keep_their_type_and_lose_the_secret_with_their_chain(login_cache):
    @scrubbing
    def leaks():
        try:
            raise KeyError(f"Authorization: Bearer {login_cache}")
        except KeyError as inner:
            raise ValueError(f"upload failed, the server echoed {login_cache}") from inner

    with pytest.raises(ValueError) as caught:
        leaks()
    error = caught.value
    shown = "".join(traceback.format_exception(error))
    assert login_cache not in shown and login_cache not in repr(error.args)
    assert error.__cause__ is None and error.__context__ is None and error.__suppress_context__
    assert "upload failed, the server echoed ***" in str(error) and "caused by KeyError" in str(error)
    assert "leaks" in shown  # the traceback still says where it failed

    @scrubbing
    def clean():
        raise FileNotFoundError("no such file: a.yaml")

    plain = FileNotFoundError("x")
    assert scrub(plain) is plain
    with pytest.raises(FileNotFoundError, match="no such file"):
        clean()

    class Picky(Exception):
        def __init__(self, code, text):
            super().__init__(code, text)

    replaced = scrub(Picky(1, f"token {login_cache}"))
    assert type(replaced) is RuntimeError and "Picky" in str(replaced) and login_cache not in str(replaced)


@pytest.fixture
def echoing_hub(login_cache, tmp_path, monkeypatch):
    """A loopback Hub that echoes the request's headers in every error; huggingface_hub pointed at it, the token
    in the login cache only."""
    with FakeHub(token=login_cache, echo_headers=True) as server:
        monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(hf_constants, "ENDPOINT", server.url)
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server


def lora_checkpoint_file(path: Path) -> Path:
    module = AlignmentModule(tiny_wan(), FlowMatching(), lora=LoraSettings(rank=4))
    torch.save({**checkpoints.model_part(module.state_dict(), module), "global_step": 1}, path)
    return path


@pytest.mark.filterwarnings("ignore:no recipe found")
def test_a_failed_push_to_an_echoing_hub_raises_a_hub_error_without_the_token(
    echoing_hub, login_cache, tmp_path, capsys, caplog
):
    caplog.set_level(logging.DEBUG)
    ckpt = lora_checkpoint_file(tmp_path / "run.ckpt")
    echoing_hub.token = "hf_" + token_hex(16)  # the Hub wants another token: 401, echoing ours
    with pytest.raises(HfHubHTTPError) as caught:
        push(ckpt, "alice/echo", endpoint=echoing_hub.url)
    error = caught.value
    assert f"Bearer {login_cache}" in {request.authorization for request in echoing_hub.requests}
    assert error.response.status_code == 401 and "***" in str(error)
    shown = "".join(traceback.format_exception(error)) + repr(error.args) + str(error.server_message)
    assert login_cache not in shown
    assert "authorization" not in {key.lower() for key in error.response.request.headers}
    assert login_cache not in str(dict(error.response.headers))
    assert error.__cause__ is None and error.__context__ is None
    out = capsys.readouterr()
    assert login_cache not in out.out + out.err
    # prefalign's own records (httpx's debug log shows the echoed headers: the command redacts every record of its
    # process, see the acceptance test below, a library function cannot)
    assert all(login_cache not in r.getMessage() for r in caplog.records if r.name.startswith("prefalign"))


# --- item 18: on_failure inside a CompositeReward and GRPO --------------------------------------------------------------
class Brightness(Reward):
    def score(self, videos, cond):
        return {"brightness": videos.float().mean(dim=(1, 2, 3, 4))}


@pytest.mark.parametrize("aggregate", ["reward", "advantage"])
@pytest.mark.parametrize("on_failure", ["neutral", "drop"])
def test_a_failing_judge_inside_a_composite_follows_its_policy(on_failure, aggregate, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    videos = graded_videos(4)
    with Endpoint(raw(500, b"down")) as endpoint:
        judge = hostile_judge(endpoint.url, on_failure=on_failure)
        reward = CompositeReward([Brightness(), judge], normalize="batch", aggregate=aggregate)
        total, terms = reward.total(videos, {})
    assert judge.stats["failures"] == 4
    if on_failure == "neutral":
        assert torch.isfinite(total).all() and reward.valid(terms).all()
        for name in judge.aspect_terms:
            assert terms[name].tolist() == [0.5] * 4  # 3, the middle of the 1-5 scale
        # the judge's constant terms normalise to 0: the total is the brightness term's
        torch.testing.assert_close(total, reward.normalized({"b": terms["brightness"]})["b"])
        advantages = reward.weighted_advantages(reward.reward_terms(terms), torch.tensor([0, 0, 1, 1]))
        assert torch.isfinite(advantages).all()
    else:
        assert torch.isnan(total).all() and not reward.valid(terms).any()
    assert terms["judge_valid"].tolist() == [0.0] * 4


class Recorder(L.Callback):
    def __init__(self):
        self.rows = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.rows.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")})


@pytest.mark.parametrize("on_failure", ["neutral", "drop"])
def test_grpo_with_a_failing_judge_trains_on_neutral_scores_and_drops_under_drop(on_failure, talkingshapes,
                                                                                  monkeypatch):  # fmt: skip
    monkeypatch.setenv(KEY_ENV, KEY)
    torch.manual_seed(0)
    with Endpoint(raw(503, b"down")) as endpoint:
        judge = hostile_judge(endpoint.url, on_failure=on_failure)
        grpo = GRPO(CompositeReward([SyncExpert(), judge]), group_size=2, num_steps=2, train_fraction=1.0)
        module = AlignmentModule(tiny_wan(), FlowMatching(), algorithm=grpo,
                                 optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2))  # fmt: skip
        before = {name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad}
        recorder = Recorder()
        data = PortraitDataModule(train=str(talkingshapes), batch_size=1, num_frames=17, val_fraction=0.0)
        quiet_trainer(max_steps=1, callbacks=[recorder]).fit(module, datamodule=data)
    assert judge.stats["failures"] == 2 and len(endpoint.requests) == 2
    moved = any(not torch.equal(before[name], p) for name, p in module.named_parameters() if p.requires_grad)
    row = recorder.rows[0]
    if on_failure == "neutral":  # kept, scored 3: the sync expert's spread trains the group
        assert row["train/dropped_fraction"] == 0.0 and row["train/empty_batches"] == 0.0 and moved
    else:
        assert row["train/dropped_fraction"] == 1.0 and row["train/empty_batches"] == 1.0 and not moved


# --- the acceptance test: a whole run, its pushes, and no secret anywhere ---------------------------------------------
def run_prefalign(args: list[str], env: dict, cwd: Path, log: Path | None = None) -> subprocess.CompletedProcess:
    """``prefalign ARGS`` in a new interpreter; with ``log``, every log record of every logger (DEBUG and up) is
    written there too."""
    if log is None:
        command = [sys.executable, "-m", "prefalign.cli", *args]
    else:
        setup = (f"import logging, sys; logging.basicConfig(level=logging.DEBUG, filename={str(log)!r}); "
                 "from prefalign.cli import main; main(sys.argv[1:])")  # fmt: skip
        command = [sys.executable, "-c", setup, *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=str(cwd))


@pytest.mark.slow
def test_no_secret_reaches_files_logs_or_output_of_a_run_and_its_pushes(talkingshapes, tmp_path):
    keys = {"HF_TOKEN": f"hf_{token_hex(20)}", "JUDGE_API_KEY": f"sk-judge-{token_hex(16)}",
            "WANDB_API_KEY": token_hex(20)}  # fmt: skip
    home, run = tmp_path / "home", tmp_path / "home" / "runs" / "secret"
    home.mkdir()
    env = {name: value for name, value in os.environ.items()
           if name.lower() not in ("http_proxy", "https_proxy", "all_proxy")}  # fmt: skip
    env.update(keys, WANDB_MODE="disabled", HF_HUB_OFFLINE="0", HF_HUB_DISABLE_XET="1", HF_HOME=str(home / "hf"),
               OMP_NUM_THREADS="1", no_proxy="127.0.0.1,localhost")  # fmt: skip
    with FakeHub(token=keys["HF_TOKEN"], echo_headers=True) as hub, Endpoint(answers(GOOD)) as elsewhere:
        env["HF_ENDPOINT"] = hub.url
        with Endpoint(redirect(302, elsewhere.url + "/chat/completions")) as judge_server:
            recipe = {
                "seed_everything": 0,
                "trainer": {
                    "accelerator": "cpu", "devices": 1, "max_steps": 2, "log_every_n_steps": 1,
                    "limit_val_batches": 0, "enable_progress_bar": False, "enable_model_summary": False,
                    "default_root_dir": str(run),
                    "callbacks": [
                        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                         "init_args": {"dirpath": str(run / "checkpoints"), "save_last": True, "save_top_k": 0,
                                       "every_n_train_steps": 1}},
                        {"class_path": "prefalign.callbacks.PushToHub",
                         "init_args": {"repo_id": "alice/secret-run", "every_n_steps": 1, "endpoint": hub.url}},
                    ],
                },
                "model": {
                    "denoiser": TINY_WAN_RECIPE,
                    "process": {"class_path": "prefalign.processes.FlowMatching"},
                    "algorithm": {"class_path": "prefalign.algorithms.GRPO", "init_args": {
                        "reward": {"class_path": "prefalign.rewards.CompositeReward", "init_args": {"terms": [
                            {"class_path": "prefalign.rewards.SyncExpert"},
                            {"class_path": "prefalign.rewards.OpenAIJudge",
                             "init_args": {"model": "judge", "base_url": judge_server.url,
                                           "api_key_env": "JUDGE_API_KEY", "num_frames": 2, "max_retries": 0}},
                        ]}},
                        "group_size": 2, "num_steps": 2, "train_fraction": 1.0}},
                    "lora": {"rank": 4},
                },
                "data": {"train": str(talkingshapes), "batch_size": 1, "num_frames": 17, "val_fraction": 0.0},
            }  # fmt: skip
            (home / "recipe.yaml").write_text(yaml.safe_dump(recipe))
            hub.fail_commits = True  # every push of the run fails, with the headers echoed
            fit = run_prefalign(["fit", "--config", str(home / "recipe.yaml")], env, home, log=home / "fit.log")
        # The judge's key went to its own server, which redirected; the other origin got nothing.
        assert judge_server.requests and not elsewhere.requests
        assert judge_server.requests[0]["headers"]["authorization"] == f"Bearer {keys['JUDGE_API_KEY']}"
        fit_log = (home / "fit.log").read_text()
        assert "redirect" in fit_log and "not followed" in fit_log, fit_log[-3000:]
        # The periodic pushes failed with a warning, training went on; the final one failed the run.
        assert fit_log.count("PushToHub: pushing to alice/secret-run at step") == 2, fit_log[-3000:]
        assert fit.returncode != 0 and "HfHubHTTPError" in fit.stderr and "***" in fit.stderr, fit.stderr[-3000:]
        assert f"Bearer {keys['HF_TOKEN']}" in {r.authorization for r in hub.requests}
        ckpt = run / "checkpoints" / "last.ckpt"
        assert ckpt.is_file()

        hub.fail_commits = False
        pushed = run_prefalign(["push", "--ckpt_path", str(ckpt), "--repo_id", "alice/secret-run"], env, home)
        assert pushed.returncode == 0, pushed.stderr[-3000:]
        assert hub.commits("alice/secret-run")[-1].oid in pushed.stdout

        hub.token = f"hf_{token_hex(20)}"  # the Hub now refuses our token, and echoes it
        refused = run_prefalign(["push", "--ckpt_path", str(ckpt), "--repo_id", "alice/secret-run"], env, home)
        assert refused.returncode != 0 and "401" in refused.stderr, refused.stderr[-3000:]
        pushed_files = [content for commit in hub.repos["alice/secret-run"].branches["main"]
                        for content in commit.files.values()]  # fmt: skip

    outputs = {"fit": fit.stdout + fit.stderr, "push": pushed.stdout + pushed.stderr,
               "failing push": refused.stdout + refused.stderr}  # fmt: skip
    files = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert len(files) > 10 and (home / "fit.log") in files and any(p.suffix == ".ckpt" for p in files)
    for name, key in keys.items():
        for label, text in outputs.items():
            assert key not in text, f"{name} in the output of {label}"
        for path in files:
            assert key.encode() not in path.read_bytes(), f"{name} in {path}"
        assert all(key.encode() not in content for content in pushed_files), f"{name} pushed to the Hub"


def test_the_hostile_suite_is_large_enough():
    assert len(CASES) >= 30 and len({c.name for c in CASES}) == len(CASES)
