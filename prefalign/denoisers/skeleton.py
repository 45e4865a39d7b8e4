"""Skeleton images from keypoints, drawn the way DWPose renders a pose track (Hallo4's skeleton input).

Hallo4 conditions on a video of rendered skeletons: black frames with the body's limbs in OpenPose's colours,
hands as coloured bone chains and the face as white dots. ``render_skeleton`` draws that from keypoints
``[B, T, K, 2]`` (x, y in [0, 1] of the frame) in torch, one frame batch at a time. For 133 keypoints
(COCO-WholeBody, what DWPose detects) it draws the OpenPose-18 body (the neck is the shoulders' midpoint), both
hands and the face; for 18 it draws the OpenPose body; for any other count each keypoint is a dot in its own
colour. Sizes are DWPose's in pixels of a 512-pixel-high frame (limbs 8 wide, joints of radius 4, hand bones 2
wide, hand points 4, face points 3), scaled with the frame's height. Strokes are drawn by distance to each segment
(no anti-aliasing), so the pixels differ from DWPose's OpenCV drawing in the edges of strokes and the limbs' ends
(OpenCV draws each limb as an ellipse), not in what is drawn where.
"""

from __future__ import annotations

import colorsys

import torch

#: OpenPose-18 body order as indices into COCO-17 (``None``: the neck, the midpoint of the shoulders 5 and 6).
OPENPOSE_FROM_COCO = (0, None, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3)
#: OpenPose-18 limbs (pairs of body indices) and the colour of each limb and joint, in OpenPose's order.
OPENPOSE_LIMBS = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12), (12, 13),
    (1, 0), (0, 14), (14, 16), (0, 15), (15, 17),
)  # fmt: skip
OPENPOSE_COLORS = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
    (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
    (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)  # fmt: skip
#: A hand's 21 keypoints as bones: the wrist (0) to each finger's four joints.
HAND_BONES = tuple((a, b) for finger in range(5) for a, b in zip([0] + [1 + 4 * finger + j for j in range(3)],
                                                                   [1 + 4 * finger + j for j in range(4)]))
#: COCO-WholeBody's ranges: 17 body, 6 feet, 68 face, 21 left hand, 21 right hand.
WHOLEBODY_FACE, WHOLEBODY_LEFT_HAND, WHOLEBODY_RIGHT_HAND = range(23, 91), range(91, 112), range(112, 133)


class Strokes:
    """What to draw for one keypoint layout: segments and dots as keypoint indices with colours (0-255 RGB).

    A keypoint index may be a pair ``(i, j)``, which stands for the midpoint of keypoints ``i`` and ``j``."""

    def __init__(self, segments: list, dots: list):
        self.segments = segments  # [(point, point, colour, half width in DWPose pixels)]
        self.dots = dots  # [(point, colour, radius in DWPose pixels)]

    @staticmethod
    def for_keypoints(num_keypoints: int) -> Strokes:
        if num_keypoints in (18, 133):
            body = list(range(18)) if num_keypoints == 18 else [
                (5, 6) if index is None else index for index in OPENPOSE_FROM_COCO
            ]
            dim = [tuple(int(c * 0.6) for c in colour) for colour in OPENPOSE_COLORS]
            segments = [(body[a], body[b], dim[i], 4.0) for i, (a, b) in enumerate(OPENPOSE_LIMBS)]
            dots = [(body[i], OPENPOSE_COLORS[i], 4.0) for i in range(18)]
            if num_keypoints == 133:
                for hand in (WHOLEBODY_LEFT_HAND, WHOLEBODY_RIGHT_HAND):
                    for i, (a, b) in enumerate(HAND_BONES):
                        rgb = colorsys.hsv_to_rgb(i / len(HAND_BONES), 1.0, 1.0)
                        segments.append((hand[a], hand[b], tuple(int(255 * c) for c in rgb), 1.0))
                    dots += [(hand[i], (0, 0, 255), 4.0) for i in range(21)]
                dots += [(i, (255, 255, 255), 3.0) for i in WHOLEBODY_FACE]
            return Strokes(segments, dots)
        colours = [colorsys.hsv_to_rgb(i / num_keypoints, 1.0, 1.0) for i in range(num_keypoints)]
        return Strokes([], [(i, tuple(int(255 * c) for c in rgb), 4.0) for i, rgb in enumerate(colours)])


def _points(pose: torch.Tensor, index) -> torch.Tensor:
    if isinstance(index, tuple):
        return (pose[..., index[0], :] + pose[..., index[1], :]) / 2
    return pose[..., index, :]


def render_skeleton(pose: torch.Tensor, height: int, width: int, scale: float | None = None) -> torch.Tensor:
    """Keypoints ``[B, T, K, 2]`` (x, y in [0, 1]) → skeleton frames ``[B, T, 3, height, width]`` in [0, 1], black
    background. ``scale`` multiplies DWPose's stroke sizes (default ``height / 512``, at least half a pixel)."""
    if pose.dim() != 4 or pose.shape[-1] != 2:
        raise ValueError(f"pose must be [batch, frames, keypoints, 2]; got {tuple(pose.shape)}")
    b, t, k, _ = pose.shape
    strokes = Strokes.for_keypoints(k)
    scale = scale if scale is not None else height / 512
    device = pose.device
    pose = pose.float() * torch.tensor([width, height], device=device, dtype=torch.float32)  # to pixels
    ys = torch.arange(height, device=device, dtype=torch.float32) + 0.5
    xs = torch.arange(width, device=device, dtype=torch.float32) + 0.5
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # [H, W, 2] as (x, y)
    canvas = torch.zeros(b * t, 3, height, width, device=device)
    flat = pose.reshape(b * t, k, 2)

    # Bounded memory: each frame holds a few floats per pixel per stroke (133 keypoints at 480x832: ~0.8 GB), so
    # frames go in chunks of at most ~64 M stroke-pixels.
    strokes_per_frame = max(len(strokes.segments), len(strokes.dots), 1)
    chunk = max(1, int(64e6 // (strokes_per_frame * height * width)))
    for frames in torch.split(torch.arange(b * t, device=device), chunk):
        points = flat[frames]
        if strokes.segments:
            a = torch.stack([_points(points, s[0]) for s in strokes.segments], dim=1)  # [N, S, 2]
            d = torch.stack([_points(points, s[1]) for s in strokes.segments], dim=1) - a
            rel = grid[None, None] - a[:, :, None, None]  # [N, S, H, W, 2]
            length2 = (d * d).sum(-1).clamp(min=1e-6)[:, :, None, None]
            along = ((rel * d[:, :, None, None]).sum(-1) / length2).clamp(0, 1)
            distance = (rel - along[..., None] * d[:, :, None, None]).norm(dim=-1)
            colours = torch.tensor([s[2] for s in strokes.segments], device=device, dtype=torch.float32) / 255
            half = torch.tensor([s[3] for s in strokes.segments], device=device).view(1, -1, 1, 1) * scale
            canvas[frames] = _painted(canvas[frames], distance <= half.clamp(min=0.5), colours)
        if strokes.dots:
            centres = torch.stack([_points(points, dot[0]) for dot in strokes.dots], dim=1)  # [N, D, 2]
            radius = (torch.tensor([dot[2] for dot in strokes.dots], device=device).view(1, -1, 1, 1) * scale).clamp(min=0.5)
            distance = (grid[None, None] - centres[:, :, None, None]).norm(dim=-1)
            colours = torch.tensor([dot[1] for dot in strokes.dots], device=device, dtype=torch.float32) / 255
            canvas[frames] = _painted(canvas[frames], distance <= radius, colours)
    return canvas.reshape(b, t, 3, height, width)


def _painted(canvas: torch.Tensor, mask: torch.Tensor, colours: torch.Tensor) -> torch.Tensor:
    """``canvas [N, 3, H, W]`` with strokes ``mask [N, S, H, W]`` painted in order in ``colours [S, 3]``."""
    order = torch.arange(1, mask.shape[1] + 1, device=mask.device, dtype=torch.int16).view(1, -1, 1, 1)
    last = torch.where(mask, order, order.new_zeros(())).amax(dim=1).long()  # the last stroke on each pixel; 0: none
    colour = colours[(last - 1).clamp(min=0)].permute(0, 3, 1, 2)
    return torch.where((last > 0)[:, None], colour, canvas)
