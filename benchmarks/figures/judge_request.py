"""Figure ``judge_request``: the cost of a judge that hears: requests with the reference, the video (an mp4 at the
clip's rate) and the speech, as recipes/algorithms/grpo.yaml sets the judge, against the image-only judge's 8 stills,
over the loopback API."""

from __future__ import annotations

import statistics

import torch
import yaml

from benchmarks.figures.common import JUDGE_CONCURRENCY, JUDGE_DELAY_S, JUDGE_KEY_ENV, judge_server
from benchmarks.harness import ROOT, Bench, Figure, Step
from prefalign.rewards import OpenAIJudge

GRPO_ALGORITHM = ROOT / "recipes" / "algorithms" / "grpo.yaml"  # the judge's settings
REAL_GRPO_RECIPE = ROOT / "recipes" / "grpo_flowportrait.yaml"  # the judged videos per step: rollouts, batch, GPUs
#: The real-scale clip a request carries: 49 frames of 480x832 at 25 fps, with its 1.96 s of 16 kHz speech.
JUDGE_CLIP = {"frames": 49, "height": 480, "width": 832, "fps": 25.0, "sample_rate": 16000}
STILLS, HEARD = "image-only: 8 stills", "audio-visual: reference + video + speech"


def read_yaml(path) -> dict:
    """A recipe file's settings as written (the real-scale recipe's model is not built here: only its numbers are
    read)."""
    return yaml.safe_load(path.read_text())


def real_scale_clips(n: int) -> tuple[torch.Tensor, dict]:
    """``n`` synthetic clips at the real recipes' size, smooth and moving (what a codec sees in a portrait), with
    speech-like audio and a reference photo."""
    c = JUDGE_CLIP
    g = torch.Generator().manual_seed(0)
    y = torch.linspace(0, 1, c["height"]).view(1, 1, 1, -1, 1)
    x = torch.linspace(0, 1, c["width"]).view(1, 1, 1, 1, -1)
    t = torch.arange(c["frames"]).view(1, -1, 1, 1, 1) / c["fps"]
    phase = torch.rand(n, 1, 3, 1, 1, generator=g) * 6
    videos = 0.5 + 0.4 * torch.sin(9 * x + 5 * y + 3 * t + phase)
    samples = round(c["frames"] / c["fps"] * c["sample_rate"])
    audio = 0.2 * torch.sin(torch.arange(samples) * 0.07).expand(n, -1) * torch.rand(n, 1, generator=g)
    return videos, {"audio": audio, "reference": videos[:, 0]}


def judge_request_step(url: str, videos: torch.Tensor, cond: dict, options: dict, judges: dict, name: str) -> Step:
    """One GRPO step's judge calls for ``videos``: ``OpenAIJudge.score`` with ``options``; nothing re-sent."""
    judge = OpenAIJudge(
        model="benchmark-judge", base_url=url, api_key_env=JUDGE_KEY_ENV, timeout=60.0, http_retries=0,
        max_retries=0, max_concurrency=JUDGE_CONCURRENCY, video_fps=JUDGE_CLIP["fps"],
        sample_rate=JUDGE_CLIP["sample_rate"], **options,
    )  # fmt: skip
    judges[name] = judge
    return Step(lambda: judge.score(videos, cond), None, [])


