"""Align baseline ("Don't Blind Your VLA", arXiv 2510.25616) as a loss component.

    L = L_act + w · L_align,     L_align = − mean over samples b and vision tokens i of cos(P(h_{b,i}), z_{b,i})

- h: LLM hidden states of the vision tokens (`layout.vision_mask`) at layer `layer` (hidden-state indexing of
  docs/craft/PROJECT_STRUCTURE.md: 0 = embeddings, L = after the final norm; default L // 2).
- z: patch features of a frozen vision teacher at the same 256·N positions.
  * teacher="self" (default): the model's own θ0 vision backbone (fused DINOv2+SigLIP readout, (B, 256·N, C)),
    copied at construction. Under LoRA the copy is the BASE backbone (adapters removed), which is θ0 exactly because
    the base weights never train; in full fine-tuning it is the backbone as it is when this object is built.
  * teacher=<timm id>: `timm.create_model(id, pretrained=True)`; the DINO channels of `pixel_values` are
    un-normalised to RGB in [0, 1], re-normalised with the teacher's mean/std and resized to its input size; its last
    block's patch grid is bilinearly interpolated to the VLA's grid when the two differ.
- P: MLP LayerNorm(D) -> Linear(D, H) -> SiLU -> Linear(H, C), randomly initialised from `seed`, then FROZEN (a
  trainable P lets the model bypass the loss, see the paper's ablation).
P and the teacher never require grad and are not part of the policy, so they never enter the optimizer; the gradient
of L_align reaches the LLM layers below `layer`, the projector and the vision backbone through h.
`state_dict()` / `load_state_dict()` make resume exact (see their docstrings).
"""

from __future__ import annotations

import copy
import hashlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prismatic.models.image_transform import batch_pixel_values
from prismatic.models.modeling_vla import OpenVLAForActionPrediction, VLAOutput, unwrap_vla
from prismatic.models.vision_backbone import CHANNELS_PER_IMAGE, CHANNELS_PER_VIT

DEFAULT_ALIGN_WEIGHT = 0.2
SELF_TEACHER = "self"
# DINO channels of pixel_values are ImageNet-normalised (prismatic.models.image_transform).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STATE_VERSION = 1


def build_align_projector(llm_dim: int, teacher_dim: int, hidden_dim: int | None, seed: int) -> nn.Sequential:
    """P = LayerNorm, Linear, SiLU, Linear with PyTorch's default init drawn from `seed` (global RNG untouched)."""
    hidden = int(hidden_dim or teacher_dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        proj = nn.Sequential(nn.LayerNorm(llm_dim), nn.Linear(llm_dim, hidden), nn.SiLU(),
                             nn.Linear(hidden, teacher_dim))
    proj.requires_grad_(False)
    return proj.eval()


def strip_lora_layers(module: nn.Module) -> int:
    """Replace every peft LoRA wrapper inside `module` by its `base_layer` (in place); returns how many."""
    replaced = 0
    for name, child in list(module.named_modules()):
        base = getattr(child, "base_layer", None)
        if name and isinstance(base, nn.Module) and hasattr(child, "lora_A"):
            parent_name, _, attr = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            setattr(parent, attr, base)
            replaced += 1
    return replaced


def tensor_fingerprint(module: nn.Module) -> str:
    """sha1 of every parameter / buffer of `module` (names, shapes, dtypes, exact bytes)."""
    digest = hashlib.sha1()
    for name, t in sorted(module.state_dict().items()):
        x = t.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tuple(x.shape)}|{x.dtype}|".encode())
        digest.update(x.view(torch.uint8).numpy().tobytes() if x.numel() else b"")
    return digest.hexdigest()


