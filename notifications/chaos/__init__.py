"""The chaos run: the real processes against the real services, under seeded faults,
checked against the contract (``manage.py chaos``). Needs the ``dev`` extra (aiosmtpd)."""
