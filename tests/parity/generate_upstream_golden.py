"""Regenerate `upstream_golden.json` with upstream VLA-Adapter's own code on upstream's pinned library versions.

Nothing of upstream is copied here: the script imports upstream's modules from a checkout outside this repository
and runs them on the tensors of `golden_inputs.py` (the one definition the parity tests use too).

How to run (Python 3.10 or 3.11; CPU is enough; about two minutes):

    # 1. upstream at the pinned commit, outside this repository
    git clone https://github.com/OpenHelix-Team/VLA-Adapter /scratch/upstream
    git -C /scratch/upstream checkout 838a36da195daf3e8b8a53520c8c7ce86231b6d9
    # 2. its own virtual environment on its pinned versions (pyproject.toml / our_envs.txt of that commit)
    python3 -m venv /scratch/upvenv
    /scratch/upvenv/bin/pip install -r tests/parity/upstream_pinned_requirements.txt
    # 3. the released-style folder of the end-to-end golden, written by this project (its own venv)
    (cd tests && PYTHONPATH=.. ../.venv/bin/python -m parity.released_folder --output /scratch/released)
    # 4. the goldens, with the pinned venv's python
    /scratch/upvenv/bin/python tests/parity/generate_upstream_golden.py --upstream_dir /scratch/upstream \\
        --released_folder /scratch/released --output tests/parity/upstream_golden.json

Two things of the pinned stack cannot come from PyPI and are handled here, both recorded in the json:
- `dlimp` (a git-only dependency, imported by upstream's RLDS data loader only for type annotations on the paths
  run here) is a placeholder module whose attributes are inert classes: instantiating one raises.
- upstream's transformers is a fork of 4.40.1 (moojink/transformers-openvla-oft); PyPI's 4.40.1 is used. The fork
  patches only Llama's attention (bidirectional action tokens for OpenVLA-OFT) and upstream's LLM is Qwen2, so the
  Qwen2 code that runs here is the same either way.
The tiny ViT sizes of this project's `tiny` preset reach upstream's `PrismaticVisionBackbone` through two timm
registrations that call timm's own DINOv2 / SigLIP entrypoints with the folder's `timm_model_kwargs`.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import importlib.util
import json
import sys
import types
from pathlib import Path
from typing import Any

UPSTREAM_REPO = "OpenHelix-Team/VLA-Adapter"
UPSTREAM_COMMIT = "838a36da195daf3e8b8a53520c8c7ce86231b6d9"
PINNED = {"torch": "2.2.0", "transformers": "4.40.1", "tokenizers": "0.19.1", "timm": "0.9.10",
          "tensorflow": "2.15.0", "numpy": "1.26.4"}
# git blob ids, at the pinned commit, of the upstream files this script runs or reads: a checkout at another commit
# (or an edited one) is refused instead of silently producing other goldens.
UPSTREAM_BLOBS = {
    "prismatic/models/action_heads.py": "5e26fa3300d53ae065b072edc4666b1181674035",
    "prismatic/models/projectors.py": "ea20dade18ea8863f683a4a00cd4365c92aac2d6",
    "prismatic/extern/hf/modeling_prismatic.py": "945d03ea625907b1a09830af388800ee0f0697a4",
    "prismatic/extern/hf/processing_prismatic.py": "c7ae121b87a8aa76ee63ea2cde9a033d264f4d06",
    "prismatic/extern/hf/configuration_prismatic.py": "5ca526ff14673d0b034372598948388153b61ed1",
    "experiments/robot/openvla_utils.py": "03cb7c535bb76c8455ddedbb03765f80bce73ed1",
    "prismatic/models/backbones/llm/prompting/qwen_prompter.py": "6998217f6ef995874891152864a0aa0bdae82410",
    "prismatic/vla/constants.py": "0985a8377acaa946721920907b31ce96cbbb7cd3",
    "prismatic/training/train_utils.py": "0a333525ef5a86880acf8e3617a20522c7539026",
    "pretrained_models/configs/vocab.json": "4783fe10ac3adce15ac8f358ef5462739852c569",
    "pretrained_models/configs/merges.txt": "31349551d90c7606f325fe0f11bbb8bd5fa0d7c7",
    "pretrained_models/configs/tokenizer_config.json": "8abd02c13822a1eb0b8a6bca4ca9288dc466f4ea",
}
INSTRUCTIONS = ["Pick up the black bowl between the plate and the ramekin and place it on the plate",
                "open the middle drawer of the cabinet.", "Put both the Cream Cheese box and the butter in the basket!"]
ROPE_ROWS = [0, 1, 255, 256, 299]
LATENT_LAYER, LATENT_CHANNELS = 1, 4  # the end-to-end golden keeps these of the head's inputs
QWEN_VOCAB_SIZE = 151936  # Qwen2.5-0.5B's embedding rows (released text_config.vocab_size)
# Source codes of the positions golden: what sits at each LLM input slot.
PROMPT_CODE, PATCH_CODE, QUERY_CODE, STOP_CODE = 0, 10000, 20000, 30000


class GeneratorError(Exception):
    """An expected error: printed as one line, exit 2."""


def _git_blob_id(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def check_versions() -> dict[str, str]:
    """The installed versions (read from package metadata, nothing imported); refuses any that differs from the pins."""
    from importlib import metadata

    found = {}
    for name in PINNED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "missing"
    found["torch"] = found["torch"].split("+")[0]  # the local build tag (+cu121, +cpu) is the same code
    wrong = [f"{k}=={v} (pinned {PINNED[k]})" for k, v in found.items() if v != PINNED[k]]
    if wrong:
        raise GeneratorError(f"wrong library versions: {', '.join(wrong)} — run this script with the python of a venv "
                             "made from tests/parity/upstream_pinned_requirements.txt (see the script's docstring)")
    found["torch_build"] = metadata.version("torch")
    found["python"] = sys.version.split()[0]
    return found


def check_upstream(upstream_dir: Path) -> None:
    for rel, blob in UPSTREAM_BLOBS.items():
        path = upstream_dir / rel
        if not path.is_file():
            raise GeneratorError(f"'{path}' does not exist — --upstream_dir must be a checkout of {UPSTREAM_REPO} at "
                                 f"{UPSTREAM_COMMIT}")
        if _git_blob_id(path) != blob:
            raise GeneratorError(f"'{path}' differs from {UPSTREAM_REPO}@{UPSTREAM_COMMIT[:7]} — check out that commit "
                                 "unmodified (git -C DIR checkout <commit> && git -C DIR status)")


def load_golden_inputs() -> types.ModuleType:
    """This repo's `golden_inputs.py`, by path: its package name would clash with upstream's `prismatic` / `tests`."""
    spec = importlib.util.spec_from_file_location("golden_inputs", Path(__file__).with_name("golden_inputs.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _dlimp_placeholder() -> types.ModuleType:
    """Stands in for the git-only `dlimp`: upstream's data loader names `dl.DLataset` in annotations at import."""
    module = types.ModuleType("dlimp")

    def inert(name: str) -> type:
        if name.startswith("__"):
            raise AttributeError(name)

        def refuse(*_: Any, **__: Any) -> None:
            raise RuntimeError(f"dlimp.{name} is not installed (a placeholder); this generator never uses it")
        return type(name, (), {"__init__": refuse})

    module.__getattr__ = inert
    return module


