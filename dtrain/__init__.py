"""dtrain: medical image classifiers that stay accurate under label noise, at cluster scale."""

__version__ = "0.1.0"
