"""Hub sharing: a LoRA checkpoint pushed to a loopback Hub comes back as the same model through peft and through our
loader; the token stays out of files and output; PushToHub uploads during training; errors say what to do."""

import json
import logging
import math
import os
import secrets
import subprocess
import sys
import warnings
from pathlib import Path

import huggingface_hub.constants as hf_constants
import lightning as L
import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from huggingface_hub.errors import HfHubHTTPError
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load as safetensors_load
from safetensors.torch import load_file

from prefalign.callbacks import PushToHub
from prefalign.cli import main
from prefalign.data.datamodule import PortraitDataModule
from prefalign.recipes import MAX_BYTES
from prefalign.hub import (
    ADAPTER_CONFIG, ADAPTER_WEIGHTS, MODULES, RECIPE, eval_markdown, find_recipe, load_adapter, push, write_adapter,
)  # fmt: skip
from prefalign.lora import LoraSettings
from prefalign.module import AlignmentModule
from prefalign.processes import FlowMatching

from conftest import TINY_WAN, tiny_wan
from hub_server import FakeHub

DEMO = Path(__file__).parents[1] / "recipes" / "demo" / "sft.yaml"
WAN = "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers"
RECIPE_TEXT = "model:\n  lora:\n    rank: 4\n    alpha: 8.0\ntrainer:\n  max_steps: 7\n"
TABLE = {
    "metrics": {"sync": {"mean": 0.8791, "std": 0.0123}, "identity": {"mean": 0.0226}, "jitter": 0.00666,
                "broken": {"std": 1.0}},
    "clips": [{"id": "a", "sync": 0.87}, {"id": "b", "sync": 0.89}],
}  # fmt: skip


def trained_module(**lora) -> AlignmentModule:
    """A tiny LoRA module whose adapters and audio modules moved away from their start (as after training)."""
    module = AlignmentModule(tiny_wan(), FlowMatching(), lora=LoraSettings(rank=4, alpha=8.0, **lora))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in module.trainable_parameters():
            param.add_(0.2 * torch.randn(param.shape, generator=generator))
    return module.eval()


def lora_checkpoint(module: AlignmentModule, algorithm: str = "SFT", base_model=None, state_dict=None) -> dict:
    """What ``AlignmentModule.on_save_checkpoint`` keeps of a LoRA run: the trained tensors (and the reference
    snapshot's buffers), with the ``prefalign`` description."""
    trained = {name for name, param in module.named_parameters() if param.requires_grad}
    state = {key: value for key, value in (state_dict or module.state_dict()).items()
             if key in trained or "lora_" in key or key.startswith("reference_snapshot.")}  # fmt: skip
    settings = module.lora
    lora = {"rank": settings.rank, "alpha": settings.alpha, "dropout": settings.dropout,
            "target_modules": list(module.denoiser.default_lora_targets),
            "train_new_modules": settings.train_new_modules}  # fmt: skip
    meta = {"lora": lora, "algorithm": algorithm, "base_model": base_model, "denoiser": "WanDenoiser"}
    return {"state_dict": state, "prefalign": meta, "global_step": 7}


def fixed_inputs(module, batch):
    x0 = module.denoiser.encode_video(batch["video"])
    torch.manual_seed(1)
    return torch.randn_like(x0), torch.full((x0.shape[0],), 400.0), module.denoiser.condition(batch)


@pytest.fixture
def token():
    return f"hf_test{secrets.token_hex(16)}"


@pytest.fixture
def hub(token, monkeypatch, tmp_path):
    """The loopback Hub, with huggingface_hub pointed at it: online, HF_TOKEN set, no login cache, no Xet (it
    needs Xet's own storage service; without it huggingface_hub uploads through LFS)."""
    with FakeHub(token=token) as server:
        monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(hf_constants, "ENDPOINT", server.url)
        monkeypatch.setattr(
            hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path / "no-login" / "token"))
        monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
        monkeypatch.setenv("HF_TOKEN", token)
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server


