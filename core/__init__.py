"""The engine core: the contracts (trajectory, attention pattern and backend, cache policy, model
adapter), hook specifications, records, the registry and the one generation engine. It imports
nothing outside core/."""

__version__ = "0.1.0"
