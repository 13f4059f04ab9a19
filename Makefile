# Local development: `make run` starts the whole pipeline, `make test` runs the tests.
# Both create .venv on first use and reinstall only when pyproject.toml changes.

PYTHON3 ?= python3
VENV    := .venv
PYTHON  := $(VENV)/bin/python
STAMP   := $(VENV)/.installed

.PHONY: run clean-dev test lint chaos chaos-short chaos-kafka-short bench bench-short bench-backlog bench-schedule bench-priority \
	bench-retention bench-dashboard bench-ratelimit bench-mime bench-writes

# BROKER=kafka: deliveries over Kafka (a local broker, data in .devstack/kafka, unless
# KAFKA_BOOTSTRAP_SERVERS names one); Celery's own tasks stay on RabbitMQ.
run: $(STAMP)
	$(PYTHON) manage.py devstack $(if $(BROKER),--broker $(BROKER))

# Remove what `make run` created: its database and RabbitMQ vhost (only if it created
# them), the app's Redis keys, and .devstack/.
clean-dev: $(STAMP)
	$(PYTHON) manage.py devstack --teardown

test: $(STAMP)
	$(PYTHON) -m pytest $(PYTEST_ARGS)

# The full fault run the README quotes (N = 5,000, every fault kind), in both ambiguity modes.
chaos: $(STAMP)
	$(PYTHON) manage.py chaos --n 5000 --faults all --mode resend --report chaos-resend.json $(CHAOS_ARGS)
	$(PYTHON) manage.py chaos --n 5000 --faults all --mode hold --report chaos-hold.json $(CHAOS_ARGS)

# The short run CI does on every push: a few hundred notifications, every fault kind, both modes.
chaos-short: $(STAMP)
	$(PYTHON) manage.py chaos --n 300 --duration 25 --fault-every 2 --faults all --mode resend \
		--report chaos-short-resend.json $(CHAOS_ARGS)
	$(PYTHON) manage.py chaos --n 300 --duration 25 --fault-every 2 --faults all --mode hold \
		--report chaos-short-hold.json $(CHAOS_ARGS)

# The delivery path on Kafka under every fault (a Tansu broker the run starts, restarts and
# stops itself), in both modes; CI runs it after chaos-short.
chaos-kafka-short: $(STAMP)
	$(PYTHON) manage.py chaos --broker kafka --n 300 --duration 25 --fault-every 2 --faults all --mode resend \
		--report chaos-short-kafka-resend.json $(CHAOS_ARGS)
	$(PYTHON) manage.py chaos --broker kafka --n 300 --duration 25 --fault-every 2 --faults all --mode hold \
		--report chaos-short-kafka-hold.json $(CHAOS_ARGS)

# The benchmark the README quotes: our pipeline beside a plain Celery task per email and
# django-post-office, same N, workers and concurrency, against the local services.
bench: $(STAMP)
	$(PYTHON) manage.py bench $(BENCH_ARGS)

# A small N, only to show the command works end to end (not a timed test), our pipeline on
# both delivery brokers. `make bench BENCH_ARGS="--brokers rabbitmq,kafka"` compares them at
# the full N (about 2.5 minutes more).
bench-short: $(STAMP)
	$(PYTHON) manage.py bench --n 500 --paced-seconds 10 --brokers rabbitmq,kafka --report bench-short.json \
		$(BENCH_ARGS)

# The relay's claim time and cost per row from an empty outbox to 1,000,000 pending rows.
bench-backlog: $(STAMP)
	$(PYTHON) manage.py bench_backlog $(BENCH_ARGS)

# The relay's claim with 0 to 1,000,000 rows scheduled for later (beside the claim without its
# index and the claim of earlier releases), and how close to its send_at a scheduled email arrives.
bench-schedule: $(STAMP)
	$(PYTHON) -m project.bench.schedule $(BENCH_ARGS)

# A priority="high" notification sent into 20,000 waiting normal ones: its latency to the mail
# server, beside a normal one sent at the same moment.
bench-priority: $(STAMP)
	$(PYTHON) -m project.bench.priority $(BENCH_ARGS)

# The retention purge on 1,000,000 notifications, with notify() and the relay's claim running beside it.
bench-retention: $(STAMP)
	$(PYTHON) -m project.bench.retention $(BENCH_ARGS)

# The dashboard's queries, the admin lists and their searches on 1,000,000 notifications.
bench-dashboard: $(STAMP)
	$(PYTHON) -m project.bench.dashboard $(BENCH_ARGS)

# A backend limited to 50 emails/s, three worker processes: the fullest second at the SMTP
# server, the average rate and the gaps between arrivals (README, "Providers and rate limits").
bench-ratelimit: $(STAMP)
	$(PYTHON) -m project.bench.ratelimit $(BENCH_ARGS)

# An email's bytes written directly (notifications.mime) beside Django's email code, per email,
# for ASCII, HTML and non-ASCII emails; no service needed.
bench-mime: $(STAMP)
	$(PYTHON) -m project.bench.mime $(BENCH_ARGS)

# What the relay's and the worker's writes cost PostgreSQL per email (CPU, WAL, HOT updates),
# with no broker or mail server; run it at two commits to compare a change of the write path.
bench-writes: $(STAMP)
	$(PYTHON) -m project.bench.writes $(BENCH_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check notifications project tests
	$(VENV)/bin/ruff format --check notifications project tests
	$(VENV)/bin/mypy notifications project

$(PYTHON):
	$(PYTHON3) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PYTHON)
	$(PYTHON) -m pip install --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)