class TimmPatchTeacher(nn.Module):
    """A timm model as a patch-feature teacher on the VLA's 6N-channel pixel_values -> (B, N · grid², C)."""

    def __init__(self, model: nn.Module, vla_image_size: int, vla_grid: int) -> None:
        super().__init__()
        import timm.data

        self.model = model
        cfg = timm.data.resolve_model_data_config(model)
        self.input_size = tuple(int(s) for s in cfg["input_size"][1:])
        self.vla_image_size, self.vla_grid = int(vla_image_size), int(vla_grid)
        self.register_buffer("in_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("in_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("t_mean", torch.tensor(cfg["mean"], dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("t_std", torch.tensor(cfg["std"], dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        if not hasattr(model, "forward_intermediates"):
            raise ValueError(f"timm model {type(model).__name__} has no forward_intermediates(): cannot read patch "
                             "features from it; pick a ViT / ConvNet family that supports it")

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = pixel_values.shape
        num_images = channels // CHANNELS_PER_IMAGE
        per_image = pixel_values.reshape(batch * num_images, CHANNELS_PER_IMAGE, height, width)
        rgb = per_image[:, :CHANNELS_PER_VIT].float() * self.in_std + self.in_mean  # back to [0, 1]
        if (height, width) != self.input_size:
            rgb = F.interpolate(rgb, size=self.input_size, mode="bicubic", align_corners=False)
        x = (rgb - self.t_mean) / self.t_std
        dtype = next(self.model.parameters()).dtype
        fmap = self.model.forward_intermediates(x.to(dtype), indices=1, intermediates_only=True,
                                                output_fmt="NCHW")[-1]  # (BN, C, gh, gw): last block
        if tuple(fmap.shape[-2:]) != (self.vla_grid, self.vla_grid):
            fmap = F.interpolate(fmap.float(), size=(self.vla_grid, self.vla_grid), mode="bilinear",
                                 align_corners=False)
        tokens = fmap.flatten(2).transpose(1, 2)  # (BN, grid², C), row-major like the ViT patch order
        return tokens.reshape(batch, num_images * tokens.shape[1], tokens.shape[2])


def load_timm_teacher(timm_id: str, pretrained: bool = True, timm_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """`timm.create_model(timm_id, pretrained=True, num_classes=0, **timm_kwargs)` with a clear error when weights are
    unavailable. timm_kwargs: e.g. {"img_size": 224} so a DINOv2 teacher sees 224 px (16 x 16 patches of 14 px).

    pretrained=False exists only for tests (a randomly initialised teacher is meaningless for training).
    """
    import timm

    try:
        return timm.create_model(timm_id, pretrained=pretrained, num_classes=0, **dict(timm_kwargs or {}))
    except Exception as exc:  # hub / network / unknown-id errors all surface here
        raise RuntimeError(
            f"could not build the Align teacher timm model {timm_id!r} with pretrained weights ({type(exc).__name__}: "
            f"{str(exc)[:200]}). Pretrained weights must be downloadable (Hugging Face hub) or already in the local "
            "cache; offline, use --align_teacher self (the model's own θ0 vision backbone).") from exc


class AlignRetention:
    """Align loss component (see module docstring). Not an nn.Module on purpose: nothing here is trainable, and
    it must never be registered under the policy (optimizer, DDP, checkpoints of the policy).

    Usage per micro-batch (after `out = policy(batch, noise)`):
        l_align = align.loss(out.vla_output, batch_pixel_values(batch, device))  # unweighted L_align (≈ −cosine)
        loss = loss_act + align.weight * l_align
    """

    def __init__(self, vla: nn.Module, layer: int | None = None, weight: float = DEFAULT_ALIGN_WEIGHT,
                 teacher: str = SELF_TEACHER, seed: int = 0, projector_hidden_dim: int | None = None,
                 timm_pretrained: bool = True, timm_kwargs: dict[str, Any] | None = None) -> None:
        base = unwrap_vla(vla)
        num_layers = base.config.num_llm_layers
        self.layer = num_layers // 2 if layer is None else int(layer)
        if not 0 <= self.layer <= num_layers:
            raise ValueError(f"align layer {self.layer} out of range: valid layers are 0..{num_layers} "
                             f"(0 = embeddings, {num_layers} = after the final norm)")
        if not (math.isfinite(weight) and weight >= 0):
            raise ValueError(f"align weight must be a finite number >= 0, got {weight}")
        self.weight = float(weight)
        self.teacher_spec = str(teacher)
        self.seed = int(seed)
        self.num_layers = num_layers
        self.llm_dim = base.config.hidden_size
        self.teacher = self._build_teacher(base, timm_pretrained, timm_kwargs)
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        self.teacher_dim = self._probe_teacher_dim(base)
        self.projector = build_align_projector(self.llm_dim, self.teacher_dim, projector_hidden_dim, self.seed)
        device = next(base.parameters()).device
        self.to(device)
        self._fingerprint: str | None = None

    # ------------------------------------------------------------------------------------------ construction
    def _build_teacher(self, base: OpenVLAForActionPrediction, timm_pretrained: bool,
                       timm_kwargs: dict[str, Any] | None) -> nn.Module:
        if self.teacher_spec == SELF_TEACHER:
            teacher = copy.deepcopy(base.vision_backbone)
            strip_lora_layers(teacher)  # LoRA: the frozen base backbone IS θ0
            return teacher
        grid = int(round(math.sqrt(base.num_patches_per_image)))
        if grid * grid != base.num_patches_per_image:
            raise ValueError(f"the VLA's {base.num_patches_per_image} patches per image are not a square grid")
        model = load_timm_teacher(self.teacher_spec, pretrained=timm_pretrained, timm_kwargs=timm_kwargs)
        return TimmPatchTeacher(model, base.config.image_size, grid)

    @torch.no_grad()
    def _probe_teacher_dim(self, base: OpenVLAForActionPrediction) -> int:
        if self.teacher_spec == SELF_TEACHER:
            return int(base.vision_backbone.embed_dim)
        size = base.config.image_size
        probe = torch.zeros(1, CHANNELS_PER_IMAGE, size, size, device=next(self.teacher.parameters()).device)
        out = self.teacher(probe)  # one image -> (1, grid², C)
        if out.shape[1] != base.num_patches_per_image:
            raise ValueError(f"teacher {self.teacher_spec!r} gives {out.shape[1]} tokens per image, the VLA has "
                             f"{base.num_patches_per_image}")
        return int(out.shape[-1])

    def to(self, device: torch.device | str) -> AlignRetention:
        self.teacher.to(device)
        self.projector.to(device)
        return self

    def parameters(self) -> list[nn.Parameter]:
        """Every tensor this component holds (all frozen): for checks that none is trained."""
        return list(self.teacher.parameters()) + list(self.projector.parameters())

    # ------------------------------------------------------------------------------------------------- loss
    @torch.no_grad()
    def teacher_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """z: (B, 256·N, C) patch features of the frozen teacher (eval mode, no grad)."""
        self.teacher.eval()
        param = next(self.teacher.parameters())
        return self.teacher(pixel_values.to(device=param.device, dtype=param.dtype))

    def vision_hidden_states(self, vla_output: VLAOutput) -> torch.Tensor:
        """h: (B, 256·N, D) hidden states at the vision positions of layer `self.layer` (gathered with the mask)."""
        hidden = vla_output.hidden_states
        if len(hidden) != self.num_layers + 1:
            raise ValueError(f"vla_output has {len(hidden)} hidden states, expected L + 1 = {self.num_layers + 1}")
        layout = vla_output.layout
        return layout.gather(hidden[self.layer], layout.vision_mask)

    def loss(self, vla_output: VLAOutput, pixel_values: torch.Tensor) -> torch.Tensor:
        """Unweighted L_align = −mean cos(P(h), z) over samples and vision tokens (float32 scalar)."""
        h = self.vision_hidden_states(vla_output)
        z = self.teacher_features(pixel_values)
        if h.shape[:2] != z.shape[:2]:
            raise ValueError(f"vision tokens of the LLM {tuple(h.shape[:2])} and teacher tokens {tuple(z.shape[:2])} "
                             "do not align (batch, 256·N): same pixel_values and num_images_in_input?")
        if not torch.isfinite(z).all():
            raise FloatingPointError(f"teacher {self.teacher_spec!r} produced non-finite features")
        proj_param = next(self.projector.parameters())
        if proj_param.device != h.device:  # built before the policy moved to its device
            self.to(h.device)
            proj_param = next(self.projector.parameters())
        self.projector.eval()
        pred = self.projector(h.float().to(proj_param.dtype))
        cos = F.cosine_similarity(pred.float(), z.detach().float().to(pred.device), dim=-1, eps=1e-8)
        return -cos.mean()

    def total_loss(self, loss_act: torch.Tensor, vla_output: VLAOutput,
                   pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(L_act + w · L_align, L_align)."""
        l_align = self.loss(vla_output, pixel_values)
        return loss_act + self.weight * l_align, l_align

    # ----------------------------------------------------------------------------------------------- resume
    def teacher_fingerprint(self) -> str:
        if self._fingerprint is None:  # the teacher never changes: hash once
            self._fingerprint = tensor_fingerprint(self.teacher)
        return self._fingerprint

    def state_dict(self, include_teacher: bool | None = None) -> dict[str, Any]:
        """P's weights, the settings, the teacher's fingerprint and (optionally) the teacher's weights.

        include_teacher=None: included for teacher="self" unless the caller knows θ0 can be rebuilt (pass False
        under LoRA, where the base backbone is θ0 and resume rebuilds it; a timm teacher is re-downloaded).
        """
        if include_teacher is None:
            include_teacher = self.teacher_spec == SELF_TEACHER
        state: dict[str, Any] = {
            "version": STATE_VERSION, "layer": self.layer, "weight": self.weight, "teacher": self.teacher_spec,
            "seed": self.seed, "llm_dim": self.llm_dim, "teacher_dim": self.teacher_dim,
            "teacher_fingerprint": self.teacher_fingerprint(),
            "projector": {k: v.detach().cpu().clone() for k, v in self.projector.state_dict().items()},
        }
        if include_teacher:
            state["teacher_state"] = {k: v.detach().cpu().clone() for k, v in self.teacher.state_dict().items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore P exactly; restore the teacher from `teacher_state` if present, else require the rebuilt teacher
        to have the saved fingerprint (refuses a teacher that is not the run's θ0)."""
        expected = {"layer": self.layer, "teacher": self.teacher_spec, "llm_dim": self.llm_dim,
                    "teacher_dim": self.teacher_dim}
        diffs = [f"{k}: saved {state.get(k)!r} vs now {v!r}" for k, v in expected.items() if state.get(k) != v]
        if diffs:
            raise ValueError("Align state does not match this configuration: " + "; ".join(diffs))
        if "teacher_state" in state:
            own = self.teacher.state_dict()
            missing, unexpected = sorted(set(own) - set(state["teacher_state"])), \
                sorted(set(state["teacher_state"]) - set(own))
            if missing or unexpected:
                raise ValueError(f"saved Align teacher does not match: missing {missing[:5]}, unexpected "
                                 f"{unexpected[:5]}")
            self.teacher.load_state_dict(state["teacher_state"], strict=True)
            self._fingerprint = None
        if self.teacher_fingerprint() != state["teacher_fingerprint"]:
            raise ValueError("the Align teacher differs from the one the run started with (fingerprint mismatch): "
                             "with teacher='self' in full fine-tuning, resume needs the teacher weights saved in "
                             "the training state (state_dict(include_teacher=True))")
        self.projector.load_state_dict(state["projector"], strict=True)
        self.weight = float(state["weight"])


def align_gradients(model: nn.Module, micro_batches, device: torch.device, align: AlignRetention) -> dict:
    """Drop-in for `train_step.plain_gradients` under `--retention_method align`.

    Per micro-batch: backward of (L_act + w · L_align) / k, DDP all-reduce on the last micro-batch only (`no_sync`
    before). Returns this rank's means over micro-batches: `loss`, `curr_l1`, `next_l1` (the unchanged L1 numbers,
    comparable across methods) and `align_loss` (L_align), `total_loss`, all float64 tensors.
    """
    from prismatic.training.train_step import autocast_context, plain_gradients  # local: no import cycle

    def objective(l1: torch.Tensor, out, micro) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with autocast_context(device):
            l_align = align.loss(out.vla_output, batch_pixel_values(micro.batch, device))
        total = l1 + align.weight * l_align
        return total, {"align_loss": l_align, "total_loss": total}

    return plain_gradients(model, micro_batches, device, objective)
