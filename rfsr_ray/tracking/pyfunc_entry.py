"""The code MLflow runs to build the pyfunc model, at logging and at every load (MLflow's
"models from code": nothing is pickled). rfsr_ray never imports this module."""

from mlflow.models import set_model

from rfsr_ray.tracking.pyfunc import SuperResolutionModel

set_model(SuperResolutionModel())
