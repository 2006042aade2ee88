"""torchrun worker of test_torchrun_faults.py: finetune.py's CLI on every rank, with one rank killed (SIGKILL) at a
chosen point.

    torchrun --standalone --nproc_per_node 2 tests/safety/fault_worker.py <mode> <finetune.py flags>

modes: `peer_mid_step`: rank 1 dies in step 2, after DDP's gradient all-reduce and before the loss all-reduce;
`rank0_in_save`: rank 0 dies while writing the checkpoint of step 2 (weights written, training_state.pt not).
"""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "vla-scripts"))

import torch

import finetune
from prismatic.training import checkpointing


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    torch.set_num_threads(1)
    mode, rank = sys.argv[1], os.environ.get("RANK")
    calls = {"n": 0}
    if mode == "peer_mid_step" and rank == "1":
        real_stats = finetune.global_step_stats

        def stats(local, env):
            calls["n"] += 1
            if calls["n"] == 2:
                _die()
            return real_stats(local, env)

        finetune.global_step_stats = stats
    elif mode == "rank0_in_save" and rank == "0":
        real_save = torch.save

        def save(obj, f, *args, **kwargs):
            if str(f).endswith("training_state.pt"):
                calls["n"] += 1
                if calls["n"] == 2:
                    _die()
            return real_save(obj, f, *args, **kwargs)

        checkpointing.torch.save = save
    elif mode not in ("peer_mid_step", "rank0_in_save"):
        raise SystemExit(f"unknown mode {mode}")
    finetune.main(sys.argv[2:])


if __name__ == "__main__":
    main()
