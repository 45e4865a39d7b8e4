"""The ``prefalign`` command: ``fit | validate | test | predict`` through LightningCLI, plus plain subcommands."""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any, Callable, Optional

from jsonargparse import CLI, set_docstring_parse_options
from lightning.pytorch.callbacks import BasePredictionWriter, Callback, ModelCheckpoint, ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins.io import CheckpointIO

from prefalign import recipes
from prefalign.annotate import annotate
from prefalign.callbacks import TrainingCurves, VideoWriter
from prefalign.checkpoints import AtomicCheckpointIO, check_checkpoint
from prefalign.data.datamodule import PortraitDataModule
from prefalign.data.synthetic import synth
from prefalign.denoisers.hallo4 import convert_command as convert_hallo4
from prefalign.hub import push_command
from prefalign.judge_eval import judge_eval_command
from prefalign.module import AlignmentModule
from prefalign.weights import export_denoiser_weights
from prefalign.pairs import import_labels, sample_pairs
from prefalign.preprocess import preprocess_command
from prefalign.secrets import redact_every_log_record, scrubbing


def export(ckpt_path: str, out: str, dtype: str = "float32") -> None:
    """Write a checkpoint's denoiser weights as one safetensors file (what ``model.init_weights`` loads).

    Args:
        ckpt_path: a Lightning checkpoint of a full-weights run.
        out: the safetensors file to write.
        dtype: dtype of the floating-point tensors written (``float32``, ``float16``, ``bfloat16``).
    """
    export_denoiser_weights(ckpt_path, out, dtype)
    print(f"wrote {out}")


#: Subcommands that are plain typed functions (or a dict of them: sub-subcommands), next to LightningCLI's
#: fit/validate/test/predict.
COMMANDS: dict[str, Callable | dict[str, Callable]] = {
    "synth": synth,
    "export": export,
    "pairs": sample_pairs,
    "labels": import_labels,
    "annotate": annotate,
    "judge-eval": judge_eval_command,
    "push": push_command,
    "preprocess": preprocess_command,
    "convert": {"hallo4": convert_hallo4},
}

USAGE = """usage: prefalign {fit,validate,test,predict} --config FILE [...]   (LightningCLI; --help on each)
       prefalign {%s} [...]                                            (--help on each)
""" % ",".join(COMMANDS)


