"""midfill: train and serve fill-in-the-middle code models on Kubernetes (or on one machine).

This package is the shared core (API types, settings, FIM formats, registry, CLI). It imports no
component (operators/, trainer/, serving/): components import it.
"""

__version__ = "0.1.0"
