"""The Fréchet distance between two feature sets (FID on Inception features of frames, FVD on I3D features of
clips), and the running statistics it needs, mergeable across batches and ranks.

``d² = |μ₁ − μ₂|² + tr(Σ₁) + tr(Σ₂) − 2·tr((Σ₁^½ Σ₂ Σ₁^½)^½)``, computed in float64. The trace of the matrix square
root is the sum of the square roots of the eigenvalues of ``Σ₁^½ Σ₂ Σ₁^½`` (symmetric positive semi-definite, so
``eigh`` applies and no complex ``sqrtm`` is needed); tiny negative eigenvalues from rounding count as zero.
"""

from __future__ import annotations

import torch


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    """The squared Fréchet distance between the Gaussians ``N(mu1, sigma1)`` and ``N(mu2, sigma2)`` (what FID and
    FVD report), in float64."""
    mu1, mu2 = mu1.double(), mu2.double()
    sigma1, sigma2 = _symmetric(sigma1.double()), _symmetric(sigma2.double())
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0], mu1.shape[0]):
        raise ValueError(f"mismatched statistics: means {tuple(mu1.shape)} and {tuple(mu2.shape)}, covariances "
                         f"{tuple(sigma1.shape)} and {tuple(sigma2.shape)}")
    values, vectors = torch.linalg.eigh(sigma1)
    root1 = (vectors * values.clamp(min=0).sqrt()) @ vectors.T  # Σ₁^½
    inner = _symmetric(root1 @ sigma2 @ root1)
    trace_root = torch.linalg.eigvalsh(inner).clamp(min=0).sqrt().sum()
    distance = (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * trace_root
    return float(distance.clamp(min=0))


def _symmetric(matrix: torch.Tensor) -> torch.Tensor:
    return (matrix + matrix.T) / 2


class FeatureStats:
    """Running mean and covariance of feature vectors, in float64: ``add`` batches, ``merge`` other ranks' stats.

    Keeps the count, the sum and the sum of outer products (``D²`` numbers, 32 MiB for Inception's 2048 features),
    not the features, so memory does not grow with the evaluation set."""

    def __init__(self, dim: int):
        self.dim = dim
        self.count = 0
        self.total = torch.zeros(dim, dtype=torch.float64)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64)

    def add(self, features: torch.Tensor) -> None:
        """Features ``[N, dim]``."""
        if features.dim() != 2 or features.shape[1] != self.dim:
            raise ValueError(f"features must be [N, {self.dim}]; got {tuple(features.shape)}")
        x = features.detach().double().cpu()
        if not torch.isfinite(x).all():
            raise ValueError("features hold NaN or infinite values")
        self.count += x.shape[0]
        self.total += x.sum(0)
        self.outer += x.T @ x

    def merge(self, other: FeatureStats) -> None:
        if other.dim != self.dim:
            raise ValueError(f"cannot merge {other.dim}-feature statistics into {self.dim}-feature ones")
        self.count += other.count
        self.total += other.total
        self.outer += other.outer

    def state(self) -> dict:
        """A snapshot (copies: later ``add`` calls do not change it), e.g. for ``all_gather_object``."""
        return {"dim": self.dim, "count": self.count, "total": self.total.clone(), "outer": self.outer.clone()}

    @classmethod
    def from_state(cls, state: dict) -> FeatureStats:
        stats = cls(int(state["dim"]))
        stats.count, stats.total, stats.outer = int(state["count"]), state["total"].double(), state["outer"].double()
        return stats

    def mean_cov(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean and the unbiased covariance (``N − 1``); at least 2 vectors are needed."""
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors; got {self.count}")
        mean = self.total / self.count
        cov = (self.outer - self.count * torch.outer(mean, mean)) / (self.count - 1)
        return mean, cov

    def distance(self, other: FeatureStats) -> float:
        """The Fréchet distance between these features' Gaussian and ``other``'s."""
        return frechet_distance(*self.mean_cov(), *other.mean_cov())
