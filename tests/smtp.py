"""The tests' SMTP server: the chaos run's recording, misbehaving aiosmtpd server."""

from notifications.chaos.mailserver import MailServer as SMTPServer
from notifications.chaos.mailserver import Plan, Received, start

__all__ = ["Plan", "Received", "SMTPServer", "start"]
