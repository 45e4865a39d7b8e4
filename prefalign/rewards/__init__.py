"""Rewards: batched scores of generated videos (the TalkingShapes sync expert now; judges and regularizers next)."""

from prefalign.rewards.base import Reward
from prefalign.rewards.sync import SyncExpert

__all__ = ["Reward", "SyncExpert"]
