"""Report of an Optuna study: ``make tune-report STUDY=<name> [STORAGE=...]``.

Writes ``reports/tune/<study>/``:

- ``trials.csv``: number, state, value, params (JSON), duration (s), run_dir, retried_from;
- ``optimization_history.png``, ``intermediate_values.png``, ``param_importances.png``
  (two or more completed trials whose parameters vary), ``parallel_coordinate.png`` (two
  or more completed trials); a plot that cannot be drawn is skipped with a log line;
- ``best.yaml``: the complete training config of the best trial, with ``runs_dir``,
  ``resume``, ``save_oof`` and ``plot`` back at their training defaults and ``experiment``
  named after the study (``<study>-best``), so ``make train CONFIG=reports/tune/<study>/best.yaml
  FOLD=k`` trains it into ``runs/<study>-best/`` (two studies never share a run folder).  Its ``epochs`` and
  other budgets are the trial's: raise them there (or with ``ARGS``) for a full run.
"""

from __future__ import annotations

import io
import json
import logging
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import optuna
import yaml

from pipeline.core.config import ConfigError, apply_mapping, stage_main, to_dict
from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_open, atomic_write_bytes, atomic_write_text
from pipeline.tuning.space import TRIAL_DEFAULTS, TUNER_KEYS
from pipeline.tuning.study import load_existing_study

log = logging.getLogger(__name__)

# keys of a trial's stored config that go back to the TrainConfig defaults in best.yaml
BEST_RESET_KEYS = tuple(k for k in TUNER_KEYS if k != "fold") + tuple(TRIAL_DEFAULTS)


@dataclass
class TuneReportConfig:
    study: str = "demo"
    storage: str | None = None  # None: sqlite studies/<study>.db (as make tune)
    out_dir: str = "reports/tune"


def trials_table(study: optuna.Study):
    """One row per trial: number, state, value, params, duration, run_dir, retried_from."""
    import pandas as pd

    rows = []
    for t in study.get_trials(deepcopy=False):
        rows.append(
            {
                "number": t.number,
                "state": t.state.name,
                "value": t.value,
                "params": json.dumps(t.params, sort_keys=True),
                "duration": t.duration.total_seconds() if t.duration is not None else None,
                "run_dir": t.user_attrs.get("run_dir", ""),
                "retried_from": t.system_attrs.get("failed_trial"),
            }
        )
    columns = ["number", "state", "value", "params", "duration", "run_dir", "retried_from"]
    table = pd.DataFrame(rows, columns=columns)
    table["retried_from"] = table["retried_from"].astype("Int64")
    return table


def _save_plot(draw: Callable[[], object], path: Path) -> bool:
    """Draw with an ``optuna.visualization.matplotlib`` function and write the PNG atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = draw()
    for w in caught:
        if not issubclass(w.category, optuna.exceptions.ExperimentalWarning):
            log.info("%s: %s", path.name, w.message)
    ax = result.flat[0] if hasattr(result, "flat") else result
    fig = ax.figure
    fig.set_size_inches(max(fig.get_size_inches()[0], 10), max(fig.get_size_inches()[1], 5))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return True


def write_plots(study: optuna.Study, out: Path) -> list[Path]:
    from optuna.visualization import matplotlib as vis

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    varying = sorted(
        {name for t in complete for name in t.params if len({json.dumps(c.params.get(name)) for c in complete}) > 1}
    )
    plots: list[tuple[str, Callable[[], object], str | None]] = [
        (
            "optimization_history.png",
            lambda: vis.plot_optimization_history(study),
            None if complete else "no completed trial",
        ),
        (
            "intermediate_values.png",
            lambda: vis.plot_intermediate_values(study),
            None if any(t.intermediate_values for t in study.get_trials(deepcopy=False)) else "no reported epochs",
        ),
        (
            "param_importances.png",
            lambda: vis.plot_param_importances(study),
            None if len(complete) >= 2 and varying else "needs 2+ completed trials whose parameters vary",
        ),
        (
            "parallel_coordinate.png",
            lambda: vis.plot_parallel_coordinate(study),
            None if len(complete) >= 2 and varying else "needs 2+ completed trials whose parameters vary",
        ),
    ]
    written = []
    for name, draw, skip in plots:
        if skip:
            log.info("skipped %s: %s", name, skip)
            continue
        try:
            _save_plot(draw, out / name)
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:
            log.info("skipped %s: %s", name, exc)
            continue
        written.append(out / name)
    return written


def best_config_text(study: optuna.Study) -> str | None:
    """YAML of the best trial's resolved training config (None when no trial completed with one)."""
    from pipeline.engine.train_config import TrainConfig

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        return None
    best = study.best_trial
    stored = best.user_attrs.get("config")
    if not isinstance(stored, dict):
        log.warning("best trial %d stores no training config; best.yaml not written", best.number)
        return None
    try:
        cfg = apply_mapping(TrainConfig(), stored, f"study {study.study_name} trial {best.number}")
    except ConfigError as exc:
        raise PipelineError(f"best trial {best.number}: its stored config no longer fits TrainConfig ({exc})") from exc
    defaults = to_dict(TrainConfig())
    cfg = apply_mapping(cfg, {k: defaults[k] for k in BEST_RESET_KEYS}, "training defaults")
    # its own experiment, named after the study: two studies' best configs never share a run folder
    cfg = apply_mapping(cfg, {"experiment": f"{study.study_name}-best"}, "tune report")
    cfg.validate()
    header = (
        f"# best trial {best.number} of study {study.study_name}: value {best.value:.6f}\n"
        f"# params: {json.dumps(best.params, sort_keys=True)}\n"
        f"# run: {best.user_attrs.get('run_dir', '-')}\n"
        "# train it: make train CONFIG=<this file> FOLD=k\n"
    )
    return header + yaml.safe_dump(to_dict(cfg), sort_keys=False)


def run(cfg: TuneReportConfig) -> Path:
    """Write the report of study ``cfg.study``; returns its folder."""
    study = load_existing_study(cfg.study, cfg.storage)
    out = Path(cfg.out_dir) / cfg.study
    out.mkdir(parents=True, exist_ok=True)
    table = trials_table(study)
    with atomic_open(out / "trials.csv", "w", newline="") as fh:
        table.to_csv(fh, index=False, float_format="%.6f")
    if table.empty:
        log.info("study %s has no trials", cfg.study)
    else:
        counts = table["state"].value_counts().to_dict()
        log.info(
            "study %s: %d trial(s) (%s)\n%s",
            cfg.study,
            len(table),
            ", ".join(f"{k.lower()} {v}" for k, v in counts.items()),
            table.drop(columns=["run_dir"]).to_string(
                index=False, float_format=lambda v: "nan" if math.isnan(v) else f"{v:.4f}"
            ),
        )
    written = write_plots(study, out)
    text = best_config_text(study)
    if text is None:
        log.warning("no completed trial: best.yaml not written")
    else:
        atomic_write_text(out / "best.yaml", text)
        written.append(out / "best.yaml")
        log.info("best trial %d: value %.4f -> %s", study.best_trial.number, study.best_value, out / "best.yaml")
    log.info("wrote %s: %s", out, ", ".join(p.name for p in [out / "trials.csv", *written]))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main(TuneReportConfig, run, argv, "Report of an Optuna study (make tune-report)")


if __name__ == "__main__":
    raise SystemExit(main())
