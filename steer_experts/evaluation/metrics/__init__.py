"""``evaluate`` metric scripts that delegate to :mod:`steer_experts.evaluation`.

Load one with ``evaluate.load(steer_experts.evaluation.metric_path(name))``.
"""


def text_metric_info(description: str, inputs_description: str, citation: str):
    """The ``evaluate.MetricInfo`` of a metric computed over generated texts (a ``predictions`` column
    of strings), from the metric's description, its arguments' description and its citation."""
    import datasets
    import evaluate

    return evaluate.MetricInfo(description=description, citation=citation, inputs_description=inputs_description,
                               features=datasets.Features({"predictions": datasets.Value("string")}))
