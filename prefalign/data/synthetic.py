"""The TalkingShapes world: procedural talking heads whose lip sync is known exactly (see DESIGN.md).

Clips are deterministic from a seed, so demos and tests can measure "lip sync improved" on a CPU.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from prefalign.data import media

NUM_KEYPOINTS = 8
KEYPOINT_NAMES = (
    "nose",
    "left_eye",
    "right_eye",
    "mouth",
    "chin",
    "neck",
    "left_shoulder",
    "right_shoulder",
)
"""Keypoint order of every pose array. Left and right are the subject's, as in COCO: the left eye is image-right."""

MOUTH_COLOUR = (0.15, 0.02, 0.05)
EYE_COLOUR = (0.06, 0.05, 0.08)
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114])

# Audio: syllables, gaps between them, occasional pauses, all in seconds.
SYLLABLE_S = (0.08, 0.25)
GAP_S = (0.03, 0.2)
PAUSE_S = (0.3, 0.6)
PAUSE_PROBABILITY = 0.15
F0_HZ = (90.0, 240.0)
LOUDNESS = (0.4, 1.0)
NOISE_RMS = 0.01  # -40 dB below full scale
HARMONIC_AMPLITUDES = np.array([1.0, 1 / 2, 1 / 3, 1 / 4])

# Layout of the neutral pose, in image fractions.
HEAD_CENTRE = (0.5, 0.44)
EYE_HEIGHT = 0.25  # eyes sit this fraction of the head's half-height above its centre
MOUTH_HEIGHT = 0.4  # the mouth sits this fraction of the head's half-height below its centre
DRIFT_BOUND = (0.04, 0.025)
DRIFT_STEP = 0.004
SHIRT_RY = 0.25  # half-height of the shirt ellipse
SUPERSAMPLING = 4  # sub-samples per pixel side: anti-aliasing by box filtering


@dataclass
class TalkingShapesConfig:
    """Size and timing of a TalkingShapes clip."""

    fps: int = 25
    """Video frames per second."""
    num_frames: int = 17
    """Frames per clip. 4n+1 (17, not 16) because video codecs such as Wan's VAE take 4n+1 frames."""
    size: int = 32
    """Frame height and width in pixels; even, so that the clip can be written as yuv420p mp4."""
    sample_rate: int = 16000
    """Audio sample rate in Hz."""

    def __post_init__(self) -> None:
        if self.fps <= 0:
            raise ValueError(f"fps must be positive, got {self.fps}")
        if self.num_frames < 1:
            raise ValueError(f"num_frames must be at least 1, got {self.num_frames}")
        if self.size < 8 or self.size % 2:
            raise ValueError(f"size must be even and at least 8, got {self.size}")
        if self.sample_rate < 8000:
            raise ValueError(f"sample_rate must be at least 8000 Hz, got {self.sample_rate}")

    @property
    def num_samples(self) -> int:
        """Audio samples spanning the clip's frames."""
        return round(self.num_frames * self.sample_rate / self.fps)


@dataclass(frozen=True)
class Identity:
    """What stays fixed within a clip: colours and face geometry (lengths are fractions of the image side)."""

    background: tuple[float, float, float]
    """RGB of the backdrop, luminance >= 0.35."""
    shirt: tuple[float, float, float]
    """RGB of the shoulders, luminance >= 0.35."""
    skin: tuple[float, float, float]
    """RGB of head and neck, luminance >= 0.5."""
    head_rx: float
    """Half-width of the head ellipse."""
    head_ry: float
    """Half-height of the head ellipse."""
    eye_distance: float
    """Distance between the eye centres; the mouth scales with it."""
    eye_radius: float
    """Radius of the eye discs."""
    shoulder_rx: float
    """Half-width of the shirt ellipse."""
    shirt_top: float
    """Height of the top of the shirt (where the neck keypoint sits)."""


