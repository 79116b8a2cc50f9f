"""What the accuracy study runs: its noise cells (the `dtrain prepare` options of each) and
its methods (a preset and extra overrides each), read by `study.py` and `study_report.py`."""

from __future__ import annotations

NOISES = {  # name: dtrain prepare options
    "sym0.4": ["--noise", "symmetric", "--noise-rate", "0.4"],
    "inst0.3": ["--noise", "instance", "--noise-rate", "0.3"],
    "sym0.2": ["--noise", "symmetric", "--noise-rate", "0.2"],
    # one-way: 20% of the tumours labelled "no" (a two-way map would be symmetric noise)
    "asym0.2": ["--noise", "asymmetric", "--noise-rate", "0.2", "--noise-map", "0,0"],
}
MAIN_NOISES, EXTRA_NOISES = ("sym0.4", "inst0.3"), ("sym0.2", "asym0.2")
METHODS = {  # name in the tables: (preset, extra overrides)
    "ce": ("ce", []),
    "mixup": ("mixup", []),
    "gce": ("gce", []),
    "sce": ("sce", []),
    "coteaching": ("coteaching", []),
    "afm": ("afm", []),
    "iam_no_con": ("iam_no_con", []),
    "iam_no_mixup": ("iam_no_mixup", []),
    "iam": ("iam", []),
    "iam+rounds": ("iam", ["train.refine_rounds=1"]),
}
WARM_VARIANT = {"iam+rounds(warm)": ("iam", ["train.refine_rounds=1", "train.refine_init=warm"])}
