"""The training engine: runtime settings, deterministic sampling, optimizers and schedules,
the epoch loops, hooks, checkpoints and the trainer that ties them together.

``train(cfg, hooks)`` is what the train stage and the tuner call.
"""
