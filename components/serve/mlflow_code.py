"""The code of raypipe's MLflow models (MLflow's "models from code"): MLflow copies this file
into each model it logs and runs it when the model loads, so no pickled object is stored."""

from mlflow.models import set_model

from components.serve.pyfunc import BundleModel

set_model(BundleModel())
