"""Hostile recipes and options given to the ``prefalign`` command: YAML alias bombs, huge, deep, binary or blocking
files, Python tags, unknown keys and classes, wrong types and out-of-range values, and fits that would train
nothing. Each ends in a clear error naming the file or the option (and its allowed values), never a hang, a
memory blow-up or an exit 0.

Each hostile input is a ``hostile.Case``: ``prefalign.cli.main([...])`` in a forked child under a memory cap and a
watchdog. A usage error (jsonargparse prints it and exits 2) counts as clear when the ``error:`` line names what the
case requires: the usage above it names every option, so only that line is checked."""

import contextlib
import functools
import io
import json
import math
import os
import random
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import docstring_parser
import pytest
import torch.distributed as dist
import yaml

from conftest import TINY_WAN_RECIPE
from hostile import Case, check
from prefalign import recipes
from prefalign.cli import main
from prefalign.data.datamodule import PortraitDataModule
from prefalign.data.synthetic import TalkingShapesConfig, write_dataset
from prefalign.lora import LoraSettings
from prefalign.sampling import SamplingSettings

#: Address space a case may add: parsing and building the tiny model need little, but a bomb's expansion takes GBs.
MEMORY_MB = 3072
#: A fit builds the model and starts BLAS and decoder threads, which reserve address space.
FIT_MEMORY_MB = 6144


def cli(*args: str) -> None:
    """``prefalign`` with ``args``; a non-zero exit becomes a ``SystemExit`` whose text is jsonargparse's ``error:``
    line, not the usage before it."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")  # pytest's own argv
            main(list(args))
    except SystemExit as exit_:
        if exit_.code in (0, None):
            return
        text = err.getvalue()
        raise SystemExit(f"exit code {exit_.code}: {text[text.rfind('error:'):] if 'error:' in text else text[-3000:]}")


def billion_laughs(levels: int = 9, width: int = 9) -> list[str]:
    """Lines ``a: &a [lol, ...]``, ``b: &b [*a, *a, ...]``...: ``width ** levels`` strings from ~300 bytes."""
    names = "abcdefghijklmnop"[:levels]
    lines = [f"{names[0]}: &{names[0]} [{', '.join(['lol'] * width)}]"]
    for previous, name in zip(names, names[1:]):
        lines.append(f"{name}: &{name} [{', '.join(['*' + previous] * width)}]")
    return lines


def flow_bomb(levels: int = 9, width: int = 9) -> str:
    """The same bomb as one line of flow YAML, a list: what a user could paste as an option's value."""
    items = [f"&x0 [{', '.join(['lol'] * width)}]"]
    items += [f"&x{i} [{', '.join([f'*x{i - 1}'] * width)}]" for i in range(1, levels)]
    return f"[{', '.join(items)}]"


