"""Share LoRA runs on the Hugging Face Hub: a checkpoint's adapters as a peft folder with a model card, pushed from
the command line (``prefalign push``) or during training (``prefalign.callbacks.PushToHub``), and loaded back onto a
denoiser."""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

import torch
from safetensors.torch import load_file, save_file

from prefalign.files import atomic_write, inside
from prefalign.lora import peft_config
from prefalign.recipes import read_recipe_file
from prefalign.secrets import get_logger, scrubbing

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo
    from peft import LoraConfig

    from prefalign.denoisers.base import PortraitDenoiser

#: The Hub's logger: ``prefalign.callbacks.PushToHub`` logs its pushes here.
log = get_logger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MODULES = "prefalign_modules.safetensors"
RECIPE = "prefalign_recipe.yaml"
CARD = "README.md"
#: How peft names adapter tensors on disk (``PeftModel.save_pretrained``): the wrapped model's prefix, no adapter name.
PEFT_PREFIX = "base_model.model."
NO_TOKEN = (
    "no Hugging Face token found: log in with `hf auth login`, or set the HF_TOKEN "
    "environment variable to a token with write access (https://huggingface.co/settings/tokens)"
)


# --- the folder ----------------------------------------------------------------------------------------------------
def write_adapter(
    checkpoint: dict,
    folder: Union[str, Path],
    recipe: Optional[str] = None,
    eval_table: Optional[dict] = None,
    *,
    repo_id: Optional[str] = None,
    license: Optional[str] = None,
    base_model: Optional[str] = None,
) -> Path:
    """Write a LoRA checkpoint as a folder peft and the Hub understand.

    Files: ``adapter_config.json`` and ``adapter_model.safetensors`` (what ``PeftModel.from_pretrained`` reads, for
    the backbone), ``prefalign_modules.safetensors`` (the conditioning modules prefalign adds, trained in full),
    ``prefalign_recipe.yaml`` (when ``recipe`` is given) and a model card ``README.md``.

    Args:
        checkpoint (dict): a Lightning checkpoint of a LoRA run: ``state_dict`` holding the trained tensors and
            ``prefalign`` describing the run (what ``AlignmentModule.on_save_checkpoint`` writes).
        folder (str | Path): where to write (created if missing).
        recipe (str | None): the run's YAML config, shown in the card and written as ``prefalign_recipe.yaml``.
        eval_table (dict | None): the JSON ``prefalign test`` writes (``{"metrics": {name: {"mean", "std"}}}``).
        repo_id (str | None): the Hub repo the folder goes to, named in the card's loading code.
        license (str | None): the license id for the card's metadata (e.g. ``apache-2.0``).
        base_model (str | None): the Hub id (``owner/name``) of the base model, instead of the one the checkpoint
            records (which may be a local folder). The card's metadata names a base model by Hub id only (the Hub
            rejects anything else): without one, it names none (see :func:`hub_base_model`); ``adapter_config.json``
            then keeps the recorded folder, as peft writes it.

    Returns:
        Path: the folder.
    """
    meta, state = checkpoint.get("prefalign"), checkpoint["state_dict"]
    if (meta is not None and meta.get("lora") is None) or not any(".lora_" in key for key in state):
        raise ValueError(
            "this is a full-weights checkpoint: it has no LoRA adapters to push. Write its denoiser weights with "
            "`prefalign export --ckpt_path CKPT --out weights.safetensors` and share that file instead"
        )
    if meta is None:
        raise ValueError(
            "this checkpoint has no 'prefalign' entry describing the run (it was not saved by prefalign's "
            "AlignmentModule, or by an older version): cannot tell its LoRA settings"
        )
    if base_model is not None and not is_repo_id(base_model):
        raise ValueError(f"base_model must be a Hub repo id, owner/name, got {base_model!r}")
    adapter, modules = split_trained_tensors(state)
    lora = meta["lora"]
    hub_id = base_model or hub_base_model(meta.get("base_model"))
    config = peft_config(lora, hub_id or meta.get("base_model"), inference_mode=True)  # as peft saves it
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    description = {
        "algorithm": meta.get("algorithm"),
        "denoiser": meta.get("denoiser"),
        "base_model": hub_id or meta.get("base_model"),
        "train_new_modules": lora.get("train_new_modules"),
        "global_step": checkpoint.get("global_step"),
    }
    with atomic_write(inside(folder, ADAPTER_CONFIG)) as tmp:
        tmp.write_text(json.dumps(peft_config_dict(config), indent=2, sort_keys=True))
    with atomic_write(inside(folder, ADAPTER_WEIGHTS)) as tmp:
        save_file(adapter, tmp, metadata={"format": "pt"})
    with atomic_write(inside(folder, MODULES)) as tmp:
        save_file(modules, tmp, metadata={"format": "pt", "prefalign": json.dumps(description)})
    if recipe is not None:
        with atomic_write(inside(folder, RECIPE)) as tmp:
            tmp.write_text(recipe)
    card = model_card(description, config, recipe, eval_table, repo_id=repo_id, license=license, base_model=hub_id)
    with atomic_write(inside(folder, CARD)) as tmp:
        tmp.write_text(card)
    return folder


