"""AlignmentModule: wires the denoiser, the process and the algorithm into Lightning's loop: the optimizer, the
steps of training, validation, test and predict, and what they log. LoRA (``lora``), the reference policy
(``reference``), weights in and out (``weights``), checkpoints' contents (``checkpoints``) and sampling
(``sampling``) live in their own modules; algorithms see the module only through its ``policy``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn

from prefalign import checkpoints, evaluation, reference, sampling, sharding, weights
from prefalign.algorithms.base import Algorithm, denoising_loss
from prefalign.algorithms.sft import SFT
from prefalign.data.skips import SkipSummary
from prefalign.denoisers.base import PortraitDenoiser, frames_of
from prefalign.lora import LoraSettings
from prefalign.paper_metrics import EvaluationSettings, PaperMetrics
from prefalign.policy import ModulePolicy
from prefalign.processes.base import Process
from prefalign.sampling import SamplingSettings
from prefalign.secrets import get_logger

log = get_logger(__name__)


class AlignmentModule(L.LightningModule):
    """The Lightning core shared by every alignment method.

    Args:
        denoiser (PortraitDenoiser): the portrait video model (backbone + codec + conditioning).
        process (Process): flow matching or diffusion: noising, targets, the sampler.
        algorithm (Algorithm | None): the alignment method (``SFT`` when not given). One YAML key swaps it.
        lora (LoraSettings | None): train LoRA adapters (peft) instead of the full weights.
        init_weights (str | None): the weights to start a new run from: a safetensors file of denoiser weights
            (e.g. the demo base checkpoint ``data/base/talkingshapes_base.safetensors``, or ``prefalign export``'s),
            or a checkpoint (``.ckpt``) of a prefalign run of any algorithm: a full run's weights are loaded before
            LoRA is added; a LoRA run's adapters and new modules are continued (``lora`` must match theirs), the
            loaded model being the reference policy. Weights only: step, optimizer and schedule start afresh
            (``--ckpt_path`` resumes a run instead).
        init_adapter (str | None): LoRA adapters to start from: a folder written by ``prefalign push`` or the Hub
            repo it went to (``hub.load_adapter``). Their rank, alpha and targets become the run's LoRA settings (a
            ``lora`` section, if given too, must agree); they are then sampled, evaluated or trained further, with
            the loaded model as the reference policy.
        optimizer (OptimizerCallable): the optimizer, built on the trainable parameters. Its learning rate is
            replaced by the algorithm's ``lr`` where the algorithm sets one (the real-scale recipes keep each
            method's tuned rate in its algorithm file, so that swapping the file swaps the rate).
        lr_scheduler (LRSchedulerCallable | None): a scheduler stepped every optimizer step.
        sampling (SamplingSettings): sampling for validation metrics and ``predict``.
        val_sample_batches (int): validation batches whose videos are sampled and scored (sampling is the
            costly part of validation; the loss is computed on every batch).
        evaluation_dir (str | None): where ``prefalign test`` writes its table (``metrics.csv``,
            ``summary.csv``, ``metrics.json``), ``samples.png`` and ``videos/``; default ``test/`` in the log folder.
        evaluation (EvaluationSettings): the papers' metrics (Sync-C / Sync-D, FID, FVD) for ``prefalign test``
            (``metrics``) and validation (``val_metrics``), with the weights files they need.
    """

    def __init__(
        self,
        denoiser: PortraitDenoiser,
        process: Process,
        algorithm: Optional[Algorithm] = None,
        lora: Optional[LoraSettings] = None,
        init_weights: Optional[str] = None,
        init_adapter: Optional[str] = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        sampling: SamplingSettings = SamplingSettings(),
        val_sample_batches: int = 1,
        evaluation_dir: Optional[str] = None,
        evaluation: EvaluationSettings = EvaluationSettings(),
    ):
        super().__init__()
        self.denoiser = denoiser
        self.process = process
        self.algorithm = algorithm if algorithm is not None else SFT()
        self.lora = lora
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.sampling = sampling
        self.val_sample_batches = val_sample_batches
        self.evaluation_dir = evaluation_dir
        self.evaluation = evaluation
        self._paper_metrics: dict[str, PaperMetrics] = {}  # per split; a dict keeps the networks out of the state dict
        self._reference: Optional[PortraitDenoiser] = None  # full fine-tuning's frozen copy (prefalign.reference)
        weights.start(self, init_weights, init_adapter, lora)  # sets self.lora to the settings it trains with
        self.policy = ModulePolicy(self)  # what the algorithm sees of this module
        self.automatic_optimization = not self.algorithm.manual_optimization
        self._resume_rng: Optional[dict] = None  # this rank's random state from a checkpoint, set at the next step
        self._skips = {"train": SkipSummary(), "val": SkipSummary(), "test": SkipSummary()}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self):
        params = self.trainable_parameters()
        if not params:
            raise ValueError("nothing to train: every parameter is frozen (check `lora` and the denoiser's options)")
        optimizer = self.optimizer_factory(params)
        if self.algorithm.lr is not None:  # the method's tuned rate (before the scheduler records its base rate)
            for group in optimizer.param_groups:
                group["lr"] = self.algorithm.lr
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # --- the reference policy -----------------------------------------------------------------------------------
    def reference(self):
        """Run the frozen reference policy: ``with module.reference() as ref: pred = ref(x_t, t, cond)`` (see
        ``prefalign.reference``)."""
        return reference.reference(self)

    def refresh_reference(self) -> None:
        """Make the reference equal to the current policy (see ``prefalign.reference.refresh``)."""
        reference.refresh(self)

    # --- checkpoints ---------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoints.save_run_state(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._resume_rng = checkpoints.load_run_state(self, checkpoint) or self._resume_rng

    # --- Lightning hooks ------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        sharding.use_uniform_dtype_units(self, self.trainer.strategy)

    def setup(self, stage: str) -> None:
        split = {"test": "test", "fit": "val", "validate": "val"}.get(stage)
        names = {"test": self.evaluation.metrics, "val": self.evaluation.val_metrics}.get(split)
        if names and split not in self._paper_metrics:  # before training: missing weights fail now
            self._paper_metrics[split] = PaperMetrics(self.evaluation, names, self.denoiser.fps,
                                                      self.sample_rate).to(self.device)
        if self._trainer is not None and checkpoints.strategy_loads_weights(self.trainer.strategy):
            # It loads a checkpoint's weights before on_load_checkpoint can put the frozen ones back: not strictly
            # then (they keep the values the recipe loaded), and on_load_checkpoint checks the keys instead.
            self.strict_loading = False
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and hasattr(datamodule, "use_fields"):
            datamodule.use_fields(self.data_fields())  # a column no part of the run reads is then never loaded
        if stage == "fit" and datamodule is not None and hasattr(datamodule, "check_can_feed"):
            datamodule.check_can_feed(self.denoiser, self.algorithm)  # at setup, not mid-epoch
        if stage == "fit" and self.algorithm.needs_reference and self.lora is None and self._reference is None:
            self.refresh_reference()
        if stage == "fit":
            self.algorithm.setup(self.policy)

    def data_fields(self) -> set[str]:
        """The batch fields this run reads: the denoiser's conditions, the algorithm's fields, and ``pose`` where
        the algorithm's reward reads it. The data module's training split loads no optional column outside them
        (a pose column is then ignored there, broken or not); evaluation splits still give pose to the metrics."""
        return set(self.denoiser.required_fields) | self.algorithm.data_fields()

    def on_fit_start(self) -> None:
        if self.algorithm.manual_optimization and sharding.sharded_root(self) is not None:
            raise ValueError(
                f"{self.algorithm.name} under FSDP: it steps its optimizer itself, with backward passes and gradient "
                "clipping inside the training step, which Lightning runs inside the FSDP root's forward; torch's FSDP "
                "allows neither there (Lightning issue #19626). Train it with DDP (recipes/cluster/ddp.yaml)."
            )
        if self.trainer.world_size > 1:
            # seed_everything gives every rank the same seed: without this, all ranks would draw the same noise
            # and timesteps for their different clips. (A resume restores each rank's own state at its first step.)
            torch.manual_seed(torch.initial_seed() + self.trainer.global_rank)

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        if self._resume_rng is not None:  # the first step after a resume draws what the first run drew next
            checkpoints.set_rng_state(self._resume_rng)
            self._resume_rng = None

    def training_step(self, batch: dict, batch_idx: int):
        self._log_skips(batch, "train")
        if batch.get("size", 1) == 0:
            return None  # every sample of this batch was skipped (and counted)
        batch_size = len(batch["id"])
        if self.algorithm.manual_optimization:
            for name, value in self.algorithm.training_step(self.policy, batch).items():
                self.log(f"train/{name}", value, prog_bar=name in ("loss", "reward"), batch_size=batch_size)
            self.algorithm.on_step_end(self.policy, self.global_step)  # manual steps have counted themselves
            return None
        loss, logged = self.algorithm.loss(self.policy, batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{self.algorithm.name}: non-finite loss {loss.item()} at step {self.global_step}")
        for name, value in logged.items():
            self.log(f"train/{name}", value, prog_bar=name == "loss", batch_size=batch_size)
        return loss

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        if gradient_clip_val is None and self.algorithm.max_grad_norm is not None:
            # The algorithm's own clipping (so that it travels with the algorithm file); the trainer's wins if set.
            gradient_clip_val, gradient_clip_algorithm = self.algorithm.max_grad_norm, "norm"
        if not sharding.clip_sharded(self, gradient_clip_val, gradient_clip_algorithm):
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # Here rather than in on_train_batch_end: callbacks (ModelCheckpoint) run first there, and a checkpoint of
        # this step must hold what the algorithm does after it (a refreshed reference, cleared self-play latents). Lightning
        # counts the step only once this hook returns, hence the + 1.
        self.algorithm.on_step_end(self.policy, self.global_step + 1)

    def on_train_epoch_end(self) -> None:
        self._report_skips("train")

    def on_validation_start(self) -> None:
        # Validation in the middle of training must not move the training's random stream (a judge may sample):
        # a resumed run, which does not repeat the validation before its checkpoint, then draws what the first drew.
        self._rng_before_validation = checkpoints.rng_state() if self.trainer.state.fn == TrainerFn.FITTING else None

    def on_validation_end(self) -> None:
        if getattr(self, "_rng_before_validation", None) is not None:
            checkpoints.set_rng_state(self._rng_before_validation)
            self._rng_before_validation = None

    def on_validation_epoch_end(self) -> None:
        paper = self._paper_metrics.get("val")
        if paper is not None:
            for name, (value, count) in paper.set_scores().items():  # a collective: every rank's clips
                if math.isfinite(value):  # the same value on every rank (gathered): logged on each, no reduction
                    self.log(f"val/{name}", value)
            paper.reset()
        self._report_skips("val")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._log_skips(batch, "val")
        if batch.get("size", 1) == 0:
            return
        batch_size, loss = len(batch["id"]), denoising_loss(self.denoiser, self.process, batch, seed=batch_idx)
        self.log("val/loss", loss, prog_bar=True, batch_size=batch_size, sync_dist=True)
        if batch_idx >= self.val_sample_batches:
            return
        video = self.generate(batch, num_frames=batch["video"].shape[1])
        scores = self.score_videos(video, batch, "val")
        for name, value in scores.items():  # nanmean: a judge's dropped clips are NaN
            self.log(f"val/{name}", value.float().nanmean(), prog_bar=name == "sync", batch_size=batch_size,
                     sync_dist=True)
        if batch_idx == 0 and self.trainer.is_global_zero and not self.trainer.sanity_checking:
            self.log_samples(video[:4], {k: v[:4] for k, v in batch.items() if k in ("id", "reference", "video", "audio")})

    def log_samples(self, video: torch.Tensor, batch: dict) -> None:
        """Validation samples: a grid image to the loggers that take pictures, and the videos (with their audio)
        as mp4 files in ``samples/step_N/`` of the log folder."""
        evaluation.log_samples(self.trainer.loggers, self.trainer.log_dir, self.global_step, video, batch,
                               self.denoiser.fps, self.sample_rate)

    # --- evaluation: prefalign test ---------------------------------------------------------------------------------
    def on_test_epoch_start(self) -> None:
        self._test_table = evaluation.EvaluationTable()

    def test_step(self, batch: dict, batch_idx: int) -> None:
        """Sample every test clip, score it (``score_videos``), keep its row for the table, write its video."""
        self._log_skips(batch, "test")
        if batch.get("size", 1) == 0:
            return
        video = self.generate(batch, num_frames=frames_of(batch))
        evaluation.add_test_clips(self._test_table, self.evaluation_folder(), video, batch,
                                  self.score_videos(video, batch, "test"), self.denoiser.fps, self.sample_rate,
                                  grid=batch_idx == 0 and self.trainer.is_global_zero)

    def on_test_epoch_end(self) -> None:
        table = self._test_table.gather()  # a collective: every rank's clips
        paper = self._paper_metrics.get("test")
        if paper is not None:
            table.add_set_scores(paper.set_scores())  # a collective too; NaN where too few clips, never an error
            paper.reset()
        for name, stats in table.summary().items():
            self.log(f"test/{name}", stats["mean"], rank_zero_only=True)
        if self.trainer.is_global_zero:
            evaluation.write_table(table, self.evaluation_folder(), paper.crop_source if paper is not None else None)
        self._report_skips("test")

    def evaluation_folder(self) -> Path:
        """Where ``prefalign test`` writes: ``evaluation_dir``, else ``test/`` in the run's log folder."""
        if self.evaluation_dir is not None:
            return Path(self.evaluation_dir)
        return Path(self.trainer.log_dir or self.trainer.default_root_dir) / "test"

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        num_frames = frames_of(batch)
        video = self.generate(batch, num_frames=num_frames)
        return {"id": batch["id"], "video": video.cpu(), "audio": batch.get("audio")}

    def _log_skips(self, batch: dict, split: str) -> None:
        if "skipped" in batch:
            self.log(f"{split}/skipped_samples", float(batch["skipped"]), reduce_fx="sum", on_step=False,
                     on_epoch=True, batch_size=1, sync_dist=True)
            self._skips[split].add(batch)

    def _report_skips(self, split: str) -> None:
        """The epoch's skipped samples by shard and reason (``on_bad_sample: skip``), then a fresh count."""
        summary, self._skips[split] = self._skips[split], SkipSummary()
        if summary.total:
            title = f"{split} epoch {self.current_epoch}" + (f", rank {self.global_rank}" if self.trainer.world_size > 1 else "")
            log.warning(summary.report(title))

    # --- shared building blocks for algorithms, validation and predict --------------------------------------------------
    @torch.no_grad()
    def generate(self, batch: dict, num_frames: int, settings: Optional[SamplingSettings] = None) -> torch.Tensor:
        """Sample videos ``[B, T, 3, H, W]`` in [0, 1] for the batch's conditions (reference image, audio, pose),
        chunk by chunk where the settings say so (``sampling.generate``)."""
        return sampling.generate(self.denoiser, self.denoiser, self.process, batch, num_frames,
                                 settings or self.sampling)[1]

    @property
    def sample_rate(self) -> int:
        return self.denoiser.audio_encoder.sample_rate if self.denoiser.audio_encoder is not None else 16000

    def score_videos(self, video: torch.Tensor, batch: dict, split: Optional[str] = None) -> dict[str, torch.Tensor]:
        """Per-clip metrics of sampled videos (``evaluation.clip_scores``): TalkingShapes sync, identity, texture,
        jitter and head offset, SSIM and PSNR against the ground truth, every term of the algorithm's reward, and
        the split's paper metrics where they are configured."""
        reward = getattr(self.algorithm, "reward", None)
        scores = evaluation.clip_scores(video, batch, self.denoiser.fps, self.sample_rate, [reward] if reward else None)
        if split in self._paper_metrics:
            scores.update(self._paper_metrics[split].to(video.device).clip_scores(video, batch))
        return scores
