"""Episode state machine, worker protocol, result files and input validation (fast; fake env, no rendering)."""

from __future__ import annotations

import json
import sys

import draccus
import numpy as np
import pytest
from libero_fakes import FakeEnv, ScriptedPolicy, needs_libero

from LIBERO.action_processing import SETTLE_ACTION
from LIBERO.env_pool import EnvPool
from LIBERO.libero_env import EpisodeRunner, EpisodeSpec, SimSettings
from LIBERO.policy_runner import checkpoint_statistics, resolve_input_settings, resolve_unnorm_key
from LIBERO.results import ResultsStore
from LIBERO.suites import TaskSpec, base_suite, max_steps_for, pick_instruction, read_bddl_language


def _task(task_id=0, suite="libero_spatial", n_init=3) -> TaskSpec:
    return TaskSpec(suite=suite, task_id=task_id, name=f"task_{task_id}", task_language=f"do task {task_id}",
                    bddl_language=f"Do the task {task_id}", instruction=f"do task {task_id}", bddl_file="x.bddl",
                    init_states_file="x.npz", num_init_states=n_init)


def _runner(env: FakeEnv, init_x=(0.0, 0.5, 0.9), **settings) -> EpisodeRunner:
    return EpisodeRunner(SimSettings(**settings), env_factory=lambda task, s: env,
                         init_states_loader=lambda task: np.array([[x] for x in init_x]))


def test_episode_settles_then_executes_chunks_open_loop():
    env = FakeEnv()
    runner = _runner(env, num_images=2)
    kind, req = runner.start(EpisodeSpec(_task(), trial=1, max_steps=20))
    assert kind == "obs" and env.resets == 2  # trial 1 = the 2nd reset of the env (the 1st one replayed)
    # 10 settle steps with the no-op action before the first request
    assert len(env.actions) == 10 and all(np.array_equal(a, SETTLE_ACTION) for a in env.actions)
    assert req["instruction"] == "do task 0" and req["steps"] == 0
    np.testing.assert_allclose(req["proprio"][:3], [0.5, 0, 0])  # trial 1 -> init state 1
    assert len(req["images"]) == 2 and req["images"][0].shape == (224, 224, 3)
    brightness = req["images"][0].astype(int).sum(-1)
    row, col = np.unravel_index(brightness.argmax(), brightness.shape)
    assert row > 200 and col > 200  # the fake's top-left marker ended bottom-right: rotated by 180 degrees

    chunk = np.zeros((8, 7))
    chunk[:, 0] = np.arange(1, 9) * 1e-3
    kind, req = runner.act(chunk)
    assert kind == "obs" and req["steps"] == 8
    np.testing.assert_array_equal(np.array(env.actions[10:]), chunk)  # all 8, in order, before the next query
    kind, rec = runner.act(chunk)
    kind, rec = runner.act(chunk)  # 24 > 20: stops at the budget
    assert kind == "done" and rec["steps"] == 20 and rec["success"] is False and len(env.actions) == 30
    assert rec["trial"] == 1 and rec["task_id"] == 0


def test_episode_stops_on_env_success_mid_chunk():
    env = FakeEnv(goal_x=0.5 + 3 * 0.1 - 1e-9)
    runner = _runner(env)
    runner.start(EpisodeSpec(_task(), trial=1, max_steps=100))
    chunk = np.zeros((8, 7))
    chunk[:, 0] = 0.1
    kind, rec = runner.act(chunk)
    assert kind == "done" and rec["success"] is True and rec["steps"] == 3  # the env said done after step 3
    assert rec["success"] == env.check_success()


def test_episode_bad_trial_is_a_failure_record_and_env_reuse():
    envs = []
    runner = EpisodeRunner(SimSettings(), env_factory=lambda task, s: envs.append(FakeEnv()) or envs[-1],
                           init_states_loader=lambda task: np.zeros((3, 1)))
    kind, rec = runner.start(EpisodeSpec(_task(), trial=5, max_steps=4))
    assert kind == "done" and rec["success"] is False and rec["trial"] == 5
    assert "ValueError: trial 5 of libero_spatial task 0 has no init state (the task has 3)" in rec["error"]
    runner.start(EpisodeSpec(_task(), trial=0, max_steps=4))
    runner.act(np.zeros((8, 7)))
    runner.start(EpisodeSpec(_task(), trial=1, max_steps=4))
    assert len(envs) == 2 and envs[1].resets == 2  # a fresh env after the failure, then kept for trial 1


