"""Callbacks: write predicted videos (with their audio) as mp4 files."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter

from prefalign.data import media
from prefalign.files import safe_name


class VideoWriter(BasePredictionWriter):
    """Writes every predicted video as ``{output_dir}/{id}.mp4`` with the condition's audio track.

    Args:
        output_dir (str): folder for the mp4 files (created if missing).
    """

    def __init__(self, output_dir: str = "outputs/predict"):
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        self.output_dir.mkdir(parents=True, exist_ok=True)
        sample_rate = trainer.datamodule.sample_rate if trainer.datamodule is not None else 16000
        fps = pl_module.denoiser.fps
        frames = (prediction["video"].permute(0, 1, 3, 4, 2) * 255).round().byte().numpy()
        audio = prediction.get("audio")
        for index, clip_id in enumerate(prediction["id"]):
            track = None
            if audio is not None:
                # The audio covers the predicted frames exactly (the data module cut it so).
                track = audio[index, : round(frames.shape[1] * sample_rate / fps)].float().cpu().numpy()
            media.write_video(self.output_dir / f"{safe_name(clip_id)}.mp4", frames[index], fps, audio=track,
                              sample_rate=sample_rate)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            print(f"predicted videos written to {self.output_dir}")
