"""Run a toolkit script under accelerate's FSDP2 or DeepSpeed on CPU processes (gloo), for the tests.

    accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 2 \\
        tests/sharded_on_cpu.py train.py ARGS...

accelerate takes FSDP and DeepSpeed only on accelerators: on the CPU it sets up plain multi-process (MULTI_CPU)
training even when launched with their config files. torch's fully_shard runs on gloo, and so does DeepSpeed with its
CPU accelerator (DS_ACCELERATOR=cpu); this switches accelerate's state to the launch's choice, with the plugin that
the launch configured (from the config file), before the script runs. The toolkit's code is the same as on GPUs:
only accelerate's device check is bypassed.
"""

import os
import runpy
import sys

from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

_init = AcceleratorState.__init__


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() == "true"


def _sharded_on_cpu(self, *args, **kwargs):
    _init(self, *args, **kwargs)  # every AcceleratorState() copies the process state (MULTI_CPU) in again
    if self.distributed_type != DistributedType.MULTI_CPU:
        return
    if _flag("ACCELERATE_USE_FSDP"):
        self.distributed_type = DistributedType.FSDP
        if self.__dict__.get("fsdp_plugin") is None:
            self.fsdp_plugin = FullyShardedDataParallelPlugin()
            if self._mixed_precision != "no":
                self.fsdp_plugin.set_mixed_precision(self._mixed_precision)
    elif _flag("ACCELERATE_USE_DEEPSPEED"):
        self.distributed_type = DistributedType.DEEPSPEED
        if self.__dict__.get("deepspeed_plugins") is None:
            plugin = kwargs["deepspeed_plugin"]
            plugin.set_mixed_precision(self._mixed_precision)
            plugin.select(_from_accelerator_state=True)
            self.deepspeed_plugins = plugin


AcceleratorState.__init__ = _sharded_on_cpu

if __name__ == "__main__":
    script, sys.argv = sys.argv[1], sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")