@dataclass(eq=False)
class Clip:
    """One TalkingShapes clip, in memory."""

    video: np.ndarray
    """float32 [T, H, W, 3] in [0, 1]."""
    audio: np.ndarray
    """float32 [S] mono in [-1, 1]."""
    reference: np.ndarray
    """float32 [H, W, 3] in [0, 1]: the neutral closed-mouth frame."""
    pose: np.ndarray
    """float32 [T, 8, 2] keypoints (x, y) in [0, 1], in ``KEYPOINT_NAMES`` order."""
    envelope: np.ndarray
    """float32 [T] audio RMS per frame."""
    mouth: np.ndarray
    """float32 [T] mouth opening in [0, 1]."""
    identity: Identity


def luminance(rgb: np.ndarray) -> np.ndarray:
    """Rec. 601 luma of RGB values in the last axis."""
    return np.asarray(rgb, dtype=np.float64) @ LUMA_WEIGHTS


def _sample_colour(
    rng: np.random.Generator,
    min_luminance: float,
    avoid: list[np.ndarray],
    min_distance: float = 0.2,
) -> tuple[float, float, float]:
    # Rejection sampling keeps the colour distribution simple; the bounds accept most draws.
    while True:
        colour = rng.uniform(0.0, 1.0, 3)
        bright_enough = min_luminance <= luminance(colour) <= 0.92
        distinct = all(np.linalg.norm(colour - other) >= min_distance for other in avoid)
        if bright_enough and distinct:
            return tuple(float(c) for c in colour)


def _sample_skin(rng: np.random.Generator, avoid: list[np.ndarray]) -> tuple[float, float, float]:
    while True:
        red = rng.uniform(0.75, 1.0)
        green = red * rng.uniform(0.65, 0.85)
        blue = green * rng.uniform(0.65, 0.9)
        colour = np.array([red, green, blue])
        if luminance(colour) >= 0.5 and all(np.linalg.norm(colour - other) >= 0.2 for other in avoid):
            return tuple(float(c) for c in colour)


def sample_identity(rng: np.random.Generator) -> Identity:
    """Draw colours and face geometry for one clip."""
    background = _sample_colour(rng, 0.35, avoid=[])
    skin = _sample_skin(rng, avoid=[np.array(background)])
    shirt = _sample_colour(rng, 0.35, avoid=[np.array(background), np.array(skin)])
    head_rx = rng.uniform(0.2, 0.25)
    eye_distance = head_rx * rng.uniform(0.8, 0.95)
    return Identity(
        background=background,
        shirt=shirt,
        skin=skin,
        head_rx=head_rx,
        head_ry=head_rx * rng.uniform(1.15, 1.3),
        eye_distance=eye_distance,
        eye_radius=eye_distance * rng.uniform(0.14, 0.18),
        shoulder_rx=rng.uniform(0.36, 0.46),
        shirt_top=rng.uniform(0.83, 0.87),
    )


def synth_audio(rng: np.random.Generator, cfg: TalkingShapesConfig) -> np.ndarray:
    """Speech-like audio: Hann-enveloped harmonic syllables separated by gaps and pauses, over a noise floor.

    Returns:
        np.ndarray: float32 ``[cfg.num_samples]`` in [-1, 1].
    """
    num_samples = cfg.num_samples
    duration = num_samples / cfg.sample_rate
    time = np.arange(num_samples) / cfg.sample_rate
    f0 = rng.uniform(*F0_HZ)
    phases = rng.uniform(0.0, 2 * np.pi, len(HARMONIC_AMPLITUDES))
    harmonics = np.arange(1, len(HARMONIC_AMPLITUDES) + 1)
    tone = HARMONIC_AMPLITUDES @ np.sin(2 * np.pi * f0 * harmonics[:, None] * time[None, :] + phases[:, None])
    tone /= HARMONIC_AMPLITUDES.sum()  # peak <= 1, so loudness is the peak amplitude

    voiced = np.zeros(num_samples)
    start_s = rng.uniform(0.0, GAP_S[0])  # a short lead-in so clips do not all start on a syllable onset
    while start_s < duration:
        length_s = rng.uniform(*SYLLABLE_S)
        loudness = rng.uniform(*LOUDNESS)
        start = int(round(start_s * cfg.sample_rate))
        length = max(int(round(length_s * cfg.sample_rate)), 2)
        stop = min(start + length, num_samples)
        voiced[start:stop] += loudness * np.hanning(length)[: stop - start]
        pause = rng.random() < PAUSE_PROBABILITY
        start_s += length_s + (rng.uniform(*PAUSE_S) if pause else rng.uniform(*GAP_S))

    noise = rng.normal(0.0, NOISE_RMS, num_samples)
    return np.clip(voiced * tone + noise, -1.0, 1.0).astype(np.float32)


