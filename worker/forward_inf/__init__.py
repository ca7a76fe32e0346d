"""Forward-INF: training-data attribution with a mirrored step and one forward sweep (arXiv 2402.08922).

Pure torch: this package imports nothing from redis, rq, fastapi or the app.

    from worker.forward_inf import attribute, MirrorConfig, Classification
    scores = attribute(model, Classification(), (x_train, y_train), (x_test, y_test), MirrorConfig())
"""

from . import curvature, families, kronecker  # the curvature methods register themselves on import
from .config import PRESETS, AttributionInputError, MirrorConfig
from .engine import ForwardInf, attribute
from .mirror import Mirror
from .tasks import TASKS, Calibration, CausalLM, Classification, Diffusion, Regression, Task, make_task
from .zoo import ZOO, build

__all__ = [
    "PRESETS",
    "TASKS",
    "ZOO",
    "AttributionInputError",
    "Calibration",
    "CausalLM",
    "Classification",
    "Diffusion",
    "ForwardInf",
    "Mirror",
    "MirrorConfig",
    "Regression",
    "Task",
    "attribute",
    "build",
    "curvature",
    "families",
    "kronecker",
    "make_task",
]
