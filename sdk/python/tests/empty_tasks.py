"""A module that registers no task handlers (the worker must refuse to start)."""

VALUE = 1
