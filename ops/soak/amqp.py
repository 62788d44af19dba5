"""`python -m ops.soak.amqp [soak options]`: the fault soak with RabbitMQ as the broker.

The same run as `python -m ops.soak` (ops/soak/run.py takes the same options), with the step
messages on the machine's RabbitMQ in quorum queues (BROKER_URL, producers/transport.py) and Redis
for state only. It makes a vhost of its own for the run and deletes it afterwards
(ops/rabbitmq.py); the Redis SIGKILL of the soak then hits the state, not the broker. Set
RABBITMQ_HOST / RABBITMQ_PORT / RABBITMQ_USER / RABBITMQ_PASSWORD for a RabbitMQ elsewhere
(defaults: 127.0.0.1, 5672, guest, guest).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from ops.rabbitmq import DEFAULT_HOST, DEFAULT_PORT, DEFAULT_USER, Vhost
from ops.soak.run import main as soak_main


def main(argv: Sequence[str] | None = None) -> int:
    vhost = Vhost(
        user=os.environ.get("RABBITMQ_USER", DEFAULT_USER),
        password=os.environ.get("RABBITMQ_PASSWORD", "guest"),
        host=os.environ.get("RABBITMQ_HOST", DEFAULT_HOST),
        port=int(os.environ.get("RABBITMQ_PORT", DEFAULT_PORT)),
    ).create()
    saved = os.environ.get("BROKER_URL")
    os.environ["BROKER_URL"] = vhost.url  # the soak's producers and workers read it
    print(f"soak: broker RabbitMQ vhost {vhost.name} (quorum queues)", flush=True)
    try:
        return soak_main(sys.argv[1:] if argv is None else argv)
    finally:
        if saved is None:
            os.environ.pop("BROKER_URL", None)
        else:
            os.environ["BROKER_URL"] = saved
        vhost.delete()


if __name__ == "__main__":
    sys.exit(main())