def test_pool_inline_protocol_and_error_reporting():
    env = FakeEnv()
    pool = EnvPool(0, SimSettings(), runner_factory=lambda s: _runner(env))
    (worker,) = pool.workers
    worker.send("start", EpisodeSpec(_task(), trial=0, max_steps=8))
    ((w, (kind, _)),) = pool.wait([worker])
    assert w is worker and kind == "obs"
    worker.send("act", np.zeros((8, 6)))  # wrong width: the fake env accepts it, the record is finished
    pool.wait([worker])
    worker.send("bogus", None)
    with pytest.raises(RuntimeError, match="unknown worker message 'bogus'"):
        pool.wait([worker])
    pool.close()
    assert env.closed


def _record(task_id, trial, success):
    return {"suite": "libero_spatial", "task_id": task_id, "task_name": f"t{task_id}", "instruction": f"i{task_id}",
            "trial": trial, "success": success, "steps": 5, "seconds": 1.0}


def test_results_store_summary_resume_and_torn_line(tmp_path):
    store = ResultsStore(tmp_path, {"seed": 7})
    outcomes = {(0, 0): True, (0, 1): False, (1, 0): True, (1, 1): True, (1, 2): False}
    for (t, k), s in outcomes.items():
        store.add(_record(t, k, s))
    with open(tmp_path / "episodes.jsonl", "a") as f:
        f.write('{"suite": "libero_spatial", "task_id": 2')  # interrupted mid-write
    again = ResultsStore(tmp_path, {"seed": 7})
    assert set(again.records) == {("libero_spatial", t, k) for t, k in outcomes}
    assert (tmp_path / "episodes.jsonl").read_text().endswith("}\n")  # torn tail removed
    summary = again.summary("libero_spatial")
    assert summary["num_episodes"] == len(outcomes) and summary["num_successes"] == sum(outcomes.values())
    assert summary["success_rate"] == pytest.approx(sum(outcomes.values()) / len(outcomes))
    assert summary["per_task"]["t1"] == {"task_id": 1, "episodes": 3, "successes": 2, "success_rate": 2 / 3,
                                         "instruction": "i1"}
    sub = again.summary("libero_spatial", selected=[(0, 0), (0, 1)])
    assert sub["num_episodes"] == 2 and list(sub["per_task"]) == ["t0"]
    with pytest.raises(ValueError, match=r"different settings .*'seed': \(7, 8\)"):
        ResultsStore(tmp_path, {"seed": 8})


def test_results_store_rejects_corrupt_middle_line(tmp_path):
    (tmp_path / "episodes.jsonl").write_text(json.dumps(_record(0, 0, True)) + "\nnot json\n")
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        ResultsStore(tmp_path, {})


def test_unnorm_key_and_input_settings():
    keys = ["libero_spatial_no_noops", "libero_goal_no_noops"]
    assert resolve_unnorm_key(keys, None, "libero_spatial_lan") == "libero_spatial_no_noops"
    assert resolve_unnorm_key(keys, "libero_goal", "libero_spatial") == "libero_goal_no_noops"
    assert resolve_unnorm_key(["my_data"], None, "libero_10") == "my_data"
    with pytest.raises(ValueError, match=r"no action statistics for unnorm_key 'libero_10'.*libero_goal_no_noops"):
        resolve_unnorm_key(keys, None, "libero_10")

    class P:
        class policy_config:  # noqa: N801
            num_images_in_input, use_proprio = 2, True
    assert resolve_input_settings(P, None, None) == (2, True)
    with pytest.raises(ValueError, match="num_images_in_input=1 contradicts the checkpoint"):
        resolve_input_settings(P, 1, None)


