"""Does the generated head follow the skeleton? Move the keypoints and see whether the face moves with them.

    python benchmarks/pose_following.py --config recipes/demo/sft_pose.yaml --ckpt_path CKPT [--shift 4]

For every held-out clip (the recipe's ``data.val``) it samples the video twice from the same noise: with the clip's
own pose track, and with every keypoint moved ``--shift`` pixels right and down. A model that follows the skeleton
moves the face by the shift; one that ignores it does not. It prints, and writes as JSON next to the checkpoint:

- ``response``: the face's displacement between the two samples (centre of the dark pixels: eyes and mouth), projected
  on the shift and divided by it: ≈ 1 when the head follows the keypoints, 0 when it ignores them;
- ``sync_pose_box``: the mouth-box lip sync of DESIGN.md (dark pixels counted only in the box around the mouth
  keypoint) of the shifted samples under the shifted keypoints, and of the original samples under the original
  ones: it stays high only if the mouth is where the keypoints put it;
- the same sync for the unshifted samples scored with the shifted box (what ignoring the pose would give).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> dict:
    from lightning.pytorch.cli import LightningCLI

    from prefalign import metrics
    from prefalign.data.datamodule import PortraitDataModule
    from prefalign.module import AlignmentModule

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the recipe the checkpoint was trained with")
    parser.add_argument("--ckpt_path", required=True)
    parser.add_argument("--shift", type=float, default=4.0, help="pixels right and down")
    parser.add_argument("--num_steps", type=int, default=20)
    args = parser.parse_args(argv)

    cli = LightningCLI(
        AlignmentModule, PortraitDataModule, args=["--config", args.config], run=False, save_config_callback=None,
        auto_configure_optimizers=False,
    )  # fmt: skip
    module: AlignmentModule = cli.model
    module.load_state_dict(torch.load(args.ckpt_path, map_location="cpu", weights_only=True)["state_dict"])
    module.eval()
    data = cli.datamodule
    data.setup("validate")
    sample_rate = module.denoiser.audio_encoder.sample_rate
    fps = module.denoiser.fps
    settings = module.sampling
    settings.num_steps = args.num_steps

    totals = {"response": [], "sync_pose_box": [], "sync_pose_box_shifted": [], "sync_unshifted_in_shifted_box": []}
    for batch in data.val_dataloader():
        pose = batch["pose"]
        height, width = batch["video"].shape[-2:]
        moved = pose + torch.tensor([args.shift / width, args.shift / height])
        frames = batch["video"].shape[1]
        with torch.no_grad():
            original = module.generate(batch, frames, settings)
            shifted = module.generate({**batch, "pose": moved}, frames, settings)
        displacement = metrics.dark_centroid(shifted) - metrics.dark_centroid(original)  # [B, T, 2] pixels
        direction = torch.tensor([1.0, 1.0]) / 2**0.5
        along = (displacement * direction).sum(-1).mean(dim=1) / (args.shift * 2**0.5)
        totals["response"].append(along)
        totals["sync_pose_box"].append(metrics.sync_score(original, batch["audio"], sample_rate, fps, pose))
        totals["sync_pose_box_shifted"].append(metrics.sync_score(shifted, batch["audio"], sample_rate, fps, moved))
        totals["sync_unshifted_in_shifted_box"].append(
            metrics.sync_score(original, batch["audio"], sample_rate, fps, moved)
        )
    result = {name: torch.cat(values).mean().item() for name, values in totals.items()}
    result.update(shift_pixels=args.shift, clips=sum(len(v) for v in totals["response"]), ckpt=str(args.ckpt_path))
    out = Path(args.ckpt_path).with_name("pose_following.json")
    out.write_text(json.dumps(result, indent=2))
    for name, value in result.items():
        print(f"{name}: {value:.3f}" if isinstance(value, float) else f"{name}: {value}")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
