"""Continual-learning metrics as an `evaluate` module that loads from a local path (no Hub access needed).

    import evaluate
    from hf_adaptive.metrics_module import CONTINUAL_METRICS_PATH
    metric = evaluate.load(CONTINUAL_METRICS_PATH)
    metric.compute(predictions=[[...row after task i...], ...], references=[[...]] )

`predictions` is the accuracy matrix R (one row per trained task, R[i][j] = accuracy on task j after training
task i); `references` optionally the untrained baseline accuracies (for forward transfer), repeated once per row.
"""

import datasets
import evaluate

from hf_adaptive.metrics import average_accuracy, backward_transfer, forgetting, forward_transfer

_DESCRIPTION = "Average accuracy, backward transfer, forward transfer and forgetting of an accuracy matrix."
_KWARGS_DESCRIPTION = """
Args:
    predictions: the accuracy matrix, a list of T rows of T floats.
    references: the T baseline accuracies (untrained model) for forward transfer, given once per row of
        `predictions` (evaluate pairs every prediction with a reference; the rows must be equal); empty rows
        (`[[]] * T`) when there is no baseline, which leaves fwt None.
Returns:
    avg_acc, bwt, fwt (None without references), forgetting.
"""


class ContinualMetrics(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Lopez-Paz & Ranzato 2017 (GEM); Chaudhry et al. 2018 (forgetting)",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("float64")),
                    "references": datasets.Sequence(datasets.Value("float64")),
                }
            ),
        )

    def _compute(self, predictions, references=None):
        matrix = [list(map(float, row)) for row in predictions]
        baseline = None
        if references is not None and len(references) and len(references[0]):
            if any(list(r) != list(references[0]) for r in references):
                raise ValueError("continual_metrics: every references row must be the same baseline row")
            baseline = [float(x) for x in references[0]]
        return {
            "avg_acc": average_accuracy(matrix),
            "bwt": backward_transfer(matrix),
            "fwt": forward_transfer(matrix, baseline),
            "forgetting": forgetting(matrix),
        }