def frame_index(num_samples: int, sample_rate: int, fps: float) -> np.ndarray:
    """The frame each audio sample falls in: sample n belongs to frame f when n / sr lies in [f / fps, (f+1) / fps).

    Integer arithmetic on fps as a fraction, so that the boundaries are exact (29.97 fps included).
    """
    rate = Fraction(fps).limit_denominator(100000)
    samples = np.arange(num_samples, dtype=np.int64)
    return (samples * rate.numerator) // (sample_rate * rate.denominator)


def frame_envelope(audio: np.ndarray, sample_rate: int, fps: float, num_frames: int) -> np.ndarray:
    """RMS of the audio over each frame's span [f / fps, (f+1) / fps).

    Frames past the end of the audio get 0; samples past the last frame are ignored.

    Returns:
        np.ndarray: float32 ``[num_frames]``.
    """
    audio = np.asarray(audio, dtype=np.float64)
    index = frame_index(audio.shape[0], sample_rate, fps)
    inside = index < num_frames
    energy = np.bincount(index[inside], weights=audio[inside] ** 2, minlength=num_frames)
    counts = np.bincount(index[inside], minlength=num_frames)
    rms = np.sqrt(energy / np.maximum(counts, 1))
    return rms.astype(np.float32)


def mouth_track(envelope: np.ndarray) -> np.ndarray:
    """Mouth opening per frame, ``clip(e / p95(e), 0, 1)``; all zeros for a silent envelope."""
    envelope = np.asarray(envelope, dtype=np.float64)
    scale = np.percentile(envelope, 95)
    if scale <= 0:
        return np.zeros_like(envelope, dtype=np.float32)
    return np.clip(envelope / scale, 0.0, 1.0).astype(np.float32)


def _bounded_walk(rng: np.random.Generator, num_frames: int) -> np.ndarray:
    # A damped velocity random walk is smooth; tanh keeps it inside the bound without a visible bounce.
    bound = np.array(DRIFT_BOUND)
    raw = rng.uniform(-0.5, 0.5, 2) * bound
    velocity = np.zeros(2)
    path = np.empty((num_frames, 2))
    for frame in range(num_frames):
        path[frame] = bound * np.tanh(raw / bound)
        velocity = 0.7 * velocity + rng.normal(0.0, DRIFT_STEP, 2)
        raw = raw + velocity
    return path


def pose_from_head(identity: Identity, head: np.ndarray, body_x: np.ndarray) -> np.ndarray:
    """Keypoints for given head centres ``[T, 2]`` and shirt centres ``body_x`` ``[T]``.

    Returns:
        np.ndarray: float32 ``[T, 8, 2]`` in ``KEYPOINT_NAMES`` order, clipped to [0, 1].
    """
    num_frames = head.shape[0]
    pose = np.empty((num_frames, NUM_KEYPOINTS, 2))
    x, y = head[:, 0], head[:, 1]
    half_eye = identity.eye_distance / 2
    eye_y = y - EYE_HEIGHT * identity.head_ry
    # Shoulder points sit on the shirt ellipse, at 75% of its half-width.
    shoulder_y = identity.shirt_top + SHIRT_RY * (1 - np.sqrt(1 - 0.75**2))
    shoulder_dx = 0.75 * identity.shoulder_rx
    pose[:, 0] = np.stack([x, y], axis=-1)
    pose[:, 1] = np.stack([x + half_eye, eye_y], axis=-1)
    pose[:, 2] = np.stack([x - half_eye, eye_y], axis=-1)
    pose[:, 3] = np.stack([x, y + MOUTH_HEIGHT * identity.head_ry], axis=-1)
    pose[:, 4] = np.stack([x, y + identity.head_ry], axis=-1)
    pose[:, 5] = np.stack([body_x, np.full(num_frames, identity.shirt_top)], axis=-1)
    pose[:, 6] = np.stack([body_x + shoulder_dx, np.full(num_frames, shoulder_y)], axis=-1)
    pose[:, 7] = np.stack([body_x - shoulder_dx, np.full(num_frames, shoulder_y)], axis=-1)
    return np.clip(pose, 0.0, 1.0).astype(np.float32)


