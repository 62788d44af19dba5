"""Connections on the workers' side: secrets (encrypted at rest), OAuth grants and their refresh.

Producers see names and states only (producers.connections); everything that needs
AWORK_SECRETS_KEY or the OAuth client secret lives here.
"""
