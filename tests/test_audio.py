"""Speech conditioning on a tiny real wav2vec2: every level per video frame, frozen or trained, level selectors."""

import pytest
import torch
from conftest import tiny_wan
from transformers import Wav2Vec2Config, Wav2Vec2ForCTC, Wav2Vec2Model

from prefalign.data.errors import DataError
from prefalign.denoisers import Wav2Vec2AudioEncoder

#: wav2vec2's real CNN (kernels 10,3,3,3,3,2,2, strides 5,2,2,2,2,2,2: a 400-sample field, a 320-sample hop) at
#: tiny widths. Per-time-step layer norm in the CNN (as in the large checkpoints) keeps the lowest level local in
#: time; dropout stays on (wav2vec2's 0.1) so that eval mode is what makes the frozen encoder deterministic; a
#: larger initialiser than 0.02 makes the random layers change their input noticeably, as trained ones do.
TINY_WAV2VEC2 = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "conv_dim": (16,) * 7,
    "feat_extract_norm": "layer",
    "num_conv_pos_embeddings": 8,
    "num_conv_pos_embedding_groups": 4,
    "vocab_size": 8,
    "initializer_range": 0.2,
}
FRAMES, FPS, SR = 17, 25, 16000
SAMPLES = FRAMES * SR // FPS


@pytest.fixture(scope="module")
def wav2vec2_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("wav2vec2")
    Wav2Vec2Model(Wav2Vec2Config(**TINY_WAV2VEC2)).save_pretrained(path)
    return str(path)


