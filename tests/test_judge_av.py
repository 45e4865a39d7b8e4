"""The audio-visual judge over an OpenAI-compatible API: what each request holds (reference photo, video, speech,
prompt), checked part by part by a loopback server that decodes every medium, answers from what it hears, and
fails as servers fail."""

from __future__ import annotations

import base64
import io
import json
import math
import tempfile
import threading
import wave
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from prefalign.data import media
from prefalign.rewards import CompositeReward, OpenAIJudge
from prefalign.rewards.judge import PROMPTS, frame_indices

RATE, FPS = 16000, 25.0


def decode_part(part: dict) -> tuple[str, object]:
    """A content part → (kind, decoded medium), or an AssertionError naming what breaks the documented schema."""
    kind = part["type"]
    if kind == "text":
        assert isinstance(part["text"], str) and part["text"]
        return "text", part["text"]
    if kind == "image_url":
        from PIL import Image

        url = part["image_url"]["url"]
        assert url.startswith("data:image/png;base64,"), url[:40]
        return "image", np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))
    if kind == "video_url":
        url = part["video_url"]["url"]
        assert url.startswith("data:video/mp4;base64,"), url[:40]
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "video.mp4"
            path.write_bytes(base64.b64decode(url.split(",", 1)[1]))
            frames, fps = media.read_video(path)
        return "video", (frames, fps)
    if kind in ("input_audio", "audio_url"):
        if kind == "input_audio":
            assert part["input_audio"]["format"] == "wav"
            data = base64.b64decode(part["input_audio"]["data"])
        else:
            url = part["audio_url"]["url"]
            assert url.startswith("data:audio/wav;base64,"), url[:40]
            data = base64.b64decode(url.split(",", 1)[1])
        with wave.open(io.BytesIO(data)) as handle:
            assert (handle.getnchannels(), handle.getsampwidth()) == (1, 2)
            samples = np.frombuffer(handle.readframes(handle.getnframes()), "<i2").astype(np.float32) / 32767
            return "audio", (samples, handle.getframerate())
    raise AssertionError(f"unknown content part type {kind!r}")


def heard_scores(samples: np.ndarray) -> dict[str, int]:
    """What the fake judge answers: lip sync from the speech's loudness (so only the audio moves it)."""
    rms = float(np.sqrt(np.mean(samples**2))) if samples.size else 0.0
    return {"lip_sync": 1 + min(4, int(rms * 10)), "expressiveness": 3, "motion_quality": 4}


