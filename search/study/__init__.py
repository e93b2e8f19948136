"""The search over the pipeline: configuration read from the store, Optuna studies, trials.

``runtime`` (where the study lives, Optuna factories), ``read`` (stored trials as figures: status,
fronts; no torch, so the hub can import it), ``controller`` (prepare, run workers, confirm the front),
``objective`` (one trial; its meters come from ``latency_models.make_meter``), ``trial_loop``
(ask/tell with heartbeats), ``reward``, ``pareto``, ``confirmation``, ``materialize`` (rebuild a
stored trial's model).
"""
