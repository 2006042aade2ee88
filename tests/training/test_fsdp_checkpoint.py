"""--distributed_strategy fsdp in one process (a world of one): the checkpoint folder it writes is the one DDP writes,
and a resume under the other strategy is refused with one clear error. (Sharding over 2 ranks: test_fsdp.py, slow.)"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune import train
from prismatic.cli_errors import UserError
from prismatic.models.loaders import load_policy

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_distributed import assert_params_close  # noqa: E402


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor the checkpoint's weight files hold, keyed by file and name."""
    out = {}
    for f in sorted(folder.rglob("*.safetensors")):
        out |= {f"{f.relative_to(folder)}:{k}": v for k, v in load_file(str(f)).items()}
    for f in sorted(folder.glob("*--*_checkpoint.pt")):
        out |= {f"{f.name}:{k}": v for k, v in torch.load(f, weights_only=True).items()}
    return out


@pytest.mark.parametrize("use_lora", [True, False], ids=["lora", "full"])
def test_fsdp_checkpoint_equals_ddp_checkpoint(make_cfg, use_lora):
    folders = {}
    for strategy in ("ddp", "fsdp"):
        result = train(make_cfg(use_lora=use_lora, max_steps=2, save_freq=2, distributed_strategy=strategy,
                                run_id=f"ckpt-{strategy}", use_craft=True, craft_anchor_source="online"))
        folders[strategy] = result.last_checkpoint
    ddp, fsdp = folders["ddp"], folders["fsdp"]
    names = sorted(p.relative_to(ddp).as_posix() for p in ddp.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(fsdp).as_posix() for p in fsdp.rglob("*") if p.is_file())
    want, got = _tensors(ddp), _tensors(fsdp)
    assert set(got) == set(want) and len(want) > 10
    for key, value in want.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
    assert_params_close(got, want)  # equal up to float summation order (two backward passes vs autograd.grad)
    assert json.loads((fsdp / "run_config.json").read_text())["distributed_strategy"] == "fsdp"
    # what LIBERO / merge / measure_drift load: the same policy from either folder
    a, b = load_policy(ddp), load_policy(fsdp)
    assert [n for n, _ in a.named_parameters()] == [n for n, _ in b.named_parameters()]
    assert_params_close(dict(b.named_parameters()), dict(a.named_parameters()))


def test_resume_under_the_other_strategy_is_refused(make_cfg):
    first = train(make_cfg(max_steps=1, save_freq=1, distributed_strategy="fsdp", run_id="strategy"))
    resume = make_cfg(max_steps=2, config_file_path=first.last_checkpoint, resume=True, resume_step=1,
                      distributed_strategy="ddp", run_id="strategy")
    with pytest.raises(UserError, match="distributed_strategy"):
        train(resume, given_flags={"distributed_strategy", "config_file_path", "resume", "resume_step", "max_steps"})
    # not given: the run's strategy is inherited and the resume goes on
    done = train(resume, given_flags={"config_file_path", "resume", "resume_step", "max_steps"})
    assert done.final_step == 2
