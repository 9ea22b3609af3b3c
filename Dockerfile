# cronclock: the HTTP cron-clock sidecar. Build: docker build -t cronclock .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/cronclock

# Dependencies in a layer of their own: rebuilt only when pyproject.toml changes, not the code.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The code (the example application ships too: compose runs it as `app`).
COPY README.md ./
COPY src ./src
COPY services ./services
COPY examples ./examples
RUN pip install --no-deps .

# A user of its own, and the state directory as a volume.
RUN useradd --system --uid 10001 --home-dir /var/lib/cronclock --shell /usr/sbin/nologin cronclock \
    && mkdir -p /var/lib/cronclock \
    && chown cronclock:cronclock /var/lib/cronclock
VOLUME ["/var/lib/cronclock"]

ENV SCHEDULER_STATE_URL=sqlite:////var/lib/cronclock/state.db \
    SCHEDULER_ADMIN_BIND=0.0.0.0:8089 \
    SCHEDULER_LOG_FORMAT=json

USER cronclock
EXPOSE 8089

# 200 while the loop runs (a healthy HA standby too); 503 makes urlopen raise: unhealthy.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8089/healthz', timeout=4)"]

# Exec form: the daemon is PID 1 and receives SIGTERM itself (it drains calls in flight, then
# exits 0). Give it longer than SCHEDULER_SHUTDOWN_GRACE_SECONDS (docker stop -t / stop_grace_period).
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "services.scheduler"]
CMD ["run"]
