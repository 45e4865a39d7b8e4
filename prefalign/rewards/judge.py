"""Multimodal-LLM judges as rewards (FlowPortrait): an audio-visual (or vision-language) model rates each generated
video for lip sync, expressiveness and motion quality, in process (``MLLMJudge``) or over an OpenAI-compatible
endpoint (``OpenAIJudge``, e.g. Qwen2.5-Omni served by vLLM or SGLang).

The judge receives what a person would (``inputs``): the video as a video, at ``fps`` frames per second (the clip's
own rate by default, at most ``max_frames`` frames), the driving speech it must match, the reference photo of the
person, and optionally the transcript (the manifest's ``text``). ``inputs: [video]`` with ``num_frames: 8`` is the
image-only judge of evenly spaced stills. The prompt is a template file (``prompts/judge.txt``) with a rubric file
per aspect (``prompts/<aspect>.txt``: 1-5 with an anchor for each level), each overridable by a path.

Both share the prompt, the parser and the failure policy:

- A judge answers with a JSON object of integer scores on a 1-5 scale, one per aspect. ``parse_scores`` takes the
  first JSON object in the answer (code fences and prose around it are fine) and rejects a missing aspect, a value
  that is not a number or one outside the scale.
- An unusable answer is asked again up to ``max_retries`` times (the retries sample at ``retry_temperature``: a
  greedy judge would repeat itself). A video with no usable answer after that is scored per ``on_failure``:
  ``"neutral"`` gives the middle of the scale (3) for every aspect, ``"drop"`` gives NaN for every aspect so that
  the trainer drops the sample from its group.
- A score ``s`` is returned as ``(s - 1) / 4``, in [0, 1], under ``{prefix}{aspect}`` (``judge/lip_sync`` ...),
  plus a ``{prefix stripped of '/' and '_'}_valid`` term (``judge_valid``): 1.0 where the judge answered, 0.0 where
  the policy scored the video. It is a mask, not a reward: ``total()`` leaves it out, and a consumer that sums
  terms itself must too. NaN aspects mean "dropped"; with ``on_failure="neutral"`` no NaN is ever returned.
  ``drop_terms`` names the masks whose 0 drops a sample (``judge_valid`` under ``"drop"`` only): a
  ``CompositeReward`` keeps a video scored neutral, with 3 for every aspect.
- ``stats`` counts ``requests`` (judge calls made), ``retries`` (calls repeated after an unusable answer) and
  ``failures`` (videos scored by the policy), cumulatively, for the trainer to log; ``reset_stats()`` zeroes them.
"""

from __future__ import annotations

import base64
import concurrent.futures
import functools
import http.client
import io
import json
import math
import os
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from prefalign.rewards.base import Reward
from prefalign.secrets import get_logger, redact, watch_env

log = get_logger(__name__)

ASPECTS = ("lip_sync", "expressiveness", "motion_quality")
LOW, HIGH = 1, 5
TORCH_DTYPES = ("auto", "bfloat16", "float16", "float32")
#: The default cap on a judge endpoint's answer: a chat-completions answer of a few scores is about 1 KiB (with
#: ``max_tokens`` 64); 1 MiB leaves room for logprobs and verbose servers, and bounds a server that never stops.
MAX_ANSWER_BYTES = 1 << 20

DEFAULT_PROMPT = (
    "These images are {num_frames} frames sampled in order from a generated talking-head video. Rate the video on "
    "each aspect with an integer from 1 (very poor) to 5 (excellent):\n"
    "- lip_sync: the mouth shapes and their timing match natural speech;\n"
    "- expressiveness: the face and head show lively, natural expressions;\n"
    "- motion_quality: the motion is smooth and plausible, without jitter, warping or frozen frames.\n"
    'Answer with strict JSON only, nothing else, e.g. {"lip_sync": 4, "expressiveness": 3, "motion_quality": 5}'
)


def parse_scores(text: object, aspects: Sequence[str], low: float = LOW, high: float = HIGH) -> dict[str, float] | None:
    """The scores of the first JSON object in a judge's answer, or ``None`` if it is unusable; never raises.

    Args:
        text (str): the answer; code fences and prose around the object are fine.
        aspects (Sequence[str]): keys that must all be present (other keys are ignored).
        low (float): lowest valid score.
        high (float): highest valid score.

    Returns:
        ``{aspect: score}`` with every score a finite number in ``[low, high]`` (ints, floats or numeric strings
        such as ``"4"``), or ``None`` when there is no JSON object, an aspect is missing, or a value is not a number
        (booleans included) or out of range.
    """
    if not isinstance(text, str):
        return None
    obj = _first_json_object(text[:20000])
    if obj is None:
        return None
    scores = {}
    for aspect in aspects:
        value = _number(obj.get(aspect))
        if value is None or not low <= value <= high:
            return None
        scores[aspect] = value
    return scores


def _first_json_object(text: str) -> dict | None:
    decoder = json.JSONDecoder()
    start = text.find("{")
    while start != -1:
        try:
            obj, _ = decoder.raw_decode(text, start)
        except RecursionError:
            # Nested deeper than Python's recursion limit: so is every "{" inside, no need to try each (quadratic).
            return None
        except ValueError:
            obj = None
        if isinstance(obj, dict):
            return obj
        start = text.find("{", start + 1)
    return None


def _number(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        if isinstance(value, (int, float)):
            number = float(value)
        elif isinstance(value, str):
            number = float(value.strip())
        else:
            return None
    except (ValueError, OverflowError):  # not a number, or an integer too big for a float (10**400)
        return None
    return number if math.isfinite(number) else None


def _check_int(name: str, value: object, low: int, allowed: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be {allowed}; got {value!r}")


def _check_number(name: str, value: object, allowed: str, low: float = 0.0, strict: bool = False) -> None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not number or value < low or (strict and value == low):
        raise ValueError(f"{name} must be {allowed}; got {value!r}")


#: What a judge can be given, in the order the request shows them: the reference photo, the video, the speech, the
#: transcript (in the prompt's text).
INPUTS = ("reference", "video", "audio", "text")
#: x264's rate factor for the videos sent to a judge (18: visually lossless for most viewers).
JUDGE_VIDEO_CRF = 18
#: The packaged prompt template and rubrics.
PROMPTS = Path(__file__).with_name("prompts")
#: The largest prompt or rubric file read (a prompt is a few KiB; the bound keeps a wrong path from filling memory).
MAX_PROMPT_BYTES = 64 << 10


@dataclass
class JudgeSample:
    """What one video's judge request holds: ``frames`` ``[n, H, W, 3]`` uint8 at ``fps``, the driving speech
    (float32 ``[S]`` at ``sample_rate``), the reference photo ``[H, W, 3]`` uint8 and the transcript; each ``None``
    where the judge's ``inputs`` leave it out."""

    frames: np.ndarray
    fps: float
    audio: np.ndarray | None = None
    sample_rate: int = 16000
    reference: np.ndarray | None = None
    text: str | None = None


def read_prompt_file(path: str | Path, what: str) -> str:
    """A prompt or rubric file's text (UTF-8, at most ``MAX_PROMPT_BYTES``), with a clear error naming it."""
    path = Path(path).expanduser()
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_PROMPT_BYTES + 1)
    except OSError as err:
        raise ValueError(f"{what} {path}: cannot read it ({err.strerror or err})") from None
    if len(data) > MAX_PROMPT_BYTES:
        raise ValueError(f"{what} {path}: larger than {MAX_PROMPT_BYTES} bytes, not a prompt")
    try:
        return data.decode("utf-8").strip("\n")
    except UnicodeDecodeError:
        raise ValueError(f"{what} {path}: not UTF-8 text") from None


def frame_indices(count: int, video_fps: float, fps: float | None, max_frames: int) -> np.ndarray:
    """Which of ``count`` frames at ``video_fps`` a judge sees at ``fps`` (``None``: every frame), at most
    ``max_frames`` of them (evenly spaced over the clip when the rate would give more)."""
    step = 1.0 if fps is None or fps >= video_fps else video_fps / fps
    index = np.unique(np.minimum(np.round(np.arange(0.0, count - 1e-9, step)), count - 1).astype(int))
    if len(index) > max_frames:
        index = np.unique(np.round(np.linspace(0, count - 1, max_frames)).astype(int))
    return index


def sample_frames(videos: torch.Tensor, num_frames: int) -> np.ndarray:
    """``num_frames`` evenly spaced frames of each video (first and last included), as uint8 images.

    Args:
        videos (Tensor): ``[B, T, 3, H, W]`` floats in [0, 1] (values outside are clipped).
        num_frames (int): frames per video; a video with fewer frames gives all of them.

    Returns:
        ``[B, min(num_frames, T), H, W, 3]`` uint8 array.
    """
    count = videos.shape[1] if videos.dim() > 1 else 1  # frames_at checks the shape
    return frames_at(videos, torch.linspace(0, count - 1, min(num_frames, count)).round().long())


def frames_at(videos: torch.Tensor, index) -> np.ndarray:
    """Frames ``index`` of each (checked) video ``[B, T, 3, H, W]`` as uint8 images ``[B, n, H, W, 3]``."""
    if videos.dim() != 5 or videos.shape[2] != 3:
        raise ValueError(f"videos must be [batch, frames, 3, height, width]; got shape {tuple(videos.shape)}")
    if not torch.isfinite(videos).all():
        raise ValueError("videos hold NaN or infinite values; a judge cannot rate them")
    frames = videos.index_select(1, torch.as_tensor(index, device=videos.device)).detach().float()
    return frames.clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 1, 3, 4, 2).cpu().numpy()


