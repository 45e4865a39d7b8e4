"""Callbacks: write predicted videos (with their audio) as mp4 files."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from prefalign.data import media


class VideoWriter(BasePredictionWriter):
    """Writes every predicted video as ``{output_dir}/{id}.mp4`` with the condition's audio track.

    ``prefalign predict`` adds one (to ``{trainer.default_root_dir}/predictions``) when a recipe has no prediction
    writer, and fails when the run wrote no video (``written``).

    Args:
        output_dir (str): folder for the mp4 files (created if missing).
    """

    def __init__(self, output_dir: str = "outputs/predict"):
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.written: Optional[int] = None
        """Videos written by all processes in the last predict run; ``None`` until one ends (a run given no
        batches, ``trainer.limit_predict_batches: 0``, never does)."""
        self._count = 0

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._count, self.written = 0, None

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        sample_rate = trainer.datamodule.sample_rate if trainer.datamodule is not None else 16000
        media.write_clips(self.output_dir, prediction["video"], prediction["id"], pl_module.denoiser.fps,
                          prediction.get("audio"), sample_rate)
        self._count += len(prediction["id"])

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Summed over processes: under DDP a rank may get no row of a short manifest while the others write.
        count = torch.tensor(self._count, device=pl_module.device)
        self.written = int(trainer.strategy.reduce(count, reduce_op="sum"))
        if trainer.is_global_zero:
            print(f"wrote {self.written} predicted videos to {self.output_dir}")