def assert_no_token_under(folder, token):
    for path in folder.rglob("*"):
        if path.is_file():
            assert token.encode() not in path.read_bytes(), f"the token leaked into {path}"


def test_pushed_adapters_load_back_as_the_trained_model(hub, token, tmp_path, clip_batch, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    module = trained_module()
    run = tmp_path / "runs" / "demo"
    ckpt = run / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save(lora_checkpoint(module), ckpt)
    (run / "config.yaml").write_text(RECIPE_TEXT)  # what LightningCLI saves in the log folder

    main(["push", "--ckpt_path", str(ckpt), "--repo_id", "alice/talking-lora"])

    commit = hub.commits("alice/talking-lora")[-1]
    out = capsys.readouterr()
    assert f"{hub.url}/alice/talking-lora" in out.out and commit.oid in out.out
    assert set(commit.files) == {".gitattributes", "README.md", ADAPTER_CONFIG, ADAPTER_WEIGHTS, MODULES, RECIPE}
    assert commit.lfs == {ADAPTER_WEIGHTS, MODULES}  # through the LFS batch API and a PUT each
    assert sum(r.method == "PUT" for r in hub.requests) == 2
    # Every API call carried the token (the client's anonymous agent-registry lookup aside); LFS storage gets none.
    api_calls = [r for r in hub.requests if r.method != "PUT" and r.path != "/api/agent-harnesses"]
    assert {r.authorization for r in api_calls} == {f"Bearer {token}"}
    assert not any("xet" in r.path for r in hub.requests)
    folder = hub.write_tree("alice/talking-lora", tmp_path / "pulled")
    assert (folder / RECIPE).read_text() == RECIPE_TEXT
    # peft's on-disk names: what PeftModel.save_pretrained writes for these adapters
    saved = load_file(folder / ADAPTER_WEIGHTS)
    assert set(saved) == {f"base_model.model.{key}" for key in get_peft_model_state_dict(module.denoiser.backbone)}
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 8.0)
    assert sorted(config["target_modules"]) == sorted(module.denoiser.default_lora_targets)

    x_t, t, cond = fixed_inputs(module, clip_batch)
    bare = tiny_wan()
    # peft alone, on the backbone: the same backbone prediction as the trained adapters give
    adapted = tiny_wan()
    adapted.backbone = PeftModel.from_pretrained(adapted.backbone, str(folder))
    expected = module.denoiser.backbone_forward(x_t, t, cond)
    torch.testing.assert_close(adapted.backbone_forward(x_t, t, cond), expected)
    assert (expected - bare.backbone_forward(x_t, t, cond)).abs().max() > 1e-3  # the adapters do something
    # our loader: adapters and the speech modules, the whole denoiser
    loaded = tiny_wan()
    load_adapter(loaded, folder)
    expected = module.denoiser(x_t, t, cond)
    torch.testing.assert_close(loaded(x_t, t, cond), expected)
    assert (expected - adapted(x_t, t, cond)).abs().max() > 1e-3  # the audio modules do something too

    for content in commit.files.values():
        assert token.encode() not in content
    assert_no_token_under(tmp_path, token)
    assert token not in out.out + out.err and token not in caplog.text


