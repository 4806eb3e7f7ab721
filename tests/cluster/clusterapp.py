"""The app the ``celery -A clusterapp rediskit ...`` commands of test_celery.py load: the
broker on ``RK_BROKER`` (a plain Redis), the kit on the cluster ``RK_CLUSTER`` (a node URL)
through ``RedisKit(app, client=RedisCluster)``, under ``RK_PREFIX``."""

from __future__ import annotations

import os

from celery import Celery
from redis.cluster import RedisCluster

from celery_rediskit.integration import RedisKit

app = Celery("clusterapp", broker=os.environ["RK_BROKER"], backend=os.environ["RK_BROKER"],
             set_as_current=False)
RedisKit(app, prefix=os.environ["RK_PREFIX"],
         client=RedisCluster.from_url(os.environ["RK_CLUSTER"], socket_timeout=3.0))
