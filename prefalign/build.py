"""What a recipe builds, for the commands that use a model without training it (``prefalign pairs``, ``prefalign
preprocess``): its model and data module, parsed as ``prefalign fit`` parses them."""

from __future__ import annotations

import warnings
from typing import Sequence

from lightning.pytorch.cli import LightningCLI

from prefalign.data.datamodule import PortraitDataModule
from prefalign.module import AlignmentModule


class _ModelAndData(LightningCLI):
    """LightningCLI that builds a recipe's model and data module, and no Trainer."""

    def instantiate_trainer(self, **kwargs):
        # Nothing is trained: the recipe's Trainer (accelerators, strategy, nodes) is not built.
        return None

    def parse_arguments(self, parser, args):
        with warnings.catch_warnings():
            # The recipe comes in ``args`` on purpose; sys.argv holds the calling command's own arguments.
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            super().parse_arguments(parser, args)


def build_from_recipe(config: str, overrides: Sequence[str] = ()) -> tuple[AlignmentModule, PortraitDataModule]:
    """The model and the data module of a recipe, as ``prefalign fit --config config *overrides`` would build them.

    The recipe's ``trainer`` section is checked like the rest (a key it does not know is an error), but no Trainer
    is built, no config is saved, and no optimizer is configured.

    Args:
        config (str): the recipe (YAML).
        overrides (Sequence[str]): more command-line arguments on top of it, e.g. ``["--data.num_frames", "17"]``.

    Returns:
        tuple[AlignmentModule, PortraitDataModule]: the recipe's ``model`` and ``data``.
    """
    cli = _ModelAndData(
        AlignmentModule,
        PortraitDataModule,
        args=["--config", config, *overrides],
        run=False,
        save_config_callback=None,
        auto_configure_optimizers=False,
    )
    return cli.model, cli.datamodule