def describe(judge_args: dict, n: int) -> Figure:
    return Figure(
        name="judge_request",
        title="The judge that hears: request size and throughput, audio-visual vs. image-only",
        description=(
            f"`OpenAIJudge.score` on {n} synthetic clips at the real recipes' size ({JUDGE_CLIP['frames']} frames of "
            f"{JUDGE_CLIP['height']}×{JUDGE_CLIP['width']} at {JUDGE_CLIP['fps']:g} fps, smooth moving patterns, "
            f"{JUDGE_CLIP['frames'] / JUDGE_CLIP['fps']:.2f} s of 16 kHz speech-like audio, the first frame as the "
            f"reference), `max_concurrency={JUDGE_CONCURRENCY}`, against the loopback chat-completions server of "
            f"`grpo_step` answering after {1e3 * JUDGE_DELAY_S:.0f} ms. **{STILLS}** (baseline): `inputs: [video]`, "
            f"`num_frames: 8`, PNG `image_url` parts (the image-only overlay). **{HEARD}**: the settings of "
            f"recipes/algorithms/grpo.yaml (`inputs: {judge_args.get('inputs')}`, `max_frames: "
            f"{judge_args.get('max_frames', 32)}`, `video_as: {judge_args.get('video_as')}`, `audio_as: "
            f"{judge_args.get('audio_as')}`): the reference as PNG, the video as an mp4 `video_url` (x264 CRF 18, "
            "veryfast), the speech as a base64 wav `input_audio`. A step scores the clips; the time is the client's "
            "side (sampling, encoding, HTTP) plus the server's fixed delay, not a real judge model's."
        ),
        baseline=STILLS,
        columns={"request_kib": "request (KiB)", "requests_per_s": "requests/s"},
    )


def per_step_notes(figure: Figure, sizes: dict[str, list], n: int, grpo: dict, recipe: dict) -> list[str]:
    """Request sizes and rates (into the rows), and what they come to at the real recipe's GRPO step."""
    gpus = recipe["trainer"]["devices"] * recipe["trainer"].get("num_nodes", 1)
    per_step = grpo["group_size"] * recipe["data"]["batch_size"] * gpus
    for row in figure.rows:
        row["request_kib"] = statistics.mean(sizes[row["variant"]]) / 1024
        row["requests_per_s"] = n / (1e-3 * row["median_ms"])
    notes = []
    for row in figure.rows:
        seconds = per_step / row["requests_per_s"]
        mib = per_step * row["request_kib"] / 1024
        notes.append(
            f"{row['variant']}: at the recipe's GRPO step ({grpo['group_size']} rollouts × batch "
            f"{recipe['data']['batch_size']} × {gpus} GPUs = {per_step} judged videos) this is {mib:.0f} MiB of "
            f"requests and {seconds:.1f} s of client time per step at these rates (spread over the {gpus} ranks: "
            f"{seconds / gpus:.1f} s each), before the judge model's own time."
        )
    return notes


def figure(bench: Bench) -> Figure:
    """The cost of a judge that hears, against the image-only judge's 8 stills, over the loopback API."""
    grpo = read_yaml(GRPO_ALGORITHM)["init_args"]
    judge_args = grpo["reward"]["init_args"]["terms"][0]["init_args"]
    n = JUDGE_CONCURRENCY
    figure = describe(judge_args, n)
    videos, cond = real_scale_clips(n)
    sizes: dict[str, list] = {STILLS: [], HEARD: []}
    judges: dict = {}
    options = {
        STILLS: {"inputs": ["video"], "num_frames": 8},
        HEARD: {k: judge_args[k] for k in ("inputs", "max_frames", "video_as", "audio_as") if k in judge_args},
    }
    with judge_server(JUDGE_DELAY_S, sizes[STILLS]) as url_stills, judge_server(JUDGE_DELAY_S, sizes[HEARD]) as url_heard:
        urls = {STILLS: url_stills, HEARD: url_heard}
        bench.compare(figure, {name: (lambda name=name: judge_request_step(urls[name], videos, cond, options[name],
                                                                            judges, name)) for name in (STILLS, HEARD)})
    if bench.probing:
        return figure
    failed = {name: judge.stats for name, judge in judges.items() if judge.stats["failures"]}
    if failed:
        raise RuntimeError(f"judge_request: the judge got no answer for some videos: {failed}")
    figure.notes += per_step_notes(figure, sizes, n, grpo, read_yaml(REAL_GRPO_RECIPE))
    return figure
