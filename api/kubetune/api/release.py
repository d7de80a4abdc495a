"""The release of kubetune this code is: one number for the CLI, the operator and the images."""

__version__ = "0.1.0"
