"""The trial pipeline, one concept per module, in the order a trial runs them.

``bundle`` (the model and its data) -> ``space`` (prunable groups and their options) -> ``plan``
(a choice per group) -> ``pruning`` (torch-pruning applies it) and ``sparsity`` (N:M masks) ->
``recovery`` (adaptive batch-norm, short fine-tuning) -> ``onnx_export``. Nothing here knows about
Optuna, the database or the CLI. ``inputs`` calls models on a tensor, a tuple or named tensors;
``attention`` holds ``nn.MultiheadAttention`` with heads removed.
"""