def split_trained_tensors(state_dict: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """A checkpoint's trained tensors as (adapters under peft's on-disk names, new-module tensors by their path in
    the denoiser). The reference snapshot and anything outside the denoiser are left out."""
    adapter, modules = {}, {}
    for key, value in state_dict.items():
        if not key.startswith("denoiser."):
            continue  # reference_snapshot.*: the starting values, not part of the trained model
        name = key.removeprefix("denoiser.")
        if ".base_layer." in name:
            raise ValueError(
                f"the checkpoint holds frozen base weights ({key}): a LoRA checkpoint should keep only the trained "
                "tensors (adapters and new modules); was it written by an older prefalign?"
            )
        if ".lora_" in name:
            if not name.startswith("backbone."):
                raise ValueError(f"LoRA tensor outside the backbone: {key}")
            # peft's files drop the adapter name: blocks.0.attn1.to_q.lora_A.default.weight → ...lora_A.weight
            peft_name = re.sub(r"(\.lora_\w+)\.default(?=\.|$)", r"\1", name.removeprefix("backbone."))
            adapter[PEFT_PREFIX + peft_name] = value.detach().cpu().contiguous()
        else:
            modules[name] = value.detach().cpu().contiguous()
    return adapter, modules


def peft_config_dict(config: "LoraConfig") -> dict:
    """``config.to_dict()`` as peft writes it to ``adapter_config.json`` (sets as lists, enums as their values)."""
    return json.loads(
        json.dumps(config.to_dict(), default=lambda value: sorted(value) if isinstance(value, set) else str(value))
    )


def is_repo_id(text: str) -> bool:
    """Whether ``text`` reads as a Hub model repo id, ``owner/name`` ("./runs/x", "/abs/path", "a/b/c" do not)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return text.count("/") == 1 and not text.startswith((".", "~"))


def hub_base_model(recorded: Optional[str]) -> Optional[str]:
    """The Hub id to name as a model card's ``base_model``, for the base model a checkpoint records.

    A Hub id (and not a folder here) is itself; a folder in huggingface_hub's cache
    (``.../models--owner--name/snapshots/REV``) is the repo it was downloaded from. Anything else (another local
    folder) has no id: None, with a warning saying how to give one.
    """
    if recorded is None:
        return None
    if is_repo_id(recorded) and not Path(recorded).expanduser().exists():
        return recorded
    parts = Path(recorded).parts
    for index, part in enumerate(parts[:-1]):
        if part.startswith("models--") and parts[index + 1] == "snapshots":
            repo_id = part.removeprefix("models--").replace("--", "/")
            if is_repo_id(repo_id):
                return repo_id
    warnings.warn(
        f"the base model {recorded} is a local folder, not a Hub repo id (owner/name): the model card names no base "
        "model (the Hub accepts repo ids only there). Give the Hub id its weights came from with "
        "`--base_model owner/name` (PushToHub(base_model=...))",
        stacklevel=2,
    )
    return None


# --- the model card ------------------------------------------------------------------------------------------------
def model_card(
    description: dict,
    config: "LoraConfig",
    recipe: Optional[str] = None,
    eval_table: Optional[dict] = None,
    *,
    repo_id: Optional[str] = None,
    license: Optional[str] = None,
    base_model: Optional[str] = None,
) -> str:
    """The README.md: Hub metadata (YAML front matter) and a body saying what was trained and how to load it.
    ``base_model`` is the base model's Hub id for the metadata; ``description["base_model"]`` what the run used."""
    from huggingface_hub import ModelCardData

    algorithm = description.get("algorithm") or "unknown algorithm"
    denoiser = description.get("denoiser") or "PortraitDenoiser"
    used = description.get("base_model")
    tags = ["prefalign", "talking-head", "lora", "peft"]
    if description.get("algorithm"):
        tags.append(description["algorithm"].lower())
    metadata = ModelCardData(base_model=base_model, library_name="peft", license=license, tags=tags)
    source = repo_id or "path/to/this/folder"
    title = repo_id.split("/")[-1] if repo_id else f"{algorithm} LoRA"
    step = description.get("global_step")
    lines = [
        "---", metadata.to_yaml(), "---", "",
        f"# {title}", "",
        f"LoRA adapters for the backbone of a `{denoiser}` talking-head video model, trained with **{algorithm}** "
        f"in prefalign{f' for {step} optimizer steps' if step else ''}.",
        f"Base model: `{base_model}`." if base_model
        else f"Base model: the local folder `{used}` (no Hub id known for it)." if used
        else "Base model: built from the recipe below (no pretrained id recorded).",
        "",
        "| rank | alpha | dropout | adapted modules |",
        "|---|---|---|---|",
        f"| {config.r} | {config.lora_alpha} | {config.lora_dropout} | {', '.join(sorted(config.target_modules))} |",
        "",
        "## Files", "",
        f"- `{ADAPTER_CONFIG}`, `{ADAPTER_WEIGHTS}`: the backbone's adapters, in peft's format.",
        f"- `{MODULES}`: the conditioning modules prefalign adds to the backbone (speech cross-attention, motion), "
        + ("trained in full." if description.get("train_new_modules") else "not trained in this run (empty)."),
    ]  # fmt: skip
    if recipe is not None:
        lines.append(f"- `{RECIPE}`: the training recipe (`prefalign fit --config {RECIPE}`).")
    lines += [
        "", "## How to load", "",
        "The whole model with prefalign (adapters and conditioning modules), on the denoiser the recipe builds:", "",
        "```python", "from prefalign.hub import load_adapter", "",
        "denoiser = ...  # model.denoiser of the recipe, with the base weights",
        f'load_adapter(denoiser, "{source}")', "```", "",
        "The backbone alone with peft (without the conditioning modules it does not hear the speech):", "",
        "```python", "from peft import PeftModel", "",
        "backbone = ...  # the diffusers backbone, e.g. denoiser.backbone",
        f'backbone = PeftModel.from_pretrained(backbone, "{source}")', "```",
    ]  # fmt: skip
    if eval_table is not None:
        lines += ["", "## Evaluation", "", eval_markdown(eval_table)]
    if recipe is not None:
        fence = "`" * max(3, 1 + max((len(run) for run in re.findall(r"`+", recipe)), default=0))
        lines += ["", "## Recipe", "", f"{fence}yaml", recipe.rstrip("\n"), fence]
    return "\n".join(lines) + "\n"


def eval_markdown(table: dict) -> str:
    """A markdown table of ``prefalign test``'s JSON: one row per metric, ``mean ± std``."""
    metrics = table.get("metrics", {k: v for k, v in table.items() if k != "clips"})
    rows = ["| metric | mean ± std |", "|---|---|"]
    for name, value in metrics.items() if isinstance(metrics, dict) else ():
        mean, std = (value.get("mean"), value.get("std")) if isinstance(value, dict) else (value, None)
        if not isinstance(mean, (int, float)):
            continue
        if math.isnan(mean):  # no clip gave a value
            rows.append(f"| {name} | n/a |")
            continue
        spread = f" ± {std:.2g}" if isinstance(std, (int, float)) and not math.isnan(std) else ""
        rows.append(f"| {name} | {mean:.4g}{spread} |")
    if len(rows) == 2:
        return "(no metrics in the evaluation table)"
    clips = table.get("clips")
    if isinstance(clips, list):
        rows += ["", f"On {len(clips)} held-out clips."]
    return "\n".join(rows)


# --- pushing -------------------------------------------------------------------------------------------------------
def push(
    ckpt_path: Union[str, Path],
    repo_id: str,
    config: Optional[Union[str, Path]] = None,
    private: bool = False,
    revision: Optional[str] = None,
    commit_message: Optional[str] = None,
    eval_table: Optional[Union[str, Path, dict]] = None,
    endpoint: Optional[str] = None,
    license: Optional[str] = None,
    base_model: Optional[str] = None,
) -> "CommitInfo":
    """Push a LoRA checkpoint's adapters to a Hub repo (created if missing) and print the repo URL and commit.

    The arguments are :func:`push_command`'s, with ``config`` for its ``recipe``; ``eval_table`` may also be the
    table itself (a dict).

    Returns:
        CommitInfo: the commit made (``oid``, ``commit_url``).
    """
    token = hub_token()
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    recipe_path = Path(config) if config is not None else find_recipe(ckpt_path)
    recipe = None
    if recipe_path is None:
        warnings.warn(
            f"no recipe found for {ckpt_path}: no config.yaml saved by LightningCLI beside its checkpoints/ folder or "
            f"in a logger's version_N/ folder next to it; pushing without {RECIPE}. Give one with --recipe FILE",
            stacklevel=2,
        )
    else:
        try:
            recipe = read_recipe_file(str(recipe_path))
        except ValueError as error:
            if config is not None:
                raise  # the file the user named: say so rather than push without it
            warnings.warn(f"{error}; pushing without {RECIPE}. Give the recipe with --recipe FILE", stacklevel=2)
            recipe_path = None
    if isinstance(eval_table, (str, Path)):
        eval_table = json.loads(Path(eval_table).read_text())
    algorithm = (checkpoint.get("prefalign") or {}).get("algorithm") or "LoRA"
    message = commit_message or f"prefalign: {algorithm} adapters from {Path(ckpt_path).name}"
    with tempfile.TemporaryDirectory(prefix="prefalign-push-") as folder:
        write_adapter(checkpoint, folder, recipe, eval_table, repo_id=repo_id, license=license, base_model=base_model)
        repo_url, info = upload(folder, repo_id, token, message, private=private, revision=revision, endpoint=endpoint)
    if recipe_path is not None:
        print(f"recipe: {recipe_path} (as {RECIPE})")
    print(f"pushed {Path(ckpt_path).name} to {repo_url} (revision {revision or 'main'}): commit {info.oid}")
    return info


def push_command(
    ckpt_path: str,
    repo_id: str,
    recipe: Optional[str] = None,
    private: bool = False,
    revision: Optional[str] = None,
    commit_message: Optional[str] = None,
    eval_table: Optional[str] = None,
    endpoint: Optional[str] = None,
    license: Optional[str] = None,
    base_model: Optional[str] = None,
) -> None:
    """Push a LoRA checkpoint's adapters to the Hugging Face Hub.

    The repo gets a peft adapter folder, the conditioning modules prefalign adds, the recipe and a model card.
    Log in first (``hf auth login``) or set HF_TOKEN.

    Args:
        ckpt_path: a Lightning checkpoint of a LoRA run (e.g. ``runs/NAME/.../checkpoints/last.ckpt``).
        repo_id: the model repo, ``owner/name``; created if missing.
        recipe: the recipe (YAML config) to publish with it; default: the ``config.yaml`` LightningCLI saved for the
            run, beside the checkpoint's ``checkpoints/`` folder or in a logger's ``version_N/`` folder next to it
            (see :func:`find_recipe`). (Not ``--config``: that option reads this command's own arguments from a
            file.)
        private: create the repo as private (an existing repo keeps its visibility).
        revision: the branch to commit to (created from ``main`` if missing); default ``main``.
        commit_message: the commit's summary line.
        eval_table: the JSON file ``prefalign test`` wrote, shown in the model card.
        endpoint: the Hub's URL (default: HF_ENDPOINT or https://huggingface.co).
        license: the license id for the model card's metadata, e.g. ``apache-2.0`` (the base model's terms apply).
        base_model: the Hub id (``owner/name``) of the base model, for the model card; default: the one the
            checkpoint records, when it is a Hub id or a folder of huggingface_hub's cache (a run that loaded its
            weights from another local folder records no id: give it here).
    """
    push(ckpt_path, repo_id, recipe, private, revision, commit_message, eval_table, endpoint, license, base_model)


def hub_token() -> str:
    """The user's Hub token (HF_TOKEN or the login cache); never printed, logged or written by prefalign.
    Raises when there is none, or when offline mode (HF_HUB_OFFLINE) forbids reaching the Hub."""
    from huggingface_hub import constants, get_token

    if constants.is_offline_mode():
        raise RuntimeError("HF_HUB_OFFLINE is set: pushing to the Hub needs the network; unset it to push")
    token = get_token()
    if not token:
        raise RuntimeError(NO_TOKEN)
    return token


def find_recipe(ckpt_path: Union[str, Path]) -> Optional[Path]:
    """The ``config.yaml`` LightningCLI saved for the run that wrote ``ckpt_path`` (a file in a ``checkpoints/``
    folder), or None.

    LightningCLI saves it in ``trainer.log_dir``, the first logger's folder. In Lightning's default layout the
    checkpoints are in there (``ROOT/csv/version_N/checkpoints/``): the config is beside the ``checkpoints/`` folder.
    The real-scale recipes and prefalign's CLI keep them in a fixed folder instead (``ROOT/checkpoints/``): the
    config is in a logger's ``ROOT/*/version_N/``, and a resumed run adds a version. Then the newest version whose
    config names this checkpoint folder (a ``ModelCheckpoint``'s ``dirpath``, else ``default_root_dir``) wins, else
    the newest version (with a warning when there were several to choose from).
    """
    folder = Path(ckpt_path).parent
    if folder.name != "checkpoints":
        return None
    beside = folder.parent / "config.yaml"
    if beside.is_file():
        return beside
    versions = sorted(folder.parent.glob("*/version_*/config.yaml"), key=_version_order, reverse=True)
    for saved in versions:
        if _names_checkpoint_folder(saved, folder):
            return saved
    if len(versions) > 1:
        warnings.warn(
            f"none of the {len(versions)} configs saved under {folder.parent} names {folder} as its checkpoint folder: "
            f"taking the newest, {versions[0]}; give another with --recipe FILE",
            stacklevel=2,
        )
    return versions[0] if versions else None


def _version_order(config: Path) -> tuple[int, float]:
    """Newer last: a logger's version number (``version_3``), then the file's modification time."""
    number = config.parent.name.removeprefix("version_")
    return (int(number) if number.isdigit() else -1, config.stat().st_mtime)


def _names_checkpoint_folder(config: Path, folder: Path) -> bool:
    """Whether a saved LightningCLI config sends its checkpoints to ``folder``: a ``ModelCheckpoint``'s ``dirpath``,
    or ``default_root_dir/checkpoints`` when it sets no ``ModelCheckpoint`` (prefalign's CLI adds one there).
    Paths are compared by their last two parts: they were relative to where training ran, and runs get moved."""
    import yaml

    try:
        trainer = (yaml.safe_load(read_recipe_file(str(config))) or {}).get("trainer") or {}
        callbacks = trainer.get("callbacks") or []
        callbacks = [callbacks] if isinstance(callbacks, dict) else callbacks
        checkpointing = [
            c for c in callbacks if isinstance(c, dict) and str(c.get("class_path")).endswith("ModelCheckpoint")
        ]
        named = [(c.get("init_args") or {}).get("dirpath") for c in checkpointing]
        if not checkpointing and trainer.get("default_root_dir"):
            named = [os.path.join(str(trainer["default_root_dir"]), "checkpoints")]
    except (OSError, ValueError, AttributeError, yaml.YAMLError):  # a config we cannot read names nothing
        return False
    tail = Path(os.path.abspath(folder)).parts[-2:]
    return any(path is not None and Path(os.path.normpath(str(path))).parts[-2:] == tail for path in named)


@scrubbing  # a Hub (or a proxy) may echo the Authorization header in its error; the error keeps the request too
def upload(
    folder: Union[str, Path],
    repo_id: str,
    token: str,
    commit_message: str,
    private: bool = False,
    revision: Optional[str] = None,
    endpoint: Optional[str] = None,
) -> tuple[str, "CommitInfo"]:
    """Create the repo (and branch) if missing and commit the folder's files. Returns (repo URL, commit).

    An error it raises holds no secret (``prefalign.secrets.scrub``): a Hub error keeps its type, with its text
    redacted and a bare copy of the response, whose request has no Authorization header."""
    from huggingface_hub import HfApi

    for path in Path(folder).iterdir():
        if path.suffix in (".json", ".yaml", ".md") and token in path.read_text(errors="ignore"):
            raise ValueError(f"{path.name} contains your Hugging Face token: not uploading it (check the recipe)")
    api = HfApi(endpoint=endpoint, token=token)
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
    if revision not in (None, "main"):
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    info = api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision, commit_message=commit_message)
    return str(repo_url), info


