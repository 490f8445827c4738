"""``evaluate`` metric scripts that delegate to :mod:`steer_experts.evaluation`.

Load one with ``evaluate.load(steer_experts.evaluation.metric_path(name))``.
"""
