"""Load for ``POST /generate``: mixed cache intervals, sync requests.

locust -f loadtest/locustfile.py --host http://127.0.0.1:8000 --headless -u 16 -r 4 -t 60s
"""

from __future__ import annotations

import random

from locust import HttpUser, between, task


class GenerateUser(HttpUser):
    wait_time = between(0.0, 0.5)

    @task
    def generate(self) -> None:
        body = {
            "class_label": random.randrange(10),
            "steps": 50,
            "seed": random.randrange(2**31),
            "cache_interval": random.choice([1, 2, 3, 4]),
        }
        with self.client.post("/generate", json=body, catch_response=True) as response:
            if response.status_code == 429:
                response.success()  # back-pressure is expected under overload
