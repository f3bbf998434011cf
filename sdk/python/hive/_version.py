"""The SDK's version (also in ``ready``'s ``sdk`` as ``hive-python/<version>``)."""

__version__ = "0.1.0"
