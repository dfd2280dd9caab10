"""The embedded default: tiny random models for tests and demos (``tiny``)."""
