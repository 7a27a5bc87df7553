"""The workflows behind the command line, usable from Python, one module a workflow: `train` a run folder,
`evaluate` a run on a data set (-> the results dict that `cada evaluate --json` writes), `calibrate` its one
threshold, `ablate` (the paper's tables), `demo`. Settings come from `make_settings` (cada.config_files). The CLI
(cli.py) is a table of commands that parse arguments, call these and print.

>>> settings = make_settings("cpu", "revdist", overrides=["base.iters=200"])   # doctest: +SKIP
>>> detector = train(settings, "data/mvtec", "runs/one")                      # doctest: +SKIP
>>> results = evaluate("runs/one", "data/mvtec")                               # doctest: +SKIP

What they have to say (the schedule, the tables) goes to the "cada" logger at INFO; `cada` shows it on the console.
"""

from cada.config_files import make_settings, settings_from_options
from cada.workflows.ablate import ablate
from cada.workflows.calibrate import calibrate
from cada.workflows.common import describe_calibration, find_split, run_files
from cada.workflows.demo import demo
from cada.workflows.evaluate import evaluate
from cada.workflows.train import LOGGERS, train

__all__ = [
    "LOGGERS",
    "ablate",
    "calibrate",
    "demo",
    "describe_calibration",
    "evaluate",
    "find_split",
    "make_settings",
    "run_files",
    "settings_from_options",
    "train",
]