def test_push_from_the_shell_with_private_branch_message_recipe_and_table(hub, token, tmp_path, clip_batch):
    """``prefalign push`` as a user runs it: HF_TOKEN and HF_ENDPOINT in the environment, options on the line."""
    module = trained_module()
    ckpt = tmp_path / "run.ckpt"
    torch.save(lora_checkpoint(module), ckpt)
    (tmp_path / "table.json").write_text(json.dumps(TABLE))
    (tmp_path / "recipe.yaml").write_text(RECIPE_TEXT)
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(tmp_path / "hf-home"),
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "prefalign.cli", "push", "--ckpt_path", str(ckpt), "--repo_id", "alice/wan2.1-private-lora",
         "--private", "true", "--revision", "exp-1", "--commit_message", "tiny run, step 7",
         "--recipe", str(tmp_path / "recipe.yaml"), "--eval_table", str(tmp_path / "table.json")],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert hub.repos["alice/wan2.1-private-lora"].private
    head = hub.commits("alice/wan2.1-private-lora", "exp-1")[-1]
    assert head.summary == "tiny run, step 7" and head.oid in done.stdout
    assert ADAPTER_WEIGHTS not in hub.files("alice/wan2.1-private-lora", "main")  # the branch, not main
    assert head.files[RECIPE].decode() == RECIPE_TEXT
    assert "| sync | 0.8791 ± 0.012 |" in head.files["README.md"].decode()
    assert token not in done.stdout + done.stderr
    assert f"Bearer {token}" in {r.authorization for r in hub.requests}
    assert_no_token_under(tmp_path, token)

    loaded = tiny_wan()
    load_adapter(loaded, "alice/wan2.1-private-lora", revision="exp-1")  # snapshot_download from the Hub
    x_t, t, cond = fixed_inputs(module, clip_batch)
    torch.testing.assert_close(loaded(x_t, t, cond), module.denoiser(x_t, t, cond))
    with pytest.raises(HfHubHTTPError):
        load_adapter(tiny_wan(), "alice/wan2.1-private-lora", revision="no-such-branch")


@pytest.mark.filterwarnings("ignore:no recipe found")
def test_push_errors_say_what_to_do(hub, monkeypatch, tmp_path):
    full = AlignmentModule(tiny_wan(), FlowMatching())
    ckpt = tmp_path / "full.ckpt"
    meta = {"lora": None, "algorithm": "SFT", "base_model": None, "denoiser": "WanDenoiser"}
    torch.save({"state_dict": full.state_dict(), "prefalign": meta}, ckpt)
    with pytest.raises(ValueError, match="full-weights checkpoint.*prefalign export"):
        push(ckpt, "alice/full", endpoint=hub.url)

    lora_ckpt = tmp_path / "lora.ckpt"
    torch.save(lora_checkpoint(trained_module()), lora_ckpt)
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(RuntimeError, match="no Hugging Face token.*hf auth login.*HF_TOKEN"):
        main(["push", "--ckpt_path", str(lora_ckpt), "--repo_id", "alice/lora"])
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE is set"):
        push(lora_ckpt, "alice/lora")
    assert not hub.requests and not hub.repos


def test_load_adapter_refuses_a_denoiser_it_does_not_fit(tmp_path):
    folder = write_adapter(lora_checkpoint(trained_module()), tmp_path / "adapter")
    with pytest.raises(ValueError, match="adapter_model.safetensors does not fit.*12 tensors match no adapter"):
        load_adapter(tiny_wan(config={**TINY_WAN, "num_layers": 1}), folder)
    with pytest.raises(ValueError, match="adapter_model.safetensors does not fit.*20 tensors have other shapes"):
        load_adapter(tiny_wan(config={**TINY_WAN, "attention_head_dim": 8}), folder)
    with pytest.raises(ValueError, match="prefalign_modules.safetensors does not fit.*not in the denoiser"):
        load_adapter(tiny_wan(audio_encoder=None), folder)
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    (tmp_path / "other").mkdir()
    for name in (ADAPTER_WEIGHTS, MODULES):
        (tmp_path / "other" / name).write_bytes((folder / name).read_bytes())
    (tmp_path / "other" / ADAPTER_CONFIG).write_text(json.dumps({**config, "target_modules": ["attn9.to_q"]}))
    with pytest.raises(ValueError, match="adapter_config.json does not fit this backbone"):
        load_adapter(tiny_wan(), tmp_path / "other")
    adapted = tiny_wan()
    load_adapter(adapted, folder)
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        load_adapter(adapted, folder)
    with pytest.raises(FileNotFoundError, match="no adapter folder"):
        load_adapter(tiny_wan(), tmp_path / "nowhere")


