"""Noising processes (flow matching, diffusion): how noise is added and removed, apart from the denoiser."""

from prefalign.processes.base import Process, StepOutput
from prefalign.processes.diffusion import Diffusion
from prefalign.processes.flow import FlowMatching, shift_sigma

__all__ = ["Diffusion", "FlowMatching", "Process", "StepOutput", "shift_sigma"]
