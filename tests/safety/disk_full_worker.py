"""torchrun worker of test_recovery.py: finetune.py's CLI on every rank, with rank 0's disk full at the first save.

    torchrun --standalone --nproc_per_node 2 tests/safety/disk_full_worker.py <finetune.py flags>
"""

import errno
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "vla-scripts"))

import torch

import finetune
from prismatic.training import checkpointing


def main() -> None:
    torch.set_num_threads(1)
    if os.environ.get("RANK") == "0":
        real_save = torch.save

        def save_until_full(obj, f, *args, **kwargs):
            if str(f).endswith("training_state.pt"):
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_save(obj, f, *args, **kwargs)

        checkpointing.torch.save = save_until_full
    finetune.main(sys.argv[1:])


if __name__ == "__main__":
    main()
