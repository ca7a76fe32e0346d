"""The contract between the API and the workers: settings, registry manifests, method settings with their
presets and precedence, public schemas and job payloads.

Torch-free, and it imports neither `app` nor `worker`: both processes import it (app -> contract <- worker),
and a client can too. Its own package rather than a part of app/, so that the worker image ships no API
code and the API image no worker code.
"""
