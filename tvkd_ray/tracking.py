"""MLflow tracking: the driver opens (or reopens) the run, rank 0 logs to it.

The driver checks the store before any model work, creates the run (tags, description, source)
and logs the flattened params and the resolved config; the run id is written to
``<run_dir>/mlflow_run_id`` and saved in every checkpoint, so a resumed run continues the same
MLflow run. After training the driver closes it (``close_run``): the datasets as run inputs, the
final student as an MLflow model, the shaping picture, the end time. Logging failures warn and
never stop training or fail a trained run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa

from tvkd_ray import figures, schema
from tvkd_ray.config import TVKDConfig
from tvkd_ray.errors import ConfigError

logger = logging.getLogger(__name__)
RUN_ID_FILE = "mlflow_run_id"
# The experiment tag MLflow 3's UI reads to open an experiment in its "Machine learning" (model
# training) mode rather than the GenAI one; the value is the one its own kind selector writes.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
MODEL_NAME = "student"  # the logged model's name (Logged models, Register model)
# Set when a teacher with its own tokenizer has its potentials mapped (SPEC §2.3c).
TOKENIZER_MAPPING_TAG = "tvkd.tokenizer_mapping"
# Rows whose texts the dataset digest covers (MLflow's pandas digest also samples, 10k rows).
DIGEST_ROWS = 10_000


def tracking_uri(config: TVKDConfig) -> str:
    """``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else sqlite in the output root."""
    if config.tracking.uri:
        return config.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{config.run_dir.parent / 'mlflow.db'}"


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"loss": {"alpha": 0.5}}`` -> ``{"loss.alpha": "0.5"}`` (MLflow params are strings)."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat


def check_reachable(uri: str) -> None:
    """Fail fast with one line when an http(s) tracking server does not answer."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        return
    import requests

    try:
        requests.get(f"{uri.rstrip('/')}/health", timeout=5)
    except requests.RequestException as exc:
        reason = type(exc).__name__
        raise ConfigError(
            f"tracking.uri: MLflow server {uri} is unreachable ({reason}); start it, fix the "
            "URI, or set tracking.enabled=false"
        ) from None


def open_run(
    config: TVKDConfig,
    extra_params: dict[str, Any] | None = None,
    extra_tags: dict[str, str] | None = None,
) -> str | None:
    """Create the run, or reopen the one this run directory already has; return its id."""
    if not config.tracking.enabled:
        return None
    import mlflow

    uri = tracking_uri(config)
    config.run_dir.mkdir(parents=True, exist_ok=True)
    id_file = config.run_dir / RUN_ID_FILE
    # A client, not mlflow.set_tracking_uri: that would also export MLFLOW_TRACKING_URI to every
    # later subprocess of a pipeline that embeds fit().
    client = mlflow.MlflowClient(uri)
    if id_file.exists():
        run_id = id_file.read_text().strip()
        try:
            client.get_run(run_id)
            return run_id
        except mlflow.exceptions.MlflowException:
            logger.warning("MLflow run %s of %s is gone; starting a new run", run_id, id_file)
    experiment = client.get_experiment_by_name(config.tracking.experiment)
    if experiment is not None:
        experiment_id = experiment.experiment_id
    else:
        # Local stores keep artifacts beside the database, not in ./mlruns of the current
        # directory (a Ray job's working directory is a temporary copy); servers choose their own.
        local = urllib.parse.urlparse(uri).scheme in ("sqlite", "file", "")
        artifacts = (config.run_dir.parent / "mlartifacts").as_uri() if local else None
        experiment_id = client.create_experiment(
            config.tracking.experiment, artifact_location=artifacts
        )
    if experiment is None or EXPERIMENT_KIND[0] not in experiment.tags:
        client.set_experiment_tag(experiment_id, *EXPERIMENT_KIND)  # a kind chosen in the UI stays
    from mlflow.tracking.context.registry import resolve_tags

    # resolve_tags adds what the UI's Source and User columns show (the entry point, the git
    # commit when there is one), as mlflow.start_run would.
    run = client.create_run(
        experiment_id,
        run_name=config.run.name,
        tags=resolve_tags({**run_tags(config), **(extra_tags or {})}),
    )
    run_id = run.info.run_id
    params = flatten(config.to_dict())
    params.update({k: str(v) for k, v in (extra_params or {}).items()})
    items = list(params.items())
    for start in range(0, len(items), 100):  # MLflow caps a batch at 100 params
        batch = [mlflow.entities.Param(k, v[:6000]) for k, v in items[start : start + 100]]
        client.log_batch(run_id, params=batch)
    client.log_text(run_id, config.to_yaml(), "config.yaml")
    id_file.write_text(run_id)
    return run_id