# --- loading -------------------------------------------------------------------------------------------------------
def load_adapter(
    denoiser: "PortraitDenoiser", source: Union[str, Path], revision: Optional[str] = None
) -> "LoraConfig":
    """Put a pushed run's adapters and conditioning modules onto ``denoiser`` (built as in the run's recipe, with
    the base weights).

    Every tensor must find its place and every adapter and trained module must get its tensors; otherwise a
    ``ValueError`` names the file. A plain peft folder (no ``prefalign_modules.safetensors``) adapts the backbone
    only. On an error the denoiser may be left half-loaded: build a fresh one.

    Args:
        denoiser (PortraitDenoiser): the denoiser to adapt; its backbone must not have LoRA adapters yet.
        source (str | Path): a local folder written by :func:`write_adapter`, or a Hub repo id.
        revision (str | None): the Hub branch, tag or commit (Hub repos only).

    Returns:
        LoraConfig: the adapters' peft config.
    """
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from peft.tuners.tuners_utils import BaseTunerLayer

    folder = _adapter_folder(source, revision)
    config_path, weights_path, modules_path = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS, folder / MODULES
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: {source} is not a LoRA adapter folder written by prefalign")
    config = LoraConfig.from_pretrained(str(folder))
    description = _description(modules_path)
    trained_on = description.get("denoiser")
    if trained_on and trained_on != type(denoiser).__name__:
        raise ValueError(
            f"{modules_path}: these adapters were trained on a {trained_on}, not a {type(denoiser).__name__}"
        )
    backbone = denoiser.backbone
    if any(isinstance(module, BaseTunerLayer) for module in backbone.modules()):
        raise ValueError("the denoiser's backbone already has LoRA adapters: load onto a freshly built denoiser")
    try:
        inject_adapter_in_model(config, backbone)
    except ValueError as error:  # e.g. target modules that this backbone does not have
        raise ValueError(f"{config_path} does not fit this backbone: {error}") from None
    state = load_file(weights_path)
    try:
        result = set_peft_model_state_dict(backbone, state)
    except RuntimeError as error:  # shape mismatches: torch lists every one, keep a few
        mismatches = [line.strip() for line in str(error).splitlines() if "size mismatch" in line] or [str(error)]
        raise ValueError(
            f"{weights_path} does not fit this backbone (was it built as in the recipe?): {len(mismatches)} tensors "
            f"have other shapes, e.g. {' '.join(mismatches[:2])}"
        ) from None
    missing = [key for key in result.missing_keys if ".lora_" in key]
    if result.unexpected_keys or missing:
        raise ValueError(
            f"{weights_path} does not fit this backbone (was it built as in the recipe?): "
            f"{len(result.unexpected_keys)} tensors match no adapter, e.g. {result.unexpected_keys[:3]}; "
            f"{len(missing)} adapters have no tensor, e.g. {missing[:3]}"
        )
    if modules_path.is_file():
        _load_modules(denoiser, load_file(modules_path), modules_path)
    return config