class AVServer:
    """A chat-completions endpoint that decodes every part of every request (recorded in ``requests``), answers
    ``heard_scores`` of the audio, or follows ``script`` actions first (``status``, ``content``)."""

    def __init__(self, script=()):
        self.script = list(script)
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                parts = [decode_part(part) for part in body["messages"][0]["content"]]
                with owner.lock:
                    owner.requests.append({"body": body, "parts": parts})
                    action = owner.script.pop(0) if owner.script else {}
                status = action.get("status", 200)
                content = action.get("content")
                if content is None:
                    audio = [medium for kind, medium in parts if kind == "audio"]
                    content = json.dumps(heard_scores(audio[0][0] if audio else np.zeros(0)))
                payload = json.dumps({"choices": [{"message": {"content": content}}]}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


def judge(url: str, **kwargs) -> OpenAIJudge:
    options = dict(model="Qwen/Qwen2.5-Omni-7B", base_url=url, api_key_env="PREFALIGN_TEST_JUDGE_KEY", timeout=5.0,
                   backoff=0.01, max_concurrency=2, max_retries=1, video_fps=FPS, sample_rate=RATE)
    options.update(kwargs)
    return OpenAIJudge(**options)


def clips(n: int = 2, frames: int = 9, loudness=(0.05, 0.35), seed: int = 0):
    """``n`` videos (moving bars) with their conditions: speech-like noise of the given loudness, a reference."""
    g = torch.Generator().manual_seed(seed)
    t, c, y, x = torch.meshgrid(torch.arange(frames), torch.arange(3), torch.arange(16), torch.arange(24), indexing="ij")
    videos = torch.stack([0.5 + 0.4 * torch.sin(0.3 * x + 0.2 * y + 0.6 * t + c + i) for i in range(n)]).float()
    audio = torch.stack([a * torch.sin(torch.arange(round(frames / FPS * RATE)) * 0.05 * (i + 1))
                         for i, a in zip(range(n), loudness)])  # fmt: skip
    reference = torch.rand(n, 3, 16, 24, generator=g)
    return videos, {"audio": audio, "reference": reference, "text": [f"hello number {i}" for i in range(n)]}


def test_each_request_holds_the_reference_the_video_and_the_speech_in_order():
    videos, cond = clips()
    with AVServer() as server:
        terms = judge(server.url).score(videos, cond)
    assert len(server.requests) == 2
    for request in server.requests:
        kinds = [kind for kind, _ in request["parts"]]
        assert kinds == ["image", "video", "audio", "text"]
    by_audio = sorted(server.requests, key=lambda r: float(np.abs(r["parts"][2][1][0]).max()))
    for i, request in enumerate(by_audio):
        (_, reference), (_, (frames, fps)), (_, (samples, rate)), (_, text) = request["parts"]
        # the reference photo, exactly (PNG is lossless)
        want = cond["reference"][i].mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        assert np.array_equal(reference, want)
        # the video: every frame at the clip's rate (9 < max_frames), decoded close to what was sent
        assert frames.shape == (9, 16, 24, 3) and fps == pytest.approx(FPS)
        sent = videos[i].mul(255).round().permute(0, 2, 3, 1).numpy()
        distance = np.abs(frames.astype(float)[:, None] - sent[None]).mean(axis=(2, 3, 4))  # [decoded, sent]
        assert distance.argmin(axis=1).tolist() == list(range(9))  # the same frames, in order, through a lossy codec
        assert distance.diagonal().mean() < 12
        # the speech, sample for sample (16-bit PCM)
        assert rate == RATE and len(samples) == cond["audio"].shape[1]
        assert np.abs(samples - cond["audio"][i].numpy()).max() <= 1 / 32767 + 1e-6
        assert "the speech the face in the video must speak" in text
        assert "9 frames at 25 frames per second" in text
        assert "lip_sync:" in text and "5 = every syllable" in text  # the packaged rubric, with its anchors
    assert terms["judge/lip_sync"].tolist() == pytest.approx([(1 + int(0.05 / math.sqrt(2) * 10) - 1) / 4,
                                                              (1 + int(0.35 / math.sqrt(2) * 10) - 1) / 4])


def test_the_reward_changes_when_only_the_audio_changes():
    videos, cond = clips(loudness=(0.05, 0.05))
    with AVServer() as server:
        quiet = judge(server.url).score(videos, cond)["judge/lip_sync"]
        louder = {**cond, "audio": cond["audio"] * 7}
        loud = judge(server.url).score(videos, louder)["judge/lip_sync"]
        again = judge(server.url).score(videos, cond)["judge/lip_sync"]
    assert torch.equal(quiet, again)
    assert (loud > quiet).all()


def test_audio_url_and_frames_are_the_other_server_formats():
    videos, cond = clips(n=1)
    with AVServer() as server:
        judge(server.url, video_as="frames", audio_as="audio_url", fps=12.5).score(videos, cond)
    kinds = [kind for kind, _ in server.requests[0]["parts"]]
    assert kinds == ["image"] + ["image"] * 5 + ["audio", "text"]  # reference, frames 0 2 4 6 8, speech, prompt
    samples, _ = server.requests[0]["parts"][6][1]
    assert np.abs(samples - cond["audio"][0].numpy()).max() <= 1 / 32767 + 1e-6


def test_the_transcript_goes_into_the_prompt_when_asked_for():
    videos, cond = clips(n=1)
    with AVServer() as server:
        judge(server.url, inputs=["reference", "video", "audio", "text"]).score(videos, cond)
    text = server.requests[0]["parts"][-1][1]
    assert 'The speech says: "hello number 0"' in text


def test_each_modality_can_be_switched_off():
    videos, cond = clips(n=1)
    with AVServer() as server:
        judge(server.url, inputs=["video"]).score(videos, {})  # no conditions needed
        judge(server.url, inputs=["video", "audio"]).score(videos, {"audio": cond["audio"]})
    assert [k for k, _ in server.requests[0]["parts"]] == ["video", "text"]
    assert "There is no audio" in server.requests[0]["parts"][-1][1]
    assert [k for k, _ in server.requests[1]["parts"]] == ["video", "audio", "text"]


def test_missing_conditions_are_a_clear_error():
    videos, cond = clips(n=2)
    with pytest.raises(ValueError, match="hears the speech.*`audio`"):
        judge("http://127.0.0.1:9/v1").score(videos, {"reference": cond["reference"]})
    with pytest.raises(ValueError, match="reference photo"):
        judge("http://127.0.0.1:9/v1").score(videos, {"audio": cond["audio"]})
    with pytest.raises(ValueError, match="one transcript per video"):
        judge("http://127.0.0.1:9/v1", inputs=["video", "text"]).score(videos, {"text": ["only one"]})


def test_the_failure_policy_holds_for_audio_visual_requests():
    videos, cond = clips(n=2)
    script = [{"content": "no scores here"}, {"content": "still none"}, {"content": "nor here"}, {"status": 400}]
    with AVServer(script=script) as server:
        j = judge(server.url, on_failure="drop", max_concurrency=1, http_retries=0)
        terms = j.score(videos, cond)
    # video 1: two unusable answers (asked again once), video 2: an unusable answer, then a client error
    assert torch.isnan(terms["judge/lip_sync"]).all() and terms["judge_valid"].tolist() == [0.0, 0.0]
    assert j.stats["failures"] == 2 and j.stats["retries"] == 2
    retried = [r for r in server.requests]
    assert all([k for k, _ in r["parts"]] == ["image", "video", "audio", "text"] for r in retried)
    # the retry re-sends the same media
    assert retried[0]["body"]["messages"] == retried[1]["body"]["messages"]
    assert retried[1]["body"]["temperature"] > 0


def test_a_composite_reward_with_the_audio_visual_judge_gets_the_batch_conditions():
    videos, cond = clips(n=2)
    with AVServer() as server:
        composite = CompositeReward(terms=[judge(server.url)], weights={"judge/lip_sync": 1.0})
        total, terms = composite.total(videos, cond)
    assert torch.isfinite(total).all() and len(server.requests) == 2


@pytest.mark.parametrize("count,fps,cap,want", [
    (9, None, 32, list(range(9))),  # the clip's own rate
    (9, 12.5, 32, [0, 2, 4, 6, 8]),  # half the rate
    (49, None, 8, [0, 7, 14, 21, 27, 34, 41, 48]),  # capped: evenly spaced over the clip
    (9, 50.0, 32, list(range(9))),  # never above the clip's rate
])
def test_frames_at_the_judges_rate(count, fps, cap, want):
    assert frame_indices(count, FPS, fps, cap).tolist() == want


def test_prompt_files_and_rubrics_override_the_packaged_ones(tmp_path):
    template = tmp_path / "judge.txt"
    template.write_text("Custom. {media}\n{rubric}\nJSON please.")
    rubric = tmp_path / "lip.txt"
    rubric.write_text("lip_sync: 5 = perfect, 1 = none")
    videos, cond = clips(n=1)
    with AVServer() as server:
        judge(server.url, prompt_file=str(template), rubrics={"lip_sync": str(rubric)}).score(videos, cond)
    text = server.requests[0]["parts"][-1][1]
    assert text.startswith("Custom. First comes the reference photo")
    assert "lip_sync: 5 = perfect, 1 = none" in text
    assert (PROMPTS / "expressiveness.txt").read_text().strip().splitlines()[0] in text  # the packaged one


def test_bad_prompt_options_are_refused_naming_the_file(tmp_path):
    with pytest.raises(ValueError, match="no packaged rubric"):
        judge("http://127.0.0.1:9/v1", aspects=["realism"])
    huge = tmp_path / "huge.txt"
    huge.write_bytes(b"x" * (65 << 10))
    with pytest.raises(ValueError, match=f"{huge}.*larger than"):
        judge("http://127.0.0.1:9/v1", prompt_file=str(huge))
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match=f"{binary}.*not UTF-8"):
        judge("http://127.0.0.1:9/v1", prompt_file=str(binary))
    with pytest.raises(ValueError, match="cannot read"):
        judge("http://127.0.0.1:9/v1", rubrics={"lip_sync": str(tmp_path / "missing.txt")})
    with pytest.raises(ValueError, match="rubrics name aspects"):
        judge("http://127.0.0.1:9/v1", rubrics={"realism": str(binary)})
    with pytest.raises(ValueError, match="inputs must be"):
        judge("http://127.0.0.1:9/v1", inputs=["audio"])
    with pytest.raises(ValueError, match="video_as"):
        judge("http://127.0.0.1:9/v1", video_as="gif")
    with pytest.raises(ValueError, match="audio_as"):
        judge("http://127.0.0.1:9/v1", audio_as="mp3")


