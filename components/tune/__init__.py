"""Hyperparameter search over any trainable component (``tune.search``) and the evaluation +
champion gate that promotes a model in the MLflow registry (``tune.evaluate``)."""
