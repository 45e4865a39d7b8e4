"""MLLM judges as rewards: the parser, the failure policy, a tiny random Qwen2.5-VL in process, and an
OpenAI-compatible endpoint played by a loopback HTTP server."""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

from prefalign.rewards import MLLMJudge, OpenAIJudge
from prefalign.rewards.judge import DEFAULT_PROMPT, parse_scores, sample_frames

ASPECTS = ["lip_sync", "expressiveness", "motion_quality"]
GOOD = '{"lip_sync": 4, "expressiveness": 3, "motion_quality": 5}'


# --- the parser ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, expected",
    [
        (GOOD, {"lip_sync": 4, "expressiveness": 3, "motion_quality": 5}),
        (f"```json\n{GOOD}\n```", {"lip_sync": 4, "expressiveness": 3, "motion_quality": 5}),
        (f"Sure! My rating: {GOOD} Hope this helps.", {"lip_sync": 4, "expressiveness": 3, "motion_quality": 5}),
        ('{"lip_sync": "2", "expressiveness": " 5 ", "motion_quality": 1, "note": "x"}',
         {"lip_sync": 2, "expressiveness": 5, "motion_quality": 1}),
        ('{"lip_sync": 3.5, "expressiveness": 1.0, "motion_quality": 5}',
         {"lip_sync": 3.5, "expressiveness": 1, "motion_quality": 5}),
        ('not json {oops} then {"lip_sync": 1, "expressiveness": 1, "motion_quality": 1}',
         {"lip_sync": 1, "expressiveness": 1, "motion_quality": 1}),
    ],
)
def test_parse_scores_accepts(text, expected):
    assert parse_scores(text, ASPECTS) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "I would rate lip sync 4, expressiveness 3 and motion 5.",
        '{"lip_sync": 4, "expressiveness": 3}',  # a missing aspect
        '{"lip_sync": "good", "expressiveness": 3, "motion_quality": 5}',  # not a number
        '{"lip_sync": true, "expressiveness": 3, "motion_quality": 5}',  # a boolean is no score
        '{"lip_sync": null, "expressiveness": 3, "motion_quality": 5}',
        '{"lip_sync": [4], "expressiveness": 3, "motion_quality": 5}',
        '{"lip_sync": 6, "expressiveness": 3, "motion_quality": 5}',  # out of range
        '{"lip_sync": 0, "expressiveness": 3, "motion_quality": 5}',
        '{"lip_sync": NaN, "expressiveness": 3, "motion_quality": 5}',
        '{"lip_sync": "inf", "expressiveness": 3, "motion_quality": 5}',
        '[{"lip_sync": 4, "expressiveness": 3, "motion_quality": 5]',  # broken
        '{"lip_sync": 4, "expressiveness": 3, "motion_quality": 5',  # truncated
        "{" * 5000,
        None,
        42,
    ],
)
def test_parse_scores_rejects_without_raising(text):
    assert parse_scores(text, ASPECTS) is None


def test_parse_scores_takes_the_first_object_and_its_own_scale():
    assert parse_scores('{"a": 9} {"a": 2}', ["a"]) is None  # the first object decides
    assert parse_scores('{"a": 9}', ["a"], low=0, high=10) == {"a": 9}


def test_sample_frames_are_evenly_spaced_uint8_images():
    videos = torch.arange(9, dtype=torch.float32).div(8).view(1, 9, 1, 1, 1).expand(2, 9, 3, 4, 5)
    frames = sample_frames(videos, 3)
    assert frames.shape == (2, 3, 4, 5, 3) and frames.dtype == np.uint8
    assert frames[0, :, 0, 0, 0].tolist() == [0, 128, 255]  # frames 0, 4 and 8 of 9
    assert sample_frames(videos[:, :2], 8).shape[1] == 2  # fewer frames than asked: all of them
    with pytest.raises(ValueError, match="frames, 3, height, width"):
        sample_frames(torch.rand(2, 3, 4, 5), 3)
    with pytest.raises(ValueError, match="NaN"):
        sample_frames(torch.full((1, 2, 3, 4, 4), float("nan")), 2)


def test_bad_options_fail_at_construction():
    with pytest.raises(ValueError, match="on_failure"):
        OpenAIJudge(model="m", on_failure="zero")
    with pytest.raises(ValueError, match="prompt"):
        OpenAIJudge(model="m", aspects=["realism"])
    with pytest.raises(ValueError, match="exactly one"):
        MLLMJudge()


# --- an OpenAI-compatible endpoint on loopback ----------------------------------------------------------------------
def scores_of(index: int) -> dict[str, int]:
    """What the fake judge answers for video ``index`` (read back from the frames' grey level)."""
    return {"lip_sync": 1 + index % 5, "expressiveness": 5 - index % 5, "motion_quality": 3}


