"""A typed Python client and command line for the training-data attribution service.

    from attribution_client import Client
    with Client("http://127.0.0.1:8000") as client:
        job = client.wait(client.attribute("digits-mlp", "digits-train", {"dataset": "digits-test", "indices": [0]}))
        print(job.result.rows[0].proponents[0].record_id, client.scores(job).shape)

Every problem+json answer raises the exception of its status (BadRequest ... Unavailable, all
ServiceError: contract/problems.py, re-exported here); views are the service's own schemas
(contract.schemas). A webhook receiver checks each delivery with
`verify(secret, body, request.headers["X-Attribution-Signature"])`.
"""

from contract import problems
from contract.problems import *  # noqa: F403 - the problem classes, as `problems.__all__` lists them
from contract.webhooks import verify

from .client import AsyncClient, Client

__all__ = ["AsyncClient", "Client", "verify", *problems.__all__]
