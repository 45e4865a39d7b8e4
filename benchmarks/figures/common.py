"""What the figures share: the demo recipes' modules as ``prefalign fit`` builds them, the demo batch, the training
step of a module, and the stand-in judge server."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from benchmarks.harness import ROOT, Bench, Step
from prefalign.build import build_from_recipe
from prefalign.data.datamodule import PortraitDataModule, collate_clips
from prefalign.data.synthetic import (
    MOUTH_PERTURBATIONS,
    TalkingShapesConfig,
    clip_seed,
    make_clip,
    perturb_mouth,
    render,
    to_uint8,
)
from prefalign.module import AlignmentModule

SFT_RECIPE = ROOT / "recipes" / "demo" / "sft.yaml"  # the demo batch takes its size and clip length from it
#: Given to every build: one seed (LightningCLI seeds before it builds, so every build of a recipe starts from the
#: same weights and adapters), no ``init_weights`` (seeded random weights time the same) and no LR scheduler
#: (Lightning steps it outside the training step).
RECIPE_DEFAULTS = ("--seed_everything", "0", "--model.init_weights", "null", "--model.lr_scheduler", "null")
# The judge rows: requests in flight when batched, and how long the stand-in server takes to answer a request (a
# served MLLM's latency); its answer, and the variable the judge reads its API key from.
JUDGE_CONCURRENCY = 8
JUDGE_DELAY_S = 0.05
JUDGE_ANSWER = '{"lip_sync": 4, "expressiveness": 3, "motion_quality": 5}'
JUDGE_KEY_ENV = "PREFALIGN_BENCHMARK_JUDGE_KEY"


def from_recipe(recipe: Path, *overrides: str) -> tuple[AlignmentModule, PortraitDataModule]:
    """The model and data module of ``recipe`` as ``prefalign fit --config recipe`` builds them
    (``prefalign.build.build_from_recipe``), with ``RECIPE_DEFAULTS`` and then ``overrides`` on top, e.g.
    ``from_recipe(SFT_RECIPE, "--model.lora", "null")``."""
    logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)  # not "Seed set to 0" every build
    return build_from_recipe(str(recipe), [*RECIPE_DEFAULTS, *overrides])


def recipe_name(recipe: Path) -> str:
    return str(recipe.relative_to(ROOT))


def demo_batch(device: torch.device, data: PortraitDataModule, pairs: bool = False) -> dict:
    """A batch of TalkingShapes clips made in memory, decoded and collated as the data module does: as many clips
    of as many frames as ``data`` (a demo recipe's data module) puts in a training batch.

    With ``pairs``, each clip also has its ``rejected`` video, made as ``prefalign synth --rejected
    [shift,jitter,freeze]`` makes it: the same clip with its mouth track spoiled, the kinds in turn.
    """

    def pixels(array) -> torch.Tensor:  # what decoding the written mp4 / png gives: 8-bit frames scaled to [0, 1]
        return torch.from_numpy(to_uint8(array)).float() / 255

    cfg = TalkingShapesConfig(num_frames=data.num_frames)
    items = []
    for index in range(data.batch_size):
        clip = make_clip(clip_seed(0, index), cfg)
        items.append(
            {
                "id": f"clip_{index:05d}",
                "video": pixels(clip.video).permute(0, 3, 1, 2),
                "audio": torch.from_numpy(clip.audio),
                "reference": pixels(clip.reference).permute(2, 0, 1),
                "pose": torch.from_numpy(clip.pose),
            }
        )
        if pairs:
            kind = MOUTH_PERTURBATIONS[index % len(MOUTH_PERTURBATIONS)]
            mouth = perturb_mouth(clip.mouth, kind, np.random.default_rng(clip_seed(0, index) + 1))
            items[-1]["rejected"] = pixels(render(clip.identity, clip.pose, mouth, cfg)).permute(0, 3, 1, 2)
    batch = collate_clips(items)
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


def batch_drift(recipe: Path, data: PortraitDataModule, used: PortraitDataModule) -> list[str]:
    """A note when ``recipe``'s data (``data``) trains on other batches than the figure's batch (made for ``used``)."""
    if (data.batch_size, data.num_frames) == (used.batch_size, used.num_frames):
        return []
    return [
        f"**{recipe_name(recipe)} has moved on**: it trains on batches of {data.batch_size} clips of "
        f"{data.num_frames} frames, this benchmark used {used.batch_size} clips of {used.num_frames} frames."
    ]


def module_step(bench: Bench, module: AlignmentModule, batch: dict | Callable[[], dict]) -> Step:
    """Our step: ``AlignmentModule.training_step`` (the algorithm's loss), backward, and the optimizer
    ``configure_optimizers`` builds; what Lightning's automatic optimisation runs. ``batch`` is the batch of every
    step, or a function that gives each step its batch (loading it is then part of the step)."""
    module.to(bench.device).train()
    optimizer = module.configure_optimizers()

    def run() -> torch.Tensor:
        step_batch = batch() if callable(batch) else batch
        with bench.autocast():
            loss = module.training_step(step_batch, 0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return Step(run, optimizer, list(module.parameters()))


@contextlib.contextmanager
def without_trainer() -> Iterator[None]:
    """``training_step`` logs through ``self.log``, which only warns without a Trainer: logging is not what is timed."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*self.log.*")
        yield


def parameter_split(module: AlignmentModule) -> dict[str, int]:
    """Parameter counts of a module: the backbone's own weights, LoRA adapters, and everything else (the
    conditioning modules the denoiser adds), each with how many of them train."""
    split = {f"{part}{kind}": 0 for part in ("backbone", "adapters", "added") for kind in ("", "_trainable")}
    for name, param in module.named_parameters():
        part = "adapters" if "lora_" in name else "backbone" if name.startswith("denoiser.backbone.") else "added"
        split[part] += param.numel()
        split[f"{part}_trainable"] += param.numel() if param.requires_grad else 0
    return split


@contextlib.contextmanager
def judge_server(delay: float, sizes: list | None = None) -> Iterator[str]:
    """A stand-in for a served MLLM judge on loopback: an OpenAI-compatible chat-completions endpoint that answers
    every request after ``delay`` seconds with the same valid scores (and appends each request's body size in bytes
    to ``sizes``, when given). Yields its API root (``.../v1``).

    The judge sends ``JUDGE_KEY_ENV``'s value as its API key: a dummy one is set, for a server that checks nothing;
    loopback joins ``no_proxy``, so that a proxy from the environment does not see its requests.
    """
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    os.environ[JUDGE_KEY_ENV] = "benchmark-dummy-key"
    for name in ("no_proxy", "NO_PROXY"):
        os.environ[name] = ",".join(filter(None, [os.environ.get(name), "127.0.0.1"]))
    message = {"role": "assistant", "content": JUDGE_ANSWER}
    answer = json.dumps(
        {
            "id": "chatcmpl-benchmark",
            "object": "chat.completion",
            "model": "benchmark-judge",
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
        }
    ).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if sizes is not None:
                sizes.append(len(body))
            time.sleep(delay)  # the judge model at work
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args):
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 64  # the default 5 would make a burst of connections wait for SYN retries

    server = Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
