"""Callbacks: write predicted videos (with their audio) as mp4 files."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter

from prefalign.data import media


class VideoWriter(BasePredictionWriter):
    """Writes every predicted video as ``{output_dir}/{id}.mp4`` with the condition's audio track.

    Args:
        output_dir (str): folder for the mp4 files (created if missing).
    """

    def __init__(self, output_dir: str = "outputs/predict"):
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        sample_rate = trainer.datamodule.sample_rate if trainer.datamodule is not None else 16000
        media.write_clips(self.output_dir, prediction["video"], prediction["id"], pl_module.denoiser.fps,
                          prediction.get("audio"), sample_rate)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            print(f"predicted videos written to {self.output_dir}")