def test_checkpoint_without_statistics_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "openvla", "norm_stats": None}))
    with pytest.raises(ValueError, match="no action statistics: neither dataset_statistics.json"):
        checkpoint_statistics(tmp_path)
    (tmp_path / "dataset_statistics.json").write_text(json.dumps({"d": {"action": {"q01": [0], "q99": [1]}}}))
    assert list(checkpoint_statistics(tmp_path)) == ["d"]
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        checkpoint_statistics(tmp_path / "nope")


def test_suite_helpers(tmp_path):
    assert base_suite("libero_10_lan") == "libero_10" and base_suite("libero_100") is None
    assert [max_steps_for(s) for s in ("libero_spatial", "libero_object_swap", "libero_goal", "libero_10_task")] \
        == [220, 280, 300, 520]
    assert pick_instruction("libero_goal_lan", "a", "b") == "b"
    assert pick_instruction("libero_goal_task", "a", "b") == "b"
    assert pick_instruction("libero_goal_swap", "a", "b") == "a"
    assert pick_instruction("libero_goal", "a", "b", source="bddl") == "b"
    bddl = tmp_path / "t.bddl"
    bddl.write_text("(define (problem P)\n  (:domain robosuite)\n  (:language  take the  bowl)\n  (:regions))")
    assert read_bddl_language(bddl) == "take the bowl"


