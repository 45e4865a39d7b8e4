"""The in-process judge that hears: a tiny random Qwen2.5-Omni thinker (audio, vision and text towers) built from
its config, its tokenizer trained offline, its inputs made without torchvision and checked against the formulas and
the real processors of transformers."""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest
import torch

from prefalign.rewards import MLLMJudge
from prefalign.rewards.judge import DEFAULT_PROMPT, PROMPTS, _MinimalProcessor
from test_judge import GOOD, tiny_qwen  # noqa: F401 (the tiny Qwen2.5-VL, a fixture)

FPS, RATE = 25.0, 16000
HEARS = "the speech the face in the video must speak"
#: Without torchvision transformers builds no Qwen processor, and the judge builds its own (_MinimalProcessor).
HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None

#: Qwen2.5-Omni's special tokens, by the names its processor reads off the tokenizer.
OMNI_TOKENS = {"image_token": "<|IMAGE|>", "video_token": "<|VIDEO|>", "audio_token": "<|AUDIO|>",
               "vision_bos_token": "<|vision_bos|>", "vision_eos_token": "<|vision_eos|>",
               "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>"}  # fmt: skip
#: Qwen3-Omni's.
OMNI3_TOKENS = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>", "audio_token": "<|audio_pad|>",
                "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>",
                "audio_bos_token": "<|audio_start|>", "audio_eos_token": "<|audio_end|>"}  # fmt: skip
#: Qwen2.5-Omni's chat template, less its default system message.
OMNI_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_bos|><|IMAGE|><|vision_eos|>"
    "{% elif part['type'] == 'video' %}<|vision_bos|><|VIDEO|><|vision_eos|>"
    "{% elif part['type'] == 'audio' %}<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def omni_tokenizer(tokens: dict[str, str] = OMNI_TOKENS, chat_template: str | None = OMNI_TEMPLATE):
    """A byte-level BPE tokenizer trained in memory on the judge's prompts, with the Omni special tokens named as the
    Omni processors read them (``tokenizer.audio_token`` ...)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *tokens.values()]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    corpus = [GOOD, DEFAULT_PROMPT, "user assistant system"] + [path.read_text() for path in PROMPTS.glob("*.txt")]
    bpe.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=chat_template, extra_special_tokens=dict(tokens))  # fmt: skip


def feature_extractor():
    """Qwen2.5-Omni's Whisper features (128 mel bins, 10 ms hops), padded to 4 s instead of its 300."""
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(feature_size=128, chunk_length=4)


