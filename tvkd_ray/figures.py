"""The per-token shaping picture of a few scored pairs, logged with a finished TVKD run.

The shaping return of a response is S = Σ_t F_t with F_t = γ·Φ(s_{t+1}) − Φ(s_t) and Φ after
the last token 0 (SPEC §2.3; ``loss.shaping_return`` sums the same terms in closed form). Seeing
F_t and Φ token by token, chosen against rejected, shows where along a response the teacher
rewards or penalises it, which one number per pair cannot.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa

from tvkd_ray import schema

# The trainers keep the first few pairs of the final evaluation here, one file per worker with
# any (which worker reads which eval block is Ray Data's choice), for the driver to draw.
PAIRS_DIR = "shaping_pairs"
NUM_PAIRS = 3
COLUMNS = (schema.PAIR_ID, schema.CHOSEN_IDS, schema.REJECTED_IDS, *schema.POTENTIALS)
SIDES = (
    ("chosen", schema.CHOSEN_POTENTIALS, "tab:green"),
    ("rejected", schema.REJECTED_POTENTIALS, "tab:red"),
)


def write_pairs(tables: list[pa.Table], run_dir: str | Path, rank: int) -> None:
    """Keep up to ``NUM_PAIRS`` scored eval pairs (teacher columns) of one worker."""
    import pyarrow.parquet as pq

    table = pa.concat_tables(t.select(COLUMNS) for t in tables).slice(0, NUM_PAIRS)
    out = Path(run_dir) / PAIRS_DIR
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out / f"rank{rank}.parquet")


def read_pairs(run_dir: str | Path) -> pa.Table | None:
    """The first ``NUM_PAIRS`` kept pairs by id over every worker's file, or None."""
    import pyarrow.parquet as pq

    files = sorted((Path(run_dir) / PAIRS_DIR).glob("rank*.parquet"))
    if not files:
        return None
    table = pa.concat_tables(pq.read_table(f) for f in files)
    return table.sort_by(schema.PAIR_ID).slice(0, NUM_PAIRS)


def shaping_terms(potentials, gamma: float, center: bool) -> tuple[np.ndarray, np.ndarray]:
    """(Φ as the loss uses it, F_t) of one response's per-token potentials."""
    phi = np.asarray(potentials, dtype=np.float64)
    if center and phi.size:
        phi = phi - phi[0]  # loss.center_potentials: Φ(s_1) of the response is 0
    return phi, gamma * np.append(phi[1:], 0.0) - phi


def plot_shaping(
    table: pa.Table,
    path: Path,
    *,
    gamma: float,
    alpha: float,
    center: bool,
    decode: Callable[[list[int]], str] | None = None,
) -> None:
    """One row per pair of ``table`` (teacher columns needed): F_t on the left, Φ on the right,
    chosen in green, rejected in red; titles give S and the pair's shaped advantage α·ΔS."""
    import matplotlib

    matplotlib.use("Agg")  # files only: the driver may run where no display exists
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rows = table.num_rows
    fig, axes = plt.subplots(rows, 2, figsize=(13, 2.7 * rows), squeeze=False)
    for row in range(rows):
        sums = {}
        for side, phi_col, colour in SIDES:
            phi, shaped = shaping_terms(table[phi_col][row].as_py(), gamma, center)
            sums[side] = shaped.sum()
            label = f"{side} (S = {shaped.sum():.3g}, {len(phi)} tokens)"
            axes[row][0].plot(shaped, color=colour, lw=1, label=label)
            axes[row][1].plot(phi, color=colour, lw=1, label=side)
        pair_id = table[schema.PAIR_ID][row].as_py()
        start = ""
        if decode is not None:
            start = f": chosen starts {decode(table[schema.CHOSEN_IDS][row].as_py()[:12])!r}"
        advantage = alpha * (sums["chosen"] - sums["rejected"])
        axes[row][0].set_title(
            f"eval pair {pair_id}{start}"[:90] + f"  α·ΔS = {advantage:.3g}", fontsize=8
        )
        centred = " (centred: Φ(s_1) = 0)" if center else ""
        axes[row][1].set_title(f"eval pair {pair_id}: Φ(s_t){centred}", fontsize=8)
        for ax, ylabel in zip(axes[row], ("F_t = γΦ(s_{t+1}) − Φ(s_t)", "Φ(s_t)")):
            ax.set_xlabel("response token t", fontsize=8)
            ax.set_ylabel(ylabel, fontsize=8)
            ax.axhline(0, color="grey", lw=0.5)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.legend(fontsize=7)
    fig.suptitle(f"TVKD shaping terms (γ = {gamma}, α = {alpha})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
