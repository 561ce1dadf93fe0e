"""mnistnets: the four compact MNIST CNNs, their data, schedules and trainer. Pure PyTorch."""
from .models import count_parameters, create_model, list_models

__all__ = ["create_model", "list_models", "count_parameters"]