def sample_pose(
    rng: np.random.Generator,
    identity: Identity,
    envelope: np.ndarray,
) -> np.ndarray:
    """Head drift (bounded smooth random walk) plus a small nod that follows the envelope.

    Args:
        rng (np.random.Generator): the clip's pose stream.
        identity (Identity): face geometry (eye spacing, head size place the keypoints).
        envelope (np.ndarray): ``[T]`` audio RMS per frame; its length sets the number of frames.

    Returns:
        np.ndarray: float32 ``[T, 8, 2]``.
    """
    num_frames = len(envelope)
    drift = _bounded_walk(rng, num_frames)
    nod = rng.uniform(0.005, 0.015) * mouth_track(envelope)
    head = np.array(HEAD_CENTRE) + drift
    head[:, 1] += nod
    body_x = HEAD_CENTRE[0] + 0.5 * drift[:, 0]  # the body sways less than the head
    return pose_from_head(identity, head, body_x)


def neutral_pose(identity: Identity) -> np.ndarray:
    """The pose of the reference image: head centred, no drift, no nod. float32 ``[1, 8, 2]``."""
    return pose_from_head(identity, np.array([HEAD_CENTRE]), np.array([HEAD_CENTRE[0]]))


def _coverage(inside: np.ndarray, size: int) -> np.ndarray:
    """Box-filter a supersampled mask down to pixels: the fraction of each pixel the shape covers."""
    # Adding the sub-columns and then the sub-rows by hand is several times faster than a strided mean.
    columns = inside.view(np.uint8).reshape(size * SUPERSAMPLING * size, SUPERSAMPLING)
    rows = sum(columns[:, j] for j in range(SUPERSAMPLING)).reshape(size, SUPERSAMPLING, size)
    return sum(rows[:, i] for i in range(SUPERSAMPLING)) / SUPERSAMPLING**2


def _paint(image: np.ndarray, coverage: np.ndarray, colour: tuple[float, float, float]) -> None:
    image *= 1.0 - coverage[..., None]
    image += coverage[..., None] * np.asarray(colour)


def _render_frame(identity: Identity, keypoints: np.ndarray, mouth: float, size: int) -> np.ndarray:
    # Sub-sample centres in pixel units; pixel j spans [j, j + 1).
    offsets = (np.arange(size * SUPERSAMPLING) + 0.5) / SUPERSAMPLING
    ys, xs = offsets[:, None], offsets[None, :]
    points = keypoints.astype(np.float64) * size
    nose, left_eye, right_eye, mouth_point, _, neck = points[:6]
    shoulder_mid_x = (points[6, 0] + points[7, 0]) / 2
    rx, ry = identity.head_rx * size, identity.head_ry * size

    def ellipse(cx: float, cy: float, ax: float, ay: float) -> np.ndarray:
        return _coverage(((xs - cx) / ax) ** 2 + ((ys - cy) / ay) ** 2 <= 1.0, size)

    image = np.empty((size, size, 3))
    image[:] = identity.background

    # Neck: a capsule from the head centre down to the neck point; the shirt then covers its base.
    neck_radius = 0.3 * rx
    axis = neck - nose
    along = np.clip(((xs - nose[0]) * axis[0] + (ys - nose[1]) * axis[1]) / max(axis @ axis, 1e-9), 0.0, 1.0)
    distance2 = (xs - nose[0] - along * axis[0]) ** 2 + (ys - nose[1] - along * axis[1]) ** 2
    _paint(image, _coverage(distance2 <= neck_radius**2, size), identity.skin)

    shirt_ry = SHIRT_RY * size
    _paint(image, ellipse(shoulder_mid_x, neck[1] + shirt_ry, identity.shoulder_rx * size, shirt_ry), identity.shirt)
    _paint(image, ellipse(nose[0], nose[1], rx, ry), identity.skin)

    eye_radius = identity.eye_radius * size
    for eye in (left_eye, right_eye):
        _paint(image, ellipse(eye[0], eye[1], eye_radius, eye_radius), EYE_COLOUR)

    # The mouth scales with the eye distance d measured on the keypoints, as the sync expert assumes.
    d = float(np.linalg.norm(left_eye - right_eye))
    half_width = 0.35 * d
    half_height = max((0.04 + 0.6 * mouth) * d, 1e-6)  # a perturbed track may go below 0: draw it closed
    _paint(image, ellipse(mouth_point[0], mouth_point[1], half_width, half_height), MOUTH_COLOUR)
    return image


