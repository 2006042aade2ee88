"""vla-scripts/measure_drift.py end to end on a tiny synthetic LIBERO dataset and two saved tiny policies."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from baseline_helpers import DATASET

from prismatic.data.collator import VLACollator
from prismatic.data.rlds_dataset import RLDSFrameDataset
from prismatic.models.loaders import load_policy
from prismatic.training.craft_utils import CRaFTFeatureExtractor, retention_loss
from prismatic.training.train_step import to_device

SCRIPT = Path(__file__).resolve().parents[2] / "vla-scripts" / "measure_drift.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("measure_drift_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def policies(tmp_path_factory, tiny_policy_factory):
    """θ0 and a 'fine-tuned' policy (projector and one decoder layer perturbed), saved as checkpoint folders."""
    root = tmp_path_factory.mktemp("policies")
    theta0 = tiny_policy_factory(0, num_images=2)
    theta0.save_pretrained(root / "theta0", step=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in (theta0.vla.projector.fc3.weight, theta0.vla.language_model.model.layers[2].mlp.down_proj.weight):
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    theta0.save_pretrained(root / "finetuned", step=100)
    return root / "theta0", root / "finetuned"


def _run(script, reference, finetuned, data_root, out_dir, **overrides):
    cfg = script.DriftConfig(reference_path=reference, finetuned_path=finetuned, data_root_dir=data_root,
                             dataset_name=DATASET, output_dir=out_dir, num_samples=64, batch_size=8, seed=3,
                             device="cpu", **overrides)
    return script.measure_drift(cfg)


def _check_schema(report: dict, out_dir: Path, num_layers: int) -> dict:
    on_disk = json.loads((out_dir / "drift.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert on_disk["schema_version"] == 1 and on_disk["layers"] == list(range(num_layers + 1))
    assert on_disk["num_samples"] == 20 and len(on_disk["sample_ids"]) == 20  # all 20 frames (< num_samples)
    assert len(on_disk["tasks"]) == 2
    for group in ("raw", "aq"):
        for key in ("retention", "cka", "probe_accuracy_reference", "probe_accuracy_finetuned"):
            assert len(on_disk["groups"][group][key]) == num_layers + 1
    probe = on_disk["probe"]
    assert probe["split"] == "by_episode" and probe["num_classes"] == 2 and probe["fitted"]
    assert probe["num_train"] + probe["num_test"] == 20
    assert set(on_disk["craft_default_anchor"]) == {"raw_layer", "aq_layer", "L_ret_concat", "L_ret_raw_only"}
    png = (out_dir / "drift.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000
    assert not [p for p in out_dir.iterdir() if p.name.startswith(".")]  # no temporary left behind
    return on_disk


def test_theta0_against_itself_from_the_command_line(script, policies, drift_data_root, tmp_path, monkeypatch):
    theta0, _ = policies
    out = tmp_path / "self"
    monkeypatch.setattr(sys, "argv", [
        "measure_drift.py", "--reference_path", str(theta0), "--finetuned_path", str(theta0), "--data_root_dir",
        str(drift_data_root), "--dataset_name", DATASET, "--output_dir", str(out), "--num_samples", "64",
        "--batch_size", "8", "--seed", "3", "--device", "cpu"])
    script.main()
    L = 4
    report = json.loads((out / "drift.json").read_text())
    data = _check_schema(report, out, L)
    for group in ("raw", "aq"):
        assert data["groups"][group]["retention"] == [0.0] * (L + 1)
        np.testing.assert_allclose(data["groups"][group]["cka"], 1.0, atol=1e-6)
        assert data["groups"][group]["probe_accuracy_reference"] == data["groups"][group]["probe_accuracy_finetuned"]


def test_perturbed_policy_matches_craft_retention(script, policies, drift_data_root, tmp_path):
    theta0, finetuned = policies
    report = _run(script, theta0, finetuned, drift_data_root, tmp_path / "ft")
    data = _check_schema(report, tmp_path / "ft", 4)
    raw, aq = data["groups"]["raw"]["retention"], data["groups"]["aq"]["retention"]
    assert all(v > 0 for v in raw) and aq[0] == 0.0 and all(v > 0 for v in aq[1:])
    # the report names the weights it measured (hash recomputed here from the files), so a moved root keeps it
    files = sorted(p for p in Path(finetuned).iterdir() if p.suffix in (".safetensors", ".pt", ".bin", ".pth")
                   and p.name != "training_state.pt")
    lines = "".join(f"{p.name} {hashlib.sha256(p.read_bytes()).hexdigest()}\n" for p in files)
    assert data["finetuned_checkpoint"]["weights_sha256"] == hashlib.sha256(lines.encode()).hexdigest()
    assert data["finetuned_checkpoint"]["path"] == str(Path(finetuned).resolve())
    # the layer-3 drift of the perturbed decoder layer 2 adds to the projector's: a jump at layer 3
    assert raw[3] > raw[2]

    # independent path: CRaFT's hook-based extractor + retention_loss on the same frames, in other batches
    def anchors(path):
        policy = load_policy(path)
        tok = policy.processor.tokenizer
        ds = RLDSFrameDataset(drift_data_root, DATASET, tok, num_images_in_input=2, seed=3)
        batch = to_device(VLACollator(ds.pad_token_id)([ds.get_frame(i) for i in range(ds.num_frames)]),
                          torch.device("cpu"))
        ext = CRaFTFeatureExtractor(policy.vla)
        with torch.no_grad(), ext.capture():
            out = policy.vla(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        return ext.features(out.layout)

    ref, ft = anchors(theta0), anchors(finetuned)
    expected = retention_loss(ft, ref).item()
    assert data["craft_default_anchor"]["L_ret_concat"] == pytest.approx(expected, rel=1e-4)
    assert data["craft_default_anchor"]["L_ret_raw_only"] == pytest.approx(
        retention_loss(ft[:, :64], ref[:, :64]).item(), rel=1e-4)


def test_bad_arguments_fail_before_anything_is_written(script, policies, drift_data_root, tmp_path):
    theta0, _ = policies
    out = tmp_path / "never"
    with pytest.raises(ValueError, match="finetuned_path"):
        _run(script, theta0, tmp_path / "missing", drift_data_root, out)
    with pytest.raises(ValueError, match="probe_test_fraction"):
        _run(script, theta0, theta0, drift_data_root, out, probe_test_fraction=1.5)
    assert not out.exists()
