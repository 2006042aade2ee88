"""`make demo` end to end in its reduced-steps mode; every printed number is checked against the run's files and
the held-out L1 / L_ret / probe accuracy against independent computations (per-frame `predict_action` on raw episodes
parsed with the reference protobuf parser; pooled features through `drift_metrics`; a numpy least-squares probe)."""

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


def _printed_tables(stdout: str) -> list[list[list[str]]]:
    """Every markdown table printed (consecutive '|' lines), header and separator rows dropped."""
    tables, current = [], []
    for line in stdout.splitlines() + [""]:
        if line.startswith("|"):
            current.append([cell.strip() for cell in line.strip("|").split("|")])
        elif current:
            tables.append(current[2:])
            current = []
    return tables


def _metrics(out: Path, run: str) -> list[dict]:
    path = out / "runs" / run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _check_cells(table, saved, columns):
    keys = [k for k, _, _ in columns]
    for printed, row in zip(table, saved, strict=True):
        for key, cell, (_, _, spec) in zip(keys, printed, columns, strict=True):
            value = row[key]
            if spec == "s":
                assert cell == str(value)
            elif isinstance(value, float) and math.isnan(value):
                assert cell == "-"
            elif spec.endswith("e"):
                assert float(cell) == pytest.approx(value, rel=0.01)
            else:
                assert float(cell) == pytest.approx(value, abs=0.6 * 10 ** -int(spec[1]))


RUNS = ("theta0", "plain", "craft", "craft_new", "craft_pid", "craft_lambda_only", "craft_capped", "cont_inherited",
        "cont_fresh")


def test_printed_tables_match_results_and_metrics_files(demo_run):
    demo, cfg, out, rows, stdout = demo_run
    outcome, dynamics = _printed_tables(stdout)[-2:]  # the demo's two tables close its output
    assert [r[0] for r in outcome] == [demo.METHOD_TITLES[n] for n in RUNS] == [r[0] for r in dynamics]
    saved = json.loads((out / "results.json").read_text())
    _check_cells(outcome, saved, demo.COLUMNS)
    _check_cells(dynamics, saved, demo.DYNAMICS_COLUMNS)
    by_run = dict(zip(RUNS, saved, strict=True))
    eps = cfg.craft_retention_budget
    craft_metrics = _metrics(out, "demo-craft")
    assert len(craft_metrics) == cfg.finetune_steps
    assert by_run["craft"]["final_lambda"] == pytest.approx(craft_metrics[-1]["CRaFT/Lambda"])
    assert by_run["craft"]["mean_conflict_ratio"] == pytest.approx(
        float(np.mean([m["CRaFT/Conflict Ratio"] for m in craft_metrics])))
    assert by_run["craft"]["mean_conflict_null"] == pytest.approx(
        float(np.mean([m["CRaFT/Conflict Ratio Null"] for m in craft_metrics])))
    # plain fine-tuning is the unmodified VLA-Adapter step: its only CRaFT key is the retention monitor's L_ret
    plain = _metrics(out, "demo-plain")
    # plain logs only the monitor's L_ret (and its budget ε, for the dashboard's ε line)
    assert {k for m in plain for k in m if k.startswith("CRaFT/")} == {"CRaFT/Retention Loss", "CRaFT/Retention Budget"}
    # 'k/n' steps above ε, from the files
    for run in ("plain", "craft", "craft_new", "craft_pid", "cont_inherited", "cont_fresh"):
        values = [m["CRaFT/Retention Loss"] for m in _metrics(out, f"demo-{run}")]
        assert by_run[run]["steps_above_eps"] == f"{sum(v > eps for v in values)}/{len(values)}"
    # the continuations: plain steps after CRaFT's last step, logged from step finetune_steps + 1 on
    for run in ("cont_inherited", "cont_fresh"):
        steps = [m["step"] for m in _metrics(out, f"demo-{run}")]
        assert steps == list(range(cfg.finetune_steps + 1, cfg.finetune_steps + cfg.continuation_steps + 1))
    # λ of every CRaFT run follows its rule from the logged (all-reduced) retention loss
    rules = {"craft": None, "craft_lambda_only": None, "craft_capped": cfg.capped_max_lambda}
    for run, cap in rules.items():
        records, lam = _metrics(out, f"demo-{run}"), 0.0
        for record in records:
            assert record["CRaFT/Lambda"] == pytest.approx(lam, abs=1e-6)
            lam = max(0.0, lam + cfg.craft_dual_lr * (record["CRaFT/Retention Loss"] - eps))
            lam = lam if cap is None else min(lam, cap)
        assert by_run[run]["max_lambda"] == pytest.approx(max(r["CRaFT/Lambda"] for r in records))
    integral, prev, lam = 0.0, None, 0.0
    for record in _metrics(out, "demo-craft_pid"):  # PID on the normalised error, by hand
        assert record["CRaFT/Lambda"] == pytest.approx(lam, rel=1e-9, abs=1e-9)
        e = record["CRaFT/Retention Loss"] / eps - 1.0
        integral = max(0.0, integral + cfg.pid_ki * e)
        lam = max(0.0, cfg.pid_kp * e + integral + cfg.pid_kd * (0.0 if prev is None else max(0.0, e - prev)))
        prev = e
    flags = demo.NEW_RULE_FLAGS  # the new rule: PI on the normalised error, warm-started and capped, by hand
    assert (flags["craft_dual_mode"], flags["craft_dual_normalize"], flags["craft_dual_setpoint"]) == ("pid", True, 1.0)
    cap, integral = flags["craft_max_lambda"], flags["craft_init_lambda"]
    lam = integral
    for record in _metrics(out, "demo-craft_new"):
        assert record["CRaFT/Lambda"] == pytest.approx(lam, rel=1e-9, abs=1e-9)
        e = record["CRaFT/Retention Loss"] / eps - 1.0
        integral = min(cap, max(0.0, integral + flags["craft_dual_lr"] * e))
        lam = min(cap, max(0.0, flags["craft_dual_kp"] * e + integral))
    assert not any(r["CRaFT/Projection Fired"] for r in _metrics(out, "demo-craft_lambda_only"))
    for name in ("results.md", "results.csv", "results.tex"):
        assert (out / name).stat().st_size > 0
    pngs = list((out / "log_parser").rglob("*.png")) + [out / f for f in ("retention.png", "lambda.png",
                                                                          "update_norms.png")]
    assert all(p.stat().st_size > 5_000 for p in pngs)
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