def render(identity: Identity, pose: np.ndarray, mouth: np.ndarray, cfg: TalkingShapesConfig) -> np.ndarray:
    """Draw frames from keypoints and a mouth track (so perturbed tracks can be re-rendered).

    Args:
        identity (Identity): colours and sizes.
        pose (np.ndarray): ``[T, 8, 2]`` keypoints in [0, 1].
        mouth (np.ndarray): ``[T]`` opening in [0, 1]; half-height of the mouth is ``(0.04 + 0.6 m) d``.
        cfg (TalkingShapesConfig): only ``size`` is used.

    Returns:
        np.ndarray: float32 ``[T, size, size, 3]`` in [0, 1].
    """
    pose = np.asarray(pose)
    mouth = np.asarray(mouth)
    if pose.ndim != 3 or pose.shape[1:] != (NUM_KEYPOINTS, 2):
        raise ValueError(f"expected pose [T, {NUM_KEYPOINTS}, 2], got {pose.shape}")
    if mouth.shape != (pose.shape[0],):
        raise ValueError(f"expected mouth [{pose.shape[0]}] to match the pose, got {mouth.shape}")
    frames = [_render_frame(identity, pose[t], float(mouth[t]), cfg.size) for t in range(pose.shape[0])]
    return np.clip(np.stack(frames), 0.0, 1.0).astype(np.float32)


def reference_image(identity: Identity, cfg: TalkingShapesConfig) -> np.ndarray:
    """The neutral closed-mouth frame: float32 ``[size, size, 3]`` in [0, 1]."""
    return render(identity, neutral_pose(identity), np.zeros(1), cfg)[0]


def make_clip(seed: int, cfg: TalkingShapesConfig | None = None) -> Clip:
    """Generate one clip; the same seed and config give the same arrays.

    Identity, audio and pose come from independent streams of the seed, so changing e.g. the frame count keeps
    the identity.
    """
    cfg = cfg or TalkingShapesConfig()
    identity_rng, audio_rng, pose_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
    identity = sample_identity(identity_rng)
    audio = synth_audio(audio_rng, cfg)
    envelope = frame_envelope(audio, cfg.sample_rate, cfg.fps, cfg.num_frames)
    mouth = mouth_track(envelope)
    pose = sample_pose(pose_rng, identity, envelope)
    return Clip(
        video=render(identity, pose, mouth, cfg),
        audio=audio,
        reference=reference_image(identity, cfg),
        pose=pose,
        envelope=envelope,
        mouth=mouth,
        identity=identity,
    )


#: Ways to spoil a clip's lip sync for a rejected sample of a preference pair.
MOUTH_PERTURBATIONS = ("shift", "jitter", "freeze")


