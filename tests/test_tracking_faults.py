"""A tracking server that is not there, or goes away: a command that tracks stops at start in one line when
the server does not answer; a training run and a pipeline run whose real `mlflow server` is stopped in the
middle for longer than MLflow's retry window go on without waiting for it, and every metric step, param,
tag and artifact reaches the server exactly once — replayed when the server answers again during the run,
or by `python -m training.tracking sync <output>` after it."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import mlflow
import pytest

from pipeline.world.shards import write_world_shards
from support import (
    PIPELINE_RUN,
    ROOT,
    checkpoint_step,
    free_port,
    start_mlflow_server,
    stop_mlflow_server,
    subprocess_env,
)

# MLflow's retry window shortened (one retry, 1 s backoff: about 2 s), and the journal's probe every second.
SHORT_RETRIES = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
    "PIXELMILL_TRACKING_RETRY_S": "1",
}
OUTAGE_S = 6  # three retry windows


class RestartableServer:
    """A real `mlflow server` on one folder and port that a test stops and starts again: after a restart it
    is the same server (same store, same URI)."""

    def __init__(self, folder, port: int):
        self.folder, self.port, self.uri, self.process = folder, port, f"http://127.0.0.1:{port}", None

    def start(self) -> None:
        self.process = start_mlflow_server(self.folder, self.port)

    def stop(self) -> None:
        if self.process is not None:
            stop_mlflow_server(self.process)
            self.process = None

    def ensure_running(self) -> None:
        if self.process is None or self.process.poll() is not None:
            self.start()


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory):
    """One server for the module's outage tests (each logs to its own experiment, stops the server in the
    middle and starts it again): one start of `mlflow server` (~10 s) fewer than a server per test."""
    folder = tmp_path_factory.mktemp("server")
    server = RestartableServer(folder, free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _wait(condition, timeout_s: float, what: str, process: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout_s
    while not condition():
        assert process is None or process.poll() is None, f"the command ended before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _train_command(shards, output, *overrides) -> list[str]:
    return [
        sys.executable,
        "-m",
        "training.train",
        f"data.path={shards}",
        f"output={output}",
        "data.batch_size=8",
        "data.num_workers=0",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        f"hydra.run.dir={output}/hydra",
        *overrides,
    ]


def test_an_unreachable_tracking_server_stops_a_command_at_start_in_one_line(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    for command in (
        _train_command(tmp_path / "no-shards-needed", tmp_path / "run"),
        [sys.executable, "-m", "evaluation.run", "clip=/unused", "dataset=/unused", f"hydra.run.dir={tmp_path}/h"],
    ):
        started = time.time()
        done = subprocess.run(command, cwd=tmp_path, env=subprocess_env(uri), capture_output=True, text=True)
        seconds = time.time() - started
        assert done.returncode == 2, done.stderr[-2000:]
        (line,) = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        assert uri in line and "tracking=false" in line and "MLFLOW_TRACKING_URI" in line
        assert seconds < 10, f"{command[2]} took {seconds:.1f} s to say the server is not there"
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["hydra"]  # before any work: Hydra's log alone


def test_training_goes_on_through_a_tracking_outage_and_every_call_arrives_once(tracking_server, tmp_path):
    shards = write_world_shards(tmp_path / "shards", 160, 20, image_size=32)
    server = tracking_server
    server.ensure_running()
    uri = server.uri
    output, steps = tmp_path / "run", 70
    last = output / "checkpoints" / "last.ckpt"
    delay = ["+callbacks.delay._target_=support.StepDelay", "+callbacks.delay.seconds=0.1"]  # 7 s at least
    # … and after step 50 it waits until the server is back: the replay happens during the run, not at its end.
    back = tmp_path / "server_is_back"
    hold = ["+callbacks.hold._target_=support.HoldAtStep", "+callbacks.hold.step=50", f"+callbacks.hold.until={back}"]
    command = _train_command(shards, output, f"trainer.max_steps={steps}", "checkpoint_every=5", *delay, *hold)
    log = open(tmp_path / "train.log", "w")
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env={**subprocess_env(uri), **SHORT_RETRIES, "PYTHONPATH": str(ROOT / "tests")},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        _wait(lambda: checkpoint_step(last) >= 5, 120, "step 5", process)
        server.stop()
        stopped_at, outage = checkpoint_step(last), time.time()
        journal = output / "mlflow_journal"
        _wait(lambda: time.time() - outage > OUTAGE_S and checkpoint_step(last) >= stopped_at + 15, 120,
              "training to go on without the server", process)  # fmt: skip
        assert any(p.stat().st_size for p in journal.glob("*.jsonl"))  # the calls wait in the journal
        server.start()
        back.touch()
        assert process.wait(timeout=300) == 0, (tmp_path / "train.log").read_text()[-3000:]
        text = (tmp_path / "train.log").read_text()
        assert text.count(f"warning: MLflow at {uri} is not answering") == 1  # warned once
        assert "answers again" in text
        client = mlflow.MlflowClient(uri)
        (run,) = client.search_runs([client.get_experiment_by_name("pixelmill-clip").experiment_id])
        logged = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
        assert sorted(logged) == list(range(steps)), "every step exactly once"
        assert run.data.params["data.batch_size"] == "8" and run.data.params["trainer.max_steps"] == str(steps)
        assert run.data.tags["pixelmill.task"] == "clip" and run.data.tags["pixelmill.data_path"] == str(shards)
        assert (
            json.loads(open(client.download_artifacts(run.info.run_id, "config.json", str(tmp_path))).read())[
                "trainer"
            ]["max_steps"]
            == steps
        )
        assert run.info.status == "FINISHED"
        assert not list(journal.glob("*.jsonl"))  # all sent: the journal is gone
    finally:
        if process.poll() is None:
            process.kill()


def test_a_pipeline_run_ends_while_the_server_is_down_and_sync_sends_the_rest(
    world_lists, tiny_clip, tracking_server, tmp_path, monkeypatch, capsys
):
    from training.tracking.__main__ import main as tracking_command

    urls, _ = world_lists
    server = tracking_server
    server.ensure_running()
    uri = server.uri
    output = tmp_path / "out"
    command = [sys.executable, "-m", "pipeline.run", f"input={urls}", f"output={output}", f"clip={tiny_clip}"]
    command += [*PIPELINE_RUN, "crawl.ray.num_cpus=2", f"hydra.run.dir={tmp_path}/hydra"]
    env = {**subprocess_env(uri), **SHORT_RETRIES}
    client = mlflow.MlflowClient(uri)

    def run_started() -> bool:  # the pipeline's run has its params: it is mid-way
        experiment = client.get_experiment_by_name("pixelmill")
        runs = client.search_runs([experiment.experiment_id]) if experiment else []
        return bool(runs and runs[0].data.params)

    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    process = subprocess.Popen(command, cwd=tmp_path, env=env, **pipes)
    try:
        _wait(run_started, 240, "the pipeline's MLflow run", process)
        server.stop()
        out, err = process.communicate(timeout=240)  # ends with the server still down
        assert process.returncode == 0, err[-3000:]
        hint = f"python -m training.tracking sync {output}"
        assert hint in err and err.count("warning: MLflow at") == 1
        assert list((output / "mlflow_journal").glob("*.jsonl"))

        server.start()
        synced = subprocess.run(
            [sys.executable, "-m", "training.tracking", "sync", str(output)],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert synced.returncode == 0, synced.stderr[-2000:]
        assert "sent" in synced.stdout
        for name, value in env.items():  # the same command again, in this process (one launch fewer)
            if name.startswith(("MLFLOW_", "PIXELMILL_")):
                monkeypatch.setenv(name, value)
        capsys.readouterr()
        assert tracking_command(["sync", str(output)]) == 0
        assert "sent 0 call(s)" in capsys.readouterr().out  # nothing twice
        (run,) = client.search_runs([client.get_experiment_by_name("pixelmill").experiment_id])
        shard_manifest = json.load(open(next((output / "shards").glob("*/manifest.json"))))
        assert run.data.metrics["shard.samples"] == shard_manifest["counts"]["samples"]
        assert run.data.tags["data.shards_hash"] == shard_manifest["content_hash"]
        assert run.data.params["crawl.image_size"] == "64"
        for key in ("shard.samples", "crawl.images", "filter.kept"):
            assert len(client.get_metric_history(run.info.run_id, key)) == 1, key
        funnel = client.get_metric_history(run.info.run_id, next(k for k in run.data.metrics if k.startswith("funnel")))
        assert len(funnel) == 1
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"config.json", "shard", "filter"} <= artifacts
        assert {"filter/funnel.png", "filter/funnel.json"} <= {
            a.path for a in client.list_artifacts(run.info.run_id, "filter")
        }
        table = json.load(open(client.download_artifacts(run.info.run_id, "filter/funnel.json", str(tmp_path))))
        selection = json.load(open(next((output / "selection").glob("*/manifest.json"))))
        assert len(table["data"]) == len(selection["funnel"])
        assert run.info.status == "FINISHED"
        assert not list((output / "mlflow_journal").glob("*.jsonl"))
    finally:
        if process.poll() is None:
            process.kill()


def test_a_call_the_store_refuses_is_set_aside_and_the_rest_arrives(tmp_path, capsys):
    """A changed param (MLflow refuses to overwrite one) is kept in `<id>.rejected.jsonl` with a warning; it
    does not hold back the calls after it, and every call arrives once."""
    from training.tracking.journaled import TrackedRun

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run = TrackedRun.start("refused", str(tmp_path / "out"), "pixelmill-test", {"kind": "test"}, uri=uri)
    run.log_params({"lr": 0.1})
    run.log_params({"lr": 0.2})  # refused
    for step in range(5):
        run.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
    run.log_dict({"a": 1}, "extra/a.json")
    run.close()
    client = mlflow.MlflowClient(uri)
    logged = client.get_run(run.run_id)
    assert logged.data.params == {"lr": "0.1"} and logged.data.tags["kind"] == "test"
    assert [m.step for m in client.get_metric_history(run.run_id, "loss")] == [0, 1, 2, 3, 4]
    assert [a.path for a in client.list_artifacts(run.run_id, "extra")] == ["extra/a.json"]
    assert logged.info.status == "FINISHED"
    (rejected,) = (tmp_path / "out" / "mlflow_journal").glob("*.rejected.jsonl")
    assert json.loads(rejected.read_text())["call"]["params"] == [["lr", "0.2"]]
    assert "warning: MLflow refused batch" in capsys.readouterr().err
