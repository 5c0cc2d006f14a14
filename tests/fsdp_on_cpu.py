"""Run a toolkit script under accelerate's FSDP2 on CPU processes (gloo), for the tests.

    accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 2 --cpu \\
        tests/fsdp_on_cpu.py train.py ARGS...

accelerate takes FSDP only on accelerators: on the CPU it sets up plain multi-process (MULTI_CPU) training even when
launched with an FSDP config. torch's fully_shard itself runs on gloo, so this switches accelerate's state to FSDP,
with the plugin that the launch configured (its FSDP_* variables, from the config file), before the script runs. The
toolkit's code is the same as on GPUs: only accelerate's device check is bypassed.
"""

import os
import runpy
import sys

from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

_init = AcceleratorState.__init__


def _fsdp_on_cpu(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if fsdp and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = FullyShardedDataParallelPlugin()
        if self.mixed_precision != "no":
            self.fsdp_plugin.set_mixed_precision(self.mixed_precision)


AcceleratorState.__init__ = _fsdp_on_cpu

if __name__ == "__main__":
    script, sys.argv = sys.argv[1], sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")