def import_upstream(upstream_dir: Path) -> dict[str, types.ModuleType]:
    sys.modules.setdefault("dlimp", _dlimp_placeholder())
    sys.path.insert(0, str(upstream_dir))
    argv, sys.argv = sys.argv, [sys.argv[0]]  # upstream's constants.py picks its robot from the command line
    try:
        import experiments.robot.openvla_utils as openvla_utils

        import prismatic.extern.hf.configuration_prismatic as configuration_prismatic
        import prismatic.extern.hf.modeling_prismatic as modeling_prismatic
        import prismatic.extern.hf.processing_prismatic as processing_prismatic
        import prismatic.models.action_heads as action_heads
        import prismatic.models.backbones.llm.prompting.qwen_prompter as qwen_prompter
        import prismatic.models.projectors as projectors
        import prismatic.vla.constants as constants
    finally:
        sys.argv = argv
    for name, want in (("NUM_ACTIONS_CHUNK", 8), ("ACTION_DIM", 7), ("PROPRIO_DIM", 8), ("NUM_TOKENS", 64)):
        if getattr(constants, name) != want:
            raise GeneratorError(f"upstream constants.{name} is {getattr(constants, name)}, LIBERO's is {want} — "
                                 "run without 'aloha', 'bridge' or 'calvin' in the command line")
    return {"openvla_utils": openvla_utils, "configuration": configuration_prismatic, "modeling": modeling_prismatic,
            "processing": processing_prismatic, "action_heads": action_heads, "qwen_prompter": qwen_prompter,
            "projectors": projectors, "constants": constants}


