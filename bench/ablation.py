"""The recommended method's ablation: one row per mechanism, each switched off (or changed) alone, same protocol.

``python -m bench.ablation [--latent 2] [--digit 1] [--seeds 10] [--out runs/ablation]``

Every row is ``remap_surgery`` with its defaults except the overrides the row names (unlearn-config fields, as
``bench.per_class --set``), run by ``unlearn.py``'s pipeline on the models ``bench.per_class`` trains or reuses
(``runs/cache/latent<L>``), into ``<out>/<row>``. Writes ``<out>/ablation.md`` and ``<out>/ablation.json`` with each
row scored against issue 12's targets (:func:`bench.per_class.score`).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
from typing import Any

from bench import per_class

OPT = "method_optimizers.remap_surgery."
HP = "method_hparams.remap_surgery."
# (row name, overrides, what it tests)
ROWS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("defaults", (), "the recommended settings"),
    (
        "Adam, raw gradients",
        (OPT + "name=adam", HP + "precondition=none"),
        "the previous defaults: Adam 3e-3 on the raw gradients",
    ),
    ("SGD, raw gradients", (HP + "precondition=none",), "no per-coordinate scaling at all"),
    (
        "Fisher, SGD 1e-4",
        (HP + "precondition=retain_fisher", OPT + "learning_rate=1e-4"),
        "divided by F_r instead of sqrt(F_r) (a natural-gradient step; at 1e-3 one step doubles the held-out -ELBO)",
    ),
    ("damping 1e-3", (HP + "fisher_damping=0.001",), "less damping of the retain Fisher"),
    ("SGD 2e-3", (OPT + "learning_rate=2e-3",), "a smaller step"),
    ("no projection", (HP + "projection=none",), "the surrogate gradient unprojected"),
    ("encoder too", (HP + "forget_only=None",), "the surrogate moves the encoder as well as the decoder"),
    ("no annealing", (HP + "forget_half_life=None",), "constant pull for the whole budget"),
    ("retain weight 3", (HP + "retain_weight=3",), "stronger retain descent"),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latent", type=int, default=2)
    parser.add_argument("--digit", type=int, default=1)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--out", default="runs/ablation")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(per_class.ROOT))
    started = time.perf_counter()
    model_dir, oracles = per_class.train_models(args.latent, [args.digit])
    rows: list[dict[str, Any]] = []
    reference: dict[str, Any] = {}
    for name, overrides, meaning in ROWS:
        run_args = argparse.Namespace(
            methods="remap_surgery",
            seeds=args.seeds,
            set=list(overrides),
            out=str(pathlib.Path(args.out) / name.replace(" ", "_")),
        )
        result = per_class.run_digit(args.latent, args.digit, model_dir, oracles[args.digit], run_args)
        reference = result
        rows.append(
            {
                "row": name,
                "overrides": list(overrides),
                "tests": meaning,
                "seconds": result["seconds"],
                **result["methods"][0],
            }
        )
        print(
            json.dumps(
                {
                    "row": name,
                    "steps": rows[-1]["steps"],
                    "fid": [rows[-1]["fid_stop"], rows[-1]["fid_end"]],
                    "elbo": rows[-1]["elbo_retain"],
                    "mia": rows[-1]["mia"],
                }
            ),
            flush=True,
        )
    original, oracle = reference["original"], reference["oracle"]
    lines = [
        f"Command: `python -m bench.ablation {' '.join(sys.argv[1:] if argv is None else argv)}` "
        f"({time.perf_counter() - started:.0f} s); latent {args.latent}, digit {args.digit}, {args.seeds} seeds, "
        f"auto threshold {reference['threshold']:.4f}",
        "",
        "| row | overrides | steps to auto (mean / max) | FID retain stop → end | held-out retain -ELBO stop → end | "
        "MIA AUC | forget fraction at end |",
        "|---|---|---|---|---|---|---|",
        f"| original / oracle | — | — | {original['fid']:.1f} / {oracle['fid']:.1f} | {original['elbo_retain']:.1f} / "
        f"{oracle['elbo_retain']:.1f} | {original['mia']:.3f} / {oracle['mia']:.3f} | "
        f"{original['forget_fraction']:.4f} / {oracle['forget_fraction']:.4f} |",
    ]
    for row in rows:
        overrides = " ".join(f"`{override.split('.', 2)[-1]}`" for override in row["overrides"]) or "—"
        lines.append(f"| {row['row']} | {overrides} | {per_class.score_cells(row, reference['threshold'])}")
    per_class.write_outputs(
        pathlib.Path(args.out) / "ablation",
        {"args": vars(args), "reference": reference, "rows": rows},
        "\n".join(lines) + "\n",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