def image_processor(**kwargs):
    """The PIL image processor of Qwen2.5-Omni (patches of 14, merged 2x2, in pairs of frames)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(**kwargs)


def tiny_omni_config(tokenizer) -> dict:
    """A Qwen2.5-Omni thinker of 2 text layers of width 32, a 2-block vision tower and a 2-layer audio tower."""
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in OMNI_TOKENS.items()}
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    return dict(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0},
            bos_token_id=pad, eos_token_id=eos, pad_token_id=pad,
        ),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=32, num_heads=4, out_hidden_size=32,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[1],
                           window_size=56),
        audio_config=dict(num_mel_bins=128, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=32,
                          d_model=32, output_dim=32, n_window=100, max_source_positions=1500),
        audio_token_index=ids["audio_token"], image_token_index=ids["image_token"],
        video_token_index=ids["video_token"], audio_start_token_id=ids["audio_bos_token"],
        audio_end_token_id=ids["audio_eos_token"], vision_start_token_id=ids["vision_bos_token"],
        vision_end_token_id=ids["vision_eos_token"],
    )  # fmt: skip


@pytest.fixture(scope="module")
def tiny_omni(tmp_path_factory):
    """A random Qwen2.5-Omni thinker saved as its Hub folder is: the model, the tokenizer, and one
    preprocessor_config.json for the image processor and the feature extractor together."""
    from transformers import Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration

    tokenizer = omni_tokenizer()
    config = tiny_omni_config(tokenizer)
    torch.manual_seed(0)
    model = Qwen2_5OmniThinkerForConditionalGeneration(Qwen2_5OmniThinkerConfig(**config))
    folder = tmp_path_factory.mktemp("tiny_omni")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    preprocessor = {**feature_extractor().to_dict(), **image_processor().to_dict(),
                    "processor_class": "Qwen2_5OmniProcessor"}  # fmt: skip
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor, default=str))
    return str(folder), config


@pytest.fixture(scope="module")
def tiny_qwen3_omni(tmp_path_factory):
    """A random Qwen3-Omni-MoE thinker (4 experts, patches of 16, an audio tower of windows of 100 frames) in its
    Hub folder layout, with Qwen3-Omni's special tokens."""
    from transformers import Qwen3OmniMoeThinkerConfig, Qwen3OmniMoeThinkerForConditionalGeneration

    template = OMNI_TEMPLATE
    for name, token in OMNI_TOKENS.items():
        template = template.replace(token, OMNI3_TOKENS[name])
    tokenizer = omni_tokenizer(OMNI3_TOKENS, chat_template=template)
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in OMNI3_TOKENS.items()}
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    config = dict(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=4096,
            moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
            rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0,
                             "mrope_interleaved": True},
            bos_token_id=pad, eos_token_id=eos, pad_token_id=pad,
        ),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=32, num_heads=4, out_hidden_size=32,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                           deepstack_visual_indexes=[1]),
        audio_config=dict(num_mel_bins=128, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=32,
                          d_model=32, output_dim=32, n_window=50, n_window_infer=100, conv_chunksize=50,
                          downsample_hidden_size=8),
        audio_token_id=ids["audio_token"], image_token_id=ids["image_token"], video_token_id=ids["video_token"],
        audio_start_token_id=ids["audio_bos_token"], audio_end_token_id=ids["audio_eos_token"],
        vision_start_token_id=ids["vision_bos_token"], vision_end_token_id=ids["vision_eos_token"],
        position_id_per_seconds=13,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Qwen3OmniMoeThinkerForConditionalGeneration(Qwen3OmniMoeThinkerConfig(**config))
    folder = tmp_path_factory.mktemp("tiny_qwen3_omni")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    preprocessor = {**feature_extractor().to_dict(), **image_processor(patch_size=16).to_dict(),
                    "processor_class": "Qwen3OmniMoeProcessor"}  # fmt: skip
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor, default=str))
    return str(folder)


@pytest.fixture
def own_processor(monkeypatch):
    """The judge builds its own processor, as where torchvision is missing (AutoProcessor's ImportError)."""
    import transformers

    def refuse(*args, **kwargs):
        raise ImportError("Qwen2VLVideoProcessor requires the Torchvision library but it was not found")

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", refuse)


def omni_judge(folder: str, **kwargs) -> MLLMJudge:
    options = dict(pretrained=folder, model_class="Qwen2_5OmniThinkerForConditionalGeneration", video_fps=FPS,
                   sample_rate=RATE, max_new_tokens=4, max_retries=1)  # fmt: skip
    options.update(kwargs)
    return MLLMJudge(**options)


def speech(kind: str, frames: int, n: int = 2) -> torch.Tensor:
    """``n`` tracks spanning ``frames`` video frames: a tone, silence, or loud noise (log-mel features of mean
    -0.26, -1.5 and 0.83)."""
    samples = round(frames / FPS * RATE)
    t = torch.arange(samples) / RATE
    track = {"tone": 0.5 * torch.sin(2 * math.pi * 220 * t), "silence": torch.zeros(samples),
             "noise": 0.3 * torch.randn(samples, generator=torch.Generator().manual_seed(0))}[kind]  # fmt: skip
    return track.expand(n, -1).clone()


