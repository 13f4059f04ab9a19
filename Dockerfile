# The app image: migrate, web (admin), worker, beat and flower all run from it.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY . .
RUN pip install . \
    && useradd --system --uid 1000 --no-create-home app \
    && mkdir -p /app/state \
    && chown app /app/state
USER app

EXPOSE 8000 5555
CMD ["python", "manage.py", "runserver", "0.0.0.0:8000"]
