"""The names every command line and saved config chooses from, in one place. Torch-free,
so that the analysis tools and grid.py read configs without loading the model; the
registries that implement them (aggregators.AGGREGATORS, balancing.BALANCERS,
heads.make_head, precision.Precision) are checked against these lists by the tests."""

OPTIONS = ("pretrain", "finetune")
MODES = ("seq", "mix")
SCHEDULERS = ("constant", "linear")
POOLINGS = ("mean", "cls", "pooler")
ENCODINGS = ("cross", "bi", "both")
PRECISIONS = ("fp32", "bf16", "fp16", "auto")
AGGREGATORS = ("sum", "pcgrad", "mgda", "imtl_g", "cagrad", "nash_mtl", "aligned_mtl", "upgrad",
               "dualproj", "rlw", "fairgrad", "gradvac")
BALANCERS = ("none", "uncertainty", "dwa", "grad_norm", "famo")
PCGRAD_REDUCTIONS = ("sum", "mean")
STS_LOSSES = ("mse", "cosent")
SAMPLINGS = ("cycle", "temperature", "annealed")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
