"""FSDP on CPU for tests.

torch's FullyShardedDataParallel runs on CPU over gloo when it is given the CPU as its device, which Lightning's
FSDPStrategy never does: it refuses a CPU accelerator and passes no device. ``CPUFSDP`` wraps the model itself with
``device_id=cpu`` and hands the wrapped model to Lightning, so everything after the wrapping (sharded parameters,
gradient reduce-scatter, full-state-dict checkpoints and their loading) is Lightning's own code. One setting differs:
full state dicts are gathered without ``offload_to_cpu``, which on a CPU device frees the very tensors it returns.
"""

import torch
from lightning.fabric.strategies import fsdp as fabric_fsdp
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.strategies import fsdp as pytorch_fsdp


def _full_state_dict_context(module: torch.nn.Module, world_size: int, rank0_only: bool = True):
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return FSDP.state_dict_type(module=module, state_dict_type=StateDictType.FULL_STATE_DICT,
                                state_dict_config=FullStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
                                optim_state_dict_config=FullOptimStateDictConfig(offload_to_cpu=False,
                                                                                 rank0_only=rank0_only))


pytorch_fsdp._get_full_state_dict_context = _full_state_dict_context
fabric_fsdp._get_full_state_dict_context = _full_state_dict_context


class CPUFSDP(FSDPStrategy):
    def setup(self, trainer) -> None:
        if "mixed" in self.precision_plugin.precision:
            # Lightning's FSDP precision autocasts on "cuda" only; on the CPU the same mixed precision needs the
            # CPU's autocast (FSDP then gathers bf16 copies of fp32 adapters, and autocast lines the inputs up).
            plugin = self.precision_plugin
            dtype = torch.bfloat16 if plugin.precision == "bf16-mixed" else torch.float16
            plugin.forward_context = lambda: torch.autocast("cpu", dtype=dtype)
        super().setup(trainer)

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        wrapped = FullyShardedDataParallel(module=model, cpu_offload=self.cpu_offload,
                                           mixed_precision=self.mixed_precision_config,
                                           sharding_strategy=self.sharding_strategy,
                                           device_id=torch.device("cpu"), **self.kwargs)
        self.kwargs.pop("auto_wrap_policy", None)  # applied above
        return super()._setup_model(wrapped)
