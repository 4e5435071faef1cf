"""The benchmark deployment as a pyinfra deploy (six operations, as in the anchors).

    BENCH_VERSION=v1 BENCH_ARTIFACT=/abs/artifact.tgz BENCH_ROOT=/abs/benchmarks \
        pyinfra -y --parallel N inventory.py deploy.py

The inventory (written by the harness) names each host by its address.
"""

import os
import sys

from pyinfra import host
from pyinfra.operations import files, server

sys.path.insert(0, os.environ["BENCH_ROOT"])
import steps

VERSION = os.environ["BENCH_VERSION"]
ARTIFACT = os.environ["BENCH_ARTIFACT"]
D = steps.APP_DIR

server.shell(name="stop the app", commands=[steps.stop()])
files.put(name="copy the artifact", src=ARTIFACT, dest=f"{D}/artifact.tgz")
server.shell(name="unpack", commands=[steps.extract()])
files.template(
    name="configure",
    src=os.path.join(os.environ["BENCH_ROOT"], "pyinfra", "app.conf.j2"),
    dest=f"{D}/app.conf",
    listen=host.name,
    port=steps.port_of(host.name),
    version=VERSION,
)
server.shell(name="start the app", commands=[steps.start()])
server.shell(name="health check", commands=[steps.health(VERSION)])
