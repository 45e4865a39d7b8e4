"""AlignmentModule: wires the denoiser, the process and the algorithm; owns optimizers, LoRA and the reference policy."""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.trainer.states import TrainerFn
from safetensors.torch import load_file
from torch import nn

from prefalign import checkpoints, evaluation, sharding
from prefalign.paper_metrics import EvaluationSettings, PaperMetrics
from prefalign.algorithms.base import Algorithm, per_sample_mse
from prefalign.algorithms.sft import SFT
from prefalign.data import media
from prefalign.data.skips import SkipSummary
from prefalign.data.errors import DataError
from prefalign.files import atomic_write, inside
from prefalign.denoisers.base import PortraitDenoiser, frames_of, join_chunks
from prefalign.processes.base import Process
from prefalign.secrets import get_logger

log = get_logger(__name__)


@dataclass
class LoraSettings:
    """LoRA adapters (peft) on the backbone; the base weights stay frozen."""

    rank: int = 16
    """Adapter rank r."""
    alpha: Optional[float] = None
    """Scaling numerator: the update is scaled by alpha / rank (defaults to rank, i.e. scale 1)."""
    dropout: float = 0.0
    """Dropout on the adapter's input."""
    target_modules: Optional[list[str]] = None
    """Module names (suffixes) to adapt; defaults to the backbone family's attention and MLP projections."""
    train_new_modules: bool = True
    """Also train the conditioning modules the denoiser adds (audio attention...) in full; their values at the
    start are kept so that ``reference()`` still gives the starting model exactly."""

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"model.lora.rank must be an integer >= 1, got {self.rank!r}")
        if self.alpha is not None and not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"model.lora.alpha must be a number > 0, or null (= rank), got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"model.lora.dropout must be in [0, 1), got {self.dropout!r}")
        if self.target_modules is not None and not self.target_modules:
            raise ValueError("model.lora.target_modules must name modules, or be null (the backbone's defaults), "
                             "got an empty list")


