"""Every command in the README's fine-tuning and evaluation blocks is pasteable (no placeholders, no `...`) and is
accepted by the real tool's config (draccus); the English and Chinese halves hold the same commands."""

from __future__ import annotations

import importlib.util
import re
import shlex
import sys
from pathlib import Path

import draccus
import pytest

REPO = Path(__file__).resolve().parents[2]
CONFIG_CLASSES = {"run_libero_eval.py": "EvalConfig", "merge_lora_weights_and_save.py": "MergeConfig"}
SECTIONS = {"en": ("## Fine-tuning", "## Evaluation in the LIBERO simulator"),
            "zh": ("## 微调", "## 在 LIBERO 仿真器中评测")}


def _config_class(script: str):
    if script.endswith("finetune.py"):
        sys.path.insert(0, str(REPO))
        from prismatic.training.finetune_config import FinetuneConfig

        return FinetuneConfig
    path = REPO / script
    spec = importlib.util.spec_from_file_location(f"readme_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return getattr(module, CONFIG_CLASSES[path.name])


def commands(language: str) -> list[list[str]]:
    text = (REPO / "README.md").read_text()
    out = []
    for heading in SECTIONS[language]:
        section = text[text.index(heading):]
        block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
        joined = re.sub(r"\\\n\s*", "", block)
        for line in joined.splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith(("python ", "torchrun ")):
                out.append(shlex.split(line))
    return out


def test_both_languages_hold_the_same_commands():
    assert commands("en") == commands("zh") and len(commands("en")) == 6


@pytest.mark.parametrize("argv", commands("en"), ids=lambda a: next(x for x in a if x.endswith(".py")))
def test_readme_command_is_pasteable_and_parses(argv):
    assert not any("<" in a or ">" in a or a == "..." for a in argv), argv
    script_index = next(i for i, a in enumerate(argv) if a.endswith(".py"))
    config_class = _config_class(argv[script_index])
    cfg = draccus.parse(config_class=config_class, args=argv[script_index + 1:])
    if argv[0] == "torchrun":
        assert argv[1:script_index] == ["--standalone", "--nproc_per_node", "4"]
        assert cfg.batch_size * 4 * cfg.grad_accumulation_steps == 64  # upstream's global batch
    elif argv[script_index].endswith("finetune.py") and not cfg.resume:
        assert cfg.batch_size * cfg.grad_accumulation_steps == 64 and cfg.learning_rate == 2e-4
