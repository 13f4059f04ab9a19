"""``manage.py bench``: the pipeline's throughput, latency and memory, measured in one run
beside two peers (a plain Celery task per email, django-post-office) against the same
local services and the same counting SMTP sink."""