class _Judge(Reward):
    """What both judges share: what the judge is given, the prompt, the parser, the failure policy and the counts.

    Args (both judges):
        inputs (Sequence[str]): what each request holds, of ``reference``, ``video``, ``audio``, ``text`` (the
            transcript); ``video`` is always needed. The conditions must carry what is asked for (``audio``
            ``[B, S]`` at ``sample_rate``, ``reference`` ``[B, 3, H, W]``, ``text`` a list of strings).
        fps (float | None): video frames per second shown; ``None``: the clip's own rate (``video_fps``).
        video_fps (float): the clips' frame rate (the data's ``fps``).
        max_frames (int): at most this many frames per video (evenly spaced over the clip when ``fps`` would give
            more).
        num_frames (int | None): instead of ``fps``: exactly this many evenly spaced stills (the image-only judge).
        sample_rate (int): the conditions' audio rate (the data's ``sample_rate``).
        prompt (str | None): the whole instruction as a string (``{num_frames}`` and ``{fps}`` are filled in);
            overrides ``prompt_file`` and the rubrics.
        prompt_file (str | None): the instruction template: ``{media}`` (what the request holds, said by the
            judge), ``{rubric}`` (the aspects' rubrics), ``{transcript}``, ``{num_frames}``, ``{fps}`` are filled in;
            default ``prompts/judge.txt``.
        rubrics (dict | None): ``{aspect: path}`` of rubric files replacing the packaged ones (``prompts/<aspect>.txt``,
            which exist for the three default aspects).
    """

    def __init__(
        self,
        aspects: Sequence[str],
        prompt: str | None,
        num_frames: int | None,
        max_retries: int,
        retry_temperature: float,
        on_failure: Literal["neutral", "drop"],
        prefix: str,
        inputs: Sequence[str] = ("reference", "video", "audio"),
        fps: float | None = None,
        video_fps: float = 25.0,
        max_frames: int = 32,
        sample_rate: int = 16000,
        prompt_file: str | None = None,
        rubrics: dict | None = None,
    ):
        if on_failure not in ("neutral", "drop"):
            raise ValueError(f"on_failure must be 'neutral' or 'drop'; got {on_failure!r}")
        if num_frames is not None:
            _check_int("num_frames", num_frames, 1, "None (frames at `fps`) or an integer of at least 1")
        _check_int("max_frames", max_frames, 1, "an integer of at least 1")
        _check_int("max_retries", max_retries, 0, "an integer of at least 0")
        _check_int("sample_rate", sample_rate, 1, "an integer number of samples per second of at least 1")
        _check_number("retry_temperature", retry_temperature, "a finite number of at least 0")
        _check_number("video_fps", video_fps, "a positive finite number of frames per second", strict=True)
        if fps is not None:
            _check_number("fps", fps, "None (the clip's rate) or a positive finite number", strict=True)
        if isinstance(inputs, str) or not all(isinstance(item, str) for item in inputs or ()):
            raise ValueError(f"inputs must be a list of {list(INPUTS)}; got {inputs!r}")
        unknown = sorted(set(inputs) - set(INPUTS))
        if unknown or "video" not in inputs or len(set(inputs)) != len(inputs):
            raise ValueError(f"inputs must be distinct items of {list(INPUTS)}, `video` among them; got {list(inputs)}")
        if isinstance(aspects, str) or not aspects:
            raise ValueError(f"aspects must be a non-empty list of names; got {aspects!r}")
        if not all(isinstance(aspect, str) and aspect for aspect in aspects) or len(set(aspects)) != len(aspects):
            raise ValueError(f"aspects must be distinct non-empty names; got {list(aspects)!r}")
        if not isinstance(prefix, str):
            raise ValueError(f"prefix must be a string, e.g. 'judge/'; got {prefix!r}")
        if rubrics is not None and not isinstance(rubrics, dict):
            raise ValueError(f"rubrics must map aspects to rubric files; got {type(rubrics).__name__}")
        self.aspects = list(aspects)
        self.inputs = [item for item in INPUTS if item in inputs]  # the request's order
        if prompt is None and prompt_file is None and num_frames is not None and not rubrics:
            # The image-only judge of stills, as it was: its one-paragraph prompt.
            if tuple(aspects) != ASPECTS:
                raise ValueError(f"the default prompt asks for {list(ASPECTS)}; give a `prompt` for aspects "
                                 f"{list(aspects)}")
            prompt = DEFAULT_PROMPT
        self.prompt = prompt
        self.template = None
        self.rubric: dict[str, str] = {}
        if prompt is None:
            self.template = read_prompt_file(prompt_file or PROMPTS / "judge.txt", "prompt_file")
            given = dict(rubrics or {})
            if sorted(set(given) - set(aspects)):
                raise ValueError(f"rubrics name aspects {sorted(set(given) - set(aspects))} the judge is not asked "
                                 f"for ({self.aspects})")
            missing = [a for a in aspects if a not in given and not (PROMPTS / f"{a}.txt").is_file()]
            if missing and "{rubric}" in self.template:
                raise ValueError(f"aspects {missing} have no packaged rubric: give `rubrics: {{aspect: path}}`, a "
                                 "`prompt_file` without {rubric}, or a `prompt`")
            for aspect in aspects:
                if aspect in given or aspect not in missing:
                    self.rubric[aspect] = read_prompt_file(given.get(aspect, PROMPTS / f"{aspect}.txt"), "rubric")
        self.num_frames = num_frames
        self.fps = fps
        self.video_fps = video_fps
        self.max_frames = max_frames
        self.sample_rate = sample_rate
        self.max_retries = max_retries
        self.retry_temperature = retry_temperature
        self.on_failure = on_failure
        self.prefix = prefix
        self.valid_term = f"{prefix.rstrip('/_')}_valid"
        self.stats = {"requests": 0, "retries": 0, "failures": 0}
        self._lock = threading.Lock()

    @property
    def aspect_terms(self) -> list[str]:
        """The names of the score terms, ``{prefix}{aspect}``."""
        return [f"{self.prefix}{aspect}" for aspect in self.aspects]

    @property
    def mask_terms(self) -> list[str]:
        """The names of the terms that are masks, not rewards (``judge_valid``): never to be weighted or summed."""
        return [self.valid_term]

    @property
    def drop_terms(self) -> list[str]:
        """The mask terms whose 0 drops a sample: ``judge_valid`` under ``on_failure="drop"``, none under
        ``"neutral"`` (a video scored neutral is kept, with 3 for every aspect)."""
        return [self.valid_term] if self.on_failure == "drop" else []

    def reset_stats(self) -> None:
        with self._lock:
            for key in self.stats:
                self.stats[key] = 0

    def _count(self, **counts: int) -> None:
        with self._lock:
            for key, value in counts.items():
                self.stats[key] = self.stats.get(key, 0) + value

    # --- what a request holds --------------------------------------------------------------------------------------
    def samples(self, videos: torch.Tensor, cond: dict) -> list[JudgeSample]:
        """Each video's request content: its frames at the judge's rate and what ``inputs`` asks of ``cond``."""
        if self.num_frames is not None:
            frames = sample_frames(videos, self.num_frames)
            duration = videos.shape[1] / self.video_fps
            fps = frames.shape[1] / duration
        else:
            index = frame_indices(videos.shape[1], self.video_fps, self.fps, self.max_frames)
            frames = frames_at(videos, index)
            fps = self.video_fps if len(index) < 2 else self.video_fps / float(np.mean(np.diff(index)))
        b = videos.shape[0]
        audio = reference = text = None
        if "audio" in self.inputs:
            audio = cond.get("audio")
            if audio is None or not torch.is_tensor(audio) or audio.dim() != 2 or audio.shape[0] != b:
                raise ValueError(f"this judge hears the speech (inputs {self.inputs}): the conditions need `audio` "
                                 f"[{b}, samples]; got {None if audio is None else tuple(getattr(audio, 'shape', ()))}")
            need = round(videos.shape[1] / self.video_fps * self.sample_rate)  # the clip's span of the speech
            audio = audio[:, :need].detach().float().clamp(-1, 1).cpu().numpy()
        if "reference" in self.inputs:
            reference = cond.get("reference")
            if reference is None or not torch.is_tensor(reference) or reference.dim() != 4 or reference.shape[0] != b:
                raise ValueError(f"this judge sees the reference photo (inputs {self.inputs}): the conditions need "
                                 f"`reference` [{b}, 3, H, W]")
            reference = reference.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1)
            reference = reference.cpu().numpy()
        if "text" in self.inputs:
            text = cond.get("text")
            if isinstance(text, str):
                text = [text] * b
            if text is not None and (not isinstance(text, (list, tuple)) or len(text) != b):
                raise ValueError(f"the conditions' `text` must be one transcript per video ({b}); got {type(text).__name__}")
        return [
            JudgeSample(
                frames=frames[i],
                fps=fps,
                audio=None if audio is None else audio[i],
                sample_rate=self.sample_rate,
                reference=None if reference is None else reference[i],
                text=None if text is None or text[i] is None else str(text[i]),
            )
            for i in range(b)
        ]

    def describe(self, sample: JudgeSample) -> str:
        """What the request holds, in the order it holds it, for the prompt's ``{media}``."""
        parts = []
        if sample.reference is not None:
            parts.append("First comes the reference photo of the person: the video animates this person.")
        seconds = len(sample.frames) / sample.fps
        parts.append(f"Then the generated video: {len(sample.frames)} frames at {sample.fps:g} frames per second "
                     f"({seconds:.1f} s).")
        if sample.audio is not None:
            parts.append("Then the audio: the speech the face in the video must speak, in sync with its mouth. Judge "
                         "lip sync against this speech.")
        else:
            parts.append("There is no audio: judge lip sync by whether the mouth moves like natural speech.")
        return "\n".join(parts)

    def _text(self, sample: JudgeSample) -> str:
        """The instruction for one request. Plain replaces, not str.format: the template's JSON braces need no
        escaping."""
        fills = {"{num_frames}": str(len(sample.frames)), "{fps}": f"{sample.fps:g}"}
        if self.prompt is not None:
            text = self.prompt
        else:
            transcript = f'The speech says: "{sample.text}"\n' if sample.text else ""
            fills.update({"{media}": self.describe(sample), "{transcript}": transcript,
                          "{rubric}": "\n".join(self.rubric[a] for a in self.aspects if a in self.rubric)})
            text = self.template
        for key, value in fills.items():
            text = text.replace(key, value)
        return text

    def __getstate__(self) -> dict:
        return {key: value for key, value in self.__dict__.items() if key != "_lock"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _judge(self, samples: list[JudgeSample]) -> tuple[list[dict[str, float] | None], list[str]]:
        """Scores per video (``None`` where the judge gave no usable answer) and the reasons of the failures."""
        raise NotImplementedError

    def score(self, videos: torch.Tensor, cond: dict) -> dict[str, torch.Tensor]:
        samples = self.samples(videos, cond)
        before = dict(self.stats)
        results, reasons = self._judge(samples)
        after = dict(self.stats)
        delta = {key: after[key] - before.get(key, 0) for key in after}
        counts = ", ".join(f"{key} {value}" for key, value in delta.items())
        log.info("%s: %d videos, %s", type(self).__name__, len(results), counts)
        if reasons:
            log.warning(
                "%s: no usable answer for %d of %d videos after up to %d retries; %s (last reason: %s)",
                type(self).__name__, len(reasons), len(results), self.max_retries,
                "scored neutral" if self.on_failure == "neutral" else "dropped (NaN)", reasons[-1],
            )
        fallback = (LOW + HIGH) / 2 if self.on_failure == "neutral" else math.nan
        terms = {}
        for aspect, name in zip(self.aspects, self.aspect_terms):
            values = [fallback if r is None else r[aspect] for r in results]
            terms[name] = (torch.tensor(values, dtype=torch.float32) - LOW) / (HIGH - LOW)
        terms[self.valid_term] = torch.tensor([float(r is not None) for r in results])
        return {name: value.to(videos.device) for name, value in terms.items()}

    def total(self, videos: torch.Tensor, cond: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The sum of the aspect terms (not the validity mask), NaN for a dropped video, and all terms."""
        terms = self.score(videos, cond)
        return sum(terms[name] for name in self.aspect_terms), terms


class _MinimalProcessor:
    """What the processor of a Qwen judge does for its requests (images, videos, audio), built from the model's
    tokenizer, its PIL image processor and its Whisper feature extractor.

    transformers 5.x cannot build a Qwen2-VL-family or Qwen-Omni processor without torchvision, even for images
    only: it always loads the torchvision-only video processor (huggingface/transformers#48558). The tokenizer, the
    PIL image processor and ``WhisperFeatureExtractor`` need no torchvision, so this does the processor's part, as
    transformers 5.23's ``Qwen2_5_VLProcessor``, ``Qwen2_5OmniProcessor`` and ``Qwen3OmniMoeProcessor`` do it
    (Qwen3-VL: images only, its processor writes a timestamp per temporal patch of a video, which this does not):

    - images: the image processor's patches, each image placeholder repeated once per merged patch (t·h·w / merge²);
    - videos: each frame resized and normalised by the image processor at the video size of the model's processor
      class (its ``videos_kwargs["size"]``: 128 to 768 merged patches a frame for Qwen-Omni; the image processor's
      own size for Qwen2.5-VL), consecutive frames paired into temporal patches laid out as Qwen2-VL's video
      processor lays them out (a patch is ``[C, temporal_patch_size, P, P]`` flattened; patches in order of time,
      merge window, place in the window; an odd last frame repeated), the placeholder repeated t·h·w / merge² times,
      and the seconds per temporal patch, ``temporal_patch_size / fps``, that the time-aligned rotary positions
      need (``video_second_per_grid``; ``second_per_grid_ts`` for Qwen2.5-VL);
    - audio (Omni): Whisper log-mel ``input_features`` with their ``feature_attention_mask`` (padded to the
      extractor's ``n_samples`` for Qwen2.5-Omni, to the longest clip for Qwen3-Omni), the placeholder repeated once
      per token the audio tower makes of that many feature frames (``audio_tokens``);
    - ``mm_token_type_ids`` for the VL models (1 on image tokens, 2 on video tokens: their 3D rotary positions come
      from it; the Omni thinkers find their placeholders themselves).

    Args:
        tokenizer: the model's tokenizer; placeholder tokens it names (``image_token``, ``audio_bos_token`` ...)
            are used, the family's defaults otherwise.
        image_processor: the model's PIL image processor (``Qwen2VLImageProcessorPil``).
        feature_extractor: the model's audio feature extractor (``WhisperFeatureExtractor``), for a model that hears.
        model_type (str): the model config's ``model_type``; unknown types are treated as a VL model without videos.
    """

    VL_TOKENS = {"vision_bos_token": "<|vision_start|>", "image_token": "<|image_pad|>",
                 "video_token": "<|video_pad|>", "vision_eos_token": "<|vision_end|>"}  # fmt: skip
    #: Per model type: its processor class (the video size is read from it), its placeholder tokens (where the
    #: tokenizer does not name them), the key of the seconds per temporal patch (``None``: no videos) and whether
    #: the model takes ``mm_token_type_ids``.
    FAMILIES = {
        "qwen2_5_vl": ("Qwen2_5_VLProcessor", VL_TOKENS, "second_per_grid_ts", True),
        "qwen3_vl": ("Qwen3VLProcessor", VL_TOKENS, None, True),
        "qwen3_vl_moe": ("Qwen3VLProcessor", VL_TOKENS, None, True),
        "qwen2_5_omni_thinker": (
            "Qwen2_5OmniProcessor",
            {"vision_bos_token": "<|vision_bos|>", "image_token": "<|IMAGE|>", "video_token": "<|VIDEO|>",
             "vision_eos_token": "<|vision_eos|>", "audio_bos_token": "<|audio_bos|>", "audio_token": "<|AUDIO|>",
             "audio_eos_token": "<|audio_eos|>"},
            "video_second_per_grid",
            False,
        ),
        "qwen3_omni_moe_thinker": (
            "Qwen3OmniMoeProcessor",
            {**VL_TOKENS, "audio_bos_token": "<|audio_start|>", "audio_token": "<|audio_pad|>",
             "audio_eos_token": "<|audio_end|>"},
            "video_second_per_grid",
            False,
        ),
    }  # fmt: skip

    def __init__(self, tokenizer, image_processor, feature_extractor=None, model_type: str = "qwen2_5_vl"):
        import transformers

        processor_class, tokens, self.seconds_key, self.type_ids = self.FAMILIES.get(
            model_type, (None, self.VL_TOKENS, None, True)
        )
        self.model_type = model_type
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.feature_extractor = feature_extractor
        self.chat_template = tokenizer.chat_template
        for name, default in tokens.items():
            setattr(self, name, getattr(tokenizer, name, None) or default)
        for name in ("image", "video", "audio"):
            token = getattr(self, f"{name}_token", None)
            setattr(self, f"{name}_token_id", None if token is None else tokenizer.convert_tokens_to_ids(token))
        size = getattr(getattr(transformers, processor_class or "", None), "videos_kwargs", {}).get("size")
        size = size or image_processor.size
        self.video_size = {"shortest_edge": size["shortest_edge"], "longest_edge": size["longest_edge"]}

    def apply_chat_template(self, messages, **kwargs):
        return self.tokenizer.apply_chat_template(messages, **kwargs)

    def batch_decode(self, ids, **kwargs):
        return self.tokenizer.batch_decode(ids, **kwargs)

    def audio_tokens(self, frames: int) -> int:
        """The tokens the audio tower makes of ``frames`` feature frames (10 ms each), as the processor counts them:
        Qwen2.5-Omni halves them twice (a stride-2 convolution, then pooling); Qwen3-Omni makes 13 of each full
        window of 100 frames and reduces the rest three times by 2."""
        if self.model_type.startswith("qwen3_omni"):
            window = 100  # 2 * n_window, Qwen3OmniMoeProcessor's n_window of 50
            rest = (frames % window - 1) // 2 + 1
            return ((rest - 1) // 2 + 1 - 1) // 2 + 1 + frames // window * 13
        return ((frames - 1) // 2 + 1 - 2) // 2 + 1

    def video(self, frames: np.ndarray) -> tuple[torch.Tensor, list[int]]:
        """One video's patches ``[t·h·w, C·temporal_patch_size·P·P]`` and grid ``[t, h, w]``, as Qwen2-VL's video
        processor makes them, from frames ``[n, H, W, 3]`` uint8."""
        features = self.image_processor(images=list(frames), size=self.video_size, return_tensors="pt")
        _, h, w = features["image_grid_thw"][0].tolist()
        pair, patch = self.image_processor.temporal_patch_size, self.image_processor.patch_size
        # An image's patch holds its frame `pair` times over (the temporal axis): one copy is the frame.
        stills = features["pixel_values"].view(len(frames), h * w, -1, pair, patch, patch)[:, :, :, 0]
        if pad := -len(frames) % pair:
            stills = torch.cat([stills, stills[-1:].expand(pad, *stills.shape[1:])])
        t = len(stills) // pair
        patches = stills.reshape(t, pair, h * w, -1, patch, patch).permute(0, 2, 3, 1, 4, 5)
        return patches.reshape(t * h * w, -1), [t, h, w]

    def __call__(self, text: list[str], images: list | None = None, videos: list[np.ndarray] | None = None,
                 audio: list[np.ndarray] | None = None, fps: float | None = None, **kwargs) -> dict:  # fmt: skip
        """The model's inputs (tensors, left padded: a real processor's ``padding``, ``return_tensors`` and other
        ``kwargs`` are taken and ignored) for ``text`` (one prompt per request, each placeholder once) and the media
        in the order their placeholders come; ``fps``: the videos' frame rate."""
        merge = self.image_processor.merge_size**2
        features, counts = {}, {}
        if images:
            encoded = self.image_processor(images=images, return_tensors="pt")
            features.update(pixel_values=encoded["pixel_values"], image_grid_thw=encoded["image_grid_thw"])
            counts[self.image_token] = (encoded["image_grid_thw"].prod(-1) // merge).tolist()
        if videos:
            if self.seconds_key is None:
                raise ValueError(f"videos of a {self.model_type!r} model need its own processor (torchvision)")
            if fps is None:
                raise ValueError("videos need their frame rate, `fps`")
            patches, grids = zip(*(self.video(frames) for frames in videos))
            features.update(pixel_values_videos=torch.cat(patches), video_grid_thw=torch.tensor(grids))
            pair = self.image_processor.temporal_patch_size
            features[self.seconds_key] = torch.tensor([pair / fps] * len(videos))
            counts[self.video_token] = [t * h * w // merge for t, h, w in grids]
        if audio:
            if self.feature_extractor is None or self.audio_token is None:
                raise ValueError(f"a {self.model_type} model takes no audio")
            extractor = self.feature_extractor
            # Qwen2.5-Omni's processor pads every clip to the extractor's length, Qwen3-Omni's to the longest.
            padding = {"padding": True, "truncation": False} if self.model_type.startswith("qwen3_omni") else \
                {"padding": "max_length"}  # fmt: skip
            encoded = extractor(audio, sampling_rate=extractor.sampling_rate, return_attention_mask=True,
                                return_tensors="pt", **padding)  # fmt: skip
            mask = encoded["attention_mask"]
            features.update(input_features=encoded["input_features"], feature_attention_mask=mask)
            counts[self.audio_token] = [self.audio_tokens(frames) for frames in mask.sum(-1).tolist()]
        text = self._expand(text, counts)
        # Left padded, as the Omni processors pad and as generation needs.
        inputs = dict(self.tokenizer(text, padding=True, padding_side="left", return_tensors="pt"))
        if self.type_ids:
            ids = inputs["input_ids"]
            inputs["mm_token_type_ids"] = (ids == self.image_token_id).long() + 2 * (ids == self.video_token_id).long()
        return {**inputs, **features}

    @staticmethod
    def _expand(text: list[str], counts: dict[str, list[int]]) -> list[str]:
        """Each placeholder repeated as many times as its input gives tokens, inputs taken in order over the batch."""
        if not counts:
            return list(text)
        left = {token: iter(numbers) for token, numbers in counts.items()}

        def repeat(match: re.Match) -> str:
            number = next(left[match.group(0)], None)
            if number is None:
                raise ValueError(f"the prompts hold more {match.group(0)} placeholders than inputs")
            return match.group(0) * number

        pattern = re.compile("|".join(re.escape(token) for token in counts))
        expanded = [pattern.sub(repeat, sample) for sample in text]
        unused = [token for token, numbers in left.items() if next(numbers, None) is not None]
        if unused:
            raise ValueError(f"more inputs than {unused} placeholders in the prompts")
        return expanded


class MLLMJudge(_Judge):
    """An in-process multimodal judge (FlowPortrait's MLLM reward): an Omni thinker that sees the video and hears the
    speech (Qwen2.5-Omni, Qwen3-Omni), or a vision-language model (Qwen2.5-VL by default, Qwen3-VL).

    Each video's request is one user message holding, as ``inputs`` asks, the reference photo (an image), the video
    (a video input of its frames at the judge's ``fps``: the vision tower takes consecutive frames in pairs and the
    rotary positions follow their time; or ``num_frames`` stills, an image each), the speech (the thinker's audio
    features), then the prompt, through the chat template (the processor's, else the tokenizer's, else the Qwen
    layout). The model's processor prepares it where it loads; where it cannot (transformers 5 builds no Qwen
    processor without torchvision), ``_MinimalProcessor`` does the same from the tokenizer, the image processor and
    the Whisper feature extractor. Videos are batched (left padded) and decoded greedily, retries sample at
    ``retry_temperature``. The model runs in eval mode without gradients, on the videos' device. It is no
    ``nn.Module`` attribute of the trainer, so it is neither trained nor saved in checkpoints. Of an Omni model only
    the thinker is loaded: the judge answers in text, the talker that speaks is not needed.

    Args:
        pretrained (str | None): Hub id or folder of the judge (model and processor), e.g.
            ``Qwen/Qwen2.5-Omni-7B`` (with ``model_class: Qwen2_5OmniThinkerForConditionalGeneration``) or
            ``Qwen/Qwen2.5-VL-7B-Instruct``.
        config (dict | None): config arguments of ``model_class`` to build a random judge (tests); needs
            ``processor``.
        processor (str | None): Hub id or folder of the processor, when not that of ``pretrained``.
        model_class (str): the transformers class: ``Qwen2_5OmniThinkerForConditionalGeneration`` or
            ``Qwen3OmniMoeThinkerForConditionalGeneration`` (they hear: an audio tower), or a vision-language
            model, ``Qwen2_5_VLForConditionalGeneration``, ``Qwen3VLForConditionalGeneration``,
            ``AutoModelForImageTextToText``.
        torch_dtype (str): weights' dtype: ``auto`` (the checkpoint's; float32 for ``config``), ``bfloat16``,
            ``float16``, ``float32``.
        attn_implementation (str | None): ``sdpa``, ``flash_attention_2`` ...; ``None`` lets transformers choose.
        max_new_tokens (int): longest answer generated.
        batch_size (int | None): videos per ``generate`` call; ``None`` puts all of a ``score`` call in one.
        aspects (Sequence[str]): keys the judge must answer (the default prompts ask for the three defaults).
        prompt (str | None): the whole instruction after the media; ``{num_frames}`` and ``{fps}`` are filled in.
        num_frames (int | None | str): ``auto``: 8 evenly spaced stills for a model that does not hear, the video
            at ``fps`` for one that does; an integer: that many stills, an image each; ``None``: the video at
            ``fps``, as a video.
        max_retries (int): times an unusable answer is asked again.
        retry_temperature (float): sampling temperature of the retries (0: greedy again).
        on_failure (str): ``neutral`` (score 3 for every aspect) or ``drop`` (NaN, for GRPO to drop the sample).
        prefix (str): prefix of the term names.
        inputs (Sequence[str] | None): what each request holds, of ``reference``, ``video``, ``audio``, ``text``;
            ``None``: what the model takes, ``[reference, video, audio]`` for a model that hears, ``[video]`` for a
            vision-language model. ``audio`` for a model without an audio tower is an error.
        fps, video_fps, max_frames, sample_rate, prompt_file, rubrics: what the judge is given and asked (see the
            module's docstring); the speech is resampled to the feature extractor's rate where ``sample_rate``
            differs.
    """

    def __init__(
        self,
        pretrained: str | None = None,
        config: dict | None = None,
        processor: str | None = None,
        model_class: str = "Qwen2_5_VLForConditionalGeneration",
        torch_dtype: str = "auto",
        attn_implementation: str | None = None,
        max_new_tokens: int = 64,
        batch_size: int | None = None,
        aspects: Sequence[str] = ASPECTS,
        prompt: str | None = None,
        num_frames: int | Literal["auto"] | None = "auto",
        max_retries: int = 2,
        retry_temperature: float = 0.7,
        on_failure: Literal["neutral", "drop"] = "neutral",
        prefix: str = "judge/",
        inputs: Sequence[str] | None = None,
        fps: float | None = None,
        video_fps: float = 25.0,
        max_frames: int = 32,
        sample_rate: int = 16000,
        prompt_file: str | None = None,
        rubrics: dict | None = None,
    ):
        _check_int("max_new_tokens", max_new_tokens, 1, "an integer of at least 1")
        if batch_size is not None:
            _check_int("batch_size", batch_size, 1, "None (all videos of a call at once) or an integer of at least 1")
        if torch_dtype not in TORCH_DTYPES:
            raise ValueError(f"torch_dtype must be one of {list(TORCH_DTYPES)}; got {torch_dtype!r}")
        import transformers
        from packaging.version import Version

        if (pretrained is None) == (config is None):
            raise ValueError("MLLMJudge needs exactly one of `pretrained` (a Hub id or folder) or `config`")
        if config is not None and processor is None:
            raise ValueError("MLLMJudge built from a `config` needs a `processor` (a Hub id or folder)")
        cls = getattr(transformers, model_class, None) if isinstance(model_class, str) else None
        if cls is None:
            raise ValueError(f"transformers has no model class {model_class!r}")
        cls = _concrete_class(cls, pretrained)
        if config is not None and not hasattr(cls, "config_class"):
            raise ValueError(f"a judge built from a `config` needs a model class of its own, not {model_class}")
        model_type = getattr(getattr(cls, "config_class", None), "model_type", "")
        if model_type in ("qwen2_5_omni", "qwen3_omni_moe"):
            raise ValueError(f"{model_class} speaks as well: load its thinker, which answers in text ("
                             f"{'Qwen2_5Omni' if model_type == 'qwen2_5_omni' else 'Qwen3OmniMoe'}"
                             "ThinkerForConditionalGeneration)")  # fmt: skip
        hears = hasattr(cls, "get_audio_features")
        if inputs is None:
            inputs = ("reference", "video", "audio") if hears else ("video",)
        if num_frames == "auto":
            num_frames = None if hears else 8
        super().__init__(aspects, prompt, num_frames, max_retries, retry_temperature, on_failure, prefix, inputs, fps,
                         video_fps, max_frames, sample_rate, prompt_file, rubrics)
        if "audio" in self.inputs and not hears:
            raise ValueError(f"{model_class} has no audio tower, but inputs {self.inputs} ask the judge to hear the "
                             "speech: leave `audio` out of inputs, or use a model that hears (an Omni thinker: "
                             "Qwen2_5OmniThinkerForConditionalGeneration, Qwen3OmniMoeThinkerForConditionalGeneration)")
        self.processor = self._load_processor(processor or pretrained, model_type, hears)
        if self.num_frames is None and isinstance(self.processor, _MinimalProcessor) and not self.processor.seconds_key:
            raise ValueError(f"{model_class} sees a video (num_frames None) only through its own processor, which "
                             "transformers builds with torchvision only: install torchvision, or show stills "
                             "(num_frames: 8)")  # fmt: skip
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"
        dtype = torch_dtype if torch_dtype == "auto" else getattr(torch, torch_dtype)
        if pretrained is not None:
            # transformers 4.56 renamed `torch_dtype` to `dtype` and 5.x warns on the old name.
            key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
            options = {key: dtype}
            if attn_implementation is not None:
                options["attn_implementation"] = attn_implementation
            self.model = cls.from_pretrained(pretrained, **options)
        else:
            self.model = cls(cls.config_class(**config)).to(torch.float32 if dtype == "auto" else dtype)
        self.model.eval().requires_grad_(False)
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size

    @staticmethod
    def _load_processor(path: str, model_type: str, hears: bool):
        from transformers import AutoFeatureExtractor, AutoImageProcessor, AutoProcessor, AutoTokenizer

        try:
            return AutoProcessor.from_pretrained(path)
        except ImportError as err:
            log.info("MLLMJudge: the processor of %s does not load (%s); using its tokenizer, image processor%s",
                     path, str(err).strip().split(". ")[0], " and feature extractor" if hears else "")
            extractor = AutoFeatureExtractor.from_pretrained(path) if hears else None
            return _MinimalProcessor(AutoTokenizer.from_pretrained(path), AutoImageProcessor.from_pretrained(path),
                                     extractor, model_type)  # fmt: skip

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(model={type(self.model).__name__}, inputs={self.inputs}, "
                f"aspects={self.aspects}, num_frames={self.num_frames}, on_failure={self.on_failure!r})")

    def _chat_text(self, sample: JudgeSample | int) -> str:
        """The request's text: reference, video (or stills), speech placeholders, then the prompt."""
        if isinstance(sample, int):  # a request of that many stills
            sample = JudgeSample(frames=np.zeros((sample, 1, 1, 3), np.uint8), fps=self.video_fps)
        stills = self.num_frames is not None
        parts = [{"type": "image"}] if sample.reference is not None else []
        parts += [{"type": "image"}] * len(sample.frames) if stills else [{"type": "video"}]
        parts += [{"type": "audio"}] if sample.audio is not None else []
        prompt = self._text(sample)
        messages = [{"role": "user", "content": parts + [{"type": "text", "text": prompt}]}]
        for owner in (self.processor, self.tokenizer):
            if getattr(owner, "chat_template", None):
                return owner.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        def token(name: str, default: str) -> str:
            return getattr(self.processor, name, None) or default

        start, end = token("vision_bos_token", "<|vision_start|>"), token("vision_eos_token", "<|vision_end|>")
        placeholders = {
            "image": start + token("image_token", "<|image_pad|>") + end,
            "video": start + token("video_token", "<|video_pad|>") + end,
            "audio": token("audio_bos_token", "<|audio_bos|>") + token("audio_token", "<|AUDIO|>")
            + token("audio_eos_token", "<|audio_eos|>"),
        }
        media = "".join(placeholders[part["type"]] for part in parts)
        return f"<|im_start|>user\n{media}{prompt}<|im_end|>\n<|im_start|>assistant\n"

    def _inputs(self, samples: list[JudgeSample]) -> dict:
        """The model's inputs for a batch of requests (the processor's output), on the model's device and dtype."""
        from PIL import Image

        images, videos, audio = [], [], []
        for sample in samples:
            if sample.reference is not None:
                images.append(Image.fromarray(sample.reference))
            if self.num_frames is not None:
                images += [Image.fromarray(frame) for frame in sample.frames]
            else:
                videos.append(sample.frames)
            if sample.audio is not None:
                audio.append(self._speech(sample))
        texts = [self._chat_text(sample) for sample in samples]
        fps = samples[0].fps
        media = {key: value for key, value in (("images", images), ("videos", videos), ("audio", audio)) if value}
        if isinstance(self.processor, _MinimalProcessor):
            inputs = self.processor(text=texts, fps=fps, **media)
        else:
            options = {}
            if videos:  # the frames as they are, at their rate: the processor samples none
                metadata = [{"total_num_frames": len(v), "fps": fps, "frames_indices": list(range(len(v)))}
                            for v in videos]  # fmt: skip
                options["videos_kwargs"] = {"fps": fps, "do_sample_frames": False, "video_metadata": metadata}
            inputs = dict(self.processor(text=texts, padding=True, return_tensors="pt", **media, **options))
        param = next(self.model.parameters())
        inputs = {k: v.to(param.device) if torch.is_tensor(v) else v for k, v in inputs.items()}
        for key in ("pixel_values", "pixel_values_videos", "input_features"):
            if key in inputs:
                inputs[key] = inputs[key].to(param.dtype)
        return inputs

    def _speech(self, sample: JudgeSample) -> np.ndarray:
        """The speech at the feature extractor's rate."""
        rate = getattr(getattr(self.processor, "feature_extractor", None), "sampling_rate", sample.sample_rate)
        if rate == sample.sample_rate:
            return np.asarray(sample.audio, dtype=np.float32)
        from prefalign.data.media import resample

        return resample(sample.audio, sample.sample_rate, rate)

    @torch.no_grad()
    def _generate(self, samples: list[JudgeSample] | np.ndarray, temperature: float) -> list[str]:
        from transformers import GenerationConfig

        if isinstance(samples, np.ndarray):  # stills [B, n, H, W, 3]
            samples = [JudgeSample(frames=video, fps=self.video_fps) for video in samples]
        self.model.eval()
        inputs = self._inputs(samples)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        sample = temperature > 0
        generation = GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            do_sample=sample,
            temperature=temperature if sample else None,
            top_p=None,
            top_k=None,
            pad_token_id=pad,
            eos_token_id=self.model.generation_config.eos_token_id or self.tokenizer.eos_token_id,
        )
        out = self.model.generate(**inputs, generation_config=generation)
        return self.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    def score(self, videos: torch.Tensor, cond: dict) -> dict[str, torch.Tensor]:
        if next(self.model.parameters()).device != videos.device:
            self.model.to(videos.device)
        return super().score(videos, cond)

    def _judge(self, samples: list[JudgeSample]) -> tuple[list[dict[str, float] | None], list[str]]:
        results: list[dict[str, float] | None] = [None] * len(samples)
        pending = list(range(len(samples)))
        last: dict[int, str] = {}
        chunk = self.batch_size or max(len(samples), 1)
        for attempt in range(self.max_retries + 1):
            if not pending:
                break
            if attempt:
                self._count(retries=len(pending))
            temperature = self.retry_temperature if attempt else 0.0
            still = []
            for start in range(0, len(pending), chunk):
                rows = pending[start:start + chunk]
                answers = self._generate([samples[row] for row in rows], temperature)
                self._count(requests=len(rows))
                for row, answer in zip(rows, answers):
                    results[row] = parse_scores(answer, self.aspects)
                    if results[row] is None:
                        still.append(row)
                        last[row] = f"unusable answer {redact(answer[:4096])[:120]!r}"
            pending = still
        self._count(failures=len(pending))
        return results, [last[row] for row in pending]


def _concrete_class(cls: type, pretrained: str | None) -> type:
    """The model class an Auto class loads for the checkpoint ``pretrained`` (read from its config); a concrete
    class as it is."""
    if not cls.__name__.startswith("Auto") or pretrained is None:
        return cls
    from transformers import AutoConfig

    return cls._model_mapping.get(type(AutoConfig.from_pretrained(pretrained)), cls)


class _RequestFailed(Exception):
    """A request given up on: a 4xx answer other than 429, or retries exhausted."""


class OpenAIJudge(_Judge):
    """A judge behind an OpenAI-compatible chat-completions endpoint (vLLM, SGLang, or a hosted API).

    Each video is one request: ``POST {base_url}/chat/completions`` with one user message holding, in order, the
    reference photo (a PNG ``image_url`` data URL), the video (``video_as``: ``video_url``, a data URL of an mp4 at
    the judge's frame rate, as vLLM documents for Qwen2.5-Omni and Qwen2.5-VL; or ``frames``, one PNG ``image_url``
    per frame, for servers without video), the speech (``audio_as``: ``input_audio``, base64 16-bit PCM wav with
    ``format: wav``, OpenAI's and vLLM's part; or ``audio_url``, a wav data URL), then the prompt; each only where
    ``inputs`` asks for it. ``temperature`` 0 (``retry_temperature`` on retries) and ``max_tokens``. Up to
    ``max_concurrency`` requests are in flight at once. Timeouts, connection errors, 429 and 5xx are retried
    ``http_retries`` times with exponential backoff (``backoff * 2**k`` seconds, at most ``max_backoff``; a 429's
    ``Retry-After`` when it says more); another 4xx is not retried. A request given up on fails its video (scored
    per ``on_failure``) without answer retries on top. ``stats`` adds ``http_retries`` and ``http_errors``.

    A hostile or broken endpoint costs a failed request with its reason, never a hang, a crash or the key:

    - ``timeout`` bounds each whole request (connecting, sending, the answer's headers and body together), so a
      server that drips its answer byte by byte times out as one that says nothing (and is re-sent as a timeout);
    - an answer over ``max_answer_bytes`` (by its Content-Length, or counted while reading) fails its request
      unread beyond the cap, without re-sends;
    - redirects are never followed (same origin or not): urllib would re-send the ``Authorization`` header to
      wherever a 3xx points, and a chat-completions POST redirected becomes a GET anyway. A 3xx fails its request,
      without re-sends, with the reason naming where it pointed: set ``base_url`` to the address that answers;
    - an answer that is no chat-completions JSON, or whose content is unusable (null parts, nesting too deep,
      scores out of range or not numbers), is an unusable answer, asked again up to ``max_retries`` times.

    The API key is read from the environment variable ``api_key_env`` at each request (sent as
    ``Authorization: Bearer ...``, none when the variable is unset) and sent to ``base_url``'s server only (no
    redirect is followed, and the environment's ``http_proxy`` / ``https_proxy`` are not used: a proxy would receive
    the key; the judge must be reachable directly); it is never stored, logged or shown (failure reasons and logs are redacted with ``prefalign.secrets.redact``).

    Args:
        model (str): the served model's name.
        base_url (str): the API root, an ``http://`` or ``https://`` URL, e.g. ``http://localhost:8000/v1``.
        api_key_env (str): name of the environment variable holding the API key (the name, not the key).
        timeout (float): seconds a whole request may take, from connecting to the answer's last byte.
        http_retries (int): times a request is re-sent after a timeout, connection error, 429 or 5xx.
        backoff (float): seconds before the first re-send, doubled at each.
        max_backoff (float): longest wait between re-sends.
        max_concurrency (int): requests in flight at once.
        max_tokens (int): longest answer.
        extra_body (dict | None): more fields of the request, e.g. ``{"response_format": {"type": "json_object"}}``
            (not ``model``, ``messages``, ``temperature`` or ``max_tokens``: the options above set them).
        max_answer_bytes (int): the largest answer read, in bytes (see ``MAX_ANSWER_BYTES``).
        video_as (str): ``video_url`` (an mp4 data URL) or ``frames`` (ordered ``image_url`` parts).
        audio_as (str): ``input_audio`` (base64 wav) or ``audio_url`` (a wav data URL).
        aspects, prompt, num_frames, max_retries, retry_temperature, on_failure, prefix: as in ``MLLMJudge``.
        inputs, fps, video_fps, max_frames, sample_rate, prompt_file, rubrics: what the judge is given and asked
            (see the module's docstring); by default the reference, the video at the clip's rate (at most 32
            frames) and the speech.
    """

    def __init__(
        self,
        model: str,
        base_url: str = "http://localhost:8000/v1",
        api_key_env: str = "OPENAI_API_KEY",
        timeout: float = 60.0,
        http_retries: int = 4,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        max_concurrency: int = 8,
        max_tokens: int = 64,
        extra_body: dict | None = None,
        max_answer_bytes: int = MAX_ANSWER_BYTES,
        video_as: Literal["video_url", "frames"] = "video_url",
        audio_as: Literal["input_audio", "audio_url"] = "input_audio",
        aspects: Sequence[str] = ASPECTS,
        prompt: str | None = None,
        num_frames: int | None = None,
        max_retries: int = 2,
        retry_temperature: float = 0.7,
        on_failure: Literal["neutral", "drop"] = "neutral",
        prefix: str = "judge/",
        inputs: Sequence[str] = ("reference", "video", "audio"),
        fps: float | None = None,
        video_fps: float = 25.0,
        max_frames: int = 32,
        sample_rate: int = 16000,
        prompt_file: str | None = None,
        rubrics: dict | None = None,
    ):
        super().__init__(aspects, prompt, num_frames, max_retries, retry_temperature, on_failure, prefix, inputs, fps,
                         video_fps, max_frames, sample_rate, prompt_file, rubrics)
        if video_as not in ("video_url", "frames"):
            raise ValueError(f"video_as must be 'video_url' (an mp4 data URL) or 'frames' (image parts); got {video_as!r}")
        if audio_as not in ("input_audio", "audio_url"):
            raise ValueError(f"audio_as must be 'input_audio' (base64 wav) or 'audio_url' (a data URL); got {audio_as!r}")
        self.video_as = video_as
        self.audio_as = audio_as
        if not isinstance(model, str) or not model:
            raise ValueError(f"model must be the served model's name; got {model!r}")
        url = urllib.parse.urlsplit(base_url) if isinstance(base_url, str) else None
        if url is None or url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"base_url must be an http:// or https:// URL with a host, e.g. "
                             f"http://localhost:8000/v1; got {redact(base_url)!r}")  # fmt: skip
        if not isinstance(api_key_env, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", api_key_env):
            # Never echoed: a user who wrote the key itself here would see it in the error.
            raise ValueError("api_key_env must be the name of an environment variable (letters, digits and _, e.g. "
                             "OPENAI_API_KEY), not the key itself")  # fmt: skip
        _check_number("timeout", timeout, "a positive finite number of seconds", strict=True)
        _check_int("http_retries", http_retries, 0, "an integer of at least 0")
        _check_number("backoff", backoff, "a finite number of seconds of at least 0")
        _check_number("max_backoff", max_backoff, "a finite number of seconds of at least 0")
        _check_int("max_concurrency", max_concurrency, 1, "an integer of at least 1")
        _check_int("max_tokens", max_tokens, 1, "an integer of at least 1")
        _check_int("max_answer_bytes", max_answer_bytes, 1, "an integer number of bytes of at least 1")
        if extra_body is not None and not isinstance(extra_body, dict):
            raise ValueError(f"extra_body must be a dict of request fields or None; got {type(extra_body).__name__}")
        reserved = sorted({"model", "messages", "temperature", "max_tokens"} & set(extra_body or {}))
        if reserved:
            raise ValueError(f"extra_body may not set {reserved}: the judge's options model, prompt, "
                             "retry_temperature and max_tokens set them")  # fmt: skip
        watch_env(api_key_env)
        self.model = model
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.api_key_env = api_key_env
        self.timeout = timeout
        self.http_retries = http_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.max_concurrency = max_concurrency
        self.max_tokens = max_tokens
        self.extra_body = dict(extra_body or {})
        self.max_answer_bytes = max_answer_bytes
        self.stats.update(http_retries=0, http_errors=0)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(model={self.model!r}, url={self.url!r}, api_key_env={self.api_key_env!r}, "
                f"max_concurrency={self.max_concurrency}, on_failure={self.on_failure!r})")

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        watch_env(self.api_key_env)  # in the process it was sent to (spawned DDP workers)

    def _redact(self, text: str) -> str:
        """A reason without the key, on one line (a server's text may hold line breaks to forge log lines)."""
        return re.sub(r"[\x00-\x1f\x7f]+", " ", redact(text, extra=(os.environ.get(self.api_key_env),)))

    def content(self, sample: JudgeSample) -> list[dict]:
        """The user message's parts for one video: reference, video, speech (as ``inputs`` asks), then the prompt."""
        parts = []
        if sample.reference is not None:
            parts.append({"type": "image_url", "image_url": {"url": f"data:image/png;base64,{_png_base64(sample.reference)}"}})
        if self.video_as == "video_url" and self.num_frames is None:
            url = f"data:video/mp4;base64,{_mp4_base64(sample.frames, sample.fps)}"
            parts.append({"type": "video_url", "video_url": {"url": url}})
        else:
            parts += [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{_png_base64(frame)}"}}
                      for frame in sample.frames]  # fmt: skip
        if sample.audio is not None:
            wav = _wav_base64(sample.audio, sample.sample_rate)
            if self.audio_as == "input_audio":
                parts.append({"type": "input_audio", "input_audio": {"data": wav, "format": "wav"}})
            else:
                parts.append({"type": "audio_url", "audio_url": {"url": f"data:audio/wav;base64,{wav}"}})
        parts.append({"type": "text", "text": self._text(sample)})
        return parts

    def _body(self, content: list[dict], temperature: float) -> bytes:
        body = {
            **self.extra_body,
            "model": self.model,
            "messages": [{"role": "user", "content": content}],
            "temperature": temperature,
            "max_tokens": self.max_tokens,
        }
        return json.dumps(body).encode()

    def _post(self, body: bytes) -> str:
        """The answer's text, after re-sends of transient errors; raises ``_RequestFailed`` when given up on."""
        for attempt in range(self.http_retries + 1):
            headers = {"Content-Type": "application/json"}
            key = os.environ.get(self.api_key_env)
            if key:
                headers["Authorization"] = f"Bearer {key}"
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            self._count(requests=1)
            wait = None
            deadline = time.monotonic() + self.timeout
            try:
                with _opener(deadline, self.timeout).open(request, timeout=self.timeout) as response:
                    payload = self._read(response)
            except urllib.error.HTTPError as err:
                if 300 <= err.code < 400:
                    location = err.headers.get("Location") if err.headers is not None else None
                    err.close()
                    where = f" to {location!r}" if location else ""
                    raise _RequestFailed(self._redact(
                        f"HTTP {err.code}: a redirect{where}, not followed (the judge follows no redirect, so "
                        "that its API key goes to base_url's server only): set base_url to the address that answers"
                    )) from None  # fmt: skip
                reason = f"HTTP {err.code} {self._redact(_error_body(err))[:300]!r}"
                if err.code != 429 and err.code < 500:
                    raise _RequestFailed(reason) from None
                if err.code == 429:
                    wait = _seconds(err.headers.get("Retry-After") if err.headers is not None else None)
            except (urllib.error.URLError, TimeoutError, OSError, http.client.HTTPException) as err:
                reason = self._redact(f"{type(err).__name__}: {getattr(err, 'reason', err)}")
            else:
                return _answer_text(payload)
            if attempt == self.http_retries:
                raise _RequestFailed(f"{reason} after {self.http_retries} re-sends")
            self._count(http_retries=1)
            delay = min(self.max_backoff, self.backoff * 2**attempt)
            time.sleep(min(self.max_backoff, max(delay, wait or 0.0)))
        raise AssertionError("unreachable")

    def _read(self, response) -> bytes:
        """The answer's body, up to ``max_answer_bytes``; raises ``_RequestFailed`` for a bigger one."""
        cap = self.max_answer_bytes
        length = response.headers.get("Content-Length", "").strip()
        if length.isdigit() and int(length) > cap:
            raise _RequestFailed(f"the answer is {int(length)} bytes (Content-Length), over max_answer_bytes={cap}")
        chunks, size = [], 0
        while chunk := response.read(min(1 << 16, cap + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
            if size > cap:
                raise _RequestFailed(f"the answer is over max_answer_bytes={cap} bytes (not read further)")
        payload = b"".join(chunks)
        if getattr(response, "length", None):  # the server closed before the Content-Length it announced
            raise http.client.IncompleteRead(payload, response.length)
        return payload

    def _judge_one(self, sample: JudgeSample) -> tuple[dict[str, float] | None, str]:
        content = self.content(sample)  # encoded once, sent again on retries
        reason = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                self._count(retries=1)
            body = self._body(content, self.retry_temperature if attempt else 0.0)
            try:
                answer = self._post(body)
            except _RequestFailed as err:
                self._count(http_errors=1, failures=1)
                return None, str(err)
            scores = parse_scores(answer, self.aspects)
            if scores is not None:
                return scores, ""
            # Redacted before it is cut: a key cut in two would not be recognised.
            reason = f"unusable answer {self._redact(str(answer)[:4096])[:120]!r}"
        self._count(failures=1)
        return None, reason

    def _judge(self, samples: list[JudgeSample]) -> tuple[list[dict[str, float] | None], list[str]]:
        with concurrent.futures.ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="judge") as pool:
            outcomes = list(pool.map(self._judge_one, samples))
        return [scores for scores, _ in outcomes], [reason for scores, reason in outcomes if scores is None]


def _opener(deadline: float, timeout: float) -> urllib.request.OpenerDirector:
    """urllib's opener for one judge request: follows no redirect, and fails the request at ``deadline``."""
    # No ProxyHandler from the environment: an http_proxy (common on clusters) would receive the Authorization
    # header in the clear. The judge must be reachable directly at base_url.
    return urllib.request.build_opener(
        urllib.request.ProxyHandler({}), _RefuseRedirects, _DeadlineHTTPHandler(deadline, timeout),
        _DeadlineHTTPSHandler(deadline, timeout),
    )


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """A 3xx stays an ``HTTPError``: urllib would otherwise re-send the request, ``Authorization`` included, to
    wherever it points."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


def _time_left(deadline: float, timeout: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError(f"no complete answer within timeout={timeout:g} s")
    return left


class _DeadlineReader(io.RawIOBase):
    """A socket's reads, each allowed only the time left before the request's deadline: socket timeouts bound
    each read, so a server dripping bytes would otherwise never time out."""

    def __init__(self, sock, deadline: float, timeout: float):
        self._sock, self._raw = sock, sock.makefile("rb", buffering=0)
        self._deadline, self._timeout = deadline, timeout

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        self._sock.settimeout(_time_left(self._deadline, self._timeout))
        try:
            return self._raw.readinto(buffer)
        except TimeoutError:  # the socket's timeout was the time left: the deadline passed
            raise TimeoutError(f"no complete answer within timeout={self._timeout:g} s") from None

    def close(self) -> None:
        self._raw.close()
        super().close()


class _DeadlineResponse(http.client.HTTPResponse):
    def __init__(self, sock, *args, deadline: float, timeout: float, **kwargs):
        super().__init__(sock, *args, **kwargs)
        reader = io.BufferedReader(_DeadlineReader(sock, deadline, timeout))  # the status line and headers too
        self.fp.close()
        self.fp = reader


class _DeadlineConnection:
    """Mixed into http.client's connections: every send and every read of the answer gets the time left."""

    def __init__(self, *args, deadline: float, total: float, **kwargs):
        super().__init__(*args, **kwargs)  # with urllib's ``timeout``: connecting takes at most that
        self._deadline, self._total = deadline, total
        self.response_class = functools.partial(_DeadlineResponse, deadline=deadline, timeout=total)

    def send(self, data) -> None:
        if self.sock is not None:
            self.sock.settimeout(_time_left(self._deadline, self._total))
        super().send(data)


class _DeadlineHTTPConnection(_DeadlineConnection, http.client.HTTPConnection):
    pass


class _DeadlineHTTPSConnection(_DeadlineConnection, http.client.HTTPSConnection):
    pass


class _DeadlineHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, deadline: float, timeout: float):
        super().__init__()
        self._connection = functools.partial(_DeadlineHTTPConnection, deadline=deadline, total=timeout)

    def http_open(self, req):
        return self.do_open(self._connection, req)


class _DeadlineHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, deadline: float, timeout: float):
        super().__init__()
        self._connection = functools.partial(_DeadlineHTTPSConnection, deadline=deadline, total=timeout)

    def https_open(self, req):
        return self.do_open(self._connection, req, context=self._context)


def _answer_text(payload: bytes) -> str | None:
    """``choices[0].message.content`` of a chat-completions answer; ``None`` (an unusable answer) if absent."""
    try:
        content = json.loads(payload)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError, RecursionError):  # RecursionError: nested too deep
        return None
    if isinstance(content, list):  # content parts; a part's text may be null or not text at all
        texts = [part.get("text") for part in content if isinstance(part, dict)]
        content = "".join(text for text in texts if isinstance(text, str))
    return content if isinstance(content, str) else None


def _error_body(err: urllib.error.HTTPError) -> str:
    """The start of an error answer's body (what the server says is wrong), closing it; longer than what is shown,
    so that it is redacted before it is cut."""
    try:
        return err.read(4096).decode("utf-8", "replace") if err.fp is not None else ""
    except (OSError, http.client.HTTPException):
        return ""
    finally:
        err.close()


def _seconds(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _png_base64(frame: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _wav_base64(audio: np.ndarray, sample_rate: int) -> str:
    """Mono float audio in [-1, 1] as a base64 16-bit PCM wav file."""
    import wave

    pcm = np.round(np.clip(audio, -1.0, 1.0) * 32767).astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(sample_rate)
        handle.writeframes(pcm.tobytes())
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _mp4_base64(frames: np.ndarray, fps: float) -> str:
    """Frames ``[n, H, W, 3]`` uint8 as a base64 mp4 (H.264 where PyAV has it; odd sizes lose their last row or
    column, as yuv420p needs even ones)."""
    import tempfile

    from prefalign.data.media import write_video

    h, w = frames.shape[1] // 2 * 2, frames.shape[2] // 2 * 2
    if h == 0 or w == 0:
        raise ValueError(f"frames of {frames.shape[1]}x{frames.shape[2]} pixels are too small for a video")
    with tempfile.TemporaryDirectory(prefix="prefalign-judge-") as folder:
        path = Path(folder) / "video.mp4"
        # A judge needs what a viewer sees, not an archive: x264 at CRF 18, veryfast (on 32 frames of 480x832 on the
        # 2-core dev machine: 0.52 s and 122 KB against write_video's CRF 10 medium, 0.91 s and 310 KB).
        write_video(path, np.ascontiguousarray(frames[:, :h, :w]), fps, crf=JUDGE_VIDEO_CRF, preset="veryfast")
        return base64.b64encode(path.read_bytes()).decode("ascii")


__all__ = ["ASPECTS", "DEFAULT_PROMPT", "INPUTS", "JudgeSample", "MLLMJudge", "OpenAIJudge", "parse_scores",
           "sample_frames"]
