"""A strict stand-in for awork's file API and its Azure Blob upload URLs.

Start it with `awork-uploads sandbox` (or `python -m ops.sandbox`); drive it from tests with
`ops.sandbox.launcher.SandboxProcess`. ops/sandbox/README.md documents the flags, the admin API and the
error codes it chose where awork's contract is silent.
"""
