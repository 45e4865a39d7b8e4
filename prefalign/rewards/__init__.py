"""Rewards: batched scores of generated videos: the TalkingShapes sync expert, MLLM judges, texture, jitter and
identity regularizers, and the composite that weighs them."""

from prefalign.rewards.base import Reward
from prefalign.rewards.composite import CompositeReward, group_advantages
from prefalign.rewards.judge import MLLMJudge, OpenAIJudge
from prefalign.rewards.regularizers import IdentityReward, JitterPenalty, TextureReward
from prefalign.rewards.sync import SyncExpert

__all__ = [
    "Reward", "SyncExpert", "CompositeReward", "JitterPenalty", "TextureReward", "IdentityReward", "group_advantages",
    "MLLMJudge", "OpenAIJudge",
]
