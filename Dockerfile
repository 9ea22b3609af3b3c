# cronclock: the HTTP cron-clock sidecar. Build: docker build -t cronclock .
# Pinned: a rebuild gets the same Python and Debian until this line changes.
FROM python:3.11.14-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/cronclock

# Dependencies in a layer of their own: rebuilt only when pyproject.toml changes, not the code.
# The image carries the Redis and PostgreSQL clients and the OpenTelemetry exporter (the extras
# cronclock[redis,postgres,otel]), so it runs as a replica on either and exports spans when
# OTEL_EXPORTER_OTLP_ENDPOINT is set (they are imported only when used).
COPY pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['redis'] + p['optional-dependencies']['postgres'] + p['optional-dependencies']['otel']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The code (the example application ships too: compose runs it as `app`).
COPY README.md ./
COPY src ./src
COPY services ./services
COPY examples ./examples
RUN pip install --no-deps .

# A user of its own, and the state directory as a volume. USER is numeric so that Kubernetes'
# runAsNonRoot can verify it without reading /etc/passwd.
RUN groupadd --system --gid 10001 cronclock \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/cronclock \
        --shell /usr/sbin/nologin cronclock \
    && mkdir -p /var/lib/cronclock \
    && chown 10001:10001 /var/lib/cronclock
VOLUME ["/var/lib/cronclock"]

ENV SCHEDULER_STATE_URL=sqlite:////var/lib/cronclock/state.db \
    SCHEDULER_ADMIN_BIND=0.0.0.0:8089 \
    SCHEDULER_LOG_FORMAT=json

USER 10001:10001
EXPOSE 8089

# /healthz where SCHEDULER_ADMIN_BIND says the daemon listens: 200 while the loop runs (a
# healthy HA standby too), 503 or no answer is unhealthy.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-m", "services.scheduler.healthcheck"]

# Exec form: the daemon is PID 1 and receives SIGTERM itself (it drains calls in flight, then
# exits 0). Give it longer than SCHEDULER_SHUTDOWN_GRACE_SECONDS (docker stop -t / stop_grace_period).
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "services.scheduler"]
CMD ["run"]