def perturb_mouth(mouth: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """A mouth track that no longer follows the speech: ``shift`` delays or advances it by 3-6 frames,
    ``jitter`` replaces it with a random opening every frame, ``freeze`` holds one opening throughout."""
    if kind == "shift":
        offset = int(rng.integers(3, 7)) * (1 if rng.random() < 0.5 else -1)
        index = np.clip(np.arange(len(mouth)) - offset, 0, len(mouth) - 1)
        return mouth[index]
    if kind == "jitter":
        return rng.uniform(0.0, 1.0, len(mouth))
    if kind == "freeze":
        return np.full_like(mouth, mouth.mean())
    raise ValueError(f"unknown mouth perturbation {kind!r}: use one of {MOUTH_PERTURBATIONS}")


def clip_seed(seed: int, index: int) -> int:
    """The seed of clip ``index`` of a dataset drawn with ``seed``; independent of how many clips there are."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Float [0, 1] pixels to uint8, rounding to nearest."""
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def write_dataset(
    out: str | Path,
    num_clips: int,
    seed: int,
    cfg: TalkingShapesConfig | None = None,
    rejected: Sequence[str] = (),
) -> Path:
    """Write clips and a ``manifest.jsonl`` whose paths are relative to the manifest's folder.

    Per clip: ``clips/{id}.mp4`` (video with an AAC track), ``clips/{id}.wav`` (the exact audio, so nothing
    depends on AAC padding), ``clips/{id}_ref.png`` and ``clips/{id}_pose.npy`` (float32 ``[T, 8, 2]``).
    With ``rejected`` (kinds of :func:`perturb_mouth`, used in turn), each row is a preference pair: the ground
    truth is chosen and ``clips/{id}_rejected.mp4`` — the same clip with its mouth track spoiled — is rejected.

    Returns:
        Path: the manifest.
    """
    cfg = cfg or TalkingShapesConfig()
    if num_clips < 1:
        raise ValueError(f"num_clips must be at least 1, got {num_clips}")
    out = Path(out)
    clips_dir = out / "clips"
    clips_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(num_clips):
        clip_id = f"clip_{index:05d}"
        clip = make_clip(clip_seed(seed, index), cfg)
        media.write_video(clips_dir / f"{clip_id}.mp4", to_uint8(clip.video), cfg.fps, clip.audio, cfg.sample_rate)
        media.write_wav(clips_dir / f"{clip_id}.wav", clip.audio, cfg.sample_rate)
        media.write_image(clips_dir / f"{clip_id}_ref.png", to_uint8(clip.reference))
        np.save(clips_dir / f"{clip_id}_pose.npy", clip.pose)
        row = {
            "id": clip_id,
            "video": f"clips/{clip_id}.mp4",
            "audio": f"clips/{clip_id}.wav",
            "reference": f"clips/{clip_id}_ref.png",
            "pose": f"clips/{clip_id}_pose.npy",
            "text": "a cartoon face talking in front of a plain background",
        }
        if rejected:
            kind = rejected[index % len(rejected)]
            mouth = perturb_mouth(clip.mouth, kind, np.random.default_rng(clip_seed(seed, index) + 1))
            spoiled = render(clip.identity, clip.pose, mouth, cfg)
            media.write_video(clips_dir / f"{clip_id}_rejected.mp4", to_uint8(spoiled), cfg.fps, clip.audio, cfg.sample_rate)
            row.update(rejected=f"clips/{clip_id}_rejected.mp4", rejected_kind=kind)
        rows.append(row)
    manifest = out / "manifest.jsonl"
    tmp = manifest.with_name(f".{manifest.name}.tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tmp.replace(manifest)  # the manifest appears last and whole, so a reader never sees half a dataset
    return manifest


def synth(
    out: str,
    num_clips: int = 64,
    seed: int = 0,
    frames: int = 17,
    size: int = 32,
    fps: int = 25,
    rejected: Optional[list[str]] = None,
) -> None:
    """Write a TalkingShapes dataset (mp4 + wav + reference png + pose npy per clip, and a manifest.jsonl).

    Args:
        out: folder to write into; created if missing.
        num_clips: number of clips.
        seed: dataset seed; clip i depends only on (seed, i), so a larger dataset extends a smaller one.
        frames: frames per clip; 4n+1 (e.g. 17) suits video codecs with 4x temporal compression.
        size: frame height and width in pixels (even).
        fps: frames per second; audio is 16 kHz mono.
        rejected: write preference pairs: per clip a rejected video whose mouth track is spoiled, by these kinds
            in turn (any of shift, jitter, freeze), e.g. ``--rejected [shift,jitter,freeze]``.
    """
    for kind in rejected or ():
        if kind not in MOUTH_PERTURBATIONS:
            raise ValueError(f"unknown --rejected kind {kind!r}: use any of {list(MOUTH_PERTURBATIONS)}")
    cfg = TalkingShapesConfig(fps=fps, num_frames=frames, size=size)
    manifest = write_dataset(out, num_clips=num_clips, seed=seed, cfg=cfg, rejected=tuple(rejected or ()))
    print(manifest)