def _tolist(t: Any) -> list:
    return t.detach().float().cpu().numpy().astype("float64").tolist()


def head_goldens(up: dict, gi: types.ModuleType) -> dict[str, list]:
    import torch

    heads: dict[str, list] = {}
    raw, aq = gi.latents()
    B, chunk, adim = gi.BATCH, up["constants"].NUM_ACTIONS_CHUNK, up["constants"].ACTION_DIM

    def projector() -> torch.nn.Module:
        module = up["projectors"].ProprioProjector(llm_dim=gi.HIDDEN, proprio_dim=gi.PROPRIO_DIM)
        gi.fill_module(module)
        return module.eval()

    def head(pro: bool) -> torch.nn.Module:
        module = up["action_heads"].L1RegressionActionHead(input_dim=gi.HIDDEN, hidden_dim=gi.HIDDEN, action_dim=adim,
                                                           num_task_tokens=gi.NUM_RAW, use_pro_version=pro)
        gi.fill_module(module)
        return module.eval()

    with torch.no_grad():
        heads["proprio_projector_fp32"] = _tolist(projector()(gi.proprio()))
        heads["proprio_projector_bf16"] = _tolist(projector().to(torch.bfloat16)(gi.proprio().to(torch.bfloat16)))
        for variant, pro in (("pro", True), ("original", False)):
            p = projector()(gi.proprio()).unsqueeze(1)
            x = torch.zeros(B, chunk, adim * gi.HIDDEN)
            heads[f"{variant}_fp32"] = _tolist(head(pro).model(x, h_a=aq, h_t=raw, p=p))
            heads[f"{variant}_fp32_with_noise"] = _tolist(head(pro).model(x + gi.head_noise(), h_a=aq, h_t=raw, p=p))
            h16, p16 = head(pro).to(torch.bfloat16), projector().to(torch.bfloat16)
            hidden = torch.cat([raw, aq], dim=2).to(torch.bfloat16)
            heads[f"{variant}_bf16"] = _tolist(h16.predict_action(hidden, proprio=gi.proprio().to(torch.bfloat16),
                                                                  proprio_projector=p16, phase="Inference"))
        rope = up["action_heads"].RotaryPositionEmbedding(gi.HIDDEN // 8)
        cos, _ = rope(gi.NUM_RAW, torch.device("cpu"), torch.float32)
        heads["rope_cos_fp32_rows_0_1_255_256_299"] = _tolist(cos[ROPE_ROWS])
        cos, sin = rope.to(torch.bfloat16)(gi.NUM_RAW, torch.device("cpu"), torch.bfloat16)
        heads["rope_cos_bf16_rows_0_1_255_256_299"] = _tolist(cos[ROPE_ROWS])
        heads["rope_sin_bf16_rows_0_1_255_256_299"] = _tolist(sin[ROPE_ROWS])
    return heads


def prompt_goldens(up: dict, tokenizer: Any, upstream_dir: Path) -> dict[str, Any]:
    """Upstream's training prompt (RLDSBatchTransform, use_minivlm: QwenPromptBuilder with an empty gpt turn, ids
    without their last 3) and inference prompt (get_vla_action's use_minivlm string), on the tiny tokenizer."""
    from transformers import Qwen2Tokenizer

    out: dict[str, Any] = {"instructions": INSTRUCTIONS, "train_prompt": [], "train_ids": [], "infer_prompt": [],
                           "infer_ids": []}
    for text in INSTRUCTIONS:
        builder = up["qwen_prompter"].QwenPromptBuilder("openvla")
        builder.add_turn("human", f"What action should the robot take to {text.lower()}?")
        builder.add_turn("gpt", "")
        out["train_prompt"].append(builder.get_prompt())
        out["train_ids"].append(tokenizer(builder.get_prompt(), add_special_tokens=True).input_ids[:-3])
        infer = _infer_prompt(up, text)
        out["infer_prompt"].append(infer)
        out["infer_ids"].append(tokenizer(infer).input_ids)
    # Qwen2.5's real vocabulary ships with upstream (pretrained_models/configs); its tokenizer.json is only a cache.
    qwen = Qwen2Tokenizer.from_pretrained(str(upstream_dir / "pretrained_models" / "configs"))
    out["real_qwen_infer_ids_0"] = qwen(_infer_prompt(up, INSTRUCTIONS[0])).input_ids
    return out


def _infer_prompt(up: dict, text: str) -> str:
    """The use_minivlm prompt string of upstream's get_vla_action, captured from the processor call it makes."""
    seen: list[str] = []

    class Capture:
        def __call__(self, prompt: str, image: Any) -> Any:
            seen.append(prompt)
            raise _Captured

    cfg = types.SimpleNamespace(num_images_in_input=1, center_crop=False, use_proprio=False)
    import numpy as np

    obs = {"full_image": np.zeros((224, 224, 3), np.uint8)}
    try:
        up["openvla_utils"].get_vla_action(cfg, None, Capture(), obs, text, use_minivlm=True)
    except _Captured:
        pass
    return seen[0]


class _Captured(Exception):
    pass


def register_tiny_vits(vit_kwargs: list[dict]) -> list[str]:
    """timm names whose entrypoints are timm's DINOv2-reg4 / SigLIP-so400m ones with the tiny preset's sizes."""
    from timm.models import register_model, vision_transformer

    names = []
    bases = ("vit_large_patch14_reg4_dinov2", "vit_so400m_patch14_siglip_224")
    for base, kwargs in zip(bases, vit_kwargs, strict=True):
        name = f"golden_tiny_{base}"
        build = _sized_entrypoint(getattr(vision_transformer, base), dict(kwargs))
        build.__name__ = name
        build.__module__ = vision_transformer.__name__
        register_model(build)
        names.append(name)
    return names


def _sized_entrypoint(entry: Any, sizes: dict) -> Any:
    def build(pretrained: bool = False, **kwargs: Any) -> Any:
        return entry(pretrained=pretrained, **{**kwargs, **sizes})
    return build


def end_to_end_golden(up: dict, gi: types.ModuleType, folder: Path) -> tuple[dict[str, Any], dict[str, Any], tuple]:
    """Upstream's LIBERO evaluation path on the released-style folder: get_vla's registrations and from_pretrained
    (bf16), get_processor, get_action_head / get_proprio_projector, get_vla_action (use_minivlm). Returns the golden and
    the positions upstream's predict_action fed to the head (read with forward hooks)."""
    import numpy as np
    import torch
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForVision2Seq, AutoProcessor

    ou, cfgmod = up["openvla_utils"], up["configuration"]
    AutoConfig.register("openvla", cfgmod.OpenVLAConfig)
    AutoImageProcessor.register(cfgmod.OpenVLAConfig, up["processing"].PrismaticImageProcessor)
    AutoProcessor.register(cfgmod.OpenVLAConfig, up["processing"].PrismaticProcessor)
    AutoModelForVision2Seq.register(cfgmod.OpenVLAConfig, up["modeling"].OpenVLAForActionPrediction)
    config = cfgmod.OpenVLAConfig.from_pretrained(str(folder))
    config.timm_model_ids = register_tiny_vits(config.timm_model_kwargs)
    vla = AutoModelForVision2Seq.from_pretrained(str(folder), config=config, torch_dtype=torch.bfloat16,
                                                 low_cpu_mem_usage=False, trust_remote_code=False)
    vla.vision_backbone.set_num_images_in_input(2)
    vla.eval()
    ou._load_dataset_stats(vla, str(folder))
    cfg = types.SimpleNamespace(pretrained_checkpoint=str(folder), use_l1_regression=True, use_pro_version=True,
                                num_images_in_input=2, center_crop=True, use_proprio=True, unnorm_key=gi.UNNORM_KEY,
                                num_open_loop_steps=8)
    processor = ou.get_processor(cfg)
    action_head = ou.get_action_head(cfg, vla.llm_dim)
    proprio_projector = ou.get_proprio_projector(cfg, vla.llm_dim, gi.PROPRIO_DIM)

    frames, state = gi.observation()

    def infer(record: dict[str, Any] | None = None) -> tuple[list, dict[str, Any]]:
        obs = {"full_image": frames[0], "wrist_image": frames[1], "state": state.copy()}
        with _recording(vla, action_head, record):
            actions = ou.get_vla_action(cfg, vla, processor, obs, gi.INSTRUCTION, action_head=action_head,
                                        proprio_projector=proprio_projector, use_minivlm=True)
        return actions, obs

    seen: dict[str, Any] = {}
    actions, obs = infer(seen)
    input_ids = processor.tokenizer(_infer_prompt(up, gi.INSTRUCTION)).input_ids
    golden = {"instruction": gi.INSTRUCTION, "unnorm_key": gi.UNNORM_KEY,
              "actions_bf16": np.stack(actions).astype("float64").tolist(), "input_ids": input_ids,
              "proprio_normalized": np.asarray(obs["state"], dtype="float64").tolist(),
              # What the head read (sample 0): a one-position shift changes these by far more than bf16 noise, while
              # it moves the action chunk by about one bf16 ulp only.
              f"raw_latents_layer{LATENT_LAYER}_ch0_{LATENT_CHANNELS - 1}":
                  _tolist(seen["h_t"][0, LATENT_LAYER, :, :LATENT_CHANNELS]),
              f"aq_latents_layer{LATENT_LAYER}_ch0_{LATENT_CHANNELS - 1}":
                  _tolist(seen["h_a"][0, LATENT_LAYER, :, :LATENT_CHANNELS])}
    positions = {"num_patches": seen["patches"].shape[1], "prompt_len": len(input_ids)}
    positions["raw_infer"], positions["aq_infer"] = _head_positions(seen)
    sources = _input_sources(vla, len(input_ids), infer)
    positions["raw_sources"] = [sources[p] for p in positions["raw_infer"]]
    positions["aq_sources"] = [sources[p] for p in positions["aq_infer"]]
    return golden, positions, (config, processor)


@contextlib.contextmanager
def _recording(vla: Any, action_head: Any, record: dict[str, Any] | None) -> Any:
    """Forward hooks that only read: the LLM's input embeddings and hidden states, the projected patches, and the
    head's h_t / h_a (the latents upstream selected)."""
    if record is None:
        yield
        return
    hooks = [
        vla.language_model.register_forward_hook(
            lambda m, a, kw, out: record.update(hidden=out.hidden_states), with_kwargs=True),
        vla.projector.register_forward_hook(lambda m, a, out: record.update(patches=out)),
        action_head.model.register_forward_pre_hook(
            lambda m, a, kw: record.update(h_t=kw["h_t"], h_a=kw["h_a"]), with_kwargs=True),
    ]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def _head_positions(seen: dict[str, Any]) -> tuple[list[int], list[int]]:
    """Which LLM positions the head received, by matching its input rows against the LLM's layer-1 hidden states
    (of sample 0; every row there is distinct)."""
    hidden = seen["hidden"][1][0]

    def rows_to_positions(rows: Any) -> list[int]:
        eq = (rows[:, None, :] == hidden[None, :, :]).all(-1)
        if not bool((eq.sum(1) == 1).all()):
            raise RuntimeError("a head input row matches no single LLM position")
        return eq.float().argmax(1).tolist()
    return rows_to_positions(seen["h_t"][0, 1]), rows_to_positions(seen["h_a"][0, 1])


def _input_sources(vla: Any, prompt_len: int, run: Any) -> list[int]:
    """What each LLM input slot holds, by running `run` again with source-coded embeddings: the token embedding of
    id index t reads PROMPT_CODE+t (the last index, the stop token, STOP_CODE), patch k PATCH_CODE+k, action query q
    QUERY_CODE+q. A code c is stored as (c // 256, c % 256) in channels 0, 1: exact in bf16. The LLM is not run."""
    import torch

    def coded(codes: Any, like: Any) -> Any:
        out = torch.zeros(*codes.shape, like.shape[-1], dtype=like.dtype)
        out[..., 0], out[..., 1] = codes // 256, codes % 256
        return out

    def token_codes(module: Any, args: Any, out: Any) -> Any:
        n = args[0].shape[-1]
        codes = torch.tensor([PROMPT_CODE + t if t < prompt_len else STOP_CODE if t == n - 1 else -1 for t in range(n)])
        return coded(codes.expand(args[0].shape), out)

    seen: dict[str, Any] = {}

    def stop(module: Any, args: Any, kwargs: dict) -> None:
        seen["embeds"] = kwargs["inputs_embeds"]
        raise _Captured

    queries = vla.action_queries.weight.data.clone()
    vla.action_queries.weight.data = coded(QUERY_CODE + torch.arange(queries.shape[0]), queries)
    hooks = [vla.get_input_embeddings().register_forward_hook(token_codes),
             vla.projector.register_forward_hook(
                 lambda m, a, out: coded((PATCH_CODE + torch.arange(out.shape[1])).expand(out.shape[:2]), out)),
             vla.language_model.register_forward_pre_hook(stop, with_kwargs=True)]
    try:
        run()
    except _Captured:
        pass
    finally:
        for hook in hooks:
            hook.remove()
        vla.action_queries.weight.data = queries
    embeds = seen["embeds"][0].float()
    return (embeds[:, 0].round().long() * 256 + embeds[:, 1].round().long()).tolist()


def training_positions(up: dict, gi: types.ModuleType, upstream_dir: Path, folder_parts: tuple) -> dict[str, list]:
    """Which LLM positions upstream's training step hands to the head: RLDSBatchTransform (use_minivlm, wrist image,
    proprio) -> PaddedCollatorForActionPrediction -> finetune.py's run_forward_pass, on the tiny prompt ids. Action
    tokens must be ids above upstream's ACTION_TOKEN_BEGIN_IDX (Qwen2.5's vocabulary), so this run uses an LLM with
    Qwen2.5's vocabulary size and upstream's ActionTokenizer over Qwen2.5's tokenizer; positions do not depend on
    weights."""
    import random

    import numpy as np
    import torch
    from transformers import Qwen2Tokenizer

    config, processor = folder_parts
    config = copy.deepcopy(config)
    config.text_config.vocab_size = QWEN_VOCAB_SIZE
    vla = up["modeling"].OpenVLAForActionPrediction(config).eval()
    gi.fill_module(vla)
    vla.tie_weights()
    vla = vla.to(torch.bfloat16)  # run_forward_pass feeds bf16 pixels (it relies on CUDA autocast, a no-op here)
    vla.vision_backbone.set_num_images_in_input(2)
    head = up["action_heads"].L1RegressionActionHead(input_dim=gi.HIDDEN, hidden_dim=gi.HIDDEN, use_pro_version=True)
    projector = up["projectors"].ProprioProjector(llm_dim=gi.HIDDEN, proprio_dim=gi.PROPRIO_DIM)
    gi.fill_module(head)
    gi.fill_module(projector)
    head, projector = head.to(torch.bfloat16).eval(), projector.to(torch.bfloat16).eval()

    argv, sys.argv = sys.argv, [sys.argv[0]]
    try:
        spec = importlib.util.spec_from_file_location("upstream_finetune", upstream_dir / "vla-scripts" / "finetune.py")
        finetune = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(finetune)
        from prismatic.util.data_utils import PaddedCollatorForActionPrediction
        from prismatic.vla.action_tokenizer import ActionTokenizer
        from prismatic.vla.datasets.datasets import RLDSBatchTransform
    finally:
        sys.argv = argv
    qwen = Qwen2Tokenizer.from_pretrained(str(upstream_dir / "pretrained_models" / "configs"))
    transform = RLDSBatchTransform(ActionTokenizer(qwen), processor.tokenizer,
                                   image_transform=processor.image_processor.apply_transform,
                                   prompt_builder_fn=up["qwen_prompter"].QwenPromptBuilder, use_wrist_image=True,
                                   use_proprio=True, use_minivlm=True)
    frames, state = gi.observation()
    chunk = np.random.default_rng(3).uniform(-1, 1, (up["constants"].NUM_ACTIONS_CHUNK, 7)).astype(np.float32)
    random.seed(0)  # the transform pads the 56 action ids to 64 with random.choices
    example = transform({"dataset_name": gi.UNNORM_KEY, "action": chunk,
                         "observation": {"image_primary": frames[0][None], "image_wrist": frames[1][None],
                                         "proprio": state[None].astype(np.float32)},
                         "task": {"language_instruction": gi.INSTRUCTION.encode()}})
    collator = PaddedCollatorForActionPrediction(processor.tokenizer.model_max_length, processor.tokenizer.pad_token_id)
    batch = collator([example])
    num_patches = vla.vision_backbone.get_num_patches() * vla.vision_backbone.get_num_images_in_input()

    def step() -> None:
        with torch.no_grad():
            finetune.run_forward_pass(vla, types.SimpleNamespace(module=head), projector, batch, ActionTokenizer(qwen),
                                      "cpu", use_l1_regression=True, use_proprio=True, use_film=False,
                                      num_patches=num_patches, cfg=types.SimpleNamespace(phase="Inference"))

    seen: dict[str, Any] = {}
    with _recording(vla, head, seen):
        step()
    raw, aq = _head_positions(seen)
    return {"raw_train": raw, "aq_train": aq}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream_dir", type=Path, required=True, help="checkout of upstream at the pinned commit")
    parser.add_argument("--released_folder", type=Path, required=True,
                        help="folder written by `python -m parity.released_folder --output DIR` (project venv)")
    parser.add_argument("--output", type=Path, required=True,
                        help="json to write (e.g. tests/parity/upstream_golden.json)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    versions = check_versions()
    print("running on " + ", ".join(f"{k} {v}" for k, v in versions.items()), flush=True)
    check_upstream(args.upstream_dir)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"):
        if not (args.released_folder / name).is_file():
            raise GeneratorError(f"'{args.released_folder / name}' does not exist — write the folder first: (cd tests "
                                 "&& PYTHONPATH=.. ../.venv/bin/python -m parity.released_folder --output DIR)")
    if not args.output.parent.is_dir():
        raise GeneratorError(f"'{args.output.parent}' is not a directory — give --output inside an existing folder")

    import torch

    torch.set_num_threads(1)  # one summation order, whatever the machine
    gi = load_golden_inputs()
    up = import_upstream(args.upstream_dir)
    heads = head_goldens(up, gi)
    end_to_end, positions, folder_parts = end_to_end_golden(up, gi, args.released_folder)
    positions.update(training_positions(up, gi, args.upstream_dir, folder_parts))
    from transformers import AutoTokenizer

    prompt = prompt_goldens(up, AutoTokenizer.from_pretrained(str(args.released_folder)), args.upstream_dir)
    prompt["positions"] = positions
    golden = {
        "meta": {
            "source": UPSTREAM_REPO, "commit": UPSTREAM_COMMIT,
            "generator": "tests/parity/generate_upstream_golden.py (its docstring says how to run it)",
            "fp32": "head.model(x=zeros (+noise), h_a=aq, h_t=raw, p=ProprioProjector(proprio)) in float32",
            "bf16": "head.to(bfloat16), projector.to(bfloat16), head.predict_action(cat[raw, aq] in bf16, proprio, "
                    "projector, phase='Inference')",
            "end_to_end": "upstream's LIBERO evaluation path (get_vla registrations + from_pretrained in bf16, "
                          "get_processor, get_action_head, get_proprio_projector, get_vla_action with use_minivlm: "
                          "resize_image_for_policy, center_crop_image, PrismaticProcessor, normalize_proprio, "
                          "predict_action) on the folder of tests/parity/released_folder.py",
            "positions": "the LLM positions handed to the head (forward hooks): *_infer by upstream's predict_action "
                         "(the end-to-end run), *_train by its training step (RLDSBatchTransform, "
                         "PaddedCollatorForActionPrediction, finetune.py's run_forward_pass); *_sources: what each "
                         f"inference input slot held: prompt token t = {PROMPT_CODE}+t, patch k = {PATCH_CODE}+k, "
                         f"action query q = {QUERY_CODE}+q, stop token = {STOP_CODE}",
        },
        "generated_with": {**versions, "upstream_commit": UPSTREAM_COMMIT, "torch_threads": 1, "device": "cpu",
                           "not_from_pypi": "dlimp: inert placeholder (annotations only); transformers: PyPI 4.40.1 "
                                            "in place of upstream's 4.40.1 fork"},
        "heads": heads, "prompt": prompt, "end_to_end": end_to_end,
    }
    args.output.write_text(json.dumps(golden) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    try:
        main()
    except GeneratorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
