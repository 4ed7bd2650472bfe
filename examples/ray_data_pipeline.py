"""tvkd_ray.fit inside a larger Ray Data pipeline.

    .venv/bin/python examples/ray_data_pipeline.py [--config FILE] [--address ADDR] [key=value ...]

1. The pipeline starts (or joins) its cluster; fit's CPU requests are shared out so that all of
   its pools fit in that cluster (see ``share_cpus``).
2. Ray Data reads the raw rows and keeps only some tasks (any preprocessing would do).
3. ``tvkd_ray.fit`` trains on that Dataset; Ray is already running, so fit neither starts nor
   stops it.
4. A later Ray Data stage uses the trained model: an actor pool scores held-out pairs and the
   pipeline reports how often the trained student prefers the chosen reply.

With no arguments: a local cluster the size of this machine, the tiny models, the bundled data,
6 steps (about 3.5 minutes on 2 shared CPU cores).

Fitting fit's pools to your cluster: fit holds all of them at once and checks first that they
fit (else one ResourceError naming each pool's share). Either give the CPU keys shares that sum
to what the cluster has, as ``share_cpus`` does (fractions are fine), or start the cluster with
over-committed logical CPUs (``ray.init(num_cpus=8)``, ``ray start --num-cpus 8``), as fit does
with a cluster it starts itself.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import ray
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import tvkd_ray  # noqa: E402
from driver.pools import TOKENIZER_POOL, resource_demand  # noqa: E402
from tvkd_ray import schema  # noqa: E402
from tvkd_ray.config import TVKDConfig, load_config  # noqa: E402
from tvkd_ray.data import collate, tokenize_batch  # noqa: E402
from tvkd_ray.errors import ResourceError, TVKDError  # noqa: E402
from tvkd_ray.forward import ResponseLogps, row_sums  # noqa: E402
from tvkd_ray.models import load_model, load_tokenizer  # noqa: E402

BUNDLED = REPO / "examples" / "data" / "bundled"


class PreferenceScorer:
    """Ray Data callable class: does a model give the chosen reply a higher log-prob?"""

    def __init__(self, model_dir: str, max_length: int, max_prompt_length: int):
        self.tokenizer = load_tokenizer(model_dir)
        self.policy = ResponseLogps(load_model(model_dir).eval())
        self.lengths = {"max_length": max_length, "max_prompt_length": max_prompt_length}

    @torch.inference_mode()
    def __call__(self, table):
        tokens = tokenize_batch(table, self.tokenizer, **self.lengths)
        batch = collate(tokens, self.tokenizer.pad_token_id)
        logps, _ = self.policy(batch.input_ids, batch.attention_mask, batch.response_mask)
        sums = batch.sides(row_sums(logps, batch.response_mask))
        return {"prefers_chosen": (sums.chosen > sums.rejected).numpy()}


def share_cpus(cfg: TVKDConfig, cpus: float) -> None:
    """Scale the run's CPU requests (``train.num_cpus_per_worker`` and each pool's
    ``num_cpus_per_actor``) by one factor so that fit's pools fit in ``cpus`` logical CPUs.

    fit holds all its pools at once (train workers, tokenizer, teacher, reference) and refuses
    a run whose demand the cluster lacks. A fractional share is a reservation, not a core: the
    processes still share the machine's cores, each on one thread below one CPU."""
    demand = {name: d["CPU"] for name, d in resource_demand(cfg).items()}
    fixed = demand.pop(TOKENIZER_POOL)  # tokenising asks for a fixed half CPU
    scale = (cpus - fixed) / sum(demand.values())
    if scale <= 0:
        raise ResourceError(f"the cluster has {cpus:g} CPUs, too few for any run")
    if scale < 1:
        cfg.train.num_cpus_per_worker *= scale
        for pool in cfg.pools().values():
            pool.num_cpus_per_actor *= scale
    shares = {name: d["CPU"] for name, d in resource_demand(cfg).items()}
    print("CPU shares: " + ", ".join(f"{name} {cpu:.2f}" for name, cpu in shares.items()))


def run(args: argparse.Namespace) -> None:
    # The example trains only; it evaluates in its own stage below. Its own run name keeps it
    # apart from the CLI's tiny runs (a second call resumes from its last checkpoint).
    defaults = ["data.eval_path=null", "run.name=ray-data-pipeline"]
    cfg = load_config(args.config, [*defaults, *args.overrides])

    ray.init(address=args.address)  # the surrounding pipeline owns the cluster
    share_cpus(cfg, ray.cluster_resources()["CPU"])
    wanted = {"addition", "multiplication", "unit_conversion"}
    train = ray.data.read_json(str(BUNDLED / "train.jsonl")).filter(
        lambda row: row["task"] in wanted
    )
    held_out = ray.data.read_json(str(BUNDLED / "eval.jsonl")).select_columns(
        ["prompt", "chosen", "rejected"]
    )
    result = tvkd_ray.fit(cfg, train_dataset=train)
    print(f"trained {result.model_dir} (MLflow run {result.mlflow_run_id})")

    scored = held_out.add_column(schema.PAIR_ID, lambda batch: np.arange(len(batch)))
    scored = scored.map_batches(
        PreferenceScorer,
        fn_constructor_kwargs={
            "model_dir": result.model_dir,
            "max_length": cfg.data.max_length,
            "max_prompt_length": cfg.data.max_prompt_length,
        },
        batch_size=16,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=1),
    )
    accuracy = np.mean(scored.to_pandas()["prefers_chosen"])
    print(f"held-out pairs where the student prefers the chosen reply: {accuracy:.3f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "examples" / "tiny.yaml"))
    parser.add_argument(
        "--address",
        default="local",
        help="Ray address: 'local' starts a cluster the size of this machine (the default), "
        "'auto' joins the one running here, or ray://HOST:PORT",
    )
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args()
    try:
        run(args)
    except TVKDError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