def graded_videos(n: int, frames: int = 4) -> torch.Tensor:
    """Video i is a constant grey of level 20·i / 255, so the server can tell which video a request is for."""
    return (torch.arange(n, dtype=torch.float32) * 20 / 255).view(n, 1, 1, 1, 1).expand(n, frames, 3, 8, 8).clone()


class JudgeServer:
    """Answers chat-completions requests from a script of actions, then with ``default``; records every request.

    An action is a dict: ``delay`` (seconds before answering), ``status`` (HTTP code, 200 by default), ``content``
    (the answer's text; None = the scores of the video in the request), ``body`` (raw body of an error), ``headers``.
    """

    def __init__(self, script=(), default=None):
        self.script = list(script)
        self.default = default or {}
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with owner.lock:
                    owner.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                    action = owner.script.pop(0) if owner.script else owner.default
                    owner.in_flight += 1
                    owner.max_in_flight = max(owner.max_in_flight, owner.in_flight)
                try:
                    time.sleep(action.get("delay", 0.0))
                finally:
                    # Counted out before answering: the client may send its next request as soon as it has read this.
                    with owner.lock:
                        owner.in_flight -= 1
                status = action.get("status", 200)
                if status == 200:
                    content = action.get("content")
                    if content is None:
                        content = json.dumps(scores_of(video_index(body)))
                    payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]})
                else:
                    payload = action.get("body", json.dumps({"error": {"message": "scripted error"}}))
                data = payload.encode()
                self.send_response(status)
                for key, value in action.get("headers", {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address):
                pass  # the client gave up on a delayed answer: writing to its closed socket fails, as it should

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def video_index(body: dict) -> int:
    from PIL import Image

    url = body["messages"][0]["content"][0]["image_url"]["url"]
    image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    return round(np.asarray(image)[0, 0, 0] / 20)


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


def api_judge(url: str, **kwargs) -> OpenAIJudge:
    options = dict(model="big-judge", base_url=url, api_key_env="PREFALIGN_TEST_JUDGE_KEY", timeout=0.3,
                   backoff=0.01, max_concurrency=1, num_frames=3, max_retries=2, inputs=["video"])
    options.update(kwargs)
    return OpenAIJudge(**options)


def test_openai_judge_scores_a_batch_with_bounded_concurrency_and_keeps_the_key_secret(monkeypatch, caplog):
    key = "sk-test-0123456789abcdef"
    monkeypatch.setenv("PREFALIGN_TEST_JUDGE_KEY", key)
    caplog.set_level(logging.DEBUG)
    videos = graded_videos(6)
    with JudgeServer(default={"delay": 0.1}) as server:
        judge = api_judge(server.url, max_concurrency=2, max_tokens=32)
        terms = judge.score(videos, {})

    assert set(terms) == {"judge/lip_sync", "judge/expressiveness", "judge/motion_quality", "judge_valid"}
    for name, aspect in zip(judge.aspect_terms, ASPECTS):
        expected = [(scores_of(i)[aspect] - 1) / 4 for i in range(6)]
        torch.testing.assert_close(terms[name], torch.tensor(expected))  # each answer lands on its own video
    torch.testing.assert_close(terms["judge_valid"], torch.ones(6))
    assert judge.stats == {"requests": 6, "retries": 0, "failures": 0, "http_retries": 0, "http_errors": 0}
    assert server.max_in_flight == 2  # two workers overlap, never three

    request = server.requests[0]
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == f"Bearer {key}"
    body = request["body"]
    assert body["model"] == "big-judge" and body["temperature"] == 0 and body["max_tokens"] == 32
    content = body["messages"][0]["content"]
    assert [part["type"] for part in content] == ["image_url"] * 3 + ["text"]
    assert content[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert content[-1]["text"] == DEFAULT_PROMPT.replace("{num_frames}", "3")

    assert key not in repr(judge) and key not in str(judge)
    assert key not in json.dumps(vars(judge), default=repr)
    for record in caplog.records:
        assert key not in record.getMessage()
        assert "base64" not in record.getMessage()
    info = [r.getMessage() for r in caplog.records if r.name == "prefalign.rewards.judge" and r.levelno == logging.INFO]
    assert info == ["OpenAIJudge: 6 videos, requests 6, retries 0, failures 0, http_retries 0, http_errors 0"]


def test_openai_judge_asks_again_after_an_unusable_answer(monkeypatch):
    monkeypatch.delenv("PREFALIGN_TEST_JUDGE_KEY", raising=False)
    with JudgeServer(script=[{"content": "I think it is quite good."}, {"content": None}]) as server:
        judge = api_judge(server.url, retry_temperature=0.5)
        terms = judge.score(graded_videos(1), {})
    assert judge.stats["requests"] == 2 and judge.stats["retries"] == 1 and judge.stats["failures"] == 0
    assert terms["judge_valid"].tolist() == [1.0]
    assert [r["body"]["temperature"] for r in server.requests] == [0, 0.5]
    assert "Authorization" not in server.requests[0]["headers"]  # no key set: no header


def test_openai_judge_failure_policies(caplog):
    garbage = {"content": "```json\n{\"lip_sync\": 9}\n```"}
    with JudgeServer(script=[{"content": None}], default=garbage) as server:
        neutral = api_judge(server.url, on_failure="neutral")
        terms = neutral.score(graded_videos(2), {})
    assert neutral.stats == {"requests": 4, "retries": 2, "failures": 1, "http_retries": 0, "http_errors": 0}
    assert terms["judge_valid"].tolist() == [1.0, 0.0]
    assert terms["judge/lip_sync"].tolist() == [0.0, 0.5]  # video 0 answered 1, video 1 got the middle of the scale
    assert any("no usable answer for 1 of 2 videos" in r.getMessage() for r in caplog.records)

    with JudgeServer(script=[{"content": None}], default=garbage) as server:
        drop = api_judge(server.url, on_failure="drop")
        total, terms = drop.total(graded_videos(2), {})
    assert drop.stats["failures"] == 1
    assert terms["judge_valid"].tolist() == [1.0, 0.0]
    for name in drop.aspect_terms:
        assert math.isfinite(terms[name][0]) and math.isnan(terms[name][1])
    assert total[0].item() == pytest.approx((0 + 1 + 0.5)) and math.isnan(total[1])  # the mask is not summed
    assert drop.mask_terms == ["judge_valid"]


def test_openai_judge_resends_after_a_timeout_and_a_server_error():
    script = [{"delay": 0.8}, {"status": 500}, {"status": 429, "headers": {"Retry-After": "0"}}, {"status": 503}]
    with JudgeServer(script=script) as server:
        judge = api_judge(server.url, http_retries=4)
        start = time.monotonic()
        terms = judge.score(graded_videos(1), {})
        elapsed = time.monotonic() - start
    assert terms["judge_valid"].tolist() == [1.0]
    assert judge.stats == {"requests": 5, "retries": 0, "failures": 0, "http_retries": 4, "http_errors": 0}
    assert elapsed < 0.8  # the timed-out request was not waited for


def test_openai_judge_gives_up_on_a_client_error_and_on_exhausted_retries(monkeypatch, caplog):
    key = "sk-echoed-by-a-bad-server"
    monkeypatch.setenv("PREFALIGN_TEST_JUDGE_KEY", key)
    echo = json.dumps({"error": f"invalid api key {key}"})
    with JudgeServer(script=[{"status": 400, "body": echo}]) as server:
        judge = api_judge(server.url)
        terms = judge.score(graded_videos(1), {})
    assert len(server.requests) == 1  # a 400 is not re-sent, nor asked again
    assert judge.stats == {"requests": 1, "retries": 0, "failures": 1, "http_retries": 0, "http_errors": 1}
    assert terms["judge_valid"].tolist() == [0.0] and terms["judge/lip_sync"].tolist() == [0.5]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("HTTP 400" in message and "***" in message for message in warnings)
    assert all(key not in r.getMessage() for r in caplog.records)

    with JudgeServer(default={"status": 502}) as server:
        judge = api_judge(server.url, http_retries=2, on_failure="drop")
        terms = judge.score(graded_videos(1), {})
    assert len(server.requests) == 3
    assert judge.stats == {"requests": 3, "retries": 0, "failures": 1, "http_retries": 2, "http_errors": 1}
    assert math.isnan(terms["judge/motion_quality"][0]) and terms["judge_valid"].tolist() == [0.0]


def test_openai_judge_survives_an_unreachable_server():
    with JudgeServer() as server:
        url = server.url
    judge = api_judge(url, http_retries=1)  # the port is closed now: connection refused
    terms = judge.score(graded_videos(2), {})
    assert terms["judge_valid"].tolist() == [0.0, 0.0]
    assert judge.stats["failures"] == 2 and judge.stats["http_errors"] == 2 and judge.stats["requests"] == 4


# --- a tiny random Qwen2.5-VL in process ----------------------------------------------------------------------------
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
           "<|video_pad|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_qwen_config(ids: dict[str, int], vocab_size: int) -> dict:
    """Qwen2.5-VL at transformers' own test sizes: 2 text layers of width 32, a 2-block vision tower."""
    return dict(
        text_config=dict(
            vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512,
            rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0},
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=32, num_heads=4, out_hidden_size=32, patch_size=14,
            spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[1], window_size=56,
        ),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory):
    """A random Qwen2.5-VL with a byte-level BPE tokenizer trained in memory, saved as a Hub folder would be."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([GOOD, DEFAULT_PROMPT, "user assistant system"], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        chat_template=CHAT_TEMPLATE)
    # 28x28 pixels per image: 2x2 patches of 14, merged into one token.
    image_processor = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=28 * 28, patch_size=14,
                                               temporal_patch_size=2, merge_size=2)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL}
    config = tiny_qwen_config(ids, bpe.get_vocab_size())
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**config))
    folder = tmp_path_factory.mktemp("tiny_qwen")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    image_processor.save_pretrained(folder)
    return str(folder), config


def test_mllm_judge_counts_and_scores_garbage_answers(tiny_qwen, caplog):
    folder, _ = tiny_qwen
    caplog.set_level(logging.INFO)
    judge = MLLMJudge(pretrained=folder, num_frames=3, max_retries=1, max_new_tokens=8, torch_dtype="float32")
    videos = torch.rand(2, 5, 3, 32, 32)
    terms = judge.score(videos, {})
    assert set(terms) == {"judge/lip_sync", "judge/expressiveness", "judge/motion_quality", "judge_valid"}
    assert all(value.shape == (2,) for value in terms.values())
    # A random model's answers are garbage: asked once more each, then scored neutral.
    assert judge.stats == {"requests": 4, "retries": 2, "failures": 2}
    assert terms["judge_valid"].tolist() == [0.0, 0.0]
    for name in judge.aspect_terms:
        assert terms[name].tolist() == [0.5, 0.5]
    assert any("no usable answer for 2 of 2 videos" in r.getMessage() for r in caplog.records)
    assert not judge.model.training and not any(p.requires_grad for p in judge.model.parameters())

    judge.on_failure = "drop"
    judge.reset_stats()
    total, terms = judge.total(videos[:1], {})
    assert judge.stats == {"requests": 2, "retries": 1, "failures": 1}
    assert math.isnan(total[0]) and all(math.isnan(terms[name][0]) for name in judge.aspect_terms)
    assert terms["judge_valid"].tolist() == [0.0]


def test_mllm_judge_inputs_hold_one_image_per_frame_in_the_chat_template(tiny_qwen):
    folder, config = tiny_qwen
    judge = MLLMJudge(pretrained=folder, num_frames=4)
    frames = sample_frames(torch.rand(3, 6, 3, 32, 32), 4)
    text = judge._chat_text(4)
    assert text.startswith("<|im_start|>user\n" + "<|vision_start|><|image_pad|><|vision_end|>" * 4)
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    from PIL import Image

    images = [Image.fromarray(frame) for video in frames for frame in video]
    inputs = judge.processor(text=[text] * 3, images=images, padding=True, return_tensors="pt")
    image_tokens = inputs["input_ids"] == config["image_token_id"]
    assert image_tokens.sum(-1).tolist() == [4, 4, 4]  # 28x28 images: one merged token each
    assert inputs["image_grid_thw"].tolist() == [[1, 2, 2]] * 12
    assert torch.equal(inputs["mm_token_type_ids"].bool(), image_tokens)
    answers = judge._generate(frames, temperature=0.0)
    assert len(answers) == 3 and all(isinstance(answer, str) for answer in answers)


def test_mllm_judge_retries_only_the_unusable_rows(tiny_qwen, monkeypatch):
    folder, config = tiny_qwen
    judge = MLLMJudge(config=config, processor=folder, num_frames=2, max_retries=2, retry_temperature=0.9,
                      batch_size=2)
    calls = []
    answers = iter([GOOD, "garbage", "more garbage",  # first pass, rows 0-1 then row 2
                    '{"lip_sync": 1, "expressiveness": 1, "motion_quality": 1}', "garbage",  # retry of rows 1-2
                    '{"lip_sync": 5, "expressiveness": 5, "motion_quality": 5}'])  # second retry of row 2

    def scripted(frames, temperature):
        calls.append((len(frames), temperature))
        return [next(answers) for _ in range(len(frames))]

    monkeypatch.setattr(judge, "_generate", scripted)
    terms = judge.score(torch.rand(3, 4, 3, 16, 16), {})
    assert calls == [(2, 0.0), (1, 0.0), (2, 0.9), (1, 0.9)]
    assert judge.stats == {"requests": 6, "retries": 3, "failures": 0}
    assert terms["judge/lip_sync"].tolist() == [0.75, 0.0, 1.0]
    assert terms["judge_valid"].tolist() == [1.0, 1.0, 1.0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_mllm_judge_follows_the_videos_device(tiny_qwen):
    folder, _ = tiny_qwen
    judge = MLLMJudge(pretrained=folder, num_frames=2, max_retries=0, max_new_tokens=4)
    terms = judge.score(torch.rand(2, 3, 3, 32, 32, device="cuda"), {})
    assert next(judge.model.parameters()).is_cuda and all(value.is_cuda for value in terms.values())
