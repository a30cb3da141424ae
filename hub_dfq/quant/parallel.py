"""Data parallelism for the quantization algorithms that train (distillation): DDP through accelerate.

Every process draws the same batch indices and augmentations from the same generator (so all of
them stay in step) and computes the loss on its own contiguous slice of each batch; the loss is
scaled so that DDP's gradient average equals the gradient of the whole batch's loss. In one process
nothing is wrapped and nothing is scaled: the run is the single-process run, bit for bit.
"""

from __future__ import annotations

from torch import nn

from ..distributed import Distributed
from ..errors import ConfigError

__all__ = ["data_parallel", "local_rows"]


def data_parallel(module: nn.Module, dist: Distributed) -> nn.Module:
    """``module`` wrapped for data-parallel training by ``accelerate`` (DDP); ``module`` itself in one process.

    The wrapper shares ``module``'s parameters: save and read ``module``, train through the wrapper.
    """
    if not dist.enabled:
        return module
    # why: accelerate costs a second to import; one process never needs it
    from accelerate import Accelerator

    # Explicit "no" mixed precision: the algorithm fixes its own arithmetic, whatever the launch configured.
    accelerator = Accelerator(cpu=dist.device is None or dist.device.type == "cpu", mixed_precision="no",
                              device_placement=False)
    return accelerator.prepare_model(module, device_placement=False)


def local_rows(batch: int, dist: Distributed) -> slice:
    """This process's contiguous share of a batch of ``batch`` rows (the whole batch in one process).

    Raises:
        ConfigError: fewer rows than processes (a process would have nothing to compute a loss on).
    """
    if not dist.enabled:
        return slice(0, batch)
    if batch < dist.world_size:
        raise ConfigError(f"a batch of {batch} images cannot be shared by {dist.world_size} processes: raise the "
                          "`batch_size` of the algorithm (or the calibration images) to at least the number of "
                          "processes")
    return slice(dist.rank * batch // dist.world_size, (dist.rank + 1) * batch // dist.world_size)
