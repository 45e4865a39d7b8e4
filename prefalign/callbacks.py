"""Callbacks: predicted videos written as mp4 files, the training curves drawn when ``fit`` ends, and a run's LoRA
adapters pushed to the Hugging Face Hub during training."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_warn

from prefalign.checkpoints import model_part
from prefalign.data import media
from prefalign.hub import hub_token, is_repo_id, upload, write_adapter
from prefalign.hub import log as hub_log
from prefalign.plots import plot_training_curves
from prefalign.recipes import read_recipe_file


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


class TrainingCurves(L.Callback):
    """Draws ``curves.png`` (see :func:`prefalign.plots.plot_training_curves`) into the CSVLogger's folder when
    ``fit`` ends.

    Needs a :class:`~lightning.pytorch.loggers.CSVLogger` among the trainer's loggers; without one it warns and
    does nothing.

    Args:
        filename (str): the figure's name in the logger's ``log_dir``.
    """

    def __init__(self, filename: str = "curves.png"):
        self.filename = filename
        self._warned = False

    def _warn(self, message: str) -> None:
        if not self._warned:
            rank_zero_warn(f"TrainingCurves: {message}", category=UserWarning)
            self._warned = True

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        logger = next((logger for logger in trainer.loggers if isinstance(logger, CSVLogger)), None)
        if logger is None:
            self._warn("no CSVLogger among the trainer's loggers, so no curves are drawn")
            return
        logger.save()  # rows still in memory would be missing from the file
        metrics_file = Path(logger.experiment.metrics_file_path)
        if not metrics_file.is_file():
            self._warn(f"nothing was logged ({metrics_file} does not exist), so no curves are drawn")
            return
        plot_training_curves(metrics_file, Path(logger.log_dir) / self.filename, title=logger.log_dir)


class PushToHub(L.Callback):
    """Pushes the run's LoRA adapters (with the new modules, the recipe and a model card) to a Hub repo during
    training, so that a long run's progress can be tried or shared before it ends.

    Uploads happen on rank zero between steps and block training while they run. A failed upload is logged as a
    warning and training goes on; only the final upload (``at_end``) raises. Neither the warning nor the error shows
    the token, even where the Hub's answer echoes it (``prefalign.secrets``).

    Args:
        repo_id (str): the model repo, ``owner/name``; created if missing.
        every_n_steps (int | None): push every this many optimizer steps; None: only at the end.
        at_end (bool): push when training ends.
        private (bool): create the repo as private.
        revision (str | None): the branch to commit to (created if missing); default ``main``.
        endpoint (str | None): the Hub's URL (default: HF_ENDPOINT or https://huggingface.co).
        base_model (str | None): the Hub id (``owner/name``) of the base model, for the model card; default: the
            denoiser's ``pretrained`` when it is a Hub id or a folder of huggingface_hub's cache.
    """

    def __init__(
        self,
        repo_id: str,
        every_n_steps: Optional[int] = None,
        at_end: bool = True,
        private: bool = False,
        revision: Optional[str] = None,
        endpoint: Optional[str] = None,
        base_model: Optional[str] = None,
    ):
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps must be a positive number of steps, got {every_n_steps}")
        if base_model is not None and not is_repo_id(base_model):
            raise ValueError(f"base_model must be a Hub repo id, owner/name, got {base_model!r}")
        self.repo_id = repo_id
        self.every_n_steps = every_n_steps
        self.at_end = at_end
        self.private = private
        self.revision = revision
        self.endpoint = endpoint
        self.base_model = base_model
        self._last_step: Optional[int] = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if getattr(pl_module, "lora", None) is None:
            raise ValueError(
                "PushToHub uploads LoRA adapters, but this run trains the full weights: set model.lora, or share the "
                "weights with `prefalign export` after training"
            )
        hub_token()  # fail now rather than after hours of training

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps is None or step == 0 or step % self.every_n_steps or step == self._last_step:
            return
        self._last_step = step
        self._push(trainer, pl_module, f"prefalign: adapters at step {step}", final=False)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_end:
            self._push(trainer, pl_module, f"prefalign: adapters at the end of training (step {trainer.global_step})",
                       final=True)  # fmt: skip

    def _push(self, trainer: L.Trainer, pl_module: L.LightningModule, message: str, final: bool) -> None:
        # Every rank takes part: the strategy gathers sharded weights (FSDP). Only the trained tensors and the run's
        # description are needed, not the checkpoint hook's gathered random and algorithm states.
        state = trainer.strategy.lightning_module_state_dict()
        if not trainer.is_global_zero:
            return
        checkpoint = {**model_part(state, pl_module), "global_step": trainer.global_step}
        saved = Path(trainer.log_dir or ".") / "config.yaml"  # where LightningCLI saved this run's config
        recipe = None
        if saved.is_file():
            try:
                recipe = read_recipe_file(str(saved))
            except ValueError as error:
                hub_log.warning("PushToHub: pushing without a recipe: %s", error)
        try:
            with tempfile.TemporaryDirectory(prefix="prefalign-push-") as folder:
                write_adapter(checkpoint, folder, recipe, repo_id=self.repo_id, base_model=self.base_model)
                _, info = upload(folder, self.repo_id, hub_token(), message, private=self.private,
                                 revision=self.revision, endpoint=self.endpoint)  # fmt: skip
        except Exception as error:
            if final:
                raise
            hub_log.warning("PushToHub: pushing to %s at step %d failed, training goes on (%s: %s)",
                        self.repo_id, trainer.global_step, type(error).__name__, error)  # fmt: skip
            return
        hub_log.info("PushToHub: pushed step %d to %s: commit %s", trainer.global_step, self.repo_id, info.oid)