def clips(n: int = 2, frames: int = 4, audio: str = "tone") -> tuple[torch.Tensor, dict]:
    """``n`` random 32x32 videos with a reference photo each and one speech track."""
    g = torch.Generator().manual_seed(1)
    videos = torch.rand(n, frames, 3, 32, 32, generator=g)
    return videos, {"audio": speech(audio, frames, n), "reference": torch.rand(n, 3, 32, 32, generator=g)}


def real_processor(monkeypatch, processor_class: str, tokenizer, extractor, video_processor=None):
    """transformers' own Omni processor, built around a video processor it would refuse: it checks that each part
    is of its expected class, and a video processor is one only with torchvision. Its images, audio, placeholders
    and the seconds per temporal patch are its own code."""
    import transformers
    from transformers.processing_utils import ProcessorMixin

    monkeypatch.setattr(ProcessorMixin, "check_argument_for_proper_class", lambda self, name, argument: type(argument))
    cls = getattr(transformers, processor_class)
    return cls(image_processor=image_processor(), video_processor=video_processor, feature_extractor=extractor,
               tokenizer=tokenizer)  # fmt: skip


class StubVideoProcessor:
    """``_MinimalProcessor.video`` as a video processor, for the real processor to expand its placeholders around."""

    valid_kwargs = None
    model_input_names = ["pixel_values_videos", "video_grid_thw"]

    def __init__(self, minimal: _MinimalProcessor):
        self.minimal = minimal
        self.temporal_patch_size = minimal.image_processor.temporal_patch_size
        self.merge_size = minimal.image_processor.merge_size

    def __call__(self, videos, **kwargs):
        patches, grids = zip(*(self.minimal.video(np.asarray(video)) for video in videos))
        return {"pixel_values_videos": torch.cat(patches), "video_grid_thw": torch.tensor(grids)}


def layout_of_qwen2_vl_videos(videos: torch.Tensor, patch: int = 14, merge: int = 2, pair: int = 2) -> torch.Tensor:
    """``Qwen2VLVideoProcessor.patchify`` of transformers 5.23 (its module needs torchvision to import), as written
    there: normalised videos ``[B, T, C, H, W]`` to patches ``[B·t·h·w, C·pair·P·P]``."""
    b, t, c, height, width = videos.shape
    if pad := -t % pair:
        videos = torch.cat((videos, videos[:, -1:].expand(-1, pad, -1, -1, -1)), dim=1)
        t += pad
    h, w = height // patch, width // patch
    patches = videos.view(b, t // pair, pair, c, h // merge, merge, patch, w // merge, merge, patch)
    return patches.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9).reshape(b * (t // pair) * h * w, c * pair * patch * patch)


def normalised(frames: np.ndarray) -> torch.Tensor:
    """uint8 frames ``[T, H, W, 3]`` rescaled and normalised with CLIP's mean and std, as ``[T, 3, H, W]``."""
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    x = torch.from_numpy(frames).float().permute(0, 3, 1, 2) / 255
    return (x - torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1)) / torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)


def answer_by_mean_audio_feature(judge: MLLMJudge, seen: list):
    """A stand-in for the thinker's ``generate``: lip sync 5 where the mean of a request's audio features (over its
    own frames) is above 0, else 1, as JSON tokens of the real tokenizer after the prompt; records its inputs."""

    def generate(input_ids, input_features, feature_attention_mask, **kwargs):
        seen.append({"input_ids": input_ids, "input_features": input_features,
                     "feature_attention_mask": feature_attention_mask, **kwargs})  # fmt: skip
        rows = []
        for features, mask in zip(input_features, feature_attention_mask):
            lip_sync = 5 if features[:, mask.bool()].mean() > 0 else 1
            answer = json.dumps({"lip_sync": lip_sync, "expressiveness": 3, "motion_quality": 3})
            rows.append(judge.tokenizer(answer, add_special_tokens=False)["input_ids"])
        longest = max(len(row) for row in rows)
        pad = judge.tokenizer.pad_token_id
        answers = torch.tensor([row + [pad] * (longest - len(row)) for row in rows])
        return torch.cat([input_ids, answers.to(input_ids.device)], dim=1)

    return generate


