"""Weights & Biases tracking (``--track``): the run's config, metrics, final model and eval videos.

``wandb`` is imported here, and only when tracking is on. Metric names are those of metrics.jsonl
(CleanRL's), with ``global_step`` as the x-axis of every chart. The W&B run id is kept in the run
folder (``wandb_run.json``), so a resumed run, and ``fastppo eval``, log to the same W&B run.

A W&B failure never stops training: when the service cannot be reached at start, the run goes on
offline with one warning (``wandb sync <run>/wandb/offline-run-*`` uploads it later); a failure to
log later is one warning too, after which tracking is off for the rest of the run.
``WANDB_MODE=offline`` writes the local run directly. W&B waits ``WANDB_INIT_TIMEOUT`` seconds
(30 unless set) for its server at start.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import sys

RUN_FILE = "wandb_run.json"


def warn(message: str) -> None:
    print(f"fastppo: warning: {message}", file=sys.stderr, flush=True)


def wandb_installed() -> bool:
    """Whether wandb can be imported, without importing it."""
    return importlib.util.find_spec("wandb") is not None


def tracked_run(run_dir: str) -> dict | None:
    """The W&B run this run folder logs to ({"id", "project", "entity"}), or None.

    Raises ConfigError (one line) when the folder's wandb_run.json does not read as such a record.
    """
    from fastppo.config import ConfigError

    path = os.path.join(run_dir, RUN_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            known = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path!r} does not read ({type(e).__name__}); fix or remove it (it names the run's "
                          f"W&B run)") from None
    if (not isinstance(known, dict) or not isinstance(known.get("id"), str) or not isinstance(known.get("project"), str)
            or not isinstance(known.get("entity"), (str, type(None)))):
        raise ConfigError(f"{path!r} is not a W&B run record (id, project, entity); fix or remove it")
    return known


def _write_run_file(run_dir: str, record: dict) -> None:
    with open(os.path.join(run_dir, RUN_FILE), "w") as f:
        json.dump(record, f)
        f.write("\n")


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


class Tracker:
    """One W&B run. Every method is a no-op after a failure (one warning) or after finish()."""

    def __init__(self, run, run_dir: str = "."):
        self.run = run
        self.run_dir = run_dir  # paths of logged videos are relative to it

    @classmethod
    def start(
        cls, run_dir: str, *, project: str, entity: str | None, group: str | None = None,
        tags: tuple[str, ...] = (), config: dict | None = None, job_type: str = "train",
    ) -> Tracker:
        """Start the run folder's W&B run, or continue it when the folder names one."""
        import wandb

        known = tracked_run(run_dir)
        if known is not None:
            run_id, project, entity = known["id"], known["project"], known["entity"]
        else:
            run_id = secrets.token_hex(4)  # not `random`: the run's RNG streams stay untouched
            try:
                _write_run_file(run_dir, {"id": run_id, "project": project, "entity": entity})
            except OSError as e:
                warn(f"cannot write {os.path.join(run_dir, RUN_FILE)} ({e.strerror}); tracking is off")
                return cls(None)
        kwargs = dict(
            project=project, entity=entity, group=group, tags=list(tags) or None, config=config, id=run_id,
            resume="allow", name=os.path.basename(os.path.normpath(run_dir)), dir=run_dir, job_type=job_type,
        )
        settings = {} if "WANDB_INIT_TIMEOUT" in os.environ else {"init_timeout": 30.0}
        try:
            run = wandb.init(settings=wandb.Settings(**settings), **kwargs)
        except Exception as e:  # no network, no API key, server error: go on offline
            run, why = cls._offline(wandb, run_dir, kwargs)
            where = os.path.join(run_dir, "wandb")
            warn(f"W&B is unreachable ({_first_line(e)}); " + (
                f"logging offline to {where}{why} (upload later with `wandb sync`)" if run is not None
                else f"offline logging failed too ({why}); tracking is off"))
            if run is None:
                return cls(None)
        run.define_metric("global_step")
        run.define_metric("*", step_metric="global_step")
        return cls(run, run_dir)

    @staticmethod
    def _offline(wandb, run_dir: str, kwargs: dict):
        """(offline run, note) after a failed online start; (None, reason) when that fails too."""
        wandb.teardown()  # frees the run id held by the failed attempt
        try:
            return wandb.init(mode="offline", **kwargs), ""
        except Exception as e:  # the id is still held, e.g. by a W&B service shared with a parent process
            first = _first_line(e)
        kwargs = dict(kwargs, id=secrets.token_hex(4))
        try:
            run = wandb.init(mode="offline", **kwargs)
        except Exception as e:
            return None, f"{first}; {_first_line(e)}"
        try:
            _write_run_file(run_dir, {"id": kwargs["id"], "project": kwargs["project"], "entity": kwargs["entity"]})
        except OSError as e:
            first = f"{first}; cannot record the new run id: {e.strerror}"
        return run, f" as a new run {kwargs['id']} ({first})"

    def _call(self, what: str, fn, *args, **kwargs) -> None:
        if self.run is None:
            return
        try:
            fn(*args, **kwargs)
        except Exception as e:
            warn(f"W&B {what} failed ({_first_line(e)}); tracking is off for the rest of this run")
            self.run = None

    def log(self, metrics: dict) -> None:
        """Log one line of metrics; None values (no game ended) are left out, and an "eval/video" path
        (--capture-video) is logged as the video itself."""
        if self.run is None:
            return
        row = {k: v for k, v in metrics.items() if v is not None}

        def log_row():  # in _call: a video W&B cannot read is a warning too, not an error of the run
            if isinstance(row.get("eval/video"), str):
                import wandb

                row["eval/video"] = wandb.Video(os.path.join(self.run_dir, row["eval/video"]), format="mp4")
            self.run.log(row)

        self._call("log", log_row)

    def log_model(self, path: str, global_step: int) -> None:
        """Log a checkpoint file as the run's model artifact."""
        if self.run is None:
            return
        import wandb

        def log_artifact():
            artifact = wandb.Artifact(f"model-{self.run.id}", type="model", metadata={"global_step": global_step})
            artifact.add_file(path, name="model.pt")
            self.run.log_artifact(artifact)

        self._call("model upload", log_artifact)

    def log_video(self, path: str, metrics: dict) -> None:
        """Log an MP4 file (a path relative to the run folder) as eval/video, with the metrics of the same
        evaluation."""
        self.log({**metrics, "eval/video": path})

    def finish(self, exit_code: int = 0) -> None:
        if self.run is not None:
            self._call("finish", self.run.finish, exit_code=exit_code)
        self.run = None
