"""torchrun worker for test_deepspeed_roles.py: runs the `malt-fast train` configs named on the
command line one after another in one process group (DeepSpeed starts once).

A config may carry `interrupt_at: [role, phase, step]`: the process then dies with os._exit right
after that optimizer step, without cleanup, as a killed job would; the rerun must resume from the
last checkpoint.
"""

import json
import os
import sys

import torch

from malt_fast.train.distributed import init_distributed, train_from_config


def main(paths):
    created = init_distributed()
    for path in paths:
        cfg = json.loads(open(path).read())
        stop = cfg.pop("interrupt_at", None)

        def after_step(role, phase, step, stop=stop):
            if stop is not None and [role, phase, step] == stop:
                print(f"INTERRUPTED rank {torch.distributed.get_rank()} at {stop}", flush=True)
                os._exit(17)

        train_from_config(cfg, path, after_step=after_step)
    print(f"OK rank {torch.distributed.get_rank()}", flush=True)
    if created:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