@pytest.mark.slow
def test_a_real_openai_compatible_server_accepts_the_audio_visual_request():
    """Against a real server (vLLM or SGLang serving an Omni model), when one is given: every request accepted (no
    HTTP error) and every video scored or judged unusable by the failure policy, never an error."""
    import os

    url, model = os.environ.get("PREFALIGN_JUDGE_SERVER_URL"), os.environ.get("PREFALIGN_JUDGE_SERVER_MODEL")
    if not url or not model:
        pytest.skip(
            "no real judge server: set PREFALIGN_JUDGE_SERVER_URL and PREFALIGN_JUDGE_SERVER_MODEL (e.g. `vllm serve "
            "Qwen/Qwen2.5-Omni-7B` on a GPU). None can start on the CPU CI machine: vLLM's PyPI wheel (0.34.0) is a "
            "CUDA build that pins torch 2.14 with torchvision, torchaudio and torchcodec (CUDA-only here), and its CPU "
            "backend is built from source only."
        )
    videos, cond = clips(n=2)
    j = judge(url, model=model, timeout=300.0, api_key_env="PREFALIGN_JUDGE_SERVER_KEY", max_retries=2)
    terms = j.score(videos, cond)
    assert j.stats["http_errors"] == 0, j.stats  # the server took the parts as sent
    assert terms["judge/lip_sync"].shape == (2,) and torch.isfinite(terms["judge/lip_sync"]).all()


@pytest.mark.parametrize("count,fps", [(18, 10.0), (8, 10.0), (10, 10.42)])
def test_a_lower_rate_never_picks_a_frame_past_the_clip(count, fps):
    index = frame_indices(count, FPS, fps, 32)
    assert index.max() <= count - 1 and index[0] == 0


def test_the_environments_proxy_never_sees_the_request(monkeypatch):
    """A proxy from the environment would receive the Authorization header: the judge connects directly."""
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # nothing listens there: a proxied request would fail
    videos, cond = clips(n=1)
    with AVServer() as server:
        j = judge(server.url, http_retries=0)
        terms = j.score(videos, cond)
    assert j.stats["http_errors"] == 0 and len(server.requests) == 1 and terms["judge_valid"].item() == 1.0