# --- 1. the audio reaches the model -------------------------------------------------------------------------------
def test_the_omni_judge_hears_by_default_and_its_audio_features_follow_the_speech(tiny_omni):
    from transformers.models.qwen2_5_omni.processing_qwen2_5_omni import _get_feat_extract_output_lengths

    folder, _ = tiny_omni
    judge = omni_judge(folder)
    assert judge.inputs == ["reference", "video", "audio"] and judge.num_frames is None
    assert isinstance(judge.processor, _MinimalProcessor) or HAS_TORCHVISION  # else the real processor
    videos, cond = clips(frames=8)
    cond["audio"][1] = speech("noise", 8, 1)[0]  # two different tracks
    inputs = judge._inputs(judge.samples(videos, cond))
    features, mask = inputs["input_features"], inputs["feature_attention_mask"]
    extractor = judge.processor.feature_extractor
    assert features.shape == (2, 128, extractor.nb_max_frames)  # padded to the extractor's length, as Qwen2.5-Omni's
    assert not torch.allclose(features[0], features[1])
    samples = cond["audio"].shape[1]  # 8 frames at 25 fps: 0.32 s, 5120 samples
    frames = math.ceil(samples / extractor.hop_length)
    assert mask.sum(-1).tolist() == [frames, frames]
    want = int(_get_feat_extract_output_lengths(torch.tensor(frames)))
    placeholders = (inputs["input_ids"] == judge.tokenizer.convert_tokens_to_ids("<|AUDIO|>")).sum(-1)
    assert placeholders.tolist() == [want, want] and want == 8

    cond["audio"][1] = cond["audio"][0]  # the same speech: the same features
    inputs = judge._inputs(judge.samples(videos, cond))
    assert torch.equal(inputs["input_features"][0], inputs["input_features"][1])


def test_audio_at_another_rate_is_resampled_to_the_extractors(tiny_omni):
    folder, _ = tiny_omni
    judge = omni_judge(folder, sample_rate=8000)
    videos, cond = clips(frames=8)
    cond["audio"] = cond["audio"][:, ::2].clone()  # the same 0.32 s at 8 kHz
    inputs = judge._inputs(judge.samples(videos, cond))
    assert inputs["feature_attention_mask"].sum(-1).tolist() == [32, 32]  # 5120 samples at 16 kHz, in 10 ms hops


# --- 2. the reward follows the audio ------------------------------------------------------------------------------
def test_the_reward_changes_when_only_the_audio_changes(tiny_omni, monkeypatch):
    folder, _ = tiny_omni
    judge = omni_judge(folder)
    seen = []
    monkeypatch.setattr(judge.model, "generate", answer_by_mean_audio_feature(judge, seen))
    videos, cond = clips(audio="noise")
    loud = judge.score(videos, cond)
    quiet = judge.score(videos, {**cond, "audio": speech("silence", 4)})
    again = judge.score(videos, cond)
    assert loud["judge/lip_sync"].tolist() == [1.0, 1.0] and quiet["judge/lip_sync"].tolist() == [0.0, 0.0]
    assert torch.equal(loud["judge/lip_sync"], again["judge/lip_sync"])
    other_videos = judge.score(torch.rand_like(videos), cond)  # the video changes, the speech does not
    assert torch.equal(other_videos["judge/lip_sync"], loud["judge/lip_sync"])
    both = {**cond, "audio": torch.stack([speech("noise", 4, 1)[0], speech("silence", 4, 1)[0]])}
    mixed = judge.score(videos, both)
    assert mixed["judge/lip_sync"].tolist() == [1.0, 0.0]  # each video gets its own speech's answer
    judge.batch_size = 1
    one_by_one = judge.score(videos, both)
    assert torch.equal(one_by_one["judge/lip_sync"], mixed["judge/lip_sync"]) and len(seen[-1]["input_ids"]) == 1
    for terms in (loud, quiet, again, other_videos, mixed, one_by_one):
        assert terms["judge_valid"].tolist() == [1.0, 1.0]
    assert judge.stats == {"requests": 12, "retries": 0, "failures": 0}