def test_missing_extra_says_how_to_install(monkeypatch):
    from LIBERO import suites

    monkeypatch.setenv("LIBERO_CONFIG_PATH", "/nonexistent-for-test")
    for name in [m for m in sys.modules if m == "libero" or m.startswith("libero.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "libero", None)  # import libero -> ImportError
    with pytest.raises(ImportError, match=r"pip install -e \.\[libero\]"):
        suites.require_libero()


def test_cli_parses_the_documented_options():
    from LIBERO.run_libero_eval import EvalConfig

    cfg = draccus.parse(EvalConfig, args=[
        "--pretrained_checkpoint", "ckpt", "--task_suite_name", "libero_10", "--task_ids", "[1, 3]",
        "--num_trials_per_task", "5", "--seed", "3", "--num_images_in_input", "1", "--use_proprio", "false",
        "--center_crop", "false", "--max_steps_override", "40", "--save_videos", "true", "--local_log_dir", "out",
        "--num_envs", "4", "--use_wandb", "false", "--wandb_project", "p", "--unnorm_key", "libero_10_no_noops"])
    assert (cfg.task_ids, cfg.num_trials_per_task, cfg.seed, cfg.num_images_in_input, cfg.use_proprio,
            cfg.center_crop, cfg.max_steps_override, cfg.save_videos, cfg.num_envs) == \
        ([1, 3], 5, 3, 1, False, False, 40, True, 4)


@pytest.mark.libero
@needs_libero
def test_unknown_suite_lists_valid_ones(tmp_path):
    from LIBERO.run_libero_eval import EvalConfig, run_evaluation

    cfg = EvalConfig(task_suite_name="libero_spacial", local_log_dir=str(tmp_path / "out"))
    from prismatic.cli_errors import UserError

    with pytest.raises(UserError, match=r"unknown or incomplete LIBERO suite 'libero_spacial'.*libero_spatial,"):
        run_evaluation(cfg, policy=ScriptedPolicy(np.zeros((8, 7))))
    assert not (tmp_path / "out").exists()  # nothing written


@pytest.mark.libero
@needs_libero
def test_run_evaluation_resumes_and_skips_finished_episodes(tmp_path):
    """Real suite/task metadata, fake simulator: the driver, the results files and resume."""
    from LIBERO.run_libero_eval import EvalConfig, run_evaluation

    envs = []

    def factory(settings):
        env = FakeEnv(goal_x=0.045)
        envs.append(env)
        return _runner(env, init_x=[0.0] * 50, **{k: getattr(settings, k) for k in ("num_images",)})

    chunk = np.zeros((8, 7))
    chunk[:, 0] = 0.01  # success after 5 steps
    chunk[:, 6] = 1.0
    cfg = EvalConfig(task_suite_name="libero_object", task_ids=[2, 4], num_trials_per_task=2, num_envs=0,
                     local_log_dir=str(tmp_path), progress=False)
    policy = ScriptedPolicy(chunk, "libero_object_no_noops")
    summary = run_evaluation(cfg, policy=policy, runner_factory=factory)
    lines = [json.loads(x) for x in (tmp_path / "episodes.jsonl").read_text().splitlines()]
    assert [(r["task_id"], r["trial"]) for r in lines] == [(2, 0), (2, 1), (4, 0), (4, 1)]
    assert all(r["success"] and r["steps"] == 5 for r in lines)
    assert summary["num_episodes"] == 4 and summary["success_rate"] == 1.0 and len(policy.instructions) == 4
    assert json.loads((tmp_path / "summary.json").read_text())["num_successes"] == 4
    # gripper 1.0 (open in model space) reached the env as -1
    assert all(a[6] == -1.0 for a in envs[0].actions)

    cfg.num_trials_per_task = 3  # resume: only the 2 new trials run
    summary = run_evaluation(cfg, policy=policy, runner_factory=factory)
    assert summary["num_episodes"] == 6 and len(policy.instructions) == 6
    assert len((tmp_path / "episodes.jsonl").read_text().splitlines()) == 6


@pytest.mark.libero
@needs_libero
def test_wandb_receives_the_summary(tmp_path, monkeypatch):
    """--use_wandb: per-episode running rate and final per-task rates go to the run (wandb stubbed offline)."""
    import types

    from LIBERO.run_libero_eval import EvalConfig, run_evaluation

    logged, inits = [], []

    class Run:
        summary: dict = {}

        def log(self, data):
            logged.append(dict(data))

        def finish(self):
            logged.append("finished")

    def init(**kwargs):
        inits.append(kwargs)
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    outcomes = iter([0.02, 0.0])  # first episode succeeds (x reaches 0.045), second does not move

    def factory(settings):
        return _runner(FakeEnv(goal_x=0.045), init_x=[0.0] * 50)

    class AlternatingPolicy(ScriptedPolicy):
        def predict_action(self, *args, **kwargs):
            out = super().predict_action(*args, **kwargs)
            out[:, 0] = self.speed
            return out

    policy = AlternatingPolicy(np.zeros((8, 7)), "libero_goal_no_noops")
    policy.speed = next(outcomes)
    cfg = EvalConfig(task_suite_name="libero_goal", task_ids=[3], num_trials_per_task=1, num_envs=0,
                     max_steps_override=16, local_log_dir=str(tmp_path / "a"), progress=False, use_wandb=True,
                     wandb_project="proj")
    s1 = run_evaluation(cfg, policy=policy, runner_factory=factory)
    policy.speed = next(outcomes)
    cfg.local_log_dir, cfg.task_ids = str(tmp_path / "b"), [3, 5]
    s2 = run_evaluation(cfg, policy=policy, runner_factory=factory)
    assert inits[0]["project"] == "proj" and inits[0]["config"]["task_suite_name"] == "libero_goal"
    finals = [e for e in logged if e != "finished" and "success_rate/total" in e]
    assert [f["success_rate/total"] for f in finals] == [s1["success_rate"], s2["success_rate"]] == [1.0, 0.0]
    assert set(finals[1]) >= {f"success_rate/{name}" for name in s2["per_task"]}
    assert logged.count("finished") == 2
    assert inits[0]["job_type"] == "eval" and inits[0]["tags"] == ["eval", "libero_goal"]
    assert inits[0]["group"] == "policy"  # no checkpoint folder: the fallback group name
    assert [f["Eval/Success Rate/libero_goal"] for f in finals] == [1.0, 0.0]


# -- reproducible trials: trial k = the (k+1)-th reset of a fresh env seeded env_seed ---------------------------------
def _fixture_after(resets: int, seed: int = 0) -> float:
    """Independent reference: a fresh fake env seeded `seed`, reset `resets` times."""
    env = FakeEnv(seed=seed)
    for _ in range(resets):
        env.reset()
    return env.fixture


def _seeded_runner(envs: list, n_init: int = 4, **kwargs) -> EpisodeRunner:
    def factory(task, settings):
        envs.append(FakeEnv(seed=settings.env_seed, **kwargs))
        return envs[-1]
    return EpisodeRunner(SimSettings(num_settle_steps=0), env_factory=factory,
                         init_states_loader=lambda task: np.zeros((n_init, 1)))


def _run_episode(runner, spec):
    kind, out = runner.start(spec)
    while kind == "obs":
        kind, out = runner.act(np.zeros((8, 7)))
    return out


def test_any_trial_order_reproduces_the_upstream_reset_sequence():
    reference = [_fixture_after(k + 1) for k in range(4)]
    assert len(set(reference)) == 4  # the fixture really moves between reset counts
    envs = []
    runner = _seeded_runner(envs)
    task = _task(n_init=4)
    for trial in (2, 3, 1, 0, 3):  # resume-like skip, then going back: a fresh env each time it must
        np.random.seed(123 + trial)  # the process's own RNG use does not shift the env's stream
        record = _run_episode(runner, EpisodeSpec(task, trial=trial, max_steps=2))
        assert envs[-1].fixture == reference[trial] and record["env_resets"] == trial + 1
    # envs: built for trial 2 (replays 2 resets), kept for 3, rebuilt for 1 (replays 1), rebuilt for 0, kept for
    # the second trial 3 (replays the resets of trials 1 and 2)
    assert len(envs) == 3 and runner.replayed_resets == 2 + 1 + 2


def test_workers_take_whole_tasks_in_trial_order(tmp_path):
    """Two workers, three tasks: each task runs on one worker, in trial order, from a fresh env; trial k always
    sees the fixture of the (k+1)-th reset, as one upstream env per task would."""
    from tqdm import tqdm

    from LIBERO.env_pool import InlineWorker
    from LIBERO.run_libero_eval import _drive, _pending_by_task

    class Answer:
        calls = rounds = 0

        def __call__(self, requests):
            return [np.zeros((8, 7)) for _ in requests]

    envs = [[], []]
    pool = EnvPool.__new__(EnvPool)
    pool.workers = [InlineWorker(i, _seeded_runner(envs[i], n_init=3)) for i in range(2)]
    store = ResultsStore(tmp_path, {})
    episodes = [EpisodeSpec(_task(t, n_init=3), trial=k, max_steps=3) for t in range(3) for k in range(3)]
    store.add({**_record(1, 0, False), "env_resets": 1})  # task 1 trial 0 finished in an earlier run
    _drive(pool, _pending_by_task(episodes, store), Answer(), store, tqdm(disable=True), None, "libero_spatial", [])
    assert len(store.records) == 9
    # one fresh env per task (3), spread over both workers; each env seeded 0 went through the reference reset
    # sequence, task 1's included (its finished trial 0 was replayed as a reset)
    all_envs = envs[0] + envs[1]
    reference = [_fixture_after(k + 1) for k in range(3)]
    assert len(all_envs) == 3 and all(len(e) >= 1 for e in envs)
    assert all(env.fixtures == reference for env in all_envs)
    for (_, t, k), record in store.records.items():
        if (t, k) != (1, 0):
            assert record["env_resets"] == k + 1


def test_episode_exception_is_a_failure_and_the_next_trial_is_still_reproducible():
    envs = []
    runner = _seeded_runner(envs, fail_on_step=1)
    task = _task(n_init=3)
    record = _run_episode(runner, EpisodeSpec(task, trial=0, max_steps=5))
    assert record["success"] is False and record["steps"] == 1
    assert "FloatingPointError: MuJoCo-like instability" in record["error"] and "Traceback" in record["error"]
    assert envs[0].closed  # an env that raised is discarded
    runner._env_factory = lambda t, s: envs.append(FakeEnv(seed=s.env_seed)) or envs[-1]
    record = _run_episode(runner, EpisodeSpec(task, trial=1, max_steps=2))
    assert "error" not in record and record["env_resets"] == 2
    assert envs[-1].fixture == _fixture_after(2)  # fresh env, trial 0's reset replayed


def test_policy_exception_aborts_only_that_episode():
    from LIBERO.run_libero_eval import PolicyFailure, _answer

    class Picky:
        def __call__(self, requests):
            if any(r["instruction"] == "bad" for r in requests):
                raise KeyError("no statistics for this one")
            return [np.ones((8, 7)) for _ in requests]

    answers = _answer(Picky(), [{"instruction": "ok"}, {"instruction": "bad"}, {"instruction": "ok"}])
    assert isinstance(answers[1], PolicyFailure) and "KeyError" in answers[1].traceback
    assert [a.shape for i, a in enumerate(answers) if i != 1] == [(8, 7), (8, 7)]
    envs = []
    runner = _seeded_runner(envs)
    runner.start(EpisodeSpec(_task(), trial=0, max_steps=5))
    kind, record = runner.abort(answers[1].traceback)
    assert kind == "done" and record["success"] is False and "KeyError" in record["error"]
    assert not envs[0].closed  # the env itself is fine


@pytest.mark.libero
@needs_libero
def test_run_evaluation_counts_a_raising_episode_as_failure_and_resume_keeps_it(tmp_path):
    """Real suite metadata, fake simulator that raises in trial 1: the evaluation goes on, the record carries the
    traceback, the summary counts it; a resume does not run it again."""
    from LIBERO.run_libero_eval import EvalConfig, run_evaluation

    def factory(settings):
        def env_factory(task, s):
            return FakeEnv(goal_x=0.045, seed=s.env_seed, fail_on_step=2 if task.task_id == 2 else None)
        return EpisodeRunner(settings, env_factory=env_factory, init_states_loader=lambda task: np.zeros((50, 1)))

    chunk = np.zeros((8, 7))
    chunk[:, 0] = 0.01
    cfg = EvalConfig(task_suite_name="libero_object", task_ids=[2, 4], num_trials_per_task=2, num_envs=0,
                     num_settle_steps=0, local_log_dir=str(tmp_path), progress=False)
    policy = ScriptedPolicy(chunk, "libero_object_no_noops")
    summary = run_evaluation(cfg, policy=policy, runner_factory=factory)
    lines = [json.loads(x) for x in (tmp_path / "episodes.jsonl").read_text().splitlines()]
    assert [(r["task_id"], r["trial"], r["success"], "error" in r) for r in lines] == \
        [(2, 0, False, True), (2, 1, False, True), (4, 0, True, False), (4, 1, True, False)]
    assert "FloatingPointError" in lines[0]["error"]
    assert (summary["num_episodes"], summary["num_successes"], summary["num_errors"]) == (4, 2, 2)
    assert summary["complete"] is True and summary["num_planned_episodes"] == 4
    calls = len(policy.instructions)
    again = run_evaluation(cfg, policy=policy, runner_factory=factory)
    assert len(policy.instructions) == calls and again["num_errors"] == 2  # nothing re-run


def test_eval_joins_the_training_runs_wandb_group(tmp_path):
    """A checkpoint written by finetune.py (`runs/<id>--<step>_chkpt` beside `runs/<id>/config.yaml`): the eval's wandb
    group, project and method/suite labels are the training run's, so success rates sit beside its curves."""
    import yaml

    from LIBERO.run_libero_eval import EvalConfig, default_wandb_group, training_run_labels

    runs = tmp_path / "craft_experiments" / "table1"
    (runs / "t1-craft-s7").mkdir(parents=True)
    (runs / "t1-craft-s7--20_chkpt").mkdir()
    (runs / "t1-craft-s7" / "config.yaml").write_text(yaml.safe_dump({
        "run_root_dir": str(runs), "dataset_name": "libero_goal_no_noops", "use_craft": True, "seed": 7,
        "model_preset": "tiny", "wandb_project": "vla-craft-training"}))
    cfg = EvalConfig(pretrained_checkpoint=str(runs / "t1-craft-s7--20_chkpt"), task_suite_name="libero_goal")
    labels = training_run_labels(cfg)
    assert default_wandb_group(cfg) == labels["group"] == "table1/tiny/libero_goal/all/craft"
    assert labels["project"] == "vla-craft-training"
    assert labels["config"] == {"experiment": "table1", "preset": "tiny", "suite": "libero_goal", "shots": "all",
                                "method": "craft", "seed": 7, "train_run_id": "t1-craft-s7"}
    lone = EvalConfig(pretrained_checkpoint=str(tmp_path / "released-policy"), task_suite_name="libero_goal")
    assert training_run_labels(lone) is None and default_wandb_group(lone) == "released-policy"
