"""`make demo` end to end in its reduced-steps mode; every printed number is checked against the run's files and
the held-out L1 / L_ret against independent computations (per-frame `predict_action` on raw episodes parsed with
the reference protobuf parser; pooled features through `drift_metrics`)."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
import torch

from prismatic.data.example_codec import parse_example_reference
from prismatic.data.tfrecord import iter_records
from prismatic.models.loaders import load_policy
from prismatic.training.drift_metrics import pooled_layer_features

REPO = Path(__file__).resolve().parents[2]


def _load_demo():
    spec = importlib.util.spec_from_file_location("demo_script", REPO / "vla-scripts/demo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["demo_script"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    demo = _load_demo()
    out = tmp_path_factory.mktemp("demo")
    cfg = demo.DemoConfig(output_dir=out, quick=True, libero_rollout="never", threads=1)
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        rows = demo.main(cfg)
    return demo, cfg.resolved(), out, rows, buffer.getvalue()


def _printed_table(stdout: str) -> list[list[str]]:
    lines = [line for line in stdout.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[1:]]  # skip the header


def _metrics(out: Path, run: str) -> list[dict]:
    path = out / "runs" / run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_printed_table_matches_results_and_metrics_files(demo_run):
    demo, cfg, out, rows, stdout = demo_run
    table = _printed_table(stdout)
    assert [r[0] for r in table] == ["theta0 (before fine-tuning)", "plain fine-tuning", "CRaFT",
                                     "CRaFT, lambda only (no projection)"]
    saved = json.loads((out / "results.json").read_text())
    keys = [k for k, _, _ in demo.COLUMNS]
    for printed, row in zip(table, saved, strict=True):
        for key, cell, (_, _, spec) in zip(keys, printed, demo.COLUMNS, strict=True):
            value = row[key]
            if spec == "s":
                assert cell == str(value)
            elif isinstance(value, float) and math.isnan(value):
                assert cell == "-"
            else:
                assert float(cell) == pytest.approx(value, abs=0.6 * 10 ** -int(spec[1]))
    craft_metrics = _metrics(out, "demo-craft")
    assert len(craft_metrics) == cfg.finetune_steps
    lambdas = [m["CRaFT/Lambda"] for m in craft_metrics]
    conflicts = [m["CRaFT/Conflict Ratio"] for m in craft_metrics]
    craft_row = saved[2]
    assert craft_row["final_lambda"] == pytest.approx(lambdas[-1])
    assert craft_row["mean_conflict_ratio"] == pytest.approx(float(np.mean(conflicts)))
    # plain fine-tuning logs no CRaFT numbers at all (it is the unmodified VLA-Adapter step)
    assert not any(k.startswith("CRaFT/") for m in _metrics(out, "demo-plain") for k in m)
    # the λ trajectory follows the dual rule from the logged (all-reduced) retention loss, in both CRaFT runs
    eps, eta = cfg.craft_retention_budget, cfg.craft_dual_lr
    for run, row in (("demo-craft", saved[2]), ("demo-craft_lambda_only", saved[3])):
        records = _metrics(out, run)
        lam = 0.0
        for record in records:
            assert record["CRaFT/Lambda"] == pytest.approx(lam, abs=1e-6)
            lam = max(0.0, lam + eta * (record["CRaFT/Retention Loss"] - eps))
        assert row["max_lambda"] == pytest.approx(max(r["CRaFT/Lambda"] for r in records))
    assert not any(r["CRaFT/Projection Fired"] for r in _metrics(out, "demo-craft_lambda_only"))
    for name in ("results.md", "results.csv", "results.tex"):
        assert (out / name).stat().st_size > 0
    pngs = list((out / "log_parser").rglob("*.png"))
    assert pngs and all(p.stat().st_size > 5_000 for p in pngs)
    assert "\\toprule" in (out / "results.tex").read_text()


def _raw_episodes(data_root: Path, name: str) -> list[dict]:
    episodes = []
    for shard in sorted((data_root / name / "1.0.0").glob("*.tfrecord-*")):
        for _, payload in iter_records(shard):
            features = parse_example_reference(bytes(payload))
            episodes.append(features)
    return episodes


def test_heldout_l1_equals_per_frame_predict_action(demo_run):
    """Second code path: raw episodes -> per-frame `predict_action` (un-normalised) vs LIBERO-transformed actions."""
    demo, cfg, out, rows, _ = demo_run
    policy = load_policy(out / "runs" / f"demo-craft--{cfg.finetune_steps}_chkpt").eval()
    errors = []
    for ep in _raw_episodes(out / "data", demo.TARGET_HELDOUT):
        actions = np.asarray(ep["steps/action"], dtype=np.float64).reshape(-1, 7)
        states = np.asarray(ep["steps/observation/state"], dtype=np.float64).reshape(-1, 8)
        instruction = ep["steps/language_instruction"][0].decode()
        images = ep["steps/observation/image"]
        wrists = ep["steps/observation/wrist_image"]
        gripper = 1.0 - np.clip(actions[:, 6], 0.0, 1.0)
        actions = np.concatenate([actions[:, :6], gripper[:, None]], axis=1)
        length = len(actions)
        for t in range(length - 7):
            views = [simplejpeg.decode_jpeg(images[t], fastdct=True, fastupsample=False)]
            if cfg.num_images_in_input == 2:
                views.append(simplejpeg.decode_jpeg(wrists[t], fastdct=True, fastupsample=False))
            pred = policy.predict_action(views, instruction, proprio=states[t], unnorm_key=demo.TARGET_SET,
                                         center_crop=False)
            target = actions[np.minimum(np.arange(t, t + 8), length - 1)]
            errors.append(np.abs(pred - target).mean())
            if len(errors) == cfg.eval_frames:
                break
        if len(errors) == cfg.eval_frames:
            break
    assert rows[2]["heldout_l1_target"] == pytest.approx(float(np.mean(errors)), rel=1e-4, abs=1e-5)


def test_final_retention_equals_drift_metrics(demo_run):
    """Second code path for L_ret: all-layer pooled features from `drift_metrics`, concat of layers m and M."""
    demo, cfg, out, rows, _ = demo_run
    from prismatic.data.loader import make_eval_loader
    from prismatic.data.rlds_dataset import RLDSFrameDataset

    theta0 = load_policy(out / "runs" / f"demo-theta0--{cfg.pretrain_steps}_chkpt").eval()
    craft = load_policy(out / "runs" / f"demo-craft--{cfg.finetune_steps}_chkpt").eval()
    num_layers = craft.vla.config.num_llm_layers
    m, big_m = num_layers // 2, num_layers
    dataset = RLDSFrameDataset(out / "data", demo.TARGET_SET, craft.processor.tokenizer,
                               num_images_in_input=cfg.num_images_in_input, use_proprio=True, image_aug=False,
                               seed=cfg.seed)
    per_sample = []
    with torch.no_grad():
        for batch in make_eval_loader(dataset, batch_size=3, max_frames=cfg.eval_frames):
            ref = pooled_layer_features(theta0(batch).vla_output)
            cur = pooled_layer_features(craft(batch).vla_output)
            f_ref = torch.cat([ref["raw"][:, m], ref["aq"][:, big_m]], dim=1).double()
            f_cur = torch.cat([cur["raw"][:, m], cur["aq"][:, big_m]], dim=1).double()
            per_sample.append((f_cur - f_ref).pow(2).sum(dim=1))
    expected = float(torch.cat(per_sample).mean())
    assert rows[2]["final_l_ret"] == pytest.approx(expected, rel=1e-4, abs=1e-7)
    assert rows[0]["final_l_ret"] == 0.0
    assert rows[2]["within_budget"] == ("yes" if expected <= 1.1 * cfg.craft_retention_budget else "no")


def test_rerun_reuses_everything(demo_run, capsys):
    demo, cfg, out, rows, _ = demo_run
    mtimes = {p: p.stat().st_mtime for p in (out / "runs").rglob("COMPLETE")}
    again = demo.main(demo.DemoConfig(output_dir=out, quick=True, libero_rollout="never", threads=1))
    assert {p: p.stat().st_mtime for p in (out / "runs").rglob("COMPLETE")} == mtimes
    printed = capsys.readouterr().out
    assert len(re.findall(r"\[demo\] reusing", printed)) == 4
    for a, b in zip(rows, again, strict=True):
        assert a["heldout_l1_target"] == pytest.approx(b["heldout_l1_target"], abs=1e-7)