# --- 3. what the request holds, in order ---------------------------------------------------------------------------
def test_the_request_holds_the_reference_then_the_video_as_a_video_then_the_speech_then_the_prompt(tiny_omni,
                                                                                                  monkeypatch):
    folder, _ = tiny_omni
    judge = omni_judge(folder)
    seen = []
    monkeypatch.setattr(judge.model, "generate", answer_by_mean_audio_feature(judge, seen))
    videos, cond = clips(frames=6)
    judge.score(videos, cond)
    (inputs,) = seen
    # The video as a video: frames in pairs (t = 6 / 2), each 32x32 frame resized to Qwen2.5-Omni's smallest video
    # frame (128 merged patches of 28x28 pixels at least: 336x336, 24x24 patches).
    assert inputs["video_grid_thw"].tolist() == [[3, 24, 24]] * 2
    assert inputs["pixel_values_videos"].shape == (2 * 3 * 24 * 24, 3 * 2 * 14 * 14)
    assert inputs["video_second_per_grid"].tolist() == pytest.approx([2 / FPS] * 2)  # 2 frames at 25 fps
    # The reference as one image (32x32: at least 56x56 pixels for an image, 4x4 patches).
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 4]] * 2
    assert "mm_token_type_ids" not in inputs  # the thinker finds its placeholders itself
    for row in inputs["input_ids"]:
        text = judge.tokenizer.decode(row)
        assert text.count("<|IMAGE|>") == 4 and text.count("<|VIDEO|>") == 3 * 24 * 24 // 4
        assert text.count("<|AUDIO|>") == ((24 - 1) // 2 + 1 - 2) // 2 + 1  # 0.24 s: 24 feature frames, 6 tokens
        marks = ("<|vision_bos|><|IMAGE|>", "<|vision_bos|><|VIDEO|>", "<|audio_bos|><|AUDIO|>", HEARS,
                 "<|im_start|>assistant")  # fmt: skip
        order = [text.index(mark) for mark in marks]
        assert order == sorted(order)
        assert "6 frames at 25 frames per second" in text


# --- 4. the tiny thinker end to end --------------------------------------------------------------------------------
def test_the_tiny_thinker_generates_for_a_batch_with_audio_video_and_reference(tiny_omni, monkeypatch):
    folder, _ = tiny_omni
    judge = omni_judge(folder, max_retries=1, retry_temperature=0.9)
    calls = []
    generate = judge.model.generate

    def counted(**inputs):
        calls.append(sorted(inputs))
        return generate(**inputs)

    monkeypatch.setattr(judge.model, "generate", counted)
    videos, cond = clips(frames=4)
    terms = judge.score(videos, cond)
    assert set(terms) == {"judge/lip_sync", "judge/expressiveness", "judge/motion_quality", "judge_valid"}
    assert all(value.shape == (2,) and torch.isfinite(value).all() for value in terms.values())
    for key in ("input_features", "feature_attention_mask", "pixel_values_videos", "video_grid_thw",
                "video_second_per_grid", "pixel_values", "image_grid_thw"):  # fmt: skip
        assert key in calls[0]
    stats = judge.stats
    assert stats["requests"] == 2 + stats["retries"] and stats["retries"] <= 2
    assert stats["failures"] == int((terms["judge_valid"] == 0).sum())
    assert len(calls) == 1 + (stats["retries"] > 0)  # a batch of 2, then the unusable rows together
    for name in judge.aspect_terms:  # a random model's answers: whatever failed is scored neutral
        assert all(v == 0.5 for v, ok in zip(terms[name].tolist(), terms["judge_valid"].tolist()) if not ok)


def test_a_tiny_qwen3_omni_thinker_judges_too(tiny_qwen3_omni):
    judge = omni_judge(tiny_qwen3_omni, model_class="Qwen3OmniMoeThinkerForConditionalGeneration", max_retries=0)
    assert judge.inputs == ["reference", "video", "audio"] and judge.num_frames is None
    videos, cond = clips(frames=30)  # 1.2 s of speech: one full window of 100 feature frames and 20 more
    inputs = judge._inputs(judge.samples(videos, cond))
    assert inputs["input_features"].shape == (2, 128, 120)  # padded to the longest clip only, as Qwen3-Omni's
    audio = (inputs["input_ids"] == judge.tokenizer.convert_tokens_to_ids("<|audio_pad|>")).sum(-1)
    assert audio.tolist() == [13 + 3, 13 + 3]  # 13 tokens a full window; 20 frames: 10, 5, 3
    # 32x32 frames at Qwen3-Omni's smallest video frame (128 merged patches of 32x32 pixels): 384x384, 24x24 patches.
    assert inputs["video_grid_thw"].tolist() == [[15, 24, 24]] * 2
    assert inputs["video_second_per_grid"].tolist() == pytest.approx([2 / FPS] * 2)
    terms = judge.score(videos[:, :4], {key: value[:, : 4 * RATE // 25] if key == "audio" else value
                                        for key, value in cond.items()})  # fmt: skip
    assert all(value.shape == (2,) for value in terms.values()) and judge.stats["requests"] == 2


# --- 5. options ---------------------------------------------------------------------------------------------------
def test_audio_for_a_model_without_an_audio_tower_is_refused_at_construction():
    with pytest.raises(ValueError, match=r"Qwen2_5_VLForConditionalGeneration has no audio tower.*inputs \['video', "
                                         r"'audio'\]"):  # fmt: skip
        MLLMJudge(pretrained="/nonexistent/judge", model_class="Qwen2_5_VLForConditionalGeneration",
                  inputs=["video", "audio"])  # fmt: skip
    with pytest.raises(ValueError, match="Qwen2_5OmniThinkerForConditionalGeneration"):  # the talker is not needed
        MLLMJudge(pretrained="/nonexistent/judge", model_class="Qwen2_5OmniForConditionalGeneration")
    with pytest.raises(ValueError, match="no model class"):
        MLLMJudge(pretrained="/nonexistent/judge", model_class="Qwen9OmniThinker")


def test_defaults_follow_the_model(tiny_omni, tiny_qwen):  # noqa: F811
    omni, _ = tiny_omni
    vl, _ = tiny_qwen
    assert MLLMJudge(pretrained=vl).inputs == ["video"] and MLLMJudge(pretrained=vl).num_frames == 8
    assert MLLMJudge(pretrained=vl).prompt == DEFAULT_PROMPT  # the image-only judge of stills, as it was
    stills = omni_judge(omni, num_frames=3, inputs=["video", "audio"])  # an Omni judge of stills
    text = stills._chat_text(stills.samples(*clips(frames=5))[0])
    assert text.count("<|vision_bos|><|IMAGE|><|vision_eos|>") == 3 and "<|VIDEO|>" not in text
    judge = omni_judge(omni)
    sample = judge.samples(*clips())[0]
    templated = judge._chat_text(sample)
    judge.processor.chat_template = judge.tokenizer.chat_template = None  # no template anywhere: Qwen's layout
    assert judge._chat_text(sample) == templated


def test_a_video_the_minimal_processor_cannot_lay_out_is_refused_at_construction(tiny_omni, own_processor):
    folder, config = tiny_omni
    with pytest.raises(ValueError, match="Qwen3VLForConditionalGeneration sees a video.*torchvision"):
        MLLMJudge(config={}, processor=folder, model_class="Qwen3VLForConditionalGeneration", num_frames=None)


# --- the inputs without torchvision against transformers' own ------------------------------------------------------
@pytest.mark.parametrize("frames", [4, 5])
def test_videos_are_laid_out_as_qwen2_vl_video_processor_lays_them_out(frames):
    minimal = _MinimalProcessor(omni_tokenizer(), image_processor(), feature_extractor(), "qwen2_5_omni_thinker")
    # 336x336 frames are of the smallest Qwen2.5-Omni video size already: no resizing, whose filters differ.
    video = np.random.default_rng(frames).integers(0, 256, (frames, 336, 336, 3), dtype=np.uint8)
    patches, grid = minimal.video(video)
    assert grid == [math.ceil(frames / 2), 24, 24]
    torch.testing.assert_close(patches, layout_of_qwen2_vl_videos(normalised(video)[None]), atol=1e-5, rtol=1e-5)
    # Two equal frames are an image: the image processor repeats a still over the pair the same way.
    still = np.repeat(video[:1], 2, axis=0)
    image = minimal.image_processor(images=[video[0]], size=minimal.video_size, return_tensors="pt")
    torch.testing.assert_close(minimal.video(still)[0], image["pixel_values"])


@pytest.mark.parametrize("processor_class, model_type, tokens", [
    ("Qwen2_5OmniProcessor", "qwen2_5_omni_thinker", OMNI_TOKENS),
    ("Qwen3OmniMoeProcessor", "qwen3_omni_moe_thinker", OMNI3_TOKENS),
])  # fmt: skip
def test_the_minimal_processor_gives_what_the_real_omni_processor_gives(monkeypatch, processor_class, model_type,
                                                                       tokens):  # fmt: skip
    tokenizer = omni_tokenizer(tokens, chat_template=None)
    minimal = _MinimalProcessor(tokenizer, image_processor(), feature_extractor(), model_type)
    real = real_processor(monkeypatch, processor_class, tokenizer, feature_extractor(), StubVideoProcessor(minimal))
    t = tokens
    request = (f"{t['vision_bos_token']}{t['image_token']}{t['vision_eos_token']}"
               f"{t['vision_bos_token']}{t['video_token']}{t['vision_eos_token']}"
               f"{t['audio_bos_token']}{t['audio_token']}{t['audio_eos_token']}rate it")  # fmt: skip
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (40, 60, 3), dtype=np.uint8) for _ in range(2)]
    videos = [rng.integers(0, 256, (n, 32, 48, 3), dtype=np.uint8) for n in (4, 5)]
    # Lengths across Qwen3-Omni's windows of 100 feature frames (1 s): 0.3 s, 1 s, 2.5 s.
    for samples in ((4800, 16000), (16000, 40000)):
        audio = [rng.standard_normal(n).astype(np.float32) * 0.1 for n in samples]
        ours = minimal([request] * 2, images=images, videos=videos, audio=audio, fps=12.5)
        theirs = real(text=[request] * 2, images=images, videos=videos, audio=audio, padding=True,
                      return_tensors="pt", videos_kwargs={"fps": 12.5})  # fmt: skip
        assert sorted(ours) == sorted(theirs)
        for key in theirs:
            torch.testing.assert_close(ours[key], theirs[key], check_dtype=False, msg=key)
        audio_tokens = (ours["input_ids"] == tokenizer.convert_tokens_to_ids(t["audio_token"])).sum(-1)
        assert audio_tokens.tolist() == [real._get_num_audio_tokens(n) for n in samples]  # its formula by length


