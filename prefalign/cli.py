"""The ``prefalign`` command: ``fit | validate | test | predict`` through LightningCLI, plus plain subcommands."""

from __future__ import annotations

import sys
from typing import Callable, Optional

from jsonargparse import CLI, set_docstring_parse_options
from lightning.pytorch.cli import LightningCLI

from prefalign.data.datamodule import PortraitDataModule
from prefalign.data.synthetic import synth
from prefalign.module import AlignmentModule, export_denoiser_weights
from prefalign.pairs import import_labels, sample_pairs


def export(ckpt_path: str, out: str, dtype: str = "float32") -> None:
    """Write a checkpoint's denoiser weights as one safetensors file (what ``model.init_weights`` loads).

    Args:
        ckpt_path: a Lightning checkpoint of a full-weights run.
        out: the safetensors file to write.
        dtype: dtype of the floating-point tensors written (``float32``, ``float16``, ``bfloat16``).
    """
    export_denoiser_weights(ckpt_path, out, dtype)
    print(f"wrote {out}")


#: Subcommands that are plain typed functions, next to LightningCLI's fit/validate/test/predict.
COMMANDS: dict[str, Callable] = {
    "synth": synth,
    "export": export,
    "pairs": sample_pairs,
    "labels": import_labels,
}

USAGE = """usage: prefalign {fit,validate,test,predict} --config FILE [...]   (LightningCLI; --help on each)
       prefalign {%s} [...]                                            (--help on each)
""" % ",".join(COMMANDS)


def main(args: Optional[list[str]] = None) -> None:
    """Run the CLI on ``args`` (``sys.argv[1:]`` when ``None``) — tests call ``main([...])``."""
    argv = list(sys.argv[1:] if args is None else args)
    set_docstring_parse_options(attribute_docstrings=True)
    if argv and argv[0] in COMMANDS:
        CLI(COMMANDS[argv[0]], args=argv[1:], as_positional=False)
        return
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        if not argv:
            raise SystemExit(2)
    LightningCLI(
        AlignmentModule,
        PortraitDataModule,
        args=args,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )


if __name__ == "__main__":
    main()