@dataclass
class SamplingSettings:
    """How videos are sampled for validation and ``predict``."""

    num_steps: int = 20
    """Sampler steps from noise to data."""
    guidance_scale: float = 1.0
    """Classifier-free guidance on speech (1 = off; >1 needs a model trained with ``cond_dropout``)."""
    stochastic: bool = False
    """Use the process's stochastic step (SDE / DDIM with eta) instead of the deterministic one."""
    seed: int = 0
    """Seed of the initial noise, so that validation figures are comparable across epochs."""
    chunk_frames: Optional[int] = None
    """Generate videos longer than this many frames in chunks (FlowPortrait's autoregressive generation), each
    starting from the end of the one before; the model's training length is the natural choice. None: one pass."""
    motion_frames: int = 5
    """Frames of the previous chunk that start the next one (the codec's r·n+1, e.g. 5 with Wan's VAE)."""

    def __post_init__(self):
        if isinstance(self.num_steps, bool) or not isinstance(self.num_steps, int) or self.num_steps < 1:
            raise ValueError(f"model.sampling.num_steps must be an integer >= 1, got {self.num_steps!r}")
        if not math.isfinite(self.guidance_scale):
            raise ValueError(f"model.sampling.guidance_scale must be a finite number (1 = off), got "
                             f"{self.guidance_scale!r}")
        if self.chunk_frames is not None and self.chunk_frames < 1:
            raise ValueError(f"model.sampling.chunk_frames must be an integer >= 1, or null (one pass), got "
                             f"{self.chunk_frames!r}")
        if self.chunk_frames is not None and not 0 < self.motion_frames < self.chunk_frames:
            raise ValueError(f"model.sampling.motion_frames must be between 0 and chunk_frames ({self.chunk_frames}), "
                             f"exclusive, got {self.motion_frames!r}")


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
        start = read_start_checkpoint(init_weights) if init_weights and init_weights.endswith(".ckpt") else None
        if init_weights is not None and start is None:
            load_denoiser_weights(denoiser, init_weights)
        elif start is not None and start[1] is None:  # a full fine-tuning run's weights: the base to start from
            load_denoiser_state(denoiser, start[0], init_weights)
        if init_adapter is not None:
            self.lora = self._load_adapter(init_adapter, lora)
            self.refresh_reference()  # the reference is the model as loaded, adapters included
        elif lora is not None:
            self._add_lora(lora)
        else:
            self._trained_in_fp32()
        if start is not None and start[1] is not None:
            self._load_lora_start(init_weights, *start)
        self._reference: Optional[PortraitDenoiser] = None
        self.automatic_optimization = not self.algorithm.manual_optimization
        self._resume_rng: Optional[dict] = None  # this rank's random state from a checkpoint, set at the next step
        self._skips = {"train": SkipSummary(), "val": SkipSummary(), "test": SkipSummary()}

    # --- parameters -------------------------------------------------------------------------------------------------
    def _add_lora(self, settings: LoraSettings) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        backbone = self.denoiser.backbone
        backbone.requires_grad_(False)
        config = LoraConfig(
            r=settings.rank,
            lora_alpha=settings.alpha if settings.alpha is not None else settings.rank,
            lora_dropout=settings.dropout,
            target_modules=list(settings.target_modules or self.denoiser.default_lora_targets),
        )
        inject_adapter_in_model(config, backbone)
        self._train_adapters(settings)

    def _load_adapter(self, source: str, lora: Optional[LoraSettings]) -> LoraSettings:
        from prefalign.hub import load_adapter

        config = load_adapter(self.denoiser, source)
        settings = LoraSettings(
            rank=config.r,
            alpha=config.lora_alpha,
            dropout=config.lora_dropout,
            target_modules=sorted(config.target_modules),
            train_new_modules=lora.train_new_modules if lora is not None else True,
        )
        if lora is not None:
            targets = sorted(lora.target_modules or self.denoiser.default_lora_targets)
            given = (lora.rank, lora.alpha if lora.alpha is not None else lora.rank, targets)
            if given != (settings.rank, settings.alpha, settings.target_modules):
                raise ValueError(
                    f"model.lora (rank {given[0]}, alpha {given[1]}, targets {given[2]}) disagrees with the adapters "
                    f"of {source} (rank {settings.rank}, alpha {settings.alpha}, targets {settings.target_modules})"
                )
        self._train_adapters(settings)
        return settings

    def _load_lora_start(self, path: str, state: dict[str, torch.Tensor], recorded: dict) -> None:
        """Continue the adapters and new modules of a LoRA run's checkpoint (``init_weights``); the loaded model
        is the reference policy (as with ``init_adapter``)."""
        current = checkpoints.lora_metadata(self)
        if current is None:
            raise DataError(f"a LoRA run's checkpoint (rank {recorded['rank']}) starts a LoRA run: set model.lora "
                            f"to rank {recorded['rank']}, alpha {recorded['alpha']}, target_modules "
                            f"{recorded['target_modules']}", path=path, field="model.init_weights")
        fields = ("rank", "alpha", "target_modules")
        if [current[f] for f in fields] != [recorded[f] for f in fields]:
            raise DataError(f"model.lora ({', '.join(f'{f} {current[f]}' for f in fields)}) differs from the "
                            f"checkpoint's ({', '.join(f'{f} {recorded[f]}' for f in fields)})", path=path,
                            field="model.init_weights")
        trained = {name for name, p in self.denoiser.named_parameters() if p.requires_grad}
        result = self.denoiser.load_state_dict(state, strict=False)
        missing = sorted(trained & set(result.missing_keys))
        if result.unexpected_keys or missing:
            raise DataError(f"the checkpoint does not fit this recipe's denoiser: {len(result.unexpected_keys)} "
                            f"tensors without a place (e.g. {result.unexpected_keys[:3]}), {len(missing)} trained "
                            f"tensors missing (e.g. {missing[:3]})", path=path, field="model.init_weights")
        self._trained_in_fp32()
        self.refresh_reference()

    def _train_adapters(self, settings: LoraSettings) -> None:
        """Freeze the base, train the adapters (and the new modules, if so set), snapshot the start for reference()."""
        backbone = self.denoiser.backbone
        for name, param in backbone.named_parameters():
            param.requires_grad_("lora_" in name)
        for module in self.denoiser.new_modules().values():
            module.requires_grad_(settings.train_new_modules)
        self._trained_in_fp32()
        if settings.train_new_modules:
            # Kept as buffers so that a checkpoint carries the reference exactly.
            self.reference_snapshot = nn.Module()
            for name, param in self._new_module_parameters():
                self.reference_snapshot.register_buffer(name.replace(".", "__"), param.detach().clone())

    def _trained_in_fp32(self) -> None:
        """Trained tensors in float32 over a frozen base in the recipe's dtype (cf. diffusers' ``cast_training_params``).

        In bf16 an update smaller than the weight's last bit (bf16 keeps 8: a step of lr 3e-6 on a weight of 0.01 is
        lost) leaves the weight unchanged, and AdamW's state in bf16 loses the small second moments: adapters then
        barely train. Mixed precision (``bf16-mixed``, FSDP's ``param_dtype``) still computes in bf16."""
        for param in self.denoiser.parameters():
            if param.requires_grad and param.dtype != torch.float32:
                param.data = param.data.float()

    def _new_module_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for prefix, module in self.denoiser.new_modules().items():
            for name, param in module.named_parameters():
                yield f"{prefix}.{name}", param

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
    @contextmanager
    def reference(self) -> Iterator[Callable[..., torch.Tensor]]:
        """Run the frozen reference policy: ``with module.reference() as ref: pred = ref(x_t, t, cond)``.

        Under LoRA the adapters are switched off (no second copy of the weights) and any fully trained new
        modules take their starting values; under full fine-tuning it is a frozen copy made at setup.
        """
        with torch.no_grad():
            if self.lora is None:
                if self._reference is None:
                    raise RuntimeError(f"{self.algorithm.name} uses a reference policy but none was set up")
                yield self._reference
                return
            from peft.tuners.tuners_utils import BaseTunerLayer

            snapshot = getattr(self, "reference_snapshot", None)
            values = {} if snapshot is None else {n.replace("__", "."): v for n, v in snapshot.named_buffers()}
            lagged = any("lora_" in name for name in values)  # refresh_reference() snapshotted the adapters
            layers = [] if lagged else [m for m in self.denoiser.modules() if isinstance(m, BaseTunerLayer)]
            for layer in layers:
                layer.enable_adapters(False)
            try:
                if not values:
                    yield self.denoiser
                else:
                    def lagged_policy(*args, **kwargs):
                        with sharding.substituted(self.denoiser, values):
                            return self.denoiser(*args, **kwargs)

                    yield lagged_policy
            finally:
                for layer in layers:
                    layer.enable_adapters(True)

    def refresh_reference(self) -> None:
        """Make the reference equal to the current policy (online DPO, ReFree's lagged reference, self-play).

        Under LoRA the trained tensors (adapters and new modules) are copied into ``reference_snapshot`` and the
        reference runs the adapted model with those values: a lagged copy of what is trained, never of the base.
        Under full fine-tuning the frozen copy takes the current weights.
        """
        if self.lora is not None:
            if not hasattr(self, "reference_snapshot"):
                self.reference_snapshot = nn.Module()
            snapshot = self.reference_snapshot._buffers
            for params in sharding.whole_parameters(self._outermost()):  # under FSDP, one unit at a time
                for name, param in params.items():
                    if not (param.requires_grad and name.startswith("denoiser.")):
                        continue
                    key = name.removeprefix("denoiser.").replace(".", "__")
                    if key in snapshot:
                        snapshot[key].copy_(param.detach())
                    else:
                        self.reference_snapshot.register_buffer(key, param.detach().clone())
            return
        if self._reference is None:
            # Share the frozen codec (and a frozen audio encoder) instead of copying their weights.
            memo = {id(self.denoiser.codec): self.denoiser.codec}
            encoder = self.denoiser.audio_encoder
            if encoder is not None and not any(p.requires_grad for p in encoder.parameters()):
                memo[id(encoder)] = encoder
            self._reference = copy.deepcopy(self.denoiser, memo).requires_grad_(False).eval()
        else:
            sharding.copy_twin(self._outermost(), "denoiser.", "_reference.")  # under FSDP, a unit at a time

    def _outermost(self) -> nn.Module:
        """This module as the strategy wrapped it (the FSDP root), or itself outside a trainer."""
        model = self._trainer.model if self._trainer is not None else None
        return model if model is not None else self

    # --- checkpoints ---------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint.update(checkpoints.model_part(checkpoint["state_dict"], self))
        if self.trainer.fit_loop._should_accumulate():
            log.warning("checkpoint at step %d taken in the middle of a gradient accumulation window: the gradients "
                        "accumulated so far are not saved, so a resume from it is not exact", self.global_step)
        # Every rank's, for an exact resume: ranks draw their own noise and cache their own clips' negatives.
        checkpoint["algorithm_states"] = checkpoints.gathered_objects(self, self.algorithm.state_dict())
        checkpoint["rng_states"] = checkpoints.gathered_objects(self, checkpoints.rng_state())

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        checkpoints.check_run(checkpoint.get("prefalign"), self)
        fitting = self._trainer is not None and self.trainer.state.fn == TrainerFn.FITTING
        recorded = (checkpoint.get("prefalign") or {}).get("algorithm")
        if fitting and recorded is not None and recorded != self.algorithm.name:
            raise ValueError(
                f"--ckpt_path resumes a run, with its step, optimizer and schedule: this checkpoint is a {recorded} "
                f"run's, this recipe trains {self.algorithm.name}. To start a {self.algorithm.name} run from its "
                "weights, give it as --model.init_weights (and no --ckpt_path)"
            )
        state = checkpoint.get("state_dict")  # absent where the strategy (FSDP) has loaded the weights itself
        if state is not None:
            self._complete_state(state)
        else:
            checkpoints.check_loaded_keys(checkpoint.get("prefalign"), self)
        if not fitting:
            return
        rank, world = self.trainer.global_rank, self.trainer.world_size
        states, algorithm_states = checkpoint.get("rng_states"), checkpoint.get("algorithm_states")
        if states and len(states) != world:
            log.warning("the checkpoint was written by %d processes, this run has %d: the resumed run will not "
                        "repeat the first one's noise, and ranks start from rank 0's algorithm state", len(states), world)
        if algorithm_states:
            self.algorithm.load_state_dict(algorithm_states[rank if rank < len(algorithm_states) else 0])
        if states:
            self._resume_rng = states[rank] if rank < len(states) else None

    def _complete_state(self, state: dict) -> None:
        """Make a checkpoint's state dict fit this module: the frozen part back in, a full fine-tuning reference
        dropped when nothing needs it, a lagged reference snapshot's buffers registered."""
        if self._reference is None and any(k.startswith(checkpoints.REFERENCE) for k in state):
            # A full fine-tuning reference: needed to resume training, not to sample or evaluate.
            for key in [k for k in state if k.startswith(checkpoints.REFERENCE)]:
                del state[key]
        snapshot = [key for key in state if key.startswith("reference_snapshot.")]
        if snapshot and not hasattr(self, "reference_snapshot"):
            self.reference_snapshot = nn.Module()
        for key in snapshot:  # a lagged reference's snapshot (refresh_reference) has more tensors than the start's
            name = key.removeprefix("reference_snapshot.")
            if name not in self.reference_snapshot._buffers:
                self.reference_snapshot.register_buffer(name, torch.empty_like(state[key], device=self.device))
        checkpoints.restore_frozen(state, self)

    # --- Lightning hooks ------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        from lightning.pytorch.strategies import FSDPStrategy

        strategy = self.trainer.strategy
        if isinstance(strategy, FSDPStrategy):
            # FSDP needs one dtype per unit: the recipe's units (the transformer blocks) plus the adapters apart.
            policy = sharding.uniform_dtype_policy(self, strategy.kwargs.get("auto_wrap_policy"))
            if policy is not None:
                strategy.kwargs["auto_wrap_policy"] = policy

    def setup(self, stage: str) -> None:
        names = {"test": self.evaluation.metrics, "val": self.evaluation.val_metrics}
        for split in ("test",) if stage == "test" else ("val",) if stage in ("fit", "validate") else ():
            if names[split] and split not in self._paper_metrics:  # before training: missing weights fail now
                self._paper_metrics[split] = PaperMetrics(self.evaluation, names[split], self.denoiser.fps,
                                                          self.sample_rate).to(self.device)
        if self._trainer is not None and checkpoints.strategy_loads_weights(self.trainer.strategy):
            # It loads a checkpoint's weights before on_load_checkpoint can put the frozen ones back: not strictly
            # then (they keep the values the recipe loaded), and on_load_checkpoint checks the keys instead.
            self.strict_loading = False
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and hasattr(datamodule, "use_fields"):
            datamodule.use_fields(self.data_fields())  # a column no part of the run reads is then never loaded
        if stage == "fit" and datamodule is not None and hasattr(datamodule, "available_fields"):
            cache = datamodule.cache("train")
            if cache is not None:
                cache.check(self.denoiser, datamodule.fps, datamodule.sample_rate, datamodule.num_frames,
                            source=datamodule.sources["train"])
            available, source = datamodule.available_fields("train"), datamodule.source("train")
            self.algorithm.check_fields(available, source)
            for field in self.denoiser.required_fields:
                if field not in available:
                    raise DataError(
                        f"the denoiser is conditioned on '{field}', which this dataset does not provide "
                        f"(it has: {', '.join(sorted(available))})",
                        path=source,
                        field=field,
                    )
        if stage == "fit" and self.algorithm.needs_reference and self.lora is None and self._reference is None:
            self.refresh_reference()
        if stage == "fit":
            self.algorithm.setup(self)

    def data_fields(self) -> set[str]:
        """The batch fields this run reads: the denoiser's conditions, the algorithm's fields, and ``pose`` where
        the algorithm's reward reads it. The data module's training split loads no optional column outside them
        (a pose column is then ignored there, broken or not); evaluation splits still give pose to the metrics."""
        fields = set(self.denoiser.required_fields) | set(self.algorithm.required_fields)
        if getattr(getattr(self.algorithm, "reward", None), "reads_pose", False):
            fields.add("pose")
        return fields

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
            for name, value in self.algorithm.training_step(self, batch).items():
                self.log(f"train/{name}", value, prog_bar=name in ("loss", "reward"), batch_size=batch_size)
            self.algorithm.on_step_end(self, self.global_step)  # manual steps have counted themselves
            return None
        loss, logged = self.algorithm.loss(self, batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{self.algorithm.name}: non-finite loss {loss.item()} at step {self.global_step}")
        for name, value in logged.items():
            self.log(f"train/{name}", value, prog_bar=name == "loss", batch_size=batch_size)
        return loss

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        if gradient_clip_val is None and self.algorithm.max_grad_norm is not None:
            # The algorithm's own clipping (so that it travels with the algorithm file); the trainer's wins if set.
            gradient_clip_val, gradient_clip_algorithm = self.algorithm.max_grad_norm, "norm"
        root = sharding.sharded_root(self)
        if root is not None and gradient_clip_val and gradient_clip_algorithm in (None, "norm"):
            # The norm is over every rank's shard: only the FSDP root can take it (Lightning's FSDP plugin refuses).
            root.clip_grad_norm_(gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # Here rather than in on_train_batch_end: callbacks (ModelCheckpoint) run first there, and a checkpoint of
        # this step must hold what the algorithm does after it (a refreshed reference, a cleared cache). Lightning
        # counts the step only once this hook returns, hence the + 1.
        self.algorithm.on_step_end(self, self.global_step + 1)

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
        batch_size = len(batch["id"])
        self.log("val/loss", self.denoising_loss(batch, seed=batch_idx), prog_bar=True, batch_size=batch_size,
                 sync_dist=True)
        if batch_idx >= self.val_sample_batches:
            return
        video = self.generate(batch, num_frames=batch["video"].shape[1])
        scores = self.score_videos(video, batch)
        if "val" in self._paper_metrics:
            scores.update(self._paper_metrics["val"].to(video.device).clip_scores(video, batch))
        for name, value in scores.items():  # nanmean: a judge's dropped clips are NaN
            self.log(f"val/{name}", value.float().nanmean(), prog_bar=name == "sync", batch_size=batch_size,
                     sync_dist=True)
        if batch_idx == 0 and self.trainer.is_global_zero and not self.trainer.sanity_checking:
            self.log_samples(video[:4], {k: v[:4] for k, v in batch.items() if k in ("id", "reference", "video", "audio")})

    def log_samples(self, video: torch.Tensor, batch: dict) -> None:
        """Validation samples: a grid image to the loggers that take pictures, and the videos (with their audio)
        as mp4 files in ``samples/step_N/`` of the log folder."""
        grid = evaluation.sample_grid(video.cpu(), references=batch["reference"].cpu(), targets=batch["video"].cpu(),
                                      labels=batch["id"])
        log_image(self.trainer.loggers, "val/samples", grid, self.global_step)
        if self.trainer.log_dir is None:
            return
        folder = inside(self.trainer.log_dir, "samples", f"step_{self.global_step:06d}")
        # Validation rows may repeat an id (a pairs manifest judges one clip several times): one video per id.
        first: dict[str, int] = {}
        for index, clip_id in enumerate(batch["id"]):
            first.setdefault(clip_id, index)
        keep = list(first.values())
        media.write_clips(folder, video[keep], [batch["id"][i] for i in keep], self.denoiser.fps,
                          batch["audio"][keep], self.sample_rate)

    # --- evaluation: prefalign test ---------------------------------------------------------------------------------
    def on_test_epoch_start(self) -> None:
        self._test_table = evaluation.EvaluationTable()

    def test_step(self, batch: dict, batch_idx: int) -> None:
        """Sample every test clip, score it (``score_videos``), keep its row for the table, write its video."""
        self._log_skips(batch, "test")
        if batch.get("size", 1) == 0:
            return
        num_frames = frames_of(batch)
        video = self.generate(batch, num_frames=num_frames)
        out = self.evaluation_folder()
        files = media.write_clips(inside(out, "videos"), video, batch["id"], self.denoiser.fps, batch["audio"],
                                  self.sample_rate)
        scores = self.score_videos(video, batch)
        if "test" in self._paper_metrics:
            scores.update(self._paper_metrics["test"].to(video.device).clip_scores(video, batch))
        # Each row names the file its video went to: an id is not always its file's name (see files.safe_name).
        self._test_table.add(batch["id"], scores,
                             videos=[path.relative_to(out).as_posix() for path in files])
        if batch_idx == 0 and self.trainer.is_global_zero:
            evaluation.sample_grid(video[:8].cpu(), out / "samples.png", references=batch["reference"][:8].cpu(),
                                   targets=batch["video"][:8].cpu() if "video" in batch else None,
                                   labels=batch["id"][:8])

    def on_test_epoch_end(self) -> None:
        table = self._test_table.gather()  # a collective: every rank's clips
        paper = self._paper_metrics.get("test")
        if paper is not None:
            table.add_set_scores(paper.set_scores())  # a collective too; NaN where too few clips, never an error
            paper.reset()
            if paper.crop_source is not None and self.trainer.is_global_zero:
                print(f"  SyncNet's crops came from: {paper.crop_source}")
        for name, stats in table.summary().items():
            self.log(f"test/{name}", stats["mean"], rank_zero_only=True)
        if self.trainer.is_global_zero:
            out = self.evaluation_folder()
            table.write(out)
            rows = [(name, stats["mean"], stats["std"], stats["count"]) for name, stats in table.summary().items()]
            print(f"evaluation of {len(table.rows())} clips written to {out}")
            if table.repeated_ids:
                print(f"  {table.repeated_ids} rows repeated a clip id already in the table and were left out "
                      "(DistributedSampler pads ranks with repeated clips; or the manifest repeats ids)")
            for name, mean, std, count in rows:
                print(f"  {name:<20} {mean!r:>24} ± {std!r} (n={count})")
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
    def denoising_loss(self, batch: dict, seed: int = 0) -> torch.Tensor:
        """The plain denoising loss with seeded noise and timesteps: comparable across epochs and algorithms."""
        generator = torch.Generator(device=self.device).manual_seed(seed)
        x0 = self.denoiser.latents(batch)
        cond = self.denoiser.condition(batch)
        eps = torch.randn(x0.shape, generator=generator, device=self.device, dtype=x0.dtype)
        t = self.process.sample_t(x0.shape[0], device=self.device, generator=generator)
        pred = self.denoiser(self.process.noise(x0, eps, t), self.process.model_time(t), cond)
        return per_sample_mse(pred, self.process.target(x0, eps, t)).mean()

    @torch.no_grad()
    def generate(self, batch: dict, num_frames: int, settings: Optional[SamplingSettings] = None) -> torch.Tensor:
        """Sample videos ``[B, T, 3, H, W]`` in [0, 1] for the batch's conditions (reference image, audio, pose).

        With ``settings.chunk_frames`` set and ``num_frames`` longer than it, the video is made chunk by chunk
        (see :meth:`generate_chunks`)."""
        settings = settings or self.sampling
        if settings.chunk_frames is None or num_frames <= settings.chunk_frames:
            generator = torch.Generator(device=self.device).manual_seed(settings.seed)
            return self._sample(batch, num_frames, settings, generator)
        return join_chunks(self.generate_chunks(batch, num_frames, settings), settings.motion_frames, num_frames)

    @torch.no_grad()
    def generate_chunks(self, batch: dict, num_frames: int, settings: Optional[SamplingSettings] = None) -> list:
        """Autoregressive long-video generation (FlowPortrait): chunks of ``chunk_frames`` frames, each starting
        with the last ``motion_frames`` frames of the one before.

        Those frames are given, not generated: at every sampler step the first latent frames of the new chunk are
        set to the previous chunk's encoded tail, noised to the current noise level (and set exactly at the end),
        so the rest of the chunk is denoised in their context. Audio and pose are cut to each chunk's frames (the
        tail of the last chunk is padded and cropped away by :meth:`generate`). Works with every process and
        backbone, with no training of its own.

        Returns:
            list[Tensor]: the chunks ``[B, chunk_frames, 3, H, W]``; chunk k+1's first ``motion_frames`` frames are
            chunk k's last ones.
        """
        settings = settings or self.sampling
        size, overlap = settings.chunk_frames, settings.motion_frames
        codec = self.denoiser.codec
        codec.num_latent_frames(size)
        codec.num_latent_frames(overlap)
        if not 0 < overlap < size:
            raise ValueError(f"motion_frames ({overlap}) must be between 0 and chunk_frames ({size})")
        generator = torch.Generator(device=self.device).manual_seed(settings.seed)
        chunks, start = [], 0
        while True:
            part = self.denoiser.chunk_inputs(batch, start, size)
            known = codec.encode(chunks[-1][:, -overlap:]) if chunks else None
            chunks.append(self._sample(part, size, settings, generator, known))
            if start + size >= num_frames:
                return chunks
            start += size - overlap

    def _sample(self, batch: dict, num_frames: int, settings: SamplingSettings, generator: torch.Generator,
                known: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One sampler run, decoded; ``known`` latents, if given, fix the first latent frames (see
        :meth:`generate_chunks`)."""
        return self.denoiser.decode(self.sample_latents(batch, num_frames, settings, generator, known))

    @torch.no_grad()
    def sample_latents(self, batch: dict, num_frames: int, settings: SamplingSettings, generator: torch.Generator,
                       known: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One sampler run from the prior to latents ``[B, C, F, h, w]`` for the batch's conditions."""
        reference = batch["reference"]
        shape = (reference.shape[0], *self.denoiser.latent_shape(num_frames, *reference.shape[-2:]))
        cond = self.denoiser.condition(batch, num_frames=num_frames)
        x = self.process.prior(shape, device=self.device, generator=generator).to(reference.dtype)
        schedule = self.process.timesteps(settings.num_steps, device=self.device)
        uncond = None
        if settings.guidance_scale != 1.0:
            uncond = self.denoiser.drop_conditions(cond, torch.zeros(shape[0], dtype=torch.bool, device=self.device))
        if known is not None:
            m = known.shape[2]
            known_noise = self.process.prior(known.shape, device=self.device, generator=generator).to(known.dtype)
        for t, t_next in zip(schedule[:-1], schedule[1:]):
            if known is not None:
                x = torch.cat([self.process.noise(known, known_noise, t.expand(shape[0])), x[:, :, m:]], dim=2)
            model_t = self.process.model_time(t.expand(shape[0]))
            pred = self.denoiser(x, model_t, cond)
            if uncond is not None:
                pred_uncond = self.denoiser(x, model_t, uncond)
                pred = pred_uncond + settings.guidance_scale * (pred - pred_uncond)
            x = self.process.step(pred, x, t, t_next, stochastic=settings.stochastic, generator=generator).sample
        if known is not None:
            x = torch.cat([known.to(x.dtype), x[:, :, m:]], dim=2)
        return x

    @property
    def sample_rate(self) -> int:
        return self.denoiser.audio_encoder.sample_rate if self.denoiser.audio_encoder is not None else 16000

    def score_videos(self, video: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        """Per-clip metrics of sampled videos (``evaluation.clip_scores``): TalkingShapes sync, identity, texture,
        jitter and head offset, SSIM and PSNR against the ground truth, and every term of the algorithm's reward."""
        reward = getattr(self.algorithm, "reward", None)
        return evaluation.clip_scores(video, batch, self.denoiser.fps, self.sample_rate, [reward] if reward else None)


def log_image(loggers: list, tag: str, image, step: int) -> None:
    """An ``[H, W, 3]`` uint8 picture to every logger that takes pictures (TensorBoard, Weights & Biases)."""
    for logger in loggers:
        experiment = logger.experiment
        if hasattr(experiment, "add_image"):  # TensorBoard's SummaryWriter
            experiment.add_image(tag, image, step, dataformats="HWC")
        elif hasattr(logger, "log_image"):  # WandbLogger
            logger.log_image(key=tag, images=[image], step=step)


def read_start_checkpoint(path: str) -> tuple[dict[str, torch.Tensor], Optional[dict]]:
    """The denoiser tensors of a Lightning checkpoint written by prefalign (``model.init_weights``: a new run from
    a trained one) and its LoRA settings (None for a full fine-tuning run). Read with ``weights_only`` (no code is
    unpickled) and memory-mapped."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        raise DataError("checkpoint not found", path=path, field="model.init_weights") from None
    except Exception as error:
        raise DataError(f"cannot read the checkpoint ({type(error).__name__}: {str(error)[:200]})", path=path,
                        field="model.init_weights") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise DataError("not a Lightning checkpoint (no state_dict)", path=path, field="model.init_weights")
    recorded = checkpoint.get("prefalign")
    if not isinstance(recorded, dict):
        raise DataError("not a checkpoint of a prefalign run (no 'prefalign' record)", path=path,
                        field="model.init_weights")
    state = {key.removeprefix("denoiser."): value for key, value in checkpoint["state_dict"].items()
             if key.startswith("denoiser.")}
    return state, recorded.get("lora")


def load_denoiser_weights(denoiser: PortraitDenoiser, path: str) -> None:
    """Load a safetensors file of denoiser weights; every tensor in the file must find its parameter."""
    try:
        state = load_file(path)
    except FileNotFoundError:
        raise DataError("weights file not found", path=path, field="model.init_weights") from None
    except Exception as error:  # safetensors raises its own error types for corrupt headers
        raise DataError(f"cannot read weights ({error})", path=path, field="model.init_weights") from None
    load_denoiser_state(denoiser, state, path)


def load_denoiser_state(denoiser: PortraitDenoiser, state: dict[str, torch.Tensor], path: str) -> None:
    """Load full denoiser weights (the codec and audio encoder may be left out); every tensor must find its place
    and every other denoiser tensor must be there."""
    result = denoiser.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise DataError(
            f"{len(result.unexpected_keys)} tensors do not belong to this denoiser, e.g. {result.unexpected_keys[:3]} "
            "(does the recipe's denoiser config match the one the weights were trained with?)",
            path=path,
            field="model.init_weights",
        )
    trained = [k for k in result.missing_keys if not k.startswith(("codec.", "audio_encoder."))]
    if trained:
        raise DataError(
            f"{len(trained)} denoiser tensors are missing, e.g. {trained[:3]}", path=path, field="model.init_weights"
        )


def export_denoiser_weights(checkpoint: str, out: str, dtype: str = "float32") -> None:
    """Write the denoiser weights of a Lightning checkpoint as one safetensors file (what ``init_weights`` reads),
    floating-point tensors cast to ``dtype`` (``float16`` halves the file; loading casts back to the model's)."""
    from safetensors.torch import save_file

    allowed = ("float32", "float16", "bfloat16")
    if dtype not in allowed:  # an integer dtype would round every weight to zero and still "succeed"
        raise ValueError(f"--dtype must be one of {', '.join(allowed)} (a floating dtype), got {dtype!r}")
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    weights = {
        key.removeprefix("denoiser."): (value.to(getattr(torch, dtype)) if value.is_floating_point() else value).contiguous()
        for key, value in state.items()
        if key.startswith("denoiser.") and not key.startswith("denoiser.codec.")
    }
    if any("lora_" in key for key in weights):
        raise ValueError(f"{checkpoint} is a LoRA run: export its adapters, not merged base weights")
    with atomic_write(out) as tmp:
        save_file(weights, str(tmp), metadata={"source": str(checkpoint)})