def test_model_card_has_hub_metadata_loading_code_recipe_and_eval_table(tmp_path):
    checkpoint = lora_checkpoint(trained_module(), "DiffusionDPO", base_model="Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
    write_adapter(checkpoint, tmp_path, RECIPE_TEXT, TABLE, repo_id="alice/dpo-lora", license="apache-2.0")
    card = ModelCard.load(tmp_path / "README.md")  # parsed as the Hub parses it
    assert card.data.base_model == "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    assert (card.data.library_name, card.data.license) == ("peft", "apache-2.0")
    assert {"prefalign", "talking-head", "lora", "diffusiondpo"} <= set(card.data.tags)
    text = card.text
    assert "trained with **DiffusionDPO** in prefalign" in text and "for 7 optimizer steps" in text
    assert 'load_adapter(denoiser, "alice/dpo-lora")' in text
    assert 'PeftModel.from_pretrained(backbone, "alice/dpo-lora")' in text
    for row in ("| sync | 0.8791 ± 0.012 |", "| identity | 0.0226 |", "| jitter | 0.00666 |"):
        assert row in text
    assert "broken" not in text and "On 2 held-out clips." in text
    assert "```yaml\n" + RECIPE_TEXT + "```" in text
    config = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert config["base_model_name_or_path"] == "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left
    # Without a table, a recipe, a base model or trained new modules: no such sections, and still valid metadata.
    write_adapter(lora_checkpoint(trained_module(train_new_modules=False)), tmp_path / "bare")
    bare = ModelCard.load(tmp_path / "bare" / "README.md")
    assert bare.data.base_model is None and "## Evaluation" not in bare.text and "## Recipe" not in bare.text
    assert "not trained in this run" in bare.text and load_file(tmp_path / "bare" / MODULES) == {}
    load_adapter(tiny_wan(), tmp_path / "bare")  # the new modules keep the values the recipe builds them with
    assert eval_markdown({"clips": []}) == "(no metrics in the evaluation table)"
    assert "| sync | 0.5 |" in eval_markdown({"sync": 0.5})
    assert "| lpips | n/a |" in eval_markdown({"metrics": {"lpips": {"mean": math.nan, "std": math.nan, "count": 0}}})


def fit(module, talkingshapes, callback, steps, root):
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, callbacks=[callback], default_root_dir=root,
    )  # fmt: skip
    data = PortraitDataModule(train=str(talkingshapes), batch_size=2, num_frames=17, val_fraction=0.0)
    trainer.fit(module, datamodule=data)
    return trainer


def lora_module(cls=AlignmentModule) -> AlignmentModule:
    return cls(tiny_wan(), FlowMatching(), lora=LoraSettings(rank=4),
               optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2))  # fmt: skip


class NoCheckpointHook(AlignmentModule):
    """PushToHub must not need the checkpoint hook (whose collectives gather every rank's states on each push)."""

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        raise AssertionError("PushToHub called on_save_checkpoint")


