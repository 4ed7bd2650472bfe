"""tvkd_ray.fit inside a larger Ray Data pipeline.

    .venv/bin/python examples/ray_data_pipeline.py [--config FILE] [section.key=value ...]

1. Ray Data reads the raw rows and keeps only some tasks (any preprocessing would do).
2. ``tvkd_ray.fit`` trains on that Dataset; Ray is already running, so fit neither starts nor
   stops it.
3. A later Ray Data stage uses the trained model: an actor pool scores held-out pairs and the
   pipeline reports how often the trained student prefers the chosen reply.
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
from tvkd_ray import schema  # noqa: E402
from tvkd_ray.config import load_config  # noqa: E402
from tvkd_ray.data import collate, tokenize_batch  # noqa: E402
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "examples" / "tiny.yaml"))
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args()
    cfg = load_config(args.config, ["data.eval_path=null", *args.overrides])

    ray.init()  # the surrounding pipeline owns the cluster
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
    ray.shutdown()


if __name__ == "__main__":
    main()