def speech(batch: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.3 * torch.randn(batch, SAMPLES, generator=g)


def test_every_level_per_video_frame(wav2vec2_dir):
    encoder = Wav2Vec2AudioEncoder(pretrained=wav2vec2_dir).requires_grad_(False)
    assert (encoder.num_levels, encoder.feature_dim, encoder.sample_rate) == (3, 32, 16000)
    assert (encoder.stride, encoder.receptive_field) == (320, 400)
    feats = encoder(speech(), FRAMES, FPS)
    assert feats.shape == (2, FRAMES, 3, 32) and feats.dtype == torch.float32
    for i in range(3):
        for j in range(i):
            assert (feats[:, :, i] - feats[:, :, j]).abs().mean() > 0.1  # the levels are different features

    subset = Wav2Vec2AudioEncoder(pretrained=wav2vec2_dir, layers=[0, -1]).requires_grad_(False)
    assert subset.num_levels == 2
    torch.testing.assert_close(subset(speech(), FRAMES, FPS), feats[:, :, [0, 2]])
    # Per-clip normalisation, as Wav2Vec2FeatureExtractor: loudness does not change the features.
    torch.testing.assert_close(encoder(3 * speech(), FRAMES, FPS), feats, rtol=1e-4, atol=1e-4)
    # Longer audio is cropped to the video.
    longer = torch.cat([speech(), speech(seed=1)], dim=-1)
    torch.testing.assert_close(encoder(longer, FRAMES, FPS), feats, rtol=1e-4, atol=1e-4)


def test_loads_in_the_requested_dtype(wav2vec2_dir):
    encoder = Wav2Vec2AudioEncoder(pretrained=wav2vec2_dir, torch_dtype="bfloat16").requires_grad_(False)
    assert next(encoder.model.parameters()).dtype == torch.bfloat16
    feats = encoder(speech(), FRAMES, FPS)  # fp32 audio in, fp32 features out
    assert feats.shape == (2, FRAMES, 3, 32) and feats.dtype == torch.float32


def test_loads_the_speech_model_of_a_ctc_checkpoint(tmp_path):
    """Fine-tuned checkpoints such as facebook/wav2vec2-base-960h are ``Wav2Vec2ForCTC``: its wav2vec2 is used."""
    torch.manual_seed(0)
    ctc = Wav2Vec2ForCTC(Wav2Vec2Config(**TINY_WAV2VEC2))
    ctc.save_pretrained(tmp_path)
    encoder = Wav2Vec2AudioEncoder(pretrained=str(tmp_path))
    for name, param in encoder.model.state_dict().items():
        torch.testing.assert_close(param, ctc.wav2vec2.state_dict()[name], rtol=0, atol=0)


def test_bad_arguments_are_clear_errors(wav2vec2_dir):
    with pytest.raises(ValueError, match="exactly one"):
        Wav2Vec2AudioEncoder()
    with pytest.raises(ValueError, match="exactly one"):
        Wav2Vec2AudioEncoder(pretrained=wav2vec2_dir, config=TINY_WAV2VEC2)
    with pytest.raises(ValueError, match=r"0\.\.2"):
        Wav2Vec2AudioEncoder(config=TINY_WAV2VEC2, layers=[3])


def test_too_short_audio_is_a_data_error():
    encoder = Wav2Vec2AudioEncoder(config=TINY_WAV2VEC2)
    with pytest.raises(DataError, match="399 samples.*400") as error:
        encoder(torch.randn(1, 399), FRAMES, FPS)
    assert error.value.field == "audio"
    with pytest.raises(DataError, match=r"mono.*\(2, 1, 10880\)"):
        encoder(speech()[:, None], FRAMES, FPS)
    with pytest.raises(DataError, match="1 frames at 50 fps span 320 samples") as error:
        encoder(torch.randn(1, SAMPLES), 1, 50)  # enough audio, but the video spans only 20 ms of it
    assert error.value.field == "audio"


def test_frozen_encoder_is_deterministic_and_builds_no_graph():
    encoder = Wav2Vec2AudioEncoder(config=TINY_WAV2VEC2).requires_grad_(False)
    encoder.train()  # what Lightning does to the whole denoiser
    assert encoder.training and not encoder.model.training
    first, second = encoder(speech(), FRAMES, FPS), encoder(speech(), FRAMES, FPS)
    assert first.grad_fn is None and not first.requires_grad
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    # Trainable, it follows the module's mode: dropout acts in training only.
    encoder.requires_grad_(True)
    encoder.train()
    assert encoder.model.training
    assert (encoder(speech(), FRAMES, FPS) - first).abs().max() > 1e-3
    encoder.eval()
    torch.testing.assert_close(encoder(speech(), FRAMES, FPS), first, rtol=1e-5, atol=1e-5)


def test_trained_encoder_gets_gradients():
    encoder = Wav2Vec2AudioEncoder(config=TINY_WAV2VEC2).train()  # train_audio_encoder=True: left trainable
    feats = encoder(speech(), FRAMES, FPS)
    assert feats.requires_grad
    feats.pow(2).mean().backward()
    model = encoder.model
    for weight in (
        model.feature_extractor.conv_layers[0].conv.weight,
        model.encoder.layers[-1].attention.q_proj.weight,
    ):
        assert weight.grad is not None and weight.grad.abs().sum() > 0


def test_features_follow_the_audio_in_time():
    """Audio loud only from frame 9 on changes the lowest (local) level in the second half of the frames only."""
    # Without per-clip normalisation: it would turn the silent half from exact zeros into a tiny offset, which the
    # CNN's layer norm blows up to unit scale (real audio is never exactly silent).
    encoder = Wav2Vec2AudioEncoder(config=TINY_WAV2VEC2, normalize=False).requires_grad_(False)
    silence = torch.zeros(1, SAMPLES)
    second_half = silence.clone()
    second_half[:, 9 * SR // FPS :] = speech(batch=1)[:, 9 * SR // FPS :]
    change = (encoder(second_half, FRAMES, FPS) - encoder(silence, FRAMES, FPS))[0, :, 0].norm(dim=-1)
    # The positional convolution (8 features = 4 frames wide) may blur the onset by two frames.
    assert change[:7].max() < 0.05 * change[11:].min()


def test_frames_take_the_features_at_their_centres():
    """Frame f spans samples [640 f, 640 (f+1)); feature i's field is [320 i, 320 i + 400): f sits at i = 2 f + 3/8
    (the last frame's centre lies past the last feature's, which it takes)."""
    encoder = Wav2Vec2AudioEncoder(config=TINY_WAV2VEC2)
    n = 33  # features of 17 frames of audio: (10880 - 400) // 320 + 1
    ramp = torch.arange(n, dtype=torch.float32)[None, :, None, None]
    frames = encoder.to_frames(ramp, FRAMES, SR / FPS)[0, :, 0, 0]
    expected = (2 * torch.arange(FRAMES, dtype=torch.float32) + 0.375).clamp(max=n - 1)
    torch.testing.assert_close(frames, expected)


def test_level_selectors_and_pooled_token_with_wav2vec2(wav2vec2_dir):
    denoiser = tiny_wan(audio_encoder=Wav2Vec2AudioEncoder(pretrained=wav2vec2_dir), pooled_audio_token=True)
    conditioning = denoiser.audio_conditioning
    torch.testing.assert_close(conditioning.level_weights(), torch.full((2, 3), 1 / 3))  # uniform at init
    video = torch.rand(1, FRAMES, 3, 32, 32)
    cond = denoiser.condition({"video": video, "audio": speech(batch=1), "reference": video[:, 0]})
    assert cond["audio"].shape == (1, FRAMES, 3, 32) and cond["audio"].grad_fn is None  # frozen by default

    tokens = conditioning.tokens(cond["audio"])
    assert tokens.shape == (1, 5, 4 * 5 + 1, 3, 32)  # r·window local tokens and the pooled one per latent frame
    pooled = tokens[:, :, -1]
    torch.testing.assert_close(pooled, pooled[:, :1].expand_as(pooled), rtol=0, atol=0)  # one per clip

    for attn in conditioning.attn:
        torch.nn.init.normal_(attn.to_out.weight, std=0.1)
    x0 = denoiser.encode_video(video)
    denoiser(torch.randn_like(x0), torch.full((1,), 500.0), cond).pow(2).mean().backward()
    grad = conditioning.level_logits.grad
    assert grad is not None and (grad.abs().sum(dim=-1) > 0).all()  # every block's selector learns
    assert conditioning.pooled.grad.abs().sum() > 0
    assert all(p.grad is None for p in denoiser.audio_encoder.parameters())


def test_pooled_token_with_mel():
    denoiser = tiny_wan(pooled_audio_token=True)
    video = torch.rand(2, FRAMES, 3, 32, 32)
    cond = denoiser.condition({"video": video, "audio": speech(), "reference": video[:, 0]})
    tokens = denoiser.audio_conditioning.tokens(cond["audio"])
    assert tokens.shape == (2, 5, 4 * 5 + 1, 1, 32)
    x0 = denoiser.encode_video(video)
    assert denoiser(torch.randn_like(x0), torch.full((2,), 500.0), cond).shape == x0.shape