def write_yaml(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def parse_docstrings_once():
    """The CLI parses the docstrings of every class it offers (attribute docs from their source) for each of its four
    subcommands: ~3 s a call on two busy cores. Parsed once here, and warmed in this process before the cases fork,
    each of the ~80 calls below takes a fraction of a second; what is parsed is the same."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(docstring_parser, "parse_from_object",
                      functools.lru_cache(maxsize=None)(docstring_parser.parse_from_object))
        yield


@pytest.fixture(scope="module")
def arena(tmp_path_factory, parse_docstrings_once) -> SimpleNamespace:
    """The hostile files, a valid tiny recipe, and manifests of one good row and of bad rows only."""
    root = tmp_path_factory.mktemp("hostile_cli")
    clips = write_dataset(root / "clips", num_clips=2, seed=0, cfg=TalkingShapesConfig())
    rows = [json.loads(line) for line in clips.read_text().splitlines()]
    absolute = [{k: (str(clips.parent / v) if k in ("video", "audio", "reference", "pose") else v) for k, v in r.items()}
                for r in rows]
    one_row = root / "one_row.jsonl"
    one_row.write_text(json.dumps(absolute[0]) + "\n")
    (root / "garbage.mp4").write_bytes(b"not a video" * 10)
    all_bad = root / "all_bad.jsonl"
    all_bad.write_text("".join(json.dumps({**r, "id": f"bad{i}", "video": str(root / "garbage.mp4")}) + "\n"
                               for i, r in enumerate(absolute)))
    base = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 2, "limit_val_batches": 0,
                    "num_sanity_val_steps": 0, "logger": False, "enable_checkpointing": False,
                    "enable_progress_bar": False, "enable_model_summary": False,
                    "default_root_dir": str(root / "runs")},
        "model": {"denoiser": TINY_WAN_RECIPE, "process": {"class_path": "prefalign.processes.FlowMatching"},
                  "algorithm": {"class_path": "prefalign.algorithms.SFT"}, "sampling": {"num_steps": 1}},
        "data": {"train": str(clips), "val_fraction": 0.0, "batch_size": 1, "num_frames": 9},
    }
    a = SimpleNamespace(root=root, clips=clips, one_row=one_row, all_bad=all_bad, marker=root / "tag_ran")
    a.recipe = write_yaml(root / "recipe.yaml", base)

    def text(name: str, content: str) -> str:
        (root / name).write_text(content)
        return str(root / name)

    a.bomb = text("bomb.yaml", "\n".join(billion_laughs()) + "\n")
    a.bomb_nested = text("bomb_nested.yaml", "model:\n  sampling:\n    extra: " + flow_bomb() + "\n")
    merges = ["a: &a {" + ", ".join(f"k{i}: lol" for i in range(9)) + "}"]
    for previous, name in zip("abcdefgh", "bcdefghi"):
        merges.append(f"{name}: &{name} {{" + ", ".join(f"k{i}: *{previous}" for i in range(9)) + "}")
    a.bomb_merge = text("bomb_merge.yaml", "\n".join(merges) + "\nz:\n  <<: *i\n")
    a.bomb_wide = text("bomb_wide.yaml", "a: &a [" + ", ".join(["1"] * 500) + "]\nb: [" + ", ".join(["*a"] * 500) + "]\n")
    a.bomb_in_recipe = text("bomb_in_recipe.yaml", Path(a.recipe).read_text()
                            + "\n".join(f"x{line}" for line in billion_laughs()) + "\n")
    a.bomb_algorithm = text("bomb_algorithm.yaml", "class_path: prefalign.algorithms.SFT\ninit_args:\n"
                            + "".join(f"  {line}\n" for line in billion_laughs()))
    a.refers_to_bomb = text("refers_to_bomb.yaml", f"model:\n  algorithm: {a.bomb_algorithm}\n")
    a.cycle_list = text("cycle_list.yaml", "a: &a [1, *a]\n")
    a.cycle_map = text("cycle_map.yaml", "a: &a {b: *a}\n")
    a.deep_block = text("deep_block.yaml", "".join("  " * i + f"k{i}:\n" for i in range(100)) + "  " * 100 + "v\n")
    a.deep_flow = text("deep_flow.yaml", "a: " + "[" * 5000 + "]" * 5000 + "\n")
    a.many_nodes = text("many_nodes.yaml", "a: [" + ",".join(["0"] * 300_000) + "]\n")
    a.huge = text("huge.yaml", "# " + "x" * (2 << 20) + "\n")
    a.huge_scalar = text("huge_scalar.yaml", "a: " + "x" * (recipes.MAX_BYTES + 10) + "\n")
    (root / "a_directory.yaml").mkdir()
    a.directory = str(root / "a_directory.yaml")
    a.fifo = str(root / "fifo.yaml")
    os.mkfifo(a.fifo)
    a.binary = str(root / "binary.yaml")
    Path(a.binary).write_bytes(random.Random(0).randbytes(4096))
    a.latin1 = str(root / "latin1.yaml")
    Path(a.latin1).write_bytes("trainer:\n  default_root_dir: caf\xe9\n".encode("latin-1"))
    a.nul = text("nul.yaml", "trainer:\n  max_steps: 1\x00\n")
    a.syntax = text("syntax.yaml", "trainer:\n  max_steps: [1, 2\nmodel: {}\n")
    a.not_a_mapping = text("not_a_mapping.yaml", "- fit\n- twice\n")
    a.python_apply = text("python_apply.yaml", f"model: !!python/object/apply:os.system ['touch {a.marker}']\n")
    a.python_name = text("python_name.yaml", "trainer:\n  max_steps: !!python/name:os.system\n")
    a.python_algorithm = text("python_algorithm.yaml",
                              f"!!python/object/new:subprocess.Popen [['touch', '{a.marker}']]\n")
    a.unknown_key = text("unknown_key.yaml", "bogus_top_key: 1\n")
    a.unknown_nested = text("unknown_nested.yaml", "data:\n  bogus_data_key: 1\n")
    a.unknown_class = text("unknown_class.yaml", "model:\n  algorithm:\n    class_path: prefalign.algorithms.NoSuchMethod\n")
    a.not_algorithm = text("not_algorithm.yaml", "model:\n  algorithm:\n    class_path: torch.nn.Linear\n"
                           "    init_args: {in_features: 1, out_features: 1}\n")
    a.os_system = text("os_system.yaml", f"model:\n  algorithm:\n    class_path: os.system\n"
                       f"    init_args: {{command: 'touch {a.marker}'}}\n")
    no_denoiser = json.loads(json.dumps(base))
    del no_denoiser["model"]["denoiser"]
    a.no_denoiser = str(write_yaml(root / "no_denoiser.yaml", no_denoiser))
    cli("fit", "--config", str(a.recipe), "--print_config")  # a valid recipe; warms the docstring cache
    return a


def marker_stays_absent(a, *args: str) -> Callable[[], None]:
    """Run the CLI, then fail (a crash) if a Python tag or class path ran a command: it would have made the marker."""
    def act():
        try:
            cli(*args)
        finally:
            if a.marker.exists():
                a.marker.unlink()
                raise AssertionError(f"the hostile recipe ran a command: {a.marker} was made")
    return act


def recipe_case(name: str, file: str, *must_name: str, name_file: bool = True, **options) -> Callable:
    """``prefalign fit --config FILE``: refused with an error naming the file (unless the error is about one key or
    class, which it names) and ``must_name``."""
    return name, lambda a: Case(name, lambda: cli("fit", "--config", getattr(a, file)),
                                (Path(getattr(a, file)).name,) * name_file + must_name, **options)


def option_case(name: str, option: str, value: str, *must_name: str, **options) -> Callable:
    """``prefalign fit --config RECIPE --OPTION VALUE``: refused with an error naming the option (and ``must_name``).
    An error about a field of ``model.lora`` (optional, so parsed as a union) names the group and the field."""
    names = option.rsplit(".", 1) if option.startswith("model.lora.") else [option]
    return name, lambda a: Case(name, lambda: cli("fit", "--config", str(a.recipe), f"--{option}", value),
                                (*names, *must_name), memory_mb=MEMORY_MB, **options)


NUMERIC_OPTIONS = {  # option: (a wrong-typed value, the type the error names)
    "data.val_fraction": ("a tenth", "float"),
    "data.batch_size": ("four", "int"),
    "data.eval_batch_size": ("2.5", "int"),
    "data.num_workers": ("many", "int"),
    "data.sample_rate": ("16k", "int"),
    "data.fps": ("fast", "float"),
    "data.num_frames": ("1.5", "int"),
    "data.seed": ("[1, 2]", "int"),
    "model.sampling.num_steps": ("twenty", "int"),
    "model.sampling.guidance_scale": ("strong", "float"),
    "model.sampling.seed": ("{a: 1}", "int"),
    "model.sampling.chunk_frames": ("all", "int"),
    "model.sampling.motion_frames": ("1e", "int"),
    "model.lora.rank": ("sixteen", "int"),
    "model.lora.alpha": ("high", "float"),
    "model.lora.dropout": ("none at all", "float"),
}

OUT_OF_RANGE = [  # option, value, words of the allowed values
    ("data.fps", "0", "> 0"),
    ("data.fps", "-25", "> 0"),
    ("data.num_frames", "-5", ">= 1"),
    ("data.num_frames", "0", ">= 1"),
    ("data.batch_size", "0", ">= 1"),
    ("data.eval_batch_size", "0", ">= 1"),
    ("data.num_workers", "-1", ">= 0"),
    ("data.sample_rate", "0", ">= 1"),
    ("data.val_fraction", "1.0", "[0, 1)"),
    ("data.seed", "-1", "[0, "),
    ("model.sampling.num_steps", "0", ">= 1"),
    ("model.sampling.chunk_frames", "0", ">= 1"),
    ("model.lora.rank", "0", ">= 1"),
    ("model.lora.dropout", "1.5", "[0, 1)"),
    ("model.lora.alpha", "0", "> 0"),
]


def fit_case(name: str, manifest: str, extra: list[str], *must_name: str, timeout: float = 120) -> Callable:
    """A real fit of the tiny recipe on ``manifest`` that cannot train anything: it must fail, naming why."""
    return name, lambda a: Case(name, lambda: cli("fit", "--config", str(a.recipe), "--data.train",
                                                  str(getattr(a, manifest)), *extra),
                                (Path(getattr(a, manifest)).name, *must_name), memory_mb=FIT_MEMORY_MB,
                                timeout=timeout)


CASES = [
    # alias bombs, in every place YAML comes from
    recipe_case("bomb-billion-laughs", "bomb", "alias", "100000 nodes"),
    recipe_case("bomb-flow-nested-in-a-group", "bomb_nested", "alias"),
    recipe_case("bomb-merge-keys", "bomb_merge", "alias"),
    recipe_case("bomb-wide-250k-nodes", "bomb_wide", "100000 nodes"),
    recipe_case("bomb-after-a-valid-recipe", "bomb_in_recipe", "alias"),
    ("bomb-in-second-config", lambda a: Case("bomb-in-second-config", lambda: cli(
        "fit", "--config", str(a.recipe), "--config", a.bomb), ("bomb.yaml", "alias"))),
    ("bomb-with-print-config", lambda a: Case("bomb-with-print-config", lambda: cli(
        "fit", "--config", a.bomb, "--print_config"), ("bomb.yaml", "alias"))),
    ("bomb-algorithm-file-as-value", lambda a: Case("bomb-algorithm-file-as-value", lambda: cli(
        "fit", "--config", str(a.recipe), "--model.algorithm", a.bomb_algorithm),
        ("model.algorithm", "bomb_algorithm.yaml", "alias"))),
    ("bomb-algorithm-file-named-in-recipe", lambda a: Case("bomb-algorithm-file-named-in-recipe", lambda: cli(
        "fit", "--config", str(a.recipe), "--config", a.refers_to_bomb), ("bomb_algorithm.yaml", "alias"))),
    option_case("bomb-string-algorithm", "model.algorithm", "{class_path: prefalign.algorithms.SFT, init_args: "
                f"{{x: {flow_bomb()}}}}}", "alias"),
    option_case("bomb-string-int-option", "data.batch_size", flow_bomb(), "alias"),
    option_case("bomb-string-callbacks", "trainer.callbacks", flow_bomb(), "alias"),
    option_case("bomb-string-dataclass", "model.sampling", f"{{num_steps: 1, x: {flow_bomb()}}}", "alias"),
    option_case("bomb-string-whole-group", "data", f"{{train: x, y: {flow_bomb()}}}", "alias"),
    ("bomb-config-of-a-subcommand", lambda a: Case("bomb-config-of-a-subcommand", lambda: cli(
        "synth", "--config", a.bomb, "--out", str(a.root / "synth")), ("bomb.yaml", "alias"))),
    recipe_case("cycle-list", "cycle_list", "cycle"),
    recipe_case("cycle-mapping", "cycle_map", "cycle"),
    # size, depth, and what is not a text file
    recipe_case("nested-100-levels", "deep_block", "deeper than 64"),
    recipe_case("nested-5000-flow-levels", "deep_flow", "nest"),  # libyaml's own limit (1000) may come first
    recipe_case("flat-list-of-300k", "many_nodes", "100000 nodes"),
    recipe_case("huge-2mib-comment", "huge", "1048576 bytes"),
    recipe_case("huge-scalar", "huge_scalar", "1048576 bytes"),
    ("huge-algorithm-file-as-value", lambda a: Case("huge-algorithm-file-as-value", lambda: cli(
        "fit", "--config", str(a.recipe), "--model.algorithm", a.huge), ("huge.yaml", "1048576 bytes"))),
    recipe_case("a-directory", "directory", "not a file"),
    recipe_case("a-fifo-does-not-block", "fifo", "not a regular file", timeout=30),
    ("a-fifo-as-value-does-not-block", lambda a: Case("a-fifo-as-value-does-not-block", lambda: cli(
        "fit", "--config", str(a.recipe), "--model.algorithm", a.fifo), ("fifo.yaml", "not a regular file"),
        timeout=30)),
    ("dev-zero-is-not-read", lambda a: Case("dev-zero-is-not-read", lambda: cli("fit", "--config", "/dev/zero"),
                                            ("/dev/zero",), timeout=30)),
    ("dev-zero-as-value-is-not-read", lambda a: Case("dev-zero-as-value-is-not-read", lambda: cli(
        "fit", "--config", str(a.recipe), "--model.algorithm", "/dev/zero"), ("model.algorithm", "/dev/zero"),
        timeout=30)),
    recipe_case("binary-garbage", "binary", "not utf-8"),
    recipe_case("latin-1-text", "latin1", "not utf-8"),
    recipe_case("nul-character", "nul", "not valid yaml", "control characters"),
    recipe_case("syntax-error", "syntax", "not valid yaml", "line 2"),
    recipe_case("a-list-not-a-mapping", "not_a_mapping", "unexpected config", "- twice", name_file=False),
    # Python tags and class paths never run anything
    ("python-object-apply-tag", lambda a: Case("python-object-apply-tag", marker_stays_absent(
        a, "fit", "--config", a.python_apply), ("python/object/apply",))),
    ("python-name-tag", lambda a: Case("python-name-tag", marker_stays_absent(
        a, "fit", "--config", a.python_name), ("python/name",))),
    ("python-object-new-in-algorithm-file", lambda a: Case("python-object-new-in-algorithm-file", marker_stays_absent(
        a, "fit", "--config", str(a.recipe), "--model.algorithm", a.python_algorithm),
        ("model.algorithm", "python/object/new"))),
    ("python-tag-as-option-string", lambda a: Case("python-tag-as-option-string", marker_stays_absent(
        a, "fit", "--config", str(a.recipe), "--model.algorithm",
        f"!!python/object/apply:os.system ['touch {a.marker}']"), ("model.algorithm",))),
    ("class-path-os-system", lambda a: Case("class-path-os-system", marker_stays_absent(
        a, "fit", "--config", a.os_system), ("model.algorithm", "os.system"))),
    # unknown keys and classes, missing options
    recipe_case("unknown-top-level-key", "unknown_key", "bogus_top_key", name_file=False),
    recipe_case("unknown-data-key", "unknown_nested", "data.bogus_data_key", name_file=False),
    recipe_case("unknown-class-path", "unknown_class", "model.algorithm", "NoSuchMethod", name_file=False),
    recipe_case("class-path-not-an-algorithm", "not_algorithm", "model.algorithm", "torch.nn.Linear",
                "subclass of Algorithm", name_file=False),
    recipe_case("missing-required-denoiser", "no_denoiser", "model.denoiser", "required", name_file=False),
    option_case("unknown-option", "data.bogus_option", "1"),
    # wrong types and out-of-range values, at construction
    *[option_case(f"wrong-type-{option}", option, value, kind) for option, (value, kind) in NUMERIC_OPTIONS.items()],
    *[option_case(f"out-of-range-{option}={value}", option, value, allowed) for option, value, allowed in OUT_OF_RANGE],
    option_case("motion-frames-not-below-chunk-frames", "model.sampling", "{chunk_frames: 5, motion_frames: 5}",
                "motion_frames", "chunk_frames"),
    ("export-dtype-nonsense", lambda a: Case("export-dtype-nonsense", lambda: cli(
        "export", "--ckpt_path", str(a.root / "missing.ckpt"), "--out", str(a.root / "out.safetensors"), "--dtype",
        "nonsense"), ("--dtype", "float16", "bfloat16"))),
    ("ckpt-path-missing", lambda a: Case("ckpt-path-missing", lambda: cli(
        "fit", "--config", str(a.recipe), "--ckpt_path", str(a.root / "no_such.ckpt")), ("no_such.ckpt",),
        memory_mb=FIT_MEMORY_MB, timeout=120)),
    # fits that would train nothing
    fit_case("fit-one-row-batch-of-4", "one_row", ["--data.batch_size", "4"], "1 usable rows", "data.batch_size 4"),
    fit_case("fit-one-row-all-held-out", "one_row", ["--data.val_fraction", "0.5"], "0 usable rows",
             "data.val_fraction"),
    fit_case("fit-every-sample-skipped", "all_bad", ["--data.on_bad_sample", "skip"], "nothing was trained",
             "skipped"),
]
CASE_BUILDERS = dict(CASES)


@pytest.mark.parametrize("name", list(CASE_BUILDERS))
def test_hostile_cli_case(name, arena):
    assert check(CASE_BUILDERS[name](arena)) is None


# --- the bounds themselves, without the CLI --------------------------------------------------------------------------
def test_recipes_and_algorithm_files_are_within_the_bounds():
    """Every recipe of the repository passes the checks that refuse hostile YAML."""
    for path in Path(__file__).parents[1].joinpath("recipes").rglob("*.yaml"):
        recipes.read_recipe_file(str(path))


def test_aliases_are_counted_as_what_they_repeat():
    recipes.check_yaml("a: &a [1, 2]\nb: [*a, *a]\n", "ok")  # a few aliases are fine
    with pytest.raises(recipes.RecipeError, match="100000 nodes"):
        recipes.check_yaml("\n".join(billion_laughs(levels=6, width=9)), "bomb")  # 9**6 = 531441 strings
    with pytest.raises(recipes.RecipeError, match="cycle"):
        recipes.check_yaml("&a [*a]", "cycle")


@pytest.mark.parametrize("kwargs, words", [
    (dict(fps=0), "data.fps must be a finite number > 0"),
    (dict(fps=math.nan), "data.fps"),
    (dict(num_frames=-5), "data.num_frames must be an integer >= 1, or null"),
    (dict(batch_size=0), "data.batch_size must be an integer >= 1"),
    (dict(eval_batch_size=0), "data.eval_batch_size must be an integer >= 1, or null"),
    (dict(num_workers=-1), "data.num_workers must be an integer >= 0"),
    (dict(sample_rate=0), "data.sample_rate must be an integer >= 1"),
    (dict(on_bad_sample="ignore"), "data.on_bad_sample must be 'raise' or 'skip'"),
    (dict(seed=-1), "data.seed must be an integer in [0, "),
    (dict(val_fraction=1.0), "data.val_fraction must be a number in [0, 1)"),
])
def test_data_options_are_checked_at_construction(kwargs, words):
    with pytest.raises(ValueError) as error:
        PortraitDataModule(train="never-read.jsonl", **kwargs)
    assert words in str(error.value)


@pytest.mark.parametrize("settings, kwargs, words", [
    (SamplingSettings, dict(num_steps=0), "model.sampling.num_steps must be an integer >= 1"),
    (SamplingSettings, dict(guidance_scale=math.inf), "model.sampling.guidance_scale must be a finite number"),
    (SamplingSettings, dict(chunk_frames=0), "model.sampling.chunk_frames must be an integer >= 1"),
    (SamplingSettings, dict(chunk_frames=9, motion_frames=9), "model.sampling.motion_frames must be between 0 and"),
    (LoraSettings, dict(rank=0), "model.lora.rank must be an integer >= 1"),
    (LoraSettings, dict(alpha=-1.0), "model.lora.alpha must be a number > 0"),
    (LoraSettings, dict(dropout=1.0), "model.lora.dropout must be in [0, 1)"),
    (LoraSettings, dict(target_modules=[]), "model.lora.target_modules must name modules"),
])
def test_model_settings_are_checked_at_construction(settings, kwargs, words):
    with pytest.raises(ValueError) as error:
        settings(**kwargs)
    assert words in str(error.value)


def test_setup_refuses_fewer_training_rows_than_a_batch(arena, monkeypatch):
    """At ``setup("fit")``, before the sanity check's validation: this process's share of the rows (all of them on
    one process, half of them on each of two) must make one batch."""
    dm = PortraitDataModule(train=str(arena.clips), val_fraction=0.0, batch_size=2)
    dm.setup("fit")  # 2 rows, one process: one batch
    dm = PortraitDataModule(train=str(arena.clips), val_fraction=0.0, batch_size=3)
    with pytest.raises(ValueError, match="has 2 usable rows, fewer than data.batch_size 3"):
        dm.setup("fit")
    monkeypatch.setattr(dist, "is_initialized", lambda: True)  # as on rank 0 of 2 under DDP
    monkeypatch.setattr(dist, "get_world_size", lambda *args: 2)
    monkeypatch.setattr(dist, "get_rank", lambda *args: 0)
    dm = PortraitDataModule(train=str(arena.clips), val_fraction=0.0, batch_size=2)
    with pytest.raises(ValueError, match="has 2 usable rows, 1 per process over 2, fewer than data.batch_size 2"):
        dm.setup("fit")