class PrefalignCLI(LightningCLI):
    """LightningCLI with a lab's defaults where a recipe sets none:

    - loggers: CSV and TensorBoard under ``trainer.default_root_dir`` (``csv/``, ``tensorboard/``), and Weights &
      Biases when ``wandb`` is installed and configured (``WANDB_API_KEY`` or ``WANDB_MODE`` set);
    - callbacks: a rich progress bar (loss and reward), the last checkpoint kept (``save_last``, in
      ``default_root_dir/checkpoints``), and the training curves plotted at the end
      (``prefalign.callbacks.TrainingCurves``);
    - ``predict`` only: a ``prefalign.callbacks.VideoWriter`` to ``default_root_dir/predictions`` when no callback
      writes predictions. A predict that writes no video is an error;
    - checkpoints written atomically in their own folder (``prefalign.checkpoints.AtomicCheckpointIO``) unless
      ``trainer.plugins`` names a CheckpointIO, and a damaged ``--ckpt_path`` file refused before anything runs,
      with the newest whole checkpoint beside it named.

    A recipe's own ``trainer.logger`` (``false`` for none) or callbacks take precedence over each default.
    """

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]):
        root = config.get("default_root_dir") or "runs/default"
        config["default_root_dir"] = root
        if config.get("logger") in (None, True):
            loggers = [CSVLogger(root, name="csv"), TensorBoardLogger(root, name="tensorboard")]
            if importlib.util.find_spec("wandb") and ("WANDB_API_KEY" in os.environ or "WANDB_MODE" in os.environ):
                from lightning.pytorch.loggers import WandbLogger

                loggers.append(WandbLogger(save_dir=root))
            config["logger"] = loggers
        given = list(config.get("callbacks") or []) + list(callbacks)
        extra = []
        if config.get("enable_progress_bar", True) is not False and not any(isinstance(c, ProgressBar) for c in given):
            extra.append(RichProgressBar())
        if config.get("enable_checkpointing", True) is not False and not any(isinstance(c, ModelCheckpoint) for c in given):
            # A fixed folder, not the logger's version_N, so that `--ckpt_path last` finds it in a later run.
            extra.append(ModelCheckpoint(dirpath=f"{root}/checkpoints", save_last=True, save_top_k=0))
        if config.get("logger") is not False and not any(isinstance(c, TrainingCurves) for c in given):
            extra.append(TrainingCurves())
        if self.subcommand == "predict" and not any(isinstance(c, BasePredictionWriter) for c in given):
            # Without a writer, predict would sample every video and keep none.
            extra.append(VideoWriter(f"{root}/predictions"))
        plugins = config.get("plugins")
        plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        strategy = config.get("strategy")
        own_io = any(isinstance(p, CheckpointIO) for p in plugins) or getattr(strategy, "_checkpoint_io", None)
        xla = "xla" in f"{strategy} {type(strategy).__name__}".lower() or config.get("accelerator") == "tpu"
        if not own_io and not xla:  # (XLA saves through its own CheckpointIO only)
            # Lightning stages a checkpoint in $TMPDIR, which a "rename" onto NFS or Lustre turns into a copy.
            config["plugins"] = plugins + [AtomicCheckpointIO()]
        return super()._instantiate_trainer(config, callbacks + extra)

    def parse_arguments(self, parser, args) -> None:
        """Parse, then refuse a damaged ``--ckpt_path`` file at once, naming the newest whole checkpoint beside it,
        rather than let LightningCLI's own read of it (for its hyperparameters) fail with a bare ``EOFError``.
        ``last`` and the other keywords are checked as they load (``AtomicCheckpointIO``)."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        config = self.config.get(subcommand) if subcommand else None
        ckpt_path = config.get("ckpt_path") if config is not None else None
        if ckpt_path is None or str(ckpt_path) in ("last", "best", "hpc", "registry") or "://" in str(ckpt_path):
            return
        if os.path.exists(ckpt_path):  # a missing file is Lightning's own clear error
            check_checkpoint(ckpt_path)

    def after_predict(self) -> None:
        """Fail a predict that wrote no video, rather than exit 0 with nothing to show (LightningCLI calls
        ``after_<subcommand>`` once the subcommand has run)."""
        writers = [c for c in self.trainer.callbacks if isinstance(c, VideoWriter)]
        if writers and not any(writer.written for writer in writers):
            source = self.datamodule.sources.get("predict") if isinstance(self.datamodule, PortraitDataModule) else None
            raise RuntimeError(
                f"predict wrote no video: no row of data.predict ({source}) was predicted "
                f"(trainer.limit_predict_batches: {self.trainer.limit_predict_batches})"
            )


@scrubbing  # the error a user sees (printed by Python at exit) shows no token or key, nor do its causes
def _parse_each_docstring_once() -> None:
    """Memoise docstring_parser for the process: jsonargparse parses every offered class's docstrings (attribute
    docs from their source) once per subcommand and call, about 2.5 s a command; a class's docs do not change."""
    import functools

    import docstring_parser

    original = docstring_parser.parse_from_object
    if getattr(original, "memoised", False):
        return
    memo: dict = {}

    @functools.wraps(original)
    def parse_from_object(obj, *args, **kwargs):
        try:
            key = (obj, args, tuple(sorted(kwargs.items())))
            hash(key)
        except TypeError:  # an unhashable object: parse it each time
            return original(obj, *args, **kwargs)
        if key not in memo:
            memo[key] = original(obj, *args, **kwargs)
        return memo[key]

    parse_from_object.memoised = True
    docstring_parser.parse_from_object = parse_from_object


def main(args: Optional[list[str]] = None) -> None:
    """Run the CLI on ``args`` (``sys.argv[1:]`` when ``None``) — tests call ``main([...])``."""
    argv = list(sys.argv[1:] if args is None else args)
    redact_every_log_record()  # no token or key in any log line of the run, the libraries' included
    set_docstring_parse_options(attribute_docstrings=True)
    _parse_each_docstring_once()
    recipes.install()  # bounds on every YAML read from the user: size, nesting, alias expansion
    if argv and argv[0] in COMMANDS:
        CLI(COMMANDS[argv[0]], args=argv[1:], as_positional=False)
        return
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        if not argv:
            raise SystemExit(2)
    PrefalignCLI(
        AlignmentModule,
        PortraitDataModule,
        args=args,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )


if __name__ == "__main__":
    main()
