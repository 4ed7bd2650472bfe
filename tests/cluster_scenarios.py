"""Multi-node scenarios on one machine (``ray.cluster_utils.Cluster``), run by
test_cluster_on_cpu.py in a process of their own: each builds its cluster, trains through
``tvkd_ray.fit`` attached to it, removes a node mid-run (which kills every process on it) and
prints one JSON line of what happened.

``python tests/cluster_scenarios.py scorer-node OUT``: trainers pinned to the head by a custom
resource, the teacher and the reference on two "scorer" nodes (``teacher.resources``,
``reference.resources``), the node running the teacher removed mid-epoch; ``cache: none``; one
eval pair for two workers.

``python tests/cluster_scenarios.py trainer-node OUT``: the worker's node removed after a
checkpoint; Ray Train restarts it on the spare trainer node from that checkpoint.
"""

import json
import os
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tvkd_ray import runtime  # noqa: E402

runtime.set_defaults(runtime.TEST_CLUSTER_ENV)
# The tiny teacher scores faster than trainers step; slowed, it is still streaming when its node
# goes (actors/faults.py).
os.environ["TVKD_FAULT"] = "teacher:1:none:delay=0.3"
NUM_PAIRS = 96


def write_pairs(path: Path, count: int, offset: int = 0) -> Path:
    with open(path, "w") as f:
        for i in range(offset, offset + count):
            a, b = i % 9 + 1, i // 9 + 2
            prompt = f"User: What is {a} plus {b}?\nAssistant:"
            chosen, rejected = f" {a} + {b} = {a + b}.", f" {a} + {b} = {a + b + 1}."
            f.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")
    return path


SCENARIOS = {
    # head, then the other nodes: (CPUs, custom resources)
    "scorer-node": {
        "nodes": [(4, {"trainer": 2}), (2, {"scorer": 2}), (2, {"scorer": 2})],
        "victim": "TeacherPotentials",
        "eval_pairs": 1,  # fewer eval pairs than workers
        "overrides": [
            "teacher.resources={scorer: 1}",
            "reference.resources={scorer: 1}",
            "teacher.cache=none",
            "reference.cache=none",
            "teacher.batch_size=4",
            "reference.batch_size=4",
            "train.resources_per_worker={trainer: 1}",
            "train.num_workers=2",
            "train.num_cpus_per_worker=0.5",
        ],
    },
    "trainer-node": {
        "nodes": [(3, {}), (1, {"trainer": 1}), (1, {"trainer": 1})],
        "victim": "RayTrainWorker",
        "eval_pairs": 4,
        "overrides": [
            "train.resources_per_worker={trainer: 1}",
            "train.max_failures=1",
            "train.num_cpus_per_worker=1",
        ],
    },
}


class NodeRemover:
    """Removes the node running the victim actor once Ray Train has registered a checkpoint
    (and, for a pool actor, while it is alive): that is mid-epoch of the first of two epochs."""

    def __init__(self, cluster, nodes, victim: str, run_dir: Path):
        self.cluster, self.nodes, self.victim, self.run_dir = cluster, nodes, victim, run_dir
        self.report: dict = {}

    def _victim_node(self):
        from ray._private import state

        for actor in state.actors().values():
            if actor["State"] == "ALIVE" and self.victim in actor["ActorClassName"]:
                return self.nodes.get(actor["Address"]["NodeID"])
        return None

    def run(self) -> None:
        # Written by Ray Train's controller once it holds a checkpoint; a checkpoint directory
        # alone may not be registered yet (then a restart starts from the one before).
        while not (self.run_dir / "train" / "checkpoint_manager_snapshot.json").exists():
            time.sleep(0.2)
        while (node := self._victim_node()) is None:
            time.sleep(0.2)
        seen = self.run_dir / "pairs_seen"
        self.report["epochs_finished_before"] = (
            len(list(seen.glob("*.npy"))) if seen.exists() else 0
        )
        self.report["node"] = node.node_id
        self.cluster.remove_node(node)


def main(name: str, out: Path) -> None:
    import ray
    from ray.cluster_utils import Cluster

    import tvkd_ray
    from tvkd_ray.config import load_config

    scenario = SCENARIOS[name]
    (head_cpus, head_resources), *others = scenario["nodes"]
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": head_cpus,
            "resources": head_resources,
            "include_dashboard": False,
        },
    )
    nodes = {}
    for cpus, resources in others:
        node = cluster.add_node(num_cpus=cpus, resources=resources)
        nodes[node.node_id] = node
    cluster.wait_for_nodes()
    ray.init(
        address=cluster.address,
        log_to_driver=False,
        runtime_env={"env_vars": runtime.cluster_env_vars()},
    )
    cfg = load_config(
        REPO / "examples" / "tiny.yaml",
        [
            f"run.output_dir={out}",
            f"run.name={name}",
            f"data.train_path={write_pairs(out / 'train.jsonl', NUM_PAIRS)}",
            f"data.eval_path={write_pairs(out / 'eval.jsonl', scenario['eval_pairs'], 1000)}",
            f"tracking.uri=sqlite:///{out / 'mlflow.db'}",
            "train.batch_size=4",
            "train.epochs=2",
            "train.max_steps=null",
            "train.save_every=2",
            *scenario["overrides"],
        ],
    )
    remover = NodeRemover(cluster, nodes, scenario["victim"], cfg.run_dir)
    threading.Thread(target=remover.run, daemon=True).start()
    result = tvkd_ray.fit(cfg)
    print(
        json.dumps(
            {
                **remover.report,
                "step": result.metrics.get("step"),
                "run_dir": result.run_dir,
                "mlflow_run_id": result.mlflow_run_id,
                "tracking_uri": result.tracking_uri,
                "num_pairs": NUM_PAIRS,
            }
        ),
        flush=True,
    )
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
