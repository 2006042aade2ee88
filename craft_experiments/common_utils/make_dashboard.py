"""Build the CRaFT wandb dashboard (a saved workspace view) with the `wandb-workspaces` package.

    python craft_experiments/common_utils/make_dashboard.py --wandb_project vla-craft-training [--wandb_entity E] \
        [--name "CRaFT experiments"] [--output_json results/wandb_dashboard.json]

Always writes the workspace spec to JSON (the exact view wandb would store); then, when wandb is online and logged in
(no WANDB_MODE=offline, an API key configured), saves it to the project and prints its URL. Offline it stops after the
JSON: run it again on a machine with network after `wandb sync` (docs/EXPERIMENTS_AND_TRAINING.md).

Panels (every key is one that finetune.py / run_libero_eval.py log; tests/experiments/test_dashboard.py checks this):
L_ret with the ε line, λ, conflict ratio and gradient cosine, action losses, learning rate, LIBERO success rate per
suite; one saved view per experiment (table1, fewshot, ablations: its runs only), runs grouped by the tables' groups
(config entries `experiment`, `preset`, `suite`, `shots`, `method` written by finetune.py), mean ± std bands.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # `python craft_experiments/common_utils/make_dashboard.py` from anywhere
    sys.path.insert(0, str(REPO_ROOT))

from LIBERO.results import success_rate_key  # noqa: E402  (light: no simulator import)

# (section, [(panel title, y keys, y axis title)]) -- line plots against the optimizer step
SECTIONS: list[tuple[str, list[tuple[str, list[str], str]]]] = [
    ("Retention (drift from θ0)", [
        ("L_ret vs ε (every method: retention monitor)",
         ["CRaFT/Retention Loss", "CRaFT/Retention Loss (monitor)", "CRaFT/Retention Budget"], "L_ret"),
        ("Dual variable λ", ["CRaFT/Lambda"], "λ"),
    ]),
    ("Gradient conflict", [
        ("Conflict ratio (share of parameters)", ["CRaFT/Conflict Ratio"], "conflict ratio"),
        ("Cosine(g_act, g_ret)", ["CRaFT/Grad Cosine"], "cosine"),
    ]),
    ("Action losses and optimisation", [
        ("Action L1 losses", ["VLA Train/Loss", "VLA Train/Curr Action L1 Loss", "VLA Train/Next Actions L1 Loss"],
         "L1"),
        ("Learning rate", ["VLA Train/Learning Rate"], "lr"),
    ]),
]
# success rate of the LIBERO evaluation runs per suite (the keys LIBERO/run_libero_eval.py logs), grouped by method
SUCCESS_KEYS = [success_rate_key(suite) for suite in ("libero_spatial", "libero_object", "libero_goal", "libero_10")]
# the tables' groups (experiment, preset, suite, shots, method): Table-1, k-shot and ablation runs never share a band
GROUP_BY = ["experiment", "preset", "suite", "shots", "method"]
EXPERIMENTS = ("table1", "fewshot", "ablations")  # the grids' run roots (wandb config `experiment`)


def dashboard_spec(project: str, entity: str | None, name: str) -> dict[str, Any]:
    """The dashboard as plain data (what the JSON holds besides wandb's own view model)."""
    sections = [{"name": section, "panels": [{"type": "line", "title": title, "x": "Step", "y": keys,
                                              "y_title": y_title, "groupby": GROUP_BY, "aggregate": "mean",
                                              "range": "stddev", "smoothing": "exponential 0.6"}
                                             for title, keys, y_title in panels]}
                for section, panels in SECTIONS]
    sections.append({"name": "LIBERO success rate", "panels": [
        {"type": "bar", "title": "Success rate per suite (mean ± std over seeds)", "metrics": SUCCESS_KEYS,
         "groupby": GROUP_BY, "aggregate": "mean", "range": "stddev"}]})
    # one saved view per experiment (its runs only): Table-1, few-shot and ablation groups never share a panel
    views = [{"name": f"{name} — {experiment}", "filter": {"experiment": experiment}} for experiment in EXPERIMENTS]
    return {"project": project, "entity": entity, "name": name, "runs_grouped_by": GROUP_BY, "sections": sections,
            "views": views}


def build_workspace(spec: dict[str, Any], view: dict[str, Any] | None = None):
    """The wandb_workspaces.Workspace of a spec (no network); `view`: one of spec["views"] (name and run filter)."""
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    sections = []
    for section in spec["sections"]:
        panels = []
        for p in section["panels"]:
            if p["type"] == "line":
                panels.append(wr.LinePlot(title=p["title"], x=p["x"], y=list(p["y"]), title_y=p["y_title"],
                                          title_x="optimizer step", groupby_aggfunc="mean",
                                          groupby_rangefunc="stddev", smoothing_type="exponential",
                                          smoothing_factor=0.6, legend_position="east"))
            else:
                panels.append(wr.BarPlot(title=p["title"], metrics=list(p["metrics"]), groupby_aggfunc="mean",
                                         groupby_rangefunc="stddev", orientation="v"))
        sections.append(ws.Section(name=section["name"], panels=panels, is_open=True))
    filters = [ws.Config(key) == value for key, value in (view or {}).get("filter", {}).items()]
    return ws.Workspace(entity=spec["entity"] or "offline", project=spec["project"],
                        name=view["name"] if view else spec["name"], sections=sections,
                        runset_settings=ws.RunsetSettings(filters=filters,
                                                          groupby=[ws.Config(key) for key in spec["runs_grouped_by"]]))


def _online_entity(entity: str | None) -> str | None:
    """The entity to save under when wandb is usable online, else None (offline / not logged in)."""
    if os.environ.get("WANDB_MODE") in ("offline", "disabled"):
        return None
    try:
        import wandb

        api = wandb.Api(timeout=10)
        if not api.api_key:
            return None
        return entity or api.default_entity
    except Exception:  # no network, no login: offline
        return None


def main(argv: list[str] | None = None) -> int:
    from prismatic.cli_errors import OneLineArgumentParser

    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wandb_project", required=True)
    parser.add_argument("--wandb_entity", default=None)
    parser.add_argument("--name", default="CRaFT experiments")
    parser.add_argument("--output_json", type=Path, default=None,
                        help="where the spec goes (default results/wandb_dashboard_<project>.json)")
    args = parser.parse_args(argv)
    try:
        import wandb_workspaces  # noqa: F401
    except ImportError:
        print("error: the wandb-workspaces package is missing — pip install -r requirements.txt", file=sys.stderr)
        return 2
    spec = dashboard_spec(args.wandb_project, args.wandb_entity, args.name)
    views = {view["name"]: json.loads(build_workspace(spec, view)._to_model().model_dump_json())
             for view in spec["views"]}
    out = args.output_json or Path("results") / f"wandb_dashboard_{args.wandb_project}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"spec": spec, "wandb_views": views}, indent=2) + "\n")
    print(f"wrote the dashboard spec to {out}")
    entity = _online_entity(args.wandb_entity)
    if entity is None:
        print("wandb is offline or not logged in: the workspace was not saved. After `wandb sync` of the runs, run "
              "this command again online (`wandb login`) to save it.")
        return 0
    spec["entity"] = entity
    for view in spec["views"]:
        saved = build_workspace(spec, view)
        saved.save()
        print(f"saved the workspace '{view['name']}': {saved.url}")
    return 0


if __name__ == "__main__":
    from prismatic.cli_errors import cli_entry  # one-line errors, exit 2 (`--debug True`: traceback)

    sys.exit(cli_entry("make_dashboard")(main)())