def run_tags(config: TVKDConfig) -> dict[str, str]:
    """What the run list can filter and sort on, and the description the run page opens with."""
    loss = config.loss
    teacher = config.teacher.model if config.uses_teacher else "none"
    tags = {
        "tvkd.run_dir": str(config.run_dir),
        "tvkd.stage": config.run.stage,
        "tvkd.student": config.student.model,
        "tvkd.teacher": teacher,
    }
    if config.uses_reference:
        tags["tvkd.reference"] = config.reference.model or config.student.model
        tags["tvkd.cache.reference"] = config.reference.cache
    if config.uses_teacher:
        tags["tvkd.objective"] = loss.objective
        tags["tvkd.cache.teacher"] = config.teacher.cache
    if config.uses_teacher and loss.objective == "tvkd":
        tags["tvkd.potential"] = loss.potential
        # With centred potentials α and γ act only through this product (docs/CONFIG.md).
        tags["tvkd.alpha_one_minus_gamma"] = f"{loss.alpha * (1.0 - loss.gamma):.6g}"
    tags["mlflow.note.content"] = describe(config)
    return tags


def describe(config: TVKDConfig) -> str:
    """The run's description (Markdown): what was trained from what, with which objective."""
    loss, train, student = config.loss, config.train, config.student.model
    reference = config.reference.model or student
    if config.run.stage == "sft":
        what = f"**SFT** of `{student}`: behaviour cloning on the chosen responses."
    elif config.uses_teacher and loss.objective == "release":
        what = (
            f"**TVKD, released recipe**: student `{student}` scored on teacher "
            f"`{config.teacher.model}`'s top-{config.teacher.top_k} ids, per token "
            f"log q̂(y_t) − γ·H(q̂(·|s_t+1)) with γ = {loss.gamma}, reference-free (the reference "
            f"`{reference}` only reports rewards/*). Scores cached: teacher "
            f"`{config.teacher.cache}`, reference `{config.reference.cache}`."
        )
    elif config.uses_teacher:
        what = (
            f"**TVKD** distillation of teacher `{config.teacher.model}` into student `{student}`: "
            f"DPO (β = {loss.beta}, reference `{reference}`) plus the teacher-value shaping "
            f"reward α·S (α = {loss.alpha}, γ = {loss.gamma}, "
            f"α(1−γ) = {loss.alpha * (1.0 - loss.gamma):.4g}); potential Φ: "
            f"{_potential_text(config)}. "
            f"Scores cached: teacher `{config.teacher.cache}`, "
            f"reference `{config.reference.cache}`."
        )
    else:
        what = f"**DPO** of `{student}` against reference `{reference}` (β = {loss.beta})."
    steps = f"at most {train.max_steps} steps" if train.max_steps else f"{train.epochs} epoch(s)"
    return (
        f"{what}\n\n{train.num_workers} worker(s), batch {train.batch_size} pairs per worker, "
        f"lr {train.lr}, {steps}. Artifacts: `config.yaml` (the resolved config)"
        + (", `shaping_terms.png` (per-token shaping of eval pairs)" if config.uses_teacher else "")
        + f"; the final student is the logged model `{MODEL_NAME}`."
    )


def _potential_text(config: TVKDConfig) -> str:
    """Which potential, in words: soft_value's kind depends on three more keys."""
    loss = config.loss
    if loss.potential != "soft_value":
        return f"`{loss.potential}`"
    if not loss.potential_normalize:
        return f"`soft_value` of the raw logits (q = {loss.q_scale}, τ = {loss.tau})"
    support = f"top-{config.teacher.top_k} + rest" if loss.sums_top_k else "whole vocabulary"
    return (
        f"bounded `soft_value` of the log-probabilities (q = {loss.q_scale}, τ = {loss.tau}, "
        f"{support})"
    )


