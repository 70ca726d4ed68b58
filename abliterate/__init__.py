"""abliterate: find the refusal direction of a chat model and project it out of the weights, exactly."""

__version__ = "0.1.0"
