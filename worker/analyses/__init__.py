"""Data-governance answers read off the engine's output: leakage, mislabeled data, memorization.

Each kind is a module with one function that takes the `Evidence` of one job (score matrix, the mirror's
own responses, base losses: evidence.py) and the job's typed payload (its options), and returns its typed
result (contract/schemas.py); its AnalysisSpec (contract/kinds.py) names that function as its `compute`
part. The statistics, and the measurements behind their defaults, are in docs/benchmarks.md ("Governance
analyses").
"""

from .evidence import Evidence

__all__ = ["Evidence"]