@scrubbing
def _adapter_folder(source: Union[str, Path], revision: Optional[str]) -> Path:
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    text = str(source)
    if not is_repo_id(text):
        raise FileNotFoundError(f"no adapter folder at {source} (nor is it a Hub repo id, owner/name)")

    allow = [ADAPTER_CONFIG, ADAPTER_WEIGHTS, MODULES]
    return Path(snapshot_download(text, revision=revision, allow_patterns=allow))


def _description(modules_path: Path) -> dict:
    if not modules_path.is_file():
        return {}
    from safetensors import safe_open

    with safe_open(str(modules_path), framework="pt") as handle:
        return json.loads((handle.metadata() or {}).get("prefalign", "{}"))


def _load_modules(denoiser: "PortraitDenoiser", tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Load the new modules' tensors: each module in the file gets all its tensors, with their shapes."""
    own = denoiser.state_dict()
    unexpected = [key for key in tensors if key not in own]
    wrong = [f"{key} {tuple(tensors[key].shape)} vs {tuple(own[key].shape)}"
             for key in tensors if key in own and tensors[key].shape != own[key].shape]  # fmt: skip
    missing = []
    for name, module in denoiser.new_modules().items():
        keys = [f"{name}.{key}" for key in module.state_dict()]
        if any(key in tensors for key in keys):
            missing += [key for key in keys if key not in tensors]
    if unexpected or wrong or missing:
        raise ValueError(
            f"{path} does not fit this denoiser (was it built as in the recipe?): "
            + "; ".join(
                f"{label}: {keys[:3]}"
                for label, keys in (("not in the denoiser", unexpected), ("shapes differ", wrong), ("missing", missing))
                if keys
            )
        )
    denoiser.load_state_dict(tensors, strict=False)