def test_push_to_hub_uploads_every_n_steps_and_at_the_end(hub, token, talkingshapes, tmp_path, clip_batch, caplog):
    module = lora_module(NoCheckpointHook)
    callback = PushToHub("alice/live", every_n_steps=2, endpoint=hub.url, base_model=WAN)
    trainer = fit(module, talkingshapes, callback, 3, tmp_path)
    commits = hub.commits("alice/live")[1:]  # after the Hub's initial commit
    assert [c.summary for c in commits] == [
        "prefalign: adapters at step 2", "prefalign: adapters at the end of training (step 3)",
    ]  # fmt: skip
    assert commits[0].files[ADAPTER_WEIGHTS] != commits[1].files[ADAPTER_WEIGHTS]  # training moved on
    loaded = tiny_wan()
    load_adapter(loaded, hub.write_tree("alice/live", tmp_path / "pulled"))
    module.eval()
    x_t, t, cond = fixed_inputs(module, clip_batch)
    torch.testing.assert_close(loaded(x_t, t, cond), module.denoiser(x_t, t, cond))
    assert "for 3 optimizer steps" in commits[1].files["README.md"].decode()
    assert ModelCard(commits[1].files["README.md"].decode()).data.base_model == WAN
    # The checkpoint file Lightning writes for the run pushes the same tensors.
    module.on_save_checkpoint = AlignmentModule.on_save_checkpoint.__get__(module)
    trainer.save_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    with pytest.warns(UserWarning, match="no recipe found"):  # a run outside LightningCLI saves no config
        push(tmp_path / "run" / "checkpoints" / "last.ckpt", "alice/from-file", endpoint=hub.url)
    for name in (ADAPTER_WEIGHTS, MODULES):
        pushed, live = (safetensors_load(hub.files(repo)[name]) for repo in ("alice/from-file", "alice/live"))
        assert pushed.keys() == live.keys() and all(torch.equal(pushed[k], live[k]) for k in live)
    assert_no_token_under(tmp_path, token)
    assert token not in caplog.text


def test_push_to_hub_failures_warn_while_training_and_raise_at_the_end(hub, token, talkingshapes, tmp_path, caplog):
    hub.fail_commits = True
    callback = PushToHub("alice/flaky", every_n_steps=1, endpoint=hub.url)
    with pytest.raises(HfHubHTTPError):
        fit(lora_module(), talkingshapes, callback, steps=2, root=tmp_path)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "PushToHub" in r.getMessage()]
    assert len(warned) == 2 and all("alice/flaky" in message for message in warned)
    assert "at step 1" in warned[0] and "at step 2" in warned[1]  # training went on after a failed upload
    assert token not in caplog.text

    with pytest.raises(ValueError, match="trains the full weights"):
        fit(AlignmentModule(tiny_wan(), FlowMatching()), talkingshapes, PushToHub("alice/full"), steps=1, root=tmp_path)


def test_init_adapter_rebuilds_the_run_with_the_loaded_model_as_reference(tmp_path, clip_batch):
    """``model.init_adapter``: the pushed folder becomes a module to sample, evaluate or train further."""
    trained = trained_module()
    folder = write_adapter(lora_checkpoint(trained), tmp_path / "adapter")
    loaded = AlignmentModule(tiny_wan(), FlowMatching(), init_adapter=str(folder)).eval()
    assert (loaded.lora.rank, loaded.lora.alpha) == (4, 8.0)
    noise, t, cond = fixed_inputs(trained, clip_batch)
    expected = trained.denoiser(noise, t, cond)
    torch.testing.assert_close(loaded.denoiser(noise, t, cond), expected, rtol=0, atol=0)
    with loaded.reference() as reference:  # the reference is the loaded model, not the bare base
        torch.testing.assert_close(reference(noise, t, cond), expected, rtol=0, atol=0)
    trainable = {name for name, param in loaded.named_parameters() if param.requires_grad}
    assert trainable and all("lora_" in name or "audio_conditioning" in name for name in trainable)
    with pytest.raises(ValueError, match="disagrees with the adapters"):
        AlignmentModule(tiny_wan(), FlowMatching(), init_adapter=str(folder), lora=LoraSettings(rank=8))