def test_rerun_reuses_everything(demo_run, capsys):
    demo, cfg, out, rows, _ = demo_run
    mtimes = {p: p.stat().st_mtime for p in (out / "runs").rglob("COMPLETE")}
    again = demo.main(demo.DemoConfig(output_dir=out, quick=True, libero_rollout="never", threads=1))
    assert {p: p.stat().st_mtime for p in (out / "runs").rglob("COMPLETE")} == mtimes
    printed = capsys.readouterr().out
    assert len(re.findall(r"\[demo\] reusing", printed)) == 9  # theta0 + 6 fine-tunings + 2 continuations
    for a, b in zip(rows, again, strict=True):
        assert a["heldout_l1_target"] == pytest.approx(b["heldout_l1_target"], abs=1e-7)


def _numpy_probe(train_x, train_y, alpha):
    """Independent ridge probe: least squares on the augmented system [X̃; √alpha I] w = [Y; 0] (np.linalg.lstsq)."""
    mu, sd = train_x.mean(0), np.maximum(train_x.std(0), 1e-6)
    classes = np.unique(train_y)

    def design(x):
        return np.hstack([(x - mu) / sd, np.ones((len(x), 1))])

    a = design(train_x)
    y = (train_y[:, None] == classes[None, :]).astype(np.float64)
    w, *_ = np.linalg.lstsq(np.vstack([a, np.sqrt(alpha) * np.eye(a.shape[1])]),
                            np.vstack([y, np.zeros((a.shape[1], len(classes)))]), rcond=None)
    return lambda x: classes[(design(x) @ w).argmax(1)]


def _labels_from_raw_episodes(data_root: Path, name: str) -> dict[str, np.ndarray]:
    """Task (sorted instruction index) and colour (state[2] * 10) of every frame t < length - 7, from the raw files."""
    instructions, colours = [], []
    for ep in _raw_episodes(data_root, name):
        states = np.asarray(ep["steps/observation/state"], dtype=np.float64).reshape(-1, 8)
        text = [t.decode() for t in ep["steps/language_instruction"]]
        for t in range(len(states) - 7):
            instructions.append(text[t])
            colours.append(int(round(states[t, 2] * 10)))
    order = sorted(set(instructions))
    return {"task": np.asarray([order.index(i) for i in instructions]), "colour": np.asarray(colours)}


def test_probe_accuracy_equals_numpy_least_squares_probe(demo_run):
    """Second code path: features from `drift_metrics` (layers m and M), labels from the raw episodes, the probe by
    np.linalg.lstsq; fitted on theta0's features of A's training frames, applied to each model on A's held-out
    frames."""
    demo, cfg, out, rows, _ = demo_run
    from prismatic.data.loader import make_eval_loader
    from prismatic.data.rlds_dataset import RLDSFrameDataset

    def features(policy, name):
        m, big_m = policy.vla.config.num_llm_layers // 2, policy.vla.config.num_llm_layers
        dataset = RLDSFrameDataset(out / "data", name, policy.processor.tokenizer,
                                   num_images_in_input=cfg.num_images_in_input, use_proprio=True, image_aug=False,
                                   seed=cfg.seed)
        parts = []
        with torch.no_grad():
            for batch in make_eval_loader(dataset, batch_size=5):
                pooled = pooled_layer_features(policy(batch).vla_output)
                parts.append(torch.cat([pooled["raw"][:, m], pooled["aq"][:, big_m]], dim=1).double())
        return torch.cat(parts).numpy()

    runs = out / "runs"
    theta0 = load_policy(runs / f"demo-theta0--{cfg.pretrain_steps}_chkpt").eval()
    train_labels = _labels_from_raw_episodes(out / "data", demo.PRETRAIN_SET)
    test_labels = _labels_from_raw_episodes(out / "data", demo.PRETRAIN_HELDOUT)
    train_x = features(theta0, demo.PRETRAIN_SET)
    assert len(train_x) == len(train_labels["task"])
    probes = {k: _numpy_probe(train_x, train_labels[k], cfg.probe_alpha) for k in ("task", "colour")}
    checked = {"theta0": (theta0, rows[0]),
               "plain": (load_policy(runs / f"demo-plain--{cfg.finetune_steps}_chkpt").eval(), rows[1]),
               "craft": (load_policy(runs / f"demo-craft--{cfg.finetune_steps}_chkpt").eval(), rows[2])}
    n = len(test_labels["task"])
    for name, (policy, row) in checked.items():
        test_x = features(policy, demo.PRETRAIN_HELDOUT)
        for key, column in (("task", "probe_task"), ("colour", "probe_colour")):
            want = float(np.mean(probes[key](test_x) == test_labels[key]))
            assert abs(row[column] - want) <= 1.0 / n + 1e-12, (name, key, row[column], want)  # at most one tie flips