class RunLogger:
    """Logs metrics to one MLflow run from the rank-0 worker; failures only warn.

    After ``MAX_FAILURES`` failed calls in a row logging is switched off for the rest of the run,
    so an unreachable server costs a few timeouts (short ones in processes that apply
    ``runtime.MLFLOW_CLIENT_ENV``, as ``fit`` and the trainers do), not a stall at every step.
    """

    MAX_FAILURES = 3

    def __init__(self, uri: str | None, run_id: str | None):
        self.run_id = run_id
        self._client = None
        self._failures = 0
        if uri and run_id:
            try:
                import mlflow

                self._client = mlflow.MlflowClient(uri)
            except Exception as exc:  # tracking must never stop training
                logger.warning("MLflow unavailable, metrics will not be logged: %s", exc)

    def _safely(self, what: str, fn, *args, **kwargs) -> None:
        if self._client is None:
            return
        try:
            fn(*args, **kwargs)
            self._failures = 0
        except Exception as exc:  # tracking must never stop training
            self._failures += 1
            logger.warning("MLflow %s failed (training goes on): %s", what, exc)
            if self._failures >= self.MAX_FAILURES:
                logger.warning(
                    "MLflow failed %d times in a row: logging is off for this run", self._failures
                )
                self._client = None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        import time

        import mlflow

        now = int(time.time() * 1000)
        batch = [mlflow.entities.Metric(k, float(v), now, step) for k, v in metrics.items()]
        self._safely("log_metrics", self._client and self._client.log_batch, self.run_id, batch)

    def set_tag(self, key: str, value: str) -> None:
        self._safely("set_tag", self._client and self._client.set_tag, self.run_id, key, value)

    def log_dict(self, data: dict, name: str) -> None:
        self._safely("log_dict", self._client and self._client.log_dict, self.run_id, data, name)

    def set_status(self, status: str) -> None:
        """RUNNING again after a resume; FINISHED, FAILED or KILLED at the end, with the end
        time (``update_run`` keeps none, and the UI shows no duration without one)."""
        if status == "RUNNING":
            update = self._client and self._client.update_run
        else:
            update = self._client and self._client.set_terminated
        self._safely("update_run", update, self.run_id, status)

    def finish(self) -> None:
        self.set_status("FINISHED")


def close_run(
    config: TVKDConfig,
    uri: str | None,
    run_id: str | None,
    *,
    model_dir: str,
    step: int,
    train: pa.Table,
    eval: pa.Table | None,
    data_report: dict[str, Any],
    decode: Callable[[list[int]], str] | None = None,
) -> None:
    """The driver's last word on a trained run: the train and eval pairs as run inputs, the
    final student as the logged model, the shaping picture of a TVKD run, then FINISHED with
    its end time. Each part only warns when it fails: the run's outputs on disk are complete
    either way."""
    if not (uri and run_id):
        return
    try:
        check_reachable(uri)  # a server gone since training: one refused request, no retries
    except ConfigError as err:
        logger.warning("MLflow run %s not closed (the run's outputs are complete): %s", run_id, err)
        return
    import mlflow

    client = mlflow.MlflowClient(uri)
    source = str(data_report.get("source", "pairs"))
    datasets = {"training": (train, source)}
    if eval is not None:
        held_out = f"{source} (held out: data.eval_fraction)"
        datasets["eval"] = (eval, str(data_report.get("eval_source", held_out)))
    parts = {
        "dataset inputs": lambda: log_datasets(client, run_id, datasets),
        "model": lambda: log_student(client, run_id, model_dir, step),
        "shaping figure": lambda: log_shaping_figure(client, run_id, config, decode),
    }
    for what, log in parts.items():
        try:
            log()
        except Exception as exc:  # tracking must never fail a trained run
            logger.warning("MLflow %s not logged (the run's outputs are complete): %s", what, exc)
    RunLogger(uri, run_id).finish()