def test_push_finds_the_recipe_of_a_run_with_a_fixed_checkpoint_folder(hub, talkingshapes, tmp_path, capsys):
    """The real-scale recipes' layout: checkpoints in ``ROOT/checkpoints/``, the config LightningCLI saves in the first
    logger's ``ROOT/csv/version_N/``. A resumed run adds a version; another run may share the root."""
    root = tmp_path / "runs" / "sft"
    files = {  # what recipes/sft_wan_i2v.yaml sets for the run's files, around the demo's tiny model
        "trainer": {
            "default_root_dir": str(root), "max_steps": 1, "limit_val_batches": 0, "enable_progress_bar": False,
            "logger": [
                {"class_path": "lightning.pytorch.loggers.CSVLogger",
                 "init_args": {"save_dir": str(root), "name": "csv"}},
                {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                 "init_args": {"save_dir": str(root), "name": "tensorboard"}},
            ],
            "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                           "init_args": {"dirpath": str(root / "checkpoints"), "save_last": True, "save_top_k": 0}}],
        },
        "model": {"lora": {"rank": 4}},
        "data": {"train": str(talkingshapes), "batch_size": 2},
    }  # fmt: skip
    (tmp_path / "files.yaml").write_text(yaml.safe_dump(files))
    main(["fit", "--config", str(DEMO), "--config", str(tmp_path / "files.yaml")])
    ckpt, saved = root / "checkpoints" / "last.ckpt", root / "csv" / "version_0" / "config.yaml"
    assert ckpt.is_file() and saved.is_file() and not (root / "config.yaml").exists()
    capsys.readouterr()

    main(["push", "--ckpt_path", str(ckpt), "--repo_id", "alice/sft"])
    assert hub.files("alice/sft")[RECIPE].decode() == saved.read_text()
    assert f"recipe: {saved}" in capsys.readouterr().out

    # A resumed run (more steps) wrote version_1; a later run of another recipe, sharing the root but keeping its
    # checkpoints elsewhere, wrote version_2. The push takes the newest config that names this checkpoint folder.
    config = yaml.safe_load(saved.read_text())
    resumed = yaml.safe_dump({**config, "trainer": {**config["trainer"], "max_steps": 2}})
    elsewhere = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": str(root / "other-checkpoints")}}  # fmt: skip
    other = {**config["trainer"], "callbacks": [elsewhere]}
    for version, text in ((1, resumed), (2, yaml.safe_dump({**config, "trainer": other}))):
        (root / "csv" / f"version_{version}").mkdir()
        (root / "csv" / f"version_{version}" / "config.yaml").write_text(text)
    main(["push", "--ckpt_path", str(ckpt), "--repo_id", "alice/sft"])
    assert hub.files("alice/sft")[RECIPE].decode() == resumed
    assert f"recipe: {root / 'csv' / 'version_1' / 'config.yaml'}" in capsys.readouterr().out


def test_push_without_a_recipe_warns_and_reads_only_recipe_sized_files(hub, tmp_path, capsys):
    root = tmp_path / "run"
    ckpt = root / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save(lora_checkpoint(trained_module()), ckpt)
    with pytest.warns(UserWarning, match="no recipe found.*--recipe FILE"):
        main(["push", "--ckpt_path", str(ckpt), "--repo_id", "alice/bare"])
    assert RECIPE not in hub.files("alice/bare") and "## Recipe" not in hub.files("alice/bare")["README.md"].decode()
    assert "recipe:" not in capsys.readouterr().out

    huge = root / "csv" / "version_0" / "config.yaml"
    huge.parent.mkdir(parents=True)
    huge.write_text("trainer:\n  max_steps: 1\n" + "#" * MAX_BYTES)
    with pytest.warns(UserWarning, match="too big for a recipe.*pushing without prefalign_recipe.yaml.*--recipe"):
        push(ckpt, "alice/huge")
    assert RECIPE not in hub.files("alice/huge")
    with pytest.raises(ValueError, match="too big for a recipe"):  # the user's own file: an error, not a warning
        main(["push", "--ckpt_path", str(ckpt), "--repo_id", "alice/huge", "--recipe", str(huge)])

    # Several configs, none naming this checkpoint folder: the newest version, with a warning.
    huge.write_text(RECIPE_TEXT)
    (root / "tensorboard" / "version_3").mkdir(parents=True)
    (root / "tensorboard" / "version_3" / "config.yaml").write_text(RECIPE_TEXT)
    with pytest.warns(UserWarning, match="none of the 2 configs.*taking the newest.*version_3"):
        assert find_recipe(ckpt) == root / "tensorboard" / "version_3" / "config.yaml"
    # Lightning's default layout (checkpoints inside the logger's version folder): the config beside them.
    inside = root / "csv" / "version_0" / "checkpoints" / "last.ckpt"
    assert find_recipe(inside) == huge
    assert find_recipe(tmp_path / "run.ckpt") is None  # not in a checkpoints folder: nothing to go by


