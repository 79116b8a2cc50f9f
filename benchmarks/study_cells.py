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
# Defaults are chosen on the tuning seeds' clean val labels (0 and 1); the tables' "report seeds"
# column is the clean test accuracy of the other seeds only.
TUNING_SEEDS = (0, 1)


def compute_matched(method: str, epochs: int) -> list[str]:
    """Overrides that follow the budget: con_elr's ELR ramp over 3/4 of the epochs (the main
    job's 30 of 40), and for DivideMix the compute of the others (forward and backward passes,
    both of DivideMix's networks counted). Per sample, in units of one image forward (a backward
    counts 2): the others' step is about 6 (two views forward and backward); DivideMix's warm-up
    step 6 (both peers, one view), its step after the warm-up 16 (4 no-grad forwards, then
    each peer's forward and backward of the double mixed batch). Half the epochs with a quarter
    as warm-up cost (e/4) * 6 + (e/4) * 16 = 5.5 e units against 6 e: 92% of the budget.
    Measured (benchmarks/results/step_breakdown_study_size_cpu.json, the study's size): a
    DivideMix step 959 ms, the method's 331 ms (2.9x), CE's 185 ms."""
    if method == "con_elr":  # ELR's ramp: the main job's 30 of 40 epochs, 9 of the study's 12
        return [f"method.elr_rampup_epochs={round(0.75 * epochs)}"]
    if method == "dividemix":
        return [
            f"train.epochs={max(2, epochs // 2)}",
            f"method.warmup_epochs={max(1, epochs // 4)}",
        ]
    return []


CEILING = "ce(clean labels)"
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
    "elr": ("elr", []),
    "dividemix": ("dividemix", []),  # at equal compute: compute_matched
    "dividemix(per-class)": ("dividemix", ["method.dividemix_divide=per_class"]),
    "iam_elr": ("iam_elr", []),
    # label refinement from a quarter of the study's 12 epochs (the main job's 10 of 40)
    "iam_elr+refine": ("iam_elr", ["method.elr_refine_from=3"]),
    # the ablation of iam_elr: without the attention mixup, without the contrastive term
    "iam_elr-mixup": ("iam_elr", ["method.lambda_iam=0"]),
    "iam_elr-con": ("iam_elr", ["method.lambda_con=0"]),
    # the default, its ELR weight ramped over 3/4 of the epochs (compute_matched), and its
    # ablation: without ELR's term, without the contrastive term
    "con_elr": ("con_elr", []),
    "con_elr-elr": ("con_elr", ["method.elr_lambda=0"]),
    "con_elr-con": ("con_elr", ["method.lambda_con=0"]),
    # the default with label refinement from a quarter of the 12 epochs (as iam_elr+refine):
    # the suspect part of a per-class GMM on the losses trains towards its ELR target
    "con_elr+refine": ("con_elr", ["method.elr_refine_from=3"]),
    # the default with one clean-up round, the main job's choice on today's split
    "con_elr+rounds": ("con_elr", ["train.refine_rounds=1"]),
    # the cell's ceilings: the same images with their clean labels, CE and the method
    CEILING: ("ce", ["data.train_labels=clean"]),
    "iam_elr(clean labels)": ("iam_elr", ["data.train_labels=clean"]),
}
WARM_VARIANT = {"iam+rounds(warm)": ("iam", ["train.refine_rounds=1", "train.refine_init=warm"])}