def dataset_entity(table: pa.Table, source: str, name: str):
    """An MLflow dataset of preference pairs: a digest of its texts (the first ``DIGEST_ROWS``
    pairs by id, and the count), the source path, the columns and the row count."""
    from mlflow.entities import Dataset

    texts = [c for c in schema.PAIRS.names if c in table.column_names]
    sample = table.select(texts).sort_by(schema.PAIR_ID).slice(0, DIGEST_ROWS).combine_chunks()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, sample.schema) as writer:
        writer.write_table(sample)
    digest = hashlib.sha256(sink.getvalue().to_pybytes() + str(table.num_rows).encode())
    local = Path(source).exists()
    columns = [{"name": f.name, "type": str(f.type)} for f in table.schema]
    return Dataset(
        name=name,
        digest=digest.hexdigest()[:8],
        source_type="local" if local else "code",
        source=json.dumps({"uri": str(Path(source).resolve())} if local else {"name": source}),
        schema=json.dumps({"mlflow_colspec": columns}),
        profile=json.dumps({"num_rows": table.num_rows}),
    )


def log_datasets(client, run_id: str, datasets: dict[str, tuple[pa.Table, str]]) -> None:
    """Each split as a run input with its context (``training``, ``eval``), as the UI shows."""
    from mlflow.entities import DatasetInput, InputTag

    inputs = [
        DatasetInput(
            dataset_entity(table, source, name=f"{context}: {Path(source).name}"),
            tags=[InputTag("mlflow.data.context", context)],
        )
        for context, (table, source) in datasets.items()
    ]
    client.log_inputs(run_id, datasets=inputs)


def log_student(client, run_id: str, model_dir: str, step: int) -> None:
    """The final student as a ``transformers`` MLflow model (task text-generation), logged as
    the run's output at ``step``, so the UI lists it under Logged models and can register it.

    The client API, not ``mlflow.transformers.log_model``: that one logs into the active run's
    (or the default) experiment through the global tracking URI, which ``fit`` leaves alone.
    The model is loaded on the driver's CPU: MLflow 3.17 cannot save from a checkpoint directory
    with transformers 5 (it reads the pipeline class from a field that is now a string).
    """
    import huggingface_hub
    import mlflow
    import torch
    import transformers
    from mlflow.entities import LoggedModelOutput
    from mlflow.models import Model

    experiment_id = client.get_run(run_id).info.experiment_id
    logged = client.create_logged_model(experiment_id, name=MODEL_NAME, source_run_id=run_id)
    try:
        components = {
            "model": transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto"),
            "tokenizer": transformers.AutoTokenizer.from_pretrained(model_dir),
        }
        with tempfile.TemporaryDirectory() as tmp:
            mlflow.transformers.save_model(
                components,
                f"{tmp}/model",
                task="text-generation",
                mlflow_model=Model(
                    artifact_path=logged.artifact_location,
                    run_id=run_id,
                    model_id=logged.model_id,
                    model_uuid=logged.model_id,
                ),
                # Given, so MLflow does not fetch a card from the hub; pinned requirements, so
                # it does not load the model again in a subprocess to infer them.
                # (with a metadata block: a card without one makes huggingface_hub warn)
                model_card=huggingface_hub.ModelCard(
                    f"---\nlibrary_name: transformers\n---\nTVKD student, MLflow run {run_id}."
                ),
                pip_requirements=[
                    f"transformers=={transformers.__version__}",
                    f"torch=={torch.__version__.split('+')[0]}",
                ],
            )
            client.log_model_artifacts(logged.model_id, f"{tmp}/model")
    except BaseException:
        client.finalize_logged_model(logged.model_id, "FAILED")
        raise
    client.finalize_logged_model(logged.model_id, "READY")
    client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step)])


def log_shaping_figure(client, run_id: str, config: TVKDConfig, decode) -> None:
    """``shaping_terms.png`` of the eval pairs the trainers kept (a TVKD run with an eval set)."""
    table = figures.read_pairs(config.run_dir)
    if not config.uses_teacher or table is None:
        return
    loss = config.loss
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "shaping_terms.png"
        figures.plot_shaping(
            table,
            path,
            gamma=loss.gamma,
            alpha=loss.alpha,
            center=loss.center_potentials,
            decode=decode,
        )
        client.log_artifact(run_id, str(path))


def mlflow_ui_command(uri: str) -> str:
    """The exact command that shows this store in the MLflow UI, bound to 127.0.0.1."""
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"