def test_the_judge_asks_a_real_processor_for_what_it_asks_its_own(tiny_omni, own_processor, monkeypatch):
    """Where the processor loads (with torchvision), the judge calls it with the frames, their rate and the speech:
    here transformers' Qwen2.5-Omni processor around the stub video processor gives what the minimal one gives."""
    folder, _ = tiny_omni
    judge = omni_judge(folder)
    samples = judge.samples(*clips(frames=6))
    ours = judge._inputs(samples)
    minimal = judge.processor
    judge.processor = real_processor(monkeypatch, "Qwen2_5OmniProcessor", judge.tokenizer,
                                     minimal.feature_extractor, StubVideoProcessor(minimal))  # fmt: skip
    theirs = judge._inputs(samples)
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], check_dtype=False, msg=key)


@pytest.mark.skipif(
    not HAS_TORCHVISION,
    reason="torchvision is not importable here (a CUDA-only wheel): transformers builds no Qwen2.5-Omni processor "
           "without it (its video processor needs it), so the whole real processor cannot be compared here",
)  # fmt: skip
def test_the_minimal_processor_gives_what_the_whole_real_processor_gives():
    """With torchvision: the real ``Qwen2_5OmniProcessor`` with its real video processor, videos included, on frames
    of a size neither resizes (their resampling filters differ)."""
    from transformers import Qwen2_5OmniProcessor, Qwen2VLVideoProcessor

    tokenizer = omni_tokenizer(chat_template=None)
    real = Qwen2_5OmniProcessor(image_processor=image_processor(), video_processor=Qwen2VLVideoProcessor(),
                                feature_extractor=feature_extractor(), tokenizer=tokenizer)  # fmt: skip
    minimal = _MinimalProcessor(tokenizer, image_processor(), feature_extractor(), "qwen2_5_omni_thinker")
    request = ("<|vision_bos|><|IMAGE|><|vision_eos|><|vision_bos|><|VIDEO|><|vision_eos|>"
               "<|audio_bos|><|AUDIO|><|audio_eos|>go")  # fmt: skip
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (56, 56, 3), dtype=np.uint8) for _ in range(2)]
    videos = [rng.integers(0, 256, (n, 336, 336, 3), dtype=np.uint8) for n in (4, 5)]
    audio = [rng.standard_normal(n).astype(np.float32) * 0.1 for n in (4800, 16000)]
    ours = minimal([request] * 2, images=images, videos=videos, audio=audio, fps=25.0)
    theirs = real(text=[request] * 2, images=images, videos=videos, audio=audio, padding=True, return_tensors="pt",
                  videos_kwargs={"fps": 25.0, "do_sample_frames": False, "cap_pixels_per_frame": False})  # fmt: skip
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], check_dtype=False, atol=1e-5, rtol=1e-5, msg=key)


