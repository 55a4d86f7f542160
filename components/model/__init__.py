"""Stages that take a trained model of any family and write another (``model.compress``)."""
