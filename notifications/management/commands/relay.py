"""``manage.py relay``: publish the outbox now, from the command line (cron, scripts,
services that run no beat). Beat's ``notifications.relay`` task does the same."""

from typing import Any

from django.core.management.base import BaseCommand

from notifications.relay import drain


class Command(BaseCommand):
    help = "Publish committed outbox rows to the broker (one relay pass) and print how many."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--budget", type=float, default=60.0, help="Stop after this many seconds.")

    def handle(self, *args: Any, budget: float, **options: Any) -> None:
        self.stdout.write(f"published {drain(budget=budget)}")