# --- the vision-language judge sees a video as a video too ----------------------------------------------------------
def test_a_vl_judge_at_fps_gets_the_video_as_a_video(tiny_qwen, own_processor):  # noqa: F811
    folder, config = tiny_qwen
    judge = MLLMJudge(pretrained=folder, num_frames=None, fps=12.5, video_fps=FPS, max_new_tokens=4, max_retries=0)
    judge.processor.chat_template = judge.tokenizer.chat_template = None  # its template has no videos: Qwen's layout
    videos = torch.rand(2, 8, 3, 32, 32)
    samples = judge.samples(videos, {})
    assert len(samples[0].frames) == 4 and samples[0].fps == 12.5
    inputs = judge._inputs(samples)
    assert inputs["video_grid_thw"].tolist() == [[2, 2, 2]] * 2  # 28x28 frames (the tiny image size), in pairs
    assert inputs["second_per_grid_ts"].tolist() == pytest.approx([2 / 12.5] * 2)
    video_tokens = inputs["input_ids"] == config["video_token_id"]
    assert video_tokens.sum(-1).tolist() == [2, 2] and "pixel_values" not in inputs
    assert torch.equal(inputs["mm_token_type_ids"], 2 * video_tokens.long())
    terms = judge.score(videos, {})
    assert terms["judge/lip_sync"].shape == (2,) and judge.stats["requests"] == 2