def test_model_card_names_the_base_model_by_hub_id_only(tmp_path, monkeypatch):
    """The Hub rejects a card whose base_model is not a repo id: a local folder becomes the id it was downloaded as,
    or is left out of the metadata with a warning; ``base_model=`` gives the id."""
    monkeypatch.chdir(tmp_path)
    module = trained_module()
    cached = tmp_path / "hf" / "hub" / f"models--{WAN.replace('/', '--')}" / "snapshots" / "0123abcd"
    cached.mkdir(parents=True)
    (tmp_path / "tiny").mkdir()
    (tmp_path / "Wan-AI" / "local-copy").mkdir(parents=True)  # reads as owner/name, but is a folder here

    def card_and_config(recorded, **kwargs):
        folder = write_adapter(lora_checkpoint(module, base_model=recorded), tmp_path / "out", **kwargs)
        return ModelCard.load(folder / "README.md"), json.loads((folder / ADAPTER_CONFIG).read_text())

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # prefalign warns with UserWarning
        for recorded in (WAN, str(cached)):  # a Hub id; a snapshot in huggingface_hub's cache
            card, config = card_and_config(recorded)
            assert card.data.base_model == WAN and config["base_model_name_or_path"] == WAN
            assert f"Base model: `{WAN}`." in card.text
        card, config = card_and_config("/data/models/Wan2.1-I2V-14B-480P-Diffusers", base_model=WAN)
        assert card.data.base_model == WAN and config["base_model_name_or_path"] == WAN  # the given id wins

    for recorded in ("/data/models/Wan2.1-I2V-14B-480P-Diffusers", "./tiny", "tiny", "Wan-AI/local-copy"):
        with pytest.warns(UserWarning, match=f"base model {recorded} is a local folder.*--base_model owner/name"):
            card, config = card_and_config(recorded)
        assert card.data.base_model is None and "base_model" not in card.content.split("---")[1]
        assert f"Base model: the local folder `{recorded}`" in card.text
        assert config["base_model_name_or_path"] == recorded  # as peft writes it: where the run found the weights
    with pytest.raises(ValueError, match="base_model must be a Hub repo id"):
        card_and_config(WAN, base_model="./tiny")
    with pytest.raises(ValueError, match="base_model must be a Hub repo id"):
        PushToHub("alice/live", base_model="/data/models/wan")


def test_push_names_the_given_base_model_or_none(hub, tmp_path, capsys):
    ckpt = tmp_path / "run.ckpt"
    torch.save(lora_checkpoint(trained_module(), base_model="/data/models/Wan2.1-I2V-14B-480P-Diffusers"), ckpt)
    with pytest.warns(UserWarning, match="/data/models/Wan2.1-I2V-14B-480P-Diffusers is a local folder.*--base_model"):
        main(["push", "--ckpt_path", str(ckpt), "--repo_id", "alice/local", "--recipe", str(DEMO)])
    card = ModelCard(hub.files("alice/local")["README.md"].decode())
    assert card.data.base_model is None and card.data.library_name == "peft"
    assert f"recipe: {DEMO}" in capsys.readouterr().out

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # prefalign warns with UserWarning
        main(["push", "--ckpt_path", str(ckpt), "--repo_id", "alice/local", "--recipe", str(DEMO),
              "--base_model", WAN])  # fmt: skip
    card = ModelCard(hub.files("alice/local")["README.md"].decode())
    assert card.data.base_model == WAN
    assert json.loads(hub.files("alice/local")[ADAPTER_CONFIG])["base_model_name_or_path"] == WAN
