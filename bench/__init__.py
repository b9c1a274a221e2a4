"""Benchmarks of the step, the encoder and the evaluation (run as `python -m bench.NAME`)."""


def multitask_model(task_cfg, splits: tuple):
    """The trainer's setup, tasks (their `splits` read) and multitask model for `task_cfg`:
    what every benchmark that times the real model starts from."""
    from engine import run
    from multitask_classifier import build_tasks
    s = run.setup(task_cfg)
    tasks = build_tasks(task_cfg, s.tokenizer, s.encoder.config, splits)
    return s, tasks, run.build_model(task_cfg, s.encoder, tasks, s.device)
