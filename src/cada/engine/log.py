"""The training log: one row per optimiser step of every stage, kept by the `Trainer` (and in resume checkpoints)
and written with the run as RUN/train_log.csv, and as TensorBoard scalars on request (`--logger tensorboard`).

Columns: stage (the method's name, or "aligner"), step (1-based within the stage), loss (the batch's, averaged
over processes), lr (of the optimiser's first parameter group, as used for that step) and images_per_second
(the global batch over that step's wall time: data, forward, backward and update).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from cada.checkpoint import LOG_FILE, TENSORBOARD_FOLDER  # noqa: F401 - the run folder's names live with its format

FIELDS = ("stage", "step", "loss", "lr", "images_per_second")


def log_row(stage: str, step: int, loss: float, lr: float, images_per_second: float) -> dict:
    return {
        "stage": stage,
        "step": step,
        "loss": loss,
        "lr": lr,
        "images_per_second": round(images_per_second, 2),
    }


def csv_text(rows: list[dict]) -> str:
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return table.getvalue()


def read_log(path: str | Path) -> list[dict]:
    """The rows of a train_log.csv; ValueError naming the file when it is not one."""
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if tuple(reader.fieldnames or ()) != FIELDS:
                raise ValueError(f"its columns are {reader.fieldnames}, not {list(FIELDS)}")
            return [
                {
                    "stage": row["stage"],
                    "step": int(row["step"]),
                    **{key: float(row[key]) for key in ("loss", "lr", "images_per_second")},
                }
                for row in reader
            ]
    except (OSError, ValueError, TypeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not a readable training log: {error}") from None


def require_tensorboard() -> None:
    """Before training starts: a clear error when TensorBoard logging was asked for but cannot be written."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401  # needs the tensorboard package
    except ImportError:
        raise ValueError(
            "--logger tensorboard needs the tensorboard package: pip install tensorboard (or use --logger csv)"
        ) from None


def write_tensorboard(rows: list[dict], folder: str | Path) -> None:
    """The log as TensorBoard scalars in `folder`: STAGE/loss, STAGE/lr and STAGE/images_per_second by step."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(folder))
    try:
        for row in rows:
            for key in ("loss", "lr", "images_per_second"):
                writer.add_scalar(f"{row['stage']}/{key}", row[key], row["step"])
    finally:
        writer.close()
