"""tvkd-ray: Teacher Value-based Knowledge Distillation (DPO + teacher potential shaping) on Ray.

``tvkd_ray.fit(config, train_dataset=None, eval_dataset=None)`` is the Python API; see
``tvkd_ray.api``. Importing the package stays light: Ray and torch load on first use.
"""

__version__ = "0.1.0"


def fit(config, train_dataset=None, eval_dataset=None):
    """Train a student; see :func:`tvkd_ray.api.fit`."""
    from tvkd_ray.api import fit as _fit

    return _fit(config, train_dataset, eval_dataset)
